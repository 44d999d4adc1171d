"""The "Batch analyze folder" dock widget: a whole folder of fields, written to disk.

It calls :func:`napari_smear.batch.analyze_files` -- the function ``napari-smear
analyze`` calls -- in a background thread, with a progress bar over the images and a
Cancel button. Nothing is added to the viewer: the results are files (per image labels,
nuclei, attention, cell table and QC overlay; per run summary.csv, errors.csv,
run.json), and a cancelled or crashed run is resumed by running again.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from napari.utils.notifications import show_error, show_info
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer

from napari_smear._napari.widgets import user_models
from napari_smear._napari.widgets._background import CANCELLED, run_in_background
from napari_smear._napari.widgets.classify import device_choices, model_choices

if TYPE_CHECKING:
    import napari

    from napari_smear.batch import BatchReport

__all__ = ["BatchWidget"]


class BatchWidget(Container):
    """Dock widget: analyse every image of a folder (recursively) into an output folder.

    Choose the input and output folders, optionally a file pattern, the models (none
    selected: segmentation only), the device and the number of worker processes (0:
    in napari's own process), press Run. Images an earlier run finished are skipped
    unless "redo finished images" is ticked; bad files are listed in errors.csv.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it; the widget does not change it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._input = FileEdit(label="input folder", mode="d", tooltip="Folder of smear images (searched recursively)")
        self._output = FileEdit(label="output folder", mode="d", tooltip="Where the results go (created if needed)")
        self._pattern = LineEdit(label="file pattern", value="*", tooltip="File-name glob, e.g. *.jpg")
        self._models = Select(
            label="models", choices=model_choices,
            tooltip="Models to classify with (Ctrl-click for several; none selected: segmentation only)",
        )
        self._models.native.setMaximumHeight(90)
        self._model_file = FileEdit(
            label="add model file", mode="r", filter="*.safetensors",
            tooltip="A model file (.safetensors) trained with napari-smear; it is added to the models",
        )
        self._device = ComboBox(label="device", choices=[(label, value) for label, value, _ in device_choices()])
        self._workers = SpinBox(
            label="worker processes", value=0, min=0, max=max(1, os.cpu_count() or 1),
            tooltip="Processes of a local Dask cluster for decoding, segmentation and writing "
            "(0: in napari's process)",
        )
        self._overwrite = CheckBox(text="redo finished images", value=False)
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, min=0, max=1, label="images")
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self.extend([
            self._input, self._output, self._pattern, self._models, self._model_file, self._device,
            self._workers, self._overwrite, self._run_button, self._cancel_button, self._progress, self._status,
        ])
        self._worker = None
        self._cancel_event: threading.Event | None = None
        self._done_event: threading.Event | None = None
        self._started = 0.0
        #: What the last finished run reported (for scripts and tests).
        self.last_report: BatchReport | None = None
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._model_file.changed.connect(self._on_model_file)
        user_models.changed.connect(self._on_user_models_changed)
        self.reset_choices()
        self._models.value = [value for _, value in model_choices() if not Path(value).suffix]
        state = self._abandon_state = {"cancel": None}
        self.native.destroyed.connect(lambda *_: state["cancel"] and state["cancel"].set())
        self.native.destroyed.connect(lambda *_, w=self: user_models.changed.disconnect(w._on_user_models_changed))

    # ------------------------------------------------------------------ public API
    @property
    def is_running(self) -> bool:
        """Whether a run (including one being cancelled) is still going."""
        return self._worker is not None or (self._done_event is not None and not self._done_event.is_set())

    @property
    def status(self) -> str:
        """The text of the status line."""
        return self._status.value

    def run(self) -> None:
        """Start analysing the input folder (no-op while a run is active)."""
        if self.is_running:
            return
        source, target = _chosen_folder(self._input), _chosen_folder(self._output)
        if source is None or not source.is_dir():
            self._set_status("Choose an existing input folder first.")
            show_info("napari-smear: choose the folder of images to analyse")
            return
        if target is None:
            self._set_status("Choose an output folder first.")
            show_info("napari-smear: choose where the results go")
            return
        models = list(self._models.value or ())
        options = {
            "models": models,
            "device": self._device.value,
            "pattern": self._pattern.value.strip() or "*",
            "workers": int(self._workers.value),
            "overwrite": bool(self._overwrite.value),
        }

        def compute(report):
            from napari_smear.batch import analyze_files

            return analyze_files(
                source, target, progress=lambda done, total, message: report((done, total, message)), **options
            )

        self._cancel_event, self._done_event = threading.Event(), threading.Event()
        self._abandon_state["cancel"] = self._cancel_event
        worker = create_worker(
            run_in_background, compute, self._cancel_event, self._done_event,
            name="napari-smear-batch", _start_thread=False, _ignore_errors=True,
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._started = time.perf_counter()
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        self._progress.value = 0
        what = ", ".join(Path(m).stem if Path(m).suffix else m for m in models) or "segmentation only"
        self._set_status(f"Analysing {source} ({what})…")
        worker.start()

    def cancel(self) -> None:
        """Stop the run; images already finished stay, and a new run resumes after them."""
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self._worker is not None:
            self._cancel_button.enabled = False
            self._set_status("Cancelling…")
            self._worker.quit()

    # ------------------------------------------------------------------ choices
    def _on_model_file(self, path: Path | None) -> None:
        if not path or not Path(path).is_file():
            return
        try:
            added = user_models.add(path)
        except ValueError as exc:  # ModelFileError: not a model file
            self._fail(str(exc))
            return
        self._models.value = [*(v for v in self._models.value if v != str(added)), str(added)]

    def _on_user_models_changed(self, _paths: tuple = ()) -> None:
        selected = list(self._models.value or ())
        self._models.reset_choices()
        values = {value for _, value in model_choices()}
        self._models.value = [v for v in selected if v in values]

    # ------------------------------------------------------------------ worker callbacks
    def _on_progress(self, update: tuple[int, int, str] | None) -> None:
        if update is None:
            return
        done, total, message = update
        self._progress.max = max(1, int(total))
        self._progress.value = min(int(done), self._progress.max)
        if message:
            self._set_status(f"{done}/{total} images: {message}")

    def _on_returned(self, report: Any) -> None:
        if report is CANCELLED or report is None:
            self._set_status("Cancelled. Finished images are kept; Run again to resume.")
            return
        self.last_report = report
        self._progress.max = max(1, report.total)
        self._progress.value = self._progress.max
        self._set_status(_summary(report, time.perf_counter() - self._started))

    def _on_error(self, exc: BaseException) -> None:
        self._fail(str(exc) or type(exc).__name__)

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel_button.enabled = False
        if self._done_event is not None and not self._done_event.is_set():
            # Cancelled: the helper thread stops at its next progress report. Keep Run
            # disabled until then, so two runs never write to the same folder.
            self._set_status("Cancelling: waiting for the current image to finish…")
            QTimer.singleShot(100, self._on_finished)
            return
        if self._cancel_event is not None and self._cancel_event.is_set():
            self._set_status("Cancelled. Finished images are kept; Run again to resume.")
        self._run_button.enabled = True

    # ------------------------------------------------------------------ helpers
    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _fail(self, message: str) -> None:
        self._set_status(f"Failed: {message}")
        show_error(f"napari-smear batch analysis failed: {message}")


def _chosen_folder(edit: FileEdit) -> Path | None:
    """The folder typed or picked in ``edit``; None while the field is empty."""
    text = str(edit.line_edit.value).strip()
    return Path(text).expanduser() if text else None


def _summary(report: BatchReport, seconds: float) -> str:
    parts = [f"{report.analysed} analysed", f"{report.skipped} finished earlier", f"{report.failed} failed"]
    text = f"{', '.join(parts)} of {report.total} images in {seconds:.1f} s"
    if report.missing_models:
        text += f"; not installed: {', '.join(report.missing_models)}"
    if report.failed:
        text += " (see errors.csv)"
    return f"{text}. Results in {report.out_dir}"
