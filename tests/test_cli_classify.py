"""`napari-smear classify / evaluate / train / pack-crops`: outputs, columns and error reporting."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLASSES, TINY_CONFIG, tiny_model_file

from napari_smear.cli import build_parser, main
from napari_smear.datasets import CropSet, load_crop_set, save_crop_set
from napari_smear.models import read_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_crop_set(n_per_class=4, size=32) -> CropSet:
    rng = np.random.default_rng(0)
    n = n_per_class * len(TINY_CLASSES)
    yy, xx = np.mgrid[0:size, 0:size]
    cell = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (size / 4) ** 2
    return CropSet(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        masks=np.broadcast_to(np.stack([cell, cell]).astype(np.uint8), (n, 2, size, size)).copy(),
        morph=np.zeros((n, 1), np.float32), labels=np.repeat(np.arange(len(TINY_CLASSES)), n_per_class),
        class_names=TINY_CLASSES, split=np.array(["train", "val"] * (n // 2), dtype="<U5"),
        attributes=np.zeros((n, 0), np.int8), attribute_names=[], attribute_values=[],
        paths=np.array([f"c{i}.png" for i in range(n)]), source="synthetic",
    )


def test_parser_has_one_subcommand_per_tool():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001  (argparse has no public listing)
    assert {"train", "evaluate", "classify", "pack-crops"} <= set(commands)


def test_classify_writes_predictions_and_lists_bad_images(tmp_path, shared_data, capsys):
    table = pd.read_csv(shared_data / "pbc" / "split.csv")
    picked = table[table.split == "val"].groupby("label").head(1).head(2)
    folder = tmp_path / "cells" / "nested"
    folder.mkdir(parents=True)
    for path in picked.path:
        shutil.copy(shared_data / "pbc" / path, folder)
    (folder / "broken.jpg").write_bytes(b"this is no jpeg")
    (folder / "readme.txt").write_text("not an image: ignored")
    model = tiny_model_file(tmp_path / "m.safetensors")
    out = tmp_path / "out" / "preds.csv"

    code = main(["classify", str(tmp_path / "cells"), "--model", str(model), "--out", str(out),
                 "--device", "cpu", "--batch-size", "1", "--quiet"])
    assert code == 1  # the CSV is written, and the status says it lists an error
    result = pd.read_csv(out, keep_default_na=False)
    assert list(result.columns) == ["path", "prediction", "confidence", *[f"p_{c}" for c in TINY_CLASSES],
                                    "scale_measured", "cell_type", "warning", "error"]
    assert len(result) == 3
    bad = result[result.path.str.endswith("broken.jpg")]
    assert len(bad) == 1 and bad.error.iloc[0] and bad.prediction.iloc[0] == ""
    good = result[result.error == ""]
    assert len(good) == 2 and good.prediction.isin(TINY_CLASSES).all()
    np.testing.assert_allclose(good[[f"p_{c}" for c in TINY_CLASSES]].astype(float).sum(axis=1), 1, atol=1e-5)
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "classified 2 of 3 images" in captured.out


def test_classify_with_a_missing_model_fails_cleanly(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    code = main(["classify", str(image), "--model", str(tmp_path / "none.safetensors"), "--out",
                 str(tmp_path / "p.csv"), "--device", "cpu"])
    assert code == 1
    assert "model file not found" in capsys.readouterr().err


def test_an_image_given_as_the_output_is_refused_before_any_work(tmp_path, capsys):
    """`--out *.jpg` in a shell puts the first image where the CSV belongs: refused, the
    image kept (it used to be overwritten with the CSV)."""
    images = []
    for name in ("a.jpg", "b.jpg"):
        images.append(tmp_path / name)
        images[-1].write_bytes(b"\xff\xd8 not decoded: refused before reading")
    before = images[0].read_bytes()
    assert main(["classify", str(images[1]), "--out", str(images[0]), "--device", "cpu"]) == 1
    assert "must end in .csv" in capsys.readouterr().err
    assert images[0].read_bytes() == before
    out = tmp_path / "p.csv"
    assert main(["classify", str(out), "--out", str(out), "--device", "cpu"]) == 1
    assert "also one of the inputs" in capsys.readouterr().err
    model = tiny_model_file(tmp_path / "m.safetensors")
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    for option, target, message in (("--json", images[0], "must end in .json"),
                                    ("--confusion", images[0], "must end in .png or .pdf or .svg"),
                                    ("--json", tmp_path, "is a folder; give the file to write")):
        assert main(["evaluate", str(model), str(data), option, str(target), "--device", "cpu", "--quiet"]) == 1
        assert message in capsys.readouterr().err
    assert main(["pack-crops", str(tmp_path), "--out", str(images[0]), "--quiet"]) == 1
    assert "must end in .npz" in capsys.readouterr().err
    assert images[0].read_bytes() == before


def test_demo_output_that_is_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "afile"
    taken.write_text("kept")
    assert main(["demo", "--out", str(taken), "--models", "none"]) == 1
    assert "is a file; the demo writes a folder" in capsys.readouterr().err
    assert taken.read_text() == "kept"


def test_unavailable_device_is_reported(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    code = main(["evaluate", str(tiny_model_file(tmp_path / "m.safetensors")), str(tmp_path / "c.npz"),
                 "--device", "cuda"])
    assert code == 1
    assert "'cuda' was requested" in capsys.readouterr().err


def test_evaluate_prints_metrics_and_writes_the_confusion_matrix(tmp_path, capsys):
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors")
    code = main(["evaluate", str(model), str(data), "--split", "val", "--device", "cpu",
                 "--confusion", str(tmp_path / "cm.png"), "--json", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out and "per-class recall" in out
    for name in TINY_CLASSES:
        assert name in out
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 6 and np.array(metrics["confusion"]).sum() == 6
    assert "(the validation split only" in out and "--split all" in out


def test_evaluate_refuses_an_unwritable_output_before_scoring(tmp_path, capsys, monkeypatch):
    import napari_smear.cli as cli_module
    import napari_smear.training as training_module

    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr(cli_module.os, "access", lambda path, mode: Path(path) != read_only)  # root writes anywhere
    scored = []
    monkeypatch.setattr(training_module, "evaluate", lambda *a, **k: scored.append(1))
    assert main(["evaluate", str(model), str(data), "--json", str(read_only / "m.json")]) == 1
    assert f"--json {read_only / 'm.json'}: cannot write in {read_only}" in capsys.readouterr().err
    assert scored == []


def test_evaluate_prior_correction_option(tmp_path, capsys):
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    plain = tiny_model_file(tmp_path / "m.safetensors")
    code = main(["evaluate", str(plain), str(data), "--device", "cpu", "--quiet", "--prior-correction", "0.5"])
    assert code == 1
    assert "class-balanced batches" in capsys.readouterr().err
    balanced = tiny_model_file(tmp_path / "b.safetensors", training={"balance": "sampler"},
                               training_data={"train_class_counts": {c: 10 + i for i, c in enumerate(TINY_CLASSES)}})
    code = main(["evaluate", str(balanced), str(data), "--device", "cpu", "--quiet", "--prior-correction", "0.5"])
    assert code == 0 and "accuracy" in capsys.readouterr().out


def test_a_negative_prior_correction_is_refused_when_the_command_is_read(tmp_path, capsys):
    for value in ("-1", "nan"):
        with pytest.raises(SystemExit) as stopped:
            main(["evaluate", "wbc-pbc8", str(tmp_path / "missing.npz"), "--prior-correction", value])
        assert stopped.value.code == 2
        assert "expected a number >= 0" in capsys.readouterr().err


def test_evaluate_test_time_views_option(tmp_path, capsys):
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors")
    for views in ("1", "8"):
        assert main(["evaluate", str(model), str(data), "--device", "cpu", "--quiet", "--test-time-views", views,
                     "--json", str(tmp_path / f"m{views}.json")]) == 0
    one, eight = (json.loads((tmp_path / f"m{v}.json").read_text()) for v in ("1", "8"))
    assert one["n"] == eight["n"] == 6
    with pytest.raises(SystemExit):  # only 1, 2, 4 or 8
        build_parser().parse_args(["classify", "x.png", "--out", "p.csv", "--test-time-views", "3"])



def test_sure_at_option(tmp_path, capsys):
    """--sure-at reaches evaluate (turned views only for unsure crops) and is refused
    outside (0, 1] when the command is read."""
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors", test_time_views=8)
    for name, extra in (("every", []), ("sure", ["--sure-at", "1e-6"]), ("one", ["--test-time-views", "1"])):
        assert main(["evaluate", str(model), str(data), "--device", "cpu", "--quiet", *extra,
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    every, sure, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("every", "sure", "one"))
    assert sure["confusion"] == one["confusion"]  # every crop is sure of its first view
    assert build_parser().parse_args(["analyze", "x.png", "--out", "o", "--sure-at", "0.85"]).sure_at == 0.85
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args(["classify", "x.png", "--out", "p.csv", "--sure-at", bad])
        assert stopped.value.code == 2
        assert "expected a probability above 0 and at most 1" in capsys.readouterr().err


def test_train_command_writes_a_model(tmp_path, capsys):
    n_per_class = -(-100 // len(TINY_CLASSES))  # half are validation crops: enough to choose a prior correction
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(n_per_class=n_per_class), image_codec="raw")
    out = tmp_path / "model.safetensors"
    code = main(["train", str(data), "--model-kind", "shape_aware", "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--threads", "1", "--quiet",
                 "--config", json.dumps(TINY_CONFIG), "--cell-types", "platelet, wbc"])
    assert code == 0
    metadata = read_metadata(out)
    assert metadata["class_names"] == TINY_CLASSES
    assert metadata["cell_types"] == ["wbc", "platelet"]  # analyze gives it only these cells
    captured = capsys.readouterr()
    printed = captured.out
    assert "macro-F1" in printed and "classifies: wbc, platelet cells" in printed
    assert f"checkpoint: {tmp_path / 'model.ckpt'} (" in printed and "kept for --resume" in printed
    # one epoch of an untrained tiny model: cautioned about, as the Train dock does
    assert "napari-smear train: warning: its validation scores are close to guessing" in captured.err
    assert f"prior correction: strength {metadata['prior_correction']['strength']:g}, chosen on" in printed
    with pytest.raises(SystemExit):  # --config must be a JSON object: a usage error
        build_parser().parse_args(["train", str(data), "--out", str(out), "--config", "[1, 2]"])
    assert main(["train", str(data), "--out", str(tmp_path / "m2.safetensors"), "--cell-types", "wbc,neutrophil",
                 "--crop-diameters", "3"]) == 1
    err = capsys.readouterr().err
    assert "error: --cell-types must be some of" in err  # the option, not the library's parameter name
    assert f"warning: --crop-diameters applies to cropping a folder or CSV; the crops in {data}" in err

    # fine-tune the model just written, with weight averaging: its architecture and cell types carry over
    tuned = tmp_path / "tuned.safetensors"
    code = main(["train", str(data), "--init-from", str(out), "--out", str(tuned), "--epochs", "2",
                 "--average-weights-from", "1", "--mixstyle", "0.5", "--batch-size", "16", "--device", "cpu",
                 "--threads", "1", "--quiet"])
    assert code == 0
    training = read_metadata(tuned)["training"]
    assert training["lr"] == 5e-4 and training["average_weights_from"] == 1 and training["mixstyle"] == 0.5
    assert read_metadata(tuned)["cell_types"] == ["wbc", "platelet"]


def test_pack_crops_command(tmp_path, shared_data, capsys):
    table = pd.read_csv(shared_data / "pbc" / "split.csv")
    for label in ("lymphocyte", "platelet"):
        (tmp_path / "cells" / label).mkdir(parents=True)
        for path in table[table.label == label].path.head(2):
            shutil.copy(shared_data / "pbc" / path, tmp_path / "cells" / label)
    out = tmp_path / "crops.npz"
    assert main(["pack-crops", str(tmp_path / "cells"), "--out", str(out), "--output-size", "32", "--quiet"]) == 0
    crop_set = load_crop_set(out)
    assert len(crop_set) == 4 and crop_set.class_names == ["lymphocyte", "platelet"]
    assert crop_set.output_size == 32
    assert "images/s" in capsys.readouterr().out


def test_evaluate_warns_when_crops_and_model_differ_in_stain_normalisation(tmp_path):
    from napari_smear.training import evaluate

    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")  # packed without it
    model = tiny_model_file(tmp_path / "m.safetensors", stain_normalization="anchored-v1")
    with pytest.warns(UserWarning, match="stain normalisation 'none' but the model was trained with 'anchored-v1'"):
        evaluate(model, data, "val", device="cpu")


def test_a_users_file_where_an_output_goes_is_not_written_over(tmp_path, capsys):
    # pack-crops, classify and evaluate --json write over their own earlier outputs only
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors")
    theirs = {"archive.npz": None, "notes.csv": "a,b\n1,2\n", "keep.json": '{"x": 1}'}
    np.savez(tmp_path / "archive.npz", a=np.zeros(3))
    for name, text in theirs.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    before = {name: (tmp_path / name).read_bytes() for name in theirs}
    assert main(["pack-crops", str(tmp_path / "nowhere"), "--out", str(tmp_path / "archive.npz")]) == 1
    assert main(["classify", str(tmp_path / "x.png"), "--model", str(model), "--out", str(tmp_path / "notes.csv")]) == 1
    assert main(["evaluate", str(model), str(data), "--device", "cpu", "--quiet", "--json",
                 str(tmp_path / "keep.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("exists and is not") == 3 and "it is not written over" in err
    assert {name: (tmp_path / name).read_bytes() for name in theirs} == before
    ours = tmp_path / "metrics.json"  # evaluate's own file: written again
    for _ in range(2):
        assert main(["evaluate", str(model), str(data), "--device", "cpu", "--quiet", "--json", str(ours)]) == 0


def test_train_refuses_what_it_can_before_cropping(tmp_path, capsys):
    data = save_crop_set(tmp_path / "c.npz", tiny_crop_set(), image_codec="raw")
    base = tiny_model_file(tmp_path / "base.safetensors")
    before = base.read_bytes()
    assert main(["train", str(data), "--init-from", str(base), "--out", str(base), "--device", "cpu"]) == 1
    assert "is the model --init-from starts from" in capsys.readouterr().err and base.read_bytes() == before
    assert main(["train", str(data), "--out", str(tmp_path / "n.safetensors"), "--device", "foo"]) == 1
    assert "--device foo: unknown device 'foo'" in capsys.readouterr().err
    for option in (["--lr", "inf"], ["--weight-decay", "nan"], ["--seed", "-1"], ["--batch-size", "1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", str(data), "--out", str(tmp_path / "n.safetensors"), *option])


def test_a_crop_set_of_one_class_scores_a_model_but_does_not_train_one(tmp_path, capsys):
    one = tiny_crop_set()
    one = one.subset(np.flatnonzero(one.labels == 0))
    one.class_names = [one.class_names[0]]
    data = save_crop_set(tmp_path / "one.npz", one, image_codec="raw")
    model = tiny_model_file(tmp_path / "m.safetensors")
    assert main(["evaluate", str(model), str(data), "--split", "all", "--device", "cpu", "--quiet"]) == 0
    assert main(["train", str(data), "--out", str(tmp_path / "n.safetensors"), "--device", "cpu", "--quiet"]) == 1
    assert "training needs at least 2" in capsys.readouterr().err
