"""Batch analysis (`napari-smear analyze`, napari_smear.batch.analyze_files): outputs,
bad files, resume after a kill (byte for byte), the Dask path and the command line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import tiny_model_file

from napari_smear import analyze, batch
from napari_smear.batch import OUTPUT_VERSION, analyze_files, is_output_name
from napari_smear.cli import main
from napari_smear.io import read_image, write_png_atomic, write_tiff_atomic

WBC_CLASSES = ["lymphocyte", "neutrophil", "platelet"]
RBC_CLASSES = ["normal", "target", "schistocyte"]
PER_IMAGE = ("_labels.tif", "_nuclei.tif", "_attention.tif", "_cells.csv", "_overlay.png", "_done.json")
# Small classifier batches, so that batches span images and an interrupted run batches
# differently from an uninterrupted one.
BATCH = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def field(seed: int, shape=(168, 224)) -> np.ndarray:
    from napari_smear.samples import synthetic_smear

    return synthetic_smear(shape, rbc_diameter_px=26.0, seed=seed)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny models, a folder of four fields (one in a sub-folder) and its clean run."""
    root = tmp_path_factory.mktemp("batch")
    models = [
        str(tiny_model_file(root / "wbc.safetensors", WBC_CLASSES, cell_types=["wbc", "platelet"])),
        str(tiny_model_file(root / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], seed=1)),
    ]
    inputs = root / "in"
    (inputs / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png", "d.png"]
    for k, name in enumerate(names):
        write_png_atomic(inputs / name, field(k))
    clean = root / "clean"
    report = analyze_files(inputs, clean, models=models, device="cpu", batch_size=BATCH)
    return {"root": root, "models": models, "inputs": inputs, "names": names, "clean": clean, "report": report}


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (run.json, which records times, aside)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.json"
    }


def assert_same_files(folder: Path, reference: Path) -> None:
    ours, theirs = files_of(folder), files_of(reference)
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if ours[name] != theirs[name]]
    assert not different, f"files differ from the uninterrupted run: {different}"


# ----------------------------------------------------------------------------- outputs


