"""Packaging: the npe2 manifest validates, and the wheel ships it with its entry point."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "napari.yaml"
BIN = Path(sys.executable).parent


def test_package_manifest_is_a_link_to_the_top_level_manifest():
    packaged = REPO / "src" / "napari_smear" / "napari.yaml"
    assert packaged.is_symlink(), "src/napari_smear/napari.yaml must stay a symlink"
    assert packaged.resolve() == MANIFEST.resolve()


def test_npe2_validate():
    npe2 = shutil.which("npe2", path=str(BIN)) or shutil.which("npe2")
    command = [npe2] if npe2 else [sys.executable, "-m", "npe2"]
    result = subprocess.run(
        [*command, "validate", "napari-smear", "--imports"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_contributions():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-smear"
    assert manifest.display_name == "napari-smear"
    contributions = manifest.contributions
    widgets = {w.display_name: w.command for w in contributions.widgets}
    assert widgets["Segment cells"] == "napari-smear.segment_widget"
    menu = contributions.menus["napari/layers/segment"]
    assert [item.command for item in menu] == ["napari-smear.segment_widget"]
    assert widgets["Cell gallery"] == "napari-smear.gallery_widget"
    assert "napari-smear.gallery_widget" in [item.command for item in contributions.menus["napari/layers/classify"]]
    samples = {s.key: s.display_name for s in contributions.sample_data}
    assert samples == {"synthetic": "Synthetic smear (offline)", "bccd": "BCCD blood smear field"}
    one_layer, several = contributions.writers
    assert one_layer.layer_types == ["labels"] and ".tif" in one_layer.filename_extensions
    # cells + nuclei (+ image) saved together: a folder, so any name is accepted
    assert several.command == "napari-smear.write_layers_folder"
    assert several.layer_types == ["labels+", "image*"] and several.filename_extensions == []
    (reader,) = contributions.readers
    assert {"*.tif", "*.png", "*.jpg"} <= set(reader.filename_patterns)


@pytest.mark.slow
def test_wheel_ships_the_manifest(tmp_path):
    # Build from a copy, so no build/ or egg-info lands in the working tree and parallel
    # builds do not share a build directory.
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", source / "src", symlinks=True, ignore=ignore)
    for name in ["pyproject.toml", "napari.yaml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg"]:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("napari_smear-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "napari_smear/napari.yaml" in names
        assert archive.read("napari_smear/napari.yaml") == MANIFEST.read_bytes()
        (entry_points_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_name).decode())
    assert entry_points["napari.manifest"]["napari-smear"] == "napari_smear:napari.yaml"
