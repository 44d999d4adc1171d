"""Classify the cells of every smear field in a folder and tabulate the differential counts.

    python docs/examples/analyze_folder.py fields/ --out results/
    python docs/examples/analyze_folder.py fields/ --out results/ --model my_model.safetensors

For each image, ``results/<stem>_cells.csv`` gets one row per cell (segmentation,
morphology, class, confidence, per-class probabilities), and ``results/counts.csv`` the
differential counts of all images (``file, cell_type, class, count, percent``). An image
that cannot be read or analysed is listed in ``results/errors.csv`` and the loop carries
on. The models are loaded once and reused for every image.

This is the plain-Python loop; ``napari-smear`` also has a batch command for large runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of smear fields (searched recursively)")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--model", action="append", help="built-in model name or model file (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--limit", type=int, default=None, help="analyse at most this many images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import pandas as pd

    import napari_smear
    from napari_smear.io import file_stem, read_image, write_csv_atomic
    from napari_smear.models import available_models, load_model
    from napari_smear.predict import expand_image_inputs, select_device

    names = args.model or available_models()
    if not names:
        sys.exit("no built-in model is installed here: pass --model with a model file")
    device = select_device(args.device)
    models = [load_model(name, device=device) for name in names]  # loaded once, reused below
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    paths = expand_image_inputs([args.folder])[: args.limit]
    counts, errors = [], []
    for i, path in enumerate(paths, 1):
        try:
            image, meta = read_image(path)
            result = napari_smear.analyze(image, models=models, device=device,
                                          recorded_pixel_size_um=meta.get("pixel_size_um"))
        except Exception as exc:  # report the file and carry on with the others
            errors.append({"file": str(path), "error": f"{type(exc).__name__}: {exc}"})
            print(f"[{i}/{len(paths)}] {path.name}: FAILED ({exc})")
            continue
        write_csv_atomic(out / f"{file_stem(path)}_cells.csv", result.table)
        counts.append(result.counts.assign(file=str(path)))
        summary = ", ".join(f"{n} {t}" for t, n in result.counts.groupby("cell_type")["count"].sum().items())
        print(f"[{i}/{len(paths)}] {path.name}: {summary}")

    table = pd.concat(counts, ignore_index=True) if counts else pd.DataFrame(
        columns=["file", "cell_type", "class", "count", "percent"])
    table = table[["file", "cell_type", "class", "count", "percent"]]
    write_csv_atomic(out / "counts.csv", table)
    if errors:
        write_csv_atomic(out / "errors.csv", pd.DataFrame(errors))
    print(f"{len(counts)} of {len(paths)} images analysed; counts in {out / 'counts.csv'}"
          + (f"; {len(errors)} failed, see {out / 'errors.csv'}" if errors else ""))
    return table


if __name__ == "__main__":
    main()
