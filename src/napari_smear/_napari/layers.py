"""Turn analysis results into napari layer-data tuples (and back).

Everything that decides how results look in the viewer (names, colours, features)
lives here so every widget -- and scripts, through :func:`add_to_viewer` -- shows them
the same way.
"""
from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from napari.utils.colormaps import DirectLabelColormap

from napari_smear.colors import CELL_TYPE_RGB, CLASS_RGB, class_palette_rgb
from napari_smear.io import METADATA_KEY
from napari_smear.segment.types import TABLE_COLUMNS, SmearSegmentation

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from napari_smear.pipeline import AnalysisResult

__all__ = [
    "CELL_TYPE_COLORS",
    "NUCLEUS_COLOR",
    "UNKNOWN_COLOR",
    "METADATA_KEY",
    "class_colormap",
    "cell_type_colormap",
    "nuclei_colormap",
    "features_from_table",
    "segmentation_layers",
    "segmentation_from_layers",
    "CLASS_COLORS",
    "UNCLASSIFIED_ALPHA",
    "ATTENTION_COLORMAP",
    "class_palette",
    "classified_colormap",
    "classification_features",
    "attention_layer",
    "analysis_layers",
    "show_layers",
    "recolor_by_class",
    "set_cell_classes",
    "hand_set_classes",
    "restore_hand_set_classes",
    "image_layer_of_cells",
    "BY_HAND",
    "add_to_viewer",
]


def _rgba(rgb) -> tuple[float, float, float, float]:
    """0-255 RGB -> napari's 0-1 RGBA, opaque."""
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, 1.0)


