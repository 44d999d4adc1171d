"""Segment (and classify) a whole-slide TIFF larger than memory; count, look at a region.

    python docs/examples/segment_whole_slide.py slide.tif --out slide_results/
    python docs/examples/segment_whole_slide.py slide.tif --out slide_results/ --region 20000 20000 4096
    python docs/examples/segment_whole_slide.py slide.tif --out slide_results/ --classify

The slide is read through a memory map (a compressed scan is decoded once into a
scratch file inside ``--out``) and the two label images are built in memory-mapped
files, so the memory used is that of a few tiles, not of the slide:
``segment_smear(image, out=(labels, nuclei))``. What ``napari-smear segment --on-disk``
does, written out for a script that wants the label images themselves.

Writes ``<stem>_cells.csv`` (one row per cell) and ``<stem>_counts.csv`` (cells per type,
whole ones and ones cut by the slide's edge), and with ``--region Y X SIDE`` a picture
of that window with the cells outlined (``<stem>_region.png``). The memory-mapped label
images are removed at the end; with ``--keep-labels`` they are left in ``--out`` as
``<stem>_labels.u32`` / ``<stem>_nuclei.u32`` (raw uint32, the slide's height x width)
for more analysis.

With ``--classify`` every cell is also classified by the built-in models, region by
region (``napari_smear.pipeline.analyze_by_region``: memory bounded by the region, the
attention maps written into memory-mapped files too): the cell table then holds each
cell's class and confidence, and ``<stem>_differential.csv`` the differential count.
``napari-smear analyze --on-disk`` does all of this for a folder of slides.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", help="TIFF of the slide (8-bit RGB, colour last: as scanners write)")
    parser.add_argument("--out", default="slide_results", help="output folder (default: slide_results)")
    parser.add_argument("--region", type=int, nargs=3, metavar=("Y", "X", "SIDE"), default=None,
                        help="draw this square window (top-left corner and side, in pixels) with its cells")
    parser.add_argument("--keep-labels", action="store_true", help="keep the memory-mapped label images")
    parser.add_argument("--classify", action="store_true",
                        help="classify every cell with the built-in models and write the differential count")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import pandas as pd

    from napari_smear import segment_smear
    from napari_smear.io import open_image_on_disk, write_csv_atomic, write_png_atomic

    slide = Path(args.slide)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, meta = open_image_on_disk(slide, scratch_dir=out)  # read-only map of the pixels
    height, width = image.shape[:2]
    print(f"{slide.name}: {height} x {width} px ({height * width / 1e6:.0f} MP)"
          + (f", decoded once into {meta['scratch_file']}" if meta["scratch_file"] else ", mapped in place"))

    labels_file, nuclei_file = out / f"{slide.stem}_labels.u32", out / f"{slide.stem}_nuclei.u32"
    labels = np.memmap(labels_file, np.uint32, "w+", shape=(height, width))
    nuclei = np.memmap(nuclei_file, np.uint32, "w+", shape=(height, width))

    def progress(fraction, message):
        print(f"  {100 * fraction:5.1f} %  {message}", flush=True)

    seg = segment_smear(image, recorded_pixel_size_um=meta["pixel_size_um"], out=(labels, nuclei), progress=progress)
    table, attention_files = seg.table, []
    if args.classify:
        from napari_smear.pipeline import DEFAULT_MODELS, analyze_by_region

        attention_files = [out / f"{slide.stem}_attention_{name}.f32" for name in DEFAULT_MODELS]
        attention = {name: np.memmap(path, np.float32, "w+", shape=(height, width))
                     for name, path in zip(DEFAULT_MODELS, attention_files)}
        result = analyze_by_region(image, segmentation=seg, attention_out=attention, progress=progress)
        table = result.table
        write_csv_atomic(out / f"{slide.stem}_differential.csv", result.counts)
        print(result.counts.to_string(index=False))
        del result, attention
    write_csv_atomic(out / f"{slide.stem}_cells.csv", table)
    counts = (seg.table.assign(cut_by_edge=seg.table.touches_edge)
              .groupby(["cell_type", "cut_by_edge"]).size().rename("cells").reset_index())
    write_csv_atomic(out / f"{slide.stem}_counts.csv", counts)
    print(f"{seg.n_cells} cells, red-cell diameter {seg.rbc_diameter_px:.1f} px")
    print(counts.to_string(index=False))

    if args.region is not None:
        from skimage.segmentation import find_boundaries

        y, x, side = args.region
        window = (slice(y, min(height, y + side)), slice(x, min(width, x + side)))
        picture = np.array(image[window])  # a copy of the window only
        picture[find_boundaries(np.asarray(labels[window]), mode="inner")] = (0, 0, 0)
        picture[find_boundaries(np.asarray(nuclei[window]), mode="inner")] = (255, 255, 0)
        write_png_atomic(out / f"{slide.stem}_region.png", picture)
        print(f"region written to {out / f'{slide.stem}_region.png'}")

    del labels, nuclei, seg, image, table  # closes the maps (before their files go)
    if not args.keep_labels:
        for path in (labels_file, nuclei_file, *attention_files):
            path.unlink()
    if meta["scratch_file"]:
        Path(meta["scratch_file"]).unlink()
    return pd.read_csv(out / f"{slide.stem}_counts.csv")


if __name__ == "__main__":
    main()
