"""Open a smear field, classify its cells and show the result in napari.

    python docs/examples/analyze_in_napari.py field.jpg
    python docs/examples/analyze_in_napari.py field.jpg --model my_model.safetensors
    python docs/examples/analyze_in_napari.py --synthetic --model my_model.safetensors

Without an image, a BCCD field is downloaded once (pinned hash); ``--synthetic`` uses the
built-in synthetic smear instead (offline). The models default to the built-in ones that
are installed. The viewer shows the cells coloured by class (hover a cell for its class
and confidence), one attention layer per model, and the "Differential count" dock -- the
same layers the "Classify cells" widget makes. ``--headless`` (or the environment
variable ``NAPARI_SMEAR_EXAMPLE_HEADLESS=1``) builds the viewer without showing it and
returns instead of entering the event loop, which is how the tests run this script.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="a smear field (TIFF, PNG, JPEG, BMP)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic smear (offline)")
    parser.add_argument("--model", action="append", help="built-in model name or model file (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--headless", action="store_true", default=os.environ.get("NAPARI_SMEAR_EXAMPLE_HEADLESS") == "1",
                        help="do not show the viewer (for tests)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import napari

    import napari_smear
    from napari_smear.io import file_stem, read_image
    from napari_smear.models import available_models

    models = args.model or available_models()
    if not models:
        sys.exit("no built-in model is installed here: pass --model with a model file (train one: docs/viewer.md, 'Train classifier')")
    if args.synthetic:
        image, _ = napari_smear.synthetic_smear()
        name, pixel_size_um = "synthetic smear", None
    else:
        if args.image:
            path = args.image
        else:
            from napari_smear.samples import fetch_bccd_sample

            path = fetch_bccd_sample()  # downloaded once, then cached
        image, meta = read_image(path)
        name, pixel_size_um = file_stem(path), meta.get("pixel_size_um")

    # The same call a widget makes: segment, classify, map the attention.
    # the file's calibration, checked against the red cells (ignored with a warning when they contradict it)
    result = napari_smear.analyze(image, models=models, device=args.device, recorded_pixel_size_um=pixel_size_um)
    print(result.counts.to_string(index=False))

    viewer = napari.Viewer(show=not args.headless)
    layer = viewer.add_image(image, name=name, rgb=image.ndim == 3)
    napari_smear.add_to_viewer(viewer, result, image_layer=layer)
    if args.headless:
        return viewer
    napari.run()
    return viewer


if __name__ == "__main__":
    main()
