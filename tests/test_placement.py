"""The "stage-ends" placement: stage discovery on CNNs, token models, channel-last maps and plain modules."""
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from topk_plugin import (SparsifiedGraphModule, TopKSpec, desparsify, find_stages, list_positions, register_preset,
                         sparsify, sparsity_report, stage_ends, topk_layers, unregister_preset)


def positions(model, **probe):
    return [(s.position, s.kind) for s in find_stages(model, **probe)[0]]


class PlainCNN(nn.Module):
    """A user module: not a Sequential, functional ops between modules, two resolution drops."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.act1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class Merge(nn.Module):
    """Swin-style patch merging on a channel-last (N, H, W, C) map: half the resolution, twice the channels."""

    def forward(self, x):
        return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 1::2]], dim=-1)


class ChannelLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.stage0, self.merge, self.stage1 = nn.Linear(8, 8), Merge(), nn.Linear(16, 16)

    def forward(self, x):
        x = self.stage0(self.stem(x).permute(0, 2, 3, 1))
        return self.stage1(self.merge(x)).mean((1, 2))


def test_cnn_stages_are_the_last_module_before_each_drop_plus_the_last_map():
    model = torchvision.models.resnet18()
    assert positions(model, input_size=(3, 64, 64)) == [
        ("relu", "spatial"), ("layer1", "spatial"), ("layer2", "spatial"), ("layer3", "spatial"), ("layer4", "spatial")]


def test_alexnet_and_vgg16_against_the_paper_presets():
    # stage-ends: before each max-pool, plus the last map; the paper: after each max-pool and after
    # AlexNet's 13x13 convolutions (README "Any model" explains the difference).
    assert positions(torchvision.models.alexnet(), input_size=(3, 128, 128)) == [
        ("features.1", "spatial"), ("features.4", "spatial"), ("features.11", "spatial"), ("features.12", "spatial")]
    vgg16_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16().features
    assert [p for p, _ in positions(vgg16_features, input_size=(3, 64, 64))] == [
        "3", "8", "15", "22", "29", "30"]


def test_a_plain_user_module_and_the_default_probe_follows_its_first_convolution():
    expected = [("act1", "spatial"), ("pool", "spatial"), ("conv2", "spatial")]
    assert positions(PlainCNN()) == expected
    assert positions(PlainCNN(channels=1)) == expected  # a 1x224x224 probe


def test_channel_last_maps_get_token_kind():
    assert positions(ChannelLast(), input_size=(3, 64, 64)) == [("stage0", "token"), ("stage1", "token")]
    sparse = sparsify(ChannelLast(), "stage-ends", input_size=(3, 64, 64), k=0.25)
    rows = sparsity_report(sparse, torch.randn(2, 3, 64, 64))
    assert [(r["position"], r["shape"], r["count"]) for r in rows] == [
        ("stage0", (2, 16, 16, 8), 64), ("stage1", (2, 8, 8, 16), 16)]


def test_timm_feature_info_names_the_stages():
    model = timm.create_model("mobilenetv2_050")
    stages = positions(model, input_size=(3, 64, 64))
    assert [p for p, _ in stages] == [e["module"] for e in model.feature_info]
    assert stages[-1][0] == "blocks.6"  # a probe alone would take conv_head's map


def test_token_models_get_token_topk_before_each_attention_with_their_prefix():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4)
    stages, family = find_stages(vit)  # the default probe follows the model's img_size
    assert family == "tokens"
    assert [(s.position, s.kind, s.num_prefix_tokens) for s in stages] == [
        ("before:blocks.0.attn", "token", 5), ("before:blocks.1.attn", "token", 5)]
    assert {s.k for s in stage_ends(vit)} == {0.6}
    # CaiT adds its class token only after the trunk: the trunk's attention has no prefix to keep.
    cait = timm.create_model("cait_xxs24_224", img_size=64, depth=2)
    assert cait.num_prefix_tokens == 1
    assert [(s.position, s.num_prefix_tokens) for s in find_stages(cait)[0]] == [
        ("before:blocks.0.attn", 0), ("before:blocks.1.attn", 0)]


def test_fx_and_hooks_agree_and_desparsify_restores_the_dense_output():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    fx_model = sparsify(model, "stage-ends", method="fx", example_input=x)
    hooks = sparsify(model, "stage-ends", method="hooks", example_input=x)
    assert isinstance(fx_model, SparsifiedGraphModule) and list(topk_layers(fx_model)) == list(topk_layers(hooks))
    with torch.no_grad():
        assert torch.equal(fx_model(x), hooks(x))
        assert not torch.allclose(fx_model(x), model(x))
        assert torch.equal(desparsify(fx_model)(x), model(x))


def test_k_is_one_value_or_one_per_stage():
    model = PlainCNN()
    ks = [0.2, 0.5, 3]
    assert [layer.k for layer in topk_layers(sparsify(model, "stage-ends", k=ks)).values()] == ks
    assert {layer.k for layer in topk_layers(sparsify(model, "stage-ends", k=3)).values()} == {3}
    with pytest.raises(ValueError, match=r"k has 2 values for 3 placements \['act1', 'pool', 'conv2'\]"):
        sparsify(model, "stage-ends", k=[0.1, 0.2])


def test_probe_input_options_are_validated():
    with pytest.raises(ValueError, match="example_input or input_size, not both"):
        sparsify(PlainCNN(), "stage-ends", example_input=torch.randn(1, 3, 8, 8), input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"input_size=\(3, 64\) must be \(C, H, W\)"):
        sparsify(PlainCNN(), "stage-ends", input_size=(3, 64))
    with pytest.raises(ValueError, match=r"read only by the computed placements \['stage-ends'\]"):
        sparsify(PlainCNN(), ["act1"], input_size=(3, 64, 64))


def test_a_model_without_stages_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match=r"stage-ends found no stage in Sequential.*list_positions"):
        sparsify(mlp, "stage-ends", example_input=torch.randn(1, 3, 2, 2))


class WithStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x):
        return self.stages(x)


def test_a_name_that_is_both_a_preset_and_a_module_must_be_disambiguated():
    register_preset("stages", "with-stages", TopKSpec(["stages.0"], k=2), lambda m: isinstance(m, WithStages))
    try:
        with pytest.raises(ValueError, match=r"'stages' is both a preset and a module of WithStages; say "
                                             r"'preset:stages' for the preset or 'after:stages'"):
            sparsify(WithStages(), "stages")
        assert list(topk_layers(sparsify(WithStages(), "preset:stages"))) == ["stages.0"]
        assert list(topk_layers(sparsify(WithStages(), "after:stages"))) == ["stages"]
    finally:
        unregister_preset("stages", "with-stages")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'"):
        sparsify(WithStages(), "preset:nope")


def test_the_report_shows_what_the_placement_chose():
    model = PlainCNN()
    sparse = sparsify(model, "stage-ends", input_size=(3, 32, 32))
    rows = sparsity_report(sparse, torch.randn(1, 3, 32, 32))
    assert [(r["position"], r["shape"]) for r in rows] == [
        ("act1", (1, 8, 32, 32)), ("pool", (1, 8, 16, 16)), ("conv2", (1, 16, 8, 8))]
    shapes = {r["position"]: r["output"] for r in list_positions(model, torch.randn(1, 3, 32, 32))}
    assert shapes["act1"] == (1, 8, 32, 32)


def test_auto_uses_fx_for_stage_ends_on_common_models():
    for model, size in [(torchvision.models.mobilenet_v3_small(), 64), (timm.create_model("convnext_atto"), 64)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sparse = sparsify(model.eval(), "stage-ends", input_size=(3, size, size))
        assert isinstance(sparse, SparsifiedGraphModule), type(model).__name__
