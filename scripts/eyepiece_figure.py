"""Draw docs/images/eyepiece_photo.png: real fields as photographed through an
eyepiece, and their segmentation.

    python scripts/eyepiece_figure.py [--out docs/images/eyepiece_photo.png]

Needs ../shared/data. A Chula RBC-12 field and a BCCD field are turned into eyepiece
photos by :func:`napari_smear.samples.eyepiece_photo` (a round view of 0.55 of the
short side in a black frame, fading over 1.5 % of the radius, 10 % vignetting, as
``benchmarks/segment_robustness.py``'s "eyepiece" condition) and segmented by
:func:`napari_smear.segment_smear` at its defaults. Each row: the photo, the image the
segmentation works on (the frame painted as glass), and the cell outlines (green;
magenta: cut by the rim of the view or the image edge, ``touches_edge``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FIELDS = ("chula_rbc12/images/100.jpg", "bccd/images/BloodImage_00001.jpg")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "eyepiece_photo.png"))
    args = parser.parse_args(argv)
    paths = [DATA / name for name in FIELDS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"fields not found: {missing}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from napari_smear import segment_smear
    from napari_smear.io import read_image
    from napari_smear.samples import eyepiece_photo
    from napari_smear.segment import fill_outside_view, find_outside_view

    fig, axes = plt.subplots(len(paths), 3, figsize=(12, 3.2 * len(paths)))
    for row, path in zip(axes, paths):
        photo, _ = eyepiece_photo(read_image(path)[0], fade=0.015, vignette=0.1)
        painted = fill_outside_view(photo, find_outside_view(photo))
        seg = segment_smear(photo)
        outlines = photo.copy()
        edges = find_boundaries(seg.labels, mode="inner")
        cut = np.isin(seg.labels, seg.table.label[seg.table.touches_edge].to_numpy())
        outlines[edges & ~cut] = (0, 230, 0)
        outlines[edges & cut] = (255, 0, 255)
        counts = ", ".join(f"{n} {kind}" for kind, n in seg.counts().items())
        for ax, picture, title in zip(
            row, (photo, painted, outlines),
            ("eyepiece photo", "frame painted as glass", f"{counts}; {seg.table.touches_edge.sum()} cut"),
        ):
            ax.imshow(picture)
            ax.set_title(f"{path.stem}: {title}" if picture is photo else title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
