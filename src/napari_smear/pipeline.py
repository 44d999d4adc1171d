"""analyze(image): segment -> crop -> classify -> paste attention back, in one call.

Synchronous and Qt-free: the napari widgets, the batch runner and scripts all call it.

The work is split into three stages so that a batch of images can run them where each
is cheapest (see :mod:`napari_smear.batch`):

1. :func:`prepare_field` (CPU, no model): segmentation, the morphology table and, for
   every model, the normalised crops of the cell types it classifies. Its result holds
   only numpy arrays and pandas tables, so it travels between processes.
2. Classification on the models' device: :func:`napari_smear.predict.classify_crops`
   for one field, or :class:`StreamingClassifier`, which classifies the crops of many
   fields together in fixed-size batches.
3. :func:`finish_field` (CPU): class, confidence and ``p_<class>`` columns, and each
   model's attention pasted back into image coordinates.

:func:`analyze` runs the three stages on one image.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Sequence

import numpy as np
import pandas as pd

from .predict import SURE_AT, check_sure_at  # no torch at import
from .segment.types import CELL_TYPES, SmearSegmentation, check_segmentation

__all__ = [
    "DEFAULT_MODELS",
    "AnalysisResult",
    "ModelSpec",
    "LoadedModel",
    "PreparedField",
    "StreamingClassifier",
    "analyze",
    "analyze_by_region",
    "cut_by_edge",
    "differential_counts",
    "finish_field",
    "load_models",
    "prepare_field",
]

DEFAULT_MODELS = ("wbc-pbc8", "rbc-chula12")
# Which segmented cells a model sees when its file does not say (metadata "cell_types").
_DEFAULT_CELL_TYPES = CELL_TYPES


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
        ``cell_type`` is the cell's type after classification: a white cell a model
        calls a platelet (a clump) becomes a platelet, and ``segmented_type`` keeps the
        segmentation's type (so ``cell_type`` can differ from ``segmentation.table``'s).
    attention : dict[str, numpy.ndarray]
        Per model name, a (H, W) float32 map in image coordinates: each cell's attention
        map resampled onto its crop window and pasted inside the cell (0 elsewhere).
    counts : pandas.DataFrame
        Differential count: ``cell_type, class, count, percent`` (percent of the cells
        of that type); a property, computed from ``table`` each time it is read (keep it
        in a variable in a loop; the batch path never needs it).
    models : dict[str, dict]
        Per model name, its description (kind, classes, cell types, file).
    """

    segmentation: SmearSegmentation
    table: pd.DataFrame
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)

    @property
    def counts(self) -> pd.DataFrame:
        return differential_counts(self.table)

    @property
    def notes(self) -> list[str]:
        """Warnings about the classification: a model unsure of most of its cells (see
        :func:`unsure_model_notes`)."""
        return unsure_model_notes(self.table)


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """What the crop and finishing stages need to know of a model (no weights, picklable).

    Attributes
    ----------
    name : str
        The name results are filed under (built-in name or model file stem).
    kind : str
        Architecture.
    class_names : tuple of str
        Class of each output, in order.
    cell_types : tuple of str
        Segmented cell types the model classifies (metadata ``cell_types``; all
        types when the file does not say).
    crop_diameters : float
        Crop window side in red-cell diameters.
    input_size : int
        Crop side in pixels.
    morph_features : tuple of str
        Columns of :func:`napari_smear.morphology.crop_morphology` the model consumes,
        in order (empty: none).
    path : str or None
        The model file.
    """

    name: str
    kind: str
    class_names: tuple[str, ...]
    cell_types: tuple[str, ...]
    crop_diameters: float
    input_size: int
    morph_features: tuple[str, ...] = ()
    path: str | None = None
    stain_normalization: str | None = None

    @classmethod
    def from_info(cls, name: str, info) -> "ModelSpec":
        from .morphology import MORPH_FEATURES

        metadata = info.metadata or {}
        morph = tuple(metadata.get("morph_features") or ())
        if not morph and int((info.config or {}).get("morph_features", 0) or 0):
            morph = tuple(MORPH_FEATURES)  # what classify_crops computes when not told
        return cls(
            name=str(name),
            kind=str(info.kind),
            class_names=tuple(str(c) for c in info.class_names),
            cell_types=tuple(metadata.get("cell_types") or _DEFAULT_CELL_TYPES),
            crop_diameters=float(info.crop_diameters),
            input_size=int(info.input_size),
            morph_features=morph,
            path=str(info.path) if info.path else None,
            stain_normalization=metadata.get("stain_normalization") or None,
        )

    def describe(self) -> dict:
        """The description :attr:`AnalysisResult.models` holds."""
        return {
            "kind": self.kind,
            "classes": list(self.class_names),
            "cell_types": list(self.cell_types),
            "path": self.path,
        }


@dataclass
class LoadedModel:
    """A model ready for inference, with its :class:`ModelSpec`."""

    spec: ModelSpec
    model: object
    info: object

    @property
    def name(self) -> str:
        return self.spec.name


