"""The "Train classifier" dock widget: train or fine-tune a cell classifier from napari.

Training data come either from a folder of labelled single-cell images (one
sub-folder per class, as ``napari-smear train`` takes them) or from the current image:
cells whose class the user set -- by editing the ``class`` column of the cells layer's
features, or by painting over cells in a labels layer, one label value per class.
Training runs :func:`napari_smear.training.train` in a background thread with a progress
bar, Cancel and a live validation plot; the saved model file becomes selectable in
every "Classify cells" widget of the session.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, LineEdit, RadioButtons, Select, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_warning

from napari_smear._napari.layers import METADATA_KEY, nuclei_layer_of, relink_renamed_image, segmentation_from_layers
from napari_smear._napari.widgets import user_models
from napari_smear._napari.widgets._background import BackgroundTaskWidget
from napari_smear._napari.widgets.classify import (
    _model_name,
    cells_layer_choices,
    cells_layer_of,
    device_combo,
    image_layer_choices,
    model_choices,
)
from napari_smear.segment.types import CELL_TYPES

if TYPE_CHECKING:
    import napari

    from napari_smear.datasets import CropSet
    from napari_smear.segment.types import SmearSegmentation

__all__ = [
    "TrainWidget",
    "cell_classes_from_features",
    "cell_classes_from_painting",
    "check_cell_classes",
    "crop_set_from_cells",
]

FROM_FOLDER = "folder of labelled cell images"
FROM_VIEWER = "cells of the current image"
NEW_MODEL = "(new model)"
#: Default learning rates: from scratch (train()'s default) and for fine-tuning.
LR_NEW, LR_FINE_TUNE = 2e-3, 5e-4


# ----------------------------------------------------------------------------- data (no Qt)


def cell_classes_from_features(features: pd.DataFrame, column: str = "class") -> dict[int, str]:
    """Label id -> class of the cells whose ``column`` is a non-empty string."""
    if column not in features.columns:
        raise ValueError(
            f"the cells layer's features have no {column!r} column (columns: {list(features.columns)}); "
            "type classes into that column of the features table, or paint them into a labels layer"
        )
    ids = features["index"] if "index" in features.columns else features["label"]
    out = {}
    for label, value in zip(ids.to_numpy(), features[column].to_numpy()):
        if isinstance(value, str) and value.strip():
            out[int(label)] = value.strip()
    return out


def cell_classes_from_painting(
    cells: np.ndarray, painted: np.ndarray, names: dict[int, str] | None = None
) -> dict[int, str]:
    """Label id -> class of the cells painted over in a class labels layer.

    Each cell takes the painted value covering most of its painted pixels; unpainted
    cells are left out. ``names`` maps painted values to class names (default
    ``"class <value>"``).
    """
    cells = np.asarray(cells)
    painted = np.asarray(painted)
    if cells.shape != painted.shape:
        raise ValueError(f"the painted layer is {painted.shape} pixels but the cells layer is {cells.shape}")
    both = (cells > 0) & (painted > 0)
    if not both.any():
        return {}
    pairs = pd.DataFrame({"cell": cells[both].astype(np.int64), "value": painted[both].astype(np.int64)})
    votes = pairs.value_counts().reset_index(name="n").sort_values(["cell", "n", "value"], ascending=[True, False, True])
    winners = votes.drop_duplicates("cell")
    names = names or {}
    return {int(c): str(names.get(int(v), f"class {int(v)}")) for c, v in zip(winners["cell"], winners["value"])}


def check_cell_classes(classes: dict[int, str]) -> dict[str, int]:
    """Cells per class; raise ValueError unless there are two classes of two cells or more."""
    counts = pd.Series(classes, dtype=object).value_counts()
    if len(counts) < 2:
        raise ValueError(
            f"training needs cells of at least two classes; the labelled cells have {dict(counts)}"
        )
    few = {c: int(n) for c, n in counts.items() if n < 2}
    if few:
        raise ValueError(f"every class needs at least two labelled cells (one is held out for validation): {few}")
    return {str(c): int(n) for c, n in sorted(counts.items())}


def crop_set_from_cells(
    image: np.ndarray,
    segmentation: SmearSegmentation,
    classes: dict[int, str],
    *,
    crop_diameters: float = 4.0,
    output_size: int = 96,
    source: str = "napari",
    stain_normalization: str | None = None,
) -> CropSet:
    """A training :class:`~napari_smear.datasets.CropSet` of the labelled cells of one image.

    The cells are cropped exactly as inference crops them
    (:func:`napari_smear.crops.crop_instances` at ``crop_diameters`` red-cell
    diameters, ``output_size`` pixels), so a model trained on them sees what it will
    classify. All crops are in the ``train`` split: :func:`~napari_smear.training.train`
    holds out 15 % of each class for validation.

    Raises
    ------
    ValueError
        Fewer than two classes, or a class with fewer than two cells (one is needed for
        training and one for validation), or unknown label ids.
    """
    from napari_smear.crops import crop_instances
    from napari_smear.datasets import CropSet, crop_code_version
    from napari_smear.morphology import MORPH_FEATURES, crop_morphology

    counts = check_cell_classes(classes)
    ids = np.array(sorted(classes), np.int64)
    crops = crop_instances(
        image, segmentation, crop_diameters=crop_diameters, output_size=output_size, labels=ids,
        stain_normalization=stain_normalization,
    )
    morph = crop_morphology(crops.images, crops.masks, crop_diameters).to_numpy(np.float32)
    class_names = sorted(counts)
    n = len(ids)
    return CropSet(
        images=crops.images,
        masks=crops.masks,
        morph=np.nan_to_num(morph, nan=0.0, posinf=0.0, neginf=0.0),
        labels=np.array([class_names.index(classes[int(i)]) for i in ids], np.int64),
        class_names=class_names,
        split=np.full(n, "train", dtype="<U5"),
        attributes=np.zeros((n, 0), np.int8),
        attribute_names=[],
        attribute_values=[],
        paths=np.array([f"{source}#cell{int(i)}" for i in ids]),
        crop_diameters=float(crop_diameters),
        rbc_diameter_px=np.full(n, segmentation.rbc_diameter_px, np.float32),
        morph_names=list(MORPH_FEATURES),
        source=source,
        code_version=crop_code_version(),
        stain_normalization=stain_normalization or "",
        cell_types=np.asarray(crops.cell_types, dtype=str),
    )


def _remove_checkpoint(folder: Path) -> None:
    """Delete a finished run's checkpoint folder (the widget never resumes)."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {"state.json", "last.safetensors"}:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- widget


