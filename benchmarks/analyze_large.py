"""Whole-slide analysis: time and memory of `napari-smear analyze` on one large image.

Usage: python benchmarks/analyze_large.py [--side 10000] [--modes in-memory,on-disk,function]

The image is a mosaic of real Chula RBC-12 fields (or synthetic fields when the shared
data is absent, said loudly), written as an uncompressed TIFF. Each mode analyses it in
a fresh child process with the built-in models, whose peak memory is sampled from here:

* ``in-memory``: ``napari-smear analyze --in-memory`` (every crop of the image at once:
  the batch path for images that fit);
* ``on-disk``: ``napari-smear analyze --on-disk`` (the image, label images and attention
  maps memory-mapped in a scratch folder; cells measured, cropped and classified region
  by region);
* ``function``: ``napari_smear.analyze(image)`` in memory (a field this large is taken
  region by region).

Anonymous memory (RssAnon) is what the process holds itself; RSS also counts the pages
of mapped files it touched, which the system can drop at will. The tile workers of the
segmentation are separate processes (their largest peak RSS is given by the child).
Prints a table and saves benchmarks/results/analyze_large.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from segment_speed import DATA, _run_sampling_anonymous_memory, make_mosaic  # noqa: E402

MODES = ("in-memory", "on-disk", "function")


def run_child(mode: str, tiff: Path, out: Path) -> dict:
    """In the child process: analyse ``tiff`` one way; print a JSON line of figures."""
    import torch  # noqa: F401  (imported before timing)

    started = time.perf_counter()
    if mode == "function":
        import napari_smear
        from napari_smear.io import read_image

        image, _ = read_image(tiff)
        result = napari_smear.analyze(image)
        n_cells = len(result.table)
        classified = int(result.table["class"].notna().sum())
    else:
        from napari_smear.batch import analyze_files

        report = analyze_files([tiff], out, on_disk=(mode == "on-disk"))
        if report.failed:
            raise RuntimeError(report.errors.error.iloc[0])
        import pandas as pd

        cells = pd.read_csv(next(out.glob("*_cells.csv")), usecols=["class"])
        n_cells, classified = len(cells), int(cells["class"].notna().sum())
    seconds = time.perf_counter() - started
    return {"mode": mode, "seconds": seconds, "n_cells": n_cells, "classified": classified,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=10000, help="side of the square mosaic in pixels")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analyze_large.json")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "TIFF", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, tiff, out = args.child
        print(json.dumps(run_child(mode, Path(tiff), Path(out))))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"unknown modes {unknown}; choose from {list(MODES)}")
    import tifffile

    results = {"side": args.side, "megapixels": args.side * args.side / 1e6,
               "mosaic_of": "chula_rbc12" if any((DATA / "chula_rbc12" / "images").glob("*.jpg")) else "synthetic",
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="analyze-large-") as scratch:
        tiff = Path(scratch) / "mosaic.tif"
        tifffile.imwrite(tiff, make_mosaic(args.side), bigtiff=True)  # uncompressed: mapped in place
        for mode in modes:
            out = Path(scratch) / f"out-{mode}"
            command = [sys.executable, __file__, "--child", mode, str(tiff), str(out)]
            child, anonymous_mb = _run_sampling_anonymous_memory(command)
            if child.returncode:
                sys.exit(child.stderr)
            run = json.loads(child.stdout.strip().splitlines()[-1])
            run["peak_anonymous_mb"] = anonymous_mb
            results["runs"].append(run)
            print(f"{mode:>10}: {results['megapixels']:.0f} MP in {run['seconds']:.1f} s "
                  f"({results['megapixels'] / run['seconds']:.2f} MP/s), peak anonymous memory "
                  f"{anonymous_mb:.0f} MB, peak RSS {run['peak_rss_mb']:.0f} MB, largest tile worker "
                  f"{run['largest_worker_rss_mb']:.0f} MB; {run['n_cells']} cells, {run['classified']} classified",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
