"""Colour handling: background (slide glass) and illumination, optical density,
foreground and nucleus scores.

Everything is expressed relative to the field's own glass, so the same code works for
pale phone-camera fields and saturated CellaVision crops. Uneven illumination
(vignetting: BCCD corners are about 10 % darker than the centre, which is as much
optical density as a pale red cell) is removed by fitting a smooth surface to the
brightness of the glass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu

# Below this optical density, a pixel cannot be stained matter whatever the histogram
# says (JPEG noise on the glass stays well under it).
_MIN_FOREGROUND_OD = 0.10
# The illumination surface is fitted to at most this many glass samples.
_ILLUMINATION_SAMPLES = 4_096
# Glass must cover at least this share of the sampled pixels for a quadratic
# (vignetting) fit; down to a tenth of that a plane is fitted; below, none.
_MIN_GLASS_SHARE = 0.10


@dataclass(frozen=True)
class StainModel:
    """Per-field colour statistics, estimated once and reused for every tile."""

    background_rgb: tuple[float, float, float]
    foreground_threshold: float  # on summed optical density
    rbc_hue: float  # typical (OD_R - OD_B) of red cells: the field's reference colour
    nucleus_threshold: float  # on (OD_R - OD_B): violet nuclei and platelets
    cytoplasm_threshold: float  # on (OD_R - OD_B): bluish WBC cytoplasm
    # colour of red cells as shares of the optical density in R, G, B (the stain's
    # hue whatever its strength), and the spread of red-cell pixels around it
    rbc_chroma: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    chroma_spread: float = 0.1
    # the glass/stain split the field's illumination surface was fitted with (on the
    # density before flattening; NaN: none). Tiles and ruler windows fit theirs with it
    # too where the tighter flattened threshold loses the glass of a darkened rim (see
    # stain_channels).
    illumination_threshold: float = float("nan")


def optical_density(rgb: np.ndarray, background_rgb) -> np.ndarray:
    """(H, W, 3) float32 optical density relative to the background colour."""
    bg = np.asarray(background_rgb, dtype=np.float32)
    return np.log(bg / np.maximum(rgb.astype(np.float32), 1.0)).astype(np.float32)


# log of every 8-bit value (0 read as 1): a table lookup is 2.4 times as fast as the
# logarithm of the whole image, and gives the same float32 values
_LOG_UINT8 = np.log(np.maximum(np.arange(256), 1).astype(np.float32))
# mean of three 8-bit values by their sum, as float32 ((r + g + b) / 3, rounded once)
_MEAN_OF_THREE_UINT8 = np.arange(3 * 255 + 1, dtype=np.float32) / np.float32(3)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """Slide-glass colour: the median colour of the brightest tenth of the pixels."""
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 400_000:  # a regular subsample is enough for a median
        flat = flat[:: flat.shape[0] // 400_000]
    if flat.dtype == np.uint8:  # the same values as below, without a float copy
        total = flat[:, 0].astype(np.uint16)
        total += flat[:, 1]
        total += flat[:, 2]
        brightness = _MEAN_OF_THREE_UINT8[total]
    else:
        brightness = flat.astype(np.float32).mean(1)
    bright = flat[brightness >= np.percentile(brightness, 90)]
    # at least 1, as the pixels are in the logarithms (a black field has no glass colour)
    return np.maximum(np.median(bright, axis=0), 1.0).astype(np.float32)


def _log_channels(rgb: np.ndarray):
    """Summed log intensity and log(R) - log(B) of every pixel (float32)."""
    if rgb.dtype == np.uint8:
        red, green, blue = (_LOG_UINT8[rgb[..., c]] for c in range(3))
        total = red + green
        total += blue  # (R + G) + B: the order of lr.sum(-1) below
        return total, red - blue
    lr = np.log(np.maximum(rgb, 1).astype(np.float32))
    return lr.sum(-1), lr[..., 0] - lr[..., 2]


def _design(ys: np.ndarray, xs: np.ndarray, degree: int) -> np.ndarray:
    terms = [np.ones_like(ys)]
    if degree >= 1:
        terms += [ys, xs]
    if degree >= 2:
        terms += [ys * ys, ys * xs, xs * xs]
    return np.stack(terms, -1)


def _illumination(log_sum: np.ndarray, level: float, threshold: float) -> np.ndarray:
    """Summed log intensity of the glass at every pixel: a smooth surface.

    Glass is what lies below the foreground threshold; a quadratic in the image
    coordinates (a plane when glass is scarce) is fitted to it by least squares and
    refitted twice, each time with the glass found under the previous surface, so
    that vignetted corners first mistaken for stained matter join the fit. The
    surface is clipped to the range of the fitted glass, so it never extrapolates
    into regions without glass (a crowded corner, a crop filled by one cell).
    Returns ``level`` (the global glass) as a constant where no fit is possible.
    """
    h, w = log_sum.shape
    fit = fit_illumination(log_sum, level, threshold)
    if fit is None:
        return np.full((h, w), level, np.float32)
    coef, degree, lo, hi = fit
    full = illumination_surface(coef, degree, (h, w))
    return np.clip(full, lo, hi, out=full)


def fit_illumination(log_sum: np.ndarray, level: float, threshold: float):
    """The fit of :func:`_illumination`: ``(coef, degree, lo, hi)`` (the quadratic's or
    plane's coefficients over coordinates scaled to [-1, 1], and the range of the
    glass it was fitted to), or None when the field has too little glass. NaN pixels
    are never glass (left out of the fit)."""
    h, w = log_sum.shape
    step = max(1, int(np.sqrt(h * w / _ILLUMINATION_SAMPLES)))
    sample = log_sum[step // 2 :: step, step // 2 :: step]
    sy = (np.arange(sample.shape[0]) * step + step // 2) / max(h - 1, 1) * 2 - 1
    sx = (np.arange(sample.shape[1]) * step + step // 2) / max(w - 1, 1) * 2 - 1
    yy, xx = np.meshgrid(sy.astype(np.float32), sx.astype(np.float32), indexing="ij")
    surface = np.full(sample.shape, level, np.float32)
    coef, degree, lo, hi = None, 0, level, level
    for _ in range(3):
        glass = (surface - sample) < threshold * 0.5
        share = glass.mean()
        degree = 2 if share >= _MIN_GLASS_SHARE else 1 if share >= _MIN_GLASS_SHARE / 10 else -1
        if degree < 0 or glass.sum() < 20:
            return None
        a = _design(yy[glass], xx[glass], degree)
        values = sample[glass]
        coef = np.linalg.lstsq(a, values, rcond=None)[0]
        # one robust step: drop glass samples far from the fit (dust, cell edges)
        resid = values - a @ coef
        mad = np.median(np.abs(resid - np.median(resid))) + 1e-6
        keep = np.abs(resid) < 4 * 1.4826 * mad
        if keep.sum() > a.shape[1] * 5:
            coef = np.linalg.lstsq(a[keep], values[keep], rcond=None)[0]
            values = values[keep]
        lo, hi = float(values.min()), float(values.max())
        surface = np.clip(_design(yy, xx, degree) @ coef, lo, hi).astype(np.float32)
    return coef, degree, lo, hi


def illumination_surface(coef, degree: int, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 value of a :func:`fit_illumination` fit, unclipped."""
    h, w = shape
    gy = (np.arange(h, dtype=np.float32) / max(h - 1, 1) * 2 - 1)[:, None]
    gx = (np.arange(w, dtype=np.float32) / max(w - 1, 1) * 2 - 1)[None, :]
    full = np.full((h, w), coef[0], np.float32)
    if degree >= 1:
        full += coef[1] * gy + coef[2] * gx
    if degree >= 2:
        full += coef[3] * gy * gy + coef[4] * gy * gx + coef[5] * gx * gx
    return full


