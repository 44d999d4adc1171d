"""Cell galleries: each cell cut out as a small picture, grouped by class.

A reviewer checks a classification by looking at the cells of each class side by
side, the least confident first (a CellaVision-style review), not by reading a table.
:func:`cell_thumbnails` cuts the pictures (the "Cell gallery" dock shows them and lets
the user set a cell's class), :func:`gallery_picture` lays them out as one image with a
heading per class (``napari-smear gallery`` writes it for the images of a batch run).

:func:`batch_galleries` draws one per folder of a batch run, :func:`export_cell_images`
writes chosen cells as a training folder (one sub-folder per class).

Thumbnails are cut at a normalised scale, a few red-cell diameters across, so cells
from any microscope appear the same size; each cell is outlined so that the one meant
is plain among its neighbours. Only the windows around the cells are read, so an image
held on disk (a memory map, a dask array) is not loaded whole.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

# the ending a batch re-run knows as its own output (napari_smear.batch.is_output_name)
from .batch import GALLERY_SUFFIX

__all__ = [
    "EXPORT_SPAN",
    "export_cell_images",
    "GALLERY_FOLDER",
    "GALLERY_SUFFIX",
    "batch_galleries",
    "GalleryBlock",
    "compose_gallery",
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


def _window(array: Any, y0: int, x0: int, side: int, step: int, fill) -> np.ndarray:
    """``array[y0:y0+side:step, x0:x0+side:step]``, filled with ``fill`` past the border
    (every ``step``-th pixel of the window, counted from its corner)."""
    h, w = array.shape[:2]
    n = -(-side // step)
    out = np.empty((n, n, *array.shape[2:]), array.dtype)
    out[:] = fill
    # the first pixel of the window inside the image on the window's own grid
    ys = y0 + max(0, -(-(0 - y0) // step)) * step if y0 < 0 else y0
    xs = x0 + max(0, -(-(0 - x0) // step)) * step if x0 < 0 else x0
    ye, xe = min(h, y0 + side), min(w, x0 + side)
    if ys < ye and xs < xe:
        part = np.asarray(array[ys:ye:step, xs:xe:step])
        oy, ox = (ys - y0) // step, (xs - x0) // step
        out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
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
    if len(ids) and not np.isfinite(centroids).all():
        raise ValueError("every centroid must be a finite (y, x); "
                         f"cells {ids[~np.isfinite(centroids).all(1)][:10].tolist()} have none")
    colours = None
    if outline_rgb is not None:
        given = np.asarray(outline_rgb)
        if given.dtype.kind == "f" and given.size and given.max() <= 1 and not np.all(given == np.round(given)):
            raise ValueError(f"outline_rgb is 0-255 (as napari_smear.colors gives it), got {given.ravel()[:3]}...")
        colours = np.broadcast_to(np.clip(given, 0, 255).astype(np.uint8), (len(ids), 3))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        # converted once, as the segmentation converted it: window by window, each would
        # be stretched to its own range
        from .io import as_rgb_uint8

        image = as_rgb_uint8(np.asarray(image))
    # the outline about 1/40 of the thumbnail thick (2 px at 80 px), with a dark line
    # outside it so that pale class colours (normal red cells' grey) show on pale glass
    thickness = max(1, int(round(size / 40)))
    out = np.empty((len(ids), size, size, 3), np.uint8)
    for k, (label, (cy, cx), side) in enumerate(zip(ids, centroids, sides)):
        side_px = max(2, int(round(side)))
        y0, x0 = int(round(cy - side_px / 2)), int(round(cx - side_px / 2))
        # a window far larger than the thumbnail is read every step-th pixel before it is
        # smoothed and resampled (a 5000 px window took seconds a cell)
        step = max(1, side_px // (4 * size))
        window = _window(image, y0, x0, side_px, step, _PAD_RGB)
        if window.shape[0] != size:
            window = resize(window, (size, size), order=1, anti_aliasing=window.shape[0] > size,
                            preserve_range=True)
            window = np.clip(np.rint(window), 0, 255).astype(np.uint8)
        out[k] = window
        if colours is not None:
            own = _window(labels, y0, x0, side_px, step, 0) == label
            if own.shape[0] != size:
                own = resize(own, (size, size), order=0, anti_aliasing=False) > 0.5
            rim = own & ~ndi.binary_erosion(own, iterations=thickness, border_value=0)
            halo = ndi.binary_dilation(own, iterations=1) & ~own
            out[k][halo] = (out[k][halo] * 0.35).astype(np.uint8)
            out[k][rim] = colours[k]
    return out


def _class_names(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series([UNCLASSIFIED] * len(table), index=table.index, dtype=object)
    values = table[column].astype(object)
    named = values.notna() & (values.astype(str) != "")
    return values.where(named, UNCLASSIFIED).astype(str)


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
    # one grouping pass (a whole-slide layer holds over 100,000 cells)
    grouped = rows.groupby([rows["cell_type"].astype(str), classes], sort=False)
    sizes = grouped.size()
    keys = sorted(sizes.index, key=lambda key: (type_rank.get(key[0], 3), key[1] == UNCLASSIFIED,
                                                -int(sizes[key]), key[1]))
    groups = []
    for cell_type, name in keys:
        group = grouped.get_group((cell_type, name))
        if order != "label" and "confidence" in group.columns:
            confidence = pd.to_numeric(group["confidence"], errors="coerce")
            # unknown confidence (set by hand) last either way
            group = group.assign(_c=confidence).sort_values(
                "_c", ascending=order == ORDERS[0], na_position="last", kind="stable").drop(columns="_c")
        else:
            group = group.sort_values("label", kind="stable")
        groups.append((cell_type, name, group))
    return groups


def _type_totals(groups: Sequence[tuple[str, str, pd.DataFrame]]) -> dict[str, int]:
    """Cells per cell type over the groups (the denominator of a differential)."""
    totals: dict[str, int] = {}
    for cell_type, _, rows in groups:
        totals[cell_type] = totals.get(cell_type, 0) + len(rows)
    return totals


def _heading(name: str, cell_type: str, total: int, shown: int, order: str, confidence: bool = True,
             of_type: int = 0) -> str:
    text = f"{name} ({cell_type}): {total} cell{'s' if total != 1 else ''}"
    if of_type and total < of_type:  # the share of the cells of its type, as a differential gives it
        text += f" ({100 * total / of_type:.1f} % of {of_type})"
    if total > shown:
        which = {"least confident first": "least confident", "most confident first": "most confident",
                 "label": "first"}[order] if confidence else "first"
        text += f", the {shown} {which} shown"
    return text


def _has_confidence(rows: pd.DataFrame) -> bool:
    return "confidence" in rows.columns and bool(pd.to_numeric(rows["confidence"], errors="coerce").notna().any())


def _confidence_text(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{value:.2f}" if np.isfinite(value) else ""


@dataclass
class GalleryBlock:
    """One class's block of a gallery picture: a heading and captioned thumbnails."""

    heading: str
    colour: tuple[int, int, int]
    thumbnails: np.ndarray  # (N, S, S, 3) uint8
    captions: list[tuple[str, ...]] = field(default_factory=list)  # lines under each thumbnail


