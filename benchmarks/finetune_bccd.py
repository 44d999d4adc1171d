"""How many labelled cells of a new microscope does fine-tuning need?

A lab whose microscope is not PBC's gets `wbc-pbc8` right on about three BCCD fields in
four (docs/models.md). The tool's answer is to fine-tune it on a few of the lab's own
labelled white cells (*Train classifier*, ``napari-smear train --init-from wbc-pbc8``).
This measures that answer on BCCD, standing in for the lab's microscope:

- The BCCD fields naming one white-cell type are split by a fixed hash of their file
  name into two halves, each type evenly. Basophil (one field) is left out: too few to
  adapt or to score.
- Every field is segmented and cropped as in use (`pipeline.crop_for_models`: stain
  normalisation, normalised scale); the annotated white cell is the segmented white
  cell that BCCD's own white-cell mask overlaps most.
- `wbc-pbc8` is fine-tuned from its shipped file on the annotated cells of N fields per
  type of one half (all of them at most), as a user would with the Train classifier:
  ``train(init_from="wbc-pbc8", lr=5e-4, epochs=30)`` (the CLI's fine-tuning
  defaults; train() holds 15 % of the cells out to pick the epoch; ``--options`` adds
  more), and types the annotated cells of the other half. Then the halves swap (two
  folds), so every field is scored once, by a model that never saw it. Small N are
  drawn again with several seeds (draw and training).
- Scores: accuracy among the four types, and balanced accuracy (the mean of the
  types' recalls: a model fine-tuned on few cells answers as if the types were
  equally common, while BCCD's fields are 60 % neutrophils). The shipped model's own
  8-class answer is given too. Every model answers with 8 turned views, as shipped.

Nothing from BCCD reaches the shipped model: this benchmark documents the fine-tuning
route, it does not change `wbc-pbc8` (whose BCCD figure is for a model never trained on
BCCD).

    .venv/bin/python benchmarks/finetune_bccd.py                 # N = 5, 10, 20, all; 3 seeds
    .venv/bin/python benchmarks/finetune_bccd.py --sizes 5 --seeds 1 --limit 60   # quick look

Results: printed, and saved to benchmarks/results/finetune_bccd.json (``--json``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT.parent / "shared" / "data"
TYPES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")  # BCCD's types with >= 17 fields
FINE_TUNE = {"lr": 5e-4, "epochs": 30}  # napari-smear train --init-from's defaults


def split_fields(truth: dict[str, str]) -> dict[str, str]:
    """``adapt`` or ``held_out`` per field: within each type, fields ordered by a hash
    of their name, alternately (so the split never depends on the run)."""
    split = {}
    for cell_type in TYPES:
        stems = sorted((s for s, t in truth.items() if t == cell_type),
                       key=lambda s: hashlib.sha1(s.encode()).hexdigest())
        for i, stem in enumerate(stems):
            split[stem] = "adapt" if i % 2 == 0 else "held_out"
    return split


def annotated_cells(truth: dict[str, str], spec, limit: int):
    """Per field, the crop of its annotated white cell: ``{stem: (image, masks)}``
    (fields whose annotated cell was not segmented as a white cell are absent)."""
    from napari_smear.io import read_image
    from napari_smear.pipeline import crop_for_models
    from napari_smear.segment import segment_smear

    cells, missed = {}, []
    stems = sorted(truth)[: limit or None]
    for number, stem in enumerate(stems, 1):
        rgb, _ = read_image(DATA / "bccd" / "images" / f"{stem}.jpg")
        annotated = read_image(DATA / "bccd" / "wbc_masks" / f"{stem}.png", rgb=False)[0] > 0
        segmentation = segment_smear(rgb)
        crops, _ = crop_for_models(rgb, segmentation, [spec])
        found = crops.get(spec.name)
        if found is None or not len(found):
            missed.append(stem)
            continue
        white = np.isin(found.labels, segmentation.table.label[segmentation.table.cell_type == "wbc"])
        # pixels of BCCD's mask under each label, in one pass over the image
        overlap = np.bincount(segmentation.labels[annotated], minlength=int(found.labels.max()) + 1)[found.labels]
        overlap[~white] = 0
        if overlap.max() == 0:
            missed.append(stem)
            continue
        best = int(overlap.argmax())
        cells[stem] = (found.images[best], found.masks[best])
        if number % 50 == 0:
            print(f"  cropped {number} of {len(stems)} fields", flush=True)
    return cells, missed


def crop_set_of(stems, cells, truth, split_name):
    from napari_smear.datasets import CropSet

    n = len(stems)
    return CropSet(
        images=np.stack([cells[s][0] for s in stems]), masks=np.stack([cells[s][1] for s in stems]),
        morph=np.zeros((n, 0), np.float32), labels=np.array([TYPES.index(truth[s]) for s in stems]),
        class_names=list(TYPES), split=np.array([split_name] * n), attributes=np.zeros((n, 0), np.int8),
        attribute_names=[], attribute_values=[], paths=np.array([f"bccd/{s}.jpg" for s in stems]),
        crop_diameters=4.0, source="BCCD annotated white cells (benchmarks/finetune_bccd.py)",
        stain_normalization="anchored-v1",
    )


def answers(model_file, stems, cells, device) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's answer among the four types, and the model's own (8-class) answer."""
    from napari_smear.models import load_model
    from napari_smear.predict import classify_crops

    model, info = load_model(model_file, device="cpu")
    out = classify_crops(model, info, np.stack([cells[s][0] for s in stems]),
                         np.stack([cells[s][1] for s in stems]), device=device, return_attention=False,
                         progress=False)
    names = list(info.class_names)
    columns = [names.index(t) for t in TYPES]
    return np.array(TYPES)[out["probs"][:, columns].argmax(axis=1)], np.array(names)[out["probs"].argmax(axis=1)]


