"""Batched inference: device selection, classify_crops (AMP, batch halving, compile fallback), classify_files."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLASSES, tiny_model_file

from napari_smear.io import write_png_atomic
from napari_smear.models import load_model
from napari_smear.predict import (
    classify_crops,
    classify_files,
    expand_image_inputs,
    prior_logit_offsets,
    select_device,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_crops(n=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (size / 4) ** 2
    core = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (size / 8) ** 2
    masks = np.broadcast_to(np.stack([disc, core]).astype(np.uint8), (n, 2, size, size)).copy()
    return images, masks


# ----------------------------------------------------------------------------- devices


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    assert select_device(" CPU ").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        select_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("cuda:first")
    with pytest.raises(TypeError, match="str or torch.device"):
        select_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'cuda' was requested but .*available here: cpu"):
        select_device("cuda")
    with pytest.raises(ValueError, match="'cuda:1' was requested"):
        select_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_unavailable_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="'mps' was requested but Apple MPS is not available"):
        select_device("mps")


# ----------------------------------------------------------------------------- classify_crops


def test_classify_crops_outputs_and_batch_independence(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(10)
    whole = classify_crops(model, info, images, masks, device="cpu", batch_size=64, amp=False)
    assert whole["probs"].shape == (10, 3) and whole["probs"].dtype == np.float32
    np.testing.assert_allclose(whole["probs"].sum(axis=1), 1, atol=1e-5)
    assert whole["attention"].shape == (10, 32, 32) and whole["attention"].dtype == np.float16
    assert 0 <= whole["attention"].min() and whole["attention"].max() <= 1
    batched = classify_crops(model, info, images, masks, device="cpu", batch_size=3, amp=False)
    np.testing.assert_allclose(batched["probs"], whole["probs"], atol=1e-5)
    # bf16 autocast on CPU: same probabilities up to bf16 rounding
    low = classify_crops(model, info, images, masks, device="cpu", batch_size=64, amp=True)
    np.testing.assert_allclose(low["probs"], whole["probs"], atol=0.03)
    no_maps = classify_crops(str(tmp_path / "m.safetensors"), None, images, masks, device="cpu",
                             return_attention=False)
    assert "attention" not in no_maps and no_maps["probs"].shape == (10, 3)


def test_classify_crops_reports_progress_to_a_callable(tmp_path):
    """progress takes a callback, as analyze's and segment_smear's do (it was a bool
    only, and a callable was taken for True: a tqdm bar instead of the calls)."""
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(10)
    calls = []
    classify_crops(model, info, images, masks, device="cpu", batch_size=4, amp=False,
                   progress=lambda fraction, message: calls.append((fraction, message)))
    assert [f for f, _ in calls] == pytest.approx([0.4, 0.8, 1.0]) and calls[-1][1] == "classified 10 of 10 crops"
    calls.clear()  # with a second pass over the unsure crops: first half, second half, done
    classify_crops(model, info, images, masks, device="cpu", batch_size=4, amp=False, test_time_views=8,
                   sure_at=0.999, progress=lambda fraction, message: calls.append((fraction, message)))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[2] == pytest.approx(0.5) and fractions[-1] == 1.0
    assert any(m.startswith("turning the unsure crops") for _, m in calls)
    with pytest.raises(TypeError, match="progress must be"):
        classify_crops(model, info, images, masks, device="cpu", progress="yes")


def test_the_folded_copy_is_reused_until_the_weights_change(tmp_path, monkeypatch):
    """Folding BatchNorm copies the model (about 50 ms): done once per model, and again
    after any change of its weights, in place or by replacing a tensor."""
    import napari_smear.models as models_module

    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(4)
    folds = []
    original = models_module.fuse_for_inference
    monkeypatch.setattr(models_module, "fuse_for_inference", lambda m: folds.append(1) or original(m))
    first = classify_crops(model, info, images, masks, device="cpu", amp=False)["probs"]
    again = classify_crops(model, info, images, masks, device="cpu", amp=False)["probs"]
    assert len(folds) == 1
    np.testing.assert_array_equal(again, first)

    bias = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias
    with torch.no_grad():
        bias[0] += 5.0  # in place, as an optimiser step: class 0 now wins everywhere
    changed = classify_crops(model, info, images, masks, device="cpu", amp=False)["probs"]
    assert len(folds) == 2
    assert (changed.argmax(axis=1) == 0).all() and not np.allclose(changed, first)

    model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
    classify_crops(model, info, images, masks, device="cpu", amp=False)
    assert len(folds) == 3  # new tensors (assign=True) are new weights
    model.train()  # the mode alone changes no weight: the folded copy is always in eval mode
    np.testing.assert_array_equal(
        classify_crops(model, info, images, masks, device="cpu", amp=False)["probs"], changed)
    assert len(folds) == 3


def test_soft_masks_count_from_one_half(tmp_path):
    """Float masks (a resized or blurred mask) are thresholded, not truncated to 0."""
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(4)
    hard = classify_crops(model, info, images, masks, device="cpu", amp=False)
    soft = classify_crops(model, info, images, masks.astype(np.float32) * 0.99, device="cpu", amp=False)
    np.testing.assert_allclose(soft["probs"], hard["probs"], atol=1e-6)


def test_classify_crops_rejects_wrong_inputs(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(4, size=48)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 32, 32, 3\).*input size 32"):
        classify_crops(model, info, images, masks, device="cpu")
    images, masks = random_crops(4)
    with pytest.raises(TypeError, match="uint8"):
        classify_crops(model, info, images.astype(np.float32), masks, device="cpu")
    with pytest.raises(ValueError, match="masks must have shape"):
        classify_crops(model, info, images, masks[:, :1], device="cpu")
    with pytest.raises(ValueError, match="info"):
        classify_crops(model, None, images, masks, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        classify_crops(model, info, images, masks, device="cpu", batch_size=0)


BALANCED_TRAINING = {
    "training": {"balance": "sampler"},
    "training_data": {"train_class_counts": dict(zip(TINY_CLASSES, (60, 30, 10)))},
}


def test_prior_correction_gives_back_the_training_frequencies(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors", **BALANCED_TRAINING))
    images, masks = random_crops(10)
    raw = classify_crops(model, info, images, masks, device="cpu", amp=False)["probs"]
    full = classify_crops(model, info, images, masks, device="cpu", amp=False, prior_correction=1.0)["probs"]
    # Bayes' rule: p(c | x) under the training mix is proportional to the balanced p(c | x) times prior(c)
    expected = raw * np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(full, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    offsets = prior_logit_offsets(info, 0.5)
    np.testing.assert_allclose(offsets, 0.5 * np.log(3 * np.array([0.6, 0.3, 0.1])), rtol=1e-6)
    assert prior_logit_offsets(info) is None  # the file stores no strength: no change
    with pytest.raises(ValueError, match=">= 0"):
        prior_logit_offsets(info, -0.5)

    # a strength stored in the file is the default, and an explicit 0 turns it off
    stored = tiny_model_file(tmp_path / "stored.safetensors", **BALANCED_TRAINING,
                             prior_correction={"strength": 1.0, "selected_by": "macro_f1"})
    np.testing.assert_allclose(classify_crops(stored, None, images, masks, device="cpu", amp=False)["probs"],
                               full, atol=1e-5)
    np.testing.assert_allclose(
        classify_crops(stored, None, images, masks, device="cpu", amp=False, prior_correction=0)["probs"], raw,
        atol=1e-5)


def test_prior_correction_needs_balanced_training_on_record(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(4)
    with pytest.raises(ValueError, match="class-balanced batches"):
        classify_crops(model, info, images, masks, device="cpu", prior_correction=0.5)
    unbalanced = {**BALANCED_TRAINING, "training": {"balance": "none"}}
    model, info = load_model(tiny_model_file(tmp_path / "u.safetensors", **unbalanced))
    with pytest.raises(ValueError, match="balance='none'"):
        prior_logit_offsets(info, 1.0)


def test_out_of_memory_halves_the_batch(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(10)
    reference = classify_crops(model, info, images, masks, device="cpu", amp=False)

    class SmallMemory(torch.nn.Module):
        """Raises the CUDA out-of-memory error for batches larger than 3."""

        def __init__(self, inner, error):
            super().__init__()
            self.inner, self.error, self.config = inner, error, inner.config

        def forward(self, x, morph=None):
            if len(x) > 3:
                raise self.error
            return self.inner(x, morph)

    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: out of memory")):
        with pytest.warns(UserWarning, match="out of memory"):
            result = classify_crops(SmallMemory(model, error), info, images, masks, device="cpu", batch_size=16,
                                    amp=False)
        assert result["batch_size"] == 2
        np.testing.assert_allclose(result["probs"], reference["probs"], atol=1e-5)
    with pytest.raises(RuntimeError, match="something else"):
        classify_crops(SmallMemory(model, RuntimeError("something else")), info, images, masks, device="cpu")


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(5)

    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        result = classify_crops(model, info, images, masks, device="cpu", compile=True, amp=False)
    assert result["probs"].shape == (5, 3)


def test_daffnet_gets_its_morphology_and_attributes(tmp_path):
    path = tiny_model_file(
        tmp_path / "d.safetensors", kind="daffnet", config={"widths": [8, 16, 32, 64], "morph_features": 18}
    )
    model, info = load_model(path)
    images, masks = random_crops(6)
    result = classify_crops(model, info, images, masks, device="cpu")  # morph computed from the crops
    assert result["probs"].shape == (6, 3)
    assert set(result["attributes"]) == set(model.attribute_names)
    np.testing.assert_allclose(result["attributes"]["nucleus_shape"].sum(axis=1), 1, atol=1e-4)
    with pytest.raises(ValueError, match=r"morph must have shape \(6, 18\)"):
        classify_crops(model, info, images, masks, np.zeros((6, 5)), device="cpu")


def test_test_time_views_average_the_turned_crops(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(6)

    def run(imgs, msks, **options):
        return classify_crops(model, info, np.ascontiguousarray(imgs), np.ascontiguousarray(msks), device="cpu",
                              amp=False, **options)

    plain = run(images, masks)
    mirrored = run(images[:, :, ::-1], masks[:, :, :, ::-1])
    two = run(images, masks, test_time_views=2)
    np.testing.assert_allclose(two["probs"], (plain["probs"] + mirrored["probs"]) / 2, atol=1e-5)
    # each view's attention is turned back onto the crop before the mean
    expected = (plain["attention"].astype(np.float32) + mirrored["attention"].astype(np.float32)[:, :, ::-1]) / 2
    np.testing.assert_allclose(two["attention"].astype(np.float32), expected, atol=2e-3)
    # every quarter turn, mirrored and not: the mean of the eight views
    views = [(images, masks)]
    for k in range(1, 4):
        views.append((np.rot90(images, k, axes=(1, 2)), np.rot90(masks, k, axes=(2, 3))))
    views += [(v[:, :, ::-1], m[:, :, :, ::-1]) for v, m in views]
    eight = run(images, masks, test_time_views=8, sure_at=None)
    np.testing.assert_allclose(eight["probs"], np.mean([run(v, m)["probs"] for v, m in views], axis=0), atol=1e-5)
    assert (eight["views"] == 8).all() and (plain["views"] == 1).all()
    # the same answer for a crop whichever way up it comes
    turned = run(np.rot90(images, 1, axes=(1, 2)), np.rot90(masks, 1, axes=(2, 3)), test_time_views=8, sure_at=None)
    np.testing.assert_allclose(turned["probs"], eight["probs"], atol=1e-5)
    # and its attention map turns with it (each view's map was turned back onto its crop)
    np.testing.assert_allclose(turned["attention"].astype(np.float32),
                               np.rot90(eight["attention"].astype(np.float32), 1, axes=(1, 2)), atol=2e-3)


def test_only_unsure_crops_are_turned(tmp_path):
    """``sure_at``: a crop whose first view is that sure keeps its first-view answer and
    map; the others get the mean of every view, as without ``sure_at``."""
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(12, seed=3)

    def run(**options):
        return classify_crops(model, info, images, masks, device="cpu", amp=False, **options)

    first, every = run(test_time_views=1), run(test_time_views=8, sure_at=None)
    top = first["probs"].max(axis=1)
    threshold = float(np.median(top))
    sure = top >= threshold
    assert 0 < sure.sum() < len(sure)
    mixed = run(test_time_views=8, sure_at=threshold)
    np.testing.assert_array_equal(mixed["views"], np.where(sure, 1, 8))
    np.testing.assert_allclose(mixed["probs"][sure], first["probs"][sure], atol=1e-6)
    np.testing.assert_allclose(mixed["probs"][~sure], every["probs"][~sure], atol=1e-5)
    np.testing.assert_allclose(mixed["attention"][sure].astype(np.float32),
                               first["attention"][sure].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(mixed["attention"][~sure].astype(np.float32),
                               every["attention"][~sure].astype(np.float32), atol=2e-3)
    # in several batches: each batch picks its own unsure crops, with the same outcome
    np.testing.assert_allclose(run(test_time_views=8, sure_at=threshold, batch_size=5)["probs"], mixed["probs"],
                               atol=1e-5)
    # all sure: one view each; at 1.0 only a certain answer would be sure (none here)
    assert (run(test_time_views=8, sure_at=0.01)["views"] == 1).all()
    np.testing.assert_allclose(run(test_time_views=8, sure_at=1.0)["probs"], every["probs"], atol=1e-5)
    for bad in (0, 1.5, -0.2, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match="sure_at must be a probability"):
            run(test_time_views=8, sure_at=bad)


def test_test_time_views_default_to_the_model_files_own(tmp_path):
    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors", test_time_views=4))
    images, masks = random_crops(4)
    own = classify_crops(model, info, images, masks, device="cpu", amp=False)
    np.testing.assert_allclose(own["probs"], classify_crops(model, info, images, masks, device="cpu", amp=False,
                                                            test_time_views=4)["probs"], atol=1e-6)
    one = classify_crops(model, info, images, masks, device="cpu", amp=False, test_time_views=1)
    assert not np.allclose(one["probs"], own["probs"], atol=1e-6)
    for bad in (3, 0, True, "8"):
        with pytest.raises(ValueError, match=r"test_time_views must be one of \[1, 2, 4, 8\]"):
            classify_crops(model, info, images, masks, device="cpu", test_time_views=bad)


def test_daffnet_attributes_are_averaged_over_the_views(tmp_path):
    path = tiny_model_file(
        tmp_path / "d.safetensors", kind="daffnet", config={"widths": [8, 16, 32, 64], "morph_features": 18}
    )
    model, info = load_model(path)
    images, masks = random_crops(4)
    result = classify_crops(model, info, images, masks, device="cpu", test_time_views=8)
    np.testing.assert_allclose(result["attributes"]["nucleus_shape"].sum(axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(result["probs"].sum(axis=1), 1, atol=1e-5)


# ----------------------------------------------------------------------------- files


def test_expand_image_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/notes.txt", "a/.hidden/z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_image_inputs([tmp_path / "a"])
    assert [p.name for p in found] == ["y.JPG", "x.png"]
    with pytest.raises(FileNotFoundError):
        expand_image_inputs([tmp_path / "missing.png"])
    assert expand_image_inputs([tmp_path / "missing.png"], missing="keep") == [tmp_path / "missing.png"]
    # a file reached twice (named twice, by another spelling, in a folder given too) once
    x = tmp_path / "a" / "x.png"
    twice = expand_image_inputs([x, tmp_path / "a" / "b" / ".." / "x.png", tmp_path / "a"])
    assert twice == [x, tmp_path / "a" / "b" / "y.JPG"]


def test_classify_files_keeps_order_and_reports_failures(tmp_path, shared_data):
    table = pd.read_csv(shared_data / "pbc" / "split.csv")
    picked = table[table.split == "val"].groupby("label").head(1).head(3)
    files = []
    for path in picked.path:
        files.append(tmp_path / path.split("/")[-1])
        shutil.copy(shared_data / "pbc" / path, files[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    model_path = tiny_model_file(tmp_path / "m.safetensors", size=32)
    inputs = [files[0], broken, files[1], tmp_path / "missing.jpg", files[2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = classify_files(inputs, model_path, device="cpu", progress=False)
    assert result.path.tolist() == [str(p) for p in inputs]
    assert list(result.columns) == ["path", "prediction", "confidence", *[f"p_{c}" for c in TINY_CLASSES],
                                    "scale_measured", "cell_type", "warning", "error"]
    good = result.error == ""
    assert good.tolist() == [True, False, True, False, True]
    assert result.prediction[good].isin(TINY_CLASSES).all() and (result.prediction[~good] == "").all()
    np.testing.assert_allclose(result.loc[good, [f"p_{c}" for c in TINY_CLASSES]].sum(axis=1), 1, atol=1e-5)
    assert result.confidence[~good].isna().all()
    assert "not found" in result.error[3] and result.error[1]


def test_classify_files_warns_when_the_central_cell_is_not_what_the_model_classifies(tmp_path):
    from napari_smear.samples import synthetic_smear

    image, _ = synthetic_smear((240, 240), rbc_diameter_px=30, n_wbc=0, n_platelets=0, seed=3)
    gray = np.repeat(np.round(image.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None], 3, -1)
    write_png_atomic(tmp_path / "reds.png", image)
    write_png_atomic(tmp_path / "gray.png", gray)
    model_path = tiny_model_file(tmp_path / "m.safetensors", size=32, cell_types=["wbc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = classify_files([tmp_path / "reds.png", tmp_path / "gray.png"], model_path, device="cpu",
                                progress=False)
    reds = result.iloc[0]
    assert reds.error == "" and reds.cell_type == "rbc"
    assert "segmented as rbc, and this model classifies wbc cells" in reds.warning
    assert "no colour" in result.iloc[1].warning


def test_autocast_on_cuda_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """bf16 on Ampere and later (compute capability 8.0+), fp16 below (a T4, a V100): there
    cuDNN has no bf16 convolutions, though torch.cuda.is_bf16_supported() says yes. Judged
    per GPU, not by the current one."""
    from napari_smear.predict import autocast_dtype

    capability = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated: says yes
    assert autocast_dtype(torch.device("cuda", 0)) == torch.float16
    assert autocast_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda")) == torch.float16  # the current GPU, 0
    assert autocast_dtype(torch.device("cuda", 1), amp=torch.float16) == torch.float16
    assert autocast_dtype(torch.device("cuda", 1), amp=False) is None


def test_mps_device_with_its_index_is_accepted(monkeypatch):
    from napari_smear.predict import select_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("mps:0") == torch.device("mps")
    assert select_device(torch.device("mps", 0)) == torch.device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("mps:1")


def test_cudnn_and_cublas_allocation_failures_count_as_out_of_memory():
    from napari_smear.predict import _is_oom

    assert _is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert _is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not _is_oom(RuntimeError("CUDNN_STATUS_BAD_PARAM"))


def test_a_compiled_model_is_freed_with_it(tmp_path, monkeypatch):
    """The compiled wrapper is kept on the model, not in a cache that held it for ever."""
    import gc
    import weakref

    model, info = load_model(tiny_model_file(tmp_path / "m.safetensors"))
    images, masks = random_crops(3)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module.forward)  # no compiler needed
    from napari_smear import predict

    classify_crops(model, info, images, masks, device="cpu", compile=True, amp=False)
    fused = predict._fused(model)
    assert predict._COMPILED_ATTRIBUTE in fused.__dict__
    alive = weakref.ref(fused)
    del model, fused
    gc.collect()
    assert alive() is None


def test_gated_attention_runs_where_a_device_has_no_autocast():
    """Apple MPS before torch 2.5 has no autocast, and torch.autocast(enabled=False)
    itself raised there: the sums kept in float32 ask for it only where it exists."""
    from napari_smear.models.base import autocast_off

    with autocast_off("meta"):  # a device type without autocast
        pass
    from napari_smear.models import build_model

    model = build_model("gated_attention", 3, widths=[8, 8, 16, 16], patch_widths=[8, 8, 16, 16],
                        attention_hidden=8).to("meta").eval()
    channels = model.in_channels if hasattr(model, "in_channels") else 5
    out = model(torch.zeros(2, channels, 96, 96, device="meta"))
    assert out["logits"].shape == (2, 3)
