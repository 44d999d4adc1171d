"""analyze(): one image through segmentation, classification and attention; its stages;
the streaming classifier; differential_counts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model_file

from napari_smear.models import ModelFileError
from napari_smear.pipeline import (
    AnalysisResult,
    StreamingClassifier,
    analyze,
    differential_counts,
    finish_field,
    ModelSpec,
    load_models,
    prepare_field,
    retype_platelet_clumps,
)
from napari_smear.predict import classify_crops
from napari_smear.segment import segment_smear

WBC_CLASSES = ["lymphocyte", "neutrophil", "platelet"]
RBC_CLASSES = ["normal", "target", "schistocyte", "spherocyte"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return (
        tiny_model_file(folder / "wbc.safetensors", WBC_CLASSES, cell_types=["wbc", "platelet"]),
        tiny_model_file(folder / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], seed=1),
    )


@pytest.fixture(scope="module")
def field():
    from napari_smear.samples import synthetic_smear

    image, truth = synthetic_smear((240, 320), rbc_diameter_px=30.0, seed=3)
    return image, truth


def test_analyze_classifies_each_cell_type_with_its_model(field, model_files):
    image, _ = field
    wbc_model, rbc_model = model_files
    reports = []
    result = analyze(image, models=[wbc_model, rbc_model], device="cpu", batch_size=16,
                     progress=lambda f, m: reports.append((f, m)))
    assert isinstance(result, AnalysisResult)
    table = result.table
    labels = result.segmentation.labels
    assert set(np.unique(labels)) - {0} == set(table.label)
    assert set(table.cell_type) == {"wbc", "rbc", "platelet"}
    # every cell was classified, by the model of its type
    assert table["class"].notna().all()
    wbc_rows = table.cell_type.isin(["wbc", "platelet"])
    assert (table.loc[wbc_rows, "model"] == "wbc").all() and (table.loc[~wbc_rows, "model"] == "rbc").all()
    assert set(table.loc[wbc_rows, "class"]) <= set(WBC_CLASSES)
    assert set(table.loc[~wbc_rows, "class"]) <= set(RBC_CLASSES)
    # probabilities: a row per model's classes, NaN where the model did not look
    wbc_p = table.loc[wbc_rows, [f"p_{c}" for c in WBC_CLASSES]].to_numpy()
    np.testing.assert_allclose(wbc_p.sum(1), 1.0, atol=1e-4)
    assert table.loc[wbc_rows, [f"p_{c}" for c in RBC_CLASSES]].isna().all().all()
    np.testing.assert_allclose(table.confidence, table[[f"p_{c}" for c in WBC_CLASSES + RBC_CLASSES]].max(axis=1))
    # morphology columns are there; what a cell has no part for is missing, not 0
    # (a 0 nucleus colour read as black in a spreadsheet)
    assert {"perimeter_px", "nc_ratio", "cell_r"} <= set(table.columns)
    no_nucleus = table.nucleus_area_px == 0
    assert no_nucleus.any() and (~no_nucleus).any()
    nucleus_measures = ["nucleus_r", "nucleus_g", "nucleus_b", "nucleus_circularity"]
    assert table.loc[no_nucleus, nucleus_measures].isna().all().all()
    assert table.loc[~no_nucleus, nucleus_measures].notna().all().all()
    assert (table.loc[no_nucleus, ["nc_ratio", "nucleus_lobes"]] == 0).all().all()
    assert table[["cell_r", "cytoplasm_r"]].loc[no_nucleus].notna().all().all()
    # attention: per model, image-sized, only inside that model's cells
    assert set(result.attention) == {"wbc", "rbc"}
    for name, types in (("wbc", ["wbc", "platelet"]), ("rbc", ["rbc"])):
        attention = result.attention[name]
        assert attention.shape == labels.shape and attention.dtype == np.float32
        inside = np.isin(labels, table.label[table.cell_type.isin(types)])
        assert attention[~inside].max() == 0 and attention[inside].max() > 0
        assert attention.min() >= 0 and attention.max() <= 1
    assert result.models["wbc"]["cell_types"] == ["wbc", "platelet"]
    assert result.models["rbc"]["classes"] == RBC_CLASSES
    # counts agree with the table
    counts = result.counts
    assert counts["count"].sum() == len(table)
    assert set(counts.cell_type) == {"wbc", "rbc", "platelet"}
    # progress runs from 0 to 1
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("classifying with rbc" in m for _, m in reports)


def test_analyze_reuses_a_segmentation_and_a_model_without_cell_types(field, model_files, tmp_path):
    image, _ = field
    first = analyze(image, models=[model_files[1]], device="cpu")
    # a model file that does not say which cells it classifies sees every cell
    generic = tiny_model_file(tmp_path / "generic.safetensors", RBC_CLASSES)
    again = analyze(image, models=[generic], device="cpu", segmentation=first.segmentation, morphology=False)
    assert again.segmentation is first.segmentation
    assert again.table["class"].notna().all() and (again.table.model == "generic").all()
    assert "perimeter_px" not in again.table.columns


def test_analyze_without_models_and_on_an_empty_field(field):
    image, _ = field
    result = analyze(image, models=[], device="cpu")
    assert result.table["class"].isna().all() and result.attention == {}
    counts = result.counts
    assert set(counts["class"]) == {"unclassified"}
    blank = np.full((64, 64, 3), 240, np.uint8)
    with pytest.warns(UserWarning, match="no stained cells"):
        empty = analyze(blank, models=[], device="cpu")
    assert empty.table.empty and empty.counts.empty
    # the same columns as a field with cells (morphology included): per-image CSVs stack
    assert list(empty.table.columns) == list(result.table.columns)


def test_bad_model_fails_before_segmenting(field, tmp_path):
    image, _ = field
    with pytest.raises(ModelFileError, match="model file not found"):
        analyze(image, models=[tmp_path / "missing.safetensors"], device="cpu")
    twin = tmp_path / "a" / "same.safetensors"
    twin.parent.mkdir()
    tiny_model_file(twin, WBC_CLASSES)
    other = tiny_model_file(tmp_path / "same.safetensors", WBC_CLASSES)
    with pytest.raises(ValueError, match="both named 'same'"):
        load_models([twin, other])


def test_stages_give_what_analyze_gives(field, model_files):
    image, _ = field
    loaded = load_models(model_files, "cpu")
    specs = [m.spec for m in loaded]
    prepared = prepare_field(image, specs)
    assert set(prepared.crops) == {"wbc", "rbc"}
    assert {"segment", "morphology", "crop"} <= set(prepared.timings)
    outputs = {
        m.name: classify_crops(m.model, m.info, *prepared.crop_pixels()[m.name], device="cpu", batch_size=8)
        for m in loaded
    }
    staged = finish_field(prepared.without_crop_pixels(), specs, outputs)
    whole = analyze(image, models=model_files, device="cpu", batch_size=8)
    pd.testing.assert_frame_equal(staged.table, whole.table)
    for name in whole.attention:
        np.testing.assert_array_equal(staged.attention[name], whole.attention[name])
    # models loaded once (load_models) serve analyze as they are, for field after field
    again = analyze(image, models=loaded, device="cpu", batch_size=8)
    pd.testing.assert_frame_equal(again.table, whole.table)


def test_streaming_classifier_matches_one_field_at_a_time(field, model_files):
    """Fixed-size batches spanning fields give each cell the numbers it gets alone."""
    from napari_smear.samples import synthetic_smear

    loaded = load_models(model_files, "cpu")
    specs = [m.spec for m in loaded]
    fields = [field[0]] + [synthetic_smear((200, 260), rbc_diameter_px=28.0, seed=s)[0] for s in (5, 6)]
    prepared = [prepare_field(image, specs, morphology=False) for image in fields]
    streaming = StreamingClassifier(loaded, device="cpu", batch_size=16, max_waiting=2)
    done = {}
    for k, p in enumerate(prepared):
        done.update(streaming.add(k, p.crop_pixels()))
        done.update(streaming.step())
        assert streaming.waiting < 2  # a rare model's crops do not wait for ever
    done.update(streaming.flush())
    assert sorted(done) == [0, 1, 2] and streaming.waiting == 0
    assert streaming.padded > 0 and streaming.crops == sum(len(c) for p in prepared for c in p.crops.values())
    for k, p in enumerate(prepared):
        for m in loaded:
            alone = classify_crops(m.model, m.info, *p.crop_pixels()[m.name], device="cpu", batch_size=16)
            np.testing.assert_array_equal(done[k][m.name]["probs"], alone["probs"])
            np.testing.assert_array_equal(done[k][m.name]["attention"], alone["attention"])
    # the same bound on the waiting fields' pixels
    pixels = sum(p.rgb.shape[0] * p.rgb.shape[1] for p in prepared[:2])  # two fields fit, three do not
    by_pixels = StreamingClassifier(loaded, device="cpu", batch_size=16, max_waiting=100, max_waiting_pixels=pixels)
    for k, p in enumerate(prepared):
        by_pixels.add(k, p.crop_pixels(), size=p.rgb.shape[0] * p.rgb.shape[1])
        by_pixels.step()
        assert by_pixels.waiting <= 2
    with pytest.raises(ValueError, match="not loaded"):
        streaming.add("x", {"nope": (np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 2, 32, 32), np.uint8), None)})


def test_streaming_classifier_turns_only_the_unsure_crops(field, model_files):
    """With turned views: a crop the first view is sure of keeps that answer, the others
    get the mean of every view, computed in full batches of unsure crops, so each crop's
    numbers are the ones it gets alone, in whichever order the fields come."""
    from napari_smear.samples import synthetic_smear

    loaded = load_models(model_files, "cpu")
    specs = [m.spec for m in loaded]
    fields = [field[0]] + [synthetic_smear((200, 260), rbc_diameter_px=28.0, seed=s)[0] for s in (5, 6)]
    crops = [prepare_field(image, specs, morphology=False).crop_pixels() for image in fields]

    def alone(k, m, views):
        return classify_crops(m.model, m.info, *crops[k][m.name], device="cpu", batch_size=16, test_time_views=views,
                              sure_at=None)

    first = {(k, m.name): alone(k, m, 1) for k in range(3) for m in loaded}
    every = {(k, m.name): alone(k, m, 8) for k in range(3) for m in loaded}
    threshold = float(np.median(np.concatenate([r["probs"].max(axis=1) for r in first.values()])))

    def stream(order):
        streaming = StreamingClassifier(loaded, device="cpu", batch_size=16, max_waiting=2, test_time_views=8,
                                        sure_at=threshold)
        done = {}
        for k in order:
            done.update(streaming.add(k, crops[k]))
            done.update(streaming.step())
        done.update(streaming.flush())
        assert sorted(done) == [0, 1, 2] and streaming.waiting == 0
        return done, streaming

    done, streaming = stream([0, 1, 2])
    n_sure = 0
    for (k, name), one in first.items():
        sure = one["probs"].max(axis=1) >= threshold
        n_sure += int(sure.sum())
        for key in ("probs", "attention"):
            expected = np.where(sure[:, None] if key == "probs" else sure[:, None, None], one[key], every[(k, name)][key])
            np.testing.assert_array_equal(done[k][name][key], expected)
    total = sum(len(r["probs"]) for r in first.values())
    assert 0 < n_sure < total
    assert streaming.crops == total and streaming.turned == total - n_sure
    reordered, _ = stream([2, 0, 1])
    for k in range(3):
        for m in loaded:
            np.testing.assert_array_equal(reordered[k][m.name]["probs"], done[k][m.name]["probs"])
    with pytest.raises(ValueError, match="sure_at must be a probability"):
        StreamingClassifier(loaded, device="cpu", sure_at=1.5)


def test_analyze_turns_only_the_unsure_cells(field, tmp_path):
    """``analyze(sure_at=...)``: a cell whose first view is that sure keeps that answer,
    the others get the mean of every view; at a threshold no cell reaches, it is the
    all-views answer, at one every cell reaches, the one-view answer. A bad value is
    refused before the field is segmented."""
    image, _ = field
    models = [tiny_model_file(tmp_path / "wbc.safetensors", WBC_CLASSES, cell_types=["wbc", "platelet"],
                              test_time_views=8),
              tiny_model_file(tmp_path / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], test_time_views=8, seed=1)]
    seg = segment_smear(image)
    run = lambda **kw: analyze(image, models=models, segmentation=seg, device="cpu", morphology=False, **kw).table
    first, every = run(test_time_views=1), run()
    threshold = float(first.confidence.dropna().median())
    mixed = run(sure_at=threshold)
    sure = first.confidence >= threshold
    classified = first.confidence.notna()
    assert 0 < (sure & classified).sum() < classified.sum()
    np.testing.assert_allclose(mixed.confidence[sure], first.confidence[sure], atol=1e-5)
    np.testing.assert_allclose(mixed.confidence[classified & ~sure], every.confidence[classified & ~sure], atol=1e-5)
    np.testing.assert_allclose(run(sure_at=1.0).confidence.dropna(), every.confidence.dropna(), atol=1e-5)
    np.testing.assert_allclose(run(sure_at=1e-6).confidence.dropna(), first.confidence.dropna(), atol=1e-5)
    with pytest.raises(ValueError, match="sure_at must be a probability"):
        analyze(image, models=models, device="cpu", sure_at=1.5)


def test_differential_counts():
    table = pd.DataFrame({
        "label": range(1, 9),
        "cell_type": ["wbc", "wbc", "wbc", "wbc", "rbc", "rbc", "rbc", "platelet"],
        "class": ["neutrophil", "lymphocyte", "neutrophil", "monocyte", "normal", "normal", None, None],
    })
    counts = differential_counts(table)
    assert list(counts.columns) == ["cell_type", "class", "count", "percent"]
    wbc = counts[counts.cell_type == "wbc"]
    # most frequent first, ties by name: deterministic order
    assert list(wbc["class"]) == ["neutrophil", "lymphocyte", "monocyte"]
    assert list(wbc["count"]) == [2, 1, 1]
    np.testing.assert_allclose(wbc["percent"], [50.0, 25.0, 25.0])
    rbc = counts[counts.cell_type == "rbc"].set_index("class")
    assert rbc.loc["unclassified", "count"] == 1
    np.testing.assert_allclose(rbc.loc["normal", "percent"], 200 / 3)
    assert counts.groupby("cell_type")["percent"].sum().round(6).eq(100).all()
    assert list(counts.cell_type.unique()) == ["platelet", "rbc", "wbc"]
    # no class column: every cell unclassified; empty table: empty counts with the columns
    plain = differential_counts(table.drop(columns="class"))
    assert set(plain["class"]) == {"unclassified"} and plain["count"].sum() == 8
    empty = differential_counts(table.iloc[:0])
    assert empty.empty and list(empty.columns) == ["cell_type", "class", "count", "percent"]


def test_differential_counts_can_leave_out_the_cells_cut_by_the_edge():
    table = pd.DataFrame({
        "label": range(1, 6),
        "cell_type": ["wbc", "wbc", "wbc", "rbc", "rbc"],
        "class": ["neutrophil", "lymphocyte", "neutrophil", "normal", "normal"],
        "touches_edge": [False, True, False, True, True],
    })
    whole = differential_counts(table, include_edge_cells=False)
    assert whole.to_dict("records") == [{"cell_type": "wbc", "class": "neutrophil", "count": 2, "percent": 100.0}]
    assert differential_counts(table)["count"].sum() == 5  # counted by default
    # a table without the column (an older CSV) is counted whole
    assert differential_counts(table.drop(columns="touches_edge"), include_edge_cells=False)["count"].sum() == 5


def test_analyze_prior_correction_override(field, tmp_path):
    image, _ = field
    counts = {"normal": 80, "target": 5, "schistocyte": 3, "spherocyte": 2}
    model = tiny_model_file(tmp_path / "rbc.safetensors", RBC_CLASSES, cell_types=["rbc"], seed=1,
                            training={"balance": "sampler"}, training_data={"train_class_counts": counts},
                            prior_correction={"strength": 1.0})
    columns = [f"p_{c}" for c in RBC_CLASSES]
    own = analyze(image, models=[model], device="cpu", morphology=False, prior_correction=None)
    balanced = analyze(image, models=[model], device="cpu", morphology=False, segmentation=own.segmentation,
                       prior_correction=0.0)
    # Bayes' rule at strength 1: the stored correction multiplies the balanced answer by the prior
    prior = np.array([counts[c] for c in RBC_CLASSES], float)
    expected = balanced.table[columns].to_numpy() * prior
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(own.table[columns].to_numpy(), expected, atol=2e-3)
    plain = tiny_model_file(tmp_path / "plain.safetensors", RBC_CLASSES, cell_types=["rbc"])
    with pytest.raises(ValueError, match="class-balanced batches"):
        analyze(image, models=[plain], device="cpu", prior_correction=0.5)


def test_two_models_for_one_cell_type_are_refused(tmp_path):
    """One class column per cell: two models answering for the same cells would overwrite
    each other's answers (and their p_<class> columns could clash)."""
    first = tiny_model_file(tmp_path / "first.safetensors", WBC_CLASSES, cell_types=["wbc", "platelet"])
    second = tiny_model_file(tmp_path / "second.safetensors", WBC_CLASSES, cell_types=["wbc"], seed=1)
    with pytest.raises(ValueError, match="'first' and 'second' both classify wbc cells"):
        load_models([first, second], device="cpu")
    # a model file that does not say which cells it is for classifies them all
    anything = tiny_model_file(tmp_path / "anything.safetensors", RBC_CLASSES, seed=2)
    with pytest.raises(ValueError, match="both classify"):
        load_models([anything, second], device="cpu")


