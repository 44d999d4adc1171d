"""The "Segment cells" widget, the sample data and the manifest, in a real viewer."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from widget_helpers import WAIT_MS, cancel_when, run_until_cancelled, shown_errors, truth_segmentation, wait_until_idle

import napari_smear.segment
from napari_smear._napari.layers import CELL_TYPE_COLORS
from napari_smear._napari.widgets import segment as segment_widget_module

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer_with_widget(make_napari_viewer, monkeypatch):
    errors = shown_errors(monkeypatch)
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-smear", "synthetic")
    assert [layer.name for layer in layers] == ["synthetic smear", "synthetic smear truth"]
    dock, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Segment cells")
    assert isinstance(widget, segment_widget_module.SegmentWidget)
    return viewer, widget, errors


def test_sample_data_and_layer_choices(viewer_with_widget):
    viewer, widget, _ = viewer_with_widget
    image = viewer.layers["synthetic smear"]
    truth = viewer.layers["synthetic smear truth"]
    assert image.rgb and image.data.shape == (480, 640, 3)
    assert type(truth.colormap).__name__ == "DirectLabelColormap"
    assert list(truth.features.columns[:3]) == ["index", "label", "cell_type"]
    # The widget offers the image layer only (not the truth labels).
    assert widget._image_combo.choices == (image,)
    # A new image layer appears in the choices.
    viewer.add_image(np.zeros((32, 32), np.uint8), name="other")
    assert [layer.name for layer in widget._image_combo.choices] == ["synthetic smear", "other"]


def test_real_segmentation_adds_cells_and_nuclei(viewer_with_widget, qtbot):
    from napari.utils.colormaps import DirectLabelColormap

    viewer, widget, errors = viewer_with_widget
    image = viewer.layers["synthetic smear"]
    image.scale = (0.2, 0.2)
    image.translate = (10.0, 20.0)
    widget._image_combo.value = image
    progress_values: list[int] = []
    widget._progress.changed.connect(progress_values.append)
    widget.run()
    assert widget.is_running and not widget._run_button.enabled
    wait_until_idle(qtbot, widget)
    assert errors == []

    cells = viewer.layers["synthetic smear cells"]
    nuclei = viewer.layers["synthetic smear nuclei"]
    assert cells.data.dtype == np.uint32 and cells.data.shape == (480, 640)
    features = cells.features
    assert features.columns[0] == "index"
    assert "cell_type" in features.columns
    np.testing.assert_array_equal(features["index"], features["label"])
    assert set(features["index"]) == set(np.unique(cells.data)) - {0}
    assert isinstance(cells.colormap, DirectLabelColormap)
    wbc_label = int(features.loc[features["cell_type"] == "wbc", "index"].iloc[0])
    np.testing.assert_allclose(cells.colormap.map(wbc_label), CELL_TYPE_COLORS["wbc"], atol=1e-6)
    assert set(np.unique(nuclei.data)) - {0} <= set(features.loc[features["cell_type"] == "wbc", "index"])
    np.testing.assert_allclose(cells.scale, (0.2, 0.2))
    np.testing.assert_allclose(nuclei.translate, (10.0, 20.0))
    assert cells.metadata["napari_smear"]["rbc_diameter_px"] > 30
    counts = features["cell_type"].value_counts()
    assert counts.get("wbc", 0) == 2
    assert f"{len(features)} cells" in widget.status and "wbc" in widget.status
    assert "RBC diameter" in widget.status
    assert progress_values and progress_values[-1] == 100


def test_progress_rerun_and_one_run_at_a_time(viewer_with_widget, qtbot, monkeypatch, synthetic_field):
    viewer, widget, errors = viewer_with_widget
    rgb, truth = synthetic_field
    calls: list[float | None] = []
    release = threading.Event()

    def fake_segment(image, *, pixel_size_um=None, recorded_pixel_size_um=None, working_diameter_px=None, progress=None):
        calls.append((pixel_size_um, working_diameter_px))
        assert image.shape == (480, 640, 3)
        progress(0.5, "halfway")
        assert release.wait(10)
        progress(1.0, "done")
        return truth_segmentation(truth)

    monkeypatch.setattr(napari_smear.segment, "segment_smear", fake_segment)
    widget._pixel_size.value = 0.1
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value == 50, timeout=WAIT_MS)
    assert "halfway" in widget.status
    widget.run()  # ignored: a run is active
    release.set()
    wait_until_idle(qtbot, widget)
    assert calls == [(0.1, 24.0)]
    assert errors == []
    n_layers = len(viewer.layers)
    widget.run()  # again: the layers are updated in place, not duplicated
    wait_until_idle(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert calls == [(0.1, 24.0), (0.1, 24.0)]
    assert "81 cells: 2 wbc, 73 rbc, 6 platelets" in widget.status
    # "faster" segments at a lower working resolution
    assert [label for label, _ in segment_widget_module.DETAIL_CHOICES] == ["standard", "faster (large scans)"]
    widget._detail.value = 16.0
    widget.run()
    assert "faster (large scans) detail" in widget.status  # what the run uses is said while it runs
    wait_until_idle(qtbot, widget)
    assert calls[-1] == (0.1, 16.0)


def test_cancel_stops_the_run_and_adds_nothing(viewer_with_widget, qtbot, monkeypatch):
    viewer, widget, errors = viewer_with_widget
    seen: dict[str, object] = {}

    def slow_segment(image, *, pixel_size_um=None, recorded_pixel_size_um=None, working_diameter_px=None, progress=None):
        run_until_cancelled(lambda step: progress(step / 1000, f"step {step}"), seen)

    monkeypatch.setattr(napari_smear.segment, "segment_smear", slow_segment)
    n_layers = len(viewer.layers)
    widget.run()
    cancel_when(qtbot, widget, lambda: widget._progress.value >= 1)
    assert isinstance(seen["raised"], segment_widget_module.SegmentationCancelled)
    assert len(viewer.layers) == n_layers
    assert widget.status == "Cancelled."
    assert errors == []


def test_errors_are_reported(viewer_with_widget, qtbot, monkeypatch):
    viewer, widget, errors = viewer_with_widget

    def failing_segment(image, *, pixel_size_um=None, recorded_pixel_size_um=None, working_diameter_px=None,
                        progress=None):
        raise ValueError("got shape (5, 32, 32); expected a 2-D RGB field")

    monkeypatch.setattr(napari_smear.segment, "segment_smear", failing_segment)
    widget._run_button.native.click()  # the button, not the method
    wait_until_idle(qtbot, widget)
    assert widget.status.startswith("Failed: got shape (5, 32, 32)")
    assert len(errors) == 1 and "got shape" in errors[0]
    assert "synthetic smear cells" not in viewer.layers


def test_no_image_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Segment cells")
    widget.run()
    assert "No image layer" in widget.status and not widget.is_running


def test_pixel_size_is_taken_from_the_layer_metadata(viewer_with_widget):
    viewer, widget, _ = viewer_with_widget
    layer = viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, metadata={"pixel_size_um": 0.125})
    widget._image_combo.value = layer
    assert widget._pixel_size.value == pytest.approx(0.125)
    widget._image_combo.value = viewer.layers["synthetic smear"]
    assert widget._pixel_size.value == 0.0


def test_results_lie_on_a_rotated_sheared_image(viewer_with_widget, qtbot):
    """An image turned, sheared or given an affine in the viewer: its cells turn with it
    (every data pixel lands on the same world point as the image's)."""
    viewer, widget, errors = viewer_with_widget
    image = viewer.layers["synthetic smear"]
    image.scale = (0.2, 0.2)
    image.rotate = 30
    image.shear = [0.1]
    image.affine = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -3.0], [0.0, 0.0, 1.0]])
    widget._image_combo.value = image
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == []
    for name in ("synthetic smear cells", "synthetic smear nuclei"):
        layer = viewer.layers[name]
        for point in ([0, 8], [100, 300], [479, 639]):
            np.testing.assert_allclose(layer.data_to_world(point), image.data_to_world(point), atol=1e-6)
    # turned back and segmented again: the layers updated in place lose the old turn
    image.rotate = 0
    image.shear = [0.0]
    image.affine = np.eye(3)
    widget.run()
    wait_until_idle(qtbot, widget)
    cells = viewer.layers["synthetic smear cells"]
    np.testing.assert_allclose(cells.data_to_world([100, 300]), image.data_to_world([100, 300]), atol=1e-6)


