"""Result type of whole-smear segmentation."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

CELL_TYPES = ("wbc", "rbc", "platelet")


def check_cell_types(cell_types) -> list[str]:
    """``cell_types`` (one name or several) as a list in :data:`CELL_TYPES` order; a
    ValueError naming the unknown ones (a misspelt type would otherwise match no cell)."""
    chosen = [cell_types] if isinstance(cell_types, str) else [str(t) for t in cell_types]
    unknown = [t for t in chosen if t not in CELL_TYPES]
    if unknown:
        raise ValueError(f"cell_types must be some of {list(CELL_TYPES)}, got {unknown}")
    return [t for t in CELL_TYPES if t in chosen]

TABLE_COLUMNS = (
    "label",
    "cell_type",
    "centroid_y",
    "centroid_x",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_y",
    "bbox_max_x",
    "area_px",
)


def check_segmentation(segmentation, image: np.ndarray) -> None:
    """A segmentation given to be reused for ``image``: a TypeError unless it is a
    :class:`SmearSegmentation` (what ``segment_smear`` returns; a dict of label images or
    None is not one), a ValueError unless it is of that image (:meth:`~SmearSegmentation.check_image`)."""
    if not isinstance(segmentation, SmearSegmentation):
        raise TypeError(f"segmentation must be a SmearSegmentation (what segment_smear returns), got "
                        f"{type(segmentation).__name__}")
    segmentation.check_image(image)


@dataclass
class SmearSegmentation:
    """Instances of one smear field.

    Attributes
    ----------
    labels : (H, W) uint32
        Instance ids, 0 is background. Ids are ``1..N`` in table order.
    nuclei : (H, W) uint32
        Nucleus of each white cell, carrying the id of its cell (0 elsewhere).
    table : pandas.DataFrame
        One row per instance with at least :data:`TABLE_COLUMNS`; ``cell_type`` is one
        of ``wbc``, ``rbc``, ``platelet``. Bounding boxes are half-open (max exclusive),
        as in scikit-image's regionprops. :func:`~napari_smear.segment_smear` also
        gives ``touches_edge`` (bool): the cell reaches the edge of the field and may
        be cut by it.
    rbc_diameter_px : float
        The red-cell diameter (pixels) all size parameters were expressed in: estimated
        from the field, or derived from ``pixel_size_um``.
    pixel_size_um : float or None
        Pixel size if it was given.
    params : dict
        How it was made (``working_diameter_px``, ``scale_factor``, and
        ``outside_view_share`` for an eyepiece photo) and ``warnings``: what
        :func:`~napari_smear.segment_smear` warned about the image (a list of str), for
        whoever shows the result away from where Python warnings are printed.
    """

    labels: np.ndarray
    nuclei: np.ndarray
    table: pd.DataFrame
    rbc_diameter_px: float
    pixel_size_um: float | None = None
    params: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.table)

    def counts(self) -> dict[str, int]:
        """Number of instances per cell type (every type present, zeros included)."""
        vc = self.table["cell_type"].value_counts()
        return {t: int(vc.get(t, 0)) for t in CELL_TYPES}

    def check_image(self, image: np.ndarray) -> None:
        """Raise ValueError unless ``image`` (H, W[, C]) is the field these labels are of."""
        shape = tuple(np.shape(image)[:2])
        if shape != tuple(np.shape(self.labels)):
            raise ValueError(
                f"image shape {shape} does not match the segmentation's labels shape "
                f"{tuple(np.shape(self.labels))}: pass the image that was segmented"
            )
