"""The "Classify cells" widget in a real viewer: features, class colours, attention, counts, cancel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import tiny_model_file
from widget_helpers import WAIT_MS, add_segmented_field, cancel_when, run_until_cancelled, shown_errors, wait_until_idle

import napari_smear.pipeline
from napari_smear._napari.layers import CLASS_COLORS, METADATA_KEY
from napari_smear._napari.widgets import classify as classify_module
from napari_smear._napari.widgets import user_models
from napari_smear.predict import SURE_AT
from napari_smear._napari.widgets.counts import CountsWidget
from napari_smear.models import available_models

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh_user_models", "one_torch_thread")]


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny.safetensors")


@pytest.fixture
def setup(make_napari_viewer, synthetic_field, model_file, monkeypatch):
    errors = shown_errors(monkeypatch)
    viewer = make_napari_viewer()
    image, cells, nuclei = add_segmented_field(viewer, synthetic_field, scale=(0.2, 0.2))
    user_models.add(model_file)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    assert isinstance(widget, classify_module.ClassifyWidget)
    # Default: the installed built-in models, else the most recent session model.
    assert list(widget._models.value) == (available_models() or [str(model_file.resolve())])
    widget._models.value = [str(model_file.resolve())]  # the tests' tiny model (fast on CPU)
    return viewer, widget, errors


def _check_choices(viewer, widget, model_file, tmp_path):
    assert widget._image_combo.value is viewer.layers["synthetic smear"]
    assert widget._cells_combo.value is viewer.layers["synthetic smear cells"]
    assert widget._cells_combo.choices[-1] is None  # "segment the image first"
    assert set(available_models()) | {str(model_file.resolve())} == set(widget._models.choices)
    # A model trained or opened elsewhere in the session appears in the widget.
    other = tiny_model_file(tmp_path / "other.safetensors", ["a", "b"])
    user_models.add(other)
    assert str(other.resolve()) in widget._models.choices
    assert widget._models.value == [str(model_file.resolve())]  # the selection is kept
    user_models.remove(other)
    import torch

    combo = widget._device.native
    enabled = {combo.itemData(i) or combo.itemText(i): combo.model().item(i).isEnabled() for i in range(combo.count())}
    assert enabled["auto"] and enabled["cpu"]
    assert enabled["cuda"] == torch.cuda.is_available()


def test_classify_adds_features_colours_attention_and_counts(setup, qtbot, model_file, tmp_path):
    viewer, widget, errors = setup
    _check_choices(viewer, widget, model_file, tmp_path)
    n_layers = len(viewer.layers)
    widget._run_button.native.click()
    assert widget.is_running
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    assert "81 of 81 cells classified by tiny" in widget.status
    # an untrained model is sure of no cell: said, as of a model from another microscope
    assert "Warning: tiny was unsure of 100 % of the 81 cells it classified" in widget.status

    cells = viewer.layers["synthetic smear cells"]
    features = cells.features
    assert list(features.columns[:6]) == ["index", "label", "cell_type", "class", "confidence", "model"]
    assert {"p_lymphocyte", "p_neutrophil", "p_platelet"} <= set(features.columns)
    assert set(features["index"]) == set(np.unique(cells.data)) - {0}
    probabilities = features[["p_lymphocyte", "p_neutrophil", "p_platelet"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(features["confidence"], probabilities.max(axis=1), atol=1e-6)
    assert set(features["class"]) <= {"lymphocyte", "neutrophil", "platelet"}
    # Coloured by class with the fixed palette.
    assert type(cells.colormap).__name__ == "DirectLabelColormap"
    for label, cls in zip(features["index"][:10], features["class"][:10]):
        np.testing.assert_allclose(cells.colormap.map(int(label)), CLASS_COLORS[cls], atol=1e-6)
    assert cells.metadata[METADATA_KEY]["models"]["tiny"]["classes"] == ["lymphocyte", "neutrophil", "platelet"]
    # The nuclei layer shows the same row when hovering a nucleus.
    assert list(viewer.layers["synthetic smear nuclei"].features["class"]) == list(features["class"])

    attention = viewer.layers["synthetic smear attention (tiny)"]
    assert attention.data.dtype == np.float32 and attention.data.shape == (480, 640)
    np.testing.assert_allclose(attention.scale, (0.2, 0.2))
    assert attention.blending == "translucent" and attention.colormap.name == "smear attention"
    assert attention.data[cells.data == 0].max() == 0 and attention.data.max() > 0
    assert len(viewer.layers) == n_layers + 1  # cells/nuclei updated in place, attention added

    # Hovering a cell: its class and confidence in the status bar (napari shows features).
    row = features.iloc[0]
    y, x = np.argwhere(cells.data == row["index"])[0]
    status = cells.get_status((y * 0.2, x * 0.2), world=True)["coordinates"]
    assert f"class: {row['class']}" in status and "confidence: " in status

    # The differential count dock opened on the cells.
    _, counts = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    assert isinstance(counts, CountsWidget)
    assert counts.layer.unique_id == cells.unique_id
    assert counts.counts["count"].sum() == 81
    assert widget.last_result.counts["count"].tolist() == counts.counts["count"].tolist()

    # Running again updates the layers in place.
    widget.run()
    wait_until_idle(qtbot, widget)
    assert len(viewer.layers) == n_layers + 1 and errors == []


def test_segment_then_classify_with_a_wbc_model(setup, qtbot, model_file, tmp_path):
    viewer, widget, errors = setup
    for name in ("synthetic smear cells", "synthetic smear nuclei"):
        viewer.layers.remove(name)
    widget.reset_choices()
    assert widget._cells_combo.value is None
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    cells = viewer.layers["synthetic smear cells"]
    assert cells.metadata[METADATA_KEY]["rbc_diameter_px"] > 30
    assert (cells.features["class"] != "").all()
    assert "synthetic smear attention (tiny)" in viewer.layers
    np.testing.assert_allclose(cells.scale, (0.2, 0.2))
    # The new cells layer is picked up: the next run classifies it without segmenting again.
    assert widget._cells_combo.value.name == "synthetic smear cells"
    # Another image of the same size must not be classified with these cells.
    other = viewer.add_image(np.zeros((480, 640, 3), np.uint8), name="other", rgb=True)
    widget._image_combo.value = other
    assert widget._cells_combo.value is None
    widget._image_combo.value = viewer.layers["synthetic smear"]
    assert widget._cells_combo.value.name == "synthetic smear cells"

    # A model for white cells only (its file says so) leaves the other cells unclassified.
    wbc_only = tiny_model_file(tmp_path / "wbc.safetensors", cell_types=["wbc"])
    rbc_only = tiny_model_file(tmp_path / "rbc.safetensors", cell_types=["rbc"])
    user_models.add(rbc_only)
    widget._models.value = [str(model_file.resolve()), str(rbc_only.resolve())]
    widget._model_file.value = wbc_only  # "add model file": registered and selected...
    # ...in place of the selected model for the same cells (one model per cell type)
    assert list(widget._models.value) == [str(rbc_only.resolve()), str(wbc_only.resolve())]
    assert "in place of tiny" in widget.status
    widget._models.value = [str(wbc_only.resolve())]
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    features = viewer.layers["synthetic smear cells"].features
    classified = features["class"] != ""
    assert set(features.loc[classified, "cell_type"]) == {"wbc"}
    assert (features.loc[~classified, "model"] == "").all()
    # Unclassified cells keep their cell-type colour, faint.
    cells = viewer.layers["synthetic smear cells"]
    rbc = int(features.loc[features["cell_type"] == "rbc", "index"].iloc[0])
    assert cells.colormap.map(rbc)[3] < 0.5


def test_one_run_at_a_time_progress_and_cancel(setup, qtbot, monkeypatch):
    viewer, widget, errors = setup
    release = threading.Event()
    calls = []
    real = napari_smear.pipeline.analyze

    def gated(image, *, progress=None, **kwargs):
        calls.append(kwargs)
        progress(0.5, "halfway there")
        assert release.wait(20)
        return real(image, progress=progress, **kwargs)

    monkeypatch.setattr(napari_smear.pipeline, "analyze", gated)
    widget._batch_size.value = 7
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value == 50, timeout=WAIT_MS)
    assert "Halfway there" in widget.status
    widget.run()  # ignored while running
    release.set()
    wait_until_idle(qtbot, widget)
    assert len(calls) == 1 and errors == []
    assert calls[0]["batch_size"] == 7 and calls[0]["device"] == "auto"
    assert calls[0]["segmentation"] is not None and len(calls[0]["segmentation"].table) == 81

    # Cancel: nothing is added.
    seen: dict[str, object] = {}

    def slow_analyze(image, *, progress=None, **kwargs):
        run_until_cancelled(lambda step: progress(step / 1000, f"step {step}"), seen)

    monkeypatch.setattr(napari_smear.pipeline, "analyze", slow_analyze)
    names = [layer.name for layer in viewer.layers]
    widget.run()
    cancel_when(qtbot, widget, lambda: widget._progress.value >= 1)
    assert type(seen["raised"]).__name__ == "Cancelled"
    assert [layer.name for layer in viewer.layers] == names
    assert widget.status == "Cancelled." and errors == []


def test_errors_are_reported(setup, qtbot, tmp_path):
    viewer, widget, errors = setup
    not_a_model = tmp_path / "weights.safetensors"
    not_a_model.write_bytes(b"PK\x03\x04 not a model")
    widget._model_file.value = not_a_model
    assert widget.status.startswith("Not added: ") and "not a napari-smear model file" in widget.status
    assert len(errors) == 1 and errors[0].startswith("napari-smear: not a usable model file")
    widget._models.value = []
    widget.run()
    assert "No model chosen" in widget.status and not widget.is_running
    # A model file deleted after it was added: the run fails with load_model's message.
    widget._models.value = [str(user_models.paths[0])]
    user_models.paths[0].unlink()
    widget.run()
    wait_until_idle(qtbot, widget)
    assert "model file not found" in widget.status and len(errors) == 2
    assert "synthetic smear attention (tiny)" not in viewer.layers


def test_attention_is_visible_in_a_screenshot(make_napari_viewer, synthetic_field, model_file, qtbot):
    """On a shown viewer, the attention layer changes what is drawn over the smear."""
    viewer = make_napari_viewer(show=True)
    image, cells, nuclei = add_segmented_field(viewer, synthetic_field)
    user_models.add(model_file)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    widget._models.value = [str(model_file.resolve())]
    widget.run()
    wait_until_idle(qtbot, widget)
    attention = viewer.layers["synthetic smear attention (tiny)"]
    cells.visible = nuclei.visible = False
    attention.visible = False
    viewer.reset_view()
    image_only = viewer.screenshot(canvas_only=True, flash=False)
    attention.visible = True
    with_attention = viewer.screenshot(canvas_only=True, flash=False)
    assert image_only.shape == with_attention.shape
    assert image_only[..., :3].std() > 5  # not blank
    changed = np.abs(with_attention[..., :3].astype(int) - image_only[..., :3].astype(int)).max(axis=-1) > 10
    assert changed.mean() > 0.02  # the attention glows over a visible part of the cells
    # The colormap is transparent at zero: where there is no map (the glass, most of the
    # field), the smear is drawn untouched.
    untouched = np.abs(with_attention[..., :3].astype(int) - image_only[..., :3].astype(int)).max(axis=-1) <= 2
    assert untouched.mean() > 0.4


def test_class_frequency_checkbox_sets_the_prior_correction(setup, qtbot, monkeypatch):
    viewer, widget, errors = setup
    from napari_smear import pipeline

    seen = []
    real = pipeline.analyze

    def spy(*args, **kwargs):
        seen.append((kwargs["prior_correction"], kwargs["test_time_views"], kwargs["sure_at"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", spy)
    assert widget._class_frequencies.value is True  # default: each model file's own correction
    assert widget._turned_views.value == "all"  # default: each model file's own views, every cell
    widget.run()
    wait_until_idle(qtbot, widget)
    widget._class_frequencies.value = False  # every class equally common
    widget._turned_views.value = "none"  # each cell once
    widget.run()
    wait_until_idle(qtbot, widget)
    widget._turned_views.value = "unsure"  # turned views only where the first leaves it unsure
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen == [(None, None, None), (0.0, 1, None), (0.0, None, SURE_AT)] and errors == []


def test_renamed_image_keeps_its_cells(setup, qtbot):
    """After the image layer is renamed, choosing it finds its cells layer (with the
    user's edits) instead of offering to segment it again; another image is not linked."""
    viewer, widget, errors = setup
    image = viewer.layers["synthetic smear"]
    cells = viewer.layers["synthetic smear cells"]
    image.name = "patient 7"
    other = viewer.add_image(np.asarray(image.data)[::2, ::2], name="other", rgb=True)
    widget._image_combo.value = other
    assert widget._cells_combo.value is None  # not its cells (another size)
    widget._image_combo.value = viewer.layers["patient 7"]
    assert widget._cells_combo.value is cells
    assert cells.metadata["napari_smear"]["image_layer"] == "patient 7"
    # named after the image as well, so that the next run updates them (not a second set)
    assert cells.name == "patient 7 cells"
    assert viewer.layers["patient 7 nuclei"].metadata["napari_smear"]["image_layer"] == "patient 7"
    # closed, and another field of the same size opened: it does not take these cells over
    data = np.asarray(image.data)
    viewer.layers.remove("patient 7")
    newcomer = viewer.add_image(data.copy(), name="next field", rgb=True)
    widget._image_combo.value = newcomer
    assert widget._cells_combo.value is None
    assert cells.metadata["napari_smear"]["image_layer"] == "patient 7"
    assert errors == []


def test_results_follow_an_image_renamed_or_moved_during_the_run(setup, qtbot):
    """The run captured the image's name and placement when it started; the results
    are shown where the image is and named as it is when they arrive (they were named
    after the old name, and the next run added a second set beside them)."""
    viewer, widget, errors = setup
    image = viewer.layers["synthetic smear"]
    cells = viewer.layers["synthetic smear cells"]
    widget.run()
    image.name = "renamed"  # the results come back through the event loop: after these
    image.translate = (10.0, 20.0)
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    names = [layer.name for layer in viewer.layers]
    assert not [name for name in names if name.startswith("synthetic smear")], names
    assert viewer.layers["renamed cells"] is cells  # the cells it classified, updated in place
    results = [layer for layer in viewer.layers if layer is not image]
    assert {layer.name for layer in results} >= {"renamed cells", "renamed nuclei"}
    assert any(layer.name.startswith("renamed attention (") for layer in results)
    for layer in results:
        np.testing.assert_allclose(layer.translate, (10.0, 20.0))
    count = len(viewer.layers)
    widget.run()
    wait_until_idle(qtbot, widget)
    assert len(viewer.layers) == count and errors == []


def test_a_script_drives_the_dock_through_its_public_api(setup, qtbot, model_file):
    """image_layer, cells_layer and models to choose, run() to start, run_finished to
    hear the result (scripts reached for private combo boxes and polled is_running)."""
    viewer, widget, errors = setup
    image = viewer.layers["synthetic smear"]
    widget.image_layer = "synthetic smear"
    assert widget.image_layer is image and widget.cells_layer is viewer.layers["synthetic smear cells"]
    widget.models = [model_file]
    assert widget.models == [str(model_file.resolve())]
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    qtbot.waitUntil(lambda: len(finished) == 1, timeout=60_000)
    (result,) = finished
    assert isinstance(result, napari_smear.pipeline.AnalysisResult) and result is widget.last_result
    assert not widget.is_running and errors == []
    # Cancel pressed once the computation is over but before its result is shown: the
    # result is shown and stands (the status said "Cancelled" over it)
    widget.run()
    assert widget._done_event.wait(60)  # the GUI thread blocked: nothing delivered yet
    widget.cancel()
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=20_000)
    assert isinstance(finished[1], napari_smear.pipeline.AnalysisResult) and "Cancelled" not in widget.status
    finished.clear()
    finished.append(None)
    widget.run()
    widget.cancel()  # at once, before the helper thread has started
    qtbot.waitUntil(lambda: not widget.is_running, timeout=20_000)
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=20_000)
    assert finished[1] is None  # cancelled: nothing produced


