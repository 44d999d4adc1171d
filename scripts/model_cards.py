"""Write docs/models.md (one model card per built-in model) from the measured results.

Reads the shipped model files (metadata) and the figures the scripts saved:
``benchmarks/results/<name>_val.json`` (scripts/train_default_models.py),
``benchmarks/results/model_eval.json`` (benchmarks/model_eval.py) and
``benchmarks/results/classify_speed.json`` (benchmarks/classify_speed.py).
The shipped models' figures all come from those files: re-run after re-training. The
write-ups of experiments that were not shipped (Known limits) are kept in this script.

    python scripts/model_cards.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ARCHITECTURES = {
    "shape_aware": "Shape-aware network (after the BMEC erythroid paper): a residual RGB branch and a small "
                   "branch on the cell and nucleus masks; the shape feature gates the RGB feature "
                   "(`a = sigmoid(W2 relu(W1 f_shape))`, `f_att = a * f_rgb`) and `[f_rgb, f_shape, f_att]` "
                   "are fused by an MLP. Its attention map is the RGB branch's spatial activation weighted by "
                   "the shape gate.",
    "gated_attention": "Gated-attention network (Fan et al.): gated attention over high-resolution patches "
                       "fused with a low-resolution global branch.",
    "daffnet": "DAFFNet-style dual attention (channel + spatial) with the WBCAtt attribute head.",
    "global_attention": "One learned spatial weight map shared by all crops.",
    "plain": "Plain residual CNN.",
}


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.2f} %"


def card(name: str) -> list[str]:
    from napari_smear.models import load_model

    model, info = load_model(name, device="cpu")
    meta = info.metadata
    val = _load(RESULTS / f"{name}_val.json") or {}
    metrics = val.get("val") or info.metrics
    training = meta.get("training_data", {})
    lines = [
        f"## `{name}`",
        "",
        meta.get("description", ""),
        "",
        f"- **File**: `src/napari_smear/models/weights/{name}.safetensors` "
        f"({info.path.stat().st_size / 1e6:.1f} MB), loaded by name: `--model {name}` / `load_model(\"{name}\")`.",
        f"- **Classifies** segmented cells of type: {', '.join(meta.get('cell_types', []))}.",
        f"- **Classes** ({len(info.class_names)}): {', '.join(info.class_names)}.",
        f"- **Input**: {info.input_size} x {info.input_size} px crops spanning {info.crop_diameters:g} red-cell "
        "diameters (normalised scale: the same cell size from any microscope), plus the cell and nucleus masks.",
        f"- **Architecture**: `{info.kind}` ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
        f"config `{json.dumps(info.config)}`. {ARCHITECTURES.get(info.kind, '')}",
        f"- **Training data**: {training.get('description', '')}. Train crops: {training.get('n_train')}, "
        f"validation crops: {training.get('n_val')}.",
        *([f"- **Stain normalisation**: `{meta['stain_normalization']}`: every field is recoloured into PBC's "
           "median stain, anchored on its own red cells and white-cell nuclei, before its cells are cropped, in "
           "training and in use alike (see [architecture](architecture.md#stain-normalisation))."]
          if meta.get("stain_normalization") else []),
        *([f"- **Turned views**: each crop is classified {meta['test_time_views']} ways (as it is and turned "
           "over: mirrored, and by quarter turns) and the class probabilities and attention maps are averaged "
           "(`test_time_views` in the file; `classify_crops(..., test_time_views=1)` for one view, "
           f"{meta['test_time_views']} times faster): a cell has no up or down on a slide. The figures below "
           "include it; see Known limits, *Turned views*."]
          if (meta.get("test_time_views") or 1) > 1 else []),
        f"- **Licence and credit**: {meta.get('licence', '')} {meta.get('credit', '')}",
        f"- **Re-train**: `{val.get('command', 'python scripts/train_default_models.py --only ' + name)}` "
        + (f"(two stages: {val['stages']['first']['epochs_completed']} epochs, best epoch "
           f"{val['stages']['first']['best_epoch']}; then {val.get('epochs_completed')} epochs fine-tuned from it "
           f"with the weights averaged over them (stochastic weight averaging), best average after epoch "
           f"{val.get('best_epoch')}; see Known limits, *Weight averaging*)."
           if val.get("stages") else
           f"(best epoch {val.get('best_epoch')} of {val.get('epochs_completed')})."),
        "",
        "### Validation",
        "",
        f"Accuracy **{_pct(metrics.get('accuracy'))}**, macro-F1 **{_pct(metrics.get('macro_f1'))}** on "
        f"{metrics.get('n')} validation crops (used only to pick the best epoch"
        f"{' and the prior-correction strength' if meta.get('prior_correction') else ''}; the held-out test split is "
        "not available to us). Attention mass inside the cell mask: "
        f"{metrics.get('attention_mass_inside', float('nan')):.3f}."
        + (f" Scored again on crops of the current segmentation (`{val['rescored']['command']}`); "
           "the model was not re-trained"
           + (f" (it was trained on an earlier cut of the same fields, with {meta['training_data']['n_val']} "
              "validation crops: the training-data line above)"
              if (meta.get("training_data") or {}).get("n_val") not in (None, metrics.get("n")) else "")
           + "." if val.get("rescored") else ""),
        *_prior_correction_lines(meta.get("prior_correction")),
        "",
        "| class | recall | precision | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for cls in info.class_names:
        lines.append(
            f"| {cls} | {_pct((metrics.get('per_class_recall') or {}).get(cls))} | "
            f"{_pct((metrics.get('per_class_precision') or {}).get(cls))} | "
            f"{_pct((metrics.get('per_class_f1') or {}).get(cls))} | {(metrics.get('support') or {}).get(cls)} |"
        )
    lines += ["", f"![{name} confusion matrix](images/{name}_confusion.png)", ""]
    return lines


def _prior_correction_lines(choice) -> list[str]:
    """The card's account of the prior correction stored in the model file."""
    if not choice or not choice.get("scores"):
        return []
    strength = choice["strength"]
    rows = [f"| {row['strength']:g}{' (chosen)' if row['strength'] == strength else ''} | "
            f"{_pct(row['accuracy'])} | {_pct(row['macro_f1'])} |" for row in choice["scores"]]
    return [
        "",
        f"**Prior correction** (strength {strength:g}): the model learned from class-balanced batches, so "
        "its raw answers treat every class as equally common and over-call the rare ones. Its logits get "
        f"`{strength:g} * log(C * prior)` added, `prior` being the class frequencies of its training split "
        "(`napari_smear.predict.prior_logit_offsets`; pass `prior_correction=0` to `classify_crops` for the "
        "balanced answer). The strength was chosen on the validation split for the highest macro-F1 "
        "(`napari_smear.training.select_prior_correction`); the figures above include it.",
        "",
        "| strength | val accuracy | val macro-F1 |",
        "|---|---|---|",
        *rows,
    ]


