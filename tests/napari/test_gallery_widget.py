"""The "Cell gallery" dock: thumbnails per class, review order, selecting a cell, setting
classes by hand (recoloured, counted, kept for training) and the saved picture."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model_file
from widget_helpers import add_segmented_field, truth_segmentation

from napari_smear._napari.layers import BY_HAND, CLASS_COLORS, add_to_viewer, set_cell_classes
from napari_smear._napari.widgets import gallery as gallery_module
from napari_smear._napari.widgets.gallery import PAGE_SIZE, GalleryWidget

pytestmark = pytest.mark.gui


@pytest.mark.usefixtures("one_torch_thread", "fresh_user_models")
def test_gallery_dock_reviews_and_corrects_a_classification(make_napari_viewer, synthetic_field, tmp_path, qtbot,
                                                            monkeypatch):
    from napari_smear.pipeline import analyze

    viewer = make_napari_viewer()
    _, gallery = viewer.window.add_plugin_dock_widget("napari-smear", "Cell gallery")
    assert isinstance(gallery, GalleryWidget) and gallery.layer is None
    assert "No cells layer" in gallery.status

    # Segmented only: a group per cell type, all unclassified; the white cells first.
    image, cells, _ = add_segmented_field(viewer, synthetic_field, scale=(0.5, 0.5))
    assert gallery.layer.unique_id == cells.unique_id  # (npe2 hands the widget proxies)
    assert gallery.groups == ["unclassified (wbc): 2", "unclassified (platelet): 6", "unclassified (rbc): 73"]
    assert len(gallery.shown_labels) == 2

    # Classified: groups per class; the least confident first.
    rgb, truth = synthetic_field
    model = tiny_model_file(tmp_path / "tiny.safetensors")
    result = analyze(rgb, models=[model], segmentation=truth_segmentation(truth), device="cpu")
    add_to_viewer(viewer, result, image_layer=image)
    qtbot.waitUntil(lambda: any("(rbc)" in g and not g.startswith("unclassified") for g in gallery.groups))
    table = result.table
    rbc = table[table.cell_type == "rbc"]
    biggest = rbc["class"].value_counts().index[0]
    gallery.show_group(biggest, "rbc")
    expected = rbc[rbc["class"] == biggest].sort_values("confidence", kind="stable")["label"].tolist()
    assert gallery.shown_labels == expected[:PAGE_SIZE]
    item = gallery._list.item(0)
    assert item.text().startswith(f"{expected[0]} · ") and not item.icon().isNull()

    # Clicking a thumbnail selects the cell and centres the view on it (world coordinates).
    gallery.select_labels([expected[0]])
    assert cells.selected_label == expected[0]
    row = table.set_index("label").loc[expected[0]]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    np.testing.assert_allclose(camera.center[-2:], (0.5 * row.centroid_y, 0.5 * row.centroid_x))

    # The arrow keys walk to the next cell, and the view follows.
    from qtpy.QtCore import Qt as QtKeys
    from qtpy.QtTest import QTest

    gallery._list.setCurrentRow(0)
    QTest.keyClick(gallery._list, QtKeys.Key.Key_Right)
    assert gallery.selected_labels == [expected[1]] and cells.selected_label == expected[1]

    # A cell picked in the viewer selects its thumbnail (the view stays where it is).
    centre = tuple(camera.center)
    cells.selected_label = expected[3]
    assert gallery.selected_labels == [expected[3]] and tuple(camera.center) == centre

    # Setting a class by hand: recorded, recoloured, counted, and the cell leaves the group.
    _, counts = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    counts.set_layer(cells)
    changed = gallery.set_class("schistocyte", [expected[0], expected[1]])
    assert changed == 2
    features = cells.features.set_index("index")
    assert features.loc[expected[0], "class"] == "schistocyte" and features.loc[expected[0], "model"] == BY_HAND
    assert np.isnan(features.loc[expected[0], "confidence"])
    assert features.loc[expected[0], "model_class"] == biggest  # the model's answer kept
    assert cells.colormap.map(expected[0]) == pytest.approx(CLASS_COLORS["schistocyte"])
    qtbot.waitUntil(lambda: expected[0] not in gallery.shown_labels)
    assert "2 cells set to schistocyte by hand" in gallery.status
    qtbot.waitUntil(lambda: "schistocyte" in set(counts.counts["class"]))
    assert int(counts.counts.set_index("class").loc["schistocyte", "count"]) >= 2

    # The class list offers the models' classes and "no class", which removes a class.
    offered = [gallery._class_combo.itemText(i) for i in range(gallery._class_combo.count())]
    assert set(result.models[next(iter(result.models))]["classes"]) <= set(offered) and "(no class)" in offered
    gallery.set_class("(no class)", [expected[1]])
    assert cells.features.set_index("index").loc[expected[1], "class"] == ""

    # The corrected classes are what the Train classifier dock reads.
    from napari_smear._napari.widgets.train import cell_classes_from_features

    assert cell_classes_from_features(cells.features)[expected[0]] == "schistocyte"

    # A picture of every class for a report.
    path = gallery.save_picture(tmp_path / "gallery.png")
    from napari_smear.io import read_image

    picture, _ = read_image(path)
    assert picture.shape[1] == 800 and picture.shape[0] > 200

    # The class list offers only the classes of the shown cells' type.
    gallery.show_group(biggest, "rbc")
    offered = {gallery._class_combo.itemText(i) for i in range(gallery._class_combo.count())}
    assert gallery._class_combo.currentText() == biggest and "schistocyte" in offered

    # Leaving out the cells cut by the image edge, as the Differential count can.
    now = cells.features
    whole = now[(now["cell_type"] == "rbc") & (now["class"] == biggest) & ~now["touches_edge"]]["index"]
    gallery.include_edge_cells = False
    assert sorted(gallery.shown_labels) == sorted(whole)
    gallery.include_edge_cells = True

    # A correction keeps the reviewer's place: the pages shown stay shown.
    monkeypatch.setattr(gallery_module, "PAGE_SIZE", 5)
    gallery._show_group()  # the first page, as choosing the class shows it
    gallery.show_more()
    assert len(gallery.shown_labels) == 10
    gallery.set_class("teardrop", gallery.shown_labels[:1])
    qtbot.waitUntil(lambda: "teardrop" in " ".join(gallery.groups))
    assert len(gallery.shown_labels) >= 10

    # Classifying again keeps the classes set by hand (a person's word outlasts the model's).
    from napari_smear._napari.layers import hand_set_classes

    hand = hand_set_classes(cells)
    from napari_smear._napari.widgets import user_models

    user_models.add(model)
    _, classify = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    classify._image_combo.value = image
    classify._cells_combo.value = cells
    classify._models.value = [str(model.resolve())]
    classify._device.value = "cpu"
    classify.run()
    qtbot.waitUntil(lambda: not classify.is_running, timeout=60_000)
    assert hand_set_classes(cells) == hand and f"{len(hand)} class(es) set by hand kept" in classify.status

    # The checked cells exported as a training folder: one sub-folder per class.
    gallery.show_group("teardrop", "rbc")
    teardrops = gallery.shown_labels
    gallery._list.selectAll()
    written = gallery.export_selected(tmp_path / "training")
    assert sorted(p.parent.name for p in written) == ["teardrop"] * len(teardrops)
    assert "cell image(s) written into" in gallery.status

    # 'unclassified' is not a class name, and the picture is a PNG.
    with pytest.raises(ValueError, match="'unclassified' names the cells without a class"):
        set_cell_classes(cells, expected[2], "Unclassified")
    with pytest.raises(ValueError, match="saved as PNG"):
        gallery.save_picture(tmp_path / "gallery.jpg")
    assert gallery.save_picture(tmp_path / "report").endswith("report.png")

    # Nothing selected, or an id that is not a cell: a clear error, nothing changed.
    gallery._list.clearSelection()
    with pytest.raises(ValueError, match="no cells selected"):
        gallery.set_class("normal")
    before = cells.features.copy()
    with pytest.raises(ValueError, match="no cells with label ids \\[9999\\]"):
        set_cell_classes(cells, [9999], "normal")
    pd.testing.assert_frame_equal(cells.features, before)

    # The image removed: the thumbnails cannot be cut, and the dock says so -- never cut
    # from another image of the same size (every camera field has one size).
    viewer.layers.remove(image)
    viewer.add_image(np.zeros_like(rgb), name="another field", rgb=True)
    gallery.refresh()
    assert "its image layer is not in the viewer" in gallery.status and gallery.shown_labels == []


def test_clicking_a_cell_of_a_covered_field_brings_that_field_to_the_top(make_napari_viewer, synthetic_field):
    """Several fields open at the same place (their differential added up): a thumbnail of
    the field underneath brings its image and cells to the top, so the view shows it."""
    viewer = make_napari_viewer()
    _, gallery = viewer.window.add_plugin_dock_widget("napari-smear", "Cell gallery")
    image_1, cells_1, nuclei_1 = add_segmented_field(viewer, synthetic_field, name="field 1")
    add_segmented_field(viewer, synthetic_field, name="field 2")  # on top of field 1
    gallery.set_layer(cells_1)
    gallery.select_labels(gallery.shown_labels[:1])
    names = [layer.name for layer in viewer.layers]
    assert names[-3:] == ["field 1", "field 1 cells", "field 1 nuclei"], names
    assert "field 1 brought to the top" in gallery.status
    # already on top: nothing moves
    gallery.select_labels(gallery.shown_labels[1:2])
    assert [layer.name for layer in viewer.layers] == names
