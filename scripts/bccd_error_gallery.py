"""Draw docs/images/bccd_erythroblast_answers.png: the BCCD white cells the built-in
white-cell model calls *erythroblast*, the largest error of its cross-microscope test.

    python scripts/bccd_error_gallery.py [--answer erythroblast] [--n 18] [--zoom 1.0]

Needs ../shared/data. Every BCCD field that names one white-cell type goes through
the full path (segment, crop, classify; ``benchmarks/model_eval.py``'s BCCD loop) and
the field's answer is its most confident white cell. The first ``--n`` fields whose
answer is ``--answer`` are shown, each as the window the model saw (4 red-cell
diameters, before resampling to 96 px), titled with BCCD's type and the cell's size
in red-cell diameters. ``--zoom Z`` crops every cell Z times larger than the model's
own window (a window of 4 / Z diameters) and prints the accuracy that gives: a
test of how much the cells' size relative to the red cells drives the answer.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answer", default="erythroblast")
    parser.add_argument("--n", type=int, default=18)
    parser.add_argument("--zoom", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "bccd_erythroblast_answers.png"))
    args = parser.parse_args(argv)
    if not args.zoom > 0:
        parser.error("--zoom must be positive")

    from model_eval import DATA, bccd_white_cell_types, white_cell_answer

    if not (DATA / "bccd" / "images").is_dir():
        print(f"BCCD data not found under {DATA}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_smear import analyze
    from napari_smear.io import read_image
    from napari_smear.models import load_model

    truth = bccd_white_cell_types()
    model, info = load_model("wbc-pbc8", device="cpu")
    info = dataclasses.replace(info, crop_diameters=info.crop_diameters / args.zoom)
    shown, right, total, answered = [], 0, 0, 0
    for path in sorted((DATA / "bccd" / "images").glob("*.jpg")):
        if path.stem not in truth:
            continue
        rgb, _ = read_image(path)
        result = analyze(rgb, models=[(model, info)], device="cpu", morphology=False)
        row = white_cell_answer(path.stem, truth[path.stem], rgb, result, info)
        total += 1
        right += row["predicted"] == row["truth"]
        if row["predicted"] != args.answer:
            continue
        answered += 1
        if len(shown) >= args.n:
            continue
        wbcs = result.table[(result.table.cell_type == "wbc") & result.table["class"].notna()]
        best = wbcs.loc[wbcs.confidence.idxmax()]
        half = int(round(info.crop_diameters * result.segmentation.rbc_diameter_px / 2))
        # the window past the field is white here (the model sees it filled with glass)
        padded = np.pad(rgb, ((half, half), (half, half), (0, 0)), constant_values=255)
        cy, cx = int(round(best.centroid_y)), int(round(best.centroid_x))
        shown.append((padded[cy : cy + 2 * half, cx : cx + 2 * half], path.stem, row))
    print(f"zoom {args.zoom:g}: {right}/{total} fields right ({right / max(total, 1):.2%}); "
          f"{answered} answered {args.answer}")
    if not shown:
        print(f"no field was answered {args.answer!r}; nothing drawn")
        return 0
    cols = 6
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (window, stem, row) in zip(axes.ravel(), shown):
        ax.imshow(window)
        ax.set_title(f"{row['truth']}, {row['diameter_rbc']:.2f} d\n{stem.replace('BloodImage_', '#')}", fontsize=8)
    fig.suptitle(f"BCCD white cells the model answered '{args.answer}' (BCCD's type, size in red-cell "
                 f"diameters d; window {info.crop_diameters:.2g} d)", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
