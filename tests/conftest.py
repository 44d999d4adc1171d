"""Shared fixtures and helpers: the real data folder beside the project, synthetic smears,
tiny model files, torch threads and the session's model list.

Test modules import the helpers as ``from conftest import ...`` (tests/ is not a package).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data() -> Path:
    """The ../shared/data folder, or skip (fail under CI, where it must be present)."""
    if not SHARED_DATA.exists():
        message = f"real shared data not found at {SHARED_DATA} (needed for real-data tests)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def synthetic_field():
    from napari_smear.samples import synthetic_smear

    return synthetic_smear(seed=0)


def read_rgb(path) -> np.ndarray:
    from napari_smear.io import read_image

    return read_image(path)[0]


# ----------------------------------------------------------------------------- torch threads


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads, then restore the previous number."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: a busy 2-core machine crawls with oversubscribed threads.

    Modules that run models use it for every test: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    with torch_threads(1):
        yield


@pytest.fixture
def fresh_user_models():
    """An empty list of session model files (napari widgets) before and after the test."""
    from napari_smear._napari.widgets import user_models

    user_models.clear()
    yield user_models
    user_models.clear()


# ----------------------------------------------------------------------------- tiny models

#: Architecture of the tiny shape-aware models (32 px crops, a few thousand weights): a
#: classification of a synthetic field takes a fraction of a second.
TINY_CONFIG = {"widths": [8, 16, 32, 64], "shape_widths": [4, 8, 16, 32], "fusion_hidden": 16}
TINY_CLASSES = ["lymphocyte", "neutrophil", "platelet"]


def tiny_model_file(
    path,
    classes=TINY_CLASSES,
    *,
    cell_types=None,
    kind: str = "shape_aware",
    config: dict | None = None,
    size: int = 32,
    seed: int = 0,
    **metadata,
):
    """Write an untrained tiny model file (random but deterministic weights); returns ``path``.

    ``config`` adds to (shape_aware) or replaces (other kinds) :data:`TINY_CONFIG`;
    ``cell_types`` and ``metadata`` go into the file's metadata.
    """
    import torch

    from napari_smear.models import build_model, save_model

    torch.manual_seed(seed)
    architecture = {**TINY_CONFIG, **(config or {})} if kind == "shape_aware" else dict(config or {})
    model = build_model(kind, len(classes), **architecture)
    extra = {"cell_types": list(cell_types)} if cell_types is not None else {}
    save_model(path, model, {"class_names": list(classes), "mean": [0.8, 0.7, 0.75], "std": [0.15, 0.2, 0.1],
                             "input_size": size, "crop_diameters": 4.0, **extra, **metadata})
    return path
