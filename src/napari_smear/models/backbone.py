"""Compact residual CNN shared by every classifier (plain torch, no torchvision).

Layout: a stem (3x3 conv, stride ``stem_stride``) followed by four stages of
BasicBlocks at strides 1, 2, 2, 2, so the total stride is ``16`` with the default
``stem_stride=2``: a 96x96 crop gives 6x6 final feature maps, a 64x64 crop 4x4.
Only convolutions, BatchNorm, ReLU and additions are used, so the network runs in
``torch.channels_last`` memory format and under autocast (bf16 on CPU, fp16/bf16 on
CUDA) without changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Strides of the four stages, after the stem.
STAGE_STRIDES = (1, 2, 2, 2)


def _as_int_tuple(values: Sequence[int], name: str, length: int) -> tuple[int, ...]:
    try:
        result = tuple(int(v) for v in values)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of {length} ints, got {values!r}") from exc
    if len(result) != length or any(v < 1 for v in result):
        raise ValueError(f"{name} must be {length} positive ints, got {values!r}")
    return result


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU (no conv bias: BatchNorm has one)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Zero-initialised last BN: each block starts as the identity, which makes
        # small-data training of residual nets markedly more stable (Goyal et al. 2017).
        nn.init.zeros_(self.bn2.weight)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResidualBackbone(nn.Module):
    """Stem plus four residual stages; returns feature maps.

    Parameters
    ----------
    in_channels : int
        Number of input channels (3 for RGB, 5 for RGB plus the two masks).
    widths : sequence of 4 ints
        Channels of the four stages; the stem has ``widths[0]`` channels.
    depths : sequence of 4 ints
        BasicBlocks per stage.
    stem_stride : int
        Stride of the stem convolution (2 by default, giving a total stride of 16).

    Attributes
    ----------
    out_channels : int
        Channels of the last stage (``widths[-1]``).
    stage_strides : tuple of int
        Cumulative stride (input pixels per feature pixel) after each stage.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (24, 48, 96, 192),
        depths: Sequence[int] = (1, 1, 1, 1),
        stem_stride: int = 2,
    ):
        super().__init__()
        widths = _as_int_tuple(widths, "widths", 4)
        depths = _as_int_tuple(depths, "depths", 4)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem = conv_bn_relu(in_channels, widths[0], stride=stem_stride)
        stages = []
        previous = widths[0]
        for width, depth, stride in zip(widths, depths, STAGE_STRIDES):
            blocks = [BasicBlock(previous, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = widths[-1]
        self.widths = widths
        cumulative = []
        total = stem_stride
        for stride in STAGE_STRIDES:
            total *= stride
            cumulative.append(total)
        self.stage_strides = tuple(cumulative)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of the last stage, shape (B, widths[-1], H/16, W/16)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class ShapeEncoder(nn.Module):
    """A light plain CNN for the mask channels, total stride 16 like the backbone.

    One stride-2 conv-BN-ReLU per halving, then one stride-1 layer, so its feature map
    lines up pixel for pixel with the backbone's last stage.
    """

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = (8, 16, 32, 64)):
        super().__init__()
        widths = _as_int_tuple(widths, "shape_widths", 4)
        layers = []
        previous = in_channels
        for width in widths:
            layers.append(conv_bn_relu(previous, width, stride=2))
            previous = width
        layers.append(conv_bn_relu(previous, previous, stride=1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