def _erythroblast_sizes(evaluation) -> str:
    """A sentence on how small the white cells answered *erythroblast* on BCCD are."""
    fields = [f for f in ((evaluation or {}).get("bccd") or {}).get("fields") or [] if "diameter_rbc" in f]
    def by_answer(rows, key):  # the sizes of the fields answered erythroblast, and of the others
        return ([f[key] for f in rows if f["predicted"] == "erythroblast"],
                [f[key] for f in rows if f["predicted"] != "erythroblast"])

    ery, rest = by_answer(fields, "diameter_rbc")
    if not ery or not rest:
        return ""
    sentence = (f" The {len(ery)} fields answered *erythroblast* (none is one) chose small white cells: "
                f"{np.median(ery):.2f} red-cell diameters across (median, a disk of the cell's area), against "
                f"{np.median(rest):.2f} for the other answers; a small round cell with a dense nucleus is what PBC "
                "calls an erythroblast. Their size is only part of it: cropped 1.3 times larger (a window of 3.1 "
                "instead of 4 red-cell diameters, so they look as large as PBC's neutrophils; "
                "`python scripts/bccd_error_gallery.py --zoom 1.3`), 33 of the 36 fields were still answered "
                "erythroblast and the accuracy fell to 70.0 %; cropped 0.8 times as large, 50 were, at 68.9 %. "
                "Most of them are, to the eye, neutrophils and eosinophils with lobed nuclei "
                "([gallery](images/bccd_erythroblast_answers.png), drawn by `scripts/bccd_error_gallery.py`), "
                "blurred by the camera into a compact dark nucleus.")
    single = [f for f in fields if f.get("n_wbc") == 1 and f.get("truth_mask_diameter_rbc")]
    ery_truth, rest_truth = by_answer(single, "truth_mask_diameter_rbc")
    if ery_truth and rest_truth:
        sentence += (f" The segmentation is not what makes them small: BCCD's own white-cell masks measure them "
                     f"at {np.median(ery_truth):.2f} red-cell diameters against {np.median(rest_truth):.2f} "
                     f"(fields with one white cell, {len(ery_truth)} and {len(rest_truth)} of them).")
    return sentence


def _red_cells_elsewhere(tally) -> list[str]:
    """Known-limits line on rbc-chula12's answers on BCCD (no labels there: shares only)."""
    if not tally or not tally.get("n_red_cells"):
        return []
    share, val = tally["share_by_class"], tally.get("validation_share_by_class") or {}
    # the classes it over-answers most against its validation shares
    odd = sorted((c for c in share if c != "normal"), key=lambda c: share[c] - val.get(c, 0), reverse=True)[:2]
    odd_text = " and ".join(f"*{c}* for {100 * share[c]:.0f} % ({100 * val.get(c, 0):.1f} % of its validation cells)" for c in odd)
    return [
        f"- **`rbc-chula12` on other microscopes**: it learned from one microscope and stain (Chula RBC-12, 1000x) "
        "without stain normalisation, and no other data set we have labels red-cell morphology, so it has no "
        f"cross-dataset figure. On BCCD's {tally['n_red_cells']} whole red cells ({tally['n_fields']} fields; "
        "`benchmarks/model_eval.py`) it answers *normal* for "
        f"{100 * share.get('normal', 0):.0f} % of them ({100 * val.get('normal', 0):.0f} % of its validation cells are normal), "
        f"{odd_text}. It is deliberately not stain-normalised like `wbc-pbc8`: the anchored normalisation maps each "
        "field's mean red-cell colour onto the reference, so a field of pale (hypochromic) cells would be recoloured "
        "to normal density and the class would vanish. "
        "Treat its answers on another microscope as unchecked, and fine-tune it on a few labelled cells "
        "of that microscope (*Train classifier* widget, `train(init_from=...)`) before counting on them.",
    ]


