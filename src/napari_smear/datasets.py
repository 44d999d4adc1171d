"""Crop sets: labelled single-cell crops at normalised scale, built once and cached.

A :class:`CropSet` holds everything training and evaluation need as plain numpy
arrays: the RGB crops, their cell/nucleus masks, the crop morphology features, class
labels, a train/val split, the WBCAtt-style attributes and the source paths. It is built
from a folder of class sub-folders or a CSV manifest by :func:`build_crop_set` (each
image is segmented and its central cell cropped by
:func:`napari_smear.crops.crop_single_cell`) and stored in one compressed ``.npz`` file
by :func:`save_crop_set` -- the compact file to carry training data to another machine.

The ``.npz`` file holds no pickled objects (strings are fixed-width unicode arrays and
it is read with ``allow_pickle=False``). Crops are stored as JPEG (quality 90, no
chroma subsampling: a mean absolute error of about 1.7 grey levels) by default, which
makes the 12,634-image PBC set about 50 MB instead of about 230 MB; masks are bit-packed.

Core module: no napari, no Qt, no torch (the model registry is imported only to name the
WBCAtt attribute values).
"""
from __future__ import annotations

import hashlib
import io as _io
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._workers import process_pool

__all__ = [
    "CropSet",
    "build_crop_set",
    "build_point_crop_set",
    "field_split_of",
    "read_point_annotations",
    "save_crop_set",
    "load_crop_set",
    "load_data",
    "crop_code_version",
    "CROP_SET_FORMAT_VERSION",
]

#: The ``format`` entry of every crop-set archive :func:`save_crop_set` writes.
CROP_SET_FORMAT = "napari-smear crop set"
#: Version of the ``.npz`` layout written by :func:`save_crop_set`.
CROP_SET_FORMAT_VERSION = 1
#: Splits a crop set may hold.
SPLITS = ("train", "val", "test")
#: Attribute value code of "not annotated".
MISSING_ATTRIBUTE = -1
# Columns of a manifest that are not attributes.
_MANIFEST_COLUMNS = ("path", "label", "split")
# WBCAtt attribute files looked for beside a manifest (joined by file name).
_WBCATT_FILES = ("wbcatt_train.csv", "wbcatt_val.csv", "wbcatt_test.csv")


