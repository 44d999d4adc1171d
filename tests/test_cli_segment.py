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
    assert main(["segment", str(inp), "--out", str(out)]) == 1  # 1: an image failed (errors.csv)
    labels = tifffile.imread(out / "sub" / "field_labels.tif")
    nuclei = tifffile.imread(out / "sub" / "field_nuclei.tif")
    cells = pd.read_csv(out / "sub" / "field_cells.csv")
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint32
    assert nuclei.max() > 0
    assert {"label", "cell_type", "centroid_y", "area_px"} <= set(cells.columns)
    assert set(np.unique(labels)) - {0} == set(cells.label)
    errors = pd.read_csv(out / "errors.csv")
    assert errors.file.str.endswith("broken.jpg").all() and len(errors) == 1

    # fixed and run again: errors.csv holds this run's failures (none), not the last run's
    (inp / "broken.jpg").unlink()
    assert main(["segment", str(inp), "--out", str(out)]) == 0
    assert pd.read_csv(out / "errors.csv").empty


def test_segment_cli_into_its_input_folder_skips_its_own_outputs(tmp_path, synthetic_field, capsys):
    image, _ = synthetic_field
    folder = tmp_path / "fields"
    folder.mkdir()
    write_png_atomic(folder / "field.png", image)
    for _ in range(2):  # the second run must not take field_labels.tif etc. for images
        assert main(["segment", str(folder), "--out", str(folder)]) == 0
    assert "1 image(s) segmented, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "errors.csv", "field.png", "field_cells.csv", "field_labels.tif", "field_nuclei.tif"]


def test_segment_cli_clear_errors_before_any_work(tmp_path, synthetic_field, capsys):
    image, _ = synthetic_field
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no image files found" in capsys.readouterr().err
    write_png_atomic(tmp_path / "a.png", image)
    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/sub"):
        assert main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / out)]) == 1
        assert "is a file" in capsys.readouterr().err
    # two files whose outputs would share names: the second is refused, not overwritten
    write_png_atomic(empty / "field.png", image)
    tifffile.imwrite(empty / "field.tif", image)
    assert main(["segment", str(empty), "--out", str(tmp_path / "o")]) == 1
    errors = pd.read_csv(tmp_path / "o" / "errors.csv")
    assert len(errors) == 1 and "rename one of the two files" in errors.error[0]


def test_demo_runs_the_pipeline(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    synthetic = summary[summary.path.str.contains("synthetic")]
    assert len(synthetic) == 3 and (synthetic.wbc == 3).all()
    assert "wbc" in capsys.readouterr().out


def test_segment_cli_working_diameter(tmp_path, synthetic_field, capsys):
    """--working-diameter is segment_smear's working_diameter_px; bad values are refused by the parser."""
    import pytest

    from napari_smear import segment_smear

    image, _ = synthetic_field
    write_png_atomic(tmp_path / "field.png", image)
    assert main(["segment", str(tmp_path / "field.png"), "--out", str(tmp_path / "out"), "--working-diameter", "16"]) == 0
    expected = segment_smear(image, working_diameter_px=16)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "field_labels.tif"), expected.labels)
    assert not np.array_equal(expected.labels, segment_smear(image).labels)  # it did change the resolution
    for bad in ("0", "-3", "nan"):
        with pytest.raises(SystemExit) as stop:
            main(["segment", str(tmp_path / "field.png"), "--out", str(tmp_path / "o2"), "--working-diameter", bad])
        assert stop.value.code == 2
    assert "--working-diameter" in capsys.readouterr().err


def test_analyze_files_records_the_working_diameter_and_redoes_images_made_at_another(tmp_path, synthetic_field):
    import json

    from napari_smear.batch import analyze_files

    image, _ = synthetic_field
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "field.png", image)
    out = tmp_path / "out"
    first = analyze_files(tmp_path / "in", out, models=[])
    assert json.loads((out / "run.json").read_text())["settings"]["working_diameter_px"] is None
    again = analyze_files(tmp_path / "in", out, models=[])  # same settings: nothing to redo
    faster = analyze_files(tmp_path / "in", out, models=[], working_diameter_px=16)
    assert json.loads((out / "run.json").read_text())["settings"]["working_diameter_px"] == 16
    assert (first.analysed, again.skipped, faster.analysed) == (1, 1, 1)


