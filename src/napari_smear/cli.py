"""The ``napari-smear`` command line.

Each subcommand is one ``_add_<name>`` function that declares its arguments and one
``_run_<name>`` function that does the work; :func:`main` dispatches. Heavy modules
(torch, the models) are imported inside the ``_run_`` functions so that ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = ["build_parser", "main"]


class CommandError(Exception):
    """A user-facing failure of a subcommand (printed without a traceback)."""


def _check_output_file(path: str, suffixes: tuple[str, ...], option: str, inputs=(),
                       ours: Callable[[Path], bool] | None = None, what: str = "") -> Path:
    """The file an option names for writing, checked before any work: it has one of
    ``suffixes`` (so a shell glob that put an image where the output belongs, as in
    ``--out *.jpg``, is refused rather than overwritten), is not a folder, is not one of
    the ``inputs``, and can be written where it is. With ``ours``, an existing file is
    written over only when ``ours(file)`` says napari-smear wrote it (``what`` it is):
    never a user's own CSV, JSON or archive that happens to have the name."""
    out = Path(path)
    if out.is_dir():
        raise CommandError(f"{option} {path} is a folder; give the file to write")
    if out.suffix.lower() not in suffixes:
        kept = " (an existing file of another kind is never written over)" if out.exists() else ""
        raise CommandError(f"{option} {path}: the file to write must end in {' or '.join(suffixes)}{kept}")
    if ours is not None and out.is_file() and not ours(out):
        raise CommandError(f"{option} {path} exists and is not {what}: it is not written over; "
                           "move it away or give another file name")
    resolved = out.resolve()
    for given in inputs:
        if Path(given).resolve() == resolved:
            raise CommandError(f"{option} {path} is also one of the inputs: give another file to write")
    from .io import check_writable_location

    check_writable_location(out, option)  # before the work, not after it (an evaluation ran first)
    return out


def _is_predictions_csv(path: Path) -> bool:
    """Whether ``path`` is a table ``classify`` wrote (its header starts path,prediction)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith("path,prediction,")
    except (OSError, UnicodeDecodeError):
        return False


def _is_metrics_json(path: Path) -> bool:
    """Whether ``path`` is the metrics ``evaluate --json`` wrote."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(metrics, dict) and {"accuracy", "confusion", "class_names"} <= set(metrics)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _crop_side(text: str) -> int:
    value = _positive_int(text)
    if value % 16 or value < 16:
        raise argparse.ArgumentTypeError(f"expected a multiple of 16 (the models need it), got {text}")
    return value


def _jpeg_quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality from 1 to 100, got {text}")
    return value


def _number(text: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str):
    """``convert(text)`` when ``accept`` takes it, else the parser's error saying what was expected."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number >= 0")


def _training_batch_size(text: str) -> int:
    value = _positive_int(text)
    if value < 2:  # BatchNorm needs two crops in a batch
        raise argparse.ArgumentTypeError(f"expected 2 or more (BatchNorm needs two crops a step), got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"widths": [16, 32, 64, 128]}}\', got {text}')
    return value


def _add_crop_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cropping (folder or CSV data)")
    # None when not given: a crop set (.npz) keeps its own, and giving them then is warned about
    group.add_argument("--crop-diameters", type=float, default=None,
                       help="crop window side in red-cell diameters (default 4)")
    group.add_argument("--output-size", type=_crop_side, default=None,
                        help="crop side in pixels, a multiple of 16 (default 96)")
    group.add_argument("--workers", type=_positive_int, default=1, help="processes for cropping (default 1)")
    # the methods of napari_smear.normalize (not imported here: it pulls in the segmentation)
    group.add_argument("--stain-normalization", choices=("none", "anchored-v1"), default="none",
                       help="recolour every image into the reference stain before cropping; models trained on "
                            "the crops record it and apply it to what they classify (default none)")


def _stain_normalization(args) -> str | None:
    """The --stain-normalization choice as the library takes it (None for none)."""
    return None if args.stain_normalization == "none" else args.stain_normalization


def _add_inference_options(parser: argparse.ArgumentParser, *, workers_help: str) -> None:
    """--device, --batch-size, --no-amp, --workers and --quiet of the commands that classify cell images."""
    parser.add_argument("--device", default="auto",
                        help="classifier device: auto (a GPU when present), cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--batch-size", type=_positive_int, default=256,
                        help="crops per classifier batch (default 256)")
    parser.add_argument("--no-amp", action="store_true", help="run in float32")
    parser.add_argument("--workers", type=_positive_int, default=1, help=workers_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_prior_correction_option(parser)
    _add_test_time_views_option(parser)


def _add_test_time_views_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--test-time-views", type=int, choices=(1, 2, 4, 8), default=None, metavar="N",
        help="classify each crop N ways (turned and mirrored: 1, 2, 4 or 8) and average the answers; "
             "default: the model file's own (the built-in models: 8); 1 is the fastest on a CPU",
    )
    parser.add_argument(
        "--sure-at", type=_sure_at, default=None, metavar="P",
        help="turn and mirror only the crops whose first view gives no class with probability P or more "
             "(0.85 measured well); the others are answered from that view. The classifiers then take about a "
             "fifth of the time on crops like a model's own (the segmentation's time stays); default: every crop "
             "in all of its views",
    )


def _sure_at(text: str) -> float:
    """A --sure-at probability in (0, 1] (as ``classify_crops`` checks it), refused when
    the command is read."""
    from .predict import check_sure_at  # no torch at import

    try:
        return check_sure_at(float(text))
    except ValueError:  # not a number, NaN, or outside (0, 1]
        raise argparse.ArgumentTypeError(f"expected a probability above 0 and at most 1, got {text}") from None


def _strength(text: str) -> float:
    """A prior-correction strength: a finite number >= 0, refused when the command is
    read (a negative one was refused only after the images were cropped)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: balanced, 1: in full), got {text}")
    return value


