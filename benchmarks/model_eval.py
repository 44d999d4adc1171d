"""Robustness of the built-in white-cell model: original PBC scale and another microscope (BCCD).

1. **Scale.** The PBC copies in ../shared were downscaled by 256/363. Validation images
   are upscaled back by 363/256 (about 360 px, the original CellaVision size) and go
   through the same single-cell path (segment, measure the red-cell size, crop at
   normalised scale, classify); accuracy is compared with the stored size.
2. **Cross-dataset.** Every BCCD field whose ``wbc_types.csv`` entry names exactly one
   WBC type goes through the full path (``analyze``: segment the whole field, crop every
   white cell, classify); the field's prediction is the class of its most confident
   white cell. BCCD names five types; PBC has eight classes, so the figure is given
   both for the model's own argmax (``ig``, ``erythroblast`` or ``platelet`` count as
   wrong) and restricted to the five WBC types BCCD uses (argmax over those five
   probabilities) -- the honest headline is the first.
3. **Red cells elsewhere.** The same pass classifies BCCD's red cells with the built-in
   red-cell model (``--red-cell-model``); BCCD has no red-cell labels, so only the share
   of each answer is reported, next to the model's validation shares. Each field is
   segmented once for both models.
4. **White cells and platelets against the boxes** after classification: detection F1
   with the types of the segmentation alone and with the analysis's types (a white cell
   the white-cell model calls a platelet is re-typed a platelet).

Nothing here is trained on: BCCD is never used for training or for picking an epoch, but
its figure has helped choose between training variants (docs/models.md says which), so
read it as optimistic for a third microscope.

Usage::

    python benchmarks/model_eval.py [--model wbc-pbc8] [--per-class 80] [--bccd-limit 0]

Prints both figures and saves benchmarks/results/model_eval.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # segment_accuracy's box reading and matching
DATA = ROOT.parent / "shared" / "data"
PBC_DOWNSCALE = 256 / 363
BCCD_TO_PBC = {
    "NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte",
    "MONOCYTE": "monocyte", "BASOPHIL": "basophil",
}


def scale_robustness(model, info, per_class: int, device: str) -> dict:
    import pandas as pd
    from skimage.transform import rescale

    from napari_smear.crops import crop_single_cell
    from napari_smear.io import read_image
    from napari_smear.predict import classify_crops

    manifest = pd.read_csv(DATA / "pbc" / "split.csv")
    val = manifest[manifest.split == "val"].sort_values("path")
    val = val.groupby("label", group_keys=False).head(per_class)
    out = {}
    for name, factor in (("stored", 1.0), ("original_360px", 1 / PBC_DOWNSCALE)):
        images, masks, truth, failed = [], [], [], 0
        for row in val.itertuples():
            rgb, _ = read_image(DATA / "pbc" / row.path)
            if factor != 1.0:
                rgb = (rescale(rgb, factor, channel_axis=-1, anti_aliasing=True, order=3) * 255).round().astype(np.uint8)
            try:
                crops = crop_single_cell(rgb, crop_diameters=info.crop_diameters, output_size=info.input_size,
                                         stain_normalization=info.metadata.get("stain_normalization"))
            except Exception:
                failed += 1
                continue
            images.append(crops.images[0])
            masks.append(crops.masks[0])
            truth.append(row.label)
        probs = classify_crops(model, info, np.stack(images), np.stack(masks), device=device,
                               return_attention=False)["probs"]
        predicted = np.asarray(info.class_names)[probs.argmax(1)]
        truth = np.asarray(truth)
        out[name] = {
            "n": int(len(truth)), "failed_to_crop": failed,
            "accuracy": float((predicted == truth).mean()),
            "per_class_accuracy": {c: float((predicted[truth == c] == c).mean()) for c in sorted(set(truth))},
        }
        print(f"PBC val at {name}: accuracy {out[name]['accuracy']:.4f} on {len(truth)} crops "
              f"({failed} could not be cropped)", flush=True)
    return out


def bccd_fields(models, limit: int, device: str):
    """Every BCCD field (the first ``limit`` only, when given), read and analysed once
    (segment, crop, classify) with all ``models``: yields ``(stem, rgb, result)``."""
    from napari_smear import analyze
    from napari_smear.io import read_image

    for path in sorted((DATA / "bccd" / "images").glob("*.jpg"))[: limit or None]:
        rgb, _ = read_image(path)
        yield path.stem, rgb, analyze(rgb, models=models, device=device, morphology=False)


def bccd_white_cell_types() -> dict[str, str]:
    """PBC class of the one WBC type each BCCD field names (fields naming none or several left out)."""
    import pandas as pd

    types = pd.read_csv(DATA / "bccd" / "wbc_types.csv", dtype=str).fillna("")
    single = types[types.wbc_type.isin(list(BCCD_TO_PBC))]
    return {row.image: BCCD_TO_PBC[row.wbc_type] for row in single.itertuples()}


def white_cell_answer(image: str, truth: str, rgb, result, info) -> dict:
    """A field's answer: the class of its most confident white cell, with that cell's
    crop overhang, edge contact and size."""
    five = [c for c in info.class_names if c in BCCD_TO_PBC.values()]
    wbcs = result.table[(result.table.cell_type == "wbc") & result.table["class"].notna()]
    if wbcs.empty:
        return {"image": image, "truth": truth, "predicted": "", "predicted_5": "", "n_wbc": 0}
    best = wbcs.loc[wbcs.confidence.idxmax()]
    p5 = np.array([best[f"p_{c}"] for c in five])
    # how far the cell's crop window reaches past the field (as a share of its side):
    # crop_instances fills that part with glass, which PBC's centred images never show
    half = info.crop_diameters * result.segmentation.rbc_diameter_px / 2
    h, w = rgb.shape[:2]
    overhang = max(0.0, half - best.centroid_y, best.centroid_y + half - h,
                   half - best.centroid_x, best.centroid_x + half - w) / (2 * half)
    return {"image": image, "truth": truth, "predicted": best["class"],
            "predicted_5": five[int(p5.argmax())], "confidence": float(best.confidence),
            "n_wbc": int(len(wbcs)), "crop_overhang": float(overhang),
            "touches_edge": bool(best.get("touches_edge", False)),
            # the cell's size in red-cell diameters (a disk of its area), and the size of
            # the field's white cell(s) by BCCD's own mask, against the same ruler
            "diameter_rbc": float(np.sqrt(4 * best.area_px / np.pi) / result.segmentation.rbc_diameter_px),
            "truth_mask_diameter_rbc": _truth_mask_diameter(image, result.segmentation.rbc_diameter_px)}


def _truth_mask_diameter(image: str, rbc_diameter_px: float) -> float | None:
    """Diameter of a disk of the area of BCCD's white-cell mask of ``image``, in red-cell
    diameters (None without a mask)."""
    from napari_smear.io import read_image

    path = DATA / "bccd" / "wbc_masks" / f"{image}.png"
    if not path.is_file():
        return None
    mask = np.asarray(read_image(path)[0])
    area = int((mask[..., 0] if mask.ndim == 3 else mask).astype(bool).sum())
    return float(np.sqrt(4 * area / np.pi) / rbc_diameter_px) if area else None


def white_cell_report(rows: list[dict], seconds: float) -> dict:
    import pandas as pd

    table = pd.DataFrame(rows).sort_values("image")
    found = table[table.n_wbc > 0]
    report = {
        "n_fields": int(len(table)),
        "fields_without_a_wbc": int((table.n_wbc == 0).sum()),
        "accuracy": float((table.predicted == table.truth).mean()),
        "accuracy_5_types": float((table.predicted_5 == table.truth).mean()),
        "accuracy_on_fields_with_a_wbc": float((found.predicted == found.truth).mean()) if len(found) else None,
        "per_type_accuracy": {t: float((g.predicted == g.truth).mean()) for t, g in table.groupby("truth")},
        "per_type_accuracy_5_types": {t: float((g.predicted_5 == g.truth).mean()) for t, g in table.groupby("truth")},
        "support": table.truth.value_counts().to_dict(),
        "accuracy_by_crop_overhang": _by_overhang(found),
        "accuracy_by_cell_size": _by_cell_size(found),
        "accuracy_by_confidence": _by_confidence(found),
        # the white cell itself cut by the field's edge (the crop shows only part of it)
        "accuracy_by_edge": {
            ("cut by the edge" if cut else "whole"): {"fields": int(len(g)), "accuracy": float((g.predicted == g.truth).mean())}
            for cut, g in found.groupby(found.touches_edge.astype(bool))
        },
        "confusion": pd.crosstab(table.truth, table.predicted).to_dict(),
        # every field's answer, with the answering cell's size and overhang
        "fields": table.to_dict("records"),
        # the whole BCCD pass: every field segmented once, classified by every model evaluated
        "seconds": seconds,
    }
    print(f"BCCD cross-dataset: {report['accuracy']:.4f} (8-class argmax), {report['accuracy_5_types']:.4f} "
          f"(restricted to the 5 BCCD types) over {len(table)} fields; "
          f"{report['fields_without_a_wbc']} fields had no segmented white cell", flush=True)
    return report


def _binned_accuracy(table, column: str, bins, *, upper_closed: bool = False, answers: bool = False) -> dict:
    """Accuracy of the fields grouped by ``column`` into ``bins`` of ``(name, lo, hi)``
    (``lo <= x < hi``, or ``lo < x <= hi`` with ``upper_closed``); with ``answers`` each
    group also lists its true types and the wrong answers given."""
    out = {}
    for name, lo, hi in bins:
        values = table[column]
        inside = (values > lo) & (values <= hi) if upper_closed else (values >= lo) & (values < hi)
        part = table[inside]
        out[name] = {"fields": int(len(part)),
                     "accuracy": float((part.predicted == part.truth).mean()) if len(part) else None}
        if answers:
            out[name]["truth"] = part.truth.value_counts().to_dict()
            out[name]["wrong_answers"] = part[part.predicted != part.truth].predicted.value_counts().to_dict()
    return out


def _by_overhang(table) -> dict:
    """Accuracy of the fields grouped by how far their white cell's crop reaches past the image."""
    bins = [("none", -1.0, 1e-3), ("up to 15 %", 1e-3, 0.15), ("15-30 %", 0.15, 0.30), ("over 30 %", 0.30, 1.0)]
    return _binned_accuracy(table, "crop_overhang", bins, upper_closed=True)


