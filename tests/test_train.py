"""Crop sets (building, npz storage), augmentation, training, resume and evaluation."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_smear.datasets import CropSet, build_crop_set, load_crop_set, save_crop_set
from napari_smear.models import load_model, read_metadata
from napari_smear.training import (
    augment_batch,
    checkpoint_dir_for,
    classification_metrics,
    evaluate,
    partial_model_path,
    plot_confusion,
    select_prior_correction,
    train,
)

TINY_SHAPE_AWARE = {"widths": [8, 16, 32, 64], "shape_widths": [4, 8, 16, 32], "fusion_hidden": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_crop_set(n_per_class: int = 16, size: int = 32, seed: int = 0) -> CropSet:
    """Two learnable classes: a small round dark cell vs a large elongated one."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, masks, labels = [], [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            cy, cx = size / 2 + rng.normal(0, 1.5, 2)
            ry, rx = (size * 0.15, size * 0.15) if label == 0 else (size * 0.3, size * 0.2)
            cell = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            nucleus = ((yy - cy) / (ry / 2)) ** 2 + ((xx - cx) / (rx / 2)) ** 2 <= 1
            image = np.full((size, size, 3), 220, np.uint8)
            image[cell] = (170, 120, 190)
            image[nucleus] = (80, 40, 120)
            image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
            images.append(image)
            masks.append(np.stack([cell, nucleus]).astype(np.uint8))
            labels.append(label)
    n = len(labels)
    split = np.array(["train", "train", "train", "val"] * (n // 4), dtype="<U5")
    return CropSet(
        images=np.stack(images), masks=np.stack(masks), morph=rng.normal(size=(n, 3)).astype(np.float32),
        labels=np.array(labels, np.int64), class_names=["round", "long"], split=split,
        attributes=np.where(rng.random((n, 2)) < 0.5, -1, rng.integers(0, 2, (n, 2))).astype(np.int8),
        attribute_names=["cell_size", "cell_shape"], attribute_values=[["big", "small"], ["irregular", "round"]],
        paths=np.array([f"cell_{i}.png" for i in range(n)]), crop_diameters=4.0,
        morph_names=["a", "b", "c"], source="synthetic",
    )


def _pbc_files(shared_data, per_class: dict[str, int], split: str = "train", skip: int = 0) -> pd.DataFrame:
    table = pd.read_csv(shared_data / "pbc" / "split.csv")
    rows = [table[(table.label == label) & (table.split == split)].iloc[skip:skip + n] for label, n in per_class.items()]
    return pd.concat(rows, ignore_index=True)


def _pbc_class_folder(shared_data, root, per_class: dict[str, int]):
    """``root/<class>/`` holding the first PBC training images of each class (copies)."""
    files = _pbc_files(shared_data, per_class)
    for path, label in zip(files.path, files.label):
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "pbc" / path, root / label)
    return root


# ----------------------------------------------------------------------------- crop sets


def test_build_crop_set_from_class_folders_reports_bad_images(tmp_path, shared_data):
    root = _pbc_class_folder(shared_data, tmp_path / "cells", {"lymphocyte": 3, "neutrophil": 3})
    (root / "neutrophil" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match=r"1 of 7 images could not be cropped.*broken\.jpg"):
        crop_set = build_crop_set(root, output_size=32, progress=False)
    assert len(crop_set) == 6 and crop_set.class_names == ["lymphocyte", "neutrophil"]
    assert crop_set.images.shape == (6, 32, 32, 3) and crop_set.images.dtype == np.uint8
    assert crop_set.masks.shape == (6, 2, 32, 32) and set(np.unique(crop_set.masks)) <= {0, 1}
    assert crop_set.morph.shape == (6, 18) and np.isfinite(crop_set.morph).all()
    assert crop_set.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # a deterministic stratified split: one val image per class of three
    assert sorted(crop_set.split.tolist()) == ["train"] * 4 + ["val"] * 2
    assert crop_set.class_counts("val") == {"lymphocyte": 1, "neutrophil": 1}
    # the central cell is cropped: the crop centre lies in its mask (cell or nucleus)
    assert crop_set.masks[:, 0, 12:20, 12:20].any(axis=(1, 2)).all()
    assert crop_set.attributes.shape == (6, 0)
    assert len(crop_set.failures) == 1 and crop_set.failures[0][0].endswith("broken.jpg")


def test_a_model_is_scored_on_one_class_but_not_trained_on_one(tmp_path, shared_data):
    """Checking a model on your own neutrophils alone is a fair question; training on one
    class is not (it was refused for both)."""
    _pbc_class_folder(shared_data, tmp_path / "one", {"neutrophil": 3})
    scores = evaluate("wbc-pbc8", tmp_path / "one", None, device="cpu")
    assert scores["n"] == 3 and scores["support"]["neutrophil"] == 3
    with pytest.raises(ValueError, match=r"has 1 class\(es\) \['neutrophil'\]; at least 2 are needed"):
        train(tmp_path / "one", output=tmp_path / "m.safetensors", epochs=1, progress=False)


def test_scoring_a_folder_s_validation_split_crops_only_its_images(tmp_path, shared_data):
    """evaluate's default split is val: the folder's other images are not cropped (on
    PBC's folder that is 12,634 images cut to score 1,710)."""
    root = _pbc_class_folder(shared_data, tmp_path / "cells", {"lymphocyte": 7, "neutrophil": 7})
    seen = []
    val = build_crop_set(root, output_size=32, progress=lambda done, total: seen.append(total), only_split="val")
    assert seen[-1] == 2 and val.split.tolist() == ["val", "val"]
    whole = build_crop_set(root, output_size=32, progress=False)
    assert sorted(whole.paths[whole.split == "val"].tolist()) == sorted(val.paths.tolist())
    scores = evaluate("wbc-pbc8", root, "val", device="cpu")
    assert scores["n"] == 2


def test_cropping_a_folder_reports_each_image_and_stops_when_the_report_raises(tmp_path, shared_data):
    """train(on_crop=...): the Train dock's progress (and cancel) while a folder is cropped."""
    root = _pbc_class_folder(shared_data, tmp_path / "cells", {"lymphocyte": 3, "neutrophil": 3})
    seen = []

    class Stop(Exception):
        pass

    def report(done, total):
        seen.append((done, total))
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        train(root, output=tmp_path / "m.safetensors", epochs=1, on_crop=report, progress=False)
    assert seen == [(1, 6), (2, 6)]
    assert not (tmp_path / "m.safetensors").exists()


def test_build_crop_set_from_manifest_joins_wbcatt_attributes(tmp_path, shared_data):
    files = pd.concat([_pbc_files(shared_data, {"neutrophil": 2, "platelet": 1}),
                       _pbc_files(shared_data, {"neutrophil": 1}, split="val")], ignore_index=True)
    (tmp_path / "img").mkdir()
    for path in files.path:
        shutil.copy(shared_data / "pbc" / path, tmp_path / "img")
    manifest = pd.DataFrame({
        "path": ["img/" + p.split("/")[-1] for p in files.path], "label": files.label, "split": files.split,
    })
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    wbcatt = pd.concat([pd.read_csv(shared_data / "pbc" / f) for f in ("wbcatt_train.csv", "wbcatt_val.csv")])
    names = [p.split("/")[-1] for p in files.path]
    wbcatt[wbcatt.img_name.isin(names)].to_csv(tmp_path / "wbcatt_train.csv", index=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a median-scale fallback may be reported
        crop_set = build_crop_set(tmp_path / "manifest.csv", output_size=32, progress=False)
    assert len(crop_set) == 4 and crop_set.class_names == ["neutrophil", "platelet"]
    assert crop_set.split.tolist() == manifest.split.tolist()
    assert crop_set.attribute_names[0] == "cell_size" and len(crop_set.attribute_names) == 11
    by_name = wbcatt.set_index("img_name")
    for row, path in enumerate(crop_set.paths):
        name = path.split("/")[-1]
        codes = crop_set.attributes[row]
        if name in by_name.index:  # the WBCs carry attributes, coded by WBCAtt's value order
            for a, attribute in enumerate(crop_set.attribute_names):
                assert crop_set.attribute_values[a][codes[a]] == by_name.loc[name, attribute]
        else:  # platelets have none
            assert (codes == -1).all()


def test_manifest_errors_are_specific(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="lacks column"):
        build_crop_set(tmp_path / "m.csv", progress=False)
    (tmp_path / "m.csv").write_text("path,label,split\na.png,x,training\nb.png,y,val\n")
    with pytest.raises(ValueError, match="split values"):
        build_crop_set(tmp_path / "m.csv", progress=False)
    with pytest.raises(FileNotFoundError):
        build_crop_set(tmp_path / "nope.csv", progress=False)


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_npz_round_trip_without_pickle(tmp_path, codec):
    crop_set = synthetic_crop_set()
    crop_set.failures = [("bad.png", "ImageReadError: truncated")]
    path = save_crop_set(tmp_path / "crops.npz", crop_set, image_codec=codec)
    with np.load(path, allow_pickle=False) as archive:  # would raise on any pickled object
        assert all(archive[key].dtype.kind != "O" for key in archive.files)
    loaded = load_crop_set(path)
    if codec == "raw":
        np.testing.assert_array_equal(loaded.images, crop_set.images)
    else:
        # lossy, but close even on these noisy synthetic crops (about 1.7 grey levels on PBC)
        assert float(np.abs(loaded.images.astype(int) - crop_set.images).mean()) < 5
    np.testing.assert_array_equal(loaded.masks, crop_set.masks)
    np.testing.assert_array_equal(loaded.morph, crop_set.morph)
    np.testing.assert_array_equal(loaded.labels, crop_set.labels)
    np.testing.assert_array_equal(loaded.attributes, crop_set.attributes)
    assert loaded.split.tolist() == crop_set.split.tolist()
    assert loaded.paths.tolist() == crop_set.paths.tolist()
    assert loaded.class_names == crop_set.class_names
    assert loaded.attribute_values == crop_set.attribute_values
    assert loaded.morph_names == crop_set.morph_names and loaded.source == "synthetic"
    assert loaded.failures == crop_set.failures


def test_load_crop_set_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a napari-smear crop set"):
        load_crop_set(tmp_path / "other.npz")
    # a file that is no archive at all: said so, without numpy's advice to unpickle it
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text.npz is not a readable .npz crop set: not an .npz \(zip\) archive$"):
        load_crop_set(tmp_path / "text.npz")


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_moves_masks_with_the_pixels():
    crop_set = synthetic_crop_set(n_per_class=8, size=48)
    masks = torch.from_numpy(crop_set.masks).float()
    # Paint the masks into the image so that any misalignment shows up as disagreement.
    rgb = torch.stack([masks[:, 0], masks[:, 1], torch.zeros_like(masks[:, 0])], dim=1)
    generator = torch.Generator().manual_seed(1)
    out_rgb, out_masks = augment_batch(rgb, masks, generator, colour=False)
    assert out_masks.shape == masks.shape and set(out_masks.unique().tolist()) <= {0.0, 1.0}
    for channel in (0, 1):
        painted = out_rgb[:, channel] > 0.5
        kept = out_masks[:, channel] > 0.5
        iou = (painted & kept).sum(dim=(1, 2)) / (painted | kept).sum(dim=(1, 2)).clamp_min(1)
        assert float(iou.min()) > 0.97
    # the transform is not the identity for most crops
    moved = (out_masks != masks).flatten(1).any(dim=1)
    assert int(moved.sum()) >= len(masks) // 2
    # colour jitter changes colours only, in range, and never touches the masks
    images = torch.from_numpy(crop_set.images).permute(0, 3, 1, 2).float() / 255
    jittered, same_masks = augment_batch(images, masks, torch.Generator().manual_seed(2), geometry=False)
    assert torch.equal(same_masks, masks)
    assert float(jittered.min()) >= 0 and float(jittered.max()) <= 1
    assert float((jittered - images).abs().mean()) > 0.005


def test_border_cut_fills_edge_bands_with_glass_and_clears_the_masks():
    # noise images and full masks: every cut pixel shows, in the image and the masks
    images = torch.rand(32, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(32, 2, 40, 40)
    cut_rgb, cut_masks = augment_batch(
        images, masks, torch.Generator().manual_seed(3), geometry=False, colour=False,
        border_cut_probability=1.0, max_border_cut=0.4,
    )
    corners = 0
    for i in range(len(images)):
        band = cut_masks[i, 0] == 0
        assert bool(band.any())  # every crop got a band
        # made of whole rows at the top or bottom and whole columns at the left or right
        full_rows, full_cols = band.all(dim=1), band.all(dim=0)
        assert torch.equal(band, full_rows[:, None] | full_cols[None, :])
        corners += bool(full_rows.any() and full_cols.any())
        assert not bool(band[16:24, 16:24].any())  # at most 0.4 deep: the centre stays
        # one colour, the crop's bright glass (its 90th percentile, estimated on a sample)
        colours = cut_rgb[i][:, band].T.unique(dim=0)
        assert len(colours) == 1
        assert torch.allclose(colours[0], images[i].flatten(1).quantile(0.9, dim=1), atol=0.06)
        assert torch.equal(cut_masks[i][1], cut_masks[i][0])
        assert torch.equal(cut_rgb[i][:, ~band], images[i][:, ~band])
    assert 0 < corners < len(images)  # one side or a corner
    # probability 0 (the default) draws nothing: the other transforms are unchanged
    plain = augment_batch(images, masks, torch.Generator().manual_seed(4))
    zero = augment_batch(images, masks, torch.Generator().manual_seed(4), border_cut_probability=0.0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])


def test_faint_cytoplasm_fades_the_cytoplasm_to_glass_and_shrinks_the_cell_mask():
    # a disk cell with a smaller nucleus on bright glass, and a platelet-like crop without a nucleus
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    r = torch.hypot(yy - 23.5, xx - 23.5)
    cell, nucleus = (r < 16).float(), (r < 7).float()
    images = torch.full((8, 3, 48, 48), 0.9)
    images[:, :, cell.bool()] = torch.tensor([0.7, 0.5, 0.8])[:, None]
    images[:, :, nucleus.bool()] = torch.tensor([0.3, 0.2, 0.5])[:, None]
    masks = torch.stack([cell, nucleus])[None].repeat(8, 1, 1, 1)
    masks[7, 1] = 0  # no nucleus: never faded
    out_rgb, out_masks = augment_batch(
        images, masks, torch.Generator().manual_seed(0), geometry=False, colour=False,
        faint_cytoplasm_probability=1.0, min_faint_cytoplasm=0.5,
    )
    cytoplasm = (cell - nucleus).bool()
    for i in range(7):
        # the nucleus and the glass are untouched; the cytoplasm moved at least half way to the glass
        assert torch.equal(out_rgb[i][:, nucleus.bool()], images[i][:, nucleus.bool()])
        assert torch.equal(out_rgb[i][:, ~cell.bool()], images[i][:, ~cell.bool()])
        moved = (out_rgb[i][:, cytoplasm] - images[i][:, cytoplasm]).abs().mean()
        assert float(moved) >= 0.5 * float((0.9 - images[i][:, cytoplasm]).abs().mean()) - 1e-6
        assert torch.equal(out_masks[i, 1], masks[i, 1])
        kept = out_masks[i, 0].bool()
        assert bool((kept <= cell.bool()).all()) and bool((nucleus.bool() <= kept).all())
        if float(moved) >= 0.75 * float((0.9 - images[i][:, cytoplasm]).abs().mean()) + 1e-3:
            # strongly faded: the mask keeps the nucleus and a rim of at most 4 px
            assert float(r[kept].max()) <= 7 + 4 * 1.5
    assert torch.equal(out_rgb[7], images[7]) and torch.equal(out_masks[7], masks[7])
    # probability 0 (the default) draws nothing: the other transforms are unchanged
    plain = augment_batch(images, masks, torch.Generator().manual_seed(4))
    zero = augment_batch(images, masks, torch.Generator().manual_seed(4), faint_cytoplasm_probability=0.0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])


def test_augmentation_is_reproducible_with_a_seeded_generator():
    crop_set = synthetic_crop_set(n_per_class=4, size=32)
    images = torch.from_numpy(crop_set.images).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(crop_set.masks).float()
    first = augment_batch(images, masks, torch.Generator().manual_seed(5))
    second = augment_batch(images, masks, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_and_confusion_plot(tmp_path):
    metrics = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert metrics["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    f1_a, f1_b = 2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert metrics["macro_f1"] == pytest.approx((f1_a + f1_b + 0) / 3)
    # classes absent from the truth do not count in the macro average
    subset = classification_metrics([0, 0], [0, 1], ["a", "b", "c"])
    assert subset["per_class_recall"]["c"] is None and subset["macro_f1"] == pytest.approx(2 / 3)
    png = plot_confusion(metrics["confusion"], metrics["class_names"], tmp_path / "cm.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pbc_small(tmp_path_factory):
    """3 PBC classes x (40 train + 20 val) crops at 64 px, cropped once for the module."""
    shared_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (shared_data / "pbc" / "split.csv").is_file():
        message = f"real PBC data not found at {shared_data / 'pbc'} (needed for the training test)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    classes = {"eosinophil": 40, "lymphocyte": 40, "platelet": 40}
    files = pd.concat([_pbc_files(shared_data, classes),
                       _pbc_files(shared_data, {c: 20 for c in classes}, split="val")], ignore_index=True)
    files["path"] = [str(shared_data / "pbc" / p) for p in files.path]
    manifest = tmp_path_factory.mktemp("pbc") / "small.csv"
    files.to_csv(manifest, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_crop_set(manifest, output_size=64, workers=2, progress=False)


def test_short_training_on_pbc_beats_chance(pbc_small, tmp_path):
    assert pbc_small.class_counts("train") == {"eosinophil": 40, "lymphocyte": 40, "platelet": 40}
    output = tmp_path / "model.safetensors"
    result = train(pbc_small, model_kind="shape_aware", output=output, epochs=14, batch_size=32, lr=3e-3,
                   config=TINY_SHAPE_AWARE, num_threads=1, progress=False, patience=None)
    # chance is 1/3: a tiny model trained for seconds must be far above it
    assert result.metrics["accuracy"] >= 0.7, result.history
    assert result.metrics["macro_f1"] >= 0.65
    assert result.epochs_completed == 14 and len(result.history) == 14
    assert result.best_epoch == max(range(1, 15), key=lambda e: (result.history[e - 1]["val_macro_f1"], -e))

    metadata = read_metadata(output)
    assert metadata["class_names"] == ["eosinophil", "lymphocyte", "platelet"]
    assert metadata["input_size"] == 64 and metadata["crop_diameters"] == 4.0 and metadata["kind"] == "shape_aware"
    assert len(metadata["mean"]) == 3 and 0.3 < metadata["mean"][0] < 1 and metadata["std"][0] > 0.01
    assert set(metadata["metrics"]["per_class_recall"]) == set(metadata["class_names"])
    assert metadata["training_data"]["n_train"] == 120 and metadata["training_data"]["n_val"] == 60
    assert metadata["package_version"] and metadata["config"]["widths"] == [8, 16, 32, 64]

    scores = evaluate(output, pbc_small, "val", device="cpu")
    assert scores["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1 / 60 + 1e-9)
    assert np.array(scores["confusion"]).sum() == 60
    assert 0 <= scores["attention_mass_inside"] <= 1


def test_resume_continues_the_interrupted_run_exactly(tmp_path):
    crop_set = synthetic_crop_set()
    settings = dict(model_kind="shape_aware", epochs=4, batch_size=8, config=TINY_SHAPE_AWARE,
                    progress=False, patience=None, num_threads=1)
    uninterrupted = train(crop_set, output=tmp_path / "full.safetensors", **settings)

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    output = tmp_path / "part.safetensors"
    shutil.copyfile(tmp_path / "full.safetensors", output)  # an earlier model of that name
    before = output.read_bytes()
    with pytest.raises(Interrupt):
        train(crop_set, output=output, on_epoch=stop_after_two, **settings)
    assert output.read_bytes() == before  # kept whole: the run trained into a file of its own
    assert partial_model_path(output).name == ".part.training.safetensors" and partial_model_path(output).is_file()
    folder = checkpoint_dir_for(output)
    assert folder.name == "part.ckpt"
    assert json.loads((folder / "state.json").read_text())["epoch"] == 2
    assert (folder / "last.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle

    resumed = train(crop_set, output=output, resume=True, **settings)
    assert any("resumed from epoch 2" in note for note in resumed.notes)
    assert not partial_model_path(output).exists() and output.read_bytes() != before
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"])
    full_model, _ = load_model(tmp_path / "full.safetensors")
    part_model, _ = load_model(output)
    for (name, a), b in zip(full_model.state_dict().items(), part_model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)

    with pytest.raises(ValueError, match="differs in .*lr"):
        train(crop_set, output=output, resume=True, **{**settings, "lr": 1e-2})
    # a finished run resumed with no more epochs trains nothing: said, not done silently
    with pytest.warns(UserWarning, match="has trained 4 epochs already, as many as epochs=3 asks or more: nothing"):
        again = train(crop_set, output=output, resume=True, **{**settings, "epochs": 3})
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4]


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """As root every folder is writable, so the permission is faked: the check must come
    before the crops are cut and the first epoch trained (it came after both)."""
    import napari_smear.training as training_module

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr(training_module.os, "access", lambda path, mode: Path(path) != read_only)
    crops = []
    monkeypatch.setattr(training_module, "load_data", lambda *a, **k: crops.append(1))
    with pytest.raises(ValueError, match=r"output .*m.safetensors: cannot write in .*read-only \(permission denied\)"):
        train(synthetic_crop_set(), output=read_only / "m.safetensors", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"cache .*c.npz: cannot write in .*read-only"):
        train(synthetic_crop_set(), output=tmp_path / "m.safetensors", cache=read_only / "c.npz", epochs=1,
              progress=False)
    assert crops == []


def test_daffnet_trains_with_partial_attributes_and_morphology(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=8)
    result = train(crop_set, model_kind="daffnet", output=tmp_path / "d.safetensors", epochs=1, batch_size=8,
                   config={"widths": [8, 16, 32, 64], "morph_features": 3, "fusion_hidden": 16, "morph_hidden": 8},
                   progress=False, num_threads=1)
    assert result.info.config["attributes"] == [["cell_size", 2], ["cell_shape", 2]]
    assert result.info.metadata["morph_features"] == ["a", "b", "c"]
    assert result.info.metadata["attribute_values"]["cell_shape"] == ["irregular", "round"]


def test_attention_supervision_runs_and_is_refused_for_plain(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=8)
    result = train(crop_set, model_kind="shape_aware", output=tmp_path / "s.safetensors", epochs=1, batch_size=8,
                   config=TINY_SHAPE_AWARE, attention_supervision=1.0, progress=False, num_threads=1)
    assert np.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ValueError, match="no supervisable attention"):
        train(crop_set, model_kind="plain", output=tmp_path / "p.safetensors", attention_supervision=1.0,
              progress=False)


def test_faint_cytoplasm_classes_train_and_unknown_ones_are_refused(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=8)
    faint = {"faint_cytoplasm_probability": 1.0, "faint_cytoplasm_classes": [crop_set.class_names[0]]}
    result = train(crop_set, model_kind="shape_aware", output=tmp_path / "s.safetensors", epochs=1, batch_size=8,
                   config=TINY_SHAPE_AWARE, augment_options=faint, progress=False, num_threads=1)
    assert np.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ValueError, match="unknown classes"):
        train(crop_set, model_kind="shape_aware", output=tmp_path / "t.safetensors", epochs=1, batch_size=8,
              config=TINY_SHAPE_AWARE, augment_options={**faint, "faint_cytoplasm_classes": ["no_such_class"]},
              progress=False, num_threads=1)


def test_mixstyle_mixes_feature_statistics_in_training_only(tmp_path):
    from napari_smear.models import build_model
    from napari_smear.training import _add_mixstyle

    torch.manual_seed(0)
    model = build_model("plain", 3, dropout=0.0)  # no dropout: any change in training is MixStyle's
    x = torch.rand(6, 5, 32, 32)
    model.eval()
    before = model(x, None)["logits"]
    handles = _add_mixstyle(model, 1.0)
    assert len(handles) >= 2  # after stages 1 and 2 of every backbone
    assert torch.equal(model(x, None)["logits"], before)  # inference is untouched
    model.train()
    torch.manual_seed(1)
    mixed = model(x, None)["logits"]
    for handle in handles:
        handle.remove()
    torch.manual_seed(1)
    plain = model(x, None)["logits"]
    assert mixed.shape == plain.shape and not torch.allclose(mixed, plain)
    assert _add_mixstyle(model, 0.0) == []

    crop_set = synthetic_crop_set(n_per_class=8)
    result = train(crop_set, model_kind="shape_aware", output=tmp_path / "m.safetensors", epochs=1, batch_size=8,
                   config=TINY_SHAPE_AWARE, mixstyle=0.5, progress=False, num_threads=1)
    assert np.isfinite(result.history[0]["train_loss"])
    assert result.info.metadata["training"]["mixstyle"] == 0.5
    with pytest.raises(ValueError, match="probability"):
        train(crop_set, output=tmp_path / "n.safetensors", mixstyle=1.5, progress=False)


def test_weight_averaging_writes_the_mean_of_the_epochs_weights(tmp_path):
    from napari_smear.models import load_model
    from napari_smear.training import _WeightAverage

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    average = _WeightAverage(a)
    average.add(a)
    average.add(b)
    assert torch.allclose(average.model[0].weight, (a[0].weight + b[0].weight) / 2)
    # BatchNorm statistics are measured again, on the batches given, as a plain mean
    x = torch.randn(16, 3, 12, 12) * 3 + 1
    seq = average.model
    seq.forward = lambda inputs, morph=None: torch.nn.Sequential.forward(seq, inputs)
    ready = average.ready([(x[:8], None), (x[8:], None)], None, torch.device("cpu"))
    assert not ready.training
    features = seq[0](x)
    expected_mean = (features[:8].mean((0, 2, 3)) + features[8:].mean((0, 2, 3))) / 2
    assert torch.allclose(ready[1].running_mean, expected_mean, atol=1e-5)
    assert ready[1].momentum == b[1].momentum

    crop_set = synthetic_crop_set(n_per_class=8)
    result = train(crop_set, model_kind="shape_aware", output=tmp_path / "m.safetensors", epochs=3, batch_size=8,
                   config=TINY_SHAPE_AWARE, average_weights_from=2, patience=None, progress=False, num_threads=1)
    assert result.info.metadata["training"]["average_weights_from"] == 2
    averaged, _ = load_model(tmp_path / "m.safetensors")
    assert all(torch.isfinite(v).all() for v in averaged.state_dict().values() if v.dtype.is_floating_point)
    with pytest.raises(ValueError, match="average_weights_from"):
        train(crop_set, output=tmp_path / "n.safetensors", epochs=3, average_weights_from=4, progress=False)
    with pytest.raises(ValueError, match="cannot be resumed"):
        train(crop_set, model_kind="shape_aware", output=tmp_path / "m.safetensors", epochs=3, batch_size=8,
              config=TINY_SHAPE_AWARE, average_weights_from=2, patience=None, progress=False, num_threads=1,
              resume=True)


def test_train_rejects_bad_arguments(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=4)
    with pytest.raises(ValueError, match="unknown model kind"):
        train(crop_set, model_kind="resnet", output=tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="made of trained models"):
        train(crop_set, model_kind="ensemble", output=tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        train(crop_set, output=tmp_path / "m.pt")
    with pytest.raises(ValueError, match="balance"):
        train(crop_set, output=tmp_path / "m.safetensors", balance="oversample")
    with pytest.raises(TypeError, match="unknown config key"):
        train(crop_set, output=tmp_path / "m.safetensors", config={"width": 3}, progress=False)
    odd_size = dataclasses.replace(crop_set, images=crop_set.images[:, :30, :30], masks=crop_set.masks[:, :, :30, :30])
    with pytest.raises(ValueError, match="multiple of 16"):
        train(odd_size, output=tmp_path / "m.safetensors", progress=False)


def test_load_data_never_uses_a_stale_cache(tmp_path):
    from napari_smear.datasets import load_data

    crop_set = synthetic_crop_set(n_per_class=4)
    cache = save_crop_set(tmp_path / "cache.npz", crop_set, image_codec="raw")
    (tmp_path / "cells" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="was built from synthetic"):
        load_data(tmp_path / "cells", cache=cache, output_size=32)
    assert len(load_data(cache)) == len(crop_set)  # the .npz itself is always accepted
    with pytest.raises(TypeError, match="CropSet or a path"):
        load_data(42)


def test_crops_from_other_segmentation_code_are_flagged(tmp_path):
    from napari_smear.datasets import crop_code_version, load_data

    crop_set = synthetic_crop_set(n_per_class=4)
    crop_set.code_version = crop_code_version()
    path = save_crop_set(tmp_path / "now.npz", crop_set, image_codec="raw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_data(path).code_version == crop_code_version()
    crop_set.code_version = "0123456789ab"
    path = save_crop_set(tmp_path / "old.npz", crop_set, image_codec="raw")
    with pytest.warns(UserWarning, match="another version of the segmentation"):
        load_data(path)


def test_stain_normalisation_is_recorded_and_kept_when_fine_tuning(tmp_path):
    """A model trained on stain-normalised crops says so; fine-tuning it needs crops made the same way."""
    crop_set = synthetic_crop_set(n_per_class=8)
    crop_set.stain_normalization = "anchored-v1"
    first = train(crop_set, model_kind="shape_aware", output=tmp_path / "a.safetensors", epochs=1, batch_size=8,
                  config=TINY_SHAPE_AWARE, progress=False, num_threads=1, cell_types=["platelet", "wbc"])
    assert first.info.metadata["stain_normalization"] == "anchored-v1"
    assert first.info.metadata["cell_types"] == ["wbc", "platelet"]
    tuned = train(crop_set, init_from=first.model_path, output=tmp_path / "b.safetensors", epochs=1,
                  batch_size=8, progress=False, num_threads=1)
    assert tuned.info.metadata["stain_normalization"] == "anchored-v1"
    assert tuned.info.metadata["cell_types"] == ["wbc", "platelet"]  # the cells its base model was for
    plain = synthetic_crop_set(n_per_class=8)
    with pytest.raises(ValueError, match="stain normalisation 'none'.*a.safetensors was trained with it"):
        train(plain, init_from=first.model_path, output=tmp_path / "c.safetensors", epochs=1, progress=False)
    with pytest.raises(ValueError, match="stain normalisation"):
        train(plain, output=tmp_path / "d.safetensors", stain_normalization="anchored-v1", progress=False)


def test_fine_tuning_keeps_the_turned_views_of_its_start_model(tmp_path):
    from napari_smear.models import load_model, save_model

    crop_set = synthetic_crop_set(n_per_class=8)
    first = train(crop_set, model_kind="shape_aware", output=tmp_path / "a.safetensors", epochs=1, batch_size=8,
                  config=TINY_SHAPE_AWARE, progress=False, num_threads=1)
    assert "test_time_views" not in first.info.metadata
    model, info = load_model(first.model_path)
    save_model(tmp_path / "a8.safetensors", model, {**info.metadata, "test_time_views": 8})
    tuned = train(crop_set, init_from=tmp_path / "a8.safetensors", output=tmp_path / "b.safetensors", epochs=1,
                  batch_size=8, progress=False, num_threads=1)
    assert tuned.info.metadata["test_time_views"] == 8
    assert load_model(tmp_path / "b.safetensors")[1].metadata["test_time_views"] == 8


def test_select_prior_correction_scores_each_strength_on_val(tmp_path):
    from conftest import tiny_model_file

    crop_set = synthetic_crop_set()
    balanced = {"training": {"balance": "sampler"},
                "training_data": {"train_class_counts": {"round": 30, "long": 10}}}
    path = tiny_model_file(tmp_path / "m.safetensors", ["round", "long"], **balanced)
    choice = select_prior_correction(path, crop_set, "val", device="cpu")
    assert [row["strength"] for row in choice["scores"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert choice["n"] == int((crop_set.split == "val").sum()) and choice["selected_by"] == "macro_f1"
    best = max(row["macro_f1"] for row in choice["scores"])
    assert choice["strength"] == min(row["strength"] for row in choice["scores"] if row["macro_f1"] == best)
    for row in choice["scores"]:  # the same answers as classifying with that strength
        assert evaluate(path, crop_set, "val", device="cpu", prior_correction=row["strength"])["accuracy"] == (
            pytest.approx(row["accuracy"]))
    with pytest.raises(ValueError, match="class-balanced"):
        select_prior_correction(tiny_model_file(tmp_path / "u.safetensors", ["round", "long"]), crop_set,
                                device="cpu")


def test_train_stores_the_prior_correction_chosen_on_val(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=104)  # 52 validation crops
    settings = dict(model_kind="shape_aware", epochs=1, batch_size=16, config=TINY_SHAPE_AWARE, progress=False,
                    num_threads=1)
    result = train(crop_set, output=tmp_path / "m.safetensors", **settings)
    stored = result.info.metadata["prior_correction"]
    assert stored["n"] == 52 and stored["split"] == "val"
    assert any(note.startswith("prior correction: strength") for note in result.notes)
    # the same rule select_prior_correction applies to a finished file, on the same crops
    again = select_prior_correction(result.model_path, crop_set, "val", device="cpu")
    assert again["strength"] == stored["strength"]
    for mine, theirs in zip(stored["scores"], again["scores"]):
        assert mine["macro_f1"] == pytest.approx(theirs["macro_f1"])

    unbalanced = train(crop_set, output=tmp_path / "u.safetensors", balance=False, **settings)
    assert "prior_correction" not in unbalanced.info.metadata
    few = train(synthetic_crop_set(), output=tmp_path / "f.safetensors", **settings)  # 8 validation crops
    assert "prior_correction" not in few.info.metadata
    assert any("prior correction not chosen: 8 validation crops" in note for note in few.notes)


def test_training_inputs_checked_before_any_work(tmp_path):
    """No validation crops, an output that is a folder or a file of another kind: clear
    errors up front (an empty val split used to report the old model file as the result)."""
    crop_set = synthetic_crop_set(n_per_class=4)
    one_each = crop_set.subset(np.array([0, 4]))  # one image per class: nothing to hold out
    no_val = dataclasses.replace(one_each, split=np.full(2, "train", dtype="<U5"))
    with pytest.raises(ValueError, match="no validation crops"):
        train(no_val, output=tmp_path / "m.safetensors", epochs=1, progress=False)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        train(crop_set, output=tmp_path / "folder.safetensors", epochs=1, progress=False)
    (tmp_path / "notes.safetensors").write_text("my notes")
    with pytest.raises(ValueError, match="not a napari-smear model file.*refusing to overwrite it"):
        train(crop_set, output=tmp_path / "notes.safetensors", epochs=1, progress=False)
    assert (tmp_path / "notes.safetensors").read_text() == "my notes"


def test_resumed_run_records_the_cell_types_asked_for(tmp_path):
    crop_set = synthetic_crop_set(n_per_class=8)
    options = dict(model_kind="shape_aware", output=tmp_path / "m.safetensors", epochs=1, batch_size=8,
                   config=TINY_SHAPE_AWARE, progress=False, num_threads=1)
    train(crop_set, **options)
    with pytest.warns(UserWarning, match="nothing was trained"):
        again = train(crop_set, resume=True, cell_types=["wbc"], **options)  # finished: nothing to train
    assert again.info.metadata["cell_types"] == ["wbc"] == read_metadata(tmp_path / "m.safetensors")["cell_types"]


def test_folder_and_manifest_layouts(tmp_path):
    from napari_smear.datasets import _entries_from_folder, _read_manifest

    for name in ("train/a", "train/b", "validation/a"):
        (tmp_path / "mixed" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="mixes split folders"):
        _entries_from_folder(tmp_path / "mixed", 0.2)
    for name in ("a", "b", "empty"):
        (tmp_path / "classes" / name).mkdir(parents=True)
    for name in ("a/1.png", "b/2.png"):
        (tmp_path / "classes" / name).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"\['empty'\].*hold no image files"):
        _, labels, _ = _entries_from_folder(tmp_path / "classes", 0.2)
    assert sorted(labels) == ["a", "b"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nx.png,lymphocyte \ny.png,lymphocyte\n")
    assert _read_manifest(manifest, 0.2)[1] == ["lymphocyte", "lymphocyte"]


def test_a_cache_older_than_its_folder_is_refused(tmp_path):
    from napari_smear.datasets import load_data

    folder = tmp_path / "cells"
    for name in ("round/1.png", "long/2.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    crop_set = synthetic_crop_set(n_per_class=4).subset(np.array([0, 4]))  # one "round", one "long"
    crop_set = dataclasses.replace(
        crop_set, paths=np.array([str(folder / "round" / "1.png"), str(folder / "long" / "2.png")]),
        source=str(folder.resolve()),
    )
    cache = save_crop_set(tmp_path / "cache.npz", crop_set, image_codec="raw")
    assert len(load_data(folder, cache=cache, output_size=32)) == 2  # current: reused
    (folder / "long" / "3.png").write_bytes(b"")
    with pytest.raises(ValueError, match="out of date: .* 1 added"):
        load_data(folder, cache=cache, output_size=32)


def test_scale_outliers_of_a_batch():
    from napari_smear.datasets import scale_outliers

    diameters = {f"cell{i}": 52.0 + (i % 5) for i in range(28)}
    diameters.update({"ring": 20.0, "white cell": 80.0})
    assert scale_outliers(diameters) == ["ring", "white cell"]
    # a small batch, or one of two magnifications, keeps every image's own ruler
    assert scale_outliers({k: diameters[k] for k in list(diameters)[:10] + ["ring"]}) == []
    assert scale_outliers({**diameters, **{f"x{i}": 30.0 for i in range(8)}}) == []


def test_single_cell_images_far_off_the_batch_scale_are_cropped_at_its_median(shared_data, tmp_path):
    """A PBC image whose own ruler measures 18.5 px (the batch: about 52) is cropped at
    the batch median, and says so in scale_measured."""
    from napari_smear.datasets import crop_single_cell_images

    files = _pbc_files(shared_data, {"eosinophil": 10, "neutrophil": 10}, skip=20)
    paths = [str(shared_data / "pbc" / p) for p in files.path]
    paths.append(str(shared_data / "pbc" / "images" / "eosinophil" / "EO_894061.jpg"))
    results, errors, fallback = crop_single_cell_images(
        paths, range(len(paths)), crop_diameters=4.0, output_size=32, progress=False)
    assert not errors and fallback >= 1
    median = np.median([r["rbc_diameter_px"] for r in results.values()])
    odd = results[len(paths) - 1]
    assert odd["scale_measured"] is False and odd["rbc_diameter_px"] == pytest.approx(median, rel=0.05)
    assert 40 < median < 65


def test_fp16_training_is_scaled_on_every_device(monkeypatch):
    """fp16's small range underflows small gradients on any device, not only on CUDA: a
    gradient scaler goes with it; bf16 needs none. Apple MPS without autocast (torch
    before 2.5) is refused with the way out."""
    import torch

    from napari_smear.training import _gradient_scaler, _training_autocast

    dtype, scaled = _training_autocast(torch.device("cpu"), True, "float16")
    assert dtype == torch.float16 and scaled and _gradient_scaler(torch.device("cpu"), scaled).is_enabled()
    assert _training_autocast(torch.device("cpu"), True, "bfloat16") == (torch.bfloat16, False)
    assert not _gradient_scaler(torch.device("cpu"), False).is_enabled()
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: device_type != "mps")
    with pytest.raises(ValueError, match="mixed precision on Apple MPS needs a newer torch"):
        _training_autocast(torch.device("mps"), True, None)
    assert _training_autocast(torch.device("mps"), False, None) == (None, False)


def test_a_model_classifies_only_the_cell_types_its_crops_showed_it(tmp_path):
    """Fine-tuned from a model of white cells and platelets on white cells alone, a model
    must not be told to classify platelets: it would give every platelet one of its
    white-cell classes. The crops' segmented types decide (recorded in the crop set, kept
    in a packed .npz)."""
    from napari_smear.datasets import load_crop_set, save_crop_set

    crop_set = synthetic_crop_set(n_per_class=8)
    crop_set.cell_types = np.array(["wbc"] * len(crop_set.labels))
    with pytest.warns(UserWarning, match="the training crops hold no platelet cells: the model classifies wbc only"):
        result = train(crop_set, model_kind="shape_aware", output=tmp_path / "a.safetensors", epochs=1,
                       batch_size=8, config=TINY_SHAPE_AWARE, progress=False, num_threads=1,
                       cell_types=["wbc", "platelet"])
    assert result.info.metadata["cell_types"] == ["wbc"]
    save_crop_set(tmp_path / "set.npz", crop_set)
    np.testing.assert_array_equal(load_crop_set(tmp_path / "set.npz").cell_types, crop_set.cell_types)
    assert crop_set.subset(np.arange(3)).cell_types.tolist() == ["wbc"] * 3
    # a class named after a cell type is that type's cells, whatever the segmentation typed
    # them: PBC's platelet images centre on a clump it takes for a white cell
    crop_set.class_names = [*crop_set.class_names[:-1], "platelet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = train(crop_set, model_kind="shape_aware", output=tmp_path / "b.safetensors", epochs=1,
                     batch_size=8, config=TINY_SHAPE_AWARE, progress=False, num_threads=1,
                     cell_types=["wbc", "platelet"])
    assert kept.info.metadata["cell_types"] == ["wbc", "platelet"]


def test_too_few_training_samples_for_every_class_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"have no training crops among the 1 kept by max_train_samples"):
        train(synthetic_crop_set(n_per_class=8), model_kind="shape_aware", output=tmp_path / "m.safetensors",
              epochs=1, batch_size=8, config=TINY_SHAPE_AWARE, progress=False, max_train_samples=1)


def test_a_hold_out_drawn_from_crops_is_the_one_evaluate_draws_from_the_folder(tmp_path, monkeypatch):
    # train() without a 'val' split holds out 15 % of the crops; `evaluate FOLDER` scores
    # the 15 % the folder's hash split gives: the same images, however the folder was typed
    from types import SimpleNamespace

    from napari_smear.datasets import _entries_from_folder, _hash_split, hash_split_keys

    monkeypatch.chdir(tmp_path)
    for name in ("basophil", "lymphocyte"):
        (tmp_path / "cells" / name).mkdir(parents=True)
        for k in range(13):
            (tmp_path / "cells" / name / f"{name[:2]}_{k}.png").write_bytes(b"")
    paths, labels, split = _entries_from_folder(Path("cells"), 0.15)  # as typed: cells/basophil/...
    crops = SimpleNamespace(source=str((tmp_path / "cells").resolve()), paths=np.array(paths))
    assert list(_hash_split(hash_split_keys(crops), labels, 0.15)) == list(split)
    assert list(_hash_split(paths, labels, 0.15)) != list(split)  # what it drew from before
