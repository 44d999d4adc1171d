"""Model files: safetensors + JSON metadata round trip, rejection of malformed files, registry."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import napari_smear
from napari_smear.models import (
    FORMAT_VERSION,
    MODEL_KINDS,
    ModelFileError,
    ModelInfo,
    available_models,
    build_model,
    fuse_for_inference,
    load_model,
    read_metadata,
    save_model,
)
from napari_smear.models import registry

torch.set_num_threads(1)

TINY = {
    "plain": {"widths": [8, 8, 16, 16]},
    "shape_aware": {"widths": [8, 8, 16, 16], "shape_widths": [4, 4, 8, 8], "fusion_hidden": 16},
    "gated_attention": {"widths": [8, 8, 16, 16], "patch_widths": [8, 8, 16, 16], "attention_hidden": 8},
    "daffnet": {"widths": [8, 8, 16, 16], "morph_hidden": 8, "fusion_hidden": 16},
    "global_attention": {"widths": [8, 8, 16, 16], "input_size": 64},
}
# two trained members of different kinds (neither has attribute heads, so every weight
# gets a gradient in the generic tests); attribute averaging is tested on its own
TINY["ensemble"] = {
    "members": [
        {"kind": "gated_attention", "config": TINY["gated_attention"]},
        {"kind": "shape_aware", "config": TINY["shape_aware"]},
    ]
}
CLASS_NAMES = ["lymphocyte", "monocyte", "neutrophil"]
METADATA = {
    "class_names": CLASS_NAMES,
    "input_size": 64,
    "crop_diameters": 3.5,
    "mean": [0.8, 0.7, 0.75],
    "std": [0.1, 0.12, 0.09],
    "training_data": "toy batch",
    "metrics": {"val_accuracy": 0.5, "per_class_f1": {"lymphocyte": 0.4}},
    "notes": "kept as is",
}


def make_batch(batch: int = 2, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 5, size, size, generator=generator)
    x[:, 3] = 0
    x[:, 3, 16:48, 16:48] = 1
    x[:, 4] = 0
    x[:, 4, 24:40, 24:40] = 1
    return x


def trained_tiny_model(kind: str) -> torch.nn.Module:
    """A tiny model whose weights and BatchNorm statistics are no longer the defaults."""
    torch.manual_seed(0)
    model = build_model(kind, len(CLASS_NAMES), **TINY[kind])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(make_batch(4) * 1.5 + 0.3)["logits"].square().mean()
    loss.backward()
    optimiser.step()
    return model.eval()


@pytest.fixture
def saved_plain(tmp_path):
    model = trained_tiny_model("plain")
    path = save_model(tmp_path / "plain.safetensors", model, METADATA)
    return path, model


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_round_trip_gives_same_outputs_and_metadata(tmp_path, kind):
    model = trained_tiny_model(kind)
    path = save_model(tmp_path / f"{kind}.safetensors", model, METADATA)
    loaded, info = load_model(path)
    assert isinstance(info, ModelInfo)
    assert not loaded.training
    assert type(loaded) is type(model) and loaded.config == model.config
    x = make_batch()
    with torch.no_grad():
        expected, result = model(x), loaded(x)
    torch.testing.assert_close(result["logits"], expected["logits"], rtol=0, atol=0)
    torch.testing.assert_close(result["attention"], expected["attention"], rtol=0, atol=0)

    assert info.kind == kind and info.config == model.config
    assert info.class_names == CLASS_NAMES and info.num_classes == 3
    assert info.input_size == 64 and info.crop_diameters == 3.5
    assert info.mean == (0.8, 0.7, 0.75) and info.std == (0.1, 0.12, 0.09)
    assert info.metrics == METADATA["metrics"]
    assert info.path == path
    meta = info.metadata
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["training_data"] == "toy batch" and meta["notes"] == "kept as is"
    assert meta["package_version"] == napari_smear.__version__
    assert meta["created"].endswith("+00:00")
    assert len(meta["channels"]) == 5


def test_metadata_is_readable_without_loading_weights(saved_plain):
    path, _ = saved_plain
    meta = read_metadata(path)
    assert meta["kind"] == "plain" and meta["class_names"] == CLASS_NAMES
    # The JSON lives in the safetensors header under one key, so any safetensors reader sees it.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["napari_smear"])["kind"] == "plain"


def test_global_map_survives_round_trip(tmp_path):
    model = trained_tiny_model("global_attention")
    with torch.no_grad():
        model.attention_map_logits.normal_()
    loaded, _ = load_model(save_model(tmp_path / "g.safetensors", model, METADATA))
    assert (loaded.global_map() == model.global_map()).all()


def test_save_model_validates_its_input(tmp_path):
    model = trained_tiny_model("plain")
    target = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="3 class_names|class_names"):
        save_model(target, model, {**METADATA, "class_names": ["a", "b"]})
    with pytest.raises(ValueError, match="mean"):
        save_model(target, model, {**METADATA, "mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="std"):
        save_model(target, model, {**METADATA, "std": [0.1, 0.0, 0.1]})
    with pytest.raises(ValueError, match="input_size"):
        save_model(target, model, {**METADATA, "input_size": 100})
    with pytest.raises(ValueError, match="JSON"):
        save_model(target, model, {**METADATA, "extra": object()})
    with pytest.raises(ValueError, match="fused"):
        save_model(target, fuse_for_inference(model), METADATA)
    with pytest.raises(TypeError, match="build_model"):
        save_model(target, torch.nn.Linear(2, 2), METADATA)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary files left behind


# ------------------------------------------------------------------- rejection
def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    generator = torch.Generator().manual_seed(3)
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator).numpy().tobytes())
    with pytest.raises(ModelFileError, match="not a napari-smear model file"):
        load_model(path)


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match="only 2 bytes"):
        load_model(path)


def test_truncated_file(tmp_path, saved_plain):
    path, _ = saved_plain
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(cut)
    cut.write_bytes(data[:20])  # inside the header
    with pytest.raises(ModelFileError, match="truncated|header"):
        load_model(cut)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_pickle_is_refused_without_unpickling(tmp_path, monkeypatch, zip_format):
    model = trained_tiny_model("plain")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(path)


def test_png_is_refused(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ModelFileError, match="PNG"):
        load_model(path)


def test_safetensors_without_our_metadata(tmp_path):
    model = trained_tiny_model("plain")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(ModelFileError, match="without napari-smear metadata"):
        load_model(bare)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="without napari-smear metadata"):
        load_model(other)


def write_with_metadata(path, tensors, metadata):
    """A safetensors file with hand-made napari-smear metadata (to forge broken model files)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"napari_smear": json.dumps(metadata)})
    return path


