"""Instances of one field at working resolution: white cells (nucleus + cytoplasm),
red cells (touching ones split), platelets.

All sizes are fractions of the red-cell diameter ``d`` (pixels at working resolution).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.morphology import disk
from skimage.segmentation import watershed

from .stain import StainModel, stain_channels


@dataclass(frozen=True)
class CellParams:
    """Size and shape settings, in red-cell diameters (areas in red-cell areas)."""

    min_wbc_nucleus_area: float = 0.16  # violet matter below this is a platelet
    nucleus_lobe_gap: float = 0.30  # lobes closer than this belong to one white cell
    wbc_max_reach: float = 0.6  # cytoplasm reaches at most this far past the nucleus
    cytoplasm_min_density: float = 0.75  # in units of the glass/cell threshold
    min_platelet_area: float = 0.006
    min_rbc_area: float = 0.18
    pallor_hole_area: float = 0.45  # holes up to this are central pallor, filled
    rbc_seed_distance: float = 0.33  # minimal distance between two red-cell centres
    rbc_seed_min_height: float = 0.18  # seed must lie this deep inside (in radii)


def remove_small_objects(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected components with fewer than ``min_area`` pixels."""
    comps, n = ndi.label(mask)
    if n == 0:
        return mask.astype(bool)
    keep = np.bincount(comps.ravel()) >= min_area
    keep[0] = False
    return keep[comps]


def remove_small_holes(mask: np.ndarray, max_hole_area: int) -> np.ndarray:
    """Fill holes (background not connected to the border) of fewer than ``max_hole_area`` pixels."""
    mask = mask.astype(bool)
    holes = ndi.binary_fill_holes(mask) & ~mask
    return mask | remove_small_objects(holes, 1) & ~remove_small_objects(holes, max_hole_area)


def _area(d: float, fraction: float) -> int:
    return max(1, int(round(fraction * np.pi * d * d / 4)))


