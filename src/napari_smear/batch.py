"""Folder runs: every image of a folder tree analysed, outputs written atomically, resumable.

Two runners share the input expansion and the output layout:

- :func:`segment_files`: segmentation only (``napari-smear segment``).
- :func:`analyze_files`: segmentation, classification and attention maps
  (``napari-smear analyze`` and the "Batch analyze folder" widget).

How :func:`analyze_files` is organised, and why:

- **Stages where they are cheapest.** Decoding, segmentation, morphology and cropping
  (stage 1 of :mod:`napari_smear.pipeline`) run as tasks on CPU worker processes of a
  Dask cluster (or in this process); the crops come back to this process, where
  :class:`~napari_smear.pipeline.StreamingClassifier` classifies the crops of several
  images together in large fixed-size batches on the models' device; the outputs go
  back to the worker that holds the segmentation, which pastes the attention maps and
  writes the files (stage 3).
- **Nothing lost.** Every file is written under a temporary name and renamed into
  place, and each image's completion marker ``<stem>_done.json`` (flushed to disk with
  :func:`napari_smear.io.atomic_write`) is written last, with the size of every output.
  A run skips images whose marker matches the input file, the settings and the outputs
  on disk, and redoes the others; a run killed at any moment and
  started again ends with the same files as a run never interrupted: per-image files
  hold no timestamps, classification does not depend on batch composition, and
  ``summary.csv``, ``summary_whole_cells.csv`` and ``summary_by_folder.csv`` are rebuilt
  from the markers at the end.
- **Bad files do not stop a batch.** A file that cannot be read or analysed goes to
  ``errors.csv`` with its reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .colors import CELL_TYPE_RGB, class_palette_rgb

__all__ = [
    "OUTPUT_SUFFIXES",
    "MARKER_SUFFIX",
    "BatchReport",
    "analyze_files",
    "analysed_input_paths",
    "expand_inputs",
    "load_result",
    "local_cluster",
    "output_stem",
    "render_overlay",
    "segment_files",
]

#: Per-image outputs of :func:`analyze_files`: ``<stem><suffix>``.
OUTPUT_SUFFIXES = {
    "labels": "_labels.tif",
    "nuclei": "_nuclei.tif",
    "attention": "_attention.tif",
    "cells": "_cells.csv",
    "overlay": "_overlay.png",
}
#: Written last for each image: its presence means every output above is complete.
MARKER_SUFFIX = "_done.json"
MARKER_FORMAT = 1
#: Version of the per-image outputs for the same inputs, models and settings, part of the
#: resume fingerprint: raised whenever the code changes what an image's files hold, so
#: that a re-run redoes images finished by older code (the package version alone did not
#: move with such changes). 2: platelet clumps re-typed (``segmented_type`` column),
#: ``platelet_from_wbc`` and ``<model>_median_confidence`` in the summary. 3: burned-in
#: green annotations painted out before segmentation, ``overlay_share`` in the summary.
#: 4: a missing nucleus's colour and circularity empty in the cell table (were 0),
#: differential percentages with two decimals. 5: a file's recorded pixel size checked
#: against the red cells (a contradicted calibration ignored), stray pixel values of
#: 16-bit and float images clipped, overlay legends in DejaVu Sans.
OUTPUT_VERSION = 5

#: The overlay PNG's "Software" text chunk, by which a re-run knows the file is ours.
OVERLAY_SOFTWARE = "napari-smear"
#: The QC overlay is drawn at most this many pixels on its longer side.
OVERLAY_MAX_SIDE = 2048
# Names io.atomic_write gives its temporary files: ".<final name>.<12 hex>.tmp".
_TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_LOCK_NAME = ".napari-smear.lock"


# ----------------------------------------------------------------------------- inputs


def expand_inputs(
    inputs: Iterable[str | Path], pattern: str = "*", *, exclude: str | Path | None = None
) -> list[tuple[Path, Path]]:
    """Files given directly or found recursively in folders, with their folder-relative path.

    Parameters
    ----------
    inputs : iterable of path
        Image files (kept whatever their type, so that a wrong file is reported) and
        folders (searched recursively for supported image files).
    pattern : str
        Glob matched against file names inside folders (e.g. ``"*.jpg"``).
    exclude : path, optional
        A folder whose files are never taken from a folder search (the output folder,
        when it lies inside an input folder). When it *is* an input folder, the files
        named like this package's outputs (``*_labels.tif``, ``*_overlay.png``, ...)
        are skipped instead, so a re-run does not analyse its own outputs. Hidden files
        and folders are skipped too. A file reached twice (given directly and inside a
        folder, or through two spellings of one folder) is taken once.

    Returns
    -------
    list of (path, relative path)
        The relative path mirrors sub-folders in the output.
    """
    from .io import is_supported_path, search_folder

    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()

    def take(f: Path, relative: Path) -> None:
        real = f.resolve()
        if real not in seen:
            seen.add(real)
            found.append((f, relative))

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            root = p.resolve()
            skip_here = skip if skip is not None and skip != root and skip.is_relative_to(root) else None
            outputs_here = skip is not None and root.is_relative_to(skip)  # writing into this folder
            for f in search_folder(p, pattern):
                relative = f.relative_to(p)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if not (f.is_file() and is_supported_path(f)):
                    continue
                if skip_here is not None and f.resolve().is_relative_to(skip_here):
                    continue
                if is_output_name(f.name) and (outputs_here or _written_by_us(f)):
                    continue
                take(f, relative)
        elif p.is_file():
            take(p, Path(p.name))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return found


def no_images_message(inputs: Iterable[str | Path], pattern: str = "*") -> str:
    """What to say when ``inputs`` hold no image to work on: with the other files the
    folders do hold (a .gif, a .webp: formats napari-smear does not read) and the
    formats it reads."""
    from .io import SUPPORTED_SUFFIXES, is_supported_path, search_folder

    others: list[Path] = []
    for item in inputs:
        if Path(item).is_dir():
            others += [f for f in search_folder(Path(item), pattern) if f.is_file()
                       and not f.name.startswith(".") and not is_supported_path(f)]
    message = f"no image files found in {', '.join(str(p) for p in inputs)}"
    if pattern != "*":
        message += f" matching {pattern!r}"
    if others:
        shown = ", ".join(f.name for f in others[:3]) + (", ..." if len(others) > 3 else "")
        message += (f"; {len(others)} other file(s) were passed over ({shown}): napari-smear reads "
                    f"{', '.join(sorted(set(SUPPORTED_SUFFIXES) - {'.ome.tif', '.ome.tiff'}))}")
    return message


def _written_by_us(path: Path) -> bool:
    """Whether a file named like one of our outputs is one: its image's completion
    marker lies beside it (an `analyze` folder), or it is a TIFF carrying our metadata
    (a `segment` folder). A folder of earlier outputs given as input then does not have
    its label images analysed as smear fields."""
    name = path.name
    if name.endswith(GALLERY_SUFFIX):
        return _is_our_picture(path)
    ending = _output_ending(name)
    if ending is None:
        return False
    if path.with_name(name[: len(name) - len(ending)] + MARKER_SUFFIX).is_file():
        return True
    return name.lower().endswith((".tif", ".tiff")) and _tiff_has_our_metadata(path)


def _tiff_has_our_metadata(path: Path) -> bool:
    """Whether a TIFF carries the metadata napari-smear writes (False when unreadable:
    left to the run, which says why)."""
    try:
        import tifffile

        from .io import _napari_smear_description

        with tifffile.TiffFile(path) as tif:
            return _napari_smear_description(tif.pages[0].description) is not None
    except Exception:
        return False


def _output_ending(name: str) -> str | None:
    """The ending (``_labels.tif``, ``_overlay.png``, ...) by which a file name is one of
    an image's outputs, or None."""
    return next((suffix for suffix in OUTPUT_SUFFIXES.values() if name.endswith(suffix)), None)


#: Ending of the per-folder gallery pictures (:func:`napari_smear.gallery.batch_galleries`,
#: ``<folder>_gallery.png``): a re-run whose output folder is also its input folder
#: knows them as outputs, not smear images.
GALLERY_SUFFIX = "_gallery.png"


def _is_our_picture(path: Path) -> bool:
    """Whether a PNG carries the "Software" text chunk our overlays and galleries get."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.info.get("Software") == OVERLAY_SOFTWARE
    except Exception:
        return False


#: The files a run writes once, in the output folder itself.
RUN_FILES = ("summary.csv", "summary_whole_cells.csv", "summary_by_folder.csv", "errors.csv", "run.json")


def _is_our_marker(value) -> bool:
    """Whether parsed JSON is one of our completion markers."""
    return isinstance(value, dict) and {"format", "settings", "outputs"} <= set(value)


def _is_our_run_record(value) -> bool:
    """Whether parsed JSON is a ``run.json`` napari-smear wrote."""
    return isinstance(value, dict) and "napari_smear" in (value.get("versions") or {})


def _folder_of(path: str) -> str:
    """The folder an input image lies in, as found: what summary_by_folder.csv and the
    run's unsure-model warnings are given per."""
    return str(Path(path).parent)


