"""Draw docs/images/outline_smoothing.png: cell outlines drawn blockwise against smooth.

    python scripts/outline_figure.py [--field BloodImage_00037] [--window 120 200 200]

Needs ../shared/data. The field is segmented once at working resolution (about 24 px
per red cell, as :func:`napari_smear.segment_smear` does), then the same labels are
drawn at full resolution two ways: blockwise (each working pixel a block, what the
segmentation drew before 2026-11-30) and as ``segment_smear`` draws them now
(:func:`napari_smear.segment._smooth_upsample`). Shown is a zoomed window of the field.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", default="BloodImage_00037")
    parser.add_argument("--window", nargs=3, type=int, default=[120, 200, 200], metavar=("TOP", "LEFT", "SIDE"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "outline_smoothing.png"))
    args = parser.parse_args(argv)
    path = DATA / "bccd" / "images" / f"{args.field}.jpg"
    if not path.is_file():
        print(f"BCCD field not found: {path}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from napari_smear.io import read_image
    from napari_smear.segment import (
        DEFAULT_WORKING_DIAMETER_PX,
        _estimate_diameter,
        _resize_rgb,
        _smooth_upsample,
        _upsampling_index,
    )
    from napari_smear.segment.cells import segment_field
    from napari_smear.segment.stain import estimate_stain

    rgb, _ = read_image(path)
    h, w = rgb.shape[:2]
    stain = estimate_stain(rgb)
    diameter = _estimate_diameter(rgb, stain)
    factor = min(1.0, DEFAULT_WORKING_DIAMETER_PX / diameter)
    small = _resize_rgb(rgb, (round(h * factor), round(w * factor)))
    working = segment_field(small, stain, diameter * factor)[0]
    drawn = {
        "blockwise (before)": working[_upsampling_index(h, working.shape[0])[:, None],
                                      _upsampling_index(w, working.shape[1])[None, :]],
        "smooth (now)": _smooth_upsample(working, (h, w)),
    }
    top, left, side = args.window
    window = (slice(top, top + side), slice(left, left + side))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, (title, labels) in zip(axes, drawn.items()):
        picture = rgb[window].copy()
        picture[find_boundaries(labels[window], mode="inner")] = (0, 0, 0)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{args.field}: the same working-resolution labels ({diameter * factor:.0f} px per red cell) "
                 f"drawn at full resolution ({diameter:.0f} px)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
