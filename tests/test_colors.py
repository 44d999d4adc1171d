"""One palette for the viewer and the QC pictures: every class its own colour."""
import itertools

from napari_smear.colors import CELL_TYPE_RGB, CLASS_RGB, SPARE_RGB, class_palette_rgb
from napari_smear.models import read_metadata
from napari_smear.models.files import resolve_model_path


def _difference(a, b) -> int:
    return max(abs(x - y) for x, y in zip(a, b))


def test_built_in_models_classes_all_get_distinct_colours():
    """Both built-in models in one viewer: no two of their 21 classes look alike
    (the spare tones that nearly repeat a fixed class colour are skipped)."""
    names = [c for m in ("wbc-pbc8", "rbc-chula12") for c in read_metadata(resolve_model_path(m))["class_names"]]
    palette = class_palette_rgb(names)
    assert set(palette) == set(names)
    for (a, ca), (b, cb) in itertools.combinations(palette.items(), 2):
        assert _difference(ca, cb) >= 24, (a, ca, b, cb)
    for name in CLASS_RGB:
        if name in palette:
            assert palette[name] == CLASS_RGB[name]


def test_class_colours_differ_from_the_cell_type_colours_beside_them():
    """Cells no model classifies keep their cell-type colour on the same layer as the
    classified ones (and in the overlay pictures): no class may look like a type, except
    the platelet class, which is the platelet type."""
    names = [c for m in ("wbc-pbc8", "rbc-chula12") for c in read_metadata(resolve_model_path(m))["class_names"]]
    for name, colour in class_palette_rgb(names).items():
        for cell_type, type_colour in CELL_TYPE_RGB.items():
            if name != cell_type:
                assert _difference(colour, type_colour) >= 24, (name, colour, cell_type, type_colour)


def test_palette_is_deterministic_and_keeps_decided_colours():
    first = class_palette_rgb(["macrocyte", "teardrop"])
    assert class_palette_rgb(["macrocyte", "teardrop"]) == first
    # a class keeps its spare tone whether or not a known class is in view
    assert class_palette_rgb(["neutrophil", "macrocyte", "teardrop"])["teardrop"] == first["teardrop"]
    kept = class_palette_rgb(["teardrop", "schistocyte"], base={"teardrop": (1, 2, 3)})
    assert kept["teardrop"] == (1, 2, 3)
    assert kept["schistocyte"] != (1, 2, 3)
    assert class_palette_rgb([None, float("nan"), ""]) == {}


def test_more_classes_than_tones_still_get_colours():
    names = [f"class {k}" for k in range(len(SPARE_RGB) + 5)]
    palette = class_palette_rgb(names)
    assert len(palette) == len(names)


def test_abnormal_red_cells_get_saturated_colours_apart_from_each_other():
    """rbc-chula12's abnormal classes are outlined on pink and violet cells: none is a
    grey (spherocytes, the commonest, once got a mid grey that vanished on dark cells),
    and each is at least 40 apart from the others, from normal grey and from the red-cell
    type colour."""
    names = read_metadata(resolve_model_path("rbc-chula12"))["class_names"]
    palette = class_palette_rgb(names)
    abnormal = {name: palette[name] for name in names if name != "normal"}
    assert set(abnormal) <= set(CLASS_RGB)  # fixed: the same in every image
    for name, colour in abnormal.items():
        assert max(colour) - min(colour) >= 60, (name, colour)
    others = {**abnormal, "normal": palette["normal"], "red-cell type": CELL_TYPE_RGB["rbc"]}
    for (a, ca), (b, cb) in itertools.combinations(others.items(), 2):
        assert _difference(ca, cb) >= 40, (a, ca, b, cb)