def _is_ours(path: Path, kind: str) -> bool:
    """Whether the file at ``path``, named as our output of ``kind`` (an
    ``OUTPUT_SUFFIXES`` key, ``"marker"`` or a ``RUN_FILES`` name), was written by
    napari-smear, judged by its content: our TIFF metadata, our CSV header, our
    overlay's text chunk, our JSON keys. An unreadable file is not."""
    if kind in ("labels", "nuclei", "attention"):
        return _tiff_has_our_metadata(path)
    try:
        if kind == "overlay":
            return _is_our_picture(path)
        if kind in ("marker", "run.json"):
            value = json.loads(path.read_text(encoding="utf-8"))
            return _is_our_marker(value) if kind == "marker" else _is_our_run_record(value)
        with open(path, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\r\n")
        if kind == "cells":
            return header.startswith("label,cell_type,")
        if kind == "errors.csv":
            return header == "file,error"
        if kind == "summary_by_folder.csv":
            return header.startswith("folder,images,")
        return header.startswith("image,path,")  # summary.csv and summary_whole_cells.csv
    except Exception:
        return False


def _foreign_outputs(job: "_Job", kinds=(*OUTPUT_SUFFIXES, "marker")) -> list[Path]:
    """The files at ``job``'s output names that napari-smear did not write (a user's
    own ``<stem>_cells.csv`` beside the images, say): listed by no marker of ours and
    not ours by their content (:func:`_is_ours`). Writing over them would lose them."""
    marker = job.marker
    listed: set[str] = set()
    our_marker = False
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
            value = json.loads(marker.read_text(encoding="utf-8"))  # read once: ours, and what it lists
            our_marker = _is_our_marker(value)
            if our_marker:
                listed = {entry["file"] for entry in value["outputs"].values()}
    foreign = [path for path, kind in ((job.output(kind), kind) for kind in kinds if kind != "marker")
               if path.is_file() and path.name not in listed and not _is_ours(path, kind)]
    if "marker" in kinds and marker.is_file() and not our_marker:
        foreign.append(marker)
    return foreign


def _foreign_output_reason(paths: Sequence[Path]) -> str:
    names = ", ".join(path.name for path in paths)
    is_, was, it = ("is", "was", "it") if len(paths) == 1 else ("are", "were", "them")
    return (f"{names} {is_} in the way of this image's outputs and {was} not written by napari-smear: move {it} "
            "away (or choose another output folder) and run again; nothing was written over")


def _check_run_files(out: Path, names=RUN_FILES) -> None:
    """Refuse an output folder holding a file of a run-level output name (``summary.csv``,
    ...) that napari-smear did not write, before any work: it would be written over."""
    foreign = [out / name for name in names if (out / name).is_file() and not _is_ours(out / name, name)]
    if foreign:
        names_text = ", ".join(path.name for path in foreign)
        raise ValueError(f"{out} holds {names_text}, not written by napari-smear, which this run would write over: "
                         "move it away or choose another output folder")


def is_output_name(name: str) -> bool:
    """Whether a file name is one this package writes next to an image's outputs
    (``<stem>_labels.tif``, ``<stem>_overlay.png``, ...) or beside them (a folder's
    ``<folder>_gallery.png``)."""
    return _output_ending(name) is not None or name.endswith(GALLERY_SUFFIX)


def _check_pixel_size(pixel_size_um, working_diameter_px=None) -> None:
    """Checked before any image is read (each would fail on its own otherwise)."""
    from .segment import _check_positive, check_working_diameter

    _check_positive("pixel_size_um", pixel_size_um)
    check_working_diameter(working_diameter_px)


def _working_diameter_setting(working_diameter_px) -> float | None:
    """None for the default resolution, however it was given (24 or None): the runs made
    before it could be chosen, and runs that name the default, share one fingerprint."""
    from .segment import DEFAULT_WORKING_DIAMETER_PX

    if working_diameter_px is None or float(working_diameter_px) == DEFAULT_WORKING_DIAMETER_PX:
        return None
    return float(working_diameter_px)


def _check_inputs_exist(inputs) -> None:
    """Before the output folder is made: a missing input is a FileNotFoundError."""
    for item in inputs:
        if not Path(item).exists():
            raise FileNotFoundError(f"input not found: {item}")


def _check_output_path(path: str | Path) -> Path:
    """The output folder's path; a ValueError when it or one of its parents is a file."""
    out = Path(path)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            what = "is a file" if folder == out else f"lies inside {folder}, which is a file"
            raise ValueError(f"the output folder {out} {what}: choose a folder")
    return out


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output folder (and its parents); a clear ValueError, before any work,
    when that cannot be done: the path or one of its parents is a file, or the folder
    cannot be created or written to."""
    out = _check_output_path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to the output folder {out} (permission denied)")
    return out


def output_stem(out_dir: Path, relative: Path) -> Path:
    from .io import file_stem

    return out_dir / relative.parent / file_stem(relative)


# ----------------------------------------------------------------------------- segment only


def segment_files(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    pixel_size_um: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    working_diameter_px: float | None = None,
    on_disk: bool | None = None,
    image_progress: Callable[[float, str], None] | None = None,
) -> pd.DataFrame:
    """Segment every image; per image write ``<stem>_labels.tif``, ``<stem>_nuclei.tif``
    and ``<stem>_cells.csv``. A file that cannot be read or segmented is recorded with
    its reason (``errors.csv``) and the run carries on.

    ``working_diameter_px``: the segmentation's working resolution (see
    :func:`napari_smear.segment_smear`; default its own). ``on_disk``: segment TIFFs
    through memory-mapped files, for slides larger than memory (the image, decoded once
    when compressed, and the two label images live in a scratch folder inside
    ``out_dir`` while the image is segmented, 11 bytes a pixel; see
    :func:`segment_file_on_disk`); True for every TIFF, False never, None (default) for
    a TIFF whose image and label images would fill more than half the memory
    available. Returns one row per image: path, counts per cell type,
    rbc_diameter_px, seconds, on_disk, error. ``image_progress(fraction, message)``:
    how far the current image is (the segmentation's own reports: tiles of a large
    image); raise inside it to cancel.
    """
    from .io import read_image, write_csv_atomic
    from .segment import segment_smear

    _check_pixel_size(pixel_size_um, working_diameter_px)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    _check_inputs_exist(inputs)
    new_output_dir = not Path(out_dir).exists()
    out = prepare_output_dir(out_dir)
    with _exclusive(out):
        _check_run_files(out, ("errors.csv",))
        jobs, failures = _plan([Path(p) for p in inputs], out, "*")
        if not jobs and not failures:
            _remove_unused_output_dir(out, new_output_dir)
            raise ValueError(no_images_message(inputs, "*"))
        rows = [{"path": f.job.path, "error": f.reason} for f in failures]
        errors = [{"file": f.job.path, "error": f.reason} for f in failures]
        for i, job in enumerate(jobs):
            if progress:
                progress(i, len(jobs), job.path)
            t0 = time.perf_counter()
            foreign = _foreign_outputs(job, ("labels", "nuclei", "cells"))
            if foreign:  # a user's file where an output goes: the image fails, the file stays
                reason = _foreign_output_reason(foreign)
                errors.append({"file": job.path, "error": reason})
                rows.append({"path": job.path, "error": reason})
                continue
            try:
                disk = _segment_on_disk(job.path, on_disk)
                Path(job.stem).parent.mkdir(parents=True, exist_ok=True)
                if disk:
                    seg = segment_file_on_disk(job, out, pixel_size_um, working_diameter_px, image_progress)
                else:
                    _check_memory(job.path, _BYTES_PER_PIXEL_SEGMENTED, "segmenting", "napari-smear segment --on-disk")
                    image, meta = read_image(job.path)
                    with _own_warnings_held_back():
                        seg = segment_smear(image, pixel_size_um=pixel_size_um,
                                            recorded_pixel_size_um=meta.get("pixel_size_um"),
                                            working_diameter_px=working_diameter_px, progress=image_progress)
                    # the pixel size the segmentation used: a file's calibration it found wrong is not copied on
                    _write_segmentation_tiffs(job, seg, seg.pixel_size_um)  # as analyze writes them
                _warn_about(job.relative, _image_notes(seg))
                write_csv_atomic(job.output("cells"), seg.table)
                rows.append({"path": job.path, **seg.counts(), "rbc_diameter_px": seg.rbc_diameter_px,
                             "seconds": time.perf_counter() - t0, "on_disk": disk, "error": ""})
                del seg
            except Exception as exc:  # one bad file must not stop a batch: record why
                reason = f"{type(exc).__name__}: {exc}"
                errors.append({"file": job.path, "error": reason})
                rows.append({"path": job.path, "error": reason})
        if progress:
            progress(len(jobs), len(jobs), "done")
        # this run's failures only (none: an empty table, not an earlier run's list)
        write_csv_atomic(out / "errors.csv", pd.DataFrame(errors, columns=["file", "error"]))
    return pd.DataFrame(rows)


# Bytes a pixel takes while it is segmented: the RGB image and two uint32 label images.
_BYTES_PER_PIXEL_SEGMENTED = 3 + 4 + 4


def _available_memory_bytes() -> int | None:
    """Memory available to new allocations (Linux ``MemAvailable``), else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _segment_on_disk(path: str | Path, on_disk: bool | None) -> bool:
    """Whether ``segment_files`` segments ``path`` through memory-mapped files (see
    :func:`_through_disk`; its image and two label images: 11 bytes a pixel)."""
    return _through_disk(path, on_disk, _BYTES_PER_PIXEL_SEGMENTED)


def _through_disk(path: str | Path, on_disk: bool | None, bytes_per_pixel: float) -> bool:
    """Whether ``path`` goes through memory-mapped files: always when asked
    (``open_image_on_disk`` then says why a file cannot be), never for a file that is
    not a TIFF, and by default when the file can be and ``bytes_per_pixel`` of its
    pixels would fill more than half the memory available (a TIFF that cannot be
    mapped is read in memory as before: ``read_image`` converts other layouts)."""
    from .io import on_disk_size

    if on_disk is False or not str(path).lower().endswith((".tif", ".tiff")):
        return False
    if on_disk:
        return True
    size = on_disk_size(path)
    available = _available_memory_bytes()
    if size is None or available is None:
        return False
    return size[0] * size[1] * bytes_per_pixel > available // 2


def segment_file_on_disk(job, out_dir: Path, pixel_size_um: float | None, working_diameter_px: float | None,
                         progress: Callable[[float, str], None] | None = None):
    """Segment one TIFF through memory-mapped files and write its label TIFFs (tiled,
    compressed: read back like the others); the slide never has to fit in memory.

    The image (decoded once when compressed) and the two label images live in a
    scratch folder inside ``out_dir`` (``.scratch-*``, removed afterwards, also on
    failure). Returns the segmentation with empty (0 x 0) label images: they are in
    the TIFFs written; its table, scale and notes are whole.
    """
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".scratch-") as scratch:
        image, pixel_size, seg, _ = _segment_into_scratch(job, scratch, pixel_size_um, working_diameter_px, progress)
        _write_segmentation_tiffs(job, seg, pixel_size)
        # the maps must be closed before their files are removed (Windows); numpy
        # closes a map when the last array on it goes
        nothing = np.zeros((0, 0), np.uint32)
        result = replace(seg, labels=nothing, nuclei=nothing)
        del image, seg
    return result


def _segment_into_scratch(job, scratch: str | Path, pixel_size_um: float | None,
                          working_diameter_px: float | None, progress=None):
    """Open ``job``'s TIFF on disk (decoded into ``scratch`` when compressed) and segment
    it into two label images memory-mapped there. Returns ``(image, pixel size used,
    segmentation, timings)``; the maps close when the image and segmentation go."""
    from .io import open_image_on_disk
    from .segment import segment_smear

    started = time.perf_counter()
    image, meta = open_image_on_disk(job.path, scratch)
    timings = {"decode": time.perf_counter() - started}
    shape = image.shape[:2]
    labels = np.memmap(Path(scratch) / "labels.u32", np.uint32, "w+", shape=shape)
    nuclei = np.memmap(Path(scratch) / "nuclei.u32", np.uint32, "w+", shape=shape)
    started = time.perf_counter()
    with _own_warnings_held_back():
        seg = segment_smear(image, pixel_size_um=pixel_size_um, recorded_pixel_size_um=meta.get("pixel_size_um"),
                            working_diameter_px=working_diameter_px, out=(labels, nuclei), progress=progress)
    timings["segment"] = time.perf_counter() - started
    return image, seg.pixel_size_um, seg, timings


