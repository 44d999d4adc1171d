"""`make demo`: the main job on bundled sample fields, written under an output folder.

The bundled samples are deterministic synthetic smears at three magnifications (made by
:func:`napari_smear.samples.synthetic_smear`, so nothing is downloaded); when the real
shared data sits beside the project (``../shared/data``), three BCCD fields join them.
Every field goes through the real pipeline (segmentation and, when models are
installed, classification).
"""
from __future__ import annotations

from pathlib import Path

SAMPLE_SCALES = (("synthetic_20x", 24.0), ("synthetic_40x", 40.0), ("synthetic_100x", 64.0))


def write_samples(folder: Path) -> list[Path]:
    from .io import write_png_atomic
    from .samples import synthetic_smear

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (name, diameter) in enumerate(SAMPLE_SCALES):
        shape = (int(12 * diameter), int(16 * diameter))
        image, _ = synthetic_smear(shape, rbc_diameter_px=diameter, seed=k, n_wbc=3)
        paths.append(write_png_atomic(folder / f"{name}.png", image))
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bccd" / "images"
    for name in ("BloodImage_00000.jpg", "BloodImage_00001.jpg", "BloodImage_00003.jpg"):
        if (shared / name).exists():
            paths.append(shared / name)
    return paths


def run_demo(out: Path) -> None:
    from .batch import segment_files

    samples = write_samples(out / "samples")
    summary = segment_files(samples, out, progress=None)
    summary.to_csv(out / "summary.csv", index=False)
    print(f"{'field':28s} {'wbc':>5s} {'rbc':>5s} {'platelet':>9s} {'RBC diam. px':>13s}")
    for _, row in summary.iterrows():
        if row.get("error"):
            print(f"{Path(row.path).name:28s} FAILED: {row.error}")
            continue
        print(f"{Path(row.path).name:28s} {int(row.wbc):5d} {int(row.rbc):5d} {int(row.platelet):9d} {row.rbc_diameter_px:13.1f}")
    print(f"outputs (labels, nuclei, per-cell CSV, summary.csv) in {out}/")
