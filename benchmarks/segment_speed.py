"""Segmentation speed: seconds per BCCD field, and MP/s + peak RSS on a large tiled image.

Usage: python benchmarks/segment_speed.py [--fields 40] [--large-side 10000] [--workers N] [--working-diameter PX]
       python benchmarks/segment_speed.py --on-disk --large-side 20000   (a slide through memory-mapped files)
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


def _run_sampling_anonymous_memory(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command``; also its peak anonymous memory in MB (RssAnon, sampled every
    20 ms from here: a sampling thread inside it would make the package start its
    workers by fork server instead of fork)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kb = 0
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    stdout, stderr = child.communicate()
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr), peak_kb / 1024


def bench_on_disk(tiff: Path, workers: int | None, working_diameter: float | None = None) -> dict:
    """``napari-smear segment --on-disk`` on a TIFF: time and memory (RSS counts the
    file pages the maps touched; anonymous memory is what the process itself holds)."""
    import tempfile

    import torch  # noqa: F401  (imported before timing: the first resize loads it)

    from napari_smear import segment_smear  # noqa: F401
    from napari_smear.batch import segment_files

    with tempfile.TemporaryDirectory(dir=tiff.parent) as out:
        t0 = time.perf_counter()
        summary = segment_files([tiff], out, working_diameter_px=working_diameter, on_disk=True)
        seconds = time.perf_counter() - t0
    row = summary.iloc[0]
    if row.error:
        raise RuntimeError(row.error)
    import tifffile

    side = tifffile.TiffFile(tiff).series[0].shape[0]
    mp = side * side / 1e6
    return {"side": side, "mosaic_of": "chula_rbc12" if any((DATA / "chula_rbc12" / "images").glob("*.jpg")) else "synthetic",
            "megapixels": mp, "workers": workers, "on_disk": True, "seconds": seconds, "mp_per_s": mp / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "n_cells": int(row.wbc + row.rbc + row.platelet), "rbc_diameter_px": float(row.rbc_diameter_px),
            "seconds_include": "reading the TIFF, segmenting, writing the label TIFFs and the table"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--large-side", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=None, help="tile worker processes (default: automatic)")
    ap.add_argument("--large-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--on-disk", action="store_true",
                    help="write the large image to an uncompressed TIFF and segment it as `napari-smear segment "
                         "--on-disk` does (memory-mapped; includes writing the outputs); skips the BCCD fields")
    ap.add_argument("--tiff", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--working-diameter", type=float, default=None,
                    help="segment_smear's working_diameter_px (default: its own, 24)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default benchmarks/results/segment_speed.json, or "
                         "segment_speed_wd<N>.json with --working-diameter)")
    args = ap.parse_args(argv)
    if args.out is None:
        name = "segment_speed.json" if args.working_diameter is None else f"segment_speed_wd{args.working_diameter:g}.json"
        if args.on_disk:
            name = name.replace("segment_speed", "segment_speed_on_disk")
        args.out = ROOT / "benchmarks" / "results" / name
    if args.large_only:
        if args.tiff is not None:
            print(json.dumps(bench_on_disk(args.tiff, args.workers, args.working_diameter)))
        else:
            print(json.dumps(bench_large(args.large_side, args.workers, args.working_diameter)))
        return
    result = {"working_diameter_px": args.working_diameter}
    if args.on_disk:
        import tempfile

        import tifffile

        scratch = tempfile.TemporaryDirectory(prefix="segment-speed-")
        tiff = Path(scratch.name) / "mosaic.tif"
        tifffile.imwrite(tiff, make_mosaic(args.large_side), bigtiff=True)  # uncompressed: mapped in place
        child, anonymous_mb = _run_sampling_anonymous_memory(_child_command(args, "--tiff", str(tiff)))
        scratch.cleanup()
        if child.returncode:
            sys.exit(child.stderr)
        result["large_on_disk"] = g = json.loads(child.stdout.strip().splitlines()[-1])
        g["peak_anonymous_mb"] = anonymous_mb
        print(
            f"large image on disk {g['side']}x{g['side']} ({g['megapixels']:.0f} MP): {g['seconds']:.1f} s, "
            f"{g['mp_per_s']:.1f} MP/s, peak anonymous memory {g['peak_anonymous_mb']:.0f} MB, peak RSS "
            f"{g['peak_rss_mb']:.0f} MB (with file pages), largest worker {g['largest_worker_rss_mb']:.0f} MB, "
            f"{g['n_cells']} cells"
        )
        _save(result, args.out)
        return
    if (DATA / "bccd").exists():
        result["fields"] = bench_fields(args.fields, args.working_diameter)
        f = result["fields"]
        print(f"BCCD fields: {f['seconds_per_field_mean']:.3f} s/field mean, {f['seconds_per_field_median']:.3f} median, {f['seconds_per_field_p90']:.3f} p90 ({f['n_fields']} fields)")
    child = subprocess.run(_child_command(args, "--large-side", str(args.large_side)),
                           capture_output=True, text=True, check=True)
    result["large"] = json.loads(child.stdout.strip().splitlines()[-1])
    g = result["large"]
    print(
        f"large image {g['side']}x{g['side']} ({g['megapixels']:.0f} MP, workers {g['workers'] or 'auto'}): "
        f"{g['seconds']:.1f} s, {g['mp_per_s']:.1f} MP/s, peak RSS {g['peak_rss_mb']:.0f} MB "
        f"(largest worker {g['largest_worker_rss_mb']:.0f} MB), {g['n_cells']} cells"
    )
    _save(result, args.out)


def _child_command(args, *extra: str) -> list[str]:
    """This script again, measuring the large image in a fresh process."""
    command = [sys.executable, __file__, "--large-only", *extra]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.working_diameter is not None:
        command += ["--working-diameter", str(args.working_diameter)]
    return command


def _save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
