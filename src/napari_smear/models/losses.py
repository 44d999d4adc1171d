"""Losses and metrics for attention supervision and WBCAtt attribute prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _as_mask(mask: torch.Tensor, name: str, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != shape:
        raise ValueError(
            f"{name} must have shape (B, S, S) = {tuple(shape)} like the attention, got {tuple(mask.shape)}"
        )
    return mask.float()


def _balanced_bce(logits: torch.Tensor, target: torch.Tensor, balance: bool) -> torch.Tensor:
    """Per-image BCE-with-logits (B,), optionally class balanced within each image."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1)
    target = target.flatten(1)
    if not balance:
        return bce.mean(dim=1)
    positive = target.sum(dim=1)
    negative = (1 - target).sum(dim=1)
    positive_term = (bce * target).sum(dim=1) / positive.clamp_min(1e-6)
    negative_term = (bce * (1 - target)).sum(dim=1) / negative.clamp_min(1e-6)
    both = (positive > 0) & (negative > 0)
    return torch.where(both, 0.5 * (positive_term + negative_term), bce.mean(dim=1))


def attention_supervision_loss(
    attention_logits: torch.Tensor,
    cell_mask: torch.Tensor,
    nucleus_mask: torch.Tensor | None = None,
    nucleus_weight: float = 0.5,
    balance: bool = True,
) -> torch.Tensor:
    """BCE between a model's attention logits and the segmentation masks (DualAttNet style).

    The target of the attention map is the **cell mask**: attention should lie on the
    cell (nucleus and cytoplasm), not on the background or neighbouring cells. A model
    that exposes two maps, ``attention_logits`` of shape (B, 2, S, S), has its second
    map supervised by the **nucleus mask**, weighted by ``nucleus_weight``:
    ``loss = BCE(map0, cell) + nucleus_weight * BCE(map1, nucleus)``. With one map,
    (B, S, S), the nucleus lies inside the cell target already and ``nucleus_mask`` is
    not used.

    Parameters
    ----------
    attention_logits : torch.Tensor
        (B, S, S) pre-sigmoid attention, or (B, 2, S, S) for cell and nucleus maps.
    cell_mask : torch.Tensor
        (B, S, S) or (B, 1, S, S), values in [0, 1].
    nucleus_mask : torch.Tensor, optional
        Same shape; required when two maps are given.
    nucleus_weight : float
        Weight of the nucleus term (two maps only).
    balance : bool
        Class-balance each image's BCE: cell and background pixels each carry half of
        the image's loss, so a small cell in a large crop is not swamped by background.

    Returns
    -------
    torch.Tensor
        Scalar loss: mean over the images whose cell mask is not empty. Images with an
        empty cell mask (no segmentation) are skipped; if all are, the loss is 0 (still
        connected to the graph).
    """
    if not isinstance(attention_logits, torch.Tensor):
        raise TypeError(f"attention_logits must be a torch.Tensor, got {type(attention_logits).__name__}")
    if attention_logits.ndim == 4 and attention_logits.shape[1] == 2:
        cell_logits, nucleus_logits = attention_logits[:, 0], attention_logits[:, 1]
        if nucleus_mask is None:
            raise ValueError("two attention maps (B, 2, S, S) were given: nucleus_mask is required")
    elif attention_logits.ndim == 3:
        cell_logits, nucleus_logits = attention_logits, None
    else:
        raise ValueError(
            f"attention_logits must have shape (B, S, S) or (B, 2, S, S), got {tuple(attention_logits.shape)}"
        )
    cell_target = _as_mask(cell_mask, "cell_mask", cell_logits.shape)
    per_image = _balanced_bce(cell_logits, cell_target, balance)
    if nucleus_logits is not None:
        nucleus_target = _as_mask(nucleus_mask, "nucleus_mask", nucleus_logits.shape)
        per_image = per_image + float(nucleus_weight) * _balanced_bce(nucleus_logits, nucleus_target, balance)
    has_cell = (cell_target.flatten(1).sum(dim=1) > 0).float()
    return (per_image * has_cell).sum() / has_cell.sum().clamp_min(1.0)


def attribute_loss(attr_logits: Sequence[torch.Tensor], attr_targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over attributes, ignoring missing labels (target -1).

    Parameters
    ----------
    attr_logits : sequence of torch.Tensor
        One (B, n_values_i) tensor per attribute (a model's ``attr_logits``).
    attr_targets : torch.Tensor
        (B, A) integer tensor: the value index of each attribute, or -1 when unknown.

    Returns
    -------
    torch.Tensor
        Scalar: each attribute's cross-entropy averaged over its labelled images, then
        averaged over the attributes that have at least one label in the batch (0,
        connected to the graph, when no label is present).
    """
    attr_logits = list(attr_logits)
    if not attr_logits:
        raise ValueError("attr_logits is empty: the model has no attribute head")
    if not isinstance(attr_targets, torch.Tensor) or attr_targets.ndim != 2:
        shape = getattr(attr_targets, "shape", attr_targets)
        raise ValueError(f"attr_targets must be a (B, A) integer tensor, got {shape!r}")
    if attr_targets.is_floating_point():
        raise TypeError(f"attr_targets must be an integer tensor (value indices, -1 missing), got {attr_targets.dtype}")
    batch, num_attributes = attr_targets.shape
    if num_attributes != len(attr_logits) or any(t.shape[0] != batch for t in attr_logits):
        raise ValueError(
            f"attr_targets has shape {tuple(attr_targets.shape)} but there are {len(attr_logits)} attribute "
            f"logit tensors of batch sizes {[t.shape[0] for t in attr_logits]}"
        )
    targets = attr_targets.long()
    sizes = torch.tensor([t.shape[1] for t in attr_logits], device=targets.device)
    if bool(((targets < -1) | (targets >= sizes[None, :])).any()):
        raise ValueError(f"attr_targets must hold -1 or a value index below each attribute's n_values {sizes.tolist()}")
    losses = []
    counts = []
    for index, logits in enumerate(attr_logits):
        target = targets[:, index]
        losses.append(F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum"))
        counts.append((target >= 0).sum())
    loss_sums = torch.stack(losses)
    label_counts = torch.stack(counts).to(loss_sums.dtype)
    per_attribute = loss_sums / label_counts.clamp_min(1.0)
    labelled = (label_counts > 0).to(loss_sums.dtype)
    return (per_attribute * labelled).sum() / labelled.sum().clamp_min(1.0)


def attention_mass_inside(attention: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
    """Share of each image's attention mass that lies inside its cell mask.

    Parameters
    ----------
    attention : torch.Tensor
        (B, S, S) non-negative attention maps.
    cell_mask : torch.Tensor
        (B, S, S) or (B, 1, S, S) masks in [0, 1].

    Returns
    -------
    torch.Tensor
        (B,) float values in [0, 1]; NaN for an image whose attention is all zero.
    """
    if not isinstance(attention, torch.Tensor) or attention.ndim != 3:
        raise ValueError(f"attention must be a (B, S, S) tensor, got {getattr(attention, 'shape', attention)!r}")
    mask = _as_mask(cell_mask, "cell_mask", attention.shape)
    attention = attention.detach().float()
    total = attention.flatten(1).sum(dim=1)
    inside = (attention * mask).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.full_like(total, float("nan")))
