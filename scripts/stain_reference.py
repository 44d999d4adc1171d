"""Measure the reference stain colours (glass, red cells, nuclei) of a data set.

The built-in white-cell model is trained on PBC crops recoloured into PBC's own median
stain, so the reference is PBC's: ``napari_smear.normalize.PBC_REFERENCE`` holds the
figures this script prints for the default arguments (the PBC training split, 50 crops
per class, seed 0). Other data sets print their spread for comparison, e.g.::

    python scripts/stain_reference.py                       # PBC train, the reference
    python scripts/stain_reference.py --bccd --limit 100    # how far BCCD sits from it
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _paths(args) -> list[Path]:
    if args.bccd:
        return sorted((DATA / "bccd" / "images").glob("*.jpg"))[: args.limit]
    split = pd.read_csv(DATA / "pbc" / "split.csv")
    train = split[split.split == "train"]
    picked = train.groupby("label", group_keys=False).apply(
        lambda g: g.sample(min(len(g), args.per_class), random_state=args.seed)
    )
    return [DATA / "pbc" / p for p in picked.path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bccd", action="store_true", help="measure BCCD fields instead of PBC train")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 2

    from napari_smear.io import read_image, as_rgb_uint8
    from napari_smear.normalize import stain_anchors
    from napari_smear.segment import segment_smear
    from napari_smear.segment.scale import ScaleEstimateError

    rows = []
    for path in _paths(args):
        rgb = as_rgb_uint8(read_image(path)[0])
        try:
            segmentation = segment_smear(rgb)
        except ScaleEstimateError:  # a crop with too few red cells to measure the scale
            continue
        anchors = stain_anchors(rgb, segmentation)
        row = {"path": path.name}
        row.update({f"glass_{c}": v for c, v in zip("rgb", anchors.glass)})
        for name in ("rbc_od", "nucleus_od"):
            values = getattr(anchors, name) or (np.nan,) * 3
            row.update({f"{name}_{c}": v for c, v in zip("rgb", values)})
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = table.drop(columns="path").describe(percentiles=[0.1, 0.5, 0.9]).T[["count", "10%", "50%", "90%"]]
    print(summary.round(3).to_string())
    median = table.drop(columns="path").median()
    print("\nStainAnchors(")
    for name, prefix, digits in (("glass", "glass", 0), ("rbc_od", "rbc_od", 2), ("nucleus_od", "nucleus_od", 2)):
        values = ", ".join(f"{median[f'{prefix}_{c}']:.{digits}f}" for c in "rgb")
        print(f"    {name}=({values}),")
    print(")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
