"""The "Differential count" dock: counts of a classified cells layer, edits, selection, CSV export."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model_file
from widget_helpers import add_segmented_field, truth_segmentation

from napari_smear._napari.layers import CLASS_COLORS, add_to_viewer
from napari_smear._napari.widgets.counts import CountsWidget, counts_from_features

pytestmark = pytest.mark.gui


def test_counts_from_features():
    features = pd.DataFrame({
        "index": [1, 2, 3, 4, 5],
        "cell_type": ["wbc", "wbc", "wbc", "rbc", "platelet"],
        "class": ["neutrophil", "neutrophil", "lymphocyte", "", None],
    })
    counts = counts_from_features(features)
    assert counts.to_dict("records") == [
        {"cell_type": "platelet", "class": "unclassified", "count": 1, "percent": 100.0},
        {"cell_type": "rbc", "class": "unclassified", "count": 1, "percent": 100.0},
        {"cell_type": "wbc", "class": "neutrophil", "count": 2, "percent": pytest.approx(200 / 3)},
        {"cell_type": "wbc", "class": "lymphocyte", "count": 1, "percent": pytest.approx(100 / 3)},
    ]
    # Segmentation only (no class column): a count of cell types.
    assert counts_from_features(features.drop(columns="class"))["count"].sum() == 5
    with pytest.raises(ValueError, match="no 'cell_type' column"):
        counts_from_features(pd.DataFrame({"index": [1]}))


@pytest.mark.usefixtures("one_torch_thread")
def test_counts_dock_follows_the_cells_layer(make_napari_viewer, synthetic_field, tmp_path, qtbot, monkeypatch):
    from napari_smear.pipeline import analyze

    viewer = make_napari_viewer()
    rgb, truth = synthetic_field
    _, counts_widget = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    assert isinstance(counts_widget, CountsWidget) and counts_widget.layer is None
    assert "No cells layer" in counts_widget._summary.text()

    # Segmentation only: the dock offers the cells layer and counts cell types.
    image, cells, _ = add_segmented_field(viewer, synthetic_field)
    assert counts_widget.layer.name == "synthetic smear cells"
    assert dict(zip(counts_widget.counts["cell_type"], counts_widget.counts["count"])) == {
        "platelet": 6, "rbc": 73, "wbc": 2,
    }

    # A classification (scripted, through add_to_viewer) updates the counts.
    model = tiny_model_file(tmp_path / "tiny.safetensors")
    result = analyze(rgb, models=[model], segmentation=truth_segmentation(truth), device="cpu")
    add_to_viewer(viewer, result, image_layer=image)
    pd.testing.assert_frame_equal(counts_widget.counts, result.counts)
    table = counts_widget._table
    assert table.rowCount() == len(result.counts)
    assert table.item(0, 0).text() == result.counts["cell_type"].iloc[0]
    assert table.item(0, 2).text() == str(int(result.counts["count"].iloc[0]))
    bars = counts_widget._figure.axes[0].patches
    assert len(bars) == len(result.counts)
    cls = result.counts["class"].iloc[0]
    np.testing.assert_allclose(bars[0].get_facecolor(), CLASS_COLORS[cls], atol=1e-6)

    # Leaving out the cells cut by the image edge counts whole cells only.
    from napari_smear.pipeline import differential_counts

    edge_cells = int(result.table["touches_edge"].sum())
    assert edge_cells > 0  # the synthetic field has red cells cut by its edge
    counts_widget.include_edge_cells = False
    pd.testing.assert_frame_equal(counts_widget.counts,
                                  differential_counts(result.table, include_edge_cells=False))
    assert counts_widget.counts["count"].sum() == len(result.table) - edge_cells
    assert f"{edge_cells} cut by the image edge left out" in counts_widget._summary.text()
    counts_widget.include_edge_cells = True
    pd.testing.assert_frame_equal(counts_widget.counts, result.counts)

    # Export to CSV.
    path = counts_widget.export_csv(tmp_path / "counts.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path), result.counts.reset_index(drop=True), check_dtype=False)

    # The user corrects a cell's class in the features table, then presses Update.
    features = cells.features
    wbc = features.index[features["cell_type"] == "wbc"][0]
    label = int(features.loc[wbc, "index"])
    features.loc[wbc, "class"] = "basophil"  # what napari's features table editor does
    counts_widget._refresh_button.click()
    row = counts_widget.counts.query("cell_type == 'wbc' and `class` == 'basophil'")
    assert row["count"].tolist() == [1] and row["percent"].tolist() == [50.0]
    np.testing.assert_allclose(cells.colormap.map(label), CLASS_COLORS["basophil"], atol=1e-6)

    # The user erases a red cell with the fill tool: the dock measures the layer again
    # (once the strokes pause) and counts one red cell fewer; the corrected class stays.
    rbc_before = int(counts_widget.counts.query("cell_type == 'rbc'")["count"].sum())
    erased = features[(features["cell_type"] == "rbc") & ~features["touches_edge"]].iloc[0]
    erased_label = int(erased["index"])
    ys, xs = np.nonzero(cells.data == erased_label)
    cells.fill((ys[0], xs[0]), 0)
    qtbot.waitUntil(lambda: "Measured again after hand edits: 1 removed" in counts_widget._summary.text(), timeout=5000)
    assert int(counts_widget.counts.query("cell_type == 'rbc'")["count"].sum()) == rbc_before - 1
    assert erased_label not in set(cells.features["index"])
    assert cells.features.set_index("index").loc[label, "class"] == "basophil"
    # A cell painted with a new label gets a row (no class yet) and is counted.
    new_label = int(cells.features["index"].max()) + 1
    cells.paint((ys.mean(), xs.mean()), new_label)  # a brush dab where the erased cell was
    qtbot.waitUntil(lambda: new_label in set(cells.features["index"]), timeout=5000)
    assert cells.features.set_index("index").loc[new_label, "class"] == ""
    assert counts_widget.counts["count"].sum() == len(cells.features)
    # A whole-slide layer is measured again only when Update is pressed (a pass over
    # every pixel); until then the dock says so.
    from napari_smear._napari.widgets import counts as counts_module

    monkeypatch.setattr(counts_module, "AUTO_REMEASURE_MAX_PIXELS", 0)
    total = int(counts_widget.counts["count"].sum())
    cells.fill((int(ys.mean()), int(xs.mean())), 0)  # erase the painted cell again
    qtbot.waitUntil(lambda: "press Update to count them again" in counts_widget._summary.text(), timeout=5000)
    assert int(counts_widget.counts["count"].sum()) == total
    counts_widget._refresh_button.click()
    assert int(counts_widget.counts["count"].sum()) == total - 1
    assert "press Update" not in counts_widget._summary.text()

    # Selecting a cell names its class and confidence.
    cells.selected_label = label
    assert counts_widget.selected_text.startswith(f"Selected cell {label} (wbc): basophil, confidence 0.")

    # Removing the layer empties the dock.
    viewer.layers.remove(cells)
    assert counts_widget.layer is None and counts_widget.counts.empty


def test_count_dock_opened_under_another_gets_room_once(make_napari_viewer, synthetic_field, qtbot):
    """Opened below the Classify dock, the count dock takes the height the Classify dock
    does not need, and at least half the column; a height the user sets later is kept."""
    from napari_smear._napari.widgets.counts import show_counts

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 1100)
    classify_dock, classify = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    _, cells, _ = add_segmented_field(viewer, synthetic_field)
    show_counts(viewer, cells)
    counts_dock = viewer.window.dock_widgets["Differential count (napari-smear)"].parent()  # napari's wrapper
    form = classify_dock.height() - classify.native.viewport().height() + classify.form.sizeHint().height()

    def room_made():  # the Classify form whole, and at least half the column for the counts
        column = classify_dock.height() + counts_dock.height()
        return classify_dock.height() >= form - 10 and counts_dock.height() >= column // 2 - 10

    qtbot.waitUntil(room_made)
    column = classify_dock.height() + counts_dock.height()

    window = counts_dock.parentWidget()
    from qtpy.QtCore import Qt

    before = counts_dock.height()
    window.resizeDocks([classify_dock, counts_dock], [200, column - 200], Qt.Orientation.Vertical)  # the user drags
    qtbot.waitUntil(lambda: counts_dock.height() > before + 50)
    user_height = counts_dock.height()
    show_counts(viewer, cells)  # counting again leaves the dock as the user left it
    qtbot.wait(100)
    assert counts_dock.height() == user_height


@pytest.mark.usefixtures("one_torch_thread")
def test_counts_dock_adds_up_every_cells_layer(make_napari_viewer, synthetic_field):
    """A differential over several fields: the cells layers of all open fields counted together."""
    viewer = make_napari_viewer()
    _, counts_widget = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    add_segmented_field(viewer, synthetic_field, name="field 1")
    one = counts_widget.counts.set_index("cell_type")["count"]
    assert counts_widget.counted_layers == ["field 1 cells"]
    counts_widget.add_up_layers = True
    # a second field opened while the box is ticked is added in
    _, cells_2, _ = add_segmented_field(viewer, synthetic_field, name="field 2")
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    assert sorted(counts_widget.counted_layers) == ["field 1 cells", "field 2 cells"]
    both = counts_widget.counts.set_index("cell_type")["count"]
    pd.testing.assert_series_equal(both, 2 * one)
    assert "2 cells layers added up" in counts_widget._summary.text()
    # a class typed into the second field's table counts in the sum
    features = cells_2.features
    features.loc[features["cell_type"] == "wbc", "class"] = "neutrophil"
    cells_2.features = features
    QApplication.processEvents()
    row = counts_widget.counts.query("cell_type == 'wbc' and `class` == 'neutrophil'")
    assert row["count"].tolist() == [2] and row["percent"].tolist() == [50.0]
    # closing a field drops it from the sum; unticked, one layer again
    viewer.layers.remove(cells_2)
    QApplication.processEvents()
    assert counts_widget.counted_layers == [counts_widget.layer.name]
    counts_widget.add_up_layers = False
    pd.testing.assert_series_equal(counts_widget.counts.set_index("cell_type")["count"], one)