def _by_confidence(table) -> dict:
    """Accuracy of the fields grouped by the confidence of their answer (what
    docs/troubleshooting.md tells users to sort by)."""
    bins = [("under 0.6", 0.0, 0.6), ("0.6-0.8", 0.6, 0.8), ("0.8-0.9", 0.8, 0.9), ("0.9-0.97", 0.9, 0.97),
            ("0.97 and over", 0.97, float("inf"))]
    return _binned_accuracy(table, "confidence", bins)


def _by_cell_size(table) -> dict:
    """Accuracy of the fields grouped by the size of the white cell that answers, in
    red-cell diameters (a disk of its area against the field's ruler), with the wrong
    answers given. Where a smear is thick, white cells do not flatten and look small
    against the red cells; PBC's neutrophils measure 1.6-2.3 (5th-95th percentile)."""
    bins = [("under 1.4", 0.0, 1.4), ("1.4-1.6", 1.4, 1.6), ("1.6-1.8", 1.6, 1.8), ("1.8-2.0", 1.8, 2.0),
            ("2.0 and over", 2.0, float("inf"))]
    return _binned_accuracy(table, "diameter_rbc", bins, answers=True)


class DetectionTally:
    """White-cell and platelet detection against BCCD's boxes, typed by the segmentation
    alone (``segmented_type``) and after the classifiers (``cell_type``: a white cell
    that ``wbc-pbc8`` calls a platelet is re-typed, see
    :func:`napari_smear.pipeline.retype_platelet_clumps`). Matching as in
    ``segment_accuracy.py``: a cell matches a box of its type when its centroid is inside
    it, one to one."""

    KINDS = ("wbc", "platelet")

    def __init__(self):
        self.counts = {(column, kind): [0, 0, 0] for column in ("segmented_type", "cell_type") for kind in self.KINDS}

    def add(self, image: str, table) -> None:
        from segment_accuracy import match_centroids, read_boxes

        boxes = read_boxes(DATA / "bccd" / "boxes" / f"{image}.xml")
        for (column, kind), tally in self.counts.items():
            if column not in table:
                continue
            rows = table[table[column] == kind]
            tally[0] += match_centroids(rows[["centroid_x", "centroid_y"]].to_numpy(), boxes[kind])
            tally[1] += len(rows)
            tally[2] += len(boxes[kind])

    def report(self) -> dict:
        out = {}
        for (column, kind), (tp, n_pred, n_true) in self.counts.items():
            precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
            f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
            out.setdefault(column, {})[kind] = {"precision": precision, "recall": recall, "f1": f1,
                                                "tp": tp, "n_pred": n_pred, "n_true": n_true}
        for column, name in (("segmented_type", "types from the segmentation alone"), ("cell_type", "types after classification")):
            parts = ", ".join(f"{k} F1 {v['f1']:.3f} (P {v['precision']:.3f} R {v['recall']:.3f})"
                              for k, v in out[column].items())
            print(f"BCCD detection, {name}: {parts}", flush=True)
        return out


