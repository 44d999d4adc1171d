"""Turn analysis results into napari layer-data tuples (and back).

Everything that decides how results look in the viewer (names, colours, features)
lives here so every widget shows them the same way.
"""
from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from napari.utils.colormaps import DirectLabelColormap

from napari_smear.io import METADATA_KEY
from napari_smear.segment.types import TABLE_COLUMNS, SmearSegmentation

__all__ = [
    "CELL_TYPE_COLORS",
    "NUCLEUS_COLOR",
    "UNKNOWN_COLOR",
    "METADATA_KEY",
    "class_colormap",
    "cell_type_colormap",
    "features_from_table",
    "segmentation_layers",
    "segmentation_from_layers",
]

#: RGBA (0-1) per cell type, shared by every widget that colours cells by type.
CELL_TYPE_COLORS: dict[str, tuple[float, float, float, float]] = {
    "wbc": (0.58, 0.22, 0.95, 1.0),  # violet
    "rbc": (0.92, 0.16, 0.16, 1.0),  # red
    "platelet": (1.0, 0.84, 0.18, 1.0),  # yellow
}
#: Colour of nuclei in the nuclei layer (stands out on the violet of white cells).
NUCLEUS_COLOR = (0.0, 0.9, 0.9, 1.0)
#: Colour of labels whose class is not in the palette.
UNKNOWN_COLOR = (0.6, 0.6, 0.6, 1.0)
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


def class_colormap(
    label_ids: Iterable[int],
    classes: Iterable[Any],
    palette: Mapping[Any, Any] | Sequence[Any] | None = None,
    *,
    default: Any = UNKNOWN_COLOR,
) -> DirectLabelColormap:
    """A label colormap that colours each label by its class.

    Parameters
    ----------
    label_ids : iterable of int
        Label values (non-zero).
    classes : iterable
        The class of each label, same length as ``label_ids``.
    palette : mapping or sequence, optional
        Class -> colour (anything napari takes: RGBA tuple, name, hex), or a sequence
        of colours assigned to the sorted unique classes in turn. Default: evenly
        spaced hues.
    default : colour
        Colour of labels whose class is missing from ``palette`` (and of label values
        not in ``label_ids``).

    Returns
    -------
    napari.utils.colormaps.DirectLabelColormap
        Background (0) is transparent.
    """
    label_ids = [int(v) for v in label_ids]
    classes = list(classes)
    if len(label_ids) != len(classes):
        raise ValueError(
            f"label_ids and classes differ in length ({len(label_ids)} vs {len(classes)})"
        )
    if palette is None or not isinstance(palette, Mapping):
        unique = sorted({c for c in classes if pd.notna(c)}, key=str)
        colors = list(palette) if palette is not None else _distinct_colors(len(unique))
        if palette is not None and not colors:
            raise ValueError("palette is an empty sequence")
        palette = {c: colors[i % len(colors)] for i, c in enumerate(unique)}
    color_dict: dict[int | None, Any] = {None: default, 0: TRANSPARENT}
    for label, cls in zip(label_ids, classes, strict=True):
        if label == 0:
            continue
        color_dict[label] = palette.get(cls, default)
    return DirectLabelColormap(color_dict=color_dict)


def _distinct_colors(n: int) -> list[tuple[float, float, float, float]]:
    return [(*colorsys.hsv_to_rgb(i / max(n, 1), 0.75, 0.95), 1.0) for i in range(n)]


def cell_type_colormap(table: pd.DataFrame) -> DirectLabelColormap:
    """Colour labels by ``table.cell_type`` with :data:`CELL_TYPE_COLORS`."""
    return class_colormap(table["label"], table["cell_type"], CELL_TYPE_COLORS)


def features_from_table(table: pd.DataFrame) -> pd.DataFrame:
    """Copy of a per-cell table as napari Labels features: ``index`` (label id) first."""
    if "label" not in table.columns:
        raise ValueError(f"table needs a 'label' column, got columns {list(table.columns)}")
    features = table.reset_index(drop=True).copy()
    if "index" in features.columns:
        features = features.drop(columns="index")
    features.insert(0, "index", features["label"].astype(np.int64))
    return features


