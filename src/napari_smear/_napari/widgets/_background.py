"""Run a long synchronous computation off the GUI thread, with progress and cancel.

The library functions (``segment_smear``, ``analyze``, ``train``) are synchronous and
report progress through a callback. :func:`run_in_background` runs one on a helper
thread and yields its reports one by one, so it can be handed to
:func:`napari.qt.threading.create_worker` as a generator worker: every yielded value
reaches the GUI thread through ``worker.yielded``, and the worker never touches the
viewer. Cancelling sets an event; the next progress report then raises
:class:`Cancelled` inside the computation, which is how it stops.

:class:`BackgroundTaskWidget` is the dock-widget side of it, shared by the widgets
that run such a computation: the Run and Cancel buttons, the progress bar, the status
line, one run at a time, cancelling, and reporting errors.
"""
from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QEvent, QObject, QTimer

if TYPE_CHECKING:
    import napari

__all__ = ["BackgroundTaskWidget", "BackgroundTaskError", "Cancelled", "CANCELLED", "capture_geometry",
           "run_in_background"]

# How often the generator wakes up when the computation reports nothing, so that
# ``worker.quit()`` (Cancel) is noticed promptly (seconds).
HEARTBEAT_S = 0.05


class Cancelled(Exception):
    """Raised inside a progress callback to stop a computation the user cancelled."""


class BackgroundTaskError(Exception):
    """A RuntimeError of a background computation, passed on under another type: superqt
    takes a RuntimeError coming out of a worker for a deleted Qt object, warns, and
    emits neither ``errored`` nor ``finished``, so the dock stayed busy for good (Run
    disabled) after, say, "another napari-smear run is writing to this folder"."""


class _CancelledResult:
    """Returned by the worker when a run ended because it was cancelled."""

    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED = _CancelledResult()


def run_in_background(
    compute: Callable[[Callable[[Any], None]], Any],
    cancel: threading.Event,
    done: threading.Event,
    *,
    name: str = "napari-smear-worker",
    started: threading.Event | None = None,
) -> Iterator[Any]:
    """Run ``compute(report)`` on a helper thread; yield what it reports as it comes.

    Parameters
    ----------
    compute : callable
        Called as ``compute(report)`` on the helper thread; ``report(update)`` queues
        ``update`` for the GUI and raises :class:`Cancelled` once ``cancel`` is set.
    cancel : threading.Event
        Set by the GUI to stop the computation.
    done : threading.Event
        Set when the helper thread has finished, whatever happened, so the GUI knows
        when the CPU is free for another run.
    name : str
        Name of the helper thread.
    started : threading.Event, optional
        Set as this generator starts: a worker quit before it started (Cancel pressed
        at once after Run) never runs it, and ``done`` is then never set.

    Yields
    ------
    object or None
        Each reported update, or None as a heartbeat.

    Returns
    -------
    object
        What ``compute`` returned, or :data:`CANCELLED`. Other exceptions are
        re-raised (the worker's ``errored`` signal).
    """
    if started is not None:
        started.set()
    updates: queue.SimpleQueue[Any] = queue.SimpleQueue()
    outcome: dict[str, Any] = {}

    def report(update: Any) -> None:
        if cancel.is_set():
            raise Cancelled("cancelled by the user")
        updates.put(update)

    def target() -> None:
        try:
            outcome["result"] = compute(report)
        except BaseException as exc:  # handed to the worker thread below
            outcome["error"] = exc
        finally:
            done.set()

    helper = threading.Thread(target=target, name=name, daemon=True)
    helper.start()
    try:
        while not done.is_set() or not updates.empty():
            try:
                yield updates.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield None
    finally:
        if not done.is_set():  # closed early (worker quit, app exit): stop the helper too
            cancel.set()
    error = outcome.get("error")
    if isinstance(error, Cancelled) or (error is not None and cancel.is_set()):
        return CANCELLED
    if isinstance(error, RuntimeError):
        raise BackgroundTaskError(str(error) or type(error).__name__) from error
    if error is not None:
        raise error
    return outcome["result"]