@dataclass
class CropSet:
    """Labelled crops at normalised scale.

    Attributes
    ----------
    images : (N, S, S, 3) uint8
        RGB crops.
    masks : (N, 2, S, S) uint8
        Cell mask and nucleus mask (0/1) of each crop's central cell.
    morph : (N, M) float32
        :func:`napari_smear.morphology.crop_morphology` features, columns ``morph_names``.
    labels : (N,) int64
        Index into ``class_names``.
    class_names : list of str
    split : (N,) str
        ``"train"``, ``"val"`` or ``"test"``.
    attributes : (N, A) int8
        Index of each attribute's value in ``attribute_values[a]``; -1 when not annotated.
    attribute_names : list of str
    attribute_values : list of list of str
    paths : (N,) str
        Source image of each crop.
    crop_diameters : float
        Crop window side in red-cell diameters (the scale convention).
    rbc_diameter_px : (N,) float32
        Red-cell diameter (source pixels) each crop was cut with.
    scale_measured : (N,) bool
        False where the scale could not be measured on the image and the set's median
        diameter was used instead.
    morph_names : list of str
    source : str
        What the set was built from (recorded in trained models' metadata).
    failures : list of (path, reason)
        Images that could not be cropped (skipped).
    code_version : str
        :func:`crop_code_version` of the code that made the crops ("" when unknown):
        crops from another segmentation version differ from what inference produces.
    stain_normalization : str
        The :mod:`napari_smear.normalize` method the fields were recoloured with before
        cropping ("" for none); models trained on the set record it and apply it.
    cell_types : (N,) str, optional
        The segmented type (wbc, rbc, platelet) of each crop's cell, where known: a model
        is not told to classify a cell type its training crops never showed it.
    """

    images: np.ndarray
    masks: np.ndarray
    morph: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    split: np.ndarray
    attributes: np.ndarray
    attribute_names: list[str]
    attribute_values: list[list[str]]
    paths: np.ndarray
    crop_diameters: float = 4.0
    rbc_diameter_px: np.ndarray | None = None
    scale_measured: np.ndarray | None = None
    morph_names: list[str] = field(default_factory=list)
    source: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)
    code_version: str = ""
    stain_normalization: str = ""
    cell_types: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.rbc_diameter_px is None:
            self.rbc_diameter_px = np.full(n, np.nan, np.float32)
        if self.scale_measured is None:
            self.scale_measured = np.ones(n, bool)
        if self.stain_normalization is None:  # "": none, as everywhere a crop set is written
            self.stain_normalization = ""
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when the arrays are inconsistent with each other."""
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (N, S, S, 3), got {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {self.images.dtype}")
        s = self.images.shape[1]
        if self.masks.shape != (n, 2, s, s):
            raise ValueError(f"masks must be (N, 2, S, S) = {(n, 2, s, s)}, got {self.masks.shape}")
        if self.morph.ndim != 2 or len(self.morph) != n:
            raise ValueError(f"morph must be (N={n}, M), got {self.morph.shape}")
        if self.morph_names and len(self.morph_names) != self.morph.shape[1]:
            raise ValueError(f"{len(self.morph_names)} morph_names for {self.morph.shape[1]} morph columns")
        for name in ("labels", "split", "paths", "rbc_diameter_px", "scale_measured"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} crops")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must index class_names (0..{len(self.class_names) - 1})")
        unknown = sorted(set(np.unique(self.split).tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"split values must be among {SPLITS}, got {unknown}")
        if self.attributes.shape != (n, len(self.attribute_names)):
            raise ValueError(
                f"attributes must be (N, A) = {(n, len(self.attribute_names))}, got {self.attributes.shape}"
            )
        if len(self.attribute_values) != len(self.attribute_names):
            raise ValueError("attribute_values needs one list of values per attribute name")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def output_size(self) -> int:
        """Crop side S in pixels."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str | None) -> np.ndarray:
        """Indices of the crops of ``split`` (all crops when None)."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return np.flatnonzero(self.split == split)

    def subset(self, index) -> "CropSet":
        """A new CropSet with the selected crops (same classes and attributes)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return CropSet(
            images=self.images[index],
            masks=self.masks[index],
            morph=self.morph[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            split=self.split[index],
            attributes=self.attributes[index],
            attribute_names=list(self.attribute_names),
            attribute_values=[list(v) for v in self.attribute_values],
            paths=self.paths[index],
            crop_diameters=self.crop_diameters,
            rbc_diameter_px=self.rbc_diameter_px[index],
            scale_measured=self.scale_measured[index],
            morph_names=list(self.morph_names),
            source=self.source,
            failures=list(self.failures),
            code_version=self.code_version,
            stain_normalization=self.stain_normalization,
            cell_types=None if self.cell_types is None else self.cell_types[index],
        )

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        """Number of crops per class (in ``split``, or overall)."""
        counts = np.bincount(self.labels[self.indices(split)], minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def has_attributes(self) -> bool:
        """Whether any crop has at least one annotated attribute."""
        return bool(self.attributes.size and (self.attributes >= 0).any())

    def describe(self) -> str:
        """One line: size, classes, splits and source."""
        splits = ", ".join(f"{s} {int((self.split == s).sum())}" for s in SPLITS if (self.split == s).any())
        return (
            f"{len(self)} crops of {self.output_size}x{self.output_size} px at {self.crop_diameters:g} "
            f"red-cell diameters, {self.num_classes} classes ({', '.join(self.class_names)}); {splits}"
            + (f"; from {self.source}" if self.source else "")
        )


# ----------------------------------------------------------------------------- building


def crop_code_version() -> str:
    """A short hash of the code that turns an image into crops (segmentation, cropping, morphology).

    Stored with every crop set so that a cache made by an older segmentation, whose
    crops (scale, masks) differ from what inference now produces, is noticed.
    """
    package = Path(__file__).resolve().parent
    files = sorted((package / "segment").glob("*.py")) + [
        package / "crops.py", package / "morphology.py", package / "normalize.py",
    ]
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def check_code_version(crop_set: "CropSet", what: str = "these crops") -> None:
    """Warn when ``crop_set`` was made by another version of the segmentation/cropping code."""
    current = crop_code_version()
    if crop_set.code_version and crop_set.code_version != current:
        warnings.warn(
            f"{what} were made by another version of the segmentation/cropping code "
            f"({crop_set.code_version}, now {current}): they may differ from the crops inference makes now "
            f"(scale, masks); rebuild them (napari-smear pack-crops) before training a model to ship",
            stacklevel=3,
        )


def _image_paths(folder: Path) -> list[Path]:
    from .io import is_supported_path

    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and is_supported_path(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _hash_split(paths: Sequence[str], labels: Sequence[str], val_fraction: float) -> np.ndarray:
    """A deterministic, stratified train/val split that does not depend on file order.

    Within each class the files are ordered by the md5 of their path and the first
    ``round(val_fraction * n)`` (at least one when the class has two or more) go to val.
    """
    split = np.full(len(paths), "train", dtype="<U5")
    if val_fraction <= 0:
        return split
    labels = np.asarray(labels)
    keys = np.array([hashlib.md5(str(p).encode()).hexdigest() for p in paths])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        order = members[np.argsort(keys[members], kind="stable")]
        split[order[:n_val]] = "val"
    return split


def hash_split_keys(crop_set: "CropSet") -> list[str]:
    """The key :func:`_hash_split` gives each crop's image when its folder or manifest is
    read (the path relative to that folder, or as the manifest writes it), so that a
    hold-out drawn later from the crops (training without a 'val' split) is the one
    ``evaluate`` draws from the same folder: drawn from the paths as stored (with the
    folder as it was typed before them), 3 of the 6 images one evaluation scored as
    held out had been trained on."""
    if not crop_set.source:
        return [str(p) for p in crop_set.paths]
    source = Path(crop_set.source)
    base = source.parent if source.suffix.lower() == ".csv" else source  # a manifest, else a folder
    keys = []
    for path in crop_set.paths:
        relative = os.path.relpath(os.path.abspath(path), base)
        keys.append(str(path) if relative.startswith("..") else relative)
    return keys


def _entries_from_folder(folder: Path, val_fraction: float):
    """(paths, labels, splits) from ``folder/<class>/...`` or ``folder/<split>/<class>/...``."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise ValueError(f"{folder} has no sub-folders: expected one sub-folder of images per class")
    names = {p.name.lower() for p in subfolders}
    if names & set(SPLITS) and not (names <= set(SPLITS) and "train" in names):
        raise ValueError(
            f"{folder} mixes split folders ({', '.join(sorted(names & set(SPLITS)))}) with other folders "
            f"({', '.join(sorted(p.name for p in subfolders if p.name.lower() not in SPLITS))}): use either "
            f"class folders only, or {'/'.join(SPLITS)} folders (train required) each holding class folders"
        )
    paths: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    empty: list[str] = []
    if names <= set(SPLITS) and "train" in names:
        for split_folder in subfolders:
            for class_folder in sorted(p for p in split_folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for path in _image_paths(class_folder):
                    paths.append(str(path))
                    labels.append(class_folder.name)
                    splits.append(split_folder.name.lower())
        split = np.array(splits, dtype="<U5")
    else:
        for class_folder in subfolders:
            found = _image_paths(class_folder)
            if not found:
                empty.append(class_folder.name)
            for path in found:
                paths.append(str(path))
                labels.append(class_folder.name)
        split = _hash_split([os.path.relpath(p, folder) for p in paths], labels, val_fraction)
    if empty and paths:
        warnings.warn(f"class folder(s) {empty} of {folder} hold no image files: left out", stacklevel=3)
    if not paths:
        raise ValueError(f"no image files ({', '.join(_supported())}) found under the class sub-folders of {folder}")
    return paths, labels, split


def _supported() -> tuple[str, ...]:
    from .io import SUPPORTED_SUFFIXES

    return SUPPORTED_SUFFIXES


def _read_manifest(csv_path: Path, val_fraction: float):
    """(paths, labels, split, attribute table or None) from a CSV manifest."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser error types
        raise ValueError(f"cannot read the manifest {csv_path}: {exc}") from exc
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ValueError(
            f"manifest {csv_path} lacks column(s) {missing}; expected columns path, label[, split] "
            f"(found {list(table.columns)})"
        )
    if table.empty:
        raise ValueError(f"manifest {csv_path} has no rows")
    base = csv_path.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in table["path"]]
    labels = table["label"].astype(str).str.strip().tolist()  # "lymphocyte " is "lymphocyte"
    if any(not label for label in labels):
        raise ValueError(f"manifest {csv_path} has rows with an empty label")
    if "split" in table.columns:
        split = table["split"].str.strip().str.lower().to_numpy()
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise ValueError(f"manifest {csv_path}: split values must be among {SPLITS}, got {bad}")
        split = split.astype("<U5")
    else:
        split = _hash_split(table["path"].tolist(), labels, val_fraction)

    attributes = _attribute_table(table, csv_path)
    return paths, labels, split, attributes


def _attribute_table(manifest, csv_path: Path):
    """Attribute columns of the manifest, completed from WBCAtt files beside it (by file name)."""
    import pandas as pd

    from .models.daffnet import WBCATT_ATTRIBUTES

    names = list(WBCATT_ATTRIBUTES)
    table = pd.DataFrame(index=manifest.index, columns=names, dtype=object)
    present = [n for n in names if n in manifest.columns]
    for name in present:
        column = manifest[name].astype(str).str.strip()
        table[name] = column.mask(column == "")
    extra = []
    for file_name in _WBCATT_FILES:
        path = csv_path.parent / file_name
        if path.is_file():
            extra.append(pd.read_csv(path, dtype=str, keep_default_na=False))
    if extra:
        wbcatt = pd.concat(extra, ignore_index=True)
        if "img_name" not in wbcatt.columns:
            raise ValueError(f"WBCAtt files beside {csv_path} lack the img_name column")
        wbcatt = wbcatt.drop_duplicates("img_name").set_index("img_name")
        file_names = manifest["path"].map(lambda p: Path(p).name)
        for name in names:
            if name in wbcatt.columns:
                column = wbcatt[name].astype(str).str.strip()
                values = file_names.map(column.mask(column == ""))
                table[name] = table[name].where(table[name].notna(), values)
    used = [n for n in names if table[n].notna().any()]
    if not used:
        return None
    return table[used]


def _encode_attributes(table, n: int):
    """Integer codes (N, A) int8 with -1 for missing, the names and the value lists."""
    if table is None:
        return np.zeros((n, 0), np.int8), [], []
    from .models.daffnet import WBCATT_ATTRIBUTES

    names = list(table.columns)
    values_per_attribute = []
    codes = np.full((n, len(names)), MISSING_ATTRIBUTE, np.int8)
    for a, name in enumerate(names):
        column = table[name]
        known = list(WBCATT_ATTRIBUTES.get(name, []))
        observed = sorted({str(v).strip().lower() for v in column.dropna()})
        unexpected = [v for v in observed if v not in known]
        if known and unexpected:
            raise ValueError(
                f"attribute {name!r} has value(s) {unexpected} that WBCAtt does not define; expected one of {known}"
            )
        values = known or observed
        lookup = {v: i for i, v in enumerate(values)}
        mask = column.notna().to_numpy()
        codes[mask, a] = [lookup[str(v).strip().lower()] for v in column[mask]]
        values_per_attribute.append(values)
    return codes, names, values_per_attribute


def _crop_one(task):
    """Worker: crop one image. Returns (index, result dict or None, error or None, scale_failed)."""
    index, path, crop_diameters, output_size, rbc_diameter_px, stain_normalization = task
    from .crops import crop_single_cell
    from .io import read_image
    from .morphology import crop_morphology
    from .segment.scale import ScaleEstimateError

    try:
        # kept for the caller ("no stained cells" is reported as a failure below)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, _ = read_image(path)
            crops = crop_single_cell(
                image, crop_diameters=crop_diameters, output_size=output_size, rbc_diameter_px=rbc_diameter_px,
                stain_normalization=stain_normalization,
            )
        morph = crop_morphology(crops.images, crops.masks, crop_diameters).to_numpy(np.float32)[0]
    except ScaleEstimateError as exc:
        return index, None, f"{type(exc).__name__}: {exc}", True
    except Exception as exc:  # every failure is reported with its reason, never raised
        return index, None, f"{type(exc).__name__}: {exc}", False
    result = {
        "image": crops.images[0],
        "masks": crops.masks[0],
        "morph": np.nan_to_num(morph, nan=0.0, posinf=0.0, neginf=0.0),
        "rbc_diameter_px": float(crops.rbc_diameter_px),
        "cell_type": str(crops.cell_types[0]),
        "warnings": list(dict.fromkeys(str(w.message) for w in caught)),
    }
    return index, result, None, False


def _run_tasks(tasks, workers: int, progress: bool, description: str, *, worker=None,
               unit: str = "img", chunksize: int | None = None):
    """Yield ``worker(task)`` for every task in order (default worker: :func:`_crop_one`),
    in this process or in ``workers`` processes (:func:`napari_smear._workers.process_pool`),
    with a progress bar."""
    from tqdm.auto import tqdm

    worker = worker or _crop_one
    # progress: a bool (a tqdm bar or none), or a callable(done, total) called after each
    # task instead (a widget's progress report, which may raise to cancel the run)
    report = progress if callable(progress) else None
    bar = tqdm(total=len(tasks), desc=description, unit=unit, disable=not progress or report is not None,
               smoothing=0.05)
    done = 0

    def advance():
        nonlocal done
        done += 1
        bar.update(1)
        if report is not None:
            report(done, len(tasks))

    try:
        with process_pool(workers if len(tasks) >= 2 * workers else 1) as pool:
            if pool is None:
                for task in tasks:
                    yield worker(task)
                    advance()
            else:
                chunk = chunksize or max(1, min(32, len(tasks) // (workers * 8)))
                for result in pool.map(worker, tasks, chunksize=chunk):
                    yield result
                    advance()
    finally:
        bar.close()


def crop_single_cell_images(
    paths: Sequence,
    indices: Iterable[int],
    *,
    crop_diameters: float,
    output_size: int,
    rbc_diameter_px: float | None = None,
    stain_normalization: str | None = None,
    scale_fallback: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> tuple[dict[int, dict], dict[int, str], int]:
    """Crop the central cell of ``paths[i]`` for every ``i`` in ``indices`` (:func:`_crop_one`).

    With ``scale_fallback``, images whose red-cell size cannot be measured, and (see
    :func:`scale_outliers`) images whose measured size is far off the others', are
    cropped again at the median diameter of the others (their result has
    ``scale_measured`` False). Returns the results and the errors, each keyed by index,
    and how many images were cropped at the median diameter.
    """
    if stain_normalization:
        from .normalize import check_method

        check_method(stain_normalization)  # here, not once per image in the workers
    stain = stain_normalization or None
    tasks = [(int(i), str(paths[i]), float(crop_diameters), int(output_size), rbc_diameter_px, stain)
             for i in indices]
    results: dict[int, dict] = {}
    errors: dict[int, str] = {}
    scale_failed: list[int] = []
    for index, result, error, no_scale in _run_tasks(tasks, workers, progress, "cropping"):
        if result is not None:
            results[index] = result
        else:
            errors[index] = error
            if no_scale and scale_fallback:
                scale_failed.append(index)

    fallback_count = 0
    if scale_fallback and rbc_diameter_px is None and results:
        scale_failed += scale_outliers({i: r["rbc_diameter_px"] for i, r in results.items()})
    if scale_failed and results:
        median = float(np.median([r["rbc_diameter_px"] for r in results.values()]))
        retry = [(i, str(paths[i]), float(crop_diameters), int(output_size), median, stain) for i in scale_failed]
        for index, result, error, _ in _run_tasks(retry, workers, progress, "cropping at median scale"):
            if result is not None:
                result["scale_measured"] = False
                results[index] = result
                errors.pop(index, None)
                fallback_count += 1
            elif index not in results:  # an outlier that fails again keeps its own crop
                errors[index] = error
    return results, errors, fallback_count


# Single-cell images of one batch (a folder of crops from one analyser) share their pixel
# size. An image whose own ruler lies this many times off the batch median is a failed
# measurement (a crop with two or three red cells round its white cell can measure the
# white cell, or the width of a ring): on the PBC validation crops 72 of 1,710 lay
# outside 1/1.4-1.4 and were typed right on 89 %, the others on 97 %.
_SCALE_OUTLIER_FACTOR = 1.4
# ... unless the batch is small or the outliers many: then the batch may hold two
# magnifications, and every image keeps its own ruler.
_SCALE_OUTLIER_MIN_IMAGES = 20
_SCALE_OUTLIER_MAX_SHARE = 0.1


def scale_outliers(diameters: dict) -> list:
    """Keys of the ``diameters`` (red-cell diameters measured on single-cell images of
    one batch) more than 1.4 times off their median; none when fewer than 20 were
    measured or more than 10 % are that far off (a batch of two magnifications)."""
    if len(diameters) < _SCALE_OUTLIER_MIN_IMAGES:
        return []
    values = np.array(list(diameters.values()), float)
    ratio = values / np.median(values)
    far = (ratio > _SCALE_OUTLIER_FACTOR) | (ratio < 1 / _SCALE_OUTLIER_FACTOR)
    if far.sum() > _SCALE_OUTLIER_MAX_SHARE * len(values):
        return []
    return [key for key, outlier in zip(diameters, far) if outlier]


def build_crop_set(
    source: str | os.PathLike,
    *,
    crop_diameters: float = 4.0,
    output_size: int = 96,
    workers: int = 1,
    progress: bool = True,
    val_fraction: float = 0.15,
    scale_fallback: bool = True,
    rbc_diameter_px: float | None = None,
    limit_per_class: int | None = None,
    stain_normalization: str | None = None,
    min_classes: int = 2,
    only_split: str | None = None,
) -> CropSet:
    """Segment and crop every single-cell image of a labelled folder or manifest.

    Parameters
    ----------
    source : str or path-like
        A folder with one sub-folder of images per class (optionally inside ``train/``,
        ``val/`` and ``test/`` folders), or a CSV manifest with columns ``path``,
        ``label`` and optionally ``split`` and WBCAtt attribute columns (relative paths
        are resolved against the CSV's folder). WBCAtt files ``wbcatt_train.csv`` /
        ``wbcatt_val.csv`` beside the manifest are joined by file name.
    crop_diameters : float
        Crop window side in red-cell diameters.
    output_size : int
        Crop side in pixels (a multiple of 16 for the models).
    workers : int
        Processes to crop with (1: in this process).
    progress : bool or callable
        Show a tqdm progress bar; or ``progress(done, total)`` called after each image
        instead (it may raise to stop the cropping).
    val_fraction : float
        Share of each class put in the ``val`` split when the source names no split
        (deterministic: chosen by a hash of each file's path).
    scale_fallback : bool
        Images whose red-cell size cannot be measured (too few red cells around the
        cell), or is measured more than 1.4 times off the median of the others (see
        :func:`scale_outliers`), are cropped with the median diameter measured on the
        other images instead of being skipped or cropped at a wrong scale. Right for
        single-source sets such as PBC, where every image has the same pixel size; the
        count is reported.
    rbc_diameter_px : float, optional
        Use this red-cell diameter for every image instead of measuring it.
    limit_per_class : int, optional
        Keep at most this many images per class and split (the first in path order),
        for quick experiments.
    stain_normalization : str, optional
        Recolour every image into the reference stain before cropping
        (:mod:`napari_smear.normalize`, e.g. ``"anchored-v1"``); recorded in the set.
    min_classes : int
        Fewer classes than this is an error (2 for training; 1 to score a model on
        one class's cells).
    only_split : str, optional
        Crop only the images of this split (``"val"``: what scoring a model on the
        validation split needs, a seventh of the cropping of the whole folder). The
        split is the one the whole folder gives, and the scale fallback's median is
        measured on the images cropped.

    Returns
    -------
    CropSet
        Images that failed are skipped, listed in ``failures`` and reported with a
        warning (count and the first reasons).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"training data not found: {source}")
    if output_size < 16 or crop_diameters <= 0:
        raise ValueError(f"output_size must be >= 16 and crop_diameters > 0, got {output_size}, {crop_diameters}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    attribute_table = None
    if source.is_dir():
        paths, labels, split = _entries_from_folder(source, val_fraction)
    elif source.suffix.lower() == ".csv":
        paths, labels, split, attribute_table = _read_manifest(source, val_fraction)
    else:
        raise ValueError(
            f"cannot build crops from {source}: expected a folder of class sub-folders or a .csv manifest"
        )
    class_names = sorted(set(labels))
    if len(class_names) < min_classes:  # training needs two; scoring a model on one class is fine
        raise ValueError(f"{source} has {len(class_names)} class(es) {class_names}; at least {min_classes} "
                         f"{'is' if min_classes == 1 else 'are'} needed")
    label_ids = np.array([class_names.index(label) for label in labels], np.int64)

    keep = np.arange(len(paths))
    if limit_per_class is not None:
        order = np.lexsort((np.array(paths), split, label_ids))
        kept = []
        counts: dict = {}
        for i in order:
            key = (label_ids[i], split[i])
            if counts.get(key, 0) < limit_per_class:
                counts[key] = counts.get(key, 0) + 1
                kept.append(i)
        keep = np.sort(np.array(kept, np.int64))
    if only_split is not None:
        keep = keep[np.asarray(split)[keep] == only_split]
        if not len(keep):
            raise ValueError(f"{source} has no images in split {only_split!r} "
                             f"(splits present: {sorted(set(np.asarray(split).tolist()))})")

    started = time.perf_counter()
    results, errors, fallback_count = crop_single_cell_images(
        paths, keep, crop_diameters=crop_diameters, output_size=output_size, rbc_diameter_px=rbc_diameter_px,
        stain_normalization=stain_normalization, scale_fallback=scale_fallback, workers=workers, progress=progress,
    )
    elapsed = time.perf_counter() - started

    done = np.array(sorted(results), np.int64)
    failures = [(paths[i], errors[i]) for i in sorted(errors)]
    if failures:
        shown = "; ".join(f"{Path(p).name}: {reason}" for p, reason in failures[:5])
        warnings.warn(
            f"{len(failures)} of {len(keep)} images could not be cropped and were skipped "
            f"(first: {shown})",
            stacklevel=2,
        )
    if fallback_count:
        warnings.warn(
            f"{fallback_count} image(s) had too few red cells to measure the scale, or measured it far "
            "off the others, and were cropped at the median red-cell diameter of the others",
            stacklevel=2,
        )
    if not len(done):
        raise ValueError(f"none of the {len(keep)} images of {source} could be cropped; first failures: {failures[:3]}")

    from .morphology import MORPH_FEATURES

    size = int(output_size)
    images = np.stack([results[i]["image"] for i in done]) if len(done) else np.zeros((0, size, size, 3), np.uint8)
    masks = np.stack([results[i]["masks"] for i in done]).astype(np.uint8)
    morph = np.stack([results[i]["morph"] for i in done]).astype(np.float32)
    attr_codes, attr_names, attr_values = _encode_attributes(attribute_table, len(paths))
    crop_set = CropSet(
        images=images,
        masks=masks,
        morph=morph,
        labels=label_ids[done],
        class_names=class_names,
        split=np.asarray(split)[done].astype("<U5"),
        attributes=attr_codes[done],
        attribute_names=attr_names,
        attribute_values=attr_values,
        paths=np.array([paths[i] for i in done], dtype=str),
        crop_diameters=float(crop_diameters),
        rbc_diameter_px=np.array([results[i]["rbc_diameter_px"] for i in done], np.float32),
        scale_measured=np.array([results[i].get("scale_measured", True) for i in done], bool),
        morph_names=list(MORPH_FEATURES),
        source=str(source.resolve()),
        failures=failures,
        code_version=crop_code_version(),
        stain_normalization=stain_normalization or "",
        cell_types=np.array([str(results[i].get("cell_type", "")) for i in done], dtype=str),
    )
    crop_set.build_seconds = elapsed  # type: ignore[attr-defined]  # for reports, not saved
    return crop_set


# ------------------------------------------------------------- point-annotated whole fields


def read_point_annotations(path: str | os.PathLike) -> np.ndarray:
    """Read a point annotation file: one ``x y class`` line per cell (Chula RBC-12 style).

    Returns an (N, 3) int64 array of ``x, y, class``; blank lines are skipped and a
    malformed line is a :class:`ValueError` naming the file and line.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) < 3:
            raise ValueError(f"{path}:{number}: expected 'x y class', got {line!r}")
        try:
            rows.append([int(round(float(parts[0]))), int(round(float(parts[1]))), int(parts[2])])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'x y class' numbers, got {line!r}") from None
    return np.asarray(rows, np.int64).reshape(-1, 3)


def _crop_points_one(task):
    """Worker: segment one field and crop every segmented cell holding a labelled point.

    Returns (index, result dict or None, error or None, stats dict).
    """
    index, path, points, crop_diameters, output_size, cell_types = task
    from .crops import crop_instances
    from .io import read_image
    from .morphology import crop_morphology
    from .segment import segment_smear

    stats = {"points": int(len(points)), "outside": 0, "other_type": 0, "conflict": 0}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image, _ = read_image(path)
            seg = segment_smear(image)
        h, w = seg.labels.shape
        x = np.clip(points[:, 0], 0, w - 1)
        y = np.clip(points[:, 1], 0, h - 1)
        hit = seg.labels[y, x].astype(np.int64)
        types = dict(zip(seg.table.label.to_numpy(np.int64), seg.table.cell_type))
        chosen: dict[int, int] = {}
        conflicted: set[int] = set()
        for label, cls in zip(hit.tolist(), points[:, 2].tolist()):
            if label == 0:
                stats["outside"] += 1
            elif types.get(label) not in cell_types:
                stats["other_type"] += 1
            elif label in chosen and chosen[label] != cls:
                conflicted.add(label)
            else:
                chosen[label] = cls
        # Two different classes in one segmented cell: an under-split clump; its crop
        # would carry a wrong label either way, so it is left out.
        stats["conflict"] = len(conflicted)
        keep = [label for label in chosen if label not in conflicted]
        if not keep:
            return index, None, "no labelled point fell inside a segmented cell", stats
        crops = crop_instances(
            image, seg, crop_diameters=crop_diameters, output_size=output_size, labels=keep
        )
        morph = crop_morphology(crops.images, crops.masks, crop_diameters).to_numpy(np.float32)
    except Exception as exc:  # every failure is reported with its reason, never raised
        return index, None, f"{type(exc).__name__}: {exc}", stats
    result = {
        "images": crops.images,
        "masks": crops.masks.astype(np.uint8),
        "morph": np.nan_to_num(morph, nan=0.0, posinf=0.0, neginf=0.0),
        "classes": np.array([chosen[int(label)] for label in crops.labels], np.int64),
        "rbc_diameter_px": float(seg.rbc_diameter_px),
    }
    return index, result, None, stats


def field_split_of(path: str | os.PathLike, val_fraction: float = 0.2) -> str:
    """``"val"`` or ``"train"``: the split :func:`build_point_crop_set` puts a field in.

    Decided by the md5 of the file name alone, so it does not depend on the folder, the
    file order or which other fields are present.
    """
    key = int(hashlib.md5(Path(path).name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if key < val_fraction else "train"


def build_point_crop_set(
    fields: Sequence[tuple[str | os.PathLike, np.ndarray]],
    class_names: Sequence[str],
    *,
    crop_diameters: float = 2.0,
    output_size: int = 64,
    cell_types: Sequence[str] = ("rbc",),
    val_fraction: float = 0.2,
    workers: int = 1,
    progress: bool = True,
    source: str = "",
) -> CropSet:
    """Crops of the cells of whole smear fields annotated with one labelled point per cell.

    Each field is segmented with :func:`napari_smear.segment_smear`; every segmented cell
    of ``cell_types`` that holds a labelled point is cropped at normalised scale and takes
    that point's class. Points outside any cell, inside a cell of another type, or
    sharing one cell with a point of another class are left out (counted in the
    returned set's ``failures`` summary).

    Parameters
    ----------
    fields : sequence of (image path, (N, 3) int array of x, y, class)
        See :func:`read_point_annotations`.
    class_names : sequence of str
        Name of each class id used in the points.
    crop_diameters, output_size : float, int
        Crop window side in red-cell diameters and crop side in pixels.
    val_fraction : float
        Share of the *fields* put in ``val`` (chosen by a hash of the file name, so
        cells of one field never straddle the split).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    class_names = list(class_names)
    paths = [str(p) for p, _ in fields]
    field_split = [field_split_of(p, val_fraction) for p in paths]
    tasks = [
        (i, p, np.asarray(pts, np.int64).reshape(-1, 3), float(crop_diameters), int(output_size), tuple(cell_types))
        for i, (p, pts) in enumerate(fields)
    ]
    started = time.perf_counter()
    results: dict[int, dict] = {}
    failures: list[tuple[str, str]] = []
    totals = {"points": 0, "outside": 0, "other_type": 0, "conflict": 0}
    # a field takes about a second: small chunks keep both workers busy to the end
    outputs = _run_tasks(tasks, workers, progress, "segmenting fields", worker=_crop_points_one,
                         unit="field", chunksize=4)
    for index, result, error, stats in outputs:
        for k in totals:
            totals[k] += stats.get(k, 0)
        if result is None:
            failures.append((paths[index], error))
        else:
            results[index] = result
    if not results:
        raise ValueError(f"no cell could be cropped from the {len(tasks)} fields; first failures: {failures[:3]}")
    done = sorted(results)
    n_per = [len(results[i]["classes"]) for i in done]
    from .morphology import MORPH_FEATURES

    crop_set = CropSet(
        images=np.concatenate([results[i]["images"] for i in done]),
        masks=np.concatenate([results[i]["masks"] for i in done]),
        morph=np.concatenate([results[i]["morph"] for i in done]).astype(np.float32),
        labels=np.concatenate([results[i]["classes"] for i in done]),
        class_names=class_names,
        split=np.repeat(np.array([field_split[i] for i in done], dtype="<U5"), n_per),
        attributes=np.full((sum(n_per), 0), MISSING_ATTRIBUTE, np.int8),
        attribute_names=[],
        attribute_values=[],
        paths=np.repeat(np.array([paths[i] for i in done], dtype=str), n_per),
        crop_diameters=float(crop_diameters),
        rbc_diameter_px=np.repeat(np.array([results[i]["rbc_diameter_px"] for i in done], np.float32), n_per),
        morph_names=list(MORPH_FEATURES),
        source=source or (str(Path(paths[0]).parent) if paths else ""),
        failures=failures,
        code_version=crop_code_version(),
    )
    crop_set.build_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    crop_set.point_stats = totals  # type: ignore[attr-defined]  # for reports, not saved
    return crop_set


# ----------------------------------------------------------------------------- storage


def _str_array(values) -> np.ndarray:
    values = [str(v) for v in values]
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def _encode_jpeg(images: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    chunks = []
    offsets = np.zeros(len(images) + 1, np.int64)
    for i, image in enumerate(images):
        buffer = _io.BytesIO()
        # subsampling=0 (4:4:4): chroma detail (granules) matters more than the bytes.
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality), subsampling=0)
        data = buffer.getvalue()
        chunks.append(np.frombuffer(data, np.uint8))
        offsets[i + 1] = offsets[i] + len(data)
    blob = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return blob, offsets


def _decode_jpeg(blob: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    n = len(offsets) - 1
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        with Image.open(_io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as image:
            images[i] = np.asarray(image.convert("RGB"))
    return images


def save_crop_set(
    path: str | os.PathLike,
    crop_set: CropSet,
    *,
    image_codec: str = "jpeg",
    jpeg_quality: int = 90,
) -> Path:
    """Write a crop set to one compressed ``.npz`` file (atomically, no pickle).

    Parameters
    ----------
    path : str or path-like
        Destination, conventionally ending in ``.npz``.
    crop_set : CropSet
    image_codec : {"jpeg", "raw"}
        ``"jpeg"`` (default) stores each crop as a JPEG (about 4 KB for a 96 px crop);
        ``"raw"`` stores the exact pixels (zlib-compressed, about 18 KB per crop).
    jpeg_quality : int
        JPEG quality (1-100) for ``image_codec="jpeg"``.

    Returns
    -------
    pathlib.Path
    """
    from .io import atomic_write

    if not isinstance(crop_set, CropSet):
        raise TypeError(f"crop_set must be a CropSet, got {type(crop_set).__name__}")
    if image_codec not in ("jpeg", "raw"):
        raise ValueError(f"image_codec must be 'jpeg' or 'raw', got {image_codec!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    crop_set.validate()
    n, size = len(crop_set), crop_set.output_size
    max_values = max((len(v) for v in crop_set.attribute_values), default=0)
    value_table = np.full((len(crop_set.attribute_names), max_values), "", dtype=object)
    for a, values in enumerate(crop_set.attribute_values):
        value_table[a, : len(values)] = values
    arrays = {
        "format": np.array(CROP_SET_FORMAT),
        "format_version": np.array(CROP_SET_FORMAT_VERSION),
        "image_codec": np.array(image_codec),
        "output_size": np.array(size),
        "count": np.array(n),
        "masks_packed": np.packbits(crop_set.masks.reshape(n, -1) > 0, axis=1),
        "morph": crop_set.morph.astype(np.float32),
        "morph_names": _str_array(crop_set.morph_names),
        "labels": crop_set.labels.astype(np.int64),
        "class_names": _str_array(crop_set.class_names),
        "split": crop_set.split.astype("<U5"),
        "attributes": crop_set.attributes.astype(np.int8),
        "attribute_names": _str_array(crop_set.attribute_names),
        "attribute_values": value_table.astype(str) if value_table.size else np.zeros(value_table.shape, "<U1"),
        "paths": _str_array(crop_set.paths),
        "crop_diameters": np.array(float(crop_set.crop_diameters)),
        "rbc_diameter_px": crop_set.rbc_diameter_px.astype(np.float32),
        "scale_measured": crop_set.scale_measured.astype(bool),
        **({"cell_types": _str_array(crop_set.cell_types)} if crop_set.cell_types is not None else {}),
        "source": np.array(str(crop_set.source)),
        "failed_paths": _str_array(p for p, _ in crop_set.failures),
        "failed_reasons": _str_array(r for _, r in crop_set.failures),
        "code_version": np.array(str(crop_set.code_version)),
        "stain_normalization": np.array(str(crop_set.stain_normalization or "")),  # None: none
    }
    if image_codec == "jpeg":
        arrays["images_jpeg"], arrays["images_jpeg_offsets"] = _encode_jpeg(crop_set.images, jpeg_quality)
    else:
        arrays["images"] = crop_set.images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def _is_crop_set_archive(archive) -> bool:
    return "format" in archive.files and str(archive["format"]) == CROP_SET_FORMAT


def is_crop_set_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a crop set :func:`save_crop_set` wrote (any readable version):
    what may be written over by another ``pack-crops``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _is_crop_set_archive(archive)
    except Exception:  # noqa: BLE001 - not an .npz at all (numpy raises several kinds)
        return False


def load_crop_set(path: str | os.PathLike) -> CropSet:
    """Read a crop set written by :func:`save_crop_set` (never unpickles anything).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a napari-smear crop set, or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"crop set file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        # numpy reads any file that is not a zip archive as a pickle, and refuses it
        # suggesting allow_pickle: not advice to pass on (a crop set never holds one)
        reason = "not an .npz (zip) archive" if "pickled" in str(exc) else str(exc)
        raise ValueError(f"{path} is not a readable .npz crop set: {reason}") from exc
    with archive:
        if not _is_crop_set_archive(archive):
            raise ValueError(f"{path} is an .npz file but not a napari-smear crop set (made by save_crop_set)")
        version = int(archive["format_version"])
        if version > CROP_SET_FORMAT_VERSION:
            raise ValueError(
                f"{path} has crop-set format version {version}; this napari-smear reads up to "
                f"{CROP_SET_FORMAT_VERSION}: update napari-smear"
            )
        n, size = int(archive["count"]), int(archive["output_size"])
        codec = str(archive["image_codec"])
        if codec == "jpeg":
            images = _decode_jpeg(archive["images_jpeg"], archive["images_jpeg_offsets"], size)
        else:
            images = archive["images"]
        masks = np.unpackbits(archive["masks_packed"], axis=1, count=2 * size * size).reshape(n, 2, size, size)
        value_table = archive["attribute_values"]
        names = [str(v) for v in archive["attribute_names"]]
        values = [[str(v) for v in row if str(v)] for row in value_table] if len(names) else []
        return CropSet(
            images=images,
            masks=masks.astype(np.uint8),
            morph=archive["morph"],
            labels=archive["labels"].astype(np.int64),
            class_names=[str(v) for v in archive["class_names"]],
            split=archive["split"],
            attributes=archive["attributes"].reshape(n, len(names)),
            attribute_names=names,
            attribute_values=values,
            paths=archive["paths"],
            crop_diameters=float(archive["crop_diameters"]),
            rbc_diameter_px=archive["rbc_diameter_px"],
            scale_measured=archive["scale_measured"],
            morph_names=[str(v) for v in archive["morph_names"]],
            source=str(archive["source"]),
            failures=list(zip((str(p) for p in archive["failed_paths"]), (str(r) for r in archive["failed_reasons"]))),
            # files written before versions were recorded: made by an unknown version
            code_version=str(archive["code_version"]) if "code_version" in archive.files else "unknown",
            stain_normalization=(
                _method_name(archive["stain_normalization"]) if "stain_normalization" in archive.files else ""
            ),
            # sets packed before the cell types were recorded: unknown
            cell_types=np.array([str(v) for v in archive["cell_types"]], dtype=str)
            if "cell_types" in archive.files else None,
        )


def load_data(
    data,
    *,
    crop_diameters: float = 4.0,
    output_size: int = 96,
    workers: int = 1,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
    stain_normalization: str | None = None,
    min_classes: int = 2,
    only_split: str | None = None,
) -> CropSet:
    """A CropSet from a CropSet, a ``.npz`` crop-set file, a class folder or a CSV manifest.

    With ``cache``, a folder/CSV source is cropped once and stored there; a later call
    with the same cache reads it instead (an existing cache built from another source
    is an error, so a stale cache is never used silently). ``min_classes`` and
    ``only_split``: see :func:`build_crop_set` (``only_split`` applies to a folder or CSV
    cropped without a cache; other sources come whole).
    """
    if isinstance(data, CropSet):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a CropSet or a path (.npz, folder, .csv), got {type(data).__name__}")
    path = Path(data)
    if path.suffix.lower() == ".npz":
        crop_set = load_crop_set(path)
        check_code_version(crop_set, f"the crops in {path}")
        return crop_set
    if cache is not None and Path(cache).is_file():
        cached = load_crop_set(cache)
        if path.exists() and Path(cached.source) != path.resolve():
            raise ValueError(
                f"the cache {cache} was built from {cached.source}, not {path.resolve()}; "
                "delete it or pass another --cache"
            )
        if cached.output_size != output_size or not math.isclose(cached.crop_diameters, crop_diameters):
            raise ValueError(
                f"the cache {cache} holds {cached.output_size} px crops at {cached.crop_diameters:g} diameters, "
                f"not {output_size} px at {crop_diameters:g}; delete it or pass another --cache"
            )
        if (cached.stain_normalization or None) != (stain_normalization or None):
            raise ValueError(
                f"the cache {cache} holds crops with stain normalisation "
                f"{cached.stain_normalization or 'none'!r}, not {stain_normalization or 'none'!r}; "
                "delete it or pass another --cache"
            )
        check_code_version(cached, f"the cached crops in {cache}")
        _check_cache_is_current(cached, path, cache)
        return cached
    crop_set = build_crop_set(
        path, crop_diameters=crop_diameters, output_size=output_size, workers=workers, progress=progress,
        stain_normalization=stain_normalization, min_classes=min_classes,
        only_split=None if cache is not None else only_split,  # a cache holds every split
    )
    if cache is not None:
        save_crop_set(cache, crop_set)
    return crop_set


def _check_cache_is_current(cached: CropSet, source: Path, cache) -> None:
    """A cache whose source folder or manifest has gained, lost or relabelled images since
    it was built is an error (it would train on the old data without a word)."""
    if not source.exists():
        return  # the cache stands alone (the source moved or was deleted)
    if source.is_dir():
        paths, labels, _ = _entries_from_folder(source, 0.2)
    else:
        paths, labels, *_ = _read_manifest(source, 0.2)
    now = {str(p): str(label) for p, label in zip(paths, labels)}
    before = {str(p): cached.class_names[int(i)] for p, i in zip(cached.paths, cached.labels)}
    failed = {str(p) for p, _ in cached.failures}
    added = sorted(set(now) - set(before) - failed)
    removed = sorted((set(before) | failed) - set(now))
    relabelled = sorted(p for p in set(now) & set(before) if now[p] != before[p])
    if added or removed or relabelled:
        what = "; ".join(f"{len(v)} {k} (first: {Path(v[0]).name})" for k, v in
                         (("added", added), ("removed", removed), ("with another class", relabelled)) if v)
        raise ValueError(
            f"the cache {cache} is out of date: {source} has images {what} since it was built; "
            "delete it (it is rebuilt) or pass another --cache"
        )


def _method_name(stored) -> str:
    """The stain-normalisation method a crop set file records ("" for none; files written
    before this was checked may hold the text "None")."""
    name = str(stored)
    return "" if name in ("None", "none") else name
