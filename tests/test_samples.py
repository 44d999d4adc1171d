"""Tests of napari_smear.samples: the synthetic smear and the pinned BCCD download."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from napari_smear import samples
from napari_smear.samples import BCCD_SHA256, fetch_bccd_sample, synthetic_smear

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def default_smear():
    return synthetic_smear()


def test_synthetic_smear_is_deterministic(default_smear):
    rgb, truth = default_smear
    rgb_again, truth_again = synthetic_smear()
    np.testing.assert_array_equal(rgb, rgb_again)
    np.testing.assert_array_equal(truth["labels"], truth_again["labels"])
    assert truth["cell_types"] == truth_again["cell_types"]
    other, _ = synthetic_smear(seed=1)
    assert not np.array_equal(rgb, other)


def test_synthetic_smear_truth_is_consistent(default_smear):
    rgb, truth = default_smear
    labels, nuclei, cell_types = truth["labels"], truth["nuclei"], truth["cell_types"]
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    assert labels.shape == nuclei.shape == (480, 640)
    assert labels.dtype == nuclei.dtype == np.uint32
    present = set(np.unique(labels)) - {0}
    assert present == set(cell_types), "every cell is visible and every label has a type"
    counts = {t: sum(v == t for v in cell_types.values()) for t in ("wbc", "rbc", "platelet")}
    assert counts["wbc"] == 2 and counts["platelet"] == 6 and counts["rbc"] > 50
    # Nuclei lie inside their own white cells and every white cell has one.
    nucleus_ids = set(np.unique(nuclei)) - {0}
    assert nucleus_ids == {i for i, t in cell_types.items() if t == "wbc"}
    assert np.all(labels[nuclei > 0] == nuclei[nuclei > 0])
    assert set(truth["wbc_types"].values()) == {"neutrophil", "lymphocyte"}
    # Overlapping pairs touch in the label image.
    assert truth["overlapping_pairs"]
    for first, second in truth["overlapping_pairs"]:
        assert cell_types[first] == cell_types[second] == "rbc"
        grown = np.zeros_like(labels, bool)
        ys, xs = np.nonzero(labels == first)
        grown[np.clip(ys + 1, 0, 479), xs] = True
        grown[ys, np.clip(xs + 1, 0, 639)] = True
        grown[np.clip(ys - 1, 0, 479), xs] = True
        grown[ys, np.clip(xs - 1, 0, 639)] = True
        assert np.any(labels[grown] == second)


def test_synthetic_smear_sizes_follow_the_rbc_diameter(default_smear):
    _, truth = default_smear
    labels, cell_types = truth["labels"], truth["cell_types"]
    areas = np.bincount(labels.ravel())
    diameter = truth["rbc_diameter_px"]
    rbc_area = np.pi * (diameter / 2) ** 2
    pairs = {i for pair in truth["overlapping_pairs"] for i in pair}
    # Whole, isolated red cells (cut ones touch the border) have about the nominal area.
    border = set(np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    whole_rbc = [i for i, t in cell_types.items() if t == "rbc" and i not in border | pairs]
    assert np.median(areas[whole_rbc]) == pytest.approx(rbc_area, rel=0.1)
    for i, t in cell_types.items():
        if t == "wbc":
            assert 1.6**2 * 0.9 <= areas[i] / rbc_area <= 2.0**2 * 1.1
        if t == "platelet":
            assert areas[i] / rbc_area < 0.1


def test_synthetic_smear_colours_look_like_wright_giemsa(default_smear):
    rgb, truth = default_smear
    labels, nuclei, cell_types = truth["labels"], truth["nuclei"], truth["cell_types"]
    background = rgb[labels == 0].mean(axis=0)
    assert np.all(np.abs(background - (225, 215, 215)) < 15)
    rbc_mask = np.isin(labels, [i for i, t in cell_types.items() if t == "rbc"])
    red = rgb[rbc_mask].mean(axis=0)
    assert red[0] > red[1] + 40 and red[0] > red[2] + 40  # pink-red
    nucleus = rgb[nuclei > 0].mean(axis=0)
    assert nucleus[2] > nucleus[1] and nucleus.mean() < 120  # dark purple
    # Central pallor: the centre of a red cell is paler than its ring.
    isolated = next(
        i for i, t in cell_types.items() if t == "rbc" and i not in {p for q in truth["overlapping_pairs"] for p in q}
    )
    ys, xs = np.nonzero(labels == isolated)
    cy, cx = ys.mean(), xs.mean()
    radius = np.hypot(ys - cy, xs - cx)
    centre = rgb[ys[radius < 4], xs[radius < 4]].mean(axis=0)
    ring = rgb[ys[(radius > 10) & (radius < 16)], xs[(radius > 10) & (radius < 16)]].mean(axis=0)
    assert centre[1] > ring[1] + 15


def test_synthetic_smear_options():
    rgb, truth = synthetic_smear((128, 160), rbc_diameter_px=20, n_rbc=10, n_wbc=1, n_platelets=0, overlap=False, seed=5)
    assert rgb.shape == (128, 160, 3)
    assert sorted(truth["cell_types"].values()).count("rbc") == 10
    assert truth["overlapping_pairs"] == []
    with pytest.raises(ValueError, match="could only fit"):
        synthetic_smear((64, 64), rbc_diameter_px=30, n_rbc=50, n_wbc=0, n_platelets=0)
    with pytest.raises(ValueError, match="shape"):
        synthetic_smear((8, 640))
    with pytest.raises(ValueError, match="n_wbc"):
        synthetic_smear(n_wbc=-1)


def test_pinned_hashes_match_the_shared_bccd_files():
    images = SHARED_DATA / "bccd" / "images"
    if not images.is_dir():
        message = f"BCCD images not found at {images}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert "BloodImage_00000" in BCCD_SHA256 and len(BCCD_SHA256) >= 3
    for name, expected in BCCD_SHA256.items():
        path = images / f"{name}.jpg"
        assert path.exists(), f"{path} is pinned but missing from the shared data"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def _make_pooch_fail(monkeypatch, error):
    import pooch

    def fetch(self, fname, *args, **kwargs):
        raise error

    monkeypatch.setattr(pooch.Pooch, "fetch", fetch)


def test_fetch_bccd_offline_gives_a_clear_error(monkeypatch, tmp_path):
    import requests

    monkeypatch.setenv(samples.CACHE_ENV, str(tmp_path))
    _make_pooch_fail(monkeypatch, requests.exceptions.ConnectionError("Name or service not known"))
    with pytest.raises(RuntimeError, match=r"could not download the BCCD sample .*no network.*File > Open Sample > napari-smear > Synthetic smear"):
        fetch_bccd_sample()


def test_fetch_bccd_hash_mismatch_and_unknown_name(monkeypatch, tmp_path):
    monkeypatch.setenv(samples.CACHE_ENV, str(tmp_path))
    _make_pooch_fail(monkeypatch, ValueError("SHA256 hash of downloaded file does not match"))
    with pytest.raises(RuntimeError, match="does not match its pinned sha256"):
        fetch_bccd_sample()
    with pytest.raises(ValueError, match="no pinned BCCD sample named 'nope'"):
        fetch_bccd_sample("nope")


def test_fetch_bccd_uses_the_cache_without_network(monkeypatch, tmp_path):
    """A file already in the cache with the right hash is returned without downloading."""
    source = SHARED_DATA / "bccd" / "images" / "BloodImage_00000.jpg"
    if not source.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{source} not found")
        pytest.skip(f"{source} not found")
    import pooch

    monkeypatch.setenv(samples.CACHE_ENV, str(tmp_path))
    (tmp_path / "BloodImage_00000.jpg").write_bytes(source.read_bytes())

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download although the file is cached")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", no_download)
    assert fetch_bccd_sample() == tmp_path / "BloodImage_00000.jpg"
