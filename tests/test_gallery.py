"""Cell galleries (no Qt): thumbnails centred on their cell and outlined, groups per
class in review order, and the picture a batch or the dock saves."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_smear.gallery import (
    ORDERS,
    THUMBNAIL_SPAN,
    UNCLASSIFIED,
    cell_thumbnails,
    gallery_groups,
    gallery_picture,
    thumbnail_window_px,
)


def _field():
    """A grey field with two square 'cells': 1 at the top left corner, 2 in the middle."""
    image = np.full((100, 120, 3), 200, np.uint8)
    labels = np.zeros((100, 120), np.uint32)
    labels[0:10, 0:10] = 1
    image[0:10, 0:10] = (150, 40, 40)
    labels[40:60, 50:70] = 2
    image[40:60, 50:70] = (90, 30, 150)
    return image, labels


def test_thumbnails_centre_scale_pad_and_outline_each_cell():
    image, labels = _field()
    thumbs = cell_thumbnails(image, labels, [2, 1], [(49.5, 59.5), (4.5, 4.5)], 40, size=40,
                             outline_rgb=[(0, 255, 0), (255, 0, 0)])
    assert thumbs.shape == (2, 40, 40, 3) and thumbs.dtype == np.uint8
    middle = thumbs[0]
    # the cell (20 px) fills the middle half of the 40 px window; its rim is outlined
    assert (middle[20, 20] == (90, 30, 150)).all()
    assert (middle[10, 20] == (0, 255, 0)).all() and (middle[20, 10] == (0, 255, 0)).all()
    assert (middle[2, 2] == 200).all()  # the field around it
    # a cell at the corner: the window past the border is glass-grey padding, not wrapped pixels
    corner = thumbs[1]
    assert (corner[:10, :10] == 245).all()
    assert (corner[20, 22] == (150, 40, 40)).all()
    # scaled down: a 40 px window in 20 px thumbnails keeps the cell centred
    small = cell_thumbnails(image, labels, [2], [(49.5, 59.5)], 40, size=20, outline_rgb=None)
    assert small.shape == (1, 20, 20, 3)
    np.testing.assert_allclose(small[0, 10, 10], (90, 30, 150), atol=2)
    # nothing asked: nothing cut
    assert cell_thumbnails(image, labels, [], np.empty((0, 2)), 40).shape == (0, 80, 80, 3)


def test_thumbnails_read_only_the_windows_of_an_image_on_disk(tmp_path):
    image, labels = _field()
    mapped = np.lib.format.open_memmap(tmp_path / "field.npy", mode="w+", dtype=np.uint8, shape=image.shape)
    mapped[:] = image
    np.testing.assert_array_equal(
        cell_thumbnails(mapped, labels, [2], [(49.5, 59.5)], 30, size=30),
        cell_thumbnails(image, labels, [2], [(49.5, 59.5)], 30, size=30),
    )


def test_thumbnails_of_16_bit_and_float_images_match_the_8_bit_ones():
    from napari_smear.io import as_rgb_uint8

    image, labels = _field()
    ids, centres = [1, 2], [(4.5, 4.5), (49.5, 59.5)]
    # converted as a whole, as the segmentation converts them (window by window, each
    # small window was stretched to its own range, or refused under 16 px)
    wide = image.astype(np.uint16) * 100
    np.testing.assert_array_equal(cell_thumbnails(wide, labels, ids, centres, 12, size=16),
                                  cell_thumbnails(as_rgb_uint8(wide), labels, ids, centres, 12, size=16))
    unit = cell_thumbnails(image.astype(np.float32) / 255, labels, ids, centres, 12, size=16)
    np.testing.assert_allclose(unit.astype(int), cell_thumbnails(image, labels, ids, centres, 12, size=16), atol=1)


def test_a_window_much_larger_than_the_thumbnail_is_read_sparsely():
    image = np.full((3000, 3000, 3), 200, np.uint8)
    labels = np.zeros((3000, 3000), np.uint32)
    labels[1000:2000, 1000:2000] = 7
    image[1000:2000, 1000:2000] = (120, 40, 160)
    thumb = cell_thumbnails(image, labels, [7], [(1499.5, 1499.5)], 2000, size=40)[0]
    assert (thumb[20, 20] == (120, 40, 160)).all() and (thumb[2, 2] == 200).all()
    assert (thumb[10, 20] == 255).all()  # the outline, about a quarter of the way in


def test_thumbnail_arguments_are_checked():
    image, labels = _field()
    with pytest.raises(ValueError, match="2 ids but 1 centroids"):
        cell_thumbnails(image, labels, [1, 2], [(1, 1)], 20)
    with pytest.raises(ValueError, match="differ in size"):
        cell_thumbnails(image, labels[:50], [1], [(1, 1)], 20)
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        cell_thumbnails(image, labels, [1], [(1, 1)], 20, size=4)
    with pytest.raises(ValueError, match="window_px must be > 0"):
        cell_thumbnails(image, labels, [1], [(1, 1)], 0)
    with pytest.raises(ValueError, match=r"cells \[2\] have none"):
        cell_thumbnails(image, labels, [1, 2], [(1, 1), (np.nan, 3)], 20)
    with pytest.raises(ValueError, match="outline_rgb is 0-255"):
        cell_thumbnails(image, labels, [1], [(1, 1)], 20, outline_rgb=(0.2, 0.5, 1.0))
    with pytest.raises(ValueError, match="red-cell diameter must be a number > 0"):
        thumbnail_window_px("wbc", float("nan"))
    assert thumbnail_window_px("rbc", 10) == pytest.approx(10 * THUMBNAIL_SPAN["rbc"])


def _table():
    return pd.DataFrame({
        "label": [1, 2, 3, 4, 5, 6, 7],
        "cell_type": ["rbc", "wbc", "wbc", "wbc", "platelet", "wbc", "rbc"],
        "class": ["normal", "neutrophil", "neutrophil", "lymphocyte", "platelet", None, ""],
        "confidence": [0.9, 0.95, 0.4, 0.7, 0.99, np.nan, np.nan],
        "centroid_y": [5.0, 50, 50, 50, 50, 50, 5],
        "centroid_x": [5.0, 60, 60, 60, 60, 60, 5],
    })


def test_groups_follow_a_differential_and_put_the_unsure_first():
    groups = gallery_groups(_table())
    assert [(t, c, rows["label"].tolist()) for t, c, rows in groups] == [
        ("wbc", "neutrophil", [3, 2]),  # the largest white-cell class first, least confident first
        ("wbc", "lymphocyte", [4]),
        ("wbc", UNCLASSIFIED, [6]),  # after the classes of its type
        ("platelet", "platelet", [5]),
        ("rbc", "normal", [1]),
        ("rbc", UNCLASSIFIED, [7]),
    ]
    most = gallery_groups(_table(), order="most confident first")
    assert most[0][2]["label"].tolist() == [2, 3]
    by_label = gallery_groups(_table(), order="label", cell_types=["wbc"])
    assert [rows["label"].tolist() for _, _, rows in by_label] == [[2, 3], [4], [6]]
    # a table without classes: one group per cell type
    assert [(t, c) for t, c, _ in gallery_groups(_table().drop(columns=["class", "confidence"]))] == [
        ("wbc", UNCLASSIFIED), ("platelet", UNCLASSIFIED), ("rbc", UNCLASSIFIED)]
    with pytest.raises(ValueError, match="order must be one of"):
        gallery_groups(_table(), order="random")
    with pytest.raises(ValueError, match="needs 'label' and 'cell_type'"):
        gallery_groups(pd.DataFrame({"label": [1]}))
    assert ORDERS[0] == "least confident first"


def test_gallery_picture_has_a_block_per_class():
    image, labels = _field()
    table = _table()
    picture = gallery_picture(image, labels, table, 10.0, cell_types=None, per_class=1, size=32, columns=4,
                              title="field 1")
    assert picture.dtype == np.uint8 and picture.shape[1] == 4 * 32
    # title + 6 blocks of one row each (per_class=1 shows one neutrophil of two)
    assert picture.shape[0] == (18 + 4) + 6 * (18 + 32 + 12 + 4)
    white_only = gallery_picture(image, labels, table, 10.0, size=32, columns=4)  # wbc and platelets
    assert white_only.shape[0] == 4 * (18 + 32 + 12 + 4)
    # the outline of a class has the class's colour (neutrophil's fixed blue)
    from napari_smear.colors import CLASS_RGB

    first = gallery_picture(image, labels, table, 10.0, cell_types=["wbc"], per_class=1, size=32, columns=1,
                            order="most confident first")  # cell 2, which the label image holds
    thumb = first[18 : 18 + 32, :32]
    assert (thumb == CLASS_RGB["neutrophil"]).all(-1).any()
    empty = gallery_picture(image, labels, table.iloc[:0], 10.0)
    assert empty.shape[0] == 18 + 4
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        gallery_picture(image, labels, table, 10.0, per_class=0)


def test_gallery_of_a_real_bccd_field(shared_data):
    """The whole path on a real field: analyse, then one picture with the white cell first."""
    from conftest import read_rgb

    from napari_smear import analyze

    rgb = read_rgb(shared_data / "bccd" / "images" / "BloodImage_00010.jpg")
    result = analyze(rgb, models=["wbc-pbc8"], device="cpu")
    picture = gallery_picture(rgb, result.segmentation.labels, result.table, result.segmentation.rbc_diameter_px,
                              cell_types=None, per_class=5)
    groups = gallery_groups(result.table)
    assert groups[0][0] == "wbc" and groups[0][1] != UNCLASSIFIED
    assert picture.shape[1] == 800 and picture.shape[0] > 18 * len(groups)


# ----------------------------------------------------------------------------- batch outputs


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """Three synthetic fields in two folders, analysed with a tiny white-cell model."""
    from conftest import tiny_model_file

    from napari_smear.batch import analyze_files
    from napari_smear.io import write_png_atomic
    from napari_smear.samples import synthetic_smear

    root = tmp_path_factory.mktemp("gallery")
    model = tiny_model_file(root / "wbc.safetensors", ["lymphocyte", "neutrophil", "platelet"],
                            cell_types=["wbc", "platelet"])
    inputs = root / "in"
    (inputs / "slide 2").mkdir(parents=True)
    for k, name in enumerate(["a.png", "b.png", "slide 2/c.png"]):
        write_png_atomic(inputs / name, synthetic_smear((200, 260), rbc_diameter_px=26.0, seed=k)[0])
    # a field without cells: no ruler (an empty rbc_diameter_px in summary.csv), nothing to draw
    write_png_atomic(inputs / "blank.png", np.full((200, 260, 3), (232, 228, 236), np.uint8))
    (inputs / "slide 2" / "broken.png").write_bytes(b"not a PNG")  # a failure for the report
    out = root / "out"
    analyze_files(inputs, out, models=[str(model)], device="cpu")
    return root, inputs, out


@pytest.mark.usefixtures("one_torch_thread")
def test_batch_galleries_draw_each_folder_of_a_run(analysed):
    from napari_smear.batch import _written_by_us, expand_inputs
    from napari_smear.gallery import batch_galleries
    from napari_smear.io import read_image

    root, inputs, out = analysed
    seen = []
    paths = batch_galleries(out, cell_types=None, progress=lambda done, total: seen.append((done, total)))
    assert [p.name for p in paths] == ["in_gallery.png", "slide_2_gallery.png"]
    assert all(p.parent == out / "galleries" for p in paths)
    assert seen and seen[-1][1] == 4  # 4 images, the blank one among them
    picture, _ = read_image(paths[0])
    assert picture.shape[1] == 800 and picture.shape[0] > 3 * (18 + 80)
    # known as ours: a run whose output folder is its input folder does not analyse them
    assert _written_by_us(paths[0])
    assert not [f for f, _ in expand_inputs([out]) if f.name.endswith("_gallery.png")]
    # edge cells left out by default: a folder of whole cells only is a smaller picture
    whole = read_image(batch_galleries(out, cell_types=["rbc"], per_class=500)[0])[0]
    every = read_image(batch_galleries(out, cell_types=["rbc"], per_class=500, include_edge_cells=True)[0])[0]
    assert every.shape[0] > whole.shape[0]  # the synthetic fields have red cells cut by their edges
    with pytest.raises(FileNotFoundError, match="no summary.csv"):
        batch_galleries(root)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_damaged_output_leaves_its_image_out_of_the_gallery_not_the_folder(analysed, tmp_path):
    import shutil

    from napari_smear.gallery import batch_galleries

    _, _, analysed_out = analysed
    out = tmp_path / "out"
    shutil.copytree(analysed_out, out)
    (out / "a_cells.csv").write_text("")  # emptied
    labels = out / "b_labels.tif"
    labels.write_bytes(labels.read_bytes()[:300])  # truncated
    with pytest.warns(UserWarning) as shown:
        paths = batch_galleries(out, cell_types=None)
    said = [str(w.message) for w in shown]
    assert any("the cells of a.png are left out" in m and "a_cells.csv cannot be read (the file is empty)" in m
               for m in said)
    assert any("the cells of b.png are left out" in m for m in said)
    assert [p.name for p in paths] == ["in_gallery.png", "slide_2_gallery.png"]  # both folders drawn
    shutil.copy(analysed_out / "b_labels.tif", labels)
    (out / "a_cells.csv").write_text("label,cell_type,centroid_y,centroid_x\nabc,wbc,1,2\n")
    with pytest.warns(UserWarning, match="label column holds values that are not label ids"):
        batch_galleries(out, cell_types=None)
    (out / "summary.csv").write_text("")
    with pytest.raises(ValueError, match="summary.csv is empty"):
        batch_galleries(out)


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_gallery_and_analyze_gallery(analysed, tmp_path, capsys):
    import shutil

    from napari_smear.cli import main

    root, inputs, out = analysed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "galleries", ignore_errors=True)
    assert main(["gallery", str(copy), "--per-class", "3", "--order", "most", "--cell-types", "all"]) == 0
    printed = capsys.readouterr().out
    assert f"gallery: {copy / 'galleries' / 'in_gallery.png'}" in printed
    assert main(["gallery", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["gallery", str(copy), "--cell-types", "all", "rbc"]) == 1
    assert "--cell-types takes wbc, rbc, platelet, or all alone" in capsys.readouterr().err
    # an input image moved away since the run: its cells are left out, said so, the rest drawn
    (inputs / "a.png").rename(tmp_path / "a.png")
    try:
        with pytest.warns(UserWarning, match="the cells of a.png are left out: its input image is not at"):
            assert main(["gallery", str(copy)]) == 0
        assert capsys.readouterr().out.count("gallery: ") == 2
    finally:
        (tmp_path / "a.png").rename(inputs / "a.png")
    # a file of the user's own where a picture goes: nothing is written over
    (copy / "galleries" / "slide_2_gallery.png").write_bytes(b"mine")
    before = (copy / "galleries" / "in_gallery.png").stat().st_mtime_ns
    assert main(["gallery", str(copy)]) == 1
    assert "not written over (napari-smear did not write them)" in capsys.readouterr().err
    assert (copy / "galleries" / "slide_2_gallery.png").read_bytes() == b"mine"
    assert (copy / "galleries" / "in_gallery.png").stat().st_mtime_ns == before
    # analyze --gallery draws them after the run
    again = tmp_path / "again"
    # (exit status 1: the fixture's broken.png failed; the others are drawn all the same)
    assert main(["analyze", str(inputs), str(again), "--models", "none", "--gallery", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "gallery: " in printed and (again / "galleries" / "slide_2_gallery.png").is_file()


def test_exported_cells_make_a_training_folder(synthetic_field, tmp_path):
    """Cells written as single-cell images into class folders are read back by the
    training data loader, the central cell found again."""
    from napari_smear import segment_smear
    from napari_smear.datasets import build_crop_set
    from napari_smear.gallery import export_cell_images
    from napari_smear.io import read_image

    rgb, _ = synthetic_field
    seg = segment_smear(rgb)
    table = seg.table
    inside = table[(table.cell_type == "rbc") & ~table.touches_edge].head(6)
    ids = inside["label"].tolist()
    classes = ["normal"] * 3 + ["odd"] * 3
    written = export_cell_images(rgb, table, ids, classes, tmp_path / "cells", seg.rbc_diameter_px, stem="field 1")
    assert [p.relative_to(tmp_path / "cells").as_posix() for p in written] == [
        f"{c}/field_1_cell{i}.png" for i, c in zip(ids, classes)]
    side = int(round(5.0 * seg.rbc_diameter_px))
    assert read_image(written[0])[0].shape == (side, side, 3)
    # exported again under another class: it moves (each cell once in the folder)
    export_cell_images(rgb, table, ids[0], "odd", tmp_path / "cells", seg.rbc_diameter_px, stem="field 1")
    assert not (tmp_path / "cells" / "normal" / f"field_1_cell{ids[0]}.png").exists()
    assert (tmp_path / "cells" / "odd" / f"field_1_cell{ids[0]}.png").is_file()
    crops = build_crop_set(tmp_path / "cells", output_size=32, workers=1, progress=False)
    assert len(crops) == 6 and not crops.failures
    assert sorted(crops.class_names) == ["normal", "odd"]
    with pytest.raises(ValueError, match="cannot be a class folder's name"):
        export_cell_images(rgb, table, ids[:1], "a/b", tmp_path / "x", seg.rbc_diameter_px)
    with pytest.raises(ValueError, match="cannot be a class folder's name"):
        export_cell_images(rgb, table, ids[:1], "unclassified", tmp_path / "x", seg.rbc_diameter_px)
    with pytest.raises(ValueError, match="no cells with label ids \\[9999\\]"):
        export_cell_images(rgb, table, [9999], "normal", tmp_path / "x", seg.rbc_diameter_px)
    with pytest.raises(ValueError, match="2 cells but 1 classes"):
        export_cell_images(rgb, table, ids[:2], ["normal"], tmp_path / "x", seg.rbc_diameter_px)


@pytest.mark.usefixtures("one_torch_thread")
def test_batch_gallery_headings_give_the_folder_differential(analysed, monkeypatch):
    """Each block's heading: its whole cells and their share of the cells of that type,
    the figures of summary_by_folder.csv."""
    import re

    from napari_smear import gallery

    root, inputs, out = analysed
    headings = []
    original = gallery.compose_gallery

    def capture(blocks, **kwargs):
        headings.append((kwargs.get("title"), [block.heading for block in blocks]))
        return original(blocks, **kwargs)

    monkeypatch.setattr(gallery, "compose_gallery", capture)
    gallery.batch_galleries(out, cell_types=None)
    by_folder = pd.read_csv(out / "summary_by_folder.csv").set_index("folder")
    checked = 0
    for title, lines in headings:
        folder = title.split(":")[0]
        row = by_folder.loc[folder]
        for line in lines:
            name, cell_type, count = re.match(r"(\S+) \((\w+)\): (\d+) cell", line).groups()
            if name == "unclassified":
                continue
            assert int(count) == row[f"{cell_type}_{name}"], line
            share = re.search(r"\(([\d.]+) % of (\d+)\)", line)
            if share:
                assert int(share.group(2)) == row[cell_type]
                assert float(share.group(1)) == pytest.approx(row[f"{cell_type}_{name}_pct"], abs=0.05)
            checked += 1
    assert checked >= 3


@pytest.mark.usefixtures("one_torch_thread")
def test_run_report_gathers_differentials_galleries_images_and_failures(analysed, tmp_path, capsys):
    import shutil

    from napari_smear.cli import main
    from napari_smear.report import write_run_report

    root, inputs, out = analysed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "galleries", ignore_errors=True)
    page = write_run_report(copy)
    assert page == copy / "report.html"
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!-- napari-smear run report -->") and "<!DOCTYPE html>" in text
    # each folder: its differential (whole cells) and its gallery, drawn for the report
    by_folder = pd.read_csv(copy / "summary_by_folder.csv")
    for folder in by_folder["folder"]:
        assert f"<h2>{folder}</h2>" in text
    assert 'src="galleries/in_gallery.png"' in text and (copy / "galleries" / "slide_2_gallery.png").is_file()
    assert "white cells by wbc: " in text
    # a line per image, its name linking its QC overlay; the failed image with its reason
    assert 'href="a_overlay.png"' in text and 'href="slide%202/c_overlay.png"' in text
    # a file name's #, ? and % are part of the path, not a fragment, a query or an escape
    from napari_smear.report import _href

    assert _href(copy / "run #1" / "50% ? <b>.png", copy) == "run%20%231/50%25%20%3F%20%3Cb%3E.png"
    assert "Failed (1)" in text and "broken.png" in text
    # written again over its own report; never over a file of the user's own
    write_run_report(copy, galleries=False)
    (copy / "report.html").write_text("<html>my notes</html>")
    with pytest.raises(FileExistsError, match="was not written by napari-smear"):
        write_run_report(copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy), "--no-galleries"]) == 0
    assert f"report: {copy / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(root)]) == 1
    assert "no summary.csv" in capsys.readouterr().err


@pytest.mark.usefixtures("one_torch_thread")
def test_a_whole_slide_gallery_reads_only_the_windows_of_its_cells(tmp_path, monkeypatch):
    """A tiled TIFF (a scanner's slide) is read window by window for its gallery: the same
    picture as a full read."""
    import tifffile

    from napari_smear import gallery
    from napari_smear.batch import analyze_files
    from napari_smear.io import read_image
    from napari_smear.samples import synthetic_smear

    inputs = tmp_path / "slide"
    inputs.mkdir()
    field = synthetic_smear((256, 320), rbc_diameter_px=26.0, seed=3)[0]
    tifffile.imwrite(inputs / "region.tif", field, tile=(64, 64), compression="zlib", photometric="rgb")
    out = tmp_path / "out"
    analyze_files(inputs, out, models=[], device="cpu")
    whole = read_image(gallery.batch_galleries(out, cell_types=None, include_edge_cells=True)[0])[0]
    from napari_smear import io

    read = []
    full_read = io.TiledTiff.__getitem__

    def counted(self, key):
        read.append(key)
        return full_read(self, key)

    monkeypatch.setattr(io.TiledTiff, "__getitem__", counted)
    monkeypatch.setattr(gallery, "_WINDOWED_MIN_PIXELS", 0)  # this small field as if it were a slide
    windowed = read_image(gallery.batch_galleries(out, cell_types=None, include_edge_cells=True)[0])[0]
    np.testing.assert_array_equal(windowed, whole)
    assert len(read) > 10  # a window per cell, not the whole image


def test_pictures_are_labelled_in_a_font_that_has_more_than_ascii():
    # Pillow's own font drew "Überprüfung", "ß.jpg" and the "…" of a shortened caption as boxes
    from napari_smear.gallery import label_font

    font = label_font()
    assert getattr(font, "path", "").endswith("DejaVuSans.ttf")
    assert font.getmask("Ü").getbbox() != font.getmask("U").getbbox()  # its own glyph, with the dots