def test_cells_painted_or_erased_by_hand_are_measured_again(setup, qtbot):
    """A cell erased with napari's eraser is no longer classified or counted; a cell
    painted with a new label is (it had no row, so it was never classified)."""
    viewer, widget, errors = setup
    cells = viewer.layers["synthetic smear cells"]
    features = cells.features
    erased = int(features.loc[features["cell_type"] == "rbc", "index"].iloc[0])
    data = cells.data.copy()
    data[data == erased] = 0
    new_id = int(data.max()) + 1
    free = np.argwhere(data == 0)
    y, x = free[len(free) // 2]
    yy, xx = np.ogrid[: data.shape[0], : data.shape[1]]
    disc = ((yy - y) ** 2 + (xx - x) ** 2 <= 15**2) & (data == 0)
    data[disc] = new_id
    cells.data = data
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    after = viewer.layers["synthetic smear cells"].features
    assert erased not in set(after["index"]) and new_id in set(after["index"])
    row = after.set_index("index").loc[new_id]
    assert row["class"] != "" and row["area_px"] == int(disc.sum())
    assert row["cell_type"] in ("rbc", "platelet")  # no nucleus: typed by its size
    assert "Cells edited by hand, measured again: 1 removed, 1 added" in widget.status


def test_batch_outputs_opened_with_their_image_are_its_cells(make_napari_viewer, qtbot, tmp_path, synthetic_field,
                                                              model_file, monkeypatch):
    """File > Open of an image and of its batch labels: Classify uses those cells (with
    their table) instead of segmenting the image again."""
    from napari_smear.batch import analyze_files
    from napari_smear.io import write_png_atomic

    errors = shown_errors(monkeypatch)
    image, _ = synthetic_field
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "field.png", image)
    analyze_files(tmp_path / "in", tmp_path / "out", models=[], device="cpu")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "in" / "field.png"), plugin="napari-smear")
    viewer.open(str(tmp_path / "out" / "field_labels.tif"), plugin="napari-smear")
    user_models.add(model_file)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")
    widget._models.value = [str(model_file.resolve())]
    widget._image_combo.value = viewer.layers["field"]
    assert widget._cells_combo.value is viewer.layers["field cells"]
    segmented = []
    import napari_smear.segment

    monkeypatch.setattr(napari_smear.segment, "segment_smear", lambda *a, **k: segmented.append(1))
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [] and segmented == []
    assert (viewer.layers["field cells"].features["class"] != "").any()


