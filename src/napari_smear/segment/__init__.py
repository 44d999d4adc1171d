"""Whole-smear segmentation: every white cell (nucleus + cytoplasm), red cell and
platelet of a stained smear field, at any magnification and size."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .._workers import process_pool
from . import binary
from .cells import CellParams, _area, segment_field
from .field_of_view import fill_outside_view, find_not_specimen, find_outside_view, find_overlay
from .scale import (
    RBC_DIAMETER_UM,
    ScaleEstimateError,
    estimate_rbc_diameter,
    rbc_diameter_from_pixel_size,
)
from .stain import FieldChannels, StainModel, _estimate_stain, stain_channels
from .tiles import Tile, iter_tiles
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
    "find_outside_view",
    "find_overlay",
    "fill_outside_view",
    "refresh_table",
]

ProgressCallback = Callable[[float, str], None]

# Segmentation runs where a red cell is about this many pixels across: enough to split
# touching cells and find platelets, and fast at any magnification.
DEFAULT_WORKING_DIAMETER_PX = 24.0
# Coarser than this, touching red cells merge and platelets vanish: at 12 px one Chula
# field gave 118 red cells against 122 at 16 and 24 px, at 8 px 108 (and a synthetic
# field 5 platelets of 6); 16 px is the coarsest measured on the whole benchmarks.
MIN_WORKING_DIAMETER_PX = 12.0
# Fields up to this size are processed whole; larger ones in tiles.
_SINGLE_PASS_MAX_PIXELS = 12_000_000
# The ruler is measured on the whole field up to this size, above it on five windows
# of _SCALE_WINDOW_SIDE; fields up to _SCALE_WINDOWS_ONLY_MIN_PIXELS are measured
# whole when no window holds enough cells.
_SCALE_WHOLE_FIELD_MAX_PIXELS = 2 * 1536 * 1536
_SCALE_WINDOW_SIDE = 1024
_SCALE_WINDOWS_ONLY_MIN_PIXELS = 4 * 1536 * 1536
# A window measures cells it holds at least this many of across; larger cells (a high
# magnification, an upscaled photo: 180 px measured on a BCCD field upscaled 4 times,
# whose cells are 357 px) are measured on the whole field, subsampled.
_SCALE_MIN_CELLS_ACROSS_WINDOW = 8


def segment_smear(
    image,
    *,
    pixel_size_um: float | None = None,
    rbc_diameter_px: float | None = None,
    recorded_pixel_size_um: float | None = None,
    working_diameter_px: float | None = DEFAULT_WORKING_DIAMETER_PX,
    tile_size: int = 2048,
    params: CellParams | None = None,
    n_workers: int | None = None,
    progress: ProgressCallback | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
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
    recorded_pixel_size_um : float, optional
        The pixel size the image file records (OME ``PhysicalSizeX``, resolution tags:
        ``read_image``'s ``meta["pixel_size_um"]``). Unlike ``pixel_size_um`` it is
        checked: the red cells are measured as well, and the file's calibration is used
        when the two agree within a factor of :data:`RECORDED_SCALE_TOLERANCE` (or when
        the field is too sparse, or has too few round cells, to measure). Otherwise it is
        taken for a wrong calibration (written without the objective's magnification,
        a camera program's default) and the measured scale is used, with a warning. A
        ``pixel_size_um`` or ``rbc_diameter_px`` given as well wins over it.
    working_diameter_px : float, optional
        Fields are processed downscaled so that a red cell is about this many pixels
        across (never upscaled); None means the default, 24; at least 12. Lower is faster on
        large images at a small cost in accuracy (16: 1.5 times as fast on a 100 MP
        scan; docs/benchmarks.md, "Working resolution").
    tile_size : int
        Core size (working-resolution pixels) of a tile for large images.
    params : CellParams, optional
        Size and shape settings, expressed in red-cell diameters.
    n_workers : int, optional
        Worker processes for the tiles of large images (default: one per CPU, at
        most 4; 1 runs them in this process).
    progress : callable, optional
        ``progress(fraction, message)``; raise inside it to cancel.
    out : (labels, nuclei), optional
        Two writable (H, W) uint32 arrays to write the label images into (they are
        zeroed first), instead of new ones in memory; the result holds them. For a
        slide larger than memory pass memory-mapped files (``np.memmap``) here and a
        memory-mapped image (:func:`napari_smear.io.open_image_on_disk`): the tiles
        are then read and written through the files, and working memory stays that
        of a few tiles (``napari-smear segment --on-disk`` does this).

    Returns
    -------
    SmearSegmentation
    """
    from ..io import as_rgb_uint8

    working_diameter_px = check_working_diameter(working_diameter_px)
    for name, value in (("pixel_size_um", pixel_size_um), ("rbc_diameter_px", rbc_diameter_px),
                        ("recorded_pixel_size_um", recorded_pixel_size_um)):
        _check_positive(name, value)
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer))
                                  or n_workers < 1):
        raise ValueError(f"n_workers must be a whole number >= 1 (1: in this process), or None, got {n_workers!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 64:
        raise ValueError(f"tile_size must be an integer >= 64 (working pixels), got {tile_size!r}")
    rgb = as_rgb_uint8(image)
    if out is not None:
        _check_out(out, rgb.shape[:2])
    # the black surround of an eyepiece photo (or a scan's unscanned fill) looks like
    # the densest stain, a burned-in green scale bar like a violet nucleus: both are
    # painted as glass first, and cells at their rim marked cut
    painted, frame, overlay = find_not_specimen(rgb)
    if painted is not None:
        rgb = fill_outside_view(rgb, painted)
    # what is warned about is also kept in the result (params["warnings"]): a widget
    # running this on a helper thread, or a batch, shows it with its image
    notes: list[str] = []

    def warn(note: str) -> None:
        notes.append(note)
        warnings.warn(note, stacklevel=3)  # the caller of segment_smear

    sample = _subsample(rgb, 250_000)
    if (sample[..., 0] == sample[..., 1]).all() and (sample[..., 1] == sample[..., 2]).all():
        warn(
            "the image has no colour (grayscale): white cells are told apart by the violet of their "
            "nuclei, so none will be found, and colour classifiers see no stain; use the colour image"
        )
    params = params or CellParams()
    report = progress or (lambda fraction, message: None)
    report(0.0, "estimating stain and scale")

    h, w = rgb.shape[:2]
    large = h * w > _SINGLE_PASS_MAX_PIXELS
    workers = max(1, n_workers or min(4, _cpu_count())) if large else 1
    with process_pool(workers) as pool:
        stain_sample = _subsample(rgb, 4_000_000)
        stain, channels = _estimate_stain(stain_sample)
        if stain_sample is not rgb:  # what was computed on the sample is not the field's
            channels = None
        report(0.0, "measuring the red-cell size")  # each report is also a chance to cancel
        if rbc_diameter_px is not None or pixel_size_um is not None:  # checked by _check_positive above
            if rbc_diameter_px is not None:
                diameter = float(rbc_diameter_px)
            else:
                diameter = rbc_diameter_from_pixel_size(pixel_size_um)
            _check_explicit_diameter(diameter, rgb.shape[:2], pixel_size_um, rbc_diameter_px)
        else:
            try:
                diameter, stained_share = _measure_scale(rgb, stain, pool, channels)
            except ScaleEstimateError:
                if recorded_pixel_size_um is None:
                    raise
                diameter, stained_share = None, math.nan  # nothing to check the file's scale against
            if diameter is None and not math.isnan(stained_share):
                warn("no stained cells found in the field: returning an empty segmentation")
                empty = _empty(rgb.shape[:2], math.nan, pixel_size_um, out)
                empty.params["warnings"] = notes
                return empty
            few = None if diameter is None else _few_cells_note(rgb.shape[:2], stained_share, diameter)
            if recorded_pixel_size_um is not None:
                diameter, pixel_size_um, conflict = _checked_recorded_scale(
                    recorded_pixel_size_um, diameter, trust_measured=few is None, shape=rgb.shape[:2])
                if conflict:
                    warn(conflict)
                elif pixel_size_um is not None:
                    few = None  # the file's calibration, confirmed or not contradicted, stands
            if few:
                warn(few)

        factor = min(1.0, working_diameter_px / diameter)
        d_work = diameter * factor
        core = int(tile_size / factor)
        margin = int(math.ceil(3.0 * diameter))

        labels, nuclei = _label_images((h, w), out)
        tables: list[pd.DataFrame] = []

        if not large:
            tiles = [Tile(core=(slice(0, h), slice(0, w)), window=(slice(0, h), slice(0, w)))]
        else:
            tiles = list(iter_tiles((h, w), core, margin))

        def shrink(tile: Tile) -> np.ndarray:
            window = rgb[tile.window]
            if factor >= 1.0:
                return window
            th, tw = window.shape[:2]
            return _resize_rgb(window, (max(1, round(th * factor)), max(1, round(tw * factor))))

        next_id = 1
        total = len(tiles)
        finished = 0

        def queued(index: int) -> None:
            # the first results take a while on a large image: a cancel is seen between tiles
            report(finished / total, f"segmenting tile {index + 1}/{total}")

        for done, (tile, result) in enumerate(
            _map_tiles(tiles, shrink, stain, d_work, params, pool, workers, on_queued=queued)
        ):
            next_id = _paste(
                labels, nuclei, tables, tile, result, next_id, rgb, stain, factor, d_work,
                min_area_px=params.min_platelet_area * np.pi * (d_work / factor) ** 2 / 4,
            )
            finished = done + 1
            report(finished / total, f"segmented tile {finished}/{total}")

    table = pd.concat(tables, ignore_index=True) if tables else _empty_table()
    if painted is not None:
        table = _drop_cells_outside_view(table, labels, nuclei, painted, next_id)
    if len(table) and int(table.label.iloc[-1]) != len(table):
        # a cell wholly covered at a seam left a gap in the ids: number them 1..N
        lut = np.zeros(next_id, np.uint32)
        lut[table.label.to_numpy()] = np.arange(1, len(table) + 1, dtype=np.uint32)
        _relabel(labels, nuclei, lut)
        table = table.assign(label=np.arange(1, len(table) + 1, dtype=np.int64))
    table = _mark_edge_cells(table, (h, w), labels, painted)
    params_used = {"working_diameter_px": working_diameter_px, "scale_factor": factor, "warnings": notes}
    if frame is not None:
        params_used["outside_view_share"] = float(frame.mean())
    if overlay is not None:  # what the widget and the batch say was painted out
        params_used["overlay_share"] = float(overlay.mean())
    return SmearSegmentation(
        labels=labels,
        nuclei=nuclei,
        table=table,
        rbc_diameter_px=float(diameter),
        pixel_size_um=pixel_size_um,
        params=params_used,
    )


# Below this many red cells' worth of stained area the ruler has too little to go on: in
# a small crop around a white cell it can measure the white cell (BCCD crops of 300 x 400
# px around one measured 193 px against the field's 96 px). PBC's single-cell images,
# the smallest fields the ruler is known to measure right, hold 6.5 or more.
_FEW_CELLS_FOR_RULER = 5.0


def _few_cells_note(shape: tuple[int, int], stained_share: float, diameter: float) -> str | None:
    """The warning for a field too sparse for the measured red-cell size to be trusted
    (``stained_share``: the stained share of the pixels the ruler measured); else None."""
    cells = stained_share * shape[0] * shape[1] / (math.pi * diameter * diameter / 4)
    if cells >= _FEW_CELLS_FOR_RULER:
        return None
    return (
        f"the field holds only about {cells:.1f} red cells' worth of stained area, too little to measure "
        f"the red-cell size reliably (measured {diameter:.0f} px across); if the cells come out too large "
        "or too small, give the pixel size (pixel_size_um, --pixel-size-um, the Segment widget's box) or the "
        "red-cell diameter in pixels (rbc_diameter_px)"
    )


def _check_out(out, shape: tuple[int, int]) -> None:
    """``out`` of :func:`segment_smear`: two distinct writable (H, W) uint32 arrays."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out must be a (labels, nuclei) pair of arrays, got {type(out).__name__}")
    for name, array in zip(("labels", "nuclei"), out):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"out's {name} must be a numpy array (np.memmap for a file), got {type(array).__name__}")
        if array.shape != tuple(shape) or array.dtype != np.uint32:
            raise ValueError(
                f"out's {name} must be a {shape[0]} x {shape[1]} uint32 array (the image's height and width), "
                f"got shape {array.shape}, dtype {array.dtype}"
            )
        if not array.flags.writeable:
            raise ValueError(f"out's {name} is read-only (a memory map opened with mode 'r'?)")
    if np.may_share_memory(out[0], out[1]):
        raise ValueError("out's labels and nuclei must be two separate arrays")


def check_working_diameter(working_diameter_px) -> float:
    """The working resolution to use: the default for None, else a number of at least
    ``MIN_WORKING_DIAMETER_PX`` (a clear error otherwise)."""
    if working_diameter_px is None:
        return DEFAULT_WORKING_DIAMETER_PX
    _check_positive("working_diameter_px", working_diameter_px)
    if working_diameter_px < MIN_WORKING_DIAMETER_PX:
        raise ValueError(
            f"working_diameter_px must be at least {MIN_WORKING_DIAMETER_PX:g} (a red cell that many working "
            f"pixels across; coarser, touching cells merge), got {working_diameter_px!r}"
        )
    return float(working_diameter_px)


def _check_positive(name: str, value) -> None:
    """A size argument: None (not given) or a finite number > 0; a clear error otherwise."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _map_tiles(tiles, shrink, stain, d_work, params, pool, workers, on_queued=None):
    """Yield (tile, segment_field result) in tile order; ``on_queued(i)`` is called as
    tile ``i`` starts (is handed to a worker).

    With a pool, the tiles are segmented in its worker processes (the work is
    mostly numpy/scipy calls that hold the GIL, so threads would not run it in
    parallel). The parent downscales the tiles and keeps at most two per worker
    in flight, so memory stays bounded by the tile size.
    """
    queued = on_queued or (lambda index: None)
    if pool is None or len(tiles) == 1:
        for index, tile in enumerate(tiles):
            queued(index)
            small = shrink(tile)
            yield tile, segment_field(small, stain, d_work, params)
        return
    from collections import deque

    pending: deque = deque()
    try:
        for index, tile in enumerate(tiles):
            queued(index)
            small = shrink(tile)
            pending.append((tile, pool.submit(segment_field, small, stain, d_work, params)))
            del small
            while len(pending) >= 2 * workers:
                done_tile, future = pending.popleft()
                yield done_tile, future.result()
        while pending:
            done_tile, future = pending.popleft()
            yield done_tile, future.result()
    finally:  # cancelled (an exception from progress) or failed: drop what is queued
        for _, future in pending:
            future.cancel()


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _subsample_step(shape: tuple[int, ...], max_pixels: int) -> int:
    """The step that brings an image of ``shape`` to at most ``max_pixels`` pixels."""
    return max(1, int(math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels))))


