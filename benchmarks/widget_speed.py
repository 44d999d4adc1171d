"""Classify cells widget: seconds from clicking Run to the result layers being in the viewer.

Usage (a display is needed; on a headless machine run it under Xvfb)::

    xvfb-run -a python benchmarks/widget_speed.py [--fields 5] [--repeats 2] [--threads 2]
                                                  [--model wbc-pbc8 --model rbc-chula12]

On real BCCD fields (``../shared/data/bccd/images``; the synthetic smear when absent),
in a shown napari viewer, on the CPU, two scenarios per field:

- ``segment+classify``: the widget's cells choice is "segment the image first": one
  click segments, classifies with every model and shows the layers;
- ``classify``: the cells layer exists (from the previous run): one click classifies.

The clock starts when the Run button is clicked and stops when the widget has put the
cells, nuclei and attention layers into the viewer and the Qt event queue is drained --
what the user waits for. Model files are read on every run (the widget does not keep
models in memory between runs), so that time is included. The first click of the session
(imports, first allocations) is reported separately.

Models: ``--model`` names/files, else the built-in models; a built-in model that is not
installed is replaced by an untrained stand-in of its input size and class count (a
``shape_aware`` model, 96 px / 8 classes for white cells and platelets, 64 px / 13
classes for red cells): inference cost does not depend on the weights' values, but the
architecture may differ from the shipped one, and the JSON lists the stand-ins
(``"stand_in_models"``).

Prints a table and saves benchmarks/results/widget_speed.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# Input size, crop scale, classes and cell types of the built-in models, for stand-ins.
STAND_INS = {
    "wbc-pbc8": {"input_size": 96, "crop_diameters": 4.0, "n_classes": 8, "cell_types": ["wbc", "platelet"]},
    "rbc-chula12": {"input_size": 64, "crop_diameters": 2.0, "n_classes": 13, "cell_types": ["rbc"]},
}


def stand_in_models(folder: Path, missing) -> list[str]:
    """Untrained ``shape_aware`` files shaped like the missing built-in models."""
    import torch

    from napari_smear.models import build_model, save_model

    paths = []
    for builtin in missing:
        spec, name = STAND_INS[builtin], f"{builtin}-standin"
        torch.manual_seed(0)
        model = build_model("shape_aware", spec["n_classes"])
        path = folder / f"{name}.safetensors"
        save_model(path, model, {
            "class_names": [f"class_{i}" for i in range(spec["n_classes"])], "mean": [0.7, 0.6, 0.65],
            "std": [0.2, 0.2, 0.2], "input_size": spec["input_size"], "crop_diameters": spec["crop_diameters"],
            "cell_types": spec["cell_types"],
        })
        paths.append(str(path))
    return paths


def fields(n: int):
    from napari_smear.io import read_image

    paths = sorted((DATA / "bccd" / "images").glob("*.jpg"))[:n]
    if paths:
        return [(p.stem, read_image(p)[0]) for p in paths], "BCCD (../shared/data/bccd/images)"
    from napari_smear.samples import synthetic_smear

    return [(f"synthetic_{s}", synthetic_smear(seed=s)[0]) for s in range(n)], "synthetic smear (shared data absent)"


def click_and_wait(widget, app, timeout: float = 600.0) -> float:
    """Click Run; seconds until the run's layers are in the viewer and the event queue is empty."""
    previous = widget.last_result
    started = time.perf_counter()
    widget._run_button.native.click()
    while widget.is_running or widget.last_result is previous:
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"no result after {timeout} s: {widget.status}")
    app.processEvents()
    elapsed = time.perf_counter() - started
    if widget.status.startswith("Failed"):
        raise RuntimeError(widget.status)
    return elapsed