class TrainWidget(BackgroundTaskWidget):
    """Dock widget: train or fine-tune a cell classifier, with a live validation plot.

    Cancel stops training at the end of the current epoch; the model is not offered
    for classification.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    task_name = "training"
    cancelling_text = "Cancelling at the end of the current epoch (or image, while a folder is cropped)…"
    waiting_text = None

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, run_text="Train", status_lines=4)
        self._source = RadioButtons(
            label="train from", choices=[FROM_FOLDER, FROM_VIEWER], value=FROM_VIEWER,
            tooltip="A folder of labelled single-cell images, or cells you classed in the viewer (a cells layer "
            "whose features, or a labels layer painted over it, give each cell's class)",
        )
        self._folder = FileEdit(
            label="folder", mode="d",
            tooltip="A folder with one sub-folder of single-cell images per class (optionally inside "
            "train/ and val/ folders); each image is segmented and its central cell cropped",
        )
        self._image_combo = ComboBox(label="image", choices=self._image_layer_choices)
        self._cells_combo = ComboBox(label="cells", choices=self._cells_layer_choices)
        self._classes_from = ComboBox(
            label="classes from",
            choices=self._class_source_choices,
            tooltip="'features column': the class typed into the cells layer's features table; "
            "or a labels layer you painted over the cells, one label value per class",
        )
        self._column = LineEdit(label="features column", value="class")
        self._cell_types = Select(
            label="cell types", choices=list(CELL_TYPES), value=list(CELL_TYPES),
            tooltip="Which segmented cells the model is for: the cells used for training, and what "
            "Classify cells will give it",
        )
        self._cell_types.native.setMaximumHeight(70)
        self._start_from = ComboBox(
            label="start from", choices=self._start_choices,
            tooltip="Fine-tune a model (its architecture and crop scale are kept) or train a new one",
        )
        from napari_smear.models.registry import TRAINABLE_KINDS

        self._kind = ComboBox(
            label="new model kind", choices=list(TRAINABLE_KINDS), value="shape_aware",
            tooltip="The architecture of a new model (see docs/models.md); a fine-tuned one keeps its own",
        )
        self._crop_size = SpinBox(
            label="crop size (px)", value=96, min=32, max=256, step=16,
            tooltip="Side of each cell's crop as the new model sees it (a fine-tuned model keeps its own)",
        )
        self._epochs = SpinBox(
            label="epochs", value=20, min=1, max=500,
            tooltip="Passes over the training cells; the best epoch on the held-out cells is kept",
        )
        self._batch_size = SpinBox(
            label="batch size", value=64, min=2, max=1024,
            tooltip="Cells per training step (smaller if a GPU runs out of memory)",
        )
        self._lr = FloatSpinBox(
            label="learning rate", value=LR_NEW, min=1e-6, max=1.0, step=1e-4,
            tooltip="Peak learning rate (set lower by itself when a model is fine-tuned)",
        )
        self._lr.native.setDecimals(6)
        self._device = device_combo()
        self._output = FileEdit(
            label="save model as", mode="w", filter="*.safetensors",
            tooltip="The model file to write (.safetensors); an earlier model there is replaced only when "
            "training ends",
        )
        self.extend([
            self._source, self._folder, self._image_combo, self._cells_combo, self._classes_from, self._column,
            self._cell_types, self._start_from, self._kind, self._crop_size, self._epochs, self._batch_size,
            self._lr, self._device, self._output, *self._run_controls(),
        ])
        #: Per-epoch records of the current/last run, and its TrainResult.
        self.history: list[dict] = []
        self.last_result = None
        self._add_plot()

        self._source.changed.connect(self._on_source_changed)
        self._start_from.changed.connect(self._on_start_changed)
        self._classes_from.changed.connect(self._on_classes_from_changed)
        self._image_combo.changed.connect(self._on_image_changed)
        self._follow_user_models()
        self.reset_choices()
        preferred = self._preferred_image()
        if preferred is not None:
            self._image_combo.value = preferred
        self._on_source_changed(self._source.value)
        self._on_start_changed(self._start_from.value)
        self._on_classes_from_changed(self._classes_from.value)

    # ------------------------------------------------------------------ public API
    @property
    def figure(self):
        """The matplotlib figure of the validation curves."""
        return self._figure

    def run(self) -> None:
        """Start training with the widget's settings (no-op while a run is active)."""
        if self.is_running:
            return
        try:
            job = self._prepare()
        except ValueError as exc:
            self._decline(f"Cannot train: {exc}", str(exc))
            return
        self.history = []
        self._draw()
        self._start(
            _train_job(job),
            status=job["description"],
            on_progress=lambda update: self._on_progress(update, job["epochs"]),
            on_result=self._show_result,
            thread_name="napari-smear-train",
        )

    # ------------------------------------------------------------------ preparing a run
    def _prepare(self) -> dict:
        """Everything the background job needs, read from the widget and the viewer now."""
        # what to learn from first: with nothing to train on, where to save is not the question
        if self._source.value == FROM_FOLDER:
            folder = self._folder.value
            if not folder or not Path(folder).is_dir() or str(folder) == ".":
                raise ValueError("choose the folder of labelled cell images (one sub-folder per class)")
        elif self._image_combo.value is None or self._cells_combo.value is None:
            raise ValueError("open an image and segment it (Segment cells) first, then set classes on its cells")
        output = self._output.value
        if not output or str(output) in ("", "."):
            raise ValueError("choose where to save the model ('save model as', a .safetensors file)")
        output = Path(output).expanduser()
        if output.suffix != ".safetensors":
            output = output.with_name(output.name + ".safetensors")
        cell_types = [t for t in CELL_TYPES if t in (self._cell_types.value or ())]
        if not cell_types:
            raise ValueError("choose the cell types the model is for")
        start = self._start_from.value
        job: dict[str, Any] = {
            "output": output,
            "epochs": int(self._epochs.value),
            "batch_size": int(self._batch_size.value),
            "lr": float(self._lr.value),
            "device": self._device.value,
            "init_from": start,
            "model_kind": self._kind.value,
            "cell_types": cell_types,
        }
        if start is not None:
            from napari_smear.models import read_metadata
            from napari_smear.models.files import resolve_model_path

            metadata = read_metadata(resolve_model_path(start))
            crop_diameters, output_size = float(metadata["crop_diameters"]), int(metadata["input_size"])
            stain = metadata.get("stain_normalization") or None  # fine-tuning keeps the model's colours
        else:
            crop_diameters, output_size, stain = 4.0, int(self._crop_size.value), None
        job["crop_diameters"], job["output_size"] = crop_diameters, output_size
        job["stain_normalization"] = stain
        how = f"fine-tuning {_model_name(start)}" if start else f"training a new {self._kind.value} model"

        if self._source.value == FROM_FOLDER:
            folder = self._folder.value
            if not folder or not Path(folder).is_dir() or str(folder) == ".":
                raise ValueError("choose the folder of labelled cell images (one sub-folder per class)")
            job["data"] = Path(folder)
            job["description"] = f"Cropping the cells of {Path(folder).name}/ then {how}…"
            return job

        image_layer, cells_layer = self._image_combo.value, self._cells_combo.value
        if image_layer is None or cells_layer is None:
            raise ValueError("open an image and segment it (Segment cells) first, then set classes on its cells")
        relink_renamed_image(self._viewer, image_layer)  # cells made before the image was renamed
        owner = cells_layer.metadata.get(METADATA_KEY, {}).get("image_layer")
        if owner and owner != image_layer.name:
            # two fields of the same size would otherwise train on one's pixels with the
            # other's cells and classes, without any error
            raise ValueError(
                f"cells layer {cells_layer.name!r} was made from image {owner!r}, not {image_layer.name!r}: "
                "choose that image, or this image's own cells layer"
            )
        image = image_layer.data[0] if image_layer.multiscale else image_layer.data
        segmentation = segmentation_from_layers(cells_layer, nuclei_layer_of(self._viewer, cells_layer))
        if tuple(segmentation.labels.shape) != tuple(image.shape[:2]):
            raise ValueError(f"cells layer {cells_layer.name!r} does not match image {image_layer.name!r} in size")
        # A snapshot: painting on the layers during training must not change the data.
        segmentation = dataclasses.replace(
            segmentation, labels=segmentation.labels.copy(), nuclei=segmentation.nuclei.copy()
        )
        features = pd.DataFrame(cells_layer.features)
        painted = self._classes_from.value
        if painted is None:
            classes = cell_classes_from_features(features, self._column.value.strip() or "class")
        else:
            classes = cell_classes_from_painting(segmentation.labels, np.asarray(painted.data), _painted_names(painted))
        types = dict(zip(features["index"].astype(int), features["cell_type"])) if "cell_type" in features else {}
        classes = {label: c for label, c in classes.items() if types.get(label) in cell_types}
        if not classes:
            raise ValueError(
                f"no {'/'.join(cell_types)} cell has a class yet: type classes into the "
                f"{self._column.value!r} column of the features table, or paint over cells in a labels layer"
            )
        job["cell_types"] = [t for t in cell_types if t in {types[label] for label in classes}]
        counts = check_cell_classes(classes)  # explained now, before any work starts
        # The cells are cropped by the background job (np.asarray of a lazy image and the
        # resampling can take a while on a large field): it gets arrays, not layers.
        job["data"] = None
        job["cells"] = {
            "image": image, "segmentation": segmentation, "classes": classes,
            "crop_diameters": crop_diameters, "output_size": output_size, "source": f"napari: {image_layer.name}",
        }
        job["description"] = (
            f"{how.capitalize()} on {len(classes)} cells of {image_layer.name!r} "
            f"({', '.join(f'{n} {c}' for c, n in counts.items())})…"
        )
        return job

    # ------------------------------------------------------------------ choices
    def _image_layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return image_layer_choices(self._viewer)

    def _cells_layer_choices(self, _widget: Any = None) -> list[tuple[str, Labels]]:
        return cells_layer_choices(self._viewer)

    def _class_source_choices(self, _widget: Any = None) -> list[tuple[str, Labels | None]]:
        painted = [
            (f"painted layer: {layer.name}", layer) for layer in self._viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get(METADATA_KEY, {}).get("kind") not in ("cells", "nuclei")
        ]
        return [("features column", None), *painted]

    def _start_choices(self, _widget: Any = None) -> list[tuple[str, str | None]]:
        return [(NEW_MODEL, None), *model_choices()]

    def _preferred_image(self) -> Image | None:
        """The image to offer first: the selected layer when it is an image, else the
        last image that has a cells layer (the one just segmented or classified),
        rather than whichever image happens to be first in the layer list."""
        images = [layer for _, layer in self._image_layer_choices()]
        # compared by id: napari hands plugins proxies of its objects, a new one per access
        active_id = getattr(self._viewer.layers.selection.active, "unique_id", None)
        for layer in images:
            if active_id is not None and layer.unique_id == active_id:
                return layer
        with_cells = [layer for layer in images if cells_layer_of(self._viewer, layer) is not None]
        return with_cells[-1] if with_cells else None

    def _on_image_changed(self, layer: Image | None) -> None:
        """Pick the cells layer made from this image (another image's cells are refused
        at Train: see _job)."""
        if layer is None or self.is_running:
            return
        own = cells_layer_of(self._viewer, layer)
        if own is not None:
            self._cells_combo.value = own

    def _on_source_changed(self, value: str) -> None:
        from_folder = value == FROM_FOLDER
        self._folder.visible = from_folder
        for widget in (self._image_combo, self._cells_combo, self._classes_from):
            widget.visible = not from_folder
        self._on_classes_from_changed(self._classes_from.value)

    def _on_classes_from_changed(self, value: Any) -> None:
        self._column.visible = self._source.value == FROM_VIEWER and value is None

    def _on_start_changed(self, value: str | None) -> None:
        new = value is None
        self._kind.visible = new
        self._crop_size.visible = new
        self._lr.value = LR_NEW if new else LR_FINE_TUNE
        if not new:  # a fine-tuned model is for the cells its base model was for
            from napari_smear.models import ModelFileError, read_metadata
            from napari_smear.models.files import resolve_model_path

            try:
                types = read_metadata(resolve_model_path(value)).get("cell_types")
            except ModelFileError:
                return
            if types:
                self._cell_types.value = [t for t in CELL_TYPES if t in types]

    def _on_user_models_changed(self, _paths: tuple = ()) -> None:
        current = self._start_from.value
        self._start_from.reset_choices()
        if current in [value for _, value in self._start_choices()]:
            self._start_from.value = current

    # ------------------------------------------------------------------ plot
    def _add_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._figure = Figure(figsize=(4, 2.6), layout="constrained")
        self._canvas = FigureCanvasQTAgg(self._figure)
        self._canvas.setMinimumHeight(200)
        layout = self.form.layout()
        # under the status line, above the stretch that keeps the rows at the top (added
        # after it, the plot sat at the bottom of the dock below an empty gap)
        stretch_at = next((i for i in range(layout.count() - 1, -1, -1) if layout.itemAt(i).spacerItem()), None)
        if stretch_at is None:
            layout.addWidget(self._canvas)
        else:
            layout.insertWidget(stretch_at, self._canvas)
        self._draw()

    def _draw(self) -> None:
        from matplotlib.ticker import MaxNLocator

        figure = self._figure
        figure.clear()
        axes = figure.add_subplot(1, 1, 1)
        axes.set_xlabel("epoch", fontsize=8)
        axes.set_ylabel("validation", fontsize=8)
        axes.set_ylim(0, 1.02)
        axes.tick_params(labelsize=7)
        if self.history:
            epochs = [r["epoch"] for r in self.history]
            axes.plot(epochs, [r["val_accuracy"] for r in self.history], "o-", ms=3, label="accuracy")
            axes.plot(epochs, [r["val_macro_f1"] for r in self.history], "s-", ms=3, label="macro-F1")
            loss = axes.twinx()
            loss.plot(epochs, [r["train_loss"] for r in self.history], color="0.6", lw=1, ls="--", marker=".",
                      label="train loss")  # a marker: one epoch is one point, which a line alone does not draw
            loss.set_ylabel("train loss", fontsize=8, color="0.4")
            loss.tick_params(labelsize=7, colors="0.4")
            best = max(self.history, key=lambda r: r["val_macro_f1"])
            axes.axvline(best["epoch"], color="0.8", lw=0.8)
            axes.set_xlim(0.5, max(epochs[-1], 2) + 0.5)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            handles = axes.get_legend_handles_labels()
            extra = loss.get_legend_handles_labels()
            axes.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower right")
        else:
            axes.text(0.5, 0.5, "validation curves appear here", ha="center", va="center", fontsize=8,
                      transform=axes.transAxes, color="0.5")
        self._canvas.draw_idle()

    # ------------------------------------------------------------------ worker callbacks
    def _on_progress(self, update: tuple[str, Any], epochs: int) -> None:
        kind, payload = update
        if kind == "epoch":
            self.history.append(payload)
            self._progress.value = int(round(100 * payload["epoch"] / max(epochs, 1)))
            self._set_status(
                f"Epoch {payload['epoch']}/{epochs}: loss {payload['train_loss']:.3f}, validation accuracy "
                f"{payload['val_accuracy']:.3f}, macro-F1 {payload['val_macro_f1']:.3f}"
            )
            self._draw()
        else:
            self._set_status(str(payload))

    def _show_result(self, result: Any) -> None:
        self.last_result = result
        self._progress.value = 100
        with contextlib.suppress(OSError):  # the plot beside the model is a convenience
            self._figure.savefig(result.model_path.with_name(result.model_path.stem + "_training.png"), dpi=110)
        try:
            user_models.add(result.model_path)
        except ValueError as exc:
            self._fail(f"the model was saved but cannot be offered for classification: {exc}")
            return
        from napari_smear.training import weak_model_caution

        metrics = result.metrics
        caution = weak_model_caution(metrics, len(result.info.class_names))
        if caution:
            show_warning(f"napari-smear: {result.model_path.name}: {caution}")
        stopped = " (stopped early)" if result.stopped_early else ""
        choice = result.info.metadata.get("prior_correction")
        prior = (f" Prior correction {choice['strength']:g} (chosen on the held-out cells)." if choice else
                 " Too few held-out cells to choose a prior correction: it answers as if all classes were equally common.")
        self._set_status(
            f"Saved {result.model_path.name}: best epoch {result.best_epoch} of {result.epochs_completed}{stopped}, "
            f"validation accuracy {metrics.get('accuracy', float('nan')):.3f}, macro-F1 "
            f"{metrics.get('macro_f1', float('nan')):.3f} on {metrics.get('n', '?')} cells{_views_text(result)}.{prior} "
            f"It classifies {_cell_types_text(result.info.metadata.get('cell_types'))} and is now offered in "
            "Classify cells." + (f" Caution: {caution}" if caution else "")
            # what the training said of the data (the command line prints the same)
            + "".join(f"\nNote: {note}" for note in getattr(result, "notes", None) or ())
        )


