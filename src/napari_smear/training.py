"""Training and evaluation of the crop classifiers (plain PyTorch).

:func:`train` fits a model of :data:`napari_smear.models.MODEL_KINDS` on a
:class:`~napari_smear.datasets.CropSet` (or a path to one, a class folder or a CSV
manifest) with on-device augmentation (dihedral flips/rotations, small rotations, scale
jitter, stain jitter in optical-density space, colour jitter, blur), class balancing,
automatic mixed precision, AdamW with warm-up and cosine decay, early stopping on the
validation macro-F1 and a checkpoint after every epoch (safetensors + JSON, never pickle)
from which ``resume=True`` continues. The best model is written with
:func:`napari_smear.models.save_model` together with its preprocessing (input size,
crop scale, mean/std computed on the training crops) and its validation metrics.

:func:`evaluate` scores a model on a split; :func:`plot_confusion` draws the confusion
matrix.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import CropSet, _hash_split, hash_split_keys, load_data

__all__ = [
    "TrainResult",
    "train",
    "evaluate",
    "select_prior_correction",
    "classification_metrics",
    "plot_confusion",
    "augment_batch",
    "seed_everything",
    "checkpoint_dir_for",
    "partial_model_path",
    "check_model_output",
    "weak_model_caution",
]

#: Version of the checkpoint layout (state.json + last.safetensors).
CHECKPOINT_VERSION = 1
# Keys of the training set-up that must match for resume to continue a run.
_FINGERPRINT_KEYS = (
    "kind", "config", "class_names", "input_size", "crop_diameters", "n_train", "n_val", "seed",
    "batch_size", "lr", "weight_decay", "balance", "augment", "attention_supervision",
    "attribute_weight", "label_smoothing", "max_train_samples", "source", "init_from",
)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : torch.nn.Module
        The best model (highest validation macro-F1), in eval mode.
    info : ModelInfo
        Its metadata, as :func:`napari_smear.models.load_model` reads it back.
    model_path : pathlib.Path
        The written model file.
    metrics : dict
        Validation metrics of the best epoch.
    history : list of dict
        One record per epoch: ``epoch``, ``train_loss``, ``val_accuracy``,
        ``val_macro_f1``, ``lr``, ``seconds``.
    best_epoch : int
    epochs_completed : int
    stopped_early : bool
    checkpoint_dir : pathlib.Path
    seconds : float
        Wall time of this call.
    """

    model: Any
    info: Any
    model_path: Path
    metrics: dict
    history: list[dict]
    best_epoch: int
    epochs_completed: int
    stopped_early: bool
    checkpoint_dir: Path
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) random generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- augmentation


def _uniform(generator, shape, low, high):
    import torch

    return torch.rand(shape, generator=generator) * (high - low) + low


