"""analyze(image): segment -> crop -> classify -> paste attention back, in one call.

Synchronous and Qt-free: the napari widgets, the batch runner and scripts all call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .segment.types import SmearSegmentation

DEFAULT_MODELS = ("wbc-pbc8", "rbc-chula12")
# Which segmented cells a model sees when its file does not say (metadata "cell_types").
_DEFAULT_CELL_TYPES = ("wbc", "rbc", "platelet")


@dataclass
class AnalysisResult:
    """Everything ``analyze`` found in one image.

    Attributes
    ----------
    segmentation : SmearSegmentation
    table : pandas.DataFrame
        One row per cell: the segmentation table, morphology, and for every cell a
        model classified: ``class``, ``confidence``, ``model`` and one ``p_<class>``
        column per class of every model (NaN where that model did not see the cell).
    attention : dict[str, numpy.ndarray]
        Per model name, a (H, W) float32 map in image coordinates: each cell's attention
        map resampled onto its crop window and pasted inside the cell (0 elsewhere).
    counts : pandas.DataFrame
        Differential count: ``cell_type, class, count, percent`` (percent of the cells
        of that type).
    models : dict[str, dict]
        Per model name, its description (kind, classes, cell types, file).
    """

    segmentation: SmearSegmentation
    table: pd.DataFrame
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    models: dict[str, dict] = field(default_factory=dict)


def analyze(
    image,
    *,
    models: Sequence = DEFAULT_MODELS,
    device: str = "auto",
    batch_size: int = 256,
    pixel_size_um: float | None = None,
    segmentation: SmearSegmentation | None = None,
    morphology: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> AnalysisResult:
    """Segment a smear field, classify its cells and map the models' attention.

    Parameters
    ----------
    image : array-like
        RGB field (see :func:`napari_smear.io.as_rgb_uint8` for accepted inputs).
    models : sequence of str, path or (model, ModelInfo)
        Built-in names (``"wbc-pbc8"``, ``"rbc-chula12"``), model files, or already
        loaded models. Each classifies the cell types its file declares.
    device : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
    segmentation : SmearSegmentation, optional
        Reuse an existing segmentation instead of segmenting again.
    progress : callable, optional
        ``progress(fraction, message)``; raise inside it to cancel.
    """
    from .crops import crop_instances, paste_maps
    from .io import as_rgb_uint8
    from .morphology import crop_morphology, morphology_table
    from .segment import segment_smear

    report = progress or (lambda f, m: None)
    rgb = as_rgb_uint8(image)
    if segmentation is None:
        segmentation = segment_smear(
            rgb, pixel_size_um=pixel_size_um,
            progress=lambda f, m: report(0.4 * f, f"segmenting: {m}"),
        )
    table = segmentation.table.copy()
    if morphology and len(table):
        morph = morphology_table(rgb, segmentation).drop(columns=["area_px"])
        table = table.merge(morph, on="label", how="left")
    table["class"] = pd.Series([None] * len(table), dtype="object")
    table["confidence"] = np.nan
    table["model"] = pd.Series([None] * len(table), dtype="object")
    attention: dict[str, np.ndarray] = {}
    described: dict[str, dict] = {}
    loaded = [_load(m, device) for m in models]
    for k, (name, model, info) in enumerate(loaded):
        start = 0.4 + 0.6 * k / max(len(loaded), 1)
        report(start, f"classifying with {name}")
        cell_types = tuple(info.metadata.get("cell_types") or _DEFAULT_CELL_TYPES)
        described[name] = {
            "kind": info.kind, "classes": list(info.class_names),
            "cell_types": list(cell_types), "path": str(info.path) if info.path else None,
        }
        for cls in info.class_names:
            if f"p_{cls}" not in table:
                table[f"p_{cls}"] = np.nan
        attention[name] = np.zeros(segmentation.labels.shape, np.float32)
        if not len(table) or not table.cell_type.isin(cell_types).any():
            continue
        crops = crop_instances(
            rgb, segmentation, crop_diameters=info.crop_diameters,
            output_size=info.input_size, cell_types=cell_types,
        )
        morph_feats = None
        if info.metadata.get("morph_features"):
            feats = crop_morphology(crops.images, crops.masks, crops.crop_diameters)
            morph_feats = feats[list(info.metadata["morph_features"])].to_numpy(np.float32)
        out = _classify(model, info, crops, morph_feats, device, batch_size)
        probs = out["probs"]
        where = pd.Index(table.label).get_indexer(crops.labels)
        best = probs.argmax(1)
        table.loc[table.index[where], "class"] = np.asarray(info.class_names, dtype=object)[best]
        table.loc[table.index[where], "confidence"] = probs.max(1)
        table.loc[table.index[where], "model"] = name
        for j, cls in enumerate(info.class_names):
            table.loc[table.index[where], f"p_{cls}"] = probs[:, j]
        if out.get("attention") is not None:
            attention[name] = paste_maps(out["attention"], crops, segmentation.labels)
    report(1.0, "done")
    return AnalysisResult(
        segmentation=segmentation,
        table=table,
        attention=attention,
        counts=differential_counts(table),
        models=described,
    )


def _load(spec, device):
    from .models import load_model

    if isinstance(spec, tuple) and len(spec) == 2:
        model, info = spec
        name = info.metadata.get("name") or (info.path.stem if info.path else info.kind)
        return name, model, info
    model, info = load_model(spec, device=_resolved_device(device))
    name = str(spec) if not str(spec).endswith(".safetensors") else info.path.stem
    return name, model, info


def _resolved_device(device: str) -> str:
    from .predict import select_device

    return str(select_device(device))


def _classify(model, info, crops, morph, device, batch_size):
    from .predict import classify_crops

    return classify_crops(
        model, info, crops.images, crops.masks, morph,
        device=device, batch_size=batch_size, return_attention=True,
    )


def differential_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per cell type and class: count and percentage of the cells of that type."""
    if table.empty:
        return pd.DataFrame(columns=["cell_type", "class", "count", "percent"])
    classes = table["class"].fillna("unclassified") if "class" in table else pd.Series("unclassified", index=table.index)
    counts = (
        pd.DataFrame({"cell_type": table.cell_type, "class": classes})
        .value_counts()
        .rename("count")
        .reset_index()
        .sort_values(["cell_type", "count"], ascending=[True, False], ignore_index=True)
    )
    totals = counts.groupby("cell_type")["count"].transform("sum")
    counts["percent"] = 100.0 * counts["count"] / totals
    return counts
