"""The row-run binary morphology (segment.binary) must equal scipy's pixel for pixel:
the segmentation's output is defined by scipy's operations."""
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

from napari_smear.segment import binary


def _masks(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        noise = rng.random((h, w))
        if rng.random() < 0.5:  # blobs, like cells, as well as salt and pepper
            noise = ndi.gaussian_filter(noise, rng.uniform(0.5, 3))
        yield noise < np.quantile(noise, rng.uniform(0.05, 0.95))


@pytest.mark.parametrize("radius", range(0, 41))
def test_disk_rows_match_skimage_disk(radius):
    assert binary.footprint_rows(disk(radius)) == binary.disk_rows(radius)


def test_disk_dilation_erosion_closing_opening_match_scipy():
    rng = np.random.default_rng(1)
    for mask in _masks(0, 150):
        r = int(rng.integers(0, 9))
        rows, fp = binary.disk_rows(r), disk(r)
        np.testing.assert_array_equal(binary.dilate(mask, rows), ndi.binary_dilation(mask, fp))
        np.testing.assert_array_equal(binary.erode(mask, rows), ndi.binary_erosion(mask, fp))
        np.testing.assert_array_equal(binary.closing(mask, rows), ndi.binary_closing(mask, fp, border_value=0))
        np.testing.assert_array_equal(binary.opening(mask, rows), ndi.binary_opening(mask, fp))


def test_diamond_is_the_iterated_cross():
    rng = np.random.default_rng(2)
    for mask in _masks(3, 80):
        r = int(rng.integers(1, 7))
        np.testing.assert_array_equal(binary.dilate(mask, binary.diamond_rows(r)), ndi.binary_dilation(mask, iterations=r))


@pytest.mark.parametrize("strict", [False, True])
def test_ball_is_a_distance_map_threshold(strict):
    rng = np.random.default_rng(4)
    for mask in _masks(5, 120):
        if not mask.any():
            continue
        radius = float(rng.choice([rng.uniform(0.3, 25), float(rng.integers(1, 12))]))  # integers: ties
        distance = ndi.distance_transform_edt(~mask)
        expected = distance < radius if strict else distance <= radius
        np.testing.assert_array_equal(binary.dilate(mask, binary.ball_rows(radius, strict=strict)), expected)


def test_large_mask_and_footprints_taller_than_the_image():
    mask = ndi.gaussian_filter(np.random.default_rng(6).random((700, 900)), 4) > 0.5
    rows = binary.disk_rows(6)
    np.testing.assert_array_equal(binary.dilate(mask, rows), ndi.binary_dilation(mask, disk(6)))
    thin = mask[:3]
    np.testing.assert_array_equal(binary.dilate(thin, rows), ndi.binary_dilation(thin, disk(6)))
    np.testing.assert_array_equal(binary.erode(thin, rows), ndi.binary_erosion(thin, disk(6)))


def test_bad_footprints_are_refused():
    with pytest.raises(ValueError, match="odd"):
        binary.footprint_rows(np.ones((2, 3)))
    with pytest.raises(ValueError, match="centred"):
        binary.footprint_rows(np.array([[1, 0, 0], [1, 1, 1], [0, 0, 1]]))
    with pytest.raises(ValueError, match="empty"):
        binary.dilate(np.ones((4, 4), bool), {})
    with pytest.raises(ValueError, match="2-D"):
        binary.dilate(np.ones((2, 4, 4), bool), binary.disk_rows(1))


def test_flood_equals_the_watershed_it_replaces():
    """On smoothed distance maps, as split_touching_cells floods them. (Where two
    fronts reach a pixel at exactly the same height and time, as on a map of whole
    numbers, the watershed's own choice depends on its heap's layout, so flooding a
    piece alone may choose the other, equally valid, side.)"""
    from skimage.segmentation import watershed

    from napari_smear.segment.cells import _flood

    rng = np.random.default_rng(7)
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(8, 100, 2))
        mask = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(1, 4)) > rng.uniform(0.45, 0.55)
        height = ndi.gaussian_filter(ndi.distance_transform_edt(mask).astype(np.float32), 1.5)
        height[~mask] = 0
        peaks = (height == ndi.maximum_filter(height, size=3)) & mask
        if trial % 3 == 0:  # some pieces get no marker at all
            peaks &= rng.random((h, w)) < 0.5
        markers, n = ndi.label(peaks, structure=np.ones((3, 3)))
        np.testing.assert_array_equal(_flood(-height, markers, n, mask), watershed(-height, markers, mask=mask))


def test_non_whole_disc_radii_and_lopsided_rows_are_refused():
    with pytest.raises(ValueError, match="whole number"):
        binary.disk_rows(2.5)
    with pytest.raises(ValueError, match="symmetric"):
        binary.dilate(np.ones((5, 5), bool), {1: 0})
