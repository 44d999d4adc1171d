"""Image input/output: reading smear images, the RGB input checker, atomic writes.

Core module: no napari, no Qt.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "MIN_IMAGE_SIDE",
    "METADATA_KEY",
    "is_supported_path",
    "file_stem",
    "read_image",
    "open_image_on_disk",
    "TiledTiff",
    "open_tiled_tiff",
    "on_disk_size",
    "is_memory_mapped",
    "stored_image_size",
    "as_rgb_uint8",
    "atomic_write",
    "check_writable_location",
    "write_tiff_atomic",
    "write_csv_atomic",
    "write_png_atomic",
]

#: File name endings :func:`read_image` understands (matched case-insensitively).
SUPPORTED_SUFFIXES = (
    ".ome.tif",
    ".ome.tiff",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
)
_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")

#: Key of napari-smear's own metadata (TIFF ImageDescription JSON, napari layer metadata).
METADATA_KEY = "napari_smear"

#: The smallest height/width segmentation accepts: below it not even a platelet fits.
MIN_IMAGE_SIDE = 16

# Length units (OME ``PhysicalSizeXUnit`` spellings) -> micrometres.
_UNIT_TO_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu as well as the micro sign
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


class ImageReadError(ValueError):
    """A file could not be read as an image (corrupt, truncated or unsupported)."""


# --------------------------------------------------------------------------- reading


def search_folder(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Files under ``folder`` (recursively, symbolic links to folders not followed, as
    ``Path.rglob``) whose names match ``pattern``, ignoring case (cameras write
    ``IMG_0001.JPG``, and ``*.jpg`` should find it on every system), sorted. A sub-folder
    that cannot be read (permissions) is warned about by name: ``rglob`` skipped it
    without a word, and its images were missing from a run with nothing said."""
    import fnmatch

    folder = Path(folder)
    found: list[Path] = []
    unreadable: list[str] = []
    pattern = pattern.lower()
    for here, _, names in os.walk(folder, onerror=lambda error: unreadable.append(
            f"{error.filename} ({error.strerror or error})")):
        found.extend(Path(here) / name for name in names if fnmatch.fnmatchcase(name.lower(), pattern))
    for entry in unreadable:
        warnings.warn(f"cannot search {entry}: its images are left out", UserWarning, stacklevel=3)
    return sorted(found)


def is_supported_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends with one of :data:`SUPPORTED_SUFFIXES`."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


def file_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a/b.ome.tif`` -> ``b``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_image(path: str | os.PathLike, *, rgb: bool = True) -> tuple[np.ndarray, dict]:
    """Read a smear image file.

    Parameters
    ----------
    path : str or path-like
        A TIFF / OME-TIFF, PNG, JPEG or BMP file.
    rgb : bool, default True
        If True, return the image as (H, W, 3) uint8 RGB through :func:`as_rgb_uint8`
        (what segmentation and the pipeline take). If False, return the array as stored
        (any dtype, grayscale, RGBA, stacks), e.g. for display. CMYK files (from
        printing software) are converted to RGB either way.

    Returns
    -------
    image : numpy.ndarray
        The pixels.
    meta : dict
        ``path`` (str), ``format`` (``"tiff"``, ``"png"``, ``"jpeg"``, ``"bmp"``),
        ``pixel_size_um`` (float or None: from OME ``PhysicalSizeX`` or, for plain
        TIFF, from the resolution tags when they are in centimetres or ImageJ
        micrometres), ``pixel_size_yx_um`` ((y, x) floats or None: the same with the
        row height, which differs only for non-square pixels; a warning says so),
        ``axes`` (tifffile axes string for TIFF, else None),
        ``napari_smear`` (the dict napari-smear stored in a TIFF it wrote through
        :func:`write_tiff_atomic` with ``napari_smear_metadata``, else None),
        ``shape`` and ``dtype`` of the array as read (before any RGB conversion).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ImageReadError
        If the suffix is not supported or the file cannot be decoded (the message
        names the file and the reason).
    ValueError
        With ``rgb=True``, if the stored image is not a single 2-D field (see
        :func:`as_rgb_uint8`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_image takes a file path, got {type(path).__name__}"
                        + ("; the pixels are already an array: pass them on as they are" if isinstance(path, np.ndarray)
                           else ""))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"cannot read {path}: it is a directory, not an image file")
    if not is_supported_path(path):
        raise ImageReadError(
            f"cannot read {path}: unsupported file type {path.suffix!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if str(path).lower().endswith(_TIFF_SUFFIXES):
        data, meta = _read_tiff(path)
    else:
        data, meta = _read_with_imageio(path)
    meta = {"path": str(path), "shape": tuple(data.shape), "dtype": str(data.dtype), **meta}
    if rgb:
        _refuse_stack(path, data, meta.get("axes"))
        try:
            data = as_rgb_uint8(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    return data, meta


#: tifffile's names of the axes of a stack: depth, time, a sequence of images
_STACK_AXES = {"Z": "z-planes", "T": "time points", "I": "images"}


def _refuse_stack(path: Path, data: np.ndarray, axes: str | None) -> None:
    """A TIFF that names a stack axis (Z, T, I) of several planes is not one colour
    field, though three or four planes have the shape of one (they were read as RGB)."""
    if not axes or len(axes) != data.ndim:
        return
    for axis, size in zip(axes, data.shape):
        if axis in _STACK_AXES and size > 1:
            raise ValueError(
                f"{path}: a stack of {size} {_STACK_AXES[axis]} (axes {axes}, shape {tuple(data.shape)}), not one "
                "colour field; save or open one plane (napari opens the whole stack)"
            )


def stored_image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of an image file, read from its header (nothing is decoded);
    None when the header cannot be read (:func:`read_image` then says why)."""
    path = Path(path)
    try:
        if str(path).lower().endswith(_TIFF_SUFFIXES):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = series.shape, series.axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        return int(height), int(width)
    except Exception:
        return None


