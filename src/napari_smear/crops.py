"""Instance crops at a normalised scale, and pasting crop-resolution maps back.

A crop window is a square of ``crop_diameters`` red-cell diameters centred on the cell,
resampled to ``output_size`` pixels: a neutrophil has the same size in pixels whether
it came from a phone camera field or a 100x oil scan. Everything is vectorised over
cells (one resampling call per channel for a chunk of cells, no per-cell Python loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .segment.field_of_view import fill_outside_view, find_not_specimen
from .segment.types import SmearSegmentation

DEFAULT_CROP_DIAMETERS = 4.0
DEFAULT_OUTPUT_SIZE = 96
# Cells per resampling call: bounds the coordinate arrays (~1.5 MB per cell at 96 px).
_CHUNK = 256


@dataclass
class InstanceCrops:
    """Crops of the instances of one image.

    Attributes
    ----------
    images : (N, S, S, 3) uint8
    masks : (N, 2, S, S) uint8
        Channel 0 the cell's own mask, channel 1 its nucleus (other cells excluded).
    labels : (N,) int64
        Label id of each crop's cell in the segmentation.
    windows : (N, 4) float64
        ``(y0, x0, y1, x1)`` of each crop window in image pixel coordinates; may
        extend past the image (that part is filled with the glass colour).
    crop_diameters, rbc_diameter_px : float
        The scale convention the crops were made with.
    cell_types : (N,) object array of str, optional
        The segmented type of each crop's cell (wbc, rbc, platelet).
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    windows: np.ndarray
    crop_diameters: float
    rbc_diameter_px: float
    cell_types: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def output_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index) -> "InstanceCrops":
        return InstanceCrops(
            self.images[index], self.masks[index], self.labels[index],
            self.windows[index], self.crop_diameters, self.rbc_diameter_px,
            None if self.cell_types is None else self.cell_types[index],
        )


@dataclass(frozen=True)
class FieldColours:
    """The colours a field's crops are made with, measured once on the whole field.

    A whole slide is cropped region by region (:func:`napari_smear.pipeline.analyze`
    on a large image); each region's crops must take the glass colour and the stain of
    the whole field, not of the region, to be the crops the field would give at once.

    Attributes
    ----------
    glass : (3,) float
        Fill colour of a crop window's part past the field (the field's bright tenth).
    stain : StainAnchors or None
        The field's stain anchors (:func:`napari_smear.normalize.stain_anchors`); None
        when the crops are not stain-normalised.
    """

    glass: tuple[float, float, float]
    stain: object = None


def field_colours(painted: np.ndarray, segmentation: SmearSegmentation,
                  stain_normalization: str | None = None) -> FieldColours:
    """Measure :class:`FieldColours` on a whole field whose frame and annotations are
    already painted as glass (``prepare_crop_field``)."""
    stain = None
    if stain_normalization:
        from .normalize import check_method, stain_anchors

        check_method(stain_normalization)
        stain = stain_anchors(painted, segmentation)
    return FieldColours(_glass_colour(painted), stain)


def prepare_crop_field(rgb: np.ndarray) -> np.ndarray:
    """The field as crops are cut from it: an eyepiece photo's black surround and
    burned-in annotations painted as glass, as :func:`napari_smear.segment_smear` saw
    them (``rgb`` itself when there is neither)."""
    painted = find_not_specimen(rgb)[0]
    return rgb if painted is None else fill_outside_view(rgb, painted)


