"""Segmentation speed: seconds per BCCD field, and MP/s + peak RSS on a large tiled image.

Usage: python benchmarks/segment_speed.py [--fields 40] [--large-side 10000] [--workers N] [--working-diameter PX]
The large image is a mosaic of real Chula RBC-12 fields (or synthetic fields when the
shared data is absent), segmented through the tiled path (tiles in N worker
processes; default: segment_smear's own choice). Peak RSS is measured in a fresh
child process so the field benchmark does not inflate it; the largest tile worker's
peak RSS is reported beside it (forked workers share the parent's pages, so the two
do not simply add up).
Prints a table and saves benchmarks/results/segment_speed.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def bench_fields(n: int, working_diameter: float | None = None) -> dict:
    from napari_smear import segment_smear

    options = {} if working_diameter is None else {"working_diameter_px": working_diameter}
    from napari_smear.io import read_image

    paths = sorted((DATA / "bccd" / "images").glob("*.jpg"))[:n]
    images = [read_image(p)[0] for p in paths]
    segment_smear(images[0], **options)  # warm-up: imports, first-call allocations
    times = []
    for im in images:
        t0 = time.perf_counter()
        segment_smear(im, **options)
        times.append(time.perf_counter() - t0)
    return {"n_fields": len(times), "seconds_per_field_mean": float(np.mean(times)),
            "seconds_per_field_median": float(np.median(times)), "seconds_per_field_p90": float(np.percentile(times, 90))}


def make_mosaic(side: int) -> np.ndarray:
    from napari_smear.io import read_image

    paths = sorted((DATA / "chula_rbc12" / "images").glob("*.jpg"))
    if paths:
        tiles = [read_image(p)[0] for p in paths[:40]]
    else:
        from napari_smear.samples import synthetic_smear

        # said loudly: figures on synthetic fields are not comparable with the docs' ones
        print(f"no Chula fields under {DATA}: the large image is a mosaic of SYNTHETIC fields", file=sys.stderr)
        tiles = [synthetic_smear(rbc_diameter_px=36, seed=s)[0] for s in range(8)]
    th, tw = tiles[0].shape[:2]
    out = np.empty((side, side, 3), np.uint8)
    k = 0
    for y in range(0, side, th):
        for x in range(0, side, tw):
            t = tiles[k % len(tiles)]
            k += 1
            out[y : y + th, x : x + tw] = t[: side - y, : side - x]
    return out


def bench_large(side: int, workers: int | None, working_diameter: float | None = None) -> dict:
    import torch  # noqa: F401  (imported before timing: the first resize loads it)

    from napari_smear import segment_smear

    image = make_mosaic(side)
    options = {} if working_diameter is None else {"working_diameter_px": working_diameter}
    t0 = time.perf_counter()
    seg = segment_smear(image, n_workers=workers, **options)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    mp = side * side / 1e6
    mosaic_of = "chula_rbc12" if any((DATA / "chula_rbc12" / "images").glob("*.jpg")) else "synthetic"
    return {"side": side, "mosaic_of": mosaic_of, "megapixels": mp, "workers": workers, "seconds": seconds,
            "mp_per_s": mp / seconds,
            "peak_rss_mb": peak_mb, "largest_worker_rss_mb": worker_mb,
            "n_cells": int(seg.n_cells), "rbc_diameter_px": seg.rbc_diameter_px}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--large-side", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=None, help="tile worker processes (default: automatic)")
    ap.add_argument("--large-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--working-diameter", type=float, default=None,
                    help="segment_smear's working_diameter_px (default: its own, 24)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default benchmarks/results/segment_speed.json, or "
                         "segment_speed_wd<N>.json with --working-diameter)")
    args = ap.parse_args(argv)
    if args.out is None:
        name = "segment_speed.json" if args.working_diameter is None else f"segment_speed_wd{args.working_diameter:g}.json"
        args.out = ROOT / "benchmarks" / "results" / name
    if args.large_only:
        print(json.dumps(bench_large(args.large_side, args.workers, args.working_diameter)))
        return
    result = {"working_diameter_px": args.working_diameter}
    if (DATA / "bccd").exists():
        result["fields"] = bench_fields(args.fields, args.working_diameter)
        f = result["fields"]
        print(f"BCCD fields: {f['seconds_per_field_mean']:.3f} s/field mean, {f['seconds_per_field_median']:.3f} median, {f['seconds_per_field_p90']:.3f} p90 ({f['n_fields']} fields)")
    command = [sys.executable, __file__, "--large-only", "--large-side", str(args.large_side)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.working_diameter is not None:
        command += ["--working-diameter", str(args.working_diameter)]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    result["large"] = json.loads(child.stdout.strip().splitlines()[-1])
    g = result["large"]
    print(
        f"large image {g['side']}x{g['side']} ({g['megapixels']:.0f} MP, workers {g['workers'] or 'auto'}): "
        f"{g['seconds']:.1f} s, {g['mp_per_s']:.1f} MP/s, peak RSS {g['peak_rss_mb']:.0f} MB "
        f"(largest worker {g['largest_worker_rss_mb']:.0f} MB), {g['n_cells']} cells"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