def _adaptation_lines(results) -> list[str]:
    """The section on fine-tuning `wbc-pbc8` to another microscope (benchmarks/finetune_bccd.py)."""
    if not results:
        return []
    scored = results["fields"]["scored"]
    shipped = results["shipped"]
    tune = results["fine_tune"]
    draws = max(summary["runs"] for size, summary in results["summary"].items() if size != "all")
    # the scarcest type in either half: what "all of a half" still lacks
    scarce = min(((n, t) for half in results["fields"]["per_half"].values() for t, n in half.items()))
    lines = [
        "**Fine-tuning to another microscope.** How many labelled cells of a new microscope does fine-tuning "
        "need? BCCD stands in for it (`python benchmarks/finetune_bccd.py`): the BCCD fields naming one of its "
        "four common types are split by a hash of their names into two halves. `wbc-pbc8` is fine-tuned from its "
        "shipped file on the annotated white cells (BCCD's mask picks the segmented cell) of N fields per type of "
        "one half, as *Train classifier* and `napari-smear train --init-from wbc-pbc8` do (their fine-tuning "
        f"learning rate {tune['lr']:g}, 15 % of the cells held out to pick the epoch; {tune['epochs']} epochs, "
        "the command's default, where the dock's is 20), and types the "
        "other half's; then the halves swap, so each of the "
        f"{sum(scored.values())} fields (" + ", ".join(f"{n} {t}" for t, n in scored.items()) + ") is typed by "
        "a model that never saw it. Smaller N are drawn " + f"{draws} times. Accuracy counts the answer among the four "
        "types; balanced accuracy is the mean of their recalls (a model fine-tuned on under 50 held-out cells "
        "answers as if the types were equally common, and BCCD's fields are 60 % neutrophils). None of this "
        "reaches the shipped model.",
        "",
        "| labelled cells per type | runs | accuracy, 4 types (mean, range) | balanced accuracy (mean, range) |",
        "|---|---|---|---|",
        f"| none: the shipped model | 1 | {_pct(shipped['accuracy_4_types'])} | {_pct(shipped['balanced_accuracy'])} |",
    ]
    for size, summary in results["summary"].items():
        runs = [r for r in results["runs"] if r["per_type"] == size]
        used = sorted({n for r in runs for n in r["cells_per_fold"]})
        span = f"{used[0]}-{used[-1]}" if len(used) > 1 else f"{used[0]}"
        label = f"all of a half ({span} cells)" if size == "all" else f"up to {size} ({span} cells)"

        def cell(key):
            part = summary[key]
            return _pct(part["mean"]) + ("" if summary["runs"] == 1 else f" ({_pct(part['min'])}-{_pct(part['max'])})")

        lines.append(f"| {label} | {summary['runs']} | {cell('accuracy_4_types')} | {cell('balanced_accuracy')} |")
    best = max(results["summary"].values(), key=lambda s: s["balanced_accuracy"]["mean"])
    if best["balanced_accuracy"]["mean"] <= shipped["balanced_accuracy"] + 0.01:
        lines += ["", "Fine-tuning on these cells did not do better than the shipped model: on BCCD, a hundred or so "
                  "labelled cells " + f"(only {scarce[0]} {scarce[1]}s in a half) do not teach it more than it brings. Drawing more "
                  "crops per epoch (more optimizer steps on a small set: 512 a epoch, two folds, 79.21 % and 81.36 % "
                  "at up to 10 and all cells) and keeping the BatchNorm statistics fixed (on the first fold alone: "
                  "67.39 %, 68.84 %, 83.33 %, 75.36 % at 5, 10, 20 and all cells, against 80.68 %, 77.05 %, 79.23 %, "
                  "76.09 % by default) were tried as well (one-off patches of `train()`, not kept). Fine-tune "
                  "for a microscope only with enough cells of every class to hold some out, and compare the "
                  "result with the built-in model on cells neither saw (`napari-smear evaluate`)."]
    lines.append("")
    return lines


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args(argv)
    from napari_smear.models import BUILTIN_MODELS, available_models

    lines = [
        "# Built-in models",
        "",
        "Both models ship inside the package (no download) and are the defaults of the widgets, the CLI "
        "and `make demo`. They were trained by `scripts/train_default_models.py` on `../shared/data` with "
        "seed 0; every figure below was measured by the scripts named with it. This page is generated by "
        "`python scripts/model_cards.py`.",
        "",
    ]
    for name in BUILTIN_MODELS:
        if name in available_models():
            lines += card(name)
        else:
            lines += [f"## `{name}`", "", "Not installed.", ""]

    evaluation = _load(RESULTS / "model_eval.json")
    if evaluation:
        lines += ["## Robustness of `wbc-pbc8`", "", f"Command: `{evaluation.get('command')}`", ""]
        scale = evaluation.get("pbc_scale")
        if scale:
            lines += [
                "**Scale.** PBC validation crops at the size stored in shared/ and upscaled by 363/256 back to the "
                "original CellaVision size (about 360 px), each through the same single-cell path:",
                "",
                "| input | crops | accuracy |",
                "|---|---|---|",
            ]
            for key, value in scale.items():
                lines.append(f"| {key} | {value['n']} | {_pct(value['accuracy'])} |")
            lines.append("")
        bccd = evaluation.get("bccd")
        if bccd:
            lines += [
                "**Another microscope (BCCD).** Whole BCCD fields with one named WBC type, through the full path "
                "(segment the field, crop every white cell, classify; the field's answer is its most confident "
                "white cell). Never trained on BCCD; its figure was one of the two used to choose between "
                "training variants (see Known limits), so treat it as optimistic for a third microscope.",
                "",
                f"- accuracy with the model's own 8-class answer: **{_pct(bccd['accuracy'])}** "
                f"over {bccd['n_fields']} fields ({bccd['fields_without_a_wbc']} fields had no segmented white cell)",
                f"- accuracy restricted to the 5 types BCCD uses: {_pct(bccd['accuracy_5_types'])}",
                "",
                "| type | fields | accuracy (8-class) | accuracy (5 types) |",
                "|---|---|---|---|",
            ]
            for t, acc in bccd["per_type_accuracy"].items():
                lines.append(f"| {t} | {bccd['support'].get(t)} | {_pct(acc)} | "
                             f"{_pct(bccd['per_type_accuracy_5_types'].get(t))} |")
            lines.append("")
            overhang = bccd.get("accuracy_by_crop_overhang")
            if overhang:
                lines += [
                    "A BCCD field is small (640 x 480 px, red cells about 100 px across), so the crop window "
                    "of most of its white cells reaches past the image and is filled with glass there. "
                    "Accuracy (8-class) by how far it reaches, as a share of the crop side:",
                    "",
                    "| crop past the image | fields | accuracy |",
                    "|---|---|---|",
                ]
                for name, part in overhang.items():
                    lines.append(f"| {name} | {part['fields']} | {_pct(part['accuracy'])} |")
                lines.append("")
            by_size = bccd.get("accuracy_by_cell_size")
            if by_size:
                lines += [
                    "Where a smear is thick, white cells do not flatten: they look small and dense against the "
                    "red cells, and a small neutrophil looks like PBC's erythroblasts and lymphocytes (PBC's "
                    "neutrophils measure 1.6-2.3 red-cell diameters, 5th to 95th percentile). Many of BCCD's "
                    "fields are such. Accuracy (8-class) by the size of the answering white cell, in red-cell "
                    "diameters (a disk of its area; the morphology column `area_rbc` is its square):",
                    "",
                    "| white cell across | fields | accuracy | types (fields) | wrong answers |",
                    "|---|---|---|---|---|",
                ]
                for name, part in by_size.items():
                    types = ", ".join(f"{t} {n}" for t, n in part["truth"].items())
                    wrong = ", ".join(f"{t} {n}" for t, n in part["wrong_answers"].items()) or "none"
                    lines.append(f"| {name} | {part['fields']} | {_pct(part['accuracy'])} | {types} | {wrong} |")
                lines.append("")
            edge = bccd.get("accuracy_by_edge") or {}
            if "whole" in edge and "cut by the edge" in edge:
                lines += [
                    f"White cells cut by the field's edge (`touches_edge`) are typed right on "
                    f"{_pct(edge['cut by the edge']['accuracy'])} of {edge['cut by the edge']['fields']} fields, "
                    f"whole ones on {_pct(edge['whole']['accuracy'])} of {edge['whole']['fields']}; the "
                    "Differential count can leave cut cells out (`differential_counts(..., "
                    "include_edge_cells=False)`).",
                    "",
                ]
        detection = evaluation.get("bccd_detection") or {}
        if "segmented_type" in detection and "cell_type" in detection:
            before, after = detection["segmented_type"], detection["cell_type"]
            lines += [
                "**Platelet clumps.** A clump of platelets can be as large as a white cell's nucleus, and the "
                "segmentation types it a white cell; `wbc-pbc8` has a platelet class, and a white cell it calls a "
                "platelet is re-typed a platelet in the analysis (`segmented_type` keeps the segmentation's type; "
                "`napari_smear.pipeline.retype_platelet_clumps`). Detection against BCCD's boxes over all "
                f"{before['wbc']['n_true']} white-cell and {before['platelet']['n_true']} platelet boxes (a cell "
                "matches a box of its type when its centroid is inside it):",
                "",
                "| types | white-cell F1 (precision / recall) | platelet F1 (precision / recall) |",
                "|---|---|---|",
            ]
            for name, part in (("segmentation alone", before), ("after classification", after)):
                lines.append(f"| {name} | " + " | ".join(
                    f"{part[k]['f1']:.4f} ({part[k]['precision']:.4f} / {part[k]['recall']:.4f})"
                    for k in ("wbc", "platelet")) + " |")
            lines.append("")

    lines += _adaptation_lines(_load(RESULTS / "finetune_bccd.json"))

    speed = _load(RESULTS / "classify_speed.json")
    if speed:
        lines += ["## Speed", "", "`python benchmarks/classify_speed.py` (" + speed.get("note", "") + "):", "",
                  "| model | device | threads | batch | input | crops/s |", "|---|---|---|---|---|---|"]
        for r in speed["results"]:
            lines.append(f"| {r['model']} | {r['device']} | {r['threads'] or '-'} | {r['batch']} | "
                         f"{r['input_size']} | {r['crops_per_s']:.0f} |")
        lines.append("")
    wbc = _load(RESULTS / "wbc-pbc8_val.json") or {}
    wbc_epochs = wbc.get("epochs_completed") or (wbc.get("history") or [{}])[-1].get("epoch")
    # the shipped file is the second stage (weight averaging) of a run whose first stage
    # took scripts/train_default_models.py's --epochs-wbc (80) epochs
    from napari_smear.models.files import read_metadata
    from napari_smear.models.registry import builtin_model_path

    wbc_training = read_metadata(builtin_model_path("wbc-pbc8")).get("training") or {}
    wbc_schedule = (f"80 epochs and then {wbc_epochs} more with its weights averaged"
                    if wbc_training.get("average_weights_from") else f"{wbc_epochs} epochs")
    rbc_report = _load(RESULTS / "rbc-chula12_val.json") or {}
    rbc_val = rbc_report.get("val") or {}
    # its figures before the prior correction (strength 0 of the choice it stores)
    rbc_raw = next((row for row in (rbc_report.get("prior_correction") or {}).get("scores", [])
                    if row["strength"] == 0), {})
    lines += [
        "## Known limits",
        "",
        "- **PBC accuracy** is below the 99.2 % we aim for (and below DAFFNet's published 98.77 %): the model "
        f"is small (1.1 M parameters, 96 px crops) and was trained for {wbc_schedule} on 2 CPU cores. The "
        "training script runs unchanged on a GPU, where a longer schedule and 128 px crops (`--size-wbc 128`; "
        "fine-tuning to them on the CPU was not enough, see *128 px crops* below) are the next step: doubling the schedule from 40 to 80 epochs took PBC val from 94.27 % to "
        "96.96 % (BCCD 73.9 % -> 72.9 %), and its best epoch was the last. The strong colour, blur and scale augmentation "
        "that helps on other microscopes costs PBC accuracy: at 40 epochs the same stain-normalised model with "
        "milder colour augmentation reached 95.79 % on PBC val but 67.9 % on BCCD, this recipe 94.27 % and "
        "73.9 % (the model before it, without stain normalisation: 96.43 % and 25.0 %). We chose the recipe "
        "that holds up better on another microscope.",
        "- **Other microscopes**: stain normalisation took BCCD from 25.0 % (a model trained on raw PBC colours "
        "answered *eosinophil* for most cells) to the figure above, still short of the 90 % target. Most "
        "remaining errors are neutrophils and eosinophils taken for each other or for erythroblasts "
        "(confusion in `benchmarks/results/model_eval.json`), and they gather on cells near the field's edge "
        "(table above)." + _erythroblast_sizes(evaluation) + " A BCCD field is a low-resolution camera image, and its red-cell ruler, hence the crop "
        "scale, is off by 20 % or more on about 5 % of fields. Fine-tuning on a few labelled cells of the new "
        "microscope (*Train classifier* widget, `train(init_from=...)`, which keeps the stain normalisation) "
        "is the practical remedy.",
        "- **Tried and not shipped** (on the 40-epoch model, same seed and data): averaging the answers over "
        "four flips of each crop (94.27 % -> 94.62 % on PBC val, 73.9 % -> 73.2 % on BCCD); training with "
        "glass-filled bands cut into crop edges (`augment_batch(border_cut_probability=0.5)`, to mimic crops "
        "that reach past the field: 94.33 % on PBC val, 73.2 % on BCCD, no better on the edge cells it "
        "aimed at); filling the part of a crop past the field by mirroring or repeating the edge instead of "
        "glass (BCCD 74.6 % and 73.2 %: the fill is not what costs the edge cells). The border-cut run is "
        "`train_default_models.py --only wbc-pbc8 --epochs-wbc 40` with `\"border_cut_probability\": 0.5` added "
        "to `--options-wbc`; the flips and the fills were one-off patches of the inference path scored by "
        "`benchmarks/model_eval.py`'s BCCD loop, not kept as options.",
        "- **A tighter crop window** (3 red-cell diameters instead of 4, so the cell spans more of the 96 px "
        "and the window reaches past a camera field less often; 80 epochs, same seed: "
        "`train_default_models.py --only wbc-pbc8 --crop-diameters-wbc 3 --epochs-wbc 80 --patience 20 --out DIR`, "
        "BCCD by `benchmarks/model_eval.py --model DIR/wbc-pbc8.safetensors --skip-scale`): 96.14 % on PBC val and "
        "68.6 % on BCCD (78.6 % over the 5 types), against 96.96 % and 72.9 % for the 4-diameter model; "
        "averaging the two models' probabilities on the packed PBC val crops (a one-off script, not kept) gave "
        "96.90 %. Not shipped: worse on both data sets (on the 119 BCCD fields where "
        "its window stays inside the field it was right on 75.6 %).",
        "- **Stronger scale augmentation** (zoom drawn from 1/1.35 to 1.35 instead of 1/1.15 to 1.15, so "
        "that a cell's size relative to the red cells says less; 80 epochs, same seed: `\"scale_jitter\": 0.35` "
        "in the shipped `--options-wbc`, `--out DIR`): 96.49 % on PBC val (macro-F1 96.39 %) and 70.0 % on "
        "BCCD (75.7 % over the 5 types), against the shipped model's 96.90 % on the same PBC crops and "
        "73.21 % (78.93 %) with the same segmentation of BCCD. It answered *erythroblast* on 27 BCCD fields "
        "instead of 36, but lost more elsewhere. Not shipped.",
        '- **Keeping the crop window inside the field** (a cell whose 4-diameter window reaches past a camera '
        'field is cropped from a window shifted back inside the image, so the crop holds real pixels and the '
        'cell sits off-centre, instead of glass-filling the part past the edge; a one-off patch of the '
        "cropping step scored by `benchmarks/model_eval.py --skip-scale`'s BCCD loop, not kept): 70.36 % on "
        'BCCD (81.43 % over the 5 types) against the shipped 73.21 % (78.93 %). The rule set before the run '
        'was to keep it only with at least four more fields right on the 8-class figure, so it is not kept; '
        'PBC crops rarely reach past their image, so PBC accuracy was not at stake.',
        "- **Training on from the shipped model** for 30 more epochs at a fifth of the learning rate "
        "(`--epochs-wbc 30 --patience 30` with `\"init_from\"` the shipped file and `\"lr\": 0.0004` added to "
        "`--options-wbc`): "
        "its best epoch scored 96.96 % on PBC val, the same as the shipped model.",
        "- **Faint cytoplasm** (session 12). The BCCD neutrophils answered *erythroblast* show a lobed nucleus "
        "whose cytoplasm is barely darker than the glass. Fading the cytoplasm of the PBC val crops towards "
        "their glass colour (`augment_batch(faint_cytoplasm_probability=1, min_faint_cytoplasm=0.75)`, which "
        "also shrinks the cell mask to the nucleus and a thin rim) made the shipped model answer otherwise for "
        "130 of 334 neutrophils (lymphocyte 39, platelet 37, erythroblast 31, basophil 18): it leans on the "
        "cytoplasm. Fine-tuning it for 20 epochs with 30 % of the neutrophil, lymphocyte, monocyte and "
        "erythroblast crops so faded (strength 0.5-1; eosinophils, basophils and IGs are told by the granules "
        "of their cytoplasm and were left alone): `--epochs-wbc 20 --patience 20 --out DIR` with "
        "`\"faint_cytoplasm_probability\": 0.3, \"faint_cytoplasm_classes\": [\"neutrophil\", \"lymphocyte\", "
        "\"monocyte\", \"erythroblast\"]` added to the shipped `augment_options` and `\"init_from\"` the "
        "shipped file, `\"lr\": 0.0004, \"warmup_epochs\": 0.5` to `--options-wbc` (18 min on 2 CPU cores; best "
        "epoch 15). It scored 97.66 % on PBC val (macro-F1 97.58 %, prior correction 0.25) and 71.43 % on BCCD "
        "(200 of 280 fields; 22 neutrophil fields still answered erythroblast, against 19), against the shipped "
        "97.25 % and 73.93 %. The rule written down before the run was to ship it at BCCD >= 75.7 % with PBC "
        "val >= 97.1 %, so it is not shipped; the mean of its and the shipped model's probabilities gave "
        "97.84 % and 73.21 % (a one-off script). Test-time changes scored on the same BCCD crops (one-off "
        "scripts, not kept) did not help either: BatchNorm statistics re-estimated on BCCD's white-cell crops "
        "56.4 %, sharpening the crops (unsharp mask, sigma 1-1.5 px) 75.0 % at best (three fields more, the "
        "erythroblast answers turned mostly into eosinophils), dilating the cell-mask channel by 2-6 px "
        "63.6-68.9 %. Looked at, several of the BCCD eosinophils answered *neutrophil* show no red granules.",
        "- **Weight averaging** (session 13, shipped; stochastic weight averaging, Izmailov et al., UAI 2018, "
        "which SWAD (Cha et al., NeurIPS 2021) showed to carry over to unseen domains: an average of the weights "
        "along the training path sits in a flatter minimum). The 80-epoch model was fine-tuned for 16 epochs "
        "(`\"init_from\"` it, `\"lr\": 0.0006, \"warmup_epochs\": 0.5, \"average_weights_from\": 1` added to "
        "the shipped `--options-wbc`; `train(average_weights_from=1)`: the model scored and written is the "
        "mean of the weights at the end of every epoch so far, its BatchNorm statistics measured again on "
        "4,096 augmented training crops), and the best average on PBC val (after epoch 14) ships. Against the "
        "80-epoch model alone: PBC val 97.25 % -> 97.43 % (macro-F1 97.20 % -> 97.40 %), BCCD 73.93 % -> "
        "75.71 % (207 -> 212 of 280 fields; 80.00 % -> 82.50 % over the 5 types), the PBC scale test 96.09 % "
        "-> 95.93 % (stored size) and 95.94 % -> 95.94 % (360 px). The rule written before the run: ship at "
        "BCCD >= 75.0 % with PBC val >= 97.1 %, or PBC val >= 97.7 % with BCCD >= 73.9 %. "
        "`scripts/train_default_models.py` now runs both stages (`--average-epochs-wbc 16`; 0 ships the first "
        "alone). Where the bullets below say *the shipped model*, they mean the 80-epoch model of their day.",
        "- **Turned views** (session 14, shipped for both models): each crop is classified as it is, mirrored "
        "and turned by quarter turns (the 8 symmetries of the square) and the probabilities averaged "
        "(`classify_crops(test_time_views=8)`, stored in both files; every path that classifies uses it). "
        "Chosen on the validation splits among 1, 4 and 8 views (one-off scripts, not kept), the "
        "prior-correction strengths chosen again "
        "with them (unchanged: 1 and 0.5). `wbc-pbc8`: PBC val 97.43 % -> 97.78 % (macro-F1 97.40 % -> "
        "97.76 %; 4 views 97.60 %), the PBC scale test 95.93 % -> 96.09 % (stored size) and 95.94 % -> "
        "96.09 % (360 px), BCCD 75.71 % -> 75.36 % (212 -> 211 of 280 fields) but 82.50 % -> 84.29 % over "
        "the 5 BCCD types (231 -> 236 fields), BCCD detection unchanged. `rbc-chula12` on its val crops "
        "(re-cut with the current segmentation, 3711 cells): 87.01 % / 73.10 % -> 87.55 % / 73.98 % "
        "(accuracy / macro-F1; 4 views 87.12 % / 73.16 %). The classifiers take 8 times as long: "
        "`test_time_views=1` (`--test-time-views 1`) for the fastest run on a CPU. An earlier try on the "
        "40-epoch model (4 flips, not shipped) had cost BCCD two fields.",
        "- **MixStyle** (session 12; Zhou et al., ICLR 2021: each crop's per-channel feature means and "
        "deviations after the first two backbone stages mixed with another crop's, in half the training "
        "batches, a domain-generalisation method for style shifts such as stain and camera; `train(mixstyle=0.5)`). "
        "Fine-tuning the shipped model with it for 20 epochs (the shipped `--options-wbc` with `\"mixstyle\": 0.5`, "
        "`\"init_from\"` the shipped file, `\"lr\": 0.0004, \"warmup_epochs\": 0.5`; `--epochs-wbc 20 --patience 20 "
        "--out DIR`; best epoch 17) scored 96.84 % on PBC val (macro-F1 96.67 %) and 72.14 % on BCCD (202 of 280 "
        "fields), below the shipped model on both; by the same rule as the faint-cytoplasm run it is not shipped, "
        "and a full 80-epoch run with it was not tried.",
        "- **A longer schedule** (120 epochs instead of 80, same seed: `--epochs-wbc 120 --patience 30 --out DIR`, "
        "2 h 17 min on 2 CPU cores; best epoch 108): 97.43 % on PBC val (macro-F1 97.29 %), 97.49 % with its own "
        "prior correction (strength 0.25, chosen by the same rule), and 71.79 % on BCCD (80.71 % over the 5 "
        "types), against the shipped model's 96.84 % and 73.21 % (78.93 %) with the segmentation of that day "
        "(2026-11-30). The rule written down before "
        "its result was to ship it at PBC val >= 97.10 % and BCCD >= 72.1 %; BCCD fell one field short, so it "
        "is not shipped. More epochs keep paying on PBC (94.27 % at 40, 96.96 % at 80, 97.43 % at 120) and not "
        "on another microscope.",
        "- **A warm restart** (session 15, not shipped): 40 more epochs from the shipped file with a fresh "
        "cosine schedule (`\"init_from\"` it, `\"lr\": 0.001, \"warmup_epochs\": 1` added to the shipped "
        "`--options-wbc`; `--epochs-wbc 40 --patience 40 --out DIR`; best epoch 35), then the usual 16-epoch "
        "weight-averaging stage (best after epoch 16); about an hour on 2 CPU cores, shared with other work part of the time. With 8 turned views and its own "
        "prior correction (1): PBC val 98.13 % (macro-F1 98.16 %) against the shipped 97.78 % (97.76 %); BCCD "
        "74.29 % (208 of 280 fields; 84.64 % over the 5 types) against 75.36 % (84.29 %). Its first stage "
        "alone: macro-F1 98.17 % on PBC val (prior correction 0.25), BCCD 74.29 % (83.93 %). The rule "
        "written down before the run was to ship at PBC val >= 98.0 % with BCCD >= 75.0 %: BCCD fell three "
        "fields short, so it is not shipped. As with the longer schedule, more training pays on PBC and not "
        "on another microscope. The uniform average of its weights and the shipped model's (a *model soup*, "
        "Wortsman et al., ICML 2022; a one-off script, BatchNorm statistics averaged as well) scored 97.89 % on "
        "PBC val (prior correction 0.75), below the 98.0 % its rule (written before it was scored) asked for: "
        "not shipped, BCCD not run.",
        "- **Ensembles** (session 17, not shipped): one file holding trained models that answers with the mean "
        "of their logits and attention maps (model kind `ensemble`, `napari_smear.models.combine_models`; "
        "`scripts/train_default_models.py --only wbc-pbc8 --ensemble FILE FILE... --out DIR`, which chooses "
        "its prior correction on val like a trained model). The shipped model with the warm restart above: "
        "PBC val 97.95 % (macro-F1 97.93 %, prior correction 1), 9.0 MB, twice the inference time; with the "
        "scale-augmented model below as a third member: 97.89 % (97.86 %). The rule written before they were "
        "scored was to ship at PBC val >= 98.0 % with BCCD >= 75.36 %: neither passes (the warm restart alone "
        "scores 98.13 %). BCCD for the first, for the record: 75.36 % (211 "
        "of 280 fields; 85.36 % over the 5 types), the shipped model's figure.",
        "- **Eosinophil outlines** (session 16, not shipped). By colour alone the segmentation outlines a PBC "
        "eosinophil by little more than its nucleus (its orange granules are nearly the red cells' colour), while "
        "BCCD's softer eosinophils are outlined whole, so the model learned a cell mask unlike the one it gets on "
        "another microscope. An option counts dense granules as cytoplasm ([benchmarks](benchmarks.md#"
        "segmentation-accuracy), *Eosinophil outlines*). With the PBC crops re-packed with it, the shipped model "
        "scored 97.60 % on PBC val and 74.64 % on BCCD (209 of 280 fields, against 97.78 % and 211 on its own crops); "
        "fine-tuned on them (`--epochs-wbc 12 --patience 12 --average-epochs-wbc 12 --out DIR` with `\"init_from\"` "
        "the shipped file, `\"lr\": 0.0004, \"warmup_epochs\": 0.5` added to the shipped `--options-wbc`; best epoch "
        "9, best average after epoch 12; 20 min on 2 CPU cores) 97.89 % on PBC val (macro-F1 97.83 %, prior "
        "correction 0.75) and 73.21 % on BCCD (205 of 280 fields; 82.14 % over the 5 types): BCCD's neutrophils "
        "were answered *eosinophil* on 10 fields (4 before) and its eosinophils *neutrophil* on 12 (13). The rule "
        "written down before the run was to ship it, and the option as the default, at PBC val >= 97.6 % with "
        "BCCD >= 75.36 %; BCCD fell short, so neither is.",
        "- **Scale augmentation for thick smear areas** (session 16, not shipped). Many of BCCD's wrong answers "
        "are small white cells from thick parts of the smear called *erythroblast* (the size table under "
        "Robustness). Fine-tuned from the shipped file with the crops zoomed by 0.625-1.6 instead of 1/1.15-1.15 "
        "(`\"scale_jitter\": 0.6` in the shipped `augment_options`, `\"init_from\"` the shipped file, `\"lr\": "
        "0.0004, \"warmup_epochs\": 0.5`; `--epochs-wbc 12 --patience 12 --average-epochs-wbc 12 --out DIR`; "
        "35 min on 2 CPU cores, shared with a test run for some of it): 97.60 % on PBC val (macro-F1 97.59 %, prior correction 0.5) and 75.00 % "
        "on BCCD (210 of 280 fields; 81.07 % over the 5 types). Fields whose white cell measures under 1.4 "
        "red-cell diameters went from 48.72 % to 55.13 % (erythroblast answers 33 -> 28), those of 1.6-1.8 from "
        "81.25 % to 72.92 %. The rule written down before the run was to ship it at PBC val >= 97.6 % with BCCD "
        ">= 77.0 %: not shipped. Zooming the crops at inference instead (the crop window narrowed to 4/1.3 and "
        "4/1.6 red-cell diameters; a one-off script) gave 73.21 % and 63.93 %.",
        "- **Averaging views at inference** (session 19, one-off script on the shipped model's BCCD crops, "
        "chosen on the fields of the *train* split of `datasets.field_split_of`, 229 of the 280, checked on "
        "the other 51): the probabilities of each crop averaged with those of the crop zoomed in (its centre "
        "enlarged by 1.15, 1.3 or 1.5; or 1.2 and 1.4, or 1.3 and 1.6, with the crop itself), or with the "
        "crop's stain made lighter and darker (optical density times 0.85 and 1.15, or 0.7 and 1.3). Against "
        "the shipped answers (175 of 229 and 36 of 51 fields) none gained more than 2 train fields: zoom 1.3 "
        "gave 177 and 38 (76.79 % over all 280), the stain variants 175 and 36 or fewer. Within what a "
        "different choice of fields moves, and each doubles or triples the classification time: not adopted.",
        "- **128 px crops** (session 20, not shipped). The same 4 red-cell-diameter window cut at 128 px "
        "instead of 96 (32 px per red cell instead of 24; PBC's stored images hold about 54 (median red-cell ruler of 20 images), so 96 px crops "
        "drop detail of the granules). Packed with `train_default_models.py --only wbc-pbc8 --pack-only "
        "--size-wbc 128` (33 min on 2 cores, 73.2 MB at JPEG quality 90), then fine-tuned from the shipped "
        "file (a copy whose metadata says 128 px: the network is fully convolutional) for 16 epochs "
        "(`--size-wbc 128 --epochs-wbc 16 --patience 16 --average-epochs-wbc 12` with `\"init_from\"` that "
        "copy, `\"lr\": 0.0004, \"warmup_epochs\": 0.5` added to the shipped `--options-wbc`; about 110 s an "
        "epoch against 48-70 s at 96 px in session 15's warm restart) and the usual weight-averaging stage (12 epochs): PBC val 97.54 % "
        "(macro-F1 97.51 %, prior correction 0.75; best single-view epoch 96.90 %) and BCCD 72.50 % (203 of "
        "280 fields; 82.50 % over the 5 types), against the shipped 97.78 % and 75.36 %. The rule written "
        "before the run was to ship at PBC val >= 98.0 % with BCCD >= 211 fields: not shipped. 28 epochs of "
        "fine-tuning do not make up for the change of scale; whether 128 px pays after a full schedule "
        "(80 + 16 epochs, about 3 h on 2 cores) is left for a machine with a GPU.",
        "- **Class frequencies estimated on the batch** (session 21, not built in). A slide's mix of white "
        "cells is not PBC's (few erythroblasts and immature granulocytes in peripheral blood), so instead of "
        "correcting the balanced answers with PBC's training frequencies, the frequencies were estimated from "
        "the model's own answers over a whole batch by expectation-maximisation (Saerens, Latinne and "
        "Decaestecker, Neural Computation 2002; unsupervised: no BCCD label used, started from PBC's "
        "frequencies, run to convergence). Scored offline on the balanced, view-averaged probabilities of "
        "every white cell of the 292 BCCD fields (a one-off script): 214 of 280 fields right (76.43 %) "
        "against 211 with PBC's frequencies and 208 balanced, and 97.60 % on PBC val (EM over the val crops) "
        "against 97.54 %. EM put the erythroblasts at 13.8 % of BCCD's white cells: the small neutrophils "
        "answered *erythroblast* look like erythroblasts to the model, and re-weighting does not move them. "
        "The rule written before the measurement asked for 217 fields, so it was not built into the batch.",
        "- **Peripheral-blood class frequencies** (session 22, not built in). Instead of PBC's training "
        "frequencies (which hold 10 % erythroblasts and 18.5 % immature granulocytes, 18 % neutrophils: PBC "
        "collected abnormal samples), the frequencies of a normal adult differential from textbook reference ranges: neutrophil "
        "0.60, lymphocyte 0.30, monocyte 0.06, eosinophil 0.03, basophil 0.005, immature granulocyte 0.005, "
        "erythroblast 0.001 per white cell (the platelet class kept at its PBC share), at strength 1 on the "
        "balanced, view-averaged probabilities of every white cell of the 292 BCCD fields (a one-off script "
        "that reproduces the shipped 211 fields with PBC's frequencies). 232 of 280 fields right (82.86 %; "
        "84.29 % over the 5 types before): neutrophils 165 of 167 (138 before), lymphocytes 26 of 29 (20), "
        "monocytes 12 of 17 (11), but eosinophils 29 of 66 (41) and the one basophil lost. So most of BCCD's "
        "wrong answers have the right class second, behind a class PBC makes common. The rule written before "
        "the measurement asked for 219 fields *and* eosinophils at 50 % or more (an eosinophilia missed is a "
        "clinical error, and BCCD's fields are 24 % eosinophils against the 3 % assumed): 44 % failed it, so "
        "no such setting was built; the frequencies of a lab's own population would be the way, and need its "
        "labelled cells to set.",
        "- **Which crops**: the training experiments above were scored on crops of the segmentation of their "
        "day. Since then labels are drawn at full resolution without working-pixel steps on their outlines, "
        "and pale red cells whose faint rim closes round their pallor are found; scored again on crops cut "
        "that way, the shipped `wbc-pbc8` gives 96.78 % on PBC val (96.96 % on the crops it was "
        "trained on, 96.90 % after the outline change) and 73.21 % on BCCD (72.86 % before); with the prior "
        "correction chosen since (see Validation), 96.84 % and 73.21 %. On 2026-12-01 a first "
        "version of the vignetting fix (every tile fitting its glass with the field's wider split; "
        "[benchmarks](benchmarks.md#eyepiece-photos-and-vignetting)) moved some PBC masks a little (184 of 395 "
        "sampled images differ, median overlap 1.0, 5th percentile 0.965): re-packed, the shipped model scored "
        "96.49 % on PBC val (prior correction chosen again: 1), and fine-tuning it for 8 epochs on those crops "
        "(`train_default_models.py --only wbc-pbc8 --epochs-wbc 8 --patience 8 --out DIR` with `\"init_from\": "
        "FILE, \"lr\": 0.0002, \"warmup_epochs\": 0.5` added to the shipped `--options-wbc`) reached 96.73 % "
        "(macro-F1 96.66 %); the rule written down before that run was to ship it only at 96.84 % or more, so it "
        "is not shipped. The fix that shipped takes the wide split only where the tight one loses the glass, "
        "and cuts PBC's crops exactly as before (789 images checked), so the PBC figures stand; on BCCD, where "
        "2 % of the fields take the wide fit, the model scored 73.57 % (one field more). Later that day the "
        "red-cell ruler got a second start for answers that hardly any whole cell confirms, and a folder of "
        "single-cell images now crops an image whose own ruler lies over 1.4 times off the folder's median at "
        "that median ([getting started](getting-started.md#how-the-segmentation-works), step 3): 527 of the "
        "12,634 PBC images (4.2 %) are now cropped at the median scale, against 144 whose ruler had failed "
        "before, and none lies that far off any more (556 did; on PBC val those crops had been typed right on "
        "89 %, the others on 97 %). Re-packed, the shipped model, not re-trained, scored 97.13 % on PBC val "
        "(macro-F1 97.05 %; the prior-correction strength chosen again is the same, 0.25) and 73.93 % on BCCD. "
        "In session 11 the glass/stain split stopped putting very pale red cells with the glass on 2.4 % of PBC "
        "images (eosinophils and basophils among pale red cells are now segmented whole; see "
        "[benchmarks](benchmarks.md#segmentation-accuracy)); re-packed (`train_default_models.py --pack-only "
        "--only wbc-pbc8`, 1716 s; 324 images cropped at the folder median) and scored again with "
        "`--rescore-only`, the model of that day gave 97.25 % on PBC val (macro-F1 97.20 %; strength again "
        "0.25). No BCCD field segmented differently, so its BCCD figure (73.93 %) stood; it was not re-run in "
        "session 11. (The figures under Validation are those of the model shipped since, with its own prior "
        "correction.)",
        "- **`rbc-chula12`**: 80 epochs instead of 40 took validation accuracy from 79.90 % to 83.63 % and "
        "macro-F1 from 67.38 % to 71.81 % (on 3707 validation cells; the 40-epoch model's crops, cut by an older "
        "segmentation, held 3607). Re-trained the same way on crops whose outlines have no working-pixel steps "
        "(3708 validation cells): 84.36 % and 71.25 %, where the model it replaced scored 83.63 % and 70.82 % on "
        f"the same crops. On the current crops, which also hold the pale red cells found since ({rbc_val.get('n')} "
        f"validation cells): {_pct(rbc_raw.get('accuracy', rbc_val.get('accuracy')))} and "
        f"{_pct(rbc_raw.get('macro_f1', rbc_val.get('macro_f1')))}"
        + (f"; with the prior correction chosen since (see Validation) {_pct(rbc_val.get('accuracy'))} and "
           f"{_pct(rbc_val.get('macro_f1'))}" if rbc_raw else "")
        + ". The rare classes (teardrop, "
        "burr cell, uncategorised: a few dozen training cells each) stay the weak ones, so read their counts as a hint.",
        "- **`rbc-chula12` with weight averaging** (session 13, the same second stage as `wbc-pbc8`'s: 16 epochs "
        "fine-tuned from the shipped file, `--options-rbc '{\"init_from\": <the shipped file>, \"lr\": 0.0006, "
        "\"warmup_epochs\": 0.5, \"average_weights_from\": 1}' --epochs-rbc 16 --patience 16 --out DIR`; crops "
        "re-packed first, 17,416): 86.98 % / 72.97 % (accuracy / macro-F1 on val, with its own prior correction, "
        "0.75; best average after epoch 15) against the shipped 86.98 % / 73.22 %. The rule written before the "
        "run was to ship at macro-F1 >= 73.72 % with accuracy >= 86.5 %: not shipped.",
        '- **`rbc-chula12` with less scale augmentation** (zoom drawn from 1/1.03 to 1.03 instead of 1/1.12 '
        'to 1.12: micro- and macrocytes differ from normal cells by size, and the crops are already scaled by '
        'the field\'s own ruler; 80 epochs, same seed, `--options-rbc \'{"augment_options": {"scale_jitter": '
        "0.03}}' --out DIR`): best epoch 78, 85.80 % / 73.89 % (accuracy / macro-F1, with its own prior "
        'correction, 0.25) against the shipped 86.98 % / 73.22 %. The size classes gained (F1: macrocyte '
        '0.738 -> 0.795, microcyte 0.514 -> 0.554), normal recall fell (0.833 -> 0.775) and burr-cell '
        'precision with it (0.741 -> 0.519). With the colour augmentation lowered as well (`od_jitter`, '
        '`brightness`, `contrast` 0.05): best epoch 58, 87.77 % / 71.84 % (strength 0.75). The rule written '
        'down before either run was to ship one only at macro-F1 >= 73.72 % and accuracy >= 86.5 %; neither '
        'met both, so neither is shipped. Each run took about 35 min on 2 CPU cores.',
        "- **`rbc-chula12`'s architecture** was checked by the same ablation as on PBC, run on the Chula crops "
        "([ablation-chula.md](ablation-chula.md): `python benchmarks/ablation.py --dataset chula --epochs 10 "
        "--threads 2`, 10 epochs each, seed 0). Every model ended within 0.5 points of macro-F1 of the plain "
        "baseline (57.05 %) except DAFFNet (54.87 %; its morphology branch has no red-cell attributes to learn "
        "from), so at this budget no attention design classifies red cells better than another. The shape-aware "
        "network keeps most of its attention on the cell (0.652 of it inside the cell mask, against 0.290 for the "
        "plain backbone and 0.316 for gated attention), which is what its attention maps are shown for. The rule "
        "written down before the run was to train a variant for 80 epochs only if it beat shape-aware by 2 points "
        "of macro-F1; none did, so `rbc-chula12` stays shape-aware. The training times in that table were "
        "measured while other work shared the two cores.",
        *_red_cells_elsewhere((evaluation or {}).get("red_cells_on_bccd")),
        "- **Speed figures** were measured on a quiet 2-core machine (no GPU was available to us).",
        "",
    ]
    (ROOT / "docs" / "models.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'docs' / 'models.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