def test_summary_says_how_many_white_cells_were_retyped_platelets():
    import pandas as pd

    table = pd.DataFrame({
        "label": [1, 2, 3], "cell_type": ["wbc", "platelet", "rbc"], "segmented_type": ["wbc", "wbc", "rbc"],
        "class": ["neutrophil", "platelet", None], "confidence": [0.9, 0.95, np.nan],
        "model": ["wbc8", "wbc8", None],
    })
    result = napari_smear.pipeline.AnalysisResult(segmentation=None, table=table, models={"wbc8": {}})
    text = classify_module._summary(result, 1.0)
    assert text.startswith("2 of 3 cells classified by wbc8")
    assert "1 segmented as white cells and re-typed platelets" in text
    assert "1 platelet;" in text and "platelet (1 platelet)" not in text  # the class would repeat the type
    two = table.assign(cell_type=["wbc", "platelet", "platelet"], **{"class": ["neutrophil", "platelet", "platelet"]})
    assert "2 platelets" in classify_module._summary(napari_smear.pipeline.AnalysisResult(
        segmentation=None, table=two, models={"wbc8": {}}), 1.0)
    plain = classify_module._summary(napari_smear.pipeline.AnalysisResult(
        segmentation=None, table=table.assign(segmented_type=table.cell_type), models={"wbc8": {}}), 1.0)
    assert "re-typed" not in plain


