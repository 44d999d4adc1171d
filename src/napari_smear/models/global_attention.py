"""Classifier with one learned global attention map shared by all images.

A single ``nn.Parameter`` of shape (1, 1, h, w) is passed through a sigmoid and
multiplies the feature maps after backbone stage ``attention_stage``. Because crops are
centred on the cell at a normalised scale, one map can learn *where in the crop* the
informative pixels are (e.g. a ring for the cytoplasm, the centre for the nucleus).
The map is saved with the model's weights and can be shown as an image
(:meth:`GlobalAttentionClassifier.global_map`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ResidualBackbone
from .base import SIZE_MULTIPLE, SmearClassifier, select_input_channels, upsample_map


class GlobalAttentionClassifier(SmearClassifier):
    """Residual backbone with a learned, image-independent attention map at one stage.

    Config
    ------
    widths, depths, stem_stride
        Backbone layout.
    attention_stage : int
        The map multiplies the output of this stage (1-4; default 2, stride 4: a 24x24
        map for 96x96 crops).
    input_size : int
        Crop side the map's resolution is defined for. Other crop sizes work: the map
        is resized bilinearly to the feature map.
    use_mask_channels : bool
        Feed the mask channels to the backbone too (default True).
    dropout : float
        Dropout before the linear classifier.
    """

    kind = "global_attention"
    default_config: dict[str, Any] = {
        "widths": [24, 48, 96, 192],
        "depths": [1, 1, 1, 1],
        "stem_stride": 2,
        "attention_stage": 2,
        "input_size": 96,
        "use_mask_channels": True,
        "dropout": 0.1,
    }

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        cfg = self.config
        stage = cfg["attention_stage"]
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"attention_stage must be 1, 2, 3 or 4, got {stage!r}")
        size = cfg["input_size"]
        if not isinstance(size, int) or size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
            raise ValueError(f"input_size must be a positive multiple of {SIZE_MULTIPLE}, got {size!r}")
        in_channels = 5 if cfg["use_mask_channels"] else 3
        self.backbone = ResidualBackbone(in_channels, cfg["widths"], cfg["depths"], cfg["stem_stride"])
        self.attention_stage = stage
        map_side = -(-size // self.backbone.stage_strides[stage - 1])
        # Zero logits: the map starts uniform (0.5 everywhere) and learns its shape.
        self.attention_map_logits = nn.Parameter(torch.zeros(1, 1, map_side, map_side))
        self.dropout = nn.Dropout(cfg["dropout"])
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)

    def _map_logits_at(self, height: int, width: int) -> torch.Tensor:
        logits = self.attention_map_logits
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits

    def global_map(self, size: int | None = None) -> np.ndarray:
        """The learned map, sigmoid applied, resized to ``size`` (default ``input_size``).

        Returns
        -------
        numpy.ndarray
            (size, size) float32 array in [0, 1], viewable as an image.
        """
        size = self.config["input_size"] if size is None else int(size)
        with torch.no_grad():
            logits = upsample_map(self.attention_map_logits.detach().float().cpu()[:, 0], size)
            return torch.sigmoid(logits)[0].numpy().astype(np.float32)

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classify crops; ``morph`` is accepted for a uniform interface and ignored.

        ``attention`` is the shared map (identical for every image of the batch).
        """
        self.check_input(x)
        batch, _, size, _ = x.shape
        features = self.backbone.stem(select_input_channels(x, self.config["use_mask_channels"]))
        for index, stage in enumerate(self.backbone.stages, start=1):
            features = stage(features)
            if index == self.attention_stage:
                gate = torch.sigmoid(self._map_logits_at(*features.shape[-2:]))
                features = features * gate.to(features.dtype)
        logits = self.classifier(self.dropout(features.mean(dim=(2, 3))))
        map_logits = upsample_map(self.attention_map_logits[:, 0], size)  # (1, S, S)
        attention_logits = map_logits.expand(batch, size, size).contiguous()
        return {"logits": logits, "attention": torch.sigmoid(attention_logits), "attention_logits": attention_logits}