def test_analyze_reports_each_stage(field, model_files):
    messages = []
    analyze(field[0], models=[model_files[0]], device="cpu",
            progress=lambda fraction, message: messages.append((fraction, message)))
    text = [m for _, m in messages]
    assert text[0] == "estimating stain and scale"
    assert any(m.startswith("measuring the morphology of") for m in text)
    assert any(m.startswith("cropping the") for m in text)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_white_cells_a_white_cell_model_calls_platelets_are_retyped():
    table = pd.DataFrame({
        "label": [1, 2, 3, 4],
        "cell_type": ["wbc", "wbc", "platelet", "wbc"],
        "class": ["platelet", "neutrophil", "platelet", "platelet"],
        "model": ["wbc8", "wbc8", "wbc8", "wbc-only"],
    })
    spec = dict(kind="plain", crop_diameters=4.0, input_size=32)
    deciding = ModelSpec(name="wbc8", class_names=("neutrophil", "platelet"), cell_types=("wbc", "platelet"), **spec)
    # a model that never sees segmented platelets has not learned to tell them from white cells
    wbc_only = ModelSpec(name="wbc-only", class_names=("neutrophil", "platelet"), cell_types=("wbc",), **spec)
    out = retype_platelet_clumps(table, [deciding, wbc_only])
    assert out.cell_type.tolist() == ["platelet", "wbc", "platelet", "wbc"]
    assert out.segmented_type.tolist() == ["wbc", "wbc", "platelet", "wbc"]
    assert table.cell_type.tolist() == ["wbc", "wbc", "platelet", "wbc"]  # the input is left as it was
    assert retype_platelet_clumps(table.iloc[:0], [deciding]).empty


