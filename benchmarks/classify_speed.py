"""Classification speed: crops per second for each model kind, through classify_crops.

Measures the same call the pipeline makes (preprocessing on the device, autocast, BatchNorm
folding, channels-last, attention maps returned), at batch 256 on CPU with 1 and 2 threads
and, when CUDA is present, on the GPU with AMP (also at larger batches).

Usage::

    python benchmarks/classify_speed.py [--n 2048] [--size 96] [--kinds plain shape_aware ...]
                                        [--threads 1 2] [--models wbc-pbc8 rbc-chula12]

``--models`` also times built-in models or model files as shipped (their own input size).
Prints a table and saves benchmarks/results/classify_speed.json (or --out).
Targets (issue 3): >= 800 crops/s for the default model on 2 CPU cores; >= 30,000 crops/s
on an H100 with AMP.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _crops(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    inner = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 8) ** 2
    masks = np.broadcast_to(np.stack([disk, inner])[None], (n, 2, size, size)).astype(np.uint8)
    return images, masks


def _time(model, info, device, n, batch, repeats=2, **kwargs) -> float:
    from napari_smear.predict import classify_crops

    images, masks = _crops(n, int(info.input_size))
    classify_crops(model, info, images[: min(n, batch)], masks[: min(n, batch)], device=device,
                   batch_size=batch, progress=False, **kwargs)  # warm-up
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        classify_crops(model, info, images, masks, device=device, batch_size=batch, progress=False, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="crops per timed run (CPU)")
    parser.add_argument("--gpu-n", type=int, default=65536, help="crops per timed run (GPU)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--kinds", nargs="*", default=["plain", "shape_aware", "gated_attention", "daffnet",
                                                       "global_attention"])
    parser.add_argument("--models", nargs="*", default=[], help="built-in model names or files to time too")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "classify_speed.json"))
    args = parser.parse_args(argv)

    import torch

    from napari_smear.models import build_model, load_model

    subjects = []
    for kind in args.kinds:
        model = build_model(kind, 8)
        subjects.append((kind, model, _info(model, args.size)))
    for name in args.models:
        model, info = load_model(name, device="cpu")
        subjects.append((name, model, info))

    rows = []
    for name, model, info in subjects:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for threads in args.threads:
            torch.set_num_threads(threads)
            rate = _time(model, info, "cpu", args.n, args.batch)
            row = {"model": name, "device": "cpu", "threads": threads, "batch": args.batch,
                   "input_size": int(info.input_size), "params_M": round(params, 3), "crops_per_s": round(rate, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            for batch in (args.batch, 1024, 4096):
                rate = _time(model, info, "cuda", args.gpu_n, batch, repeats=3)
                row = {"model": name, "device": torch.cuda.get_device_name(0), "threads": None, "batch": batch,
                       "input_size": int(info.input_size), "params_M": round(params, 3),
                       "crops_per_s": round(rate, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    report = {
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "note": "classify_crops with autocast (bf16 on CPU where native, fp16/bf16 on CUDA), BatchNorm folded, "
                "channels-last, attention maps returned; random crops; best of repeated runs after a warm-up",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print()
    print("| model | device | threads | batch | input | params (M) | crops/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['threads'] or '-'} | {r['batch']} | {r['input_size']} | "
              f"{r['params_M']} | {r['crops_per_s']:.0f} |")
    return 0


def _info(model, size):
    from napari_smear.models import ModelInfo

    return ModelInfo(
        kind=model.kind, config=model.config, class_names=[f"c{i}" for i in range(model.num_classes)],
        input_size=size, crop_diameters=4.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )


if __name__ == "__main__":
    sys.exit(main())
