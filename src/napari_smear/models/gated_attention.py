"""Gated-attention multiple-instance classifier (after Fan et al., microscopic
fine-grained instance classification; gated attention of Ilse et al. 2018).

Two views of the crop:

* a **global branch**: the crop downsampled 2x through a residual backbone, pooled to
  ``g`` (coarse context: size, shape, surroundings);
* an **instance branch**: the full-resolution crop cut into a ``patch_grid`` x
  ``patch_grid`` grid of overlapping patches (stride ``S // (patch_grid + 1)``, about
  50 % overlap; 3x3 patches of side S/2 at stride S/4 by default), each encoded by one
  shared patch encoder into ``h_k``.

Gated attention pools the patches: ``s_k = w^T (tanh(V h_k) * sigmoid(U h_k))``,
``a_k = softmax_k(s_k)``, bag feature ``sum_k a_k h_k``. Patches that contain no
cell-mask pixel are left out of the softmax (weight 0) when ``mask_empty_patches`` is
true and at least one patch of the crop touches the cell. ``concat(g, bag)`` goes to an
MLP classifier.

The displayed map spreads each patch's weight over its pixels (mean over overlapping
patches) and divides by the per-image maximum; ``attention_logits`` spreads the patch
scores ``s_k`` the same way, for supervision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ResidualBackbone
from .base import CELL_MASK_CHANNEL, SmearClassifier, autocast_off, mlp_head, select_input_channels


def patch_geometry(size: int, grid: int) -> tuple[int, int]:
    """Patch side and stride of a ``grid`` x ``grid`` patch grid covering a crop of side ``size``.

    The stride is ``size // (grid + 1)`` and the side ``size - (grid - 1) * stride``, so
    the patches tile the crop exactly with about 50 % overlap (3x3 patches of side 48 at
    stride 24 on a 96 crop).
    """
    if grid < 2:
        raise ValueError(f"patch_grid must be >= 2, got {grid}")
    stride = size // (grid + 1)
    if stride < 1:
        raise ValueError(f"a {grid}x{grid} patch grid does not fit in a crop of side {size}")
    return size - (grid - 1) * stride, stride


def patch_membership(size: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, S*S) float matrix: 1 where pixel (flattened row-major) lies in patch k.

    Patches are ordered row-major over the grid, like ``unfold`` produces them.
    """
    patch, stride = patch_geometry(size, grid)
    starts = torch.arange(grid, device=device) * stride
    pixels = torch.arange(size, device=device)
    inside = (pixels[None, :] >= starts[:, None]) & (pixels[None, :] < starts[:, None] + patch)  # (grid, S)
    membership = inside[:, None, :, None] & inside[None, :, None, :]  # (gy, gx, S, S)
    return membership.reshape(grid * grid, size * size).float()


def spread_patch_values(values: torch.Tensor, membership: torch.Tensor, size: int) -> torch.Tensor:
    """Spread per-patch values (B, K) over the crop, averaging overlapping patches -> (B, S, S).

    One matrix product with the patch-membership matrix sums each pixel's patch values;
    dividing by the number of patches covering the pixel gives their mean.
    """
    with autocast_off(values.device.type):
        summed = values.float() @ membership
        counts = membership.sum(dim=0)
        return (summed / counts).reshape(values.shape[0], size, size)


