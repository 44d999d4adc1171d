"""Render the screenshots of docs/viewer.md from a real napari viewer on a real BCCD smear.

    xvfb-run -a -s "-screen 0 1600x1200x24" python scripts/make_screenshots.py
    python scripts/make_screenshots.py --image field.jpg --model my_model.safetensors

Writes to docs/images/ (or ``--out``):

- ``viewer_classify.png``: the whole window after one click of *Classify cells*
  (segment + classify): cells coloured by class, the Classify and Differential count
  docks, and the status bar showing the hovered white cell's class and confidence;
- ``attention.png``: a cell with a model's attention layer over it (cells layer hidden),
  beside the same view without it;
- ``counts_dock.png``: the Differential count dock;
- ``gallery_dock.png``: the Cell gallery dock showing the field's red cells of the
  commonest class, the least confident first, one of them selected;
- ``train_widget.png``: the Train classifier dock after a short training run on a few
  labelled PBC images (real CellaVision crops from ``../shared/data/pbc``), with its
  validation curves;
- ``batch_widget.png``: the Batch analyze folder dock after a run over a few BCCD fields,
  one of them opened with *Show in viewer*;
- ``screenshots.json``: which image, models and versions made them.

Models: the installed built-in models (or ``--model`` files). Fallback, stated in
``screenshots.json`` and in the caption of docs/viewer.md: when no white-cell model is
installed (``wbc-pbc8``), the white cells are classified by the small demonstration
model that the Train classifier step trains (a few PBC images of three classes, a few
epochs) -- enough to show the widgets, not a usable classifier. The attention shot shows
a built-in model's map (a white-cell model first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_IMAGE = DATA / "bccd" / "images" / "BloodImage_00005.jpg"  # a neutrophil, platelets, separate red cells
DEMO_CLASSES = ("eosinophil", "lymphocyte", "neutrophil")


def wait_for(widget, app, timeout=1800.0):
    started = time.perf_counter()
    while widget.is_running:
        app.processEvents()
        time.sleep(0.01)
        if time.perf_counter() - started > timeout:
            raise TimeoutError(widget.status)
    app.processEvents()
    if widget.status.startswith(("Failed", "Cannot")):
        raise RuntimeError(widget.status)


def settle(app, seconds=0.3):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def pbc_folder(root: Path, per_class: int) -> Path:
    """Symlinks to a few labelled PBC training images per class (nothing is copied)."""
    import pandas as pd

    table = pd.read_csv(DATA / "pbc" / "split.csv")
    for label in DEMO_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        rows = table[(table.label == label) & (table.split == "train")].head(per_class)
        for path in rows.path:
            link = root / label / Path(path).name
            if not link.exists():
                link.symlink_to(DATA / "pbc" / path)
    return root


def save_widget(widget, path: Path) -> None:
    """A PNG of one dock widget (Qt renders it, as on screen)."""
    native = widget.native if hasattr(widget, "native") else widget
    # a dock shares the window's height with the others (napari puts it in a scroll
    # area): drawn at its own preferred height, none of it is cut off
    native.resize(native.width(), max(native.height(), native.sizeHint().height()))
    pixmap = native.grab()
    if not pixmap.save(str(path)):
        raise OSError(f"could not write {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="a smear field (default: a BCCD field)")
    parser.add_argument("--model", action="append", help="model name or file (default: installed built-ins)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--train-images", type=int, default=12, help="PBC images per class for the training shot")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the training shot")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-images", type=int, default=4, help="BCCD fields of the batch shot")
    args = parser.parse_args(argv)
    if not Path(args.image).is_file():
        sys.exit(f"image not found: {args.image} (the real-data screenshots need ../shared/data)")
    if not (DATA / "pbc" / "split.csv").is_file():
        sys.exit(f"PBC data not found under {DATA / 'pbc'} (the training screenshot needs it)")

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_smear._napari.widgets import user_models
    from napari_smear.models import available_models, read_metadata
    from napari_smear.models.files import resolve_model_path

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="napari-smear-shots-"))
    models = list(args.model or available_models())
    for model in models:
        if Path(model).suffix == ".safetensors":
            user_models.add(model)

    def cell_types(model):
        return read_metadata(resolve_model_path(model)).get("cell_types") or ["wbc", "rbc", "platelet"]

    # Fallback: without a white-cell model, the demonstration model trained below classifies them.
    wbc_fallback = not any("wbc" in cell_types(m) for m in models)

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 1150)  # room for two docks on the right without squeezing either
    app = QApplication.instance()
    (layer,) = viewer.open(args.image, plugin="napari-smear")
    name = layer.name

    # --- Train classifier: a few epochs on a few labelled PBC images.
    _, train = viewer.window.add_plugin_dock_widget("napari-smear", "Train classifier")
    train._source.value = "folder of labelled cell images"
    train._folder.value = pbc_folder(scratch / "pbc", args.train_images)
    base = "wbc-pbc8" if "wbc-pbc8" in models else None
    train._start_from.value = base  # fine-tune the built-in white-cell model, or train a new one
    train._cell_types.value = ["wbc"]
    train._epochs.value = args.epochs
    train._batch_size.value = 16
    train._device.value = "cpu"
    train._output.value = scratch / "demo-wbc3.safetensors"
    train.run()
    wait_for(train, app)
    save_widget(train, out / "train_widget.png")
    if wbc_fallback:
        models.append(str(train.last_result.model_path))
    viewer.window.remove_dock_widget(train.native)

    # --- Classify cells: segment + classify in one click.
    _, classify = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    classify.reset_choices()
    classify._image_combo.value = viewer.layers[name]
    classify._cells_combo.value = None
    classify._models.value = [str(Path(m).resolve()) if Path(m).suffix else m for m in models]
    classify._device.value = "cpu"
    classify.run()
    wait_for(classify, app)
    result = classify.last_result
    cells = viewer.layers[f"{name} cells"]
    for attention_layer in classify.last_layers[2:]:
        attention_layer.visible = False
    viewer.layers.selection.active = cells
    settle(app)
    viewer.reset_view()  # now that the docks have taken their room
    # Hover the largest white cell: napari prints its features (class, confidence) in the status bar.
    table = result.table
    scale = np.asarray(viewer.layers[name].scale[-2:])
    wbc = table[table.cell_type == "wbc"].sort_values("area_px", ascending=False)
    hovered = wbc.iloc[0] if len(wbc) else table.iloc[0]
    viewer.cursor.position = tuple(np.array([hovered.centroid_y, hovered.centroid_x]) * scale)
    settle(app, 0.5)
    viewer.screenshot(str(out / "viewer_classify.png"), canvas_only=False, flash=False)
    _, counts = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    settle(app)
    save_widget(counts, out / "counts_dock.png")

    # --- Cell gallery: the commonest red-cell class, least confident first, one cell picked.
    _, gallery = viewer.window.add_plugin_dock_widget("napari-smear", "Cell gallery")
    gallery.set_layer(cells)
    groups = [g for g in gallery.groups if "(rbc)" in g and not g.startswith("unclassified")] or gallery.groups
    gallery._group_combo.setCurrentIndex(gallery.groups.index(groups[0]))
    if gallery.shown_labels:
        gallery.select_labels(gallery.shown_labels[:1])
    settle(app)
    gallery.native.resize(460, 560) if hasattr(gallery, "native") else gallery.resize(460, 560)
    save_widget(gallery, out / "gallery_dock.png")
    viewer.window.remove_dock_widget(gallery)
    viewer.reset_view()

    # --- Attention: zoom on a cell of a built-in model (a white-cell one first), its map over the smear.
    builtin = [m for m in result.models if m in available_models()]
    shown = sorted(builtin or result.models, key=lambda m: "wbc" not in result.models[m]["cell_types"])[0]
    seen = table[table["model"] == shown].sort_values("area_px", ascending=False)
    # White cells: the largest; red cells: a typical one (the largest may be a clump).
    focus = hovered if not len(seen) else seen.iloc[0 if "wbc" in result.models[shown]["cell_types"] else len(seen) // 2]
    attention = viewer.layers[f"{name} attention ({shown})"]
    cells.visible = False
    viewer.layers[f"{name} nuclei"].visible = False
    bbox = max(focus.bbox_max_y - focus.bbox_min_y, focus.bbox_max_x - focus.bbox_min_x)
    side = max(2.2 * float(bbox), 4.0 * result.segmentation.rbc_diameter_px)
    camera = viewer.scene.camera  # napari >= 0.9 (viewer.camera is deprecated there)
    canvas_h, canvas_w = viewer.screenshot(canvas_only=True, flash=False).shape[:2]
    camera.zoom = min(canvas_h, canvas_w) / (side * scale[0])  # screen pixels per world unit
    # Centre on the cell, but keep the view inside the image (no empty canvas at an edge).
    extent = np.array([canvas_h, canvas_w]) / camera.zoom  # world units shown
    size = np.array(cells.data.shape) * scale
    centre = np.array([focus.centroid_y, focus.centroid_x]) * scale
    low, high = extent / 2, size - extent / 2
    camera.center = tuple(np.where(high > low, np.clip(centre, low, np.maximum(low, high)), size / 2))
    settle(app)
    plain = viewer.screenshot(canvas_only=True, flash=False)
    attention.visible = True
    settle(app)
    glowing = viewer.screenshot(canvas_only=True, flash=False)
    gap = np.full((plain.shape[0], 12, plain.shape[2]), 255, np.uint8)
    from napari_smear.io import write_png_atomic

    write_png_atomic(out / "attention.png", np.concatenate([plain, gap, glowing], axis=1)[..., :3])

    # --- Batch analyze folder: a few BCCD fields into a folder, one opened again in the viewer.
    batch_inputs = scratch / "batch-in"
    batch_inputs.mkdir()
    field_paths = [Path(args.image)] + sorted(p for p in Path(args.image).parent.glob("*.jpg") if p != Path(args.image))
    for path in field_paths[: args.batch_images]:
        (batch_inputs / path.name).write_bytes(path.read_bytes())
    _, batch = viewer.window.add_plugin_dock_widget("napari-smear", "Batch analyze folder")
    batch._input.value = batch_inputs
    batch._output.value = scratch / "batch-out"
    batch._models.value = [str(Path(m).resolve()) if Path(m).suffix else m for m in models]
    batch._device.value = "cpu"
    batch.run()
    wait_for(batch, app)
    batch._analysed.value = field_paths[1].name  # not the field already open in the viewer
    batch.show_result()
    wait_for(batch, app)
    settle(app)
    save_widget(batch, out / "batch_widget.png")

    demo = (
        f"the demonstration model trained in the Train classifier shot ({args.train_images} PBC training "
        f"images of each of {', '.join(DEMO_CLASSES)}, {args.epochs} epochs)"
    )
    provenance = {
        "made_by": "scripts/make_screenshots.py",
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image": os.path.relpath(args.image, ROOT.parent),
        "models": {
            m: {"classes": d["classes"], "cell_types": d["cell_types"], "builtin": m in available_models(),
                "description": read_metadata(resolve_model_path(d["path"] or m)).get("description", "")}
            for m, d in result.models.items()
        },
        "fallback": f"no built-in white-cell model was installed: white cells classified by {demo}"
        if wbc_fallback else None,
        "attention_shot": {"model": shown, "cell": int(focus.label), "cell_type": focus.cell_type},
        "training_shot": {
            "data": f"{args.train_images} PBC training images of each of {', '.join(DEMO_CLASSES)}",
            "start_from": base or "new shape_aware model", "epochs": args.epochs, "history": train.history,
        },
        "counts": result.counts.to_dict("records"),
        "napari": napari.__version__, "torch": torch.__version__,
    }
    (out / "screenshots.json").write_text(json.dumps(provenance, indent=1, default=str))
    viewer.close()
    print(f"wrote attention.png, batch_widget.png, counts_dock.png, gallery_dock.png, train_widget.png, viewer_classify.png and "
          f"screenshots.json to {out}")
    print(f"models: {', '.join(f'{m} (built-in)' if v['builtin'] else m for m, v in provenance['models'].items())}")
    if wbc_fallback:
        print("NOTE: " + provenance["fallback"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
