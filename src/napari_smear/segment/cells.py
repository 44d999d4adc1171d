"""Instances of one field at working resolution: white cells (nucleus + cytoplasm),
red cells (touching ones split), platelets.

All sizes are fractions of the red-cell diameter ``d`` (pixels at working resolution).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import watershed

from . import binary
from .stain import StainModel, colour_distance, stain_channels


@dataclass(frozen=True)
class CellParams:
    """Size and shape settings, in red-cell diameters (areas in red-cell areas)."""

    min_wbc_nucleus_area: float = 0.16  # violet matter below this is a platelet
    nucleus_lobe_gap: float = 0.30  # lobes closer than this belong to one white cell
    nucleus_lobe_min_fraction: float = 0.2  # of the largest lobe; smaller blobs are platelets
    # cytoplasm reaches at most this far past the nucleus (a white cell is at most
    # about 2.5 red cells across, and its nucleus may sit against one side)
    wbc_max_reach: float = 1.3
    # white-cell cytoplasm, from "surely not" to "surely": its density (in units of
    # the glass/cell threshold; lower where the glass is clean, see _stained_range)
    # and how far its colour lies from the red cells' (in units of the red cells'
    # own colour spread; see stain.colour_distance)
    wbc_cytoplasm_density: tuple[float, float] = (0.5, 1.0)
    wbc_cytoplasm_colour: tuple[float, float] = (1.0, 2.0)
    # granular cytoplasm (an eosinophil's orange granules) lies nearer the red cells'
    # colour (a median of 1.0 of their spreads against 0.27 for red-cell pixels, on PBC)
    # but is denser (3.1 times the glass/cell threshold against 1.7): with a density
    # range here (in units of that threshold; (2.0, 3.0) measured best), matter that
    # dense needs only the second colour range. PBC's eosinophils are then outlined
    # whole, but the built-in wbc-pbc8 learned from the colour-alone outlines and,
    # even fine-tuned on the whole ones, types BCCD's white cells less well
    # (docs/benchmarks.md, "Eosinophil outlines"), so the default is None: colour alone.
    wbc_granular_density: tuple[float, float] | None = None
    wbc_granular_colour: tuple[float, float] = (0.7, 1.4)
    # cost of a kink in the outline, per half-pixel step from ray to ray, in red-cell
    # areas / pi: a spike must gain more cytoplasm than it costs
    wbc_outline_stiffness: float = 0.05
    min_platelet_area: float = 0.006
    min_rbc_area: float = 0.18
    pallor_hole_area: float = 0.6  # holes up to this are central pallor, filled
    # two touching red cells are split where the narrower rises at least this much
    # (in radii) above the waist between them
    rbc_split_depth: float = 0.05
    rbc_fragment_area: float = 0.3  # smaller watershed pieces join a neighbour
    rbc_clump_spacing: float = 0.5  # centres of packed cells lie at least this far apart
    rbc_clump_min_symmetry: float = 0.1  # weakest outline that still marks a cell's centre
    # pale red cells (a thin, faint rim round a wide pallor) fall partly under the
    # glass/cell threshold; rims closed above this fraction of it count, round a
    # convex pallor of at least this area (see pale_rings; None: not looked for)
    pale_rbc_density: float | None = 0.5
    pale_pallor_min_area: float = 0.1
    pale_pallor_min_solidity: float = 0.85


def remove_small_objects(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected components with fewer than ``min_area`` pixels."""
    comps, n = ndi.label(mask)
    if n == 0:
        return mask.astype(bool)
    keep = np.bincount(comps.ravel()) >= min_area
    keep[0] = False
    return keep[comps]


