"""Whole-smear segmentation: contract, scale, input checks, tiles."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from napari_smear import segment_smear
from napari_smear.segment import TABLE_COLUMNS, ScaleEstimateError
from napari_smear.samples import synthetic_smear


def _match_truth(seg, truth):
    """Share of true cells whose centre pixel lies in a predicted cell of the same type."""
    hits = 0
    types = dict(zip(seg.table.label, seg.table.cell_type))
    true_labels = truth["labels"]
    for lab, kind in truth["cell_types"].items():
        ys, xs = np.nonzero(true_labels == lab)
        if ys.size == 0:
            continue
        cy, cx = int(np.median(ys)), int(np.median(xs))
        pred = int(seg.labels[cy, cx])
        hits += pred > 0 and types.get(pred) == kind
    return hits / len(truth["cell_types"])


def test_contract_on_synthetic_field(synthetic_field):
    image, truth = synthetic_field
    seg = segment_smear(image)
    assert seg.labels.shape == image.shape[:2] and seg.labels.dtype == np.uint32
    assert seg.nuclei.shape == image.shape[:2] and seg.nuclei.dtype == np.uint32
    assert list(seg.table.columns[: len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert set(seg.table.cell_type) <= {"wbc", "rbc", "platelet"}
    assert sorted(seg.table.label) == list(range(1, len(seg.table) + 1))
    assert set(np.unique(seg.labels)) - {0} == set(seg.table.label)
    # every nucleus pixel carries the id of a white cell and lies inside it
    nuc_ids = set(np.unique(seg.nuclei)) - {0}
    assert nuc_ids <= set(seg.table.label[seg.table.cell_type == "wbc"])
    inside = seg.labels[seg.nuclei > 0] == seg.nuclei[seg.nuclei > 0]
    assert inside.mean() > 0.99
    assert abs(seg.rbc_diameter_px / 40.0 - 1) < 0.15
    assert _match_truth(seg, truth) > 0.9
    assert seg.counts()["wbc"] == 2
    # touches_edge: exactly the cells with a pixel in the first/last row or column
    frame = np.unique(np.r_[seg.labels[0], seg.labels[-1], seg.labels[:, 0], seg.labels[:, -1]])
    flagged = seg.table.label[seg.table.touches_edge]
    assert seg.table.touches_edge.dtype == bool
    assert set(flagged) == set(frame) - {0} and len(flagged) > 0


def test_touching_red_cells_are_split():
    image, truth = synthetic_smear(seed=3, n_rbc=90, n_wbc=0, n_platelets=0)
    seg = segment_smear(image)
    n_true = len(truth["cell_types"])
    assert abs(seg.counts()["rbc"] - n_true) <= 0.1 * n_true


@pytest.mark.parametrize("diameter", [20.0, 60.0])
def test_automatic_scale_follows_magnification(diameter):
    h = int(12 * diameter)
    image, truth = synthetic_smear((h, int(h * 4 / 3)), rbc_diameter_px=diameter, seed=1)
    seg = segment_smear(image)
    assert abs(seg.rbc_diameter_px / diameter - 1) < 0.15
    assert _match_truth(seg, truth) > 0.85


def test_pixel_size_overrides_estimate(synthetic_field):
    image, _ = synthetic_field
    seg = segment_smear(image, pixel_size_um=0.25)
    assert seg.rbc_diameter_px == pytest.approx(7.5 / 0.25)
    assert seg.pixel_size_um == 0.25
    with pytest.raises(ValueError, match="pixel_size_um"):
        segment_smear(image, pixel_size_um=-1)


def test_a_recorded_pixel_size_is_used_when_the_red_cells_confirm_it(synthetic_field):
    image, truth = synthetic_field
    measured = segment_smear(image).rbc_diameter_px
    near = 7.5 / (measured * 1.2)  # a calibration 20 % off the ruler: believed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg = segment_smear(image, recorded_pixel_size_um=near)
    assert seg.pixel_size_um == near and seg.rbc_diameter_px == pytest.approx(measured * 1.2)


@pytest.mark.parametrize("factor", [10.0, 0.25, 1e5])
def test_a_recorded_pixel_size_the_red_cells_contradict_is_ignored_with_a_warning(synthetic_field, factor):
    # a camera program's calibration without the objective's magnification (10x), a
    # binning slip, a unit slip (1e5): the measured scale is used, and the user told
    image, truth = synthetic_field
    measured = segment_smear(image)
    wrong = 7.5 / measured.rbc_diameter_px * factor
    with pytest.warns(UserWarning, match="calibration was ignored"):
        seg = segment_smear(image, recorded_pixel_size_um=wrong)
    assert seg.pixel_size_um is None and seg.rbc_diameter_px == measured.rbc_diameter_px
    assert any("calibration was ignored" in note for note in seg.params["warnings"])
    assert _match_truth(seg, truth) > 0.85
    if factor == 0.25:  # given explicitly, the same size is the user's word
        assert segment_smear(image, pixel_size_um=wrong).rbc_diameter_px == pytest.approx(measured.rbc_diameter_px * 4)


def test_a_recorded_pixel_size_stands_in_where_the_ruler_cannot_measure():
    lone = np.full((100, 100, 3), 230, np.uint8)
    lone[40:60, 40:60] = (150, 60, 80)
    seg = segment_smear(lone, recorded_pixel_size_um=0.375)  # 20 px red cells
    assert seg.pixel_size_um == 0.375 and seg.rbc_diameter_px == pytest.approx(20.0)
    with pytest.raises(ValueError, match="could not be measured instead"):
        segment_smear(lone, recorded_pixel_size_um=1000.0)


def test_odd_inputs_are_converted(synthetic_field):
    image, _ = synthetic_field
    ref = segment_smear(image).counts()
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
    assert segment_smear(rgba).counts() == ref
    as16 = image.astype(np.uint16) * 257
    assert segment_smear(as16).counts() == ref
    asfloat = image.astype(np.float32) / 255
    assert segment_smear(asfloat).counts() == ref
    with pytest.warns(UserWarning, match="no colour"):  # handled, not a crash, and said
        gray = segment_smear(image.mean(-1).astype(np.uint8))
    assert gray.labels.shape == image.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a black field: no divide-by-zero noise either
        for value in (0, 255):
            with pytest.warns(UserWarning, match="no stained cells"):
                segment_smear(np.dstack([np.full((64, 64), value, np.uint8), np.full((64, 64), 30, np.uint8),
                                         np.zeros((64, 64), np.uint8)]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 64, 64, 3), np.uint8), "shape"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((64, 64, 7), np.uint8), "channel"),
    ],
)
def test_bad_inputs_get_specific_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        segment_smear(bad)


def test_blank_field_gives_empty_result():
    blank = np.full((200, 300, 3), 230, np.uint8)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        seg = segment_smear(blank)
    assert seg.n_cells == 0 and not seg.labels.any()
    assert list(seg.table.columns) == [*TABLE_COLUMNS, "touches_edge"]
    # nothing to crop is no crops (a blank field has no ruler either), not an error
    from napari_smear.crops import crop_instances

    crops = crop_instances(blank, seg, output_size=32)
    assert len(crops) == 0 and crops.images.shape == (0, 32, 32, 3)


def test_tiled_processing_matches_single_pass(monkeypatch):
    import napari_smear.segment as segmod

    image, truth = synthetic_smear((1200, 1500), rbc_diameter_px=30, seed=5)
    single = segment_smear(image)
    monkeypatch.setattr(segmod, "_SINGLE_PASS_MAX_PIXELS", 100_000)
    progress = []
    tiled = segment_smear(image, tile_size=200, progress=lambda f, m: progress.append(f))
    assert len(progress) > 4 and progress[-1] == pytest.approx(1.0)
    # same cells, none duplicated or cut at a tile border
    assert abs(tiled.n_cells - single.n_cells) <= max(2, 0.03 * single.n_cells)
    assert _match_truth(tiled, truth) > 0.85
    assert sorted(tiled.table.label) == list(range(1, tiled.n_cells + 1))
    assert tiled.table.area_px.min() > 0.5 * np.pi * 15**2 * 0.006


def test_cancel_through_progress(synthetic_field):
    image, _ = synthetic_field

    class Cancelled(Exception):
        pass

    def cancel(fraction, message):
        raise Cancelled

    with pytest.raises(Cancelled):
        segment_smear(image, progress=cancel)


@pytest.mark.parametrize(
    ("given", "message"),
    [({"pixel_size_um": 50.0}, "0.15 px, under 3 px"), ({"pixel_size_um": 1e-4}, "wider than the whole"),
     ({"rbc_diameter_px": 2.0}, "rbc_diameter_px=2 is under 3 px")],
)
def test_a_given_scale_no_cell_could_have_is_refused(given, message):
    image, _ = synthetic_smear((120, 160), rbc_diameter_px=30, seed=1)
    with pytest.raises(ValueError, match=message):
        segment_smear(image, **given)


def test_scale_error_is_specific():
    lone = np.full((100, 100, 3), 230, np.uint8)
    lone[40:60, 40:60] = (150, 60, 80)
    with pytest.raises(ScaleEstimateError, match="pixel_size_um, --pixel-size-um"):
        segment_smear(lone)


def _regionprops_table(labels):
    from skimage.measure import regionprops_table

    props = regionprops_table(labels.astype(np.int64), properties=("label", "centroid", "bbox", "area"))
    return props


def _assert_table_matches_labels(seg):
    """The table describes the labels exactly."""
    props = _regionprops_table(seg.labels)
    table = seg.table.set_index("label").loc[props["label"]]
    np.testing.assert_array_equal(table.area_px.to_numpy(), props["area"])
    np.testing.assert_allclose(table.centroid_y.to_numpy(), props["centroid-0"], atol=1e-6)
    np.testing.assert_allclose(table.centroid_x.to_numpy(), props["centroid-1"], atol=1e-6)
    for k, column in enumerate(("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")):
        np.testing.assert_array_equal(table[column].to_numpy(), props[f"bbox-{k}"])


def test_table_matches_labels_after_downscaling():
    # red cells 60 px across: processed at 24 px, upsampled, white cells redrawn
    image, _ = synthetic_smear((720, 960), rbc_diameter_px=60, seed=2)
    seg = segment_smear(image)
    assert seg.params["scale_factor"] < 0.5
    _assert_table_matches_labels(seg)


def test_tiles_in_worker_processes_match_serial(monkeypatch):
    import napari_smear.segment as segmod

    image, _ = synthetic_smear((900, 1100), rbc_diameter_px=30, seed=6)
    monkeypatch.setattr(segmod, "_SINGLE_PASS_MAX_PIXELS", 100_000)
    serial = segment_smear(image, tile_size=250, n_workers=1)
    parallel = segment_smear(image, tile_size=250, n_workers=2)
    np.testing.assert_array_equal(serial.labels, parallel.labels)
    np.testing.assert_array_equal(serial.nuclei, parallel.nuclei)
    _assert_table_matches_labels(parallel)


def test_white_cell_mask_covers_pale_cytoplasm():
    image, truth = synthetic_smear(seed=4, n_wbc=3)
    seg = segment_smear(image)
    types = truth["cell_types"]
    ious = []
    for lab, kind in types.items():
        if kind != "wbc":
            continue
        true_cell = truth["labels"] == lab
        ids, counts = np.unique(seg.labels[true_cell & (seg.labels > 0)], return_counts=True)
        pred = int(ids[np.argmax(counts)])
        pred_cell = seg.labels == pred
        ious.append((true_cell & pred_cell).sum() / (true_cell | pred_cell).sum())
    assert len(ious) == 3 and min(ious) > 0.75, ious


def test_uneven_illumination_is_flattened():
    # a vignette darkening the corners by 15 % must not turn the glass there into cells
    image, truth = synthetic_smear((480, 640), seed=7)
    yy, xx = np.mgrid[-1:1:480j, -1:1:640j]
    vignette = 1 - 0.15 * (yy**2 + xx**2) / 2
    dark = np.clip(image * vignette[..., None], 0, 255).astype(np.uint8)
    flat, shaded = segment_smear(image), segment_smear(dark)
    assert abs(shaded.rbc_diameter_px / flat.rbc_diameter_px - 1) < 0.1
    glass = truth["labels"] == 0
    assert (shaded.labels[glass] > 0).mean() < (flat.labels[glass] > 0).mean() + 0.03
    assert abs(shaded.counts()["rbc"] - flat.counts()["rbc"]) <= 0.1 * flat.counts()["rbc"]


def test_upsampled_outlines_are_smooth_and_keep_small_cells():
    from skimage.measure import perimeter

    from napari_smear.segment import _smooth_upsample

    # a disk 24 working pixels across (a red cell at working resolution), a one-pixel
    # platelet, drawn 4x larger (a camera field)
    yy, xx = np.mgrid[:40, :40]
    small = np.zeros((40, 40), np.int32)
    small[(yy - 20) ** 2 + (xx - 20) ** 2 <= 12**2] = 1
    small[2, 2] = 2
    full = _smooth_upsample(small, (160, 160))
    blocky = np.kron(small, np.ones((4, 4), np.int32))
    assert set(np.unique(full)) == {0, 1, 2}
    disk = full == 1
    # same size as the nearest-neighbour drawing, but a perimeter well short of the
    # staircase's (measured: 13 % over the circle's against 27 %)
    assert abs(int(disk.sum()) - int((blocky == 1).sum())) < 0.02 * disk.sum()
    circle = 2 * np.sqrt(np.pi * disk.sum())
    assert perimeter(disk) < 1.16 * circle
    assert perimeter(disk) < 0.92 * perimeter(blocky == 1)


@pytest.mark.parametrize("scale", [1.0, 1.2, 1.5, 2.0, 4.0])
def test_upsampling_loses_no_cell(scale):
    from napari_smear.segment import _smooth_upsample

    rng = np.random.default_rng(0)
    small = np.zeros((50, 60), np.int32)
    spots = rng.choice(50 * 60, 40, replace=False)
    small.ravel()[spots] = np.arange(1, 41)  # one-pixel cells (platelets)
    full = _smooth_upsample(small, (round(50 * scale), round(60 * scale)))
    assert set(np.unique(full)) == set(range(41))


def test_ruler_of_a_mid_size_field_comes_from_windows_and_sparse_fields_still_get_one():
    from napari_smear.segment import _SCALE_WHOLE_FIELD_MAX_PIXELS, _estimate_diameter, _window_diameter
    from napari_smear.segment.stain import estimate_stain

    field, _ = synthetic_smear((1200, 1600), rbc_diameter_px=30.0, seed=4)
    mosaic = np.tile(field, (2, 2, 1))  # 2400 x 3200: measured on five windows
    assert mosaic.shape[0] * mosaic.shape[1] > _SCALE_WHOLE_FIELD_MAX_PIXELS
    stain = estimate_stain(field)
    windowed = _estimate_diameter(mosaic, stain)
    assert abs(windowed / _window_diameter(mosaic, stain) - 1) < 0.05
    assert abs(windowed / 30.0 - 1) < 0.15
    # cells only in one corner, which none of the five windows reaches: the whole
    # field is measured instead of giving up
    sparse = np.full_like(mosaic, 235)
    sparse[:400, :600] = field[:400, :600]
    assert abs(_estimate_diameter(sparse, stain) / 30.0 - 1) < 0.15


def test_pale_ring_makes_its_cell_whole_and_glass_between_cells_stays_glass():
    from napari_smear.segment.cells import CellParams, pale_rings

    d = 24.0
    yy, xx = np.mgrid[:80, :160]
    r = np.hypot(yy - 40, xx - 40)
    # a pale cell: its faint rim closes (faint mask) but only a crescent of it
    # passed the glass/cell threshold (cells), so its pallor was left open
    faint = (r >= 7) & (r <= 12)
    cells = faint & (xx < 36)
    found = pale_rings(faint, cells, d, CellParams())
    whole = cells | found
    assert whole[r <= 12].all() and not whole[r > 13].any()
    assert not (found & cells).any()
    # three touching cells enclose a patch of concave-sided glass: not a pallor
    centres = [(30, 110), (30, 134), (51, 122)]
    disks = np.zeros_like(faint)
    for cy, cx in centres:
        disks |= np.hypot(yy - cy, xx - cx) <= 12.5
    assert not pale_rings(disks, disks & (xx > 90), d, CellParams()).any()


def test_progress_is_reported_before_each_tile_starts(synthetic_field, monkeypatch):
    """A cancel (an exception from progress) is seen before the first tile's result:
    on a large image that result takes seconds."""
    import napari_smear.segment as segment_module

    image, _ = synthetic_field
    monkeypatch.setattr(segment_module, "_SINGLE_PASS_MAX_PIXELS", 100_000)  # tile this small field
    messages = []
    seg = segment_module.segment_smear(image, tile_size=128, n_workers=1,
                                       progress=lambda fraction, message: messages.append(message))
    assert seg.n_cells > 0
    assert messages[:2] == ["estimating stain and scale", "measuring the red-cell size"]
    first_start = messages.index("segmenting tile 1/" + messages[-1].split("/")[-1])
    assert first_start < messages.index("segmented tile 1/" + messages[-1].split("/")[-1])

    class Stop(Exception):
        pass

    def stop_at_first_tile(fraction, message):
        if message.startswith("segmenting tile 1/"):
            raise Stop

    with pytest.raises(Stop):
        segment_module.segment_smear(image, tile_size=128, n_workers=1, progress=stop_at_first_tile)


def test_refresh_table_after_labels_edited_by_hand():
    from napari_smear.segment import refresh_table

    image, _ = synthetic_smear((240, 320), rbc_diameter_px=30, seed=2)
    seg = segment_smear(image)
    assert refresh_table(seg) is seg  # unedited: as it was
    labels, nuclei = seg.labels.copy(), seg.nuclei.copy()
    table = seg.table.set_index("label")
    gone = int(table.index[table.cell_type == "rbc"][0])
    labels[labels == gone] = 0
    redrawn = int(table.index[table.cell_type == "rbc"][1])
    row = int(round(table.loc[redrawn, "centroid_y"]))
    labels[row][labels[row] == redrawn] = 0  # a stroke of the eraser across it
    free = np.argwhere((labels == 0) & (nuclei == 0))
    painted, with_nucleus = int(labels.max()) + 1, int(labels.max()) + 2
    for label, (y, x), nucleated in ((painted, free[0], False), (with_nucleus, free[-1], True)):
        box = (slice(max(0, y - 4), y + 4), slice(max(0, x - 4), x + 4))
        labels[box][labels[box] == 0] = label
        if nucleated:
            nuclei[y, x] = label
    edited = refresh_table(replace(seg, labels=labels, nuclei=nuclei))
    rows = edited.table.set_index("label")
    assert gone not in rows.index and {painted, with_nucleus} <= set(rows.index)
    assert rows.loc[with_nucleus, "cell_type"] == "wbc" and rows.loc[painted, "cell_type"] == "platelet"
    assert rows.loc[redrawn, "area_px"] == int((labels == redrawn).sum()) < table.loc[redrawn, "area_px"]
    assert edited.params["edited"] == {"removed": 1, "added": 2, "redrawn": 1}
    assert list(edited.table.columns) == list(seg.table.columns)


def test_ruler_of_cells_too_large_for_the_windows_comes_from_the_whole_field():
    """A field over the size measured whole whose cells are so large that a window holds
    only a few across (a photo upscaled 4 times) is measured on the whole field,
    subsampled: its ruler is 4 times the original's (the windows alone had measured
    about half that on a BCCD field)."""
    from PIL import Image

    from napari_smear.segment import _SCALE_WHOLE_FIELD_MAX_PIXELS, _estimate_diameter
    from napari_smear.segment.stain import estimate_stain

    field, _ = synthetic_smear((480, 640), rbc_diameter_px=80.0, seed=5)  # the windows alone: 202 px, not 315
    upscaled = np.asarray(Image.fromarray(field).resize((640 * 4, 480 * 4), Image.BICUBIC))
    assert upscaled.shape[0] * upscaled.shape[1] > _SCALE_WHOLE_FIELD_MAX_PIXELS
    stain = estimate_stain(field)
    native = _estimate_diameter(field, stain)
    assert abs(_estimate_diameter(upscaled, stain) / (4 * native) - 1) < 0.05
