"""Overlapping tiles for large images, with labels stitched across tile borders.

A tile is processed with a margin wider than the largest cell; a cell belongs to the
tile whose core holds its centroid, so every cell is segmented whole exactly once and
memory stays bounded by the tile size, not the image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Tile:
    core: tuple[slice, slice]  # where this tile's cells' centroids must lie
    window: tuple[slice, slice]  # core plus margin, clipped to the image


def iter_tiles(shape: tuple[int, int], core_size: int, margin: int) -> Iterator[Tile]:
    h, w = shape
    for y0 in range(0, h, core_size):
        for x0 in range(0, w, core_size):
            y1, x1 = min(y0 + core_size, h), min(x0 + core_size, w)
            yield Tile(
                core=(slice(y0, y1), slice(x0, x1)),
                window=(
                    slice(max(0, y0 - margin), min(h, y1 + margin)),
                    slice(max(0, x0 - margin), min(w, x1 + margin)),
                ),
            )


def n_tiles(shape: tuple[int, int], core_size: int) -> int:
    return -(-shape[0] // core_size) * -(-shape[1] // core_size)