# ----------------------------------------------------------------------------- analyze: types


@dataclass(frozen=True)
class _Job:
    """One input image and where its outputs go."""

    index: int
    path: str  # as found (for errors.csv and summary.csv)
    relative: str  # posix path relative to its input folder: mirrored under OUT_DIR
    stem: str  # output stem: OUT_DIR/<relative folder>/<file stem>
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return self.stem

    def output(self, kind: str) -> Path:
        return Path(self.stem + OUTPUT_SUFFIXES[kind])

    @property
    def marker(self) -> Path:
        return Path(self.stem + MARKER_SUFFIX)


@dataclass(frozen=True)
class _Settings:
    """What the worker tasks need to know (picklable: no models, no callables)."""

    specs: tuple
    pixel_size_um: float | None
    morphology: bool
    overlay_max_side: int
    fingerprint: dict
    worker_threads: int | None = None
    working_diameter_px: float | None = None
    # where the classifiers ran (device, autocast dtype, batch size): recorded in each
    # marker, not part of the fingerprint (another device changes the last bits only)
    ran_on: dict | None = None


@dataclass
class _Prepared:
    job: _Job
    prepared: Any  # pipeline.PreparedField
    pixel_size_um: float | None
    timings: dict
    notes: tuple[str, ...] = ()  # napari-smear's warnings about this image


@dataclass
class _Finished:
    job: _Job
    summary: dict
    timings: dict
    notes: tuple[str, ...] = ()


@dataclass
class _Failed:
    job: _Job
    reason: str


class _ProgressInterrupt(Exception):
    """Carries an exception raised by the caller's progress hook out of a task."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


@dataclass
class BatchReport:
    """What :func:`analyze_files` did.

    Attributes
    ----------
    out_dir : pathlib.Path
    summary : pandas.DataFrame
        ``summary.csv``: one row per image of this run's inputs with a finished result
        (analysed now or by an earlier run).
    errors : pandas.DataFrame
        ``errors.csv``: ``file, error`` for every image that failed in this run.
    total, analysed, skipped, failed : int
        Images found; analysed now; skipped because an earlier run finished them;
        failed.
    models : list of str
        Models that classified cells.
    missing_models : list of str
        Built-in models that were wanted but are not installed (their cells are
        segmented, not classified).
    run : dict
        The content of ``run.json`` (versions, models, settings, timings).
    summary_whole_cells : pandas.DataFrame
        ``summary_whole_cells.csv``: as ``summary``, counting only the cells the image
        edge does not cut (the neighbouring field of a slide shows those whole).
    summary_by_folder : pandas.DataFrame
        ``summary_by_folder.csv``: the whole cells of the images of each folder added up,
        with the differential percentages of the folder (:func:`folder_summary`).
    """

    out_dir: Path
    summary: pd.DataFrame
    errors: pd.DataFrame
    total: int
    analysed: int
    skipped: int
    failed: int
    models: list = field(default_factory=list)
    missing_models: list = field(default_factory=list)
    run: dict = field(default_factory=dict)
    summary_whole_cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    summary_by_folder: pd.DataFrame = field(default_factory=pd.DataFrame)


# ----------------------------------------------------------------------------- analyze: worker tasks
# Module-level functions: Dask ships them to worker processes by reference.


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _prepare_job(job: _Job, settings: _Settings, progress=None):
    """Stage 1 on a worker: decode, segment, measure, crop. Never raises for a bad file."""
    from .io import read_image
    from .pipeline import prepare_field

    def report(fraction, message):
        try:
            progress(fraction, message)
        except BaseException as exc:
            raise _ProgressInterrupt(exc) from exc

    try:
        if settings.worker_threads:
            _limit_torch_threads(settings.worker_threads)
        _check_memory(job.path, _ANALYSIS_BYTES_PER_PIXEL, "analysing", "napari-smear analyze --on-disk")
        started = time.perf_counter()
        image, meta = read_image(job.path)
        decode = time.perf_counter() - started
        # napari-smear's warnings about the image (grayscale, too few cells to trust the
        # ruler, a file calibration the red cells contradict, ...) are kept with it: a
        # worker process would print them with no file name, and summary.csv records them
        with _own_warnings_held_back():
            prepared = prepare_field(
                image, settings.specs, pixel_size_um=settings.pixel_size_um,
                recorded_pixel_size_um=meta.get("pixel_size_um"), morphology=settings.morphology,
                segment_threads=settings.worker_threads, progress=report if progress else None,
                working_diameter_px=settings.working_diameter_px,
            )
        notes = _image_notes(prepared.segmentation)
    except _ProgressInterrupt:
        raise
    except Exception as exc:  # a bad file is recorded with its reason, never raised
        return _Failed(job, _reason(exc))
    return _Prepared(job, prepared, prepared.segmentation.pixel_size_um, {"decode": decode, **prepared.timings},
                     notes)


# Peak memory of the full analysis per image pixel (both built-in models): the image,
# its label images, the stain-normalised copy, the attention maps and the crops. Peak
# RSS of `napari-smear analyze` on mosaics of Chula fields (session 13): 0.45 GB at
# 1 MP, 1.50 GB at 25 MP, 3.91 GB at 100 MP, i.e. about 40 bytes a pixel all told.
_ANALYSIS_BYTES_PER_PIXEL = 40


def _analyze_on_disk(path: str | Path, on_disk: bool | None) -> bool:
    """Whether ``analyze_files`` analyses ``path`` region by region through
    memory-mapped files (:func:`analyze_file_on_disk`; see :func:`_through_disk`, with
    what analysing it in memory takes: about 40 bytes a pixel)."""
    return _through_disk(path, on_disk, _ANALYSIS_BYTES_PER_PIXEL)


def analyze_file_on_disk(job: "_Job", out_dir: Path, settings: "_Settings", loaded: Sequence, *, device,
                         batch_size: int, amp: bool, prior_correction: float | None,
                         progress: Callable[[float, str], None] | None = None,
                         test_time_views: int | None = None, sure_at: float | None = None) -> "_Finished":
    """Analyse one TIFF larger than memory and write its outputs, as the other images'.

    The image (decoded once when compressed), its two label images and one attention
    map per model live as memory-mapped files in a scratch folder inside ``out_dir``
    (``.scratch-*``, removed afterwards, also on failure: 3 + 8 + 4 bytes a pixel per
    model on disk); the cells are measured, cropped and classified region by region
    (:func:`napari_smear.pipeline.analyze_by_region`), and the TIFFs are written tile by
    tile. The outputs are those an analysis in memory gives.
    """
    import tempfile

    from .pipeline import analyze_by_region

    report = progress or (lambda fraction, message: None)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".scratch-") as scratch:
        image, pixel_size, seg, timings = _segment_into_scratch(
            job, scratch, settings.pixel_size_um, settings.working_diameter_px, lambda f, m: report(0.4 * f, m),
        )
        attention = {spec.name: np.memmap(Path(scratch) / f"attention-{k}.f32", np.float32, "w+",
                                          shape=image.shape[:2])
                     for k, spec in enumerate(settings.specs)}
        with _own_warnings_held_back():
            started = time.perf_counter()
            result = analyze_by_region(
                image, models=loaded, device=device, batch_size=batch_size, amp=amp, segmentation=seg,
                morphology=settings.morphology, progress=report, prior_correction=prior_correction,
                attention_out=attention, test_time_views=test_time_views, sure_at=sure_at,
                warn=False,  # the batch says the models' notes per folder of images
            )
            timings["regions"] = time.perf_counter() - started
        notes = _image_notes(seg)
        report(1.0, "writing the results")
        started = time.perf_counter()
        summary = _write_outputs(job, result, image, pixel_size, settings, notes)
        timings["write"] = time.perf_counter() - started
        # the maps must be closed before their files are removed (Windows); numpy
        # closes a map when the last array on it goes
        del image, attention, seg, result
    return _Finished(job, summary, timings, notes)


def _check_memory(path, bytes_per_pixel: float, what: str, command: str) -> None:
    """Refuse, with the figures, an image the analysis (or the segmentation alone) would
    need more memory for than is available: the batch records it and carries on, where
    the system would otherwise kill the whole run part-way through."""
    from .io import stored_image_size

    size = stored_image_size(path)
    available = _available_memory_bytes()
    if size is None or available is None:
        return
    needed = size[0] * size[1] * bytes_per_pixel
    if needed > available:
        raise MemoryError(
            f"{what} this {size[0]} x {size[1]} image needs about {needed / 2**30:.1f} GB of memory and "
            f"{available / 2**30:.1f} GB is available; save it as a TIFF (8-bit RGB), which is processed "
            f"region by region through memory-mapped files (`{command}`)"
        )


def _image_notes(segmentation) -> tuple[str, ...]:
    """What the segmentation warned about the image (``params["warnings"]``), except
    that it is empty: a field with no cells is a result like any other."""
    return tuple(note for note in segmentation.params.get("warnings", ())
                 if not note.startswith("no stained cells"))


def _warn_about(image: str, notes) -> None:
    """Issue the warnings about ``image`` again, each with its name."""
    for note in notes:
        warnings.warn(f"{image}: {note}", UserWarning, stacklevel=3)


@contextlib.contextmanager
def _own_warnings_held_back():
    """Keep napari-smear's own warnings from being printed without the image's name
    (the caller shows them with it, from the result); others pass as usual.

    ``warnings.catch_warnings`` changes the process's warning state, so it is used on
    the main thread only (the command line); on a widget's helper thread the library's
    warnings print as they are, and the widget shows the result's notes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for record in caught:
        if not (record.filename.startswith(_PACKAGE_DIR) and issubclass(record.category, UserWarning)):
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _crop_pixels(item):
    """What the classifier needs of a prepared field (travels to the client): its crops
    per model and its pixel count."""
    if isinstance(item, _Failed):
        return item
    return item.prepared.crop_pixels(), int(item.prepared.segmentation.labels.size)


def _without_crop_pixels(item):
    """The prepared field minus its crop pixels (stays on the worker until finished)."""
    if isinstance(item, _Failed):
        return item
    return replace(item, prepared=item.prepared.without_crop_pixels())


