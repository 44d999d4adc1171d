"""Whole-smear segmentation: every white cell (nucleus + cytoplasm), red cell and
platelet of a stained smear field, at any magnification and size."""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pandas as pd

from .cells import CellParams, segment_field
from .scale import (
    RBC_DIAMETER_UM,
    ScaleEstimateError,
    estimate_rbc_diameter,
    rbc_diameter_from_pixel_size,
)
from .stain import StainModel, estimate_stain, stain_channels
from .tiles import iter_tiles, n_tiles
from .types import CELL_TYPES, TABLE_COLUMNS, SmearSegmentation

__all__ = [
    "segment_smear",
    "SmearSegmentation",
    "CellParams",
    "CELL_TYPES",
    "TABLE_COLUMNS",
    "estimate_rbc_diameter",
    "ScaleEstimateError",
    "RBC_DIAMETER_UM",
]

ProgressCallback = Callable[[float, str], None]

# Segmentation runs where a red cell is about this many pixels across: enough to split
# touching cells and find platelets, and fast at any magnification.
DEFAULT_WORKING_DIAMETER_PX = 24.0
# Fields up to this size are processed whole; larger ones in tiles.
_SINGLE_PASS_MAX_PIXELS = 12_000_000


def segment_smear(
    image,
    *,
    pixel_size_um: float | None = None,
    rbc_diameter_px: float | None = None,
    working_diameter_px: float = DEFAULT_WORKING_DIAMETER_PX,
    tile_size: int = 2048,
    params: CellParams | None = None,
    n_workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> SmearSegmentation:
    """Segment every cell of a stained blood or bone-marrow smear field.

    Parameters
    ----------
    image : array-like
        RGB field (H, W, 3); grayscale, RGBA, 16-bit and float images are converted
        (see :func:`napari_smear.io.as_rgb_uint8`), stacks are rejected.
    pixel_size_um : float, optional
        Pixel size in micrometres. Overrides the automatic scale (a red cell is taken
        as 7.5 um across).
    rbc_diameter_px : float, optional
        Red-cell diameter in pixels; overrides both the estimate and ``pixel_size_um``.
    working_diameter_px : float
        Fields are processed downscaled so that a red cell is about this many pixels
        across (never upscaled).
    tile_size : int
        Core size (working-resolution pixels) of a tile for large images.
    params : CellParams, optional
        Size and shape settings, expressed in red-cell diameters.
    n_workers : int, optional
        Threads for tiles of large images (default: CPU count).
    progress : callable, optional
        ``progress(fraction, message)``; raise inside it to cancel.

    Returns
    -------
    SmearSegmentation
    """
    from ..io import as_rgb_uint8

    rgb = as_rgb_uint8(image)
    params = params or CellParams()
    report = progress or (lambda fraction, message: None)
    report(0.0, "estimating stain and scale")

    stain = estimate_stain(_subsample(rgb, 4_000_000))
    if rbc_diameter_px is not None:
        if not np.isfinite(rbc_diameter_px) or rbc_diameter_px <= 0:
            raise ValueError(f"rbc_diameter_px must be positive, got {rbc_diameter_px!r}")
        diameter = float(rbc_diameter_px)
    elif pixel_size_um is not None:
        diameter = rbc_diameter_from_pixel_size(pixel_size_um)
    else:
        diameter = _estimate_diameter(rgb, stain)
        if diameter is None:
            warnings.warn(
                "no stained cells found in the field: returning an empty segmentation",
                stacklevel=2,
            )
            return _empty(rgb.shape[:2], math.nan, pixel_size_um)

    factor = min(1.0, working_diameter_px / diameter)
    d_work = diameter * factor
    core = int(tile_size / factor)
    margin = int(math.ceil(3.0 * diameter))
    h, w = rgb.shape[:2]

    labels = np.zeros((h, w), np.uint32)
    nuclei = np.zeros((h, w), np.uint32)
    tables: list[pd.DataFrame] = []

    if h * w <= _SINGLE_PASS_MAX_PIXELS:
        tiles = [None]
    else:
        tiles = list(iter_tiles((h, w), core, margin))

    def run(tile):
        window = tile.window if tile is not None else (slice(0, h), slice(0, w))
        lab, nuc, types = _segment_window(rgb[window], stain, factor, d_work, params)
        return tile, window, lab, nuc, types

    next_id = 1
    total = len(tiles)
    workers = n_workers or min(4, _cpu_count())
    with ThreadPoolExecutor(max_workers=workers if total > 1 else 1) as pool:
        for done, (tile, window, lab, nuc, types) in enumerate(pool.map(run, tiles)):
            next_id = _paste(
                labels, nuclei, tables, tile, window, lab, nuc, types, next_id
            )
            report((done + 1) / total, f"segmented tile {done + 1}/{total}")

    table = (
        pd.concat(tables, ignore_index=True) if tables else _empty_table()
    )
    return SmearSegmentation(
        labels=labels,
        nuclei=nuclei,
        table=table,
        rbc_diameter_px=float(diameter),
        pixel_size_um=pixel_size_um,
        params={"working_diameter_px": working_diameter_px, "scale_factor": factor},
    )


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _subsample(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    step = int(math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / max_pixels)))
    return rgb[::step, ::step] if step > 1 else rgb


