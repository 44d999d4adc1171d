"""npe2 writers: a labels layer -> uint32 TIFF, plus its features -> ``<stem>_cells.csv``;
several layers (the cells and nuclei of a segmentation, with their image) -> one folder."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_smear.io import METADATA_KEY, check_writable_location, write_csv_atomic, write_tiff_atomic

LABELS_SUFFIXES = (".tif", ".tiff")
def cells_csv_path(labels_path: str | os.PathLike) -> Path:
    """Where the cell table of a labels TIFF goes: ``a/x.tif`` -> ``a/x_cells.csv``."""
    labels_path = Path(labels_path)
    return labels_path.with_name(f"{labels_path.stem}_cells.csv")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer as a uint32 TIFF, and its features as CSV when it has any.

    Both files are written atomically. The TIFF records the pixel size (resolution
    tags, when the layer's scale is in µm or its metadata has ``pixel_size_um``) and
    napari-smear's layer metadata (RBC diameter, class colours, ...) and the layer's
    scale and translate, so the napari-smear reader opens it again as the same labels
    layer in the same place, features and colours included. Only 2-D layers.

    Parameters
    ----------
    path : str
        Target file; ``.tif`` is appended unless it ends in ``.tif``/``.tiff``.
    data : array-like
        The labels (non-negative integers).
    meta : dict
        The layer's state (napari passes ``layer._get_state()``-like keys: ``name``,
        ``features``, ``metadata``, ``scale``, ``units``).

    Returns
    -------
    list of str
        The files written: the TIFF, then the CSV if any.
    """
    target = Path(path)
    if not target.name.lower().endswith(LABELS_SUFFIXES):
        target = target.with_name(target.name + ".tif")
    labels = np.asarray(data)
    if labels.ndim != 2:
        raise ValueError(
            f"napari-smear saves 2-D labels layers (one smear field); this layer has {labels.ndim} dimensions "
            f"{labels.shape}: save it with napari's own TIFF writer"
        )
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative to be saved as uint32")
    if labels.size and labels.max() > np.iinfo(np.uint32).max:
        raise ValueError("labels exceed the uint32 range")

    layer_metadata = dict(meta.get("metadata") or {})
    own = dict(layer_metadata.get(METADATA_KEY) or {})
    own.setdefault("kind", "labels")
    own["name"] = meta.get("name")
    pixel_size_um = _pixel_size_um(meta, layer_metadata, own)
    if pixel_size_um is not None:
        own["pixel_size_um"] = pixel_size_um
    _record_placement(own, meta)
    features = meta.get("features")
    has_table = features is not None and len(features) > 0
    # which table goes with these labels: none is said as well, so that the reader does
    # not attach a table an earlier save (or a batch run) left beside the file
    own["table"] = cells_csv_path(target).name if has_table else None
    check_writable_location(target, "the labels file")  # named, not a hidden temporary file

    written = [
        str(
            write_tiff_atomic(
                target,
                labels.astype(np.uint32, copy=False),
                pixel_size_um=pixel_size_um,
                napari_smear_metadata=own,
                compression="zlib",
            )
        )
    ]
    if has_table:
        written.append(str(write_csv_atomic(cells_csv_path(target), pd.DataFrame(features))))
    return written


def _record_placement(own: dict, meta: dict) -> None:
    """Store where the layer sits over its image (a crop's offset, a non-µm scale) in
    ``own``, the napari-smear metadata written to the TIFF: the reader places it there again."""
    for key in ("scale", "translate"):
        if meta.get(key) is not None:
            own[key] = [float(v) for v in list(meta[key])[-2:]]
    if meta.get("units") is not None:
        own["units"] = [str(u) for u in list(meta["units"])[-2:]]
    # a turned or sheared image's results lie on it turned (layers.layer_orientation):
    # recorded when not the identity, so the reopened layer comes back on the image
    identity = {"rotate": np.eye(2), "shear": np.zeros(1), "affine": np.eye(3)}
    for key, plain in identity.items():
        value = meta.get(key)
        if value is None:
            continue
        value = np.asarray(getattr(value, "affine_matrix", value), dtype=float)
        if value.shape != plain.shape:
            continue  # a stack's (3-D) placement: not a field's
        if not np.allclose(value, plain):
            own[key] = value.tolist()


