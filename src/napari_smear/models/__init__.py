"""Plain-PyTorch cell classifiers with attention, and their model files.

Models take (B, 5, S, S) crops (normalised RGB, cell mask, nucleus mask; S divisible
by 16) and optional (B, M) morphology features, and return a dict with ``logits``
(B, C), ``attention`` (B, S, S) in [0, 1] and, for supervisable maps,
``attention_logits`` (B, S, S); DAFFNet also returns ``attr_logits``. An ``ensemble``
file holds several trained models and answers with the mean of their outputs.
"""

from .base import SmearClassifier, fuse_for_inference
from .ensemble import EnsembleClassifier, combine_models
from .files import FORMAT_VERSION, ModelFileError, ModelInfo, load_model, read_metadata, save_model
from .losses import attention_mass_inside, attention_supervision_loss, attribute_loss
from .registry import BUILTIN_MODELS, MODEL_KINDS, TRAINABLE_KINDS, available_models, build_model

__all__ = [
    "BUILTIN_MODELS",
    "EnsembleClassifier",
    "FORMAT_VERSION",
    "MODEL_KINDS",
    "ModelFileError",
    "ModelInfo",
    "SmearClassifier",
    "TRAINABLE_KINDS",
    "attention_mass_inside",
    "attention_supervision_loss",
    "attribute_loss",
    "available_models",
    "build_model",
    "combine_models",
    "fuse_for_inference",
    "load_model",
    "read_metadata",
    "save_model",
]
