"""npe2 reader and writer of napari-smear (functions directly, and through a viewer)."""
from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_smear._napari.layers import layer_orientation, segmentation_layers
from napari_smear._napari.reader import get_reader
from napari_smear._napari.writer import cells_csv_path, write_labels, write_layers_folder
from napari_smear.io import write_tiff_atomic
from napari_smear.segment.types import SmearSegmentation


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def _segmentation() -> SmearSegmentation:
    labels = np.zeros((40, 48), np.uint32)
    labels[2:12, 2:12] = 1
    labels[20:36, 20:40] = 2
    nuclei = np.zeros_like(labels)
    nuclei[24:30, 24:30] = 2
    table = pd.DataFrame(
        {
            "label": [1, 2],
            "cell_type": ["rbc", "wbc"],
            "centroid_y": [6.5, 27.5],
            "centroid_x": [6.5, 29.5],
            "bbox_min_y": [2, 20],
            "bbox_min_x": [2, 20],
            "bbox_max_y": [12, 36],
            "bbox_max_x": [12, 40],
            "area_px": [100, 320],
        }
    )
    return SmearSegmentation(labels, nuclei, table, rbc_diameter_px=10.5, pixel_size_um=None)


def test_get_reader_accepts_images_only(tmp_path):
    for name in ["a.tif", "a.TIFF", "a.ome.tif", "a.png", "a.jpg", "a.jpeg", "a.bmp"]:
        assert callable(get_reader(str(tmp_path / name))), name
    assert get_reader(str(tmp_path / "a.csv")) is None
    assert get_reader(str(tmp_path / "a.zarr")) is None
    assert get_reader([str(tmp_path / "a.png"), str(tmp_path / "b.csv")]) is None
    assert get_reader([]) is None
    folder = tmp_path / "dir.tif"
    folder.mkdir()
    assert get_reader(str(folder)) is None


def test_reader_layer_data_with_pixel_size(tmp_path, rgb):
    path = tmp_path / "field.ome.tif"
    write_tiff_atomic(path, rgb, pixel_size_um=0.25)
    jpg = tmp_path / "other.jpg"
    iio.imwrite(jpg, rgb, extension=".jpg")
    layers = get_reader([str(path), str(jpg)])([str(path), str(jpg)])
    assert len(layers) == 2
    data, kwargs, layer_type = layers[0]
    assert layer_type == "image"
    np.testing.assert_array_equal(data, rgb)
    assert kwargs["name"] == "field" and kwargs["rgb"] is True
    assert kwargs["scale"] == (0.25, 0.25)
    assert kwargs["metadata"] == {"path": str(path), "pixel_size_um": 0.25, "format": "tiff"}
    data, kwargs, _ = layers[1]
    assert kwargs["name"] == "other" and "scale" not in kwargs
    assert kwargs["metadata"]["pixel_size_um"] is None


def test_colour_planes_stored_first_open_as_a_colour_image(tmp_path, rgb):
    """An OME-TIFF whose channels come first (axes CYX, three of them) opens as the colour
    image the segmentation takes it for, not as three grey planes under a slider; a
    stack of planes (ZYX) stays a stack."""
    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(tmp_path / "cyx.ome.tif", planes, metadata={"axes": "CYX"}, ome=True)
    tifffile.imwrite(tmp_path / "zyx.tif", planes, metadata={"axes": "ZYX"}, imagej=True)
    (data, kwargs, _), = get_reader(str(tmp_path / "cyx.ome.tif"))(str(tmp_path / "cyx.ome.tif"))
    assert kwargs["rgb"] is True
    np.testing.assert_array_equal(data, rgb)
    (data, kwargs, _), = get_reader(str(tmp_path / "zyx.tif"))(str(tmp_path / "zyx.tif"))
    assert kwargs["rgb"] is False and data.shape == planes.shape