def _finish_job(item: _Prepared, outputs: dict, settings: _Settings):
    """Stage 3 on a worker: assemble the result, write every output, then the marker."""
    from .pipeline import finish_field

    try:
        started = time.perf_counter()
        result = finish_field(item.prepared, settings.specs, outputs)
        assembled = time.perf_counter()
        summary = _write_outputs(item.job, result, item.prepared.rgb, item.pixel_size_um, settings, item.notes)
        written = time.perf_counter()
    except Exception as exc:  # e.g. a full disk: recorded, and the image is redone next run
        return _Failed(item.job, _reason(exc))
    timings = {**item.timings, "assemble": assembled - started, "write": written - assembled}
    return _Finished(item.job, summary, timings, item.notes)


def _limit_torch_threads(threads: int) -> None:
    """One Dask worker thread, one torch thread (segmentation resizes with torch)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- analyze: outputs


def _write_outputs(job: _Job, result, rgb: np.ndarray, pixel_size_um, settings: _Settings,
                   notes: Sequence[str] = ()) -> dict:
    """Write one image's outputs, each renamed into place, then its marker; return its summary row.

    The outputs are written under temporary names and renamed (a reader, or a run
    killed half-way, never sees a partial file); the marker, written last, is flushed to
    disk and records each output's size, so a marker is trusted only when every file it
    lists is complete. (Flushing each output as well, as ``io.atomic_write`` does, cost
    about 50 ms per image here and guards only against power loss, which the size check
    already catches.)
    """
    from .io import atomic_write
    from .pipeline import unsure_counts

    stem = Path(job.stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    job.marker.unlink(missing_ok=True)  # no marker may vouch for files being replaced
    seg = result.segmentation
    pixel_size = float(pixel_size_um) if pixel_size_um else None
    written, common = _write_segmentation_tiffs(job, seg, pixel_size)
    names = [spec.name for spec in settings.specs]
    if names:
        written["attention"] = _write_tiff(  # one float32 page per model
            job.output("attention"), [result.attention[name] for name in names], pixel_size,
            {**common, "kind": "attention", "models": names, "name": f"{stem.name} attention"},
        )
    with _renamed_into_place(job.output("cells"), "w") as handle:
        cells_table(result.table, settings.specs).to_csv(handle, index=False, lineterminator="\n",
                                                         float_format="%.6g")
    written["cells"] = job.output("cells")
    overlay = render_overlay(rgb, seg.labels, result.table, settings.specs, max_side=settings.overlay_max_side)
    with _renamed_into_place(job.output("overlay"), "wb") as handle:
        # zlib level 1: a tenth of the default level's time, files about 20% larger
        from PIL.PngImagePlugin import PngInfo

        text = PngInfo()
        text.add_text("Software", OVERLAY_SOFTWARE)  # known as ours by a later run
        _pil_image(overlay).save(handle, format="PNG", compress_level=1, pnginfo=text)
    written["overlay"] = job.output("overlay")
    for kind in OUTPUT_SUFFIXES:  # e.g. an attention file from an earlier run with models
        if kind not in written:
            job.output(kind).unlink(missing_ok=True)

    summary = {**_summary_row(job, result, settings.specs), "warnings": "; ".join(notes)}
    whole_cells = {**_summary_row(job, result, settings.specs, include_edge_cells=False),
                   "warnings": summary["warnings"]}
    marker = {
        "format": MARKER_FORMAT,
        "image": job.relative,
        "input": {"bytes": job.size, "mtime_ns": job.mtime_ns},
        "settings": settings.fingerprint,
        "ran_on": settings.ran_on,
        "outputs": {kind: {"file": path.name, "bytes": path.stat().st_size} for kind, path in written.items()},
        "summary": summary,
        "summary_whole_cells": whole_cells,
        # for run.json's warning about a model unsure of most cells, over every finished image
        "unsure": unsure_counts(result.table),
    }
    with atomic_write(job.marker, "w") as handle:  # flushed to disk, with its directory
        handle.write(_json_text(marker))
    return summary


@contextlib.contextmanager
def _renamed_into_place(path: Path, mode: str):
    """Write to a temporary name beside ``path``, then rename over it (no fsync).

    The temporary name has the form :func:`napari_smear.io.atomic_write` uses, so the
    leftovers of a killed run are found and removed by the next one.
    """
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _write_segmentation_tiffs(job: _Job, seg, pixel_size_um: float | None) -> tuple[dict[str, Path], dict]:
    """``<stem>_labels.tif`` and ``<stem>_nuclei.tif`` of ``job``: compressed, with the
    pixel size and the metadata the napari reader places and names the layers by.
    Returns the files written (by kind) and the metadata common to an image's TIFFs."""
    diameter = float(seg.rbc_diameter_px)
    pixel_size = float(pixel_size_um) if pixel_size_um else None
    common = {
        "image": job.relative,
        "rbc_diameter_px": diameter if math.isfinite(diameter) else None,
        "pixel_size_um": pixel_size,
        "params": dict(seg.params),
    }
    name = Path(job.stem).name
    written = {}
    for kind, data in (("labels", seg.labels), ("nuclei", seg.nuclei)):
        layer = "cells" if kind == "labels" else "nuclei"
        written[kind] = _write_tiff(
            job.output(kind), np.asarray(data, np.uint32), pixel_size,
            {**common, "kind": layer, "name": f"{name} {layer}"},
        )
    return written, common


def _write_tiff(path: Path, array, pixel_size_um: float | None, metadata: dict) -> Path:
    """A zlib-compressed TIFF that :func:`napari_smear.io.read_image` reads back with its
    pixel size and napari-smear metadata (same tags as ``io.write_tiff_atomic``).
    ``array``: one image, or a list of (H, W) images stacked into pages."""
    import tifffile

    from .io import METADATA_KEY, is_memory_mapped

    options: dict[str, Any] = {}
    if pixel_size_um:
        pixels_per_cm = 1e4 / float(pixel_size_um)
        options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
    description = json.dumps({METADATA_KEY: _plain(metadata)}, ensure_ascii=True, sort_keys=True)
    pages = list(array) if isinstance(array, (list, tuple)) else [array]
    if any(is_memory_mapped(page) for page in pages):
        # a slide larger than memory: written tile by tile from its file(s), one page
        # per array of a list
        height, width = pages[0].shape[:2]
        shape = pages[0].shape if isinstance(array, np.ndarray) else (len(pages), *pages[0].shape)
        options.update(shape=shape, dtype=pages[0].dtype, tile=(_TILE, _TILE))
        array = (np.ascontiguousarray(page[y : y + _TILE, x : x + _TILE])
                 for page in pages for y in range(0, height, _TILE) for x in range(0, width, _TILE))
    elif isinstance(array, (list, tuple)):
        array = np.stack(pages)
    with _renamed_into_place(path, "wb") as handle:
        tifffile.imwrite(handle, array, description=description, metadata=None, compression="zlib", **options)
    return path


_TILE = 512  # TIFF tile side of label images written from memory-mapped files


def _pil_image(rgb: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))


_LEADING_CELL_COLUMNS = (
    "label", "cell_type", "class", "confidence", "model", "centroid_y", "centroid_x", "area_px",
)


def cells_table(table: pd.DataFrame, specs: Sequence) -> pd.DataFrame:
    """The per-cell table as written to ``<stem>_cells.csv``: the key columns first,
    then the class probabilities, then the rest (bounding box, morphology)."""
    leading = [c for c in _LEADING_CELL_COLUMNS if c in table.columns]
    probs = []
    for spec in specs:
        probs += [f"p_{c}" for c in spec.class_names if f"p_{c}" in table.columns and f"p_{c}" not in probs]
    rest = [c for c in table.columns if c not in leading and c not in probs]
    return table[leading + probs + rest]


def _summary_columns(specs: Sequence) -> list[str]:
    from .segment.types import CELL_TYPES

    columns = ["image", "height", "width", "rbc_diameter_px", "pixel_size_um", "outside_view_share", "overlay_share", "cells",
               *CELL_TYPES,
               *(f"{cell_type}_cut_by_edge" for cell_type in CELL_TYPES), "platelet_from_wbc"]
    for spec in specs:
        for cell_type in spec.cell_types:
            for cls in spec.class_names:
                for name in (f"{cell_type}_{cls}", f"{cell_type}_{cls}_pct"):
                    if name not in columns:
                        columns.append(name)
    columns += [f"{spec.name}_median_confidence" for spec in specs]
    return columns


def folder_summary(summary_whole_cells: pd.DataFrame, unsure: dict | None = None) -> pd.DataFrame:
    """One row per folder of images (the folder each image lies in, as found): the whole
    cells of its images added up and the differential percentages taken over the
    folder, the differential count of a slide whose fields have a folder of their own.
    (The images' own percentages cannot be averaged: a field with one white cell would
    weigh as much as one with twenty.)

    ``summary_whole_cells``: the rows of ``summary_whole_cells.csv``. ``unsure``: per
    folder, per model, ``{"cells": n, "unsure": k}`` (every cell the model classified,
    cut ones too), written as ``<model>_unsure_pct``: a share far above the model's own
    (see :func:`napari_smear.pipeline.unsure_model_notes`) says the folder's images
    differ from the ones it learned from. Columns: ``folder, images, cells``, the counts
    of ``summary_whole_cells.csv`` (per type, cut by the edge, per class) with the
    per-class ``_pct`` recomputed, then ``<model>_unsure_pct``.
    """
    from .segment.types import CELL_TYPES

    columns = list(summary_whole_cells.columns)
    percent = [c for c in columns if c.endswith("_pct")]
    per_class = [c[: -len("_pct")] for c in percent]
    counted = ["cells", *CELL_TYPES, *(f"{t}_cut_by_edge" for t in CELL_TYPES), "platelet_from_wbc"]
    counted = [c for c in counted if c in columns]
    ordered = counted + [c for pair in zip(per_class, percent) for c in pair]
    unsure = unsure or {}
    models = sorted({name for per_model in unsure.values() for name in per_model})
    out_columns = ["folder", "images", *ordered, *(f"{name}_unsure_pct" for name in models)]
    if summary_whole_cells.empty:
        return pd.DataFrame(columns=out_columns)
    folders = summary_whole_cells["path"].map(_folder_of)
    rows = []
    for folder, group in summary_whole_cells.groupby(folders, sort=True):
        row: dict[str, Any] = {"folder": folder, "images": int(len(group))}
        for column in counted + per_class:
            row[column] = int(pd.to_numeric(group[column], errors="coerce").fillna(0).sum())
        for column, count_column in zip(percent, per_class):
            cell_type = count_column.split("_", 1)[0]
            n_type = row.get(cell_type, 0)
            row[column] = round(100.0 * row[count_column] / n_type, 2) if n_type else None
        for name in models:
            counts = unsure.get(folder, {}).get(name)
            row[f"{name}_unsure_pct"] = (round(100.0 * counts["unsure"] / counts["cells"], 1)
                                         if counts and counts["cells"] else None)
        rows.append(row)
    return pd.DataFrame(rows, columns=out_columns)