def test_outputs_per_image_and_per_run(setup):
    clean, report = setup["clean"], setup["report"]
    assert (report.total, report.analysed, report.skipped, report.failed) == (4, 4, 0, 0)
    assert report.models == ["wbc", "rbc"] and report.missing_models == []
    for name in setup["names"]:
        stem = clean / name[:-4]
        for suffix in PER_IMAGE:
            assert Path(f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"
    stem = clean / "sub" / "c"  # sub-folders are mirrored
    image = read_image(setup["inputs"] / "sub" / "c.png")[0]
    labels, label_meta = read_image(f"{stem}_labels.tif", rgb=False)
    assert labels.dtype == np.uint32 and labels.shape == image.shape[:2]
    assert label_meta["napari_smear"]["kind"] == "cells" and label_meta["napari_smear"]["rbc_diameter_px"] > 20
    nuclei = tifffile.imread(f"{stem}_nuclei.tif")
    assert set(np.unique(nuclei)) - {0} <= set(np.unique(labels))

    cells = pd.read_csv(f"{stem}_cells.csv")
    assert list(cells.columns[:8]) == ["label", "cell_type", "class", "confidence", "model", "centroid_y",
                                       "centroid_x", "area_px"]
    assert list(cells.columns[8:14]) == [f"p_{c}" for c in WBC_CLASSES + RBC_CLASSES]
    assert {"bbox_min_y", "perimeter_px", "nc_ratio"} <= set(cells.columns)
    assert set(cells.label) == set(np.unique(labels)) - {0}
    assert cells["class"].notna().all()
    assert set(cells.loc[cells.cell_type == "rbc", "class"]) <= set(RBC_CLASSES)

    attention, attention_meta = read_image(f"{stem}_attention.tif", rgb=False)
    assert attention.dtype == np.float32 and attention.shape == (2, *labels.shape)
    assert attention_meta["napari_smear"]["models"] == ["wbc", "rbc"]
    rbc_cells = np.isin(labels, cells.label[cells.cell_type == "rbc"])
    assert attention[1][~rbc_cells].max() == 0 and attention[1][rbc_cells].max() > 0

    overlay = read_image(f"{stem}_overlay.png", rgb=False)[0]
    assert overlay.shape[1] == image.shape[1] and overlay.shape[0] > image.shape[0]  # + legend strip
    assert not np.array_equal(overlay[: image.shape[0]], image)  # outlines drawn

    summary = pd.read_csv(clean / "summary.csv")
    assert list(summary.image) == ["a.png", "b.png", "d.png", "sub/c.png"]
    row = summary.set_index("image").loc["sub/c.png"]
    assert row.path == str(setup["inputs"] / "sub" / "c.png")
    assert row.cells == len(cells) and row.rbc == (cells.cell_type == "rbc").sum()
    assert (row.width, row.height) == (image.shape[1], image.shape[0])
    for cls in RBC_CLASSES:
        assert row[f"rbc_{cls}"] == ((cells.cell_type == "rbc") & (cells["class"] == cls)).sum()
    pct = summary[[f"rbc_{c}_pct" for c in RBC_CLASSES]].sum(axis=1)
    np.testing.assert_allclose(pct, 100.0, atol=1e-3)
    # white cells the white-cell model re-typed as platelets (clumps), counted per field
    retyped = ((cells.segmented_type == "wbc") & (cells.cell_type == "platelet")).sum()
    assert row.platelet_from_wbc == retyped
    # each model's median confidence on the field (a QC figure: low on unfamiliar data)
    for model in ("wbc", "rbc"):
        expected = cells.loc[cells.model == model, "confidence"].median()
        assert row[f"{model}_median_confidence"] == pytest.approx(expected, abs=1e-4)
    # the same counts over the cells the image edge does not cut, for slides whose fields overlap
    whole = pd.read_csv(clean / "summary_whole_cells.csv")
    assert list(whole.columns) == list(summary.columns) and list(whole.image) == list(summary.image)
    assert whole.cells.tolist() == report.summary_whole_cells.cells.tolist()
    whole_row = whole.set_index("image").loc["sub/c.png"]
    inside = cells[~cells.touches_edge]
    assert cells.touches_edge.any() and not inside.empty
    assert whole_row.cells == len(inside) and whole_row.rbc == (inside.cell_type == "rbc").sum()
    for cell_type in ("wbc", "rbc", "platelet"):
        cut = (cells.touches_edge & (cells.cell_type == cell_type)).sum()
        assert row[f"{cell_type}_cut_by_edge"] == whole_row[f"{cell_type}_cut_by_edge"] == cut
    for cls in RBC_CLASSES:
        expected = ((inside.cell_type == "rbc") & (inside["class"] == cls)).sum()
        assert whole_row[f"rbc_{cls}"] == expected
        assert whole_row[f"rbc_{cls}_pct"] == pytest.approx(100.0 * expected / whole_row.rbc, abs=1e-3)
    # the differential of each folder of images: whole cells added up, percentages over the folder
    by_folder = pd.read_csv(clean / "summary_by_folder.csv")
    assert list(by_folder.folder) == [str(setup["inputs"]), str(setup["inputs"] / "sub")]
    assert by_folder.images.tolist() == [3, 1]
    top = whole[~whole.image.str.startswith("sub/")]
    folder_row = by_folder.iloc[0]
    for column in ("cells", "wbc", "rbc", "platelet", "rbc_cut_by_edge", *(f"rbc_{c}" for c in RBC_CLASSES)):
        assert folder_row[column] == top[column].sum()
    for cls in RBC_CLASSES:
        assert folder_row[f"rbc_{cls}_pct"] == pytest.approx(100 * top[f"rbc_{cls}"].sum() / top.rbc.sum(), abs=0.01)
    assert {"wbc_unsure_pct", "rbc_unsure_pct"} <= set(by_folder.columns)
    assert by_folder.iloc[1].cells == whole_row.cells
    pd.testing.assert_frame_equal(report.summary_by_folder.reset_index(drop=True), by_folder, check_dtype=False)
    errors = pd.read_csv(clean / "errors.csv")
    assert list(errors.columns) == ["file", "error"] and errors.empty

    run = json.loads((clean / "run.json").read_text())
    assert run["images"] == {"total": 4, "analysed": 4, "skipped": 0, "failed": 0}
    assert set(run["versions"]) >= {"napari_smear", "python", "numpy", "torch"}
    assert run["models"]["rbc"]["classes"] == RBC_CLASSES and len(run["models"]["wbc"]["weights_sha256"]) == 64
    assert run["settings"]["batch_size"] == BATCH and run["settings"]["executor"] == "in this process"
    assert {"decode", "segment", "crop", "classify", "write"} <= set(run["timings"]["stage_seconds"])
    marker = json.loads((clean / "sub" / "c_done.json").read_text())
    assert marker["image"] == "sub/c.png" and set(marker["outputs"]) == {"labels", "nuclei", "attention", "cells",
                                                                         "overlay"}
    # where the classifiers ran, recorded per image (not part of the settings' fingerprint)
    assert marker["ran_on"] == {"device": "cpu", "autocast": "bfloat16", "batch_size": BATCH}


def test_rerun_skips_finished_images_and_redoes_changed_ones(setup, tmp_path):
    out = tmp_path / "out"
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in setup["names"]:
        (inputs / name).write_bytes((setup["inputs"] / name).read_bytes())
    options = {"models": setup["models"], "device": "cpu", "batch_size": BATCH}
    assert analyze_files(inputs, out, **options).analysed == 4
    seen = []
    again = analyze_files(inputs, out, progress=lambda d, n, m: seen.append((d, n)), **options)
    assert (again.analysed, again.skipped) == (0, 4) and seen[0] == (4, 4)
    # a new version of one input is analysed again; so is an image whose output was lost
    write_png_atomic(inputs / "b.png", field(9))
    (out / "d_overlay.png").unlink()
    again = analyze_files(inputs, out, **options)
    assert (again.analysed, again.skipped) == (2, 2)
    # an image finished by code whose outputs differed (an older output version) is redone
    marker_path = out / "sub" / "c_done.json"
    marker = json.loads(marker_path.read_text())
    assert marker["settings"]["output_version"] == OUTPUT_VERSION
    marker["settings"]["output_version"] = OUTPUT_VERSION - 1
    marker_path.write_text(json.dumps(marker))
    again = analyze_files(inputs, out, **options)
    assert (again.analysed, again.skipped) == (1, 3)
    # other weights: every image is redone; one that can no longer be analysed loses its
    # marker (no stale summary row)
    other = tiny_model_file(tmp_path / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], seed=7)
    (inputs / "a.png").write_bytes(b"broken now")
    report = analyze_files(inputs, out, **{**options, "models": [setup["models"][0], other]})
    assert (report.analysed, report.failed) == (3, 1) and "a.png" not in set(report.summary.image)
    assert not (out / "a_done.json").exists()