def test_unknown_kind_and_future_version(tmp_path, saved_plain):
    path, model = saved_plain
    meta = read_metadata(path)
    state = model.state_dict()
    unknown = write_with_metadata(tmp_path / "k.safetensors", state, {**meta, "kind": "vit"})
    with pytest.raises(ModelFileError, match="unknown model kind 'vit'"):
        load_model(unknown)
    future = write_with_metadata(tmp_path / "v.safetensors", state, {**meta, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ModelFileError, match="newer napari-smear"):
        load_model(future)
    versionless = {k: v for k, v in meta.items() if k != "format_version"}
    no_version = write_with_metadata(tmp_path / "n.safetensors", state, versionless)
    with pytest.raises(ModelFileError, match="format_version"):
        load_model(no_version)
    bad_config = write_with_metadata(tmp_path / "c.safetensors", state, {**meta, "config": {"bogus": 1}})
    with pytest.raises(ModelFileError, match="cannot build"):
        load_model(bad_config)
    bad_meta = write_with_metadata(tmp_path / "m.safetensors", state, {**meta, "std": [0, 1, 1]})
    with pytest.raises(ModelFileError, match="std"):
        load_model(bad_meta)


def test_weights_that_do_not_match_the_architecture(tmp_path, saved_plain):
    path, model = saved_plain
    meta = read_metadata(path)
    state = model.state_dict()

    wider = {**meta, "config": {**meta["config"], "widths": [8, 8, 16, 32]}}
    with pytest.raises(ModelFileError, match="shape mismatches: backbone"):
        load_model(write_with_metadata(tmp_path / "shape.safetensors", state, wider))

    more_classes = {**meta, "class_names": CLASS_NAMES + ["basophil"]}
    with pytest.raises(ModelFileError, match="classifier.weight"):
        load_model(write_with_metadata(tmp_path / "classes.safetensors", state, more_classes))

    missing = {k: v for k, v in state.items() if k != "classifier.bias"}
    with pytest.raises(ModelFileError, match="missing weights: classifier.bias"):
        load_model(write_with_metadata(tmp_path / "missing.safetensors", missing, meta))

    extra = {**state, "surprise.weight": torch.zeros(3)}
    with pytest.raises(ModelFileError, match="unexpected weights: surprise.weight"):
        load_model(write_with_metadata(tmp_path / "extra.safetensors", extra, meta))


def test_model_file_error_is_a_value_error():
    assert issubclass(ModelFileError, ValueError)


# -------------------------------------------------------------------- registry
def test_builtin_models(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "weights_dir", lambda: tmp_path)
    assert available_models() == []
    with pytest.raises(ModelFileError, match="built-in model 'wbc-pbc8' is not installed"):
        load_model("wbc-pbc8")
    with pytest.raises(ModelFileError, match="built-in model names"):
        load_model("wbc-unknown")

    save_model(tmp_path / "wbc-pbc8.safetensors", trained_tiny_model("plain"), METADATA)
    assert available_models() == ["wbc-pbc8"]
    model, info = load_model("wbc-pbc8")
    assert info.class_names == CLASS_NAMES and info.path == tmp_path / "wbc-pbc8.safetensors"


def test_weights_folder_is_inside_the_package():
    folder = registry.weights_dir()
    # (The folder itself may be absent from a fresh clone: git does not keep empty folders.)
    assert folder.parent.name == "models" and folder.parent.parent.name == "napari_smear"
    assert set(available_models()) <= set(registry.BUILTIN_MODELS)


def test_saved_model_is_readable_like_any_other_output(tmp_path):
    """A model shared in a group folder: the file gets the usual permissions (the umask's),
    not the owner-only ones of a private temporary file."""
    import os

    from conftest import tiny_model_file

    previous = os.umask(0o022)
    try:
        path = tiny_model_file(tmp_path / "shared.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]  # no temporary left


def test_weights_that_are_not_finite_and_unknown_cell_types_are_refused(tmp_path, saved_plain):
    path, model = saved_plain
    meta = read_metadata(path)
    state = dict(model.state_dict())
    name = next(k for k, v in state.items() if v.is_floating_point())
    broken = write_with_metadata(tmp_path / "nan.safetensors", {**state, name: torch.full_like(state[name], float("nan"))},
                                 meta)
    with pytest.raises(ModelFileError, match=f"NaN or infinite values \\({name}"):
        load_model(broken)
    typo = write_with_metadata(tmp_path / "t.safetensors", state, {**meta, "cell_types": ["wbcs"]})
    with pytest.raises(ModelFileError, match=r"cell_types must be some of \['wbc', 'rbc', 'platelet'\], got \['wbcs'\]"):
        load_model(typo)
    empty = write_with_metadata(tmp_path / "e.safetensors", state, {**meta, "cell_types": []})
    with pytest.raises(ModelFileError, match="non-empty list"):
        read_metadata(empty)


@pytest.mark.parametrize(("setting", "message"), [
    ({"test_time_views": 3}, r"test_time_views must be one of \[1, 2, 4, 8\], got 3"),
    ({"prior_correction": "x"}, "prior_correction must be"),
    ({"prior_correction": {"strength": -1}}, "prior_correction must be"),
])
def test_inference_settings_in_the_file_are_checked_when_it_is_loaded(tmp_path, saved_plain, setting, message):
    # not at the first classification, with no word of which file holds them
    path, model = saved_plain
    meta = read_metadata(path)
    bad = write_with_metadata(tmp_path / "s.safetensors", model.state_dict(), {**meta, **setting})
    with pytest.raises(ModelFileError, match=f"s.safetensors: invalid metadata: {message}"):
        load_model(bad)