def _glass_colour(rgb: np.ndarray) -> tuple[float, float, float]:
    # padding past the image border takes the glass colour (the bright tenth)
    sample = rgb.reshape(-1, 3)[:: max(1, rgb.size // 300_000)]
    return tuple(float(v) for v in np.percentile(sample, 90, axis=0))


def crop_instances(
    image: np.ndarray,
    segmentation: SmearSegmentation,
    *,
    crop_diameters: float = DEFAULT_CROP_DIAMETERS,
    output_size: int = DEFAULT_OUTPUT_SIZE,
    labels=None,
    cell_types=None,
    stain_normalization: str | None = None,
    colours: FieldColours | None = None,
    origin: tuple[int, int] = (0, 0),
) -> InstanceCrops:
    """Crop every instance (or the given ``labels`` / ``cell_types``) at normalised scale.

    Parameters
    ----------
    image : (H, W, 3) array
        The field the segmentation was computed on (any dtype accepted by
        :func:`napari_smear.io.as_rgb_uint8`).
    segmentation : SmearSegmentation
    crop_diameters : float
        Side of the crop window in red-cell diameters.
    output_size : int
        Side of the output crops in pixels.
    labels : sequence of int, optional
        Only these label ids (in this order).
    cell_types : str or sequence of str, optional
        Only instances of these types (``"wbc"``, ``"rbc"``, ``"platelet"``).
    stain_normalization : str, optional
        Recolour the crops into the reference stain with this method (a model's
        ``metadata["stain_normalization"]``, see :mod:`napari_smear.normalize`), with the
        colours measured on the whole field.
    colours : FieldColours, optional
        For a region of a larger field (``image`` and ``segmentation`` cut from it):
        the glass and stain measured on the whole field (:func:`field_colours`); the
        region is then taken as :func:`prepare_crop_field` left it (painted).
    origin : (int, int)
        For such a region: the field pixel at its top left corner. The table's
        centroids stay in field coordinates and the crops' ``windows`` are given in
        the region's, each computed so that the crops are those of the whole field
        bit for bit (a whole number subtracted from a sampling position is exact).
    """
    from .io import as_rgb_uint8
    from .segment.types import check_segmentation

    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)):
        raise TypeError(f"output_size must be a whole number of pixels, got {output_size!r}")
    if isinstance(crop_diameters, bool) or not isinstance(crop_diameters, (int, float, np.integer, np.floating)):
        raise TypeError(f"crop_diameters must be a number (red-cell diameters), got {crop_diameters!r}")
    rgb = as_rgb_uint8(image)
    check_segmentation(segmentation, rgb)
    if colours is None:
        # the black surround of an eyepiece photo and burned-in annotations are painted
        # as glass, as segment_smear saw them: the crops (and the stain measured on the
        # field) hold neither
        rgb = prepare_crop_field(rgb)
        colours = field_colours(rgb, segmentation, stain_normalization) if len(segmentation.table) else None
    elif stain_normalization and colours.stain is None:
        raise ValueError("colours were measured without stain anchors; measure them with the stain normalisation")
    has_scale = np.isfinite(segmentation.rbc_diameter_px) and segmentation.rbc_diameter_px > 0
    if not has_scale and len(segmentation.table):
        raise ValueError("the segmentation has no red-cell diameter; cannot crop at normalised scale")
    if not (np.isfinite(crop_diameters) and crop_diameters > 0) or not output_size >= 8:
        raise ValueError(f"crop_diameters must be a number > 0 and output_size >= 8, got {crop_diameters!r}, "
                         f"{output_size!r}")
    table = segmentation.table
    if cell_types is not None:
        from .segment.types import check_cell_types

        table = table[table.cell_type.isin(check_cell_types(cell_types))]
    if labels is not None:
        given = np.atleast_1d(np.asarray(labels))
        if given.size and (given.dtype.kind not in "iu" and not np.all(np.mod(given.astype(float), 1) == 0)):
            raise ValueError(f"labels must be integer label ids, got {given[:5].tolist()}")
        wanted = given.astype(np.int64)
        missing = np.setdiff1d(wanted, table.label.to_numpy())
        if missing.size:
            raise ValueError(f"label ids not in the segmentation: {missing[:10].tolist()}")
        table = table.set_index("label").loc[wanted].reset_index()
    # a field without cells (a blank one has no ruler either) gives no crops
    half = crop_diameters * segmentation.rbc_diameter_px / 2 if has_scale else 0.0
    cy = table.centroid_y.to_numpy(np.float64)
    cx = table.centroid_x.to_numpy(np.float64)
    windows = np.stack([cy - half, cx - half, cy + half, cx + half], axis=1)
    ids = table.label.to_numpy(np.int64)
    oy, ox = (int(v) for v in origin)
    images, masks = _sample_windows(
        rgb, segmentation.labels, segmentation.nuclei, windows, ids, output_size,
        glass=None if colours is None else colours.glass, origin=(oy, ox), side=2 * half,
    )
    if oy or ox:
        windows = windows - np.array([oy, ox, oy, ox], np.float64)
    if stain_normalization and len(ids):
        # the colour map is measured on the whole field but applied to the crop pixels
        # only: a few cells' worth of pixels instead of the field
        from .normalize import apply_stain_map

        images = apply_stain_map(images, colours.stain)
    return InstanceCrops(
        images, masks, ids, windows, float(crop_diameters), float(segmentation.rbc_diameter_px),
        table.cell_type.to_numpy(object),
    )


