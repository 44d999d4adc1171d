"""Stain normalisation anchored on red cells and nuclei (napari_smear.normalize)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import read_rgb, require_shared_data, tiny_model_file

from napari_smear.normalize import (
    METHOD,
    PBC_REFERENCE,
    StainAnchors,
    apply_stain_map,
    normalize_stain,
    stain_anchors,
    stain_matrix,
)


@pytest.fixture(scope="module")
def segmented_field():
    from napari_smear.samples import synthetic_smear
    from napari_smear.segment import segment_smear

    rgb, _ = synthetic_smear(seed=3, n_wbc=2)
    return rgb, segment_smear(rgb)


def _stained_differently(rgb):
    """The same field under another stain and illuminant: deeper eosin, bluish light."""
    od = np.log(255.0 / np.maximum(rgb.astype(np.float64), 1.0))
    od = od @ np.array([[1.4, 0.1, 0.0], [0.0, 1.2, 0.1], [0.1, 0.0, 0.8]]).T
    light = np.array([200.0, 215.0, 240.0])
    return np.clip(light * np.exp(-od), 0, 255).round().astype(np.uint8)


def test_anchors_of_a_field_are_measured(segmented_field):
    rgb, seg = segmented_field
    anchors = stain_anchors(rgb, seg)
    assert anchors.rbc_od is not None and anchors.nucleus_od is not None
    # nuclei absorb more than red cells, in every channel of a Giemsa-like stain
    assert sum(anchors.nucleus_od) > sum(anchors.rbc_od)
    assert all(150 < v <= 255 for v in anchors.glass)


def test_normalised_field_has_the_reference_colours(segmented_field):
    rgb, seg = segmented_field
    other = _stained_differently(rgb)
    before = stain_anchors(other, seg)
    after = stain_anchors(normalize_stain(other, seg), seg)
    for name in ("rbc_od", "nucleus_od"):
        reference = np.array(getattr(PBC_REFERENCE, name))
        assert np.abs(np.array(getattr(after, name)) - reference).max() < 0.05 * reference.max() + 0.02, name
        assert np.abs(np.array(getattr(before, name)) - reference).max() > 0.05, name
    assert np.allclose(after.glass, PBC_REFERENCE.glass, atol=4)


def test_two_stains_of_one_field_normalise_to_the_same_picture(segmented_field):
    rgb, seg = segmented_field
    first = normalize_stain(rgb, seg).astype(np.int16)
    second = normalize_stain(_stained_differently(rgb), seg).astype(np.int16)
    cells = seg.labels > 0
    assert np.abs(first - second)[cells].mean() < 6


def test_reference_anchors_map_to_themselves():
    assert np.allclose(stain_matrix(PBC_REFERENCE, PBC_REFERENCE), np.eye(3), atol=1e-9)
    pixels = np.random.default_rng(0).integers(20, 230, (50, 3), dtype=np.uint8)
    same = apply_stain_map(pixels, PBC_REFERENCE)
    assert np.abs(same.astype(int) - pixels).max() <= 1


def test_missing_anchors_fall_back():
    red_only = StainAnchors(glass=(220.0, 220.0, 220.0), rbc_od=(0.1, 0.3, 0.2), nucleus_od=None)
    matrix = stain_matrix(red_only)
    assert np.allclose(matrix, np.diag(np.array(PBC_REFERENCE.rbc_od) / np.array(red_only.rbc_od)))
    bare = StainAnchors(glass=(220.0, 220.0, 220.0), rbc_od=None, nucleus_od=None)
    assert np.allclose(stain_matrix(bare), np.eye(3))
    # parallel anchors cannot define a two-stain map: per-channel scaling instead
    parallel = StainAnchors(glass=(220.0,) * 3, rbc_od=(0.1, 0.2, 0.1), nucleus_od=(0.3, 0.6, 0.3))
    assert np.count_nonzero(stain_matrix(parallel) - np.diag(np.diag(stain_matrix(parallel)))) == 0


def test_blank_field_keeps_working():
    from napari_smear.segment.types import SmearSegmentation

    import pandas as pd

    blank = np.full((64, 64, 3), 230, np.uint8)
    seg = SmearSegmentation(
        np.zeros((64, 64), np.uint32), np.zeros((64, 64), np.uint32),
        pd.DataFrame(columns=["label", "cell_type"]), 20.0,
    )
    out = normalize_stain(blank, seg)
    assert out.shape == blank.shape and out.dtype == np.uint8
    assert np.allclose(out[0, 0], PBC_REFERENCE.glass, atol=1)


def test_bad_input_is_refused(segmented_field):
    rgb, seg = segmented_field
    with pytest.raises(ValueError, match="uint8"):
        normalize_stain(rgb.astype(np.float32), seg)
    with pytest.raises(ValueError, match="uint8"):
        apply_stain_map(rgb[..., :2], PBC_REFERENCE)


def test_crops_are_recoloured_with_the_fields_anchors(segmented_field):
    from napari_smear.crops import crop_instances

    rgb, seg = segmented_field
    raw = crop_instances(rgb, seg, cell_types="wbc")
    normalised = crop_instances(rgb, seg, cell_types="wbc", stain_normalization=METHOD)
    assert normalised.images.shape == raw.images.shape
    np.testing.assert_array_equal(normalised.masks, raw.masks)
    expected = apply_stain_map(raw.images, stain_anchors(rgb, seg))
    np.testing.assert_array_equal(normalised.images, expected)
    with pytest.raises(ValueError, match="not known"):
        crop_instances(rgb, seg, cell_types="wbc", stain_normalization="macenko-v9")


def test_model_metadata_switches_normalisation_on_in_the_pipeline(tmp_path, segmented_field, one_torch_thread):
    from napari_smear import analyze
    from napari_smear.models import load_model
    from napari_smear.pipeline import ModelSpec, prepare_field

    rgb, seg = segmented_field
    plain = tiny_model_file(tmp_path / "plain.safetensors", cell_types=["wbc"])
    stained = tiny_model_file(tmp_path / "stained.safetensors", cell_types=["wbc"], stain_normalization=METHOD)
    specs = [ModelSpec.from_info(p.stem, load_model(p, device="cpu")[1]) for p in (plain, stained)]
    assert specs[0].stain_normalization is None and specs[1].stain_normalization == METHOD
    prepared = prepare_field(rgb, specs, segmentation=seg, morphology=False)
    assert not np.array_equal(prepared.crops["plain"].images, prepared.crops["stained"].images)
    result = analyze(rgb, models=[stained], segmentation=seg, morphology=False, device="cpu")
    assert result.table.loc[result.table.cell_type == "wbc", "class"].notna().all()


def test_crop_sets_remember_their_normalisation(tmp_path):
    from napari_smear.datasets import CropSet, load_crop_set, load_data, save_crop_set

    n, s = 4, 16
    crop_set = CropSet(
        images=np.full((n, s, s, 3), 200, np.uint8), masks=np.zeros((n, 2, s, s), np.uint8),
        morph=np.zeros((n, 1), np.float32), labels=np.array([0, 1, 0, 1]), class_names=["a", "b"],
        split=np.array(["train"] * n), attributes=np.zeros((n, 0), np.int8), attribute_names=[],
        attribute_values=[], paths=np.array([f"{i}.png" for i in range(n)]), stain_normalization=METHOD,
    )
    path = save_crop_set(tmp_path / "set.npz", crop_set)
    assert load_crop_set(path).stain_normalization == METHOD
    assert crop_set.subset([0, 1]).stain_normalization == METHOD


@pytest.mark.usefixtures("one_torch_thread")
def test_bccd_field_moves_towards_pbc_colours():
    """On real data: a BCCD field's red cells and nuclei end up in PBC's colours."""
    data = require_shared_data()
    from napari_smear.segment import segment_smear

    rgb = read_rgb(data / "bccd" / "images" / "BloodImage_00000.jpg")
    seg = segment_smear(rgb)
    before = stain_anchors(rgb, seg)
    after = stain_anchors(normalize_stain(rgb, seg), seg)
    reference = np.array(PBC_REFERENCE.nucleus_od)
    assert np.abs(np.array(after.nucleus_od) - reference).sum() < 0.5 * np.abs(np.array(before.nucleus_od) - reference).sum()