def _views_text(result) -> str:
    """How the validation figures were measured, when the model answers otherwise: one
    view per cell during training, where the file classifies each cell in several turned
    views (a fine-tuned built-in model) and usually does a little better."""
    views = int((result.info.metadata or {}).get("test_time_views") or 1)
    return f" (one view per cell; the model answers with {views} turned views)" if views > 1 else ""


def _cell_types_text(cell_types) -> str:
    """The segmented cells a model is given, for the status line."""
    names = {"wbc": "white cells", "rbc": "red cells", "platelet": "platelets"}
    chosen = [names.get(t, t) for t in (cell_types or CELL_TYPES)]
    return (", ".join(chosen[:-1]) + " and " + chosen[-1]) if len(chosen) > 1 else chosen[0]


def _painted_names(layer: Labels) -> dict[int, str]:
    """Class names of a painted layer's values, from its features (``index`` + ``class``/``name``)."""
    features = pd.DataFrame(layer.features)
    for column in ("class", "name"):
        if "index" in features.columns and column in features.columns:
            return {int(i): str(n) for i, n in zip(features["index"], features[column]) if str(n)}
    return {}


def _train_job(job: dict):
    """The background computation of one training run (a closure over plain data)."""

    def compute(report):
        training = importlib.import_module("napari_smear.training")
        output = Path(job["output"])
        # train() keeps the best model so far in a file of its own and moves it over
        # output only when training ends: a cancelled or failed run leaves an earlier
        # model of that name untouched (Classify cells may still offer it). Checked
        # here as well as in train(): before the labelled cells are cropped.
        training.check_model_output(output)  # a file there that is not a model is never replaced
        options = {
            "output": output, "epochs": job["epochs"], "batch_size": job["batch_size"],
            "lr": job["lr"], "device": job["device"], "progress": False, "cell_types": job["cell_types"],
            "on_epoch": lambda record: report(("epoch", record)),
            # a folder's images are cropped first: reported (and cancellable) image by image
            "on_crop": lambda done, total: report(("status", f"Cropping the folder's images: {done} of {total}…")),
        }
        if job["init_from"] is not None:
            options["init_from"] = job["init_from"]
        else:
            options.update(model_kind=job["model_kind"], crop_diameters=job["crop_diameters"],
                           output_size=job["output_size"])
        data = job["data"]
        if data is None:
            cells = job["cells"]
            report(("status", f"Cropping {len(cells['classes'])} labelled cells…"))
            data = crop_set_from_cells(
                np.asarray(cells["image"]), cells["segmentation"], cells["classes"],
                crop_diameters=cells["crop_diameters"], output_size=cells["output_size"], source=cells["source"],
                stain_normalization=job.get("stain_normalization"),
            )
            report(("status", job["description"]))
        try:
            return training.train(data, **options)
        finally:  # the dock offers no resume: nothing of a run is left beside the model
            _remove_checkpoint(training.checkpoint_dir_for(output))
            training.partial_model_path(output).unlink(missing_ok=True)

    return compute