def test_reader_grayscale_16bit_stays_as_stored(tmp_path):
    data = (np.arange(40 * 50, dtype=np.uint16) % 4096).reshape(40, 50)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, data)
    (layer,) = get_reader(str(path))(str(path))
    np.testing.assert_array_equal(layer[0], data)
    assert layer[1]["rgb"] is False


def test_writer_and_reader_round_trip_functions(tmp_path):
    cells, nuclei = segmentation_layers(
        _segmentation(), image_layer_name="field", scale=(0.5, 0.5), translate=(0, 0)
    )
    data, kwargs, _ = cells
    meta = {**kwargs, "units": ("micrometer", "micrometer")}
    written = write_labels(str(tmp_path / "field_cells"), data, meta)
    assert written == [str(tmp_path / "field_cells.tif"), str(tmp_path / "field_cells_cells.csv")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field_cells.tif", "field_cells_cells.csv"]
    stored = tifffile.imread(written[0])
    assert stored.dtype == np.uint32
    np.testing.assert_array_equal(stored, data)
    table = pd.read_csv(written[1])
    assert list(table.columns[:3]) == ["index", "label", "cell_type"]

    (layer,) = get_reader(written[0])(written[0])
    data_back, kwargs_back, layer_type = layer
    assert layer_type == "labels"
    np.testing.assert_array_equal(data_back, data)
    assert kwargs_back["name"] == "field cells"
    assert kwargs_back["scale"] == pytest.approx((0.5, 0.5))
    assert kwargs_back["metadata"]["napari_smear"]["rbc_diameter_px"] == 10.5
    assert kwargs_back["metadata"]["napari_smear"]["kind"] == "cells"
    pd.testing.assert_frame_equal(kwargs_back["features"], kwargs["features"], check_dtype=False)
    assert type(kwargs_back["colormap"]).__name__ == "DirectLabelColormap"


def test_round_trip_keeps_placement_and_class_colours(tmp_path):
    """A crop's cells layer (translated) comes back where it was, coloured by class."""
    from napari_smear._napari.layers import class_palette

    cells, _ = segmentation_layers(_segmentation(), image_layer_name="crop", scale=(0.5, 0.5), translate=(5, 7))
    data, kwargs, _ = cells
    features = kwargs["features"].assign(**{"class": ["spherocyte", "neutrophil"]})
    palette = class_palette(["neutrophil", "spherocyte"])
    meta = {**kwargs, "features": features, "units": ("micrometer", "micrometer"),
            "metadata": {**kwargs["metadata"], "napari_smear": {
                **kwargs["metadata"]["napari_smear"], "class_colors": {k: list(v) for k, v in palette.items()}}}}
    (path, _) = write_labels(str(tmp_path / "crop_cells.tif"), data, meta)
    (layer,) = get_reader(path)(path)
    _, back, _ = layer
    assert back["translate"] == pytest.approx((5, 7)) and back["scale"] == pytest.approx((0.5, 0.5))
    assert "translate" not in back["metadata"]["napari_smear"]
    colormap = back["colormap"]
    np.testing.assert_allclose(colormap.map(1), palette["spherocyte"], atol=1e-6)
    np.testing.assert_allclose(colormap.map(2), palette["neutrophil"], atol=1e-6)
    assert "rotate" not in back  # not turned: nothing recorded


def test_round_trip_keeps_the_turn_of_a_turned_image(tmp_path):
    """Results of a turned or sheared image lie on it turned (viewer.md); saved and
    opened again they came back unturned, off the image."""
    import math

    cells, _ = segmentation_layers(_segmentation(), image_layer_name="turned", scale=(0.5, 0.5), translate=(5, 7))
    data, kwargs, _ = cells
    angle = math.radians(30)
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])
    meta = {**kwargs, "rotate": rotate, "shear": np.array([0.1]), "affine": affine}
    (path, _) = write_labels(str(tmp_path / "turned_cells.tif"), data, meta)
    (layer,) = get_reader(path)(path)
    _, back, _ = layer
    np.testing.assert_allclose(back["rotate"], rotate)
    np.testing.assert_allclose(back["shear"], [0.1])
    np.testing.assert_allclose(back["affine"], affine)
    assert not {"rotate", "shear", "affine"} & set(back["metadata"]["napari_smear"])


