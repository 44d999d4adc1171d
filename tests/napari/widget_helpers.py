"""Shared set-up of the GUI tests: a segmented synthetic field, labelled cell images,
and the steps every widget test repeats (errors shown, waiting for a run, cancelling one).

Tiny model files (:func:`conftest.tiny_model_file`, 32 px crops, a few thousand weights)
make a classification of the 81-cell synthetic field take a fraction of a second, so
the GUI tests exercise the real code paths (crop, classify, paste attention) without
the built-in weight files.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from napari_smear.segment.types import SmearSegmentation

WAIT_MS = 60_000


def shown_errors(monkeypatch) -> list[str]:
    """The error notifications the widgets show during the test (collected, not shown)."""
    from napari_smear._napari.widgets import _background

    errors: list[str] = []
    monkeypatch.setattr(_background, "show_error", errors.append)
    return errors


def wait_until_idle(qtbot, widget) -> None:
    """Wait until the widget's run (including one being cancelled) is over and Run is enabled."""
    qtbot.waitUntil(lambda: not widget.is_running and widget._run_button.enabled, timeout=WAIT_MS)


def cancel_when(qtbot, widget, started) -> None:
    """Once ``started()`` is true, press Cancel, then wait until the widget is idle."""
    qtbot.waitUntil(started, timeout=WAIT_MS)
    widget._cancel_button.native.click()
    wait_until_idle(qtbot, widget)


def run_until_cancelled(report, seen: dict, *, steps: int = 1000, pause_s: float = 0.01):
    """Stand-in for a long computation: ``report(step)`` for each step until it raises.

    The widget's Cancel makes the progress report raise; that exception is kept in
    ``seen["raised"]`` and re-raised. Not being cancelled is an error.
    """
    try:
        for step in range(steps):
            report(step)
            time.sleep(pause_s)
    except BaseException as exc:
        seen["raised"] = exc
        raise
    raise AssertionError("not cancelled")


def truth_segmentation(truth) -> SmearSegmentation:
    """The synthetic field's ground truth as a SmearSegmentation (a stand-in segmenter's result)."""
    from skimage.measure import regionprops_table

    props = pd.DataFrame(
        regionprops_table(truth["labels"].astype(np.int32), properties=("label", "centroid", "bbox", "area"))
    )
    props = props.rename(columns={
        "centroid-0": "centroid_y", "centroid-1": "centroid_x", "bbox-0": "bbox_min_y", "bbox-1": "bbox_min_x",
        "bbox-2": "bbox_max_y", "bbox-3": "bbox_max_x", "area": "area_px",
    })
    props.insert(1, "cell_type", [truth["cell_types"][int(i)] for i in props["label"]])
    from napari_smear.segment import _mark_edge_cells  # the segmenter's own rule

    return SmearSegmentation(
        labels=truth["labels"].astype(np.uint32), nuclei=truth["nuclei"].astype(np.uint32),
        table=_mark_edge_cells(props, truth["labels"].shape),
        rbc_diameter_px=float(truth["rbc_diameter_px"]),
    )


def add_segmented_field(viewer, synthetic_field, name="synthetic smear", scale=(1.0, 1.0)):
    """Add the synthetic RGB field and its cells/nuclei layers (as Segment cells makes them)."""
    from napari.layers import Layer

    from napari_smear._napari.layers import segmentation_layers

    rgb, truth = synthetic_field
    image = viewer.add_image(rgb, name=name, rgb=True, scale=scale)
    for data, kwargs, layer_type in segmentation_layers(
        truth_segmentation(truth), image_layer_name=name, scale=scale, units=tuple(image.units),
        image_layer_id=image.unique_id,
    ):
        viewer.add_layer(Layer.create(data, kwargs, layer_type))
    return image, viewer.layers[f"{name} cells"], viewer.layers[f"{name} nuclei"]


def single_cell_folder(root, synthetic_field, per_class=4, size=160):
    """A folder of labelled single-cell images (class sub-folders) cut from the synthetic field.

    ``root/rbc/*.png`` and ``root/platelet/*.png``: windows of ``size`` pixels centred on
    cells of that type (with red cells around them, so the scale can be measured), the
    layout ``napari-smear train`` and the Train classifier widget take.
    """
    from pathlib import Path

    from napari_smear.io import write_png_atomic

    rgb, truth = synthetic_field
    seg = truth_segmentation(truth)
    height, width = rgb.shape[:2]
    half = size // 2
    root = Path(root)
    for cell_type in ("rbc", "platelet"):
        rows = seg.table[seg.table.cell_type == cell_type]
        inside = rows[
            (rows.centroid_y > half) & (rows.centroid_y < height - half)
            & (rows.centroid_x > half) & (rows.centroid_x < width - half)
        ].head(per_class)
        (root / cell_type).mkdir(parents=True, exist_ok=True)
        for row in inside.itertuples():
            y, x = int(round(row.centroid_y)), int(round(row.centroid_x))
            write_png_atomic(root / cell_type / f"cell_{row.label}.png", rgb[y - half:y + half, x - half:x + half])
    return root
