"""A fusion of trained classifiers: one model file that answers with the mean of its members.

Members are complete classifiers of any kind (``{"kind": ..., "config": ...}`` each)
over the same classes and inputs, trained separately (different runs or recipes). The
ensemble's logits are the mean of the members' logits (a geometric mean of their class
probabilities) and its attention map the mean of their maps, so every downstream step
(prior correction, turned views, attention layers) treats it like one network. Members
that make different mistakes cancel some of them out: the usual gain of an ensemble.

An ensemble is built from trained members (:func:`combine_models`) and is not trained
as a whole: it has no ``attention_logits`` for supervision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SmearClassifier


class EnsembleClassifier(SmearClassifier):
    """Mean of the logits, attention maps (and attribute logits) of trained members.

    Config
    ------
    members : list of {"kind": str, "config": dict}
        The members' architectures, in order (weights ``members.<i>.<name>``); at least 2.
    morph_features : int
        Morphology features the members read (all members must agree; 0 for none).
    """

    kind = "ensemble"
    default_config: dict[str, Any] = {"members": [], "morph_features": 0}
    has_attention_logits = False

    def __init__(self, num_classes: int, **config: Any):
        super().__init__(num_classes, **config)
        from .registry import build_model  # the registry imports this module

        specs = self.config["members"]
        if not isinstance(specs, list) or len(specs) < 2:
            raise ValueError(f"an ensemble needs a list of at least 2 members, got {specs!r}")
        members = []
        for index, spec in enumerate(specs):
            if not isinstance(spec, dict) or set(spec) != {"kind", "config"} or not isinstance(spec["config"], dict):
                raise ValueError(f"ensemble member {index} must be {{'kind': str, 'config': dict}}, got {spec!r}")
            if spec["kind"] == self.kind:
                raise ValueError(f"ensemble member {index} is itself an ensemble: list its members instead")
            members.append(build_model(spec["kind"], num_classes, **spec["config"]))
        morph = {int(member.config.get("morph_features", 0) or 0) for member in members}
        if len(morph) != 1 or morph != {int(self.config["morph_features"] or 0)}:
            raise ValueError(
                f"ensemble members read {sorted(morph)} morphology features but the ensemble says "
                f"morph_features={self.config['morph_features']}: members must agree"
            )
        # the members' own (default-filled) configs, so the file rebuilds them exactly
        self.config["members"] = [{"kind": m.kind, "config": m.config} for m in members]
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, morph: torch.Tensor | None = None) -> dict[str, Any]:
        self.check_input(x)
        outputs = [member(x, morph) for member in self.members]
        result: dict[str, Any] = {
            "logits": torch.stack([out["logits"] for out in outputs]).mean(0),
            "attention": torch.stack([out["attention"] for out in outputs]).mean(0),
        }
        attributes = [out.get("attr_logits") for out in outputs]
        if all(attributes) and len({tuple(t.shape for t in a) for a in attributes}) == 1:
            result["attr_logits"] = [torch.stack(values).mean(0) for values in zip(*attributes)]
        return result


def combine_models(models: list[nn.Module]) -> EnsembleClassifier:
    """An ensemble holding (copies of) the weights of trained ``models``.

    Parameters
    ----------
    models : list of SmearClassifier
        At least two models built by ``build_model`` with the same number of classes
        (loaded from files with :func:`napari_smear.models.load_model`, say). Their
        class order, input size and normalisation must agree too: that is checked on
        their files by ``scripts/train_default_models.py --ensemble``.

    Returns
    -------
    EnsembleClassifier
        In eval mode, on the CPU.
    """
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
    classes = {getattr(model, "num_classes", None) for model in models}
    if len(classes) != 1:
        raise ValueError(f"ensemble members must have the same number of classes, got {sorted(map(str, classes))}")
    for index, model in enumerate(models):
        if getattr(model, "is_fused_for_inference", False):
            raise ValueError(f"model {index} was fused for inference: combine the original models")
    morph = int(models[0].config.get("morph_features", 0) or 0)
    ensemble = EnsembleClassifier(
        models[0].num_classes,
        members=[{"kind": model.kind, "config": model.config} for model in models],
        morph_features=morph,
    )
    for member, model in zip(ensemble.members, models):
        member.load_state_dict({name: value.detach().cpu() for name, value in model.state_dict().items()})
    return ensemble.eval()
