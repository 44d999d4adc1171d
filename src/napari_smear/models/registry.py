"""Model kinds (architectures) and built-in model names (shipped weight files)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .base import SmearClassifier
from .daffnet import DAFFNetClassifier
from .ensemble import EnsembleClassifier
from .gated_attention import GatedAttentionClassifier
from .global_attention import GlobalAttentionClassifier
from .plain import PlainClassifier
from .shape_aware import ShapeAwareClassifier

MODEL_CLASSES: dict[str, type[SmearClassifier]] = {
    cls.kind: cls
    for cls in (
        PlainClassifier,
        ShapeAwareClassifier,
        GatedAttentionClassifier,
        DAFFNetClassifier,
        GlobalAttentionClassifier,
        EnsembleClassifier,
    )
}
#: Names accepted by :func:`build_model`.
MODEL_KINDS: tuple[str, ...] = tuple(MODEL_CLASSES)
#: Kinds that can be trained from scratch (an ensemble is made of trained members).
TRAINABLE_KINDS: tuple[str, ...] = tuple(kind for kind in MODEL_KINDS if kind != EnsembleClassifier.kind)

#: Built-in model names and what they classify. Their files live in
#: ``napari_smear/models/weights/<name>.safetensors`` when installed.
BUILTIN_MODELS: dict[str, str] = {
    "wbc-pbc8": "peripheral blood cell types, 8 classes, trained on PBC (Acevedo et al. 2020)",
    "rbc-chula12": "red blood cell morphology, Chula RBC-12 classes",
}


def build_model(kind: str, num_classes: int, **config: Any) -> SmearClassifier:
    """Build an untrained classifier.

    Parameters
    ----------
    kind : str
        One of :data:`MODEL_KINDS`: "plain", "shape_aware", "gated_attention",
        "daffnet", "global_attention", or "ensemble" (trained members fused; build one
        with :func:`napari_smear.models.combine_models`).
    num_classes : int
        Number of output classes (>= 2).
    **config
        Architecture options of that kind (see each class's ``default_config``);
        missing options take their defaults.

    Returns
    -------
    SmearClassifier
        The model; ``model.config`` holds the full config needed to rebuild it.

    Raises
    ------
    ValueError
        Unknown kind or invalid option values.
    TypeError
        Unknown option names.
    """
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {list(MODEL_KINDS)}")
    return MODEL_CLASSES[kind](num_classes, **config)


def weights_dir() -> Path:
    """The folder of the built-in weight files, ``napari_smear/models/weights``."""
    # The package is installed as files (not zipped), so the traversable is a real path.
    return Path(str(resources.files("napari_smear.models").joinpath("weights")))


def builtin_model_path(name: str) -> Path:
    """Where the file of built-in model ``name`` is (or would be) installed.

    Raises
    ------
    ValueError
        ``name`` is not a built-in model name.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"{name!r} is not a built-in model; built-in models: {sorted(BUILTIN_MODELS)}")
    return weights_dir() / f"{name}.safetensors"


def available_models() -> list[str]:
    """Names of the built-in models whose weight file is installed, sorted."""
    return sorted(name for name in BUILTIN_MODELS if builtin_model_path(name).is_file())