def test_writer_refuses_labels_that_are_not_one_field(tmp_path):
    with pytest.raises(ValueError, match="saves 2-D labels layers.*3 dimensions"):
        write_labels(str(tmp_path / "stack.tif"), np.zeros((3, 20, 20), np.uint32), {"name": "stack"})
    assert not list(tmp_path.iterdir())


def test_reader_non_square_pixels_and_damaged_files(tmp_path, rgb):
    path = tmp_path / "tall.tif"
    # 10 px per µm across, 5 px per µm down (resolution tags in px per cm)
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e5, 5e4), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="not square"):
        (layer,) = get_reader(str(path))(str(path))
    assert layer[1]["scale"] == pytest.approx((0.2, 0.1))
    from napari_smear.io import ImageReadError, read_image

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="the file is empty"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"this is no picture at all" * 10)
    with pytest.raises(ImageReadError, match="damaged or is not a PNG image") as caught:
        read_image(tmp_path / "junk.png")
    assert "pip install" not in str(caught.value)


def test_writer_without_features_writes_only_the_tiff(tmp_path):
    labels = np.zeros((20, 20), np.int32)
    labels[5:9, 5:9] = 3
    written = write_labels(str(tmp_path / "plain.tiff"), labels, {"name": "plain", "features": pd.DataFrame()})
    assert written == [str(tmp_path / "plain.tiff")]
    assert not cells_csv_path(tmp_path / "plain.tiff").exists()
    with pytest.raises(ValueError, match="non-negative"):
        write_labels(str(tmp_path / "neg.tif"), -labels, {})
    with pytest.raises(TypeError, match="integers"):
        write_labels(str(tmp_path / "float.tif"), labels.astype(float), {})


def test_a_table_left_beside_a_labels_file_is_not_attached_to_other_labels(tmp_path):
    # saved once with a cell table, then other labels without one over the same name:
    # reopened, the new labels must not wear the old cells' classes
    cells, _ = segmentation_layers(_segmentation(), image_layer_name="field")
    data, kwargs, _ = cells
    target = str(tmp_path / "x.tif")
    features = kwargs["features"].assign(**{"class": ["neutrophil"] + [""] * (len(kwargs["features"]) - 1)})
    write_labels(target, data, {**kwargs, "features": features})
    plain = np.zeros_like(data)
    plain[2:5, 2:5] = 1
    assert write_labels(target, plain, {"name": "mine", "features": pd.DataFrame()}) == [target]
    (layer,) = get_reader(target)(target)
    assert "features" not in layer[1] and cells_csv_path(target).exists()  # kept, not attached
    # the table's classes come back as the docks write them: "" for none, not NaN
    write_labels(target, data, {**kwargs, "features": features})
    (layer,) = get_reader(target)(target)
    assert layer[1]["features"]["class"].tolist() == features["class"].tolist()


@pytest.mark.gui
def test_viewer_open_and_save_through_the_plugin(make_napari_viewer, tmp_path, rgb):
    viewer = make_napari_viewer()
    path = tmp_path / "field.tif"
    write_tiff_atomic(path, rgb, pixel_size_um=0.2)
    (image,) = viewer.open(str(path), plugin="napari-smear")
    assert image.name == "field" and image.rgb
    np.testing.assert_allclose(image.scale, (0.2, 0.2))
    assert image.metadata["pixel_size_um"] == pytest.approx(0.2)

    for data, kwargs, layer_type in segmentation_layers(
        _segmentation(),
        image_layer_name="field",
        scale=image.scale,
        translate=image.translate,
        units=image.units,
    ):
        viewer.add_labels(data, **kwargs)
    cells = viewer.layers["field cells"]
    out = tmp_path / "saved.tif"
    viewer.layers.selection = {cells}
    written = viewer.layers.save(str(out), selected=True, plugin="napari-smear")
    assert [str(p) for p in written] == [str(out), str(tmp_path / "saved_cells.csv")]

    (reopened,) = viewer.open(str(out), plugin="napari-smear")
    assert reopened.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(reopened.data, cells.data)
    np.testing.assert_allclose(reopened.scale, image.scale)
    assert list(reopened.features.columns) == list(cells.features.columns)
    assert reopened.metadata["napari_smear"]["rbc_diameter_px"] == 10.5


