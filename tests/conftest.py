"""Shared fixtures: the real data folder beside the project, synthetic smears."""
from __future__ import annotations

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
