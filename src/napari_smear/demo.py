"""`make demo`: the main job -- batch analysis -- on bundled sample fields.

The bundled samples are deterministic synthetic smears at three magnifications (made by
:func:`napari_smear.samples.synthetic_smear`, so nothing is downloaded), written to
``<out>/samples/``; when the real shared data sits beside the project
(``../shared/data``), three BCCD fields join them. Every field goes through
:func:`napari_smear.batch.analyze_files`, exactly as ``napari-smear analyze`` runs it:
segmentation, classification with the installed built-in models (a built-in model
that is not installed is reported, and its cells are segmented only), attention maps,
per-cell tables, QC overlays, ``summary.csv``, ``errors.csv`` and ``run.json``.
Running the demo again resumes: finished fields are skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SAMPLE_SCALES = (("synthetic_20x", 24.0), ("synthetic_40x", 40.0), ("synthetic_100x", 64.0))
BCCD_FIELDS = ("BloodImage_00000.jpg", "BloodImage_00001.jpg", "BloodImage_00003.jpg")
SHARED_BCCD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bccd" / "images"


def write_samples(folder: Path, scales: Sequence[tuple[str, float]] = SAMPLE_SCALES) -> list[Path]:
    """Write the synthetic sample fields as PNG into ``folder`` (kept when unchanged).

    A file that already holds the same pixels is left alone, so its modification time
    stays and a second demo run skips the fields the first one finished.
    """
    from .io import read_image, write_png_atomic
    from .samples import synthetic_smear

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (name, diameter) in enumerate(scales):
        shape = (int(12 * diameter), int(16 * diameter))
        image, _ = synthetic_smear(shape, rbc_diameter_px=diameter, seed=k, n_wbc=3)
        path = folder / f"{name}.png"
        try:
            unchanged = np.array_equal(read_image(path, rgb=False)[0], image)
        except Exception:  # missing or unreadable: write it
            unchanged = False
        if not unchanged:
            write_png_atomic(path, image)
        paths.append(path)
    return paths


def real_fields(shared: Path = SHARED_BCCD) -> list[Path]:
    """The BCCD sample fields, when the shared data is present."""
    return [shared / name for name in BCCD_FIELDS if (shared / name).exists()]


def run_demo(
    out: Path,
    *,
    models: Sequence | None = None,
    device: str = "auto",
    scales: Sequence[tuple[str, float]] = SAMPLE_SCALES,
    include_real: bool = True,
    workers: int = 0,
):
    """Analyse the sample fields into ``out`` and print what was found.

    Parameters
    ----------
    out : path
        Output folder; the synthetic inputs go to ``out/samples``.
    models : sequence, optional
        Models to classify with; default the installed built-in models, ``[]`` for
        segmentation only.
    scales : sequence of (name, red-cell diameter in px)
        The synthetic fields to make.
    include_real : bool
        Add the BCCD fields when ``../shared/data`` is present.

    Returns
    -------
    napari_smear.batch.BatchReport
    """
    from .batch import analyze_files

    out = Path(out)
    samples_dir = out / "samples"
    write_samples(samples_dir, scales)
    inputs: list[Path] = [samples_dir, *(real_fields() if include_real else [])]
    report = analyze_files(inputs, out, models=models, device=device, workers=workers)
    print_demo_summary(report)
    if report.analysed + report.skipped:
        from .report import write_run_report

        # what a reviewer looks at: each folder's differential and its cells by class
        print(f"report: {write_run_report(out)} (each folder's differential and cell gallery; open it in a browser)")
    return report


def print_demo_summary(report) -> None:
    """Per field: cell counts, scale and the commonest classes; which models ran."""
    models = report.run.get("models", {})
    print(f"napari-smear demo: {report.total} field(s) -> {report.out_dir}/")
    for name, model in models.items():
        print(f"  model {name}: classifies {', '.join(model['cell_types'])} into {len(model['classes'])} classes")
    for name in report.missing_models:
        print(f"  model {name}: NOT INSTALLED -- the cells it classifies were segmented only, not classified")
    if not models:
        print("  no classification model: segmentation only")
    summary = report.summary
    print(f"{'field':28s} {'cells':>6s} {'wbc':>5s} {'rbc':>5s} {'platelet':>9s} {'RBC diam. px':>13s}  classes")
    for _, row in summary.iterrows():
        classes = []
        for model in models.values():
            for cell_type in model["cell_types"]:
                counts = [(int(row[f"{cell_type}_{c}"]), c) for c in model["classes"] if f"{cell_type}_{c}" in row]
                best = sorted((n, c) for n, c in counts if n)[::-1][:2]
                classes += [f"{cell_type}:{c} {n}" for n, c in best]
        diameter = row["rbc_diameter_px"]
        diameter_text = f"{diameter:13.1f}" if diameter == diameter and diameter is not None else f"{'-':>13s}"
        print(f"{Path(str(row['image'])).name:28s} {int(row['cells']):6d} {int(row['wbc']):5d} {int(row['rbc']):5d} "
              f"{int(row['platelet']):9d} {diameter_text}  {', '.join(classes) or '-'}")
    for path, error in zip(report.errors.file, report.errors.error):
        print(f"{Path(path).name:28s} FAILED: {error.splitlines()[0] if error else ''}")
    if models and any(Path(str(image)).name.startswith("synthetic_") for image in summary["image"]):
        # the classifiers learned from photographed cells: a warning that one was unsure
        # of these drawn cells is expected, and their classes mean nothing
        print("the synthetic_* fields are drawn, not photographed: their classes show that the pipeline runs, "
              "not what the models say of real cells")
    print(f"{report.analysed} analysed, {report.skipped} finished by an earlier run, {report.failed} failed")
    print(f"outputs in {report.out_dir}/: per field <name>_labels.tif, _nuclei.tif, _attention.tif, _cells.csv, "
          "_overlay.png; summary.csv, summary_whole_cells.csv, summary_by_folder.csv, errors.csv, run.json")