def test_a_model_unsure_of_most_cells_is_warned_about():
    """AnalysisResult.notes (and analyze's warnings): a model without a confident answer
    for most of at least 50 cells, as one from another microscope would be."""
    from napari_smear.pipeline import AnalysisResult, unsure_model_notes

    def table(n, share_unsure, model="rbc-x"):
        confidence = np.where(np.arange(n) < round(share_unsure * n), 0.5, 0.95)
        return pd.DataFrame({"model": model, "confidence": confidence})

    assert unsure_model_notes(table(100, 0.59)) == []
    (note,) = unsure_model_notes(table(100, 0.6))
    assert note.startswith("rbc-x was unsure of 60 % of the 100 cells it classified (no class at 85 % or more)")
    assert unsure_model_notes(table(49, 1.0)) == []  # too few cells to say
    both = pd.concat([table(60, 0.7), table(80, 0.1, "wbc-y"), pd.DataFrame({"model": [None], "confidence": [np.nan]})])
    assert [n.split(" ")[0] for n in unsure_model_notes(both)] == ["rbc-x"]
    assert unsure_model_notes(pd.DataFrame({"label": [1]})) == []  # nothing classified
    result = AnalysisResult(segmentation=None, table=table(60, 1.0))
    assert result.notes == unsure_model_notes(result.table)


