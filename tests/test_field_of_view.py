"""Eyepiece photos (a round view in a black frame) and vignetting: the black surround is
found and painted as glass, cells at its rim are marked cut, and strong vignetting does
not lose the glass."""
from __future__ import annotations

import numpy as np
import pytest

from napari_smear import segment_smear
from napari_smear.crops import crop_instances
from napari_smear.samples import eyepiece_photo, synthetic_smear
from napari_smear.segment import fill_outside_view, find_outside_view


def eyepiece(image, **options):
    photo, radial = eyepiece_photo(image, **options)
    return photo


def _radius(shape):
    """Distance from the centre in pixels, and the view's radius (eyepiece_photo's default)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2), 0.55 * min(h, w)


@pytest.fixture(scope="module")
def field():
    return synthetic_smear((600, 800), rbc_diameter_px=36, n_wbc=2, n_platelets=6, seed=11)


def test_lit_fields_have_no_outside(field):
    image, _ = field
    assert find_outside_view(image) is None
    assert find_outside_view(np.full((50, 60, 3), 230, np.uint8)) is None
    assert find_outside_view(np.zeros((50, 60, 3), np.uint8)) is None  # dark: nothing to tell apart
    # a dark speck (under 1 % of the field) is not an unlit region
    speck = image.copy()
    speck[100:120, 100:120] = 0
    assert find_outside_view(speck) is None


def test_finds_the_black_frame(field):
    image, _ = field
    photo = eyepiece(image, fade=0.015)
    outside = find_outside_view(photo)
    r, r0 = _radius(image.shape[:2])
    assert outside is not None and outside.shape == image.shape[:2]
    assert outside[r > r0].mean() > 0.99  # the frame
    assert not outside[r < 0.95 * r0].any()  # the view, a margin from its rim
    filled = fill_outside_view(photo, outside)
    assert filled[outside].max(-1).min() > 150  # painted as glass, not black
    np.testing.assert_array_equal(filled[~outside], photo[~outside])
    with pytest.raises(ValueError, match="outside must be"):
        fill_outside_view(photo, outside[:10])


def _found(seg, truth, where):
    """Share of true cells centred in ``where`` whose centre lies in a predicted cell
    of their type."""
    types = dict(zip(seg.table.label, seg.table.cell_type))
    hits = total = 0
    for lab, kind in truth["cell_types"].items():
        ys, xs = np.nonzero(truth["labels"] == lab)
        if not ys.size:
            continue
        cy, cx = int(np.median(ys)), int(np.median(xs))
        if not where[cy, cx]:
            continue
        total += 1
        pred = int(seg.labels[cy, cx])
        hits += pred > 0 and types.get(pred) == kind
    return hits / total


@pytest.mark.parametrize("fade, vignette", [(0.0, 0.0), (0.015, 0.1)])
def test_eyepiece_photo_segments_like_the_field(field, fade, vignette):
    image, truth = field
    photo = eyepiece(image, fade=fade, vignette=vignette)
    r, r0 = _radius(image.shape[:2])
    seg = segment_smear(photo)
    table = seg.table
    assert seg.params["outside_view_share"] == pytest.approx((r >= r0).mean(), abs=0.03)
    # the frame is neither cells nor two giant "white cells" (what it was before)
    assert not seg.labels[r > 1.02 * r0].any()
    assert table.area_px.max() < 4 * np.pi / 4 * seg.rbc_diameter_px ** 2
    assert seg.rbc_diameter_px == pytest.approx(truth["rbc_diameter_px"], rel=0.15)
    assert _found(seg, truth, r < 0.85 * r0) >= 0.9
    # cells on the rim of the view are marked cut; cells well inside are not
    cy, cx = table.centroid_y.to_numpy(int), table.centroid_x.to_numpy(int)
    on_rim = r[cy, cx] > r0 - 0.3 * seg.rbc_diameter_px
    deep = r[cy, cx] < r0 - 1.5 * seg.rbc_diameter_px
    assert table.touches_edge[on_rim].all()
    assert not table.touches_edge[deep & (table.bbox_min_y > 0) & (table.bbox_min_x > 0)].any()
    # the crops of rim cells hold painted glass, not the black frame
    crops = crop_instances(photo, seg, labels=table.label[on_rim].to_numpy()[:5])
    assert crops.images.max(-1).min() > 60


def test_strong_vignetting_keeps_the_cells(field):
    # a phone camera's lens darkens the rim: 20 % at the short side's half, more in the
    # corners. The glass fit used to start from the centre's brightness alone and lost
    # the cells of darkened fields.
    image, truth = field
    dimmed, _ = eyepiece_photo(image, vignette=0.2, frame=False)
    plain = segment_smear(image)
    seg = segment_smear(dimmed)
    assert seg.rbc_diameter_px == pytest.approx(plain.rbc_diameter_px, rel=0.1)
    everywhere = np.ones(image.shape[:2], bool)
    assert _found(seg, truth, everywhere) >= _found(plain, truth, everywhere) - 0.05


def _with_scale_bar(image):
    """``image`` with a camera program's green scale bar and label burned in over it."""
    marked = image.copy()
    marked[560:566, 40:240] = (40, 220, 60)  # the bar
    for k in range(5):  # the label: five glyph-like blocks with anti-aliased edges
        x = 60 + 30 * k
        marked[530:550, x : x + 14] = (60, 200, 70)
        marked[529, x : x + 14] = (150, 215, 150)
    return marked


