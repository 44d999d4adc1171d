"""Run a long synchronous computation off the GUI thread, with progress and cancel.

The library functions (``analyze``, ``train``) are synchronous and report progress
through a callback. :func:`run_in_background` runs one on a helper thread and yields
its reports one by one, so it can be handed to
:func:`napari.qt.threading.create_worker` as a generator worker: every yielded value
reaches the GUI thread through ``worker.yielded``, and the worker never touches the
viewer. Cancelling sets an event; the next progress report then raises
:class:`Cancelled` inside the computation, which is how it stops.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Cancelled", "CANCELLED", "run_in_background"]

# How often the generator wakes up when the computation reports nothing, so that
# ``worker.quit()`` (Cancel) is noticed promptly (seconds).
HEARTBEAT_S = 0.05


class Cancelled(Exception):
    """Raised inside a progress callback to stop a computation the user cancelled."""


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
    if error is not None:
        raise error
    return outcome["result"]
