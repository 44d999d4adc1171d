"""Cell galleries: each cell cut out as a small picture, grouped by class.

A reviewer checks a classification by looking at the cells of each class side by
side, the least confident first (a CellaVision-style review), not by reading a table.
:func:`cell_thumbnails` cuts the pictures (the "Cell gallery" dock shows them and lets
the user set a cell's class), :func:`gallery_picture` lays them out as one image with a
heading per class (``napari-smear gallery`` writes it for the images of a batch run).

Thumbnails are cut at a normalised scale, a few red-cell diameters across, so cells
from any microscope appear the same size; each cell is outlined so that the one meant
is plain among its neighbours. Only the windows around the cells are read, so an image
held on disk (a memory map, a dask array) is not loaded whole.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = [
    "THUMBNAIL_SPAN",
    "ORDERS",
    "cell_thumbnails",
    "thumbnail_window_px",
    "gallery_groups",
    "gallery_picture",
    "UNCLASSIFIED",
]

#: Side of a thumbnail's window in red-cell diameters, per cell type: a white cell
#: (about two red cells across) with a rim of its neighbours, a red cell with a little
#: of the glass around it, a platelet large enough to see.
THUMBNAIL_SPAN: dict[str, float] = {"wbc": 3.0, "rbc": 1.6, "platelet": 1.2}
#: The glass colour past the image border.
_PAD_RGB = (245, 245, 245)
#: How a group's cells are ordered: the least confident first (what a reviewer checks
#: first), the most confident first, or by label id (their order in the cell table).
ORDERS = ("least confident first", "most confident first", "label")
#: The group of cells without a class (not classified, or their class removed).
UNCLASSIFIED = "unclassified"


def thumbnail_window_px(cell_type: str, rbc_diameter_px: float) -> float:
    """Side in image pixels of the window a cell of ``cell_type`` is cut from."""
    if not (np.isfinite(rbc_diameter_px) and rbc_diameter_px > 0):
        raise ValueError(f"the red-cell diameter must be a number > 0, got {rbc_diameter_px!r}")
    return THUMBNAIL_SPAN.get(str(cell_type), THUMBNAIL_SPAN["wbc"]) * float(rbc_diameter_px)


def _rgb_window(image: Any, y0: int, x0: int, side: int) -> np.ndarray:
    """``image[y0:y0+side, x0:x0+side]`` as uint8 RGB, padded with glass past the border."""
    from .io import as_rgb_uint8

    h, w = image.shape[:2]
    out = np.empty((side, side, 3), np.uint8)
    out[:] = _PAD_RGB
    ys, ye = max(0, y0), min(h, y0 + side)
    xs, xe = max(0, x0), min(w, x0 + side)
    if ys < ye and xs < xe:
        window = np.asarray(image[ys:ye, xs:xe])
        if window.dtype != np.uint8 or window.ndim != 3 or window.shape[-1] != 3:
            window = as_rgb_uint8(window)
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = window
    return out


def _label_window(labels: Any, y0: int, x0: int, side: int) -> np.ndarray:
    h, w = labels.shape[:2]
    out = np.zeros((side, side), np.int64)
    ys, ye = max(0, y0), min(h, y0 + side)
    xs, xe = max(0, x0), min(w, x0 + side)
    if ys < ye and xs < xe:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = np.asarray(labels[ys:ye, xs:xe])
    return out


def cell_thumbnails(
    image: Any,
    labels: Any,
    ids: Sequence[int],
    centroids: Any,
    window_px: float | Sequence[float],
    *,
    size: int = 80,
    outline_rgb: Any = (255, 255, 255),
) -> np.ndarray:
    """A small picture of each cell, centred on it and outlined.

    Parameters
    ----------
    image : (H, W, 3) array-like
        The field (uint8 RGB; other dtypes and channel counts are converted window by
        window, see :func:`napari_smear.io.as_rgb_uint8`). Only the windows are read.
    labels : (H, W) integer array-like
        The cells' label image (the cell's own pixels are outlined).
    ids : sequence of int
        Label ids of the cells, in the order wanted.
    centroids : (N, 2) array-like
        ``(y, x)`` of each cell, in image pixels (the table's ``centroid_y/x``).
    window_px : float or sequence of float
        Side of the window cut around each cell, in image pixels (one for all, or one
        per cell; see :func:`thumbnail_window_px`).
    size : int
        Side of the thumbnails in pixels.
    outline_rgb : (3,) or (N, 3), optional
        Colour of each cell's outline (0-255); None draws none.

    Returns
    -------
    (N, size, size, 3) uint8
    """
    from skimage.transform import resize

    ids = np.asarray(ids, np.int64).reshape(-1)
    centroids = np.asarray(centroids, np.float64).reshape(-1, 2)
    if len(centroids) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(centroids)} centroids")
    if getattr(image, "ndim", 0) not in (2, 3) or getattr(labels, "ndim", 0) != 2:
        raise ValueError(f"image must be (H, W, 3) and labels (H, W); got {getattr(image, 'shape', None)} and "
                         f"{getattr(labels, 'shape', None)}")
    if tuple(image.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"image {tuple(image.shape[:2])} and labels {tuple(labels.shape)} differ in size")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    sides = np.broadcast_to(np.asarray(window_px, np.float64), ids.shape)
    if len(ids) and not (np.isfinite(sides).all() and (sides > 0).all()):
        raise ValueError(f"window_px must be > 0, got {window_px!r}")
    colours = None if outline_rgb is None else np.broadcast_to(np.asarray(outline_rgb, np.uint8), (len(ids), 3))
    # the outline about 1/40 of the thumbnail thick: 2 px at 80 px
    thickness = max(1, int(round(size / 40)))
    out = np.empty((len(ids), size, size, 3), np.uint8)
    for k, (label, (cy, cx), side) in enumerate(zip(ids, centroids, sides)):
        side_px = max(2, int(round(side)))
        y0, x0 = int(round(cy - side_px / 2)), int(round(cx - side_px / 2))
        window = _rgb_window(image, y0, x0, side_px)
        if side_px != size:
            window = resize(window, (size, size), order=1, anti_aliasing=side_px > size,
                            preserve_range=True)
            window = np.clip(np.rint(window), 0, 255).astype(np.uint8)
        out[k] = window
        if colours is not None:
            own = _label_window(labels, y0, x0, side_px) == label
            if side_px != size:
                own = resize(own, (size, size), order=0, anti_aliasing=False) > 0.5
            rim = own & ~ndi.binary_erosion(own, iterations=thickness, border_value=0)
            out[k][rim] = colours[k]
    return out


def _class_names(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series([UNCLASSIFIED] * len(table), index=table.index, dtype=object)
    values = table[column]
    named = values.map(lambda v: isinstance(v, str) and v != "")
    return values.astype(object).where(named, UNCLASSIFIED)


def gallery_groups(
    table: pd.DataFrame,
    *,
    column: str = "class",
    cell_types: Sequence[str] | None = None,
    order: str = ORDERS[0],
) -> list[tuple[str, str, pd.DataFrame]]:
    """The cells of a table grouped for a gallery: ``(cell_type, class, rows)`` per group.

    Groups come largest first, per cell type in the order wbc, platelet, rbc (the
    order of a differential); the unclassified cells of a type come after its
    classes. Within a group the rows are ordered by ``order`` (:data:`ORDERS`).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if "cell_type" not in table.columns or "label" not in table.columns:
        raise ValueError(f"the table needs 'label' and 'cell_type' columns (has {list(table.columns)})")
    rows = table
    if cell_types is not None:
        from .segment.types import check_cell_types

        rows = rows[rows["cell_type"].isin(check_cell_types(cell_types))]
    classes = _class_names(rows, column)
    type_rank = {"wbc": 0, "platelet": 1, "rbc": 2}
    keys = sorted(
        {(str(t), str(c)) for t, c in zip(rows["cell_type"], classes)},
        key=lambda key: (type_rank.get(key[0], 3), key[1] == UNCLASSIFIED,
                         -int(((rows["cell_type"] == key[0]) & (classes == key[1])).sum()), key[1]),
    )
    groups = []
    for cell_type, name in keys:
        group = rows[(rows["cell_type"] == cell_type) & (classes == name)]
        if order != "label" and "confidence" in group.columns:
            confidence = pd.to_numeric(group["confidence"], errors="coerce")
            # unknown confidence (set by hand) last either way
            group = group.assign(_c=confidence).sort_values(
                "_c", ascending=order == ORDERS[0], na_position="last", kind="stable").drop(columns="_c")
        else:
            group = group.sort_values("label", kind="stable")
        groups.append((cell_type, name, group))
    return groups


def gallery_picture(
    image: Any,
    labels: Any,
    table: pd.DataFrame,
    rbc_diameter_px: float,
    *,
    column: str = "class",
    cell_types: Sequence[str] | None = ("wbc", "platelet"),
    per_class: int = 40,
    order: str = ORDERS[0],
    size: int = 80,
    columns: int = 10,
    palette: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """One picture of the cells of a field (or several), a block per class.

    Each block is headed by its class, cell type and number of cells, and shows up to
    ``per_class`` of them (the least confident first by default), each captioned with
    its label id and confidence.

    Parameters
    ----------
    image, labels : arrays
        The field and its cells' label image.
    table : pandas.DataFrame
        The cell table: ``label``, ``cell_type``, ``centroid_y``, ``centroid_x``, and
        the ``column`` of classes (and ``confidence`` when there is one), as
        :func:`napari_smear.analyze` or the batch's ``<stem>_cells.csv`` give it.
    rbc_diameter_px : float
        The segmentation's red-cell diameter (the thumbnails' scale).
    cell_types : sequence of str, optional
        Only cells of these types (default white cells and platelets; None: all).
    per_class : int
        At most this many cells shown per class.
    palette : mapping, optional
        Class name -> 0-255 RGB of the outlines and headings (default: the viewer's
        class colours, :func:`napari_smear.colors.class_palette_rgb`).
    title : str, optional
        A line above the blocks (e.g. the image's name).

    Returns
    -------
    (H, W, 3) uint8 picture (``columns * size`` wide).
    """
    from PIL import Image, ImageDraw, ImageFont

    from .colors import CELL_TYPE_RGB, class_palette_rgb

    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    groups = gallery_groups(table, column=column, cell_types=cell_types, order=order)
    names = [name for _, name, _ in groups if name != UNCLASSIFIED]
    colours = class_palette_rgb(names, base={k: tuple(v)[:3] for k, v in (palette or {}).items()})
    font = ImageFont.load_default()
    width = columns * size
    caption, heading, pad = 12, 18, 4
    blocks: list[Image.Image] = []
    if title:
        strip = Image.new("RGB", (width, heading + pad), (255, 255, 255))
        ImageDraw.Draw(strip).text((pad, pad), title, fill=(0, 0, 0), font=font)
        blocks.append(strip)
    if not groups:
        strip = Image.new("RGB", (width, heading + pad), (255, 255, 255))
        wanted = "" if cell_types is None else f" of type {', '.join(cell_types)}"
        ImageDraw.Draw(strip).text((pad, pad), f"no cells{wanted}", fill=(0, 0, 0), font=font)
        blocks.append(strip)
    for cell_type, name, rows in groups:
        colour = tuple(int(v) for v in (CELL_TYPE_RGB.get(cell_type, (128, 128, 128)) if name == UNCLASSIFIED
                                        else colours.get(name, (128, 128, 128))))
        shown = rows.iloc[:per_class]
        thumbs = cell_thumbnails(
            image, labels, shown["label"].to_numpy(np.int64),
            shown[["centroid_y", "centroid_x"]].to_numpy(np.float64),
            thumbnail_window_px(cell_type, rbc_diameter_px), size=size, outline_rgb=colour,
        )
        n_rows = math.ceil(len(shown) / columns)
        block = Image.new("RGB", (width, heading + n_rows * (size + caption) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(block)
        draw.rectangle([pad, 4, pad + 10, 14], fill=colour, outline=(0, 0, 0))
        text = f"{name} ({cell_type}): {len(rows)} cell{'s' if len(rows) != 1 else ''}"
        if len(rows) > len(shown):
            which = {"least confident first": "least confident", "most confident first": "most confident",
                     "label": "first"}[order]
            text += f", the {len(shown)} {which} shown"
        draw.text((pad + 16, 3), text, fill=(0, 0, 0), font=font)
        confidence = (pd.to_numeric(shown["confidence"], errors="coerce").to_numpy()
                      if "confidence" in shown.columns else np.full(len(shown), np.nan))
        for k, (thumb, label, conf) in enumerate(zip(thumbs, shown["label"].to_numpy(), confidence)):
            x, y = (k % columns) * size, heading + (k // columns) * (size + caption)
            block.paste(Image.fromarray(thumb), (x, y))
            words = f"{int(label)}" + (f"  {conf:.2f}" if np.isfinite(conf) else "")
            draw.text((x + 2, y + size), words, fill=(60, 60, 60), font=font)
        blocks.append(block)
    height = sum(block.height for block in blocks)
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for block in blocks:
        picture.paste(block, (0, y))
        y += block.height
    return np.asarray(picture, np.uint8)