def _summary_row(job: _Job, result, specs: Sequence, *, include_edge_cells: bool = True) -> dict:
    """Counts per cell type and per class, and the differential percentages.

    ``include_edge_cells=False`` counts only the cells the image edge does not cut (the
    row of ``summary_whole_cells.csv``); ``<type>_cut_by_edge`` says how many there are
    either way.
    """
    from .pipeline import cut_by_edge, retyped_platelets
    from .segment.types import CELL_TYPES

    table = result.table
    seg = result.segmentation
    cut = cut_by_edge(table)
    cut_per_type = Counter(table["cell_type"][cut].tolist())
    if not include_edge_cells:
        table = table[~cut]
    # Counted in plain Python (a few dozen cells, where pandas' value_counts and groupby
    # cost milliseconds); keys holding a missing value are counted but never asked for.
    cell_types = table["cell_type"].tolist()
    per_type = Counter(cell_types)
    pairs = Counter(zip(cell_types, table["class"].tolist())) if "class" in table else Counter()
    diameter = float(seg.rbc_diameter_px)
    row: dict[str, Any] = {
        "image": job.relative,
        "height": int(seg.labels.shape[0]),
        "width": int(seg.labels.shape[1]),
        "rbc_diameter_px": round(diameter, 3) if math.isfinite(diameter) else None,
        "pixel_size_um": seg.pixel_size_um,
        # the unlit frame of an eyepiece photo holds no cells: counts per area need it
        "outside_view_share": round(float(seg.params.get("outside_view_share", 0.0)), 4),
        "overlay_share": round(float(seg.params.get("overlay_share", 0.0)), 5),
        "cells": int(len(table)),
    }
    for cell_type in CELL_TYPES:
        row[cell_type] = per_type[cell_type]
        row[f"{cell_type}_cut_by_edge"] = cut_per_type[cell_type]
    # platelet clumps the segmentation typed as white cells (pipeline.retype_platelet_clumps)
    row["platelet_from_wbc"] = int(retyped_platelets(table).sum())
    for spec in specs:
        for cell_type in spec.cell_types:
            n_type = per_type[cell_type]
            for cls in spec.class_names:
                count = pairs[(cell_type, cls)]
                row[f"{cell_type}_{cls}"] = count
                row[f"{cell_type}_{cls}_pct"] = round(100.0 * count / n_type, 2) if n_type else None
    for spec in specs:
        # how sure the model is on this field: far below its usual level, the field looks
        # unlike the model's training data (another stain or microscope); docs/batch.md
        row[f"{spec.name}_median_confidence"] = _median_confidence(table, spec.name)
    return row


def _median_confidence(table, model_name: str) -> float | None:
    """Median top-class probability of the cells ``model_name`` classified (None: none)."""
    if "model" not in table or "confidence" not in table:
        return None
    values = [c for m, c in zip(table["model"].tolist(), table["confidence"].tolist())
              if m == model_name and c == c]
    return round(float(np.median(values)), 4) if values else None


def _json_text(value: Any) -> str:
    return json.dumps(_plain(value), indent=1, sort_keys=True, allow_nan=False) + "\n"


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars as Python numbers, NaN as null, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- reading results back


def load_result(out_dir: str | Path, image: str | Path):
    """One image's results, as :func:`analyze_files` wrote them, as an ``AnalysisResult``.

    What the batch wrote becomes what :func:`napari_smear.analyze` returns, so that
    :func:`napari_smear.add_to_viewer` shows it (the Batch widget's *Show in viewer*).

    Parameters
    ----------
    out_dir : path
        The output folder of the run.
    image : str or path
        The image as ``summary.csv`` names it (path relative to its input folder, e.g.
        ``"sub/field.png"``).

    Returns
    -------
    napari_smear.pipeline.AnalysisResult
        Labels, nuclei and scale from the TIFFs, the table from ``<stem>_cells.csv``,
        one attention map per model and the models' classes and cell types from the
        completion marker.

    Raises
    ------
    FileNotFoundError
        The image has no completion marker there (never analysed, failed, or the run
        was stopped before it finished), or a file the marker lists is missing.
    ValueError
        A file is not what the marker says (changed since the run).
    """
    from .io import read_image
    from .pipeline import AnalysisResult
    from .segment.types import SmearSegmentation

    out = Path(out_dir)
    relative = Path(image)
    stem = output_stem(out, relative)
    marker_path = Path(str(stem) + MARKER_SUFFIX)
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no finished result for {relative.as_posix()!r} in {out}: {marker_path.name} is missing "
            "(the image was not analysed, failed (see errors.csv) or its run was stopped)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{marker_path} is not a readable completion marker: {exc}") from exc
    outputs = marker.get("outputs") if isinstance(marker, dict) else None
    damage = _damaged_output(outputs, stem.parent)
    if damage is not None:
        kind, path, problem = damage
        if problem == "missing":
            raise FileNotFoundError(f"{path} ({kind}) is missing: run the batch again to redo {relative.as_posix()}")
        if problem == "changed":
            raise ValueError(f"{path} changed since the run that wrote it: run the batch again with overwrite")
        raise ValueError(f"{marker_path} is not a napari-smear completion marker (output {kind!r})")

    def output(kind: str) -> Path:
        return Path(str(stem) + OUTPUT_SUFFIXES[kind])

    labels, meta = read_image(output("labels"), rgb=False)
    nuclei, _ = read_image(output("nuclei"), rgb=False)
    own = meta.get("napari_smear") or {}
    table = pd.read_csv(output("cells"), keep_default_na=True)
    if "class" in table:  # pandas reads an all-empty column as float NaN
        table["class"] = table["class"].astype(object).where(table["class"].notna(), None)
    diameter = own.get("rbc_diameter_px")
    segmentation = SmearSegmentation(
        labels=np.asarray(labels, np.uint32), nuclei=np.asarray(nuclei, np.uint32), table=table,
        rbc_diameter_px=float(diameter) if diameter is not None else float("nan"),
        pixel_size_um=own.get("pixel_size_um"), params=dict(own.get("params") or {}),
    )
    models = {
        entry["name"]: {"kind": entry.get("kind"), "classes": list(entry.get("classes", [])),
                        "cell_types": list(entry.get("cell_types", [])), "path": None}
        for entry in (marker.get("settings") or {}).get("models", [])
    }
    attention: dict[str, np.ndarray] = {}
    if "attention" in outputs:
        stack, attention_meta = read_image(output("attention"), rgb=False)
        names = (attention_meta.get("napari_smear") or {}).get("models") or list(models)
        stack = np.asarray(stack, np.float32).reshape(-1, *labels.shape)
        attention = {name: stack[k] for k, name in enumerate(names)}
    return AnalysisResult(segmentation=segmentation, table=table, attention=attention, models=models)


def analysed_input_paths(out_dir: str | Path) -> dict[str, str]:
    """``image -> input path`` of each row of ``out_dir/summary.csv`` (empty without a
    readable one); a path given relative on the command line is resolved against the
    folder the run started in (``run.json``'s ``working_directory``), not the current one."""
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.csv"
    if not summary_path.is_file():
        return {}
    try:
        summary = pd.read_csv(summary_path, usecols=["image", "path"], dtype=str, keep_default_na=False)
    except (OSError, ValueError):  # not a summary we wrote
        return {}
    try:
        started_in = json.loads((out_dir / "run.json").read_text(encoding="utf-8")).get("working_directory")
    except (OSError, ValueError, AttributeError):  # no record (or an older one): paths as written
        started_in = None
    paths = summary["path"]
    if started_in:
        paths = [str(Path(started_in) / p) if p and not Path(p).is_absolute() else p for p in paths]
    return dict(zip(summary["image"], paths))


def finished_images(out_dir: str | Path) -> list[str]:
    """The images ``out_dir`` holds finished results for, by their completion markers
    (``<stem>_done.json``), as ``summary.csv`` would name them (relative to their input
    folder). Unlike :func:`analysed_input_paths` it does not need the summary, which a
    run writes at its end: after a cancelled run it lists the images that finished.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    images = []
    for marker_path in sorted(out.rglob(f"*{MARKER_SUFFIX}")):
        if any(part.startswith(".") for part in marker_path.relative_to(out).parts):
            continue  # scratch folders, hidden files
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _is_our_marker(marker) and isinstance(marker.get("image"), str):
            images.append(marker["image"])
    return images


# ----------------------------------------------------------------------------- overlay
# Colours come from napari_smear.colors, as in the viewer.


def render_overlay(
    rgb: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    specs: Sequence = (),
    *,
    max_side: int = OVERLAY_MAX_SIDE,
) -> np.ndarray:
    """A QC picture: the field with each cell outlined in its class colour, and a legend.

    Cells no model classified are outlined in their cell-type colour. Fields larger
    than ``max_side`` are shown subsampled. Returns (H', W', 3) uint8.
    """
    step = max(1, math.ceil(max(labels.shape) / max_side))
    image = np.array(rgb[::step, ::step], dtype=np.uint8)
    lab = labels[::step, ::step]
    palette = class_palette_rgb([c for spec in specs for c in spec.class_names])
    lut = np.zeros((int(labels.max()) + 1, 3), np.uint8)
    legend: list[tuple[tuple[int, int, int], str]] = []
    if len(table):
        classes = table["class"] if "class" in table else pd.Series([None] * len(table), index=table.index)
        # What each cell is drawn as: its class, else "<type> (unclassified)"; one colour
        # per distinct name, then a lookup by label id (no loop over cells).
        keys = classes.astype(object).where(classes.notna(), table["cell_type"].astype(str) + " (unclassified)")
        # a class given to cells of two types (white cells and platelet-sized ones called
        # eosinophil, say) is counted per type, as summary.csv and the count dock do
        types_per_class = table.groupby(keys.astype(str))["cell_type"].nunique()
        shared = keys.astype(str).map(types_per_class).gt(1) & classes.notna()
        keys = keys.where(~shared, keys.astype(str) + " (" + table["cell_type"].astype(str) + ")")
        codes, names = pd.factorize(keys.astype(str), sort=True)

        def colour_of(name: str):
            if name.endswith(" (unclassified)"):
                return CELL_TYPE_RGB.get(name.split(" ")[0])
            return palette.get(name.split(" (")[0])

        colours = np.array([colour_of(name) or (128, 128, 128) for name in names], np.uint8).reshape(-1, 3)
        lut[table["label"].to_numpy(np.int64)] = colours[codes]
        counts = np.bincount(codes, minlength=len(names))
        legend = [(tuple(int(v) for v in colour), f"{name} {count}") for name, colour, count in zip(names, colours, counts)]
    edges = _label_edges(lab)
    image[edges] = lut[lab[edges]]
    return _with_legend(image, legend)


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label: the same pixels as
    ``skimage.segmentation.find_boundaries(labels, mode="thick")`` (which compares a grey
    dilation and erosion by the cross, reflecting at the image border), at a fraction of
    its cost."""
    edges = np.zeros(labels.shape, bool)
    rows = labels[1:] != labels[:-1]
    edges[1:] |= rows
    edges[:-1] |= rows
    cols = labels[:, 1:] != labels[:, :-1]
    edges[:, 1:] |= cols
    edges[:, :-1] |= cols
    return edges


