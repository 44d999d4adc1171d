"""Slides larger than memory: segmentation through memory-mapped files.

`open_image_on_disk` maps a TIFF (or decodes a compressed one into a scratch file),
`segment_smear(out=...)` writes into memory-mapped label images, and
`segment_files(on_disk=...)` / `napari-smear segment --on-disk` put them together.
Each must give exactly what the in-memory path gives.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

import napari_smear.segment as segment_module
from napari_smear import segment_smear
from napari_smear.io import ImageReadError, open_image_on_disk, read_image
from napari_smear.samples import eyepiece_photo, synthetic_smear


@pytest.fixture(scope="module")
def field():
    # two fields side by side: 480 x 1280, tiled below when the single-pass limit is lowered
    left = synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=1)[0]
    right = synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=2)[0]
    return np.concatenate([left, right], axis=1)


def _maps(directory, shape):
    return (np.memmap(directory / "labels.u32", np.uint32, "w+", shape=shape),
            np.memmap(directory / "nuclei.u32", np.uint32, "w+", shape=shape))


def test_open_image_on_disk_maps_an_uncompressed_tiff_in_place(field, tmp_path):
    tifffile.imwrite(tmp_path / "slide.tif", field, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    image, meta = open_image_on_disk(tmp_path / "slide.tif", tmp_path / "unused")
    assert isinstance(image, np.memmap) and not image.flags.writeable
    assert meta["scratch_file"] is None and meta["pixel_size_um"] == pytest.approx(0.25)
    np.testing.assert_array_equal(image, field)


def test_open_image_on_disk_decodes_a_compressed_tiff_into_the_scratch_folder(field, tmp_path):
    tifffile.imwrite(tmp_path / "slide.tif", field, tile=(128, 128), compression="zlib")
    image, meta = open_image_on_disk(tmp_path / "slide.tif", tmp_path)
    assert isinstance(image, np.memmap)
    assert meta["scratch_file"] is not None and meta["scratch_file"].startswith(str(tmp_path))
    np.testing.assert_array_equal(image, field)


def test_open_image_on_disk_refuses_what_it_cannot_map(field, tmp_path):
    tifffile.imwrite(tmp_path / "gray.tif", field[..., 0])
    with pytest.raises(ValueError, match="8-bit RGB image with the colour last"):
        open_image_on_disk(tmp_path / "gray.tif")
    tifffile.imwrite(tmp_path / "wide.tif", field.astype(np.uint16))
    with pytest.raises(ValueError, match="dtype uint16"):
        open_image_on_disk(tmp_path / "wide.tif")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(ImageReadError, match="broken.tif"):
        open_image_on_disk(tmp_path / "broken.tif")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="only TIFF files"):
        open_image_on_disk(tmp_path / "photo.png")
    with pytest.raises(FileNotFoundError):
        open_image_on_disk(tmp_path / "missing.tif")


def test_segment_smear_into_memory_maps_equals_in_memory(field, tmp_path, monkeypatch):
    # the tiled path, as for a slide: lower the single-pass limit and the tile size
    monkeypatch.setattr(segment_module, "_SINGLE_PASS_MAX_PIXELS", 100_000)
    expected = segment_smear(field, tile_size=128, n_workers=1)
    tifffile.imwrite(tmp_path / "slide.tif", field)
    image, _ = open_image_on_disk(tmp_path / "slide.tif")
    labels, nuclei = _maps(tmp_path, field.shape[:2])
    labels[:] = 7  # stale content is cleared
    seg = segment_smear(image, tile_size=128, n_workers=1, out=(labels, nuclei))
    assert seg.labels is labels and seg.nuclei is nuclei
    np.testing.assert_array_equal(seg.labels, expected.labels)
    np.testing.assert_array_equal(seg.nuclei, expected.nuclei)
    pd.testing.assert_frame_equal(seg.table, expected.table)
    assert expected.n_cells > 20


def test_segment_smear_out_is_checked(field, tmp_path):
    shape = field.shape[:2]
    with pytest.raises(ValueError, match="uint32"):
        segment_smear(field, out=(np.zeros(shape, np.int32), np.zeros(shape, np.uint32)))
    with pytest.raises(ValueError, match="480 x 1280"):
        segment_smear(field, out=(np.zeros((10, 10), np.uint32), np.zeros(shape, np.uint32)))
    with pytest.raises(TypeError, match="pair"):
        segment_smear(field, out=np.zeros(shape, np.uint32))
    same = np.zeros(shape, np.uint32)
    with pytest.raises(ValueError, match="two separate arrays"):
        segment_smear(field, out=(same, same))
    read_only = np.zeros(shape, np.uint32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        segment_smear(field, out=(read_only, np.zeros(shape, np.uint32)))


def test_an_eyepiece_frame_is_painted_into_a_file_not_memory(tmp_path):
    from napari_smear.segment import fill_outside_view, find_outside_view

    photo, _ = eyepiece_photo(synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=3)[0], fade=0.015)
    tifffile.imwrite(tmp_path / "photo.tif", photo)
    mapped, _ = open_image_on_disk(tmp_path / "photo.tif")
    outside = find_outside_view(mapped)
    assert outside is not None
    filled = fill_outside_view(mapped, outside)
    assert isinstance(filled, np.memmap) and filled.flags.writeable
    np.testing.assert_array_equal(filled, fill_outside_view(photo, outside))
    np.testing.assert_array_equal(mapped, photo)  # the slide itself is untouched


def test_segment_files_on_disk_writes_what_the_in_memory_path_writes(field, tmp_path):
    from napari_smear.batch import segment_files

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", field, tile=(128, 128), compression="zlib")
    reports = []
    disk = segment_files([tmp_path / "in"], tmp_path / "disk", on_disk=True,
                         image_progress=lambda fraction, message: reports.append((fraction, message)))
    assert reports and all(0 <= f <= 1 for f, _ in reports)  # the CLI's bar follows these
    assert any("red-cell size" in message for _, message in reports)
    memory = segment_files([tmp_path / "in"], tmp_path / "memory", on_disk=False)
    assert disk.on_disk.tolist() == [True] and memory.on_disk.tolist() == [False]
    assert disk.error.tolist() == [""]
    for kind in ("labels", "nuclei"):
        a, meta_a = read_image(tmp_path / "disk" / f"slide_{kind}.tif", rgb=False)
        b, meta_b = read_image(tmp_path / "memory" / f"slide_{kind}.tif", rgb=False)
        np.testing.assert_array_equal(a, b)
        assert meta_a["napari_smear"] == meta_b["napari_smear"]
        assert tifffile.TiffFile(tmp_path / "disk" / f"slide_{kind}.tif").pages[0].is_tiled
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "disk" / "slide_cells.csv"),
                                  pd.read_csv(tmp_path / "memory" / "slide_cells.csv"))
    assert not list((tmp_path / "disk").glob(".scratch-*"))  # the scratch folder is gone


def test_a_tiff_too_large_for_the_memory_left_goes_through_disk(field, tmp_path, monkeypatch):
    import napari_smear.batch as batch

    tifffile.imwrite(tmp_path / "slide.tif", field)
    from PIL import Image

    Image.fromarray(field).save(tmp_path / "photo.png")
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: 100 * 2**30)
    assert not batch._segment_on_disk(tmp_path / "slide.tif", None)
    assert batch._segment_on_disk(tmp_path / "slide.tif", True)
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: field.size)  # a third of 11 bytes a pixel
    assert batch._segment_on_disk(tmp_path / "slide.tif", None)
    assert not batch._segment_on_disk(tmp_path / "slide.tif", False)
    assert not batch._segment_on_disk(tmp_path / "photo.png", True)  # only TIFFs can be mapped
    # a layout that cannot be mapped is read in memory as before, unless asked for (then a clear error)
    tifffile.imwrite(tmp_path / "wide.tif", field.astype(np.uint16) * 257)
    assert not batch._segment_on_disk(tmp_path / "wide.tif", None)
    summary = batch.segment_files([tmp_path / "wide.tif"], tmp_path / "out", on_disk=True)
    assert "8-bit RGB" in summary.error[0]


def test_cli_segment_on_disk(field, tmp_path, capsys):
    from napari_smear.cli import main

    tifffile.imwrite(tmp_path / "slide.tif", field)
    assert main(["segment", str(tmp_path / "slide.tif"), "--out", str(tmp_path / "out"), "--on-disk"]) == 0
    assert "segmented through files on disk" in capsys.readouterr().out
    assert (tmp_path / "out" / "slide_labels.tif").exists()
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path / "slide.tif"), "--out", str(tmp_path / "out"), "--on-disk", "--in-memory"])
