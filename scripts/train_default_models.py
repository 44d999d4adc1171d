"""Re-train the built-in models from ../shared/data with fixed seeds.

    python scripts/train_default_models.py                 # both models
    python scripts/train_default_models.py --only wbc-pbc8 --epochs-wbc 80 --patience 20   # as shipped (two stages)
    python scripts/train_default_models.py --pack-only     # just write the crop sets

Steps per model:

1. crops: ``cache/pbc_s96_stain.npz`` (every PBC image segmented, recoloured into the
   reference stain (:mod:`napari_smear.normalize`), its central cell cropped at
   4 red-cell diameters, 96 px) and ``cache/chula_s64.npz`` (every Chula RBC-12 field
   segmented; each red cell holding a labelled point cropped at 2 red-cell diameters,
   64 px, with that point's class; 20 % of the fields, chosen by a hash of the file name,
   are the val split). Both are compact ``.npz`` files (JPEG crops, bit-packed masks)
   under 60 MB: copy them to a machine with a GPU and run this script there with
   ``--cache`` pointing at them to train without the shared data.
2. training with :func:`napari_smear.train` (seed 0; train split fitted, val used only to
   pick the best epoch). A GPU is used when present (``--device auto``), else the CPU.
   Interrupted runs resume from their checkpoint (``runs/<name>.ckpt/``). ``wbc-pbc8``
   then has a second stage (``--average-epochs-wbc``, 16): fine-tuned from the first
   stage's best epoch with its weights averaged over the epochs (stochastic weight
   averaging; ``runs/wbc-pbc8_averaged.safetensors``, restarted if interrupted).
3. the best epoch's file gets the built-in metadata (name, which segmented cell types
   it classifies, data licences and credit) and its prior-correction strength (chosen
   on val for the highest macro-F1, :func:`napari_smear.training.select_prior_correction`)
   and is written to
   ``src/napari_smear/models/weights/<name>.safetensors``; its validation metrics go to
   ``benchmarks/results/<name>_val.json`` and its confusion matrix to
   ``docs/images/<name>_confusion.png``. With ``--out DIR`` elsewhere (an experiment)
   the file, its report and its picture all go to DIR and the shipped ones stay.

``--ensemble FILE FILE...`` fuses trained files of one model (``--only``) into one
that answers with the mean of their logits (:func:`napari_smear.models.combine_models`),
scored on val like a trained model.

``--rescore-only`` scores the file in ``--out`` again on the current crops, for when
the segmentation or cropping changed but the model did not: its report keeps the
training history and gets the new ``val`` figures (and the file the current
``test_time_views`` and a prior correction chosen again).

Both models answer with the mean over the eight turns of each crop (``test_time_views``
in their metadata, :func:`napari_smear.predict.classify_crops`); the figures written
are those answers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = ROOT / "src" / "napari_smear" / "models" / "weights"
# metadata keys that save_model writes itself
FILLED_IN_BY_SAVE_MODEL = ("format_version", "kind", "config", "channels", "package_version", "created")

CHULA_CLASSES = [
    "normal", "macrocyte", "microcyte", "spherocyte", "target_cell", "stomatocyte", "ovalocyte",
    "teardrop", "burr_cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte",
]

# Training options of the shipped models (the defaults below reproduce them). Attention
# supervision (DualAttNet) keeps the maps on the cell and helped in the ablation.
# The white-cell crops are stain-normalised (MODELS below); what remains between
# microscopes is a residual tint, blur and scale (a phone-grade camera is softer, and the
# red-cell ruler is measured to about +-10 %), so colour, blur and scale augmentations
# are stronger than train()'s defaults. Against the defaults' strength with only blur and
# scale raised (blur 0.4/1.5, scale 0.15), this cost 1.5 points of PBC validation
# accuracy (95.79 -> 94.27 %) and gained 6.0 points on BCCD fields (67.9 -> 73.9 %), both
# at 40 epochs; 80 epochs (shipped) took PBC val to 96.96 % and BCCD to 72.9 %.
WBC_OPTIONS = {
    "attention_supervision": 0.3,
    "augment_options": {"blur_probability": 0.4, "max_blur_sigma": 1.5, "scale_jitter": 0.15,
                        "hue_deg": 12, "saturation": 0.3, "od_jitter": 0.3, "contrast": 0.25},
}
RBC_OPTIONS: dict = {}
# wbc-pbc8's second stage: fine-tuned from the first stage's best epoch, the weights
# averaged over its epochs (train(average_weights_from=1), stochastic weight averaging).
# Against the first stage alone (session 13, the rule written before the run: ship at
# BCCD >= 75.0 % with PBC val >= 97.1 %): PBC val 97.25 -> 97.43 %, BCCD 73.93 -> 75.71 %.
AVERAGING_EPOCHS_WBC = 16
AVERAGING_OPTIONS = {"lr": 6e-4, "warmup_epochs": 0.5, "average_weights_from": 1}
# Tried for other microscopes and not shipped (docs/models.md): per-crop white balance
# (glass mapped to a fixed grey) instead of stain normalisation, with the same strong
# colour and blur augmentation: --options-wbc '{"attention_supervision": 0.3, "white_balance": true, ...}'

MODELS = {
    "wbc-pbc8": {
        "cache": "pbc_s{size}_stain.npz",
        # every PBC image recoloured into PBC's median stain before cropping, so that
        # the model learns in the colours normalize_stain maps other microscopes to
        "stain_normalization": "anchored-v1",
        "output_size": 96,
        "crop_diameters": 4.0,
        # JPEG quality of the packed crops (46.5 MB at 96 px / q90; use 80 for 128 px crops
        # to stay under 60 MB)
        "jpeg_quality": 90,
        "cell_types": ["wbc", "platelet"],
        # answers averaged over the 8 turns of each crop (predict.classify_crops); chosen
        # on val (session 14): 97.43 -> 97.78 % (4 views: 97.60 %)
        "test_time_views": 8,
        "description": "White-cell (and platelet) type, 8 PBC classes.",
        "licence": "Weights: BSD-3-Clause (napari-smear). Training data: PBC dataset, CC BY 4.0; "
                   "WBCAtt attributes, MIT.",
        "credit": "Acevedo A, Merino A, Alferez S, Molina A, Boldu L, Rodellar J. A dataset of microscopic "
                  "peripheral blood cell images for development of automatic recognition systems. "
                  "Data in Brief 30 (2020) 105474. WBCAtt: Tsutsui S, Pang W, Wen B, NeurIPS 2023.",
    },
    "rbc-chula12": {
        "cache": "chula_s{size}.npz",
        "output_size": 64,
        "crop_diameters": 2.0,
        "jpeg_quality": 90,
        "cell_types": ["rbc"],
        # as for wbc-pbc8; on val 87.01 / 73.10 -> 87.55 / 73.98 % (accuracy / macro-F1)
        "test_time_views": 8,
        "description": "Red-cell morphology, 13 Chula RBC-12 classes (12 types plus normal).",
        "licence": "Weights: BSD-3-Clause (napari-smear). Training data: Chula RBC-12 dataset, MIT.",
        "credit": "Naruenatthanaset K, Chalidabhongse TH, Palasuwan D, Anantrasirichai N, Palasuwan A. "
                  "Red Blood Cell Segmentation with Overlapping Cell Separation and Classification on "
                  "Imbalanced Dataset. arXiv:2012.01321.",
    },
}


def pack(name: str, data: Path, cache: Path, workers: int, output_size: int | None = None,
         crop_diameters: float | None = None):
    """Build (or reuse) the crop set of ``name``; returns its path."""
    from napari_smear.datasets import (
        build_crop_set, build_point_crop_set, read_point_annotations, save_crop_set,
    )

    spec = MODELS[name]
    size = int(output_size or spec["output_size"])
    diameters = float(crop_diameters or spec["crop_diameters"])
    path = cache / spec["cache"].format(size=size)
    if diameters != spec["crop_diameters"]:  # another crop window: another file
        path = path.with_name(path.name.replace(f"_s{size}", f"_s{size}_d{diameters:g}"))
    if path.exists():
        print(f"[{name}] reusing crops {path}")
        return path
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if name == "wbc-pbc8":
        manifest = data / "pbc" / "split.csv"
        if not manifest.exists():
            raise SystemExit(f"PBC data not found at {manifest}")
        crop_set = build_crop_set(
            manifest, crop_diameters=diameters, output_size=size, workers=workers,
            stain_normalization=spec.get("stain_normalization"),
        )
    else:
        root = data / "chula_rbc12"
        if not (root / "images").is_dir():
            raise SystemExit(f"Chula RBC-12 data not found at {root}")
        fields = []
        for image in sorted((root / "images").glob("*.jpg")):
            labels = root / "labels" / f"{image.stem}.txt"
            if labels.exists():
                fields.append((image, read_point_annotations(labels)))
        crop_set = build_point_crop_set(
            fields, CHULA_CLASSES, crop_diameters=diameters, output_size=size, val_fraction=0.2,
            workers=workers,
            source=str(root.resolve()),
        )
        print(f"[{name}] points: {getattr(crop_set, 'point_stats', {})}")
    save_crop_set(path, crop_set, jpeg_quality=spec["jpeg_quality"])
    print(f"[{name}] {len(crop_set)} crops in {time.perf_counter() - started:.0f} s -> {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)")
    return path


def train_one(name: str, crops: Path, args) -> dict:
    from napari_smear.datasets import load_crop_set
    from napari_smear.models import load_model
    from napari_smear.training import train

    crop_set = load_crop_set(crops)
    runs = ROOT / "runs"
    runs.mkdir(exist_ok=True)
    kind = args.kind_wbc if name == "wbc-pbc8" else args.kind_rbc
    extra = json.loads(args.options_wbc if name == "wbc-pbc8" else args.options_rbc)
    epochs = args.epochs_wbc if name == "wbc-pbc8" else args.epochs_rbc
    run_file = runs / f"{name}.safetensors"
    out_dir = Path(args.out).resolve()
    # what the card and the benchmarks read belongs to the shipped model: an experiment
    # (--out elsewhere) keeps its report and confusion picture in its own folder
    shipping = out_dir == SHIPPED_DIR.resolve()
    reports = (ROOT / "benchmarks" / "results") if shipping else out_dir
    images = (ROOT / "docs" / "images") if shipping else out_dir
    if args.rescore_only:
        return rescore(name, crop_set, out_dir / f"{name}.safetensors", reports, images, args)
    if args.ensemble:
        return fuse(name, crop_set, [Path(p) for p in args.ensemble], out_dir / f"{name}.safetensors",
                    reports, images, args)
    if args.finalize_only:
        # Ship the best epoch an interrupted run has written so far, without training on.
        if not run_file.exists():
            raise SystemExit(f"--finalize-only: no trained file at {run_file}")
        result = None
        model, info = load_model(run_file, device="cpu")
    else:
        result = train(
            crop_set, model_kind=kind, output=run_file, epochs=epochs, seed=args.seed,
            device=args.device, num_threads=args.threads, resume=True,
            patience=args.patience if args.patience is not None else 12,
            batch_size=args.batch_size, progress=True, **extra,
        )
        averaging_epochs = args.average_epochs_wbc if name == "wbc-pbc8" else 0
        if averaging_epochs:
            result = train(
                crop_set, model_kind=kind, output=runs / f"{name}_averaged.safetensors", epochs=averaging_epochs,
                seed=args.seed, device=args.device, num_threads=args.threads, resume=False,
                patience=averaging_epochs, batch_size=args.batch_size, progress=True,
                **{**extra, **AVERAGING_OPTIONS, "init_from": str(run_file)},
            )
        model, info = load_model(result.model_path, device="cpu")
    spec = MODELS[name]
    metadata = dict(info.metadata)
    for key in FILLED_IN_BY_SAVE_MODEL:
        metadata.pop(key, None)
    metadata.update({
        "name": name,
        "description": spec["description"],
        "cell_types": spec["cell_types"],
        "licence": spec["licence"],
        "credit": spec["credit"],
        "trained_by": "scripts/train_default_models.py",
        "test_time_views": spec["test_time_views"],
    })
    info.metadata["test_time_views"] = spec["test_time_views"]  # the prior correction is chosen with them
    out_dir.mkdir(parents=True, exist_ok=True)
    # train() chose it on the same val crops when it finished (its log shows the table);
    # a file from an interrupted run (--finalize-only) has none yet
    metadata["prior_correction"] = (info.metadata.get("prior_correction")
                                    or _choose_prior_correction(name, model, info, crop_set, args))
    return _save_and_report(name, model, metadata, out_dir / f"{name}.safetensors", crop_set, reports, images, args, {
        "kind": kind, "options": extra,
        "best_epoch": result.best_epoch if result else info.metrics.get("epoch"),
        "epochs_completed": result.epochs_completed if result else None,
        "history": result.history if result else None,
        "finalized_from_interrupted_run": result is None,
    })


def _save_and_report(name: str, model, metadata: dict, target: Path, crop_set, reports: Path, images: Path,
                     args, facts: dict, what: str = "") -> dict:
    """Write the model file, score it on val, draw its confusion matrix and write its
    report (``facts`` plus the file, the val figures and the command)."""
    from napari_smear.models import save_model
    from napari_smear.training import evaluate

    target = save_model(target, model, metadata)
    metrics = evaluate(target, crop_set, "val", device=args.device)
    _confusion_picture(name, metrics, images)
    report = {
        "model": name, **facts,
        "file": str(target.relative_to(ROOT) if target.is_relative_to(ROOT) else target),
        "file_mb": round(target.stat().st_size / 1e6, 2), "val": metrics,
        "prior_correction": metadata["prior_correction"],
        "command": " ".join(["python", "scripts/train_default_models.py", *sys.argv[1:]]),
    }
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{name}_val.json").write_text(json.dumps(report, indent=2))
    print(f"[{name}] {what}val accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
          f"attention inside {metrics.get('attention_mass_inside')}; wrote {target} ({report['file_mb']} MB)")
    return report


def _confusion_picture(name: str, metrics: dict, folder: Path) -> Path:
    from napari_smear.training import plot_confusion

    folder.mkdir(parents=True, exist_ok=True)
    return plot_confusion(metrics["confusion"], metrics["class_names"], folder / f"{name}_confusion.png",
                          title=f"{name}: validation confusion (row-normalised)")


def _choose_prior_correction(name: str, model, info, crop_set, args) -> dict:
    """Pick the model's prior-correction strength on the val split (highest macro-F1):
    both models are trained on class-balanced batches, so their raw answers over-call
    rare classes on data with the training mix."""
    from napari_smear.training import select_prior_correction

    choice = select_prior_correction(model, crop_set, "val", info=info, device=args.device)
    table = ", ".join(f"{row['strength']:g}: {100 * row['accuracy']:.2f} % / {100 * row['macro_f1']:.2f} %"
                      for row in choice["scores"])
    print(f"[{name}] prior correction (strength: val accuracy / macro-F1) {table}; "
          f"chosen {choice['strength']:g}")
    return choice


def rescore(name: str, crop_set, model_file: Path, reports: Path, images: Path, args) -> dict:
    """Score a trained file again on the current crops (after a change of the
    segmentation or cropping code) without re-training: its prior correction is chosen
    again and written into the file (the weights stay as they are), its report keeps the
    training history and command, its ``val`` figures and confusion picture are replaced."""
    from napari_smear.datasets import crop_code_version
    from napari_smear.models import load_model, save_model
    from napari_smear.training import evaluate

    if not model_file.exists():
        raise SystemExit(f"--rescore-only: no model file at {model_file}")
    report_file = reports / f"{name}_val.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {"model": name}
    model, info = load_model(model_file, device="cpu")
    info.metadata["test_time_views"] = MODELS[name]["test_time_views"]
    metadata = {key: value for key, value in info.metadata.items() if key not in FILLED_IN_BY_SAVE_MODEL}
    metadata["prior_correction"] = _choose_prior_correction(name, model, info, crop_set, args)
    save_model(model_file, model, metadata)
    metrics = evaluate(model_file, crop_set, "val", device=args.device)
    _confusion_picture(name, metrics, images)
    report.update({
        "val": metrics,
        "prior_correction": metadata["prior_correction"],
        "rescored": {
            "crop_code_version": crop_code_version(),
            "command": " ".join(["python", "scripts/train_default_models.py", *sys.argv[1:]]),
        },
    })
    report_file.write_text(json.dumps(report, indent=2))
    print(f"[{name}] rescored on the current crops: val accuracy {metrics['accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f}")
    return report


def fuse(name: str, crop_set, member_files: list[Path], target: Path, reports: Path, images: Path,
         args) -> dict:
    """One file answering with the mean of trained models' logits and attention maps
    (:func:`napari_smear.models.combine_models`), scored like a trained model: its prior
    correction chosen on val, its report and confusion picture written. The members
    must be files of this model over the same classes and inputs."""
    from napari_smear.models import combine_models, load_model

    loaded = [load_model(path, device="cpu") for path in member_files]
    first = loaded[0][1].metadata
    for path, (_, info) in zip(member_files[1:], loaded[1:]):
        for key in ("class_names", "input_size", "crop_diameters", "mean", "std", "stain_normalization"):
            if info.metadata.get(key) != first.get(key):
                raise SystemExit(f"--ensemble: {path} has {key} {info.metadata.get(key)!r}, "
                                 f"{member_files[0]} has {first.get(key)!r}: they cannot be fused")
    model = combine_models([member for member, _ in loaded])
    metadata = {key: value for key, value in first.items() if key not in FILLED_IN_BY_SAVE_MODEL}
    metadata.update({
        "test_time_views": MODELS[name]["test_time_views"],
        "trained_by": "scripts/train_default_models.py --ensemble",
        "members": [{"file": path.name, "metrics": info.metrics, "training": info.metadata.get("training"),
                     "prior_correction": info.metadata.get("prior_correction")}
                    for path, (_, info) in zip(member_files, loaded)],
    })
    info = loaded[0][1]
    info.metadata.update(metadata)  # the prior correction is chosen with the ensemble's views
    metadata["prior_correction"] = _choose_prior_correction(name, model, info, crop_set, args)
    return _save_and_report(name, model, metadata, target, crop_set, reports, images, args,
                            {"kind": "ensemble", "members": [str(path) for path in member_files]},
                            what=f"ensemble of {len(member_files)}: ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cache", default=str(ROOT / "cache"), help="folder of the packed crop sets")
    parser.add_argument("--out", default=str(SHIPPED_DIR),
                        help="where the trained file goes (default: the package, i.e. ship it); "
                             "elsewhere, its report and confusion picture go there too")
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--pack-only", action="store_true")
    parser.add_argument("--finalize-only", action="store_true",
                        help="ship the best epoch of an interrupted run (runs/<name>.safetensors) as it is")
    parser.add_argument("--rescore-only", action="store_true",
                        help="score the file in --out again on the current crops (after a segmentation change) "
                             "and update its report and confusion picture")
    parser.add_argument("--ensemble", nargs="+", metavar="FILE", default=None,
                        help="fuse these trained files of the model (--only it) into one that answers with "
                             "the mean of their logits; scored on val like a trained model")
    parser.add_argument("--workers", type=int, default=2, help="processes for segmenting/cropping")
    parser.add_argument("--size-wbc", type=int, default=None, help="crop side in px (default 96)")
    parser.add_argument("--size-rbc", type=int, default=None, help="crop side in px (default 64)")
    parser.add_argument("--crop-diameters-wbc", type=float, default=None,
                        help="crop window in red-cell diameters (default 4)")
    parser.add_argument("--kind-wbc", default="gated_attention")
    parser.add_argument("--kind-rbc", default="shape_aware")
    parser.add_argument("--options-wbc", default=json.dumps(WBC_OPTIONS), help="extra train() options as JSON")
    parser.add_argument("--options-rbc", default=json.dumps(RBC_OPTIONS), help="extra train() options as JSON")
    parser.add_argument("--epochs-wbc", type=int, default=80)
    parser.add_argument("--epochs-rbc", type=int, default=80)
    parser.add_argument("--average-epochs-wbc", type=int, default=AVERAGING_EPOCHS_WBC,
                        help="epochs of the second, weight-averaging stage of wbc-pbc8 (default "
                             f"{AVERAGING_EPOCHS_WBC}, as shipped; 0: ship the first stage's best epoch)")
    parser.add_argument("--patience", type=int, default=None,
                        help="early-stopping patience (default 12)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    names = args.only or list(MODELS)
    if args.ensemble and (len(names) != 1 or len(args.ensemble) < 2):
        parser.error("--ensemble needs one model (--only NAME) and at least two files")
    for name in names:
        size = args.size_wbc if name == "wbc-pbc8" else args.size_rbc
        diameters = args.crop_diameters_wbc if name == "wbc-pbc8" else None
        crops = pack(name, Path(args.data), Path(args.cache), args.workers, size, diameters)
        if not args.pack_only:
            train_one(name, crops, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
