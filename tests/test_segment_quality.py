"""Segmentation quality floors on real shared fields (BCCD and Chula RBC-12).

The floors sit a little below what the segmentation measured when they were set, so a
regression in the automatic scale, the white-cell mask or the red-cell splitting fails
here rather than only in ``benchmarks/segment_accuracy.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parents[1].parent / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


def _require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        message = f"real smear data not found at {path} (expected ../shared/data beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _read(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    image = np.asarray(iio.imread(path))
    return image[..., 0] if image.ndim == 3 and path.suffix == ".png" else image


def _boxes(stem: str) -> dict[str, np.ndarray]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from segment_accuracy import read_boxes
    finally:
        sys.path.pop(0)
    return read_boxes(DATA / "bccd" / "boxes" / f"{stem}.xml")


def _match(seg, kind: str, boxes: np.ndarray) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from segment_accuracy import match_centroids
    finally:
        sys.path.pop(0)
    rows = seg.table[seg.table.cell_type == kind]
    return match_centroids(rows[["centroid_x", "centroid_y"]].to_numpy(), boxes)


BCCD_FIELDS = ["BloodImage_00006", "BloodImage_00012", "BloodImage_00020", "BloodImage_00042"]


@pytest.fixture(scope="module")
def bccd_results():
    images = _require_data("bccd", "images")
    from napari_smear import segment_smear

    results = {}
    for stem in BCCD_FIELDS:
        rgb = _read(images / f"{stem}.jpg")
        results[stem] = (rgb, segment_smear(rgb))
    return results


def test_bccd_automatic_scale_matches_box_sizes():
    """The automatic ruler against the median red-cell box of every 7th BCCD field."""
    images = _require_data("bccd", "images")
    from napari_smear.segment import _estimate_diameter
    from napari_smear.segment.stain import estimate_stain

    errors = []
    for path in sorted(images.glob("*.jpg"))[::7]:
        rbc = _boxes(path.stem)["rbc"]
        if len(rbc) < 5:
            continue
        reference = np.median(np.sqrt((rbc[:, 2] - rbc[:, 0]) * (rbc[:, 3] - rbc[:, 1])))
        rgb = _read(path)
        errors.append(abs(_estimate_diameter(rgb, estimate_stain(rgb)) / reference - 1))
    errors = np.asarray(errors)
    # typical field within 8 %, nine in ten within 15 %, none off by 30 % (packed
    # clumps of pale cells with no isolated cell are the hardest: about 20 %)
    assert len(errors) >= 30
    assert np.median(errors) < 0.08, np.round(errors, 3)
    assert np.percentile(errors, 90) < 0.15, np.round(errors, 3)
    assert errors.max() < 0.30, np.round(errors, 3)


@pytest.mark.parametrize(
    "relative, expected_px",
    [
        # pale cells whose pallor opens onto the glass measured as rings: 31 px
        (("bccd", "images", "BloodImage_00351.jpg"), 100.0),
        # PBC training images with a few red cells round the white cell: 19-21 px
        (("pbc", "images", "monocyte", "MO_468506.jpg"), 52.0),
        (("pbc", "images", "ig", "MY_612971.jpg"), 52.0),
        (("pbc", "images", "platelet", "PLATELET_803035.jpg"), 52.0),
    ],
)
def test_ruler_does_not_settle_on_the_width_of_ring_shaped_cells(relative, expected_px):
    """Fields where the first guess fell to the width of ring-shaped red cells, a fixed
    point of the refinement (the typical size of their data set: BCCD about 100 px from
    its boxes, PBC 52 px, the median over 800 of its images)."""
    from napari_smear.segment import _estimate_diameter
    from napari_smear.segment.stain import estimate_stain

    rgb = _read(_require_data(*relative))
    diameter = _estimate_diameter(rgb, estimate_stain(rgb))
    assert abs(diameter / expected_px - 1) < 0.15, diameter


@pytest.mark.parametrize("name", ["EO_188271.jpg", "EO_168236.jpg"])
def test_pale_red_cells_round_a_dark_white_cell_are_found(name):
    """PBC eosinophils among very pale red cells: the flattened field's three-class
    split once put the red cells with the glass, so only the white cell was stained,
    the ruler found no red cell and the eosinophil's granular cytoplasm was taken for a
    red cell beside its nucleus."""
    from napari_smear import segment_smear

    seg = segment_smear(_read(_require_data("pbc", "images", "eosinophil", name)))
    counts = seg.counts()
    assert counts.get("rbc", 0) >= 5 and counts.get("wbc", 0) == 1, counts
    assert abs(seg.rbc_diameter_px / 52.0 - 1) < 0.15, seg.rbc_diameter_px  # PBC's typical size
    wbc = int(seg.table.label[seg.table.cell_type == "wbc"].iloc[0])
    # the whole cell, not its nucleus alone
    assert (seg.labels == wbc).sum() > 1.5 * (seg.nuclei == wbc).sum()


def test_granular_cytoplasm_option_outlines_eosinophils_whole():
    """PBC eosinophils: the orange granules are nearly the red cells' colour, so by
    colour alone (the default) the outline holds little more than the nucleus (median
    nucleus share of the cell 0.77 over 20 training images, against 0.37 for
    neutrophils). ``CellParams.wbc_granular_density`` counts dense granules as
    cytoplasm (share about 0.46); it is off by default because the built-in
    classifier learned from the colour-alone outlines (docs/benchmarks.md)."""
    import dataclasses

    import pandas as pd

    from napari_smear import segment_smear
    from napari_smear.segment.cells import CellParams

    split = pd.read_csv(_require_data("pbc", "split.csv"))
    paths = split[(split.label == "eosinophil") & (split.split == "train")].path.tolist()[::37][:6]
    granular = dataclasses.replace(CellParams(), wbc_granular_density=(2.0, 3.0))
    shares = {"default": [], "granular": []}
    for path in paths:
        rgb = _read(DATA / "pbc" / path)
        for name, params in (("default", None), ("granular", granular)):
            seg = segment_smear(rgb, params=params)
            wbc = seg.table[seg.table.cell_type == "wbc"]
            centre = np.array(rgb.shape[:2]) / 2
            nearest = wbc.label.iloc[int(np.argmin(np.hypot(wbc.centroid_y - centre[0], wbc.centroid_x - centre[1])))]
            shares[name].append((seg.nuclei == nearest).sum() / (seg.labels == nearest).sum())
    assert np.median(shares["granular"]) < 0.55, shares
    assert np.median(shares["default"]) > 0.65, shares


def test_too_few_cells_for_the_ruler_is_said():
    """A small crop around one white cell: the ruler may measure the white cell, and says
    the field is too sparse to trust; the whole field is measured without a word."""
    import warnings

    from napari_smear import segment_smear

    rgb = _read(_require_data("bccd", "images", "BloodImage_00000.jpg"))
    with pytest.warns(UserWarning, match="red cells' worth of stained area"):
        segment_smear(rgb[100:400, 100:500])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segment_smear(rgb)


@pytest.mark.parametrize("stem", ["BloodImage_00000", "BloodImage_00003"])
def test_table_describes_the_red_cells_a_white_cell_took_pixels_from(stem):
    """A white cell's full-resolution outline takes pixels from the red cells against
    it; those are measured again, so the table matches the labels (on these fields it
    did not: the viewer then said "edited by hand" of an untouched segmentation)."""
    from skimage.measure import regionprops_table

    from napari_smear import segment_smear

    seg = segment_smear(_read(_require_data("bccd", "images") / f"{stem}.jpg"))
    props = regionprops_table(seg.labels.astype(np.int64), properties=("label", "centroid", "bbox", "area"))
    table = seg.table.set_index("label")
    assert sorted(table.index) == sorted(props["label"])
    table = table.loc[props["label"]]
    np.testing.assert_array_equal(table.area_px.to_numpy(), props["area"])
    np.testing.assert_allclose(table.centroid_y.to_numpy(), props["centroid-0"], atol=1e-6)
    np.testing.assert_allclose(table.centroid_x.to_numpy(), props["centroid-1"], atol=1e-6)
    for k, column in enumerate(("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")):
        np.testing.assert_array_equal(table[column].to_numpy(), props[f"bbox-{k}"])


def test_bccd_white_cell_masks(bccd_results):
    dice_cell, dice_nucleus = [], []
    for stem, (_, seg) in bccd_results.items():
        truth = _read(DATA / "bccd" / "wbc_masks" / f"{stem}.png")
        wbc_ids = seg.table.label[seg.table.cell_type == "wbc"].to_numpy()
        cell = np.isin(seg.labels, wbc_ids)
        nucleus = seg.nuclei > 0
        dice_cell.append(2 * (cell & (truth > 0)).sum() / (cell.sum() + (truth > 0).sum()))
        dice_nucleus.append(2 * (nucleus & (truth == 2)).sum() / (nucleus.sum() + (truth == 2).sum()))
    assert np.mean(dice_cell) > 0.85, dice_cell
    assert np.mean(dice_nucleus) > 0.80, dice_nucleus


def test_bccd_detections(bccd_results):
    tp = n_pred = n_true = wbc_tp = wbc_true = 0
    for stem, (_, seg) in bccd_results.items():
        boxes = _boxes(stem)
        tp += _match(seg, "rbc", boxes["rbc"])
        n_pred += seg.counts()["rbc"]
        n_true += len(boxes["rbc"])
        wbc_tp += _match(seg, "wbc", boxes["wbc"])
        wbc_true += len(boxes["wbc"])
    precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
    assert 2 * precision * recall / (precision + recall) > 0.65, (tp, n_pred, n_true)
    assert wbc_tp == wbc_true


@pytest.mark.parametrize("field", ["2", "5"])
def test_chula_red_cells_found(field):
    images = _require_data("chula_rbc12", "images")
    from napari_smear import segment_smear

    rgb = _read(images / f"{field}.jpg")
    seg = segment_smear(rgb)
    assert 30 < seg.rbc_diameter_px < 46  # Chula red cells are about 36-42 px across
    points = np.loadtxt(DATA / "chula_rbc12" / "labels" / f"{field}.txt", ndmin=2)
    h, w = seg.labels.shape
    xs = np.clip(points[:, 0].round().astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].round().astype(int), 0, h - 1)
    rbc_ids = seg.table.label[seg.table.cell_type == "rbc"].to_numpy()
    assert np.isin(seg.labels[ys, xs], rbc_ids).mean() > 0.93
    # isolated cells are not over-split: about one red cell per labelled point
    assert seg.counts()["rbc"] < 1.3 * len(points)
    # outlines drawn without pixel steps: a round cell measures round (median
    # circularity 0.88-0.89 on these fields; 0.79 when labels were upsampled blockwise)
    from napari_smear.morphology import morphology_table

    whole = seg.table.label[(seg.table.cell_type == "rbc") & ~seg.table.touches_edge].to_numpy()
    labelled = np.unique(seg.labels[ys, xs][np.isin(seg.labels[ys, xs], whole)])
    circularity = morphology_table(rgb, seg).set_index("label").loc[labelled, "circularity"]
    assert np.median(circularity) > 0.84


@pytest.mark.parametrize("frame", [False, True], ids=["vignetted", "eyepiece"])
def test_bccd_fields_photographed_with_a_phone(frame):
    """Real BCCD fields darkened 20 % towards the rim, or seen through an eyepiece (a
    round view in a black frame, 10 % vignetting): the white cell is still found and
    most boxed red cells in the view too (before 2026-12-01 the vignetted fields lost
    most of their cells and the eyepiece photos all of them)."""
    import warnings

    from napari_smear import segment_smear
    from napari_smear.samples import eyepiece_photo

    found_wbc = matched = boxed = 0
    for stem in BCCD_FIELDS:
        rgb = _read(_require_data("bccd", "images", f"{stem}.jpg"))
        if frame:
            photo, radial = eyepiece_photo(rgb, fade=0.015, vignette=0.1)
        else:
            photo, radial = eyepiece_photo(rgb, vignette=0.2, frame=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = segment_smear(photo)
        boxes = _boxes(stem)
        rbc = boxes["rbc"]
        centre_y = ((rbc[:, 1] + rbc[:, 3]) / 2).astype(int).clip(0, rgb.shape[0] - 1)
        centre_x = ((rbc[:, 0] + rbc[:, 2]) / 2).astype(int).clip(0, rgb.shape[1] - 1)
        in_view = rbc[radial[centre_y, centre_x] < 0.9]
        matched += _match(seg, "rbc", in_view)
        boxed += len(in_view)
        found_wbc += _match(seg, "wbc", boxes["wbc"]) > 0
        if frame:
            cy = seg.table.centroid_y.to_numpy().round().astype(int)
            cx = seg.table.centroid_x.to_numpy().round().astype(int)
            assert not (radial[cy, cx] > 1).any()
    assert found_wbc >= len(BCCD_FIELDS) - 1
    print(f"{matched}/{boxed} boxed red cells in the view found")
    # these four fields are hard ones (packed, pale); measured 2026-12-01 on the boxes
    # in the inner 90 % of the view: 23/40 vignetted, 27/40 eyepiece (the plain fields:
    # 44 of all 62 boxes; the code before: 12 of 62 vignetted, none through the eyepiece)
    assert matched / boxed >= (0.5 if not frame else 0.6), (matched, boxed)
