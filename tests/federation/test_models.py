"""Tests of federation.models: shapes, parameter counts, DP compatibility, registry."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from federation.catalog import available_models
from federation.models import (
    ModelOptionsError,
    UnknownModelError,
    create_model,
    load_pretrained,
)
from federation.models.group_norm import (
    FreshOutput,
    group_norm_groups,
    replace_batchnorm_with_groupnorm,
)

IMAGE_MODELS = ["mlp", "lenet5", "cnn1", "cnn2", "patch_cnn", "timm:resnet18"]
INPUTS = {"mnist": (1, 28), "cifar": (3, 32)}


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("data", sorted(INPUTS))
def test_image_models_give_logits_and_pass_opacus_validation(name, data):
    in_channels, size = INPUTS[data]
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=size, seed=0)
    logits = model(torch.randn(3, in_channels, size, size))
    assert logits.shape == (3, 7)
    assert ModuleValidator.validate(model, strict=True) == []


def test_parameter_counts_stated_in_the_papers():
    # ProxyFL's MLP 784-200-200-10: weights and biases of three layers
    assert _n_parameters(create_model("mlp", num_classes=10)) == (
        784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    )
    # ProxyFL's CNN1 (conv 6@3x3, conv 16@3x3, 64, out) and CNN2 (conv 128@3x3 twice, out)
    assert _n_parameters(create_model("cnn1", num_classes=10)) == (
        (6 * 9 + 6) + (16 * 6 * 9 + 16) + (16 * 5 * 5 * 64 + 64) + (64 * 10 + 10)
    )
    assert _n_parameters(create_model("cnn1", num_classes=10, in_channels=3,
                                      image_size=32)) == 38_626
    assert _n_parameters(create_model("cnn2", num_classes=10)) == (
        (128 * 3 * 9 + 128) + (128 * 128 * 9 + 128) + (128 * 6 * 6 * 10 + 10)
    )
    # LeNet-5 with full C3 connectivity: C1 156, C3 2,416, C5 48,120, F6 10,164, out 850
    assert _n_parameters(create_model("lenet5", num_classes=10)) == 61_706


def test_timm_backbone_has_no_batchnorm_and_keeps_fused_activations():
    from timm.layers import GroupNormAct

    model = create_model("timm:test_efficientnet", num_classes=2, in_channels=3, seed=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fused = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    assert fused and any(not isinstance(m.act, nn.Identity) for m in fused)
    assert all(m.num_channels % m.num_groups == 0 for m in fused)
    # opacus' hooks forbid modifying a layer's output in place; see make_inplace_safe
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(isinstance(parents[id(m)], FreshOutput) for m in norms)
    assert ModuleValidator.validate(model, strict=True) == []
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_batchnorm_replacement_groups_and_unknown_subclass():
    model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.Conv2d(48, 3, 1))
    replace_batchnorm_with_groupnorm(model)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 16
    assert [group_norm_groups(c) for c in (64, 48, 3)] == [32, 16, 1]
    with pytest.raises(TypeError, match="SyncBatchNorm at 1"):
        replace_batchnorm_with_groupnorm(nn.Sequential(nn.Identity(), nn.SyncBatchNorm(4)))


def test_attention_mil_single_bag_padded_batch_and_dp_compatibility():
    model = create_model("attention_mil", num_classes=3, in_features=16, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    bag = torch.randn(9, 16)
    logits, attention = model.attend(bag)
    assert logits.shape == (3,) and attention.shape == (9,)
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-6) and (attention > 0).all()
    assert torch.equal(model(bag), logits)

    padded = torch.zeros(2, 12, 16)
    padded[0, :9] = bag
    padded[1] = torch.randn(12, 16)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    batch_logits, batch_attention = model.attend(padded, mask)
    assert batch_logits.shape == (2, 3)
    assert torch.allclose(batch_logits[0], logits, atol=1e-6)  # padding changes nothing
    assert (batch_attention[0, 9:] == 0).all()


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(UnknownModelError) as error:
        create_model("resnet1000", num_classes=2)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in available_models())
    # a ValueError, which the CLI prints as one line (a KeyError would escape as a traceback)
    assert isinstance(error.value, ValueError) and message.startswith("unknown model 'resnet1000'")
    with pytest.raises(UnknownModelError, match="timm has no model"):
        create_model("timm:no_such_net", num_classes=2)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ModelOptionsError, match=r"in_features \(it takes: in_channels, image_size"):
        create_model("mlp", num_classes=2, in_features=4)
    # A model of feature vectors asked to take patches: a one-line ValueError, not a traceback
    with pytest.raises(ValueError, match="'attention_mil' does not take option.s. image_size"):
        create_model("attention_mil", num_classes=2, in_channels=3, image_size=64)


def test_patch_cnn_classifies_any_patch_size_with_its_documented_size():
    model = create_model("patch_cnn", num_classes=2, in_channels=3, image_size=64, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 23_938
    small = create_model("patch_cnn_small", num_classes=2, seed=0)
    assert sum(p.numel() for p in small.parameters()) == 6_210
    for side in (32, 64, 96):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 2)


def test_pretrained_weights_load_where_names_and_shapes_match(tmp_path):
    source = create_model("patch_cnn", num_classes=5, seed=1)  # another head size
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = create_model("patch_cnn", num_classes=2, seed=2)
    head_before = target[-1].weight.clone()
    load_pretrained(target, path)
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[-1].weight, head_before)  # 5-class head does not fit: kept
    torch.save({"unrelated": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no parameter matches"):
        load_pretrained(target, path)
    with pytest.raises(FileNotFoundError, match="missing.pt: pretrained weights not found"):
        load_pretrained(target, tmp_path / "missing.pt")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn1", "cnn2", "attention_mil"])
def test_weights_are_reproducible(name):
    torch.manual_seed(3)
    first = create_model(name, num_classes=4)
    torch.manual_seed(3)
    second = create_model(name, num_classes=4)
    assert _same_weights(first, second)

    state = torch.random.get_rng_state()
    seeded = create_model(name, num_classes=4, seed=11)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    again = create_model(name, num_classes=4, seed=11)
    other = create_model(name, num_classes=4, seed=12)
    assert _same_weights(seeded, again)
    assert not _same_weights(seeded, other)
