"""`napari-smear demo` (make demo): the full batch output set on the bundled samples."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import napari_smear.models
from napari_smear.demo import run_demo
from napari_smear.models import build_model, save_model

SMALL = (("synthetic_small", 20.0),)


@pytest.fixture
def rbc_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("shape_aware", 2, widths=[8, 16, 32, 64], shape_widths=[4, 8, 16, 32], fusion_hidden=16)
    return save_model(tmp_path / "rbc-tiny.safetensors", model, {
        "class_names": ["normal", "abnormal"], "mean": [0.8, 0.7, 0.75], "std": [0.15, 0.2, 0.1],
        "input_size": 32, "crop_diameters": 4.0, "cell_types": ["rbc"],
    })


def test_demo_writes_the_full_output_set(tmp_path, rbc_model, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, models=[rbc_model], device="cpu", scales=SMALL, include_real=False)
    assert (report.analysed, report.failed) == (1, 0)
    for suffix in ("_labels.tif", "_nuclei.tif", "_attention.tif", "_cells.csv", "_overlay.png", "_done.json"):
        assert (out / f"synthetic_small{suffix}").is_file()
    for name in ("summary.csv", "errors.csv", "run.json"):
        assert (out / name).is_file()
    assert (out / "samples" / "synthetic_small.png").is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert summary.wbc.tolist() == [3] and summary.rbc_normal.iloc[0] + summary.rbc_abnormal.iloc[0] == summary.rbc.iloc[0]
    printed = capsys.readouterr().out
    assert "model rbc-tiny: classifies rbc into 2 classes" in printed
    assert "the synthetic_* fields are drawn, not photographed" in printed
    assert "synthetic_small.png" in printed and "rbc:" in printed
    assert (out / "galleries" / "samples_gallery.png").is_file() and (out / "report.html").is_file()
    assert "report: " in printed
    # a second demo run resumes: the sample is rewritten only if it changed, so it is skipped
    again = run_demo(out, models=[rbc_model], device="cpu", scales=SMALL, include_real=False)
    assert (again.analysed, again.skipped) == (0, 1)


def test_demo_says_when_a_builtin_model_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(napari_smear.models, "available_models", lambda: [])
    report = run_demo(tmp_path / "demo", device="cpu", scales=SMALL, include_real=False)
    assert report.missing_models == ["wbc-pbc8", "rbc-chula12"] and report.analysed == 1
    printed = capsys.readouterr().out
    assert "model wbc-pbc8: NOT INSTALLED" in printed and "model rbc-chula12: NOT INSTALLED" in printed
    assert "segmentation only" in printed
    run = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert run["missing_builtin_models"] == ["wbc-pbc8", "rbc-chula12"] and run["models"] == {}
    assert not (tmp_path / "demo" / "synthetic_small_attention.tif").exists()
