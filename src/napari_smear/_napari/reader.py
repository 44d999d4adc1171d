"""npe2 reader: smear images (TIFF/OME-TIFF, PNG, JPEG, BMP) with their pixel size."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import pandas as pd

from napari_smear.io import METADATA_KEY, file_stem, is_supported_path, read_image, read_pyramid_levels

PathLike = str | os.PathLike
LayerData = tuple[np.ndarray, dict, str]
#: Kinds of labels TIFF the napari-smear writer records (``layers.segmentation_layers``).
LABEL_KINDS = ("cells", "nuclei", "labels")


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """Return a reader if napari-smear can read ``path`` (one path or a list), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        return None
    if not all(is_supported_path(p) and not os.path.isdir(p) for p in paths):
        return None
    return read_smear_images


def read_smear_images(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read one or more image files into napari image layer data.

    Each file becomes one layer named after the file stem, with ``rgb=True`` for RGB(A)
    data, ``scale`` = pixel size in µm when the file records it, and
    ``metadata = {"path": ..., "pixel_size_um": ...}``. Pixels are kept as stored
    (16-bit stays 16-bit); segmentation converts them itself.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [layer for p in paths for layer in _layers_of(p)]


def _layers_of(path: PathLike) -> list[LayerData]:
    data, meta = read_image(path, rgb=False)
    own = meta.get("napari_smear")
    if own and own.get("kind") in LABEL_KINDS:
        return [_labels_layer_data(path, data, meta, own)]
    if own and own.get("kind") == "attention":
        layers = _attention_layers(path, data, meta, own)
        if layers:
            return layers
    pixels, kwargs, kind = _image_layer_data(path, data, meta)
    one_field = not kwargs.get("multiscale") and np.ndim(pixels) - (1 if kwargs["rgb"] else 0) == 2
    if own and own.get("kind") == "image" and one_field:
        _recorded_placement(kwargs, own)  # saved by write_layers_folder: back in its place
    return [(pixels, kwargs, kind)]


def _image_layer_data(path: PathLike, data: np.ndarray, meta: dict) -> LayerData:
    if meta.get("axes") == "CYX" and data.ndim == 3 and data.shape[0] in (3, 4):
        # colour planes stored first (an OME-TIFF's channels): shown as the colour image
        # the segmentation takes them for, not as planes under a slider
        data = np.moveaxis(data, 0, -1)
    is_rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    kwargs: dict = {
        "name": file_stem(path),
        "rgb": is_rgb,
        "metadata": {
            "path": os.fspath(path),
            "pixel_size_um": meta["pixel_size_um"],
            "format": meta["format"],
        },
    }
    spatial_ndim = data.ndim - (1 if is_rgb else 0)
    levels = read_pyramid_levels(path) if meta.get("format") == "tiff" else []
    if levels and all(
        level.ndim == data.ndim and (not is_rgb or level.shape[-1] == data.shape[-1])
        and level.shape[-2 if is_rgb else -1] < data.shape[-2 if is_rgb else -1]
        for level in levels
    ):
        # a scanner's pyramid: a multiscale layer (the widgets segment its full level, data[0])
        data = [data, *levels]
        kwargs["multiscale"] = True
    pixel_size = meta.get("pixel_size_yx_um")
    if pixel_size is not None:
        kwargs["scale"] = (1.0,) * (spatial_ndim - 2) + tuple(pixel_size)
        # the leading axes (planes, channels) have no length: napari's unit for a plain index
        kwargs["units"] = ("pixel",) * (spatial_ndim - 2) + ("µm", "µm")
    return data, kwargs, "image"


def _attention_layers(path: PathLike, data: np.ndarray, meta: dict, own: dict) -> list[LayerData]:
    """A batch run's ``<image>_attention.tif`` (one plane per model, the models named in
    its metadata): one attention layer per model, as *Show in viewer* adds them; empty
    when the file does not say which plane is which."""
    from napari_smear._napari.layers import attention_layer

    models = own.get("models")
    if not isinstance(models, list) or not models or data.ndim not in (2, 3):
        return []
    maps = np.asarray(data, dtype=np.float32).reshape(-1, *data.shape[-2:])
    if len(maps) != len(models):
        return []
    name = str(own.get("name") or file_stem(path))
    image_name = name[: -len(" attention")] if name.endswith(" attention") else name
    placement: dict = {}
    if meta.get("pixel_size_yx_um") is not None:
        placement = {"scale": tuple(meta["pixel_size_yx_um"]), "units": ("µm", "µm")}
    return [attention_layer(plane, model_name=str(model), image_layer_name=image_name, **placement)
            for plane, model in zip(maps, models)]


def _recorded_placement(kwargs: dict, own: dict) -> None:
    """Place a 2-D layer as napari-smear's writer recorded it (``own``, the TIFF's
    napari-smear metadata): scale with its units, translate, and the turn of an image
    that was rotated, sheared or given an affine (results lie on it turned)."""
    for key in ("scale", "translate"):
        if isinstance(own.get(key), list) and len(own[key]) == 2:
            kwargs[key] = tuple(float(v) for v in own[key])
    for key in ("rotate", "shear", "affine"):
        if isinstance(own.get(key), list):
            kwargs[key] = np.asarray(own[key], dtype=float)
    if isinstance(own.get("scale"), list):  # the scale's units go with it (pixels stay pixels)
        if isinstance(own.get("units"), list) and len(own["units"]) == 2:
            kwargs["units"] = tuple(str(u) for u in own["units"])
        else:
            kwargs.pop("units", None)


def _labels_layer_data(path: PathLike, data: np.ndarray, meta: dict, own: dict) -> LayerData:
    from napari_smear._napari.layers import features_from_table
    from napari_smear._napari.writer import cells_csv_path

    # the layer's own settings, not metadata
    placement = ("name", "scale", "translate", "units", "rotate", "shear", "affine")
    kwargs: dict = {
        "name": own.get("name") or file_stem(path),
        "metadata": {
            "path": os.fspath(path),
            "pixel_size_um": meta["pixel_size_um"],
            METADATA_KEY: {k: v for k, v in own.items() if k not in placement},
        },
    }
    if "image_layer" not in own and isinstance(own.get("image"), str):
        # a batch run records the input image's path; opened beside it, that image's
        # layer is named after its file: the docks then find these cells for it
        kwargs["metadata"][METADATA_KEY]["image_layer"] = file_stem(own["image"])
    if meta.get("pixel_size_yx_um") is not None:
        kwargs["scale"] = tuple(meta["pixel_size_yx_um"])
        kwargs["units"] = ("µm", "µm")
    if data.ndim == 2:
        _recorded_placement(kwargs, own)
    csv_path = cells_csv_path(path)
    suffix = {"cells": "_labels", "nuclei": "_nuclei"}.get(str(own.get("kind")))
    if "table" in own:
        # the writer records which table goes with the labels, or that none does: a table
        # an earlier save or a batch run left beside the file is not theirs
        table_name = Path(str(own["table"])).name if own["table"] else ""
        csv_path = Path(path).with_name(table_name) if table_name else None
    elif not csv_path.exists() and suffix and Path(path).stem.endswith(suffix):
        # `napari-smear analyze` / `segment` name the table after the image, not the TIFF:
        # x_labels.tif and x_nuclei.tif go with x_cells.csv (a nucleus carries its cell's
        # id, so hovering it shows its cell's row, as in the layers the widgets add)
        csv_path = Path(path).with_name(f"{Path(path).stem[: -len(suffix)]}_cells.csv")
    if csv_path is not None and csv_path.is_file():
        table = pd.read_csv(csv_path)
        if "label" in table.columns:
            kwargs["features"] = features_from_table(table)
            if "cell_type" in table.columns and own.get("kind") == "cells":
                kwargs["colormap"] = _cells_colormap(table, own)
        else:
            kwargs["features"] = table
    if own.get("kind") == "nuclei":
        from napari_smear._napari.layers import nuclei_colormap

        kwargs["colormap"] = nuclei_colormap()
    return np.asarray(data, dtype=np.uint32), kwargs, "labels"


def _cells_colormap(table: pd.DataFrame, own: dict):
    """Classified cells in their class colours (as stored by the writer), else by cell type."""
    from napari_smear._napari.layers import (
        cell_type_colormap,
        class_palette,
        classified_colormap,
    )

    if "class" in table.columns and table["class"].notna().any():
        palette = class_palette(table["class"].dropna().astype(str), base=own.get("class_colors"))
        return classified_colormap(table, palette)
    return cell_type_colormap(table)
