"""Batched inference of the crop classifiers, and device selection.

:func:`classify_crops` runs a model over (N, S, S, 3) crops and their masks in batches:
uint8 crops travel to the device (pinned host memory and non-blocking copies on CUDA)
and are normalised there, autocast (bf16 on CPU, bf16/fp16 on CUDA) is on by default,
and a CUDA out-of-memory error halves the batch and retries instead of failing.
:func:`classify_files` crops single-cell images (PBC / CellaVision style) with the
model's own crop convention and classifies them.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "select_device",
    "autocast_dtype",
    "preprocess_batch",
    "classify_crops",
    "check_test_time_views",
    "check_sure_at",
    "unsure_crops",
    "SURE_AT",
    "check_batch_size",
    "prior_correction_strength",
    "prior_logit_offsets",
    "classify_files",
    "expand_image_inputs",
]

_DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")
#: A ``sure_at`` for :func:`classify_crops` (off by default): crops whose first view is at
#: least this sure of a class skip the other turned views.
SURE_AT = 0.85
# The attribute a model keeps its compiled wrapper in, so repeated calls do not
# recompile. (A cache keyed weakly by the model never let the model go: the wrapper
# holds it. On the model, the two form a cycle the garbage collector frees together.)
_COMPILED_ATTRIBUTE = "_napari_smear_compiled"


def select_device(name="auto"):
    """Resolve a device name to an available :class:`torch.device`.

    Parameters
    ----------
    name : str or torch.device
        ``"auto"`` (CUDA, else Apple MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        An unknown device name, or a device this machine does not have (the message
        says what is available).
    """
    import torch

    if isinstance(name, torch.device):
        text = str(name)
    elif isinstance(name, str):
        text = name.strip().lower()
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(name).__name__}")
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind == "mps" and index == "0":  # what an MPS tensor's .device reads: the one Apple GPU
        index = ""
    if kind not in _DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    available = "available here: " + ", ".join(_available_devices())
    if kind == "cuda":
        if not torch.cuda.is_available():
            built = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r} was requested but {built}; {available} (or choose auto: device='auto', --device auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist; {available}"
            )
        return torch.device(text)
    if kind == "mps" and not mps_ok:
        raise ValueError(f"device 'mps' was requested but Apple MPS is not available; {available}")
    return torch.device(kind)


def _available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def autocast_dtype(device, amp=True):
    """The autocast dtype for ``device`` (None: run in float32).

    bf16 on CPU and on CUDA GPUs with native bf16 (Ampere, compute capability 8.0, and
    later: same range as float32, so no overflow in logits or attention), else fp16 on
    CUDA and MPS. (``torch.cuda.is_bf16_supported()`` also says yes for older GPUs that
    only emulate bf16, where cuDNN has no bf16 convolutions: slow, or failing.)
    """
    import torch

    if not amp:
        return None
    if isinstance(amp, torch.dtype):
        return amp
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "mps":
        # MPS autocast exists from torch 2.5 on; older versions run in float32
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        return torch.float16 if (major, minor) >= (2, 5) else None
    return None


def cuda_has_native_bf16(device) -> bool:
    """Whether the CUDA GPU ``device`` (its own index, not the current device's) computes
    in bf16 natively: compute capability 8.0 (Ampere) or later."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def _autocast(device, dtype):
    """Autocast context for ``dtype`` on ``device``; a no-op context when dtype is None."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: Share of a crop's pixels (the brightest outside the cell mask) taken as its glass colour.
_GLASS_SHARE = 0.1
#: The grey level the glass colour is mapped to by :func:`white_balance`.
_GLASS_LEVEL = 0.92


def white_balance(rgb, masks):
    """Divide each crop by its own glass colour (per channel), mapping glass to a fixed grey.

    The glass colour of a crop is the mean colour of its brightest pixels outside the
    cell mask (the brightest tenth of the crop). Removing it takes out the illuminant,
    the camera's colour balance and the background tint of the smear -- the largest
    differences between microscopes (a CellaVision PBC crop has a warm beige glass, a
    BCCD camera field a cold grey one) -- while the stain colours relative to the glass
    are kept.

    Parameters
    ----------
    rgb : torch.Tensor
        (B, 3, S, S) float in [0, 1].
    masks : torch.Tensor
        (B, C, S, S); channel 0 is the cell mask.

    Returns
    -------
    torch.Tensor
        (B, 3, S, S) float in [0, 1].
    """
    import torch

    b, _, s, _ = rgb.shape
    luminance = rgb.mean(dim=1).reshape(b, -1)
    outside = (masks[:, 0] <= 0).reshape(b, -1)
    # cell pixels rank below every glass pixel; they are used only if the cell fills the crop
    ranked = torch.where(outside, luminance, luminance - 2.0)
    k = max(1, int(_GLASS_SHARE * s * s))
    index = ranked.topk(k, dim=1).indices  # (B, k)
    brightest = torch.gather(rgb.reshape(b, 3, -1), 2, index[:, None, :].expand(b, 3, k))
    glass = brightest.mean(dim=2).clamp_min(0.05)  # (B, 3)
    return (rgb * (_GLASS_LEVEL / glass)[:, :, None, None]).clamp(0.0, 1.0)


def preprocess_batch(images, masks, mean, std, *, channels_last: bool = False, balance: bool = False):
    """Build the model input (B, 5, S, S) from uint8 crops and masks already on the device.

    Parameters
    ----------
    images : torch.Tensor
        (B, S, S, 3) uint8 (or float in [0, 1]) RGB.
    masks : torch.Tensor
        (B, 2, S, S) 0/1 cell and nucleus masks.
    mean, std : torch.Tensor
        (3,) normalisation of the [0, 1] RGB values.
    balance : bool
        Apply :func:`white_balance` first (models trained with ``white_balance``).
    """
    import torch

    rgb = images.permute(0, 3, 1, 2).float()
    if images.dtype == torch.uint8:
        rgb = rgb / 255.0
    if balance:
        rgb = white_balance(rgb, masks)
    rgb = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = torch.cat([rgb, (masks > 0).float()], dim=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _to_device(array: np.ndarray, device):
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # cuDNN and cuBLAS say it their own way when their workspace does not fit
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed")
    )


def _free_device_memory(device) -> None:
    """Hand the failed batch's cached blocks back (CUDA, MPS) before a smaller batch."""
    import gc

    import torch

    gc.collect()  # the failed batch's tensors, held by the exception's frames until now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()


# Inference copies of models with BatchNorm folded in (see fuse_for_inference), kept
# while the model lives and its weights are unchanged: folding deep-copies the model
# (about 50 ms on CPU), which a batch run paid for every classifier batch and the
# viewer for every click, and a compiled wrapper of a fresh copy was never reused.
_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FUSED_LOCK = threading.Lock()


def _weights_state(model):
    """What identifies the current weights of ``model``: each parameter and buffer (held,
    so that a replaced tensor cannot be mistaken for a new one at the same address), its
    storage and its version counter (bumped by every in-place change, such as an
    optimiser step or ``load_state_dict``). None when a tensor has no version counter
    (made under ``torch.inference_mode``): such a model is folded afresh every call."""
    try:
        return [(tensor, tensor.data_ptr(), tensor._version) for tensor in (*model.parameters(), *model.buffers())]
    except RuntimeError:
        return None


def _same_weights(state, other) -> bool:
    return len(state) == len(other) and all(
        a is b and pointer == other_pointer and version == other_version
        for (a, pointer, version), (b, other_pointer, other_version) in zip(state, other)
    )


def _fused(model):
    """``fuse_for_inference(model)``, reused while ``model``'s weights stay the same."""
    from .models import fuse_for_inference

    state = _weights_state(model)
    if state is not None:
        with _FUSED_LOCK:
            cached = _FUSED.get(model)
        if cached is not None and _same_weights(state, cached[0]):
            return cached[1]
    fused = fuse_for_inference(model)
    if state is not None:
        with _FUSED_LOCK:
            _FUSED[model] = (state, fused)
    return fused


def _compiled(model):
    import torch

    compiled = model.__dict__.get(_COMPILED_ATTRIBUTE)
    if compiled is None:
        compiled = torch.compile(model, dynamic=True)
        # object.__setattr__: nn.Module's own would register the wrapper as a submodule
        object.__setattr__(model, _COMPILED_ATTRIBUTE, compiled)
    return compiled


def _resolve_model(model, info, device):
    from torch import nn

    from .models import load_model

    if isinstance(model, (str, os.PathLike)):
        loaded, loaded_info = load_model(model, device=device)
        return loaded, info or loaded_info
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a model name/path, got {type(model).__name__}")
    if info is None:
        raise ValueError("info (the ModelInfo from load_model or a TrainResult) is required with a model object")
    return model, info


def classify_crops(
    model,
    info=None,
    images: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    morph: np.ndarray | None = None,
    *,
    device="auto",
    batch_size: int = 256,
    amp=True,
    compile: bool = False,
    fuse: bool = True,
    return_attention: bool = True,
    progress: bool | Callable[[float, str], None] | None = None,
    prior_correction: float | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
) -> dict:
    """Classify crops in batches.

    Parameters
    ----------
    model : torch.nn.Module or str or path-like
        A classifier (then ``info`` is required) or a model name/path for
        :func:`napari_smear.models.load_model`. A module is moved to ``device``
        and put in eval mode.
    info : ModelInfo
        The model's class names and preprocessing (input size, mean/std, crop scale).
    images : (N, S, S, 3) uint8
        Crops at the model's scale (``S == info.input_size``).
    masks : (N, 2, S, S)
        Cell and nucleus masks (0/1) of each crop; float masks count from 0.5 up.
    morph : (N, M) float, optional
        Morphology features for models built with ``morph_features > 0``; computed
        with :func:`napari_smear.morphology.crop_morphology` when not given.
    device : str or torch.device
        See :func:`select_device`.
    batch_size : int
        Crops per forward pass; halved automatically on a GPU out-of-memory error.
    amp : bool
        Autocast (bf16 on CPU and recent GPUs, fp16 otherwise); probabilities are
        returned in float32 either way.
    compile : bool
        Run the model through ``torch.compile`` (falls back to eager with a warning
        when compilation is not possible here).
    fuse : bool
        Run a copy of the model with its BatchNorm layers folded into the convolutions
        (:func:`napari_smear.models.fuse_for_inference`): the same outputs up to float
        rounding, 1.2-1.7x faster on CPU. The model passed in is left untouched.
    return_attention : bool
        Also return the attention maps.
    progress : bool or callable, optional
        Show a tqdm bar (default: when there is more than one batch and stderr is a
        terminal), or call ``progress(fraction, message)`` after every batch, as
        :func:`napari_smear.analyze` does (raise inside it to stop).
    prior_correction : float, optional
        How far to give a model trained on class-balanced batches back the class
        frequencies of its training data (see :func:`prior_logit_offsets`): 0 keeps the
        balanced answer, 1 restores the training frequencies in full. Default: the
        strength stored in the model file (chosen on its validation split; 0 when the
        file stores none).
    test_time_views : {1, 2, 4, 8}, optional
        Classify each crop as it is and turned over (2: mirrored left-right; 4: and
        upside down, both; 8: every quarter turn of both) and average the class
        probabilities (and the attention maps, turned back): a cell has no up or down
        on a slide, and the average is steadier than any one view. Costs as many
        forward passes. Default: the model file's own (metadata ``test_time_views``;
        1 when it stores none).
    sure_at : float or None
        With more than one view: a crop whose first view (as it is) gives one class a
        probability of at least ``sure_at`` is answered from that view alone, and only
        the other crops are turned (their answer is the mean of every view). Default
        None: every view of every crop. :data:`SURE_AT` (0.85) was chosen on the training
        splits of both built-in models, where it changed no answer of 10,924 PBC crops
        and 2 of 13,698 Chula crops; on their validation crops it classified 5.1 and 2.2
        times faster with the same accuracy. But a one-view confidence is less telling
        on another microscope's images: on BCCD fields `wbc-pbc8`'s answers at 0.97 or
        more were right 82 % of the time against 97 % with every view; and where a model
        is rarely sure (`rbc-chula12` on BCCD's red cells) nothing is gained.

    Returns
    -------
    dict
        ``probs`` (N, C) float32 (class order ``info.class_names``), ``attention``
        (N, S, S) float16 in [0, 1] when requested, ``attributes`` (dict: attribute
        name -> (N, n_values) float32 probabilities) for models with an attribute head,
        ``views`` (N,) uint8 (how many views each crop's answer averages) and
        ``batch_size`` (the one finally used).
    """
    import torch

    device = select_device(device)
    model, info = _resolve_model(model, info, device)
    if images is None or masks is None:
        raise ValueError("images (N, S, S, 3) and masks (N, 2, S, S) are required")
    images = np.asarray(images)
    masks = np.asarray(masks)
    size = int(info.input_size)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must have shape (N, {size}, {size}, 3) for this model (input size {size}), got {images.shape}"
        )
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB crops, got {images.dtype}")
    n = len(images)
    if masks.shape != (n, 2, size, size):
        raise ValueError(f"masks must have shape ({n}, 2, {size}, {size}), got {masks.shape}")
    if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
        # soft (float) masks: a pixel is in the cell from one half up (cast to integers,
        # 0.99 would have become 0 and the model seen no cell at all)
        masks = np.asarray(masks, np.float32) >= 0.5
    check_batch_size(batch_size)
    morph_features = int(getattr(model, "config", {}).get("morph_features", 0) or 0)
    if morph_features:
        if morph is None:
            from .morphology import crop_morphology

            morph = crop_morphology(images, masks, info.crop_diameters).to_numpy(np.float32)
        morph = np.nan_to_num(np.asarray(morph, np.float32))
        if morph.shape != (n, morph_features):
            raise ValueError(f"morph must have shape ({n}, {morph_features}), got {morph.shape}")
    masks = masks.astype(np.uint8, copy=False)

    # Channels-last pays on CUDA (tensor cores) and on CPU (oneDNN convolutions run
    # NHWC natively: 1.5-2x measured with bf16 here).
    channels_last = device.type in ("cuda", "cpu")
    model.eval()
    if fuse and not getattr(model, "is_fused_for_inference", False):
        model = _fused(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    runner = model
    if compile:
        try:
            runner = _compiled(model)
        except Exception as exc:  # compile support depends on the platform
            warnings.warn(f"torch.compile is not available here ({exc}); running eagerly", stacklevel=2)
    dtype = autocast_dtype(device, amp)
    views = check_test_time_views(info, test_time_views)
    sure_at = check_sure_at(sure_at)
    balance = bool(info.metadata.get("white_balance", False))
    offsets = prior_logit_offsets(info, prior_correction)
    offsets = None if offsets is None else torch.tensor(offsets, dtype=torch.float32, device=device)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device)
    std = torch.tensor(info.std, dtype=torch.float32, device=device)

    # With sure_at, turned views only for the crops the first view leaves unsure: a first
    # pass with one view over all crops, then every view over those (in batches of their own)
    first_views = 1 if views > 1 and sure_at is not None else views
    probs = np.empty((n, info.num_classes), np.float32)
    views_used = np.full(n, first_views, np.uint8)
    attention = np.empty((n, size, size), np.float16) if return_attention else None
    attributes: dict[str, np.ndarray] = {}
    report = None
    if callable(progress):
        # the unsure crops' second pass (sure_at) takes the second half of the fraction
        share = 0.5 if first_views != views else 1.0
        report = lambda done: progress(share * done / max(n, 1), f"classified {done} of {n} crops")  # noqa: E731
    elif progress is None:
        progress = n > batch_size and sys.stderr.isatty()
    elif not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True/False or a callable progress(fraction, message), got {progress!r}")
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="classifying", unit="crop", disable=report is not None or not progress)
    batch = int(batch_size)
    start = 0
    with torch.inference_mode():
        while start < n:
            stop = min(n, start + batch)
            out_of_memory = False
            try:
                x = preprocess_batch(
                    _to_device(images[start:stop], device), _to_device(masks[start:stop], device),
                    mean, std, channels_last=channels_last, balance=balance,
                )
                morph_batch = None if not morph_features else _to_device(morph[start:stop], device)
                batch_probs, batch_attention, batch_attributes = _classify_views(
                    runner, x, morph_batch, first_views, offsets, device, dtype, channels_last, return_attention,
                )
                probs[start:stop] = batch_probs.cpu().numpy()
                if return_attention:
                    attention[start:stop] = batch_attention.to(torch.float16).cpu().numpy()
                for name, values in zip(_attribute_names(model), batch_attributes):
                    values = values.cpu().numpy()
                    attributes.setdefault(name, np.empty((n, values.shape[1]), np.float32))[start:stop] = values
            except Exception as exc:
                if runner is not model and not _is_oom(exc):
                    # torch.compile fails lazily, at the first call (no compiler, unsupported op)
                    warnings.warn(f"torch.compile failed here ({type(exc).__name__}: {exc}); running eagerly", stacklevel=2)
                    runner = model
                    continue
                if not _is_oom(exc) or batch == 1:
                    raise
                out_of_memory = True
            if out_of_memory:
                # outside the except block: the exception (and the frames holding the
                # failed batch) is gone, so emptying the cache frees its memory
                x = morph_batch = None
                batch = max(1, batch // 2)
                _free_device_memory(device)
                warnings.warn(f"out of memory on {device}: retrying with batch size {batch}", stacklevel=2)
                continue
            bar.update(stop - start)
            start = stop
            if report is not None:
                report(start)
    bar.close()
    if first_views != views:
        unsure = unsure_crops(probs, sure_at)
        if len(unsure):
            again = classify_crops(
                model, info, images[unsure], masks[unsure], None if not morph_features else morph[unsure],
                device=device, batch_size=batch, amp=amp, compile=compile, fuse=fuse,
                return_attention=return_attention,
                progress=(lambda f, m: progress(0.5 + 0.5 * f, f"turning the unsure crops: {m}")) if report
                else progress and len(unsure) > batch,
                prior_correction=prior_correction, test_time_views=views, sure_at=None,
            )
            probs[unsure] = again["probs"]
            views_used[unsure] = views
            if return_attention:
                attention[unsure] = again["attention"]
            for name, values in again.get("attributes", {}).items():
                attributes[name][unsure] = values
    if report is not None and first_views != views:
        progress(1.0, f"classified {n} crops")
    result = {"probs": probs, "views": views_used, "batch_size": batch}
    if return_attention:
        result["attention"] = attention
    if attributes:
        result["attributes"] = attributes
    return result


#: Numbers of views :func:`classify_crops` can average (see ``test_time_views``).
TEST_TIME_VIEWS = (1, 2, 4, 8)
# The views, as (mirror left-right, quarter turns): the first 1, 2, 4 or 8 of them in
# this order make the groups the numbers name (4: as is, turned upside down, mirrored,
# mirrored and turned upside down = mirrored top-bottom).
_VIEW_ORDER = ((False, 0), (True, 0), (False, 2), (True, 2), (False, 1), (True, 1), (False, 3), (True, 3))


def check_batch_size(batch_size) -> int:
    """``batch_size`` (crops per classifier pass), or a ValueError unless it is a whole
    number >= 1 (2.5 or True are not)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def check_test_time_views(info, views: int | None = None) -> int:
    """The number of views :func:`classify_crops` averages: ``views``, else the model
    file's own (metadata ``test_time_views``), else 1; a ValueError for another number."""
    if views is None:
        views = (getattr(info, "metadata", None) or {}).get("test_time_views", 1)
    if isinstance(views, bool) or views not in TEST_TIME_VIEWS:
        raise ValueError(f"test_time_views must be one of {list(TEST_TIME_VIEWS)}, got {views!r}")
    return int(views)


def turned_views(images: np.ndarray, masks: np.ndarray, views: int):
    """The first ``views`` turned copies of (N, S, S, 3) crops and their (N, 2, S, S)
    masks, in the order :func:`classify_crops` averages them (a generator of
    ``(images, masks)``, each C-contiguous)."""
    for mirror, turns in _VIEW_ORDER[:views]:
        view_images, view_masks = images, masks
        if mirror:
            view_images, view_masks = view_images[:, :, ::-1], view_masks[..., ::-1]
        if turns:
            view_images = np.rot90(view_images, turns, axes=(1, 2))
            view_masks = np.rot90(view_masks, turns, axes=(2, 3))
        yield np.ascontiguousarray(view_images), np.ascontiguousarray(view_masks)


def _turned(x, mirror: bool, turns: int, *, back: bool = False):
    """``x`` (..., H, W) mirrored left-right then turned ``turns`` quarter turns (``back``:
    the inverse, for maps computed on such a view)."""
    import torch

    if back:
        x = torch.rot90(x, -turns, dims=(-2, -1)) if turns else x
        return torch.flip(x, dims=(-1,)) if mirror else x
    x = torch.flip(x, dims=(-1,)) if mirror else x
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def _classify_views(runner, x, morph, views: int, offsets, device, dtype, channels_last: bool, return_attention: bool):
    """Class probabilities, attention maps (clamped to [0, 1]; None unless asked) and
    attribute probabilities of one batch, each the mean over ``views`` views of it."""
    import torch

    probs = attention = None
    attributes: list = []
    for mirror, turns in _VIEW_ORDER[:views]:
        view = _turned(x, mirror, turns)
        if channels_last and (mirror or turns):
            view = view.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            out = runner(view, morph)
        logits = out["logits"].float()
        if offsets is not None:
            logits = logits + offsets
        p = torch.softmax(logits, dim=1)
        probs = p if probs is None else probs + p
        if return_attention:
            a = _turned(out["attention"].float().clamp(0, 1), mirror, turns, back=True)
            attention = a if attention is None else attention + a
        values = [torch.softmax(v.float(), dim=1) for v in out.get("attr_logits") or []]
        attributes = values if not attributes else [a + v for a, v in zip(attributes, values)]
    if views > 1:
        probs = probs / views
        attention = None if attention is None else attention / views
        attributes = [a / views for a in attributes]
    return probs, attention, attributes


def unsure_crops(probs: np.ndarray, sure_at: float | None) -> np.ndarray:
    """Indices of the crops whose (first-view) probabilities give no class ``sure_at``
    or more: the ones :func:`classify_crops` turns (all of them when ``sure_at`` is None)."""
    probs = np.asarray(probs)
    if sure_at is None:
        return np.arange(len(probs))
    return np.flatnonzero(~(probs.max(axis=1) >= sure_at))  # NaN rows count as unsure


def check_sure_at(sure_at) -> float | None:
    """``sure_at`` (see :func:`classify_crops`) as a float in (0, 1], or None; a
    ValueError for anything else."""
    if sure_at is None:
        return None
    if isinstance(sure_at, (bool, np.bool_)) or not isinstance(sure_at, (int, float, np.integer, np.floating)) \
            or not 0 < float(sure_at) <= 1:
        raise ValueError(f"sure_at must be a probability in (0, 1], or None (turn every crop), got {sure_at!r}")
    return float(sure_at)


def prior_correction_strength(info, strength: float | None = None) -> float:
    """The prior-correction strength :func:`classify_crops` applies: ``strength``, else
    the model file's own (0 when it stores none). Raises ValueError for a negative or
    non-finite value."""
    if strength is None:
        stored = (info.metadata or {}).get("prior_correction") or {}
        strength = stored.get("strength", 0.0) if isinstance(stored, dict) else 0.0
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise TypeError(f"prior_correction must be a number (0: balanced, 1: in full), got {strength!r}")
    strength = float(strength)
    if not np.isfinite(strength) or strength < 0:
        raise ValueError(f"prior_correction must be a finite number >= 0, got {strength!r}")
    return strength


def prior_logit_offsets(info, strength: float | None = None) -> np.ndarray | None:
    """Logit offsets that give a class-balanced model back its training class frequencies.

    A model trained on class-balanced batches (``train(balance=True)``, the default)
    answers as if every class were equally common: on data with the training set's
    mix of classes it over-calls the rare ones. Adding ``strength * log(C * prior)`` to
    its logits, with ``prior`` the class frequencies of its training split (recorded in
    the model file), moves its answers back towards that mix (Bayes' rule at
    ``strength=1``); values between 0 and 1 trade accuracy on common classes against
    recall of rare ones.

    Parameters
    ----------
    info : ModelInfo
    strength : float, optional
        0 (no change) or more; default the model file's own ``prior_correction``
        strength (0 when it stores none).

    Returns
    -------
    (C,) float32 array, or None when the strength is 0.

    Raises
    ------
    ValueError
        A negative or non-finite strength, or a non-zero one for a model file that does
        not record balanced training and its training class counts.
    """
    strength = prior_correction_strength(info, strength)
    if strength == 0:
        return None
    metadata = info.metadata or {}
    balance = (metadata.get("training") or {}).get("balance")
    counts = (metadata.get("training_data") or {}).get("train_class_counts") or {}
    if balance not in ("sampler", "loss") or any(counts.get(name, 0) <= 0 for name in info.class_names):
        raise ValueError(
            "prior_correction needs a model trained on class-balanced batches whose file records the "
            f"training class counts; this one records balance={balance!r} and counts for "
            f"{sorted(counts)} (classes {info.class_names})"
        )
    frequency = np.array([counts[name] for name in info.class_names], np.float64)
    frequency /= frequency.sum()
    return (strength * np.log(len(frequency) * frequency)).astype(np.float32)


def _attribute_names(model) -> list[str]:
    return list(getattr(model, "attribute_names", []) or [])


def expand_image_inputs(inputs: Iterable[str | os.PathLike], *, missing: str = "raise") -> list[Path]:
    """Files as given, folders searched recursively for supported image files (sorted);
    a file reached twice (named twice, or by name and in a folder) is listed once.

    Parameters
    ----------
    inputs : iterable of path
    missing : {"raise", "keep"}
        What to do with an input that does not exist: raise, or keep it in the list
        (so that a batch job reports it as a failed file instead of stopping).

    Raises
    ------
    FileNotFoundError
        An input that does not exist (``missing="raise"``).
    """
    if missing not in ("raise", "keep"):
        raise ValueError(f"missing must be 'raise' or 'keep', got {missing!r}")
    from .io import is_supported_path, search_folder

    paths: list[Path] = []
    seen: set[Path] = set()

    def take(path: Path) -> None:  # a file reached twice (by name and in a folder) once
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            paths.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in search_folder(path):
                hidden = any(part.startswith(".") for part in p.relative_to(path).parts)
                if p.is_file() and is_supported_path(p) and not hidden:
                    take(p)
        elif path.exists() or missing == "keep":
            take(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return paths


def classify_files(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    model="wbc-pbc8",
    *,
    info=None,
    device="auto",
    batch_size: int = 256,
    amp=True,
    workers: int = 1,
    scale_fallback: bool = True,
    progress: bool = True,
    prior_correction: float | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
):
    """Classify single-cell images (one cell near the centre of each, e.g. PBC crops).

    Each image is segmented and its central cell cropped with the model's own crop
    convention (``info.input_size`` pixels, ``info.crop_diameters`` red-cell diameters),
    then classified in batches.

    Parameters
    ----------
    paths : path or sequence of paths
        Image files; folders are searched recursively. A file that is missing or
        cannot be read becomes a row with its ``error``.
    model : str, path or torch.nn.Module
        A model name or file (or a module with ``info``).
    device, batch_size, amp
        See :func:`classify_crops`.
    workers : int
        Processes for segmenting and cropping.
    scale_fallback : bool
        Images with too few red cells to measure the scale, or whose measured scale is
        more than 1.4 times off the others' median (in a batch of 20 or more where at
        most 10 % are: one analyser's crops), are cropped at the median red-cell
        diameter of the others (``scale_measured`` is False for them).
    progress : bool
        Progress bars.
    prior_correction, test_time_views, sure_at : optional
        See :func:`classify_crops` (default: the model file's own prior correction and
        views; every crop in all of its views).

    Returns
    -------
    pandas.DataFrame
        One row per image, in input order: ``path``, ``prediction``, ``confidence``,
        ``p_<class>`` for each class, ``scale_measured``, ``cell_type`` (the segmented
        type of the cell classified: wbc, rbc or platelet), ``warning`` (empty, or what
        makes the answer doubtful: a cell of a type the model does not classify, an image
        without colour...) and ``error`` (empty when the image was classified; the reason
        otherwise, with NaN probabilities).
    """
    import pandas as pd

    from .datasets import crop_single_cell_images

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = expand_image_inputs(paths, missing="keep")
    device = select_device(device)
    model, info = _resolve_model(model, info, device)
    check_test_time_views(info, test_time_views)  # before any image is read
    check_sure_at(sure_at)
    columns = ["path", "prediction", "confidence", *[f"p_{c}" for c in info.class_names], "scale_measured",
               "cell_type", "warning", "error"]
    if not files:
        return pd.DataFrame(columns=columns)

    crops, errors, _ = crop_single_cell_images(
        files, range(len(files)), crop_diameters=info.crop_diameters, output_size=info.input_size,
        stain_normalization=(info.metadata or {}).get("stain_normalization"), scale_fallback=scale_fallback,
        workers=workers, progress=progress,
    )

    done = sorted(crops)
    probs = np.full((len(files), info.num_classes), np.nan, np.float32)
    if done:
        output = classify_crops(
            model, info,
            np.stack([crops[i]["image"] for i in done]),
            np.stack([crops[i]["masks"] for i in done]),
            np.stack([crops[i]["morph"] for i in done]),
            device=device, batch_size=batch_size, amp=amp, return_attention=False, progress=progress,
            prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
        )
        probs[done] = output["probs"]
    best = np.full(len(files), -1, np.int64)
    confidence = np.full(len(files), np.nan, np.float32)
    if done:
        best[done] = probs[done].argmax(axis=1)
        confidence[done] = probs[done].max(axis=1)
    table = pd.DataFrame({
        "path": [str(p) for p in files],
        "prediction": [info.class_names[b] if b >= 0 else "" for b in best],
        "confidence": confidence,
    })
    for c, name in enumerate(info.class_names):
        table[f"p_{name}"] = probs[:, c]
    table["scale_measured"] = [bool(crops[i].get("scale_measured", True)) if i in crops else False for i in range(len(files))]
    table["cell_type"] = [crops[i].get("cell_type", "") if i in crops else "" for i in range(len(files))]
    meant_for = list((info.metadata or {}).get("cell_types") or [])
    table["warning"] = [_single_cell_warning(crops.get(i), meant_for) for i in range(len(files))]
    table["error"] = [errors.get(i, "") for i in range(len(files))]
    return table[columns]


def _single_cell_warning(crop: dict | None, meant_for: list[str]) -> str:
    """What makes one single-cell answer doubtful ("" when nothing): the cell at the
    centre is of a type the model does not classify (a white-cell model handed a red
    cell, or an empty corner), or what the segmentation warned about the image."""
    if crop is None:
        return ""
    notes = []
    cell_type = crop.get("cell_type")
    if meant_for and cell_type and cell_type not in meant_for:
        notes.append(
            f"the cell at the centre was segmented as {cell_type}, and this model classifies "
            f"{', '.join(meant_for)} cells: check the image (the answer may be about another cell, or none)"
        )
    notes.extend(crop.get("warnings") or [])
    return "; ".join(notes)