def anti_alias_sigma(window_side: float, output_size: int) -> float:
    """Gaussian sigma (image pixels) the field is smoothed with before a window of
    ``window_side`` pixels is sampled at ``output_size`` (0: not smoothed)."""
    sigma = max(0.0, (window_side / output_size - 1.0) / 2.0)
    return 0.0 if sigma < 0.3 else sigma


def _sample_windows(rgb, labels, nuclei, windows, ids, size, *, side, glass, origin=(0, 0)):
    n = len(ids)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, 2, size, size), np.uint8)
    if n == 0:
        return images, masks
    # the window side as set, not read off a window (whose corners carry the rounding
    # of its centre): every call cuts a cell the same way, on a region as on the field
    step = side / size
    # Anti-alias once for the whole image instead of per crop.
    sigma = anti_alias_sigma(side, size)
    smooth = rgb if sigma == 0 else ndi.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0))
    glass = np.asarray(glass)  # the fill past the field's border
    offsets = (np.arange(size) + 0.5) * step - 0.5  # pixel centres inside the window
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        ys = windows[start:stop, 0, None] + offsets[None] - origin[0]  # (m, S)
        xs = windows[start:stop, 1, None] + offsets[None] - origin[1]
        m = stop - start
        yy = np.broadcast_to(ys[:, :, None], (m, size, size))
        xx = np.broadcast_to(xs[:, None, :], (m, size, size))
        coords = np.stack([yy.ravel(), xx.ravel()])
        for c in range(3):
            chan = ndi.map_coordinates(smooth[..., c], coords, order=1, mode="constant", cval=float(glass[c]))
            images[start:stop, ..., c] = np.clip(chan, 0, 255).round().reshape(m, size, size)
        near = np.rint(coords).astype(np.intp)
        inside = (near[0] >= 0) & (near[0] < rgb.shape[0]) & (near[1] >= 0) & (near[1] < rgb.shape[1])
        lab = np.zeros(coords.shape[1], labels.dtype)
        nuc = np.zeros(coords.shape[1], nuclei.dtype)
        lab[inside] = labels[near[0, inside], near[1, inside]]
        nuc[inside] = nuclei[near[0, inside], near[1, inside]]
        own = ids[start:stop, None, None]
        masks[start:stop, 0] = lab.reshape(m, size, size) == own
        masks[start:stop, 1] = nuc.reshape(m, size, size) == own
    return images, masks