def test_saving_cells_nuclei_and_image_together_writes_one_folder(make_napari_viewer, tmp_path, rgb):
    viewer = make_napari_viewer()
    path = tmp_path / "field.tif"
    write_tiff_atomic(path, rgb, pixel_size_um=0.2)
    (image,) = viewer.open(str(path), plugin="napari-smear")
    image.translate, image.rotate = (3.0, 4.0), 30  # a placed, turned field: all come back on it
    for data, kwargs, layer_type in segmentation_layers(
        _segmentation(), image_layer_name="field", scale=image.scale, translate=image.translate, units=image.units,
        orientation=layer_orientation(image),
    ):
        viewer.add_labels(data, **kwargs)
    cells, nuclei = viewer.layers["field cells"], viewer.layers["field nuclei"]
    # the cells and nuclei of one segmentation, selected together: napari writes no labels TIFF itself
    viewer.layers.selection = {cells, nuclei}
    folder = tmp_path / "saved"
    written = viewer.layers.save(str(folder), selected=True)
    assert len(nuclei.features)  # the nuclei layer carries its cells' table too
    assert sorted(Path(p).name for p in written) == [
        "field cells.tif", "field cells_cells.csv", "field nuclei.tif", "field nuclei_cells.csv",
    ]
    # everything (image included) into another folder; each file opens as its layer again
    everything = tmp_path / "all"
    viewer.layers.save(str(everything))
    assert sorted(p.name for p in everything.iterdir()) == [
        "field cells.tif", "field cells_cells.csv", "field nuclei.tif", "field nuclei_cells.csv", "field.tif",
    ]
    for name, original in (("field", image), ("field cells", cells), ("field nuclei", nuclei)):
        (reopened,) = viewer.open(str(everything / f"{name}.tif"), plugin="napari-smear")
        assert type(reopened) is type(original)
        np.testing.assert_array_equal(reopened.data, original.data)
        np.testing.assert_allclose(reopened.scale, original.scale)
        np.testing.assert_allclose(reopened.translate, original.translate)
        np.testing.assert_allclose(reopened.rotate, original.rotate)
        # the same pixel lands at the same place in the world
        np.testing.assert_allclose(reopened.data_to_world((5, 6)), original.data_to_world((5, 6)), atol=1e-6)
    assert list(viewer.layers[-2].features.columns) == list(cells.features.columns)


def test_layers_folder_writer_names_and_refusals(tmp_path):
    labels = np.arange(12, dtype=np.uint32).reshape(3, 4)
    layers = [(labels, {"name": "a/b: cells"}, "labels"), (labels, {"name": "A/B: CELLS"}, "labels"),
              (labels, {"name": ""}, "labels")]
    written = write_layers_folder(str(tmp_path / "out.tif"), layers)  # a .tif ending names the folder
    assert [Path(p).name for p in written] == ["a_b_ cells.tif", "A_B_ CELLS-2.tif", "labels.tif"]
    assert all(Path(p).parent == tmp_path / "out" for p in written)
    np.testing.assert_array_equal(tifffile.imread(written[1]), labels)
    with pytest.raises(ValueError, match="labels and image layers"):
        write_layers_folder(str(tmp_path / "x"), [(labels, {"name": "c"}, "labels"), (np.zeros((2, 2)), {}, "points")])
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(FileExistsError, match="folder"):
        write_layers_folder(str(tmp_path / "a_file"), layers)
    assert (tmp_path / "a_file").read_text() == "keep me"
    with pytest.raises(ValueError, match="2-D image"):
        write_layers_folder(str(tmp_path / "y"), [(labels, {"name": "c"}, "labels"),
                                                  (np.zeros((2, 3, 4, 5)), {"name": "stack"}, "image")])


