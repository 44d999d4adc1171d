"""The "Classify cells" dock widget: classify segmented cells and map the models' attention.

It calls :func:`napari_smear.analyze` -- the function a script calls -- in a background
thread and shows the result with the same layer builders as
:func:`napari_smear.add_to_viewer`: the cells layer gains ``class``, ``confidence`` and
``p_<class>`` features and is coloured by class, an attention image per model is added,
and the "Differential count" dock opens on the cells.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, Select, SpinBox
from napari.layers import Image, Labels

from napari_smear._napari.layers import (
    METADATA_KEY,
    analysis_layers,
    hand_set_classes,
    image_layer_of_cells,
    layer_pixel_size_um,
    nuclei_layer_of,
    relink_renamed_image,
    restore_hand_set_classes,
    segmentation_from_layers,
    show_layers,
)
from napari_smear._napari.widgets import user_models
from napari_smear._napari.widgets._background import (
    BackgroundTaskWidget,
    ImageLayerChoice,
    capture_geometry,
    stack_problem,
)

if TYPE_CHECKING:
    import napari

    from napari_smear.pipeline import AnalysisResult

__all__ = [
    "ClassifyWidget",
    "ModelInputs",
    "cells_layer_choices",
    "device_choices",
    "device_combo",
    "image_layer_choices",
    "model_choices",
    "SEGMENT_FIRST",
]

#: Label of the cells-layer choice that segments the image before classifying it.
SEGMENT_FIRST = "(segment the image first)"
_DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def model_choices(_widget: Any = None) -> list[tuple[str, str]]:
    """(label, value) of the models to offer: installed built-ins, then the session's files.

    ``_widget`` is the magicgui widget asking (unused; magicgui passes it).
    """
    from napari_smear.models.registry import BUILTIN_MODELS, available_models

    choices = [(f"{name} (built-in)", name) for name in available_models() if name in BUILTIN_MODELS]
    for path in user_models.paths:
        choices.append((f"{path.stem} ({path.parent})", str(path)))
    return choices


def device_choices() -> list[tuple[str, str, bool]]:
    """(label, value, available) for auto / cpu / cuda / mps on this machine."""
    from napari_smear.predict import _available_devices, select_device

    present = {name.partition(":")[0] for name in _available_devices()}
    auto = select_device("auto").type
    return [
        (f"auto ({auto})" if kind == "auto" else kind, kind, kind == "auto" or kind in present)
        for kind in _DEVICE_KINDS
    ]


def class_frequency_checkbox() -> CheckBox:
    """Whether the models' answers follow how common each class was in their training
    cells (each model file's prior correction) or treat every class as equally common."""
    return CheckBox(
        text="correct for class frequencies", value=True,
        tooltip="On: each model's answers are moved back towards how common each class was among its training "
        "cells (the strength stored in its file), so rare classes are not over-called. Off: every class is "
        "treated as equally common: rare classes are called more often (more sensitive, less precise).",
    )


#: Choices of :func:`turned_views_combo`: (label, value).
TURNED_VIEWS_CHOICES = (
    ("all of them (steadiest)", "all"),
    ("only for unsure cells (faster)", "unsure"),
    ("none (fastest)", "none"),
)


def turned_views_combo() -> ComboBox:
    """How many turned views each model classifies a cell in: those its file asks for
    (the built-in models: 8, averaged), those only for the cells its first view leaves
    unsure, or none (each cell once)."""
    return ComboBox(
        label="turned views", choices=TURNED_VIEWS_CHOICES, value="all",
        tooltip="Each cell is classified as it is, mirrored and turned (the built-in models: 8 views, averaged: "
        "steadier answers). 'Only for unsure cells': a cell whose first view gives a class 85 % or more is "
        "answered from that view (the classification takes about a fifth of the time on cells like the model's "
        "own; on another microscope most cells are unsure). 'None': each cell once, the classification up to "
        "8 times faster on a CPU. The segmentation's time stays either way.",
    )


def test_time_views_option(combo: ComboBox) -> int | None:
    """The ``test_time_views`` argument the combo stands for (None: each model's own)."""
    return 1 if combo.value == "none" else None


def sure_at_option(combo: ComboBox) -> float | None:
    """The ``sure_at`` argument the combo stands for (None: every cell in all its views)."""
    from napari_smear.predict import SURE_AT

    return SURE_AT if combo.value == "unsure" else None


def prior_correction_option(checkbox: CheckBox) -> float | None:
    """The ``prior_correction`` argument the checkbox stands for (None: each model's own)."""
    return None if checkbox.value else 0.0


def device_combo() -> ComboBox:
    """The "device" choice (auto / cpu / cuda / mps), the devices this machine lacks greyed out."""
    choices = device_choices()
    combo = ComboBox(
        label="device", choices=[(label, value) for label, value, _ in choices],
        tooltip="Where the models run: auto takes a CUDA GPU, then Apple's MPS, else the CPU",
    )
    model = combo.native.model()  # Qt model items: one per device, in order
    for row, (_, _, available) in enumerate(choices):
        item = model.item(row) if hasattr(model, "item") else None
        if item is not None and not available:
            item.setEnabled(False)
            item.setToolTip("not available on this machine")
    return combo


def image_layer_choices(viewer: Any) -> list[tuple[str, Image]]:
    """(name, layer) of the viewer's image layers that can be analysed (not attention maps)."""
    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Image) and not _is_attention(layer)]


