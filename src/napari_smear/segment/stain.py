"""Colour handling: background estimate, optical density, foreground and nucleus scores.

Everything is expressed relative to the field's own background (the slide glass), so
the same code works for pale phone-camera fields and saturated CellaVision crops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu

# Below this optical density, a pixel cannot be stained matter whatever the histogram
# says (JPEG noise on the glass stays well under it).
_MIN_FOREGROUND_OD = 0.10


@dataclass(frozen=True)
class StainModel:
    """Per-field colour statistics, estimated once and reused for every tile."""

    background_rgb: tuple[float, float, float]
    foreground_threshold: float  # on summed optical density
    rbc_hue: float  # typical (OD_R - OD_B) of red cells: the field's reference colour
    nucleus_threshold: float  # on (OD_R - OD_B): violet nuclei and platelets
    cytoplasm_threshold: float  # on (OD_R - OD_B): bluish WBC cytoplasm


def optical_density(rgb: np.ndarray, background_rgb) -> np.ndarray:
    """(H, W, 3) float32 optical density relative to the background colour."""
    bg = np.asarray(background_rgb, dtype=np.float32)
    return np.log(bg / np.maximum(rgb.astype(np.float32), 1.0)).astype(np.float32)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """Slide-glass colour: the median colour of the brightest tenth of the pixels."""
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 400_000:  # a regular subsample is enough for a median
        flat = flat[:: flat.shape[0] // 400_000]
    brightness = flat.astype(np.float32).mean(1)
    bright = flat[brightness >= np.percentile(brightness, 90)]
    return np.median(bright, axis=0).astype(np.float32)


def estimate_stain(rgb: np.ndarray) -> StainModel:
    """Estimate the colour statistics of a field (or a representative sample of it)."""
    bg = estimate_background(rgb)
    od = optical_density(rgb, bg)
    density = od.sum(-1)
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
            three = float(threshold_multiotsu(density[:: max(1, density.shape[0] // 512), :: max(1, density.shape[1] // 512)], 3)[0])
        except ValueError:  # fewer than three grey levels: two classes say it all
            three = high
        t = min(max(three, low), max(high, low))
    except ValueError:  # constant image
        t = np.inf
    t = max(t, _MIN_FOREGROUND_OD)
    hue = od[..., 0] - od[..., 2]
    fg = density > t
    if fg.sum() < 50:
        rbc_hue = -0.12
    else:
        # The lower half of the stained pixels is red-cell (or at least non-nuclear)
        # colour in every smear: red cells outnumber everything else by far.
        rbc_hue = float(np.percentile(hue[fg], 30))
    return StainModel(
        background_rgb=tuple(float(v) for v in bg),
        foreground_threshold=t,
        rbc_hue=rbc_hue,
        nucleus_threshold=rbc_hue + 0.30,
        cytoplasm_threshold=rbc_hue + 0.09,
    )


def stain_channels(rgb: np.ndarray, stain: StainModel):
    """Density (stained matter) and hue (violet vs red) channels of a field."""
    od = optical_density(rgb, stain.background_rgb)
    density = od.sum(-1)
    hue = od[..., 0] - od[..., 2]
    return density, hue