# A tile's glass surface is fitted again with the field's wider glass/stain split when
# the tight split leaves more than this share of its pixels stained that the wide one
# calls glass. Ordinary fields: at most 0.025 of a PBC image (632 sampled), 0.058 of a
# Chula field (all 498); 2 % of BCCD's 292 fields exceed it (up to 0.2, darkened rims).
# Darkened 10 % towards the rim: median 0.086 on BCCD, 0.053 on Chula.
_GLASS_LOST_SHARE = 0.05

# Histogram thresholds are computed on at most this many pixels (a regular sample).
_THRESHOLD_SAMPLES = 1 << 18


# The flattened field's glass/stain split is checked against the split of the log
# density (glass against everything stained): where it leaves less than this share of
# those pixels stained, it has put the red cells with the glass (see _threshold).
# Measured share: BCCD and Chula fields 0.73 or more, PBC images 0.56 or more except
# 2.4 % of them (31 of 1,271 sampled, mostly eosinophils among pale red cells), 0.19-0.40.
_MIN_STAINED_SHARE_OF_LOG_SPLIT = 0.48


def _threshold(density: np.ndarray, *, keep_red_cells: bool = False) -> float:
    """Glass / stained-matter split of a density image.

    With ``keep_red_cells``, a split that would leave most of the stained matter with
    the glass is replaced by the first split of four classes (glass, red cells,
    cytoplasm, nuclei).
    """
    step = int(np.ceil(np.sqrt(density.size / _THRESHOLD_SAMPLES)))
    if step > 1:
        density = density[::step, ::step]
    # Otsu on log density separates glass (a tight cluster near 0) from stained matter
    # even when a very dark nucleus would drag a linear-scale Otsu up into the cells.
    log_density = np.log(np.clip(density, 0, None) + 0.03)
    # Three classes (glass, cells, nuclei) find the glass/cell split in crowded pale
    # fields and in crops dominated by one dark nucleus alike; the two-class splits in
    # log and linear density bound it so that a field without nuclei cannot push it
    # into the red cells.
    try:
        low = float(np.exp(threshold_otsu(log_density)) - 0.03)
        high = float(threshold_otsu(density))
        try:
            three = float(threshold_multiotsu(density, 3)[0])
        except ValueError:  # fewer than three grey levels: two classes say it all
            three = high
        t = min(max(three, low), max(high, low))
    except ValueError:  # constant image
        t = np.inf
    if keep_red_cells and np.isfinite(t):
        # Very pale red cells round a dark white cell (a CellaVision image of an
        # eosinophil, say) make three classes of glass + red cells, cytoplasm and
        # nucleus: only the white cell was stained, and the ruler found no red cell.
        stained_by_log_split = float((density > max(low, _MIN_FOREGROUND_OD)).mean())
        if float((density > t).mean()) < _MIN_STAINED_SHARE_OF_LOG_SPLIT * stained_by_log_split:
            try:
                t = max(float(threshold_multiotsu(density, 4)[0]), low)
            except ValueError:
                t = low
    return max(t, _MIN_FOREGROUND_OD)


