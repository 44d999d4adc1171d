"""The "Batch analyze folder" widget: a real run into a folder, cancel, and bad choices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import tiny_model_file
from widget_helpers import cancel_when, run_until_cancelled, shown_errors, wait_until_idle

import napari_smear.segment
from napari_smear._napari.widgets import batch as batch_widget_module
from napari_smear.io import write_png_atomic
from napari_smear.predict import SURE_AT

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh_user_models", "one_torch_thread")]


@pytest.fixture
def inputs(tmp_path):
    from napari_smear.samples import synthetic_smear

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for k, name in enumerate(("a.png", "sub/b.png")):
        write_png_atomic(folder / name, synthetic_smear((160, 200), rbc_diameter_px=24.0, seed=k)[0])
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "rbc-tiny.safetensors", ["normal", "abnormal"], cell_types=["rbc"])


@pytest.fixture
def widget(make_napari_viewer, monkeypatch):
    errors = shown_errors(monkeypatch)
    viewer = make_napari_viewer()
    _, found = viewer.window.add_plugin_dock_widget("napari-smear", "Batch analyze folder")
    assert isinstance(found, batch_widget_module.BatchWidget)
    found.errors = errors
    found.test_viewer = viewer  # the real viewer (the widget holds a public-API proxy)
    return found


def test_run_writes_the_outputs_and_reports(widget, qtbot, inputs, model_file, tmp_path):
    out = tmp_path / "out"
    widget._input.value = inputs
    widget._output.value = out
    widget._model_file.value = model_file  # added to the models and selected
    widget._models.value = [str(model_file.resolve())]
    widget._device.value = "cpu"
    seen: list[int] = []
    widget._progress.changed.connect(seen.append)
    widget.run()
    assert widget.is_running and not widget._run_button.enabled
    wait_until_idle(qtbot, widget)
    assert widget.errors == []
    report = widget.last_report
    assert (report.total, report.analysed, report.failed) == (3, 2, 1)
    assert widget.status.startswith("2 analysed, 0 finished earlier, 1 failed of 3 images")
    assert "errors.csv" in widget.status and str(out) in widget.status
    assert "broken.jpg: " in widget.status  # which image failed, and why
    assert widget._progress.value == widget._progress.max == 3 and seen
    for stem in ("a", "sub/b"):
        for suffix in ("_labels.tif", "_nuclei.tif", "_attention.tif", "_cells.csv", "_overlay.png", "_done.json"):
            assert (out / f"{stem}{suffix}").is_file()
    cells = pd.read_csv(out / "sub" / "b_cells.csv")
    assert set(cells.loc[cells.cell_type == "rbc", "class"]) <= {"normal", "abnormal"}
    assert pd.read_csv(out / "errors.csv").file.str.endswith("broken.jpg").all()
    # a report with a cell gallery per folder of images (on by default), named in the status
    assert widget.last_report_page == out / "report.html" and widget.last_report_page.is_file()
    assert sorted(p.name for p in (out / "galleries").iterdir()) == sorted([f"{inputs.name}_gallery.png",
                                                                            "sub_gallery.png"])
    assert "Report with a cell gallery per folder" in widget.status and str(out / "report.html") in widget.status
    # again: everything finished is skipped
    widget.run()
    wait_until_idle(qtbot, widget)
    assert widget.last_report.skipped == 2 and "2 finished earlier" in widget.status

    # the results can be opened in the viewer: image, cells coloured by class, nuclei, attention, counts
    assert widget._analysed.choices == ("a.png", "sub/b.png") and widget._show_button.enabled
    widget._analysed.value = "sub/b.png"
    widget.show_result()
    wait_until_idle(qtbot, widget)
    assert widget.errors == [], widget.status
    viewer = widget.test_viewer
    assert [layer.name for layer in viewer.layers] == ["b", "b cells", "b nuclei", "b attention (rbc-tiny)"]
    cells_layer = viewer.layers["b cells"]
    np.testing.assert_array_equal(cells_layer.data, tifffile.imread(out / "sub" / "b_labels.tif"))
    features = cells_layer.features
    assert features["index"].tolist() == cells["label"].tolist()
    assert features["class"].tolist() == cells["class"].fillna("").tolist()  # "": not classified
    assert type(cells_layer.colormap).__name__ == "DirectLabelColormap"
    assert viewer.layers["b"].rgb and widget.status.startswith(f"Showing b: {len(cells)} cells")
    _, counts = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    assert counts.layer.name == "b cells"
    # new layers make napari reset the docks' choices: the list of analysed images stays
    assert widget._analysed.choices == ("a.png", "sub/b.png") and widget._analysed.value == "sub/b.png"
    assert widget._show_button.enabled
    # opening it again updates the same layers
    widget.show_result("sub/b.png")
    wait_until_idle(qtbot, widget)
    assert len(viewer.layers) == 4 and widget.errors == []


def test_results_of_a_moved_input_image_are_explained(widget, qtbot, inputs, tmp_path):
    out = tmp_path / "out"
    widget._input.value = inputs
    widget._output.value = out
    widget._models.value = []
    widget._device.value = "cpu"
    widget.run()
    wait_until_idle(qtbot, widget)
    (inputs / "a.png").rename(tmp_path / "moved.png")
    widget.show_result("a.png")
    assert "not at" in widget.status and "a.png" in widget.status and not widget.is_running
    assert len(widget.test_viewer.layers) == 0
    # choosing another output folder lists its results (none in an empty one)
    widget._output.value = tmp_path
    assert widget._analysed.choices == () and not widget._show_button.enabled


def test_images_of_the_same_name_in_two_folders_get_their_own_layers(widget, qtbot, tmp_path):
    from napari_smear.samples import synthetic_smear

    inputs = tmp_path / "in"
    for k, folder in enumerate(("x", "y")):
        (inputs / folder).mkdir(parents=True)
        write_png_atomic(inputs / folder / "f.png", synthetic_smear((120, 160), rbc_diameter_px=24.0, seed=k)[0])
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._models.value = []  # segmentation only: no attention layers
    widget._device.value = "cpu"
    widget.run()
    wait_until_idle(qtbot, widget)
    viewer = widget.test_viewer
    for image in ("x/f.png", "y/f.png", "x/f.png"):  # the third opens the first again
        widget.show_result(image)
        wait_until_idle(qtbot, widget)
        assert widget.errors == [], widget.status
    assert [layer.name for layer in viewer.layers] == ["f", "f cells", "f nuclei", "y/f", "y/f cells", "y/f nuclei"]
    assert viewer.layers["y/f"].metadata["path"].endswith("y/f.png")
    np.testing.assert_array_equal(viewer.layers["y/f cells"].data, tifffile.imread(tmp_path / "out" / "y" / "f_labels.tif"))


def test_cancel_stops_and_keeps_nothing_half_done(widget, qtbot, inputs, tmp_path, monkeypatch):
    seen = {}

    def slow_segment(image, *, pixel_size_um=None, recorded_pixel_size_um=None, n_workers=None, progress=None,
                     working_diameter_px=None):
        run_until_cancelled(lambda step: progress(step / 1000, f"step {step}"), seen)

    monkeypatch.setattr(napari_smear.segment, "segment_smear", slow_segment)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._models.value = []  # segmentation only
    widget.run()
    cancel_when(qtbot, widget, lambda: "step" in widget.status)
    raised = seen["raised"]  # the user's Cancel, raised from the progress report
    assert type(getattr(raised, "original", raised)).__name__ == "Cancelled"
    assert widget.status == "Cancelled before any image was finished; Run starts again." and widget.errors == []
    assert not list((tmp_path / "out").rglob("*_done.json")) and widget.last_report is None
    widget._images_done = (2, 5)  # what the last progress report said, when images were done
    assert widget.cancelled_text == ("Cancelled: 2 of 5 images done (finished ones are kept); Run again to do the "
                                     "other 3.")
    widget._images_done = (5, 5)
    assert widget.cancelled_text.startswith("Cancelled as the run ended: all 5 images are done")


def test_missing_folders_are_explained(widget, tmp_path):
    widget.run()
    assert "input folder" in widget.status and not widget.is_running
    widget._input.value = tmp_path
    widget.run()
    assert "output folder" in widget.status and not widget.is_running


def test_overlay_colours_match_the_viewer():
    """The QC pictures (core, no napari) colour classes like the viewer does."""
    from napari_smear._napari.layers import CELL_TYPE_COLORS, class_palette
    from napari_smear.batch import CELL_TYPE_RGB, class_palette_rgb

    names = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig", "erythroblast", "platelet",
             "normal", "macrocyte", "microcyte", "target", "teardrop"]
    viewer = class_palette(names)
    ours = class_palette_rgb(names)
    for name in names:
        np.testing.assert_allclose(np.array(ours[name]) / 255, viewer[name][:3], atol=0.01, err_msg=name)
    for cell_type, colour in CELL_TYPE_COLORS.items():
        np.testing.assert_allclose(np.array(CELL_TYPE_RGB[cell_type]) / 255, colour[:3], atol=0.01)


def test_class_frequency_checkbox_reaches_the_batch_run(widget, qtbot, inputs, model_file, tmp_path, monkeypatch):
    import napari_smear.batch

    seen = []
    real = napari_smear.batch.analyze_files

    def spy(*args, **kwargs):
        seen.append((kwargs["prior_correction"], kwargs["working_diameter_px"], kwargs["test_time_views"],
                     kwargs["sure_at"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(napari_smear.batch, "analyze_files", spy)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._model_file.value = model_file
    widget._models.value = [str(model_file.resolve())]
    widget._device.value = "cpu"
    widget._class_frequencies.value = False
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen == [(0.0, None, None, None)] and widget.errors == []  # standard detail: analyze_files' default
    assert widget.last_report.analysed == 2
    # "faster" detail reaches the run and, as another setting, redoes the images
    widget._detail.value = 16.0
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen[-1] == (0.0, 16.0, None, None) and widget.errors == []
    assert widget.last_report.analysed == 2
    # one view per cell reaches the run
    widget._turned_views.value = "none"
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen[-1] == (0.0, 16.0, 1, None) and widget.errors == []
    # turned views only for unsure cells reach the run
    widget._turned_views.value = "unsure"
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen[-1] == (0.0, 16.0, None, SURE_AT) and widget.errors == []


def test_results_of_a_run_given_relative_paths_open_from_another_folder(widget, qtbot, inputs, tmp_path, monkeypatch):
    """summary.csv keeps an input path as given on the command line; napari started in
    another folder still finds the image (it said the image had been moved)."""
    from napari_smear.batch import analyze_files

    monkeypatch.chdir(tmp_path)
    analyze_files(["in"], "out", models=[], device="cpu", progress=None)
    assert pd.read_csv(tmp_path / "out" / "summary.csv").path.str.startswith("in").all()
    monkeypatch.chdir(inputs / "sub")
    widget._output.value = tmp_path / "out"
    widget.show_result("a.png")
    wait_until_idle(qtbot, widget)
    assert widget.errors == [] and widget.status.startswith("Showing a"), widget.status


def test_images_warned_about_are_counted_in_the_status(widget, qtbot, tmp_path):
    from napari_smear.samples import synthetic_smear

    rgb = synthetic_smear((160, 200), rbc_diameter_px=24.0, seed=3)[0]
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "colour.png", rgb)
    write_png_atomic(tmp_path / "in" / "gray.png", np.round(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8))
    widget._input.value = tmp_path / "in"
    widget._output.value = tmp_path / "out"
    widget._models.value = []
    widget._device.value = "cpu"
    widget.run()
    wait_until_idle(qtbot, widget)
    assert widget.errors == []
    assert "1 with warnings (summary.csv, column warnings), the first: gray.png: the image has no colour" in widget.status


def test_a_model_unsure_of_most_cells_is_warned_about(widget, qtbot, inputs, tmp_path, monkeypatch):
    """A model unsure of most cells (as one from another microscope) is
    named in the status, a notification and run.json, with the share."""
    import json

    import napari_smear.pipeline

    monkeypatch.setattr(napari_smear.pipeline, "UNSURE_WARNING_MIN_CELLS", 5)  # two small fields
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", shown.append)
    # untrained, two classes: never 85 % sure of either; eight views, so it is asked
    unsure_model = tiny_model_file(tmp_path / "rbc-unsure.safetensors", ["normal", "abnormal"], cell_types=["rbc"],
                                   test_time_views=8)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._model_file.value = unsure_model  # added to the models and selected
    widget._models.value = [str(unsure_model.resolve())]
    widget._device.value = "cpu"
    widget.run()
    wait_until_idle(qtbot, widget)
    # one warning per folder of images (in/ and in/sub/), named first
    for folder in (inputs, inputs / "sub"):
        assert f"Warning: {folder}: rbc-unsure was unsure of 100 % of the" in widget.status
    assert any("rbc-unsure was unsure of 100 %" in message for message in shown)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(run["warnings"]) == 2 and all("check its classes" in note for note in run["warnings"])


def test_a_report_that_cannot_be_written_leaves_the_run_standing(widget, qtbot, inputs, tmp_path, monkeypatch):
    """The report is an extra: when it fails (a slide too large to draw, a full disk), the
    analysis stands, reported as done, and the status and a notification say why."""
    from napari_smear import report as report_module

    def no_room(out_dir, **kwargs):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(report_module, "write_run_report", no_room)
    warned = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", warned.append)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._models.value = []
    widget.run()
    wait_until_idle(qtbot, widget)
    assert widget.last_report is not None and widget.last_report.analysed == 2
    assert widget.last_report_page is None
    assert "Report not written: [Errno 28] No space left on device" in widget.status
    assert any("the report was not written" in w for w in warned)


def test_the_dock_runs_the_builtin_models_in_the_command_lines_order(widget, qtbot, inputs, tmp_path, monkeypatch):
    """The model order is part of a run's settings: the dock lists the models sorted, but
    runs the built-ins in the order `napari-smear analyze` does, so neither redoes a folder
    the other finished."""
    from napari_smear import batch
    from napari_smear.pipeline import DEFAULT_MODELS

    seen = {}

    def record(source, target, **options):
        seen["models"] = options["models"]
        raise ValueError("stopped by the test")

    monkeypatch.setattr(batch, "analyze_files", record)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    available = [value for value in widget._models.choices if value in DEFAULT_MODELS]
    widget._models.value = sorted(available)
    widget.run()
    wait_until_idle(qtbot, widget)
    assert seen["models"] == [m for m in DEFAULT_MODELS if m in available]


def test_a_runtime_error_in_the_run_is_shown_and_the_dock_is_free_again(widget, qtbot, inputs, tmp_path, monkeypatch):
    """A RuntimeError out of the computation ("another napari-smear run is writing to this
    folder", a Dask failure) is shown as a failure and Run is enabled again (superqt
    swallowed it as a deleted-object error and the dock stayed busy for good)."""
    from napari_smear import batch

    def locked(source, target, **options):
        raise RuntimeError(f"another napari-smear run is writing to {target}; wait for it to finish")

    monkeypatch.setattr(batch, "analyze_files", locked)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._models.value = []
    widget.run()
    wait_until_idle(qtbot, widget)
    assert widget.status.startswith("Failed: another napari-smear run is writing to")
    assert widget.errors and "another napari-smear run" in widget.errors[0]


def test_images_finished_before_a_cancel_can_be_shown_and_settings_hold_still(widget, qtbot, inputs, tmp_path,
                                                                                 monkeypatch):
    real = napari_smear.segment.segment_smear
    seen, calls = {}, []

    def second_is_slow(image, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real(image, **kwargs)
        run_until_cancelled(lambda step: kwargs["progress"](step / 1000, f"step {step}"), seen)

    monkeypatch.setattr(napari_smear.segment, "segment_smear", second_is_slow)
    widget._input.value = inputs
    widget._output.value = tmp_path / "out"
    widget._models.value = []
    widget.run()
    # what the run reads stays as it was at Run (its results list follows the folder it writes)
    assert not widget._input.enabled and not widget._output.enabled and not widget._models.enabled
    cancel_when(qtbot, widget, lambda: len(calls) == 2 and "step" in widget.status)
    assert widget._input.enabled and widget._output.enabled and widget._models.enabled
    assert not (tmp_path / "out" / "summary.csv").exists()  # the run did not reach its end
    assert widget._analysed.choices == ("a.png",) and widget._show_button.enabled
    widget.show_result("a.png")
    wait_until_idle(qtbot, widget)
    assert "a cells" in widget.test_viewer.layers and widget.errors == []


def test_a_differential_count_that_cannot_be_saved_is_said(make_napari_viewer, synthetic_field, monkeypatch, tmp_path):
    from widget_helpers import add_segmented_field

    from napari_smear._napari.widgets import counts as counts_module

    said = {"error": [], "info": []}
    monkeypatch.setattr("napari.utils.notifications.show_error", said["error"].append)
    monkeypatch.setattr("napari.utils.notifications.show_info", said["info"].append)
    viewer = make_napari_viewer()
    add_segmented_field(viewer, synthetic_field)
    _, dock = viewer.window.add_plugin_dock_widget("napari-smear", "Differential count")
    target = tmp_path / "gone" / "counts.csv"
    monkeypatch.setattr(counts_module.QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    dock._on_export_clicked()
    assert said["error"] and "was not saved" in said["error"][0] and not target.exists()
    target.parent.mkdir()
    dock._on_export_clicked()
    assert target.exists() and "saved to" in said["info"][0]