_HEADING_PX, _LINE_PX, _PAD_PX = 18, 12, 4


@functools.lru_cache(maxsize=4)
def label_font(size: int = 10):
    """The font pictures are labelled with: DejaVu Sans, which matplotlib ships (a
    dependency), for its coverage: Pillow's built-in font has ASCII only, and drew a
    folder named "Überprüfung", an "ß.jpg" or the "…" of a shortened caption as boxes.
    Pillow's own font where that file is missing."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def compose_gallery(blocks: Sequence[GalleryBlock], *, size: int, columns: int, title: str | None = None,
                    empty_text: str = "no cells") -> np.ndarray:
    """Lay out blocks of thumbnails as one RGB picture ``columns * size`` wide: per block
    its heading (colour swatch and text), then its thumbnails in rows, each captioned."""
    from PIL import Image, ImageDraw

    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    font = label_font()
    width = columns * size
    strips: list[Image.Image] = []

    def text_strip(text: str) -> Image.Image:
        strip = Image.new("RGB", (width, _HEADING_PX + _PAD_PX), (255, 255, 255))
        ImageDraw.Draw(strip).text((_PAD_PX, _PAD_PX), text, fill=(0, 0, 0), font=font)
        return strip

    if title:
        strips.append(text_strip(title))
    if not blocks:
        strips.append(text_strip(empty_text))
    for block in blocks:
        lines = max((len(c) for c in block.captions), default=0)
        cell_h = size + lines * _LINE_PX
        n_rows = math.ceil(len(block.thumbnails) / columns)
        strip = Image.new("RGB", (width, _HEADING_PX + n_rows * cell_h + _PAD_PX), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        draw.rectangle([_PAD_PX, 4, _PAD_PX + 10, 14], fill=tuple(block.colour), outline=(0, 0, 0))
        draw.text((_PAD_PX + 16, 3), block.heading, fill=(0, 0, 0), font=font)
        for k, thumb in enumerate(block.thumbnails):
            x, y = (k % columns) * size, _HEADING_PX + (k // columns) * cell_h
            strip.paste(Image.fromarray(np.asarray(thumb, np.uint8)), (x, y))
            for j, line in enumerate(block.captions[k] if k < len(block.captions) else ()):
                # cut to the thumbnail's width, keeping the end (where names differ)
                while line and draw.textlength(line, font=font) > size - 3:
                    line = "…" + line[2:]
                draw.text((x + 2, y + size + j * _LINE_PX), line, fill=(60, 60, 60), font=font)
        strips.append(strip)
    picture = Image.new("RGB", (width, sum(strip.height for strip in strips)), (255, 255, 255))
    y = 0
    for strip in strips:
        picture.paste(strip, (0, y))
        y += strip.height
    return np.asarray(picture, np.uint8)


def _block_colour(cell_type: str, name: str, colours: Mapping[str, Any]) -> tuple[int, int, int]:
    from .colors import CELL_TYPE_RGB

    colour = CELL_TYPE_RGB.get(cell_type, (128, 128, 128)) if name == UNCLASSIFIED else colours.get(name)
    return tuple(int(v) for v in (colour or (128, 128, 128))[:3])


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
    """One picture of the cells of a field, a block per class.

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
    from .colors import class_palette_rgb

    _check_per_class(per_class)
    groups = gallery_groups(table, column=column, cell_types=cell_types, order=order)
    colours = class_palette_rgb([name for _, name, _ in groups if name != UNCLASSIFIED],
                                base={k: tuple(v)[:3] for k, v in (palette or {}).items()})
    blocks = []
    totals = _type_totals(groups)
    for cell_type, name, rows in groups:
        colour = _block_colour(cell_type, name, colours)
        shown = rows.iloc[:per_class]
        thumbs = cell_thumbnails(
            image, labels, shown["label"].to_numpy(np.int64),
            shown[["centroid_y", "centroid_x"]].to_numpy(np.float64),
            thumbnail_window_px(cell_type, rbc_diameter_px), size=size, outline_rgb=colour,
        )
        confidence = shown["confidence"] if "confidence" in shown.columns else [None] * len(shown)
        captions = [(f"{int(label)}  {_confidence_text(c)}".rstrip(),)
                    for label, c in zip(shown["label"], confidence)]
        heading = _heading(name, cell_type, len(rows), len(shown), order, _has_confidence(rows),
                           totals[cell_type])
        blocks.append(GalleryBlock(heading, colour, thumbs, captions))
    wanted = "" if cell_types is None else f" of type {', '.join(cell_types)}"
    return compose_gallery(blocks, size=size, columns=columns, title=title, empty_text=f"no cells{wanted}")


