"""napari_smear.add_to_viewer: a scripted session shows an analysis the way the widgets do."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_model_file
from widget_helpers import truth_segmentation

import napari_smear
from napari_smear._napari.layers import METADATA_KEY, segmentation_from_layers
from napari_smear._napari.widgets.counts import CountsWidget

pytestmark = pytest.mark.gui


@pytest.mark.usefixtures("one_torch_thread")
def test_add_to_viewer(make_napari_viewer, synthetic_field, tmp_path):
    rgb, truth = synthetic_field
    model = tiny_model_file(tmp_path / "tiny.safetensors", cell_types=["wbc", "platelet"])
    result = napari_smear.analyze(rgb, models=[model], segmentation=truth_segmentation(truth), device="cpu")
    assert napari_smear.add_to_viewer is napari_smear._napari.layers.add_to_viewer

    viewer = make_napari_viewer()
    image = viewer.add_image(rgb, name="field", rgb=True, scale=(0.5, 0.5))
    viewer.add_image(np.zeros((10, 10)), name="unrelated")  # another shape: not a candidate
    layers = napari_smear.add_to_viewer(viewer, result)  # the image layer is found by shape
    assert [layer.name for layer in layers] == ["field cells", "field nuclei", "field attention (tiny)"]
    cells, nuclei, attention = layers
    assert cells.features.columns[0] == "index" and "class" in cells.features.columns
    assert (cells.features["class"] != "").sum() == 8  # the model classifies wbc and platelets only
    assert cells.metadata[METADATA_KEY]["models"]["tiny"]["cell_types"] == ["wbc", "platelet"]
    np.testing.assert_allclose(attention.scale, (0.5, 0.5))
    np.testing.assert_array_equal(attention.data, result.attention["tiny"])
    _, counts = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    assert isinstance(counts, CountsWidget) and counts.layer.name == "field cells"

    # The classified layer gives back the segmentation only (classification is a result).
    seg = segmentation_from_layers(cells, nuclei)
    assert list(seg.table.columns) == list(truth_segmentation(truth).table.columns)
    np.testing.assert_array_equal(seg.nuclei, truth["nuclei"])

    # Again: updated in place, also without image_layer (its attention maps, image layers
    # of the same shape, are not taken for the analysed image)
    n_layers = len(viewer.layers)
    again = napari_smear.add_to_viewer(viewer, result, image_layer="field", counts=False)
    assert len(viewer.layers) == n_layers and again[0] is cells
    assert napari_smear.add_to_viewer(viewer, result, counts=False)[0] is cells and len(viewer.layers) == n_layers
    with pytest.raises(TypeError, match="segmentation=seg, models=\\[\\]"):
        napari_smear.add_to_viewer(viewer, result.segmentation)

    with pytest.raises(ValueError, match="no layer named 'nope'"):
        napari_smear.add_to_viewer(viewer, result, image_layer="nope")
    with pytest.raises(ValueError, match="is \\(10, 10\\) pixels but the analysis is of a \\(480, 640\\)"):
        napari_smear.add_to_viewer(viewer, result, image_layer="unrelated")
    viewer.add_image(rgb, name="copy", rgb=True)
    with pytest.raises(ValueError, match="several image layers .* pass image_layer="):
        napari_smear.add_to_viewer(viewer, result)

    # Without the image in the viewer, the layers are named "smear ...".
    viewer.layers.clear()
    assert [layer.name for layer in napari_smear.add_to_viewer(viewer, result, counts=False)][:2] == [
        "smear cells", "smear nuclei",
    ]