def settle(app, seconds: float = 0.3) -> None:
    """Let the viewer draw what is pending before the clock starts."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="clicks per field and scenario (median kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", action="append", help="model name or file (default: installed built-ins)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "widget_speed.json"))
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_smear._napari.widgets import user_models
    from napari_smear._napari.widgets.classify import SEGMENT_FIRST
    from napari_smear.models import available_models

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory()
    if args.model:
        models, stand_ins = list(args.model), []
    else:  # the installed built-ins, and stand-ins for those not installed
        missing = [name for name in STAND_INS if name not in available_models()]
        models = available_models() + stand_in_models(Path(scratch.name), missing)
        stand_ins = [f"{name}-standin" for name in missing]
    for model in models:
        if Path(model).suffix == ".safetensors":
            user_models.add(model)
    images, source = fields(args.fields)
    load_before = os.getloadavg()  # other work on the machine inflates the figures: recorded

    def fresh_viewer(name, image):
        # A fresh viewer per run: removing layers from a shown viewer and adding new ones
        # can crash Mesa's software OpenGL under Xvfb (napari 0.9.2), and a fresh viewer
        # is also what "one click on a newly opened field" means.
        viewer = napari.Viewer(show=True)
        _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
        widget._device.value = "cpu"
        widget._models.value = [str(Path(m).resolve()) if Path(m).suffix else m for m in models]
        layer = viewer.add_image(image, name=name, rgb=True)
        widget.reset_choices()
        widget._image_combo.value = layer
        assert widget._cells_combo.current_choice == SEGMENT_FIRST  # one click segments too
        settle(QApplication.instance())
        return viewer, widget

    app = QApplication.instance() or QApplication([])
    results = {"segment+classify": [], "classify": []}
    cells_per_field = []
    first_click = None
    for name, image in images:
        for _ in range(args.repeats):
            if first_click is None:  # imports and first allocations: reported on their own
                viewer, widget = fresh_viewer(name, image)
                first_click = click_and_wait(widget, app)
                viewer.close()
            viewer, widget = fresh_viewer(name, image)
            results["segment+classify"].append({"field": name, "seconds": click_and_wait(widget, app)})
            # The cells layer now exists and is chosen: one click classifies it.
            assert widget._cells_combo.value is not None
            settle(app)
            results["classify"].append({"field": name, "seconds": click_and_wait(widget, app)})
            cells_per_field.append(len(widget.last_result.table))
            viewer.close()
        print(f"{name}: {cells_per_field[-1]} cells, segment+classify "
              f"{results['segment+classify'][-1]['seconds']:.2f} s, classify {results['classify'][-1]['seconds']:.2f} s",
              flush=True)

    summary = {}
    for scenario, runs in results.items():
        per_field = {}
        for run in runs:
            per_field.setdefault(run["field"], []).append(run["seconds"])
        medians = [statistics.median(v) for v in per_field.values()]
        summary[scenario] = {
            "seconds_median": statistics.median(medians), "seconds_mean": statistics.fmean(medians),
            "seconds_max": max(medians), "per_field_median": {k: statistics.median(v) for k, v in per_field.items()},
        }
    report = {
        "benchmark": "widget_speed",
        "what": "seconds from clicking Run in the Classify cells widget to its layers being in the viewer",
        "device": "cpu", "torch_threads": args.threads, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "napari": napari.__version__, "fields": source, "n_fields": len(images), "repeats": args.repeats,
        "cells_per_field_mean": statistics.fmean(cells_per_field),
        "models": [Path(m).stem if Path(m).suffix else m for m in models], "stand_in_models": stand_ins,
        "first_click_seconds": first_click,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        **summary,
    }
    print()
    print(f"{'scenario':<18} {'median s':>9} {'mean s':>8} {'max s':>7}")
    for scenario in results:
        s = summary[scenario]
        print(f"{scenario:<18} {s['seconds_median']:>9.2f} {s['seconds_mean']:>8.2f} {s['seconds_max']:>7.2f}")
    print(f"first click of the session: {first_click:.2f} s; {report['cells_per_field_mean']:.0f} cells per field; "
          f"models {report['models']}" + (f" ({', '.join(stand_ins)}: untrained stand-ins)" if stand_ins else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
