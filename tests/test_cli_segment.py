"""`napari-smear segment` and the demo: outputs per image, errors recorded, not fatal."""
from __future__ import annotations

import numpy as np
import pandas as pd
import tifffile

from napari_smear.cli import main
from napari_smear.io import write_png_atomic


def test_segment_cli_writes_outputs_and_records_bad_files(tmp_path, synthetic_field):
    image, _ = synthetic_field
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    write_png_atomic(inp / "sub" / "field.png", image)
    (inp / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    assert main(["segment", str(inp), "--out", str(out)]) == 0
    labels = tifffile.imread(out / "sub" / "field_labels.tif")
    nuclei = tifffile.imread(out / "sub" / "field_nuclei.tif")
    cells = pd.read_csv(out / "sub" / "field_cells.csv")
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint32
    assert nuclei.max() > 0
    assert {"label", "cell_type", "centroid_y", "area_px"} <= set(cells.columns)
    assert set(np.unique(labels)) - {0} == set(cells.label)
    errors = pd.read_csv(out / "errors.csv")
    assert errors.file.str.endswith("broken.jpg").all() and len(errors) == 1


def test_demo_runs_the_pipeline(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    synthetic = summary[summary.path.str.contains("synthetic")]
    assert len(synthetic) == 3 and (synthetic.wbc == 3).all()
    assert "wbc" in capsys.readouterr().out
