"""Classifier architectures, attention outputs and losses (tiny widths, S=64/96: fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_smear.models import (
    MODEL_KINDS,
    attention_mass_inside,
    attention_supervision_loss,
    attribute_loss,
    build_model,
    fuse_for_inference,
)
from napari_smear.models.daffnet import NUM_MASK_STATISTICS, WBCATT_ATTRIBUTES, mask_statistics
from napari_smear.models.gated_attention import patch_geometry, patch_membership, spread_patch_values

torch.set_num_threads(1)

NUM_CLASSES = 4
TINY = {
    "plain": {"widths": [8, 8, 16, 16]},
    "shape_aware": {"widths": [8, 8, 16, 16], "shape_widths": [4, 4, 8, 8], "fusion_hidden": 16},
    "gated_attention": {
        "widths": [8, 8, 16, 16],
        "patch_widths": [8, 8, 16, 16],
        "attention_hidden": 8,
        "fusion_hidden": 16,
    },
    "daffnet": {"widths": [8, 8, 16, 16], "morph_hidden": 8, "fusion_hidden": 16},
    "global_attention": {"widths": [8, 8, 16, 16]},
}
# two trained members of different kinds (neither has attribute heads, so every weight
# gets a gradient in the generic tests); attribute averaging is tested on its own
TINY["ensemble"] = {
    "members": [
        {"kind": "gated_attention", "config": TINY["gated_attention"]},
        {"kind": "shape_aware", "config": TINY["shape_aware"]},
    ]
}
SIGMOID_MAP_KINDS = ["shape_aware", "daffnet", "global_attention"]


def tiny_model(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(kind, NUM_CLASSES, **{**TINY[kind], **overrides})


def make_batch(size: int = 64, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Random RGB plus a disc cell mask and a smaller off-centre disc nucleus."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, size, size, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size / 2
    for index in range(batch):
        radius = size * (0.2 + 0.05 * index)
        cell = ((yy - centre) ** 2 + (xx - centre) ** 2) < radius**2
        nucleus = ((yy - centre - 3) ** 2 + (xx - centre + 2) ** 2) < (radius / 2) ** 2
        x[index, 3] = cell.float()
        x[index, 4] = (nucleus & cell).float()
    return x


def total_loss(outputs: dict) -> torch.Tensor:
    loss = outputs["logits"].square().mean()
    if "attention_logits" in outputs:
        loss = loss + outputs["attention_logits"].square().mean()
    for logits in outputs.get("attr_logits", []):
        loss = loss + logits.square().mean()
    return loss


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_forward_backward_shapes(kind, size):
    model = tiny_model(kind)
    x = make_batch(size, batch=3)
    outputs = model(x)
    assert outputs["logits"].shape == (3, NUM_CLASSES)
    attention = outputs["attention"]
    assert attention.shape == (3, size, size)
    assert attention.dtype == torch.float32
    assert torch.isfinite(attention).all()
    assert float(attention.detach().min()) >= 0.0 and float(attention.detach().max()) <= 1.0
    if model.has_attention_logits:
        assert outputs["attention_logits"].shape == (3, size, size)
    else:
        assert "attention_logits" not in outputs
    if kind == "daffnet":
        sizes = [n for _, n in model.config["attributes"]]
        assert [tuple(t.shape) for t in outputs["attr_logits"]] == [(3, n) for n in sizes]

    total_loss(outputs).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_grad == []


@pytest.mark.parametrize("kind", SIGMOID_MAP_KINDS)
def test_attention_is_sigmoid_of_its_logits(kind):
    outputs = tiny_model(kind)(make_batch(64, batch=2))
    torch.testing.assert_close(outputs["attention"], torch.sigmoid(outputs["attention_logits"]))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_channels_last_input_gives_same_outputs(kind):
    model = tiny_model(kind).eval()
    x = make_batch(64, batch=2)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        result = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["attention"], reference["attention"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_bf16_autocast_on_cpu(kind):
    model = tiny_model(kind).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(make_batch(64, batch=2))
    assert torch.isfinite(outputs["logits"].float()).all()
    assert outputs["attention"].dtype == torch.float32
    assert float(outputs["attention"].min()) >= 0 and float(outputs["attention"].max()) <= 1


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_config_rebuilds_identical_architecture_from_json(kind):
    model = tiny_model(kind)
    config = json.loads(json.dumps(model.config))
    rebuilt = build_model(kind, NUM_CLASSES, **config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fuse_for_inference_keeps_outputs(kind):
    model = tiny_model(kind)
    # A training pass gives BatchNorm non-trivial running statistics to fold.
    model.train()
    with torch.no_grad():
        model(make_batch(64, batch=4, seed=1) * 2 + 0.5)
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = make_batch(64, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["logits"], model(x)["logits"], rtol=1e-4, atol=1e-4)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("resnet", 3)
    with pytest.raises(TypeError, match="unknown config key"):
        build_model("plain", 3, width=[8, 8, 16, 16])
    with pytest.raises(ValueError, match="num_classes"):
        build_model("plain", 1)
    with pytest.raises(ValueError, match="widths"):
        build_model("plain", 3, widths=[8, 16])
    with pytest.raises(ValueError, match="attention_stage"):
        build_model("global_attention", 3, attention_stage=5)


def test_forward_rejects_bad_inputs():
    model = tiny_model("plain")
    with pytest.raises(ValueError, match=r"\(B, 5, S, S\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.zeros(2, 5, 72, 72))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(2, 5, 64, 64, dtype=torch.uint8))


def test_plain_cam_is_minmax_normalised():
    model = tiny_model("plain").eval()
    with torch.no_grad():
        attention = model(make_batch(64, batch=3))["attention"]
    peaks = attention.flatten(1).max(dim=1).values
    torch.testing.assert_close(peaks, torch.ones(3), atol=0.05, rtol=0)


# ----------------------------------------------------------------- shape aware
def test_shape_aware_gates_receive_gradients():
    model = tiny_model("shape_aware")
    outputs = model(make_batch(64))
    (outputs["logits"].square().mean()).backward()
    assert model.spatial_gate.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.channel_gate.parameters())


def test_shape_aware_attention_follows_the_masks_not_the_colours():
    model = tiny_model("shape_aware").eval()
    x = make_batch(64, batch=2)
    y = x.clone()
    y[:, :3] = torch.randn_like(y[:, :3])
    with torch.no_grad():
        torch.testing.assert_close(model(x)["attention"], model(y)["attention"])


# ------------------------------------------------------------- gated attention
@pytest.mark.parametrize("size", [64, 96])
def test_gated_patch_weights_sum_to_one(size):
    model = tiny_model("gated_attention")
    outputs = model(make_batch(size, batch=3))
    weights = outputs["patch_weights"]
    assert weights.shape == (3, 9)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert float(outputs["attention"].detach().flatten(1).max(dim=1).values.min()) == pytest.approx(1.0)


def test_gated_patches_match_naive_slicing_in_both_memory_formats():
    model = tiny_model("gated_attention")
    x = make_batch(64, batch=2)
    patch, stride = patch_geometry(64, 3)
    assert (patch, stride) == (32, 16)
    naive = torch.stack(
        [
            x[b, :, i * stride : i * stride + patch, j * stride : j * stride + patch]
            for b in range(2)
            for i in range(3)
            for j in range(3)
        ]
    )
    torch.testing.assert_close(model.extract_patches(x), naive, rtol=0, atol=0)
    channels_last = model.extract_patches(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, naive, rtol=0, atol=0)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


def test_spread_patch_values_averages_overlapping_patches():
    values = torch.arange(9.0)[None] * torch.tensor([[1.0], [-2.0]])  # (2, 9)
    spread = spread_patch_values(values, patch_membership(64, 3), 64)  # patches 32, stride 16
    assert spread.shape == (2, 64, 64)
    assert spread[0, 0, 0].item() == 0.0  # only patch 0
    assert spread[0, 0, 63].item() == 2.0  # only patch 2
    assert spread[0, 20, 20].item() == pytest.approx((0 + 1 + 3 + 4) / 4)  # patches 0, 1, 3, 4
    assert spread[1, 40, 20].item() == pytest.approx(-2 * (3 + 4 + 6 + 7) / 4)


def test_gated_attention_masks_out_patches_without_cell():
    model = tiny_model("gated_attention")
    x = make_batch(64, batch=2)
    x[:, 3:] = 0
    x[0, 3, 2:10, 2:10] = 1  # only the top-left patch (rows/cols 0-31) contains the cell
    outputs = model(x)
    weights = outputs["patch_weights"]
    torch.testing.assert_close(weights[0], torch.eye(9)[0])
    # Image 1 has no mask at all: every patch takes part.
    assert bool((weights[1] > 0).all())
    unmasked = tiny_model("gated_attention", mask_empty_patches=False)(x)["patch_weights"]
    assert bool((unmasked[0] > 0).all())


def test_gated_attention_gates_receive_gradients():
    model = tiny_model("gated_attention")
    model(make_batch(64))["logits"].square().mean().backward()
    for layer in (model.attention_v, model.attention_u, model.attention_w):
        assert layer.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------- DAFFNet
def test_daffnet_morph_features_are_required_and_checked():
    model = tiny_model("daffnet", morph_features=5)
    x = make_batch(64, batch=2)
    outputs = model(x, morph=torch.randn(2, 5))
    assert outputs["logits"].shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="morph"):
        model(x)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        model(x, morph=torch.randn(2, 4))


def test_daffnet_without_attribute_head():
    outputs = tiny_model("daffnet", attributes=[])(make_batch(64, batch=2))
    assert outputs["attr_logits"] == []


def test_daffnet_default_attributes_are_wbcatt():
    model = build_model("daffnet", 5)
    assert [name for name, _ in model.config["attributes"]] == list(WBCATT_ATTRIBUTES)
    assert len(WBCATT_ATTRIBUTES) == 11


def test_daffnet_attention_modules_receive_gradients():
    model = tiny_model("daffnet")
    model(make_batch(64))["logits"].square().mean().backward()
    assert model.spatial_attention.conv.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.channel_attention.parameters())


def test_mask_statistics_values():
    x = torch.zeros(1, 5, 64, 64)
    x[0, 3, 16:48, 16:48] = 1  # 32x32 cell
    x[0, 4, 24:40, 24:40] = 1  # 16x16 nucleus
    x[0, 0] = 2.0  # red channel constant
    stats = mask_statistics(x)
    assert stats.shape == (1, NUM_MASK_STATISTICS)
    assert stats[0, 0].item() == pytest.approx(0.25)  # cell area fraction
    assert stats[0, 1].item() == pytest.approx(1 / 16)  # nucleus area fraction
    assert stats[0, 2].item() == pytest.approx(0.25)  # nucleus / cell
    assert stats[0, 3].item() == pytest.approx(2.0, rel=1e-4)  # cytoplasm mean red
    assert stats[0, 9].item() == pytest.approx(0.0, abs=1e-4)  # cytoplasm red std
    assert stats[0, 12].item() == pytest.approx(0.0, abs=1e-4)  # square: not elongated
    assert stats[0, 14].item() == pytest.approx(0.0, abs=1e-5)  # nucleus centred in cell


# ------------------------------------------------------------ global attention
def test_global_map_is_shared_and_learnable():
    model = tiny_model("global_attention")
    outputs = model(make_batch(64, batch=3))
    attention = outputs["attention"]
    assert torch.equal(attention[0], attention[1]) and torch.equal(attention[1], attention[2])
    outputs["logits"].square().mean().backward()
    assert model.attention_map_logits.grad.abs().sum() > 0

    before = model.global_map().copy()
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    optimiser.step()
    after = model.global_map()
    assert after.shape == (96, 96) and after.dtype == np.float32
    assert 0 <= after.min() and after.max() <= 1
    assert not np.allclose(before, after)


def test_global_map_parameter_size_follows_stage_and_input_size():
    model = tiny_model("global_attention", attention_stage=3, input_size=64)
    assert tuple(model.attention_map_logits.shape) == (1, 1, 8, 8)
    assert model.global_map(size=32).shape == (32, 32)
    # A crop size other than input_size works: the map is resized to the feature map.
    assert model(make_batch(96, batch=2))["attention"].shape == (2, 96, 96)


# ---------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["shape_aware", "gated_attention", "daffnet", "global_attention"])
def test_attention_supervision_loss_decreases(kind):
    model = tiny_model(kind)
    x = make_batch(64, batch=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = attention_supervision_loss(model(x)["attention_logits"], x[:, 3], x[:, 4])
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_attention_supervision_loss_targets():
    cell = torch.zeros(2, 16, 16)
    cell[:, 4:12, 4:12] = 1
    nucleus = torch.zeros(2, 16, 16)
    nucleus[:, 6:10, 6:10] = 1
    good = (cell * 2 - 1) * 20
    assert attention_supervision_loss(good, cell).item() < 1e-6
    assert attention_supervision_loss(-good, cell).item() > 10
    # Balanced and unbalanced agree when the map is uniformly wrong or right per class.
    assert attention_supervision_loss(torch.zeros(2, 16, 16), cell).item() == pytest.approx(np.log(2), rel=1e-5)

    two_maps = torch.stack([good, -good], dim=1)
    one = attention_supervision_loss(good, cell)
    both = attention_supervision_loss(two_maps, cell, nucleus, nucleus_weight=0.5)
    nucleus_term = attention_supervision_loss(-good, nucleus)
    assert both.item() == pytest.approx(one.item() + 0.5 * nucleus_term.item(), rel=1e-5)
    with pytest.raises(ValueError, match="nucleus_mask is required"):
        attention_supervision_loss(two_maps, cell)
    with pytest.raises(ValueError, match="shape"):
        attention_supervision_loss(good, cell[:, :8])


def test_attention_supervision_loss_skips_images_without_mask():
    cell = torch.zeros(2, 8, 8)
    cell[0, 2:6, 2:6] = 1
    logits = torch.zeros(2, 8, 8, requires_grad=True)
    with torch.no_grad():
        logits[1] = 50.0  # would be a huge loss against an empty mask
    loss = attention_supervision_loss(logits, cell)
    assert loss.item() == pytest.approx(np.log(2), rel=1e-5)
    empty = attention_supervision_loss(logits, torch.zeros(2, 8, 8))
    assert empty.item() == 0.0
    empty.backward()


def test_attribute_loss_ignores_missing_labels():
    torch.manual_seed(0)
    logits = [torch.randn(4, 2, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    targets = torch.tensor([[0, -1], [1, 2], [-1, -1], [1, 0]])
    loss = attribute_loss(logits, targets)
    expected_a = torch.nn.functional.cross_entropy(logits[0][[0, 1, 3]], targets[[0, 1, 3], 0])
    expected_b = torch.nn.functional.cross_entropy(logits[1][[1, 3]], targets[[1, 3], 1])
    assert loss.item() == pytest.approx(((expected_a + expected_b) / 2).item(), rel=1e-6)
    loss.backward()
    assert logits[0].grad[2].abs().sum() == 0 and logits[1].grad[0].abs().sum() == 0

    # An attribute with no label in the batch does not dilute the mean.
    only_first = torch.tensor([[0, -1], [1, -1], [-1, -1], [1, -1]])
    expected = torch.nn.functional.cross_entropy(logits[0][[0, 1, 3]], only_first[[0, 1, 3], 0])
    assert attribute_loss(logits, only_first).item() == pytest.approx(expected.item(), rel=1e-6)
    none = attribute_loss(logits, torch.full((4, 2), -1))
    assert none.item() == 0.0
    none.backward()

    with pytest.raises(ValueError, match="value index"):
        attribute_loss(logits, torch.tensor([[2, 0]] * 4))
    with pytest.raises(ValueError, match="attribute"):
        attribute_loss(logits, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        attribute_loss(logits, torch.zeros(4, 2))


def test_attribute_loss_trains_daffnet_head():
    model = tiny_model("daffnet")
    x = make_batch(64, batch=4)
    sizes = [n for _, n in model.config["attributes"]]
    targets = torch.tensor([[i % n for n in sizes] for i in range(4)])
    targets[0, :5] = -1
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = attribute_loss(model(x)["attr_logits"], targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_attention_mass_inside():
    mask = torch.zeros(3, 4, 4)
    mask[:, :2] = 1  # top half
    attention = torch.zeros(3, 4, 4)
    attention[0] = 1.0  # uniform: half inside
    attention[1, :2] = 1.0  # all inside
    result = attention_mass_inside(attention, mask[:, None])
    torch.testing.assert_close(result[:2], torch.tensor([0.5, 1.0]))
    assert torch.isnan(result[2])


def test_ensemble_answers_with_the_mean_of_its_members():
    from napari_smear.models import EnsembleClassifier, combine_models

    members = [tiny_model("gated_attention").eval(), tiny_model("shape_aware").eval()]
    ensemble = combine_models(members)
    assert isinstance(ensemble, EnsembleClassifier) and not ensemble.training
    x = make_batch(64, batch=2)
    with torch.no_grad():
        outputs = [member(x) for member in members]
        fused = ensemble(x)
    torch.testing.assert_close(fused["logits"], (outputs[0]["logits"] + outputs[1]["logits"]) / 2)
    torch.testing.assert_close(fused["attention"], (outputs[0]["attention"] + outputs[1]["attention"]) / 2)
    # the members' weights were copied: changing a source model leaves the ensemble as it was
    with torch.no_grad():
        next(members[0].parameters()).add_(1.0)
        torch.testing.assert_close(ensemble(x)["logits"], fused["logits"])


def test_ensemble_averages_attribute_logits_of_members_that_have_them():
    from napari_smear.models import combine_models

    first = tiny_model("daffnet").eval()
    torch.manual_seed(1)  # a second member with other weights
    second = build_model("daffnet", NUM_CLASSES, **TINY["daffnet"]).eval()
    x = make_batch(64, batch=2)
    with torch.no_grad():
        fused = combine_models([first, second])(x)
        expected = [(a + b) / 2 for a, b in zip(first(x)["attr_logits"], second(x)["attr_logits"])]
    assert len(fused["attr_logits"]) == len(expected)
    for result, value in zip(fused["attr_logits"], expected):
        torch.testing.assert_close(result, value)
    # a member without attribute heads: the ensemble has none either
    with torch.no_grad():
        assert "attr_logits" not in combine_models([first, tiny_model("plain").eval()])(x)


def test_ensemble_rejects_what_it_cannot_fuse():
    from napari_smear.models import combine_models

    with pytest.raises(ValueError, match="at least 2"):
        combine_models([tiny_model("plain")])
    with pytest.raises(ValueError, match="at least 2 members"):
        build_model("ensemble", NUM_CLASSES)
    with pytest.raises(ValueError, match="same number of classes"):
        combine_models([tiny_model("plain"), build_model("plain", NUM_CLASSES + 1, **TINY["plain"])])
    with pytest.raises(ValueError, match="fused for inference"):
        combine_models([fuse_for_inference(tiny_model("plain")), tiny_model("plain")])
    with pytest.raises(ValueError, match="morphology features"):
        combine_models([tiny_model("daffnet", morph_features=3), tiny_model("plain")])
    with pytest.raises(ValueError, match="itself an ensemble"):
        build_model("ensemble", NUM_CLASSES, members=[{"kind": "ensemble", "config": TINY["ensemble"]}] * 2)
    with pytest.raises(ValueError, match="member 1 must be"):
        build_model("ensemble", NUM_CLASSES, members=[{"kind": "plain", "config": TINY["plain"]}, "plain"])
