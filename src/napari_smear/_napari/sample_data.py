"""npe2 sample-data commands: a synthetic smear (offline, with truth) and a BCCD field."""
from __future__ import annotations

import numpy as np
import pandas as pd

from napari_smear.io import METADATA_KEY, file_stem, read_image
from napari_smear.samples import fetch_bccd_sample, synthetic_smear


def synthetic_smear_sample() -> list[tuple[np.ndarray, dict, str]]:
    """The default :func:`~napari_smear.samples.synthetic_smear` field and its truth.

    Returns an RGB image layer ``"synthetic smear"`` and a labels layer
    ``"synthetic smear truth"`` (features: ``index``, ``label``, ``cell_type``,
    ``wbc_type``; coloured by cell type).
    """
    from napari_smear._napari.layers import class_colormap, CELL_TYPE_COLORS

    rgb, truth = synthetic_smear()
    label_ids = sorted(truth["cell_types"])
    features = pd.DataFrame(
        {
            "index": np.asarray(label_ids, dtype=np.int64),
            "label": np.asarray(label_ids, dtype=np.int64),
            "cell_type": [truth["cell_types"][i] for i in label_ids],
            "wbc_type": [truth["wbc_types"].get(i, "") for i in label_ids],
        }
    )
    colormap = class_colormap(label_ids, features["cell_type"], CELL_TYPE_COLORS)
    return [
        (
            rgb,
            {
                "name": "synthetic smear",
                "rgb": True,
                "metadata": {"rbc_diameter_px": truth["rbc_diameter_px"]},
            },
            "image",
        ),
        (
            truth["labels"],
            {
                "name": "synthetic smear truth",
                "features": features,
                "colormap": colormap,
                "opacity": 0.4,
                "visible": False,  # the image is what one analyses; truth is for checking
                "metadata": {METADATA_KEY: {"kind": "truth"}},
            },
            "labels",
        ),
    ]


def bccd_sample() -> list[tuple[np.ndarray, dict, str]]:
    """A real BCCD smear field (640 x 480 JPEG), downloaded once with a pinned hash.

    Raises
    ------
    RuntimeError
        When it cannot be downloaded (no network); the synthetic sample works offline.
    """
    path = fetch_bccd_sample()
    rgb, meta = read_image(path)
    return [
        (
            rgb,
            {
                "name": file_stem(path),
                "rgb": True,
                "metadata": {"path": str(path), "pixel_size_um": meta["pixel_size_um"]},
            },
            "image",
        )
    ]