def test_bccd_sample_layer_data(monkeypatch):
    from napari_smear._napari import sample_data

    path = Path(__file__).parents[2].parent / "shared" / "data" / "bccd" / "images" / "BloodImage_00000.jpg"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} not found")
        pytest.skip(f"{path} not found (../shared/data beside the repository)")
    monkeypatch.setattr(sample_data, "fetch_bccd_sample", lambda name="BloodImage_00000": path)
    ((data, kwargs, layer_type),) = sample_data.bccd_sample()
    assert layer_type == "image" and data.shape == (480, 640, 3) and kwargs["rgb"]
    assert kwargs["name"] == "BloodImage_00000"


def test_bccd_sample_offline_raises_a_clear_error(monkeypatch):
    from napari_smear._napari import sample_data

    def offline(name="BloodImage_00000"):
        raise RuntimeError("could not download the BCCD sample (no network?)")

    monkeypatch.setattr(sample_data, "fetch_bccd_sample", offline)
    with pytest.raises(RuntimeError, match="no network"):
        sample_data.bccd_sample()


def test_round_trip_keeps_pixel_units_of_a_pixel_layer(tmp_path):
    """A cells layer over an uncalibrated image (scale 1, pixel units) that records a
    typed pixel size comes back in pixels, like its image, not in µm."""
    cells, _ = segmentation_layers(_segmentation(), image_layer_name="jpeg", scale=(1, 1), translate=(0, 0),
                                   units=("pixel", "pixel"))
    data, kwargs, _ = cells
    meta = {**kwargs, "metadata": {**kwargs["metadata"], "pixel_size_um": 0.1}}
    (path, _) = write_labels(str(tmp_path / "c.tif"), data, meta)
    (layer,) = get_reader(path)(path)
    assert layer[1]["scale"] == pytest.approx((1, 1)) and layer[1]["units"] == ("pixel", "pixel")


