"""The scripts in docs/examples run, on small inputs: a synthetic smear and tiny model files."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model_file

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def example(name: str):
    """The example's main(argv) (its module is run without the __main__ guard)."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{Path(name).stem}")["main"]


def _write_fields(folder: Path, seeds=(0, 1)) -> list[Path]:
    from napari_smear.io import write_png_atomic
    from napari_smear.samples import synthetic_smear

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        rgb, _ = synthetic_smear((240, 320), n_wbc=1, n_platelets=2, seed=seed)
        paths.append(write_png_atomic(folder / f"field_{seed}.png", rgb))
    return paths


@pytest.mark.gui
def test_analyze_in_napari(tmp_path):
    (field,) = _write_fields(tmp_path, seeds=(0,))
    model = tiny_model_file(tmp_path / "tiny.safetensors")
    viewer = example("analyze_in_napari.py")([str(field), "--model", str(model), "--device", "cpu", "--headless"])
    try:
        names = [layer.name for layer in viewer.layers]
        assert names == ["field_0", "field_0 cells", "field_0 nuclei", "field_0 attention (tiny)"]
        assert "class" in viewer.layers["field_0 cells"].features.columns
    finally:
        viewer.close()


def test_analyze_folder(tmp_path, capsys):
    fields = _write_fields(tmp_path / "fields")
    (tmp_path / "fields" / "broken.png").write_bytes(b"\x89PNG truncated")
    model = tiny_model_file(tmp_path / "tiny.safetensors")
    out = tmp_path / "results"
    table = example("analyze_folder.py")([str(tmp_path / "fields"), "--model", str(model), "--out", str(out),
                                          "--device", "cpu"])
    assert set(table["file"]) == {str(p) for p in fields}
    counts = pd.read_csv(out / "counts.csv")
    assert list(counts.columns) == ["file", "cell_type", "class", "count", "percent"]
    for path in fields:
        cells = pd.read_csv(out / f"{path.stem}_cells.csv")
        assert {"label", "cell_type", "class", "confidence"} <= set(cells.columns)
        assert counts[counts.file == str(path)]["count"].sum() == len(cells)
    errors = pd.read_csv(out / "errors.csv")
    assert errors["file"].tolist() == [str(tmp_path / "fields" / "broken.png")]
    assert "2 of 3 images analysed" in capsys.readouterr().out


def test_finetune_from_folder(tmp_path, capsys):
    from scipy import ndimage as ndi

    from napari_smear.io import write_png_atomic
    from napari_smear.models import read_metadata
    from napari_smear.samples import synthetic_smear

    # Single-cell images: windows around red cells and platelets of a synthetic field.
    rgb, truth = synthetic_smear(seed=0)
    ids = sorted(truth["cell_types"])
    centres = ndi.center_of_mass(np.ones_like(truth["labels"]), truth["labels"], ids)
    written = {"rbc": 0, "platelet": 0}
    for label, (y, x) in zip(ids, centres):
        cell_type = truth["cell_types"][label]
        y, x = int(round(y)), int(round(x))
        if cell_type not in written or written[cell_type] >= 3 or not (80 <= y < 400 and 80 <= x < 560):
            continue
        (tmp_path / "cells" / cell_type).mkdir(parents=True, exist_ok=True)
        write_png_atomic(tmp_path / "cells" / cell_type / f"{label}.png", rgb[y - 80:y + 80, x - 80:x + 80])
        written[cell_type] += 1
    base = tiny_model_file(tmp_path / "base.safetensors")  # classes lymphocyte, neutrophil, platelet
    out = tmp_path / "mine.safetensors"
    result = example("finetune_from_folder.py")([
        str(tmp_path / "cells"), "--base", str(base), "--out", str(out), "--epochs", "2", "--batch-size", "4",
        "--cell-types", "platelet,rbc", "--device", "cpu",
    ])
    assert result.epochs_completed == 2
    metadata = read_metadata(out)
    assert metadata["class_names"] == ["platelet", "rbc"] and metadata["cell_types"] == ["rbc", "platelet"]
    assert metadata["input_size"] == 32  # the base model's crop convention
    printed = capsys.readouterr().out
    assert "epoch 2:" in printed and "classifier rows kept for 1 known class(es), new for ['rbc']" in printed
    assert f"saved {out}" in printed


def test_segment_whole_slide(tmp_path, capsys):
    import tifffile

    from napari_smear.samples import synthetic_smear

    slide = np.concatenate([synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=s)[0] for s in (0, 1)], axis=1)
    tifffile.imwrite(tmp_path / "slide.tif", slide, tile=(256, 256), compression="zlib")  # a compressed scan
    out = tmp_path / "results"
    counts = example("segment_whole_slide.py")([str(tmp_path / "slide.tif"), "--out", str(out),
                                                "--region", "100", "200", "256"])
    cells = pd.read_csv(out / "slide_cells.csv")
    assert counts.cells.sum() == len(cells) > 20
    assert set(counts.cell_type) <= {"wbc", "rbc", "platelet"}
    assert (out / "slide_region.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["slide_cells.csv", "slide_counts.csv", "slide_region.png"]
    assert "decoded once into" in capsys.readouterr().out


def test_classify_whole_slide(tmp_path, one_torch_thread):
    import tifffile

    from napari_smear.samples import synthetic_smear

    slide = np.concatenate([synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=s)[0] for s in (0, 1)], axis=1)
    tifffile.imwrite(tmp_path / "slide.tif", slide)
    out = tmp_path / "results"
    example("segment_whole_slide.py")([str(tmp_path / "slide.tif"), "--out", str(out), "--classify"])
    cells = pd.read_csv(out / "slide_cells.csv")
    assert cells["class"].notna().all() and {"confidence", "p_neutrophil"} <= set(cells.columns)
    differential = pd.read_csv(out / "slide_differential.csv")
    assert differential["count"].sum() == len(cells)
    assert sorted(p.name for p in out.iterdir()) == ["slide_cells.csv", "slide_counts.csv",
                                                     "slide_differential.csv"]