def cells_layer_choices(viewer: Any) -> list[tuple[str, Labels]]:
    """(name, layer) of the viewer's cells labels layers (made by Segment / Classify cells)."""
    return [
        (layer.name, layer) for layer in viewer.layers
        if isinstance(layer, Labels) and layer.metadata.get(METADATA_KEY, {}).get("kind") == "cells"
    ]


def cells_layer_of(viewer: Any, image_layer: Any) -> Labels | None:
    """The cells layer made from ``image_layer`` (also one made before the image was
    renamed), or None: never another image's, which may have the same size."""
    relink_renamed_image(viewer, image_layer)
    for _, candidate in cells_layer_choices(viewer):
        if candidate.metadata[METADATA_KEY].get("image_layer") == image_layer.name:
            return candidate
    return None


class ModelInputs:
    """The "models" list and "add model file" field of a widget that classifies cells.

    A mixin for :class:`BackgroundTaskWidget` subclasses: :meth:`_model_inputs` makes
    ``self._models`` (the installed built-in models and the session's model files) and
    ``self._model_file`` (adds a file to the session's models and selects it), and
    keeps the list up to date as model files are trained or opened in the session.
    """

    def _model_inputs(self, tooltip: str) -> list:
        """Make the two inputs (``tooltip`` is the list's); returns them in order."""
        self._models = Select(label="models", choices=model_choices, tooltip=tooltip)
        self._models.native.setMaximumHeight(90)
        self._model_file = FileEdit(
            label="add model file", mode="r", filter="*.safetensors",
            tooltip="A model file (.safetensors) trained with napari-smear; it is added to the models",
        )
        self._model_file.changed.connect(self._on_model_file)
        self._follow_user_models()
        return [self._models, self._model_file]

    def _on_model_file(self, path: Path | None) -> None:
        if not path or not Path(path).is_file():
            return
        try:
            added = user_models.add(path)
        except ValueError as exc:  # ModelFileError: not a model file
            # not "classification failed": nothing was classified, a file was refused
            self._refuse(f"Not added: {exc}", f"not a usable model file: {exc}")
            return
        # One model per cell type (analyze refuses two): the new model replaces the
        # selected ones that classify any of its cell types.
        types = _cell_types_of(str(added))
        kept, replaced = [], []
        for value in self._models.value:
            if value == str(added):
                continue
            (replaced if types & _cell_types_of(value) else kept).append(value)
        self._models.value = [*kept, str(added)]
        if replaced:
            self._set_status(
                f"Added {Path(added).name} for {', '.join(sorted(types))} cells, in place of "
                f"{', '.join(_model_name(v) for v in replaced)} (one model per cell type)."
            )

    def _on_user_models_changed(self, _paths: tuple = ()) -> None:
        selected = list(self._models.value or ())
        self._models.reset_choices()
        values = {value for _, value in model_choices()}
        self._models.value = [v for v in selected if v in values]