def _check_per_class(per_class: Any) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")


# ----------------------------------------------------------------------------- batch outputs

#: Folder of an analysis output folder that :func:`batch_galleries` writes into (the
#: pictures are named ``<folder>_gallery.png``, :data:`GALLERY_SUFFIX`).
GALLERY_FOLDER = "galleries"


def _gallery_file_names(folders: Sequence[str]) -> dict[str, str]:
    """``<folder name>_gallery.png`` per folder of images, numbered where two share a name."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for folder in folders:
        name = Path(folder).name or Path(folder).resolve().name
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "images"
        name, k = base, 2
        while name.lower() in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name.lower())
        names[folder] = f"{name}{GALLERY_SUFFIX}"
    return names


def finished_run(out: Path) -> tuple[pd.DataFrame, dict]:
    """``summary.csv`` and ``run.json`` of a finished ``napari-smear analyze`` run in
    ``out`` (``{}`` for a run.json that cannot be read: it only names the models)."""
    summary_path = out / "summary.csv"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no summary.csv in {out}: give the output folder of a finished "
                                "`napari-smear analyze` run")
    try:
        summary = pd.read_csv(summary_path, dtype={"image": str, "path": str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{summary_path} is empty: run the analysis again to write it") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{summary_path} cannot be read as a table ({exc})") from None
    if not {"image", "path", "rbc_diameter_px"} <= set(summary.columns):
        raise ValueError(f"{summary_path} is not a napari-smear summary (columns {list(summary.columns)[:6]}...)")
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = {}
    return summary, run if isinstance(run, dict) else {}


#: Columns a batch ``_cells.csv`` must have for its cells to be drawn.
_GALLERY_TABLE_COLUMNS = ("label", "cell_type", "centroid_y", "centroid_x")


def _gallery_cells_table(path: Path) -> pd.DataFrame:
    """An image's ``_cells.csv`` as the galleries use it; ValueError naming what is wrong
    with a damaged or hand-edited one (empty, columns missing, labels not whole numbers)."""
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError("the file is empty") from None
    missing = [c for c in _GALLERY_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"no {', '.join(missing)} column")
    labels = pd.to_numeric(table["label"], errors="coerce")
    if labels.isna().any() or (labels != labels.round()).any() or (labels <= 0).any():
        raise ValueError("its label column holds values that are not label ids (whole numbers from 1)")
    for column in ("centroid_y", "centroid_x"):
        if pd.to_numeric(table[column], errors="coerce").isna().any():
            raise ValueError(f"its {column} column holds values that are not numbers")
    return table.assign(label=labels.astype(np.int64))


def run_palette(run: dict) -> dict[str, tuple[int, int, int]]:
    """Class colours of a run's models, handed out in the models' class order (the viewer's
    and the overlays' colours; without a record, by first sight)."""
    from .colors import class_palette_rgb

    return class_palette_rgb([c for model in (run.get("models") or {}).values() for c in model.get("classes", [])])


#: Images (and label images) from this many pixels on are read window by window when
#: they are tiled TIFFs (a whole slide): a gallery draws a few dozen of their cells.
_WINDOWED_MIN_PIXELS = 64_000_000


@contextlib.contextmanager
def _opened(path: str | os.PathLike, *, rgb: bool):
    """An image to cut thumbnails from: a tiled TIFF of a whole slide read window by
    window (8-bit RGB, or a label image), anything else read whole."""
    from .io import open_tiled_tiff, read_image

    tiff = open_tiled_tiff(path, min_pixels=_WINDOWED_MIN_PIXELS)
    fits = tiff is not None and (tiff.dtype == np.uint8 and tiff.shape[-1:] == (3,) if rgb else tiff.ndim == 2)
    if fits:
        try:
            yield tiff
        finally:
            tiff.close()
        return
    if tiff is not None:  # another layout (16-bit, planar...): read_image converts it
        tiff.close()
    yield read_image(path, rgb=rgb)[0]


def _cut_image_cells(rgb, labels, cells: pd.DataFrame, size: int, colours, thumbnails: dict) -> None:
    """Thumbnails of one image's ``cells`` (rows of a batch gallery's table), by running index."""
    for cell_type, of_type in cells.groupby("cell_type", sort=False):
        key_classes = of_type["class"] if "class" in of_type.columns else [UNCLASSIFIED] * len(of_type)
        outline = [_block_colour(cell_type, c if isinstance(c, str) and c else UNCLASSIFIED, colours)
                   for c in key_classes]
        cut = cell_thumbnails(
            rgb, labels, of_type["_label"].to_numpy(np.int64),
            of_type[["centroid_y", "centroid_x"]].to_numpy(np.float64),
            thumbnail_window_px(cell_type, float(of_type["_diameter"].iloc[0])), size=size,
            outline_rgb=outline,
        )
        thumbnails.update(zip(of_type["label"].tolist(), cut))


def batch_galleries(
    out_dir: str | os.PathLike,
    *,
    cell_types: Sequence[str] | None = ("wbc", "platelet"),
    per_class: int = 40,
    order: str = ORDERS[0],
    include_edge_cells: bool = False,
    size: int = 80,
    columns: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """A gallery picture per folder of images of a finished batch run (``napari-smear
    analyze``): the cells of all its images, a block per class, the least confident first.

    A folder of fields is one slide's differential, so its gallery is what a reviewer
    checks: every class of white cells side by side, with the cells the models were
    least sure of first. Written to ``OUT_DIR/galleries/<folder name>_gallery.png``; each
    thumbnail is captioned with its image's name (the end of it) and the cell's label
    id and confidence, so it can be found in the image's ``_cells.csv`` and viewer.

    Parameters
    ----------
    out_dir : path
        The output folder of the run (``summary.csv`` names the images and where their
        inputs are; the cells come from each ``<stem>_cells.csv``, their outlines from
        ``<stem>_labels.tif``, their pixels from the input image).
    cell_types : sequence of str, optional
        Only cells of these types (default white cells and platelets; None: all).
    include_edge_cells : bool
        Also cells the image edge cuts (left out by default, as in
        ``summary_by_folder.csv``).
    progress : callable, optional
        ``progress(done, total)`` after each image read.

    Returns
    -------
    list of Path
        The pictures written, one per folder.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``summary.csv`` (not the output of a finished run).
    FileExistsError
        A file napari-smear did not write lies where a picture goes (nothing is written).

    An image whose input file has moved, or whose cell table is missing, is left out of
    its folder's picture (with a warning, and named in the picture's title); a field
    without cells has nothing to draw.
    """
    from .batch import OUTPUT_SUFFIXES, _folder_of, _is_our_picture, analysed_input_paths, output_stem
    from .io import atomic_write

    _check_per_class(per_class)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be a whole number of pixels >= 16 (a thumbnail's side), got {size!r}")
    out = Path(out_dir)
    summary, run = finished_run(out)
    # where the inputs are now (a relative path is the run's, from the folder it started in)
    located = analysed_input_paths(out)
    colours = run_palette(run)

    def stem_of(image: str) -> str:
        return str(output_stem(out, Path(image)))

    folders = summary["path"].map(_folder_of)
    names = _gallery_file_names(list(dict.fromkeys(folders)))
    targets = {folder: out / GALLERY_FOLDER / name for folder, name in names.items()}
    foreign = [str(t) for t in targets.values() if t.exists() and not _is_our_picture(t)]
    if foreign:  # as the batch never writes over a file it did not write
        raise FileExistsError(
            f"not written over (napari-smear did not write them): {', '.join(foreign[:5])}"
            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            + "; move them away, or give another output folder"
        )
    written: list[Path] = []
    total, done = len(summary), 0
    for folder, images in summary.groupby(folders, sort=True):
        tables, left_out, edge_cut = [], [], 0
        for row in images.itertuples(index=False):
            cells = Path(stem_of(row.image) + OUTPUT_SUFFIXES["cells"])
            path = located.get(row.image, row.path)
            diameter = pd.to_numeric(pd.Series([row.rbc_diameter_px]), errors="coerce").iloc[0]
            if not np.isfinite(diameter):  # a field without cells has no ruler, and nothing to draw
                continue
            problem = (f"{cells} is missing (run the batch again to redo the image)" if not cells.is_file()
                       else None if Path(path).is_file()
                       else f"its input image is not at {path}, where the run read it")
            table = None
            if not problem:
                try:
                    table = _gallery_cells_table(cells)
                except (OSError, ValueError) as exc:  # a damaged table: this image, not the folder
                    problem = f"{cells} cannot be read ({exc})"
            if problem:
                left_out.append(row.image)
                warnings.warn(f"gallery of {folder}: the cells of {row.image} are left out: {problem}", stacklevel=2)
                continue
            if not include_edge_cells and "touches_edge" in table.columns:
                cut = table["touches_edge"].astype(bool)
                shown_types = cell_types if cell_types is not None else table["cell_type"].unique()
                edge_cut += int((cut & table["cell_type"].isin(list(shown_types))).sum())
                table = table[~cut]
            tables.append(table.assign(_image=row.image, _path=path, _diameter=float(diameter)))
        tables = [t for t in tables if len(t)]
        table = (pd.concat(tables, ignore_index=True) if tables
                 else pd.DataFrame(columns=["label", "cell_type", "_image", "_path", "_diameter"]))
        # a label is unique only within its image: group on a running index, then cut by image
        table = table.assign(_label=table["label"], label=np.arange(len(table)))
        thumbnails: dict[int, np.ndarray] = {}
        while True:  # again without an image whose pixels or labels cannot be read
            groups = gallery_groups(table, cell_types=cell_types, order=order)
            shown = {key: rows.iloc[:per_class] for key, rows in ((g[:2], g[2]) for g in groups)}
            wanted = pd.concat(list(shown.values())) if shown else table.iloc[:0]
            wanted = wanted[~wanted["label"].isin(list(thumbnails))]
            unreadable = []
            for (image, path), cells in wanted.groupby(["_image", "_path"], sort=False):
                labels_path = stem_of(image) + OUTPUT_SUFFIXES["labels"]
                try:
                    with _opened(path, rgb=True) as rgb, _opened(labels_path, rgb=False) as labels:
                        _cut_image_cells(rgb, labels, cells, size, colours, thumbnails)
                except Exception as exc:  # noqa: BLE001 - a damaged file: this image, not the folder
                    unreadable.append(image)
                    warnings.warn(f"gallery of {folder}: the cells of {image} are left out: {exc}", stacklevel=2)
                done = min(done + 1, total)  # an image read again for cells shown after a removal counts once
                if progress is not None:
                    progress(done, total)
            if not unreadable:
                break
            left_out.extend(unreadable)
            table = table[~table["_image"].isin(unreadable)]
        blocks = []
        totals = _type_totals(groups)
        for (cell_type, name), rows in shown.items():
            confidence = rows["confidence"] if "confidence" in rows.columns else [None] * len(rows)
            captions = [(Path(image).stem, f"{int(label)}  {_confidence_text(c)}".rstrip())
                        for image, label, c in zip(rows["_image"], rows["_label"], confidence)]
            total_in_group = len(next(g[2] for g in groups if g[:2] == (cell_type, name)))
            blocks.append(GalleryBlock(
                _heading(name, cell_type, total_in_group, len(rows), order, _has_confidence(rows),
                         totals[cell_type]),
                _block_colour(cell_type, name, colours),
                np.stack([thumbnails[i] for i in rows["label"]]), captions,
            ))
        which = ("every cell" if include_edge_cells
                 else f"whole cells ({edge_cut} cut by the image edge left out)" if edge_cut else "whole cells")
        title = f"{folder}: {len(images)} image{'s' if len(images) != 1 else ''}, {which}"
        if left_out:
            title += (f"; {len(left_out)} image(s) left out (input or output missing or unreadable): "
                      f"{', '.join(left_out[:3])}")
        kinds = "" if cell_types is None else f" of type {', '.join(cell_types)}"
        picture = compose_gallery(blocks, size=size, columns=columns, title=title, empty_text=f"no cells{kinds}")
        target = targets[folder]
        target.parent.mkdir(exist_ok=True)
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from .batch import OVERLAY_SOFTWARE

        text = PngInfo()
        text.add_text("Software", OVERLAY_SOFTWARE)  # known as ours by a later run
        with atomic_write(target, "wb") as handle:
            Image.fromarray(picture).save(handle, format="PNG", compress_level=1, pnginfo=text)
        written.append(target)
    return written


# ----------------------------------------------------------------------------- training images

def is_folder_safe_class(name: str) -> bool:
    """Whether a class name can name the folder its exported cells go to
    (:func:`export_cell_images`): no path separator or character a file system refuses."""
    return name not in (".", "..") and not re.search(r'[\\/:*?"<>|]', name)


#: Side of an exported single-cell image in red-cell diameters: the cell with the red cells
#: around it, from which a training run measures the scale again (PBC's CellaVision images
#: hold about 4.7 diameters).
EXPORT_SPAN = 5.0


def export_cell_images(
    image: Any,
    table: pd.DataFrame,
    ids: Sequence[int],
    classes: Sequence[str] | str,
    out_dir: str | os.PathLike,
    rbc_diameter_px: float,
    *,
    stem: str = "cell",
    span_diameters: float = EXPORT_SPAN,
) -> list[Path]:
    """Write cells as single-cell images into class sub-folders, for training.

    Each cell is written as ``out_dir/<class>/<stem>_cell<label>.png``: a window of
    ``span_diameters`` red-cell diameters centred on it, at the image's own resolution
    (the layout of PBC and of ``napari-smear train DATA`` / the Train classifier dock's
    "folder of labelled cell images", which find the central cell and the scale again).
    Exporting the cells of many images into one folder builds a training set; a cell
    exported again under another class leaves its old class folder (the file of the
    same name there is removed), so the folder holds each cell once.

    Parameters
    ----------
    image : (H, W, 3) array-like
        The field (only the windows are read).
    table : pandas.DataFrame
        The cell table (``label``, ``centroid_y``, ``centroid_x``).
    ids : sequence of int
        Label ids of the cells to write.
    classes : str or sequence of str
        Their class (one for all, or one per cell); class names become folder names.
    out_dir : path
        The folder of class sub-folders (created).
    rbc_diameter_px : float
        The red-cell diameter of the field.
    stem : str
        The start of the file names (the image's name), so cells of several images do
        not collide.

    Returns
    -------
    list of Path
        The files written.
    """
    from .io import write_png_atomic

    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(f"image is a file path ({os.fspath(image)!r}), not pixels; read it first: "
                        "image, meta = napari_smear.io.read_image(path)")
    missing = [c for c in ("label", "centroid_y", "centroid_x") if c not in getattr(table, "columns", ())]
    if missing:
        raise ValueError(f"table must be a per-cell table with label, centroid_y and centroid_x columns "
                         f"(AnalysisResult.table); it has no {', '.join(missing)}")
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    names = [classes] * len(ids) if isinstance(classes, str) else [str(c) for c in classes]
    if len(names) != len(ids):
        raise ValueError(f"{len(ids)} cells but {len(names)} classes")
    folders = []
    for name in names:
        folder = name.strip()
        if not folder or folder.lower() == UNCLASSIFIED or not is_folder_safe_class(folder):
            raise ValueError(f"{name!r} cannot be a class folder's name (no class, or a path character)")
        folders.append(folder)
    if not (np.isfinite(rbc_diameter_px) and rbc_diameter_px > 0):
        raise ValueError(f"the red-cell diameter must be a number > 0, got {rbc_diameter_px!r}")
    rows = table.set_index("label")
    missing = np.setdiff1d(ids, rows.index.to_numpy(np.int64))
    if missing.size:
        raise ValueError(f"no cells with label ids {missing[:10].tolist()} in the table")
    stem = re.sub(r'[\\/:*?"<>|\s]+', "_", str(stem)).strip("._") or "cell"
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        from .io import as_rgb_uint8

        image = as_rgb_uint8(np.asarray(image))
    out = Path(out_dir)
    side = max(16, int(round(span_diameters * float(rbc_diameter_px))))
    written = []
    for label, folder in zip(ids, folders):
        cy, cx = rows.loc[label, "centroid_y"], rows.loc[label, "centroid_x"]
        window = _window(image, int(round(cy - side / 2)), int(round(cx - side / 2)), side, 1, _PAD_RGB)
        name = f"{stem}_cell{int(label)}.png"
        for other in out.glob(f"*/{name}"):  # exported before under another class
            if other.parent.name != folder:
                other.unlink()
        (out / folder).mkdir(parents=True, exist_ok=True)
        written.append(write_png_atomic(out / folder / name, window))
    return written
