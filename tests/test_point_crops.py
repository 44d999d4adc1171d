"""Crops from whole fields annotated with one labelled point per cell (Chula RBC-12)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_smear.datasets import build_point_crop_set, read_point_annotations, load_crop_set, save_crop_set


def test_read_point_annotations(tmp_path):
    path = tmp_path / "1.txt"
    path.write_text("10 20 3\n\n 5.6 7 0\n")
    points = read_point_annotations(path)
    assert points.tolist() == [[10, 20, 3], [6, 7, 0]]
    path.write_text("10 20\n")
    with pytest.raises(ValueError, match="1.txt:1"):
        read_point_annotations(path)
    path.write_text("a b c\n")
    with pytest.raises(ValueError, match="x y class"):
        read_point_annotations(path)


def test_point_crop_set_from_real_chula_fields(shared_data, tmp_path):
    root = shared_data / "chula_rbc12"
    images = sorted((root / "images").glob("*.jpg"))[:2]
    fields = [(p, read_point_annotations(root / "labels" / f"{p.stem}.txt")) for p in images]
    n_points = sum(len(pts) for _, pts in fields)
    crop_set = build_point_crop_set(fields, [f"c{i}" for i in range(13)], progress=False, val_fraction=0.5)
    # nearly every labelled red cell is segmented and cropped once
    assert 0.85 * n_points <= len(crop_set) <= n_points
    assert crop_set.images.shape[1:] == (64, 64, 3)
    assert crop_set.masks.shape[1:] == (2, 64, 64)
    # the cell mask of a red-cell crop is a disc about half the crop wide (2 diameters)
    centre = crop_set.masks[:, 0, 28:36, 28:36].mean()
    assert centre > 0.9
    # cells of one field share its split
    for path in set(crop_set.paths):
        assert len(set(crop_set.split[crop_set.paths == path])) == 1
    stats = crop_set.point_stats
    assert stats["points"] == n_points
    save_crop_set(tmp_path / "chula.npz", crop_set)
    again = load_crop_set(tmp_path / "chula.npz")
    assert np.array_equal(again.labels, crop_set.labels)
