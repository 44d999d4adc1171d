"""Plain CNN baseline: backbone, global average pooling, linear classifier.

The baseline for ablations: by default it reads only the RGB channels (the masks are
ignored). It has no attention module, so the map it shows is a class-activation map
(CAM, Zhou et al. 2016) of the predicted class, min-max normalised per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import ResidualBackbone
from .base import SmearClassifier, minmax_normalise, select_input_channels, upsample_map


class PlainClassifier(SmearClassifier):
    """Residual backbone + global average pooling + linear layer.

    Config
    ------
    widths, depths, stem_stride
        Backbone layout (see :class:`ResidualBackbone`).
    use_mask_channels : bool
        Feed the two mask channels to the backbone too (default False: RGB only).
    dropout : float
        Dropout before the classifier.
    """

    kind = "plain"
    has_attention_logits = False
    default_config: dict[str, Any] = {
        "widths": [24, 48, 96, 192],
        "depths": [1, 1, 1, 1],
        "stem_stride": 2,
        "use_mask_channels": False,
        "dropout": 0.1,
    }

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        cfg = self.config
        in_channels = 5 if cfg["use_mask_channels"] else 3
        self.backbone = ResidualBackbone(in_channels, cfg["widths"], cfg["depths"], cfg["stem_stride"])
        self.dropout = nn.Dropout(cfg["dropout"])
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classify crops; ``morph`` is accepted for a uniform interface and ignored."""
        self.check_input(x)
        features = self.backbone(select_input_channels(x, self.config["use_mask_channels"]))
        pooled = features.mean(dim=(2, 3))
        logits = self.classifier(self.dropout(pooled))
        with torch.no_grad():
            # CAM of the predicted class: the classifier weights of that class applied
            # to every feature-map position (the bias shifts all positions equally).
            predicted = logits.argmax(dim=1)
            class_weights = self.classifier.weight[predicted].to(features.dtype)  # (B, C)
            cam = torch.einsum("bchw,bc->bhw", features, class_weights).float().relu()
            attention = upsample_map(minmax_normalise(cam), x.shape[-1]).clamp(0.0, 1.0)
        return {"logits": logits, "attention": attention}