def capture_geometry(layer: Any) -> dict[str, tuple]:
    """The 2-D ``scale``, ``translate``, ``units`` and ``orientation`` of ``layer``, and its
    ``image_layer_id``, read now.

    Result layers are placed with these: the worker never touches viewer objects, and
    the layer may be moved, renamed or removed while it runs.
    """
    from napari_smear._napari.layers import layer_orientation

    return {
        "scale": tuple(layer.scale[-2:]),
        "translate": tuple(layer.translate[-2:]),
        "units": tuple(layer.units[-2:]),
        "orientation": layer_orientation(layer),  # a turned or sheared image: results turn with it
        "image_layer_id": getattr(layer, "unique_id", None),  # results follow it when it is renamed
    }


def stack_problem(layer: Any) -> str | None:
    """Why an image layer cannot be analysed as one field, when it is a stack (planes,
    time points, channels beyond RGB), with the way out in napari; else None."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    spatial = tuple(data.shape[:-1] if layer.rgb else data.shape)
    if len(spatial) <= 2 or all(n == 1 for n in spatial[:-2]):
        return None
    planes = math.prod(spatial[:-2])
    return (
        f"{layer.name!r} is a stack of {planes} planes {tuple(data.shape)}; napari-smear analyses one field "
        "at a time: split it into one layer per plane (right-click the layer > Split Stack), or pass one "
        "plane from a script"
    )


_BREAK = "\u200b"  # zero-width space: where the status line may wrap inside a path
_PATH_BREAKS = re.compile(r"(?<!<)[/\\_](?!>)")  # not inside the rich text's </b> tags


class _FitFormWidth(QObject):
    """Keeps a vertical scroll area at least as wide as the form inside it.

    magicgui's scrollable container never scrolls sideways, and a scroll area asks for
    almost no width of its own, so napari could dock it narrower than its form: the
    right-hand side of every row (buttons, combo boxes, the status text) was cut off.
    Each time the form's layout changes (a longer model name, say), the scroll area's
    minimum width becomes the form's minimum width plus the vertical scroll bar's.
    """

    def __init__(self, scroll_area, form):
        super().__init__(scroll_area)
        self._scroll_area, self._form = scroll_area, form
        form.installEventFilter(self)
        self.fit()

    def fit(self) -> None:
        scroll_area = self._scroll_area
        extra = scroll_area.verticalScrollBar().sizeHint().width() + 2 * scroll_area.frameWidth()
        scroll_area.setMinimumWidth(self._form.minimumSizeHint().width() + extra)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show):
            self.fit()
        return False


class _CancelWhenClosed(QObject):
    """Cancels a dock's run when napari closes the dock. Closing a dock takes its
    widget out (``setParent(None)``) without destroying it, since the worker's
    connections keep it alive: the run went on, and a dock opened again could start a
    second one beside it, both writing to the same layers."""

    def __init__(self, widget: "BackgroundTaskWidget"):
        super().__init__(widget.native)
        self._widget = widget
        self._docked = widget.native.parent() is not None
        widget.native.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange:
            if watched.parent() is not None:
                self._docked = True
            elif self._docked and self._widget.is_running:
                self._widget.cancel()
        return False


def _unless_deleted(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` for a worker signal, quiet when the dock's Qt widgets are already
    deleted (the viewer closed during a run): the run itself has stopped by then."""

    def call(*args: Any) -> Any:
        try:
            return callback(*args)
        except RuntimeError as exc:
            if "has been deleted" not in str(exc):
                raise
            return None

    return call


class ImageLayerChoice:
    """A mixin for the docks that work on one image layer chosen in ``self._image_combo``:
    the choice as a public, settable property for scripts."""

    @property
    def image_layer(self) -> Any:
        """The image layer to work on (settable: a layer or its name)."""
        return self._image_combo.value

    @image_layer.setter
    def image_layer(self, layer: Any) -> None:
        self._image_combo.value = self._viewer.layers[layer] if isinstance(layer, str) else layer


