"""Per-cell morphology: shape, nucleus and colour measurements.

Two entry points that give the same columns:
- :func:`morphology_table` on a whole field (scikit-image ``regionprops`` at full
  resolution), for the per-cell tables users read;
- :func:`crop_morphology` on normalised crops (vectorised), the scale-free feature vector
  the DAFFNet-style model consumes; it is computed identically at training and
  inference time.
Sizes are given in pixels and in red-cell units (area / area of one red cell), so they
compare across microscopes.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

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


def morphology_table(image: np.ndarray, segmentation) -> pd.DataFrame:
    """One row per instance: label, shape, nucleus and colour measurements.

    Columns: ``label, area_px, perimeter_px, area_rbc, perimeter_rbc, circularity,
    solidity, eccentricity, major_axis_px, minor_axis_px, nucleus_area_px,
    nucleus_area_rbc, nc_ratio, nucleus_lobes, nucleus_circularity`` and the mean colour
    (0-1) of the cell, nucleus and cytoplasm (``cell_r`` ... ``cytoplasm_b``).
    """
    from skimage.measure import regionprops_table

    from .io import as_rgb_uint8

    rgb = as_rgb_uint8(image).astype(np.float32) / 255.0
    labels = segmentation.labels
    d = float(segmentation.rbc_diameter_px)
    rbc_area = np.pi * d * d / 4 if np.isfinite(d) and d > 0 else np.nan
    props = regionprops_table(
        labels,
        intensity_image=rgb,
        properties=(
            "label", "area", "perimeter", "solidity", "eccentricity",
            "axis_major_length", "axis_minor_length", "intensity_mean",
        ),
    )
    df = pd.DataFrame(
        {
            "label": props["label"].astype(np.int64),
            "area_px": props["area"].astype(np.int64),
            "perimeter_px": props["perimeter"],
            "solidity": props["solidity"],
            "eccentricity": props["eccentricity"],
            "major_axis_px": props["axis_major_length"],
            "minor_axis_px": props["axis_minor_length"],
            "cell_r": props["intensity_mean-0"],
            "cell_g": props["intensity_mean-1"],
            "cell_b": props["intensity_mean-2"],
        }
    )
    df["area_rbc"] = df.area_px / rbc_area
    df["perimeter_rbc"] = df.perimeter_px / (np.pi * d)
    df["circularity"] = np.clip(4 * np.pi * df.area_px / np.maximum(df.perimeter_px, 1) ** 2, 0, 1)

    n_max = int(labels.max()) + 1
    nuc = segmentation.nuclei
    nuc_area = np.bincount(nuc.ravel(), minlength=n_max)
    df["nucleus_area_px"] = nuc_area[df.label].astype(np.int64)
    df["nucleus_area_rbc"] = df.nucleus_area_px / rbc_area
    cyto_area = df.area_px - df.nucleus_area_px
    df["nc_ratio"] = np.where(cyto_area > 0, df.nucleus_area_px / np.maximum(cyto_area, 1), np.nan)
    df.loc[df.nucleus_area_px == 0, "nc_ratio"] = 0.0
    df["nucleus_lobes"] = 0
    df["nucleus_circularity"] = 0.0
    if nuc.any():
        nprops = regionprops_table(nuc, properties=("label", "area", "perimeter"))
        circ = np.clip(4 * np.pi * nprops["area"] / np.maximum(nprops["perimeter"], 1) ** 2, 0, 1)
        df.loc[df.label.isin(nprops["label"]), "nucleus_circularity"] = pd.Series(circ, index=nprops["label"]).reindex(df.label[df.label.isin(nprops["label"])]).to_numpy()
        lobes = _count_lobes(nuc, d, n_max)
        df["nucleus_lobes"] = lobes[df.label].astype(np.int64)
    for part, mask in (("nucleus", nuc > 0), ("cytoplasm", (labels > 0) & (nuc == 0))):
        lab = np.where(mask, labels, 0).ravel()
        count = np.bincount(lab, minlength=n_max).astype(np.float64)
        for c, name in enumerate("rgb"):
            total = np.bincount(lab, weights=rgb[..., c].ravel(), minlength=n_max)
            mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
            df[f"{part}_{name}"] = mean[df.label]
    return df


def _count_lobes(nuclei: np.ndarray, d: float, n_max: int) -> np.ndarray:
    """Lobes per nucleus: parts that stay apart after thinning the narrow bridges away."""
    radius = max(1, int(round(0.06 * d))) if np.isfinite(d) else 1
    structure = ndi.generate_binary_structure(2, 1)
    eroded = ndi.binary_erosion(nuclei > 0, structure, iterations=radius)
    parts, n = ndi.label(eroded)
    counts = np.zeros(max(n_max, int(nuclei.max()) + 1), np.int64)
    if n:
        part_owner = ndi.maximum(nuclei, parts, np.arange(1, n + 1)).astype(np.int64)
        np.add.at(counts, part_owner, 1)
    # a nucleus that vanished in the erosion is still one lobe
    present = np.unique(nuclei)
    present = present[present > 0]
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
