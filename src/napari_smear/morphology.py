"""Per-cell morphology: shape, nucleus and colour measurements.

Two entry points that give the same columns:
- :func:`morphology_table` on a whole field (scikit-image ``regionprops``' measurements
  at full resolution), for the per-cell tables users read;
- :func:`crop_morphology` on normalised crops (vectorised), the scale-free feature vector
  the DAFFNet-style model consumes; it is computed identically at training and
  inference time.
Sizes are given in pixels and in red-cell units (area / area of one red cell), so they
compare across microscopes.
"""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from .segment import SmearSegmentation

# The numeric features a model may consume, in a fixed order (crop_morphology columns).
MORPH_FEATURES = (
    "area_rbc",
    "perimeter_rbc",
    "circularity",
    "solidity",
    "eccentricity",
    "nucleus_area_rbc",
    "nc_ratio",
    "nucleus_lobes",
    "nucleus_circularity",
    "cell_r", "cell_g", "cell_b",
    "nucleus_r", "nucleus_g", "nucleus_b",
    "cytoplasm_r", "cytoplasm_g", "cytoplasm_b",
)


def morphology_table(image: np.ndarray, segmentation: "SmearSegmentation") -> pd.DataFrame:
    """One row per instance: label, shape, nucleus and colour measurements.

    ``image``: the RGB field that was segmented (any input
    :func:`napari_smear.io.as_rgb_uint8` takes); ``segmentation``: what
    :func:`napari_smear.segment_smear` returned for it (its labels, nuclei and red-cell
    diameter). The columns are explained in docs/batch.md, *Cell table columns*.

    Columns: ``label, area_px, perimeter_px, area_rbc, perimeter_rbc, circularity,
    solidity, eccentricity, major_axis_px, minor_axis_px, nucleus_area_px,
    nucleus_area_rbc, nc_ratio, nucleus_lobes, nucleus_circularity`` and the mean colour
    (0-1) of the cell, nucleus and cytoplasm (``cell_r`` ... ``cytoplasm_b``). The
    nucleus's circularity and colour are NaN for a cell without a nucleus, the
    cytoplasm's colour for a cell that is all nucleus (its nucleus area, lobes and N/C
    ratio are 0 and stay so).

    Perimeter, solidity, eccentricity, the axis lengths and the mean cell colour are the
    numbers scikit-image ``regionprops`` gives, bit for bit (per-cell CSV files must not
    change from one version to the next), without its cost: perimeters of all cells in
    one pass, convex hulls counted row by row in integers, colour sums from histograms.
    """
    import skimage.measure

    from .io import as_rgb_uint8
    from .segment.types import check_segmentation

    rgb8 = as_rgb_uint8(image)
    check_segmentation(segmentation, rgb8)
    labels = np.asarray(segmentation.labels)
    nuc = np.asarray(segmentation.nuclei)
    d = float(segmentation.rbc_diameter_px)
    rbc_area = np.pi * d * d / 4 if np.isfinite(d) and d > 0 else np.nan
    n_max = int(labels.max()) + 1

    objects = ndi.find_objects(labels)
    label = np.array([k for k, box in enumerate(objects, 1) if box is not None], np.int64)  # ascending
    perimeter = _perimeters(labels, label)
    area_px = np.empty(len(label), np.int64)
    solidity, eccentricity, major, minor = (np.empty(len(label)) for _ in range(4))
    colours = np.empty((len(label), 3, 3))  # cell, nucleus, cytoplasm x r, g, b
    for i, k in enumerate(label):
        box = objects[k - 1]
        mask = labels[box] == k
        area_px[i] = np.count_nonzero(mask)
        solidity[i] = float(area_px[i]) / _convex_area(mask)
        eccentricity[i], major[i], minor[i] = _ellipse(mask, area_px[i], skimage.measure)
        colours[i] = _mean_colours(rgb8[box][mask], nuc[box][mask] > 0)

    with np.errstate(divide="ignore", invalid="ignore"):
        area_rbc = area_px / rbc_area
        perimeter_rbc = perimeter / (np.pi * d)
    circularity = np.clip(4 * np.pi * area_px / np.maximum(perimeter, 1) ** 2, 0, 1)

    # Nuclei: measured inside the box around all of them (outside it the nucleus image is
    # all zeros, which is also what erosion and perimeter assume beyond the image border).
    nuc_area_px = np.zeros(len(label), np.int64)
    nucleus_lobes = np.zeros(len(label), np.int64)
    nucleus_circularity = np.zeros(len(label))
    rows, cols = np.flatnonzero(nuc.any(1)), np.flatnonzero(nuc.any(0))
    if len(rows):
        box = nuc[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        nuc_area = np.bincount(box.ravel(), minlength=n_max)
        nuc_area_px = nuc_area[label].astype(np.int64)
        nuc_label = np.flatnonzero(nuc_area[1:]) + 1
        nuc_perimeter = _perimeters(box, nuc_label)
        circ = np.zeros(len(nuc_area))
        circ[nuc_label] = np.clip(
            4 * np.pi * nuc_area[nuc_label].astype(np.float64) / np.maximum(nuc_perimeter, 1) ** 2, 0, 1,
        )
        nucleus_circularity = circ[label]
        nucleus_lobes = _count_lobes(box, d, n_max, nuc_area)[label].astype(np.int64)
    # A measurement of a part the cell does not have (a red cell's nucleus, the cytoplasm
    # of a cell that is all nucleus) is missing, an empty cell in the CSV: a 0 there read
    # as black, or as a round nucleus of circularity 0, and pulled down spreadsheet means.
    # Its area, lobe count and N/C ratio are truly 0 and stay so.
    nucleus_circularity = np.where(nuc_area_px > 0, nucleus_circularity, np.nan)
    colours[nuc_area_px == 0, 1] = np.nan
    colours[nuc_area_px >= area_px, 2] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        nucleus_area_rbc = nuc_area_px / rbc_area
    cyto_area = area_px - nuc_area_px
    nc_ratio = np.where(cyto_area > 0, nuc_area_px / np.maximum(cyto_area, 1), np.nan)
    nc_ratio[nuc_area_px == 0] = 0.0

    columns = {
        "label": label.astype(np.int64),
        "area_px": area_px.astype(np.int64),
        "perimeter_px": perimeter,
        "solidity": solidity,
        "eccentricity": eccentricity,
        "major_axis_px": major,
        "minor_axis_px": minor,
        "cell_r": colours[:, 0, 0],
        "cell_g": colours[:, 0, 1],
        "cell_b": colours[:, 0, 2],
        "area_rbc": area_rbc,
        "perimeter_rbc": perimeter_rbc,
        "circularity": circularity,
        "nucleus_area_px": nuc_area_px,
        "nucleus_area_rbc": nucleus_area_rbc,
        "nc_ratio": nc_ratio,
        "nucleus_lobes": nucleus_lobes,
        "nucleus_circularity": nucleus_circularity,
    }
    for j, part in ((1, "nucleus"), (2, "cytoplasm")):
        for c, name in enumerate("rgb"):
            columns[f"{part}_{name}"] = colours[:, j, c]
    return pd.DataFrame(columns)


# skimage.measure.perimeter (4-neighbourhood): a border pixel's 3x3 neighbourhood of
# border pixels, coded as 1 (itself) + 2 per side + 10 per corner neighbour, weighs
# as much boundary length as these weights say.
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_NEIGHBOUR_CODES = (
    (-1, -1, 10), (-1, 0, 2), (-1, 1, 10), (0, -1, 2), (0, 1, 2), (1, -1, 10), (1, 0, 2), (1, 1, 10),
)


_PERIMETER_BLOCK_ROWS = 512


def _perimeters(labels: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``skimage.measure.perimeter(labels == k, 4)`` for each label ``k`` in ``which``, bit
    for bit, from one pass over the image instead of one per label.

    A pixel is on the border of its object when a 4-neighbour holds another label (or
    lies outside the image); its code counts the border pixels of the same object around
    it. Each label's histogram of codes then goes through the same dot product as in
    scikit-image (the codes of non-border pixels, which it counts too, weigh nothing).
    """
    h, w = labels.shape
    n = int(labels.max()) + 1 if labels.size else 1
    hist = np.zeros(n * 50, np.int64)
    width = w + 2
    # In row blocks, each with two rows of context above and below (a pixel's code needs
    # its neighbours' border status, which needs theirs): the same counts as one pass
    # over the zero-padded image, without its image-sized temporaries.
    for start in range(0, h, _PERIMETER_BLOCK_ROWS):
        stop = min(h, start + _PERIMETER_BLOCK_ROWS)
        pad = np.zeros((stop - start + 4, width), labels.dtype)
        first, last = max(start - 2, 0), min(stop + 2, h)
        pad[first - (start - 2) : last - (start - 2), 1:-1] = labels[first:last]
        centre = pad[1:-1, 1:-1]
        interior = (pad[:-2, 1:-1] == centre) & (pad[2:, 1:-1] == centre)
        interior &= pad[1:-1, :-2] == centre
        interior &= pad[1:-1, 2:] == centre
        border = np.zeros(pad.shape, bool)
        border[1:-1, 1:-1] = (centre != 0) & ~interior
        at = np.flatnonzero(border[2:-2]) + 2 * width  # the block's own rows
        border, pad = border.ravel(), pad.ravel()
        own = pad[at]
        code = np.ones(len(at), np.intp)
        for dy, dx, weight in _NEIGHBOUR_CODES:
            near = at + (dy * width + dx)
            code += weight * (border[near] & (pad[near] == own))
        hist += np.bincount(own.astype(np.intp) * 50 + code, minlength=n * 50)
    hist = hist.reshape(n, 50)
    return np.array([hist[k] @ _PERIMETER_WEIGHTS for k in which], dtype=np.float64)


def _convex_area(mask: np.ndarray) -> int:
    """Pixels of the convex hull of ``mask``, as ``skimage.morphology.convex_hull_image``
    counts them: the pixel centres inside or on the hull of the midpoints of the pixels'
    edges.

    Same hull (qhull, here of the outermost edge midpoint of every row and column, whose
    hull is that of all of them), but the pixels are counted row by row in exact integer
    arithmetic instead of testing every pixel of the box against the polygon.
    """
    from scipy.spatial import ConvexHull

    h, w = mask.shape
    in_row, in_col = mask.any(1), mask.any(0)
    rows, cols = np.flatnonzero(in_row), np.flatnonzero(in_col)
    left = mask.argmax(1)[in_row]
    right = w - 1 - mask[:, ::-1].argmax(1)[in_row]
    top = mask.argmax(0)[in_col]
    bottom = h - 1 - mask[::-1].argmax(0)[in_col]
    # Doubled coordinates (y, x) = (2 row, 2 column): every midpoint is an integer point.
    nr, nc = len(rows), len(cols)
    points = np.empty((2 * (nr + nc), 2), np.int64)
    points[:2 * nr, 0] = np.tile(2 * rows, 2)
    points[:2 * nr, 1] = np.concatenate([2 * left - 1, 2 * right + 1])
    points[2 * nr:, 0] = np.concatenate([2 * top - 1, 2 * bottom + 1])
    points[2 * nr:, 1] = np.tile(2 * cols, 2)
    vertices = points[ConvexHull(points.astype(np.float64)).vertices]  # in order round the hull
    y1, x1 = vertices[:, 0], vertices[:, 1]
    following = np.arange(1, len(vertices) + 1) % len(vertices)
    y2, x2 = y1[following], x1[following]
    slanted = y1 != y2  # a level edge's ends are also ends of slanted ones
    y1, x1, y2, x2 = y1[slanted], x1[slanted], y2[slanted], x2[slanted]
    # Every pixel row r (y = 2r) each edge spans, as (edge, r) pairs.
    r0 = -(-np.minimum(y1, y2) // 2)
    n = np.maximum(np.maximum(y1, y2) // 2 - r0 + 1, 0)
    edge = np.repeat(np.arange(len(n)), n)
    r = np.arange(len(edge)) - np.repeat(np.cumsum(n) - n, n) + r0[edge]
    y1, x1, y2, x2 = y1[edge], x1[edge], y2[edge], x2[edge]
    # The edge crosses row r at x = num / den (den > 0); the hull holds the pixel centres
    # 2c with x_left <= 2c <= x_right, the extreme crossings of the row.
    dy = y2 - y1
    num = x1 * dy + (2 * r - y1) * (x2 - x1)
    num = np.where(dy < 0, -num, num)
    den = 2 * np.abs(dy)
    first = np.full(h, np.iinfo(np.int64).max)
    last = np.full(h, np.iinfo(np.int64).min)
    np.minimum.at(first, r, -(-num // den))  # ceil
    np.maximum.at(last, r, num // den)  # floor
    return int(np.maximum(last - first + 1, 0).sum())


# The float32 values of a colour channel, rgb / 255. Each is a whole multiple of 2**-31
# (none lies below 2**-8; checked below), so a float64 sum of fewer than 2**22 of them is
# exact whatever the order of addition, and can be made from a histogram, in integers.
_CHANNEL = np.arange(256, dtype=np.float32) / 255.0
_CHANNEL_UNITS = (_CHANNEL.astype(np.float64) * 2.0**31).astype(np.int64)
assert np.array_equal(_CHANNEL_UNITS * 2.0**-31, _CHANNEL)
_EXACT_SUM_PIXELS = 2**22


def _mean_colours(pixels: np.ndarray, in_nucleus: np.ndarray) -> np.ndarray:
    """Mean colour (0-1) of a cell's pixels, of those in its nucleus and of the others
    (rows; 0 for a part without pixels), bit for bit the numbers regionprops and
    np.bincount give.

    ``pixels`` (N, 3) uint8 in raster order. The cell's mean is regionprops'
    ``intensity_mean``: np.mean of the float32 values, which adds them one after the other
    in float32 (as np.cumsum does; rounding makes that order matter) and divides in
    float64. The parts' means are float64 sums (as np.bincount made them, exactly)
    divided by the counts.
    """
    n = len(pixels)
    planes = pixels.T
    out = np.zeros((3, 3))
    out[0] = (np.cumsum(_CHANNEL[planes], axis=1)[:, -1].astype(np.float64) / n).astype(np.float32)
    if n >= _EXACT_SUM_PIXELS:  # sums no longer exact: add in np.bincount's order
        for j, part in ((1, in_nucleus), (2, ~in_nucleus)):
            if part.any():
                out[j] = np.cumsum(_CHANNEL[planes[:, part]].astype(np.float64), axis=1)[:, -1] / part.sum()
        return out
    histogram = np.stack([np.bincount(plane, minlength=256) for plane in planes])
    in_part = np.count_nonzero(in_nucleus)
    if in_part:
        nucleus = np.stack([np.bincount(plane[in_nucleus], minlength=256) for plane in planes])
        out[1] = (nucleus @ _CHANNEL_UNITS) * 2.0**-31 / in_part
        histogram -= nucleus
    if n - in_part:
        out[2] = (histogram @ _CHANNEL_UNITS) * 2.0**-31 / (n - in_part)
    return out


def _ellipse(mask: np.ndarray, area: int, measure) -> tuple[float, float, float]:
    """Eccentricity and axis lengths, computed as regionprops computes them
    (``measure``: the skimage.measure module, imported once per table)."""
    spacing = np.ones(2)
    # regionprops' centroid_local, from raw moments, which are exact integers here
    centre = np.array([
        np.count_nonzero(mask, axis=1) @ np.arange(mask.shape[0]),
        np.count_nonzero(mask, axis=0) @ np.arange(mask.shape[1]),
    ]) / area
    mu = measure.moments_central(mask.astype(np.uint8), centre, order=3, spacing=spacing)
    tensor = measure.inertia_tensor(mask, mu, spacing=spacing)
    l1, l2 = measure.inertia_tensor_eigvals(mask, T=tensor)
    return (0.0 if l1 == 0 else math.sqrt(1 - l2 / l1)), 4 * math.sqrt(l1), 4 * math.sqrt(l2)


def _count_lobes(nuclei: np.ndarray, d: float, n_max: int, areas: np.ndarray) -> np.ndarray:
    """Lobes per nucleus: parts that stay apart after thinning the narrow bridges away.

    ``areas``: ``np.bincount(nuclei.ravel())``.
    """
    radius = max(1, int(round(0.06 * d))) if np.isfinite(d) else 1
    structure = ndi.generate_binary_structure(2, 1)
    eroded = ndi.binary_erosion(nuclei > 0, structure, iterations=radius)
    parts, n = ndi.label(eroded)
    counts = np.zeros(max(n_max, int(nuclei.max()) + 1), np.int64)
    if n:
        # the largest nucleus label under each part (ndi.maximum, on the part pixels only)
        inside = parts > 0
        owner = np.zeros(n + 1, np.int64)
        np.maximum.at(owner, parts[inside], nuclei[inside].astype(np.int64))
        np.add.at(counts, owner[1:], 1)
    # a nucleus that vanished in the erosion is still one lobe
    present = np.flatnonzero(areas[1:]) + 1
    counts[present] = np.maximum(counts[present], 1)
    return counts


def crop_morphology(images: np.ndarray, masks: np.ndarray, crop_diameters: float) -> pd.DataFrame:
    """Scale-free morphology of normalised crops, columns :data:`MORPH_FEATURES`.

    ``images`` (N, S, S, 3) uint8 and ``masks`` (N, 2, S, S) as made by
    :func:`napari_smear.crops.crop_instances`; red-cell units come from the crop scale
    (``S / crop_diameters`` pixels per red-cell diameter).
    """
    images = np.asarray(images)
    masks = np.asarray(masks) > 0
    n, _, s, _ = masks.shape
    d = s / crop_diameters
    rbc_area = np.pi * d * d / 4
    cell, nucleus = masks[:, 0], masks[:, 1] & masks[:, 0]
    rgb = images.astype(np.float32) / 255.0
    area = cell.sum((1, 2)).astype(np.float64)
    nuc_area = nucleus.sum((1, 2)).astype(np.float64)
    perim = _perimeter(cell)
    nuc_perim = _perimeter(nucleus)
    out = {
        "area_rbc": area / rbc_area,
        "perimeter_rbc": perim / (np.pi * d),
        "circularity": np.clip(4 * np.pi * area / np.maximum(perim, 1) ** 2, 0, 1),
        "solidity": _solidity(cell, area),
        "eccentricity": _eccentricity(cell),
        "nucleus_area_rbc": nuc_area / rbc_area,
        "nc_ratio": np.where(area > nuc_area, nuc_area / np.maximum(area - nuc_area, 1), 0.0),
        "nucleus_lobes": _crop_lobes(nucleus, d),
        "nucleus_circularity": np.clip(4 * np.pi * nuc_area / np.maximum(nuc_perim, 1) ** 2, 0, 1),
    }
    cyto = cell & ~nucleus
    for part, m in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", cyto)):
        cnt = np.maximum(m.sum((1, 2)), 1)[:, None]
        mean = (rgb * m[..., None]).sum((1, 2)) / cnt
        for c, name in enumerate("rgb"):
            out[f"{part}_{name}"] = mean[:, c]
    return pd.DataFrame(out, columns=list(MORPH_FEATURES))


def _perimeter(mask: np.ndarray) -> np.ndarray:
    """Boundary length estimate: 4-connected edge count scaled to Euclidean (pi/4)."""
    m = mask.astype(np.int8)
    edges = np.abs(np.diff(m, axis=1)).sum((1, 2)) + np.abs(np.diff(m, axis=2)).sum((1, 2))
    edges = edges + m[:, 0, :].sum(1) + m[:, -1, :].sum(1) + m[:, :, 0].sum(1) + m[:, :, -1].sum(1)
    return edges.astype(np.float64) * (np.pi / 4)


def _eccentricity(mask: np.ndarray) -> np.ndarray:
    n, s, _ = mask.shape
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    w = mask.astype(np.float64)
    a = np.maximum(w.sum((1, 2)), 1)
    my = (w * yy).sum((1, 2)) / a
    mx = (w * xx).sum((1, 2)) / a
    cyy = (w * yy**2).sum((1, 2)) / a - my**2
    cxx = (w * xx**2).sum((1, 2)) / a - mx**2
    cxy = (w * yy * xx).sum((1, 2)) / a - my * mx
    root = np.sqrt(((cyy - cxx) / 2) ** 2 + cxy**2)
    l1 = (cyy + cxx) / 2 + root
    l2 = (cyy + cxx) / 2 - root
    return np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-9), 0, 1))


def _solidity(mask: np.ndarray, area: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    out = np.ones(len(mask))
    for i in np.flatnonzero(area > 2):  # convex hull has no vectorised form
        hull = convex_hull_image(mask[i]).sum()
        out[i] = area[i] / max(hull, 1)
    return out


def _crop_lobes(nucleus: np.ndarray, d: float) -> np.ndarray:
    radius = max(1, int(round(0.06 * d)))
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndi.generate_binary_structure(2, 1)  # erode within each crop only
    eroded = ndi.binary_erosion(nucleus, structure, iterations=radius)
    parts, n = ndi.label(eroded, structure=structure)
    counts = np.zeros(len(nucleus), np.int64)
    if n:
        crop_of_part = ndi.minimum_position(parts, parts, np.arange(1, n + 1))
        np.add.at(counts, np.array([p[0] for p in crop_of_part]), 1)
    counts[(counts == 0) & nucleus.any((1, 2))] = 1
    return counts