def test_a_stack_is_declined_with_the_way_out(viewer_with_widget):
    """A (Z, Y, X, 3) layer: declined before any work, saying how to get one field per layer."""
    viewer, widget, errors = viewer_with_widget
    image = viewer.layers["synthetic smear"]
    stack = viewer.add_image(np.stack([np.asarray(image.data)] * 3), name="stack", rgb=True)
    widget._image_combo.value = stack
    widget.run()
    assert not widget.is_running
    assert "a stack of 3 planes" in widget.status and "Split Stack" in widget.status
    assert "stack cells" not in viewer.layers
    # one plane on its own (a leading axis of length 1) is a field
    from napari_smear._napari.widgets._background import stack_problem

    single = viewer.add_image(np.asarray(image.data)[None], name="one plane", rgb=True)
    assert stack_problem(single) is None


def test_standard_detail_is_the_library_default():
    from napari_smear.segment import DEFAULT_WORKING_DIAMETER_PX

    assert segment_widget_module.DETAIL_CHOICES[0] == ("standard", DEFAULT_WORKING_DIAMETER_PX)


def test_segments_the_full_level_of_a_pyramid(make_napari_viewer, qtbot, tmp_path, synthetic_field, monkeypatch):
    import tifffile

    errors = shown_errors(monkeypatch)
    image, _ = synthetic_field
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=1, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
                  tile=(64, 64), photometric="rgb")
        tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-smear")
    assert layer.multiscale and layer.rgb
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Segment cells")
    widget._image_combo.value = layer
    assert widget._pixel_size.value == pytest.approx(0.25)
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == []
    cells = viewer.layers["slide cells"]
    assert cells.data.shape == image.shape[:2]
    np.testing.assert_allclose(cells.scale, (0.25, 0.25))
    assert (cells.features["cell_type"] == "wbc").sum() == 2