def test_an_output_edited_by_hand_is_kept_when_its_image_is_analysed_again(setup, tmp_path):
    out = tmp_path / "out"
    options = {"models": setup["models"], "device": "cpu", "batch_size": BATCH}
    assert analyze_files(setup["inputs"], out, **options).analysed == 4
    labels_path = out / "a_labels.tif"
    edited = tifffile.imread(labels_path)
    edited[edited == edited.max()] = 0  # a cell deleted by hand
    tifffile.imwrite(labels_path, edited, compression="zlib")
    assert labels_path.stat().st_size != json.loads((out / "a_done.json").read_text())["outputs"]["labels"]["bytes"]
    with pytest.warns(UserWarning, match=r"a_labels.tif had changed since the run that wrote it .* kept as "
                                         r"a\.changed-\d{8}-\d{6}_labels\.tif"):
        again = analyze_files(setup["inputs"], out, **options)
    assert (again.analysed, again.skipped) == (1, 3)
    kept = list(out.glob("a.changed-*_labels.tif"))
    assert len(kept) == 1
    np.testing.assert_array_equal(tifffile.imread(kept[0]), edited)
    assert tifffile.imread(labels_path).max() > edited.max()  # analysed again
    # the kept file is known as an output: never taken for an image, even beside them
    assert is_output_name(kept[0].name)


def test_prior_correction_override_is_recorded_and_redoes_images(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png_atomic(inputs / "a.png", field(0))
    balanced = {"training": {"balance": "sampler"}, "prior_correction": {"strength": 0.5},
                "training_data": {"train_class_counts": {"normal": 60, "target": 5, "schistocyte": 3}}}
    model = str(tiny_model_file(tmp_path / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], **balanced))
    options = {"models": [model], "device": "cpu", "batch_size": BATCH}
    out = tmp_path / "out"
    analyze_files(inputs, out, **options)
    used = json.loads((out / "run.json").read_text())["models"]
    assert [m["prior_correction"] for m in used.values()] == [0.5]  # the file's own
    off = analyze_files(inputs, out, prior_correction=0.0, **options)
    assert (off.analysed, off.skipped) == (1, 0)  # answers change: the image is redone
    assert [m["prior_correction"] for m in json.loads((out / "run.json").read_text())["models"].values()] == [0.0]
    with pytest.raises(ValueError, match="prior_correction must be a finite number >= 0"):
        analyze_files(inputs, tmp_path / "bad", prior_correction=-1.0, **options)
    assert not (tmp_path / "bad" / "a_done.json").exists()
    plain = str(tiny_model_file(tmp_path / "plain.safetensors", RBC_CLASSES, cell_types=["rbc"]))
    with pytest.raises(ValueError, match="class-balanced batches"):
        analyze_files(inputs, tmp_path / "plain", models=[plain], device="cpu", prior_correction=0.5)


