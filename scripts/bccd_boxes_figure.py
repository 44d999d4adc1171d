"""Draw docs/images/bccd_rbc_boxes.png: why BCCD's red-cell boxes cap the RBC detection F1.

    python scripts/bccd_boxes_figure.py [--fields BloodImage_00200 BloodImage_00005]

Needs ../shared/data. Per field: BCCD's red-cell boxes (yellow) over the segmented red
cells, outlined green when the cell's centroid lies in a box (what
``benchmarks/segment_accuracy.py`` can match) and magenta when it lies in none: every
magenta cell counts against precision, whole clearly visible cells included.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", nargs="+", default=["BloodImage_00200", "BloodImage_00005"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "bccd_rbc_boxes.png"))
    args = parser.parse_args(argv)
    if not (DATA / "bccd" / "images").is_dir():
        print(f"BCCD data not found under {DATA / 'bccd'}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from segment_accuracy import in_any_box, read_boxes
    from skimage.segmentation import find_boundaries

    from napari_smear.io import read_image
    from napari_smear.segment import segment_smear

    fig, axes = plt.subplots(1, len(args.fields), figsize=(6.4 * len(args.fields), 5.4), squeeze=False)
    for ax, stem in zip(axes[0], args.fields):
        rgb = read_image(DATA / "bccd" / "images" / f"{stem}.jpg")[0]
        seg = segment_smear(rgb)
        boxes = read_boxes(DATA / "bccd" / "boxes" / f"{stem}.xml")["rbc"]
        rbc = seg.table[seg.table.cell_type == "rbc"]
        boxed = in_any_box(rbc[["centroid_x", "centroid_y"]].to_numpy(), boxes)
        shown = rgb.copy()
        for ids, colour in ((rbc.label[boxed], (40, 200, 60)), (rbc.label[~boxed], (230, 40, 230))):
            edge = find_boundaries(np.where(np.isin(seg.labels, ids.to_numpy()), seg.labels, 0), mode="inner")
            shown[edge] = colour
        ax.imshow(shown)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
        edge_cells = int(rbc.touches_edge[~boxed].sum()) if "touches_edge" in rbc else 0
        ax.set_title(f"{stem}: {len(boxes)} red-cell boxes, {len(rbc)} segmented red cells,\n"
                     f"{int(boxed.sum())} in a box (green), {int((~boxed).sum())} in none (magenta; "
                     f"{edge_cells} cut by the edge)", fontsize=9)
        ax.axis("off")
    fig.suptitle("BCCD red-cell boxes (yellow) against napari-smear's red cells", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
