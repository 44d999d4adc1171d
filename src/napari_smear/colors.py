"""Colours of cell types and classes: one palette for the viewer and the QC pictures.

The napari layer (:mod:`napari_smear._napari.layers`) and the batch overlays
(:func:`napari_smear.batch.render_overlay`) both take their colours from here, so a
class looks the same in napari and in a saved picture. Colours are 0-255 RGB.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["CELL_TYPE_RGB", "CLASS_RGB", "SPARE_RGB", "class_palette_rgb"]

RGB = tuple[int, int, int]

#: Segmented cell types: violet white cells, red red cells, yellow platelets.
CELL_TYPE_RGB: dict[str, RGB] = {"wbc": (148, 56, 242), "rbc": (235, 41, 41), "platelet": (255, 214, 46)}

#: Fixed colours of the classes the built-in models know, so that a class has the same
#: colour in every image and every session (white-cell classes of PBC, platelets,
#: normal red cells in a neutral grey so abnormal ones stand out, and the abnormal red
#: cells of Chula RBC-12).
CLASS_RGB: dict[str, RGB] = {
    "neutrophil": (31, 120, 181),
    "lymphocyte": (43, 161, 43),
    "monocyte": (255, 128, 13),
    # crimson, not tab10's red: that is within a shade of the red-cell colour, which
    # the cells no model classifies keep on the same layer
    "eosinophil": (178, 24, 43),
    "basophil": (148, 102, 189),
    "ig": (140, 87, 74),
    "erythroblast": (227, 120, 194),
    "platelet": CELL_TYPE_RGB["platelet"],
    "normal": (199, 199, 199),
    # Chula RBC-12's abnormal red cells: saturated tones (from Trubetskoy's list of
    # distinct colours) that a thin outline shows on pink and violet cells, at least
    # 40 apart (largest channel difference) from each other, from normal grey and from
    # the red-cell type. Handed out from the spare tones, spherocytes (the commonest)
    # got a mid grey that vanished on dark cells, and stomatocytes a pale yellow
    # next to the normal grey.
    "macrocyte": (66, 212, 244),
    "microcyte": (70, 153, 144),
    "spherocyte": (240, 50, 230),
    "target_cell": (191, 239, 69),
    "stomatocyte": (245, 130, 49),
    "ovalocyte": (145, 30, 180),
    "teardrop": (255, 255, 0),
    "burr_cell": (154, 99, 36),
    "schistocyte": (170, 255, 195),
    "uncategorised": (128, 0, 0),
    "hypochromia": (220, 190, 255),
    "elliptocyte": (0, 130, 200),
}

#: Colours for other class names, handed out in the order the classes are first seen
#: (matplotlib's tab20 reordered: strong tones first, then the light ones; then darker
#: and brighter tones from Trubetskoy's list of distinct colours, so that a 13-class
#: red-cell model and the white-cell classes all get colours of their own). The tones
#: that are (nearly) a fixed class colour are skipped when handed out.
SPARE_RGB: tuple[RGB, ...] = (
    (23, 190, 207), (188, 189, 34), (140, 86, 75), (227, 119, 194), (127, 127, 127),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (158, 218, 229), (219, 219, 141), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (128, 0, 0), (0, 128, 128), (0, 0, 128), (128, 128, 0), (240, 50, 230), (210, 245, 60), (170, 255, 195),
)

# Two colours closer than this (largest channel difference, 0-255) read as one on a
# labels layer: a spare tone that close to a colour in use is not handed out.
_MIN_CHANNEL_DIFFERENCE = 24


def _close(a: Iterable[float], b: Iterable[float]) -> bool:
    return max(abs(float(x) - float(y)) for x, y in zip(a, b)) < _MIN_CHANNEL_DIFFERENCE


def class_palette_rgb(classes: Iterable[object], base: Mapping[str, RGB] | None = None) -> dict[str, RGB]:
    """A colour per class name: :data:`CLASS_RGB` where known, else spare tones in turn.

    Parameters
    ----------
    classes : iterable of str
        Class names in the order they should receive colours (e.g. every model's
        ``class_names`` in turn); empty and missing names are skipped.
    base : mapping, optional
        Colours already decided (class name -> 0-255 RGB); they are kept and their
        tones are not handed out again.

    Returns
    -------
    dict
        Class name -> 0-255 RGB, deterministic for a given order of names. Two classes
        share a colour only when there are more new classes than spare tones.
    """
    palette: dict[str, RGB] = {str(k): tuple(int(round(c)) for c in v[:3]) for k, v in (base or {}).items()}
    names = []
    for name in classes:
        if name is None or (isinstance(name, float) and name != name) or str(name) == "":
            continue
        if str(name) not in palette and str(name) not in names:
            names.append(str(name))
    # every fixed class colour is reserved, whether or not its class is in view, so a
    # class gets the same spare tone in every image and never a known class's colour;
    # so are the cell-type colours, which unclassified cells show beside the classes
    reserved = [*palette.values(), *CLASS_RGB.values(), *CELL_TYPE_RGB.values()]
    spare: list[RGB] = []
    for tone in SPARE_RGB:  # nor two spare tones that read as one
        if not any(_close(tone, used) for used in [*reserved, *spare]):
            spare.append(tone)
    k = 0
    for name in names:
        if name in CLASS_RGB:
            palette[name] = CLASS_RGB[name]
        else:
            palette[name] = spare[k % len(spare)] if spare else SPARE_RGB[k % len(SPARE_RGB)]
            k += 1
    return palette