def _add_prior_correction_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prior-correction", type=_strength, default=None, metavar="STRENGTH",
        help="how far a class-balanced model's answers are moved back to its training class frequencies "
             "(0: the balanced answer, 1: in full; default: the strength stored in the model file)",
    )


def _add_models_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--models of the commands that analyse fields (read with :func:`_model_list`)."""
    parser.add_argument("--models", nargs="+", action="extend", default=None, metavar="MODEL", help=help_text)


def _model_list(values):
    """--models values: None (the default models), [] ('none') or the names/paths given."""
    if values is None:
        return None
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise ValueError("--models was given no model: name built-in models or .safetensors files, "
                         "or 'none' for segmentation only")
    if "none" in [n.lower() for n in names]:
        if len(names) > 1:
            raise ValueError(f"--models 'none' (segmentation only) cannot be combined with models: {', '.join(names)}")
        return []
    return names


# ----------------------------------------------------------------------------- segment / demo


def _add_segment(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment smear images (files or folders)",
        description="Segment every image of INPUTS (folders are searched recursively; sub-folders are mirrored "
                    "in --out): white cells with their nuclei, red cells and platelets. Per image: "
                    "<stem>_labels.tif (cell ids), <stem>_nuclei.tif (each nucleus carries its cell's id) and "
                    "<stem>_cells.csv (one row per cell: type, centroid, box, area). Images that cannot be read "
                    "or segmented are listed in errors.csv with the reason, the others are done, and the exit "
                    "status is then 1. No classification: see analyze. See docs/getting-started.md.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pixel-size-um", type=_positive_float, default=None,
                        help="pixel size in micrometres; default: from the file, else automatic scale")
    _add_working_diameter_option(parser)
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument(
        "--on-disk", dest="on_disk", action="store_const", const=True, default=None,
        help="segment TIFFs through memory-mapped files in a scratch folder inside --out (11 bytes a pixel "
             "of disk), for slides larger than memory; default: only TIFFs that would fill more than half "
             "the memory available",
    )
    disk.add_argument("--in-memory", dest="on_disk", action="store_const", const=False,
                      help="never segment through files, whatever the image's size")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_segment)


def _working_diameter(text: str) -> float:
    from .segment import MIN_WORKING_DIAMETER_PX

    value = _positive_float(text)
    if value < MIN_WORKING_DIAMETER_PX:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_WORKING_DIAMETER_PX:g} (px per red cell), got {text}")
    return value


def _add_working_diameter_option(parser) -> None:
    parser.add_argument(
        "--working-diameter", type=_working_diameter, default=None, metavar="PX",
        help="segment at a resolution where a red cell is PX pixels across (default 24, at least 12); 16 "
             "segments large scans about 1.5 times as fast at a small cost in accuracy (docs/benchmarks.md)",
    )


class _ImagesBar:
    """One progress bar (stderr) over the images of a run; none when ``quiet``."""

    #: Whether a bar is on the terminal now (a warning then starts on a new line).
    showing = False

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def show(self, done: float, total: int, text: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            # images an earlier run finished start the bar (initial), so that its rate
            # counts only this run's work (it showed a million images a second on resume)
            self.bar = tqdm(total=total, initial=done, unit="img", desc=self.desc, file=sys.stderr, smoothing=0.05)
            _ImagesBar.showing = True
        self.bar.n = done
        self.bar.set_postfix_str(text[-60:], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            _ImagesBar.showing = False


def _cmd_segment(args) -> int:
    from .batch import segment_files

    bar = _ImagesBar("segmenting", args.quiet)
    current = {"name": "", "done": 0, "total": 0}

    def show(i, n, path):
        current.update(name=Path(path).name, done=i, total=n)
        bar.show(i, n, current["name"])

    def within(fraction, message):  # a large image's tiles move the bar too
        bar.show(current["done"] + min(max(fraction, 0.0), 0.999), current["total"], f"{current['name']}: {message}")

    try:
        summary = segment_files(args.inputs, args.out, pixel_size_um=args.pixel_size_um, progress=show,
                                working_diameter_px=args.working_diameter, on_disk=args.on_disk,
                                image_progress=None if args.quiet else within)
    finally:
        bar.close()
    ok = summary[summary.error == ""]
    cols = [c for c in ("wbc", "rbc", "platelet") if c in ok]
    for _, row in ok.iterrows():
        counts = ", ".join(f"{c} {int(row[c])}" for c in cols)
        through = ", segmented through files on disk" if row.get("on_disk") is True else ""
        print(f"{Path(row.path).name}: {counts} (red-cell diameter {row.rbc_diameter_px:.1f} px{through})")
    bad = summary[summary.error != ""]
    for _, row in bad.iterrows():
        print(f"FAILED {row.path}: {row.error}", file=sys.stderr)
    print(f"{len(ok)} image(s) segmented, {len(bad)} failed; outputs in {args.out}")
    return 1 if len(bad) else 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job (batch analysis) on the bundled sample fields",
        description="Write the bundled synthetic fields (and, when ../shared/data is present, three real BCCD "
                    "fields) and analyse them like `napari-smear analyze`: segmentation, classification with "
                    "the installed built-in models, attention maps, per-cell tables, QC overlays, summary.",
    )
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    _add_models_option(parser, "models instead of the installed built-in ones ('none': segmentation only)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out} is a file; the demo writes a folder of outputs: give a folder")
    report = run_demo(Path(args.out), models=_model_list(args.models), device=args.device)
    return 0 if report.analysed + report.skipped else 1


# ----------------------------------------------------------------------------- analyze


def _add_analyze(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="analyse folders of smear images: segmentation, classification, attention, QC",
        usage="napari-smear analyze [options] IN [IN ...] OUT_DIR\n       napari-smear analyze [options] IN [IN ...] --out OUT_DIR",
        description="Analyse every image of IN (folders are searched recursively; sub-folders are mirrored in "
                    "OUT_DIR). Per image: <stem>_labels.tif, _nuclei.tif, _attention.tif, _cells.csv, "
                    "_overlay.png and the completion marker _done.json; per run: summary.csv, "
                    "summary_whole_cells.csv, summary_by_folder.csv (the differential count of each folder), "
                    "errors.csv, run.json. Re-running skips finished images and "
                    "redoes unfinished ones. See docs/batch.md.",
    )
    # OUT_DIR as the last positional (the original form) or as --out, like every other command
    parser.add_argument("paths", nargs="+", metavar="IN",
                        help="image folders or files, then OUT_DIR unless --out gives it")
    parser.add_argument("--out", default=None, metavar="OUT_DIR", help="output folder (or give it last, after IN)")
    _add_models_option(parser, "built-in names or .safetensors files, space or comma separated; 'none' for "
                               "segmentation only (default: the installed built-in models)")
    parser.add_argument("--device", default="auto",
                        help="classifier device: auto (a GPU when present), cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--pattern", default="*",
                        help="file-name glob inside folders, upper or lower case alike, e.g. '*.jpg' (default *)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=0,
                       help="worker processes of a local Dask cluster for decoding, segmentation and writing "
                            "(default 0: everything in this process)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of an existing Dask scheduler (tcp://host:8786); its workers must see IN "
                            "and OUT_DIR at the same paths")
    parser.add_argument("--overwrite", action="store_true", help="redo images an earlier run finished")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="crops per classifier batch (default 32 on CPU and MPS, 1024 on a CUDA GPU)")
    parser.add_argument("--pixel-size-um", type=_positive_float, default=None,
                        help="pixel size of every image in micrometres (default: from the file, else measured)")
    _add_working_diameter_option(parser)
    parser.add_argument("--no-amp", action="store_true", help="classify in float32")
    parser.add_argument("--no-morphology", action="store_true",
                        help="leave the morphology columns out of the cell tables (faster)")
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument(
        "--on-disk", dest="on_disk", action="store_const", const=True, default=None,
        help="analyse TIFFs region by region through memory-mapped files in a scratch folder inside OUT_DIR "
             "(the image, its label images and the attention maps: 11 bytes a pixel of disk plus 4 per model), "
             "for slides larger than memory; default: only TIFFs whose analysis in memory would take more than "
             "half the memory available",
    )
    disk.add_argument("--in-memory", dest="on_disk", action="store_const", const=False,
                      help="never analyse through files, whatever the image's size")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--gallery", action="store_true",
                        help="also draw a picture of each folder's white cells and platelets, a block per class, the "
                             "least confident first, into OUT_DIR/galleries/ (as `napari-smear gallery OUT_DIR`)")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT_DIR/report.html: each folder's differential and cell gallery, a line "
                             "per image, the failures (as `napari-smear report OUT_DIR`)")
    _add_prior_correction_option(parser)
    _add_test_time_views_option(parser)
    parser.set_defaults(func=_cmd_analyze)


def _note_images_in_output_folder(out_dir: str, inputs) -> None:
    """Say so when the last path, taken for the output folder, is a folder of images that
    is not an input as well: most likely the user meant it as an input (its images are
    not analysed, and the results go in among them)."""
    from .batch import is_output_name
    from .io import is_supported_path

    folder = Path(out_dir)
    if not folder.is_dir() or folder.resolve() in {Path(p).resolve() for p in inputs}:
        return
    try:
        images = [p for p in folder.iterdir()
                  if p.is_file() and is_supported_path(p) and not is_output_name(p.name) and not p.name.startswith(".")]
    except OSError:
        return
    if images:
        print(f"napari-smear analyze: note: the last path, {out_dir}, is taken for the output folder, and its "
              f"{len(images)} image file(s) are not analysed; to analyse them too, give the output folder with "
              "--out OUT_DIR", file=sys.stderr)


def _cmd_analyze(args) -> int:
    from .batch import analyze_files

    if args.workers < 0:
        raise CommandError(f"--workers must be 0 or more, got {args.workers}")
    if args.out is not None:
        args.inputs, args.out_dir = list(args.paths), args.out
    elif len(args.paths) >= 2:
        args.inputs, args.out_dir = list(args.paths[:-1]), args.paths[-1]
        from .io import is_supported_path

        # the last path is the output folder: an image there means it was left out
        if Path(args.out_dir).is_file() or is_supported_path(args.out_dir):
            what = "is a file" if Path(args.out_dir).is_file() else "names an image file"
            raise CommandError(
                f"the last path, {args.out_dir}, is taken for the output folder but {what}: "
                "give the output folder last or with --out OUT_DIR"
            )
        _note_images_in_output_folder(args.out_dir, args.inputs)
    else:
        raise CommandError(
            f"no output folder: give it after the inputs (napari-smear analyze {args.paths[0]} OUT_DIR) "
            "or with --out OUT_DIR"
        )
    bar = _ImagesBar("analyzing", args.quiet)

    try:
        report = analyze_files(
            args.inputs, args.out_dir, models=_model_list(args.models), device=args.device, pattern=args.pattern,
            workers=args.workers, scheduler=args.scheduler, overwrite=args.overwrite, batch_size=args.batch_size,
            amp=not args.no_amp, pixel_size_um=args.pixel_size_um, morphology=not args.no_morphology, progress=bar.show,
            prior_correction=args.prior_correction, working_diameter_px=args.working_diameter,
            on_disk=args.on_disk, test_time_views=args.test_time_views, sure_at=args.sure_at,
        )
    except RuntimeError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        bar.close()
    for name in report.missing_models:
        print(f"napari-smear analyze: built-in model {name!r} is not installed: the cells it classifies were "
              "segmented but not classified", file=sys.stderr)
    for path, error in zip(report.errors.file, report.errors.error):
        print(f"FAILED {path}: {error.splitlines()[0] if error else ''}", file=sys.stderr)
    _print_batch_report(report)
    try:
        if args.report:  # also when every image failed: the report lists the failures
            from .report import write_run_report

            print(f"report: {write_run_report(report.out_dir)} (open it in a browser)")
        elif args.gallery and report.analysed + report.skipped:
            from .gallery import batch_galleries

            for path in batch_galleries(report.out_dir):
                print(f"gallery: {path}")
        elif args.gallery:
            print("gallery: no image was analysed, so there are no cells to draw", file=sys.stderr)
    except (OSError, ValueError, MemoryError) as exc:  # the analysis stands; say so, and fail the command
        print(f"napari-smear analyze: error: the analysis is written, but the {'report' if args.report else 'gallery'}"
              f" is not: {exc}", file=sys.stderr)
        return 1
    return 1 if report.failed else 0  # scripts learn that errors.csv lists something


def _print_batch_report(report) -> None:
    """A few lines a person reads after a batch run (the files hold everything)."""
    timings = report.run.get("timings", {})
    rate = timings.get("images_per_s")
    print(
        f"{report.analysed} image(s) analysed, {report.skipped} finished earlier (skipped), {report.failed} failed, "
        f"of {report.total}; {timings.get('wall_s', 0):.1f} s" + (f" ({rate:.2f} images/s)" if rate else "")
    )
    models = report.run.get("models", {})
    if models:
        print("models: " + "; ".join(f"{name} ({', '.join(m['cell_types'])})" for name, m in models.items()))
    else:
        print("models: none (segmentation only)")
    summary = report.summary
    if len(summary):
        counts = ", ".join(f"{t} {int(summary[t].sum())}" for t in ("wbc", "rbc", "platelet"))
        retyped = int(summary["platelet_from_wbc"].fillna(0).sum()) if "platelet_from_wbc" in summary else 0
        if retyped:
            counts += f", {retyped} of them segmented as white cells and re-typed by the white-cell model"
        print(f"cells: {int(summary['cells'].sum())} ({counts})")
        cut = ", ".join(f"{t} {int(summary[f'{t}_cut_by_edge'].sum())}" for t in ("wbc", "rbc", "platelet"))
        print(f"cut by the image edge: {cut} (left out of the differential below)")
        _print_differentials(report.summary_by_folder, models)
    print(f"outputs in {report.out_dir} (summary.csv, summary_whole_cells.csv, summary_by_folder.csv, errors.csv, "
          "run.json)")


#: Folders whose differential the command prints; summary_by_folder.csv holds them all.
_FOLDERS_PRINTED = 10


def _print_differentials(by_folder, models: dict) -> None:
    """The differential count of each folder of images, whole cells only (the rows of
    summary_by_folder.csv): pooled over every folder it mixed slides and microscopes."""
    several = len(by_folder) > 1
    for _, row in by_folder.head(_FOLDERS_PRINTED).iterrows():
        lines = []
        for name, model in models.items():
            for cell_type in model["cell_types"]:
                total = int(row.get(cell_type) or 0)
                parts = sorted(
                    ((int(row[f"{cell_type}_{c}"]), c) for c in model["classes"] if f"{cell_type}_{c}" in row),
                    reverse=True,
                )
                if total and any(n for n, _ in parts):
                    shown = ", ".join(f"{c} {100 * n / total:.1f}%" for n, c in parts if n)
                    lines.append(f"  {cell_type} by {name} ({total} cells): {shown}")
        if lines:
            where = f" in {row['folder']} ({row['images']} images)" if several else ""
            print(f"differential, whole cells{where}:")
            print("\n".join(lines))
    if len(by_folder) > _FOLDERS_PRINTED:
        print(f"... {len(by_folder) - _FOLDERS_PRINTED} more folders in summary_by_folder.csv")


# ----------------------------------------------------------------------------- gallery


def _add_gallery(subparsers) -> None:
    parser = subparsers.add_parser(
        "gallery", help="draw the cells of each folder of an analysis, a block per class, to review them",
        description="Read the output folder of `napari-smear analyze` and draw one picture per folder of images "
                    "into OUT_DIR/galleries/<folder>_gallery.png: the cells of all its images, a block per class "
                    "with its number of cells, the least confident first; each thumbnail is captioned with its "
                    "image and the cell's label id and confidence (its row in <image>_cells.csv). The cells are "
                    "cut from the input images where the run read them (an image moved since is left out, "
                    "with a warning).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder of a finished analyze run")
    parser.add_argument("--cell-types", nargs="+", default=["wbc", "platelet"], metavar="TYPE",
                        help="cell types to draw: wbc, rbc, platelet, or all (default wbc platelet)")
    parser.add_argument("--per-class", type=_positive_int, default=40,
                        help="cells drawn per class at most (default 40)")
    parser.add_argument("--order", choices=("least", "most", "label"), default="least",
                        help="which cells of a class first: least or most confident, or by label id "
                             "(default least)")
    parser.add_argument("--include-edge-cells", action="store_true",
                        help="also the cells the image edge cuts (left out by default, as in "
                             "summary_by_folder.csv)")
    parser.set_defaults(func=_cmd_gallery)


def _cmd_gallery(args) -> int:
    from .gallery import ORDERS, batch_galleries
    from .segment.types import CELL_TYPES

    if not Path(args.out_dir).is_dir():
        raise CommandError(f"{args.out_dir} is not a folder: give the output folder of `napari-smear analyze`")
    given = [t.strip().lower() for item in args.cell_types for t in item.split(",") if t.strip()]
    unknown = [t for t in given if t not in (*CELL_TYPES, "all")]
    if unknown or ("all" in given and len(given) > 1):
        raise CommandError(f"--cell-types takes {', '.join(CELL_TYPES)}, or all alone; "
                           f"got {' '.join(args.cell_types)}")
    cell_types = None if given == ["all"] else given
    order = dict(zip(("least", "most", "label"), ORDERS))[args.order]
    paths = batch_galleries(args.out_dir, cell_types=cell_types, per_class=args.per_class, order=order,
                            include_edge_cells=args.include_edge_cells)
    for path in paths:
        print(f"gallery: {path}")
    if not paths:
        print(f"napari-smear gallery: no analysed images in {args.out_dir} (summary.csv lists none)", file=sys.stderr)
        return 1
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write report.html for an analysis: each folder's differential and cell gallery",
        description="Read the output folder of `napari-smear analyze`, draw each folder's cell gallery "
                    "(OUT_DIR/galleries/) and write OUT_DIR/report.html: the models and settings, the run's "
                    "warnings, each folder's differential count (whole cells) with its gallery, a line per image "
                    "(its counts, a link to its QC overlay, its warnings) and the images that failed. One static "
                    "page: open it in a browser, or print it to PDF.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder of a finished analyze run")
    parser.add_argument("--no-galleries", action="store_true", help="do not draw the cell galleries (faster)")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import write_run_report

    if not Path(args.out_dir).is_dir():
        raise CommandError(f"{args.out_dir} is not a folder: give the output folder of `napari-smear analyze`")
    print(f"report: {write_run_report(args.out_dir, galleries=not args.no_galleries)} (open it in a browser)")
    return 0


# ----------------------------------------------------------------------------- train


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a cell classifier on labelled single-cell crops",
        description="Train a crop classifier. DATA is a folder with one sub-folder of images per class, a CSV "
                    "manifest (path,label[,split]) or a crop-set .npz from `napari-smear pack-crops`.",
    )
    parser.add_argument("data", help="class folder, CSV manifest or crop-set .npz")
    parser.add_argument("--model-kind", default="shape_aware",
                        help="architecture: plain, shape_aware, gated_attention, daffnet, global_attention "
                             "(default shape_aware)")
    parser.add_argument("--out", required=True, help="model file to write (.safetensors)")
    parser.add_argument("--cell-types", default=None, metavar="TYPES",
                        help="segmented cells the model is for, comma-separated: wbc, rbc, platelet (e.g. "
                             "'wbc,platelet'); `analyze` gives it only those. Default: those of the --init-from model, "
                             "else every cell type")
    parser.add_argument("--epochs", type=_positive_int, default=30, help="passes over the training crops (default 30)")
    parser.add_argument("--batch-size", type=_training_batch_size, default=128, help="crops per step (default 128)")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="peak AdamW learning rate (default 2e-3; 5e-4 when fine-tuning with --init-from)")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="fine-tune: start from this model (built-in name or .safetensors file), keeping its "
                             "architecture, crop scale and stain normalisation; e.g. wbc-pbc8 on your own "
                             "microscope's crops")
    parser.add_argument("--average-weights-from", type=_positive_int, default=None, metavar="EPOCH",
                        help="stochastic weight averaging: from this epoch on, the model written is the average of "
                             "the weights at the end of every epoch since (how wbc-pbc8's second stage was made)")
    parser.add_argument("--mixstyle", type=float, default=0.0, metavar="P",
                        help="MixStyle (feature-statistics mixing for other stains and cameras) in a share P of "
                             "the training batches (default 0: off)")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=0.05,
                        help="AdamW weight decay (default 0.05)")
    parser.add_argument("--patience", type=int, default=8,
                        help="stop after this many epochs without a better validation macro-F1 "
                             "(default 8; 0: never)")
    parser.add_argument("--attention-supervision", type=float, default=0.0,
                        help="weight of the loss pulling attention maps onto the cell mask (default 0: off)")
    parser.add_argument("--attribute-weight", type=float, default=0.5,
                        help="weight of the WBCAtt attribute loss (DAFFNet) (default 0.5)")
    parser.add_argument("--balance", choices=("sampler", "loss", "none"), default="sampler",
                        help="class balancing: weighted sampling, weighted loss or none (default sampler)")
    parser.add_argument("--no-augment", action="store_true", help="turn augmentation off")
    parser.add_argument("--config", type=_json_object, default=None,
                        help='architecture options as JSON, e.g. \'{"widths": [16, 32, 64, 128]}\'')
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="mixed precision (default auto: CUDA fp16, CPU bf16 where native)")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    parser.add_argument("--max-train-samples", type=_positive_int, default=None)
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", default=None, help="crop-set .npz to store (or reuse) the crops of DATA")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_crop_options(parser)
    parser.set_defaults(func=_run_train)


# the Train classifier dock's default for fine-tuning too
_FINE_TUNE_LR = 5e-4


def _run_train(args) -> int:
    from .training import checkpoint_dir_for, partial_model_path, train, weak_model_caution

    amp = {"auto": None, "on": True, "off": False}[args.amp]
    balance = {"sampler": "sampler", "loss": "loss", "none": False}[args.balance]
    given = [option for option, value in (("--crop-diameters", args.crop_diameters),
                                          ("--output-size", args.output_size)) if value is not None]
    verb = "applies" if len(given) == 1 else "apply"
    if given and str(args.data).lower().endswith(".npz"):
        print(f"napari-smear train: warning: {' and '.join(given)} {verb} to cropping a folder or CSV; the crops in "
              f"{args.data} were cut already and are used as they are", file=sys.stderr)
    elif given and args.init_from:
        print(f"napari-smear train: warning: {' and '.join(given)} {verb} to a new model; fine-tuning keeps "
              f"{args.init_from}'s crop scale and size", file=sys.stderr)
    _check_training_choices(args)  # before the cropping, which takes long
    try:
        result = _train_from_args(args, train, amp, balance)
    except KeyboardInterrupt:
        partial = partial_model_path(args.out)
        if partial.is_file():  # said before the generic "interrupted"
            kept = "is unchanged" if Path(args.out).is_file() else "was not written"
            print(file=sys.stderr)  # off the progress bar's line
            print(f"napari-smear train: {args.out} {kept}; the best model so far is in {partial}, and the same "
                  f"command with --resume continues from the checkpoint in {checkpoint_dir_for(args.out)}",
                  file=sys.stderr)
        raise
    metrics = result.metrics
    print(f"model: {result.model_path} ({result.info.kind}, {len(result.info.class_names)} classes)")
    cell_types = result.info.metadata.get("cell_types")
    print(f"classifies: {', '.join(cell_types)} cells" if cell_types else
          "classifies: every segmented cell type (white and red cells, platelets); --cell-types restricts it")
    print(
        f"best epoch {result.best_epoch} of {result.epochs_completed}"
        f"{' (stopped early)' if result.stopped_early else ''}; {result.seconds:.0f} s"
    )
    _print_metrics(metrics)
    views = int(result.info.metadata.get("test_time_views") or 1)
    if views > 1:  # the validation above looked at each crop once
        print(f"(validation: one view per crop; the model file answers with {views} turned views, usually a little "
              f"better: `napari-smear evaluate {result.model_path} DATA` scores it as it answers)")
    choice = result.info.metadata.get("prior_correction")
    if choice:
        print(f"prior correction: strength {choice['strength']:g}, chosen on {choice['n']} validation crops and "
              "stored in the model file (the figures above are without it)")
    checkpoint = checkpoint_dir_for(args.out)
    if checkpoint.is_dir():  # kept: --resume with more --epochs trains on from it
        size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        print(f"checkpoint: {checkpoint} ({size / 1e6:.1f} MB), kept for --resume with more --epochs; "
              "delete it when you are done")
    caution = weak_model_caution(metrics, len(result.info.class_names))
    if caution:  # as the Train classifier dock cautions
        print(f"napari-smear train: warning: {caution}", file=sys.stderr)
    return 0


def _check_training_choices(args) -> None:
    """What can be refused before the training data is cropped (minutes to an hour on a
    CPU for a large folder): the device, and a --out that is the model to start from."""
    from .predict import select_device

    try:
        select_device(args.device)
    except ValueError as exc:
        raise CommandError(f"--device {args.device}: {exc}") from None
    if args.init_from:
        from .models.files import resolve_model_path

        base = resolve_model_path(args.init_from)
        out = Path(args.out)  # train() refuses any other ending than .safetensors itself
        if out.exists() and out.resolve() == base.resolve():
            raise CommandError(f"--out {args.out} is the model --init-from starts from: give the fine-tuned model "
                               "another file name (the base model stays as it is)")


def _train_from_args(args, train, amp, balance):
    return train(
        args.data,
        model_kind=args.model_kind,
        output=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (_FINE_TUNE_LR if args.init_from else 2e-3),
        weight_decay=args.weight_decay,
        attention_supervision=args.attention_supervision,
        attribute_weight=args.attribute_weight,
        balance=balance,
        augment=not args.no_augment,
        device=args.device,
        amp=amp,
        seed=args.seed,
        patience=args.patience or None,
        resume=args.resume,
        max_train_samples=args.max_train_samples,
        num_threads=args.threads,
        progress=not args.quiet,
        config=args.config,
        cache=args.cache,
        stain_normalization=_stain_normalization(args),
        crop_diameters=args.crop_diameters or 4.0,
        output_size=args.output_size or 96,
        workers=args.workers,
        cell_types=[t.strip() for t in args.cell_types.split(",") if t.strip()] if args.cell_types else None,
        init_from=args.init_from,
        average_weights_from=args.average_weights_from,
        mixstyle=args.mixstyle,
    )


# ----------------------------------------------------------------------------- evaluate


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a model on labelled crops (accuracy, macro-F1, per-class recall)",
        description="Evaluate MODEL (a built-in name or a .safetensors file) on DATA (class folder, CSV "
                    "manifest or crop-set .npz). Folder and CSV data are cropped with the model's own scale.",
    )
    parser.add_argument("model", help="model name or .safetensors file")
    parser.add_argument("data", help="class folder, CSV manifest or crop-set .npz")
    parser.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                        help="train, val, test or all (default val)")
    parser.add_argument("--confusion", default=None, help="write the confusion matrix as an image (e.g. cm.png)")
    parser.add_argument("--json", default=None, help="write all metrics as JSON")
    _add_inference_options(parser, workers_help="processes for cropping folder/CSV data")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .training import evaluate, plot_confusion

    inputs = (args.model, args.data)
    if args.confusion:
        _check_output_file(args.confusion, (".png", ".pdf", ".svg"), "--confusion", inputs)
    if args.json:
        _check_output_file(args.json, (".json",), "--json", inputs, ours=_is_metrics_json,
                           what="metrics written by napari-smear evaluate")
    split = None if args.split == "all" else args.split
    metrics = evaluate(
        args.model, args.data, split, device=args.device, batch_size=args.batch_size, amp=not args.no_amp,
        workers=args.workers, progress=not args.quiet, prior_correction=args.prior_correction,
        test_time_views=args.test_time_views, sure_at=args.sure_at,
    )
    print(f"model: {args.model}")
    print(f"data: {args.data}, split {metrics['split']}")
    if metrics["split"] == "val":  # the default: say what it leaves out
        print("(the validation split only: of a folder or CSV without one, the 15 % of images chosen by a hash of "
              "their paths that training on this data holds out to pick its best epoch; --split all scores every "
              "image)")
    _print_metrics(metrics)
    if args.confusion:
        path = plot_confusion(metrics["confusion"], metrics["class_names"], args.confusion,
                              title=f"{Path(str(args.model)).name} on {metrics['split']}")
        print(f"confusion matrix: {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"metrics: {args.json}")
    return 0


def _print_metrics(metrics: dict) -> None:
    line = f"n={metrics.get('n')}  accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}"
    inside = metrics.get("attention_mass_inside")
    if inside is not None and inside == inside:
        line += f"  attention inside cell {inside:.3f}"
    print(line)
    print("per-class recall:")
    support = metrics.get("support", {})
    width = max((len(c) for c in metrics["per_class_recall"]), default=5)
    for name, recall in metrics["per_class_recall"].items():
        shown = "   -  " if recall is None else f"{recall:.4f}"
        print(f"  {name:<{width}}  {shown}  (n={support.get(name, '?')})")


# ----------------------------------------------------------------------------- classify


def _add_classify(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify", help="classify single-cell images (files or folders) into a CSV",
        description="Classify single-cell images (one cell near the centre, like PBC / CellaVision crops). "
                    "Folders are searched recursively. Images that cannot be read or cropped are reported on "
                    "stderr and listed in the CSV with their error; the exit status is then 1, as when "
                    "nothing was classified.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--model", default="wbc-pbc8", help="model name or .safetensors file (default wbc-pbc8)")
    parser.add_argument("--out", required=True, help="CSV to write (path, prediction, confidence, p_<class>..., scale_measured (false: the "
                             "image's own red cells could not be measured, or measured far off the others', and the "
                             "others' median scale was used), cell_type (the segmented type of the cell classified), "
                             "warning (what makes the answer doubtful), error)")
    _add_inference_options(parser, workers_help="processes for cropping")
    parser.set_defaults(func=_run_classify)


def _run_classify(args) -> int:
    from .io import write_csv_atomic
    from .predict import classify_files

    out = _check_output_file(args.out, (".csv",), "--out", args.inputs, ours=_is_predictions_csv,
                             what="a table written by napari-smear classify")
    table = classify_files(
        args.inputs, args.model, device=args.device, batch_size=args.batch_size, amp=not args.no_amp,
        workers=args.workers, progress=not args.quiet, prior_correction=args.prior_correction,
        test_time_views=args.test_time_views, sure_at=args.sure_at,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out, table)
    failed = table[table.error != ""]
    for path, error in zip(failed.path, failed.error):
        print(f"napari-smear classify: {path}: {error}", file=sys.stderr)
    classified = len(table) - len(failed)
    doubtful = table[(table.error == "") & (table.warning != "")]
    for path, warning in zip(doubtful.path, doubtful.warning):
        print(f"napari-smear classify: warning: {path}: {warning}", file=sys.stderr)
    print(f"classified {classified} of {len(table)} images -> {out}"
          + (f" ({len(doubtful)} with a warning: see its column)" if len(doubtful) else ""))
    if classified:
        counts = table.prediction[table.error == ""].value_counts()
        print("  " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    if not len(table):
        print("napari-smear classify: no image files found in the inputs", file=sys.stderr)
        return 1
    return 1 if len(failed) else 0  # like segment and analyze: scripts learn that the CSV lists errors


# ----------------------------------------------------------------------------- pack-crops


def _add_pack_crops(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack-crops", help="crop a labelled image set once into a compact .npz crop set",
        description="Segment and crop every image of DATA (class folder or CSV manifest with path,label[,split]) "
                    "at normalised scale and store crops, masks, morphology, labels, split and attributes in "
                    "one compressed .npz (no pickle) for `train` and `evaluate`.",
    )
    parser.add_argument("data", help="class folder or CSV manifest")
    parser.add_argument("--out", required=True, help=".npz file to write")
    parser.add_argument("--codec", choices=("jpeg", "raw"), default="jpeg",
                        help="how crops are stored: JPEG (about 4 KB per 96 px crop) or raw pixels (default jpeg)")
    parser.add_argument("--jpeg-quality", type=_jpeg_quality, default=90, help="1-100 (default 90)")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="share of each class put in val when the data names no split (default 0.15)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_crop_options(parser)
    parser.set_defaults(func=_run_pack_crops)


def _run_pack_crops(args) -> int:
    from .datasets import build_crop_set, is_crop_set_file, save_crop_set

    _check_output_file(args.out, (".npz",), "--out", (args.data,), ours=is_crop_set_file,
                       what="a crop set written by napari-smear pack-crops")
    started = time.perf_counter()
    crop_set = build_crop_set(
        args.data, crop_diameters=args.crop_diameters or 4.0, output_size=args.output_size or 96,
        workers=args.workers, progress=not args.quiet, val_fraction=args.val_fraction,
        stain_normalization=_stain_normalization(args),
        min_classes=1,  # one class's cells make a set to score a model on (training refuses it)
    )
    built = time.perf_counter() - started
    path = save_crop_set(args.out, crop_set, image_codec=args.codec, jpeg_quality=args.jpeg_quality)
    print(crop_set.describe())
    if len(crop_set.class_names) == 1:
        print("one class: a set to score a model on (napari-smear evaluate), not to train one")
    print(f"cropped {len(crop_set)} images in {built:.1f} s ({len(crop_set) / max(built, 1e-9):.1f} images/s); "
          f"{len(crop_set.failures)} skipped")
    # the first five are in the cropping's warning above; a few more here, then a count
    for failed_path, reason in crop_set.failures[5:10]:
        print(f"  skipped {failed_path}: {reason}", file=sys.stderr)
    if len(crop_set.failures) > 10:
        print(f"  ... and {len(crop_set.failures) - 10} more skipped", file=sys.stderr)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB)" if size >= 100_000 else f"wrote {path} ({size / 1e3:.0f} kB)")
    return 0


# ----------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """An argument parser whose "arguments are required" error says why when ``--models``
    came before the inputs: it takes every word after it (``nargs="+"``), the inputs too."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        given = getattr(self, "_given", [])
        if "arguments are required" in message and "--models" in given and "--" not in given:
            message += (
                " (--models takes every word after it: put it after the inputs and the output "
                "folder, or end its list with --, as in: --models none -- IN OUT_DIR)"
            )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-smear`` argument parser with every subcommand registered."""
    from . import __version__

    parser = _Parser(
        prog="napari-smear",
        description="Blood-smear segmentation and cell classification (napari-smear core tools).",
    )
    parser.add_argument("--version", action="version", version=f"napari-smear {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in (_add_segment, _add_analyze, _add_gallery, _add_report, _add_demo, _add_train, _add_evaluate,
                _add_classify, _add_pack_crops):
        add(subparsers)
    return parser


# The training library's argument checks name its parameters; on the command line the
# same messages name the options (only these exact phrases, and only for `train`'s own
# errors: a model file's "cell_types" metadata, say, is not an option).
_OPTION_WORDS = (
    ("cell_types must be", "--cell-types must be"),
    ("average_weights_from must be", "--average-weights-from must be"),
    ("lr must be > 0 and weight_decay, attention_supervision, attribute_weight >= 0",
     "--lr must be > 0 and --weight-decay, --attention-supervision, --attribute-weight >= 0"),
    ("patience must be >= 1 or None", "--patience must be >= 1"),
    ("use attention_supervision=0", "use --attention-supervision 0"),
    ("start it afresh (resume=False)", "start it afresh (without --resume)"),
    ("or resume=False to start afresh", "or leave out --resume to start afresh"),
    ("leave model_kind out", "leave --model-kind out"),
    ("fine-tune an ensemble file with init_from", "fine-tune an ensemble file with --init-from"),
)


def _in_option_words(message: str) -> str:
    for phrase, words in _OPTION_WORDS:
        message = message.replace(phrase, words)
    return message


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure (for the batch
    commands: any image failed, see errors.csv), 2 usage error, 130 interrupted, 141 the
    reader of the output went away)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # warnings about the images (no colour, too few cells for the scale...) are for the
    # user: printed like the errors, not as Python's "file.py:317: UserWarning" and a
    # line of our source
    original_format = warnings.formatwarning
    # while a progress bar shows, a warning starts a line of its own (it was appended to
    # the bar's line); the bar is drawn again below it
    warnings.formatwarning = lambda message, category, *_, **__: (
        f"{chr(10) if _ImagesBar.showing else ''}napari-smear {args.command}: warning: {message}\n"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-smear: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # whatever read the output stopped (``| head``): stop quietly, as a shell tool
        # does, with no error message about it; later output goes nowhere
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout with no file behind it
            pass
        return 141
    except (CommandError, ValueError, TypeError, OSError, FloatingPointError) as exc:
        # OSError: an output path that is a folder, a full disk, a permission...
        message = str(exc)
        if args.command == "train" and type(exc).__name__ != "ModelFileError":  # not a file's own metadata
            message = _in_option_words(message)
        print(f"napari-smear {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = original_format


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
