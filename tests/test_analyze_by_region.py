"""A large image analysed region by region gives what the analysis of the whole does.

`pipeline.analyze_by_region` measures, crops, classifies and pastes the cells of one
region at a time (memory bounded by the region, not the image); `analyze` hands it
fields over `REGION_ANALYSIS_PIXELS`; `analyze_files(on_disk=...)` runs it on slides
larger than memory through memory-mapped files. Each must give the same cells,
classes, probabilities and attention maps as the whole-field path.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

import napari_smear.pipeline as pipeline
from napari_smear.samples import eyepiece_photo, synthetic_smear
from napari_smear.segment import segment_smear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return pipeline.load_models(["wbc-pbc8", "rbc-chula12"], "cpu")


@pytest.fixture(scope="module")
def mosaic():
    fields = [synthetic_smear((480, 640), rbc_diameter_px=36.0, n_wbc=4, seed=s)[0] for s in range(4)]
    return np.concatenate([np.concatenate(fields[:2], 1), np.concatenate(fields[2:], 1)], 0)


def assert_same_analysis(a, b):
    assert list(a.table.columns) == list(b.table.columns)
    assert len(a.table) == len(b.table) > 0
    for column in a.table.columns:
        x, y = a.table[column], b.table[column]
        if x.dtype.kind == "f":
            # the classifiers see other batches of crops: the last float digits may move
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=0, atol=1e-4, err_msg=column)
        else:
            pd.testing.assert_series_equal(x, y, check_names=False)
    assert set(a.attention) == set(b.attention)
    for name in a.attention:
        np.testing.assert_allclose(a.attention[name], b.attention[name], atol=1e-4, err_msg=name)


def test_analyze_by_region_equals_the_whole_field(models, mosaic):
    seg = segment_smear(mosaic)
    whole = pipeline.analyze(mosaic, models=models, segmentation=seg, device="cpu")
    reports = []
    regions = pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu", region_side=256,
                                         progress=lambda f, m: reports.append((f, m)))
    assert_same_analysis(whole, regions)
    assert any(message.startswith("region 12 of") for _, message in reports)  # 4 x 5 regions of 256 px
    assert all(0 <= f <= 1 for f, _ in reports) and reports[-1][0] == 1
    assert (whole.table["class"].notna()).all()


def test_an_eyepiece_photo_is_cropped_with_the_whole_frame_painted(models):
    photo, _ = eyepiece_photo(synthetic_smear((600, 800), rbc_diameter_px=36.0, n_wbc=4, seed=5)[0], fade=0.015)
    seg = segment_smear(photo)
    assert seg.params.get("outside_view_share", 0) > 0.05
    assert_same_analysis(pipeline.analyze(photo, models=models, segmentation=seg, device="cpu"),
                         pipeline.analyze_by_region(photo, models=models, segmentation=seg, device="cpu",
                                                    region_side=256))


def test_analyze_takes_a_large_field_region_by_region(models, mosaic, monkeypatch):
    calls = []
    by_region = pipeline.analyze_by_region
    monkeypatch.setattr(pipeline, "analyze_by_region", lambda *a, **k: calls.append(k) or by_region(*a, **k))
    monkeypatch.setattr(pipeline, "REGION_ANALYSIS_PIXELS", mosaic.shape[0] * mosaic.shape[1] - 1)
    result = pipeline.analyze(mosaic, models=models, device="cpu")
    assert len(calls) == 1 and result.table["class"].notna().all()
    monkeypatch.setattr(pipeline, "REGION_ANALYSIS_PIXELS", mosaic.shape[0] * mosaic.shape[1])
    pipeline.analyze(mosaic, models=models, device="cpu", segmentation=result.segmentation)
    assert len(calls) == 1


def test_attention_is_written_into_given_arrays(models, mosaic, tmp_path):
    seg = segment_smear(mosaic)
    maps = {"wbc-pbc8": np.memmap(tmp_path / "a.f32", np.float32, "w+", shape=mosaic.shape[:2])}
    maps["wbc-pbc8"][:] = 7  # whatever was there is cleared
    result = pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu",
                                        attention_out=maps)
    assert result.attention["wbc-pbc8"] is maps["wbc-pbc8"]
    assert not maps["wbc-pbc8"][seg.labels == 0].any() and maps["wbc-pbc8"].max() > 0
    assert isinstance(result.attention["rbc-chula12"], np.ndarray)  # not given: in memory


def test_bad_region_settings_are_refused_before_any_work(models, mosaic):
    with pytest.raises(ValueError, match="region_side"):
        pipeline.analyze_by_region(mosaic, models=models, region_side=100)
    with pytest.raises(ValueError, match=r"attention_out\['wbc-pbc8'\] must be a \(960, 1280\) float32"):
        pipeline.analyze_by_region(mosaic, models=models, segmentation=segment_smear(mosaic), device="cpu",
                                   attention_out={"wbc-pbc8": np.zeros((10, 10), np.float32)})


def test_a_field_without_cells_has_the_columns_of_the_whole_field_path(models):
    glass = np.full((300, 400, 3), 235, np.uint8)
    with pytest.warns(UserWarning):
        whole = pipeline.analyze(glass, models=models, device="cpu")
        regions = pipeline.analyze_by_region(glass, models=models, device="cpu", region_side=256)
    assert len(regions.table) == 0 and list(regions.table.columns) == list(whole.table.columns)
    assert not regions.attention["wbc-pbc8"].any()


# ----------------------------------------------------------------------------- batch: slides on disk


def test_analyze_files_on_disk_writes_what_the_in_memory_path_writes(models, mosaic, tmp_path):
    from napari_smear.batch import analyze_files
    from napari_smear.io import read_image

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", mosaic, tile=(256, 256), compression="zlib")
    disk = analyze_files(tmp_path / "in", tmp_path / "disk", models=models, device="cpu", on_disk=True)
    memory = analyze_files(tmp_path / "in", tmp_path / "memory", models=models, device="cpu", on_disk=False)
    assert (disk.analysed, disk.failed) == (memory.analysed, memory.failed) == (1, 0)
    assert "regions" in disk.run["timings"]["stage_seconds"]
    for kind in ("labels", "nuclei", "attention"):
        a, meta_a = read_image(tmp_path / "disk" / f"slide_{kind}.tif", rgb=False)
        b, meta_b = read_image(tmp_path / "memory" / f"slide_{kind}.tif", rgb=False)
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert meta_a["napari_smear"] == meta_b["napari_smear"]
    assert tifffile.TiffFile(tmp_path / "disk" / "slide_attention.tif").pages[0].is_tiled
    a, b = (pd.read_csv(tmp_path / d / "slide_cells.csv") for d in ("disk", "memory"))
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-4)
    pd.testing.assert_frame_equal(disk.summary.drop(columns="path"), memory.summary.drop(columns="path"))
    assert not list((tmp_path / "disk").glob(".scratch-*"))


def test_which_images_go_through_disk_and_a_failure_is_recorded(models, mosaic, tmp_path, monkeypatch):
    import napari_smear.batch as batch

    tifffile.imwrite(tmp_path / "slide.tif", mosaic)
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: 100 * 2**30)
    assert not batch._analyze_on_disk(tmp_path / "slide.tif", None)
    assert batch._analyze_on_disk(tmp_path / "slide.tif", True)
    monkeypatch.setattr(batch, "_available_memory_bytes", lambda: 40 * mosaic.shape[0] * mosaic.shape[1])
    assert batch._analyze_on_disk(tmp_path / "slide.tif", None)  # 40 bytes a pixel > half of it
    assert not batch._analyze_on_disk(tmp_path / "slide.tif", False)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "wide.tif", mosaic.astype(np.uint16) * 257)
    stale = tmp_path / "out" / ".scratch-killed"
    stale.mkdir(parents=True)
    (stale / "labels.u32").write_bytes(b"\0" * 64)
    report = batch.analyze_files(tmp_path / "in", tmp_path / "out", models=models, device="cpu", on_disk=True)
    assert (report.analysed, report.failed) == (0, 1) and "8-bit RGB" in report.errors.error[0]
    assert not stale.exists()  # a killed run's scratch folder is removed


def test_stopping_a_slide_part_way_leaves_no_scratch_and_no_marker(models, mosaic, tmp_path):
    from napari_smear.batch import analyze_files

    class Stop(Exception):
        pass

    def progress(done, total, message):
        if "region" in message:
            raise Stop(message)

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", mosaic)
    with pytest.raises(Stop, match="region 1 of"):
        analyze_files(tmp_path / "in", tmp_path / "out", models=models, device="cpu", on_disk=True,
                      progress=progress)
    assert not list((tmp_path / "out").glob(".scratch-*")) and not (tmp_path / "out" / "slide_done.json").exists()
    again = analyze_files(tmp_path / "in", tmp_path / "out", models=models, device="cpu", on_disk=True)
    assert (again.analysed, again.skipped) == (1, 0)  # the next run does it


def test_cli_analyze_on_disk(mosaic, tmp_path, capsys):
    from napari_smear.cli import main

    tifffile.imwrite(tmp_path / "slide.tif", mosaic[:480, :640])
    assert main(["analyze", str(tmp_path / "slide.tif"), str(tmp_path / "out"), "--on-disk", "--quiet",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "slide_attention.tif").exists()
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "slide.tif"), str(tmp_path / "out"), "--on-disk", "--in-memory"])


@pytest.mark.filterwarnings("ignore:rbc-chula12 was unsure")
def test_turned_views_only_for_unsure_cells_region_by_region(models, mosaic):
    """``sure_at`` reaches every region's classifier: the region-by-region result with it
    is the whole field's with it, and differs from the all-views answer."""
    seg = segment_smear(mosaic)
    whole = pipeline.analyze(mosaic, models=models, segmentation=seg, device="cpu", sure_at=0.85)
    regions = pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu", region_side=256,
                                         sure_at=0.85)
    assert_same_analysis(whole, regions)
    every = pipeline.analyze(mosaic, models=models, segmentation=seg, device="cpu")
    assert not np.allclose(whole.table.confidence.dropna(), every.table.confidence.dropna())
    with pytest.raises(ValueError, match="sure_at must be a probability"):
        pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu", sure_at=0)


def test_called_directly_it_warns_of_an_unsure_model_as_analyze_does(models, mosaic, monkeypatch):
    import warnings

    seg = segment_smear(mosaic)
    monkeypatch.setattr(pipeline, "unsure_model_notes", lambda table: ["rbc was unsure of 99 %"])
    with pytest.warns(UserWarning, match="rbc was unsure of 99 %"):
        pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu", region_side=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batch says them per folder instead
        pipeline.analyze_by_region(mosaic, models=models, segmentation=seg, device="cpu", region_side=256,
                                   warn=False)