def test_streaming_classifier_keeps_a_batch_halved_for_memory(field, model_files, monkeypatch):
    """A device that ran out of memory once is not asked for the full batch again: every
    later batch is split at the halved size (halving and retrying each batch threw the
    allocator's cache away batch after batch)."""
    import warnings

    import torch

    from napari_smear import predict

    loaded = load_models(model_files, "cpu")
    crops = prepare_field(field[0], [m.spec for m in loaded], morphology=False).crop_pixels()
    reference = StreamingClassifier(loaded, device="cpu", batch_size=16)
    finished = dict(reference.add(0, crops))
    finished.update(reference.flush())
    expected = finished[0]
    calls = []
    original = predict._classify_views

    def small_memory(runner, x, *args, **kwargs):
        calls.append(len(x))
        if len(x) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(runner, x, *args, **kwargs)

    monkeypatch.setattr(predict, "_classify_views", small_memory)
    streaming = StreamingClassifier(loaded, device="cpu", batch_size=16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        finished = dict(streaming.add(0, crops))
        finished.update(streaming.flush())
        done = finished[0]
    halvings = [w for w in seen if "out of memory" in str(w.message)]
    assert streaming.forward_batch_size == 4
    assert len(halvings) == 2  # 16 -> 8 -> 4 once, then every batch at 4
    assert max(calls[calls.index(4):]) == 4
    for name in expected:
        np.testing.assert_allclose(done[name]["probs"], expected[name]["probs"], atol=1e-5)