def _with_legend(image: np.ndarray, entries: list[tuple[tuple[int, int, int], str]]) -> np.ndarray:
    """Append a legend strip (colour swatch + text per entry) below ``image``."""
    from PIL import Image, ImageDraw

    from .gallery import label_font

    if not entries:
        return image
    font = label_font()
    width = image.shape[1]
    line, pad, swatch = 16, 6, 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, x, row = [[]], pad, 0
    for colour, text in entries:
        item = swatch + 4 + int(math.ceil(measure.textlength(text, font=font))) + 2 * pad
        if x + item > width and rows[row]:
            rows.append([])
            row, x = row + 1, pad
        rows[row].append((x, colour, text))
        x += item
    strip = Image.new("RGB", (width, len(rows) * line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, items in enumerate(rows):
        y = pad // 2 + r * line
        for x, colour, text in items:
            draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=colour, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y), text, fill=(0, 0, 0), font=font)
    return np.concatenate([image, np.asarray(strip, np.uint8)], axis=0)


# ----------------------------------------------------------------------------- analyze: executors


class _InlineFuture:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _InlineExecutor:
    """Runs each task at once, in this process (no Dask)."""

    inline = True
    workers = 1
    local_workers = 0
    description = "in this process"

    def submit(self, fn, *args):
        return _InlineFuture(fn(*(a.value if isinstance(a, _InlineFuture) else a for a in args)))

    def wait_first(self, futures):
        return list(futures)

    def close(self):
        pass


def local_cluster(workers: int):
    """The local Dask cluster ``analyze_files(workers=N)`` starts: N processes of one thread.

    Segmentation holds the GIL much of the time, hence processes. Dask starts workers
    with ``MALLOC_TRIM_THRESHOLD_`` set, which turns off glibc's adaptive mmap threshold:
    every large numpy array is then a fresh mmap and segmentation runs about twice
    slower (measured), so only the thread limits of Dask's default worker environment
    are kept. Call it under ``if __name__ == "__main__":`` in scripts (workers start by
    importing the main module).
    """
    import dask
    from distributed import LocalCluster

    environ = {
        key: value for key, value in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
        if key != "MALLOC_TRIM_THRESHOLD_"
    }
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=int(workers), threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        )


