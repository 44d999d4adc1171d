"""Tests of napari_smear.io: reading, the RGB input checker, atomic writes."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
from conftest import require_shared_data
import tifffile

from napari_smear.io import (
    ImageReadError,
    as_rgb_uint8,
    atomic_write,
    file_stem,
    read_image,
    write_csv_atomic,
    write_png_atomic,
    write_tiff_atomic,
)

def _shared(relative: str) -> Path:
    path = require_shared_data() / relative
    if not path.exists():
        pytest.fail(f"expected real data file missing: {path}")
    return path


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)


# ------------------------------------------------------------------ as_rgb_uint8


def test_rgb_uint8_is_kept(rgb):
    out = as_rgb_uint8(rgb)
    assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.c_contiguous


def test_grayscale_is_replicated(rgb):
    gray = rgb[..., 0]
    out = as_rgb_uint8(gray)
    assert out.shape == (32, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_rgba_is_composited_onto_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:10, :, 3] = 255  # opaque
    rgba[10:15, :, 3] = 0  # transparent -> white
    rgba[15:, :, 3] = 128  # half
    out = as_rgb_uint8(rgba)
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[0, 0], (200, 100, 50))
    np.testing.assert_array_equal(out[12, 0], (255, 255, 255))
    alpha = 128 / 255
    expected = np.round(np.array([200, 100, 50]) * alpha + 255 * (1 - alpha))
    np.testing.assert_allclose(out[17, 0], expected, atol=1)


def test_gray_alpha_is_composited_and_replicated():
    gray_alpha = np.zeros((20, 20, 2), np.uint8)
    gray_alpha[..., 0] = 100
    gray_alpha[:10, :, 1] = 255
    out = as_rgb_uint8(gray_alpha)
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[0, 0], (100, 100, 100))
    np.testing.assert_array_equal(out[15, 0], (255, 255, 255))


def test_16bit_full_range_is_scaled():
    image = np.zeros((20, 20, 3), np.uint16)
    image[0, 0] = (65535, 32768, 0)
    out = as_rgb_uint8(image)
    np.testing.assert_array_equal(out[0, 0], (255, 128, 0))
    np.testing.assert_array_equal(out[5, 5], (0, 0, 0))


def test_12bit_data_in_16bit_container_uses_its_actual_range():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4096, (24, 24, 3), dtype=np.uint16)
    image[0, 0, 0] = 4095
    out = as_rgb_uint8(image)
    assert out.max() == 255  # not 4095/65535*255 = 16: the image would be black
    expected = np.round(image.astype(float) / 4095 * 255)
    np.testing.assert_allclose(out, expected, atol=1)


def test_float_unit_range_and_any_range():
    unit = np.linspace(0, 1, 20 * 20 * 3).reshape(20, 20, 3)
    out = as_rgb_uint8(unit)
    assert out[0, 0, 0] == 0 and out[-1, -1, -1] == 255
    wide = unit * 4000.0 - 1000.0  # negative values -> shifted to 0
    out_wide = as_rgb_uint8(wide)
    assert out_wide.min() == 0 and out_wide.max() == 255
    np.testing.assert_allclose(out_wide, out, atol=1)


def test_float_nan_is_replaced_by_the_brightest_value():
    image = np.full((20, 20), 0.5, np.float32)
    image[0, 0] = np.nan
    image[1, 1] = np.inf
    image[2, 2] = 0.8
    out = as_rgb_uint8(image)
    assert out[0, 0, 0] == out[2, 2, 0] == round(0.8 * 255)
    assert out[1, 1, 0] == round(0.8 * 255)
    assert out[5, 5, 0] == round(0.5 * 255)


def test_bool_maps_to_black_and_white():
    mask = np.zeros((20, 20), bool)
    mask[5:10] = True
    out = as_rgb_uint8(mask)
    assert set(np.unique(out)) == {0, 255}
    assert out[6, 0, 1] == 255 and out[0, 0, 1] == 0


@pytest.mark.parametrize("channels", [3, 4])
def test_channel_first_is_moved_last(rgb, channels):
    image = rgb if channels == 3 else np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    out = as_rgb_uint8(np.moveaxis(image, -1, 0))
    np.testing.assert_array_equal(out, rgb)


def test_singleton_axes_are_dropped(rgb):
    np.testing.assert_array_equal(as_rgb_uint8(rgb[None]), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(rgb[None, None, ..., 0, None])[..., 0], rgb[..., 0])


def test_an_image_one_pixel_high_is_not_taken_for_a_stack_of_one():
    """The size in the refusal is the image's own (it was 640 x 3 for a 1 x 640 row)."""
    with pytest.raises(ValueError, match=r"got an image of 1 x 640 pixels"):
        as_rgb_uint8(np.zeros((1, 640, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got an image of 1 x 1 pixels"):
        as_rgb_uint8(np.zeros((1, 1, 3), np.uint8))


def test_a_file_path_instead_of_pixels_says_to_read_it():
    for given in ("field.jpg", Path("field.jpg")):
        with pytest.raises(TypeError, match=r"got a file path \('field.jpg'\).*read_image"):
            as_rgb_uint8(given)


def test_3d_stack_is_rejected_with_the_shape():
    with pytest.raises(ValueError, match=r"got shape \(5, 32, 32\); expected a 2-D RGB field.*pass one plane"):
        as_rgb_uint8(np.zeros((5, 32, 32), np.uint8))


def test_too_many_channels_and_4d_are_rejected():
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 6\)"):
        as_rgb_uint8(np.zeros((32, 32, 6), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 3\)"):
        as_rgb_uint8(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="got shape"):
        as_rgb_uint8(np.zeros(100, np.uint8))


def test_empty_small_complex_nan_and_object_are_rejected():
    with pytest.raises(ValueError, match="empty image"):
        as_rgb_uint8(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"10 x 40 pixels.*at least 16 x 16"):
        as_rgb_uint8(np.zeros((10, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="complex"):
        as_rgb_uint8(np.zeros((20, 20), np.complex64))
    with pytest.raises(ValueError, match="no finite values"):
        as_rgb_uint8(np.full((20, 20, 3), np.nan))
    with pytest.raises(TypeError, match="dtype object"):
        as_rgb_uint8(np.full((20, 20), None, dtype=object))


def test_input_is_not_modified():
    image = np.full((20, 20, 4), 1000, np.uint16)
    before = image.copy()
    as_rgb_uint8(image)
    np.testing.assert_array_equal(image, before)


# ------------------------------------------------------------------ read_image


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_formats_round_trip(tmp_path, rgb, suffix):
    path = tmp_path / f"field{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        iio.imwrite(path, rgb, extension=suffix)
    image, meta = read_image(path)
    np.testing.assert_array_equal(image, rgb)
    assert meta["path"] == str(path)
    assert meta["pixel_size_um"] is None


def test_jpeg_reads_as_rgb(tmp_path, rgb):
    path = tmp_path / "field.JPG"  # upper-case suffix too
    iio.imwrite(path, rgb, extension=".jpg")
    image, meta = read_image(path)
    assert image.shape == rgb.shape and image.dtype == np.uint8
    assert meta["format"] == "jpeg"


def test_raw_read_keeps_16bit(tmp_path):
    data = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4
    path = tmp_path / "gray16.tif"
    tifffile.imwrite(path, data)
    raw, meta = read_image(path, rgb=False)
    np.testing.assert_array_equal(raw, data)
    assert meta["dtype"] == "uint16"
    rgb, _ = read_image(path)
    assert rgb.shape == (32, 32, 3) and rgb.max() == 255


def test_planar_rgb_tiff_comes_back_channel_last(tmp_path, rgb):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    raw, meta = read_image(path, rgb=False)
    np.testing.assert_array_equal(raw, rgb)
    assert meta["axes"].endswith("S")


@pytest.mark.parametrize("name", ["broken.tif", "broken.png", "broken.jpg"])
def test_corrupt_file_raises_image_read_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageReadError, match=f"cannot read .*{name}"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_empty_file_says_it_is_empty(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"the file is empty \(0 bytes\)"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_files_read_as_their_colours_not_as_alpha(tmp_path, suffix):
    """Printing software saves CMYK; its fourth channel (black ink) was taken for
    alpha, and every such field read as blank white with no cell in it."""
    from PIL import Image

    field = np.zeros((48, 64, 3), np.uint8)
    field[...] = (230, 215, 220)  # glass
    field[10:30, 10:30] = (200, 90, 100)  # a red cell
    field[20:40, 35:55] = (90, 50, 150)  # a violet nucleus
    path = tmp_path / f"cmyk{suffix}"
    Image.fromarray(field).convert("CMYK").save(path, quality=95)
    read, _ = read_image(path)
    assert read.shape == field.shape
    tolerance = 8 if suffix == ".jpg" else 1  # JPEG is lossy
    assert np.abs(read.astype(int) - field).mean() < tolerance


def test_truncated_png_raises_image_read_error(tmp_path, rgb):
    path = tmp_path / "cut.png"
    iio.imwrite(path, rgb, extension=".png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(path)


def test_missing_unsupported_and_3d(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(ImageReadError, match="unsupported file type '.csv'"):
        read_image(other)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"stack.tif: got shape \(5, 32, 32\)"):
        read_image(stack)
    raw, _ = read_image(stack, rgb=False)
    assert raw.shape == (5, 32, 32)


def test_ome_tiff_pixel_size_round_trip(tmp_path, rgb):
    path = tmp_path / "field.ome.tif"
    write_tiff_atomic(path, rgb, pixel_size_um=0.1234)
    image, meta = read_image(path)
    np.testing.assert_array_equal(image, rgb)
    assert meta["pixel_size_um"] == pytest.approx(0.1234)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome


def test_ome_pixel_size_in_nanometres(tmp_path, rgb):
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        path, rgb, ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"}
    )
    assert read_image(path)[1]["pixel_size_um"] == pytest.approx(0.25)


def test_an_ome_pixel_size_no_smear_could_have_is_not_taken(tmp_path, rgb):
    # 1000 um pixels (a millimetre value in the micrometre field) put a red cell under a
    # hundredth of a pixel: dropped, as a default dpi in the resolution tags is
    path = tmp_path / "mm.ome.tif"
    tifffile.imwrite(path, rgb, ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 1000.0})
    assert read_image(path)[1]["pixel_size_um"] is None


def test_tiff_resolution_tags(tmp_path, rgb):
    centimetre = tmp_path / "cm.tif"
    write_tiff_atomic(centimetre, rgb, pixel_size_um=0.5)
    assert read_image(centimetre)[1]["pixel_size_um"] == pytest.approx(0.5)
    imagej = tmp_path / "ij.tif"
    tifffile.imwrite(imagej, rgb[..., 0], imagej=True, resolution=(4.0, 4.0), metadata={"unit": "micron"})
    assert read_image(imagej)[1]["pixel_size_um"] == pytest.approx(0.25)
    inch = tmp_path / "dpi.tif"  # 72 dpi is a display default, not a calibration
    tifffile.imwrite(inch, rgb, resolution=(72, 72), resolutionunit="INCH")
    assert read_image(inch)[1]["pixel_size_um"] is None
    for dpi in (72, 96, 300):  # the same defaults stored per centimetre: 85-353 um "pixels"
        per_cm = tmp_path / f"dpi{dpi}cm.tif"
        tifffile.imwrite(per_cm, rgb, resolution=(dpi / 2.54, dpi / 2.54), resolutionunit="CENTIMETER")
        assert read_image(per_cm)[1]["pixel_size_um"] is None


def test_napari_smear_metadata_round_trip(tmp_path):
    labels = np.zeros((20, 20), np.uint32)
    labels[2:5, 2:5] = 70000
    path = tmp_path / "labels.tif"
    write_tiff_atomic(
        path, labels, napari_smear_metadata={"kind": "cells", "rbc_diameter_px": np.float32(40.5)}
    )
    raw, meta = read_image(path, rgb=False)
    np.testing.assert_array_equal(raw, labels)
    assert raw.dtype == np.uint32
    assert meta["napari_smear"] == {"kind": "cells", "rbc_diameter_px": 40.5}


def test_file_stem():
    assert file_stem("a/b/field.ome.tif") == "field"
    assert file_stem("x.JPEG") == "x"
    assert file_stem("x.y.png") == "x.y"


def test_real_bccd_field_reads():
    image, meta = read_image(_shared("bccd/images/BloodImage_00000.jpg"))
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert meta["format"] == "jpeg"


# ------------------------------------------------------------------ atomic writes


def test_atomic_writes_leave_no_temporary_file(tmp_path, rgb):
    write_tiff_atomic(tmp_path / "a.tif", rgb)
    write_png_atomic(tmp_path / "b.png", rgb)
    df = pd.DataFrame({"label": [1, 2], "cell_type": ["rbc", "wbc"]})
    write_csv_atomic(tmp_path / "c.csv", df)
    with atomic_write(tmp_path / "d.txt", "w") as handle:
        handle.write("µm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.png", "c.csv", "d.txt"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), rgb)
    np.testing.assert_array_equal(iio.imread(tmp_path / "b.png"), rgb)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c.csv"), df)
    assert (tmp_path / "d.txt").read_text(encoding="utf-8") == "µm"


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_write_path_mode_requires_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_write(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []
    with atomic_write(tmp_path / "y.bin") as temporary:
        assert temporary.parent == tmp_path and temporary.name != "y.bin"
        temporary.write_bytes(b"123")
    assert (tmp_path / "y.bin").read_bytes() == b"123"
    assert [p.name for p in tmp_path.iterdir()] == ["y.bin"]


def test_png_writer_checks_its_input(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_png_atomic(tmp_path / "x.png", np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png_atomic(tmp_path / "x.png", np.zeros((20, 20, 5), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_large_png_jpeg_are_not_refused_as_decompression_bombs(tmp_path, monkeypatch):
    """Pillow refuses images over its MAX_IMAGE_PIXELS (179 MP by default): a whole-slide
    region saved as JPEG is larger. Reading lifts the limit for the read only."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then "a bomb"
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("big.png", "big.jpg"):
        Image.fromarray(image).save(tmp_path / name)
        data, _ = read_image(tmp_path / name)
        assert data.shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_tiff_needing_codecs_says_how_to_get_them(tmp_path, rgb, monkeypatch):
    import tifffile

    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb)

    def needs_codecs(*args, **kwargs):
        raise ValueError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", needs_codecs)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", needs_codecs)
    with pytest.raises(ImageReadError, match=r"pip install imagecodecs"):
        read_image(path)


@pytest.mark.parametrize("compression", ["lzw", "jpeg", "zlib"])
def test_compressed_tiffs_open(tmp_path, rgb, compression):
    # LZW (camera programs) and JPEG tiles (slide scanners) need imagecodecs, a dependency
    import tifffile

    path = tmp_path / f"{compression}.tif"
    tiles = {}
    if compression == "jpeg":  # lossy: a smooth picture, cut into tiles as scanners do
        y, x = np.mgrid[0:32, 0:40]
        rgb = np.stack([y * 6, x * 5, 255 - y * 4], axis=-1).astype(np.uint8)
        tiles = {"tile": (16, 16)}
    tifffile.imwrite(path, rgb, photometric="rgb", compression=compression, **tiles)
    image, _ = read_image(path)
    assert image.shape == rgb.shape and image.dtype == rgb.dtype
    tolerance = 4 if compression == "jpeg" else 0
    assert np.abs(image.astype(int) - rgb.astype(int)).mean() <= tolerance


def test_a_tiff_stack_of_three_planes_is_not_taken_for_colour(tmp_path):
    planes = np.random.default_rng(0).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    stack = tmp_path / "z.tif"
    tifffile.imwrite(stack, planes, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match=r"a stack of 3 z-planes \(axes ZYX"):
        read_image(stack)
    assert read_image(stack, rgb=False)[0].shape == (3, 40, 50)  # the planes themselves, for napari
    channels = tmp_path / "c.tif"  # channels named as such are colour
    tifffile.imwrite(channels, planes, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(channels)[0], np.moveaxis(planes, 0, -1))


def test_a_tiff_of_several_images_is_refused_and_a_slides_thumbnails_are_not(tmp_path):
    """Several images (TIFF series) in one file: reading the first alone dropped the others
    silently; refused, also by the napari reader's path (read_image with rgb=False). A
    smaller series after the first (a slide's thumbnail, label or overview) is left out
    as before."""
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(2))
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, first)
    tifffile.imwrite(two, second, append=True)
    for rgb in (True, False):
        with pytest.raises(ImageReadError, match=r"holds 2 images \(shapes \(40, 50, 3\), \(40, 50, 3\)\), not one"):
            read_image(two, rgb=rgb)
    larger_second = tmp_path / "larger.tif"
    tifffile.imwrite(larger_second, first[:20, :25])
    tifffile.imwrite(larger_second, first, append=True)
    with pytest.raises(ImageReadError, match="holds 2 images"):
        read_image(larger_second)
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, first)
    tifffile.imwrite(slide, first[::4, ::4], append=True)  # a thumbnail
    np.testing.assert_array_equal(read_image(slide)[0], first)


def test_a_folder_search_names_the_sub_folders_it_cannot_read(tmp_path):
    """search_folder (behind every command's folder inputs): files sorted, links to
    folders not followed, and a sub-folder it cannot open warned about by name (rglob
    skipped it silently, so its images were missing without a word)."""
    import os

    from napari_smear.io import search_folder

    (tmp_path / "b").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b" / "c.jpg").write_bytes(b"x")
    (tmp_path / "b" / "d.txt").write_bytes(b"x")
    (tmp_path / "b" / "E.JPG").write_bytes(b"x")  # as cameras name them: found by *.jpg
    (tmp_path / "link").symlink_to(tmp_path / "b", target_is_directory=True)
    assert search_folder(tmp_path, "*.jpg") == [tmp_path / "a.jpg", tmp_path / "b" / "E.JPG", tmp_path / "b" / "c.jpg"]
    real_scandir = os.scandir

    def refuse_b(path="."):  # as for a folder of another user's (the tests may run as root)
        if Path(path).name == "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    import unittest.mock

    left_out = r"cannot search .*b \(Permission denied\): its images are left out"
    with unittest.mock.patch("os.scandir", refuse_b), pytest.warns(UserWarning, match=left_out):
        assert search_folder(tmp_path, "*.jpg") == [tmp_path / "a.jpg"]


def test_tiled_tiff_windows_match_the_whole_image(tmp_path):
    """A whole slide's tiles decoded window by window give the pixels a full read gives
    (compressed tiles, windows across tile borders and at the image's edges, steps)."""
    import tifffile

    from napari_smear.io import TiledTiff, open_tiled_tiff

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, (700, 530)).astype(np.uint32)
    tifffile.imwrite(tmp_path / "labels.tif", labels, tile=(128, 128), compression="zlib")
    rgb = rng.integers(0, 255, (300, 410, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, tile=(64, 64), compression="zlib", photometric="rgb")
    with TiledTiff(tmp_path / "labels.tif") as tiff:
        assert (tiff.shape, tiff.dtype, tiff.ndim) == ((700, 530), np.dtype(np.uint32), 2)
        for key in [(slice(0, 5), slice(0, 5)), (slice(100, 390), slice(120, 530)), (slice(690, 700), slice(500, 530)),
                    (slice(17, 600, 3), slice(5, 520, 7)), (slice(300, 300), slice(0, 10))]:
            np.testing.assert_array_equal(tiff[key], labels[key])
        with pytest.raises(TypeError, match="2-D window"):
            tiff[5]
    with TiledTiff(tmp_path / "rgb.tif") as tiff:
        np.testing.assert_array_equal(tiff[60:250, 30:400], rgb[60:250, 30:400])
    tifffile.imwrite(tmp_path / "strips.tif", rgb)  # not tiled: read whole instead
    assert open_tiled_tiff(tmp_path / "strips.tif") is None
    assert open_tiled_tiff(tmp_path / "rgb.tif", min_pixels=10**9) is None
    small = open_tiled_tiff(tmp_path / "rgb.tif")
    assert small is not None
    small.close()


@pytest.mark.parametrize(("dtype", "scale", "stray"), [
    (np.float32, 1.0, 1e6), (np.int16, 1.0, -32768), (np.uint16, 16.0, 65535)])
def test_a_few_stray_pixel_values_do_not_darken_the_whole_image(rgb, dtype, scale, stray):
    # a hot pixel of a 12-bit camera, a placeholder value: scaled by them, every other
    # pixel would be squeezed into a sliver of the range
    from napari_smear.io import as_rgb_uint8

    big = np.tile(rgb, (4, 4, 1))  # enough pixels that one is a stray (a 10,000th of them)
    clean = (big.astype(np.float64) * scale).astype(dtype)
    reference = as_rgb_uint8(clean)
    stained = clean.copy()
    stained[3, 4] = stray
    with pytest.warns(UserWarning, match=r"3 pixel value\(s\) lie far outside the range .* clipped"):
        converted = as_rgb_uint8(stained)
    converted[3, 4] = reference[3, 4]
    np.testing.assert_array_equal(converted, reference)