def small_holes(mask: np.ndarray, max_hole_area: int | None = None) -> np.ndarray:
    """Holes of ``mask`` (background not connected to the image border), only those
    of fewer than ``max_hole_area`` pixels when given.

    Found by labelling the background once, which is much faster than
    ``scipy.ndimage.binary_fill_holes`` (a dilation repeated until nothing changes).
    """
    background, n = ndi.label(~np.asarray(mask, bool))
    hole = np.ones(n + 1, bool)
    hole[0] = False
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        hole[edge] = False
    if max_hole_area is not None:
        hole &= np.bincount(background.ravel(), minlength=n + 1) < max_hole_area
    return hole[background]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask, bool) | small_holes(mask)


def remove_small_holes(mask: np.ndarray, max_hole_area: int) -> np.ndarray:
    """Fill holes (background not connected to the border) of fewer than ``max_hole_area`` pixels."""
    return np.asarray(mask, bool) | small_holes(mask, max_hole_area)


def _area(d: float, fraction: float) -> int:
    return max(1, int(round(fraction * np.pi * d * d / 4)))


def fill_pallor(mask: np.ndarray, d: float, max_area_fraction: float) -> np.ndarray:
    """Fill the central pallor of red cells, also where the pale centre reaches the rim.

    Holes are looked for in the mask closed by a disc of an eighth of a cell, so a rim
    broken by a gap (a pale, target or hypochromic cell) still encloses its centre;
    only the holes are added, the closing itself is not (it would glue neighbours).
    """
    max_area = _area(d, max_area_fraction)
    filled = remove_small_holes(mask, max_area)
    radius = max(1, int(round(d / 8)))
    closed = binary.closing(filled, binary.disk_rows(radius))
    holes = small_holes(closed, max_area)
    # the closing's own pixels next to a filled hole close the rim's gap
    gap = closed & ~filled & binary.dilate(holes, binary.diamond_rows(radius))
    return filled | holes | gap


def pale_rings(faint: np.ndarray, cells: np.ndarray, d: float, params: CellParams) -> np.ndarray:
    """Pale red cells missing from ``cells``: the pallor a faint rim encloses, and that rim.

    A pale cell's thin rim falls partly under the glass/cell threshold, so its
    pallor is not enclosed and the cell is lost or glued to a neighbour as a
    crescent. Above a lower threshold (``faint``) the rim closes; the holes it
    encloses that ``cells`` lacks, and the faint pixels within a quarter of a cell of
    them, make the cell whole again. Cells already whole are left as they are.

    A hole counts as a pallor only when it looks like one: at least
    ``pale_pallor_min_area`` of a cell (and at most ``pallor_hole_area``) and convex.
    The glass between packed cells (concave sides) and smudges on the glass
    (ragged) are not: on Chula fields, holes down to a solidity of 0.6 glued
    neighbouring cells together and outlined smudges as cells.
    """
    from skimage.morphology import convex_hull_image

    holes = fill_pallor(faint, d, params.pallor_hole_area) & ~faint & ~cells
    comps, n = ndi.label(holes)
    if n == 0:
        return holes
    keep = np.zeros(n + 1, bool)
    area = np.bincount(comps.ravel(), minlength=n + 1)
    boxes = ndi.find_objects(comps)
    # solidity (area over convex-hull area, as regionprops measures it) only for
    # the holes large enough to be a pallor: most holes are specks
    for label in np.flatnonzero(area >= _area(d, params.pale_pallor_min_area)):
        if label == 0:
            continue
        hole = comps[boxes[label - 1]] == label
        keep[label] = area[label] / convex_hull_image(hole).sum() >= params.pale_pallor_min_solidity
    pallor = keep[comps]
    if not pallor.any():
        return pallor
    rim = faint & ~cells & binary.dilate(pallor, binary.disk_rows(max(1, int(round(d / 4)))))
    return pallor | rim