def estimate_stain(rgb: np.ndarray) -> StainModel:
    """Estimate the colour statistics of a field (or a representative sample of it)."""
    return _estimate_stain(rgb)[0]


@dataclass
class FieldChannels:
    """The log channels of one field and the glass surfaces fitted to them, kept by
    :func:`_estimate_stain` so that :func:`stain_channels` on the same pixels (the
    ruler on a field measured whole) does not compute them again."""

    log_sum: np.ndarray
    log_hue: np.ndarray
    surfaces: dict  # glass/stain split -> _illumination surface (never written to)


def _estimate_stain(rgb: np.ndarray) -> tuple[StainModel, FieldChannels]:
    bg = estimate_background(rgb)
    log_sum, log_hue = _log_channels(rgb)
    channels = FieldChannels(log_sum, log_hue, {})
    level = float(np.log(bg).sum())
    density = level - log_sum
    t = _threshold(density)
    fit_threshold = t
    if np.isfinite(t):  # the threshold is measured again once the illumination is flat
        surface = channels.surfaces[t] = _illumination(log_sum, level, t)
        density = surface - log_sum
        t = _threshold(density, keep_red_cells=True)
    hue = float(np.log(bg[0] / bg[2])) - log_hue
    fg = density > t
    chroma, spread = (1 / 3, 1 / 3, 1 / 3), 0.1
    if fg.sum() < 50:
        rbc_hue = -0.12
    else:
        # The lower half of the stained pixels is red-cell (or at least non-nuclear)
        # colour in every smear: red cells outnumber everything else by far.
        rbc_hue = float(np.percentile(hue[fg], 30))
        reference = fg & (hue <= np.percentile(hue[fg], 50))
        # only the reference pixels' densities are needed (not the whole image's)
        od = _channel_density(rgb[reference], bg, density[reference] - (level - log_sum[reference]))
        shares = od / np.maximum(od.sum(-1, keepdims=True), 1e-3)
        chroma = tuple(float(v) for v in np.median(shares, 0))
        spread = max(float(np.percentile(np.linalg.norm(shares - chroma, axis=-1), 90)), 0.02)
    stain = StainModel(
        background_rgb=tuple(float(v) for v in bg),
        foreground_threshold=t,
        rbc_hue=rbc_hue,
        nucleus_threshold=rbc_hue + 0.30,
        cytoplasm_threshold=rbc_hue + 0.09,
        rbc_chroma=chroma,
        chroma_spread=spread,
        illumination_threshold=float(fit_threshold),
    )
    return stain, channels