def test_a_burned_in_green_scale_bar_is_painted_out(field):
    from napari_smear.segment import find_overlay

    image, _ = field
    assert find_overlay(image) is None  # stains are never green
    marked = _with_scale_bar(image)
    overlay = find_overlay(marked)
    assert overlay is not None and overlay[563, 100] and overlay[540, 65] and overlay[529, 65]
    assert not overlay[300, 400]
    clean, seg = segment_smear(image), segment_smear(marked)
    assert seg.params["overlay_share"] == pytest.approx(overlay.mean())
    assert "outside_view_share" not in seg.params  # no frame: the widget says nothing of one
    assert seg.counts()["wbc"] == clean.counts()["wbc"]  # the bar is no white cell
    cy = seg.table.centroid_y.round().astype(int).clip(0, 599)
    cx = seg.table.centroid_x.round().astype(int).clip(0, 799)
    assert not overlay[cy, cx].any()  # no cell is centred on the annotation
    crops = crop_instances(marked, seg, cell_types=["wbc"])
    green = crops.images[..., 1].astype(int) - np.maximum(crops.images[..., 0], crops.images[..., 2])
    assert (green < 40).all()  # the crops hold no annotation either


def test_overlays_are_not_searched_on_slide_sized_images(monkeypatch):
    import napari_smear.segment.field_of_view as fov

    marked = _with_scale_bar(np.full((600, 800, 3), 220, np.uint8))
    assert fov.find_overlay(marked) is not None
    monkeypatch.setattr(fov, "_OVERLAY_MAX_PIXELS", 600 * 800 - 1)  # painting would copy a whole scan
    assert fov.find_overlay(marked) is None


def test_a_white_fill_or_transparent_part_is_painted_out(field):
    """A slide export's white fill and an RGBA image's transparent part (composited onto
    white) were the field's "glass", so the real glass read as stain: one cell 850 px
    across. They are outside the view, like a black frame."""
    from napari_smear.segment.field_of_view import find_white_fill

    image, truth = field
    assert find_white_fill(image) is None
    plain = segment_smear(image)
    framed = np.pad(image, ((60, 60), (80, 80), (0, 0)), constant_values=255)
    fill = find_white_fill(framed)
    assert fill is not None and fill[:50].all() and not fill[70:-70, 90:-90].any()
    seg = segment_smear(framed)
    assert seg.params["outside_view_share"] == pytest.approx(1 - image[..., 0].size / framed[..., 0].size, abs=0.03)
    assert seg.rbc_diameter_px == pytest.approx(plain.rbc_diameter_px, rel=0.1)
    assert not seg.labels[:55].any() and not seg.labels[:, :75].any()
    inner = np.zeros(framed.shape[:2], bool)
    inner[60:-60, 80:-80] = True
    truth_framed = {**truth, "labels": np.pad(truth["labels"], ((60, 60), (80, 80)))}
    assert _found(seg, truth_framed, inner) >= 0.9
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:, : image.shape[1] // 3, 3] = 0  # the left third transparent
    seg = segment_smear(rgba)
    assert seg.rbc_diameter_px == pytest.approx(plain.rbc_diameter_px, rel=0.15)
    right = np.zeros(image.shape[:2], bool)
    right[:, image.shape[1] // 3 + 40 :] = True
    assert _found(seg, truth, right) >= 0.9
    # overexposed glass is saturated too, but it fades into the field: not a fill
    bright = np.clip(image.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)
    assert (bright.min(-1) >= 250).mean() > 0.2 and find_white_fill(bright) is None
