"""napari-smear: whole-smear segmentation and cell classification for hematology.

The public API is imported lazily so that ``import napari_smear`` stays cheap (no torch,
no napari) until a function is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "segment_smear": "napari_smear.segment",
    "SmearSegmentation": "napari_smear.segment",
    "read_image": "napari_smear.io",
    "crop_instances": "napari_smear.crops",
    "paste_maps": "napari_smear.crops",
    "InstanceCrops": "napari_smear.crops",
    "morphology_table": "napari_smear.morphology",
    "normalize_stain": "napari_smear.normalize",
    "load_model": "napari_smear.models",
    "train": "napari_smear.training",
    "classify_crops": "napari_smear.predict",
    "analyze": "napari_smear.pipeline",
    "analyze_by_region": "napari_smear.pipeline",
    "AnalysisResult": "napari_smear.pipeline",
    "load_models": "napari_smear.pipeline",
    "add_to_viewer": "napari_smear._napari.layers",
    "synthetic_smear": "napari_smear.samples",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_smear' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
