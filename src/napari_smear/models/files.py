"""Model files: one ``.safetensors`` file holding the weights and the JSON metadata.

The metadata is a JSON string stored under the key ``"napari_smear"`` of the
safetensors header's ``__metadata__`` map, so a model is a single file that can be
inspected without loading weights. Loading never unpickles anything: only the
safetensors format is read (``torch.load`` is never used).

Metadata fields (format version 1):

``format_version`` (int), ``kind`` (model kind), ``config`` (architecture options),
``class_names`` (list of str, in logit order), ``input_size`` (crop side S in pixels),
``crop_diameters`` (crop window side in red-cell diameters: the scale convention),
``mean`` / ``std`` (3 floats each, RGB normalisation applied to 0-1 pixel values),
``channels`` (description of the 5 input channels), ``training_data`` (free-form
description), ``metrics`` (validation metrics), ``package_version``, ``created``
(ISO 8601 UTC); extra JSON-serialisable keys given by the caller are kept.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import CHANNELS_DESCRIPTION, SIZE_MULTIPLE
from .registry import BUILTIN_MODELS, MODEL_KINDS, available_models, build_model, builtin_model_path

#: Version of the metadata layout written by :func:`save_model`.
FORMAT_VERSION = 1
#: Key of our JSON document in the safetensors ``__metadata__`` map.
METADATA_KEY = "napari_smear"
#: A safetensors header larger than this is not plausible for our models.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelFileError(ValueError):
    """A model file is missing, malformed, or does not match its architecture."""


@dataclass
class ModelInfo:
    """What a model file says about its model.

    Attributes
    ----------
    kind : str
        Model kind (architecture), one of ``MODEL_KINDS``.
    config : dict
        Architecture options, enough to rebuild the model with ``build_model``.
    class_names : list of str
        Class of each logit, in order.
    input_size : int
        Side S of the crops the model expects.
    crop_diameters : float
        Side of the crop window in red-cell diameters (the scale convention of
        ``crop_instances``).
    mean, std : tuple of 3 floats
        Per-channel RGB normalisation applied to pixel values scaled to [0, 1].
    metrics : dict
        Validation metrics recorded at training time.
    metadata : dict
        The full metadata document as stored.
    path : pathlib.Path or None
        The file the model was loaded from.
    """

    kind: str
    config: dict[str, Any]
    class_names: list[str]
    input_size: int
    crop_diameters: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _package_version() -> str:
    from napari_smear import __version__

    return __version__


def _check_triplet(values: Any, name: str, positive: bool) -> list[float]:
    try:
        result = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {values!r}") from exc
    if len(result) != 3 or not all(math.isfinite(v) for v in result):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    if positive and min(result) <= 0:
        raise ValueError(f"{name} must be positive, got {values!r}")
    return result


def _validate_metadata(metadata: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
    """Check the fields every model file needs; return them normalised."""
    class_names = metadata.get("class_names")
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be a list of str, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be unique, got {list(class_names)}")
    if num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names given for a model with {num_classes} outputs")
    input_size = metadata.get("input_size")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % SIZE_MULTIPLE:
        raise ValueError(f"input_size must be a positive multiple of {SIZE_MULTIPLE}, got {input_size!r}")
    crop_diameters = metadata.get("crop_diameters")
    if isinstance(crop_diameters, bool) or not isinstance(crop_diameters, (int, float)) or not crop_diameters > 0:
        raise ValueError(f"crop_diameters must be a positive number, got {crop_diameters!r}")
    cell_types = metadata.get("cell_types")
    if cell_types is not None:
        from ..segment.types import check_cell_types

        if not isinstance(cell_types, (list, tuple)) or not cell_types:
            raise ValueError(f"cell_types must be a non-empty list of segmented cell types, got {cell_types!r}")
        check_cell_types(list(cell_types))  # a ValueError naming the unknown type and the known ones
    _check_inference_settings(metadata)
    return {
        **metadata,
        "class_names": list(class_names),
        "input_size": int(input_size),
        "crop_diameters": float(crop_diameters),
        "mean": _check_triplet(metadata.get("mean"), "mean", positive=False),
        "std": _check_triplet(metadata.get("std"), "std", positive=True),
    }


def _check_inference_settings(metadata: dict[str, Any]) -> None:
    """The settings a file gives its own inference (``test_time_views``,
    ``prior_correction``): wrong ones would otherwise fail, or be skipped, at the first
    classification, far from the file that holds them."""
    from ..predict import check_test_time_views, prior_correction_strength

    views = metadata.get("test_time_views")
    if views is not None:
        check_test_time_views(None, views)  # the check classify_crops makes, here at load time
    prior = metadata.get("prior_correction")
    if prior is None:
        return
    if not isinstance(prior, dict) or prior.get("strength") is None:
        raise ValueError("prior_correction must be {\"strength\": a number >= 0, ...} (what "
                         f"select_prior_correction records), got {prior!r}")
    try:
        prior_correction_strength(None, prior["strength"])  # the check classify_crops makes
    except TypeError as exc:  # read_metadata turns a ValueError into a ModelFileError naming the file
        raise ValueError(str(exc)) from None


def save_model(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model`` and its metadata to one ``.safetensors`` file (atomically).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; ``.safetensors`` is the expected suffix.
    model : SmearClassifier
        A model built by ``build_model`` (it has ``kind``, ``num_classes`` and ``config``).
    metadata : dict
        Must hold ``class_names`` (one per output), ``mean`` and ``std`` (3 floats each);
        may hold ``input_size`` (default: the model's ``input_size`` config or 96),
        ``crop_diameters`` (default 4.0), ``training_data``, ``metrics`` and any other
        JSON-serialisable keys. ``format_version``, ``kind``, ``config``, ``channels``,
        ``package_version`` and ``created`` are filled in.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    kind = getattr(model, "kind", None)
    if kind not in MODEL_KINDS or not isinstance(getattr(model, "config", None), dict):
        raise TypeError(f"model must be built by build_model (one of {list(MODEL_KINDS)}), got {type(model).__name__}")
    if getattr(model, "is_fused_for_inference", False):
        raise ValueError("this model was fused for inference (fuse_for_inference): save the original model instead")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    document = {
        "input_size": int(model.config.get("input_size", 96)),
        "crop_diameters": 4.0,
        "channels": CHANNELS_DESCRIPTION,
        "training_data": "",
        "metrics": {},
        **metadata,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": model.config,
        "package_version": _package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    document = _validate_metadata(document, model.num_classes)
    try:
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable (finite numbers, str, lists, dicts): {exc}") from exc

    # safetensors refuses shared or non-contiguous storage: give it plain CPU copies.
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written through open() with the usual permissions (the umask's), so a model shared
    # in a group folder is readable by colleagues: safetensors' save_file creates its
    # file owner-only (0600). A model file is a few MB, so the bytes are held once.
    from safetensors.torch import save as safetensors_bytes

    from ..io import atomic_write

    with atomic_write(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata={METADATA_KEY: text}))
    return path


def _describe_foreign_file(start: bytes) -> str | None:
    """Name a few common non-safetensors formats from their first bytes."""
    if start.startswith(b"PK\x03\x04"):
        return "a zip archive (this is what torch.save writes: a pickled PyTorch checkpoint)"
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (e.g. an old-style torch.save checkpoint)"
    if start.startswith(b"\x89PNG"):
        return "a PNG image"
    if start.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if start.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image"
    if start.startswith(b"\x89HDF"):
        return "an HDF5 file (e.g. a Keras model)"
    return None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the metadata of a model file without loading its weights.

    Raises
    ------
    ModelFileError
        The file is missing, is not a complete safetensors file, carries no napari-smear
        metadata, or has an unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    size = path.stat().st_size
    not_model = f"{path} is not a napari-smear model file (a .safetensors file)"
    with path.open("rb") as stream:
        start = stream.read(8)
        foreign = _describe_foreign_file(start + stream.read(8))
        if foreign:
            raise ModelFileError(f"{not_model}: it looks like {foreign}; model files are never unpickled")
        if len(start) < 8:
            raise ModelFileError(f"{not_model}: it is only {size} bytes long")
        header_length = int.from_bytes(start, "little")
        if header_length < 2 or header_length > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelFileError(
                f"{not_model}: it does not start like one (its first 8 bytes give a {header_length:,}-byte "
                f"header, the file has {size:,} bytes): another kind of file, or a truncated copy"
            )
        stream.seek(8)
        header_bytes = stream.read(header_length)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{not_model}: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{not_model}: its header is not a JSON object")

    data_length = size - 8 - header_length
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(f"{not_model}: tensor entry {name!r} of its header is malformed")
        needed = max(needed, offsets[1])
    if needed > data_length:
        raise ModelFileError(
            f"{path} is truncated: its header needs {needed} bytes of tensor data but only {data_length} follow"
        )

    stored = header.get("__metadata__") or {}
    if not isinstance(stored, dict) or METADATA_KEY not in stored:
        raise ModelFileError(
            f"{path} is a safetensors file without napari-smear metadata (no {METADATA_KEY!r} key in its "
            "header): it holds weights only, not a napari-smear model (save models with save_model)"
        )
    try:
        metadata = json.loads(stored[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: its napari-smear metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: its napari-smear metadata is not a JSON object")

    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{path}: its metadata has no valid format_version (got {version!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format version {version}, written by a newer napari-smear; this version "
            f"({_package_version()}) reads format versions up to {FORMAT_VERSION}: upgrade napari-smear"
        )
    if version < 1:
        raise ModelFileError(f"{path}: unsupported model-file format version {version}")
    kind = metadata.get("kind")
    if kind not in MODEL_KINDS:
        raise ModelFileError(f"{path}: unknown model kind {kind!r}; this version knows {list(MODEL_KINDS)}")
    if not isinstance(metadata.get("config"), dict):
        raise ModelFileError(f"{path}: its metadata has no model config")
    try:
        return _validate_metadata(metadata, None)
    except ValueError as exc:
        raise ModelFileError(f"{path}: invalid metadata: {exc}") from exc


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """The file of a built-in model name, or the given path.

    Raises
    ------
    ModelFileError
        A built-in name whose file is not installed, or neither a name nor an existing file.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a model is a built-in name ({sorted(BUILTIN_MODELS)}) or the path of a .safetensors "
                        f"file, got {type(name_or_path).__name__} {name_or_path!r}")
    text = os.fspath(name_or_path)
    if not str(text).strip():
        raise ModelFileError(f"no model named (an empty name); built-in model names: {sorted(BUILTIN_MODELS)}")
    if isinstance(name_or_path, str) and text in BUILTIN_MODELS:
        path = builtin_model_path(text)
        if not path.is_file():
            installed = available_models()
            raise ModelFileError(
                f"built-in model {text!r} is not installed (expected {path}); installed built-in models: "
                f"{installed or 'none'}. Train a model and pass the path of its file instead."
            )
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        raise ModelFileError(f"{path} is a folder, not a model file: give a .safetensors file"
                             + (f" in it ({', '.join(inside)})" if inside else ""))
    if not path.is_file():
        if path.name.lower().endswith(".safetensors") and path.name[: -len(".safetensors")] in BUILTIN_MODELS \
                and os.sep not in text:
            hint = f"; the built-in model is named without the ending: {path.name[: -len('.safetensors')]!r}"
        elif path.suffix or os.sep in text:
            hint = ""
        else:
            hint = f"; built-in model names: {sorted(BUILTIN_MODELS)}"
        raise ModelFileError(f"model file not found: {path}{hint}")
    return path


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model file (or a built-in model by name) for inference.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A built-in model name (see ``available_models()``) or a ``.safetensors`` path.
    device : str or torch.device
        Where to put the model: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or
        ``"auto"`` (see :func:`napari_smear.predict.select_device`; a device this
        machine lacks is a ValueError).

    Returns
    -------
    model : SmearClassifier
        The model in eval mode on ``device``.
    info : ModelInfo
        Class names, preprocessing (input size, scale, normalisation) and metrics.

    Raises
    ------
    ModelFileError
        Missing or malformed file, missing metadata, unsupported format version,
        unknown model kind, or weights that do not match the architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_model_path(name_or_path)
    metadata = read_metadata(path)
    kind, config, class_names = metadata["kind"], metadata["config"], metadata["class_names"]
    try:
        model = build_model(kind, len(class_names), **config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot build a {kind!r} model from its config: {exc}") from exc
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from exc

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name}: file {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state))
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:

        def listing(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing weights: {listing(missing)}")
        if unexpected:
            problems.append(f"unexpected weights: {listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {listing(mismatched)}")
        raise ModelFileError(
            f"{path}: the weights do not match the {kind!r} architecture of its metadata; " + "; ".join(problems)
        )
    not_finite = [name for name, tensor in state.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not_finite:
        raise ModelFileError(
            f"{path}: {len(not_finite)} weight tensor(s) hold NaN or infinite values ({', '.join(not_finite[:3])}"
            f"{', ...' if len(not_finite) > 3 else ''}): the model would answer nonsense (a training run that "
            "diverged?); use an earlier checkpoint or train again"
        )
    model.load_state_dict(state, strict=True)
    from ..predict import select_device  # a clear error for a device this machine lacks

    model.eval().to(select_device(device))
    info = ModelInfo(
        kind=kind,
        config=dict(config),
        class_names=list(class_names),
        input_size=metadata["input_size"],
        crop_diameters=metadata["crop_diameters"],
        mean=tuple(metadata["mean"]),
        std=tuple(metadata["std"]),
        metrics=dict(metadata.get("metrics") or {}),
        metadata=metadata,
        path=path,
    )
    return model, info
