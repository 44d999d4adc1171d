"""A batch run's report: one HTML page an analyst opens in a browser (or prints to PDF).

It gathers what the run wrote: the models and settings, the warnings, each folder's
differential count (``summary_by_folder.csv``) with its cell gallery
(:func:`napari_smear.gallery.batch_galleries`), and a line per image with its counts,
its QC overlay and its warnings, then the images that failed. Static, self-contained
HTML with relative links: the output folder can be moved or zipped with it.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["REPORT_NAME", "write_run_report"]

#: The report's file name in the output folder.
REPORT_NAME = "report.html"
# The first line of our reports: a later run knows the file is ours and may replace it.
_SIGNATURE = "<!-- napari-smear run report -->"
_TYPES = ("wbc", "rbc", "platelet")
_TYPE_NAMES = {"wbc": "white cells", "rbc": "red cells", "platelet": "platelets"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; overflow-wrap: anywhere; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.4em 0; }
.failed { background: #fde2e1; border-left: 4px solid #c0392b; padding: 0.4em 0.8em; margin: 0.4em 0; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border: 1px solid #555; margin-right: 0.3em; }
img.gallery { max-width: 100%; border: 1px solid #ccc; }
.muted { color: #666; font-size: 0.9em; }
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _href(path: Path, out: Path) -> str:
    """``path`` relative to the report, as a URL in an attribute: percent-encoded (a
    file name's ``#``, ``?`` or ``%`` would otherwise end the path or be decoded), then
    HTML-escaped."""
    from urllib.parse import quote

    return html.escape(quote(path.relative_to(out).as_posix(), safe="/"), quote=True)


def _link(path: Path, out: Path, text: str) -> str:
    return f'<a href="{_href(path, out)}">{_esc(text)}</a>'


def _number(value: Any) -> int:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return int(number) if np.isfinite(number) else 0


def _differential_tables(row: pd.Series, models: dict, colours: dict) -> str:
    """Per model and cell type: class, count, % of the folder's whole cells of that type."""
    parts = []
    rank = {"wbc": 0, "platelet": 1, "rbc": 2}  # a differential's order: white cells first
    pairs = sorted(((name, model, cell_type) for name, model in models.items()
                    for cell_type in model.get("cell_types", [])), key=lambda item: rank.get(item[2], 3))
    noted: set[str] = set()
    for name, model, cell_type in pairs:
        total = _number(row.get(cell_type))
        counts = [(c, _number(row.get(f"{cell_type}_{c}"))) for c in model.get("classes", [])]
        counts = sorted(((c, n) for c, n in counts if n), key=lambda item: -item[1])
        if not total or not counts:
            continue
        lines = []
        for cls, n in counts:
            r, g, b = colours.get(cls, (128, 128, 128))
            swatch = f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>'
            lines.append(f'<tr><td class="name">{swatch}{_esc(cls)}</td><td>{n}</td>'
                         f"<td>{100 * n / total:.1f} %</td></tr>")
        unsure = row.get(f"{name}_unsure_pct")
        note = ""
        if unsure is not None and pd.notna(unsure) and name not in noted:  # once per model
            noted.add(name)
            note = (f'<p class="muted">{_esc(name)} gave no class at 85 % or more to {float(unsure):.1f} % of all '
                    "the cells it classified in this folder (cut ones too).</p>")
        if cell_type == "platelet" and any(cls != "platelet" for cls, _ in counts):
            note += ('<p class="muted">A white-cell class for a platelet-sized cell marks a doubtful one: a '
                     "fragment, a speck, or a small cell taken for a platelet (the gallery shows them).</p>")
        parts.append(
            f"<h3>{_esc(_TYPE_NAMES.get(cell_type, cell_type))} by {_esc(name)}: {total} whole cells</h3>"
            '<table><tr><th class="name">class</th><th>cells</th><th>%</th></tr>'
            + "".join(lines) + "</table>" + note
        )
    return "".join(parts)


def write_run_report(out_dir: str | os.PathLike, *, galleries: bool = True) -> Path:
    """Write ``OUT_DIR/report.html`` for a finished ``napari-smear analyze`` run.

    Parameters
    ----------
    out_dir : path
        The output folder of the run (its ``summary.csv``, ``summary_by_folder.csv``,
        ``errors.csv``, ``run.json`` and per-image overlays are read).
    galleries : bool
        Draw each folder's cell gallery first (:func:`napari_smear.gallery.batch_galleries`)
        and show it under the folder's differential; False shows the galleries already
        there, if any.

    Returns
    -------
    Path
        The report.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``summary.csv`` (not the output of a finished run).
    FileExistsError
        A ``report.html`` napari-smear did not write is there (it is not written over).
    """
    from .batch import OUTPUT_SUFFIXES, _folder_of, output_stem
    from .gallery import GALLERY_FOLDER, _gallery_file_names, batch_galleries, finished_run, run_palette
    from .io import atomic_write

    out = Path(out_dir)
    summary, run = finished_run(out)
    target = out / REPORT_NAME
    if target.exists():
        try:
            ours = target.read_text(encoding="utf-8", errors="replace").startswith(_SIGNATURE)
        except OSError:
            ours = False
        if not ours:
            raise FileExistsError(f"{target} was not written by napari-smear: not written over; move it away")
    by_folder_path = out / "summary_by_folder.csv"
    by_folder = pd.read_csv(by_folder_path, dtype={"folder": str}) if by_folder_path.is_file() else pd.DataFrame()
    errors_path = out / "errors.csv"
    errors = pd.read_csv(errors_path, dtype=str, keep_default_na=False) if errors_path.is_file() else pd.DataFrame()
    models = run.get("models") or {}
    colours = run_palette(run)
    if galleries and len(summary):
        batch_galleries(out)
    folders = summary["path"].map(_folder_of) if len(summary) else pd.Series(dtype=str)
    gallery_names = _gallery_file_names(list(dict.fromkeys(folders)))

    body = [f"<h1>napari-smear analysis of {len(summary)} image{'s' if len(summary) != 1 else ''}</h1>"]
    images = run.get("images") or {}
    settings = run.get("settings") or {}
    facts = [
        ("finished", run.get("finished")), ("napari-smear", (run.get("versions") or {}).get("napari_smear")),
        ("images", f"{images.get('analysed', 0)} analysed, {images.get('skipped', 0)} finished earlier, "
                   f"{images.get('failed', 0)} failed" if images else None),
        ("device", settings.get("device")), ("inputs", ", ".join(str(i) for i in run.get("inputs") or [])),
    ]
    body.append('<table>' + "".join(f'<tr><th class="name">{_esc(k)}</th><td class="name">{_esc(v)}</td></tr>'
                                    for k, v in facts if v) + "</table>")
    if models:
        body.append("<p>Models: " + "; ".join(
            f"<b>{_esc(name)}</b> ({_esc(', '.join(m.get('cell_types', [])))}: {len(m.get('classes', []))} classes)"
            for name, m in models.items()) + "</p>")
    else:
        body.append("<p>No classification model: segmentation only.</p>")
    for note in run.get("warnings") or []:
        body.append(f'<div class="warning">{_esc(note)}</div>')
    body.append('<p class="muted">Differentials count whole cells (the cells the image edge cuts are left out, '
                "as in summary_by_folder.csv; the table of images counts every cell). Classes are the models' "
                "answers, not a diagnosis, and do not include corrections made afterwards in napari: check the "
                "cells (the galleries show the least confident first) before relying on them.</p>")

    for _, row in by_folder.iterrows():
        folder = str(row.get("folder"))
        cells = ", ".join(f"{_number(row.get(t))} {_TYPE_NAMES[t]}" for t in _TYPES)
        body.append(f"<h2>{_esc(folder)}</h2><p>{_number(row.get('images'))} images; whole cells: {cells}</p>")
        body.append(_differential_tables(row, models, colours))
        picture = out / GALLERY_FOLDER / gallery_names.get(folder, "")
        if folder in gallery_names and picture.is_file():
            body.append(f'<p>{_link(picture, out, "Cell gallery")} (each class, the least confident first):</p>'
                        f'<img class="gallery" src="{_href(picture, out)}" '
                        f'alt="cell gallery of {_esc(folder)}">')

    body.append("<h2>Images</h2>")
    body.append('<p class="muted">Every cell of each image, those the image edge cuts included (they are '
                "counted again in their own column).</p>")
    header = ["image", "cells", *(_TYPE_NAMES[t] for t in _TYPES), "cut by the edge", "red-cell ruler (px)", "warnings"]
    lines = ['<table><tr>' + "".join(f'<th class="{"name" if h in ("image", "warnings") else ""}">{_esc(h)}</th>'
                                      for h in header) + "</tr>"]
    for _, row in summary.iterrows():
        overlay = Path(str(output_stem(out, Path(row["image"]))) + OUTPUT_SUFFIXES["overlay"])
        name = _link(overlay, out, row["image"]) if overlay.is_file() else _esc(row["image"])
        cut = sum(_number(row.get(f"{t}_cut_by_edge")) for t in _TYPES)
        ruler = pd.to_numeric(pd.Series([row.get("rbc_diameter_px")]), errors="coerce").iloc[0]
        values = [_number(row.get("cells")), *(_number(row.get(t)) for t in _TYPES), cut,
                  f"{ruler:.1f}" if np.isfinite(ruler) else "-"]
        lines.append(f'<tr><td class="name">{name}</td>' + "".join(f"<td>{v}</td>" for v in values)
                     + f'<td class="name">{_esc(row.get("warnings", ""))}</td></tr>')
    body.append("".join(lines) + "</table>")
    body.append('<p class="muted">Each name opens the image\'s QC overlay (every cell outlined in its class colour).'
                "</p>")
    if len(errors):
        body.append(f"<h2>Failed ({len(errors)})</h2>")
        for _, row in errors.iterrows():
            body.append(f'<div class="failed"><b>{_esc(row.get("file"))}</b>: {_esc(row.get("error"))}</div>')

    page = (f"{_SIGNATURE}\n<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>napari-smear analysis: {_esc(out.name)}</title><style>{_STYLE}</style></head>\n"
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
    with atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write(page)
    return target
