"""Stain normalisation anchored on the field's own red cells and nuclei.

Two smears of the same cell type can look very different: another microscope, camera,
illuminant, stain batch or staining time (a BCCD camera field is cold grey and deep
pink, a CellaVision PBC crop warm beige and lilac). A classifier trained on one sees the
other as a different cell. :func:`normalize_stain` maps a field onto reference colours
using three things every segmented smear field has:

* the **glass** (slide background): the illuminant and camera colour balance;
* the **red cells**: the eosin-like (acidic) stain;
* the **white-cell nuclei**: the azure/haematoxylin-like (basic) stain.

In optical density (OD = log(glass / I), per channel) a pixel stained by two dyes is a
mix ``s * a + t * n`` of their colours ``a`` and ``n``. The linear map that takes the
field's red-cell OD ``a`` to the reference ``a_ref``, its nucleus OD ``n`` to ``n_ref``
(and the direction perpendicular to both to its reference counterpart) recolours every
such mixture consistently: eosinophil granules, lilac neutrophil cytoplasm and blue
lymphocyte cytoplasm land where the reference stain would have put them. It is Macenko
stain normalisation with the stain vectors read off segmented cells rather than
guessed from the histogram, which is what makes it stable on small fields with one
white cell.

A field without white cells is normalised from its red cells alone (a per-channel
scaling), one without red cells from its nuclei alone; one with neither only has its
glass mapped to the reference glass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .segment.stain import estimate_background
from .segment.types import SmearSegmentation

#: Name recorded in model metadata and crop sets made with :func:`normalize_stain`.
METHOD = "anchored-v1"


@dataclass(frozen=True)
class StainAnchors:
    """The colours one field is normalised by.

    Attributes
    ----------
    glass : (3,) float
        Glass colour (RGB, 0-255).
    rbc_od, nucleus_od : (3,) float or None
        Mean optical density (natural log, per channel) of the red-cell and the
        white-cell nucleus pixels; None when the field has none.
    """

    glass: tuple[float, float, float]
    rbc_od: tuple[float, float, float] | None
    nucleus_od: tuple[float, float, float] | None


#: Median anchors of 397 PBC training crops (CellaVision DM96, May-Grunwald-Giemsa),
#: measured with ``scripts/stain_reference.py``: the colours the built-in white-cell
#: model was trained in.
PBC_REFERENCE = StainAnchors(
    glass=(255.0, 228.0, 203.0),
    rbc_od=(0.21, 0.30, 0.19),
    nucleus_od=(1.01, 1.64, 0.38),
)

# Channel values darker than this are left out of that channel's anchor mean: JPEG and
# sensor saturation make their OD meaningless.
_MIN_INTENSITY = 4.0
# Anchors are measured on a regular subsample of about this many pixels.
_ANCHOR_SAMPLES = 80_000
# At least this many pixels make an anchor.
_MIN_PIXELS = 30
# Anchors whose OD directions are closer than this (|cos| above) cannot be told apart:
# the two-stain map would be ill-conditioned, so the per-channel scaling is used.
_MAX_COSINE = 0.995
# Per-channel scalings are kept within these bounds (a field stained 5x weaker or
# stronger than the reference is not a smear we can recolour faithfully).
_SCALE_RANGE = (0.2, 5.0)


def stain_anchors(rgb: np.ndarray, segmentation: SmearSegmentation) -> StainAnchors:
    """Measure the glass, red-cell and nucleus colours of a segmented field.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    segmentation : SmearSegmentation
        The field's segmentation (its labels, nuclei and cell types).
    """
    rgb = np.asarray(rgb)
    labels, nuclei, table = segmentation.labels, segmentation.nuclei, segmentation.table
    # a regular subsample is plenty for three mean colours (a nucleus keeps hundreds of pixels)
    step = max(1, int(np.sqrt(labels.size / _ANCHOR_SAMPLES)))
    if step > 1:
        rgb, labels, nuclei = rgb[::step, ::step], labels[::step, ::step], nuclei[::step, ::step]
    glass = np.maximum(estimate_background(rgb).astype(np.float64), 1.0)
    rbc_od = nucleus_od = None
    if len(table):
        is_rbc = np.zeros(int(labels.max()) + 1, bool)
        rbc_ids = table.label[table.cell_type == "rbc"].to_numpy(np.int64)
        is_rbc[rbc_ids[rbc_ids < is_rbc.size]] = True
        # the inner part of each red cell: its rim mixes with the glass
        rbc_pixels = is_rbc[labels] & (nuclei == 0)
        rbc_od = _mean_od(rgb, rbc_pixels, glass)
        nucleus_od = _mean_od(rgb, nuclei > 0, glass)
    return StainAnchors(
        tuple(float(v) for v in glass),
        None if rbc_od is None else tuple(float(v) for v in rbc_od),
        None if nucleus_od is None else tuple(float(v) for v in nucleus_od),
    )


def _mean_od(rgb, mask, glass):
    pixels = rgb[mask]
    if len(pixels) < _MIN_PIXELS:
        return None
    # mean of log(glass / value) per channel from a histogram of the 8-bit values
    levels = np.arange(256, dtype=np.float64)
    usable = levels >= _MIN_INTENSITY
    od = np.empty(3)
    for c in range(3):
        counts = np.bincount(pixels[:, c], minlength=256)[usable]
        if counts.sum() < _MIN_PIXELS:
            return None
        od[c] = (counts * np.log(glass[c] / levels[usable])).sum() / counts.sum()
    return np.maximum(od, 1e-3)


def stain_matrix(anchors: StainAnchors, reference: StainAnchors = PBC_REFERENCE) -> np.ndarray:
    """The (3, 3) map of optical densities from ``anchors``' stain to ``reference``'s.

    ``od_reference = M @ od_field`` for every pixel (identity when the field has
    neither red cells nor nuclei).
    """
    a, n = anchors.rbc_od, anchors.nucleus_od
    a_ref, n_ref = reference.rbc_od, reference.nucleus_od
    if a is not None and n is not None and a_ref is not None and n_ref is not None:
        a, n, a_ref, n_ref = (np.asarray(v, np.float64) for v in (a, n, a_ref, n_ref))
        cosine = abs(a @ n) / (np.linalg.norm(a) * np.linalg.norm(n))
        if cosine < _MAX_COSINE:
            # the third direction carries neither stain (the residual: noise, dust,
            # refraction); it is mapped with the mean scale of the two stains
            third = np.cross(a, n)
            third_ref = np.cross(a_ref, n_ref)
            scale = (np.linalg.norm(a_ref) / np.linalg.norm(a) + np.linalg.norm(n_ref) / np.linalg.norm(n)) / 2
            third_ref = third_ref / np.linalg.norm(third_ref) * np.linalg.norm(third) * scale
            source = np.stack([a, n, third], axis=1)
            target = np.stack([a_ref, n_ref, third_ref], axis=1)
            return target @ np.linalg.inv(source)
    one = a if a is not None and a_ref is not None else n if n is not None and n_ref is not None else None
    if one is None:
        return np.eye(3)
    one_ref = a_ref if one is a else n_ref
    scale = np.clip(np.asarray(one_ref) / np.asarray(one), *_SCALE_RANGE)
    return np.diag(scale)


def check_method(method: str) -> None:
    """Raise ValueError unless ``method`` is a stain normalisation this version knows."""
    if method != METHOD:
        raise ValueError(
            f"stain normalisation {method!r} is not known to this version of napari-smear "
            f"(it knows {METHOD!r}); a model trained with it needs a newer napari-smear"
        )


def normalize_stain(
    rgb: np.ndarray,
    segmentation: SmearSegmentation,
    reference: StainAnchors = PBC_REFERENCE,
    *,
    anchors: StainAnchors | None = None,
) -> np.ndarray:
    """Recolour a segmented field into the reference stain (see the module notes).

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        The field.
    segmentation : SmearSegmentation
        Its segmentation: red cells and white-cell nuclei are the anchors.
    reference : StainAnchors
        The target colours (default: the PBC training data of the built-in models).
    anchors : StainAnchors, optional
        The field's own anchors when already measured (:func:`stain_anchors`).

    Returns
    -------
    (H, W, 3) uint8, the same shape; the labels stay valid.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"normalize_stain needs an (H, W, 3) uint8 image; got {rgb.shape} {rgb.dtype}")
    segmentation.check_image(rgb)
    if anchors is None:
        anchors = stain_anchors(rgb, segmentation)
    return apply_stain_map(rgb, anchors, reference)