def load_models(models: Sequence, device: str = "auto") -> list[LoadedModel]:
    """Load models given as built-in names, model files or ``(model, ModelInfo)`` pairs.

    Raises
    ------
    napari_smear.models.ModelFileError
        A missing or malformed model.
    ValueError
        Two models that would file their results under the same name, or that both
        classify one cell type (a cell has one ``class`` column, and the two models'
        ``p_<class>`` columns could clash).
    """
    if models is None:
        raise TypeError("models=None: give a list of models, DEFAULT_MODELS for the built-in ones, "
                        "or [] for segmentation only")
    if isinstance(models, (str, os.PathLike)) or (isinstance(models, tuple) and len(models) == 2
                                                   and not isinstance(models[0], (str, os.PathLike, tuple))):
        models = [models]  # one model given on its own, not in a list
    loaded = []
    for spec in models:
        name, model, info = _load(spec, device)
        loaded.append(LoadedModel(ModelSpec.from_info(name, info), model, info))
    names = [m.name for m in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two models are both named {duplicates[0]!r}: rename one of the model files")
    owner: dict[str, str] = {}
    for entry in loaded:
        for cell_type in entry.spec.cell_types:
            if cell_type in owner:
                raise ValueError(
                    f"models {owner[cell_type]!r} and {entry.name!r} both classify {cell_type} cells: "
                    "choose one model per cell type"
                )
            owner[cell_type] = entry.name
    return loaded


def _load(spec, device):
    from .models import load_model

    if isinstance(spec, LoadedModel):  # from load_models: loaded once, used for many fields
        return spec.name, spec.model, spec.info
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


# ----------------------------------------------------------------------------- stage 1: prepare


@dataclass
class PreparedField:
    """A segmented field with the crops every model will classify (stage 1's result).

    Attributes
    ----------
    rgb : (H, W, 3) uint8
        The field as analysed.
    segmentation : SmearSegmentation
    table : pandas.DataFrame
        The segmentation table, with the morphology columns when asked for.
    crops : dict[str, InstanceCrops]
        Per model name, the crops of the cells it classifies (models with no such cell
        in this field are absent).
    morph : dict[str, numpy.ndarray]
        Per model name, the (N, M) float32 morphology features it consumes (absent
        for models that consume none).
    timings : dict[str, float]
        Seconds spent per step (``segment``, ``morphology``, ``crop``).
    """

    rgb: np.ndarray
    segmentation: SmearSegmentation
    table: pd.DataFrame
    crops: dict = field(default_factory=dict)
    morph: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def crop_pixels(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per model name, ``(images, masks, morph)``: what the classifier needs."""
        return {name: (c.images, c.masks, self.morph.get(name)) for name, c in self.crops.items()}

    def without_crop_pixels(self) -> "PreparedField":
        """A copy without the crop pixels (kept: labels and windows, for pasting maps)."""
        slim = {
            name: replace(c, images=c.images[:0], masks=c.masks[:0]) for name, c in self.crops.items()
        }
        return replace(self, crops=slim, morph={})


def prepare_field(
    image,
    specs: Sequence[ModelSpec] = (),
    *,
    pixel_size_um: float | None = None,
    recorded_pixel_size_um: float | None = None,
    segmentation: SmearSegmentation | None = None,
    morphology: bool = True,
    segment_threads: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    working_diameter_px: float | None = None,
) -> PreparedField:
    """Stage 1: segment a field and crop the cells each model classifies.

    Parameters
    ----------
    image : array-like
        RGB field (see :func:`napari_smear.io.as_rgb_uint8` for accepted inputs).
    specs : sequence of ModelSpec
        The models whose crops to make.
    segmentation : SmearSegmentation, optional
        Reuse an existing segmentation instead of segmenting again.
    morphology : bool
        Add the morphology columns (:func:`napari_smear.morphology.morphology_table`).
    segment_threads : int, optional
        Threads for the tiles of large fields (default: segmentation's own choice).
    working_diameter_px : float, optional
        See :func:`napari_smear.segment_smear` (default: its own).
    progress : callable, optional
        ``progress(fraction, message)`` during segmentation, then (fraction 1) as the
        morphology and the crops are made; raise inside it to cancel.
    """
    from .io import as_rgb_uint8
    from .segment import segment_smear

    timings: dict[str, float] = {}
    started = time.perf_counter()
    rgb = as_rgb_uint8(image)
    if segmentation is None:
        segmentation = segment_smear(
            rgb, pixel_size_um=pixel_size_um, recorded_pixel_size_um=recorded_pixel_size_um,
            n_workers=segment_threads, progress=progress,
            working_diameter_px=working_diameter_px,
        )
    else:
        check_segmentation(segmentation, rgb)
    timings["segment"] = time.perf_counter() - started
    # the stages after segmentation take as long again on a large image: say which runs
    report = progress or (lambda fraction, message: None)

    started = time.perf_counter()
    if morphology:
        report(1.0, f"measuring the morphology of {len(segmentation.table)} cells")
    table = _cell_table(rgb, segmentation, morphology)
    timings["morphology"] = time.perf_counter() - started

    started = time.perf_counter()
    crops, morph_features = crop_for_models(rgb, segmentation, specs, report=report)
    timings["crop"] = time.perf_counter() - started
    return PreparedField(rgb, segmentation, table, crops, morph_features, timings)


def _cell_table(rgb: np.ndarray, segmentation: SmearSegmentation, morphology: bool) -> pd.DataFrame:
    """A copy of the segmentation table, with the morphology columns when asked (also on
    a field without cells: every per-cell table has the same columns)."""
    from .morphology import morphology_table

    table = segmentation.table.copy()
    if morphology:
        morph = morphology_table(rgb, segmentation).drop(columns=["area_px"])
        table = table.merge(morph, on="label", how="left")
    return table


def _crop_conventions(specs: Sequence[ModelSpec]) -> dict[tuple[float, int, str | None], list[ModelSpec]]:
    """The models grouped by crop convention (window, size, stain normalisation)."""
    conventions: dict[tuple[float, int, str | None], list[ModelSpec]] = {}
    for spec in specs:
        conventions.setdefault((spec.crop_diameters, spec.input_size, spec.stain_normalization), []).append(spec)
    return conventions


def crop_for_models(
    rgb: np.ndarray,
    segmentation: SmearSegmentation,
    specs: Sequence[ModelSpec],
    *,
    colours: dict | None = None,
    origin: tuple[int, int] = (0, 0),
    report: Callable[[float, str], None] | None = None,
) -> tuple[dict, dict]:
    """The crops (and morphology features) of the cells each model classifies.

    Returns ``(crops, morph)``: per model name an :class:`~napari_smear.crops.InstanceCrops`
    (models with no such cell are absent) and, for models that consume morphology
    features, their (N, M) float32 array. ``colours``: for a region of a larger field,
    per crop convention (``(crop_diameters, input_size, stain_normalization)``) the
    :class:`~napari_smear.crops.FieldColours` of the whole field (``rgb`` then as
    :func:`~napari_smear.crops.prepare_crop_field` left it) and ``origin`` its top left
    pixel in the field (see :func:`~napari_smear.crops.crop_instances`).
    """
    from .crops import crop_instances, field_colours, prepare_crop_field
    from .morphology import crop_morphology

    report = report or (lambda fraction, message: None)
    table = segmentation.table
    crops, morph_features = {}, {}
    painted = None if colours is None else rgb
    # Models with the same crop convention share one cropping pass (the whole-image
    # anti-aliasing dominates its cost); each takes its cell types from it, in table order.
    for key, group in _crop_conventions(specs).items():
        group = [spec for spec in group if len(table) and table.cell_type.isin(spec.cell_types).any()]
        if not group:
            continue
        crop_diameters, input_size, stain = key
        types = sorted({t for spec in group for t in spec.cell_types})
        report(1.0, f"cropping the {', '.join(types)} cells for {', '.join(spec.name for spec in group)}")
        if painted is None:  # the frame and annotations painted once for every convention
            painted = prepare_crop_field(rgb)
        shared = crop_instances(
            painted, segmentation, crop_diameters=crop_diameters, output_size=input_size, cell_types=types,
            stain_normalization=stain, origin=origin,
            colours=field_colours(painted, segmentation, stain) if colours is None else colours[key],
        )
        shared_types = table.set_index("label").cell_type.reindex(shared.labels).to_numpy()
        for spec in group:
            keep = np.isin(shared_types, spec.cell_types)
            crops[spec.name] = shared if keep.all() else shared.subset(keep)
    crops = {spec.name: crops[spec.name] for spec in specs if spec.name in crops}
    for spec in specs:
        crop = crops.get(spec.name)
        if crop is not None and spec.morph_features:
            feats = crop_morphology(crop.images, crop.masks, crop.crop_diameters)
            values = feats[list(spec.morph_features)].to_numpy(np.float32)
            morph_features[spec.name] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return crops, morph_features


# ----------------------------------------------------------------------------- stage 3: finish


def finish_field(
    prepared: PreparedField,
    specs: Sequence[ModelSpec],
    outputs: dict[str, dict],
) -> AnalysisResult:
    """Stage 3: put the classifiers' outputs into the cell table and image coordinates.

    Parameters
    ----------
    prepared : PreparedField
        Stage 1's result (the crop pixels may have been dropped).
    specs : sequence of ModelSpec
        The models, in the order :func:`analyze` was given them (a cell two models
        classify keeps the later model's class).
    outputs : dict
        Per model name, ``{"probs": (N, C), "attention": (N, S, S) or None}`` for the
        crops of ``prepared.crops[name]``, in the same order.

    Notes
    -----
    A cell the segmentation typed ``wbc`` that a model classifying both white cells
    and platelets answers ``platelet`` is re-typed ``platelet`` (see
    :func:`retype_platelet_clumps`); ``segmented_type`` keeps the segmentation's type.
    """
    from .crops import paste_maps

    segmentation = prepared.segmentation
    table = prepared.table.copy()
    table["class"] = pd.Series([None] * len(table), dtype="object", index=table.index)
    table["confidence"] = np.nan
    table["model"] = pd.Series([None] * len(table), dtype="object", index=table.index)
    attention: dict[str, np.ndarray] = {}
    for spec in specs:
        for cls in spec.class_names:
            if f"p_{cls}" not in table:
                table[f"p_{cls}"] = np.nan
        crops, out = prepared.crops.get(spec.name), outputs.get(spec.name)
        if crops is None or out is None or not len(crops):
            attention[spec.name] = np.zeros(segmentation.labels.shape, np.float32)
            continue
        probs = np.asarray(out["probs"], np.float32)
        rows = table.index[pd.Index(table.label).get_indexer(crops.labels)]
        table.loc[rows, "class"] = np.asarray(spec.class_names, dtype=object)[probs.argmax(1)]
        table.loc[rows, "confidence"] = probs.max(1)
        table.loc[rows, "model"] = spec.name
        table.loc[rows, [f"p_{cls}" for cls in spec.class_names]] = probs
        maps = out.get("attention")
        attention[spec.name] = (
            paste_maps(maps, crops, segmentation.labels) if maps is not None
            else np.zeros(segmentation.labels.shape, np.float32)
        )
    table = retype_platelet_clumps(table, specs)
    return AnalysisResult(
        segmentation=segmentation,
        table=table,
        attention=attention,
        models={spec.name: spec.describe() for spec in specs},
    )


def retype_platelet_clumps(table: pd.DataFrame, specs: Sequence[ModelSpec]) -> pd.DataFrame:
    """Give the type ``platelet`` to white cells that a white-cell model calls platelets.

    The segmentation types violet matter of a nucleus's size as a white cell; a clump
    of platelets reaches that size too (on BCCD's camera fields, 10 of 315 segmented
    white cells, 6 of them inside a platelet box and 1 inside a white-cell box). A model
    trained on white cells *and* platelets (``wbc-pbc8``) tells them apart by their
    look, so its ``platelet`` answer for a ``wbc`` cell re-types it. Measured with the
    full analysis against BCCD's boxes (``benchmarks/model_eval.py``): white-cell
    detection F1 0.9675 -> 0.9835 (precision 0.946 -> 0.977, recall unchanged) and
    platelet F1 0.697 -> 0.704. The cell's violet pixels stay in the nuclei image.

    Returns a copy with ``segmented_type`` (the segmentation's type) added after the
    other columns, and ``cell_type`` changed where a model re-typed the cell.
    """
    table = table.copy()
    table["segmented_type"] = table["cell_type"]
    deciders = {spec.name for spec in specs
                if "platelet" in spec.class_names and {"wbc", "platelet"} <= set(spec.cell_types)}
    if deciders and len(table):
        clumps = (table.cell_type == "wbc") & (table["class"] == "platelet") & table["model"].isin(deciders)
        table.loc[clumps, "cell_type"] = "platelet"
    return table


def retyped_platelets(table: pd.DataFrame) -> pd.Series:
    """Which cells :func:`retype_platelet_clumps` re-typed (all False for a table
    without ``segmented_type``, e.g. a segmentation's own)."""
    if "segmented_type" not in table.columns:
        return pd.Series(False, index=table.index)
    return (table["segmented_type"] == "wbc") & (table["cell_type"] == "platelet")


# ----------------------------------------------------------------------------- one image


def analyze(
    image,
    *,
    models: Sequence = DEFAULT_MODELS,
    device: str = "auto",
    batch_size: int = 256,
    amp: bool = True,
    pixel_size_um: float | None = None,
    recorded_pixel_size_um: float | None = None,
    segmentation: SmearSegmentation | None = None,
    morphology: bool = True,
    progress: Callable[[float, str], None] | None = None,
    prior_correction: float | None = None,
    working_diameter_px: float | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
) -> AnalysisResult:
    """Segment a smear field, classify its cells and map the models' attention.

    Parameters
    ----------
    image : array-like
        RGB field (see :func:`napari_smear.io.as_rgb_uint8` for accepted inputs).
    models : sequence of str, path, (model, ModelInfo) or LoadedModel
        Built-in names (``"wbc-pbc8"``, ``"rbc-chula12"``), model files, or already
        loaded models (what :func:`napari_smear.load_models` returns: load once, analyse
        many fields). Each classifies the cell types its file declares. ``[]``:
        segmentation (and morphology) only.
    device : str
        ``"auto"`` (a GPU when present), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"cpu"``.
    batch_size : int
        Crops per classifier pass.
    amp : bool
        Classify under autocast (bfloat16 on a CPU that has it, float16/bfloat16 on a
        GPU); False: float32.
    pixel_size_um : float, optional
        Micrometres per pixel; default: the scale measured from the red cells (see
        :func:`napari_smear.segment_smear`).
    recorded_pixel_size_um : float, optional
        The pixel size the image file records, used when the red cells confirm it (see
        :func:`napari_smear.segment_smear`).
    segmentation : SmearSegmentation, optional
        Reuse an existing segmentation instead of segmenting again.
    morphology : bool
        Add the shape, nucleus and colour columns
        (:func:`napari_smear.morphology_table`) to the table.
    progress : callable, optional
        ``progress(fraction, message)``; raise inside it to cancel.
    prior_correction : float, optional
        One prior-correction strength for every model (0: the class-balanced answer);
        default: each model file's own (see :func:`napari_smear.predict.prior_logit_offsets`).
    working_diameter_px : float, optional
        Working resolution of the segmentation (see :func:`napari_smear.segment_smear`).
    test_time_views : {1, 2, 4, 8}, optional
        One number of turned views for every model (1: each crop once, the fastest);
        default: each model file's own (see :func:`napari_smear.predict.classify_crops`).
    sure_at : float, optional
        Answer a cell from its first view when that gives a class this probable (0.85
        measured well: docs/architecture.md, *Turned views*) and turn only the others;
        default None: every cell in all of its views. The classifiers take about a fifth
        of the time on crops like a model's own, nothing less where most cells are unsure
        (another microscope); the segmentation's time stays.

    Returns
    -------
    AnalysisResult
        ``segmentation``, the per-cell ``table`` (segmentation, morphology, class,
        confidence and ``p_<class>``), ``attention`` maps per model in image
        coordinates, ``counts`` (the differential count) and ``models``. Show it in
        napari with :func:`napari_smear.add_to_viewer`.

    A field larger than ``REGION_ANALYSIS_PIXELS`` (three 4096 x 4096 regions, 50.3
    megapixels) is analysed region by region (:func:`analyze_by_region`): the same
    result in less memory.
    """
    from .io import as_rgb_uint8

    report = progress or (lambda f, m: None)
    loaded = load_models(models, device)  # first: a bad model name fails before segmenting
    check_prior_correction(loaded, prior_correction)
    check_test_time_views(loaded, test_time_views)
    check_sure_at(sure_at)
    image = as_rgb_uint8(image)
    if image.shape[0] * image.shape[1] > REGION_ANALYSIS_PIXELS:
        # a slide: the same result, with memory bounded by the region size (all of the
        # crops and the anti-aliased copy of the field would take 15 bytes a pixel)
        return analyze_by_region(
            image, models=loaded, device=device, batch_size=batch_size, amp=amp, pixel_size_um=pixel_size_um,
            recorded_pixel_size_um=recorded_pixel_size_um,
            segmentation=segmentation, morphology=morphology, progress=progress,
            prior_correction=prior_correction, working_diameter_px=working_diameter_px,
            test_time_views=test_time_views, sure_at=sure_at,
        )  # which says the models' notes as warnings, as below
    specs = [m.spec for m in loaded]
    prepared = prepare_field(
        image, specs, pixel_size_um=pixel_size_um, recorded_pixel_size_um=recorded_pixel_size_um,
        segmentation=segmentation, morphology=morphology,
        progress=lambda f, m: report(0.4 * f, m), working_diameter_px=working_diameter_px,
    )
    outputs = _classify_prepared(
        loaded, prepared, device=device, batch_size=batch_size, amp=amp, prior_correction=prior_correction,
        test_time_views=test_time_views, sure_at=sure_at, report=lambda k, name: report(
            0.4 + 0.6 * k / max(len(loaded), 1), f"classifying with {name}"),
    )
    report(1.0, "done")
    return _warned(finish_field(prepared, specs, outputs))


def _warned(result: AnalysisResult) -> AnalysisResult:
    """``result``, after warning (Python warnings) about what its ``notes`` say."""
    for note in result.notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return result


def _classify_prepared(loaded, prepared: PreparedField, *, device, batch_size, amp, prior_correction,
                       test_time_views, sure_at=None, report=None) -> dict[str, dict]:
    """Each model's outputs on its crops of a prepared field (models without crops are
    absent); ``report(k, name)`` before the k-th model."""
    from .predict import classify_crops

    outputs: dict[str, dict] = {}
    for k, entry in enumerate(loaded):
        if report:
            report(k, entry.name)
        if entry.name not in prepared.crops:
            continue
        images, masks, morph = prepared.crop_pixels()[entry.name]
        outputs[entry.name] = classify_crops(
            entry.model, entry.info, images, masks, morph,
            device=device, batch_size=batch_size, amp=amp, return_attention=True, progress=False,
            prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
        )
    return outputs


# ----------------------------------------------------------------------------- a large image, region by region

#: Side (pixels) of the square regions :func:`analyze_by_region` owns cells by.
REGION_SIDE = 4096
#: :func:`analyze` takes a field larger than this (pixels) region by region.
REGION_ANALYSIS_PIXELS = 3 * REGION_SIDE * REGION_SIDE


def analyze_by_region(
    image,
    *,
    models: Sequence = DEFAULT_MODELS,
    device: str = "auto",
    batch_size: int = 256,
    amp: bool = True,
    pixel_size_um: float | None = None,
    recorded_pixel_size_um: float | None = None,
    segmentation: SmearSegmentation | None = None,
    morphology: bool = True,
    progress: Callable[[float, str], None] | None = None,
    prior_correction: float | None = None,
    working_diameter_px: float | None = None,
    region_side: int = REGION_SIDE,
    attention_out: dict[str, np.ndarray] | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
    warn: bool = True,
) -> AnalysisResult:
    """:func:`analyze` a large image (a whole-slide region or scan) region by region.

    The same result as :func:`analyze` (tested cell for cell), with memory bounded by
    the region size instead of the image's: each cell belongs to the square region of
    ``region_side`` pixels its centroid lies in, and each region is measured, cropped,
    classified and its attention pasted on its own, from a window of the image that
    reaches as far as its cells' crop windows and their anti-aliasing. What must be
    measured on the whole field is: the glass colour and the stain anchors the crops
    are made with (:func:`napari_smear.crops.field_colours`), and the painting of an
    eyepiece frame or burned-in annotation.

    With a segmentation whose label images are memory-mapped files
    (``segment_smear(out=...)``), the image opened with
    :func:`napari_smear.io.open_image_on_disk` and ``attention_out`` memory-mapped as
    well, a slide larger than memory is analysed with a few hundred megabytes per
    region (``napari-smear analyze`` does this by itself for such TIFFs).

    Parameters
    ----------
    image, models, device, batch_size, pixel_size_um, recorded_pixel_size_um, segmentation, morphology,
    progress, prior_correction, working_diameter_px, test_time_views, sure_at
        As for :func:`analyze`.
    amp : bool
        Autocast for the classifiers (see :func:`napari_smear.predict.classify_crops`).
    region_side : int
        Side of the regions in pixels (at least 256).
    attention_out : dict, optional
        Per model name, a (H, W) float32 array to write its attention map into (for
        example an ``np.memmap``); it is zeroed first. Models not named get an array
        in memory.
    warn : bool
        Say the result's notes (a model unsure of most of its cells) as Python warnings,
        as :func:`analyze` does (default); the batch, which says them per folder of
        images, passes False.
    """
    from .crops import anti_alias_sigma, field_colours, prepare_crop_field
    from .io import as_rgb_uint8
    from .segment import segment_smear

    if isinstance(region_side, bool) or not isinstance(region_side, (int, np.integer)) or region_side < 256:
        raise ValueError(f"region_side must be a whole number of pixels >= 256, got {region_side!r}")
    report = progress or (lambda f, m: None)
    loaded = load_models(models, device)  # first: a bad model name fails before segmenting
    check_prior_correction(loaded, prior_correction)
    check_test_time_views(loaded, test_time_views)
    check_sure_at(sure_at)
    specs = [m.spec for m in loaded]
    rgb = as_rgb_uint8(image)
    if segmentation is None:
        segmentation = segment_smear(
            rgb, pixel_size_um=pixel_size_um, recorded_pixel_size_um=recorded_pixel_size_um,
            progress=lambda f, m: report(0.4 * f, m),
            working_diameter_px=working_diameter_px,
        )
    else:
        check_segmentation(segmentation, rgb)
    shape = rgb.shape[:2]
    attention = {spec.name: _attention_array((attention_out or {}).get(spec.name), shape, spec.name)
                 for spec in specs}
    table = segmentation.table
    report(0.4, "measuring the glass and stain of the whole field")
    painted = prepare_crop_field(rgb)
    conventions = _crop_conventions(specs)
    colours = {key: field_colours(painted, segmentation, key[2]) for key in conventions} if len(table) else {}

    # how far past its cells a region's window must reach: their crop windows, and the
    # anti-aliasing and interpolation of the pixels at the windows' edges
    diameter = float(segmentation.rbc_diameter_px)
    half, margin = 0.0, 2
    if np.isfinite(diameter) and diameter > 0:
        for crop_diameters, input_size, _ in conventions:
            half = max(half, crop_diameters * diameter / 2)
            margin = max(margin, int(4.0 * anti_alias_sigma(crop_diameters * diameter, input_size) + 0.5) + 2)
    cy = table.centroid_y.to_numpy(np.float64)
    cx = table.centroid_x.to_numpy(np.float64)
    region_of = (np.floor(cy).astype(np.int64) // region_side) * (-(-shape[1] // region_side)) + (
        np.floor(cx).astype(np.int64) // region_side)
    order = np.argsort(region_of, kind="stable")
    starts = np.flatnonzero(np.r_[True, region_of[order][1:] != region_of[order][:-1]]) if len(order) else []
    groups = np.split(order, starts[1:]) if len(order) else []

    pieces, positions, done = [], [], 0
    for k, rows in enumerate(groups):
        report(0.4 + 0.6 * done / max(len(table), 1),
               f"region {k + 1} of {len(groups)}: {len(rows)} cells")
        owned = table.iloc[rows]
        y0 = max(0, int(np.floor(min(owned.bbox_min_y.min(), cy[rows].min() - half))) - margin)
        x0 = max(0, int(np.floor(min(owned.bbox_min_x.min(), cx[rows].min() - half))) - margin)
        y1 = min(shape[0], int(np.ceil(max(owned.bbox_max_y.max(), cy[rows].max() + half))) + margin)
        x1 = min(shape[1], int(np.ceil(max(owned.bbox_max_x.max(), cx[rows].max() + half))) + margin)
        piece, maps = _analyze_region(
            rgb, painted, segmentation, owned, (y0, x0, y1, x1), loaded, colours,
            device=device, batch_size=batch_size, amp=amp, morphology=morphology,
            prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
        )
        inside = maps.pop(None)
        for name, values in maps.items():
            window = attention[name][y0:y1, x0:x1]
            window[inside] = values[inside]
        pieces.append(piece)
        positions.append(rows)
        done += len(rows)
    if not pieces:  # no cells: the table still has every column analyze gives
        pieces.append(_analyze_region(
            rgb, painted, segmentation, table.iloc[:0], (0, 0, min(shape[0], 16), min(shape[1], 16)), loaded,
            colours, device=device, batch_size=batch_size, amp=amp, morphology=morphology,
            prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
        )[0])
        positions.append(np.zeros(0, np.int64))
    result_table = pd.concat(pieces, ignore_index=True)
    result_table = result_table.iloc[np.argsort(np.concatenate(positions), kind="stable")].reset_index(drop=True)
    report(1.0, "done")
    result = AnalysisResult(
        segmentation=segmentation, table=result_table, attention=attention,
        models={spec.name: spec.describe() for spec in specs},
    )
    return _warned(result) if warn else result


def _attention_array(given, shape, name) -> np.ndarray:
    if given is None:
        return np.zeros(shape, np.float32)
    if not isinstance(given, np.ndarray) or given.shape != shape or given.dtype != np.float32:
        raise ValueError(f"attention_out[{name!r}] must be a {shape} float32 array; got "
                         f"{getattr(given, 'dtype', type(given).__name__)} {getattr(given, 'shape', '')}")
    for start in range(0, shape[0], 1024):  # row blocks: a memory map is not read into memory
        given[start:start + 1024] = 0
    return given


def _analyze_region(rgb, painted, segmentation, owned, window, loaded, colours, *, device, batch_size, amp,
                    morphology, prior_correction, test_time_views, sure_at=None):
    """Measure, crop, classify and finish the ``owned`` cells of one region.

    Returns their table rows (image coordinates) and the region's attention maps per
    model name, with the mask of the owned cells' pixels under the key None.
    """
    y0, x0, y1, x1 = window
    labels = np.asarray(segmentation.labels[y0:y1, x0:x1])
    max_label = int(owned.label.max()) if len(owned) else 0
    is_owned = np.zeros(max_label + 1, bool)
    is_owned[owned.label.to_numpy(np.int64)] = True
    # only the region's own cells are measured and cropped; the nuclei stay whole (the
    # lobe count erodes them all together, as on the whole field)
    mine = np.zeros(labels.shape, bool)
    small = labels <= max_label
    mine[small] = is_owned[labels[small]]
    labels = np.where(mine, labels, 0).astype(labels.dtype, copy=False)
    # the table keeps field coordinates: the crops are placed through their origin
    region = replace(segmentation, labels=labels, nuclei=np.asarray(segmentation.nuclei[y0:y1, x0:x1]),
                     table=owned.reset_index(drop=True))
    region_rgb = np.asarray(rgb[y0:y1, x0:x1])
    specs = [m.spec for m in loaded]
    crops, morph_features = crop_for_models(
        np.asarray(painted[y0:y1, x0:x1]), region, specs, colours=colours, origin=(y0, x0),
    )
    prepared = PreparedField(region_rgb, region, _cell_table(region_rgb, region, morphology), crops, morph_features)
    outputs = _classify_prepared(loaded, prepared, device=device, batch_size=batch_size, amp=amp,
                                 prior_correction=prior_correction, test_time_views=test_time_views,
                                 sure_at=sure_at)
    result = finish_field(prepared, specs, outputs)
    return result.table, {**result.attention, None: mine}


# ----------------------------------------------------------------------------- many images


def check_prior_correction(models: Sequence[LoadedModel], strength: float | None) -> dict[str, float]:
    """The prior-correction strength each model will use (``strength``, else its file's
    own), checked before any image is read: a bad value fails at once, not on the first
    cells. Raises ValueError as :func:`napari_smear.predict.prior_logit_offsets` does."""
    from .predict import prior_correction_strength, prior_logit_offsets

    used = {}
    for entry in models:
        used[entry.name] = prior_correction_strength(entry.info, strength)
        prior_logit_offsets(entry.info, used[entry.name])  # raises for a model without balanced training
    return used


def check_test_time_views(models: Sequence[LoadedModel], views: int | None) -> dict[str, int]:
    """The number of turned views each model will average (``views``, else its file's
    own), checked before any image is read (see :func:`napari_smear.predict.classify_crops`)."""
    from .predict import check_test_time_views as views_of

    return {entry.name: views_of(entry.info, views) for entry in models}


#: :func:`unsure_model_notes` warns about a model unsure of this share of its cells or
#: more (top-class probability under UNSURE_BELOW), once it classified this many.
UNSURE_BELOW = SURE_AT
UNSURE_SHARE_WARNING = 0.6
UNSURE_WARNING_MIN_CELLS = 50


def unsure_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per model of ``table`` (its ``model`` and ``confidence`` columns): ``cells`` it
    classified and of those the ``unsure`` ones, whose top class is under
    :data:`UNSURE_BELOW`. A batch run keeps them per image and adds them up."""
    if "model" not in table or "confidence" not in table:
        return {}
    return {str(name): {"cells": len(values), "unsure": int((~(values.to_numpy(np.float64) >= UNSURE_BELOW)).sum())}
            for name, values in table.groupby("model", sort=True)["confidence"]}


def unsure_model_notes(table_or_counts) -> list[str]:
    """A warning per model that gave no class :data:`UNSURE_BELOW` or more for
    :data:`UNSURE_SHARE_WARNING` of its cells or more (at least
    :data:`UNSURE_WARNING_MIN_CELLS` of them): on their own validation crops the built-in
    models are unsure of far fewer (``wbc-pbc8`` 11 % of PBC's, ``rbc-chula12`` 36 % of
    Chula's; on BCCD's red cells ``rbc-chula12``: 97 %), so the images likely differ from
    what it learned from (microscope, stain, magnification). Takes a result table (its
    ``model`` and ``confidence`` columns) or :func:`unsure_counts`' dict."""
    counts = unsure_counts(table_or_counts) if isinstance(table_or_counts, pd.DataFrame) else table_or_counts
    notes = []
    for name in sorted(counts):
        classified, unsure = counts[name]["cells"], counts[name]["unsure"]
        if classified >= UNSURE_WARNING_MIN_CELLS and unsure >= UNSURE_SHARE_WARNING * classified:
            notes.append(
                f"{name} was unsure of {100 * unsure / classified:.0f} % of the {classified} cells it classified "
                f"(no class at {100 * UNSURE_BELOW:.0f} % or more): these images may differ from the ones it learned "
                "from (microscope, stain, magnification); check its classes on a few cells before relying on them")
    return notes


class StreamingClassifier:
    """Classify the crops of many fields together, in batches of exactly ``batch_size``.

    Fields are added as their crops arrive (:meth:`add`); crops queue per model and
    every forward pass takes ``batch_size`` of them, spanning fields, so a GPU (or the
    CPU's vector units) sees large batches even when fields hold few cells. A field is
    handed back (by :meth:`add`, :meth:`step` or :meth:`flush`) once every model has
    classified all of its crops.

    Each forward pass has the same shape (a short last batch is padded with blank
    crops), so a cell's probabilities and attention do not depend on which other cells
    shared its batch: an interrupted and resumed run, a Dask run and a one-process run
    give the same numbers, bit for bit, on the same device. With turned views (see
    ``sure_at`` in :func:`napari_smear.predict.classify_crops`) every crop is first
    classified as it is; the crops that leaves unsure queue again and are classified
    in every view, in full batches of their own, so this holds for them too.

    Parameters
    ----------
    models : sequence of LoadedModel
    device : str
        See :func:`napari_smear.predict.select_device`.
    batch_size : int
        Crops per forward pass.
    amp : bool
        Autocast (see :func:`napari_smear.predict.classify_crops`).
    max_waiting : int
        Fields that may wait for a batch to fill. Past this a model whose crops are
        rare (white cells) runs a padded batch, so results are not held back for long.
    max_waiting_pixels : float
        The same bound on the fields' total pixel count (``size`` given to :meth:`add`):
        the caller keeps every waiting field's images in memory.
    prior_correction, test_time_views : optional
        As for :func:`analyze`.
    sure_at : float or None
        See :func:`napari_smear.predict.classify_crops` (default None: every view of
        every crop).
    before_batch : callable, optional
        ``before_batch(model_name, n_crops)`` before each forward pass: a progress
        report, and (raising in it) a chance to stop between batches, as a batch run's
        Cancel does; a flush of many waiting fields takes seconds.
    """

    def __init__(self, models: Sequence[LoadedModel], *, device="auto", batch_size: int = 256,
                 amp: bool = True, max_waiting: int = 16, max_waiting_pixels: float = 32e6,
                 prior_correction: float | None = None, test_time_views: int | None = None,
                 sure_at: float | None = None, before_batch: Callable[[str, int], None] | None = None):
        from .predict import check_batch_size, select_device

        check_batch_size(batch_size)
        check_prior_correction(models, prior_correction)
        self._views = check_test_time_views(models, test_time_views)  # per model
        self.prior_correction = prior_correction
        self.sure_at = check_sure_at(sure_at)
        self.models = {m.name: m for m in models}
        self.device = select_device(device)
        self.batch_size = int(batch_size)
        # crops per forward pass: batch_size, halved for good once the device ran out of
        # memory (the gathered batches stay batch_size crops; classify_crops splits them)
        self.forward_batch_size = self.batch_size
        self.amp = amp
        self.max_waiting = max(1, int(max_waiting))
        self.max_waiting_pixels = float(max_waiting_pixels)
        self.before_batch = before_batch
        self._sizes: dict[Hashable, float] = {}
        # per model: crops waiting for their first pass, and (with turned views) the
        # crops it left unsure, waiting to be classified in every view
        self._queues: dict[str, deque] = {name: deque() for name in self.models}
        self._queued = {name: 0 for name in self.models}
        self._turn_queues: dict[str, deque] = {name: deque() for name in self.models}
        self._turn_queued = {name: 0 for name in self.models}
        self._results: dict[Hashable, dict[str, dict]] = {}
        self._remaining: dict[Hashable, int] = {}
        #: Seconds in forward passes, crops classified, of those the ones classified again
        #: in every turned view, and blank crops padded in.
        self.seconds = 0.0
        self.crops = 0
        self.turned = 0
        self.padded = 0

    @property
    def waiting(self) -> int:
        """Fields added and not yet handed back."""
        return len(self._remaining)

    @property
    def full(self) -> bool:
        """Whether the waiting fields reached ``max_waiting`` or ``max_waiting_pixels``."""
        return self.waiting >= self.max_waiting or (
            self.waiting > 1 and sum(self._sizes.values()) > self.max_waiting_pixels
        )

    def add(self, key: Hashable, crops: dict[str, tuple], size: float = 0.0) -> list[tuple[Hashable, dict]]:
        """Queue a field's crops (``{model name: (images, masks, morph)}``).

        ``size`` is the field's pixel count (see ``max_waiting_pixels``). Returns the
        fields completed by this call: the field itself when it has nothing to classify.
        """
        if key in self._remaining:
            raise ValueError(f"field {key!r} is already queued")
        unknown = set(crops) - set(self.models)
        if unknown:
            raise ValueError(f"crops for models that are not loaded: {sorted(unknown)}")
        for name, (images, masks, morph) in crops.items():  # checked before anything is queued
            side = self.models[name].spec.input_size
            if len(images) and (np.shape(images)[1:] != (side, side, 3) or np.shape(masks)[1:] != (2, side, side)
                                or len(masks) != len(images) or (morph is not None and len(morph) != len(images))):
                raise ValueError(
                    f"field {key!r}: model {name!r} takes {len(images)} crops of (N, {side}, {side}, 3) with masks "
                    f"(N, 2, {side}, {side}) and one morphology row each; got images {np.shape(images)}, masks "
                    f"{np.shape(masks)}, morphology {np.shape(morph)}"
                )
        results: dict[str, dict] = {}
        total = 0
        for name, (images, masks, morph) in crops.items():
            n = len(images)
            if not n:
                continue
            side = self.models[name].spec.input_size
            results[name] = {
                "probs": np.empty((n, len(self.models[name].spec.class_names)), np.float32),
                "attention": np.empty((n, side, side), np.float16),
            }
            self._queues[name].append([key, 0, images, masks, morph])
            self._queued[name] += n
            total += n
        self._results[key] = results
        self._remaining[key] = total
        self._sizes[key] = float(size)
        if total == 0:
            return [self._pop(key)]
        return []

    def step(self) -> list[tuple[Hashable, dict]]:
        """Run every full batch there is; hand back the fields that are complete."""
        done = []
        for name in self.models:
            while self._queued[name] >= self.batch_size:
                done += self._run(name)
            while self._turn_queued[name] >= self.batch_size:
                done += self._run_turns(name)
        while self.full:
            oldest = next(iter(self._remaining))
            for name in self.models:
                if any(item[0] == oldest for item in self._queues[name]):
                    done += self._run(name)
            for name in self.models:
                if any(item[0] == oldest for item in self._turn_queues[name]):
                    done += self._run_turns(name)
        return done

    def flush(self) -> list[tuple[Hashable, dict]]:
        """Classify everything queued (padding the last batches); hand back every field."""
        done = []
        for name in self.models:
            while self._queued[name]:
                done += self._run(name)
            while self._turn_queued[name]:
                done += self._run_turns(name)
        return done

    def _pop(self, key):
        del self._remaining[key]
        del self._sizes[key]
        return key, self._results.pop(key)

    def _run(self, name: str) -> list[tuple[Hashable, dict]]:
        """One first-pass batch of ``name``'s crops: their first view, or all their views
        when ``sure_at`` is None; the crops left unsure queue for :meth:`_run_turns`."""
        from .predict import unsure_crops

        pieces = self._take(self._queues[name], self._queued, name)
        views = self._views[name]
        first_views = 1 if views > 1 and self.sure_at is not None else views
        out, n = self._classify(name, pieces, first_views)
        self.crops += n
        done, at = [], 0
        for key, start, take, item in pieces:
            positions = np.arange(start, start + take)
            unsure = unsure_crops(out["probs"][at:at + take], self.sure_at) if first_views < views else positions[:0]
            if len(unsure):  # classified again, in every view, with other unsure crops
                self._turn_queues[name].append([key, 0, item[2][positions[unsure]], item[3][positions[unsure]],
                                                None if item[4] is None else item[4][positions[unsure]],
                                                positions[unsure]])
                self._turn_queued[name] += len(unsure)
            done += self._store(key, name, positions, out, at, finished=take - len(unsure))
            at += take
        return done

    def _run_turns(self, name: str) -> list[tuple[Hashable, dict]]:
        """One batch of the crops ``name``'s first pass left unsure, in every view."""
        pieces = self._take(self._turn_queues[name], self._turn_queued, name)
        out, n = self._classify(name, pieces, self._views[name])
        self.turned += n
        done, at = [], 0
        for key, start, take, item in pieces:
            done += self._store(key, name, item[5][start:start + take], out, at, finished=take)
            at += take
        return done

    def _store(self, key, name: str, positions, out: dict, at: int, *, finished: int) -> list:
        """Put ``out``'s rows from ``at`` into field ``key``'s results at ``positions``;
        ``finished`` of its crops are done: the field, handed back when it has none left."""
        result = self._results[key][name]
        result["probs"][positions] = out["probs"][at:at + len(positions)]
        result["attention"][positions] = out["attention"][at:at + len(positions)]
        self._remaining[key] -= finished
        return [self._pop(key)] if self._remaining[key] == 0 else []

    def _take(self, queue: deque, queued: dict, name: str) -> list:
        """Up to ``batch_size`` crops from the front of ``queue``: (key, start, take, item)
        per field they come from."""
        pieces, need = [], self.batch_size
        while need and queue:
            item = queue[0]
            key, start, images = item[0], item[1], item[2]
            take = min(need, len(images) - start)
            pieces.append((key, start, take, item))
            need -= take
            if start + take == len(images):
                queue.popleft()
            else:
                item[1] = start + take
        queued[name] -= self.batch_size - need
        return pieces

    def _classify(self, name: str, pieces: list, views: int) -> tuple[dict, int]:
        """The crops of ``pieces`` in one forward pass per view, padded with blank crops
        to ``batch_size``."""
        from .predict import classify_crops

        entry = self.models[name]
        n = sum(take for _, _, take, _ in pieces)
        if self.before_batch is not None:
            self.before_batch(name, n)
        size = entry.spec.input_size
        images = np.zeros((self.batch_size, size, size, 3), np.uint8)
        masks = np.zeros((self.batch_size, 2, size, size), np.uint8)
        morph = (
            np.zeros((self.batch_size, len(entry.spec.morph_features)), np.float32)
            if entry.spec.morph_features else None
        )
        at = 0
        for _, start, take, item in pieces:
            images[at:at + take] = item[2][start:start + take]
            masks[at:at + take] = item[3][start:start + take]
            if morph is not None and item[4] is not None:
                morph[at:at + take] = item[4][start:start + take]
            at += take
        started = time.perf_counter()
        out = classify_crops(
            entry.model, entry.info, images, masks, morph, device=self.device,
            batch_size=self.forward_batch_size, amp=self.amp, return_attention=True, progress=False,
            prior_correction=self.prior_correction, test_time_views=views, sure_at=None,
        )
        self.forward_batch_size = min(self.forward_batch_size, int(out.get("batch_size", self.forward_batch_size)))
        self.seconds += time.perf_counter() - started
        self.padded += self.batch_size - n
        return out, n


# ----------------------------------------------------------------------------- counts


def cut_by_edge(table: pd.DataFrame) -> np.ndarray:
    """Boolean per row: the cell's ``touches_edge`` is true (all false without the column)."""
    if "touches_edge" not in table.columns:
        return np.zeros(len(table), bool)
    return table["touches_edge"].fillna(False).astype(bool).to_numpy()


def differential_counts(table: pd.DataFrame, *, include_edge_cells: bool = True) -> pd.DataFrame:
    """Per cell type and class: count and percentage of the cells of that type.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per cell with ``cell_type`` and, where classified, ``class`` (missing or
        empty: ``"unclassified"``).
    include_edge_cells : bool
        False leaves out the cells the image edge cuts (``touches_edge``): the classifier
        saw only part of each, and where the fields of a slide overlap, the neighbouring
        field shows it whole. Tables without a ``touches_edge`` column are counted whole.
    """
    if not isinstance(table, pd.DataFrame) or "cell_type" not in table.columns:
        got = (f"a table with columns {list(table.columns)[:6]}" if isinstance(table, pd.DataFrame)
               else type(table).__name__)
        raise TypeError(f"table must be a per-cell DataFrame with a cell_type column (AnalysisResult.table, "
                        f"SmearSegmentation.table), got {got}")
    if not include_edge_cells:
        table = table[~cut_by_edge(table)]
    if table.empty:
        return pd.DataFrame(columns=["cell_type", "class", "count", "percent"])
    classes = (table["class"].astype(object).replace("", np.nan).fillna("unclassified") if "class" in table
               else pd.Series("unclassified", index=table.index))  # object: a categorical column too
    counts = (
        pd.DataFrame({"cell_type": table.cell_type, "class": classes})
        .value_counts()
        .rename("count")
        .reset_index()
        .sort_values(["cell_type", "count", "class"], ascending=[True, False, True], ignore_index=True)
    )
    totals = counts.groupby("cell_type")["count"].transform("sum")
    counts["percent"] = 100.0 * counts["count"] / totals
    return counts