class GatedAttentionClassifier(SmearClassifier):
    """Global low-resolution branch + gated-attention pooling over high-resolution patches.

    Config
    ------
    widths, depths, stem_stride
        Layout of the global branch backbone.
    patch_widths, patch_depths
        Layout of the shared patch encoder.
    patch_grid : int
        Patches per side (default 3: 9 patches of side S/2, stride S/4).
    attention_hidden : int
        Width of the gated-attention layers V and U.
    use_mask_channels : bool
        Feed the mask channels to both branches (default True).
    mask_empty_patches : bool
        Give patches without any cell-mask pixel zero weight (default True).
    fusion_hidden, dropout
        Classifier MLP.
    """

    kind = "gated_attention"
    default_config: dict[str, Any] = {
        "widths": [24, 48, 96, 192],
        "depths": [1, 1, 1, 1],
        "stem_stride": 2,
        "patch_widths": [16, 32, 64, 128],
        "patch_depths": [1, 1, 1, 1],
        "patch_grid": 3,
        "attention_hidden": 128,
        "use_mask_channels": True,
        "mask_empty_patches": True,
        "fusion_hidden": 256,
        "dropout": 0.2,
    }

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        cfg = self.config
        in_channels = 5 if cfg["use_mask_channels"] else 3
        self.grid = int(cfg["patch_grid"])
        if self.grid < 2:
            raise ValueError(f"patch_grid must be >= 2, got {self.grid}")
        self._membership_cache: tuple[tuple[int, str], torch.Tensor] | None = None
        self.global_branch = ResidualBackbone(in_channels, cfg["widths"], cfg["depths"], cfg["stem_stride"])
        self.patch_encoder = ResidualBackbone(
            in_channels, cfg["patch_widths"], cfg["patch_depths"], cfg["stem_stride"]
        )
        patch_width = self.patch_encoder.out_channels
        hidden = int(cfg["attention_hidden"])
        self.attention_v = nn.Linear(patch_width, hidden)
        self.attention_u = nn.Linear(patch_width, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = mlp_head(
            self.global_branch.out_channels + patch_width, cfg["fusion_hidden"], num_classes, cfg["dropout"]
        )

    def _membership(self, size: int, device: torch.device) -> torch.Tensor:
        # Cached per crop size and device: a (K, S*S) constant, rebuilt only when they change.
        key = (size, str(device))
        if self._membership_cache is None or self._membership_cache[0] != key:
            self._membership_cache = (key, patch_membership(size, self.grid, device))
        return self._membership_cache[1]

    def extract_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Cut (B, C, S, S) crops into (B * K, C, P, P) overlapping patches (no Python loop).

        Patches come out in ``x``'s memory format (channels-last input gives
        channels-last patches) with a single copy.
        """
        batch, channels, size, _ = x.shape
        patch, stride = patch_geometry(size, self.grid)
        count = batch * self.grid**2
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            pixels_last = x.permute(0, 2, 3, 1)  # (B, S, S, C), a contiguous view
            windows = pixels_last.unfold(1, patch, stride).unfold(2, patch, stride)  # (B, n, n, C, P, P)
            patches = windows.permute(0, 1, 2, 4, 5, 3).reshape(count, patch, patch, channels)
            return patches.permute(0, 3, 1, 2)
        windows = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, n, n, P, P)
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(count, channels, patch, patch)

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classify crops; ``morph`` is accepted for a uniform interface and ignored.

        Besides the common outputs, returns ``patch_weights`` (B, K): the softmax
        attention over the K patches (row-major over the grid), summing to 1.
        """
        self.check_input(x)
        batch, _, size, _ = x.shape
        membership = self._membership(size, x.device)
        inputs = select_input_channels(x, self.config["use_mask_channels"])

        global_feature = self.global_branch(F.avg_pool2d(inputs, 2)).mean(dim=(2, 3))

        patch_features = self.patch_encoder(self.extract_patches(inputs)).mean(dim=(2, 3))
        patch_features = patch_features.reshape(batch, self.grid**2, -1)  # (B, K, D)
        gated = torch.tanh(self.attention_v(patch_features)) * torch.sigmoid(self.attention_u(patch_features))
        scores = self.attention_w(gated)[..., 0].float()  # (B, K)

        masked_scores = scores
        if self.config["mask_empty_patches"]:
            with autocast_off(x.device.type):
                cell_pixels = x[:, CELL_MASK_CHANNEL].float().flatten(1) @ membership.T  # (B, K)
            has_cell = cell_pixels > 0
            # Crops without any mask pixel (no segmentation) keep every patch.
            has_cell = has_cell | ~has_cell.any(dim=1, keepdim=True)
            masked_scores = scores.masked_fill(~has_cell, float("-inf"))
        weights = torch.softmax(masked_scores, dim=1)

        bag = (weights.to(patch_features.dtype)[..., None] * patch_features).sum(dim=1)
        logits = self.classifier(torch.cat([global_feature, bag.to(global_feature.dtype)], dim=1))

        weight_map = spread_patch_values(weights, membership, size)
        peak = weight_map.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        attention = (weight_map / peak).clamp(0.0, 1.0)
        attention_logits = spread_patch_values(scores, membership, size)
        return {
            "logits": logits,
            "attention": attention,
            "attention_logits": attention_logits,
            "patch_weights": weights,
        }
