"""Segmentation accuracy on the real shared data.

Measures, with ``napari_smear.segment_smear`` at its defaults (automatic scale):
- BCCD: mean WBC Dice (whole cell, nucleus) against ``bccd/wbc_masks``; detection F1 for
  RBC / WBC / platelet against ``bccd/boxes`` (a predicted cell matches an unmatched box
  of its type when its centroid lies inside the box). The boxes leave out most cells cut
  by the image edge, so a second figure ("edge-ignored") does not count a prediction
  touching the edge that lies in no box of its type as a false positive; the strict
  figure counts every prediction;
- Chula RBC-12: the share of labelled red-cell points inside a segmented red cell, and
  how round the whole cells labelled normal are drawn (median circularity and
  perimeter; pixel steps on the outline lower the one and raise the other).

Usage: python benchmarks/segment_accuracy.py [--data ../shared/data] [--limit N] [--working-diameter PX]
Prints a table and saves benchmarks/results/segment_accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
BOX_TYPES = {"RBC": "rbc", "WBC": "wbc", "Platelets": "platelet"}


def read_boxes(xml_path: Path) -> dict[str, np.ndarray]:
    boxes = {t: [] for t in BOX_TYPES.values()}
    for obj in ET.parse(xml_path).getroot().iter("object"):
        kind = BOX_TYPES.get(obj.findtext("name", "").strip())
        if kind is None:
            continue
        bb = obj.find("bndbox")
        boxes[kind].append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return {k: np.asarray(v, float).reshape(-1, 4) for k, v in boxes.items()}


def match_centroids(centroids_xy: np.ndarray, boxes: np.ndarray) -> int:
    """Greedy one-to-one matching of centroids to boxes containing them (smallest box first)."""
    if len(centroids_xy) == 0 or len(boxes) == 0:
        return 0
    inside = (
        (centroids_xy[:, None, 0] >= boxes[None, :, 0])
        & (centroids_xy[:, None, 0] <= boxes[None, :, 2])
        & (centroids_xy[:, None, 1] >= boxes[None, :, 1])
        & (centroids_xy[:, None, 1] <= boxes[None, :, 3])
    )
    used_pred = np.zeros(len(centroids_xy), bool)
    matched = 0
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = np.c_[(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2]
    for b in np.argsort(area):
        cands = np.flatnonzero(inside[:, b] & ~used_pred)
        if cands.size:
            best = cands[np.argmin(((centroids_xy[cands] - centre[b]) ** 2).sum(1))]
            used_pred[best] = True
            matched += 1
    return matched


def in_any_box(centroids_xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each centroid lies inside at least one box."""
    if len(centroids_xy) == 0 or len(boxes) == 0:
        return np.zeros(len(centroids_xy), bool)
    return (
        (centroids_xy[:, None, 0] >= boxes[None, :, 0])
        & (centroids_xy[:, None, 0] <= boxes[None, :, 2])
        & (centroids_xy[:, None, 1] >= boxes[None, :, 1])
        & (centroids_xy[:, None, 1] <= boxes[None, :, 3])
    ).any(1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def evaluate_bccd(data: Path, limit: int | None, segment, read):
    images = sorted((data / "bccd" / "images").glob("*.jpg"))[:limit]
    counts = {t: {"tp": 0, "n_pred": 0, "n_true": 0, "n_edge_unboxed": 0} for t in BOX_TYPES.values()}
    dice_cell, dice_nuc, seconds = [], [], []
    for path in images:
        rgb = read(path)
        t0 = time.perf_counter()
        seg = segment(rgb)
        seconds.append(time.perf_counter() - t0)
        boxes = read_boxes(data / "bccd" / "boxes" / f"{path.stem}.xml")
        h, w = seg.labels.shape
        for kind in counts:
            rows = seg.table[seg.table.cell_type == kind]
            cxy = rows[["centroid_x", "centroid_y"]].to_numpy()
            counts[kind]["tp"] += match_centroids(cxy, boxes[kind])
            counts[kind]["n_pred"] += len(rows)
            counts[kind]["n_true"] += len(boxes[kind])
            at_edge = (
                (rows.bbox_min_y <= 0) | (rows.bbox_min_x <= 0) | (rows.bbox_max_y >= h) | (rows.bbox_max_x >= w)
            ).to_numpy()
            counts[kind]["n_edge_unboxed"] += int((at_edge & ~in_any_box(cxy, boxes[kind])).sum())
        mask_path = data / "bccd" / "wbc_masks" / f"{path.stem}.png"
        if mask_path.exists():
            truth = read(mask_path, rgb=False)
            if truth.ndim == 3:
                truth = truth[..., 0]
            if (truth > 0).any():
                wbc_ids = seg.table.label[seg.table.cell_type == "wbc"].to_numpy()
                pred_cell = np.isin(seg.labels, wbc_ids)
                dice_cell.append(dice(pred_cell, truth > 0))
                dice_nuc.append(dice(seg.nuclei > 0, truth == 2))
    f1 = {}
    for kind, c in counts.items():
        p = c["tp"] / max(c["n_pred"], 1)
        r = c["tp"] / max(c["n_true"], 1)
        p_edge = c["tp"] / max(c["n_pred"] - c["n_edge_unboxed"], 1)
        f1[kind] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / max(p + r, 1e-9),
            "precision_edge_ignored": p_edge,
            "f1_edge_ignored": 2 * p_edge * r / max(p_edge + r, 1e-9),
            **c,
        }
    return {
        "n_images": len(images),
        "wbc_dice_cell": float(np.mean(dice_cell)),
        "wbc_dice_nucleus": float(np.mean(dice_nuc)),
        "n_wbc_masks": len(dice_cell),
        "detection": f1,
        "seconds_per_field_mean": float(np.mean(seconds)),
    }


