"""Base class of every classifier and small helpers shared by the models.

Every model is built from ``(num_classes, **config)`` alone and keeps the complete,
JSON-serialisable ``config`` (defaults filled in), so a model file only needs the
kind, the config and the weights to rebuild it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: Input channels: 0-2 normalised RGB, 3 cell mask, 4 nucleus mask.
NUM_INPUT_CHANNELS = 5
RGB_CHANNELS = slice(0, 3)
CELL_MASK_CHANNEL = 3
NUCLEUS_MASK_CHANNEL = 4
MASK_CHANNELS = slice(3, 5)
#: Input sides must be multiples of the backbone's total stride.
SIZE_MULTIPLE = 16
#: Human-readable description of the input channels, stored in model files.
CHANNELS_DESCRIPTION = [
    "red (normalised with mean/std)",
    "green (normalised with mean/std)",
    "blue (normalised with mean/std)",
    "cell mask (0/1)",
    "nucleus mask (0/1)",
]


def autocast_off(device_type: str):
    """A context in which autocast is off on ``device_type`` (for sums that need float32).

    Where the device has no autocast at all (Apple MPS before torch 2.5) there is nothing
    to turn off, and ``torch.autocast(..., enabled=False)`` itself raises there.
    """
    import contextlib

    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None:
        supported = bool(available(device_type))
    else:  # torch < 2.4: autocast for these device types only
        supported = device_type in ("cpu", "cuda", "xpu", "hpu")
    return torch.autocast(device_type=device_type, enabled=False) if supported else contextlib.nullcontext()


class SmearClassifier(nn.Module):
    """Base class: stores ``num_classes`` and the rebuild ``config``, checks inputs.

    Subclasses set ``kind``, ``default_config`` and implement ``forward(x, morph=None)``
    returning a dict with ``logits`` (B, C) and ``attention`` (B, S, S) in [0, 1], plus
    ``attention_logits`` (B, S, S) when ``has_attention_logits`` is true.
    """

    kind: ClassVar[str] = ""
    default_config: ClassVar[dict[str, Any]] = {}
    #: Whether ``forward`` returns ``attention_logits`` usable for supervised attention.
    has_attention_logits: ClassVar[bool] = True

    def __init__(self, num_classes: int, **config: Any):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        unknown = sorted(set(config) - set(self.default_config))
        if unknown:
            raise TypeError(
                f"unknown config key(s) {unknown} for model kind {self.kind!r}; "
                f"accepted keys: {sorted(self.default_config)}"
            )
        merged = {**self.default_config, **config}
        # Normalise tuples to lists so the config survives a JSON round trip unchanged.
        try:
            merged = json.loads(json.dumps(merged, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"model config values must be JSON-serialisable (int, float, str, lists): {exc}") from exc
        self.num_classes = num_classes
        self.config: dict[str, Any] = merged

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error when ``x`` is not a (B, 5, S, S) float tensor with S % 16 == 0."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != NUM_INPUT_CHANNELS:
            raise ValueError(
                f"x must have shape (B, {NUM_INPUT_CHANNELS}, S, S) (RGB, cell mask, "
                f"nucleus mask), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got dtype {x.dtype}")
        height, width = x.shape[-2:]
        if height != width or height % SIZE_MULTIPLE:
            raise ValueError(
                f"crops must be square with a side divisible by {SIZE_MULTIPLE}, got {height}x{width}"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}, config={self.config}"


def select_input_channels(x: torch.Tensor, use_mask_channels: bool) -> torch.Tensor:
    """The RGB channels, or all five channels when the model also reads the masks."""
    return x if use_mask_channels else x[:, RGB_CHANNELS]


def mlp_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Linear, ReLU, Dropout, Linear: the fusion / classifier MLP of several models.

    The positions of the layers are part of the weight names in model files
    (``fusion.0.weight``, ``fusion.3.bias``...): changing this layout breaks loading
    every saved model that uses it.
    """
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def upsample_map(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize (B, h, w) or (B, 1, h, w) maps to (B, size, size)."""
    if maps.ndim == 3:
        maps = maps[:, None]
    maps = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    return maps[:, 0]


def minmax_normalise(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each (h, w) map of a (B, h, w) batch to [0, 1].

    A constant map (no spatial preference) becomes all ones: uniform attention.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    span = high - low
    scaled = (maps - low) / span.clamp_min(eps)
    return torch.where(span > eps, scaled, torch.ones_like(maps))


def sigmoid_attention_outputs(logits: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Upsample low-resolution attention logits and return them with their sigmoid.

    The logits are resized (not the probabilities) so that
    ``attention == sigmoid(attention_logits)`` holds exactly at crop resolution.
    """
    upsampled = upsample_map(logits, size)
    return {"attention": torch.sigmoid(upsampled), "attention_logits": upsampled}


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d folded into the conv before it.

    Folding removes the BatchNorm passes (memory-bound, slow on CPU): inference gets
    faster (measured 1.2-1.7x on CPU with bf16) with the same outputs up to float
    rounding. The copy is for inference only: it cannot be trained or saved with
    ``save_model`` (its parameter names differ); keep the original for that.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .backbone import BasicBlock

    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, BasicBlock):
            module.conv1 = fuse_conv_bn_eval(module.conv1, module.bn1)
            module.bn1 = nn.Identity()
            module.conv2 = fuse_conv_bn_eval(module.conv2, module.bn2)
            module.bn2 = nn.Identity()
        elif isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[index] = fuse_conv_bn_eval(conv, norm)
                    module[index + 1] = nn.Identity()
    fused.is_fused_for_inference = True
    return fused
