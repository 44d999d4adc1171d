"""DAFFNet-style dual attention feature fusion classifier.

* **Semantic branch**: the residual backbone whose last stage is followed by CBAM
  (Woo et al. 2018): channel attention (a shared MLP over average- and max-pooled
  features, sigmoid) then spatial attention (a 7x7 convolution over the channel-wise
  mean and max maps, sigmoid). Pooled to ``f_sem``.
* **Morphological branch**: an MLP over pooled statistics of the mask channels (areas,
  nucleus/cell ratio, colour of cytoplasm and nucleus, elongation, nucleus offset;
  see :func:`mask_statistics`), plus the caller's ``morph`` features when the model
  is built with ``morph_features > 0``. A BatchNorm at its input standardises these
  features with statistics saved in the model, so callers pass raw values.
* **Attribute head**: predicts the WBCAtt morphological attributes (11 by default)
  from ``concat(f_sem, e_morph)``.

The attribute probabilities, ``f_sem`` and ``e_morph`` are fused by an MLP into the class
logits. ``attention`` is the spatial-attention map upsampled to the crop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import ResidualBackbone
from .base import (
    CELL_MASK_CHANNEL,
    NUCLEUS_MASK_CHANNEL,
    RGB_CHANNELS,
    SmearClassifier,
    mlp_head,
    select_input_channels,
    sigmoid_attention_outputs,
)

#: WBCAtt attributes (Tsutsui et al., NeurIPS 2023) and their values, in the order the
#: attribute head predicts them; a target is the index of its value in this list.
WBCATT_ATTRIBUTES: dict[str, list[str]] = {
    "cell_size": ["big", "small"],
    "cell_shape": ["irregular", "round"],
    "nucleus_shape": [
        "irregular",
        "segmented-bilobed",
        "segmented-multilobed",
        "unsegmented-band",
        "unsegmented-indented",
        "unsegmented-round",
    ],
    "nuclear_cytoplasmic_ratio": ["high", "low"],
    "chromatin_density": ["densely", "loosely"],
    "cytoplasm_vacuole": ["no", "yes"],
    "cytoplasm_texture": ["clear", "frosted"],
    "cytoplasm_colour": ["blue", "light blue", "purple blue"],
    "granule_type": ["coarse", "nil", "round", "small"],
    "granule_colour": ["nil", "pink", "purple", "red"],
    "granularity": ["no", "yes"],
}

#: Number of values returned by :func:`mask_statistics`.
NUM_MASK_STATISTICS = 16


def mask_statistics(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pooled statistics of the mask channels of (B, 5, S, S) crops -> (B, 16).

    Columns: cell area fraction, nucleus area fraction, nucleus/cell area ratio, mean
    RGB of the cytoplasm (3), mean RGB of the nucleus (3), RGB standard deviation of
    the cytoplasm (3), cell elongation, nucleus elongation (1 - minor/major eigenvalue
    ratio of the mask's second moments), nucleus-to-cell centroid distance and the
    cell's centroid distance from the crop centre (both in crop sides).
    """
    x = x.float()
    size = x.shape[-1]
    rgb = x[:, RGB_CHANNELS]
    cell = x[:, CELL_MASK_CHANNEL]
    nucleus = x[:, NUCLEUS_MASK_CHANNEL] * cell
    cytoplasm = cell - nucleus

    def area(mask: torch.Tensor) -> torch.Tensor:
        return mask.sum(dim=(1, 2))

    def masked_mean(mask: torch.Tensor) -> torch.Tensor:
        return (rgb * mask[:, None]).sum(dim=(2, 3)) / (area(mask)[:, None] + eps)

    coords = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size - 0.5
    yy = coords[:, None].expand(size, size)
    xx = coords[None, :].expand(size, size)

    def centroid_and_elongation(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mass = area(mask) + eps
        cy = (mask * yy).sum(dim=(1, 2)) / mass
        cx = (mask * xx).sum(dim=(1, 2)) / mass
        dy = yy - cy[:, None, None]
        dx = xx - cx[:, None, None]
        syy = (mask * dy * dy).sum(dim=(1, 2)) / mass
        sxx = (mask * dx * dx).sum(dim=(1, 2)) / mass
        sxy = (mask * dx * dy).sum(dim=(1, 2)) / mass
        half_trace = (syy + sxx) / 2
        root = torch.sqrt(((syy - sxx) / 2) ** 2 + sxy**2)
        major = half_trace + root
        minor = (half_trace - root).clamp_min(0)
        elongation = 1 - minor / (major + eps)
        return torch.stack([cy, cx], dim=1), elongation

    cell_centre, cell_elongation = centroid_and_elongation(cell)
    nucleus_centre, nucleus_elongation = centroid_and_elongation(nucleus)
    pixels = float(size * size)
    cyto_mean = masked_mean(cytoplasm)
    cyto_var = ((rgb - cyto_mean[:, :, None, None]) ** 2 * cytoplasm[:, None]).sum(dim=(2, 3)) / (
        area(cytoplasm)[:, None] + eps
    )
    has_nucleus = (area(nucleus) > 0).float()
    stats = [
        (area(cell) / pixels)[:, None],
        (area(nucleus) / pixels)[:, None],
        (area(nucleus) / (area(cell) + eps))[:, None],
        cyto_mean,
        masked_mean(nucleus),
        cyto_var.clamp_min(0).sqrt(),
        cell_elongation[:, None],
        nucleus_elongation[:, None],
        (has_nucleus * (nucleus_centre - cell_centre).norm(dim=1))[:, None],
        cell_centre.norm(dim=1)[:, None],
    ]
    return torch.cat(stats, dim=1)


class ChannelAttention(nn.Module):
    """CBAM channel attention: shared MLP over average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(features.mean(dim=(2, 3))) + self.mlp(features.amax(dim=(2, 3)))
        return features * torch.sigmoid(pooled)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a convolution over channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Attention logits (B, 1, h, w); the caller applies the sigmoid."""
        summary = torch.cat([features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1)
        return self.conv(summary)


class DAFFNetClassifier(SmearClassifier):
    """Dual attention (CBAM) semantic branch + morphological branch + attribute head.

    Config
    ------
    widths, depths, stem_stride
        Backbone layout.
    use_mask_channels : bool
        Feed the mask channels to the backbone too (default True).
    channel_reduction : int
        Reduction of the CBAM channel MLP.
    spatial_kernel : int
        Kernel of the CBAM spatial convolution (odd).
    morph_features : int
        Width M of the optional ``morph`` input (0: none; the morphological branch
        then uses only the mask statistics).
    morph_hidden : int
        Width of the morphological embedding.
    attributes : list of [name, n_values]
        Attributes predicted by the attribute head (WBCAtt's 11 by default; an empty
        list removes the head).
    fusion_hidden, dropout
        Fusion MLP.
    """

    kind = "daffnet"
    default_config: dict[str, Any] = {
        "widths": [24, 48, 96, 192],
        "depths": [1, 1, 1, 1],
        "stem_stride": 2,
        "use_mask_channels": True,
        "channel_reduction": 8,
        "spatial_kernel": 7,
        "morph_features": 0,
        "morph_hidden": 64,
        "attributes": [[name, len(values)] for name, values in WBCATT_ATTRIBUTES.items()],
        "fusion_hidden": 256,
        "dropout": 0.2,
    }

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        cfg = self.config
        try:
            self.attribute_sizes = [int(n) for _, n in cfg["attributes"]]
            self.attribute_names = [str(name) for name, _ in cfg["attributes"]]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attributes must be a list of [name, n_values] pairs, got {cfg['attributes']!r}") from exc
        if any(n < 2 for n in self.attribute_sizes):
            raise ValueError(f"every attribute needs at least 2 values, got {cfg['attributes']!r}")
        if int(cfg["morph_features"]) < 0:
            raise ValueError(f"morph_features must be >= 0, got {cfg['morph_features']!r}")
        if int(cfg["spatial_kernel"]) % 2 == 0:
            raise ValueError(f"spatial_kernel must be odd, got {cfg['spatial_kernel']!r}")
        in_channels = 5 if cfg["use_mask_channels"] else 3
        self.backbone = ResidualBackbone(in_channels, cfg["widths"], cfg["depths"], cfg["stem_stride"])
        width = self.backbone.out_channels
        self.channel_attention = ChannelAttention(width, int(cfg["channel_reduction"]))
        self.spatial_attention = SpatialAttention(int(cfg["spatial_kernel"]))
        self.morph_features = int(cfg["morph_features"])
        morph_in = NUM_MASK_STATISTICS + self.morph_features
        morph_hidden = int(cfg["morph_hidden"])
        self.morph_branch = nn.Sequential(
            nn.BatchNorm1d(morph_in),
            nn.Linear(morph_in, morph_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(morph_hidden, morph_hidden),
            nn.ReLU(inplace=True),
        )
        total_attribute_values = sum(self.attribute_sizes)
        self.attribute_head = (
            nn.Linear(width + morph_hidden, total_attribute_values) if total_attribute_values else None
        )
        self.fusion = mlp_head(
            width + morph_hidden + total_attribute_values, cfg["fusion_hidden"], num_classes, cfg["dropout"]
        )

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, Any]:
        """Classify crops.

        ``morph`` (B, M) is required when the model was built with ``morph_features=M > 0``
        and ignored otherwise. Returns ``attr_logits``, a list with one (B, n_values)
        tensor per attribute, besides the common outputs.
        """
        self.check_input(x)
        if self.morph_features:
            if morph is None:
                raise ValueError(f"this model was built with morph_features={self.morph_features}: pass morph (B, M)")
            if morph.ndim != 2 or morph.shape != (x.shape[0], self.morph_features):
                raise ValueError(
                    f"morph must have shape (B, {self.morph_features}) = ({x.shape[0]}, {self.morph_features}), "
                    f"got {tuple(morph.shape)}"
                )
        features = self.backbone(select_input_channels(x, self.config["use_mask_channels"]))
        features = self.channel_attention(features)
        spatial_logits = self.spatial_attention(features)
        features = features * torch.sigmoid(spatial_logits)
        f_sem = features.mean(dim=(2, 3))

        morph_input = mask_statistics(x)
        if self.morph_features:
            morph_input = torch.cat([morph_input, morph.float()], dim=1)
        e_morph = self.morph_branch(morph_input).to(f_sem.dtype)

        parts = [f_sem, e_morph]
        attr_logits: list[torch.Tensor] = []
        if self.attribute_head is not None:
            all_attr_logits = self.attribute_head(torch.cat([f_sem, e_morph], dim=1))
            attr_logits = list(torch.split(all_attr_logits, self.attribute_sizes, dim=1))
            parts += [torch.softmax(logits.float(), dim=1).to(f_sem.dtype) for logits in attr_logits]
        logits = self.fusion(torch.cat(parts, dim=1))
        return {
            "logits": logits,
            **sigmoid_attention_outputs(spatial_logits, x.shape[-1]),
            "attr_logits": attr_logits,
        }
