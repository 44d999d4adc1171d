"""Shape-aware classifier (after the BMEC erythroid-cell paper's shape-attention design).

Two branches: an RGB branch (the residual backbone on the colour channels) and a
shape branch (a light CNN on the cell and nucleus masks). The shape branch drives two
attentions on the RGB branch:

* a **spatial gate** ``g = sigmoid(conv1x1(shape feature map))`` that weights the RGB
  feature map before pooling (attention pooling ``sum(g F) / sum(g)``); this is the map
  shown to users and the one supervised by :func:`attention_supervision_loss`;
* a **channel gate** ``a = sigmoid(W2 relu(W1 f_shape))`` on the pooled RGB feature,
  ``f_att = a * f_rgb``.

A fusion MLP classifies ``concat(f_rgb, f_shape, f_att)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import ResidualBackbone, ShapeEncoder
from .base import MASK_CHANNELS, RGB_CHANNELS, SmearClassifier, mlp_head, sigmoid_attention_outputs


class ShapeAwareClassifier(SmearClassifier):
    """RGB branch + mask-shape branch with spatial and channel shape attention.

    Config
    ------
    widths, depths, stem_stride
        RGB backbone layout.
    shape_widths : list of 4 ints
        Channels of the shape branch's four stride-2 layers.
    gate_reduction : int
        Hidden width of the channel-gate MLP is ``widths[-1] // gate_reduction``.
    fusion_hidden : int
        Hidden width of the fusion MLP.
    dropout : float
        Dropout inside the fusion MLP.
    """

    kind = "shape_aware"
    default_config: dict[str, Any] = {
        "widths": [24, 48, 96, 192],
        "depths": [1, 1, 1, 1],
        "stem_stride": 2,
        "shape_widths": [8, 16, 32, 64],
        "gate_reduction": 4,
        "fusion_hidden": 256,
        "dropout": 0.2,
    }

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        cfg = self.config
        if cfg["stem_stride"] != 2:
            raise ValueError("shape_aware needs stem_stride=2 so both branches have stride 16")
        self.rgb_branch = ResidualBackbone(3, cfg["widths"], cfg["depths"], cfg["stem_stride"])
        self.shape_branch = ShapeEncoder(2, cfg["shape_widths"])
        rgb_width = self.rgb_branch.out_channels
        shape_width = self.shape_branch.out_channels
        self.spatial_gate = nn.Conv2d(shape_width, 1, kernel_size=1)
        hidden = max(rgb_width // int(cfg["gate_reduction"]), 8)
        self.channel_gate = nn.Sequential(
            nn.Linear(shape_width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, rgb_width)
        )
        self.fusion = mlp_head(2 * rgb_width + shape_width, cfg["fusion_hidden"], num_classes, cfg["dropout"])

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classify crops; ``morph`` is accepted for a uniform interface and ignored."""
        self.check_input(x)
        rgb_map = self.rgb_branch(x[:, RGB_CHANNELS])  # (B, C, h, w)
        shape_map = self.shape_branch(x[:, MASK_CHANNELS])  # (B, Cs, h, w)
        gate_logits = self.spatial_gate(shape_map)  # (B, 1, h, w)
        gate = torch.sigmoid(gate_logits)
        # Attention pooling: normalising by the gate's mass keeps f_rgb's scale
        # independent of how strongly the gate fires overall.
        f_rgb = (rgb_map * gate).sum(dim=(2, 3)) / gate.sum(dim=(2, 3)).clamp_min(1e-6)
        f_shape = shape_map.mean(dim=(2, 3))
        f_att = torch.sigmoid(self.channel_gate(f_shape)) * f_rgb
        logits = self.fusion(torch.cat([f_rgb, f_shape, f_att], dim=1))
        return {"logits": logits, **sigmoid_attention_outputs(gate_logits, x.shape[-1])}
