"""Folder runs: expand inputs, segment each image, write outputs atomically, record errors."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd


def expand_inputs(inputs: Iterable[str | Path], pattern: str = "*") -> list[tuple[Path, Path]]:
    """Files given directly or found recursively in folders, with their folder-relative path.

    Returns (path, relative path used to mirror sub-folders in the output).
    """
    from .io import is_supported_path

    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob(pattern)):
                if f.is_file() and is_supported_path(f):
                    found.append((f, f.relative_to(p)))
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return found


def output_stem(out_dir: Path, relative: Path) -> Path:
    from .io import file_stem

    return out_dir / relative.parent / file_stem(relative)


def segment_files(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    pixel_size_um: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> pd.DataFrame:
    """Segment every image; per image write ``<stem>_labels.tif``, ``<stem>_nuclei.tif``
    and ``<stem>_cells.csv``. A file that cannot be read or segmented is recorded with
    its reason (``errors.csv``) and the run carries on.

    Returns one row per image: path, counts per cell type, rbc_diameter_px, seconds, error.
    """
    from .io import read_image, write_csv_atomic, write_tiff_atomic
    from .segment import segment_smear

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = expand_inputs(inputs)
    rows, errors = [], []
    for i, (path, rel) in enumerate(files):
        if progress:
            progress(i, len(files), str(path))
        t0 = time.perf_counter()
        try:
            image, meta = read_image(path)
            seg = segment_smear(image, pixel_size_um=pixel_size_um or meta.get("pixel_size_um"))
            stem = output_stem(out, rel)
            stem.parent.mkdir(parents=True, exist_ok=True)
            write_tiff_atomic(f"{stem}_labels.tif", seg.labels)
            write_tiff_atomic(f"{stem}_nuclei.tif", seg.nuclei)
            write_csv_atomic(f"{stem}_cells.csv", seg.table)
            rows.append({"path": str(path), **seg.counts(), "rbc_diameter_px": seg.rbc_diameter_px,
                         "seconds": time.perf_counter() - t0, "error": ""})
        except Exception as exc:  # one bad file must not stop a batch: record why
            reason = f"{type(exc).__name__}: {exc}"
            errors.append({"file": str(path), "error": reason})
            rows.append({"path": str(path), "error": reason})
    if progress:
        progress(len(files), len(files), "done")
    if errors:
        write_csv_atomic(out / "errors.csv", pd.DataFrame(errors))
    return pd.DataFrame(rows)
