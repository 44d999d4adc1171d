"""Draw docs/images/stain_normalisation.png: white cells from PBC and BCCD, as cropped and
after :func:`napari_smear.normalize.normalize_stain`.

    python scripts/stain_figure.py

Needs ../shared/data. The cells are the first PBC validation image of four classes and
the most confident white cell of the first BCCD field of the same four types.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TYPES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_smear.crops import central_label, crop_instances
    from napari_smear.io import read_image
    from napari_smear.normalize import METHOD
    from napari_smear.segment import segment_smear

    if not DATA.is_dir():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 2
    split = pd.read_csv(DATA / "pbc" / "split.csv")
    bccd_types = pd.read_csv(DATA / "bccd" / "wbc_types.csv", dtype=str).fillna("")
    rows = []
    for cell_type in TYPES:
        pbc_path = DATA / "pbc" / split[(split.split == "val") & (split.label == cell_type)].sort_values("path").path.iloc[0]
        bccd_name = bccd_types[bccd_types.wbc_type == cell_type.upper()].sort_values("image").image.iloc[0]
        pairs = []
        for path, pick in ((pbc_path, "centre"), (DATA / "bccd" / "images" / f"{bccd_name}.jpg", "largest")):
            rgb = read_image(path)[0]
            seg = segment_smear(rgb)
            if pick == "centre":
                label = central_label(seg)
            else:
                wbc = seg.table[seg.table.cell_type == "wbc"]
                label = int(wbc.loc[wbc.area_px.idxmax(), "label"])
            raw = crop_instances(rgb, seg, labels=[label]).images[0]
            normalised = crop_instances(rgb, seg, labels=[label], stain_normalization=METHOD).images[0]
            pairs += [raw, normalised]
        rows.append(pairs)
    titles = ("PBC as stored", "PBC normalised", "BCCD as stored", "BCCD normalised")
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)))
    for r, (cell_type, pairs) in enumerate(zip(TYPES, rows)):
        for c, crop in enumerate(pairs):
            ax = axes[r, c]
            ax.imshow(crop)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(cell_type, fontsize=10)
    fig.suptitle("Stain normalisation anchored on red cells and nuclei (anchored-v1)", fontsize=11)
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "stain_normalisation.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