class BackgroundTaskWidget(Container):
    """Base of the dock widgets that run one long computation at a time off the GUI thread.

    It owns the run controls (:meth:`_run_controls`: Run and Cancel buttons, progress
    bar, status line) and the worker: a subclass builds its inputs, puts
    ``self._run_controls()`` after them, and its ``run()`` calls :meth:`_start` with the
    computation (a closure over plain data read from the viewer beforehand), a
    progress handler and a result handler. Cancel stops the computation at its next
    progress report; Run stays disabled until the helper thread has really finished,
    so two runs never compete for the CPU (or an output folder). If the dock is
    destroyed mid-run, the computation is cancelled too.

    Subclasses set the texts below and implement ``run()``.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    run_text : str
        Text of the Run button.
    progress_label, progress_max : str, int
        Label and maximum of the progress bar (0 to ``progress_max``).
    status_lines : int
        Lines of text the status line reserves (0: its natural height). A wrapped label
        in a form layout does not ask for its height, so long messages need this.
    """

    #: Emitted once a run is over and Run is enabled again, with what it produced (the
    #: value the dock showed: an AnalysisResult, a SmearSegmentation, a BatchReport...),
    #: or None when it failed or was cancelled (:attr:`status` says which). For scripts:
    #: ``widget.run_finished.connect(callback)`` instead of polling :attr:`is_running`.
    run_finished = Signal(object)

    #: What a run does, for error messages ("napari-smear <task> failed: ...").
    task_name = "run"
    #: What a finished run shows, for "could not show the <result_name>" messages.
    result_name = "result"
    #: Status texts while cancelling, while the helper thread finishes its current
    #: step after a cancel (None: keep the cancelling text), and once cancelled.
    cancelling_text = "Cancelling…"
    waiting_text: str | None = "Cancelling: waiting for the current step to finish…"
    cancelled_text = "Cancelled."

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        *,
        run_text: str = "Run",
        progress_label: str = "progress",
        progress_max: int = 100,
        status_lines: int = 0,
    ):
        # scrollable: a dock taller than the screen (several docks, a long status) scrolls
        # instead of pushing its buttons and napari's status bar off the screen
        super().__init__(labels=True, scrollable=True)
        # a dock given more height than it needs keeps its rows at their own height and
        # leaves the rest empty below them (the scroll area would spread the rows apart)
        self.form.layout().addStretch(1)
        self._fit_width = _FitFormWidth(self.root_native_widget, self.form)
        self._viewer = napari_viewer
        self._run_button = PushButton(text=run_text)
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, min=0, max=progress_max, label=progress_label)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        if status_lines:
            self._status.native.setMinimumHeight(status_lines * self._status.native.fontMetrics().lineSpacing() + 4)
        self._worker = None
        self._confirm_pending: tuple[str, str] | None = None  # what a second press of Run goes on with
        self._cancel_event: threading.Event | None = None
        self._done_event: threading.Event | None = None
        self._started_event: threading.Event | None = None
        self._produced: Any = None  # what the current run showed, for run_finished
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        # If the dock is destroyed mid-run, stop the computation (no widget references:
        # the Python wrapper may be gone by then).
        state = self._abandon_state = {"cancel": None}
        self.native.destroyed.connect(lambda *_: state["cancel"] and state["cancel"].set())
        self._close_watch = _CancelWhenClosed(self)

    # ------------------------------------------------------------------ public API
    @property
    def native(self):
        """The Qt widget napari docks: the scroll area round the form (magicgui's
        ``native`` is the form inside it, which napari would dock without its scroll
        bars, so a dock taller than the screen pushed its buttons off it)."""
        return self.root_native_widget

    @property
    def form(self):
        """The Qt widget holding the form's layout, inside :attr:`native`."""
        return super().native

    @property
    def is_running(self) -> bool:
        """Whether a run (including one being cancelled) is still going."""
        return self._worker is not None or (self._done_event is not None and not self._done_event.is_set())

    @property
    def status(self) -> str:
        """The text of the status line."""
        return self._status.value.replace(_BREAK, "")

    def run(self) -> None:
        """Start a run with the widget's settings (no-op while a run is active)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Cancel the active run: it stops at its next progress report; its result is not shown.

        A run whose computation is already over is not cancelled: its result is on its
        way to the viewer (quitting the worker then dropped a finished result)."""
        if self._worker is not None and self._done_event is not None and self._done_event.is_set():
            return
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self._worker is not None:
            self._cancel_button.enabled = False
            self._set_status(self.cancelling_text)
            self._worker.quit()

    # ------------------------------------------------------------------ for subclasses
    def _run_controls(self) -> list:
        """The Run and Cancel buttons, the progress bar and the status line, in that order."""
        return [self._run_button, self._cancel_button, self._progress, self._status]

    def _follow_user_models(self) -> None:
        """Call ``self._on_user_models_changed`` whenever the session's model files change."""
        from napari_smear._napari.widgets import user_models

        user_models.changed.connect(self._on_user_models_changed)
        self.native.destroyed.connect(lambda *_, w=self: user_models.changed.disconnect(w._on_user_models_changed))

    def _start(
        self,
        compute: Callable[[Callable[[Any], None]], Any],
        *,
        status: str,
        on_progress: Callable[[Any], None],
        on_result: Callable[[Any], None],
        thread_name: str,
    ) -> None:
        """Run ``compute(report)`` in the background (see :func:`run_in_background`).

        ``on_progress(update)`` gets each ``report(update)`` on the GUI thread;
        ``on_result(result)`` gets what ``compute`` returned unless the run was cancelled
        (an exception it raises is reported as "could not show the result"). Errors of
        ``compute`` are reported by :meth:`_fail`.
        """
        self._cancel_event, self._done_event = threading.Event(), threading.Event()
        self._started_event = threading.Event()
        self._abandon_state["cancel"] = self._cancel_event
        worker = create_worker(
            run_in_background, compute, self._cancel_event, self._done_event, started=self._started_event,
            name=thread_name, _start_thread=False, _ignore_errors=True,  # errors go to _on_error
        )
        # a None update is the heartbeat
        worker.yielded.connect(_unless_deleted(lambda update: update is not None and on_progress(update)))
        worker.returned.connect(_unless_deleted(lambda result: self._on_returned(result, on_result)))
        worker.errored.connect(_unless_deleted(self._on_error))
        worker.finished.connect(_unless_deleted(self._on_finished))
        self._worker = worker
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        self._progress.value = 0
        self._set_status(status)
        worker.start()

    def _show_fraction(self, fraction: float) -> None:
        """Set the progress bar (0-100) to ``fraction`` of the work, clipped to [0, 1]."""
        self._progress.value = int(round(100 * min(max(fraction, 0.0), 1.0)))

    def _set_status(self, text: str) -> None:
        # a long path is one word to Qt's word wrap: the label's minimum width grew with
        # it and the dock with that (it could not be narrowed back); a zero-width space
        # after each path separator and underscore lets it wrap there
        self._status.value = _PATH_BREAKS.sub(lambda match: match.group(0) + _BREAK, text)

    def _image_was_removed(self, target: dict) -> bool:
        """Whether the image a run was for left the viewer while it ran; if so, says so
        (its results would sit over nothing, or over whatever image is there now)."""
        image_id = target.get("image_layer_id")
        if image_id is None or any(getattr(layer, "unique_id", None) == image_id for layer in self._viewer.layers):
            return False
        self._progress.value = 0
        self._set_status(
            f"{target.get('image_layer_name', 'The image')!r} was removed from the viewer during the run: "
            f"its {self.result_name} was not added. Open the image again and run again."
        )
        return True

    def _current_target(self, target: dict) -> dict:
        """``target`` (what a run captured when it started) with the image's name and
        placement as they are now: the image may have been renamed or moved while the
        run was on, and its results follow it (:func:`capture_geometry` was read at the
        start only because the worker never touches viewer objects). Result layers
        made for it before a rename take its new name first
        (:func:`~napari_smear._napari.layers.relink_renamed_image`); layers the run
        updates, captured by id (``<key>_id`` for ``<key>_name``), are named as they are
        now. Call after :meth:`_image_was_removed`."""
        from napari_smear._napari.layers import relink_renamed_image

        by_id = {getattr(layer, "unique_id", None): layer for layer in self._viewer.layers}
        current = dict(target)
        image = by_id.get(target.get("image_layer_id"))
        if image is not None:
            relink_renamed_image(self._viewer, image)
            current.update(image_layer_name=image.name, **capture_geometry(image))
        for key in [k[: -len("_id")] for k in target if k.endswith("_id") and k != "image_layer_id"]:
            layer = by_id.get(current.pop(f"{key}_id"))
            current[f"{key}_name"] = layer.name if layer is not None else None
        return current

    def _replacing_confirmed(self, cells_layer_name: str) -> bool:
        """Whether a run that writes new cells into ``cells_layer_name`` may start: not at
        the first press of Run when the layer holds classes set by hand (the run is
        declined with what would be lost), yes at a second press with nothing changed."""
        from napari_smear._napari.layers import hand_work_replaced

        loss = hand_work_replaced(self._viewer, cells_layer_name)
        if loss is None or self._confirm_pending == (cells_layer_name, loss):
            self._confirm_pending = None
            return True
        self._confirm_pending = (cells_layer_name, loss)
        self._decline(
            f"{loss[:1].upper()}{loss[1:]}. Save that layer first (File > Save Selected Layers, or Export selected in "
            "the Cell gallery), or press the button again to go on and replace them.",
            f"{loss}: press again to replace them",
        )
        return False

    def _decline(self, status: str, notice: str) -> None:
        """Explain why a run cannot start: in the status line and as a napari notice."""
        self._set_status(status)
        show_info(f"napari-smear: {notice}")

    def _show_notes(self, notes) -> None:
        """What the computation warned about the image (``params["warnings"]`` of a
        segmentation): added to the status line and shown as napari warnings. The run
        was on a helper thread, whose Python warnings napari does not show."""
        notes = [str(note) for note in (notes or ()) if note]
        if not notes:
            return
        self._set_status(self.status + "".join(f"\nWarning: {note}" for note in notes))
        for note in notes:
            show_warning(f"napari-smear: {note}")

    def _refuse(self, status: str, error: str) -> None:
        """Refuse an input (not a failed run): ``status`` in the status line, ``error`` as a
        napari error notification."""
        self._set_status(status)
        show_error(f"napari-smear: {error}")

    def _fail(self, message: str) -> None:
        self._set_status(f"Failed: {message}")
        show_error(f"napari-smear {self.task_name} failed: {message}")

    # ------------------------------------------------------------------ worker callbacks
    def _on_returned(self, result: Any, on_result: Callable[[Any], None]) -> None:
        if result is CANCELLED or result is None:
            self._set_status(self.cancelled_text)
            self._progress.value = 0  # not left part-way beside "Cancelled."
            return
        try:
            on_result(result)
            self._produced = result
        except Exception as exc:  # a malformed result must not kill the widget
            self._fail(f"could not show the {self.result_name}: {exc}")

    def _on_error(self, exc: BaseException) -> None:
        self._fail(str(exc) or type(exc).__name__)

    def _on_finished(self) -> None:
        self._worker = None
        self._cancel_button.enabled = False
        if self._done_event is not None and self._started_event is not None and not self._started_event.is_set():
            # cancelled before the worker ran anything: nothing is left to wait for (the
            # dock stayed busy for good, Run disabled, when Cancel followed Run at once)
            self._done_event.set()
        if self._done_event is not None and not self._done_event.is_set():
            # Cancelled: the helper thread stops at its next progress report. Keep Run
            # disabled until then, so two runs never compete for the CPU.
            if self.waiting_text:
                self._set_status(self.waiting_text)
            QTimer.singleShot(100, _unless_deleted(self._on_finished))
            return
        produced, self._produced = self._produced, None
        # a Cancel pressed as the run ended, after its result was shown: the result stands
        # (its status said "Cancelled" over the results it had just shown)
        if produced is None and self._cancel_event is not None and self._cancel_event.is_set():
            self._set_status(self.cancelled_text)
            self._progress.value = 0
        self._run_button.enabled = True
        self.run_finished.emit(produced)