def one_field_and_a_red_cell_model(tmp_path, classes=RBC_CLASSES, **metadata):
    """A folder holding one field, a tiny red-cell model file (``metadata`` stored in it),
    analyze_files options with that model, and the output folder's path."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png_atomic(inputs / "a.png", field(0))
    model = str(tiny_model_file(tmp_path / "rbc.safetensors", classes, cell_types=["rbc"], **metadata))
    return inputs, model, {"models": [model], "device": "cpu", "batch_size": BATCH}, tmp_path / "out"


def test_test_time_views_are_recorded_and_redo_images(tmp_path):
    inputs, model, options, out = one_field_and_a_red_cell_model(tmp_path, test_time_views=4)
    analyze_files(inputs, out, **options)
    used = lambda: [m["test_time_views"] for m in json.loads((out / "run.json").read_text())["models"].values()]
    assert used() == [4]  # the file's own
    again = analyze_files(inputs, out, **options)
    assert (again.analysed, again.skipped) == (0, 1)
    one = analyze_files(inputs, out, test_time_views=1, **options)
    assert (one.analysed, one.skipped) == (1, 0) and used() == [1]  # answers change: the image is redone
    analyze_files(inputs, tmp_path / "four", **options)
    one_view, four_views = (pd.read_csv(folder / "a_cells.csv").confidence.dropna() for folder in (out, tmp_path / "four"))
    assert not np.allclose(one_view, four_views)
    with pytest.raises(ValueError, match="test_time_views must be one of"):
        analyze_files(inputs, tmp_path / "bad", test_time_views=3, **options)
    assert not (tmp_path / "bad" / "a_done.json").exists()


# ----------------------------------------------------------------------------- interruptions


class Killed(BaseException):
    """Stands for the process being killed (nothing in analyze_files catches it)."""


def test_interrupted_runs_resume_to_identical_outputs(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    options = {"models": setup["models"], "device": "cpu", "batch_size": BATCH}

    # 1. stopped by the progress hook after two images
    def stop_after_two(done, total, message):
        if message.startswith("analysed") and done >= 2:
            raise Killed()

    with pytest.raises(Killed):
        analyze_files(setup["inputs"], out, progress=stop_after_two, **options)
    assert len(list(out.rglob("*_done.json"))) == 2 and not (out / "summary.csv").exists()

    # 2. killed in the middle of writing an image: its first files are there, no marker
    def die_drawing_the_overlay(*args, **kwargs):
        raise Killed()  # labels, nuclei, attention and cells are written by now

    monkeypatch.setattr(batch, "render_overlay", die_drawing_the_overlay)
    with pytest.raises(Killed):
        analyze_files(setup["inputs"], out, **options)
    monkeypatch.undo()
    markers = {p.name for p in out.rglob("*_done.json")}
    half_done = [p for p in out.rglob("*_cells.csv") if p.name.replace("_cells.csv", "_done.json") not in markers]
    assert len(markers) == 2 and len(half_done) == 1
    # a write cut short by a kill leaves its temporary file
    (out / ".a_labels.tif.0123456789ab.tmp").write_bytes(b"partial")

    # 3. the restart finishes the job: same files, byte for byte, as the clean run
    report = analyze_files(setup["inputs"], out, **options)
    assert (report.analysed, report.skipped) == (2, 2)
    assert_same_files(out, setup["clean"])
    # redoing everything gives the same files again
    assert analyze_files(setup["inputs"], out, overwrite=True, **options).analysed == 4
    assert_same_files(out, setup["clean"])


def test_killed_process_resumes_to_identical_outputs(setup, tmp_path):
    """A real `napari-smear analyze` process, SIGKILLed after its first image."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_smear.cli", "analyze", str(setup["inputs"]), str(out),
               "--models", *setup["models"], "--device", "cpu", "--batch-size", str(BATCH), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("*_done.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    finished = len(list(out.rglob("*_done.json")))
    assert 1 <= finished < 4, process.stderr.read().decode()[-2000:]
    report = analyze_files(setup["inputs"], out, models=setup["models"], device="cpu", batch_size=BATCH)
    assert report.skipped == finished and report.analysed == 4 - finished
    assert_same_files(out, setup["clean"])


# ----------------------------------------------------------------------------- bad files


def test_bad_files_are_reported_and_the_batch_carries_on(setup, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "odd").mkdir(parents=True)
    image = field(5)
    write_png_atomic(inputs / "good.png", image)
    gray = np.round(image.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    write_png_atomic(inputs / "odd" / "gray.png", gray)
    write_tiff_atomic(inputs / "odd" / "deep16.tif", image.astype(np.uint16) * 257)
    write_tiff_atomic(inputs / "odd" / "gray16.tif", gray.astype(np.uint16) * 64)
    write_png_atomic(inputs / "odd" / "rgba.png", np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]))
    write_png_atomic(inputs / "blank.png", np.full((64, 64, 3), 245, np.uint8))
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (inputs / "empty.png").write_bytes(b"")
    truncated = (inputs / "good.png").read_bytes()
    (inputs / "truncated.png").write_bytes(truncated[: len(truncated) // 3])
    write_tiff_atomic(inputs / "odd" / "stack.tif", np.zeros((5, 40, 40), np.float32))
    write_png_atomic(inputs / "odd" / "tiny.png", np.zeros((8, 8, 3), np.uint8))
    write_tiff_atomic(inputs / "good.tif", image)  # same output name as good.png
    (inputs / "notes.txt").write_text("not an image: ignored")
    write_png_atomic(inputs / ".hidden.png", image)  # hidden: ignored

    with pytest.warns(UserWarning) as shown:
        report = analyze_files(inputs, tmp_path / "out", models=setup["models"], device="cpu", batch_size=BATCH)
    # napari-smear's warnings name the image they are about, and summary.csv keeps them
    assert any(str(w.message).startswith("odd/gray.png: the image has no colour") for w in shown)
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    reasons = {Path(f).name: e for f, e in zip(errors.file, errors.error)}
    assert set(reasons) == {"corrupt.jpg", "empty.png", "truncated.png", "stack.tif", "tiny.png", "good.tif"}
    assert reasons["corrupt.jpg"].startswith("ImageReadError")
    assert "empty.png" in reasons["empty.png"]
    assert "got shape (5, 40, 40)" in reasons["stack.tif"]
    assert "at least 16 x 16" in reasons["tiny.png"]
    assert "would overwrite those of" in reasons["good.tif"] and "good.png" in reasons["good.tif"]
    summary = report.summary.set_index("image")
    assert set(summary.index) == {"good.png", "blank.png", "odd/gray.png", "odd/deep16.tif", "odd/gray16.tif",
                                  "odd/rgba.png"}
    assert (report.total, report.analysed, report.failed) == (12, 6, 6)
    # 16-bit and RGBA copies of a field give what the 8-bit field gives
    for name in ("odd/deep16.tif", "odd/rgba.png"):
        assert summary.loc[name, ["wbc", "rbc", "platelet"]].tolist() == \
            summary.loc["good.png", ["wbc", "rbc", "platelet"]].tolist()
    assert summary.loc["odd/gray.png", "rbc"] > 10 and summary.loc["odd/gray16.tif", "rbc"] > 10
    assert "no colour (grayscale)" in summary.loc["odd/gray.png", "warnings"]
    assert (summary.loc[["good.png", "odd/rgba.png"], "warnings"] == "").all()  # none
    assert list(pd.read_csv(tmp_path / "out" / "summary.csv").columns)[-1] == "warnings"
    # a field with no cells is a result, not an error: empty table, picture without legend
    assert summary.loc["blank.png", "cells"] == 0
    assert pd.read_csv(tmp_path / "out" / "blank_cells.csv").empty
    assert read_image(tmp_path / "out" / "blank_overlay.png")[0].shape == (64, 64, 3)


def test_load_result_reads_back_what_the_batch_wrote(setup, tmp_path):
    """load_result gives an AnalysisResult as analyze() would: what Show in viewer displays."""
    from napari_smear.batch import load_result
    from napari_smear.pipeline import AnalysisResult

    clean = setup["clean"]
    result = load_result(clean, "sub/c.png")
    assert isinstance(result, AnalysisResult)
    labels = tifffile.imread(clean / "sub" / "c_labels.tif")
    np.testing.assert_array_equal(result.segmentation.labels, labels)
    np.testing.assert_array_equal(result.segmentation.nuclei, tifffile.imread(clean / "sub" / "c_nuclei.tif"))
    assert result.segmentation.rbc_diameter_px > 20
    cells = pd.read_csv(clean / "sub" / "c_cells.csv")
    assert result.table["label"].tolist() == cells["label"].tolist()
    assert result.table["class"].tolist() == cells["class"].tolist()
    assert list(result.models) == ["wbc", "rbc"]
    assert result.models["rbc"]["classes"] == RBC_CLASSES and result.models["rbc"]["cell_types"] == ["rbc"]
    stack = tifffile.imread(clean / "sub" / "c_attention.tif")
    assert list(result.attention) == ["wbc", "rbc"]
    np.testing.assert_array_equal(result.attention["rbc"], stack[1])
    # the differential count of the read-back table is the summary's
    row = pd.read_csv(clean / "summary.csv").set_index("image").loc["sub/c.png"]
    counts = result.counts.set_index(["cell_type", "class"])["count"]
    for cls in RBC_CLASSES:
        assert counts.get(("rbc", cls), 0) == row[f"rbc_{cls}"]

    # no result, or results changed since: specific errors, nothing written
    with pytest.raises(FileNotFoundError, match="no finished result for 'nope.png'"):
        load_result(clean, "nope.png")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("a_labels.tif", "a_nuclei.tif", "a_cells.csv", "a_done.json", "a_overlay.png"):
        (copy / name).write_bytes((clean / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="a_attention.tif"):
        load_result(copy, "a.png")
    (copy / "a_attention.tif").write_bytes((clean / "a_attention.tif").read_bytes())
    (copy / "a_cells.csv").write_text("label,cell_type\n1,rbc\n")
    with pytest.raises(ValueError, match="changed since the run"):
        load_result(copy, "a.png")
    (copy / "a_done.json").write_text('{"outputs": {"labels": "a_labels.tif"}}')
    with pytest.raises(ValueError, match="not a napari-smear completion marker"):
        load_result(copy, "a.png")


def test_output_folder_inside_the_input_folder_is_not_read_back(setup, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png_atomic(inputs / "a.png", field(1))
    for _ in range(2):
        report = analyze_files(inputs, inputs / "results", models=[], device="cpu")
        assert report.total == 1
    assert not (inputs / "results" / "a_attention.tif").exists()  # no model, no attention
    assert (inputs / "results" / "a_labels.tif").exists()


def test_output_folder_that_is_the_input_folder_skips_its_own_outputs(tmp_path):
    folder = tmp_path / "fields"
    folder.mkdir()
    write_png_atomic(folder / "a.png", field(1))
    for overwrite in (False, True):  # a re-run (and a redo) must not take a_labels.tif etc. for images
        report = analyze_files(folder, folder, models=[], device="cpu", overwrite=overwrite)
        assert (report.total, report.failed) == (1, 0)
        assert list(report.summary.image) == ["a.png"]
    assert not list(folder.glob("*_labels_*"))


def test_a_folder_of_earlier_outputs_given_as_input_has_only_its_images_analysed(tmp_path):
    """The label images of an earlier `analyze` (marker beside them) or `segment` (our
    TIFF metadata) are not smear fields; a user's image that only ends like one is."""
    folder = tmp_path / "fields"
    folder.mkdir()
    write_png_atomic(folder / "a.png", field(1))
    analyze_files(folder, folder, models=[], device="cpu")
    assert main(["segment", str(folder / "a.png"), "--out", str(tmp_path / "seg"), "--quiet"]) == 0
    write_png_atomic(tmp_path / "seg" / "b.png", field(2))
    write_png_atomic(tmp_path / "seg" / "mine_overlay.png", field(3))  # not ours: no marker
    report = analyze_files([folder, tmp_path / "seg"], tmp_path / "out", models=[], device="cpu")
    assert sorted(report.summary.image) == ["a.png", "b.png", "mine_overlay.png"]


def test_inputs_and_outputs_checked_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="pixel_size_um must be a positive number"):
        analyze_files(empty, tmp_path / "out", models=[], device="cpu", pixel_size_um=-1)
    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/sub"):
        with pytest.raises(ValueError, match="is a file"):
            analyze_files(empty, tmp_path / out, models=[], device="cpu")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no image files found"):
        analyze_files(empty, tmp_path / "out", models=[], device="cpu")
    (empty / "clip.gif").write_bytes(b"GIF89a")  # a format not read: said, with those that are
    with pytest.raises(ValueError, match=r"1 other file\(s\) were passed over \(clip.gif\): napari-smear reads .*\.png"):
        analyze_files(empty, tmp_path / "out", models=[], device="cpu")
    (empty / "clip.gif").unlink()
    write_png_atomic(empty / "a.png", field(1))
    with pytest.raises(ValueError, match=r"no image files found .* matching '\*.jpg'"):
        analyze_files(empty, tmp_path / "out", models=[], device="cpu", pattern="*.jpg")
    # one file reached twice (in its folder, by name, and through another spelling): analysed once
    report = analyze_files([empty, empty / "a.png", tmp_path / "." / "empty"], tmp_path / "out", models=[],
                           device="cpu")
    assert (report.total, report.analysed, report.failed) == (1, 1, 0)


# ----------------------------------------------------------------------------- Dask


def test_dask_cluster_gives_identical_outputs(setup, tmp_path):
    """Two worker processes on loopback do stage 1 and the writing; same files as one process."""
    with batch.local_cluster(2) as cluster:  # what --workers 2 starts: processes on 127.0.0.1
        assert len(cluster.workers) == 2
        report = analyze_files(setup["inputs"], tmp_path / "out", models=setup["models"], device="cpu",
                               batch_size=BATCH, scheduler=cluster.scheduler_address)
    assert report.analysed == 4
    assert report.run["settings"]["executor"].startswith("Dask cluster at tcp://127.0.0.1")
    assert_same_files(tmp_path / "out", setup["clean"])


def test_workers_and_scheduler_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        analyze_files(tmp_path, tmp_path / "out", models=[], workers=2, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="workers must be"):
        analyze_files(tmp_path, tmp_path / "out", models=[], workers=-1)


# ----------------------------------------------------------------------------- command line


def test_cli_analyze(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["analyze", str(setup["inputs"] / "sub"), str(setup["inputs"] / "a.png"), str(out),
                 "--models", ",".join(setup["models"]), "--device", "cpu", "--batch-size", str(BATCH), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 image(s) analysed" in printed and "models: wbc (wbc, platelet); rbc (rbc)" in printed
    assert "rbc by rbc (" in printed and "differential, whole cells in " in printed  # per folder
    # files and folders mix: the folder's tree is mirrored, a file lands at the top
    for name in ("c_cells.csv", "a_cells.csv"):
        assert (out / name).is_file()
    np.testing.assert_array_equal(tifffile.imread(out / "c_labels.tif"),
                                  tifffile.imread(setup["clean"] / "sub" / "c_labels.tif"))

    seg_only = tmp_path / "seg"
    assert main(["analyze", str(setup["inputs"] / "a.png"), str(seg_only), "--models", "none", "--quiet",
                 "--pattern", "*.png", "--no-morphology"]) == 0
    assert "segmentation only" in capsys.readouterr().out
    cells = pd.read_csv(seg_only / "a_cells.csv")
    assert cells["class"].isna().all() and "perimeter_px" not in cells.columns

    assert main(["analyze", str(tmp_path / "missing"), str(tmp_path / "not made"), "--models", "none"]) == 1
    assert "input not found" in capsys.readouterr().err
    assert not (tmp_path / "not made").exists()  # nothing is created for a run that cannot start
    (tmp_path / "afile").write_text("x")
    assert main(["analyze", str(setup["inputs"] / "a.png"), str(tmp_path / "afile"), "--models", "none"]) == 1
    assert "is a file" in capsys.readouterr().err
    # the output folder by --out, as the other commands take it; an image file last is no folder
    assert main(["analyze", str(setup["inputs"] / "a.png"), "--out", str(tmp_path / "by_option"),
                 "--models", "none", "--quiet", "--no-morphology"]) == 0
    assert (tmp_path / "by_option" / "a_cells.csv").is_file()
    capsys.readouterr()
    assert main(["analyze", str(setup["inputs"] / "a.png"), "--models", "none"]) == 1
    assert "no output folder" in capsys.readouterr().err
    assert main(["analyze", str(setup["inputs"] / "a.png"), str(tmp_path / "b.png"), "--models", "none"]) == 1
    assert "names an image file" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
    # the last path a folder of images that is not an input: said (most likely meant as an input)
    images = tmp_path / "images"
    images.mkdir()
    write_png_atomic(images / "c.png", field(2))
    assert main(["analyze", str(setup["inputs"] / "a.png"), str(images), "--models", "none", "--quiet",
                 "--no-morphology"]) == 0
    assert f"the last path, {images}, is taken for the output folder, and its 1 image file(s) are not analysed" \
        in capsys.readouterr().err
    assert main(["analyze", str(images), str(images), "--models", "none", "--quiet", "--no-morphology"]) == 0
    assert "is taken for the output folder" not in capsys.readouterr().err  # an input as well: meant
    with pytest.raises(SystemExit):  # a usage error (2): not a positive number
        main(["analyze", str(setup["inputs"] / "a.png"), str(out), "--pixel-size-um", "0"])
    # the tiny models record no class-balanced training: a prior correction is refused up front
    assert main(["analyze", str(setup["inputs"] / "a.png"), str(tmp_path / "prior"), "--models",
                 ",".join(setup["models"]), "--prior-correction", "0.5", "--quiet"]) == 1
    assert "class-balanced batches" in capsys.readouterr().err
    assert not (tmp_path / "prior" / "a_done.json").exists()
    assert main(["analyze", str(setup["inputs"]), str(out), "--models", str(tmp_path / "no.safetensors")]) == 1
    assert "model file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(out), "--workers", "2", "--scheduler", "tcp://x:1"])


def test_progress_names_every_stage_of_an_image(setup, tmp_path):
    """In this process the stages of one large image take minutes: each is named."""
    messages = []
    analyze_files(setup["inputs"] / "a.png", tmp_path / "out", models=setup["models"], device="cpu",
                  batch_size=BATCH, progress=lambda done, total, message: messages.append(message))
    stages = [m.split(": ", 1)[1] for m in messages if m.startswith("a.png: ")]
    assert stages[0] == "estimating stain and scale"
    for start in ("measuring the morphology of", "cropping the", "classifying", "writing the results"):
        assert any(stage.startswith(start) for stage in stages), (start, stages)
    assert messages[-1] == "analysed a.png"


def test_an_eyepiece_photo_in_the_batch(setup, tmp_path):
    # the summary says how much of the image was the unlit frame (counts per area need
    # it) and an ordinary field says 0
    from napari_smear.samples import eyepiece_photo, synthetic_smear

    photo, radial = eyepiece_photo(synthetic_smear((480, 640), rbc_diameter_px=36.0, seed=3)[0], fade=0.015)
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "phone.png", photo)
    report = analyze_files(tmp_path / "in", tmp_path / "out", models=setup["models"], device="cpu", batch_size=BATCH)
    row = report.summary.iloc[0]
    assert row["outside_view_share"] == pytest.approx((radial >= 1).mean(), abs=0.03)
    labels = tifffile.imread(tmp_path / "out" / "phone_labels.tif")
    assert not labels[radial > 1.02].any()
    clean = pd.read_csv(setup["clean"] / "summary.csv")
    assert (clean["outside_view_share"] == 0).all()


def test_an_image_too_large_for_the_memory_left_is_refused_and_the_batch_goes_on(setup, tmp_path, monkeypatch):
    # 300 x 400 px needs about 4.8 MB at 40 bytes a pixel; the fields of 168 x 224 px 1.5 MB
    (tmp_path / "in").mkdir()
    write_png_atomic(tmp_path / "in" / "large.png", field(7, shape=(300, 400)))
    write_png_atomic(tmp_path / "in" / "small.png", field(8))
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: 2_000_000)
    report = analyze_files(tmp_path / "in", tmp_path / "out", models=setup["models"], device="cpu", batch_size=BATCH)
    assert (report.analysed, report.failed) == (1, 1)
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors.file.str.endswith("large.png").all()
    assert "MemoryError" in errors.error[0] and "300 x 400" in errors.error[0] and "--on-disk" in errors.error[0]
    # segmentation alone (11 bytes a pixel): the same check, before the image is decoded
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: 1_000_000)
    rows = batch.segment_files([tmp_path / "in"], tmp_path / "seg", on_disk=False).set_index("path")
    large, small = (str(tmp_path / "in" / name) for name in ("large.png", "small.png"))
    assert "segmenting this 300 x 400 image needs about" in rows.loc[large, "error"]
    assert "napari-smear segment --on-disk" in rows.loc[large, "error"] and rows.loc[small, "error"] == ""


def test_a_run_with_nothing_to_do_leaves_no_output_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        analyze_files(empty, tmp_path / "new_out", models=[], device="cpu")
    assert not (tmp_path / "new_out").exists()
    (tmp_path / "bad.safetensors").write_text("not a model")
    write_png_atomic(empty / "a.png", field(1))
    with pytest.raises(Exception, match="bad.safetensors"):
        analyze_files(empty, tmp_path / "new_out", models=[str(tmp_path / "bad.safetensors")], device="cpu")
    assert not (tmp_path / "new_out").exists()
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        batch.segment_files(nothing, tmp_path / "seg_out")
    assert not (tmp_path / "seg_out").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder that was there before the run stays
    with pytest.raises(ValueError, match="no image files found"):
        analyze_files(nothing, kept, models=[], device="cpu")
    assert kept.is_dir()


def test_turned_views_only_for_unsure_cells_are_recorded_and_redo_images(tmp_path):
    inputs, model, options, out = one_field_and_a_red_cell_model(tmp_path, test_time_views=8)
    analyze_files(inputs, out, **options)
    recorded = lambda: json.loads((out / "run.json").read_text())["settings"]["sure_at"]
    assert recorded() is None
    threshold = float(pd.read_csv(out / "a_cells.csv").confidence.dropna().median())
    mixed = analyze_files(inputs, out, sure_at=threshold, **options)
    assert (mixed.analysed, mixed.skipped) == (1, 0) and recorded() == threshold  # answers change: redone
    assert (analyze_files(inputs, out, sure_at=threshold, **options).skipped) == 1
    expected = analyze(field(0), models=[model], device="cpu", sure_at=threshold).table
    np.testing.assert_allclose(pd.read_csv(out / "a_cells.csv").confidence.dropna(), expected.confidence.dropna(),
                               atol=1e-4)
    with pytest.raises(ValueError, match="sure_at must be a probability"):
        analyze_files(inputs, tmp_path / "bad", sure_at=2.0, **options)
    assert not (tmp_path / "bad").exists()


def test_the_unsure_model_warning_covers_every_finished_image(tmp_path, monkeypatch):
    """run.json's warning about a model unsure of most cells counts the cells of every
    finished image of the run's inputs: a re-run that skips them all, or one that adds an
    image, keeps it (it once counted only the images analysed by that run)."""
    import napari_smear.pipeline

    monkeypatch.setattr(napari_smear.pipeline, "UNSURE_WARNING_MIN_CELLS", 15)
    # untrained, two classes: never 85 % sure of either
    inputs, model, options, out = one_field_and_a_red_cell_model(tmp_path, ["normal", "abnormal"])
    warned = lambda: json.loads((out / "run.json").read_text())["warnings"]
    with pytest.warns(UserWarning, match="rbc was unsure of 100 % of the"):
        first = analyze_files(inputs, out, **options)
    (note,) = warned()
    cells = int(note.split(" of the ")[1].split(" ")[0])
    assert cells == int(pd.read_csv(out / "a_cells.csv").confidence.notna().sum()) >= 15
    with pytest.warns(UserWarning, match="rbc was unsure"):
        again = analyze_files(inputs, out, **options)
    assert (again.analysed, again.skipped) == (0, 1) and warned() == [note]
    write_png_atomic(inputs / "b.png", field(1))
    with pytest.warns(UserWarning, match="rbc was unsure"):
        more = analyze_files(inputs, out, **options)
    assert (more.analysed, more.skipped) == (1, 1)
    both = sum(int(pd.read_csv(out / f"{stem}_cells.csv").confidence.notna().sum()) for stem in "ab")
    assert warned() == [note.replace(f"of the {cells} cells", f"of the {both} cells")]
    assert first.run["warnings"] == [note]
    # the runs before keep a line each: the one that did the work is not lost to a resume
    earlier = json.loads((out / "run.json").read_text())["earlier_runs"]
    assert [entry["images"]["analysed"] for entry in earlier] == [1, 0]
    assert earlier[0]["started"] == first.run["started"] and first.run["earlier_runs"] == []


def test_the_unsure_model_warning_is_given_per_folder_of_images(tmp_path, monkeypatch):
    """Pooled over the run, a folder of another microscope's fields (the model unsure of
    most of its cells) was hidden by the folders it knows: each folder is judged alone,
    and its share of unsure cells is in summary_by_folder.csv."""
    import napari_smear.pipeline

    monkeypatch.setattr(napari_smear.pipeline, "UNSURE_WARNING_MIN_CELLS", 15)
    inputs, model, options, out = one_field_and_a_red_cell_model(tmp_path, ["normal", "abnormal"])
    (inputs / "other").mkdir()
    write_png_atomic(inputs / "other" / "b.png", field(1))
    with pytest.warns(UserWarning, match="rbc was unsure"):
        report = analyze_files(inputs, out, **options)
    notes = report.run["warnings"]
    assert [note.split(": ")[0] for note in notes] == [str(inputs), str(inputs / "other")]
    assert all("rbc was unsure of 100 % of the" in note for note in notes)
    assert report.summary_by_folder.rbc_unsure_pct.tolist() == [100.0, 100.0]
    # a folder with too few cells to judge is not warned about
    monkeypatch.setattr(napari_smear.pipeline, "UNSURE_WARNING_MIN_CELLS", 10_000)
    assert analyze_files(inputs, out, **options).run["warnings"] == []


def test_a_cancel_is_seen_between_the_classifier_batches(setup, tmp_path):
    """The fields waiting for the classifier are classified batch by batch with a progress
    report before each (a Cancel raised there stops the run): a flush of many waiting
    fields took seconds with nothing said and no way to stop."""
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if message.startswith("classifying a batch of"):
            raise Killed()

    with pytest.raises(Killed):
        analyze_files(setup["inputs"], tmp_path / "out", models=setup["models"], device="cpu", batch_size=BATCH,
                      progress=progress)
    assert seen[-1].startswith("classifying a batch of") and seen[-1].endswith(")")
    assert not list((tmp_path / "out").rglob("*_done.json"))


def test_the_overlay_legend_counts_a_class_per_cell_type_where_it_is_given_to_two(monkeypatch):
    """Platelet-sized cells that the white-cell model calls eosinophil are not counted
    with the white cells of that class in the QC picture's legend (it said "eosinophil 3"
    where summary.csv and the count dock say 1 white cell and 2 platelets)."""
    from types import SimpleNamespace

    labels = np.zeros((40, 40), np.uint32)
    for k in range(5):
        labels[2 + 7 * k:6 + 7 * k, 2:6] = k + 1
    table = pd.DataFrame({
        "label": [1, 2, 3, 4, 5],
        "cell_type": ["wbc", "platelet", "platelet", "platelet", "rbc"],
        "class": ["eosinophil", "eosinophil", "eosinophil", "platelet", None],
    })
    spec = SimpleNamespace(class_names=("eosinophil", "neutrophil", "platelet"))
    drawn = {}
    monkeypatch.setattr(batch, "_with_legend", lambda image, legend: drawn.setdefault("legend", legend) and image)
    batch.render_overlay(np.full((40, 40, 3), 230, np.uint8), labels, table, [spec])
    entries = dict((text, colour) for colour, text in drawn["legend"])
    assert sorted(entries) == ["eosinophil (platelet) 2", "eosinophil (wbc) 1", "platelet 1", "rbc (unclassified) 1"]
    assert entries["eosinophil (platelet) 2"] == entries["eosinophil (wbc) 1"]  # the class's own colour
    from napari_smear.colors import CELL_TYPE_RGB

    assert entries["rbc (unclassified) 1"] == tuple(CELL_TYPE_RGB["rbc"])


def test_a_file_calibration_the_red_cells_contradict_is_ignored_and_said(tmp_path):
    # camera programs write calibrations without the objective's magnification: the
    # file's pixel size is used where the red cells confirm it, else the measured scale
    image = field(5)  # red cells 26 px across
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, size in (("right.ome.tif", 7.5 / 27), ("wrong.ome.tif", 1.0)):
        tifffile.imwrite(inputs / name, image, ome=True, photometric="rgb",
                         metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size})
    with pytest.warns(UserWarning, match="wrong.ome.tif: the file records 1 um pixels"):
        report = analyze_files(inputs, tmp_path / "out", models=[], device="cpu")
    summary = report.summary.set_index("image")
    assert summary.loc["right.ome.tif", "pixel_size_um"] == pytest.approx(7.5 / 27)
    assert summary.loc["right.ome.tif", "warnings"] == ""
    wrong = summary.loc["wrong.ome.tif"]
    assert pd.isna(wrong["pixel_size_um"]) and "calibration was ignored" in wrong["warnings"]
    assert 20 < wrong["rbc_diameter_px"] < 32 and wrong["rbc"] == summary.loc["right.ome.tif", "rbc"]
    # the label images do not carry the calibration on
    assert read_image(tmp_path / "out" / "wrong_labels.tif", rgb=False)[1]["pixel_size_um"] is None
    assert read_image(tmp_path / "out" / "right_labels.tif", rgb=False)[1]["pixel_size_um"] == pytest.approx(7.5 / 27)


def test_an_image_whose_name_is_too_long_for_its_outputs_fails_by_itself_and_says_so(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png_atomic(inputs / "short.png", field(1))
    from PIL import Image

    Image.fromarray(field(2)).save(inputs / ("M" * 240 + ".png"))  # a valid name; "..._attention.tif" is not
    report = analyze_files(inputs, tmp_path / "out", models=[], device="cpu")
    assert (report.analysed, report.failed) == (1, 1)
    assert "its file name is too long for the names of its outputs" in report.errors.error.iloc[0]
