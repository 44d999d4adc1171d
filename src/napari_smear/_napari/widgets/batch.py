"""The "Batch analyze folder" dock widget: a whole folder of fields, written to disk.

It calls :func:`napari_smear.batch.analyze_files` -- the function ``napari-smear
analyze`` calls -- in a background thread, with a progress bar over the images and a
Cancel button. The results are files (per image labels, nuclei, attention, cell table and
QC overlay; per run summary.csv, summary_whole_cells.csv, summary_by_folder.csv, errors.csv,
run.json), and a
cancelled or crashed run is resumed by running again. Below the run controls, any image
the output folder holds results for can be opened in the viewer with its cells
(coloured by class, the table in ``features``), nuclei and attention maps, as the
"Classify cells" widget would have shown them (:func:`napari_smear.batch.load_result`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, FileEdit, Label, LineEdit, PushButton, SpinBox

from napari_smear._napari.widgets._background import BackgroundTaskWidget
from napari_smear._napari.widgets.classify import (
    ModelInputs, class_frequency_checkbox, device_combo, model_choices, prior_correction_option,
    sure_at_option, test_time_views_option, turned_views_combo,
)
from napari_smear._napari.widgets.segment import DETAIL_CHOICES, detail_combo

if TYPE_CHECKING:
    import napari

    from napari_smear.batch import BatchReport

__all__ = ["BatchWidget"]


class BatchWidget(ModelInputs, BackgroundTaskWidget):
    """Dock widget: analyse every image of a folder (recursively) into an output folder.

    Choose the input and output folders, optionally a file pattern, the models (none
    selected: segmentation only), the device and the number of worker processes (0:
    in napari's own process), press Run. Images an earlier run finished are skipped
    unless "redo finished images" is ticked; bad files are listed in errors.csv.
    Cancel stops the run; images already finished stay, and a new run resumes after
    them.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it; the widget does not change it).
    """

    task_name = "batch analysis"
    # Keep Run disabled until the current image is done, so two runs never write to the same folder.
    waiting_text = "Cancelling: waiting for the current step to finish…"

    @property
    def cancelled_text(self) -> str:
        """What a cancelled run leaves, from its last progress report (images finished by
        this run or an earlier one, or failed: done either way)."""
        done, total = self._images_done
        if not done:
            return "Cancelled before any image was finished; Run starts again."
        if done >= total:
            return (f"Cancelled as the run ended: all {total} images are done; Run again to list the results "
                    "(nothing is redone).")
        return (f"Cancelled: {done} of {total} images done (finished ones are kept); Run again to do the "
                f"other {total - done}.")

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, progress_label="images", progress_max=1)
        self._input = FileEdit(label="input folder", mode="d", tooltip="Folder of smear images (searched recursively)")
        self._output = FileEdit(label="output folder", mode="d", tooltip="Where the results go (created if needed)")
        self._pattern = LineEdit(
            label="file pattern", value="*", tooltip="File-name glob, e.g. *.jpg (upper or lower case alike)"
        )
        models = self._model_inputs(
            "Models to classify with (Ctrl-click for several; none selected: segmentation only)"
        )
        self._device = device_combo()
        self._workers = SpinBox(
            label="worker processes", value=0, min=0, max=max(1, os.cpu_count() or 1),
            tooltip="Processes of a local Dask cluster for decoding, segmentation and writing "
            "(0: in napari's process)",
        )
        self._class_frequencies = class_frequency_checkbox()
        self._turned_views = turned_views_combo()
        self._detail = detail_combo()
        self._overwrite = CheckBox(text="redo finished images", value=False)
        self._gallery = CheckBox(
            text="write a report with a cell gallery per folder", value=True,
            tooltip="After the run, <output folder>/report.html (each folder's differential count, a line per "
            "image, the failures) and a picture of each folder's white cells and platelets, a block per class, "
            "the least confident first, in <output folder>/galleries/ (napari-smear report does the same)",
        )
        # Looking at the results: any image the output folder holds results for.
        self._summary_paths: dict[str, str] = {}  # image -> input path, from summary.csv
        self._results_title = Label(value="<b>Results</b>")
        # Choices from a callable: napari resets the choices of dock widgets whenever layers
        # change, and a fixed list would be reset to the empty one given here.
        self._analysed = ComboBox(
            label="analysed image", choices=self._analysed_choices,
            tooltip="Images the output folder holds finished results for (from its summary.csv)",
        )
        self._show_button = PushButton(text="Show in viewer", enabled=False)
        self._show_button.changed.connect(self.show_result)
        self._analysed.changed.connect(lambda *_: self._update_show_button())
        self._output.changed.connect(lambda *_: self.refresh_results())
        self.extend([
            self._input, self._output, self._pattern, *models, self._class_frequencies, self._turned_views,
            self._detail, self._device,
            self._workers, self._overwrite, self._gallery,
            *self._run_controls(), self._results_title, self._analysed, self._show_button,
        ])
        self._started = 0.0
        self._batch_running = False  # a batch run (not opening a result) is going
        self._images_done = (0, 0)  # (done, total) of the last progress report
        #: What the last finished run reported (for scripts and tests).
        self.last_report: BatchReport | None = None
        #: The report page the last run wrote (report.html, with a cell gallery per folder), if any.
        self.last_report_page: Path | None = None
        self.reset_choices()
        self._models.value = [value for _, value in model_choices() if not Path(value).suffix]

    # ------------------------------------------------------------------ public API
    def run(self) -> None:
        """Start analysing the input folder (no-op while a run is active)."""
        if self.is_running:
            return
        source, target = _chosen_folder(self._input), _chosen_folder(self._output)
        if source is None or not source.is_dir():
            self._decline("Choose an existing input folder first.", "choose the folder of images to analyse")
            return
        if target is None:
            self._decline("Choose an output folder first.", "choose where the results go")
            return
        # the built-in models in the command line's order (the list shows them sorted): the
        # model order is part of a run's settings, so a folder the CLI finished is not redone
        from napari_smear.pipeline import DEFAULT_MODELS

        chosen = list(self._models.value or ())
        models = [m for m in DEFAULT_MODELS if m in chosen] + [m for m in chosen if m not in DEFAULT_MODELS]
        options = {
            "models": models,
            "device": self._device.value,
            "pattern": self._pattern.value.strip() or "*",
            "workers": int(self._workers.value),
            "overwrite": bool(self._overwrite.value),
            "prior_correction": prior_correction_option(self._class_frequencies),
            "test_time_views": test_time_views_option(self._turned_views),
            "sure_at": sure_at_option(self._turned_views),
            # standard detail is analyze_files' default: None keeps earlier runs' results valid
            "working_diameter_px": None if self._detail.value == DETAIL_CHOICES[0][1] else float(self._detail.value),
        }

        draw_galleries = bool(self._gallery.value)

        def compute(report):
            from napari_smear.batch import analyze_files

            result = analyze_files(
                source, target, progress=lambda done, total, message: report((done, total, message)), **options
            )
            page = None
            if draw_galleries:  # also when every image failed: the report lists the failures
                from napari_smear.report import write_run_report

                report((result.total, result.total, "drawing the cell galleries and the report"))
                try:
                    page = write_run_report(target)
                except (OSError, ValueError, MemoryError) as exc:
                    # the analysis stands (its files are written): the report is an extra
                    page = f"not written: {exc}"
            return result, page

        self._started = time.perf_counter()
        self._images_done = (0, 0)
        what = ", ".join(Path(m).stem if Path(m).suffix else m for m in models) or "segmentation only"
        self.task_name, self.result_name = "batch analysis", "result"
        self._show_button.enabled = False
        self._batch_running = True
        self.last_report = self.last_report_page = None
        self._set_settings_enabled(False)  # the run's folders and models, as they were at Run
        self._start(
            compute,
            status=f"Analysing {source} ({what})…",
            on_progress=self._on_progress,
            on_result=self._show_result,
            thread_name="napari-smear-batch",
        )

    def refresh_results(self, *, unsummarised: bool = False) -> list[str]:
        """List the images the output folder holds results for (its ``summary.csv``); return them.

        ``unsummarised``: also those a run finished without writing the summary (it was
        cancelled), found by their completion markers, their inputs in the input folder.
        """
        target = _chosen_folder(self._output)
        from napari_smear.batch import analysed_input_paths, finished_images

        self._summary_paths = analysed_input_paths(target) if target is not None else {}
        source = _chosen_folder(self._input)
        if unsummarised and target is not None and source is not None:
            for image in finished_images(target):
                self._summary_paths.setdefault(image, str(source / image))
        images = list(self._summary_paths)
        current = self._analysed.value
        self._analysed.reset_choices()
        if images:
            self._analysed.value = current if current in images else images[0]
        self._update_show_button()
        return images

    def _analysed_choices(self, *_) -> list[str]:
        return list(self._summary_paths)

    def show_result(self, image: str | None = None) -> None:
        """Open ``image`` (default: the chosen one) and its results in the viewer, read in the background.

        Adds the input image (with its pixel size) and, as the "Classify cells" widget
        does, ``"<image> cells"`` coloured by class with the cell table as ``features``,
        ``"<image> nuclei"``, one attention layer per model and the Differential count.
        """
        if self.is_running:
            return
        target = _chosen_folder(self._output)
        image = image or self._analysed.value
        if target is None or not image:
            self._decline("Choose an output folder with results first.", "choose a folder a batch run wrote")
            return
        source = self._summary_paths.get(image)
        if not source:
            self.refresh_results()
            source = self._summary_paths.get(image)
        if not source or not Path(source).is_file():
            self._decline(
                f"The input image of {image} is not at {source or 'its recorded path'}; move it back to open it.",
                f"input image of {image} not found",
            )
            return

        shown_as = [layer.name for layer in self._viewer.layers if layer.metadata.get("path") == source]
        if shown_as and not self._replacing_confirmed(f"{shown_as[0]} cells"):
            return

        def compute(report):
            from napari_smear._napari.reader import read_smear_images
            from napari_smear.batch import load_result

            result = load_result(target, image)
            report(None)  # a point to stop at if cancelled
            (image_data,) = read_smear_images(source)
            return image_data, result, image

        self.task_name, self.result_name = f"opening the results of {image}", f"results of {image}"
        self._start(
            compute, status=f"Opening {image} and its results…", on_progress=lambda _: None,
            on_result=self._add_result_layers, thread_name="napari-smear-batch-results",
        )

    # ------------------------------------------------------------------ worker callbacks
    def _update_show_button(self) -> None:
        self._show_button.enabled = bool(self._analysed.value) and not self.is_running

    def _add_result_layers(self, loaded) -> None:
        from napari.layers import Layer

        from napari_smear._napari.layers import add_to_viewer

        (data, kwargs, layer_type), result, image = loaded
        path = kwargs["metadata"]["path"]
        same_file = [layer for layer in self._viewer.layers
                     if layer.metadata.get("path") == path and tuple(layer.data.shape) == tuple(data.shape)]
        if same_file:
            image_layer = same_file[0]  # opened before: reuse it, with the user's display settings
        else:
            if kwargs["name"] in self._viewer.layers:  # another file of the same name (another sub-folder)
                kwargs = {**kwargs, "name": str(Path(image).with_suffix("").as_posix())}
            image_layer = self._viewer.add_layer(Layer.create(data, kwargs, layer_type))
        cells, *_ = add_to_viewer(self._viewer, result, image_layer=image_layer)
        self._progress.value = self._progress.max
        self._set_status(f"Showing {image_layer.name}: {len(result.table)} cells in {cells.name!r}.")

    def _settings_widgets(self) -> list:
        """The inputs a batch run reads at Run: fixed while it runs, so that what the dock
        shows is what the run does (and its results list follows the folder it writes)."""
        keep = {id(w) for w in (*self._run_controls(), self._results_title, self._analysed, self._show_button)}
        return [w for w in self if id(w) not in keep]

    def _set_settings_enabled(self, enabled: bool) -> None:
        for widget in self._settings_widgets():
            widget.enabled = enabled

    def _on_finished(self) -> None:
        super()._on_finished()
        if self.is_running:  # still waiting for a cancelled run's helper thread
            return
        if self._batch_running:
            self._batch_running = False
            self._set_settings_enabled(True)
            if self.last_report is None:
                # cancelled or failed: the images it finished are listed all the same
                self.refresh_results(unsummarised=True)
        self._update_show_button()

    def _on_progress(self, update: tuple[int, int, str]) -> None:
        done, total, message = update
        self._images_done = (int(done), int(total))
        self._progress.max = max(1, int(total))
        self._progress.value = min(int(done), self._progress.max)
        if message:
            self._set_status(f"{done}/{total} images: {message}")

    def _show_result(self, outcome: tuple[BatchReport, Path | str | None]) -> None:
        from napari.utils.notifications import show_warning

        report, page = outcome
        self.last_report = report
        self.last_report_page = page
        self._progress.max = max(1, report.total)
        self._progress.value = self._progress.max
        if isinstance(page, str):  # the report failed; the run did not
            show_warning(f"napari-smear batch: the report was {page}")
            said = f"Report {page}"
            self.last_report_page = None
        else:
            said = f"Report with a cell gallery per folder: {page}" if page is not None else ""
        # the report right after where the results are, before failures and warnings
        self._set_status(_summary(report, time.perf_counter() - self._started, report_text=said))

        if report.failed:
            show_warning(f"napari-smear batch: {_failures(report)}")
        for note in (report.run or {}).get("warnings") or []:  # about the run as a whole
            show_warning(f"napari-smear batch: {note}")
        self.refresh_results()


def _chosen_folder(edit: FileEdit) -> Path | None:
    """The folder typed or picked in ``edit``; None while the field is empty."""
    text = str(edit.line_edit.value).strip()
    return Path(text).expanduser() if text else None


def _summary(report: BatchReport, seconds: float, report_text: str = "") -> str:
    parts = [f"{report.analysed} analysed", f"{report.skipped} finished earlier", f"{report.failed} failed"]
    text = f"{', '.join(parts)} of {report.total} images in {seconds:.1f} s"
    if report.missing_models:
        text += f"; not installed: {', '.join(report.missing_models)}"
    text = f"{text}. Results in {report.out_dir}"
    if report.analysed + report.skipped and report.models:
        text += " (each folder's differential count: summary_by_folder.csv)"
    if report_text:
        text += f". {report_text}"
    if report.failed:
        text += f". {_failures(report)}"
    for note in (report.run or {}).get("warnings") or []:
        text += f". Warning: {note}"
    warned = _warned_images(report)
    if warned:
        first = report.summary.loc[report.summary["image"] == warned[0], "warnings"].iloc[0]
        text += (f". {len(warned)} with warnings (summary.csv, column warnings), the first: "
                 f"{warned[0]}: {first}")
    return text


def _warned_images(report: BatchReport) -> list[str]:
    """Images of the run that napari-smear warned about (summary.csv's ``warnings``)."""
    summary = report.summary
    if summary is None or summary.empty or "warnings" not in summary.columns:
        return []
    notes = summary["warnings"].fillna("").astype(str)
    return summary.loc[notes != "", "image"].astype(str).tolist()


def _failures(report: BatchReport, shown: int = 3) -> str:
    """Which images failed and why (the first few; errors.csv lists them all)."""
    lines = [f"{Path(path).name}: {str(error).splitlines()[0] if error else 'failed'}"
             for path, error in zip(report.errors.file, report.errors.error)]
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    return f"{report.failed} image(s) failed (all listed in errors.csv): " + "; ".join(lines[:shown]) + more