def evaluate_chula(data: Path, limit: int | None, segment, read):
    """Share of the labelled points that fall inside a segmented red cell, and the
    outline fidelity of the cells labelled normal: their median circularity
    (4 pi area / perimeter^2; a round cell drawn with pixel steps scores low) and
    perimeter in units of the ruler's circle (pi d), both from
    :func:`napari_smear.morphology.morphology_table`, cells cut by the edge left out."""
    from napari_smear.morphology import morphology_table

    images = sorted((data / "chula_rbc12" / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)[:limit]
    inside = total = 0
    circularity, perimeter = [], []
    for path in images:
        label_file = data / "chula_rbc12" / "labels" / f"{path.stem}.txt"
        if not label_file.exists():
            continue
        pts = np.loadtxt(label_file, ndmin=2)
        if pts.size == 0:
            continue
        rgb = read(path)
        seg = segment(rgb)
        rbc_ids = seg.table.label[seg.table.cell_type == "rbc"].to_numpy()
        h, w = seg.labels.shape
        xs = np.clip(pts[:, 0].round().astype(int), 0, w - 1)
        ys = np.clip(pts[:, 1].round().astype(int), 0, h - 1)
        hit = seg.labels[ys, xs]
        inside += int(np.isin(hit, rbc_ids).sum())
        total += len(pts)
        whole = seg.table.label[(seg.table.cell_type == "rbc") & ~seg.table.touches_edge].to_numpy()
        normal = np.unique(hit[(pts[:, 2] == 0) & np.isin(hit, whole)])
        if normal.size:
            morph = morphology_table(rgb, seg).set_index("label").loc[normal]
            circularity.extend(morph.circularity.tolist())
            perimeter.extend(morph.perimeter_rbc.tolist())
    return {
        "n_images": len(images),
        "n_points": total,
        "point_recall": inside / max(total, 1),
        "n_normal_cells": len(circularity),
        "normal_rbc_circularity_median": float(np.median(circularity)) if circularity else None,
        "normal_rbc_perimeter_rbc_median": float(np.median(perimeter)) if perimeter else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default benchmarks/results/segment_accuracy.json, or "
                         "segment_accuracy_wd<N>.json with --working-diameter)")
    ap.add_argument("--working-diameter", type=float, default=None,
                    help="segment_smear's working_diameter_px (red-cell size in working pixels; "
                         "default: segment_smear's own, 24): the speed/accuracy trade-off")
    args = ap.parse_args(argv)
    if args.out is None:
        name = "segment_accuracy.json" if args.working_diameter is None else f"segment_accuracy_wd{args.working_diameter:g}.json"
        args.out = ROOT / "benchmarks" / "results" / name
    if not args.data.exists():
        sys.exit(f"shared data not found at {args.data}")
    import imageio.v3 as iio

    from napari_smear import segment_smear

    if args.working_diameter is not None:
        import functools

        segment_smear = functools.partial(segment_smear, working_diameter_px=args.working_diameter)

    def read(path, rgb=True):
        return np.asarray(iio.imread(path))

    results = {
        "working_diameter_px": args.working_diameter,
        "bccd": evaluate_bccd(args.data, args.limit, segment_smear, read),
        "chula": evaluate_chula(args.data, args.limit, segment_smear, read),
    }
    b, c = results["bccd"], results["chula"]
    print(f"BCCD ({b['n_images']} fields, {b['n_wbc_masks']} WBC masks)")
    print(f"  WBC Dice: cell {b['wbc_dice_cell']:.3f}  nucleus {b['wbc_dice_nucleus']:.3f}")
    for kind, m in b["detection"].items():
        print(
            f"  {kind:9s} F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  (pred {m['n_pred']}, boxes {m['n_true']})"
            f" | edge-ignored F1 {m['f1_edge_ignored']:.3f}  precision {m['precision_edge_ignored']:.3f}"
        )
    print(f"  mean seconds per field (incl. first-call warm-up): {b['seconds_per_field_mean']:.3f}")
    print(f"Chula RBC-12 ({c['n_images']} fields, {c['n_points']} points): point recall {c['point_recall']:.3f}")
    if c["n_normal_cells"]:
        print(f"  {c['n_normal_cells']} whole red cells labelled normal: median circularity "
              f"{c['normal_rbc_circularity_median']:.3f}, perimeter {c['normal_rbc_perimeter_rbc_median']:.3f} x pi d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