def test_status_stops_reporting_classes_of_cells_segmented_again(setup, qtbot):
    viewer, widget, errors = setup
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [] and "classified" in widget.status
    cells = viewer.layers["synthetic smear cells"]
    cells.features = cells.features.assign(**{"class": "edited"})  # a hand edit: still classified
    assert "classified" in widget.status
    _, segment = viewer.window.add_plugin_dock_widget("napari-smear", "Segment cells")
    segment._image_combo.value = viewer.layers["synthetic smear"]
    segment.run()
    wait_until_idle(qtbot, segment)
    assert "class" not in viewer.layers["synthetic smear cells"].features.columns
    assert "were replaced since they were classified" in widget.status


def test_a_cells_layer_made_from_another_image_is_refused(setup, qtbot):
    # two camera fields of one size: one's cells on the other's pixels would look right
    viewer, widget, errors = setup
    cells = viewer.layers["synthetic smear cells"]
    image = viewer.layers["synthetic smear"]
    other = viewer.add_image(np.asarray(image.data)[:, ::-1].copy(), name="field B", rgb=True, scale=image.scale)
    widget._image_combo.value = other
    widget.cells_layer = cells  # chosen by hand
    before = cells.features.copy()
    widget.run()
    assert not widget.is_running
    assert "was made from image 'synthetic smear', not 'field B'" in widget.status
    assert cells.features.equals(before) and errors == []


