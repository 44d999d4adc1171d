"""Fine-tune a classifier on your own labelled cells, then use it.

    python docs/examples/finetune_from_folder.py my_cells/ --base wbc-pbc8 --out my_wbc.safetensors

``my_cells/`` holds one sub-folder of single-cell images per class (``my_cells/neutrophil/
*.jpg``, ...; optionally inside ``train/`` and ``val/`` folders). Each image is segmented
and its central cell cropped at the base model's scale; the base model's weights are the
starting point (classes it knows keep their classifier weights, new classes start
fresh), and 15 % of each class is held out for validation unless a ``val/`` folder
exists. The best epoch (validation macro-F1) is saved, with the cell types it is for
(the base model's unless ``--cell-types`` says otherwise; a type none of the training
cells has is left out, with a warning: ``wbc-pbc8`` also types platelets, a folder of
white cells teaches it none), so
``napari_smear.analyze(image, models=["my_wbc.safetensors"])`` and the "Classify cells"
widget apply it to those cells only.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder with one sub-folder of single-cell images per class")
    parser.add_argument("--base", default="wbc-pbc8", help="model to start from: built-in name or file")
    parser.add_argument("--out", default="my_model.safetensors", help="the model file to write")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (lower than from scratch)")
    parser.add_argument("--cell-types", default=None,
                        help="segmented cell types the model is for, comma-separated (wbc, rbc, platelet), as "
                             "`napari-smear train --cell-types`; default: the base model's")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from napari_smear.models import ModelFileError
    from napari_smear.training import train

    def report(record):
        print(f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, validation accuracy "
              f"{record['val_accuracy']:.3f}, macro-F1 {record['val_macro_f1']:.3f}")

    try:
        result = train(
            args.folder, init_from=args.base, output=args.out, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, device=args.device, progress=False, on_epoch=report,
            cell_types=[t.strip() for t in args.cell_types.split(",") if t.strip()] if args.cell_types else None,
        )
    except ModelFileError as exc:  # e.g. the built-in base model is not installed
        sys.exit(str(exc))
    for note in result.notes:
        print(note)
    metrics = result.metrics
    print(f"saved {result.model_path} (for {', '.join(result.info.metadata.get('cell_types') or ['every'])} cells): "
          f"best epoch {result.best_epoch}, validation accuracy {metrics['accuracy']:.3f}, "
          f"macro-F1 {metrics['macro_f1']:.3f} on {metrics['n']} cells")
    return result


if __name__ == "__main__":
    main()