def augment_batch(
    rgb,
    masks,
    generator=None,
    *,
    geometry: bool = True,
    flips: bool = True,
    rotate90: bool = True,
    max_rotation_deg: float = 20.0,
    scale_jitter: float = 0.12,
    max_translate: float = 0.04,
    colour: bool = True,
    od_jitter: float = 0.15,
    brightness: float = 0.1,
    contrast: float = 0.15,
    saturation: float = 0.2,
    hue_deg: float = 6.0,
    blur_probability: float = 0.2,
    max_blur_sigma: float = 1.0,
    border_cut_probability: float = 0.0,
    max_border_cut: float = 0.45,
    faint_cytoplasm_probability: float = 0.0,
    min_faint_cytoplasm: float = 0.5,
    faint_cytoplasm_eligible=None,
):
    """Randomly transform a batch of crops on its device, masks moving with the pixels.

    Parameters
    ----------
    rgb : torch.Tensor
        (B, 3, S, S) float RGB in [0, 1].
    masks : torch.Tensor
        (B, 2, S, S) float 0/1 cell and nucleus masks.
    generator : torch.Generator, optional
        CPU generator the random parameters are drawn from (the transforms themselves
        run on ``rgb``'s device), for reproducible runs.
    geometry : bool
        Apply the geometric transforms: one affine resampling per crop composed of a
        flip, a multiple of 90 degrees, a small rotation, a scale change (the red-cell
        ruler is only measured to about +-10 %) and a small shift. Image and masks use
        the same sampling grid; masks are re-binarised.
    colour : bool
        Apply the colour transforms: per-channel and overall scaling of the optical
        density ``-log(I)`` (a different stain concentration or hue: e.g. BCCD against
        PBC), brightness, contrast, saturation, a hue rotation about the grey axis and,
        with ``blur_probability``, a Gaussian blur (focus, camera resolution).
    border_cut_probability : float
        Share of the crops that get the field's edge through them: a band along one
        side or two adjacent sides (a corner), up to ``max_border_cut`` of the crop
        deep, is filled with the crop's glass colour and removed from the masks.
        That is what :func:`napari_smear.crops.crop_instances` gives for a cell near
        the edge of a field, which is most white cells of a small camera field (on
        BCCD, 84 % of the white-cell crops reach past the image) and none of PBC's
        centred single-cell images. Applied after the geometry, before the colour.
    faint_cytoplasm_probability : float
        Share of the crops with a nucleus whose cytoplasm (cell mask minus nucleus
        mask) is faded towards the crop's glass colour, by a strength drawn from
        ``min_faint_cytoplasm`` to 1. On some microscopes and stains a neutrophil's
        cytoplasm is barely darker than the glass (BCCD's camera fields), so the cell
        shows as a lobed nucleus alone; where the fade is strong (0.75 or more) the
        segmentation would not find that cytoplasm either, so the cell mask shrinks to
        the nucleus and a rim of 1-4 px round it. Applied after the geometry and any
        border cut, before the colour.
    faint_cytoplasm_eligible : torch.Tensor, optional
        (B,) bool: the crops that may be faded (default: every crop with a nucleus).
        :func:`train` sets it from ``augment_options["faint_cytoplasm_classes"]``: an
        eosinophil or basophil is told by the granules in its cytoplasm, so fading it
        would teach the model a wrong answer.

    Returns
    -------
    (rgb, masks) : tuple of torch.Tensor
        Same shapes and device; rgb clipped to [0, 1], masks 0/1.
    """
    import torch
    import torch.nn.functional as F

    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be (B, 3, S, S), got {tuple(rgb.shape)}")
    if masks.ndim != 4 or masks.shape[0] != rgb.shape[0] or masks.shape[2:] != rgb.shape[2:]:
        raise ValueError(f"masks must be (B, C, S, S) like rgb {tuple(rgb.shape)}, got {tuple(masks.shape)}")
    device = rgb.device
    batch = rgb.shape[0]
    if batch == 0:
        return rgb, masks
    if geometry:
        angle = _uniform(generator, (batch,), -1.0, 1.0) * math.radians(max_rotation_deg)
        if rotate90:
            angle = angle + torch.randint(0, 4, (batch,), generator=generator).float() * (math.pi / 2)
        flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0) if flips else torch.ones(batch)
        log_range = math.log1p(scale_jitter)
        scale = torch.exp(_uniform(generator, (batch,), -log_range, log_range))
        shift = _uniform(generator, (batch, 2), -1.0, 1.0) * (2 * max_translate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(batch, 2, 3)
        # output -> input coordinates: rotate, flip x, divide by the zoom, shift
        theta[:, 0, 0] = cos * flip / scale
        theta[:, 0, 1] = -sin / scale
        theta[:, 1, 0] = sin * flip / scale
        theta[:, 1, 1] = cos / scale
        theta[:, :, 2] = shift
        theta = theta.to(device=device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(rgb.shape), align_corners=False)
        # Reflection keeps plausible glass/cell texture at the corners; masks pad with
        # zeros (nothing of the cell lies outside the crop).
        rgb = F.grid_sample(rgb.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        masks = F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        masks = (masks > 0.5).float()
    if border_cut_probability > 0 and max_border_cut > 0:
        rgb, masks = _border_cut(rgb.float(), masks.float(), generator, border_cut_probability, max_border_cut)
    if faint_cytoplasm_probability > 0:
        rgb, masks = _faint_cytoplasm(rgb.float(), masks.float(), generator, faint_cytoplasm_probability,
                                      min_faint_cytoplasm, faint_cytoplasm_eligible)
    if colour:
        rgb = rgb.float()
        channel = torch.exp(torch.randn(batch, 3, generator=generator) * od_jitter)
        overall = torch.exp(torch.randn(batch, 1, generator=generator) * od_jitter)
        od_scale = (channel * overall).to(device)[:, :, None, None]
        rgb = torch.exp(-(-torch.log(rgb.clamp_min(1.0 / 255.0))) * od_scale)
        gain = (1 + _uniform(generator, (batch, 1, 1, 1), -brightness, brightness)).to(device)
        rgb = rgb * gain
        luminance_weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        grey = (rgb * luminance_weights).sum(dim=1, keepdim=True)
        contrast_factor = (1 + _uniform(generator, (batch, 1, 1, 1), -contrast, contrast)).to(device)
        mean_grey = grey.mean(dim=(2, 3), keepdim=True)
        rgb = (rgb - mean_grey) * contrast_factor + mean_grey
        grey = (rgb * luminance_weights).sum(dim=1, keepdim=True)
        saturation_factor = (1 + _uniform(generator, (batch, 1, 1, 1), -saturation, saturation)).to(device)
        rgb = grey + (rgb - grey) * saturation_factor
        hue = _uniform(generator, (batch,), -1.0, 1.0) * math.radians(hue_deg)
        rgb = torch.einsum("bij,bjhw->bihw", _hue_rotation(hue).to(device), rgb)
        if blur_probability > 0 and max_blur_sigma > 0:
            rgb = _random_blur(rgb, generator, blur_probability, max_blur_sigma)
        rgb = rgb.clamp(0.0, 1.0)
    return rgb, masks


def _border_cut(rgb, masks, generator, probability, max_fraction):
    """Fill bands along one or two adjacent edges of some crops with the glass colour
    (see ``border_cut_probability`` in :func:`augment_batch`)."""
    import torch
    import torch.nn.functional as F

    batch, _, height, width = rgb.shape
    chosen = torch.rand(batch, generator=generator) < probability
    if not bool(chosen.any()):
        return rgb, masks
    # band depth per side (top, bottom, left, right) as a fraction of the crop
    depth = _uniform(generator, (batch, 4), 0.05, max_fraction)
    first = torch.randint(0, 4, (batch,), generator=generator)
    # the adjacent side that makes a corner with it: left/right for top/bottom and back
    second = torch.where(first < 2, 2, 0) + torch.randint(0, 2, (batch,), generator=generator)
    corner = torch.rand(batch, generator=generator) < 0.4
    active = F.one_hot(first, 4).bool() | (F.one_hot(second, 4).bool() & corner[:, None])
    depth = torch.where(active & chosen[:, None], depth, torch.zeros(()))
    ys = ((torch.arange(height) + 0.5) / height)[None, :, None]
    xs = ((torch.arange(width) + 0.5) / width)[None, None, :]
    d = depth[:, :, None, None]
    cut = (ys < d[:, 0]) | (ys > 1 - d[:, 1]) | (xs < d[:, 2]) | (xs > 1 - d[:, 3])
    cut = cut[:, None].to(rgb.device)
    # crop_instances pads with the field's bright glass
    return torch.where(cut, _glass_colour(rgb), rgb), masks * ~cut


def _glass_colour(rgb):
    """(B, 3, 1, 1) bright glass colour of each crop: its 90th percentile per channel,
    the colour :func:`napari_smear.crops.crop_instances` pads with (on every 5th pixel:
    a full sort would cost as much as the rest of the augmentation)."""
    sample = rgb.flatten(2)[:, :, ::5]
    return sample.kthvalue(max(1, int(0.9 * sample.shape[2])), dim=2).values[:, :, None, None]


def _faint_cytoplasm(rgb, masks, generator, probability, min_strength, eligible=None):
    """Fade the cytoplasm of some crops towards their glass colour (see
    ``faint_cytoplasm_probability`` in :func:`augment_batch`)."""
    import torch
    import torch.nn.functional as F

    batch = rgb.shape[0]
    has_nucleus = masks[:, 1].flatten(1).amax(dim=1) > 0
    chosen = (torch.rand(batch, generator=generator) < probability) & has_nucleus.cpu()
    if eligible is not None:
        chosen &= torch.as_tensor(eligible, dtype=torch.bool).reshape(-1).cpu()
    strength = _uniform(generator, (batch,), min(max(min_strength, 0.0), 1.0), 1.0)
    rim = torch.randint(1, 5, (batch,), generator=generator)
    if not bool(chosen.any()):
        return rgb, masks
    cell, nucleus = masks[:, :1], masks[:, 1:2]
    cytoplasm = cell * (1 - nucleus)
    weight = torch.where(chosen, strength, torch.zeros(()))[:, None, None, None].to(rgb.device)
    faded = rgb + (_glass_colour(rgb) - rgb) * (cytoplasm * weight)
    # strongly faded: the segmentation would keep only the nucleus and a thin rim
    shrink = (chosen & (strength >= 0.75)).to(rgb.device)
    if bool(shrink.any()):
        near = torch.zeros_like(nucleus)
        for radius in rim[shrink.cpu()].unique().tolist():
            grown = F.max_pool2d(nucleus, 2 * radius + 1, stride=1, padding=radius)
            pick = (shrink & (rim.to(rgb.device) == radius))[:, None, None, None]
            near = torch.where(pick, grown, near)
        cell = torch.where(shrink[:, None, None, None], cell * near, cell)
        masks = torch.cat([cell, masks[:, 1:]], dim=1)
    return faded, masks


class _MixStyle:
    """Forward hook: MixStyle on a module's output feature maps while the model trains.

    With probability ``p`` per batch, every sample's per-channel mean and standard
    deviation (over its feature map) are replaced by ``lam * own + (1 - lam) * other``,
    ``other`` a random other sample of the batch and ``lam ~ Beta(alpha, alpha)``
    (Zhou, Yang, Qiao, Xiang: Domain generalization with MixStyle, ICLR 2021). The
    statistics are detached, as in the paper. Draws come from torch's global generator,
    which :func:`train` seeds.
    """

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6):
        import torch

        self.p, self.eps = float(p), eps
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def __call__(self, module, inputs, output):
        import torch

        if not module.training or output.shape[0] < 2 or float(torch.rand(())) >= self.p:
            return output
        x = output.float()
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        std = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        batch = x.shape[0]
        lam = self.beta.sample((batch, 1, 1, 1)).to(x.device)
        other = torch.randperm(batch).to(x.device)
        mixed_mean = lam * mean + (1 - lam) * mean[other]
        mixed_std = lam * std + (1 - lam) * std[other]
        return ((x - mean) / std * mixed_std + mixed_mean).to(output.dtype)


# BatchNorm statistics of a weight average are measured on this many training crops
_BATCHNORM_RECOUNT_CROPS = 4096


class _WeightAverage:
    """The running average of a model's weights (``train(average_weights_from=...)``)."""

    def __init__(self, model):
        import copy

        self.model = copy.deepcopy(model)
        self.count = 0

    def add(self, model) -> None:
        import torch

        with torch.no_grad():
            current = model.state_dict()
            for name, value in self.model.state_dict().items():
                if value.dtype.is_floating_point and not _is_batchnorm_statistic(name):
                    value.mul_(self.count / (self.count + 1)).add_(current[name].detach(), alpha=1 / (self.count + 1))
        self.count += 1

    def ready(self, batches, dtype, device):
        """The averaged model with its BatchNorm statistics measured on ``batches``
        (inputs, morphology) in training mode; returned in eval mode."""
        import contextlib

        import torch

        norms = [m for m in self.model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain mean over the batches
        self.model.train()
        with torch.no_grad():
            for x, morph in batches:
                with (torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
                    self.model(x, morph)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        return self.model.eval()


def _is_batchnorm_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _add_mixstyle(model, probability: float) -> list:
    """Hook MixStyle after the first two stages of every residual backbone of ``model``
    (none for probability 0); returns the hook handles."""
    from .models.backbone import ResidualBackbone

    if not probability:
        return []
    hook = _MixStyle(probability)
    handles = []
    for module in model.modules():
        if isinstance(module, ResidualBackbone):
            handles += [module.stages[0].register_forward_hook(hook), module.stages[1].register_forward_hook(hook)]
    if not handles:
        raise ValueError(f"mixstyle needs a model with a residual backbone; {type(model).__name__} has none")
    return handles


def _hue_rotation(angle):
    """(B, 3, 3) rotations of RGB about the grey axis (1, 1, 1) by ``angle`` radians."""
    import torch

    u = torch.full((3,), 1 / math.sqrt(3.0))
    cross = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    outer = torch.outer(u, u)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return cos * torch.eye(3) + (1 - cos) * outer + sin * cross


def _random_blur(rgb, generator, probability, max_sigma):
    """Gaussian blur with a random sigma on a random share of the batch (one grouped conv)."""
    import torch
    import torch.nn.functional as F

    batch, channels, height, width = rgb.shape
    radius = max(1, int(math.ceil(2 * max_sigma)))
    if min(height, width) <= radius:
        return rgb
    chosen = torch.rand(batch, generator=generator) < probability
    if not bool(chosen.any()):
        return rgb
    sigma = _uniform(generator, (batch,), 0.3, max_sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float()[None].expand(batch, -1)
    kernel = torch.where(chosen[:, None], kernel, identity)  # (B, K)
    kernel = kernel.repeat_interleave(channels, dim=0).to(rgb.device)  # (B*C, K)
    flat = F.pad(rgb.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


# ----------------------------------------------------------------------------- metrics


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro-F1, per-class recall/precision/F1 and the confusion matrix.

    The macro-F1 averages over the classes present in ``y_true`` (a class the data
    does not contain has no defined recall), so it stays meaningful when a model with
    more classes is scored on a subset.
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    k = len(class_names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    hits = np.diag(confusion)
    recall = np.divide(hits, support, out=np.full(k, np.nan), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    f1[~present] = np.nan
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(np.nanmean(f1[present])) if present.any() else float("nan"),
        "per_class_recall": {c: (None if not present[i] else float(recall[i])) for i, c in enumerate(class_names)},
        "per_class_precision": {c: (None if not present[i] else float(precision[i])) for i, c in enumerate(class_names)},
        "per_class_f1": {c: (None if not present[i] else float(f1[i])) for i, c in enumerate(class_names)},
        "support": {c: int(support[i]) for i, c in enumerate(class_names)},
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
    }


def _attention_inside(attention: np.ndarray, cell_masks: np.ndarray) -> float:
    """Mean share of attention mass inside the cell mask (crops with a mask only)."""
    attention = attention.astype(np.float32)
    inside = (attention * (cell_masks > 0)).sum(axis=(1, 2))
    total = attention.sum(axis=(1, 2))
    valid = (total > 0) & (cell_masks > 0).any(axis=(1, 2))
    return float((inside[valid] / total[valid]).mean()) if valid.any() else float("nan")


def plot_confusion(confusion, class_names, path, *, normalize: bool = True, title: str | None = None) -> Path:
    """Draw a confusion matrix (rows: truth, columns: prediction) to an image file.

    Parameters
    ----------
    confusion : (C, C) array-like of counts
    class_names : sequence of str
    path : str or path-like
        Output file (``.png``, ``.pdf``, ``.svg``).
    normalize : bool
        Colour by row share (recall) and print counts and shares; else counts.
    title : str, optional

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} class names, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    values = shares if normalize else counts
    side = max(4.0, 0.75 * k + 2.0)
    figure = Figure(figsize=(side, side * 0.9))
    FigureCanvasAgg(figure)  # attaches an Agg canvas: no pyplot, no GUI backend
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, counts.max()))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class" if normalize else "count")
    axes.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    axes.set_yticks(range(k), labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if counts[i, j] == 0:
                continue
            text = f"{int(counts[i, j])}\n{shares[i, j]:.0%}" if normalize else f"{int(counts[i, j])}"
            axes.text(j, i, text, ha="center", va="center", fontsize=7,
                      color="white" if values[i, j] > (0.5 if normalize else counts.max() / 2) else "black")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model,
    data,
    split: str | None = "val",
    *,
    info=None,
    device="auto",
    batch_size: int = 256,
    amp=True,
    workers: int = 1,
    progress: bool = False,
    prior_correction: float | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
) -> dict:
    """Score a model on one split of a crop set.

    Parameters
    ----------
    model : str, path or torch.nn.Module
        A model name or file, or a module together with ``info``.
    data : CropSet or path
        A crop set, its ``.npz`` file, a class folder or a CSV manifest (folders and
        manifests are cropped with the model's own convention: ``info.input_size``
        pixels at ``info.crop_diameters`` red-cell diameters).
    split : {"train", "val", "test"} or None
        The crops to score (None: all).
    info : ModelInfo, optional
        Required when ``model`` is a module.
    device, batch_size, amp
        See :func:`napari_smear.predict.classify_crops`.
    workers, progress
        Cropping processes and progress bars for folder/manifest data.
    prior_correction, test_time_views, sure_at : optional
        See :func:`napari_smear.predict.classify_crops` (default: the model file's own
        prior correction and views; every crop in all of its views).

    Returns
    -------
    dict
        ``split``, ``n``, ``accuracy``, ``macro_f1`` (over the classes present),
        ``per_class_recall`` / ``per_class_precision`` / ``per_class_f1`` / ``support``
        (dicts by class name; None for classes absent from the data), ``confusion``
        ((C, C) nested list, rows truth, columns prediction, in ``class_names`` order)
        and ``attention_mass_inside`` (mean share of the attention map inside the cell
        mask).
    """
    from .predict import check_sure_at, classify_crops

    check_sure_at(sure_at)  # before anything is cropped
    model, info, torch_device, subset, y_true = _labelled_split(model, info, data, split, device, workers, progress)
    output = classify_crops(
        model, info, subset.images, subset.masks, subset.morph,
        device=torch_device, batch_size=batch_size, amp=amp, return_attention=True, progress=progress,
        prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
    )
    y_pred = output["probs"].argmax(axis=1)
    metrics = classification_metrics(y_true, y_pred, info.class_names)
    metrics["split"] = split or "all"
    metrics["attention_mass_inside"] = _attention_inside(output["attention"], subset.masks[:, 0])
    return metrics


def _labelled_split(model, info, data, split, device, workers=1, progress=False):
    """The model on its device, and the crops of one split cut with the model's own
    convention, with their labels as indices into the model's classes."""
    from .predict import _resolve_model, select_device

    torch_device = select_device(device)
    model, info = _resolve_model(model, info, torch_device)
    wanted = (info.metadata or {}).get("stain_normalization") or ""
    crop_set = load_data(
        data, crop_diameters=info.crop_diameters, output_size=info.input_size, workers=workers, progress=progress,
        stain_normalization=wanted or None, min_classes=1,  # a model may be scored on one class's cells
        only_split=split,  # a folder's validation images only: not the whole folder cropped to score a seventh
    )
    if not math.isclose(crop_set.crop_diameters, info.crop_diameters, rel_tol=1e-3):
        warnings.warn(
            f"the crops were made at {crop_set.crop_diameters:g} red-cell diameters but the model expects "
            f"{info.crop_diameters:g}: cells appear at another size than in training",
            stacklevel=3,
        )
    if (crop_set.stain_normalization or "") != wanted:
        warnings.warn(
            f"the crops were made with stain normalisation {crop_set.stain_normalization or 'none'!r} but the "
            f"model was trained with {wanted or 'none'!r}: their colours differ from what it learned "
            "(pack the crops again with the model's setting)",
            stacklevel=3,
        )
    unknown = sorted(set(crop_set.class_names) - set(info.class_names))
    index = crop_set.indices(split)
    if unknown:
        present = {crop_set.class_names[i] for i in np.unique(crop_set.labels[index])}
        unknown = sorted(set(unknown) & present)
        if unknown:
            raise ValueError(
                f"the data has classes the model does not know: {unknown}; model classes: {info.class_names}"
            )
    if not len(index):
        splits = sorted(set(crop_set.split.tolist()))
        raise ValueError(f"the data has no crops in split {split!r} (splits present: {splits})")
    subset = crop_set.subset(index)
    to_model = np.array([info.class_names.index(c) if c in info.class_names else -1 for c in subset.class_names])
    return model, info, torch_device, subset, to_model[subset.labels]


PRIOR_CORRECTION_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def select_prior_correction(
    model,
    data,
    split: str = "val",
    *,
    info=None,
    strengths: Sequence[float] = PRIOR_CORRECTION_STRENGTHS,
    device="auto",
    batch_size: int = 256,
) -> dict:
    """Choose the prior-correction strength of a class-balanced model on one split.

    The model runs once; each strength's answers are its logits plus
    ``strength * log(C * prior)`` (:func:`napari_smear.predict.prior_logit_offsets`),
    averaged over the turned views the model file asks for (``test_time_views``) as
    :func:`napari_smear.predict.classify_crops` averages them.
    The strength with the highest macro-F1 wins (the smaller on a tie), so rare
    classes keep their weight: a correction that only buys accuracy on the common
    classes loses.

    Parameters
    ----------
    model, data, info, device, batch_size
        As for :func:`evaluate`; ``data`` must hold labelled crops of ``split``.
    split : str
        The crops to choose on: the validation split, never the test split.
    strengths : sequence of float
        Candidates, each >= 0.

    Returns
    -------
    dict
        ``strength`` (the choice), ``split``, ``n``, ``selected_by`` (``"macro_f1"``) and
        ``scores``: one ``{"strength", "accuracy", "macro_f1"}`` per candidate.
        Store it as the model file's ``prior_correction`` metadata to make it the
        model's default.
    """
    from .predict import _resolve_model, prior_logit_offsets, select_device

    candidates = sorted({float(s) for s in strengths})
    if not candidates or candidates[0] < 0 or not all(math.isfinite(s) for s in candidates):
        raise ValueError(f"strengths must be finite numbers >= 0, got {list(strengths)}")
    model, info = _resolve_model(model, info, select_device(device))
    unit = prior_logit_offsets(info, 1.0)  # raises for a model without balanced training
    model, info, torch_device, subset, y_true = _labelled_split(model, info, data, split, device)
    view_probs = _uncorrected_view_probs(model, info, subset, torch_device, batch_size)
    return {**_choose_strength(view_probs, y_true, unit, info.class_names, candidates), "split": split}


def _uncorrected_view_probs(model, info, crops, device, batch_size: int, amp=True) -> list[np.ndarray]:
    """The model's probabilities on ``crops`` (a CropSet) without prior correction, one
    (N, C) array per turned view the model file asks for: the correction is added to
    each view's logits before the views are averaged, as ``classify_crops`` does."""
    from .predict import check_test_time_views, classify_crops, turned_views

    return [
        classify_crops(
            model, info, images, masks, crops.morph, device=device, batch_size=batch_size, amp=amp,
            return_attention=False, progress=False, prior_correction=0.0, test_time_views=1,
        )["probs"]
        for images, masks in turned_views(crops.images, crops.masks, check_test_time_views(info))
    ]


def _choose_strength(view_probs, y_true, unit, class_names, candidates) -> dict:
    """The prior-correction rule on answers already computed (one (N, C) array per
    turned view): the candidate strength with the highest macro-F1, the smaller on a tie."""
    from scipy.special import softmax

    log_probs = [np.log(np.clip(p.astype(np.float64), 1e-12, None)) for p in view_probs]
    scores = []
    for strength in candidates:
        answers = np.mean([softmax(lp + strength * unit, axis=1) for lp in log_probs], axis=0)
        metrics = classification_metrics(y_true, answers.argmax(axis=1), class_names)
        scores.append({"strength": strength, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
    best = max(scores, key=lambda row: (row["macro_f1"], -row["strength"]))
    return {"strength": best["strength"], "n": int(len(y_true)), "selected_by": "macro_f1", "scores": scores}


# ----------------------------------------------------------------------------- checkpoints


def partial_model_path(output: str | os.PathLike) -> Path:
    """Where :func:`train` keeps the best model so far while it trains ``output``:
    ``model.safetensors`` -> ``.model.training.safetensors`` beside it, moved over
    ``output`` only when training ends (an interrupted or failed run leaves a model
    already at ``output`` as it was, and ``resume`` continues from this file)."""
    output = Path(output)
    return output.with_name(f".{output.name.removesuffix('.safetensors')}.training.safetensors")


def checkpoint_dir_for(output: str | os.PathLike) -> Path:
    """The checkpoint folder of a model file: ``model.safetensors`` -> ``model.ckpt/``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".ckpt")


def _atomic_replace(write: Callable[[Path], None], target: Path) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _save_checkpoint(folder: Path, model, optimizer, scaler, state: dict) -> None:
    """Weights and optimizer tensors to ``last.safetensors``, everything else to ``state.json``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for param_id, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    state = {
        **state,
        "checkpoint_version": CHECKPOINT_VERSION,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    epoch = str(state["epoch"])
    _atomic_replace(lambda p: save_file(tensors, str(p), metadata={"epoch": epoch}), folder / "last.safetensors")
    _atomic_replace(lambda p: p.write_text(json.dumps(state, indent=1, allow_nan=True)), folder / "state.json")


def _load_checkpoint(folder: Path) -> tuple[dict, dict] | None:
    """(state, tensors) of a checkpoint, or None when there is none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_path, weights_path = folder / "state.json", folder / "last.safetensors"
    if not state_path.is_file() or not weights_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
        with safe_open(str(weights_path), framework="pt") as handle:
            weights_epoch = (handle.metadata() or {}).get("epoch")
        tensors = load_file(str(weights_path))
    except Exception as exc:
        raise ValueError(f"the checkpoint in {folder} is unreadable ({exc}); delete it to start afresh") from exc
    if state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"the checkpoint in {folder} has an unsupported version {state.get('checkpoint_version')!r}")
    if str(state.get("epoch")) != weights_epoch:
        raise ValueError(
            f"the checkpoint in {folder} is inconsistent (state of epoch {state.get('epoch')}, weights of epoch "
            f"{weights_epoch}): it was interrupted while being written; delete it to start afresh"
        )
    return state, tensors


def _restore_optimizer(optimizer, state: dict, tensors: dict) -> None:
    entries: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            entries.setdefault(int(param_id), {})[key] = value
    for param_id, scalars in state.get("optimizer_scalars", {}).items():
        entries.setdefault(int(param_id), {}).update(scalars)
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer_param_groups"]})


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_fraction: float = 0.01) -> float:
    """Linear warm-up then cosine decay to ``final_fraction * base_lr``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _normalisation(images: np.ndarray, seed: int, max_crops: int = 4096, masks: np.ndarray | None = None
                   ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB in [0, 1] over (a sample of) the training crops.

    With ``masks``, of the white-balanced crops (what a ``white_balance`` model sees).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), size=min(max_crops, len(images)), replace=False) if len(images) > max_crops else slice(None)
    if masks is not None:
        import torch

        from .predict import white_balance

        rgb = torch.from_numpy(np.ascontiguousarray(images[pick])).permute(0, 3, 1, 2).float() / 255.0
        balanced = white_balance(rgb, torch.from_numpy(np.ascontiguousarray(masks[pick])).float())
        sample = balanced.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    else:
        sample = images[pick].reshape(-1, 3).astype(np.float64) / 255.0
    mean = sample.mean(axis=0)
    std = np.maximum(sample.std(axis=0), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]


def _attribute_targets(crop_set: CropSet, model) -> np.ndarray | None:
    """(N, A_model) int64 targets for the model's attribute head, matched by name (-1 missing)."""
    names = list(getattr(model, "attribute_names", []) or [])
    sizes = list(getattr(model, "attribute_sizes", []) or [])
    if not names:
        return None
    targets = np.full((len(crop_set), len(names)), -1, np.int64)
    for a, (name, size) in enumerate(zip(names, sizes)):
        if name not in crop_set.attribute_names:
            continue
        column = crop_set.attribute_names.index(name)
        values = crop_set.attribute_values[column]
        if len(values) != size:
            raise ValueError(
                f"attribute {name!r} has {len(values)} values in the data ({values}) but the model's head has {size}"
            )
        targets[:, a] = crop_set.attributes[:, column]
    return targets if (targets >= 0).any() else None


def _training_autocast(device, amp, amp_dtype):
    """(autocast dtype or None, whether to use a GradScaler)."""
    import torch

    if amp is None:
        native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        amp = device.type == "cuda" or (device.type == "cpu" and bool(native_bf16()))
    if not amp:
        return None, False
    if amp_dtype is not None:
        dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
    elif device.type == "cuda":
        dtype = torch.float16
    else:  # CPU and MPS: bf16 has float32's range, so no gradient scaler is needed
        dtype = torch.bfloat16
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}")
    if device.type == "mps":
        available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
        if available is None or not available("mps"):
            raise ValueError("mixed precision on Apple MPS needs a newer torch (2.5 or later); train with "
                             "amp=False (--amp off), or update torch")
    # fp16's small range underflows small gradients on any device: scaled, as on CUDA
    return dtype, dtype == torch.float16


def _gradient_scaler(device, enabled: bool):
    """A gradient scaler for ``device`` (disabled unless fp16 autocast is on)."""
    import torch

    if not enabled:
        return torch.amp.GradScaler("cuda", enabled=False)
    try:
        return torch.amp.GradScaler(device.type, enabled=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # older torch: CUDA only
        raise ValueError(f"fp16 training on {device.type} needs a gradient scaler this torch ({torch.__version__}) "
                         "lacks there; train with amp_dtype='bfloat16' instead") from exc


def train(
    data,
    *,
    model_kind: str = "shape_aware",
    output: str | os.PathLike = "model.safetensors",
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.05,
    attention_supervision: float = 0.0,
    attribute_weight: float = 0.5,
    balance: bool | str = True,
    augment: bool = True,
    augment_options: dict | None = None,
    white_balance: bool = False,
    mixstyle: float = 0.0,
    average_weights_from: int | None = None,
    device="auto",
    amp: bool | None = None,
    amp_dtype: str | None = None,
    seed: int = 0,
    patience: int | None = 8,
    resume: bool = False,
    max_train_samples: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    config: dict | None = None,
    cache: str | os.PathLike | None = None,
    stain_normalization: str | None = None,
    crop_diameters: float = 4.0,
    output_size: int = 96,
    workers: int = 1,
    on_epoch: Callable[[dict], None] | None = None,
    on_crop: Callable[[int, int], None] | None = None,
    init_from: str | os.PathLike | None = None,
    choose_prior_correction: bool = True,
    cell_types: Sequence[str] | None = None,
) -> TrainResult:
    """Train a crop classifier and write the best model file.

    Parameters
    ----------
    data : CropSet or path
        A crop set, its ``.npz`` file, a folder of class sub-folders or a CSV manifest
        (see :func:`napari_smear.datasets.build_crop_set`). The ``train`` split is fitted
        and the ``val`` split scored after every epoch; without a ``val`` split, 15 % of
        each class of ``train`` is held out (chosen by a hash of the file paths).
    model_kind : str
        One of :data:`napari_smear.models.MODEL_KINDS`.
    output : path
        The model file to write (the best epoch's weights and metadata). While training,
        the best model so far is kept beside it as ``.<name>.training.safetensors``
        (:func:`partial_model_path`) and moved over ``output`` when training ends, so a
        model already at ``output`` (even the ``init_from`` one) survives a run that is
        interrupted or fails. Its checkpoint folder is ``<name>.ckpt/`` beside it (see
        :func:`checkpoint_dir_for`).
    epochs : int
        Maximum number of epochs (one epoch = as many crops as the train split holds).
    batch_size : int
    lr, weight_decay : float
        AdamW peak learning rate and weight decay.
    warmup_epochs : float
        Linear learning-rate warm-up, then cosine decay to 1 % of ``lr``.
    label_smoothing : float
        Cross-entropy label smoothing.
    attention_supervision : float
        Weight of :func:`~napari_smear.models.attention_supervision_loss` (attention
        maps pulled onto the cell mask); 0 turns it off.
    attribute_weight : float
        Weight of the attribute loss for models with an attribute head (DAFFNet), on
        the crops that carry attribute labels.
    balance : bool or {"sampler", "loss"}
        Counter class imbalance: ``True``/``"sampler"`` draws training crops with
        probability inversely proportional to their class size; ``"loss"`` weights the
        cross-entropy instead; ``False`` does neither.
    augment : bool
        On-device augmentation (:func:`augment_batch`); ``augment_options`` overrides
        its keyword arguments.
    white_balance : bool
        Divide every crop by its own glass colour before augmentation
        (:func:`napari_smear.predict.white_balance`); recorded in the model file so that
        inference does the same. Makes a model far less sensitive to the microscope's
        illumination and background tint.
    mixstyle : float
        Probability, per training batch, of MixStyle (Zhou et al., ICLR 2021) after the
        first two stages of every residual backbone: each crop's per-channel feature
        mean and standard deviation are replaced by a random mix of its own and another
        crop's. Those statistics carry the "style" (stain, illumination, camera) more
        than the content, so mixing them is a cheap way of training for other
        microscopes. Training only: the model and its file are unchanged, and inference
        is not affected. 0 (default) leaves training as it was.
    average_weights_from : int, optional
        Stochastic weight averaging (Izmailov et al., UAI 2018; for other domains,
        SWAD, Cha et al., NeurIPS 2021): from this epoch on, the model scored and
        written is the average of the weights at the end of every epoch since, its
        BatchNorm statistics measured again on the (augmented) training crops. An
        average of points along the trajectory lies in a flatter minimum, which
        transfers better to data unlike the training data. The best epoch is still
        chosen on the validation split, among the averages. None (default): no
        averaging. A run with averaging cannot be resumed from its checkpoint.
    device : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then CPU (see
        :func:`napari_smear.predict.select_device`).
    amp : bool, optional
        Mixed precision. Default: on for CUDA (fp16 with a gradient scaler) and on CPUs
        with native bf16 (bf16 autocast, about twice as fast there); off elsewhere.
    amp_dtype : {"float16", "bfloat16"}, optional
        Override the autocast dtype (float16 trains with a gradient scaler on any device).
    seed : int
        Seeds Python, numpy and torch; each epoch's sampling and augmentation is drawn
        from a generator seeded by ``(seed, epoch)``, so a resumed run draws the same
        batches as an uninterrupted one.
    patience : int, optional
        Stop after this many epochs without a better validation macro-F1 (None: never).
    resume : bool
        Continue from the checkpoint of ``output`` when there is one (the data, model
        and optimisation settings must match); otherwise start afresh.
    max_train_samples : int, optional
        Train on a seeded random subset of at most this many training crops.
    num_threads : int, optional
        ``torch.set_num_threads`` during training (restored afterwards).
    progress : bool
        Progress bars and a line per epoch on stderr.
    config : dict, optional
        Architecture options passed to :func:`~napari_smear.models.build_model`
        (e.g. ``{"widths": [16, 32, 64, 128]}``).
    cache : path, optional
        For folder/CSV data: where to store (or find) the cropped ``.npz`` crop set.
    stain_normalization : str, optional
        Recolour a folder/CSV source into the reference stain before cropping
        (:mod:`napari_smear.normalize`, ``"anchored-v1"``); the model records it and
        applies it at inference. Fine-tuning (``init_from``) takes the starting model's.
        A crop set (``.npz``) must have been made with the same setting.
    crop_diameters, output_size, workers
        How folder/CSV data are cropped.
    on_epoch : callable, optional
        Called with each epoch's record (a dict); raising inside it stops training
        (the checkpoint of the last finished epoch is kept).
    on_crop : callable, optional
        When ``data`` is a folder or CSV: called as ``on_crop(done, total)`` after each
        image is cropped (instead of the cropping's progress bar); raising inside it
        stops the cropping (a widget's cancel).
    init_from : str or path, optional
        Fine-tune: start from the weights of this model file (or built-in model name)
        instead of random ones. Its kind, architecture config, input size, crop scale
        and RGB normalisation are used (``model_kind`` and ``config`` must agree with it
        or be left at their defaults; folder/CSV data are cropped at its scale). Every
        weight tensor whose name and shape match is copied, so a different set of
        classes gets a new classifier head on the pretrained features. The new file
        keeps the turned views the start model answers with (``test_time_views``).
    cell_types : sequence of str, optional
        Which segmented cells the model is for (``wbc``, ``rbc``, ``platelet``),
        stored in the file: :func:`napari_smear.analyze` gives it only those. Default:
        the starting model's when fine-tuning, else none stored (every cell type).
    choose_prior_correction : bool
        For a class-balanced model (``balance``), choose its prior-correction strength
        on the validation crops once training ends, by the rule of
        :func:`select_prior_correction`, and store it in the model file, so that by
        default it answers with the class mix of its training data rather than as if
        every class were equally common. Skipped (nothing stored: the model answers
        balanced) when the validation split holds fewer than
        :data:`MIN_VAL_CROPS_FOR_PRIOR_CORRECTION` crops, too few to choose on.

    Returns
    -------
    TrainResult
    """
    import torch
    import torch.nn.functional as F

    from .models import MODEL_KINDS, ModelInfo, attention_supervision_loss, attribute_loss, build_model, load_model, save_model
    from .predict import classify_crops, select_device
    from .predict import white_balance as balance_crops

    started = time.perf_counter()
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {model_kind!r}; expected one of {list(MODEL_KINDS)}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not 0.0 <= float(mixstyle) <= 1.0:
        raise ValueError(f"mixstyle is a probability (0 to 1), got {mixstyle!r}")
    if average_weights_from is not None:
        if isinstance(average_weights_from, bool) or not isinstance(average_weights_from, int) or not (
                1 <= average_weights_from <= epochs):
            raise ValueError(f"average_weights_from must be an epoch from 1 to epochs ({epochs}), "
                             f"got {average_weights_from!r}")
    if not lr > 0 or weight_decay < 0 or attention_supervision < 0 or attribute_weight < 0:
        raise ValueError("lr must be > 0 and weight_decay, attention_supervision, attribute_weight >= 0")
    if balance not in (True, False, "sampler", "loss"):
        raise ValueError(f"balance must be True, False, 'sampler' or 'loss', got {balance!r}")
    balance_mode = "sampler" if balance is True else (balance or "none")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience!r}")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {output}")
    check_model_output(output)
    best_path = partial_model_path(output)
    if cache is not None:
        from .io import check_writable_location

        check_writable_location(cache, "cache")

    init = _fine_tuning_start(init_from, model_kind, config) if init_from is not None else None
    if cell_types is None and init is not None:
        cell_types = init["cell_types"]
    if cell_types is not None:
        cell_types = _check_cell_types(cell_types)
    if init is None and model_kind == "ensemble":
        raise ValueError(
            "an 'ensemble' is made of trained models (napari_smear.models.combine_models), not trained "
            "from scratch; train its members, or fine-tune an ensemble file with init_from"
        )
    if init is not None:
        model_kind, config = init["kind"], init["config"]
        crop_diameters, output_size = init["crop_diameters"], init["input_size"]
    # what the crops must have been made with: as asked, else as the starting model was
    # trained, else (a ready crop set) whatever the crops were made with
    required = stain_normalization or (init["stain_normalization"] if init is not None else None)
    crop_set = load_data(
        data, crop_diameters=crop_diameters, output_size=output_size, workers=workers,
        progress=on_crop if on_crop is not None else progress, cache=cache, stain_normalization=required,
    )
    if (stain_normalization or init is not None) and (crop_set.stain_normalization or None) != required:
        raise ValueError(
            f"the crops were made with stain normalisation {crop_set.stain_normalization or 'none'!r} but "
            f"{required or 'none'!r} is asked for"
            + (f" ({init['path'].name} was trained with it)" if init is not None else "")
            + "; crop the data again with the same setting (napari-smear pack-crops --stain-normalization)"
        )
    if init is not None and (
        crop_set.output_size != init["input_size"]
        or not math.isclose(crop_set.crop_diameters, init["crop_diameters"], rel_tol=1e-3)
    ):
        raise ValueError(
            f"the crops are {crop_set.output_size} px at {crop_set.crop_diameters:g} red-cell diameters but "
            f"{init['path'].name} expects {init['input_size']} px at {init['crop_diameters']:g}; crop the data at "
            "the model's scale"
        )
    if len(crop_set.class_names) < 2:  # a crop set of one class scores a model (evaluate); it cannot teach one
        raise ValueError(f"the data has 1 class ({crop_set.class_names[0]!r}); training needs at least 2")
    size = crop_set.output_size
    if size % 16:
        raise ValueError(f"the crops are {size} px; the models need a multiple of 16 (rebuild with output_size=96)")
    notes: list[str] = []
    train_index = crop_set.indices("train")
    val_index = crop_set.indices("val")
    if not len(train_index):
        raise ValueError(f"the data has no 'train' split ({crop_set.describe()})")
    if not len(val_index):
        keys = np.asarray(hash_split_keys(crop_set), dtype=str)  # the hold-out `evaluate` takes from the same folder
        held = _hash_split(keys[train_index].tolist(), crop_set.labels[train_index].tolist(), 0.15) == "val"
        val_index, train_index = train_index[held], train_index[~held]
        notes.append("no 'val' split in the data: 15% of each class of 'train' held out for validation")
    if not len(val_index):
        raise ValueError(
            f"no validation crops ({crop_set.describe()}): every class needs at least two images that can be "
            "cropped (one is held out to choose the best epoch), or give a 'val' split"
        )
    unscored = [c for c, n in zip(crop_set.class_names, np.bincount(crop_set.labels[val_index],
                                                                       minlength=len(crop_set.class_names))) if n == 0]
    if unscored:
        note = (f"class(es) {unscored} have no validation crops (their held-out images could not be cropped, or "
                "there were too few): the best epoch is chosen without them")
        notes.append(note)
        warnings.warn(note, stacklevel=2)
    sampled = max_train_samples is not None and len(train_index) > max_train_samples
    if sampled:
        rng = np.random.default_rng(seed)
        train_index = np.sort(rng.choice(train_index, size=int(max_train_samples), replace=False))
    class_names = list(crop_set.class_names)
    counts = np.bincount(crop_set.labels[train_index], minlength=len(class_names))
    if (counts == 0).any():
        empty = [c for c, n in zip(class_names, counts) if n == 0]
        cut = (f" among the {len(train_index)} kept by max_train_samples (--max-train-samples): keep more"
               if sampled else "")
        raise ValueError(f"class(es) {empty} have no training crops{cut}")
    if cell_types is not None and crop_set.cell_types is not None:
        # a model given cell types its crops never showed it (fine-tuning wbc-pbc8, which
        # classifies platelets, on white cells alone) would give each such cell one of
        # its classes: every platelet called a monocyte or an eosinophil
        from .segment.types import CELL_TYPES

        # a class named after a cell type counts as that type's cells: PBC's platelet images
        # centre on a clump the segmentation types a white cell, and a model that learned
        # the platelet class must still be given the platelets
        seen = set(crop_set.cell_types[train_index].tolist()) | {c for c in class_names if c in CELL_TYPES}
        unseen = [t for t in cell_types if t not in seen]
        if unseen and len(unseen) < len(cell_types):
            cell_types = [t for t in cell_types if t in seen]
            note = (f"the training crops hold no {', '.join(unseen)} cells: the model classifies "
                    f"{', '.join(cell_types)} only (it would give every {', '.join(unseen)} cell one of its classes)")
            notes.append(note)
            warnings.warn(note, stacklevel=2)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        torch_device = select_device(device)
        seed_everything(seed)
        model_config = dict(config or {})
        if model_kind == "global_attention":
            model_config.setdefault("input_size", size)
        if model_kind == "daffnet" and "attributes" not in model_config and crop_set.has_attributes():
            model_config["attributes"] = [[n, len(v)] for n, v in zip(crop_set.attribute_names, crop_set.attribute_values)]
        model = build_model(model_kind, len(class_names), **model_config)
        if init is not None:
            notes.append(_load_pretrained(model, init, class_names))
        morph_features = int(model.config.get("morph_features", 0) or 0)
        if morph_features and morph_features != crop_set.morph.shape[1]:
            raise ValueError(
                f"morph_features={morph_features} but the crop set has {crop_set.morph.shape[1]} morphology "
                f"features ({crop_set.morph_names})"
            )
        if attention_supervision > 0 and not getattr(model, "has_attention_logits", False):
            raise ValueError(f"model kind {model_kind!r} has no supervisable attention map; use attention_supervision=0")
        attr_targets = _attribute_targets(crop_set, model) if attribute_weight > 0 else None
        mean, std = _normalisation(crop_set.images[train_index], seed,
                                   masks=crop_set.masks[train_index] if white_balance else None)
        if init is not None:  # the pretrained features expect their own normalisation
            mean, std = list(init["mean"]), list(init["std"])

        fingerprint = {
            "kind": model_kind, "config": model.config, "class_names": class_names, "input_size": size,
            "crop_diameters": crop_set.crop_diameters, "n_train": int(len(train_index)), "n_val": int(len(val_index)),
            "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "balance": balance_mode,
            "augment": bool(augment), "attention_supervision": attention_supervision,
            "attribute_weight": attribute_weight, "label_smoothing": label_smoothing,
            "max_train_samples": max_train_samples, "source": crop_set.source,
            "init_from": str(init["path"]) if init is not None else None,
            **({"white_balance": True} if white_balance else {}),
            **({"mixstyle": float(mixstyle)} if mixstyle else {}),
            **({"average_weights_from": average_weights_from} if average_weights_from is not None else {}),
        }
        fingerprint = json.loads(json.dumps(fingerprint))

        # the average lives in a copy made before any MixStyle hook (which would mix
        # styles while its BatchNorm statistics are measured)
        averaging = _WeightAverage(model) if average_weights_from is not None else None
        mixstyle_hooks = _add_mixstyle(model, mixstyle)
        channels_last = torch_device.type == "cuda"
        model.to(torch_device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if averaging is not None:
            averaging.model.to(torch_device)
            if channels_last:
                averaging.model.to(memory_format=torch.channels_last)
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            # no weight decay on norms, biases and the learned attention map
            (no_decay if parameter.ndim <= 1 or name.endswith("attention_map_logits") else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        dtype, use_scaler = _training_autocast(torch_device, amp, amp_dtype)
        scaler = _gradient_scaler(torch_device, use_scaler)

        ckpt_dir = checkpoint_dir_for(output)
        state = {"epoch": 0, "global_step": 0, "best_f1": -1.0, "best_epoch": 0, "since_best": 0,
                 "history": [], "stopped_early": False}
        if resume:
            loaded = _load_checkpoint(ckpt_dir)
            if loaded is None:
                notes.append(f"resume: no checkpoint in {ckpt_dir}; starting afresh")
            elif averaging is not None:
                raise ValueError(f"cannot resume from {ckpt_dir}: a run with average_weights_from cannot be resumed "
                                 "(the running average is not checkpointed); start it afresh (resume=False)")
            else:
                saved, tensors = loaded
                differing = [k for k in _FINGERPRINT_KEYS if saved.get("fingerprint", {}).get(k) != fingerprint.get(k)]
                if differing:
                    raise ValueError(
                        f"cannot resume from {ckpt_dir}: the training set-up differs in {differing}; "
                        "use the same data and settings, or resume=False to start afresh"
                    )
                if int(saved["epoch"]) >= epochs:  # said: nothing is trained, the best model is written again
                    note = (f"the checkpoint in {ckpt_dir} has trained {saved['epoch']} epochs already, as many as "
                            f"epochs={epochs} asks or more: nothing was trained, and the best model was written again "
                            f"(with the settings given); give more epochs (--epochs {int(saved['epoch']) + 10}, say) "
                            "to train on")
                    notes.append(note)
                    warnings.warn(note, stacklevel=2)
                model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
                _restore_optimizer(optimizer, saved, tensors)
                if saved.get("scaler") and scaler.is_enabled():
                    scaler.load_state_dict(saved["scaler"])
                state = {k: saved[k] for k in state}
                mean, std = saved["mean"], saved["std"]
                notes.append(f"resumed from epoch {state['epoch']} of {ckpt_dir}")
                if state["best_epoch"] and not best_path.is_file():
                    if not output.is_file():
                        raise ValueError(f"the checkpoint in {ckpt_dir} refers to a best model {best_path} that no "
                                         "longer exists")
                    shutil.copyfile(output, best_path)  # a checkpoint of a version that trained into output

        # Training crops live on the device as uint8 when they fit (no per-batch copies);
        # otherwise they are copied per batch from pinned host memory.
        train_images = crop_set.images[train_index]
        train_masks = crop_set.masks[train_index]
        train_labels = crop_set.labels[train_index]
        resident = _fits_on_device(torch_device, train_images.nbytes + train_masks.nbytes)
        host_tensors = [torch.from_numpy(train_images), torch.from_numpy(train_masks), torch.from_numpy(train_labels)]
        if morph_features:
            host_tensors.append(torch.from_numpy(np.nan_to_num(crop_set.morph[train_index]).astype(np.float32)))
        if attr_targets is not None:
            host_tensors.append(torch.from_numpy(attr_targets[train_index]))
        if resident:
            device_tensors = [t.to(torch_device) for t in host_tensors]
        pin = torch_device.type == "cuda" and not resident
        mean_t = torch.tensor(mean, device=torch_device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=torch_device).view(1, 3, 1, 1)
        class_weight = None
        if balance_mode == "loss":
            class_weight = torch.tensor(len(train_index) / (len(class_names) * counts), dtype=torch.float32, device=torch_device)
        sample_weight = torch.tensor(1.0 / counts[train_labels], dtype=torch.float64)

        n_train = len(train_index)
        steps_per_epoch = n_train // batch_size + (1 if n_train % batch_size >= 2 else 0)
        total_steps = steps_per_epoch * epochs
        warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total_steps // 3)
        val_info = ModelInfo(
            kind=model_kind, config=model.config, class_names=class_names, input_size=size,
            crop_diameters=crop_set.crop_diameters, mean=tuple(mean), std=tuple(std),
            metadata={"white_balance": bool(white_balance)},
        )
        val_set = crop_set.subset(val_index)
        augment_kwargs = dict(augment_options or {})
        # the classes whose crops may have their cytoplasm faded (augment_batch)
        faint_classes = augment_kwargs.pop("faint_cytoplasm_classes", None)
        faint_index = None
        if faint_classes is not None:
            unknown = sorted(set(faint_classes) - set(class_names))
            if unknown:
                raise ValueError(f"augment_options['faint_cytoplasm_classes'] names unknown classes {unknown}; "
                                 f"the classes are {class_names}")
            faint_index = torch.tensor([class_names.index(c) for c in faint_classes], device=torch_device)
        log = _epoch_logger(progress)
        for line in notes:
            log(line)

        def model_input(images, masks, labels, generator):
            """A batch of crops as the model takes them (white-balanced, augmented,
            normalised), and its masks as augmented; ``labels`` (or None) say which
            crops may have their cytoplasm faded."""
            rgb = images.permute(0, 3, 1, 2).float() / 255.0
            mask_float = masks.float()
            if white_balance:
                rgb = balance_crops(rgb, mask_float)
            if augment:
                options = augment_kwargs
                if faint_index is not None and labels is not None:
                    options = {**augment_kwargs, "faint_cytoplasm_eligible": torch.isin(labels, faint_index)}
                rgb, mask_float = augment_batch(rgb, mask_float, generator, **options)
            return torch.cat([(rgb - mean_t) / std_t, mask_float], dim=1), mask_float

        from tqdm.auto import tqdm

        while state["epoch"] < epochs and not state["stopped_early"]:
            epoch = state["epoch"] + 1
            epoch_started = time.perf_counter()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            torch.manual_seed(seed * 1_000_003 + epoch)  # dropout
            if balance_mode == "sampler":
                order = torch.multinomial(sample_weight, n_train, replacement=True, generator=generator)
            else:
                order = torch.randperm(n_train, generator=generator)
            model.train()
            # summed on the device: reading the loss every step would synchronise a GPU
            loss_sum, seen = torch.zeros((), device=torch_device), 0
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                       disable=not progress, file=sys.stderr)
            for step_in_epoch in range(steps_per_epoch):
                batch_index = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
                if resident:
                    tensors = [t[batch_index.to(torch_device)] for t in device_tensors]
                elif pin:  # gather, then copy from page-locked memory without blocking the host
                    tensors = [t[batch_index].pin_memory().to(torch_device, non_blocking=True) for t in host_tensors]
                else:
                    tensors = [t[batch_index].to(torch_device) for t in host_tensors]
                images, masks, labels = tensors[0], tensors[1], tensors[2]
                extra = tensors[3:]
                morph = extra.pop(0) if morph_features else None
                targets = extra.pop(0) if attr_targets is not None else None
                x, mask_float = model_input(images, masks, labels, generator)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(state["global_step"], total_steps, warmup_steps, lr)
                with (torch.autocast(device_type=torch_device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
                    out = model(x, morph)
                loss = F.cross_entropy(out["logits"].float(), labels, weight=class_weight, label_smoothing=label_smoothing)
                if attention_supervision > 0:
                    loss = loss + attention_supervision * attention_supervision_loss(
                        out["attention_logits"].float(), mask_float[:, 0], mask_float[:, 1]
                    )
                if targets is not None and out.get("attr_logits") and bool((targets >= 0).any()):
                    loss = loss + attribute_weight * attribute_loss(out["attr_logits"], targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(optimizer)
                scaler.update()
                state["global_step"] += 1
                loss_sum += loss.detach().float() * len(labels)
                seen += len(labels)
                bar.update(1)
                if progress and (step_in_epoch % 10 == 0 or step_in_epoch == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}")
            bar.close()
            train_loss = float(loss_sum) / max(seen, 1)
            if not math.isfinite(train_loss):
                # the checkpoint of the previous epoch is left as it was
                raise FloatingPointError(
                    f"the training loss became {train_loss} in epoch {epoch}; lower lr (now {lr}) or turn amp off"
                )

            scored = model
            if averaging is not None and epoch >= average_weights_from:
                averaging.add(model)

                def training_batches():  # BatchNorm statistics: the epoch's first crops, augmented as in training
                    replay = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                    for start in range(0, min(n_train, _BATCHNORM_RECOUNT_CROPS), batch_size):
                        index = order[start:start + batch_size]
                        x, _ = model_input(host_tensors[0][index].to(torch_device),
                                           host_tensors[1][index].to(torch_device), None, replay)
                        morph = host_tensors[3][index].to(torch_device) if morph_features else None
                        yield x, morph

                scored = averaging.ready(training_batches(), dtype, torch_device)
            val_output = classify_crops(
                scored, val_info, val_set.images, val_set.masks, val_set.morph, device=torch_device,
                batch_size=2 * batch_size, amp=dtype or False, return_attention=True, progress=False,
            )
            to_model = np.arange(len(class_names))
            metrics = classification_metrics(to_model[val_set.labels], val_output["probs"].argmax(axis=1), class_names)
            metrics["attention_mass_inside"] = _attention_inside(val_output["attention"], val_set.masks[:, 0])
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_accuracy": metrics["accuracy"],
                "val_macro_f1": metrics["macro_f1"],
                "val_attention_mass_inside": metrics["attention_mass_inside"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_started,
            }
            state["history"].append(record)
            state["epoch"] = epoch
            improved = metrics["macro_f1"] > state["best_f1"] + 1e-9
            if improved:
                state["best_f1"], state["best_epoch"], state["since_best"] = metrics["macro_f1"], epoch, 0
                best_metrics = {
                    "split": "val", "epoch": epoch,
                    **{k: metrics[k] for k in ("n", "accuracy", "macro_f1", "per_class_recall", "per_class_precision",
                                               "per_class_f1", "support", "confusion", "attention_mass_inside")},
                }
                save_model(best_path, scored, _model_metadata(
                    crop_set, class_names, mean, std, size, best_metrics, fingerprint, train_index, val_index,
                    morph_features, model, epochs, patience, torch_device, dtype, notes, cell_types,
                    test_time_views=init["test_time_views"] if init is not None else None,
                ))
            else:
                state["since_best"] += 1
            if patience is not None and state["since_best"] >= patience and epoch < epochs:
                state["stopped_early"] = True
            _save_checkpoint(ckpt_dir, model, optimizer, scaler, {
                **state, "fingerprint": fingerprint, "mean": mean, "std": std,
            })
            log(
                f"epoch {epoch}/{epochs}: loss {record['train_loss']:.4f}, val accuracy {metrics['accuracy']:.4f}, "
                f"macro-F1 {metrics['macro_f1']:.4f}{' (best)' if improved else ''}, lr {record['lr']:.2e}, "
                f"{record['seconds']:.1f} s"
            )
            if on_epoch is not None:
                on_epoch(dict(record))
        for handle in mixstyle_hooks:
            handle.remove()
        if state["stopped_early"]:
            log(f"stopped early: no better validation macro-F1 for {patience} epochs (best at epoch {state['best_epoch']})")
        best_model, info = load_model(best_path, device=torch_device)
        if cell_types and info.metadata.get("cell_types") != cell_types:
            # a resumed run whose best epoch came before this call still gets them
            save_model(best_path, best_model, {**info.metadata, "cell_types": list(cell_types)})
            best_model, info = load_model(best_path, device=torch_device)
        if choose_prior_correction and balance_mode != "none" and "prior_correction" not in info.metadata:
            note = _store_prior_correction(best_path, best_model, info, val_set, torch_device, 2 * batch_size, dtype)
            notes.append(note)
            log(note)
        os.replace(best_path, output)  # only now: a model already there survives a run that stops half-way
        best_model, info = load_model(output, device=torch_device)
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)
    return TrainResult(
        model=best_model,
        info=info,
        model_path=output,
        metrics=dict(info.metrics),
        history=list(state["history"]),
        best_epoch=int(state["best_epoch"]),
        epochs_completed=int(state["epoch"]),
        stopped_early=bool(state["stopped_early"]),
        checkpoint_dir=ckpt_dir,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


#: The fewest validation crops :func:`train` chooses a prior-correction strength on.
MIN_VAL_CROPS_FOR_PRIOR_CORRECTION = 50


def _store_prior_correction(output: Path, model, info, val_set, device, batch_size, dtype) -> str:
    """Choose the trained model's prior-correction strength on ``val_set`` and write it
    into its file (weights unchanged); returns a line for the training notes."""
    from .models import save_model
    from .predict import prior_logit_offsets

    if len(val_set) < MIN_VAL_CROPS_FOR_PRIOR_CORRECTION:
        return (f"prior correction not chosen: {len(val_set)} validation crops, fewer than "
                f"{MIN_VAL_CROPS_FOR_PRIOR_CORRECTION}; the model answers as if all classes were equally common")
    try:
        unit = prior_logit_offsets(info, 1.0)
    except ValueError as exc:  # a class without training crops has no frequency
        return f"prior correction not chosen: {exc}"
    view_probs = _uncorrected_view_probs(model, info, val_set, device, batch_size, amp=dtype or False)
    choice = {**_choose_strength(view_probs, val_set.labels, unit, info.class_names, PRIOR_CORRECTION_STRENGTHS),
              "split": "val"}
    save_model(output, model, {**info.metadata, "prior_correction": choice})
    table = ", ".join(f"{row['strength']:g}: {100 * row['macro_f1']:.2f} %" for row in choice["scores"])
    return (f"prior correction: strength {choice['strength']:g} chosen on {choice['n']} validation crops "
            f"(validation macro-F1 by strength: {table})")


def _fine_tuning_start(init_from, model_kind: str, config: dict | None) -> dict:
    """What fine-tuning from ``init_from`` takes from that model file (metadata only)."""
    from .models.files import read_metadata, resolve_model_path

    path = resolve_model_path(init_from)
    metadata = read_metadata(path)
    if model_kind not in ("shape_aware", metadata["kind"]):  # "shape_aware" is the default
        raise ValueError(
            f"model_kind {model_kind!r} differs from the kind of {path.name} ({metadata['kind']!r}) "
            "that init_from fine-tunes; leave model_kind out"
        )
    if config and any(metadata["config"].get(k) != v for k, v in config.items()):
        raise ValueError(f"config {config} differs from the architecture of {path.name}; leave config out")
    return {
        "path": path, "kind": metadata["kind"], "config": dict(metadata["config"]),
        "input_size": int(metadata["input_size"]), "crop_diameters": float(metadata["crop_diameters"]),
        "mean": metadata["mean"], "std": metadata["std"], "class_names": list(metadata["class_names"]),
        "stain_normalization": metadata.get("stain_normalization") or None,
        "cell_types": metadata.get("cell_types") or None,
        "test_time_views": metadata.get("test_time_views"),
    }


#: Fewer held-out cells than this say little about a model.
FEW_VALIDATION_CELLS = 20


def weak_model_caution(metrics: dict, n_classes: int) -> str:
    """Why a freshly trained model's figures do not show that it works, or ""."""
    n = metrics.get("n") or 0
    accuracy, macro_f1 = metrics.get("accuracy"), metrics.get("macro_f1")
    reasons = []
    if accuracy is not None and macro_f1 is not None and n_classes >= 2 and (
        macro_f1 <= 1.5 / n_classes or accuracy <= 1.2 / n_classes
    ):
        reasons.append(f"its validation scores are close to guessing among {n_classes} classes")
    if n < FEW_VALIDATION_CELLS:
        reasons.append(f"it was validated on only {n} cells")
    if not reasons:
        return ""
    return (" and ".join(reasons) + "; label more cells (or more images) and train again before trusting "
            "its answers")


def check_model_output(output: str | os.PathLike) -> None:
    """Before any work: the model file can be written there, and what it replaces is a
    model (a ValueError saying why not)."""
    from .io import check_writable_location
    from .models import ModelFileError, read_metadata

    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a folder: give a .safetensors file name")
    check_writable_location(output, "output")
    if output.exists():
        try:
            read_metadata(output)
        except ModelFileError as exc:
            raise ValueError(f"{exc}; refusing to overwrite it with the trained model") from exc


def _check_cell_types(cell_types: Sequence[str]) -> list[str]:
    from .segment.types import CELL_TYPES, check_cell_types

    chosen = check_cell_types(cell_types)
    if not chosen:
        raise ValueError(f"cell_types must be some of {list(CELL_TYPES)}, got none")
    return chosen


def _load_pretrained(model, init: dict, class_names: list[str]) -> str:
    """Copy the pretrained weights of ``init['path']`` into ``model``; returns a note.

    Every tensor whose name and shape match is copied, except the classifier (the last
    linear layer with one output per class): its rows are copied class by class, by
    name, so classes the pretrained model knows keep their weights and new ones start
    from random weights (whatever the order or number of classes).
    """
    from safetensors.torch import load_file
    from torch import nn

    pretrained = load_file(str(init["path"]), device="cpu")
    own = model.state_dict()
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == len(class_names)]
    head_keys = {f"{heads[-1]}.weight", f"{heads[-1]}.bias"} if heads else set()
    copied = {
        k: v for k, v in pretrained.items()
        if k in own and k not in head_keys and tuple(own[k].shape) == tuple(v.shape)
    }
    known = list(init["class_names"])
    shared = [c for c in class_names if c in known]
    for key in head_keys:
        old = pretrained.get(key)
        if old is None or len(old) != len(known) or tuple(old.shape[1:]) != tuple(own[key].shape[1:]):
            continue
        rows = own[key].clone()
        for i, name in enumerate(class_names):
            if name in known:
                rows[i] = old[known.index(name)]
        copied[key] = rows
    model.load_state_dict(copied, strict=False)
    new = [c for c in class_names if c not in known]
    return (
        f"fine-tuned from {init['path'].name}: {len(copied)} of {len(own)} weight tensors copied; classifier rows "
        f"kept for {len(shared)} known class(es)" + (f", new for {new}" if new else "")
    )


def _fits_on_device(device, nbytes: int) -> bool:
    import torch

    if device.type == "cpu":
        return True  # the numpy arrays are used in place
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < 0.3 * free
    return nbytes < 2 * 1024**3


def _epoch_logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda line: None
    from tqdm.auto import tqdm

    return lambda line: tqdm.write(line, file=sys.stderr)


def _model_metadata(crop_set, class_names, mean, std, size, metrics, fingerprint, train_index, val_index,
                    morph_features, model, epochs, patience, device, dtype, notes, cell_types=None,
                    test_time_views=None) -> dict:
    train_counts = np.bincount(crop_set.labels[train_index], minlength=len(class_names))
    metadata = {
        "class_names": class_names,
        "mean": mean,
        "std": std,
        "input_size": size,
        "crop_diameters": crop_set.crop_diameters,
        "training_data": {
            "description": crop_set.describe(),
            "source": crop_set.source,
            "n_train": int(len(train_index)),
            "n_val": int(len(val_index)),
            "train_class_counts": {c: int(n) for c, n in zip(class_names, train_counts)},
            "skipped_images": len(crop_set.failures),
            "crop_code_version": crop_set.code_version,
            "notes": list(notes),
        },
        "metrics": metrics,
        "training": {
            **{k: fingerprint[k] for k in ("seed", "batch_size", "lr", "weight_decay", "balance", "augment",
                                           "attention_supervision", "attribute_weight", "label_smoothing",
                                           "max_train_samples")},
            "max_epochs": epochs,
            "patience": patience,
            "device": str(device),
            "amp": str(dtype).removeprefix("torch.") if dtype else None,
            **({"mixstyle": fingerprint["mixstyle"]} if fingerprint.get("mixstyle") else {}),
            **({"average_weights_from": fingerprint["average_weights_from"]}
               if fingerprint.get("average_weights_from") is not None else {}),
        },
    }
    if cell_types:
        metadata["cell_types"] = list(cell_types)
    if fingerprint.get("white_balance"):
        metadata["white_balance"] = True
    if crop_set.stain_normalization:
        metadata["stain_normalization"] = crop_set.stain_normalization
    if morph_features:
        metadata["morph_features"] = list(crop_set.morph_names)
    if test_time_views and test_time_views > 1:  # a fine-tuned model answers as the one it started from
        metadata["test_time_views"] = int(test_time_views)
    names = list(getattr(model, "attribute_names", []) or [])
    if names:
        values = {n: v for n, v in zip(crop_set.attribute_names, crop_set.attribute_values)}
        metadata["attribute_values"] = {n: values[n] for n in names if n in values}
    return metadata