def _subsample(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    step = _subsample_step(rgb.shape, max_pixels)
    return rgb[::step, ::step] if step > 1 else rgb


def _measure_window(
    window: np.ndarray, stain: StainModel, channels: FieldChannels | None = None
) -> tuple[float | None, float]:
    """Red-cell diameter of a window (None when it cannot be measured) and the share of
    its pixels that are stained matter (``channels``: the window's, when known)."""
    stained = stain_channels(window, stain, channels)[0] > stain.foreground_threshold
    try:
        diameter = estimate_rbc_diameter(stained)
    except ScaleEstimateError:
        diameter = None
    return diameter, float(stained.mean())


def _window_diameter(window: np.ndarray, stain: StainModel) -> float | None:
    return _measure_window(window, stain)[0]


def _estimate_diameter(rgb: np.ndarray, stain: StainModel, pool=None) -> float | None:
    """Red-cell diameter from native-resolution windows of the field (see :func:`_measure_scale`)."""
    return _measure_scale(rgb, stain, pool)[0]


def _measure_scale(
    rgb: np.ndarray, stain: StainModel, pool=None, channels: FieldChannels | None = None
) -> tuple[float | None, float]:
    """Red-cell diameter from native-resolution windows of the field (measured in the
    worker processes of ``pool`` when given; None for a field with no stained matter),
    and the stained share of the pixels it was measured on (``channels``: the whole
    field's, from :func:`stain._estimate_stain`, reused when it is measured whole)."""
    h, w = rgb.shape[:2]
    found: list[tuple[float | None, float]] = []
    if h * w > _SCALE_WHOLE_FIELD_MAX_PIXELS:
        # The centre and four points around it sample the whole slide: hundreds of
        # red cells at any magnification, and on a 3000 x 3000 field less than half
        # the time that measuring every pixel took (2.7 s against 6.3 s on one core).
        side = min(_SCALE_WINDOW_SIDE, h, w)
        ys = np.linspace(0, h - side, 5).astype(int)[[1, 2, 3]]
        xs = np.linspace(0, w - side, 5).astype(int)[[1, 2, 3]]
        spots = [(ys[1], xs[1]), (ys[0], xs[0]), (ys[0], xs[2]), (ys[2], xs[0]), (ys[2], xs[2])]
        windows = [rgb[y : y + side, x : x + side] for y, x in spots]
        if pool is not None:
            found = list(pool.map(_measure_window, windows, [stain] * len(windows)))
        else:
            found = [_measure_window(win, stain) for win in windows]
        estimates = [v for v, _ in found if v is not None]
        too_large = bool(estimates) and np.median(estimates) * _SCALE_MIN_CELLS_ACROSS_WINDOW > side
        if too_large or (not estimates and h * w > _SCALE_WINDOWS_ONLY_MIN_PIXELS):
            # too few cells across a window to measure them (or none found in a field too
            # large to measure whole): the whole field, every step-th pixel, at the size
            # measured whole
            step = _subsample_step(rgb.shape, _SCALE_WHOLE_FIELD_MAX_PIXELS)
            diameter, share = _measure_window(rgb[::step, ::step], stain)
            if diameter is not None:
                found = [(diameter * step, share)]
    estimates = [v for v, _ in found if v is not None]
    if not estimates and h * w <= _SCALE_WINDOWS_ONLY_MIN_PIXELS:
        # a small field, or a sparse one whose windows missed the cells: measure it whole
        found = [_measure_window(rgb, stain, channels)]
        estimates = [v for v, _ in found if v is not None]
    if not estimates:
        if not (stain_channels(_subsample(rgb, 1_000_000), stain)[0] > stain.foreground_threshold).any():
            return None, 0.0
        raise ScaleEstimateError(
            "could not measure the red-cell size in this field (too few round cells); give the pixel size "
            "(pixel_size_um, --pixel-size-um, the Segment widget's box) or the red-cell diameter in pixels "
            "(rbc_diameter_px)"
        )
    return float(np.median(estimates)), float(np.mean([share for _, share in found]))


def _resize_rgb(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # a read-only memory-mapped image: torch wants its own copy
        rgb = rgb.copy()
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp_(0, 255).round_().to(torch.uint8).numpy()


def _upsampling_index(n_full: int, n_small: int) -> np.ndarray:
    """Row (or column) of the working-resolution image each full-resolution one shows."""
    return np.minimum(((np.arange(n_full) + 0.5) * n_small / n_full).astype(np.intp), n_small - 1)


def _linear_weights(n_full: int, n_small: int):
    """Neighbouring working pixels and weights of each full-resolution row (or
    column) for linear interpolation between pixel centres."""
    position = np.clip((np.arange(n_full) + 0.5) * n_small / n_full - 0.5, 0, n_small - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, n_small - 1)
    return low, high, (position - low).astype(np.float32)


def _smooth_upsample(lab: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Working-resolution labels drawn at full resolution with smooth outlines.

    Nearest-neighbour upsampling leaves steps a working pixel wide on every outline
    (4 px on a camera field). The cells' outer outline is instead where the
    bilinearly interpolated foreground crosses one half, which cuts each step's
    corner; a cell too small to reach one half anywhere is drawn blockwise, so none
    is lost. Which cell a pixel belongs to still comes from the nearest working pixel
    (or, just outside a cell, from the cell next to it); the borders between
    touching cells are cut lines anyway. Done in row blocks: no float image of the
    full size.
    """
    ys = _upsampling_index(shape[0], lab.shape[0])
    xs = _upsampling_index(shape[1], lab.shape[1])
    y0, y1, wy = _linear_weights(shape[0], lab.shape[0])
    x0, x1, wx = _linear_weights(shape[1], lab.shape[1])
    foreground = (lab > 0).astype(np.float32)
    grown = np.where(lab > 0, lab, ndi.maximum_filter(lab, size=3))
    out = np.empty(shape, lab.dtype)
    for start in range(0, shape[0], 1024):
        rows = slice(start, start + 1024)
        weight = wy[rows, None]
        between = foreground[y0[rows]] * (1 - weight) + foreground[y1[rows]] * weight
        inside = between[:, x0] * (1 - wx) + between[:, x1] * wx > 0.5
        block = grown[ys[rows, None], xs[None, :]]
        block[~inside] = 0
        out[rows] = block
    # a cell of one or two working pixels can fall below one half everywhere when
    # the image is barely downscaled: it is drawn blockwise instead
    n = int(lab.max()) + 1
    lost = np.flatnonzero((np.bincount(lab.ravel(), minlength=n) > 0) & (np.bincount(out.ravel(), minlength=n) == 0))
    lost = lost[lost > 0]
    if lost.size:
        boxes = ndi.find_objects(lab)
        for label in lost:
            by, bx = boxes[label - 1]
            fy = slice(np.searchsorted(ys, by.start), np.searchsorted(ys, by.stop - 1, side="right"))
            fx = slice(np.searchsorted(xs, bx.start), np.searchsorted(xs, bx.stop - 1, side="right"))
            blockwise = lab[ys[fy, None], xs[None, fx]] == label
            out[fy, fx][blockwise] = label
    return out


def _label_stats(lab: np.ndarray) -> pd.DataFrame:
    """Area, centroid and bounding box of every label of ``lab``, in row blocks (no
    image-sized temporaries)."""
    return pd.DataFrame(_label_stat_arrays(lab))


def _label_stat_arrays(lab: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`_label_stats` as one array per column."""
    n = int(lab.max()) + 1 if lab.size else 1
    area = np.zeros(n)
    sum_y = np.zeros(n)
    sum_x = np.zeros(n)
    columns = np.arange(lab.shape[1], dtype=np.float64)
    for start in range(0, lab.shape[0], 512):
        block = lab[start : start + 512]
        rows = block.shape[0]
        flat = block.ravel()
        area += np.bincount(flat, minlength=n)
        sum_y += np.bincount(flat, weights=np.repeat(np.arange(start, start + rows, dtype=np.float64), block.shape[1]), minlength=n)
        sum_x += np.bincount(flat, weights=np.tile(columns, rows), minlength=n)
    ids = np.flatnonzero(area[1:] > 0) + 1
    boxes = ndi.find_objects(lab)
    rows = np.asarray(
        [(boxes[i - 1][0].start, boxes[i - 1][1].start, boxes[i - 1][0].stop, boxes[i - 1][1].stop) for i in ids],
        np.int64,
    ).reshape(-1, 4)
    return {
        "label": ids.astype(np.int64),
        "centroid_y": sum_y[ids] / area[ids],
        "centroid_x": sum_x[ids] / area[ids],
        "bbox_min_y": rows[:, 0],
        "bbox_min_x": rows[:, 1],
        "bbox_max_y": rows[:, 2],
        "bbox_max_x": rows[:, 3],
        "area_px": area[ids].astype(np.int64),
    }


def refresh_table(segmentation: SmearSegmentation) -> SmearSegmentation:
    """``segmentation`` with its table measured again from its labels, for labels edited
    by hand (napari's brush and eraser on the cells layer).

    A label no longer in the image loses its row; a label painted anew gets one, typed
    ``wbc`` when a nucleus carries its id, ``platelet`` when it is smaller than the
    smallest red cell the segmentation keeps, else ``rbc``; every cell's centroid, box,
    area and ``touches_edge`` are measured again. Unedited segmentations (the same
    labels with the same areas) come back as they are. ``params["edited"]`` says what
    changed (``removed``, ``added``, ``redrawn`` counts).
    """
    table = segmentation.table
    stats = _label_stats(segmentation.labels)
    old_area = dict(zip(table.label.to_numpy(np.int64), table.area_px.to_numpy(np.int64)))
    if len(stats) == len(table) and all(old_area.get(k) == a for k, a in zip(stats.label, stats.area_px)):
        return segmentation
    known = dict(zip(table.label.to_numpy(np.int64), table.cell_type))
    # counted in row blocks (np.unique would sort every pixel: seconds on a whole-slide region)
    nuclei = segmentation.nuclei
    present = np.zeros(int(nuclei.max()) + 1 if nuclei.size else 1, bool)
    for start in range(0, nuclei.shape[0], 1024):
        present[np.flatnonzero(np.bincount(nuclei[start : start + 1024].ravel(), minlength=len(present)))] = True
    with_nucleus = set(np.flatnonzero(present).tolist()) - {0}
    smallest_rbc = _area(segmentation.rbc_diameter_px, CellParams().min_rbc_area)
    types = [
        known.get(int(k)) or ("wbc" if int(k) in with_nucleus else "platelet" if a < smallest_rbc else "rbc")
        for k, a in zip(stats.label, stats.area_px)
    ]
    refreshed = _mark_edge_cells(stats.assign(cell_type=types)[list(TABLE_COLUMNS)], segmentation.labels.shape)
    if "touches_edge" in table.columns:  # untouched cells keep theirs (an eyepiece rim's too)
        kept = dict(zip(table.label.to_numpy(np.int64), table.touches_edge.to_numpy(bool)))
        refreshed["touches_edge"] = [
            kept[k] if old_area.get(k) == a else t
            for k, a, t in zip(stats.label, stats.area_px, refreshed.touches_edge)
        ]
    present = set(stats.label.tolist())
    edited = {
        "removed": sum(1 for k in old_area if k not in present),
        "added": sum(1 for k in present if k not in old_area),
        "redrawn": sum(1 for k, a in zip(stats.label, stats.area_px) if k in old_area and old_area[k] != a),
    }
    return SmearSegmentation(
        labels=segmentation.labels, nuclei=segmentation.nuclei, table=refreshed,
        rbc_diameter_px=segmentation.rbc_diameter_px, pixel_size_um=segmentation.pixel_size_um,
        params={**segmentation.params, "edited": edited},
    )


def _exact_stats(labels: np.ndarray, ids: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid and bounding box (the columns of :func:`_label_stats`) of ``ids``
    measured on the full-resolution ``labels``, each looked for inside its (y0, x0,
    y1, x1) box; a label not found there has area 0."""
    n = len(ids)
    centroids = np.full((n, 2), np.nan)
    box_rows = np.zeros((n, 4), np.int64)
    area = np.zeros(n, np.int64)
    for i, (label, (y0, x0, y1, x1)) in enumerate(zip(ids, boxes)):
        yy, xx = np.nonzero(labels[y0:y1, x0:x1] == label)
        if yy.size == 0:
            continue
        centroids[i] = yy.mean() + y0, xx.mean() + x0
        box_rows[i] = yy.min() + y0, xx.min() + x0, yy.max() + y0 + 1, xx.max() + x0 + 1
        area[i] = yy.size
    return {
        "label": np.asarray(ids, np.int64),
        "centroid_y": centroids[:, 0],
        "centroid_x": centroids[:, 1],
        "bbox_min_y": box_rows[:, 0],
        "bbox_min_x": box_rows[:, 1],
        "bbox_max_y": box_rows[:, 2],
        "bbox_max_x": box_rows[:, 3],
        "area_px": area,
    }


def _paste(labels, nuclei, tables, tile, result, next_id, rgb, stain, factor, d_work, min_area_px=0.0) -> int:
    """Write the tile's own cells (centroid in its core) into the image, renumbered.

    The cells are upsampled from working resolution with smooth outlines
    (:func:`_smooth_upsample`) straight into the image; a pixel already taken by a
    neighbouring tile's cell stays with that cell. White cells get their
    full-resolution outline and nucleus (:func:`_redraw_white_cells`). The table is
    measured on the upsampled labels; only cells that lost pixels at a seam, or
    were redrawn, are measured again. (Columns are kept as arrays until the tile's
    table is made: a BCCD field spent a tenth of its time in pandas indexing.)
    ``min_area_px``: the smallest cell (platelet) at full resolution; a cell left with
    under half of it after a seam or a white cell's redraw took its pixels is dropped.
    """
    lab, nuc, types, outlines = result
    window = tile.window
    oy, ox = window[0].start, window[1].start
    wh, ww = window[0].stop - oy, window[1].stop - ox
    drawn = _smooth_upsample(lab, (wh, ww))
    stats = _label_stat_arrays(drawn)
    cy, cx = tile.core
    gy, gx = stats["centroid_y"] + oy, stats["centroid_x"] + ox
    own = (gy >= cy.start) & (gy < cy.stop) & (gx >= cx.start) & (gx < cx.stop)
    if not own.any():
        return next_id
    stats = {column: values[own] for column, values in stats.items()}
    old = stats["label"]
    lut = np.zeros(int(lab.max()) + 1, np.uint32)
    lut[old] = np.arange(next_id, next_id + len(old), dtype=np.uint32)
    new_lab = lut[drawn]
    del drawn
    target = labels[window]
    conflict = (new_lab > 0) & (target > 0)
    touched = np.unique(new_lab[conflict])
    free = target == 0
    target[free] = new_lab[free]
    del new_lab, free, conflict
    ys = _upsampling_index(wh, lab.shape[0])
    xs = _upsampling_index(ww, lab.shape[1])
    new_nuc = lut[nuc][ys[:, None], xs[None, :]]
    nuc_target = nuclei[window]
    placed = (new_nuc > 0) & (target == new_nuc)
    nuc_target[placed] = new_nuc[placed]
    del new_nuc, placed

    # the tile's cells are numbered next_id, next_id + 1, ... in the order of ``stats``
    stats["label"] = lut[old].astype(np.int64)
    for column, offset in (("centroid_y", oy), ("bbox_min_y", oy), ("bbox_max_y", oy),
                           ("centroid_x", ox), ("bbox_min_x", ox), ("bbox_max_x", ox)):
        stats[column] = stats[column] + offset
    white = {int(lut[k]): v for k, v in outlines.items() if lut[k] > 0} if outlines else {}
    if white and factor < 1.0:
        scale = (wh / lab.shape[0], ww / lab.shape[1])
        claimable = np.zeros(next_id + len(old), bool)
        claimable[next_id:] = True  # this tile's cells; a neighbour tile's cells keep theirs
        claimable[list(white)] = False
        claimable[0] = True
        redrawn = _redraw_white_cells(
            target, nuc_target, white, claimable, scale, rgb[window], stain, d_work / factor
        )
        touched = np.union1d(touched, redrawn)
    touched = touched[touched > 0].astype(np.int64)
    if touched.size:
        # measure again at full resolution: boxes grown by the redraw's reach
        pad = int(math.ceil(2 / factor)) + 2
        rows = touched - next_id
        boxes = np.stack(
            [
                np.maximum(stats["bbox_min_y"][rows] - oy - pad, 0),
                np.maximum(stats["bbox_min_x"][rows] - ox - pad, 0),
                np.minimum(stats["bbox_max_y"][rows] - oy + pad, wh),
                np.minimum(stats["bbox_max_x"][rows] - ox + pad, ww),
            ],
            1,
        ).astype(np.int64)
        exact = _exact_stats(target, touched, boxes)
        # a cell that lost most of its pixels to a neighbouring tile's cell is that
        # cell seen again (the two tiles drew it differently): its remains are dropped
        duplicate = exact["area_px"] < 0.5 * stats["area_px"][rows]
        # so is a sliver smaller than any cell (a platelet a white cell's outline took)
        duplicate |= exact["area_px"] < 0.5 * min_area_px
        for label, (y0, x0, y1, x1) in zip(touched[duplicate], boxes[duplicate]):
            piece = target[y0:y1, x0:x1]
            nuc_target[y0:y1, x0:x1][piece == label] = 0
            piece[piece == label] = 0
        exact["area_px"][duplicate] = 0
        for column, offset in (("centroid_y", oy), ("bbox_min_y", oy), ("bbox_max_y", oy),
                               ("centroid_x", ox), ("bbox_min_x", ox), ("bbox_max_x", ox)):
            stats[column][rows] = exact[column] + offset
        stats["area_px"][rows] = exact["area_px"]
        kept = stats["area_px"] != 0
        if not kept.all():
            stats = {column: values[kept] for column, values in stats.items()}
    inverse = {int(lut[k]): types[int(k)] for k in old}
    table = pd.DataFrame(stats)
    table.insert(1, "cell_type", [inverse[int(i)] for i in stats["label"]])
    tables.append(table[list(TABLE_COLUMNS)])
    return next_id + len(old)


def _full_resolution_hue(rgb: np.ndarray, stain: StainModel, sigma: float) -> np.ndarray:
    """The hue channel of :func:`stain_channels` (OD_R - OD_B), smoothed."""
    od = np.log(np.maximum(rgb[..., [0, 2]], 1).astype(np.float32))
    bg = np.asarray(stain.background_rgb, np.float32)
    hue = np.float32(np.log(bg[0] / bg[2])) - (od[..., 0] - od[..., 1])
    return ndi.gaussian_filter(hue, sigma)


def _redraw_white_cells(labels, nuclei, outlines: dict, claimable, scale, rgb, stain: StainModel, diameter: float):
    """Draw white cells at full resolution (in place); returns their labels and those
    of the cells they took pixels from (all of which must be measured again).

    Upsampled working-resolution masks have steps a working pixel wide: each
    cell's sub-pixel outline polygon gives it a smooth edge, and its nucleus is
    thresholded again on the full-resolution colour next to its upsampled mask.
    ``claimable[label]`` says whose pixels a white cell may take.
    """
    from .cells import _polygon_mask

    h, w = labels.shape
    step = max(1, int(round(max(scale))))
    changed = [np.fromiter(outlines, np.int64, len(outlines))]
    for label, (ys, xs) in outlines.items():
        fy = (ys + 0.5) * scale[0] - 0.5
        fx = (xs + 0.5) * scale[1] - 0.5
        y0, y1 = max(0, int(fy.min()) - 2), min(h, int(np.ceil(fy.max())) + 3)
        x0, x1 = max(0, int(fx.min()) - 2), min(w, int(np.ceil(fx.max())) + 3)
        if y0 >= y1 or x0 >= x1:
            continue
        window = labels[y0:y1, x0:x1]
        nuc_window = nuclei[y0:y1, x0:x1]
        cell = _polygon_mask(fy - y0, fx - x0, window.shape)
        own_nucleus = nuc_window == label
        if own_nucleus.any():
            hue = _full_resolution_hue(rgb[y0:y1, x0:x1], stain, max(0.5, diameter / 40))
            near = ndi.binary_dilation(own_nucleus, iterations=step)
            refined = near & (hue > stain.nucleus_threshold) & ((nuc_window == 0) | own_nucleus)
            refined &= (window == label) | claimable[window]
            if refined.sum() >= 0.5 * own_nucleus.sum():
                nuc_window[own_nucleus & ~refined] = 0
                nuc_window[refined] = label
                cell |= refined
        # the nucleus always belongs to its cell; cells of other white cells and of
        # neighbouring tiles keep their pixels
        window[(window == label) & ~cell & (nuc_window != label)] = 0
        taken = cell & claimable[window]
        changed.append(np.unique(window[taken]).astype(np.int64))
        window[taken] = label
    changed = np.unique(np.concatenate(changed))
    return changed[changed > 0]


def _drop_cells_outside_view(table, labels, nuclei, outside_view, next_id) -> pd.DataFrame:
    """Remove the cells centred outside the view (found in the painted frame, where
    its glass is extrapolated least well: the corners); the ids are renumbered later."""
    if not len(table):
        return table
    h, w = labels.shape
    cy = table.centroid_y.to_numpy().round().astype(np.intp).clip(0, h - 1)
    cx = table.centroid_x.to_numpy().round().astype(np.intp).clip(0, w - 1)
    stray = outside_view[cy, cx]
    if not stray.any():
        return table
    lut = np.arange(next_id, dtype=np.uint32)
    lut[table.label.to_numpy()[stray]] = 0
    _relabel(labels, nuclei, lut)
    return table[~stray].reset_index(drop=True)


def _relabel(labels: np.ndarray, nuclei: np.ndarray, lut: np.ndarray) -> None:
    """Map both label images through ``lut`` in place, in row blocks (no image-sized
    temporary on a whole-slide region)."""
    for start in range(0, labels.shape[0], 1024):
        labels[start : start + 1024] = lut[labels[start : start + 1024]]
        nuclei[start : start + 1024] = lut[nuclei[start : start + 1024]]


def _mark_edge_cells(
    table: pd.DataFrame, shape: tuple[int, int], labels: np.ndarray | None = None,
    outside_view: np.ndarray | None = None,
) -> pd.DataFrame:
    """Add ``touches_edge``: the cell reaches the edge of the field (the image's, or
    the rim of the view when ``outside_view`` is given), so part of it may be cut off
    (its size and shape are then not the cell's, and counting conventions usually
    leave such cells out)."""
    h, w = shape
    touches = (
        (table.bbox_min_y <= 0) | (table.bbox_min_x <= 0) | (table.bbox_max_y >= h) | (table.bbox_max_x >= w)
    ).to_numpy(bool, copy=True)
    if outside_view is not None and labels is not None and len(table):
        rim = binary.dilate(outside_view, binary.disk_rows(2)) & ~outside_view
        cut = np.unique(labels[rim])
        touches |= np.isin(table.label.to_numpy(), cut[cut > 0])
    return table.assign(touches_edge=touches)


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype="object" if c == "cell_type" else "float64") for c in TABLE_COLUMNS}
    ).astype({"label": "int64", "area_px": "int64"}).assign(touches_edge=pd.Series(dtype=bool))


def _label_images(shape, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Empty (zero) cells and nuclei label images: new ones, or ``out`` cleared."""
    if out is None:
        return np.zeros(shape, np.uint32), np.zeros(shape, np.uint32)
    labels, nuclei = out
    for start in range(0, shape[0], 1024):  # row blocks: a file-backed array may exceed memory
        labels[start : start + 1024] = 0
        nuclei[start : start + 1024] = 0
    return labels, nuclei


#: A red cell narrower than this (pixels) has no outline to segment.
MIN_RBC_DIAMETER_PX = 3.0


def _check_explicit_diameter(diameter: float, shape, pixel_size_um, rbc_diameter_px) -> None:
    """Refuse a given scale under which no cell could be segmented: a red cell under
    3 px, or several times wider than the whole image (a pixel size in the wrong unit,
    or a file's default resolution tag taken for a calibration)."""
    if MIN_RBC_DIAMETER_PX <= diameter <= 4 * max(shape):
        return
    if rbc_diameter_px is not None:
        given, advice = f"rbc_diameter_px={rbc_diameter_px:g} is", ""
    else:
        given = f"pixel_size_um={pixel_size_um:g} puts a {RBC_DIAMETER_UM:g} um red cell at {diameter:.3g} px,"
        advice = "check the unit (micrometres per pixel), or "
    problem = (f"under {MIN_RBC_DIAMETER_PX:g} px: too small to segment" if diameter < MIN_RBC_DIAMETER_PX
               else f"several times wider than the whole {shape[1]} x {shape[0]} image")
    raise ValueError(f"{given} {problem}; {advice}leave the scale out to have it measured from the field")


#: A file's recorded pixel size is believed when the red cells measure within this
#: factor of the size it implies. The ruler's typical error is 6 % (90 % of BCCD fields
#: within 15 %; docs/benchmarks.md), while a wrong calibration is off by a whole
#: factor: an objective's magnification left out (10x-100x), a camera's binning (2x).
RECORDED_SCALE_TOLERANCE = 1.6


def _checked_recorded_scale(
    recorded_pixel_size_um: float, measured: float | None, *, trust_measured: bool, shape
) -> tuple[float, float | None, str | None]:
    """(red-cell diameter to use, pixel size it stands for or None, warning or None) for
    a file's recorded pixel size and the diameter measured in the field (None: it could
    not be measured; ``trust_measured`` False: the field was too sparse to trust it)."""
    recorded = rbc_diameter_from_pixel_size(recorded_pixel_size_um)
    plausible = MIN_RBC_DIAMETER_PX <= recorded <= 4 * max(shape)
    if measured is None or (plausible and not trust_measured):
        if plausible:
            return recorded, recorded_pixel_size_um, None
        raise ValueError(
            f"the file records {recorded_pixel_size_um:g} um pixels, which puts a {RBC_DIAMETER_UM:g} um red "
            f"cell at {recorded:.3g} px, and the red cells could not be measured instead; "
            "give the pixel size (pixel_size_um, --pixel-size-um, the Segment widget's box) or the red-cell "
            "diameter in pixels (rbc_diameter_px)"
        )
    ratio = measured / recorded
    if plausible and 1 / RECORDED_SCALE_TOLERANCE <= ratio <= RECORDED_SCALE_TOLERANCE:
        return recorded, recorded_pixel_size_um, None
    return measured, None, (
        f"the file records {recorded_pixel_size_um:g} um pixels (a {RBC_DIAMETER_UM:g} um red cell "
        f"{recorded:.3g} px across), but the field's red cells measure {measured:.0f} px: the file's "
        "calibration was ignored and the measured scale used; give the pixel size explicitly "
        "(pixel_size_um, --pixel-size-um) to use it anyway"
    )


def _empty(shape, diameter, pixel_size_um, out=None) -> SmearSegmentation:
    labels, nuclei = _label_images(shape, out)
    return SmearSegmentation(
        labels=labels,
        nuclei=nuclei,
        table=_empty_table(),
        rbc_diameter_px=diameter,
        pixel_size_um=pixel_size_um,
    )
