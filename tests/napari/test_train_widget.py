"""The "Train classifier" widget: fine-tune from the cells of the image, train from a folder, cancel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model_file
from widget_helpers import (
    add_segmented_field,
    cancel_when,
    run_until_cancelled,
    shown_errors,
    single_cell_folder,
    wait_until_idle,
)

import napari_smear.training
from napari_smear._napari.widgets import train as train_module
from napari_smear._napari.widgets import user_models
from napari_smear.models import read_metadata

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh_user_models", "one_torch_thread")]


@pytest.fixture
def setup(make_napari_viewer, synthetic_field, monkeypatch):
    errors = shown_errors(monkeypatch)
    viewer = make_napari_viewer()
    image, cells, nuclei = add_segmented_field(viewer, synthetic_field)
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Train classifier")
    assert isinstance(widget, train_module.TrainWidget)
    return viewer, widget, errors


def test_fine_tune_on_the_cells_of_the_image(setup, qtbot, tmp_path):
    viewer, widget, errors = setup
    base = user_models.add(tiny_model_file(tmp_path / "base.safetensors"))
    # The user sets classes on cells: here every red cell and platelet, by typing into
    # the 'class' column of the features table (what its editor does to layer.features).
    cells = viewer.layers["synthetic smear cells"]
    features = cells.features
    features["class"] = features["cell_type"].map({"rbc": "normal", "platelet": "platelet", "wbc": ""})
    widget._source.value = train_module.FROM_VIEWER
    assert widget._cells_combo.value.name == "synthetic smear cells"
    widget._start_from.value = str(base)
    assert widget._kind.native.isHidden() and widget._lr.value == pytest.approx(train_module.LR_FINE_TUNE)
    widget._epochs.value = 2
    widget._batch_size.value = 16
    widget._device.value = "cpu"
    output = tmp_path / "models" / "mine.safetensors"
    widget._output.value = output
    _, classify = viewer.window.add_plugin_dock_widget("napari-smear", "Classify cells")

    widget._run_button.native.click()
    assert widget.is_running
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    assert widget.status.startswith("Saved mine.safetensors: best epoch"), widget.status
    assert "Too few held-out cells to choose a prior correction" in widget.status  # about a dozen held out
    assert [r["epoch"] for r in widget.history] == [1, 2]
    assert all(0 <= r["val_accuracy"] <= 1 for r in widget.history)
    assert len(widget.figure.axes[0].lines[0].get_xdata()) == 2
    metadata = read_metadata(output)
    assert metadata["class_names"] == ["normal", "platelet"]
    assert metadata["cell_types"] == ["rbc", "platelet"]  # the types of the labelled cells
    assert metadata["input_size"] == 32 and metadata["training_data"]["n_train"] + metadata["training_data"]["n_val"] == 79
    assert any("fine-tuned from base.safetensors" in note for note in metadata["training_data"]["notes"])
    assert "\nNote: fine-tuned from base.safetensors" in widget.status  # what the command line prints too
    assert (tmp_path / "models" / "mine_training.png").is_file()
    assert not (tmp_path / "models" / "mine.ckpt").exists()
    # The new model is offered by Classify cells.
    assert user_models.paths[0] == output.resolve()
    assert str(output.resolve()) in classify._models.choices


def test_train_a_new_model_from_a_folder(setup, qtbot, tmp_path, synthetic_field):
    viewer, widget, errors = setup
    folder = single_cell_folder(tmp_path / "cells", synthetic_field, per_class=3)
    widget._source.value = train_module.FROM_FOLDER
    assert not widget._folder.native.isHidden() and widget._cells_combo.native.isHidden()
    widget._start_from.value = None
    widget._kind.value = "plain"
    widget._crop_size.value = 32
    widget._epochs.value = 1
    widget._batch_size.value = 4
    widget._cell_types.value = ["rbc", "platelet"]
    widget._folder.value = folder
    widget._output.value = tmp_path / "folder-model"  # the suffix is added
    widget.run()
    wait_until_idle(qtbot, widget)
    assert errors == [], errors
    metadata = read_metadata(tmp_path / "folder-model.safetensors")
    assert metadata["kind"] == "plain" and metadata["input_size"] == 32
    assert metadata["class_names"] == ["platelet", "rbc"] and metadata["cell_types"] == ["rbc", "platelet"]
    assert len(widget.history) == 1
    assert "It classifies red cells and platelets and is now offered in Classify cells." in widget.status
    # the validation plot sits under the run controls, above the empty space, not below it
    layout = widget.form.layout()
    rows = [layout.itemAt(i) for i in range(layout.count())]
    assert rows[-1].spacerItem() is not None and rows[-2].widget() is widget._canvas

    # a file of that name that is not a model is never replaced (the command line refused it; the dock did not)
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("mine")
    widget._output.value = not_a_model
    widget.run()
    wait_until_idle(qtbot, widget)
    assert not_a_model.read_text() == "mine"
    assert "refusing to overwrite it with the trained model" in widget.status


def test_bad_settings_are_explained_and_painted_classes(setup, tmp_path):
    viewer, widget, errors = setup
    widget._source.value = train_module.FROM_VIEWER
    widget.run()
    assert "choose where to save the model" in widget.status and not widget.is_running
    widget._output.value = tmp_path / "m.safetensors"
    widget.run()
    assert "features have no 'class' column" in widget.status
    features = viewer.layers["synthetic smear cells"].features
    features["class"] = ""
    widget.run()
    assert "no wbc/rbc/platelet cell has a class yet" in widget.status
    features["class"] = np.where(features["cell_type"] == "rbc", "normal", "")
    widget.run()
    assert "at least two classes" in widget.status
    features.loc[features.index[features["cell_type"] == "wbc"][0], "class"] = "lymphocyte"
    widget.run()
    assert "at least two labelled cells" in widget.status and "'lymphocyte': 1" in widget.status
    widget._cell_types.value = []
    widget.run()
    assert "choose the cell types" in widget.status
    assert errors == [] and not widget.is_running

    # Classes painted over the cells in a labels layer (values named by its features).
    cells = viewer.layers["synthetic smear cells"]
    features = cells.features
    rbc = features.loc[features["cell_type"] == "rbc", "index"].to_numpy()[:4]
    platelets = features.loc[features["cell_type"] == "platelet", "index"].to_numpy()[:3]
    painted = np.zeros(cells.data.shape, np.uint8)
    for label in rbc:  # a stroke over part of each cell is enough
        ys, xs = np.nonzero(cells.data == label)
        painted[ys[: len(ys) // 2], xs[: len(xs) // 2]] = 1
    for label in platelets:
        painted[cells.data == label] = 2
    painted[cells.data == rbc[0]] = 2  # one red cell mostly repainted: the majority wins
    painted[np.nonzero(cells.data == rbc[0])[0][0], np.nonzero(cells.data == rbc[0])[1][0]] = 1
    layer = viewer.add_labels(
        painted, name="my classes",
        features=pd.DataFrame({"index": [1, 2], "class": ["normal", "platelet"]}),
    )
    classes = train_module.cell_classes_from_painting(cells.data, layer.data, {1: "normal", 2: "platelet"})
    assert classes == {**{int(i): "normal" for i in rbc[1:]}, int(rbc[0]): "platelet", **{int(i): "platelet" for i in platelets}}

    widget.reset_choices()
    widget._source.value = train_module.FROM_VIEWER
    widget._classes_from.value = layer
    assert widget._column.native.isHidden()
    widget._start_from.value = None
    widget._crop_size.value = 32
    widget._cell_types.value = list(train_module.CELL_TYPES)
    job = widget._prepare()
    cells_job = job["cells"]  # cropped by the background job; here directly
    crop_set = train_module.crop_set_from_cells(
        cells_job["image"], cells_job["segmentation"], cells_job["classes"],
        crop_diameters=cells_job["crop_diameters"], output_size=cells_job["output_size"],
    )
    assert crop_set.class_names == ["normal", "platelet"] and len(crop_set) == 7
    assert crop_set.class_counts() == {"normal": 3, "platelet": 4}
    assert crop_set.images.shape == (7, 32, 32, 3) and crop_set.masks[:, 0].any(axis=(1, 2)).all()
    assert job["cell_types"] == ["rbc", "platelet"]

    # Choosing a model to fine-tune selects the cell types it is for.
    wbc_model = user_models.add(tiny_model_file(tmp_path / "wbc.safetensors", cell_types=["wbc", "platelet"]))
    widget._start_from.value = str(wbc_model)
    assert widget._cell_types.value == ["wbc", "platelet"]


def test_cancel_stops_training(setup, qtbot, monkeypatch, tmp_path):
    viewer, widget, errors = setup
    features = viewer.layers["synthetic smear cells"].features
    features["class"] = features["cell_type"]
    seen: dict[str, object] = {}

    def slow_train(data, *, on_epoch=None, epochs=1, output=None, **kwargs):
        def epoch(step):
            # as train() saves each better epoch: beside the output until training ends
            napari_smear.training.partial_model_path(output).write_bytes(b"best epoch so far")
            on_epoch({"epoch": step + 1, "train_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.4})

        run_until_cancelled(epoch, seen, steps=999, pause_s=0.02)

    monkeypatch.setattr(napari_smear.training, "train", slow_train)
    # a model trained earlier under the same name, still offered by Classify cells
    earlier = tiny_model_file(tmp_path / "mine.safetensors", cell_types=["rbc"])
    before = earlier.read_bytes()
    widget._start_from.value = None
    widget._crop_size.value = 32
    widget._epochs.value = 500
    widget._output.value = earlier
    widget.run()
    cancel_when(qtbot, widget, lambda: len(widget.history) >= 2)
    assert type(seen["raised"]).__name__ == "Cancelled"
    assert widget.status == "Cancelled." and errors == []
    assert user_models.paths == ()
    # the cancelled run left the earlier model as it was, and nothing of its own
    assert earlier.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors"]


def test_cancel_stops_the_cropping_of_a_folder(setup, qtbot, monkeypatch, tmp_path):
    """Cropping a large folder comes before the first epoch: it is reported image by image
    and Cancel stops it there (it waited for the whole folder)."""
    viewer, widget, errors = setup
    seen: dict[str, object] = {}
    statuses = []

    def slow_cropping(data, *, on_crop=None, **kwargs):
        run_until_cancelled(lambda k: on_crop(k + 1, 5000), seen, steps=5000, pause_s=0.02)

    monkeypatch.setattr(napari_smear.training, "train", slow_cropping)
    folder = tmp_path / "cells"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    widget._source.value = train_module.FROM_FOLDER
    widget._folder.value = folder
    widget._start_from.value = None
    widget._output.value = tmp_path / "m.safetensors"
    widget.run()
    cancel_when(qtbot, widget, lambda: statuses.append(widget.status) or "of 5000" in widget.status)
    assert type(seen["raised"]).__name__ == "Cancelled"
    assert any(status.startswith("Cropping the folder's images: ") for status in statuses)
    assert widget.status == "Cancelled." and errors == []


def test_another_images_cells_are_refused(setup, tmp_path):
    """Two fields of the same size: training on one's pixels with the other's cells and
    classes is refused, and choosing an image picks its own cells layer."""
    viewer, widget, errors = setup
    cells = viewer.layers["synthetic smear cells"]
    cells.features["class"] = np.where(cells.features["cell_type"] == "rbc", "normal", "odd")
    other = viewer.add_image(np.zeros(viewer.layers["synthetic smear"].data.shape, np.uint8), name="other", rgb=True)
    widget._source.value = train_module.FROM_VIEWER
    widget._output.value = tmp_path / "m.safetensors"
    widget._image_combo.value = other
    widget._cells_combo.value = cells
    widget.run()
    assert "was made from image 'synthetic smear', not 'other'" in widget.status and not widget.is_running
    widget._image_combo.value = viewer.layers["synthetic smear"]
    assert widget._cells_combo.value is cells
    assert errors == []


@pytest.mark.parametrize(("active", "offered"), [("synthetic smear cells", "synthetic smear"), ("later", "later")])
def test_the_image_with_cells_is_offered_first(make_napari_viewer, synthetic_field, active, offered):
    """Not whichever image is first in the layer list: the selected image, else the
    last one that was segmented."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40), np.uint8), name="gray")
    add_segmented_field(viewer, synthetic_field)
    viewer.add_image(np.zeros((40, 40), np.uint8), name="later")
    viewer.layers.selection.active = viewer.layers[active]
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", "Train classifier")
    assert widget._image_combo.value.name == offered
    if offered == "synthetic smear":
        assert widget._cells_combo.value.name == "synthetic smear cells"


def test_a_model_no_better_than_guessing_is_flagged():
    from napari_smear.training import weak_model_caution as caution

    assert caution({"n": 200, "accuracy": 0.9, "macro_f1": 0.88}, 4) == ""
    assert "close to guessing among 2 classes" in caution({"n": 200, "accuracy": 0.5, "macro_f1": 0.333}, 2)
    few = caution({"n": 4, "accuracy": 1.0, "macro_f1": 1.0}, 2)
    assert "validated on only 4 cells" in few and "guessing" not in few


def test_the_status_says_the_validation_looked_at_each_cell_once():
    # a model fine-tuned from wbc-pbc8 answers in 8 turned views; training scored one
    from types import SimpleNamespace

    views = lambda n: SimpleNamespace(info=SimpleNamespace(metadata={"test_time_views": n}))  # noqa: E731
    assert train_module._views_text(views(8)) == " (one view per cell; the model answers with 8 turned views)"
    assert train_module._views_text(views(1)) == ""