def test_an_eyepiece_photo_leaves_its_black_frame_out(viewer_with_widget, qtbot):
    # a phone photo through the eyepiece: the widget finds the cells of the round view
    # and says why the black frame holds none
    from napari_smear.samples import eyepiece_photo

    viewer, widget, errors = viewer_with_widget
    photo, radial = eyepiece_photo(viewer.layers["synthetic smear"].data, fade=0.015, vignette=0.1)
    widget._image_combo.value = viewer.add_image(photo, name="phone", rgb=True)
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == []
    cells = viewer.layers["phone cells"]
    assert not cells.data[radial > 1.02].any()
    assert (cells.features["cell_type"] == "rbc").sum() > 20
    assert "outside the view (an eyepiece's black frame" in widget.status


def test_warnings_about_the_image_reach_the_user(viewer_with_widget, qtbot, monkeypatch):
    """The run is on a helper thread, whose Python warnings napari does not show: what
    segment_smear warned about (here, a grayscale image) is in the status line and a
    napari warning notification."""
    from napari_smear._napari.widgets import _background

    viewer, widget, errors = viewer_with_widget
    shown: list[str] = []
    monkeypatch.setattr(_background, "show_warning", shown.append)
    rgb = viewer.layers["synthetic smear"].data
    gray = np.round(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    widget._image_combo.value = viewer.add_image(gray, name="gray field")
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [] and "gray field cells" in viewer.layers
    assert "Warning: the image has no colour (grayscale)" in widget.status
    assert len(shown) == 1 and "no colour (grayscale)" in shown[0]


def test_attention_maps_are_not_offered_for_segmentation(viewer_with_widget):
    from napari_smear._napari.layers import attention_layer

    viewer, widget, _ = viewer_with_widget
    data, kwargs, _ = attention_layer(np.zeros((480, 640), np.float32), model_name="m", image_layer_name="synthetic smear")
    viewer.add_image(data, **kwargs)
    widget.reset_choices()
    assert [layer.name for layer in widget._image_combo.choices] == ["synthetic smear"]


def test_segmenting_again_removes_the_old_cells_attention_maps(viewer_with_widget, qtbot, monkeypatch, synthetic_field):
    from napari_smear._napari.layers import attention_layer

    viewer, widget, errors = viewer_with_widget
    _, truth = synthetic_field
    monkeypatch.setattr(napari_smear.segment, "segment_smear", lambda image, **_: truth_segmentation(truth))
    image = viewer.layers["synthetic smear"]
    for model, name, layer_id in (("m1", "synthetic smear", image.unique_id), ("m2", "synthetic smear", None),
                                  ("m1", "other field", "another-layer-id")):
        data, kwargs, _ = attention_layer(np.zeros((480, 640), np.float32), model_name=model,
                                          image_layer_name=name, image_layer_id=layer_id)
        viewer.add_image(data, **kwargs)
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == []
    names = [layer.name for layer in viewer.layers]
    # the maps of this image's earlier cells went; another image's map stays
    assert "synthetic smear attention (m1)" not in names and "synthetic smear attention (m2)" not in names
    assert "other field attention (m1)" in names
    assert "removed 2 attention maps of the cells segmented before" in widget.status


@pytest.mark.parametrize("name", ["Segment cells", "Classify cells", "Train classifier", "Batch analyze folder"])
def test_docked_form_is_never_cut_off_at_the_right(make_napari_viewer, qtbot, name):
    """The scroll area round each form never scrolls sideways, so it must be at least
    as wide as its form: docked narrower, the right of every row (buttons, combo boxes,
    the status text) was cut off."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", name)
    scroll_area, form = widget.native, widget.form
    qtbot.waitUntil(lambda: form.isVisible(), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: form.width() <= scroll_area.viewport().width(), timeout=5_000)
    assert form.width() >= form.minimumSizeHint().width()
    # a longer entry widens the form: the scroll area follows
    widget.form.layout().itemAt(0).widget().setMinimumWidth(form.minimumSizeHint().width() + 80)
    qtbot.waitUntil(lambda: scroll_area.minimumWidth() >= form.minimumSizeHint().width() > 0, timeout=5_000)
    qtbot.waitUntil(lambda: form.width() <= scroll_area.viewport().width(), timeout=5_000)


def test_the_result_of_an_image_removed_during_the_run_is_not_added(viewer_with_widget, qtbot, monkeypatch):
    """Its cells would sit over nothing (or over whatever image is there now)."""
    viewer, widget, errors = viewer_with_widget
    started, release = threading.Event(), threading.Event()
    real = napari_smear.segment.segment_smear

    def slow_segment(*args, **kwargs):
        started.set()
        release.wait(WAIT_MS / 1000)
        return real(*args, **kwargs)

    monkeypatch.setattr(napari_smear.segment, "segment_smear", slow_segment)
    widget._run_button.native.click()
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    viewer.layers.remove("synthetic smear")
    release.set()
    wait_until_idle(qtbot, widget)
    assert errors == []
    assert "synthetic smear cells" not in viewer.layers and "synthetic smear nuclei" not in viewer.layers
    assert "'synthetic smear' was removed from the viewer during the run: its segmentation was not added" in widget.status


def test_a_long_path_in_the_status_does_not_widen_the_dock(make_napari_viewer, qtbot):
    """A path is one word to Qt's word wrap: a status naming a deep folder made the
    status label, the form and the dock wider (the canvas narrower) for good. The status
    may now wrap after each path separator; it reads back without the break marks."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Batch analyze folder")
    form = widget.form
    qtbot.waitUntil(lambda: form.isVisible(), timeout=WAIT_MS)
    before = form.minimumSizeHint().width()
    path = "/" + "/".join(f"a_long_folder_name_{k}" for k in range(12)) + "/field_0001.png"
    widget._set_status(f"<b>Done</b>: 1 of 1 images analysed into {path}")
    qtbot.wait(50)
    assert form.minimumSizeHint().width() <= before + 40
    assert widget.status == f"<b>Done</b>: 1 of 1 images analysed into {path}"


