"""Batch analysis throughput: fields per second, and where the time goes.

Runs :func:`napari_smear.batch.analyze_files` over real smear fields
(``../shared/data/bccd/images``, 640x480 JPEG) in several set-ups: everything in one
process, and a local Dask cluster of 1 and 2 worker processes (decoding, segmentation,
cropping and writing on the workers, classification in this process), each with the
classifiers and segmentation-only; on a GPU as well when there is one.

Classifiers: the built-in models when installed; otherwise untrained stand-ins with the
default architecture at 96 px (the same computation as trained ones, so the same speed;
the JSON says which were used).

Each set-up first analyses a few other fields (warm-up: imports, first calls, worker
start), then is timed on ``--limit`` fields into a fresh folder. Stage times are the time
spent inside each stage by whichever process ran it, summed over images and shown per
image (with workers, stages of different images overlap).

    .venv/bin/python benchmarks/batch.py --limit 40
    .venv/bin/python benchmarks/batch.py --limit 40 --workers 0,2 --device cuda
    .venv/bin/python benchmarks/batch.py --limit 40 --workers 0 --test-time-views 1,8   # the cost of turned views

Results: printed, and saved to benchmarks/results/batch.json (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "bccd" / "images"
STAGES = ("decode", "segment", "morphology", "crop", "classify", "assemble", "write")


def stand_in_models(folder: Path) -> list[Path]:
    """Untrained models shaped like the built-ins (speed is what is measured)."""
    import torch

    from napari_smear.models import build_model, save_model

    paths = []
    for name, n_classes, cell_types in (("wbc-standin", 8, ["wbc", "platelet"]), ("rbc-standin", 12, ["rbc"])):
        torch.manual_seed(0)
        model = build_model("shape_aware", n_classes)
        path = folder / f"{name}.safetensors"
        save_model(path, model, {
            "class_names": [f"class{i}" for i in range(n_classes)], "mean": [0.8, 0.7, 0.75],
            "std": [0.15, 0.2, 0.1], "input_size": 96, "crop_diameters": 4.0, "cell_types": cell_types,
        })
        paths.append(path)
    return paths


def one_setup(files, warmup, models, workers, device, batch_size, scratch: Path, views=None) -> dict:
    from distributed import Client

    from napari_smear.batch import analyze_files, local_cluster

    options = {"models": models, "device": device, "batch_size": batch_size, "test_time_views": views}
    cluster = client = None
    started = time.perf_counter()
    if workers:
        cluster = local_cluster(workers)
        client = Client(cluster)
        client.wait_for_workers(workers)
    cluster_start = time.perf_counter() - started
    try:
        analyze_files(warmup, scratch / "warmup", scheduler=client, **options)
        report = analyze_files(files, scratch / "timed", scheduler=client, **options)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    timings = report.run["timings"]
    n = max(report.analysed, 1)
    return {
        "workers": workers,
        "device": report.run["settings"]["device"],
        "models": list(report.run["models"]),
        "images": report.analysed,
        "failed": report.failed,
        "wall_s": timings["wall_s"],
        "fields_per_s": round(report.analysed / timings["wall_s"], 3),
        "cluster_start_s": round(cluster_start, 2),
        "ms_per_image": {stage: round(1000 * timings["stage_seconds"].get(stage, 0.0) / n, 1) for stage in STAGES},
        "crops_classified": timings["classifier"]["crops"],
        # with sure_at (off by default): classified again in every view, the first left them unsure
        "crops_turned": timings["classifier"].get("turned_crops", 0),
        "padding_crops": timings["classifier"]["padding_crops"],
        "cells_per_image": round(float(report.summary["cells"].mean()), 1) if len(report.summary) else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of fields (default BCCD)")
    parser.add_argument("--limit", type=int, default=40, help="fields timed per set-up (default 40)")
    parser.add_argument("--warmup", type=int, default=4, help="other fields analysed first (default 4)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: one process)")
    parser.add_argument("--device", default=None, help="classifier device (default: cpu, and cuda when present)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=None,
                        help="model names/files (default: installed built-ins, else stand-ins)")
    parser.add_argument("--no-segmentation-only", action="store_true", help="skip the segmentation-only runs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "batch.json")
    parser.add_argument("--context", default="", help="what else ran on the machine (saved in the JSON)")
    parser.add_argument("--test-time-views", default="default",
                        help="comma-separated turned views per crop for the classifying set-ups, e.g. '1,8' "
                             "(default: each model file's own)")
    args = parser.parse_args()

    import torch

    from napari_smear import __version__
    from napari_smear.models import available_models

    if not args.images.is_dir():
        print(f"no images at {args.images} (needs ../shared/data)", file=sys.stderr)
        return 1
    all_files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png", ".tif"))
    files = all_files[: args.limit]
    warmup = all_files[args.limit: args.limit + args.warmup] or all_files[: args.warmup]
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    workers_list = [int(w) for w in args.workers.split(",")]

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="napari-smear-bench-") as tmp:
        tmp = Path(tmp)
        if args.models is not None:
            models, models_note = args.models, "as given"
        elif set(available_models()) >= {"wbc-pbc8", "rbc-chula12"}:
            models, models_note = ["wbc-pbc8", "rbc-chula12"], "built-in models"
        else:
            models = [str(p) for p in stand_in_models(tmp)]
            models_note = ("built-in models not installed: untrained stand-ins with the default shape_aware "
                           "architecture at 96 px, 8 classes for wbc+platelet and 12 for rbc (same speed)")
        views_list = [None if v.strip() == "default" else int(v) for v in args.test_time_views.split(",")]
        setups = [(m, w, d, v) for d in devices for w in workers_list
                  for m in ([models] + ([] if args.no_segmentation_only or d != "cpu" else [[]]))
                  for v in (views_list if m else [None])]
        results = []
        for k, (chosen, workers, device, views) in enumerate(setups):
            label = (f"{'classify' if chosen else 'segment-only'}, {workers} worker(s), {device}"
                     + (f", {views} view(s)" if views else ""))
            print(f"[{k + 1}/{len(setups)}] {label} ...", flush=True)
            row = one_setup(files, warmup, chosen, workers, device, args.batch_size, tmp / f"run{k}", views)
            row["test_time_views"] = views or "model's own"
            results.append(row)
            stages = ", ".join(f"{s} {row['ms_per_image'][s]:.0f}" for s in STAGES)
            print(f"    {row['fields_per_s']:.2f} fields/s ({row['images']} in {row['wall_s']:.1f} s; cluster start "
                  f"{row['cluster_start_s']:.1f} s not included); ms per image: {stages}", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "benchmark": "batch analysis throughput (benchmarks/batch.py)",
        "images": str(args.images), "limit": len(files),
        "models": models_note,
        "napari_smear": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start, "load_average_at_end": load,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "context": args.context,
        "note": ("ms_per_image: time inside each stage (perf_counter, in the worker or main process that ran "
                 "it), summed over images and divided by their number; stages of different images overlap "
                 "when workers run, and on a busy machine a stage's time includes waiting for a core"),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'set-up':44s} {'fields/s':>9s}  " + " ".join(f"{s:>9s}" for s in STAGES))
    for row in results:
        label = (f"{'classify' if row['models'] else 'segment-only'}, {row['workers']} worker(s), {row['device']}"
                 + (f", views {row['test_time_views']}" if row["models"] else ""))
        print(f"{label:44s} {row['fields_per_s']:9.2f}  " + " ".join(f"{row['ms_per_image'][s]:9.0f}" for s in STAGES))
    print(f"models: {models_note}\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