def _channel_density(rgb: np.ndarray, bg: np.ndarray, correction: np.ndarray) -> np.ndarray:
    """(H, W, 3) optical density per channel; ``correction`` (the illumination's
    share of the summed density) is taken off evenly from the three channels."""
    od = np.log(np.asarray(bg, np.float32) / np.maximum(rgb, 1).astype(np.float32))
    od += (correction / 3)[..., None]
    return od


def stain_channels(rgb: np.ndarray, stain: StainModel, channels: FieldChannels | None = None):
    """Density (stained matter) and hue (violet vs red) channels of a field.

    Density is relative to the field's own illumination (see :func:`_illumination`);
    hue (OD_R - OD_B) is relative to the glass colour. ``channels``: what
    :func:`_estimate_stain` kept of these very pixels, reused.
    """
    bg = np.asarray(stain.background_rgb, np.float32)
    if channels is None:
        log_sum, log_hue = _log_channels(rgb)
        surfaces = {}
    else:
        log_sum, log_hue, surfaces = channels.log_sum, channels.log_hue, channels.surfaces
    level = float(np.log(bg).sum())

    def illumination(threshold: float) -> np.ndarray:
        if threshold in surfaces:
            return surfaces[threshold] - log_sum
        density = _illumination(log_sum, level, threshold)
        density -= log_sum
        return density

    if np.isfinite(stain.foreground_threshold):
        threshold = stain.foreground_threshold
        density = illumination(threshold)
        wide = stain.illumination_threshold
        if np.isfinite(wide) and wide != threshold:
            # Fitted with the tight split, the glass of a strongly vignetted field is
            # only its brightest part and the darkened rim reads as stain; fitted with
            # the field's own wider split it does not. The wide fit is taken only when
            # the tight one leaves much more stained: on ordinary fields the two differ
            # by a percent of the pixels (the wide one darker under pale cells).
            wide_density = illumination(wide)
            lost = float((density > threshold).mean() - (wide_density > threshold).mean())
            if lost > _GLASS_LOST_SHARE:
                density = wide_density
    else:
        density = level - log_sum
    hue = np.float32(np.log(bg[0] / bg[2])) - log_hue
    return density, hue


def colour_distance(rgb: np.ndarray, density: np.ndarray, stain: StainModel) -> np.ndarray:
    """How far each pixel's colour (its shares of optical density in R, G, B) lies
    from the red cells' colour, in units of the red cells' own spread.

    ``density`` is the pixel's (illumination-corrected) density from
    :func:`stain_channels`; 0 is returned where the pixel is too faint for its
    colour to mean anything.
    """
    bg = np.asarray(stain.background_rgb, np.float32)
    log_sum, _ = _log_channels(rgb)
    od = _channel_density(rgb, bg, density - (float(np.log(bg).sum()) - log_sum))
    od /= np.maximum(density, 1e-3)[..., None]
    od -= np.asarray(stain.rbc_chroma, np.float32)
    distance = np.sqrt((od * od).sum(-1)) / np.float32(stain.chroma_spread)
    distance[density < 0.25 * min(stain.foreground_threshold, 1e3)] = 0
    return distance
