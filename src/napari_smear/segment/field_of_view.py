"""The part of an image that no light reached: the black surround of a photo taken
through a microscope eyepiece (a phone held to the ocular gives a round field in a
black frame), or the black fill of a slide scan's unscanned regions; and, no more a
part of the specimen, the white fill an export puts where nothing was scanned or the
image was transparent.

Nothing there is glass or stained matter, but to the colour model it looks like the
densest stain of the field: left in, a phone field came out as two "white cells" the
size of its black corners and no red cell at all. So the surround is found first and
painted with the glass the field would show there, and everything downstream (stain,
ruler, segmentation, crops) sees an ordinary field; cells cut by the rim of the view
are marked as cut, like cells cut by the image edge.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from . import binary

__all__ = ["find_outside_view", "find_white_fill", "find_overlay", "find_not_specimen", "fill_outside_view"]

# A pixel is "black" (no light) below this share of the glass brightness in its
# brightest channel. Stained matter transmits at least one channel: the darkest pixel
# of any of 600 BCCD, Chula and PBC fields measured 0.13 of its glass (Chula debris),
# nuclei about 0.35 and more (their blue).
_BLACK_SHARE = 0.2
# Black regions smaller than this share of the image are left alone (a dark speck or
# ink dot is not an unlit region); in those fields black covered at most 0.05 %.
_MIN_BLACK_AREA_SHARE = 0.01
# The rim of an eyepiece's field fades from black to glass over a few pixels: the
# fading band, where the brightest channel stays under this share of the glass, is
# outside the view too when it touches a black region.
_DIM_SHARE = 0.6
# The detection runs on a regular subsample of at most this many pixels, after a
# first glance at a sparser one.
_DETECT_PIXELS = 1_000_000
_GLANCE_PIXELS = 30_000


def _sample_step(shape: tuple[int, ...], max_pixels: int) -> int:
    """The stride of a regular subsample of at most ``max_pixels`` pixels (the fill
    must sample the mask as the detection did, so both take it from here)."""
    return max(1, int(math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels))))


def _checked_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got shape {rgb.shape}")
    return rgb


def _glance(rgb: np.ndarray) -> np.ndarray:
    """A sparse regular subsample (a few ten thousand pixels): enough to tell that most
    fields have no frame at all, for a millisecond."""
    step = _sample_step(rgb.shape[:2], _GLANCE_PIXELS)
    return rgb[::step, ::step]


def _full_size(mask: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """A mask found on the ``step`` subsample, at the image's size: each sample pixel
    stands for a step x step block."""
    if step == 1:
        return mask
    return np.repeat(np.repeat(mask, step, 0), step, 1)[: shape[0], : shape[1]]


def _brightness(sample: np.ndarray) -> np.ndarray:
    # the brightest channel, over 3 x 3 pixels (JPEG noise in the black)
    return ndi.uniform_filter(sample.max(-1).astype(np.float32), 3)


def find_outside_view(rgb: np.ndarray) -> np.ndarray | None:
    """Where no light reached the camera, or None when the whole image is lit.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        A stained field.

    Returns
    -------
    (H, W) bool or None
        True outside the illuminated view: black regions covering at least 1 % of the
        image, with the dim band around them where they fade into the view, and a
        margin of two sample pixels. None when there is none (most fields), so the
        common case costs one pass over a subsample.
    """
    rgb = _checked_rgb(rgb)
    h, w = rgb.shape[:2]
    # Most fields have no black at all: a coarse look (a tenth of the pixels at most,
    # unsmoothed, a looser limit) settles them for a millisecond instead of ten.
    glance = _glance(rgb).max(-1)
    glance_glass = float(np.percentile(glance, 90))
    if glance_glass < 20 or (glance < 1.5 * _BLACK_SHARE * glance_glass).mean() < _MIN_BLACK_AREA_SHARE / 2:
        return None
    step = _sample_step((h, w), _DETECT_PIXELS)
    sample = rgb[::step, ::step]
    bright = _brightness(sample)
    glass = float(np.percentile(bright, 90))
    if glass < 20:  # a dark or blank image: nothing to tell apart
        return None
    black = bright < _BLACK_SHARE * glass
    if black.mean() < _MIN_BLACK_AREA_SHARE:
        return None
    pieces, n = ndi.label(black)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    big = np.flatnonzero(sizes >= _MIN_BLACK_AREA_SHARE * black.size)
    big = big[big > 0]
    if not big.size:
        return None
    # grow into the fading rim: the dim pieces that hold a large black region
    dim_pieces, _ = ndi.label(bright < _DIM_SHARE * glass)
    seeds = np.unique(dim_pieces[np.isin(pieces, big)])
    outside = np.isin(dim_pieces, seeds[seeds > 0])
    outside = binary.dilate(outside, binary.disk_rows(2))
    if outside.all():
        return None
    return _full_size(outside, step, (h, w))


# White fill: a slide viewer's export fills the unscanned or transparent parts of a
# region with white, and an RGBA image's transparent pixels are composited onto white.
# To the colour model that white is the glass (the brightest pixels of the field) and
# the real glass reads as stain. A fill is saturated (every channel at least this; JPEG
# noise keeps pure white above it), covers at least _MIN_BLACK_AREA_SHARE of the image in
# pieces that reach its edge, and ends in a step down to the field: a band just outside
# it is clearly darker than white, and most of it belongs to one connected region of
# unsaturated pixels (the field's glass joins its cells into one). Overexposed glass is
# saturated too, but it either fades into the glass round it (a band near white) or,
# drawn with sharp edges, borders its many separate cells.
_WHITE_LEVEL = 250
_WHITE_EDGE_MAX = 235  # median brightness of the band, at most
_WHITE_ONE_NEIGHBOUR_SHARE = 0.5


def find_white_fill(rgb: np.ndarray) -> np.ndarray | None:
    """Where a white fill (not glass) borders the field, or None (most fields).

    Parameters
    ----------
    rgb : (H, W, 3) uint8

    Returns
    -------
    (H, W) bool or None
        True on saturated white regions that reach the image edge, cover at least 1 %
        of the image and end in a step down to the field (see the comment above), with
        a margin of two sample pixels.
    """
    rgb = _checked_rgb(rgb)
    h, w = rgb.shape[:2]
    glance = _glance(rgb).min(-1)
    if (glance >= _WHITE_LEVEL).mean() < _MIN_BLACK_AREA_SHARE / 2:
        return None
    step = _sample_step((h, w), _DETECT_PIXELS)
    sample = rgb[::step, ::step]
    white = sample.min(-1) >= _WHITE_LEVEL
    if white.mean() < _MIN_BLACK_AREA_SHARE or white.all():
        return None
    pieces, n = ndi.label(white)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    edge = np.unique(np.r_[pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]])
    candidates = [int(k) for k in edge if k > 0 and sizes[k] >= _MIN_BLACK_AREA_SHARE * white.size]
    if not candidates:
        return None
    brightness = _brightness(sample)
    neighbours, _ = ndi.label(~white)
    fill = np.zeros_like(white)
    for k in candidates:
        piece = pieces == k
        # a band 3-6 sample pixels out: past the JPEG ringing of a sharp edge
        band = binary.dilate(piece, binary.disk_rows(6)) & ~binary.dilate(piece, binary.disk_rows(3))
        if not band.any() or float(np.median(brightness[band])) > _WHITE_EDGE_MAX:
            continue
        owners = neighbours[band]
        owners = owners[owners > 0]
        if owners.size and np.bincount(owners).max() >= _WHITE_ONE_NEIGHBOUR_SHARE * owners.size:
            fill |= piece
    if not fill.any():
        return None
    fill = binary.dilate(fill, binary.disk_rows(2))
    return _full_size(fill, step, (h, w))


# Burned-in annotations: a pixel is overlay where its green exceeds both its red and its
# blue by this much. Romanowsky stains absorb green most of all (eosin and the azures
# alike), so stained matter is never green; glass is grey. On 100 Chula fields 23 held
# such pixels (up to 657: green scale bars and their labels), on 59 BCCD fields and 64
# PBC images none.
_OVERLAY_GREEN_EXCESS = 40
_MIN_OVERLAY_PIXELS = 8
# Camera programs burn annotations into camera fields; slide scans and mosaics larger
# than this are not searched: painting would copy the whole image (on the 100 MP
# benchmark mosaic of Chula fields, peak memory 1.6 -> 2.3 GB and 23 -> 27 s).
_OVERLAY_MAX_PIXELS = 50_000_000


def find_overlay(rgb: np.ndarray) -> np.ndarray | None:
    """Annotations burned into the image in green (scale bars, their labels), which
    camera programs draw and which segmentation would take for cells; None when there
    are none (most images).

    Images over 50 MP (slide scans, mosaics: no camera program annotates them) are not
    searched.

    Returns
    -------
    (H, W) bool or None
        True on the annotation and two pixels around it (the anti-aliased edges of
        its strokes are paler greens).
    """
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    if h * w > _OVERLAY_MAX_PIXELS:
        return None
    # most images have none: a look at every other row and column settles them (a
    # stroke of a scale bar or its label is wider than one pixel)
    if _green_excess(rgb[::2, ::2]).sum() < _MIN_OVERLAY_PIXELS // 4:
        return None
    ys, xs = [], []
    for start in range(0, h, 1024):  # row blocks: no image-sized temporaries
        yy, xx = np.nonzero(_green_excess(rgb[start : start + 1024]))
        ys.append(yy + start)
        xs.append(xx)
    ys, xs = np.concatenate(ys), np.concatenate(xs)
    if len(ys) < _MIN_OVERLAY_PIXELS:
        return None
    # grown by two pixels where the strokes are (not a pass over the whole image)
    mask = np.zeros((h, w), bool)
    for dy, half_width in binary.disk_rows(2).items():
        for dx in range(-half_width, half_width + 1):
            mask[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = True
    return mask


def _green_excess(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose green exceeds both their red and their blue by the overlay margin."""
    block = rgb.astype(np.int16)
    return block[..., 1] - np.maximum(block[..., 0], block[..., 2]) > _OVERLAY_GREEN_EXCESS


