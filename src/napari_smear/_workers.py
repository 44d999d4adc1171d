"""Worker processes for CPU-bound work (tiles of a large image, images of a data set).

One policy for every process pool of the package: fork where it is safe, else a fork
server or spawn, and no pool at all where a spawned worker would run the caller's
unguarded script again.
"""
from __future__ import annotations


def _start_method() -> str:
    """How to start worker processes.

    A fork is instant and, unlike spawn, does not run the caller's script again in
    each worker (an unguarded script would otherwise fail); it is safe only from a
    process with no other threads. From a threaded program (napari's worker
    thread, Jupyter) the fork server starts workers instead.
    """
    import multiprocessing
    import threading

    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1 and threading.current_thread() is threading.main_thread():
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def process_pool(workers: int):
    """A process pool of ``workers`` processes, as a context manager; ``None`` inside it
    when the work should run in this process (one worker, or no safe way to start more)."""
    import contextlib

    method = _start_method()
    if workers <= 1 or (method != "fork" and not _main_is_importable()):
        return contextlib.nullcontext(None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context(method), initializer=_keep_freed_memory
    )


def _keep_freed_memory() -> None:
    """Let a worker's malloc reuse freed memory instead of handing it back to the system.

    A worker allocates and frees arrays of many megabytes per tile; glibc maps each
    one afresh and unmaps it when freed, so every tile pays the kernel again for
    zeroed pages: a quarter of the CPU time of a 100 MP image went to the kernel.
    Keeping freed memory (up to glibc's 32 MB limit for reusable blocks) took the
    workers' system time from 6.0 s to 2.3 s there. Only in the process pools of
    :func:`process_pool` (tiles, crop sets), not in the caller's process (napari keeps
    its allocator as it is) nor in Dask workers. A no-op where the C library is not
    glibc; never raises (an exception in a pool initializer would break the pool).
    """
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the C library this process already runs on
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: leave them be
            return
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # blocks up to 32 MB come from the reusable heap
        libc.mallopt(m_trim_threshold, 1 << 30)  # free memory is returned only above 1 GB of it
        libc.mallopt(m_top_pad, 64 * 1024 * 1024)  # grow the heap in steps of 64 MB
    except Exception:  # an optimisation only
        return


def _main_is_importable() -> bool:
    """Whether a fork-server or spawned worker may import the caller's main module.

    Such workers run the main script again; one without an ``if __name__ ==
    "__main__":`` guard would run its own work (and this call) a second time, so
    its tiles are segmented in this process instead. Interactive sessions and
    ``python -m`` modules have nothing to run again.
    """
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as source:
            text = source.read()
    except OSError:
        return False
    return "__name__" in text and "__main__" in text