def test_closing_the_dock_cancels_its_run(setup, qtbot, monkeypatch):
    # napari takes a closed dock's widget out without destroying it: the run went on
    viewer, widget, errors = setup
    seen: dict[str, object] = {}

    def slow_analyze(image, *, progress=None, **kwargs):
        run_until_cancelled(lambda step: progress(step / 1000, f"step {step}"), seen)

    monkeypatch.setattr(napari_smear.pipeline, "analyze", slow_analyze)
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value >= 1, timeout=WAIT_MS)
    viewer.window.remove_dock_widget(widget.native)
    qtbot.waitUntil(lambda: "raised" in seen, timeout=WAIT_MS)
    assert type(seen["raised"]).__name__ == "Cancelled"
    wait_until_idle(qtbot, widget)
    assert errors == []


def test_a_finished_run_after_the_dock_is_gone_is_quiet(setup, qtbot):
    # the viewer closed mid-run: the worker's last signals find deleted Qt widgets
    from napari_smear._napari.widgets._background import _unless_deleted

    def deleted():
        raise RuntimeError("wrapped C/C++ object of type QPushButton has been deleted")

    assert _unless_deleted(deleted)() is None
    with pytest.raises(RuntimeError, match="something else"):
        _unless_deleted(lambda: (_ for _ in ()).throw(RuntimeError("something else")))()