def _pixel_size_um(meta: dict, layer_metadata: dict, own: dict) -> float | None:
    """The layer's pixel size in µm, if something says so."""
    for source in (own, layer_metadata):
        value = source.get("pixel_size_um")
        if value is not None:
            return float(value)
    from napari_smear._napari.layers import pixel_size_from_scale

    return pixel_size_from_scale(meta.get("scale"), meta.get("units"))


def write_layers_folder(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write several layers into one folder: labels as :func:`write_labels` does (TIFF
    plus ``<name>_cells.csv``), images as TIFF with their pixel size and place.

    What *File > Save Selected Layers* (or ``viewer.layers.save(folder)``) calls for a
    segmentation's cells and nuclei layers, with or without their image: the single-layer
    writer takes one layer at a time, and napari itself writes no labels TIFF. Each file
    is named after its layer (characters a file name cannot hold become ``_``; a second
    layer of the same name gets ``-2``), and the napari-smear reader opens each again as
    the same layer in the same place.

    Parameters
    ----------
    path : str
        The folder (created when missing); a ``.tif``/``.tiff`` ending is dropped, so
        ``smear.tif`` writes into ``smear/``.
    layer_data : list of (data, meta, layer_type)
        What napari passes: labels and image layers, 2-D (an RGB image is (H, W, 3));
        of a multiscale image, the full-resolution level is written.

    Returns
    -------
    list of str
        Every file written, layer by layer.
    """
    folder = Path(path)
    if folder.name.lower().endswith(LABELS_SUFFIXES):
        folder = folder.with_name(folder.name.rsplit(".", 1)[0])
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; several layers are saved into a folder: choose a folder name")
    unsupported = sorted({kind for _, _, kind in layer_data if kind not in ("labels", "image")})
    if unsupported:
        raise ValueError(f"napari-smear saves labels and image layers into a folder, not {', '.join(unsupported)}")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    used: set[str] = set()
    for data, meta, kind in layer_data:
        stem = _file_stem(meta.get("name") or kind, used)
        if kind == "labels":
            written += write_labels(str(folder / f"{stem}.tif"), data, meta)
        else:
            written.append(_write_image(folder / f"{stem}.tif", data, meta))
    return written


def _file_stem(name: str, used: set[str]) -> str:
    """A file name for a layer name, unique among ``used`` (case-insensitively)."""
    stem = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", str(name)).strip(" .") or "layer"
    candidate, k = stem, 2
    while candidate.lower() in used:
        candidate, k = f"{stem}-{k}", k + 1
    used.add(candidate.lower())
    return candidate


def _write_image(target: Path, data: Any, meta: dict) -> str:
    """An image layer as TIFF with its pixel size, scale and translate (full resolution)."""
    if meta.get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]
    image = np.asarray(data)
    rgb = bool(meta.get("rgb")) and image.ndim == 3 and image.shape[-1] in (3, 4)
    if image.ndim != (3 if rgb else 2):
        raise ValueError(
            f"napari-smear saves 2-D image layers (one smear field); layer {meta.get('name')!r} has shape "
            f"{image.shape}: save it with napari's own writer"
        )
    layer_metadata = dict(meta.get("metadata") or {})
    own = {"kind": "image", "name": meta.get("name")}
    pixel_size_um = _pixel_size_um(meta, layer_metadata, own)
    _record_placement(own, meta)
    return str(write_tiff_atomic(
        target, image, pixel_size_um=pixel_size_um, napari_smear_metadata=own, compression="zlib",
        photometric="rgb" if rgb else "minisblack",
    ))