def _adjacency(labels: np.ndarray, height: np.ndarray):
    """Adjacent label pairs (i < j) and the highest ``height`` on their common border."""
    keys, vals = [], []
    for a, b, ha, hb in (
        (labels[:, :-1], labels[:, 1:], height[:, :-1], height[:, 1:]),
        (labels[:-1, :], labels[1:, :], height[:-1, :], height[1:, :]),
    ):
        touch = (a != b) & (a > 0) & (b > 0)
        la, lb = a[touch].astype(np.int64), b[touch].astype(np.int64)
        lo, hi = np.minimum(la, lb), np.maximum(la, lb)
        keys.append(lo * (int(labels.max()) + 1) + hi)
        vals.append(np.minimum(ha[touch], hb[touch]))
    keys = np.concatenate(keys)
    vals = np.concatenate(vals)
    if keys.size == 0:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    order = np.lexsort((vals, keys))
    keys, vals = keys[order], vals[order]
    last = np.r_[keys[1:] != keys[:-1], True]  # the highest value of each pair comes last
    keys, saddle = keys[last], vals[last]
    n = int(labels.max()) + 1
    return np.stack([keys // n, keys % n], 1), saddle


def merge_by_dynamics(
    labels: np.ndarray, height: np.ndarray, peak: np.ndarray, min_depth: float, min_area: int
) -> np.ndarray:
    """Merge watershed basins of ``height`` (a distance map) that are not separate cells.

    Two basins are one cell when the lower of their peaks rises less than
    ``min_depth`` above the pass between them (the peak's dynamics: a waist that
    shallow is the wobble of one outline, not the neck between two cells), or when one
    of them is smaller than ``min_area`` (a fragment). Basins are joined in order of
    decreasing pass height, as a flooding would. ``peak[i]`` is the height of
    basin ``i``'s seed. Returns the relabelled image.
    """
    n = int(labels.max())
    if n < 2:
        return labels
    pairs, saddle = _adjacency(labels, height)
    if len(pairs) == 0:
        return labels
    peak = peak.astype(np.float64)
    size = np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64)
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for k in np.argsort(-saddle, kind="stable"):
        i, j = find(int(pairs[k, 0])), find(int(pairs[k, 1]))
        if i == j:
            continue
        depth = min(peak[i], peak[j]) - saddle[k]
        if depth < min_depth or min(size[i], size[j]) < min_area:
            if peak[j] > peak[i]:
                i, j = j, i
            parent[j] = i
            size[i] += size[j]
    roots = np.array([find(i) for i in range(n + 1)])
    return roots[labels]


def _flood(height: np.ndarray, markers: np.ndarray, n_markers: int, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(height, markers, mask=mask)``, flooding only
    where it has a choice to make.

    The flood never crosses from one 4-connected piece of ``mask`` to another, so a
    piece that holds a single marker becomes that marker's basin whole (and one with
    none stays 0), which is what the watershed would give it. Only pieces with
    several markers are flooded; isolated round cells, most of a smear, are not.
    (Where two fronts reach a pixel at exactly the same height at the same time the
    watershed's choice depends on its heap's layout, so flooding a piece alone may
    pick the other side; on the smoothed distance maps flooded here that did not
    happen on 38 fields and a 16 MP mosaic, nor in the tests.)
    """
    pieces, n_pieces = ndi.label(mask)
    seeded = markers > 0
    pair = np.unique(pieces[seeded].astype(np.int64) * (n_markers + 1) + markers[seeded])
    piece_of_pair, marker_of_pair = pair // (n_markers + 1), pair % (n_markers + 1)
    n_seeds = np.bincount(piece_of_pair, minlength=n_pieces + 1)
    whole = np.zeros(n_pieces + 1, markers.dtype)
    single = n_seeds[piece_of_pair] == 1
    whole[piece_of_pair[single]] = marker_of_pair[single]
    whole[0] = 0  # outside the mask (where a marker outside it would have put its id)
    basins = whole[pieces]
    contested = n_seeds > 1
    contested[0] = False
    if contested.any():
        region = contested[pieces]
        flooded = watershed(height, np.where(region, markers, 0), mask=region)
        basins[region] = flooded[region]
    return basins


def split_touching_cells(mask: np.ndarray, d: float, params: "CellParams") -> np.ndarray:
    """Instance labels of the red cells in ``mask`` (cells ``d`` pixels across).

    Every maximum of the smoothed distance map seeds a watershed basin; basins are
    then merged back by their dynamics and size (:func:`merge_by_dynamics`), so what
    remains is one basin per round cell, overlapping cells included.
    """
    edt = ndi.distance_transform_edt(mask).astype(np.float32)
    edt = ndi.gaussian_filter(edt, max(1.0, d / 16))
    edt[~mask] = 0
    peaks = (edt == ndi.maximum_filter(edt, size=3)) & mask
    markers, n = ndi.label(peaks, structure=np.ones((3, 3)))
    basins = _flood(-edt, markers, n, mask)
    seed_height = np.zeros(n + 1, np.float32)
    seed_height[markers[peaks]] = edt[peaks]
    return merge_by_dynamics(
        basins,
        edt,
        seed_height,
        min_depth=params.rbc_split_depth * d / 2,
        min_area=_area(d, params.rbc_fragment_area),
    )


def radial_symmetry(
    density: np.ndarray, d: float, reference: float, where: np.ndarray | None = None
) -> np.ndarray:
    """How strongly each pixel is the centre of a round outline about ``d`` across.

    Every edge pixel votes, along its density gradient (which points into the
    stained cell), for the point half a cell away (fast radial symmetry transform,
    Loy and Zelinsky 2003, at a few radii around ``d / 2``). A cell whose whole
    outline is visible scores about 1, one half-hidden in a clump about 0.5; the
    score still finds the centres of cells packed so tightly that the distance map
    shows one blob. ``reference`` is a typical cell's density; only edge pixels in
    ``where`` vote.
    """
    g = ndi.gaussian_filter(density, max(1.0, d / 24))
    gy = ndi.sobel(g, 0) / 8
    gx = ndi.sobel(g, 1) / 8
    mag = np.hypot(gy, gx)
    h, w = density.shape
    sel = mag > 0.1 * reference / d
    if where is not None:
        sel &= where
    ys, xs = np.nonzero(sel)
    uy, ux, weight = gy[sel] / mag[sel], gx[sel] / mag[sel], mag[sel]
    radii = d / 2 * np.array([0.75, 0.9, 1.05, 1.2])
    votes = np.zeros(h * w, np.float64)
    for r in radii:
        py = np.rint(ys + r * uy).astype(np.intp)
        px = np.rint(xs + r * ux).astype(np.intp)
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        votes += np.bincount(py[ok] * w + px[ok], weights=weight[ok], minlength=h * w)
    sigma = max(1.0, d / 10)
    score = ndi.gaussian_filter(votes.reshape(h, w).astype(np.float32), sigma)
    # a full outline of edge height ``reference`` spread over the vote blob scores 1
    score *= 2 * np.pi * sigma * sigma / (len(radii) * np.pi * d * reference)
    return score


def split_clumps(labels: np.ndarray, density: np.ndarray, d: float, params: "CellParams") -> np.ndarray:
    """Split regions holding several red cells (a clump the distance map saw as one).

    A region of area ``A`` holds about ``A / a`` cells of area ``a`` (the ruler's
    cell); when that is two or more and at least two separate centres of round
    outlines (:func:`radial_symmetry`) lie inside it, its pixels are shared among
    the strongest of those centres (at most ``A / a`` of them) by a few rounds of Lloyd's algorithm (each pixel to the nearest centre,
    each centre to the middle of its pixels), which tiles a clump of packed cells
    into cell-sized pieces.
    """
    cell_area = np.pi * d * d / 4
    sizes = np.bincount(labels.ravel())
    counts = np.floor(sizes / cell_area + 0.5).astype(int)  # rounded half up
    counts[0] = 0
    clumps = np.flatnonzero(counts >= 2)
    if clumps.size == 0:
        return labels
    is_clump = np.zeros(len(sizes), bool)
    is_clump[clumps] = True
    in_clump = is_clump[labels]
    # only the outlines of (and around) clumps need to vote
    near = binary.dilate(in_clump, binary.ball_rows(0.7 * d))
    reference = float(np.median(density[labels > 0]))  # a typical cell's density
    symmetry = radial_symmetry(density, d, reference, where=near)
    spacing = max(2, int(round(params.rbc_clump_spacing * d)))
    score = np.where(in_clump, symmetry, 0)
    peaks = (score == ndi.maximum_filter(score, size=2 * spacing + 1)) & in_clump
    peaks &= score >= params.rbc_clump_min_symmetry
    py, px = np.nonzero(peaks)
    owner = labels[py, px]
    # the strongest ``counts`` centres of each clump; clumps with fewer than two stay whole
    order = np.lexsort((-score[py, px], owner))
    owner_sorted = owner[order]
    rank = np.arange(order.size) - np.searchsorted(owner_sorted, owner_sorted)
    keep = order[rank < counts[owner_sorted]]
    kept = np.bincount(owner[keep], minlength=len(sizes))
    keep = keep[kept[owner[keep]] >= 2]
    if keep.size == 0:
        return labels
    py, px, owner = py[keep], px[keep], owner[keep]
    out = labels.copy()
    next_label = int(labels.max()) + 1
    objects = ndi.find_objects(labels)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], owner.size]):
        lab = int(owner[start])
        sl = objects[lab - 1]
        ry, rx = np.nonzero(labels[sl] == lab)
        coords = np.stack([ry + sl[0].start, rx + sl[1].start], 1).astype(np.float64)
        centres = np.stack([py[start:stop], px[start:stop]], 1).astype(np.float64)
        for _ in range(4):
            nearest = cKDTree(centres).query(coords)[1]
            count = np.bincount(nearest, minlength=len(centres))
            moved = count > 0
            for axis in (0, 1):
                total = np.bincount(nearest, weights=coords[:, axis], minlength=len(centres))
                centres[moved, axis] = total[moved] / count[moved]
        nearest = cKDTree(centres).query(coords)[1]
        ids = np.r_[lab, np.arange(next_label, next_label + len(centres) - 1)]
        next_label += len(centres) - 1
        out[coords[:, 0].astype(np.intp), coords[:, 1].astype(np.intp)] = ids[nearest]
    return out


def _polar_path(score: np.ndarray, hi: np.ndarray, max_step: int, bend: float = 0.0) -> np.ndarray:
    """Closed path r(angle), 0 <= r <= hi, |r(a+1) - r(a)| <= max_step, maximising
    the summed ``score`` (angles x radii) by dynamic programming.

    The angles are walked twice round so that the path closes on itself; the
    second turn is returned.
    """
    n_a, n_r = score.shape
    radii = np.arange(n_r)
    s = np.where(radii[None, :] <= hi[:, None], score, -np.inf)
    total = s[0].copy()
    back = np.zeros((2 * n_a, n_r), np.int32)
    shifted = np.empty((2 * max_step + 1, n_r))
    for a in range(1, 2 * n_a):
        shifted.fill(-np.inf)
        for k, step in enumerate(range(-max_step, max_step + 1)):
            if step >= 0:
                shifted[k, step:] = total[: n_r - step]
            else:
                shifted[k, :step] = total[-step:]
            shifted[k] -= bend * abs(step)
        best = shifted.argmax(0)
        total = shifted[best, radii] + s[a % n_a]
        back[a] = radii - (best - max_step)
    path = np.zeros(2 * n_a, np.int32)
    path[-1] = int(np.argmax(total))
    for a in range(2 * n_a - 1, 0, -1):
        path[a - 1] = back[a, path[a]]
    return path[n_a:]


def wbc_outline(
    density: np.ndarray,
    colour: np.ndarray,
    nucleus: np.ndarray,
    others: np.ndarray,
    d: float,
    stained_range: tuple[float, float],
    params: "CellParams",
    threshold: float,
):
    """Outline of a white cell around its nucleus, as a closed polygon.

    Rays from the nucleus centre are sampled up to ``wbc_max_reach`` past the
    nucleus. Each sample scores +1 when it looks like white-cell cytoplasm
    (stained, and unlike red cells in colour) and -1 when it looks like glass or a
    red cell; the outline, found by dynamic programming over the rays (a polar active
    contour), encloses as much cytoplasm and as little else as it can while
    staying smooth from ray to ray. Pale, granular or patchy cytoplasm is thus
    judged as a region, not pixel by pixel. A density below ``stained_range[0]``
    is surely glass, above ``stained_range[1]`` surely stained. With
    ``wbc_granular_density`` set, matter that many times the field's glass/cell
    ``threshold`` counts at a colour only a little off the red cells' (an
    eosinophil's granules).

    Returns (ys, xs) vertices in the window's pixel coordinates.
    """
    cy, cx = np.argwhere(nucleus).mean(0)
    n_angles = 90
    step = 0.5  # samples per pixel along a ray: sub-pixel outlines
    reach = params.wbc_max_reach * d
    radii = np.arange(0, reach + np.hypot(*nucleus.shape) / 2, step)
    theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    py = cy + radii[None, :] * np.sin(theta)[:, None]
    px = cx + radii[None, :] * np.cos(theta)[:, None]
    coords = np.stack([py, px])
    dens = ndi.map_coordinates(density, coords, order=1, mode="nearest")
    unlike_rbc = ndi.map_coordinates(colour, coords, order=1, mode="nearest")
    nuc = ndi.map_coordinates(nucleus.astype(np.float32), coords, order=1, mode="constant") > 0.5
    other = ndi.map_coordinates(others.astype(np.float32), coords, order=0, mode="constant") > 0.5
    inside = (py >= 0) & (py <= nucleus.shape[0] - 1) & (px >= 0) & (px <= nucleus.shape[1] - 1)

    lo, hi = stained_range
    stained = (dens - lo) / max(hi - lo, 1e-6)  # one flat colour (a drawn field): no range
    odd_colour = (unlike_rbc - params.wbc_cytoplasm_colour[0]) / (
        params.wbc_cytoplasm_colour[1] - params.wbc_cytoplasm_colour[0]
    )
    cytoplasm = np.clip(np.minimum(stained, odd_colour), 0, 1)
    if params.wbc_granular_density is not None:
        (d_lo, d_hi), (c_lo, c_hi) = params.wbc_granular_density, params.wbc_granular_colour
        granular = np.minimum((dens / threshold - d_lo) / (d_hi - d_lo), (unlike_rbc - c_lo) / (c_hi - c_lo))
        cytoplasm = np.maximum(cytoplasm, np.clip(granular, 0, 1))
    sample = 2 * cytoplasm - 1
    sample[nuc] = 4  # the nucleus is always inside
    sample[other | ~inside] = -4  # another cell's nucleus, or off the field, never
    # weighted by radius: an area in polar coordinates
    score = np.cumsum(sample * (radii[None, :] + step), axis=1)

    # the limit: ``reach`` past the nucleus, judged over a few neighbouring rays so
    # that the limit is smooth where the nucleus has lobes
    last = np.where(nuc.any(1), nuc.shape[1] - 1 - np.argmax(nuc[:, ::-1], axis=1), 0)
    hi = ndi.maximum_filter1d(last, size=9, mode="wrap") + int(round(reach / step))
    bend = params.wbc_outline_stiffness * d * d / 4  # in the score's units (area)
    path = _polar_path(score, np.minimum(hi, len(radii) - 1), max_step=2, bend=bend)
    r = radii[path] + step / 2
    return cy + r * np.sin(theta), cx + r * np.cos(theta)


def _polygon_mask(ys: np.ndarray, xs: np.ndarray, shape) -> np.ndarray:
    """Pixels inside a closed outline that is star-shaped about its vertices' mean
    (as every outline from :func:`wbc_outline` is): a pixel is inside when it lies
    nearer the centre than the outline does in its direction (radius interpolated
    linearly in angle)."""
    cy, cx = float(np.mean(ys)), float(np.mean(xs))
    angle = np.arctan2(ys - cy, xs - cx)
    radius = np.hypot(ys - cy, xs - cx)
    order = np.argsort(angle)
    angle, radius = angle[order], radius[order]
    angle = np.r_[angle[-1] - 2 * np.pi, angle, angle[0] + 2 * np.pi]
    radius = np.r_[radius[-1], radius, radius[0]]
    mask = np.zeros(shape, bool)
    y0, y1 = max(0, int(np.floor(ys.min()))), min(shape[0], int(np.ceil(ys.max())) + 1)
    x0, x1 = max(0, int(np.floor(xs.min()))), min(shape[1], int(np.ceil(xs.max())) + 1)
    if y0 >= y1 or x0 >= x1:
        return mask
    py = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    px = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    mask[y0:y1, x0:x1] = np.hypot(py, px) <= np.interp(np.arctan2(py, px), angle, radius)
    return mask


def _stained_range(density: np.ndarray, threshold: float, params: "CellParams") -> tuple[float, float]:
    """Densities from which white-cell cytoplasm is possibly, then surely, stained.

    Three and six times the glass's own noise (the spread of the lower half of the
    glass densities): pale cytoplasm counts wherever it stands out of the glass,
    as on a clean CellaVision crop; on a noisy field it must reach the settings'
    fractions of the glass/cell threshold.
    """
    glass = density[::2, ::2]
    glass = glass[glass < threshold / 2]
    noise = float(np.median(glass) - np.percentile(glass, 16)) if glass.size > 100 else threshold
    lo, hi = params.wbc_cytoplasm_density
    return min(3 * noise, lo * threshold), min(6 * noise, hi * threshold)


def segment_field(
    rgb: np.ndarray, stain: StainModel, d: float, params: CellParams = CellParams()
):
    """Segment one field (or tile) whose red cells are ``d`` pixels across.

    Returns
    -------
    labels, nuclei : (H, W) int32
    cell_types : dict label -> "wbc" | "rbc" | "platelet"
    outlines : dict label -> (ys, xs)
        Sub-pixel outline of each white cell, for drawing it at full resolution.
    """
    raw_density, hue = stain_channels(rgb, stain)
    smooth = max(0.5, d / 40)
    density = ndi.gaussian_filter(raw_density, smooth)
    hue = ndi.gaussian_filter(hue, smooth)

    foreground = density > stain.foreground_threshold
    foreground = remove_small_objects(foreground, _area(d, params.min_platelet_area))
    violet = (hue > stain.nucleus_threshold) & foreground
    violet = remove_small_objects(violet, _area(d, params.min_platelet_area))

    # --- group violet blobs: lobes of one nucleus join, lone small blobs are platelets
    gap = max(1, int(round(params.nucleus_lobe_gap * d / 2)))
    groups, n_groups = ndi.label(binary.dilate(violet, binary.disk_rows(gap)))
    groups = groups * violet
    # a blob much smaller than the largest lobe of its group is a platelet lying
    # against the cell, not a lobe: it becomes a group of its own
    blobs, n_blobs = ndi.label(violet)
    if n_blobs > 1:
        blob_area = np.bincount(blobs.ravel(), minlength=n_blobs + 1)
        blob_group = np.zeros(n_blobs + 1, np.int64)
        blob_group[blobs[violet]] = groups[violet]
        largest = np.zeros(n_groups + 1, np.int64)
        np.maximum.at(largest, blob_group[1:], blob_area[1:])
        satellite = blob_area < params.nucleus_lobe_min_fraction * largest[blob_group]
        satellite[0] = False
        if satellite.any():
            regroup = blob_group.copy()
            regroup[satellite] = n_groups + np.arange(1, satellite.sum() + 1)
            groups = regroup[blobs]
            n_groups += int(satellite.sum())
    violet_area = np.bincount(groups.ravel(), minlength=n_groups + 1)
    is_nucleus = violet_area >= _area(d, params.min_wbc_nucleus_area)
    is_nucleus[0] = False
    nucleus_groups = np.where(is_nucleus[groups], groups, 0)
    platelet_groups = np.where(~is_nucleus[groups] & (groups > 0), groups, 0)

    labels = np.zeros(rgb.shape[:2], np.int32)
    nuclei = np.zeros(rgb.shape[:2], np.int32)
    cell_types: dict[int, str] = {}
    next_id = 1

    # --- white cells: nucleus + the cytoplasm around it (see wbc_outline)
    outlines: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    margin = int(np.ceil(params.wbc_max_reach * d)) + 2
    if is_nucleus.any():
        stained_range = _stained_range(density, stain.foreground_threshold, params)
    for group_id, sl in enumerate(ndi.find_objects(nucleus_groups), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, a.start - margin), min(n, a.stop + margin)) for a, n in zip(sl, labels.shape))
        window = nucleus_groups[sl]
        nucleus = window == group_id
        colour = ndi.gaussian_filter(colour_distance(rgb[sl], raw_density[sl], stain), smooth)
        ys, xs = wbc_outline(
            density[sl], colour, nucleus, (window > 0) & ~nucleus, d, stained_range, params,
            stain.foreground_threshold,
        )
        region = _polygon_mask(ys, xs, nucleus.shape)
        if (window != group_id).any() and (window > 0).sum() > nucleus.sum():
            # pixels nearer another nucleus belong to that cell
            _, nearest = ndi.distance_transform_edt(window == 0, return_indices=True)
            region &= window[nearest[0], nearest[1]] == group_id
        region |= nucleus
        target = labels[sl]
        target[region & (target == 0)] = next_id
        nuclei[sl][nucleus] = next_id
        cell_types[next_id] = "wbc"
        outlines[next_id] = (ys + sl[0].start, xs + sl[1].start)
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
    clear = ~binary.dilate(labels > 0, binary.diamond_rows(1))
    rbc = foreground & clear
    rbc = fill_pallor(rbc, d, params.pallor_hole_area)
    if params.pale_rbc_density is not None:
        faint = density > params.pale_rbc_density * stain.foreground_threshold
        rbc |= pale_rings(faint, rbc, d, params) & clear
    rbc = binary.opening(rbc, binary.disk_rows(max(1, int(d / 10))))
    rbc = remove_small_objects(rbc, _area(d, params.min_rbc_area))
    if rbc.any():
        rbc_labels = split_touching_cells(rbc, d, params)
        rbc_labels = split_clumps(rbc_labels, density, d, params)
        sizes = np.bincount(rbc_labels.ravel())
        small = sizes < _area(d, params.min_rbc_area)
        small[0] = False
        rbc_labels[small[rbc_labels]] = 0
        ids = np.flatnonzero(sizes * ~small)
        ids = ids[ids > 0]
        lut = np.zeros(rbc_labels.max() + 1, np.int32)
        lut[ids] = np.arange(next_id, next_id + len(ids))
        placed = lut[rbc_labels]
        labels = np.where(labels == 0, placed, labels)
        for new in range(next_id, next_id + len(ids)):
            cell_types[new] = "rbc"
        next_id += len(ids)

    return labels, nuclei, cell_types, outlines