def paste_maps(maps: np.ndarray, crops: InstanceCrops, labels: np.ndarray) -> np.ndarray:
    """Paste per-crop maps back into image coordinates, each inside its own cell.

    Parameters
    ----------
    maps : (N, h, w) array
        One map per crop (any resolution; resampled bilinearly onto its window).
    crops : InstanceCrops
        The crops the maps were computed on (their ``windows`` place them).
    labels : (H, W) integer array
        The segmentation's label image; a pixel takes the map of its own cell.

    Returns
    -------
    (H, W) float32, 0 outside the pasted cells.
    """
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3 or len(maps) != len(crops):
        raise ValueError(f"maps must be (N={len(crops)}, h, w); got shape {maps.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be the (H, W) integer label image of the segmentation; got "
                         f"{labels.dtype} {labels.shape}")
    if len(crops) and (crops.windows[:, 2].min() < -labels.shape[0] or crops.windows[:, 3].min() < -labels.shape[1]
                       or crops.windows[:, 0].max() > 2 * labels.shape[0]
                       or crops.windows[:, 1].max() > 2 * labels.shape[1]):
        raise ValueError(f"the crops' windows do not lie on a {labels.shape} label image: pass the labels "
                         "of the field they were cut from")
    out = np.zeros(labels.shape, np.float32)
    if len(crops) == 0:
        return out
    lut = np.full(int(max(labels.max(), crops.labels.max())) + 1, -1, np.int64)
    lut[crops.labels] = np.arange(len(crops))
    h, w = maps.shape[1:]
    windows = crops.windows
    # In row blocks: every cell pixel needs about 60 bytes of coordinates, which for a
    # whole-slide region (46 M cell pixels in 151 MP) ran to 6 GB at once. Each pixel is
    # interpolated on its own, so the blocks give the same values.
    rows_per_block = max(1, _PASTE_BLOCK_PIXELS // max(1, labels.shape[1]))
    for start in range(0, labels.shape[0], rows_per_block):
        block = labels[start : start + rows_per_block]
        ys, xs = np.nonzero(block)
        idx = lut[block[ys, xs]]
        keep = idx >= 0
        ys, xs, idx = ys[keep] + start, xs[keep], idx[keep]
        y0, x0, y1, x1 = (windows[idx, k] for k in range(4))
        u = (ys - y0) / (y1 - y0) * h - 0.5
        v = (xs - x0) / (x1 - x0) * w - 0.5
        coords = np.stack([idx.astype(np.float64), u, v])
        out[ys, xs] = ndi.map_coordinates(maps, coords, order=1, mode="nearest")
    return out


# pixels of label image per block of paste_maps (about 0.3 GB of temporaries at most)
_PASTE_BLOCK_PIXELS = 4_000_000


def crop_single_cell(
    image: np.ndarray,
    *,
    crop_diameters: float = DEFAULT_CROP_DIAMETERS,
    output_size: int = DEFAULT_OUTPUT_SIZE,
    rbc_diameter_px: float | None = None,
    pixel_size_um: float | None = None,
    stain_normalization: str | None = None,
) -> InstanceCrops:
    """Crop the central cell of a single-cell image (a PBC / CellaVision crop).

    The image is segmented like a field, so the central cell gets its cell and nucleus
    masks and the red cells around it give the scale; the instance under the image
    centre (or the nearest to it) is cropped at the normalised scale.
    """
    from .io import as_rgb_uint8
    from .segment import segment_smear

    rgb = as_rgb_uint8(image)
    seg = segment_smear(rgb, rbc_diameter_px=rbc_diameter_px, pixel_size_um=pixel_size_um)
    label = central_label(seg)
    if label is None:
        raise ValueError("no cell found in the single-cell image")
    return crop_instances(
        rgb, seg, crop_diameters=crop_diameters, output_size=output_size, labels=[label],
        stain_normalization=stain_normalization,
    )


def central_label(seg: SmearSegmentation) -> int | None:
    """The instance under the image centre, else the one whose centroid is nearest."""
    h, w = seg.labels.shape
    if seg.table.empty:
        return None
    at_centre = int(seg.labels[h // 2, w // 2])
    if at_centre:
        return at_centre
    d2 = (seg.table.centroid_y - h / 2) ** 2 + (seg.table.centroid_x - w / 2) ** 2
    return int(seg.table.label.iloc[int(np.argmin(d2.to_numpy()))])