def test_working_diameter_floor_and_default_are_one_setting(tmp_path, synthetic_field, capsys):
    """Below 12 px per red cell touching cells merge: refused everywhere; 24 is the default
    however it is given (the Segment dock's "standard", the batch fingerprint)."""
    import pytest

    from napari_smear import segment_smear
    from napari_smear.batch import _working_diameter_setting, segment_files
    from napari_smear.segment import DEFAULT_WORKING_DIAMETER_PX, MIN_WORKING_DIAMETER_PX

    image, _ = synthetic_field
    with pytest.raises(ValueError, match="at least 12"):
        segment_smear(image, working_diameter_px=MIN_WORKING_DIAMETER_PX - 1)
    with pytest.raises(ValueError, match="at least 12"):
        segment_files([tmp_path], tmp_path / "out", working_diameter_px=4)
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--working-diameter", "8"])
    assert "expected at least 12" in capsys.readouterr().err
    assert _working_diameter_setting(24) is None and _working_diameter_setting(None) is None
    assert _working_diameter_setting(16) == 16.0
    np.testing.assert_array_equal(segment_smear(image, working_diameter_px=None).labels,
                                  segment_smear(image, working_diameter_px=DEFAULT_WORKING_DIAMETER_PX).labels)


def test_segment_cli_warnings_name_their_file(tmp_path, synthetic_field):
    import pytest

    image, _ = synthetic_field
    gray = np.round(image.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "gray.png", gray)
    with pytest.warns(UserWarning, match=r"^gray.png: the image has no colour"):
        assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0


def test_segment_cli_prints_warnings_as_messages_not_python_source(tmp_path, synthetic_field):
    # a process of its own: pytest records the warnings of the tests it runs itself
    import subprocess
    import sys

    image, _ = synthetic_field
    gray = np.round(image.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "gray.png", gray)
    command = "import sys; from napari_smear.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", command, "segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "napari-smear segment: warning: gray.png: the image has no colour" in done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr
    # with the progress bar showing, a warning is a line of its own (it was appended to the bar's)
    shown = subprocess.run(
        [sys.executable, "-c", command, "analyze", str(tmp_path / "in"), str(tmp_path / "analysed"),
         "--models", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.replace("\r", "\n").splitlines()
    warned = [line for line in lines if "warning: gray.png: the image has no colour" in line]
    assert warned and all(line.startswith("napari-smear analyze: warning:") for line in warned)


def test_files_of_a_user_at_output_names_are_never_written_over(tmp_path, synthetic_field, capsys):
    """A file at one of an image's output names (or summary.csv ...) that napari-smear
    did not write -- a user's own table beside the images, say -- stays as it was: the
    image fails with the reason (segment, analyze), a run-level file stops the run before
    any work. napari-smear's own outputs (segment's, then analyze's, or an interrupted
    run's) are recognised by their content and written over as before."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_png_atomic(folder / "a.png", synthetic_field[0])
    write_png_atomic(folder / "b.png", synthetic_field[0])
    tifffile.imwrite(folder / "a_labels.tif", np.full((8, 8), 7, np.uint16))  # no napari-smear metadata
    (folder / "a_cells.csv").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["segment", str(folder), "--out", str(folder)]) == 1
    errors = pd.read_csv(folder / "errors.csv")
    assert errors.file.map(lambda p: p.endswith("a.png")).tolist() == [True]
    assert "a_labels.tif, a_cells.csv are in the way of this image's outputs and were not written by napari-smear" \
        in errors.error[0]
    assert all((folder / name).read_bytes() == data for name, data in before.items())
    assert (folder / "b_labels.tif").is_file()  # the other image went on
    # analyze: the same image fails, b (segmented above: napari-smear's files) is analysed
    assert main(["analyze", str(folder), str(folder), "--models", "none", "--quiet"]) == 1
    assert all((folder / name).read_bytes() == data for name, data in before.items())
    assert "in the way of this image's outputs" in pd.read_csv(folder / "errors.csv").error[0]
    assert (folder / "b_done.json").is_file() and not (folder / "a_done.json").exists()
    from PIL import Image

    with Image.open(folder / "b_overlay.png") as overlay:
        assert overlay.info["Software"] == "napari-smear"  # how a later run knows it
    # an interrupted run (outputs written, no marker) is redone over its own files
    (folder / "b_done.json").unlink()
    assert main(["analyze", str(folder / "b.png"), str(folder), "--models", "none", "--quiet"]) == 0
    # a summary.csv of the user's: refused before any work
    (folder / "summary.csv").write_text("my summary\n")
    capsys.readouterr()
    assert main(["analyze", str(folder / "b.png"), str(folder), "--models", "none", "--quiet", "--overwrite"]) == 1
    assert "holds summary.csv, not written by napari-smear" in capsys.readouterr().err
    assert (folder / "summary.csv").read_text() == "my summary\n"


def test_models_before_the_inputs_gets_a_usage_error_that_says_why(tmp_path, synthetic_field, capsys):
    """--models takes every word after it (nargs="+"): given first, it swallowed the
    inputs and argparse said only "arguments are required: IN"."""
    import pytest

    image, _ = synthetic_field
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "a.png", image)
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "--models", "none", str(tmp_path / "in"), str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "--models takes every word after it" in capsys.readouterr().err
    # ending its list with -- works
    assert main(["analyze", "--quiet", "--models", "none", "--", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a_labels.tif").exists()