def find_not_specimen(rgb: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """What is painted as glass before a field is segmented or cropped:
    ``(either, outside_view, overlay)``, each an (H, W) bool mask or None (see
    :func:`find_outside_view` and :func:`find_overlay`)."""
    outside, overlay, white = find_outside_view(rgb), find_overlay(rgb), find_white_fill(rgb)
    if white is not None:  # a white fill is outside the view as much as a black one
        outside = white if outside is None else outside | white
    if outside is None or overlay is None:
        return (outside if overlay is None else overlay), outside, overlay
    return outside | overlay, outside, overlay


def fill_outside_view(rgb: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` with the pixels outside the view painted as glass.

    The glass colour follows the field's illumination: a smooth surface (a quadratic,
    as the stain model fits for vignetting) is fitted to the glass inside the view and
    extended outwards, so the painted region continues the glass at the rim instead of
    leaving a step that would read as a faint stained ring.
    """
    from .stain import _log_channels, _threshold, estimate_background, fit_illumination, illumination_surface

    rgb = np.asarray(rgb)
    outside = np.asarray(outside, bool)
    if outside.shape != rgb.shape[:2]:
        raise ValueError(f"outside must be (H, W) = {rgb.shape[:2]}, got {outside.shape}")
    h, w = rgb.shape[:2]
    step = _sample_step((h, w), _DETECT_PIXELS)
    sample = rgb[::step, ::step]
    sample_outside = outside[::step, ::step]
    inside_pixels = sample[~sample_outside]
    if not len(inside_pixels):
        raise ValueError("the whole image lies outside the view: nothing to segment")
    background = estimate_background(inside_pixels.reshape(-1, 1, 3))
    level = float(np.log(background).sum())
    log_sum, _ = _log_channels(sample)
    threshold = _threshold((level - log_sum)[~sample_outside].reshape(-1, 1))
    # NaN is never glass to the fit, so the surface is fitted to the view alone
    log_sum[sample_outside] = np.nan
    fit = fit_illumination(log_sum, level, threshold) if np.isfinite(threshold) else None
    filled = _copy_like(rgb)
    if fit is None:
        filled[outside] = np.round(background).astype(np.uint8)
        return filled
    coef, degree, lo, hi = fit
    # Unclipped, the painted glass continues the view's vignetting, so the glass fit
    # of every tile finds the same surface through it; but never darker than half the
    # view's darkest glass in each channel (a steep fit far out in a corner).
    surface = np.clip(illumination_surface(coef, degree, sample.shape[:2]), lo + 3 * math.log(0.5), hi)
    # the surface's share of the glass density, spread evenly over the channels
    colour = background[None, None, :] * np.exp((surface - level) / 3)[..., None]
    colour = np.clip(np.round(colour), 0, 255).astype(np.uint8)
    if step > 1:
        rows = np.minimum(np.arange(h) // step, colour.shape[0] - 1)
        cols = np.minimum(np.arange(w) // step, colour.shape[1] - 1)
        for start in range(0, h, 1024):  # row blocks: no image-sized temporaries
            block = slice(start, min(h, start + 1024))
            painted = colour[rows[block]][:, cols]
            where = outside[block]
            filled[block][where] = painted[where]
    else:
        filled[outside] = colour[outside]
    return filled


def _copy_like(rgb: np.ndarray) -> np.ndarray:
    """A writable copy of ``rgb``; of a memory-mapped image (a slide larger than
    memory, see :func:`napari_smear.io.open_image_on_disk`) a copy in an anonymous
    temporary file, so painting its frame does not need the slide's size in memory."""
    import tempfile

    from ..io import is_memory_mapped

    if not is_memory_mapped(rgb):
        return rgb.copy()

    copy = np.memmap(tempfile.TemporaryFile(), dtype=rgb.dtype, mode="w+", shape=rgb.shape)
    for start in range(0, rgb.shape[0], 1024):
        copy[start : start + 1024] = rgb[start : start + 1024]
    return copy