class ClassifyWidget(ImageLayerChoice, ModelInputs, BackgroundTaskWidget):
    """Dock widget: classify the cells of a smear image and show where the models looked.

    Choose the image layer, its cells layer (from "Segment cells"; or let the widget
    segment first), one or more models (installed built-ins, files trained or opened
    in this session, or "add model file"), the device and the batch size, press Run.
    The work runs in a background thread (progress bar, Cancel: nothing is added to
    the viewer); the viewer stays responsive.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    task_name = "classification"
    result_name = "classification"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, status_lines=4)
        self._image_combo = ComboBox(
            label="image", choices=self._image_layer_choices, tooltip="The smear image layer to analyse"
        )
        self._cells_combo = ComboBox(
            label="cells",
            choices=self._cells_layer_choices,
            tooltip="The cells labels layer of that image (from Segment cells); "
            f"{SEGMENT_FIRST!r} segments the image in the same run",
        )
        models = self._model_inputs(
            "Models to run (Ctrl-click for several); each classifies the cell types its file names"
        )
        self._device = device_combo()
        self._batch_size = SpinBox(
            label="batch size", value=128, min=1, max=4096, step=16,
            tooltip="Crops per forward pass (halved automatically when a GPU runs out of memory)",
        )
        self._class_frequencies = class_frequency_checkbox()
        self._turned_views = turned_views_combo()
        self.extend([
            self._image_combo, self._cells_combo, *models, self._class_frequencies, self._turned_views, self._device,
            self._batch_size,
            *self._run_controls(),
        ])
        self._started = 0.0
        #: The last result and the layers it added (for scripts and tests).
        self.last_result: AnalysisResult | None = None
        self._hand_classes: dict[int, str] = {}  # label -> class set by hand, kept over a run
        self.last_layers: list = []
        #: Seconds from Run to the layers being in the viewer, for the last run.
        self.last_run_seconds: float | None = None

        self._image_combo.changed.connect(self._on_image_changed)
        self.reset_choices()
        self._select_default_models()
        self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ public API
    @property
    def cells_layer(self) -> Labels | None:
        """The cells layer whose cells are classified; None: segment the image first
        (chosen by itself for the image; settable)."""
        return self._cells_combo.value

    @cells_layer.setter
    def cells_layer(self, layer: Labels | str | None) -> None:
        self._cells_combo.value = self._viewer.layers[layer] if isinstance(layer, str) else layer

    @property
    def models(self) -> list[str]:
        """The models to classify with: built-in names or model files (settable; a
        file not yet listed is added to the session's models)."""
        return list(self._models.value)

    @models.setter
    def models(self, values: Sequence[str | Path]) -> None:
        chosen = []
        for value in values:
            if Path(str(value)).suffix == ".safetensors":
                value = user_models.add(value)  # checked: a clear error for a file of the wrong kind
            chosen.append(str(value))
        self._models.reset_choices()
        self._models.value = chosen

    def run(self) -> None:
        """Classify the chosen image's cells (no-op while a run is active; see
        :attr:`run_finished`)."""
        if self.is_running:
            return
        self._started = time.perf_counter()
        self._hand_classes = {}
        image_layer = self._image_combo.value
        if image_layer is None:
            self._decline("No image layer: open or add an image first.", "open or add an image layer first")
            return
        models = list(self._models.value or ())
        if not models:
            self._decline(
                "No model chosen: pick one in 'models', or add a model file (train one with Train classifier).",
                "choose a model first",
            )
            return
        problem = stack_problem(image_layer)
        if problem:
            self._decline(f"Cannot classify: {problem}.", problem)
            return
        image = image_layer.data[0] if image_layer.multiscale else image_layer.data
        cells_layer = self._cells_combo.value
        segmentation = None
        nuclei_layer = None
        if cells_layer is not None:
            nuclei_layer = nuclei_layer_of(self._viewer, cells_layer)
            try:
                # edits by hand are measured in the worker (a pass over every pixel)
                segmentation = segmentation_from_layers(cells_layer, nuclei_layer, refresh=False)
            except ValueError as exc:
                self._fail(str(exc))
                return
            made_from = image_layer_of_cells(self._viewer, cells_layer)
            if made_from is not None and made_from is not image_layer:
                # one camera field's cells on another's pixels: plausible-looking and wrong
                self._decline(
                    f"Cells layer {cells_layer.name!r} was made from image {made_from.name!r}, not "
                    f"{image_layer.name!r}: choose {image_layer.name!r}'s cells layer (or none, to segment it first), "
                    f"or choose image {made_from.name!r}.",
                    f"cells layer {cells_layer.name!r} belongs to image {made_from.name!r}",
                )
                return
            image_shape = tuple(image.shape[-3:-1] if image_layer.rgb else image.shape[-2:])
            if tuple(segmentation.labels.shape) != image_shape:
                self._fail(
                    f"cells layer {cells_layer.name!r} is {segmentation.labels.shape} pixels but image "
                    f"{image_layer.name!r} is {image_shape}; choose the cells layer of that image"
                )
                return
            # A snapshot: painting on the layer during the run must not change what is classified.
            segmentation = dataclasses.replace(
                segmentation, labels=segmentation.labels.copy(), nuclei=segmentation.nuclei.copy(),
                table=segmentation.table.copy(),
            )
        # classes set by hand (Cell gallery) are a person's word: they outlast a new classification
        self._hand_classes = hand_set_classes(cells_layer) if cells_layer is not None else {}
        pixel_size = layer_pixel_size_um(image_layer)  # the file's, else a scale in µm
        target = {
            "image_layer_name": image_layer.name,
            **capture_geometry(image_layer),
            # by id: renamed during the run (or with the image), they are still the ones updated
            "cells_id": cells_layer.unique_id if cells_layer is not None else None,
            "nuclei_id": nuclei_layer.unique_id if nuclei_layer is not None else None,
        }
        options = {
            "models": models,
            "device": self._device.value,
            "batch_size": int(self._batch_size.value),
            # checked against the red cells: a file's calibration can be wrong
            "recorded_pixel_size_um": float(pixel_size) if pixel_size else None,
            "segmentation": segmentation,
            "prior_correction": prior_correction_option(self._class_frequencies),
            "test_time_views": test_time_views_option(self._turned_views),
            "sure_at": sure_at_option(self._turned_views),
        }

        def compute(report):
            from napari_smear import pipeline
            from napari_smear.segment import refresh_table

            from .counts import import_chart_modules

            import_chart_modules()  # here, not in the viewer's thread when the counts dock opens

            # The pixels are materialised here, so a lazy (dask) layer does not freeze the viewer.
            pixels = np.asarray(image)
            if options["segmentation"] is not None:  # cells painted or erased by hand
                options["segmentation"] = refresh_table(options["segmentation"])
            return pipeline.analyze(pixels, progress=lambda f, m="": report((float(f), str(m))), **options)

        what = "segmenting and classifying" if segmentation is None else "classifying"
        self._start(
            compute,
            status=f"{what.capitalize()} {image_layer.name!r} with {', '.join(_model_name(m) for m in models)}…",
            on_progress=self._on_progress,
            on_result=lambda result: self._show_result(result, target),
            thread_name="napari-smear-classify",
        )

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer and model lists (napari calls this when layers change)."""
        super().reset_choices(*args)
        # A cells layer made from the chosen image appeared (e.g. by Segment cells): use it.
        if getattr(self, "_worker", None) is None and self._cells_combo.value is None:
            self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ choices
    def _image_layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return image_layer_choices(self._viewer)

    def _cells_layer_choices(self, _widget: Any = None) -> list[tuple[str, Labels | None]]:
        return [*cells_layer_choices(self._viewer), (SEGMENT_FIRST, None)]

    def _on_image_changed(self, layer: Image | None) -> None:
        """Pick the cells layer made from this image; without one, segment first.

        Never keep another image's cells layer: two fields of the same size would be
        classified with the wrong segmentation without any error.
        """
        if layer is None or self.is_running:
            return
        self._pick_cells_layer(layer)

    def _pick_cells_layer(self, image_layer: Image) -> None:
        self._cells_combo.value = cells_layer_of(self._viewer, image_layer)

    def _select_default_models(self) -> None:
        values = [value for _, value in model_choices()]
        builtins = [v for v in values if not Path(v).suffix]
        self._models.value = builtins or values[:1]

    # ------------------------------------------------------------------ worker callbacks
    def _on_progress(self, update: tuple[float, str]) -> None:
        fraction, message = update
        self._show_fraction(fraction)
        if message:
            self._set_status(message[:1].upper() + message[1:] + "…")

    def _show_result(self, result: AnalysisResult, target: dict) -> None:
        if self._image_was_removed(target):
            return
        target = self._current_target(target)
        layers = show_layers(self._viewer, analysis_layers(result, **target))
        kept = restore_hand_set_classes(layers[0], self._hand_classes)
        self.last_result, self.last_layers = result, layers
        if self._image_combo.value is not None and self._image_combo.value.name == target["image_layer_name"]:
            self._cells_combo.reset_choices()
            self._pick_cells_layer(self._image_combo.value)  # the next run reuses these cells
        self.last_run_seconds = time.perf_counter() - self._started
        self._progress.value = 100
        kept_note = f". {kept} class(es) set by hand kept" if kept else ""
        self._set_status(_summary(result, self.last_run_seconds) + _edits(result.segmentation.params.get("edited"))
                         + kept_note)
        self._show_notes([*(result.segmentation.params.get("warnings") or ()), *result.notes])
        self._watch_classified_cells(layers[0])
        if getattr(self._viewer, "window", None) is not None:
            from napari_smear._napari.widgets.counts import show_counts

            show_counts(self._viewer, layers[0])

    def _watch_classified_cells(self, cells_layer) -> None:
        """Until the next run: when those cells lose their classes (Segment cells ran
        again on the image), the status stops reporting the classification as current."""
        previous = getattr(self, "_watched_cells", None)
        if previous is not None:
            with contextlib.suppress(Exception):  # the layer may be gone
                previous.events.features.disconnect(self._on_watched_features)
        self._watched_cells = cells_layer
        cells_layer.events.features.connect(self._on_watched_features)

    def _on_watched_features(self, event=None) -> None:
        layer = self._watched_cells
        if layer is None or self.is_running or "class" in layer.features.columns:
            return
        layer.events.features.disconnect(self._on_watched_features)
        self._watched_cells = None
        self._progress.value = 0
        self._set_status(f"The cells of {layer.name!r} were replaced since they were classified (segmented "
                         "again?): press Run to classify them.")


def _cell_types_of(value: str) -> set[str]:
    """The segmented cell types a model (built-in name or file) classifies."""
    from napari_smear.models import ModelFileError, read_metadata
    from napari_smear.models.files import resolve_model_path
    from napari_smear.segment.types import CELL_TYPES

    try:
        types = read_metadata(resolve_model_path(value)).get("cell_types")
    except (ModelFileError, OSError):
        return set()
    return set(types or CELL_TYPES)  # a file that does not say classifies every type (as analyze does)


def _is_attention(layer: Any) -> bool:
    return layer.metadata.get(METADATA_KEY, {}).get("kind") == "attention"


def _model_name(value: str) -> str:
    path = Path(value)
    return path.stem if path.suffix == ".safetensors" else value


def _edits(edited: dict | None) -> str:
    """What the status adds when the cells were painted or erased by hand before the run."""
    if not edited or not any(edited.values()):
        return ""
    parts = [f"{edited.get(k, 0)} {k}" for k in ("removed", "added", "redrawn") if edited.get(k)]
    return f". Cells edited by hand, measured again: {', '.join(parts)}"


def _summary(result: AnalysisResult, seconds: float) -> str:
    from napari_smear.pipeline import retyped_platelets

    table = result.table
    classified = int(table["class"].notna().sum()) if "class" in table.columns else 0
    parts = []
    for cell_type, group in result.counts.groupby("cell_type", sort=False):
        top = group[group["class"] != "unclassified"].head(3)
        if list(top["class"]) == [cell_type]:  # "3 platelets (3 platelet)" says nothing twice
            top = top.iloc[:0]
        detail = ", ".join(f"{int(n)} {c}" for c, n in zip(top["class"], top["count"]))
        count = int(group["count"].sum())
        # as the Segment dock says them: "1 wbc, 20 rbc, 3 platelets"
        name = f"{cell_type}s" if cell_type == "platelet" and count != 1 else cell_type
        parts.append(f"{count} {name}" + (f" ({detail}{', …' if len(group) > 3 else ''})" if detail else ""))
    models = ", ".join(result.models)
    text = f"{classified} of {len(table)} cells classified by {models} in {seconds:.1f} s: " + "; ".join(parts)
    # say why the white-cell count fell: pipeline.retype_platelet_clumps
    retyped = int(retyped_platelets(table).sum())
    if retyped:
        text += f" ({retyped} segmented as white cells and re-typed platelets by the white-cell model)"
    return text