def scores(truths: np.ndarray, four: np.ndarray, own: np.ndarray | None = None) -> dict:
    """Accuracy among the four types, balanced accuracy (mean recall of the types: a
    fine-tuned model answers as if the types were equally common) and per-type recall."""
    recall = {t: float((four[truths == t] == t).mean()) for t in TYPES if (truths == t).any()}
    out = {"accuracy_4_types": float((four == truths).mean()), "balanced_accuracy": float(np.mean(list(recall.values()))),
           "recall_per_type": recall, "n": int(len(truths))}
    if own is not None:
        out["accuracy_own_classes"] = float((own == truths).mean())
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,10,20,all", help="adapting fields per type, comma separated")
    parser.add_argument("--seeds", type=int, default=3, help="draws (and training seeds) per size below 'all'")
    parser.add_argument("--limit", type=int, default=0, help="only the first N fields (a quick look)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--options", default="{}", help="more train() options as JSON, e.g. '{\"average_weights_from\": 1}'")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "bccd_annotated_cells.npz",
                        help="the annotated cells' crops, kept between runs (made again when missing or "
                             "made by other segmentation or cropping code)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_bccd.json")
    args = parser.parse_args(argv)
    if not (DATA / "bccd" / "wbc_types.csv").exists():
        raise SystemExit(f"BCCD data not found under {DATA}: this benchmark needs ../shared/data")
    import torch

    from model_eval import bccd_white_cell_types
    from napari_smear.datasets import crop_code_version
    from napari_smear.pipeline import load_models
    from napari_smear.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    truth = {s: t for s, t in bccd_white_cell_types().items() if t in TYPES}
    split = split_fields(truth)
    shipped = load_models(["wbc-pbc8"], device="cpu")[0]
    started = time.perf_counter()
    cached = args.cache if args.cache and not args.limit else None
    stored = None
    if cached is not None and cached.exists():
        with np.load(cached) as archive:
            # crops of another segmentation or cropping code would not be what analysis cuts now
            if "code_version" in archive and str(archive["code_version"]) == crop_code_version():
                stored = {key: archive[key] for key in archive.files}
    if stored is not None:
        cells = {s: (image, masks) for s, image, masks in zip(stored["stems"], stored["images"], stored["masks"])}
        missed = list(stored["missed"])
        print(f"annotated white cells of {len(cells)} fields read from {cached}", flush=True)
    else:
        cells, missed = annotated_cells(truth, shipped.spec, args.limit)
        print(f"annotated white cells cropped on {len(cells)} fields ({len(missed)} not segmented as a white cell) "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            stems = sorted(cells)
            np.savez_compressed(cached, stems=np.array(stems), missed=np.array(missed, dtype=str),
                                code_version=np.array(crop_code_version()),
                                images=np.stack([cells[s][0] for s in stems]),
                                masks=np.stack([cells[s][1] for s in stems]))
    options = {**FINE_TUNE, **json.loads(args.options)}
    # two folds: each half of the fields adapts once and is held out once, so every
    # field is scored (by a model that never saw it) and the figures rest on all of them
    halves = {name: {t: [s for s in sorted(cells) if split[s] == name and truth[s] == t] for t in TYPES}
              for name in ("adapt", "held_out")}
    folds = [("adapt", "held_out"), ("held_out", "adapt")]
    scored = sorted(cells)
    truths = np.array([truth[s] for s in scored])
    results = {
        "fields": {"per_half": {name: {t: len(v) for t, v in half.items()} for name, half in halves.items()},
                   "scored": {t: int((truths == t).sum()) for t in TYPES}, "not_segmented": len(missed)},
        "fine_tune": options, "folds": len(folds), "runs": [],
    }
    four, own = answers("wbc-pbc8", scored, cells, args.device)
    baseline = scores(truths, four, own)
    results["shipped"] = baseline
    print(f"shipped wbc-pbc8 on {baseline['n']} annotated cells: {100 * baseline['accuracy_4_types']:.2f} % among the "
          f"4 types (balanced {100 * baseline['balanced_accuracy']:.2f} %; {100 * baseline['accuracy_own_classes']:.2f} % "
          "with its 8 classes)", flush=True)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            for seed in [0] if size == "all" else list(range(args.seeds)):
                predicted, cells_used, seconds, best_epochs = {}, [], 0.0, []
                for fold, (adapting, held) in enumerate(folds):
                    rng = np.random.default_rng(seed)
                    chosen = []
                    for t in TYPES:
                        pool = halves[adapting][t]
                        take = len(pool) if size == "all" else min(int(size), len(pool))
                        chosen += list(rng.choice(pool, size=take, replace=False)) if take < len(pool) else pool
                    started = time.perf_counter()
                    output = Path(scratch) / f"bccd_{size}_{seed}_{fold}.safetensors"
                    result = train(crop_set_of(sorted(chosen), cells, truth, "train"), init_from="wbc-pbc8",
                                   output=output, seed=seed, device=args.device, progress=False,
                                   num_threads=args.threads, **options)
                    seconds += time.perf_counter() - started
                    held_stems = [s for t in TYPES for s in halves[held][t]]
                    predicted.update(zip(held_stems, answers(output, held_stems, cells, args.device)[0]))
                    cells_used.append(len(chosen))
                    best_epochs.append(result.best_epoch)
                row = {"per_type": size, "seed": seed, "cells_per_fold": cells_used, "train_seconds": round(seconds, 1),
                       "best_epochs": best_epochs, **scores(truths, np.array([predicted[s] for s in scored]))}
                results["runs"].append(row)
                print(f"N={size:>3} per type, seed {seed}: {cells_used} cells, {seconds:.0f} s -> "
                      f"{100 * row['accuracy_4_types']:.2f} % (balanced {100 * row['balanced_accuracy']:.2f} %)",
                      flush=True)
    summary = {}
    for size in sizes:
        runs = [r for r in results["runs"] if r["per_type"] == size]
        summary[size] = {key: {"mean": float(np.mean([r[key] for r in runs])), "min": float(np.min([r[key] for r in runs])),
                               "max": float(np.max([r[key] for r in runs]))}
                         for key in ("accuracy_4_types", "balanced_accuracy")}
        summary[size]["runs"] = len(runs)
    results["summary"] = summary
    print("\naccuracy among the 4 types (balanced): shipped "
          f"{100 * baseline['accuracy_4_types']:.2f} % ({100 * baseline['balanced_accuracy']:.2f} %); " + "; ".join(
              f"N={k}: {100 * v['accuracy_4_types']['mean']:.2f} % ({100 * v['balanced_accuracy']['mean']:.2f} %), "
              f"{v['runs']} runs" for k, v in summary.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"saved {args.json}")
    return results


if __name__ == "__main__":
    main()
