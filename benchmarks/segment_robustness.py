"""Segmentation of real fields photographed the way a phone or an old camera would:
vignetting, and a round eyepiece view in a black frame.

The fields of ../shared/data (every ``--step``-th BCCD and Chula RBC-12 field) are
degraded with :func:`napari_smear.samples.eyepiece_photo` and segmented at the defaults:

- ``plain``: as stored;
- ``vignette 10 %`` / ``vignette 20 %``: the light falls by that share at 0.55 of the
  short side from the centre (by more in the corners), no frame;
- ``eyepiece``: a round view of radius 0.55 of the short side in a black, noisy frame,
  fading over 1.5 % of the radius, with 10 % vignetting inside.

Measured: BCCD WBC Dice (cell) and WBC / RBC recall against the boxes, Chula point
recall, as in ``segment_accuracy.py``; for the eyepiece, only boxes and points whose
centre lies in the inner 90 % of the view's radius count, and the cells whose centroid
lies in the frame (outside the view) and cells larger than 4 red cells are counted
(the first should be 0; white cells reach 4 red cells' area, so the second is not 0 on
plain fields either), and the fields whose red-cell size could not be measured (they
count as fields with no cell found).

Usage: python benchmarks/segment_robustness.py [--data ../shared/data] [--step 3]
Prints a table and saves benchmarks/results/segment_robustness.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segment_accuracy import DEFAULT_DATA, dice, match_centroids, read_boxes  # noqa: E402

CONDITIONS = {
    "plain": None,
    "vignette 10 %": {"radius": 0.55, "vignette": 0.10, "frame": False},
    "vignette 20 %": {"radius": 0.55, "vignette": 0.20, "frame": False},
    "eyepiece": {"radius": 0.55, "vignette": 0.10, "fade": 0.015, "frame": True},
}
INNER = 0.9  # boxes and points count when their centre lies this far in (share of the radius)


def degrade(rgb: np.ndarray, condition: dict | None):
    """The degraded field and each pixel's radial position (None for the plain field)."""
    from napari_smear.samples import eyepiece_photo

    if condition is None:
        return rgb, None
    return eyepiece_photo(rgb, **condition)


def run_condition(data: Path, step: int, condition: dict | None, segment, read) -> dict:
    framed = bool(condition and condition["frame"])
    tp = {"rbc": 0, "wbc": 0}
    n_true = {"rbc": 0, "wbc": 0}
    dices, outside, giant, seconds = [], 0, 0, []
    bccd = sorted((data / "bccd" / "images").glob("*.jpg"))[::step]
    for path in bccd:
        rgb, radial = degrade(read(path), condition)
        t0 = time.perf_counter()
        seg = segment(rgb)
        seconds.append(time.perf_counter() - t0)
        boxes = read_boxes(data / "bccd" / "boxes" / f"{path.stem}.xml")
        for kind in tp:
            b = boxes[kind]
            if framed and len(b):
                cy = ((b[:, 1] + b[:, 3]) / 2).astype(int).clip(0, rgb.shape[0] - 1)
                cx = ((b[:, 0] + b[:, 2]) / 2).astype(int).clip(0, rgb.shape[1] - 1)
                b = b[radial[cy, cx] < INNER]
            rows = seg.table[seg.table.cell_type == kind]
            tp[kind] += match_centroids(rows[["centroid_x", "centroid_y"]].to_numpy(), b)
            n_true[kind] += len(b)
        outside, giant = _count_misplaced(seg, radial, framed, outside, giant)
        mask_path = data / "bccd" / "wbc_masks" / f"{path.stem}.png"
        if not framed and mask_path.exists():
            truth = read(mask_path)
            truth = truth[..., 0] if truth.ndim == 3 else truth
            if (truth > 0).any():
                wbc = seg.table.label[seg.table.cell_type == "wbc"].to_numpy()
                dices.append(dice(np.isin(seg.labels, wbc), truth > 0))
    inside = total = 0
    chula = sorted((data / "chula_rbc12" / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)[::step]
    for path in chula:
        label_file = data / "chula_rbc12" / "labels" / f"{path.stem}.txt"
        if not label_file.exists() or label_file.stat().st_size == 0:
            continue
        pts = np.loadtxt(label_file, ndmin=2)
        rgb, radial = degrade(read(path), condition)
        seg = segment(rgb)
        h, w = seg.labels.shape
        xs = np.clip(pts[:, 0].round().astype(int), 0, w - 1)
        ys = np.clip(pts[:, 1].round().astype(int), 0, h - 1)
        keep = radial[ys, xs] < INNER if framed else np.ones(len(pts), bool)
        rbc = seg.table.label[seg.table.cell_type == "rbc"].to_numpy()
        inside += int(np.isin(seg.labels[ys[keep], xs[keep]], rbc).sum())
        total += int(keep.sum())
        outside, giant = _count_misplaced(seg, radial, framed, outside, giant)
    return {
        "bccd_fields": len(bccd),
        "chula_fields": len(chula),
        "wbc_dice_cell": float(np.mean(dices)) if dices else None,
        "wbc_recall": tp["wbc"] / max(n_true["wbc"], 1),
        "rbc_recall": tp["rbc"] / max(n_true["rbc"], 1),
        "boxes": n_true,
        "chula_point_recall": inside / max(total, 1),
        "chula_points": total,
        "cells_in_frame": outside,
        "cells_over_4_rbc": giant,
        "bccd_seconds_per_field": float(np.mean(seconds)),
    }


def _count_misplaced(seg, radial, framed, outside, giant):
    table = seg.table
    if framed and len(table):
        cy = table.centroid_y.to_numpy().round().astype(int)
        cx = table.centroid_x.to_numpy().round().astype(int)
        outside += int((radial[cy, cx] > 1.0).sum())
    giant += int((table.area_px > 4 * np.pi / 4 * seg.rbc_diameter_px**2).sum())
    return outside, giant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--step", type=int, default=3, help="every N-th field of each set")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment_robustness.json")
    args = ap.parse_args(argv)
    if not args.data.exists():
        sys.exit(f"shared data not found at {args.data}")
    import warnings

    import imageio.v3 as iio

    from napari_smear import segment_smear
    from napari_smear.segment import ScaleEstimateError, _empty

    def read(path):
        return np.asarray(iio.imread(path))

    failures: list[str] = []

    def segment(rgb):
        with warnings.catch_warnings():  # sparse-field warnings: the figures say it
            warnings.simplefilter("ignore")
            try:
                return segment_smear(rgb)
            except ScaleEstimateError:  # no ruler: the field counts with no cell found
                failures.append("no scale")
                return _empty(rgb.shape[:2], float("nan"), None)

    results = {"step": args.step, "conditions": {}}
    print(f"{'condition':15s} {'WBC Dice':>8s} {'WBC rec':>8s} {'RBC rec':>8s} {'Chula rec':>9s} {'in frame':>8s} "
          f"{'> 4 RBC':>7s} {'no scale':>8s}")
    for name, condition in CONDITIONS.items():
        failures.clear()
        r = run_condition(args.data, args.step, condition, segment, read)
        r["fields_without_scale"] = len(failures)
        results["conditions"][name] = {"condition": condition, **r}
        dice_text = "-" if r["wbc_dice_cell"] is None else f"{r['wbc_dice_cell']:.3f}"
        print(f"{name:15s} {dice_text:>8s} {r['wbc_recall']:8.3f} {r['rbc_recall']:8.3f} "
              f"{r['chula_point_recall']:9.3f} {r['cells_in_frame']:8d} {r['cells_over_4_rbc']:7d} "
              f"{r['fields_without_scale']:8d}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