def on_disk_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of the image when :func:`open_image_on_disk` takes the file (a
    TIFF holding one 8-bit RGB image with the colour last), else None; read from its
    header, nothing is decoded."""
    import tifffile

    path = Path(path)
    if not str(path).lower().endswith(_TIFF_SUFFIXES):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(series.shape)
            return shape[:2] if _mappable_layout(shape, np.dtype(series.dtype), series.axes) else None
    except Exception:  # read_image gives the specific reason when the file is opened
        return None


def is_memory_mapped(array: Any) -> bool:
    """Whether ``array`` (or the array it views) is a memory map of a file: a slide
    larger than memory, to be copied and written piece by piece."""
    return isinstance(array, np.memmap) or isinstance(getattr(array, "base", None), np.memmap)


def _mappable_layout(shape: tuple, dtype: np.dtype, axes: str) -> bool:
    return len(shape) == 3 and shape[-1] == 3 and dtype == np.uint8 and axes.endswith("S")


def open_image_on_disk(
    path: str | os.PathLike, scratch_dir: str | os.PathLike | None = None
) -> tuple[np.memmap, dict]:
    """A TIFF's image as a read-only memory map, for slides larger than memory.

    An uncompressed TIFF is mapped where it lies; a compressed one (a whole-slide
    scanner's JPEG tiles, say) is decoded once, tile by tile, into a file in
    ``scratch_dir`` (default: the system's temporary folder), which the caller removes
    after use (the map keeps it open until then). Either way the pixels are read from
    disk as they are used, so :func:`napari_smear.segment_smear` with
    ``out=`` memory maps segments the slide in the memory of a few tiles.

    Returns ``(image, meta)`` as :func:`read_image` does; ``meta["scratch_file"]`` is
    the decoded copy's path (None when the file was mapped directly).

    Raises
    ------
    ImageReadError
        For a file that is not a TIFF or cannot be decoded.
    ValueError
        For a TIFF that is not one 8-bit RGB image with the colour last (the layout
        scanners write): convert it with :func:`read_image` when it fits in memory.
    """
    import tempfile

    import tifffile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not str(path).lower().endswith(_TIFF_SUFFIXES):
        raise ImageReadError(f"cannot map {path} from disk: only TIFF files can be (got {path.suffix!r})")
    with _first_tiff_series(path) as (tif, series):
        shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
        pixel_size_yx_um = _tiff_pixel_size_yx_um(tif)
        own_metadata = _napari_smear_description(tif.pages[0].description)
    if not _mappable_layout(shape, dtype, axes):
        raise ValueError(
            f"{path}: reading from disk needs one 8-bit RGB image with the colour last, as "
            f"slide scanners write; this file holds shape {shape} ({axes}), dtype {dtype}: read it into "
            "memory instead (leave out --on-disk, or give --in-memory), where it is converted"
        )
    scratch = None
    try:
        try:
            image = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or scattered: decode once, tile by tile, into a scratch file
            handle, name = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=".rgb", dir=scratch_dir)
            os.close(handle)
            scratch = Path(name)
            with tifffile.TiffFile(path) as tif:
                image = tif.series[0].asarray(out=str(scratch))
    except Exception as exc:
        if scratch is not None:
            with contextlib.suppress(OSError):
                scratch.unlink()
        raise _unreadable_tiff(path, exc) from exc
    image = image.reshape(shape)
    return image, {
        "path": str(path), "format": "tiff", "axes": axes, "shape": shape, "dtype": str(dtype),
        "pixel_size_um": pixel_size_yx_um[1] if pixel_size_yx_um else None,
        "pixel_size_yx_um": pixel_size_yx_um, "napari_smear": own_metadata,
        "scratch_file": str(scratch) if scratch is not None else None,
    }


class TiledTiff:
    """A tiled TIFF's first image, read window by window: ``tiff[y0:y1, x0:x1]`` decodes
    only the tiles that window touches (a step, ``[y0:y1:2, ...]``, is taken after).

    For drawing a few cells of a whole slide (a cell gallery) without reading the slide,
    or its label image, whole; compressed tiles (zlib, JPEG...) included, which a memory
    map cannot read. Array-like enough for :func:`napari_smear.gallery.cell_thumbnails`:
    ``shape``, ``dtype``, ``ndim`` and 2-D slicing. Close it (or use ``with``) when done.
    """

    def __init__(self, path: str | os.PathLike):
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        page = self._tif.pages[0]
        if not page.is_tiled or page.imagedepth != 1 or page.planarconfig not in (1, None) and page.samplesperpixel > 1:
            self._tif.close()
            raise ValueError(f"{self.path} is not a tiled TIFF with its colour samples together")
        self._page = page
        self.shape = tuple(page.shape)
        self.dtype = np.dtype(page.dtype)
        self.ndim = len(self.shape)
        self._tile = (page.tilelength, page.tilewidth)
        self._across = -(-page.imagewidth // page.tilewidth)

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("a TiledTiff is read by a 2-D window: tiff[y0:y1, x0:x1]")
        (y0, y1, ystep), (x0, x1, xstep) = (k.indices(n) for k, n in zip(key, self.shape[:2]))
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), *self.shape[2:]), self.dtype)
        th, tw = self._tile
        handle = self._tif.filehandle
        page = self._page
        for ty in range(y0 // th, -(-y1 // th) if y1 > y0 else y0 // th):
            for tx in range(x0 // tw, -(-x1 // tw) if x1 > x0 else x0 // tw):
                index = ty * self._across + tx
                handle.seek(page.dataoffsets[index])
                data = handle.read(page.databytecounts[index])
                tile, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
                tile = np.asarray(tile).reshape(shape)[0]  # (th, tw, samples)
                if len(self.shape) == 2:
                    tile = tile[..., 0]
                ys, ye = max(y0, ty * th), min(y1, (ty + 1) * th)
                xs, xe = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                oy, ox = ty * th, tx * tw  # the tile's corner
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = tile[ys - oy : ye - oy, xs - ox : xe - ox]
        return out[::ystep, ::xstep]

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "TiledTiff":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tiled_tiff(path: str | os.PathLike, *, min_pixels: int = 0) -> TiledTiff | None:
    """A :class:`TiledTiff` for a tiled TIFF of at least ``min_pixels`` (a whole slide, or
    a label image written from one), else None (read it with :func:`read_image`)."""
    if not str(path).lower().endswith(_TIFF_SUFFIXES):
        return None
    try:
        tiff = TiledTiff(path)
    except Exception:  # not tiled, not readable that way: read_image says what is wrong
        return None
    if tiff.shape[0] * tiff.shape[1] < min_pixels:
        tiff.close()
        return None
    return tiff


def read_pyramid_levels(path: str | os.PathLike) -> list[np.ndarray]:
    """The reduced-resolution levels of a pyramidal TIFF / OME-TIFF (largest first, the
    full-resolution level not included), in the layout :func:`read_image` gives the full
    one (``rgb=False``); an empty list for any other file.

    Whole-slide scanners store such pyramids; napari shows them as a multiscale layer,
    which pans and zooms without drawing the full-resolution pixels.
    """
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return []
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series or len(tif.series[0].levels) < 2:
                return []
            series = tif.series[0]
            levels = [(level.asarray(), level.axes) for level in series.levels[1:]]
    except Exception:  # the full level was read fine; without its pyramid the image still shows
        return []
    return [_colour_axis_last(data, axes)[0] for data, axes in levels]


def _colour_axis_last(data: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Planar RGB (axes 'SYX') -> interleaved, so the colour axis is last as everywhere else."""
    if "S" in axes and axes.index("S") != len(axes) - 1 and data.ndim == len(axes):
        return np.moveaxis(data, axes.index("S"), -1), axes.replace("S", "") + "S"
    return data, axes


@contextlib.contextmanager
def _first_tiff_series(path: Path):
    """``(tif, series)``: an open TIFF and its first image series. An empty, corrupt or
    imageless file, or a failure while the block reads it, raises
    :class:`ImageReadError` naming the file (tifffile raises many types)."""
    import tifffile

    if path.stat().st_size == 0:
        raise ImageReadError(f"cannot read {path}: the file is empty (0 bytes)")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(f"cannot read {path}: the TIFF file holds no image")
            _refuse_several_images(path, tif.series)
            yield tif, tif.series[0]
    except ImageReadError:
        raise
    except Exception as exc:
        raise _unreadable_tiff(path, exc) from exc


def _series_pixels(series) -> int:
    """Y x X of a TIFF image series (0 when its axes do not name them)."""
    axes, shape = series.axes, series.shape
    if "Y" not in axes or "X" not in axes:
        return 0
    return int(shape[axes.index("Y")]) * int(shape[axes.index("X")])


def _refuse_several_images(path: Path, series) -> None:
    """A TIFF holding several images (series) of which another is as large as the first
    is refused: reading its first alone would drop the rest without a word. Smaller
    ones are a slide's thumbnail, label and overview images (SVS), left out as before."""
    first = _series_pixels(series[0])
    if any(_series_pixels(s) >= first > 0 for s in series[1:]):
        shapes = ", ".join(str(tuple(s.shape)) for s in series[:4]) + (", ..." if len(series) > 4 else "")
        raise ImageReadError(
            f"{path} holds {len(series)} images (shapes {shapes}), not one field; napari-smear reads one "
            "field per file: save each image as its own file"
        )


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    with _first_tiff_series(path) as (tif, series):
        data = series.asarray()
        axes = series.axes
        pixel_size_yx_um = _tiff_pixel_size_yx_um(tif)
        own_metadata = _napari_smear_description(tif.pages[0].description)
        # printing software saves CMYK: its 4th channel is black ink, not alpha
        is_cmyk = tif.pages[0].photometric == tifffile.PHOTOMETRIC.SEPARATED
    data, axes = _colour_axis_last(data, axes)
    if is_cmyk and data.ndim >= 3 and data.shape[-1] >= 4:
        data = _cmyk_to_rgb(data)
    if pixel_size_yx_um is not None and not np.isclose(*pixel_size_yx_um, rtol=0.01):
        warnings.warn(
            f"{path.name}: the pixels are not square ({pixel_size_yx_um[0]:g} um high, "
            f"{pixel_size_yx_um[1]:g} um wide); napari shows them so, but the cell sizes are "
            "measured with the width",
            stacklevel=3,
        )
    return data, {
        "format": "tiff",
        "axes": axes,
        "pixel_size_um": pixel_size_yx_um[1] if pixel_size_yx_um else None,
        "pixel_size_yx_um": pixel_size_yx_um,
        "napari_smear": own_metadata,
    }


def _unreadable_tiff(path: Path, exc: Exception) -> ImageReadError:
    """The error for a TIFF tifffile could not decode, with the fix when it is the codecs."""
    advice = ""
    if "imagecodecs" in str(exc):  # a dependency, so only a broken or partial install lacks it
        advice = "; the TIFF codecs are missing from this install: pip install imagecodecs"
    return ImageReadError(f"cannot read {path} as TIFF: {type(exc).__name__}: {exc}{advice}")


def _cmyk_to_rgb(data: np.ndarray) -> np.ndarray:
    """CMYK ink coverage (colour axis last; channels past the fourth dropped) -> RGB,
    integer dtypes kept, others float32: each colour is what its ink and the black ink
    let through."""
    unit = _full_range_to_unit(data[..., :4], nan=0.0)
    rgb = (1.0 - unit[..., :3]) * (1.0 - unit[..., 3:4])
    if np.issubdtype(data.dtype, np.integer):
        return np.round(rgb * np.iinfo(data.dtype).max).astype(data.dtype)
    return rgb.astype(np.float32)


def _napari_smear_description(description: str) -> dict | None:
    """The metadata napari-smear stores as JSON in a TIFF's ImageDescription, if any."""
    if not description or not description.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(description)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get(METADATA_KEY), dict):
        return parsed[METADATA_KEY]
    return None


def _tiff_pixel_size_yx_um(tif: Any) -> tuple[float, float] | None:
    """(row height, column width) in µm from OME-XML, else from the first page's
    resolution tags; a missing height is taken equal to the width."""
    if tif.is_ome and tif.ome_metadata:
        size = _ome_pixel_size_yx_um(tif.ome_metadata)
        if size is not None:
            return size
    tags = tif.pages[0].tags
    width = _resolution_tag_um(tif, tags, "XResolution")
    if width is None:
        return None
    height = _resolution_tag_um(tif, tags, "YResolution")
    return (height if height is not None else width, width)


#: Larger pixels than this (um) in a TIFF resolution tag are a default dpi, not a
#: microscope's calibration: a red cell would be under one pixel across.
_MAX_CALIBRATED_PIXEL_UM = 10.0


def _resolution_tag_um(tif: Any, tags: Any, name: str) -> float | None:
    """Pixel size (µm) of one resolution tag, when its unit is a length."""
    if name not in tags:
        return None
    numerator, denominator = tags[name].value
    if not numerator or not denominator:
        return None
    pixels_per_unit = numerator / denominator
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 3:  # centimetre
        size_um = 1e4 / pixels_per_unit
        # a default dpi stored per centimetre (72, 96, 300 dpi: 28.3, 37.8, 118.1 px/cm)
        # reads as 85-353 um pixels, where a red cell would be under a tenth of a pixel
        return size_um if size_um <= _MAX_CALIBRATED_PIXEL_UM else None
    if unit == 1 and tif.is_imagej:  # no unit in the tag: ImageJ stores it in its metadata
        ij_unit = str((tif.imagej_metadata or {}).get("unit", "")).strip()
        factor = _UNIT_TO_UM.get(ij_unit) or _UNIT_TO_UM.get(ij_unit.lower())
        if factor is not None:
            return factor / pixels_per_unit
    # Inches: almost always a default 72/96/300 dpi, not a calibration.
    return None


def _ome_pixel_size_yx_um(ome_xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in element.attrib:
            width = _ome_length_um(element.attrib, "X")
            if width is None:
                return None
            height = _ome_length_um(element.attrib, "Y") if "PhysicalSizeY" in element.attrib else None
            return (height if height is not None else width, width)
    return None


def _ome_length_um(attributes: dict, axis: str) -> float | None:
    try:
        value = float(attributes[f"PhysicalSize{axis}"])
    except ValueError:
        return None
    factor = _UNIT_TO_UM.get(attributes.get(f"PhysicalSize{axis}Unit", "µm"))  # OME default unit: µm
    if factor is None or not np.isfinite(value) or value <= 0:
        return None
    # as for resolution tags: pixels this large put a red cell under a pixel, a unit
    # slip (mm written as um) rather than a smear's calibration
    return value * factor if value * factor <= _MAX_CALIBRATED_PIXEL_UM else None


# Pillow refuses images over 179 MP as possible decompression bombs (and warns over 89 MP);
# a whole-slide region saved as JPEG or PNG is larger than that, and legitimate here.
# Up to 1 GP reads quietly, up to 2 GP with Pillow's warning; beyond, a tiled TIFF is the
# format (its reader has no such limit).
_MAX_PNG_JPEG_PIXELS = 1_000_000_000


@contextlib.contextmanager
def _large_images_allowed():
    try:
        from PIL import Image
    except ImportError:
        yield
        return
    previous = Image.MAX_IMAGE_PIXELS
    if previous is not None:
        Image.MAX_IMAGE_PIXELS = max(previous, _MAX_PNG_JPEG_PIXELS)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _read_with_imageio(path: Path) -> tuple[np.ndarray, dict]:
    import imageio.v3 as iio

    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp"}[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise ImageReadError(f"cannot read {path}: the file is empty (0 bytes)")
    try:
        with _large_images_allowed():
            data = np.asarray(iio.imread(path))
            if fmt == "jpeg" and data.ndim == 3 and data.shape[-1] == 4:
                # a JPEG has no alpha: four channels are CMYK (from printing software),
                # which Pillow converts (Adobe's inverted variant included)
                data = np.asarray(iio.imread(path, mode="RGB"))
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError on bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "backend" in reason.lower():  # imageio's "no plugin could read it", with pip advice
            reason = f"the file is damaged or is not a {fmt.upper()} image"
        raise ImageReadError(f"cannot read {path} as {fmt.upper()}: {reason}") from exc
    return data, {"format": fmt, "axes": None, "pixel_size_um": None, "pixel_size_yx_um": None,
                  "napari_smear": None}


# --------------------------------------------------------------------------- checking


def as_rgb_uint8(image: Any) -> np.ndarray:
    """Check an image and convert it to (H, W, 3) uint8 RGB.

    This is the input checker of segmentation: it accepts what microscopes and image
    libraries produce and rejects, with a specific message, what is not one field.

    Parameters
    ----------
    image : array-like
        One of

        * (H, W) grayscale -> replicated to three channels;
        * (H, W, 3) RGB;
        * (H, W, 4) RGBA -> composited onto white (transparent = background);
        * (H, W, 2) grayscale + alpha (e.g. an "LA" PNG) -> the same, then replicated;
        * (3, H, W) or (4, H, W) channel-first, when the last axis is not itself
          3 or 4 long (then the layout is unambiguous);
        * leading or trailing axes of length 1 are dropped.

        Dtypes: uint8 is kept as is; bool maps to 0/255; other integer types (16-bit
        data often uses 10, 12 or 14 bits) and floats outside [0, 1] are scaled by the
        image's actual range, ``min(0, min)`` .. ``max`` over all channels (one factor
        for all channels, so colour balance is kept); floats within [0, 1] are
        multiplied by 255. NaN and infinite values are replaced by the largest finite
        value (a missing region reads as background, not as a dark stained cell). A few
        stray values far outside the rest (at most one in 10,000: a camera's hot
        pixels, a placeholder such as -32768) are left out of the range and clipped,
        with a warning, instead of squeezing the whole image into a sliver of it.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8, C-contiguous. May be ``image`` itself when it already is one.

    Raises
    ------
    TypeError
        For non-numeric dtypes (object, strings).
    ValueError
        For empty arrays, complex dtypes, 3-D stacks or more than 4 channels, images
        smaller than 16 x 16 pixels, and all-NaN images.
    """
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(
            f"got a file path ({os.fspath(image)!r}), not pixels; read the file first: "
            "image, meta = napari_smear.io.read_image(path)"
        )
    array = np.asarray(image)
    if np.iscomplexobj(array):
        raise ValueError(
            f"got a complex image (dtype {array.dtype}); expected real-valued pixels "
            "(take np.abs() or the real part first)"
        )
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise TypeError(f"got an image of dtype {array.dtype}; expected numbers or bool")
    if array.size == 0:
        raise ValueError(f"got an empty image of shape {array.shape}")

    original_shape = array.shape
    # Drop singleton axes (e.g. a (1, H, W, 3) TIFF series) but never the two image
    # axes: a (1, W, 3) array is an image one pixel high, not a stack of one.
    while array.ndim > 2 and array.shape[0] == 1 and (array.ndim > 3 or array.shape[-1] not in (2, 3, 4)):
        array = array[0]
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]

    if array.ndim == 3 and array.shape[-1] not in (2, 3, 4) and array.shape[0] in (3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first
    if array.ndim < 2 or array.ndim > 3 or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(
            f"got shape {original_shape}; expected a 2-D RGB field (H, W, 3), RGBA "
            "(H, W, 4) or grayscale (H, W) image; for a stack, time series or "
            "multi-channel image (more than 4 channels) pass one plane"
        )
    height, width = array.shape[:2]
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(
            f"got an image of {height} x {width} pixels (shape {original_shape}); "
            f"expected at least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}"
        )

    alpha = None
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array, alpha = array[..., :-1], _alpha_to_unit(array[..., -1])
        if array.shape[-1] == 1:
            array = array[..., 0]

    if array.dtype == np.uint8 and alpha is None:
        rgb = array
    else:
        unit = _to_unit_float(array)  # float32 in [0, 1]
        if alpha is not None:
            weight = alpha[..., None] if unit.ndim == 3 else alpha
            unit = unit * weight + (1.0 - weight)  # onto white
        rgb = np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    return np.ascontiguousarray(rgb)


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    """Alpha channel -> float32 in [0, 1] (NaN: opaque)."""
    return _full_range_to_unit(alpha, nan=1.0)


def _full_range_to_unit(values: np.ndarray, *, nan: float) -> np.ndarray:
    """A full-range channel (alpha, ink coverage: the dtype's whole range is 0 to 1 by
    convention, unlike pixel values) -> float32 in [0, 1]; NaN becomes ``nan``."""
    if values.dtype == bool:
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.float32) / float(np.iinfo(values.dtype).max)
    values = np.nan_to_num(values.astype(np.float32), nan=nan, posinf=1.0, neginf=0.0)
    return np.clip(values, 0.0, 1.0)


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """Pixels of any real dtype -> float32 in [0, 1] (see :func:`as_rgb_uint8`)."""
    if array.dtype == bool:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    values = array.astype(np.float64) if array.dtype.itemsize > 4 else array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.any():
            raise ValueError("got an image with no finite values (all NaN or infinite)")
        if not finite.all():
            values = np.where(finite, values, values[finite].max())
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return values.astype(np.float32)
    low, high = _range_without_outliers(values, low, high)
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


#: Share of an image's pixels that may lie far outside the rest and be clipped: hot
#: pixels of a camera, a stray sentinel value. Glass, the brightest thing on a smear,
#: covers far more of any field than this.
_OUTLIER_SHARE = 1e-4


def _range_without_outliers(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The (low, high) to scale ``values`` (whose minimum and maximum are ``low`` and
    ``high``) by: ``min(low, 0)`` .. ``high``, unless a few pixels (at
    most :data:`_OUTLIER_SHARE` of them) lie far beyond what all the others reach, as a
    camera's hot pixel or a sentinel value (1e6, -32768) does; scaled by those, the whole
    image would turn black (or white). Such pixels are left out of the range (and so
    clipped), with a warning. A pixel is such an outlier when it lies more than half the
    range of the other pixels beyond it."""
    full = (min(low, 0.0), high)
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    k = int(len(sample) * _OUTLIER_SHARE)
    if k < 1:
        return full
    ordered = np.partition(sample, (k, len(sample) - 1 - k))
    bottom, top = float(ordered[k]), float(ordered[len(sample) - 1 - k])
    reach = 0.5 * (top - bottom)
    if reach <= 0 or (bottom - reach <= low and high <= top + reach):
        # all but a few pixels one value (nothing to tell strays from), or no value far
        # out: decided without another pass over a large image
        return full
    outliers = (flat > top + reach) | (flat < bottom - reach)
    count = int(outliers.sum())
    if count == 0 or count > _OUTLIER_SHARE * flat.size * 2:  # many: part of the image, not strays
        return full
    rest = flat[~outliers]
    new_low, new_high = min(float(rest.min()), 0.0), float(rest.max())
    warnings.warn(
        f"{count} pixel value(s) lie far outside the range of the rest of the image (values {float(flat.min()):g} .. "
        f"{float(flat.max()):g}, the rest {float(rest.min()):g} .. {new_high:g}): they were clipped, so as not to "
        "darken the whole image (a camera's hot pixels, or a placeholder value)", stacklevel=4,
    )
    return new_low, new_high


# --------------------------------------------------------------------------- writing


def check_writable_location(path: str | os.PathLike, what: str) -> None:
    """Before any work, a ValueError when a file could not be written at ``path``: one
    of its folders is a file, or the nearest existing folder cannot be written in.
    ``what`` names it in the message (``"output"``, ``"--json"``). A read-only folder
    was otherwise found only after the work (cropping, training, an evaluation)."""
    path = Path(path)
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None:
        return
    if not folder.is_dir():
        raise ValueError(f"{what} {path} lies inside {folder}, which is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {folder} (permission denied)")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str | None = None, *, encoding: str | None = None
) -> Iterator[Any]:
    """Write a file so that readers see either the old file or the whole new one.

    The content goes to a temporary name in the same directory, is flushed to disk
    (fsync), then renamed over ``path`` with :func:`os.replace` (atomic on POSIX and
    Windows). If the block raises, the temporary file is removed and ``path`` is left
    untouched.

    Parameters
    ----------
    path : str or path-like
        The final file. Its directory must exist.
    mode : str, optional
        If given (``"w"``, ``"wb"``, ...), the context yields an open file object in
        that mode; otherwise it yields the temporary :class:`pathlib.Path` for a
        writer that takes file names (the writer must create it).
    encoding : str, optional
        Text encoding for text modes (default UTF-8).

    Yields
    ------
    pathlib.Path or file object
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    # A dot-name the final file can never have; the random part keeps parallel writers apart.
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        if mode is None:
            yield temporary
        else:
            if "b" not in mode and encoding is None:
                encoding = "utf-8"
            with open(temporary, mode, encoding=encoding) as handle:
                yield handle
        if not temporary.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {target}")
        descriptor = os.open(temporary, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX only; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_tiff_atomic(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    pixel_size_um: float | None = None,
    napari_smear_metadata: dict | None = None,
    **kwargs: Any,
) -> Path:
    """Write an array as (OME-)TIFF atomically.

    Parameters
    ----------
    path : str or path-like
        Target file; a name ending in ``.ome.tif``/``.ome.tiff`` writes OME-TIFF.
    array : numpy.ndarray
        The data, written with its own dtype.
    pixel_size_um : float, optional
        Stored as OME ``PhysicalSizeX/Y`` (OME-TIFF) and as resolution tags in pixels
        per centimetre (every TIFF), so :func:`read_image` and other tools recover it.
    napari_smear_metadata : dict, optional
        JSON-serialisable dict stored in the ImageDescription (plain TIFF only) and
        returned by :func:`read_image` as ``meta["napari_smear"]``; numpy scalars and
        arrays are converted, anything else unknown is stored as its string.
    **kwargs
        Passed to :func:`tifffile.imwrite` (e.g. ``compression="zlib"``, ``photometric``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import tifffile

    target = Path(path)
    array = np.asarray(array)
    is_ome = str(target).lower().endswith((".ome.tif", ".ome.tiff"))
    kwargs.setdefault("ome", is_ome)
    if pixel_size_um is not None:
        pixel_size_um = float(pixel_size_um)
        if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
            raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
        pixels_per_cm = 1e4 / pixel_size_um
        kwargs.setdefault("resolution", (pixels_per_cm, pixels_per_cm))
        kwargs.setdefault("resolutionunit", "CENTIMETER")
        if kwargs["ome"]:
            metadata = dict(kwargs.get("metadata") or {})
            metadata.setdefault("PhysicalSizeX", pixel_size_um)
            metadata.setdefault("PhysicalSizeY", pixel_size_um)
            metadata.setdefault("PhysicalSizeXUnit", "µm")
            metadata.setdefault("PhysicalSizeYUnit", "µm")
            kwargs["metadata"] = metadata
    if napari_smear_metadata is not None:
        if kwargs["ome"]:
            raise ValueError("napari_smear_metadata cannot be stored in an OME-TIFF; use .tif")
        kwargs["description"] = json.dumps(
            {METADATA_KEY: napari_smear_metadata}, default=_json_default, ensure_ascii=True
        )
        kwargs["metadata"] = None  # no second, 'shaped' description
    if kwargs["ome"] and array.ndim == 3 and array.shape[-1] in (3, 4):
        metadata = dict(kwargs.get("metadata") or {})
        metadata.setdefault("axes", "YXS")
        kwargs["metadata"] = metadata
    with atomic_write(target, "wb") as handle:
        tifffile.imwrite(handle, array, **kwargs)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, tuple, set)):
        return str(value) if isinstance(value, Path) else list(value)
    return str(value)


def write_csv_atomic(path: str | os.PathLike, df: Any, **kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    target = Path(path)
    with atomic_write(target, "w") as handle:
        df.to_csv(handle, lineterminator="\n", **kwargs)
    return target


def write_png_atomic(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (H, W), (H, W, 3) or (H, W, 4) uint8 image as PNG atomically."""
    import imageio.v3 as iio

    array = np.asarray(rgb)
    if array.dtype != np.uint8:
        raise TypeError(f"write_png_atomic expects uint8 pixels, got {array.dtype}; use as_rgb_uint8 first")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"write_png_atomic expects (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    target = Path(path)
    with atomic_write(target, "wb") as handle:
        iio.imwrite(handle, array, extension=".png")
    return target