def segmentation_layers(
    seg: SmearSegmentation,
    *,
    image_layer_name: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    units: Sequence[Any] | None = None,
) -> list[tuple[np.ndarray, dict, str]]:
    """Layer-data tuples showing a segmentation: cells coloured by type, and nuclei.

    Parameters
    ----------
    seg : SmearSegmentation
        The result of :func:`napari_smear.segment.segment_smear`.
    image_layer_name : str
        Name of the analysed image layer; the layers are named ``"<name> cells"`` and
        ``"<name> nuclei"``.
    scale, translate : sequence of 2 floats, optional
        The image layer's (y, x) scale and translate, so the labels overlay it.
    units : sequence of 2 units, optional
        The image layer's (y, x) units (e.g. ``("µm", "µm")`` or pint units), so the
        viewer keeps consistent units and the writer can record the pixel size.

    Returns
    -------
    list of (data, kwargs, "labels")
        Cells: ``features`` is ``seg.table`` with an ``index`` column of label ids
        first (napari's convention), colormap a
        :class:`~napari.utils.colormaps.DirectLabelColormap` by cell type
        (:data:`CELL_TYPE_COLORS`), ``metadata[METADATA_KEY]`` with the RBC diameter,
        pixel size, source layer and parameters. Nuclei: ids of their cells, one colour.
    """
    features = features_from_table(seg.table)
    common: dict[str, Any] = {}
    if scale is not None:
        common["scale"] = tuple(float(v) for v in scale)
    if translate is not None:
        common["translate"] = tuple(float(v) for v in translate)
    if units is not None:
        common["units"] = tuple(str(u) for u in units)
    info = {
        "rbc_diameter_px": float(seg.rbc_diameter_px),
        "pixel_size_um": None if seg.pixel_size_um is None else float(seg.pixel_size_um),
        "image_layer": image_layer_name,
        "params": dict(seg.params),
    }
    cells = (
        np.asarray(seg.labels, dtype=np.uint32),
        {
            "name": f"{image_layer_name} cells",
            "features": features,
            "colormap": cell_type_colormap(seg.table),
            "opacity": 0.5,
            "metadata": {METADATA_KEY: {**info, "kind": "cells"}},
            **common,
        },
        "labels",
    )
    nuclei = (
        np.asarray(seg.nuclei, dtype=np.uint32),
        {
            "name": f"{image_layer_name} nuclei",
            # Same features: hovering a nucleus shows its cell's row.
            "features": features.copy(),
            "colormap": DirectLabelColormap(color_dict={None: NUCLEUS_COLOR, 0: TRANSPARENT}),
            "opacity": 0.6,
            "metadata": {METADATA_KEY: {**info, "kind": "nuclei"}},
            **common,
        },
        "labels",
    )
    return [cells, nuclei]


def segmentation_from_layers(cells_layer: Any, nuclei_layer: Any = None) -> SmearSegmentation:
    """Rebuild a :class:`SmearSegmentation` from the layers :func:`segmentation_layers` made.

    Parameters
    ----------
    cells_layer : napari.layers.Labels
        The ``"<name> cells"`` layer (its features must hold the segmentation table and
        its metadata the RBC diameter).
    nuclei_layer : napari.layers.Labels, optional
        The nuclei layer; without it ``nuclei`` is all zeros.

    Raises
    ------
    ValueError
        If the layer lacks the table columns or the RBC diameter (i.e. was not made by
        napari-smear's segmentation).
    """
    info = dict(getattr(cells_layer, "metadata", {}).get(METADATA_KEY, {}))
    features = pd.DataFrame(cells_layer.features)
    missing = [c for c in TABLE_COLUMNS if c not in features.columns]
    if missing or "rbc_diameter_px" not in info:
        raise ValueError(
            f"layer {getattr(cells_layer, 'name', '?')!r} was not made by napari-smear's "
            f"segmentation (missing {missing or ['metadata rbc_diameter_px']}); "
            "run 'Segment cells' first"
        )
    labels = np.asarray(cells_layer.data, dtype=np.uint32)
    nuclei = (
        np.asarray(nuclei_layer.data, dtype=np.uint32)
        if nuclei_layer is not None
        else np.zeros_like(labels)
    )
    table = features.drop(columns="index", errors="ignore").reset_index(drop=True)
    return SmearSegmentation(
        labels=labels,
        nuclei=nuclei,
        table=table,
        rbc_diameter_px=float(info["rbc_diameter_px"]),
        pixel_size_um=info.get("pixel_size_um"),
        params=dict(info.get("params", {})),
    )