class _DaskExecutor:
    """Tasks on a Dask distributed cluster: a local one it starts, or an existing one."""

    inline = False

    def __init__(self, *, workers: int = 0, scheduler: str | None = None):
        from distributed import Client, LocalCluster

        self.cluster = None
        try:
            self._connect(Client, LocalCluster, workers, scheduler)
        except RuntimeError as exc:
            if "failed to start" not in str(exc):
                raise
            raise RuntimeError(
                f"the local Dask cluster did not start ({exc}). Worker processes start by importing the "
                "main script again: when analyze_files(workers=...) is called from a script, put the call "
                "under `if __name__ == \"__main__\":`"
            ) from exc
        try:
            self.client.wait_for_workers(1, timeout=120)
        except Exception as exc:
            self.close()
            raise RuntimeError(f"no Dask worker joined the {self.description} within 120 s: {exc}") from exc
        info = self.client.scheduler_info()
        self.workers = max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))

    def _connect(self, Client, LocalCluster, workers, scheduler):
        self.own_client = True
        if isinstance(scheduler, str):
            try:
                self.client = Client(scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
            self.description = f"Dask cluster at {scheduler}"
            self.local_workers = 0
        elif scheduler is not None:  # a distributed.Client the caller keeps
            self.client, self.own_client = scheduler, False
            self.description = f"Dask cluster at {scheduler.scheduler.address}"
            local = isinstance(getattr(scheduler, "cluster", None), LocalCluster)
            self.local_workers = len(scheduler.scheduler_info().get("workers", {})) if local else 0
        else:
            self.cluster = local_cluster(workers)
            self.client = Client(self.cluster)
            self.description = f"local Dask cluster, {workers} worker process(es)"
            self.local_workers = workers

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def wait_first(self, futures):
        from distributed import wait

        return list(wait(list(futures), return_when="FIRST_COMPLETED").done)

    def close(self):
        if self.own_client:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


# ----------------------------------------------------------------------------- analyze: the run


def analyze_files(
    inputs: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    models: Sequence | None = None,
    device: str = "auto",
    pattern: str = "*",
    workers: int = 0,
    scheduler=None,
    overwrite: bool = False,
    batch_size: int | None = None,
    amp: bool = True,
    pixel_size_um: float | None = None,
    morphology: bool = True,
    overlay_max_side: int = OVERLAY_MAX_SIDE,
    max_waiting: int = 16,
    progress: Callable[[int, int, str], None] | None = None,
    prior_correction: float | None = None,
    working_diameter_px: float | None = None,
    on_disk: bool | None = None,
    test_time_views: int | None = None,
    sure_at: float | None = None,
) -> BatchReport:
    """Analyse every image of folders (recursively) or files; write per-image outputs.

    Per image, under ``out_dir`` (sub-folders of the inputs mirrored):
    ``<stem>_labels.tif``, ``<stem>_nuclei.tif``, ``<stem>_attention.tif`` (float32,
    one page per model, image coordinates), ``<stem>_cells.csv``, ``<stem>_overlay.png``
    and the completion marker ``<stem>_done.json``; once per run ``summary.csv``,
    ``summary_whole_cells.csv``, ``summary_by_folder.csv``, ``errors.csv`` and ``run.json``. See
    ``docs/batch.md`` for the formats.

    Parameters
    ----------
    inputs : path or iterable of paths
        Folders (searched recursively, hidden entries and ``out_dir`` skipped) and files.
    out_dir : path
        Output folder (created).
    models : sequence, optional
        Built-in names, model files or ``(model, ModelInfo)`` pairs; ``[]`` for
        segmentation only. Default: the built-in models that are installed (the others
        are listed in ``missing_models`` of the report and in ``run.json``).
    device : str
        Where the classifiers run (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
    pattern : str
        File-name glob for folder searches (e.g. ``"*.jpg"``).
    workers : int
        0: everything in this process. N >= 1: a local Dask cluster of N worker
        processes decodes, segments, crops and writes, while this process classifies.
    scheduler : str or distributed.Client, optional
        An existing Dask cluster instead of a local one: its scheduler's address
        (``tcp://host:8786``) or a connected client (left open). Its workers must have
        napari-smear installed and see the input and output folders at the same paths.
    overwrite : bool
        Redo images an earlier run finished.
    batch_size : int, optional
        Crops per forward pass (default 32 on CPU, where small batches run fastest,
        1024 on a GPU). Results are
        identical for every run with the same batch size and device.
    amp : bool
        Autocast for the classifiers.
    pixel_size_um : float, optional
        Pixel size of every image; default: the file's own calibration, else the scale
        measured from the red cells.
    morphology : bool
        Add the morphology columns to the cell tables.
    overlay_max_side : int
        Longest side of the QC overlay pictures.
    max_waiting : int
        Images whose crops may wait for a classifier batch to fill (also bounded to
        about 32 megapixels in all, so that large slides do not pile up in memory).
    progress : callable, optional
        ``progress(done, total, message)`` after every image (and, in this process,
        during segmentation); raise inside it to stop the run. Finished images are kept
        and a later run resumes after them.
    prior_correction : float, optional
        One prior-correction strength for every model (0: the class-balanced answer);
        default: each model file's own. The strength each model used is recorded in
        ``run.json``; images finished with another one are redone.
    working_diameter_px : float, optional
        The segmentation's working resolution, red-cell diameters in working pixels
        (see :func:`napari_smear.segment_smear`; default its own, 24). 16 segments large
        scans about 1.5 times as fast at a small cost in accuracy. Images finished with
        another one are redone.
    on_disk : bool, optional
        Analyse TIFFs region by region through memory-mapped files, for slides larger
        than memory (:func:`analyze_file_on_disk`; the same outputs, in this process,
        after the other images): True for every TIFF, False never, None (default) for
        a TIFF whose analysis in memory would take more than half the memory available.
    test_time_views : {1, 2, 4, 8}, optional
        One number of turned views for every model (1: each crop once, the fastest on a
        CPU); default: each model file's own (the built-in models: 8). Recorded in
        ``run.json``; images finished with another one are redone.
    sure_at : float, optional
        Turn only the cells whose first view gives no class this probable (see
        :func:`napari_smear.analyze`); default None: every cell in all of its views.
        Recorded in ``run.json`` like ``test_time_views``.

    Returns
    -------
    BatchReport

    Raises
    ------
    FileNotFoundError
        An input that does not exist.
    napari_smear.models.ModelFileError
        A model that cannot be loaded.
    RuntimeError
        Another run is writing to ``out_dir``, or no Dask worker is available.
    """
    from . import __version__
    from .io import write_csv_atomic
    from .models import available_models
    from .pipeline import (
        DEFAULT_MODELS, StreamingClassifier, check_prior_correction, check_test_time_views, load_models,
        unsure_model_notes,
    )
    from .predict import check_sure_at, select_device

    if workers and scheduler is not None:
        raise ValueError("give either workers (a local Dask cluster) or scheduler (an existing one), not both")
    if isinstance(workers, bool) or int(workers) < 0:
        raise ValueError(f"workers must be 0 (this process) or a positive number, got {workers!r}")
    _check_pixel_size(pixel_size_um, working_diameter_px)
    if isinstance(overlay_max_side, bool) or not isinstance(overlay_max_side, (int, np.integer)) \
            or overlay_max_side < 1:
        raise ValueError(f"overlay_max_side must be a whole number of pixels >= 1, got {overlay_max_side!r}")
    if batch_size is not None:  # None: the device's default
        from .predict import check_batch_size

        check_batch_size(batch_size)
    working_diameter_px = _working_diameter_setting(working_diameter_px)
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    _check_inputs_exist(inputs)
    # the output folder is made once the models are known good: a bad model leaves none
    new_output_dir = not _check_output_path(out_dir).exists()

    missing_models: list[str] = []
    if models is None:
        installed = set(available_models())
        models = [name for name in DEFAULT_MODELS if name in installed]
        missing_models = [name for name in DEFAULT_MODELS if name not in installed]
    torch_device = select_device(device)
    loaded = load_models(models, str(torch_device))
    specs = tuple(m.spec for m in loaded)
    batch_size = int(batch_size or (1024 if torch_device.type == "cuda" else 32))
    strengths = check_prior_correction(loaded, prior_correction)
    views = check_test_time_views(loaded, test_time_views)
    sure_at = check_sure_at(sure_at)
    fingerprint = _fingerprint(loaded, pixel_size_um, morphology, overlay_max_side, amp, __version__, strengths,
                               working_diameter_px, views, sure_at)
    out = prepare_output_dir(out_dir)

    with _exclusive(out):
        _check_run_files(out)
        _remove_stale_temporaries(out)
        jobs, failures = _plan(inputs, out, pattern)
        total = len(jobs) + len(failures)
        if not total:
            _remove_unused_output_dir(out, new_output_dir)
            raise ValueError(no_images_message(inputs, pattern))
        todo, skipped = [], 0
        for job in jobs:
            if not overwrite and _finished_marker(job, fingerprint) is not None:
                skipped += 1
                continue
            _keep_changed_outputs(job)
            foreign = _foreign_outputs(job)
            if foreign:  # a user's file where an output goes: the image fails, the file stays
                failures.append(_Failed(job, _foreign_output_reason(foreign)))
                continue
            job.marker.unlink(missing_ok=True)
            todo.append(job)
        done = skipped + len(failures)
        if progress:
            progress(done, total, f"{skipped} image(s) finished by an earlier run" if skipped else "starting")

        opened = time.perf_counter()
        executor = _open_executor(workers, scheduler)
        executor_start = time.perf_counter() - opened
        from .predict import autocast_dtype

        dtype = autocast_dtype(torch_device, amp)
        settings = _Settings(
            specs=specs, pixel_size_um=pixel_size_um, morphology=morphology,
            overlay_max_side=int(overlay_max_side), fingerprint=fingerprint,
            worker_threads=None if executor.inline else 1, working_diameter_px=working_diameter_px,
            ran_on={"device": str(torch_device), "autocast": str(dtype).replace("torch.", "") if dtype else None,
                    "batch_size": batch_size} if specs else None,
        )
        counter = [done]  # images done so far, for the progress reports made on the way

        def before_batch(name: str, n: int) -> None:
            # the fields waiting for the classifier take seconds to classify: said, and
            # a Cancel (raised from progress) is seen between batches, not after them all
            if progress:
                progress(counter[0], total, f"classifying a batch of {n} cells ({name})")

        classifier = StreamingClassifier(
            loaded, device=torch_device, batch_size=batch_size, amp=amp, max_waiting=max_waiting,
            prior_correction=prior_correction, test_time_views=test_time_views, sure_at=sure_at,
            before_batch=before_batch,
        )
        stage_seconds: dict[str, float] = {}
        analysed = 0
        # slides larger than memory go region by region through files, in this process
        slides, in_memory = [], []
        for job in todo:
            (slides if _analyze_on_disk(job.path, on_disk) else in_memory).append(job)
        try:
            with _classifier_threads(torch_device, executor.local_workers), _deterministic_cudnn(torch_device):
                for outcome in itertools.chain(
                    _run(executor, in_memory, settings, classifier, progress, counter, total),
                    _run_on_disk(slides, out, settings, loaded, torch_device, batch_size, amp, prior_correction,
                                 test_time_views, sure_at, progress, counter, total),
                ):
                    counter[0] = done = done + 1
                    if isinstance(outcome, _Failed):
                        failures.append(outcome)
                        message = f"failed {outcome.job.relative}"
                    else:
                        analysed += 1
                        for stage, seconds in outcome.timings.items():
                            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
                        message = f"analysed {outcome.job.relative}"
                        _warn_about(outcome.job.relative, outcome.notes)
                    if progress:
                        progress(done, total, message)
        finally:
            executor.close()
        stage_seconds["classify"] = classifier.seconds

        rows, whole_cell_rows = [], []
        # per folder of images, per model, over every finished image of the run's inputs
        unsure: dict[str, dict[str, dict[str, int]]] = {}
        for job in jobs:
            marker = _finished_marker(job, fingerprint)
            if marker is not None:
                rows.append({**marker["summary"], "path": job.path})
                whole_cell_rows.append({**marker["summary_whole_cells"], "path": job.path})
                folder = unsure.setdefault(_folder_of(job.path), {})
                for name, counts in marker.get("unsure", {}).items():  # absent from earlier versions' markers
                    total_counts = folder.setdefault(name, {"cells": 0, "unsure": 0})
                    total_counts["cells"] += int(counts["cells"])
                    total_counts["unsure"] += int(counts["unsure"])
        columns = _summary_columns(specs)
        columns = [columns[0], "path", *columns[1:], "warnings"]
        summary = pd.DataFrame(rows, columns=columns)
        summary_whole_cells = pd.DataFrame(whole_cell_rows, columns=columns)
        failures.sort(key=lambda f: f.job.index)
        errors = pd.DataFrame(
            {"file": [f.job.path for f in failures], "error": [f.reason for f in failures]},
            columns=["file", "error"],
        )
        write_csv_atomic(out / "summary.csv", summary, float_format="%.6g")
        write_csv_atomic(out / "summary_whole_cells.csv", summary_whole_cells, float_format="%.6g")
        summary_by_folder = folder_summary(summary_whole_cells, unsure)
        write_csv_atomic(out / "summary_by_folder.csv", summary_by_folder, float_format="%.6g")
        write_csv_atomic(out / "errors.csv", errors)
        wall = time.perf_counter() - started
        run = _run_record(
            inputs, out, pattern, loaded, missing_models, torch_device, batch_size, amp, executor,
            workers, scheduler, overwrite, pixel_size_um, morphology, overlay_max_side,
            counts={"total": total, "analysed": analysed, "skipped": skipped, "failed": len(failures)},
            timings={
                "wall_s": round(wall, 3),
                "executor_start_s": round(executor_start, 3),
                "images_per_s": round(analysed / wall, 3) if wall > 0 else None,
                "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
                "classifier": {"crops": classifier.crops, "turned_crops": classifier.turned,
                               "padding_crops": classifier.padded},
            },
            started_at=started_at, fingerprint=fingerprint,
        )
        run["earlier_runs"] = _earlier_runs(out / "run.json")
        # about each folder of images as a whole (a folder is a slide or a microscope: a
        # folder of another microscope's fields was hidden when pooled with the rest),
        # every finished image, also those an earlier run finished
        run["warnings"] = [
            (f"{folder}: {note}" if len(unsure) > 1 else note)
            for folder, counts in sorted(unsure.items()) for note in unsure_model_notes(counts)
        ]
        for note in run["warnings"]:
            warnings.warn(note, UserWarning, stacklevel=2)
        from .io import atomic_write

        with atomic_write(out / "run.json", "w") as handle:
            handle.write(_json_text(run))
    return BatchReport(
        out_dir=out, summary=summary, errors=errors, total=total, analysed=analysed, skipped=skipped,
        failed=len(failures), models=[m.name for m in loaded], missing_models=missing_models, run=run,
        summary_whole_cells=summary_whole_cells, summary_by_folder=summary_by_folder,
    )


def _run(executor, todo: list[_Job], settings: _Settings, classifier, progress, counter: list, total: int):
    """Drive the stages; yield a _Finished or _Failed per job as each completes.

    ``counter[0]`` is the number of images done so far (kept by the caller), for the
    progress reports made during segmentation in this process.
    """
    pending = deque(todo)
    in_flight: dict[Any, tuple[_Job, Any]] = {}  # crops future -> (job, slim prepared future)
    waiting: dict[str, tuple[_Job, Any]] = {}  # job key -> (job, slim prepared future), in the classifier
    finishing: dict[Any, _Job] = {}
    # Enough stage-1 tasks queued that no worker idles while this process classifies.
    max_in_flight = 1 if executor.inline else 2 * executor.workers + 1

    def say(job: _Job, message: str) -> None:
        # in this process the stages of one large image take minutes: say which runs
        if executor.inline and progress:
            progress(counter[0], total, f"{job.relative}: {message}")

    def submit_finish(completed):
        for key, outputs in completed:
            job, slim = waiting.pop(key)
            say(job, "writing the results")
            finishing[executor.submit(_finish_job, slim, outputs, settings)] = job

    while pending or in_flight or waiting or finishing:
        while pending and len(in_flight) < max_in_flight and not classifier.full:
            job = pending.popleft()
            extra = ()
            if executor.inline and progress:
                extra = (lambda f, m, job=job: progress(counter[0], total, f"{job.relative}: {m}"),)
            try:
                prepared = executor.submit(_prepare_job, job, settings, *extra)
            except _ProgressInterrupt as exc:
                raise exc.original from None
            in_flight[executor.submit(_crop_pixels, prepared)] = (job, executor.submit(_without_crop_pixels, prepared))
            del prepared
        futures = [*in_flight, *finishing]
        if not futures:
            submit_finish(classifier.flush())
            continue
        for future in executor.wait_first(futures):
            if future in in_flight:
                job, slim = in_flight.pop(future)
                value = _outcome(future, job)
                if isinstance(value, _Failed):
                    yield value
                    continue
                crops, pixels = value
                waiting[job.key] = (job, slim)
                n_crops = sum(len(images) for images, *_ in crops.values())
                if n_crops:
                    say(job, f"classifying {n_crops} cells")
                submit_finish(classifier.add(job.key, crops, size=pixels))
            else:
                job = finishing.pop(future)
                yield _outcome(future, job)
        submit_finish(classifier.step())
        if not pending and not in_flight:
            submit_finish(classifier.flush())


def _run_on_disk(slides: list[_Job], out: Path, settings: _Settings, loaded, device, batch_size: int, amp: bool,
                 prior_correction, test_time_views, sure_at, progress, counter: list, total: int):
    """Analyse each slide with :func:`analyze_file_on_disk`; yield a _Finished or
    _Failed per slide. An exception from ``progress`` stops the run, as in ``_run``."""
    for job in slides:
        def report(fraction, message, job=job):
            if progress:
                try:
                    progress(counter[0], total, f"{job.relative}: {message}")
                except BaseException as exc:
                    raise _ProgressInterrupt(exc) from exc

        try:
            yield analyze_file_on_disk(job, out, settings, loaded, device=device, batch_size=batch_size, amp=amp,
                                       prior_correction=prior_correction, progress=report,
                                       test_time_views=test_time_views, sure_at=sure_at)
        except _ProgressInterrupt as exc:
            raise exc.original from None
        except Exception as exc:  # a bad file or a full disk is recorded, and the batch goes on
            yield _Failed(job, _reason(exc))


def _outcome(future, job: _Job):
    try:
        return future.result()
    except Exception as exc:  # a worker died, a result could not travel, ...
        return _Failed(job, _reason(exc))


def _open_executor(workers: int, scheduler):
    if scheduler is not None or workers:
        return _DaskExecutor(workers=int(workers or 0), scheduler=scheduler)
    return _InlineExecutor()


# ----------------------------------------------------------------------------- analyze: planning


#: A file name's limit on common file systems (ext4, NTFS, APFS: 255 bytes or characters).
_MAX_FILE_NAME_BYTES = 255
#: The longest ending an output of an image's stem gets, with the temporary name it is
#: first written under (``.<name>.<12 hex>.tmp``, see ``io.atomic_write``).
_LONGEST_OUTPUT_ENDING = max(len(s) for s in (*OUTPUT_SUFFIXES.values(), MARKER_SUFFIX)) + len("..123456789abc.tmp")


def _plan(inputs: list[Path], out: Path, pattern: str) -> tuple[list[_Job], list[_Failed]]:
    """The jobs, in input order; files whose output names collide are failures."""
    jobs, failures = [], []
    taken: dict[str, str] = {}
    for index, (path, relative) in enumerate(expand_inputs(inputs, pattern, exclude=out)):
        stem = str(output_stem(out, relative))
        stat = path.stat()
        job = _Job(index, str(path), relative.as_posix(), stem, int(stat.st_size), int(stat.st_mtime_ns))
        clash = taken.get(stem.lower())  # lower: case-insensitive file systems
        longest = len(Path(stem).name.encode()) + _LONGEST_OUTPUT_ENDING
        if longest > _MAX_FILE_NAME_BYTES:
            failures.append(_Failed(job, f"its file name is too long for the names of its outputs ({longest} bytes "
                                         f"with the longest ending, at most {_MAX_FILE_NAME_BYTES} on most file "
                                         "systems): rename it shorter"))
            continue
        if clash is not None:
            failures.append(_Failed(job, f"its outputs ({Path(stem).name}_*) would overwrite those of {clash}: both "
                                         "go to the same output folder under the same name (a file's stem, without "
                                         "its suffix); rename one of the two files"))
            continue
        taken[stem.lower()] = str(path)
        jobs.append(job)
    return jobs, failures


def _finished_marker(job: _Job, fingerprint: dict) -> dict | None:
    """The job's marker if it proves a finished, current result; else None."""
    try:
        marker = json.loads(job.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if marker.get("settings") != fingerprint:
        return None
    if marker.get("input") != {"bytes": job.size, "mtime_ns": job.mtime_ns}:
        return None
    if _damaged_output(marker.get("outputs") or {}, job.marker.parent) is not None:
        return None
    if not all(isinstance(marker.get(key), dict) for key in ("summary", "summary_whole_cells")):
        return None
    return marker


def _keep_changed_outputs(job: _Job) -> list[Path]:
    """Move aside the outputs of ``job`` that changed since the run that wrote them (a
    label image corrected by hand, say), before the image is analysed again: each is
    renamed ``<stem>.changed-<time>_labels.tif`` (and so on) beside the new one, with a
    warning, instead of being written over. Returns the new names."""
    try:
        marker = json.loads(job.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    outputs = marker.get("outputs") if isinstance(marker, dict) else None
    kept = []
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for _, path, problem in _output_states(outputs, job.marker.parent):
        if problem != "changed" or not path.is_file():
            continue
        name = path.name
        # the output's own ending stays last, so the kept file is still known as an
        # output (never taken for an input image when the outputs sit beside the images)
        ending = _output_ending(name) or path.suffix
        target = path.with_name(f"{name[: len(name) - len(ending)]}.changed-{stamp}{ending}")
        with contextlib.suppress(OSError):
            path.rename(target)
            kept.append(target)
            warnings.warn(
                f"{path.name} had changed since the run that wrote it (edited by hand?); it is kept as "
                f"{target.name} and the image is analysed again",
                UserWarning, stacklevel=3,
            )
    return kept


def _output_states(outputs, folder: Path):
    """``(kind, path, problem)`` for each output a marker lists: problem None when it is on
    disk at its recorded size, else ``"malformed"`` (no file name and size; path None),
    ``"missing"`` or ``"changed"`` (another size)."""
    if not isinstance(outputs, dict):
        yield "outputs", None, "malformed"
        return
    for kind, entry in outputs.items():
        try:
            path, size = folder / entry["file"], entry["bytes"]
        except (KeyError, TypeError):
            yield kind, None, "malformed"
            continue
        try:
            actual = path.stat().st_size
        except OSError:
            yield kind, path, "missing"
            continue
        yield kind, path, None if actual == size else "changed"


def _damaged_output(outputs, folder: Path) -> tuple[str, Path | None, str] | None:
    """The first output a marker lists that is not on disk as recorded (see
    :func:`_output_states`); None when every output is there at its recorded size."""
    return next((state for state in _output_states(outputs, folder) if state[2] is not None), None)


def _fingerprint(loaded, pixel_size_um, morphology, overlay_max_side, amp, version, prior_strengths,
                 working_diameter_px=None, views=None, sure_at=None) -> dict:
    """Everything that changes per-image outputs; a marker with another one is redone.

    ``prior_strengths`` (model name -> the prior-correction strength used) is part of
    it: the file's stored strength can change while its weights do not; so is ``views``
    (model name -> the number of turned views averaged) where it is more than one. The working
    resolution enters only when one is chosen, so runs at the default keep the
    fingerprint they had before it could be chosen; so does ``sure_at`` (turned views
    only for unsure cells), where some model averages more than one view.
    """
    models = []
    for entry in loaded:
        spec = entry.spec
        models.append({
            "name": spec.name, "kind": spec.kind, "classes": list(spec.class_names),
            "cell_types": list(spec.cell_types), "crop_diameters": spec.crop_diameters,
            "input_size": spec.input_size, "morph_features": list(spec.morph_features),
            "weights_sha256": _weights_sha256(entry.model), "prior_correction": prior_strengths[entry.name],
        })
        if (views or {}).get(entry.name, 1) > 1:  # one view: the fingerprint of runs before views existed
            models[-1]["test_time_views"] = views[entry.name]
    value = {
        "napari_smear": version, "output_version": OUTPUT_VERSION, "models": models, "pixel_size_um": pixel_size_um,
        "morphology": bool(morphology), "overlay_max_side": int(overlay_max_side), "amp": bool(amp),
    }
    if working_diameter_px is not None:
        value["working_diameter_px"] = float(working_diameter_px)
    if sure_at is not None and any(v > 1 for v in (views or {}).values()):
        value["sure_at"] = float(sure_at)
    return json.loads(_json_text(value))  # as it reads back from a marker


def _weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(out: Path):
    """Refuse a second run writing to the same folder (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one run per folder is the user's job
        yield
        return
    handle = open(out / _LOCK_NAME, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(f"another napari-smear run is writing to {out}; wait for it to finish") from exc
        except OSError:  # a file system without locks (some network mounts): go on unguarded
            pass
        yield
    finally:
        handle.close()


def _remove_unused_output_dir(out: Path, made_now: bool) -> None:
    """Remove the output folder a run made and then found nothing to do in (no images):
    it holds only the lock file."""
    if not made_now:
        return
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= {_LOCK_NAME}:
            (out / _LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of writes a killed run left unfinished, and the
    scratch folders of slides it was analysing on disk."""
    for scratch in out.glob(".scratch-*"):
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
    for folder, _, names in os.walk(out):
        for name in names:
            if _TEMPORARY_NAME.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


@contextlib.contextmanager
def _classifier_threads(device, local_workers: int):
    """Leave the CPU cores a local cluster uses to its workers while classifying on CPU."""
    import torch

    previous = torch.get_num_threads()
    if device.type == "cpu" and local_workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - local_workers))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _deterministic_cudnn(device):
    """cuDNN picks the same algorithm every run (no benchmarking): same numbers every run."""
    import torch

    if device.type != "cuda":
        yield
        return
    previous = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous


#: Earlier runs into one output folder that run.json keeps a line about (the newest).
EARLIER_RUNS_KEPT = 50


def _earlier_runs(path: Path) -> list[dict]:
    """What ``run.json`` says of the runs before this one into the same folder: a line
    per run (when, which version, image counts, wall time), newest last. A resumed or
    repeated run wrote over the record of the run that did the work ("analysed 0,
    skipped 14"); an unreadable or foreign file gives none."""
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not _is_our_run_record(before):
        return []
    earlier = [entry for entry in before.get("earlier_runs") or [] if isinstance(entry, dict)]
    earlier.append({
        "started": before.get("started"), "finished": before.get("finished"),
        "napari_smear": before["versions"]["napari_smear"], "images": before.get("images"),
        "wall_s": (before.get("timings") or {}).get("wall_s"),
    })
    return earlier[-EARLIER_RUNS_KEPT:]


def _run_record(inputs, out, pattern, loaded, missing_models, device, batch_size, amp, executor, workers,
                scheduler, overwrite, pixel_size_um, morphology, overlay_max_side, *, counts, timings,
                started_at, fingerprint) -> dict:
    import platform

    import torch

    from . import __version__

    versions = {"napari_smear": __version__, "python": platform.python_version(), "numpy": np.__version__,
                "pandas": pd.__version__, "torch": torch.__version__}
    if not executor.inline:
        import dask

        versions["dask"] = dask.__version__
    return {
        "versions": versions,
        "platform": platform.platform(),
        "started": started_at.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in inputs],
        # summary.csv keeps each input path as given; a relative one is relative to this
        "working_directory": os.getcwd(),
        "out_dir": str(out),
        "settings": {
            "pattern": pattern, "device": str(device), "batch_size": batch_size, "amp": bool(amp),
            "workers": int(workers or 0), "scheduler": None if scheduler is None else executor.description,
            "executor": executor.description,
            "overwrite": bool(overwrite), "pixel_size_um": pixel_size_um, "morphology": bool(morphology),
            "overlay_max_side": int(overlay_max_side), "working_diameter_px": fingerprint.get("working_diameter_px"),
            "sure_at": fingerprint.get("sure_at"),
        },
        "models": {
            m.name: {**m.spec.describe(), "crop_diameters": m.spec.crop_diameters,
                     "input_size": m.spec.input_size, "weights_sha256": described["weights_sha256"],
                     "prior_correction": described["prior_correction"],
                     "test_time_views": described.get("test_time_views", 1)}
            for m, described in zip(loaded, fingerprint["models"])
        },
        "missing_builtin_models": list(missing_models),
        "images": counts,
        "timings": timings,
    }
