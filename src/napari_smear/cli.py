"""`napari-smear` command line: one subcommand per tool, each a thin call into the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_segment(args) -> int:
    from .batch import segment_files

    def show(i, n, path):
        if i < n:
            print(f"[{i + 1}/{n}] {path}", file=sys.stderr)

    summary = segment_files(args.inputs, args.out, pixel_size_um=args.pixel_size_um, progress=show)
    ok = summary[summary.error == ""]
    cols = [c for c in ("wbc", "rbc", "platelet") if c in ok]
    for _, row in ok.iterrows():
        counts = ", ".join(f"{c} {int(row[c])}" for c in cols)
        print(f"{Path(row.path).name}: {counts} (red-cell diameter {row.rbc_diameter_px:.1f} px)")
    bad = summary[summary.error != ""]
    for _, row in bad.iterrows():
        print(f"FAILED {row.path}: {row.error}", file=sys.stderr)
    print(f"{len(ok)} image(s) segmented, {len(bad)} failed; outputs in {args.out}")
    return 0 if len(ok) or not len(summary) else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-smear", description="Blood-smear segmentation and cell classification.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment smear images (files or folders)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel-size-um", type=float, default=None, help="pixel size; default: automatic scale")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("demo", help="run the main job on the bundled sample fields")
    p.add_argument("--out", default="demo-output")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