def segment_field(
    rgb: np.ndarray, stain: StainModel, d: float, params: CellParams = CellParams()
):
    """Segment one field (or tile) whose red cells are ``d`` pixels across.

    Returns
    -------
    labels, nuclei : (H, W) int32
    cell_types : dict label -> "wbc" | "rbc" | "platelet"
    """
    density, hue = stain_channels(rgb, stain)
    smooth = max(0.5, d / 40)
    density = ndi.gaussian_filter(density, smooth)
    hue = ndi.gaussian_filter(hue, smooth)

    foreground = density > stain.foreground_threshold
    foreground = remove_small_objects(foreground, _area(d, params.min_platelet_area))
    violet = (hue > stain.nucleus_threshold) & foreground
    violet = remove_small_objects(violet, _area(d, params.min_platelet_area))

    # --- group violet blobs: lobes of one nucleus join, lone small blobs are platelets
    gap = max(1, int(round(params.nucleus_lobe_gap * d / 2)))
    groups, n_groups = ndi.label(ndi.binary_dilation(violet, disk(gap)))
    groups = groups * violet
    violet_area = np.bincount(groups.ravel(), minlength=n_groups + 1)
    is_nucleus = violet_area >= _area(d, params.min_wbc_nucleus_area)
    is_nucleus[0] = False
    nucleus_groups = np.where(is_nucleus[groups], groups, 0)
    platelet_groups = np.where(~is_nucleus[groups] & (groups > 0), groups, 0)

    labels = np.zeros(rgb.shape[:2], np.int32)
    nuclei = np.zeros(rgb.shape[:2], np.int32)
    cell_types: dict[int, str] = {}
    next_id = 1

    # --- white cells: nucleus + the bluish, stained cytoplasm around it
    if nucleus_groups.any():
        reach = params.wbc_max_reach * d
        dist_to_nucleus, nearest = ndi.distance_transform_edt(
            nucleus_groups == 0, return_indices=True
        )
        owner = nucleus_groups[nearest[0], nearest[1]]
        # cytoplasm is told from red cells by its bluish hue, judged over a few
        # pixels (single pixels overlap in colour)
        hue_wide = ndi.gaussian_filter(hue, max(1.0, d / 10))
        cytoplasm = (hue_wide > stain.cytoplasm_threshold) & (
            density > params.cytoplasm_min_density * stain.foreground_threshold
        )
        candidate = (cytoplasm | (nucleus_groups > 0)) & (dist_to_nucleus <= reach)
        candidate = ndi.binary_opening(candidate, disk(max(1, int(d / 12))))
        candidate |= nucleus_groups > 0
        for group_id in np.flatnonzero(is_nucleus):
            sl = ndi.find_objects(((owner == group_id) & candidate).astype(np.uint8))
            if not sl or sl[0] is None:
                continue
            sl = sl[0]
            region = candidate[sl] & (owner[sl] == group_id)
            nucleus = nucleus_groups[sl] == group_id
            # keep only the part connected to the nucleus, then fill and smooth
            comp, _ = ndi.label(region)
            keep = np.unique(comp[nucleus])
            region = np.isin(comp, keep[keep > 0])
            region = ndi.binary_fill_holes(region)
            region = ndi.binary_closing(region, disk(max(1, int(d / 8))), border_value=0)
            region = ndi.binary_fill_holes(region) | nucleus
            target = labels[sl]
            target[region & (target == 0)] = next_id
            nuclei[sl][nucleus] = next_id
            cell_types[next_id] = "wbc"
            next_id += 1

    wbc_mask = labels > 0

    # --- platelets: small violet blobs away from white cells
    if platelet_groups.any():
        platelet_groups = np.where(wbc_mask, 0, platelet_groups)
        for sl_index, sl in enumerate(ndi.find_objects(platelet_groups)):
            if sl is None:
                continue
            group_id = sl_index + 1
            blob = platelet_groups[sl] == group_id
            if blob.sum() < _area(d, params.min_platelet_area):
                continue
            blob = ndi.binary_dilation(blob) & ~wbc_mask[sl]
            target = labels[sl]
            target[blob & (target == 0)] = next_id
            cell_types[next_id] = "platelet"
            next_id += 1

    # --- red cells: fill central pallor, split touching cells on the distance map
    rbc = remove_small_holes(foreground, _area(d, params.pallor_hole_area))
    rbc &= ~ndi.binary_dilation(labels > 0, iterations=1)
    rbc = ndi.binary_opening(rbc, disk(max(1, int(d / 10))))
    rbc = remove_small_objects(rbc, _area(d, params.min_rbc_area))
    if rbc.any():
        edt = ndi.distance_transform_edt(rbc)
        edt_s = ndi.gaussian_filter(edt, max(1.0, d / 16))
        comps, _ = ndi.label(rbc)
        peaks = peak_local_max(
            edt_s,
            min_distance=max(2, int(round(params.rbc_seed_distance * d))),
            threshold_abs=params.rbc_seed_min_height * d / 2,
            labels=comps,
            exclude_border=False,
        )
        markers = np.zeros(rgb.shape[:2], np.int32)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
        # components too thin for a seed still are cells: seed them at their deepest point
        seeded = np.zeros(comps.max() + 1, bool)
        seeded[comps[peaks[:, 0], peaks[:, 1]]] = True
        unseeded = np.flatnonzero(~seeded[1:]) + 1
        if unseeded.size:
            pos = ndi.maximum_position(edt, comps, unseeded)
            for k, (y, x) in enumerate(pos):
                markers[y, x] = len(peaks) + 1 + k
        rbc_labels = watershed(-edt_s, markers, mask=rbc)
        sizes = np.bincount(rbc_labels.ravel())
        small = sizes < _area(d, params.min_rbc_area)
        small[0] = False
        rbc_labels[small[rbc_labels]] = 0
        ids = np.unique(rbc_labels)
        ids = ids[ids > 0]
        lut = np.zeros(rbc_labels.max() + 1, np.int32)
        lut[ids] = np.arange(next_id, next_id + len(ids))
        placed = lut[rbc_labels]
        labels = np.where(labels == 0, placed, labels)
        for new in range(next_id, next_id + len(ids)):
            cell_types[new] = "rbc"
        next_id += len(ids)

    return labels, nuclei, cell_types