def _estimate_diameter(rgb: np.ndarray, stain: StainModel) -> float | None:
    """Red-cell diameter from native-resolution windows of the field."""
    h, w = rgb.shape[:2]
    side = 1536
    if h * w <= 4 * side * side:
        windows = [rgb]
    else:  # a 3x3 grid of native-resolution windows samples the whole slide
        ys = np.linspace(0, h - side, 3).astype(int)
        xs = np.linspace(0, w - side, 3).astype(int)
        windows = [rgb[y : y + side, x : x + side] for y in ys for x in xs]
    estimates = []
    for win in windows:
        density, _ = stain_channels(win, stain)
        try:
            estimates.append(estimate_rbc_diameter(density > stain.foreground_threshold))
        except ScaleEstimateError:
            continue
    if not estimates:
        if not (stain_channels(_subsample(rgb, 1_000_000), stain)[0] > stain.foreground_threshold).any():
            return None
        raise ScaleEstimateError(
            "could not measure the red-cell size in this field (too few round cells); "
            "pass pixel_size_um= or rbc_diameter_px="
        )
    return float(np.median(estimates))


def _resize_rgb(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp_(0, 255).round_().to(torch.uint8).numpy()


def _upsample_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape == shape:
        return labels
    ys = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(np.intp)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(np.intp)
    return labels[ys[:, None], xs[None, :]]


def _segment_window(rgb, stain, factor, d_work, params):
    h, w = rgb.shape[:2]
    if factor < 1.0:
        small = _resize_rgb(rgb, (max(1, round(h * factor)), max(1, round(w * factor))))
    else:
        small = rgb
    lab, nuc, types = segment_field(small, stain, d_work, params)
    return _upsample_nearest(lab, (h, w)), _upsample_nearest(nuc, (h, w)), types


def _object_table(lab: np.ndarray, offset_y: int, offset_x: int) -> pd.DataFrame:
    from skimage.measure import regionprops_table

    props = regionprops_table(lab, properties=("label", "centroid", "bbox", "area"))
    return pd.DataFrame(
        {
            "label": props["label"].astype(np.int64),
            "centroid_y": props["centroid-0"] + offset_y,
            "centroid_x": props["centroid-1"] + offset_x,
            "bbox_min_y": props["bbox-0"] + offset_y,
            "bbox_min_x": props["bbox-1"] + offset_x,
            "bbox_max_y": props["bbox-2"] + offset_y,
            "bbox_max_x": props["bbox-3"] + offset_x,
            "area_px": props["area"].astype(np.int64),
        }
    )


def _paste(labels, nuclei, tables, tile, window, lab, nuc, types, next_id) -> int:
    """Write the tile's own cells (centroid in its core) into the image, renumbered."""
    oy, ox = window[0].start, window[1].start
    table = _object_table(lab, oy, ox)
    if tile is not None:
        cy, cx = tile.core
        own = (
            (table.centroid_y >= cy.start) & (table.centroid_y < cy.stop)
            & (table.centroid_x >= cx.start) & (table.centroid_x < cx.stop)
        )
        table = table[own.to_numpy()]
    if table.empty:
        return next_id
    old = table["label"].to_numpy()
    lut = np.zeros(int(lab.max()) + 1, np.uint32)
    lut[old] = np.arange(next_id, next_id + len(old), dtype=np.uint32)
    new_lab = lut[lab]
    new_nuc = lut[nuc]
    target = labels[window]
    free = target == 0
    target[free] = new_lab[free]
    nuclei[window][new_nuc > 0] = new_nuc[new_nuc > 0]
    table = table.assign(
        label=lut[old].astype(np.int64),
        cell_type=[types[int(i)] for i in old],
    )
    tables.append(table[list(TABLE_COLUMNS)])
    return next_id + len(old)


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype="object" if c == "cell_type" else "float64") for c in TABLE_COLUMNS}
    ).astype({"label": "int64", "area_px": "int64"})


def _empty(shape, diameter, pixel_size_um) -> SmearSegmentation:
    return SmearSegmentation(
        labels=np.zeros(shape, np.uint32),
        nuclei=np.zeros(shape, np.uint32),
        table=_empty_table(),
        rbc_diameter_px=diameter,
        pixel_size_um=pixel_size_um,
    )
