"""The public API answers bad arguments with a clear error before any work, and takes
the common shorthands (one model name on its own, None for "no stain normalisation")."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_CLASSES, tiny_model_file

from napari_smear import analyze, segment_smear
from napari_smear.crops import crop_instances, paste_maps
from napari_smear.models import load_model
from napari_smear.morphology import morphology_table
from napari_smear.normalize import normalize_stain
from napari_smear.pipeline import StreamingClassifier, differential_counts, load_models
from napari_smear.predict import prior_correction_strength

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def segmented(synthetic_field):
    image, _ = synthetic_field
    return image, segment_smear(image)


def test_image_and_segmentation_must_match(segmented):
    image, seg = segmented
    other = image[:-10]
    for call in (lambda: analyze(other, segmentation=seg, models=[]),
                 lambda: morphology_table(other, seg),
                 lambda: normalize_stain(np.ascontiguousarray(other), seg),
                 lambda: crop_instances(other, seg)):
        with pytest.raises(ValueError, match="does not match the segmentation's labels shape"):
            call()


def test_crop_arguments(segmented):
    image, seg = segmented
    with pytest.raises(ValueError, match="crop_diameters must be a number > 0"):
        crop_instances(image, seg, crop_diameters=float("nan"))
    with pytest.raises(ValueError, match="cell_types must be some of"):
        crop_instances(image, seg, cell_types="wbcs")
    with pytest.raises(ValueError, match="integer label ids"):
        crop_instances(image, seg, labels=[1.7])
    one = crop_instances(image, seg, labels=1)  # a single id
    assert list(one.labels) == [1]
    assert list(one.cell_types) == [seg.table.set_index("label").at[1, "cell_type"]]
    every = crop_instances(image, seg)
    assert list(every.cell_types) == list(seg.table.set_index("label").loc[every.labels, "cell_type"])
    assert list(every.subset([0]).cell_types) == [every.cell_types[0]]
    with pytest.raises(ValueError, match="label image"):
        paste_maps(np.zeros((1, 4, 4)), one, (100, 100))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"working_diameter_px": 0}, ValueError, "working_diameter_px must be a positive number"),
    ({"working_diameter_px": -5}, ValueError, "working_diameter_px must be a positive number"),
    ({"pixel_size_um": "0.1"}, TypeError, "pixel_size_um must be a number"),
    ({"rbc_diameter_px": float("inf")}, ValueError, "rbc_diameter_px must be a positive number"),
    ({"tile_size": 10}, ValueError, "tile_size must be an integer"),
    ({"n_workers": 0}, ValueError, "n_workers must be a whole number >= 1"),
    ({"recorded_pixel_size_um": -1.0}, ValueError, "recorded_pixel_size_um must be a positive number"),
])
def test_segment_size_arguments(segmented, kwargs, error, match):
    image, _ = segmented
    with pytest.raises(error, match=match):
        segment_smear(image, **kwargs)


def test_models_devices_and_prior_correction(tmp_path, segmented):
    model = tiny_model_file(tmp_path / "m.safetensors", cell_types=["wbc"])
    with pytest.raises(ValueError, match="unknown device|not available|no CUDA"):
        load_model(model, device="gpu")
    (entry,) = load_models(str(model), device="cpu")  # one model, not in a list
    assert entry.name == "m"
    with pytest.raises(TypeError, match="prior_correction must be a number"):
        prior_correction_strength(entry.info, True)
    image, seg = segmented
    assert set(analyze(image, segmentation=seg, models=str(model), device="cpu").models) == {"m"}


def test_model_names_that_are_not_models_get_a_pointer_to_what_is(tmp_path, segmented):
    from napari_smear.cli import _model_list
    from napari_smear.models import ModelFileError

    image, seg = segmented
    with pytest.raises(TypeError, match=r"models=None: give a list of models, DEFAULT_MODELS .* or \[\]"):
        analyze(image, segmentation=seg, models=None)
    with pytest.raises(TypeError, match="a built-in name .* got int 5"):
        load_model(5)
    with pytest.raises(ModelFileError, match="no model named"):
        load_model("")
    tiny_model_file(tmp_path / "m.safetensors", cell_types=["wbc"])
    with pytest.raises(ModelFileError, match=r"is a folder, not a model file: give a .safetensors file in it \(m"):
        load_model(tmp_path)
    with pytest.raises(ModelFileError, match="named without the ending: 'wbc-pbc8'"):
        load_model("wbc-pbc8.safetensors")
    with pytest.raises(ValueError, match="cannot be combined"):
        _model_list(["none,wbc-pbc8"])
    with pytest.raises(ValueError, match="given no model"):
        _model_list([" , "])
    assert _model_list(["None"]) == [] and _model_list(["a,b", "c"]) == ["a", "b", "c"]


def test_streaming_classifier_refuses_crops_of_another_size(tmp_path):
    (entry,) = load_models([tiny_model_file(tmp_path / "m.safetensors")], device="cpu")  # 32 px crops
    classifier = StreamingClassifier([entry], device="cpu", batch_size=4)
    bad = (np.zeros((2, 64, 64, 3), np.uint8), np.zeros((2, 2, 64, 64), bool), None)
    with pytest.raises(ValueError, match=r"takes 2 crops of \(N, 32, 32, 3\)"):
        classifier.add("field", {"m": bad})
    good = (np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 2, 32, 32), bool), None)
    assert classifier.add("field", {"m": good}) == []  # the refused field was not queued
    (done,) = classifier.flush()
    assert done[0] == "field" and done[1]["m"]["probs"].shape == (2, len(TINY_CLASSES))


def test_differential_counts_take_an_empty_class_for_unclassified():
    table = pd.DataFrame({"label": [1, 2, 3], "cell_type": ["wbc"] * 3, "class": ["neutrophil", "", None],
                          "model": ["m"] * 3})
    counts = differential_counts(table)
    assert dict(zip(counts["class"], counts["count"])) == {"neutrophil": 1, "unclassified": 2}
    categorical = differential_counts(table.astype({"class": "category"}))  # e.g. read with dtype="category"
    assert dict(zip(categorical["class"], categorical["count"])) == {"neutrophil": 1, "unclassified": 2}


def test_crop_set_without_stain_normalisation_round_trips(tmp_path):
    from test_cli_classify import tiny_crop_set

    from napari_smear.datasets import load_crop_set, save_crop_set

    crop_set = tiny_crop_set()
    crop_set.stain_normalization = None  # "none", as a user would write it
    back = load_crop_set(save_crop_set(tmp_path / "c.npz", crop_set, image_codec="raw"))
    assert back.stain_normalization == ""


def test_paste_maps_in_row_blocks_gives_the_same_maps(segmented, monkeypatch):
    """paste_maps works in row blocks (bounded memory on whole-slide regions): the block
    size must not change a single value."""
    import napari_smear.crops

    image, seg = segmented
    crops = crop_instances(image, seg)
    maps = np.random.default_rng(3).random((len(crops), 12, 12)).astype(np.float32)
    whole = paste_maps(maps, crops, seg.labels)
    monkeypatch.setattr(napari_smear.crops, "_PASTE_BLOCK_PIXELS", 3 * seg.labels.shape[1] + 7)  # 3 rows a block
    np.testing.assert_array_equal(paste_maps(maps, crops, seg.labels), whole)
    assert whole[seg.labels == 0].max() == 0 and whole.max() > 0


def test_script_mistakes_are_named_at_the_boundary(segmented, tmp_path):
    # each used to fail deep inside numpy, pandas or PIL, or after a whole batch had run
    from napari_smear.batch import analyze_files
    from napari_smear.gallery import export_cell_images
    from napari_smear.io import read_image

    image, seg = segmented
    with pytest.raises(TypeError, match="segmentation must be a SmearSegmentation .* got NoneType"):
        crop_instances(image, None)
    with pytest.raises(TypeError, match="segmentation must be a SmearSegmentation .* got dict"):
        analyze(image, models=[], segmentation={"labels": seg.labels})
    with pytest.raises(TypeError, match="output_size must be a whole number"):
        crop_instances(image, seg, output_size=64.5)
    with pytest.raises(TypeError, match="crop_diameters must be a number"):
        crop_instances(image, seg, crop_diameters="2")
    with pytest.raises(TypeError, match="with a cell_type column"):
        differential_counts(pd.DataFrame({"class": ["a"]}))
    with pytest.raises(ValueError, match="no centroid_y, centroid_x"):
        export_cell_images(image, seg.table[["label"]], [1], "x", tmp_path, seg.rbc_diameter_px)
    with pytest.raises(TypeError, match="is a file path"):
        export_cell_images("field.png", seg.table, [1], "x", tmp_path, seg.rbc_diameter_px)
    with pytest.raises(TypeError, match="read_image takes a file path, got ndarray"):
        read_image(image)
    for bad in ({"overlay_max_side": 0}, {"batch_size": 0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            analyze_files(tmp_path, tmp_path / "out", models=[], device="cpu", **bad)