def test_segment_cli_outputs_open_as_placed_labels_with_their_table(tmp_path, synthetic_field):
    """`napari-smear segment` writes its TIFFs as analyze does (compressed, pixel size,
    metadata), and the reader attaches <stem>_cells.csv to <stem>_labels.tif."""
    from napari_smear.cli import main

    image, _ = synthetic_field
    write_tiff_atomic(tmp_path / "field.tif", image, pixel_size_um=0.2)
    assert main(["segment", str(tmp_path / "field.tif"), "--out", str(tmp_path / "out")]) == 0
    labels_path = tmp_path / "out" / "field_labels.tif"
    with tifffile.TiffFile(labels_path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    (cells,) = get_reader(str(labels_path))(str(labels_path))
    data, kwargs, layer_type = cells
    assert layer_type == "labels" and kwargs["name"] == "field cells"
    assert kwargs["scale"] == pytest.approx((0.2, 0.2))
    assert kwargs["metadata"]["napari_smear"]["kind"] == "cells"
    table = pd.read_csv(tmp_path / "out" / "field_cells.csv")
    assert set(kwargs["features"]["index"]) == set(table.label) == set(np.unique(data)) - {0}
    assert type(kwargs["colormap"]).__name__ == "DirectLabelColormap"
    nuclei_path = str(tmp_path / "out" / "field_nuclei.tif")
    ((_, nuclei_kwargs, nuclei_type),) = get_reader(nuclei_path)(nuclei_path)
    assert nuclei_type == "labels" and nuclei_kwargs["name"] == "field nuclei"
    # a nucleus carries its cell's id: hovering it shows the cell's row, as in the widgets' layers
    assert nuclei_kwargs["features"]["index"].tolist() == kwargs["features"]["index"].tolist()
    assert type(nuclei_kwargs["colormap"]).__name__ == "DirectLabelColormap"


def test_batch_attention_file_opens_as_one_layer_per_model(tmp_path, synthetic_field):
    """<image>_attention.tif holds a plane per model: it opens as the attention layers
    Show in viewer adds (it opened as one grey stack)."""
    from conftest import tiny_model_file

    from napari_smear.batch import analyze_files

    image, _ = synthetic_field
    (tmp_path / "in").mkdir()
    write_tiff_atomic(tmp_path / "in" / "field.tif", image, pixel_size_um=0.2)
    models = [tiny_model_file(tmp_path / "rbc-a.safetensors", ["normal", "odd"], cell_types=["rbc"]),
              tiny_model_file(tmp_path / "wbc-b.safetensors", cell_types=["wbc"])]
    analyze_files(tmp_path / "in", tmp_path / "out", models=models, device="cpu")
    path = str(tmp_path / "out" / "field_attention.tif")
    with tifffile.TiffFile(path) as tif:
        stack = tif.asarray()
    layers = get_reader(path)(path)
    assert len(layers) == 2 == len(stack)
    for (data, kwargs, layer_type), plane in zip(layers, stack):
        assert layer_type == "image" and kwargs["name"].startswith("field attention (")
        np.testing.assert_array_equal(data, plane)
        assert kwargs["scale"] == pytest.approx((0.2, 0.2)) and kwargs["contrast_limits"] == (0.0, 1.0)
    assert layers[0][1]["name"] != layers[1][1]["name"]


def test_pyramidal_ome_tiff_opens_as_a_multiscale_layer(tmp_path, synthetic_field):
    """A scanner's pyramid: napari gets every level (multiscale), the pixel size on the
    full level; read_image still gives the full level alone."""
    from napari_smear.io import read_image, read_pyramid_levels

    image, _ = synthetic_field
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        options = {"tile": (64, 64), "photometric": "rgb"}
        tif.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    (layer,) = get_reader(str(path))(str(path))
    data, kwargs, layer_type = layer
    assert layer_type == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert [level.shape for level in data] == [image.shape, image[::2, ::2].shape, image[::4, ::4].shape]
    np.testing.assert_array_equal(data[0], image)
    assert kwargs["scale"] == pytest.approx((0.25, 0.25))
    full, meta = read_image(path)
    np.testing.assert_array_equal(full, image)
    assert len(read_pyramid_levels(path)) == 2 and read_pyramid_levels(tmp_path / "none.png") == []
    # a plain TIFF stays one array
    write_tiff_atomic(tmp_path / "plain.tif", image)
    ((plain, plain_kwargs, _),) = get_reader(str(tmp_path / "plain.tif"))(str(tmp_path / "plain.tif"))
    assert isinstance(plain, np.ndarray) and "multiscale" not in plain_kwargs


def test_pixel_size_of_a_layer_from_its_file_or_its_scale_in_a_length_unit():
    """A developer who gives the image layer a scale in µm (the obvious place) gets it
    used as the pixel size by the docks; napari's default unit, the pixel, says nothing."""
    from napari.layers import Image

    from napari_smear._napari.layers import layer_pixel_size_um

    image = np.zeros((8, 8, 3), np.uint8)
    assert layer_pixel_size_um(Image(image, rgb=True)) is None
    assert layer_pixel_size_um(Image(image, rgb=True, scale=(0.1, 0.1))) is None  # pixels
    assert layer_pixel_size_um(Image(image, rgb=True, scale=(0.1, 0.1), units="um")) == pytest.approx(0.1)
    assert layer_pixel_size_um(Image(image, rgb=True, scale=(100, 100), units="nm")) == pytest.approx(0.1)
    assert layer_pixel_size_um(Image(image, rgb=True, scale=(0.1, 0.2), units="um")) is None  # not square
    recorded = Image(image, rgb=True, scale=(0.5, 0.5), units="um", metadata={"pixel_size_um": 0.25})
    assert layer_pixel_size_um(recorded) == pytest.approx(0.25)  # the file's calibration first