def test_segmenting_again_over_classes_set_by_hand_asks_first(viewer_with_widget, qtbot):
    from napari_smear._napari.layers import hand_set_classes, set_cell_classes

    viewer, widget, errors = viewer_with_widget
    widget.run()
    wait_until_idle(qtbot, widget)
    cells = viewer.layers["synthetic smear cells"]
    first = int(cells.features["index"].iloc[0])
    set_cell_classes(cells, [first], "lymphocyte")
    widget.run()  # the first press says what would be lost
    assert not widget.is_running
    assert "holds 1 class set by hand, which new cells replace" in widget.status
    assert "press the button again" in widget.status and hand_set_classes(cells) == {first: "lymphocyte"}
    widget.run()  # the second goes on
    wait_until_idle(qtbot, widget)
    assert hand_set_classes(viewer.layers["synthetic smear cells"]) == {} and errors == []


def test_a_layer_of_the_users_own_is_never_written_over(viewer_with_widget, qtbot):
    viewer, widget, errors = viewer_with_widget
    drawn = viewer.add_labels(np.zeros((480, 640), np.uint32), name="synthetic smear cells")
    drawn.data[10:20, 10:20] = 5
    widget.run()
    wait_until_idle(qtbot, widget)
    assert viewer.layers["synthetic smear cells"] is drawn and int(drawn.data.max()) == 5
    result = viewer.layers["synthetic smear cells [2]"]
    assert result.metadata["napari_smear"]["image_layer"] == "synthetic smear" and errors == []