def red_cell_report(model_name: str, answers: list[str], info, n_fields: int) -> dict:
    """What a red-cell model answers on BCCD, a microscope and stain it never saw.

    BCCD has no red-cell morphology labels, so this is no accuracy: it shows how the
    answers (``answers``: the classes given to whole red cells, cells cut by the edge
    left out) spread over the classes next to the class shares of the model's own
    validation crops.
    """
    import pandas as pd

    counts = pd.Series(answers, dtype=object).value_counts()
    support = ((info.metrics or {}).get("support") or {})
    n_val = sum(support.values()) or 1
    report = {
        "model": model_name,
        "n_fields": n_fields,
        "n_red_cells": int(counts.sum()),
        "share_by_class": {c: float(counts.get(c, 0) / max(counts.sum(), 1)) for c in info.class_names},
        "validation_share_by_class": {c: support.get(c, 0) / n_val for c in info.class_names} if support else None,
    }
    top = ", ".join(f"{c} {v:.0%}" for c, v in sorted(report["share_by_class"].items(), key=lambda kv: -kv[1])[:4])
    print(f"{model_name} on BCCD: {report['n_red_cells']} whole red cells in {n_fields} fields; {top}", flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wbc-pbc8")
    parser.add_argument("--per-class", type=int, default=80, help="PBC val images per class for the scale test")
    parser.add_argument("--bccd-limit", type=int, default=0,
                        help="first N BCCD fields only (0: all); the WBC figure uses those of them that name one type")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--red-cell-model", default="rbc-chula12",
                        help="red-cell model whose answers on BCCD are tallied ('' to skip)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_eval.json"))
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"shared data not found at {DATA}: nothing to evaluate")
        return 2
    from napari_smear.models import load_model

    model, info = load_model(args.model, device="cpu")
    report = {"model": args.model, "model_file": str(info.path),
              "command": " ".join(["python", "benchmarks/model_eval.py", *(argv if argv is not None else sys.argv[1:])])}
    if not args.skip_scale:
        report["pbc_scale"] = scale_robustness(model, info, args.per_class, args.device)
    models = [(model, info)]
    if args.red_cell_model:
        models.append(load_model(args.red_cell_model, device="cpu"))
    truths = bccd_white_cell_types()
    white_rows, red_answers, n_fields = [], [], 0
    detection = DetectionTally()
    started = time.perf_counter()
    for image, rgb, result in bccd_fields(models, args.bccd_limit, args.device):
        n_fields += 1
        if image in truths:
            white_rows.append(white_cell_answer(image, truths[image], rgb, result, info))
        detection.add(image, result.table)
        table = result.table
        whole_red = table[(table.cell_type == "rbc") & ~table.touches_edge & table["class"].notna()]
        red_answers.extend(whole_red["class"].tolist())
    report["bccd"] = white_cell_report(white_rows, time.perf_counter() - started)
    report["bccd_detection"] = detection.report()
    if args.red_cell_model:
        report["red_cells_on_bccd"] = red_cell_report(args.red_cell_model, red_answers, models[1][1], n_fields)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
