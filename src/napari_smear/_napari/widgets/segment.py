"""The "Segment cells" dock widget: whole-smear segmentation in a background thread."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from napari_smear._napari.layers import segmentation_layers

if TYPE_CHECKING:
    import napari

    from napari_smear.segment.types import SmearSegmentation

__all__ = ["SegmentWidget", "SegmentationCancelled"]

# How often the background generator wakes up when segmentation reports nothing, so a
# Cancel is noticed promptly (seconds).
_HEARTBEAT_S = 0.05


class SegmentationCancelled(Exception):
    """Raised inside the progress callback to stop a run the user cancelled."""


class _Cancelled:
    """Returned by the worker when a run ended because it was cancelled."""


CANCELLED = _Cancelled()


def segment_in_background(
    segment: Callable[..., SmearSegmentation],
    image: Any,
    pixel_size_um: float | None,
    cancel: threading.Event,
    done: threading.Event,
) -> Iterator[tuple[float, str] | None]:
    """Run ``segment`` on a helper thread, yielding its progress as it comes.

    Meant for :func:`napari.qt.threading.create_worker` (a generator worker): each
    yielded ``(fraction, message)`` updates the progress bar; ``None`` is a heartbeat
    (lets ``worker.quit()`` take effect even when segmentation is silent). When
    ``cancel`` is set, the next progress call raises :class:`SegmentationCancelled`,
    which is how ``segment_smear`` is cancelled. ``done`` is set when the helper thread
    has finished, whatever happened, so the caller knows when the CPU is free again.

    Returns
    -------
    SmearSegmentation or CANCELLED
    """
    updates: queue.SimpleQueue[tuple[float, str]] = queue.SimpleQueue()
    outcome: dict[str, Any] = {}

    def progress(fraction: float, message: str = "") -> None:
        if cancel.is_set():
            raise SegmentationCancelled("segmentation cancelled by the user")
        updates.put((float(fraction), str(message)))

    def compute() -> None:
        try:
            pixels = np.asarray(image)
            outcome["result"] = segment(pixels, pixel_size_um=pixel_size_um, progress=progress)
        except BaseException as exc:  # handed to the worker thread below
            outcome["error"] = exc
        finally:
            done.set()

    helper = threading.Thread(target=compute, name="napari-smear-segment", daemon=True)
    helper.start()
    try:
        yield (0.0, "starting")
        while not done.is_set() or not updates.empty():
            try:
                yield updates.get(timeout=_HEARTBEAT_S)
            except queue.Empty:
                yield None
    finally:
        if not done.is_set():  # closed early (worker quit, app exit): stop the helper too
            cancel.set()
    error = outcome.get("error")
    if isinstance(error, SegmentationCancelled) or (error is not None and cancel.is_set()):
        return CANCELLED
    if error is not None:
        raise error
    return outcome["result"]


class SegmentWidget(Container):
    """Dock widget: segment the cells of a smear image layer.

    Choose the image layer, optionally its pixel size (0 = estimate the scale from the
    red cells), press Run. Segmentation runs in a background thread (progress bar,
    Cancel button); the result is shown as a labels layer ``"<image> cells"`` coloured
    by cell type with the per-cell table as features, and ``"<image> nuclei"``. Running
    again on the same image replaces those layers' contents.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._image_combo = ComboBox(
            label="image",
            choices=self._image_layer_choices,
            tooltip="The RGB (or grayscale) smear image layer to segment",
        )
        self._pixel_size = FloatSpinBox(
            label="pixel size (µm)",
            value=0.0,
            min=0.0,
            max=100.0,
            step=0.001,
            tooltip="Physical pixel size in micrometres; 0 = estimate the scale from "
            "the red cells in the image",
        )
        self._pixel_size.native.setDecimals(4)
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, min=0, max=100, label="progress")
        self._status = Label(value="")
        self._status.native.setWordWrap(True)  # counts + diameter do not fit one line
        self.extend(
            [
                self._image_combo,
                self._pixel_size,
                self._run_button,
                self._cancel_button,
                self._progress,
                self._status,
            ]
        )
        self._worker = None
        self._cancel_event: threading.Event | None = None
        self._done_event: threading.Event | None = None
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._image_combo.changed.connect(self._on_image_changed)
        self.reset_choices()
        self._on_image_changed(self._image_combo.value)
        # If the dock is destroyed mid-run, stop the computation (no widget references:
        # the Python wrapper may be gone by then).
        state = self._abandon_state = {"cancel": None}
        self.native.destroyed.connect(lambda *_: state["cancel"] and state["cancel"].set())

    # ------------------------------------------------------------------ public API
    @property
    def is_running(self) -> bool:
        """Whether a segmentation (including one being cancelled) is still going."""
        return self._worker is not None or (
            self._done_event is not None and not self._done_event.is_set()
        )

    @property
    def status(self) -> str:
        """The text of the status line."""
        return self._status.value

    def run(self) -> None:
        """Start segmenting the chosen image layer (no-op while a run is active)."""
        if self.is_running:
            return
        layer = self._image_combo.value
        if layer is None:
            self._set_status("No image layer: open or add an image first.")
            show_info("napari-smear: open or add an image layer first")
            return
        try:
            from napari_smear.segment import segment_smear
        except ImportError as exc:
            self._fail(f"segmentation is not available: {exc}")
            return
        # The pixels are materialised (np.asarray) on the helper thread, so a lazy
        # (dask) layer does not freeze the viewer while it loads.
        image = layer.data[0] if layer.multiscale else layer.data
        pixel_size = float(self._pixel_size.value) or None
        # Everything the result needs from the viewer is captured now: the worker never
        # touches viewer objects, and the layer may be renamed or removed meanwhile.
        target = {
            "name": layer.name,
            "scale": tuple(layer.scale[-2:]),
            "translate": tuple(layer.translate[-2:]),
            "units": tuple(layer.units[-2:]),
        }
        self._cancel_event, self._done_event = threading.Event(), threading.Event()
        self._abandon_state["cancel"] = self._cancel_event
        worker = create_worker(
            segment_in_background,
            segment_smear,
            image,
            pixel_size,
            self._cancel_event,
            self._done_event,
            _start_thread=False,
            _ignore_errors=True,  # errors are shown by _on_error, not re-raised
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(result, target))
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._set_status("Cancelled."))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        self._progress.value = 0
        scale_text = f"{pixel_size:g} µm/px" if pixel_size else "automatic scale"
        self._set_status(f"Segmenting {layer.name!r} ({scale_text})…")
        worker.start()

    def cancel(self) -> None:
        """Cancel the active run; its layers are not added."""
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self._worker is not None:
            self._cancel_button.enabled = False
            self._set_status("Cancelling…")
            self._worker.quit()

    # ------------------------------------------------------------------ callbacks
    def _image_layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _on_image_changed(self, layer: Image | None) -> None:
        if layer is None or self.is_running:
            return
        pixel_size = (layer.metadata or {}).get("pixel_size_um")
        self._pixel_size.value = float(pixel_size) if pixel_size else 0.0

    def _on_progress(self, update: tuple[float, str] | None) -> None:
        if update is None:
            return
        fraction, message = update
        self._progress.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if message:
            self._set_status(f"Segmenting: {message}")

    def _on_returned(self, result: Any, target: dict) -> None:
        if result is CANCELLED or result is None:
            self._set_status("Cancelled.")
            return
        try:
            self._show_layers(
                segmentation_layers(
                    result,
                    image_layer_name=target["name"],
                    scale=target["scale"],
                    translate=target["translate"],
                    units=target["units"],
                )
            )
        except Exception as exc:  # a malformed result must not kill the widget
            self._fail(f"could not show the segmentation: {exc}")
            return
        self._progress.value = 100
        self._set_status(_summary(result))

    def _on_error(self, exc: BaseException) -> None:
        self._fail(str(exc) or type(exc).__name__)

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel_button.enabled = False
        if self._done_event is not None and not self._done_event.is_set():
            # Cancelled: the helper thread stops at its next progress call. Keep Run
            # disabled until then, so two segmentations never compete for the CPU.
            self._set_status("Cancelling: waiting for the current step to finish…")
            QTimer.singleShot(100, self._on_finished)
            return
        if self._cancel_event is not None and self._cancel_event.is_set():
            self._set_status("Cancelled.")
        self._run_button.enabled = True

    # ------------------------------------------------------------------ helpers
    def _show_layers(self, layer_data: list[tuple[np.ndarray, dict, str]]) -> None:
        for data, kwargs, layer_type in layer_data:
            name = kwargs["name"]
            existing = self._viewer.layers[name] if name in self._viewer.layers else None
            if isinstance(existing, Labels):
                # Update in place: keeps the user's layer order and display settings.
                existing.data = data
                for attribute in ("features", "colormap", "metadata", "scale", "translate", "units"):
                    if attribute in kwargs:
                        setattr(existing, attribute, kwargs[attribute])
            else:
                self._viewer.add_layer(Layer.create(data, kwargs, layer_type))

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _fail(self, message: str) -> None:
        self._set_status(f"Failed: {message}")
        show_error(f"napari-smear segmentation failed: {message}")


def _summary(seg: SmearSegmentation) -> str:
    counts = seg.counts()
    parts = ", ".join(f"{count} {cell_type}" for cell_type, count in counts.items())
    diameter = f"RBC diameter {seg.rbc_diameter_px:.1f} px"
    if seg.pixel_size_um:
        diameter += f" ({seg.rbc_diameter_px * seg.pixel_size_um:.1f} µm)"
    return f"{seg.n_cells} cells: {parts}; {diameter}"