def apply_stain_map(
    pixels: np.ndarray, anchors: StainAnchors, reference: StainAnchors = PBC_REFERENCE
) -> np.ndarray:
    """Recolour uint8 RGB ``pixels`` (any shape ``(..., 3)``) from ``anchors``' stain to ``reference``'s."""
    pixels = np.asarray(pixels)
    if pixels.shape[-1:] != (3,) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (..., 3) uint8 RGB pixels; got {pixels.shape} {pixels.dtype}")
    matrix = stain_matrix(anchors, reference).astype(np.float32)
    glass = np.asarray(anchors.glass, np.float32)
    glass_ref = np.asarray(reference.glass, np.float32)
    # a lookup table per channel gives the OD of each 8-bit value without a log per pixel
    levels = np.maximum(np.arange(256, dtype=np.float32), 0.5)
    od_lut = np.log(glass[:, None] / levels[None, :])  # (3, 256)
    flat = pixels.reshape(-1, 3)
    out = np.empty_like(flat)
    block = 1 << 20  # pixels per step: bounds the float temporaries
    for start in range(0, len(flat), block):
        chunk = flat[start : start + block]
        od = np.stack([od_lut[c][chunk[:, c]] for c in range(3)], axis=-1)
        mapped = od @ matrix.T
        out[start : start + block] = np.clip(glass_ref * np.exp(-mapped), 0, 255).round().astype(np.uint8)
    return out.reshape(pixels.shape)