#: RGBA (0-1) per cell type, shared by every widget that colours cells by type.
CELL_TYPE_COLORS: dict[str, tuple[float, float, float, float]] = {
    name: _rgba(rgb) for name, rgb in CELL_TYPE_RGB.items()  # violet, red, yellow
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
    for column in ("class", "model"):  # "" for none, as the docks write them (a CSV read back has NaN)
        if column in features.columns:
            features[column] = [str(v) if _has_class(v) else "" for v in features[column]]
    return features


def segmentation_layers(
    seg: SmearSegmentation,
    *,
    image_layer_name: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    units: Sequence[Any] | None = None,
    orientation: Mapping[str, Any] | None = None,
    image_layer_id: str | None = None,
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
    orientation : mapping, optional
        The image layer's ``rotate``, ``shear`` and ``affine`` when it is turned or
        sheared (see :func:`layer_orientation`), so the labels turn with it.
    image_layer_id : str, optional
        The image layer's ``unique_id``, recorded so that the layers follow it when it
        is renamed (:func:`relink_renamed_image`).

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
    common = _placement_kwargs(scale, translate, units, orientation)
    info = {
        "rbc_diameter_px": float(seg.rbc_diameter_px),
        "pixel_size_um": None if seg.pixel_size_um is None else float(seg.pixel_size_um),
        "image_layer": image_layer_name,
        "image_layer_id": image_layer_id,
        "params": dict(seg.params),
        # The segmentation's own columns: classification adds more to the features,
        # and segmentation_from_layers gives back only these.
        "table_columns": [str(c) for c in seg.table.columns],
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
            "colormap": nuclei_colormap(),
            "opacity": 0.6,
            "metadata": {METADATA_KEY: {**info, "kind": "nuclei"}},
            **common,
        },
        "labels",
    )
    return [cells, nuclei]


def segmentation_from_layers(cells_layer: Any, nuclei_layer: Any = None, *, refresh: bool = True) -> SmearSegmentation:
    """Rebuild a :class:`SmearSegmentation` from the layers :func:`segmentation_layers` made.

    Parameters
    ----------
    cells_layer : napari.layers.Labels
        The ``"<name> cells"`` layer (its features must hold the segmentation table and
        its metadata the RBC diameter).
    nuclei_layer : napari.layers.Labels, optional
        The nuclei layer; without it ``nuclei`` is all zeros.
    refresh : bool
        Measure the table again from the labels when they were edited by hand (brush,
        eraser; :func:`napari_smear.segment.refresh_table`, a pass over every pixel). A
        widget passes False and does it in its worker.

    Returns
    -------
    SmearSegmentation
        Its ``table`` holds the segmentation's columns only (those recorded in the
        layer's metadata when it was made): columns a classification added are left out.
        With ``refresh``, a table measured again from labels edited by hand.

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
    own_columns = info.get("table_columns")
    if own_columns:
        # Drop what a classification added (class, probabilities, morphology): they are
        # results, and analyze() computes them again.
        table = table[[c for c in own_columns if c in table.columns]]
    from napari_smear.segment import refresh_table

    segmentation = SmearSegmentation(
        labels=labels,
        nuclei=nuclei,
        table=table,
        rbc_diameter_px=float(info["rbc_diameter_px"]),
        pixel_size_um=info.get("pixel_size_um"),
        params=dict(info.get("params", {})),
    )
    # cells painted or erased by hand since the table was made are measured again
    return refresh_table(segmentation) if refresh else segmentation


def nuclei_layer_of(viewer: Any, cells_layer: Any) -> Any:
    """The nuclei layer made together with ``cells_layer`` (same segmentation), if any."""
    from napari.layers import Labels

    info = cells_layer.metadata.get(METADATA_KEY, {})
    candidates = [
        layer for layer in viewer.layers
        if isinstance(layer, Labels)
        and layer.metadata.get(METADATA_KEY, {}).get("kind") == "nuclei"
        and layer.metadata[METADATA_KEY].get("image_layer") == info.get("image_layer")
        and layer.data.shape == cells_layer.data.shape
    ]
    paired = cells_layer.name.replace(" cells", " nuclei")
    for layer in candidates:
        if layer.name == paired:
            return layer
    return candidates[0] if candidates else None


def attention_layers_of(viewer: Any, image_layer_name: str, image_layer_id: str | None = None) -> list[Any]:
    """The attention layers made from the cells of an image (by its layer id when it is
    known, else by its name)."""
    found = []
    for layer in viewer.layers:
        info = getattr(layer, "metadata", {}).get(METADATA_KEY, {})
        if info.get("kind") != "attention":
            continue
        if image_layer_id is not None and info.get("image_layer_id") is not None:
            if info["image_layer_id"] == image_layer_id:
                found.append(layer)
        elif info.get("image_layer") == image_layer_name:
            found.append(layer)
    return found


def refresh_cells_layer(cells_layer: Any, nuclei_layer: Any = None) -> dict[str, int] | None:
    """Measure a cells layer again after hand edits (brush, eraser, fill) and update its
    features and colours in place.

    A cell erased to the last pixel loses its row; a cell painted with a new label
    gets one (typed as :func:`napari_smear.segment.refresh_table` says: ``wbc`` when
    ``nuclei_layer`` holds its id, else by size) with no class; every other cell keeps
    its class, confidence and the other columns a classification added, with its
    area, centroid and box measured again (the morphology a classification measured
    is measured again when it runs next). A pass over every pixel of the layer.

    Returns
    -------
    dict or None
        ``removed``, ``added`` and ``redrawn`` counts; None when nothing changed (the
        layer is then left as it was).
    """
    from napari_smear.segment import refresh_table

    refreshed = refresh_table(segmentation_from_layers(cells_layer, nuclei_layer, refresh=False))
    edited = refreshed.params.get("edited")
    if not edited:
        return None
    old = pd.DataFrame(cells_layer.features)
    table = refreshed.table.copy()
    added_columns = [c for c in old.columns if c not in table.columns and c != "index"]
    if added_columns and "label" in old.columns:
        kept = old.drop_duplicates("label").set_index("label")[added_columns]
        table = table.join(kept, on="label")
    if "class" in table.columns:
        for column in ("class", "model"):  # "" for the new cells, as classification_features writes them
            if column in table.columns:
                table[column] = [str(v) if _has_class(v) else "" for v in table[column]]
        cells_layer.features = classification_features(table)
        recolor_by_class(cells_layer)
    else:
        cells_layer.features = features_from_table(table)
        cells_layer.colormap = cell_type_colormap(table)
    return edited


# ----------------------------------------------------------------------------- classification

#: Fixed colours of the classes the built-in models know (:data:`napari_smear.colors.CLASS_RGB`),
#: the same in every image and every session.
CLASS_COLORS: dict[str, tuple[float, float, float, float]] = {name: _rgba(rgb) for name, rgb in CLASS_RGB.items()}
#: Opacity factor of cells no model classified: shown in their cell-type colour, faint.
UNCLASSIFIED_ALPHA = 0.35
#: Name of the attention colormap (:func:`attention_colormap`).
ATTENTION_COLORMAP = "smear attention"
#: Translucent blending with a colormap whose low end is transparent: where the map is
#: 0 (glass, unclassified cells) the smear is untouched, and attended pixels are tinted
#: red to yellow with growing opacity. (Additive blending of a dark-to-bright colormap,
#: the usual choice on fluorescence, saturates to white over the bright glass of a
#: brightfield smear.)
ATTENTION_BLENDING = "translucent"
ATTENTION_OPACITY = 0.9
# RGBA stops of the attention colormap at 0, 0.25, 0.5, 0.75 and 1.
_ATTENTION_STOPS = (
    (0.0, 0.0, 0.0, 0.0),
    (0.55, 0.0, 0.35, 0.15),
    (0.9, 0.1, 0.1, 0.3),
    (1.0, 0.55, 0.0, 0.45),
    (1.0, 0.95, 0.2, 0.6),  # at most 60 % opaque: the cell stays readable under its map
)
# Columns shown first in the features table and the status bar (hovering a cell).
_LEADING_COLUMNS = ("index", "label", "cell_type", "class", "confidence", "model")


def class_palette(
    classes: Iterable[Any], base: Mapping[str, Any] | None = None
) -> dict[str, tuple[float, float, float, float]]:
    """:func:`napari_smear.colors.class_palette_rgb` as napari colours: class name -> RGBA
    (0-1). ``base`` (e.g. a layer's stored palette, RGBA) keeps its exact values."""
    kept = {str(k): tuple(float(c) for c in v) for k, v in (base or {}).items()}
    chosen = class_palette_rgb(
        [name for name in classes if _has_class(name)],
        base={name: tuple(255 * c for c in colour[:3]) for name, colour in kept.items()},
    )
    # colours already decided keep their exact values (alpha included)
    palette = {name: kept.get(name) or _rgba(rgb) for name, rgb in chosen.items()}
    return palette


def _has_class(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""


def classified_colormap(table: pd.DataFrame, palette: Mapping[str, Any]) -> DirectLabelColormap:
    """Colour each cell by its ``class``; cells without one by their cell type, faintly.

    Parameters
    ----------
    table : pandas.DataFrame
        Needs ``label`` (or ``index``), ``cell_type`` and ``class`` columns.
    palette : mapping
        Class name -> colour (see :func:`class_palette`).
    """
    ids = table["label"] if "label" in table.columns else table["index"]
    classes = table["class"] if "class" in table.columns else pd.Series([None] * len(table))
    types = table["cell_type"] if "cell_type" in table.columns else pd.Series([None] * len(table))
    color_dict: dict[int | None, Any] = {None: UNKNOWN_COLOR, 0: TRANSPARENT}
    for label, cls, cell_type in zip(ids.to_numpy(), classes.to_numpy(), types.to_numpy(), strict=True):
        label = int(label)
        if label == 0:
            continue
        if _has_class(cls) and str(cls) in palette:
            color_dict[label] = tuple(palette[str(cls)])
        else:
            r, g, b, a = CELL_TYPE_COLORS.get(cell_type, UNKNOWN_COLOR)
            color_dict[label] = (r, g, b, a * UNCLASSIFIED_ALPHA)
    return DirectLabelColormap(color_dict=color_dict)


def classification_features(table: pd.DataFrame) -> pd.DataFrame:
    """An analysis table as Labels features: ``index`` first, then class and confidence.

    ``class`` and ``model`` are strings ("" for cells no model classified, so they can be
    typed into napari's features table), and the columns are ordered ``index, label,
    cell_type, class, confidence, model, p_<class>...`` then the rest, which is also the
    order the status bar lists them in when hovering a cell.
    """
    features = features_from_table(table)
    leading = [c for c in _LEADING_COLUMNS if c in features.columns]
    probabilities = [c for c in features.columns if c.startswith("p_") and c not in leading]
    rest = [c for c in features.columns if c not in leading and c not in probabilities]
    return features[leading + probabilities + rest]


def layer_orientation(layer: Any) -> dict[str, Any] | None:
    """``rotate``, ``shear`` and ``affine`` of a 2-D image layer (None for a stack): result
    layers given them lie on the image, turned or not."""
    if getattr(layer, "ndim", 0) != 2:
        return None
    return {
        "rotate": np.asarray(layer.rotate, dtype=float).tolist(),
        "shear": np.asarray(layer.shear, dtype=float).tolist(),
        "affine": np.asarray(layer.affine.affine_matrix, dtype=float).tolist(),
    }


#: Length units a layer's scale may be in, in micrometres (napari's units are pint's names).
_LENGTH_IN_UM = {
    "micrometer": 1.0, "micrometre": 1.0, "µm": 1.0, "um": 1.0, "micron": 1.0,
    "nanometer": 1e-3, "nanometre": 1e-3, "nm": 1e-3, "millimeter": 1e3, "millimetre": 1e3, "mm": 1e3,
}


def pixel_size_from_scale(scale: Sequence[float] | None, units: Sequence[Any] | None) -> float | None:
    """Micrometres per pixel from a 2-D layer's ``scale`` and ``units`` when both axes
    are in a length unit and the pixels are square (napari's default unit, the pixel,
    says nothing); else None."""
    if scale is None or units is None or len(scale) < 2 or len(units) < 2:
        return None
    factors = [_LENGTH_IN_UM.get(str(unit).strip().lower()) for unit in list(units)[-2:]]
    if None in factors:
        return None
    y, x = (float(v) * f for v, f in zip(list(scale)[-2:], factors))
    return x if x > 0 and np.isclose(x, y) else None


def layer_pixel_size_um(layer: Any) -> float | None:
    """An image layer's pixel size in micrometres: what the reader recorded
    (``metadata["pixel_size_um"]``), else its scale when that is in a length unit
    (``viewer.add_image(image, scale=(0.1, 0.1), units="um")``), else None."""
    recorded = (getattr(layer, "metadata", None) or {}).get("pixel_size_um")
    if recorded:
        return float(recorded)
    return pixel_size_from_scale(getattr(layer, "scale", None), getattr(layer, "units", None))


def _placement_kwargs(
    scale: Sequence[float] | None,
    translate: Sequence[float] | None,
    units: Sequence[Any] | None,
    orientation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    common: dict[str, Any] = {}
    # always explicit (identity unless the image is turned), so a layer updated in place
    # after the image was turned back loses the old turn
    identity = {"rotate": np.eye(2), "shear": np.zeros(1), "affine": np.eye(3)}
    for key, default in identity.items():
        value = (orientation or {}).get(key)
        common[key] = default if value is None else np.asarray(value, dtype=float)
    if scale is not None:
        common["scale"] = tuple(float(v) for v in scale)
    if translate is not None:
        common["translate"] = tuple(float(v) for v in translate)
    if units is not None:
        common["units"] = tuple(str(u) for u in units)
    return common


def nuclei_colormap() -> DirectLabelColormap:
    """Every nucleus in one colour that stands out on the violet of white cells."""
    return DirectLabelColormap(color_dict={None: NUCLEUS_COLOR, 0: TRANSPARENT})


def attention_colormap():
    """The attention layers' colormap: transparent at 0, then purple, red, orange, yellow."""
    from napari.utils.colormaps import Colormap

    return Colormap(np.array(_ATTENTION_STOPS, np.float32), name=ATTENTION_COLORMAP)


def attention_layer(
    attention: np.ndarray,
    *,
    model_name: str,
    image_layer_name: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    units: Sequence[Any] | None = None,
    orientation: Mapping[str, Any] | None = None,
    image_layer_id: str | None = None,
) -> tuple[np.ndarray, dict, str]:
    """Layer-data tuple of one model's attention map, ``"<image> attention (<model>)"``.

    The (H, W) float32 map (0 outside the classified cells, each cell's map in [0, 1])
    is shown with :func:`attention_colormap` (transparent at 0), translucent blending and
    contrast limits (0, 1), so maps of different images and models compare and the smear
    shows through. The layer starts hidden, so that the cells' class colours read true.
    """
    data = np.asarray(attention, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"an attention map must be (H, W), got shape {data.shape}")
    return (
        data,
        {
            "name": f"{image_layer_name} attention ({model_name})",
            # hidden at first: over the cells it tints their class colours (a blue
            # neutrophil looked lime); one click on its eye shows it
            "visible": False,
            "colormap": attention_colormap(),
            "blending": ATTENTION_BLENDING,
            "opacity": ATTENTION_OPACITY,
            "contrast_limits": (0.0, 1.0),
            "metadata": {
                METADATA_KEY: {"kind": "attention", "model": model_name, "image_layer": image_layer_name,
                               "image_layer_id": image_layer_id}
            },
            **_placement_kwargs(scale, translate, units, orientation),
        },
        "image",
    )


def analysis_layers(
    result: AnalysisResult,
    *,
    image_layer_name: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    units: Sequence[Any] | None = None,
    cells_name: str | None = None,
    nuclei_name: str | None = None,
    orientation: Mapping[str, Any] | None = None,
    image_layer_id: str | None = None,
) -> list[tuple[np.ndarray, dict, str]]:
    """Layer-data tuples showing an :class:`~napari_smear.pipeline.AnalysisResult`.

    Parameters
    ----------
    result : AnalysisResult
        What :func:`napari_smear.analyze` returned.
    image_layer_name : str
        Name of the analysed image layer (the layers are named after it).
    scale, translate, units, orientation, image_layer_id
        The image layer's placement and identity (see :func:`segmentation_layers`), so
        the new layers overlay it and follow it.
    cells_name, nuclei_name : str, optional
        Names of existing cells/nuclei layers to update instead of
        ``"<image> cells"`` / ``"<image> nuclei"``.

    Returns
    -------
    list of (data, kwargs, layer_type)
        The cells labels (features from :func:`classification_features`, coloured by
        class with a :class:`~napari.utils.colormaps.DirectLabelColormap`, metadata with
        the models and the class palette), the nuclei labels (same features), and one
        attention image per model (:func:`attention_layer`).
    """
    cells, nuclei = segmentation_layers(
        result.segmentation, image_layer_name=image_layer_name, scale=scale, translate=translate, units=units,
        orientation=orientation, image_layer_id=image_layer_id,
    )
    features = classification_features(result.table)
    ordered_classes = [c for description in result.models.values() for c in description.get("classes", [])]
    if "class" in features.columns:
        ordered_classes += sorted({c for c in features["class"] if c})
    palette = class_palette(ordered_classes)
    cells_kwargs, nuclei_kwargs = cells[1], nuclei[1]
    cells_kwargs["features"] = features
    cells_kwargs["colormap"] = classified_colormap(features, palette)
    analysis_info = {
        "models": {name: dict(description) for name, description in result.models.items()},
        "class_colors": {name: list(color) for name, color in palette.items()},
    }
    cells_kwargs["metadata"][METADATA_KEY].update(analysis_info)
    nuclei_kwargs["features"] = features.copy()
    nuclei_kwargs["metadata"][METADATA_KEY].update(analysis_info)
    if cells_name:
        cells_kwargs["name"] = cells_name
    if nuclei_name:
        nuclei_kwargs["name"] = nuclei_name
    layer_data = [cells, nuclei]
    for model_name, attention in result.attention.items():
        layer_data.append(
            attention_layer(
                attention, model_name=model_name, image_layer_name=image_layer_name,
                scale=scale, translate=translate, units=units, orientation=orientation,
                image_layer_id=image_layer_id,
            )
        )
    return layer_data


# What updating an existing layer in place changes: the data and what the analysis
# decides; the user's display choices (opacity, blending, an image colormap) are kept.
_UPDATED_ATTRIBUTES = {
    "labels": ("features", "colormap", "metadata", "scale", "translate", "units", "rotate", "shear", "affine"),
    "image": ("contrast_limits", "metadata", "scale", "translate", "units", "rotate", "shear", "affine"),
}


def show_layers(viewer: napari.viewer.ViewerModel, layer_data: Sequence[tuple[Any, dict, str]]) -> list[Layer]:
    """Add layer-data tuples to ``viewer``, updating same-named layers of the same type in place.

    Updating in place keeps the user's layer order and display settings when an image
    is analysed again.

    Returns
    -------
    list of napari.layers.Layer
        The added or updated layers, in the order of ``layer_data``.
    """
    from napari.layers import Image, Labels, Layer

    types = {"labels": Labels, "image": Image}
    shown = []
    for data, kwargs, layer_type in layer_data:
        name = kwargs["name"]
        existing = viewer.layers[name] if name in viewer.layers else None
        if existing is not None and not _made_by_napari_smear(existing):
            # a layer of the user's own (drawn by hand, opened from elsewhere) that happens
            # to have the name: never written over; the result goes beside it
            kwargs = {**kwargs, "name": _free_layer_name(viewer, name)}
            existing = None
        if existing is not None and isinstance(existing, types.get(layer_type, ())):
            existing.data = data
            for attribute in _UPDATED_ATTRIBUTES.get(layer_type, ()):
                if attribute in kwargs:
                    setattr(existing, attribute, kwargs[attribute])
            shown.append(existing)
        else:
            shown.append(viewer.add_layer(Layer.create(data, kwargs, layer_type)))
    return shown


def _made_by_napari_smear(layer: Any) -> bool:
    """Whether napari-smear made ``layer`` (or read it from its own files): its metadata
    holds napari-smear's entry. Only such layers are updated in place by a new result."""
    return METADATA_KEY in (getattr(layer, "metadata", None) or {})


def _free_layer_name(viewer: Any, name: str) -> str:
    """``name`` with the first free " [k]" after it (napari's own spelling for copies)."""
    k = 2
    while f"{name} [{k}]" in viewer.layers:
        k += 1
    return f"{name} [{k}]"


def hand_work_replaced(viewer: Any, cells_layer_name: str) -> str | None:
    """What a new result written into the cells layer ``cells_layer_name`` would lose:
    a sentence naming the classes set there by hand (Cell gallery), or None."""
    if cells_layer_name not in viewer.layers:
        return None
    layer = viewer.layers[cells_layer_name]
    if not _made_by_napari_smear(layer):
        return None  # not written over (show_layers puts the result beside it)
    hand = hand_set_classes(layer)
    if not hand:
        return None
    return (f"{cells_layer_name!r} holds {len(hand)} class{'es' if len(hand) != 1 else ''} set by hand, which new "
            "cells replace")


def recolor_by_class(layer: Any) -> dict[str, tuple[float, float, float, float]]:
    """Colour a cells layer by the ``class`` column of its features (after edits).

    Class names not yet in the layer's stored palette get new colours, which are stored
    in ``layer.metadata`` so later edits keep them.

    Returns
    -------
    dict
        The palette used (class name -> RGBA).
    """
    features = pd.DataFrame(layer.features)
    if "class" not in features.columns:
        raise ValueError(f"layer {layer.name!r} has no 'class' column in its features; classify it first")
    info = dict(layer.metadata.get(METADATA_KEY, {}))
    palette = class_palette([c for c in features["class"] if _has_class(c)], base=info.get("class_colors"))
    layer.colormap = classified_colormap(features, palette)
    info["class_colors"] = {name: list(color) for name, color in palette.items()}
    layer.metadata = {**layer.metadata, METADATA_KEY: info}
    return palette


#: The ``model`` of a cell whose class was set by hand (the Cell gallery dock,
#: :func:`set_cell_classes`).
BY_HAND = "by hand"


def set_cell_classes(layer: Any, ids: int | Iterable[int], name: str | None) -> int:
    """Set the class of some cells of a cells layer by hand, and recolour the layer.

    The cells' ``class`` becomes ``name`` (None or "" removes it: the cells count as
    unclassified), their ``model`` :data:`BY_HAND` and their ``confidence`` empty; the
    class a model gave is kept in ``model_class`` (added on the first change), so
    that what was corrected can be counted and exported. The layer's features are
    replaced in one go (one ``features`` event: the count dock counts again) and the
    layer is recoloured (:func:`recolor_by_class`). The Train classifier dock learns
    from the ``class`` column, so corrected cells teach a fine-tuned model.

    Returns
    -------
    int
        How many cells changed class.

    Raises
    ------
    ValueError
        An id that is not a cell of the layer, or a layer without cell features.
    """
    wanted = np.unique(np.atleast_1d(np.asarray(ids, np.int64)))
    from napari_smear.gallery import is_folder_safe_class

    text = "" if name is None else str(name).strip()
    if text and not is_folder_safe_class(text):
        # a class names a folder when cells are exported for training (export_cell_images)
        raise ValueError(f"{text!r} cannot be a class name: a class names a folder of exported cells, so it "
                         'may not hold / \\ : * ? " < > |')
    return _set_hand_classes(layer, dict.fromkeys(wanted.tolist(), name))


def restore_hand_set_classes(layer: Any, classes: Mapping[int, str | None]) -> int:
    """Set again the classes :func:`hand_set_classes` read before the layer was classified
    anew (those of cells still in it), in one pass; returns how many."""
    present = set(pd.DataFrame(layer.features)["index"].astype(int))
    kept = {int(label): name for label, name in classes.items() if int(label) in present}
    if kept:
        _set_hand_classes(layer, kept)
    return len(kept)


def _set_hand_classes(layer: Any, classes: Mapping[int, str | None]) -> int:
    """Label id -> class (None or "": none) set by hand, in one replacement of the layer's
    features and one recolouring (see :func:`set_cell_classes`); returns how many
    cells changed class."""
    features = pd.DataFrame(layer.features).copy()
    if "index" not in features.columns or "cell_type" not in features.columns:
        raise ValueError(f"layer {getattr(layer, 'name', '?')!r} has no cell table in its features; "
                         "segment or classify its image first")
    values = {int(label): "" if name is None else str(name).strip() for label, name in classes.items()}
    wanted = np.array(sorted(values), np.int64)
    missing = np.setdiff1d(wanted, features["index"].to_numpy(np.int64))
    if missing.size:
        raise ValueError(f"no cells with label ids {missing[:10].tolist()} in layer {layer.name!r}")
    if any(value.lower() == "unclassified" for value in values.values()):
        raise ValueError("'unclassified' names the cells without a class: give no class (None) to remove one")
    rows = features["index"].isin(wanted).to_numpy()
    for column, default in (("class", ""), ("model", "")):
        if column not in features.columns:
            features[column] = default
        features[column] = [str(v) if _has_class(v) else "" for v in features[column]]
    if "confidence" not in features.columns:
        features["confidence"] = np.nan
    if "model_class" not in features.columns:
        # what the models said, before any hand edit; placed after "model"
        at = list(features.columns).index("model") + 1
        features.insert(at, "model_class", [
            c if m != BY_HAND else "" for c, m in zip(features["class"], features["model"])
        ])
    new = features.loc[rows, "index"].astype(np.int64).map(values).to_numpy(object)
    changed = int((features.loc[rows, "class"].to_numpy(object) != new).sum())
    features.loc[rows, "class"] = new
    features.loc[rows, "model"] = BY_HAND
    features["confidence"] = pd.to_numeric(features["confidence"], errors="coerce")
    features.loc[rows, "confidence"] = np.nan
    layer.features = features
    recolor_by_class(layer)
    return changed


def hand_set_classes(layer: Any) -> dict[int, str]:
    """Label id -> class of the cells of a cells layer whose class was set by hand
    (:func:`set_cell_classes`; "" for a class removed by hand)."""
    features = getattr(layer, "features", None)
    if features is None or "model" not in features.columns or "index" not in features.columns:
        return {}
    rows = features[features["model"].astype(str) == BY_HAND]
    classes = rows["class"] if "class" in rows.columns else pd.Series([""] * len(rows), index=rows.index)
    return {int(i): (str(c) if _has_class(c) else "") for i, c in zip(rows["index"], classes)}


def image_layer_of_cells(viewer: Any, cells_layer: Any) -> Any:
    """The image layer a cells layer was made from (by layer id, else by name), or None.

    Never another image of the same size: camera fields all have one size, and the
    cells of one field drawn on another's pixels would look plausible and be wrong.
    """
    from napari.layers import Image

    info = cells_layer.metadata.get(METADATA_KEY, {})
    images = [layer for layer in viewer.layers if isinstance(layer, Image)
              and layer.metadata.get(METADATA_KEY, {}).get("kind") != "attention"
              and _image_shape(layer)[:2] == tuple(cells_layer.data.shape)]
    for key, value in (("image_layer_id", lambda layer: layer.unique_id), ("image_layer", lambda layer: layer.name)):
        if info.get(key) is not None:
            for layer in images:
                if value(layer) == info[key]:
                    return layer
    return None


def add_to_viewer(
    viewer: napari.viewer.ViewerModel,
    result: AnalysisResult,
    *,
    image_layer: Any = None,
    counts: bool = True,
) -> list[Layer]:
    """Show an analysis in a viewer the way the "Classify cells" widget does.

    Adds (or updates) ``"<image> cells"`` (features with ``class``, ``confidence`` and
    ``p_<class>`` keyed by ``index``; coloured by class), ``"<image> nuclei"`` and one
    ``"<image> attention (<model>)"`` image per model. The image itself is the caller's.

    Parameters
    ----------
    viewer : napari.Viewer
    result : AnalysisResult
        What :func:`napari_smear.analyze` returned.
    image_layer : napari.layers.Image or str, optional
        The analysed image layer (or its name): the new layers are named after it and
        take its scale, translate and units. Default: the viewer's only image layer of
        the result's height and width; without one the layers are named ``"smear ..."``
        at unit scale.
    counts : bool
        Also open the "Differential count" dock on the cells layer (viewers with a
        window only).

    Returns
    -------
    list of napari.layers.Layer
        Cells, nuclei, then the attention layers.

    Raises
    ------
    ValueError
        ``image_layer`` names no layer, is not an image of the result's shape, or is
        left out while several image layers of that shape are open.

    Examples
    --------
    >>> import napari, napari_smear
    >>> image, meta = napari_smear.read_image("field.jpg")
    >>> viewer = napari.Viewer()
    >>> layer = viewer.add_image(image, name="field", rgb=True)
    >>> result = napari_smear.analyze(image)
    >>> cells, nuclei, *attention = napari_smear.add_to_viewer(viewer, result, image_layer=layer)
    """
    from napari_smear.pipeline import AnalysisResult

    if not isinstance(result, AnalysisResult):
        raise TypeError(
            f"result must be what napari_smear.analyze returned (an AnalysisResult), got {type(result).__name__}"
            + ("; to show a segmentation alone, pass analyze(image, segmentation=seg, models=[])"
               if type(result).__name__ == "SmearSegmentation" else "")
        )
    shape = tuple(result.segmentation.labels.shape)
    layer = _resolve_image_layer(viewer, image_layer, shape)
    if layer is None:
        placement: dict[str, Any] = {"image_layer_name": "smear"}
    else:
        placement = {
            "image_layer_name": layer.name,
            "scale": tuple(layer.scale[-2:]),
            "translate": tuple(layer.translate[-2:]),
            "units": tuple(layer.units[-2:]),
            "orientation": layer_orientation(layer),
            "image_layer_id": layer.unique_id,
        }
    shown = show_layers(viewer, analysis_layers(result, **placement))
    if counts and getattr(viewer, "window", None) is not None:
        from napari_smear._napari.widgets.counts import show_counts

        show_counts(viewer, shown[0])
    return shown


def relink_renamed_image(viewer: Any, image_layer: Any) -> list[Layer]:
    """Point napari-smear layers made for an image at its new name after a rename.

    Result layers record the name of the image they were made for
    (``metadata["napari_smear"]["image_layer"]``) and its ``unique_id``
    (``image_layer_id``). The layers that record ``image_layer``'s own id under another
    name were made for it before it was renamed: they are updated to the new name, so
    the docks find its cells (with the user's edits) instead of segmenting again, and
    those still named after the old name (``"<old> cells"``, ``"<old> attention (m)"``;
    not one the user named otherwise) take the new one, so that the next run updates
    them instead of adding a second set beside them. Another image, even of the same
    size, never takes them over.

    Returns the layers updated (empty when nothing was done).
    """
    own_id = getattr(image_layer, "unique_id", None)
    if own_id is None:
        return []
    updated = [
        layer for layer in viewer.layers
        if isinstance(layer.metadata.get(METADATA_KEY), dict)
        and layer.metadata[METADATA_KEY].get("image_layer_id") == own_id
        and layer.metadata[METADATA_KEY].get("image_layer") != image_layer.name
    ]
    for layer in updated:
        old_name = layer.metadata[METADATA_KEY].get("image_layer")
        layer.metadata = {**layer.metadata, METADATA_KEY: {**layer.metadata[METADATA_KEY],
                                                          "image_layer": image_layer.name}}
        if old_name and layer.name.startswith(f"{old_name} "):
            new_name = image_layer.name + layer.name[len(old_name):]
            if new_name not in viewer.layers:
                layer.name = new_name
    return updated


def _image_shape(layer: Any) -> tuple[int, ...]:
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(data.shape)
    return shape[-3:-1] if layer.rgb else shape[-2:]


def _resolve_image_layer(viewer: Any, image_layer: Any, shape: tuple[int, ...]) -> Any:
    from napari.layers import Image

    if image_layer is None:
        # our own attention maps are image layers of the same shape: never the analysed image
        matching = [
            lyr for lyr in viewer.layers
            if isinstance(lyr, Image) and _image_shape(lyr) == shape
            and (lyr.metadata.get(METADATA_KEY) or {}).get("kind") != "attention"
        ]
        if len(matching) > 1:
            raise ValueError(
                f"several image layers have the analysed shape {shape}: "
                f"{[lyr.name for lyr in matching]}; pass image_layer= to say which one was analysed"
            )
        return matching[0] if matching else None
    if isinstance(image_layer, str):
        if image_layer not in viewer.layers:
            raise ValueError(
                f"no layer named {image_layer!r} in the viewer (layers: {[lyr.name for lyr in viewer.layers]})"
            )
        image_layer = viewer.layers[image_layer]
    if not isinstance(image_layer, Image):
        raise ValueError(f"image_layer must be an image layer, got {type(image_layer).__name__}")
    if _image_shape(image_layer) != shape:
        raise ValueError(
            f"image layer {image_layer.name!r} is {_image_shape(image_layer)} pixels but the analysis is of a "
            f"{shape} image; pass the layer that was analysed"
        )
    return image_layer
