"""sparsify / desparsify / set_k / list_positions / sparsity_report on real timm and torchvision models."""
import copy
import dataclasses
import io
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from topk_plugin import (SparsifiedGraphModule, TopKSpec, desparsify, get_preset, list_positions, list_presets,
                         register_preset, set_k, sparsify, sparsity_report, topk, topk_layers, unregister_preset)


def tv(name, **kwargs):
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def tm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


# (factory, spec, input size): at least eight architectures, CNNs and transformers, both libraries.
ARCHITECTURES = {
    "tv_alexnet": (tv("alexnet"), "paper", 96),
    "tv_vgg16": (tv("vgg16"), "paper", 64),
    "tv_resnet18": (tv("resnet18"), "paper", 64),
    "tv_resnet50": (tv("resnet50"), "paper", 64),
    "tv_vit_b_16": (tv("vit_b_16", image_size=64), "paper", 64),
    "tv_convnext_tiny": (tv("convnext_tiny"), TopKSpec(["features.1", "features.3"], k=0.2), 64),
    "tv_swin_t": (tv("swin_t"), TopKSpec(["features.1", "features.3"], k=0.2, kind="token"), 64),
    "tv_mobilenet_v3_small": (tv("mobilenet_v3_small"), TopKSpec(["type:SqueezeExcitation"], k=0.3), 64),
    "timm_resnet18": (tm("resnet18"), "paper", 64),
    "timm_vit_tiny": (tm("vit_tiny_patch16_224", img_size=64), "paper", 64),
    "timm_convnext_atto": (tm("convnext_atto"), TopKSpec(["stages.*"], k=0.1), 64),
    "timm_efficientnet_b0": (tm("efficientnet_b0"), TopKSpec(["blocks.1", "blocks.3"], k=0.1), 64),
}


def _output(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    factory, spec, size = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    model = factory().eval()
    # torchvision's ViT has a zero-initialised head; make outputs informative for comparisons.
    for head in [getattr(model, "heads", None)]:
        if head is not None:
            for p in head.parameters():
                nn.init.normal_(p, std=0.02)
    return request.param, model, spec, torch.randn(2, 3, size, size)


def test_fx_and_hooks_agree_and_change_the_output(arch):
    name, model, spec, x = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = sparsify(model, spec)
    hooks = sparsify(model, spec, method="hooks")
    with torch.no_grad():
        dense, a, h = _output(model, x), _output(auto, x), _output(hooks, x)
    assert torch.equal(a, h), name
    assert (a - dense).abs().max() > 1e-3 * dense.abs().max(), f"{name}: Top-K did not change the output"
    assert all(row["shape"] != "not reached" for row in sparsity_report(auto, x))


def test_state_dicts_are_interchangeable(arch):
    name, model, spec, x = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify(model, spec)
    assert list(sparse.state_dict()) and set(sparse.state_dict()) == set(model.state_dict())
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        nn.init.normal_(p)
    sparse.load_state_dict(fresh.state_dict())  # strict
    model_copy = copy.deepcopy(model)
    model_copy.load_state_dict(sparse.state_dict())
    for key, value in fresh.state_dict().items():
        assert torch.equal(model_copy.state_dict()[key], value), key


def test_fx_is_used_for_the_paper_presets():
    for name in ["tv_alexnet", "tv_resnet50", "tv_vit_b_16", "timm_vit_tiny"]:
        factory, spec, _ = ARCHITECTURES[name]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert isinstance(sparsify(factory(), spec), SparsifiedGraphModule), name


def test_paper_preset_placements_and_ks():
    expected = {
        "alexnet": (tv("alexnet"), ["features.2", "features.5", "features.7", "features.9", "features.12"], 0.1),
        "vgg16": (tv("vgg16"), ["features.4", "features.9", "features.16", "features.23", "features.30"], 0.05),
        "resnet18": (tv("resnet18"), ["layer2"], 0.2),
        "resnet50": (tv("resnet50"), ["maxpool", "layer1", "layer2", "layer3", "layer4"], 0.1),
        "vit_torchvision": (tv("vit_b_16", image_size=32), [f"before:encoder.layers.encoder_layer_{i}.self_attention" for i in range(12)], 0.6),
        "vit_timm": (tm("vit_base_patch16_224", img_size=32), [f"before:blocks.{i}.attn" for i in range(12)], 0.6),
    }
    for arch_name, (factory, positions, k) in expected.items():
        model = factory()
        assert get_preset("paper", model).arch == arch_name
        layers = topk_layers(sparsify(model, "paper", method="hooks"))
        assert list(layers) == positions, arch_name
        assert {layer.k for layer in layers.values()} == {k}


def test_resnet18_training_variant_and_timm_resnets_match_presets():
    variant = torchvision.models.resnet18(num_classes=10)
    variant.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    variant.maxpool = nn.Identity()
    assert get_preset("paper", variant).arch == "resnet18"
    assert get_preset("paper", timm.create_model("resnet50")).arch == "resnet50"
    assert get_preset("paper", timm.create_model("resnet18")).arch == "resnet18"


def test_vit_preset_keeps_the_class_token_and_sparsifies_attention_inputs():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=4).eval()
    sparse = sparsify(model, "paper")
    layer = topk_layers(sparse)["before:blocks.0.attn"]
    assert layer.kind == "token" and layer.num_prefix_tokens == model.num_prefix_tokens == 5
    seen = {}
    getattr(sparse.blocks, "0").attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        sparse(x)
    dense_input = seen.pop("x")
    model.blocks[0].norm1.register_forward_hook(lambda m, args, out: seen.setdefault("norm", out))
    with torch.no_grad():
        model(x)
    expected = topk(seen["norm"], 0.6, kind="token", num_prefix_tokens=5)
    assert torch.equal(dense_input, expected)


def test_torchvision_vit_feeds_the_same_topk_tensor_as_query_key_and_value():
    model = torchvision.models.vit_b_16(image_size=64).eval()
    sparse = sparsify(model, "paper")
    calls = []
    sparse.encoder.layers.encoder_layer_3.self_attention.register_forward_pre_hook(lambda m, args: calls.append(args))
    with torch.no_grad():
        sparse(torch.randn(1, 3, 64, 64))
    q, k, v = calls[0][:3]
    assert q is k is v
    assert ((q[:, 1:] != 0).sum(1) == int(0.6 * 16)).all()


@pytest.mark.parametrize("builder", [tv("vgg16_bn"), lambda: timm.create_model("vgg16_bn")])
def test_the_vgg16_preset_is_not_applied_at_the_wrong_layers_of_vgg16_bn(builder):
    """vgg16_bn also has 13 convolutions, but its max-pools sit at other indices: its own entry puts Top-K after
    each of them (the VGG16 entry's positions would land on BatchNorm, ReLU and Conv layers)."""
    model = builder()
    sparse = sparsify(model, "paper", method="hooks")
    modules = dict(model.named_modules())
    pools = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    assert list(topk_layers(sparse)) == pools and len(pools) == 5
    assert all(isinstance(modules[p], nn.MaxPool2d) for p in topk_layers(sparse))
    assert {layer.k for layer in topk_layers(sparse).values()} == {0.05}


def test_every_preset_runs_on_a_random_model():
    builders = {"alexnet": tv("alexnet"), "vgg16": tv("vgg16"), "resnet18": tv("resnet18"), "resnet50": tv("resnet50"),
                "vit_torchvision": tv("vit_b_16", image_size=64), "vit_timm": tm("vit_tiny_patch16_224", img_size=64)}
    for preset in list_presets("paper"):
        if preset.arch not in builders:
            continue  # presets other code registers (e.g. the FastGAN generator) are tested there
        model = builders[preset.arch]().eval()
        sparse = sparsify(model, "paper")
        report = sparsity_report(sparse, torch.randn(1, 3, 64, 64))
        for row in report:
            assert row["shape"] != "not reached", (preset.arch, row)
            if row["kind"] == "spatial":
                assert abs(row["kept"] - row["count"] / (row["shape"][2] * row["shape"][3])) < 1e-6


def test_overrides_apply_to_every_spec_form():
    model = torchvision.models.alexnet()
    forms = ["paper", ["features.2", "features.5"], {"positions": ["features.2"], "k": 0.5},
             TopKSpec(["features.2"], k=3), [TopKSpec(["features.2"]), TopKSpec(["features.5"], mode="identity")]]
    for spec in forms:
        layers = topk_layers(sparsify(model, spec, k=0.3, mode="non_topk", method="hooks"))
        assert {(l.k, l.mode) for l in layers.values()} == {(0.3, "non_topk")}, spec


def test_position_selectors():
    model = torchvision.models.resnet18()
    names = lambda spec: list(topk_layers(sparsify(model, spec, method="hooks")))
    assert names(["layer*"]) == ["layer1", "layer2", "layer3", "layer4"]
    assert names(["layer1.*.conv1"]) == ["layer1.0.conv1", "layer1.1.conv1"]
    assert names(["layer4.**.bn2"]) == ["layer4.0.bn2", "layer4.1.bn2"]
    assert names(["type:MaxPool2d"]) == names([nn.MaxPool2d]) == ["maxpool"]
    assert names(["before:fc"]) == ["before:fc"]
    assert names(["after:layer3"]) == ["layer3"]


def test_before_position_sparsifies_the_module_input():
    model = torchvision.models.alexnet().eval()
    sparse = sparsify(model, ["before:features.3"], k=0.2)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = model.features[3:](topk(model.features[:3](x), 0.2))
        expected = model.classifier(torch.flatten(model.avgpool(expected), 1))
        torch.testing.assert_close(sparse(x), expected)


@pytest.mark.parametrize("bad, pattern", [
    (["features.22"], r"'features\.22'.*closest names: \['features\.2'"),
    (["type:Conv3d"], r"'type:Conv3d' matches no module of AlexNet; its module types are \['AdaptiveAvgPool2d'"),
    ([], r"positions is empty"),
    ([3], r"spec=\[3\] is not understood"),
    ({"positions": [3.5]}, r"position 3\.5 must be"),
    ("not_a_preset_or_module", r"'not_a_preset_or_module' matches no module"),
    ({"positions": ["features.2"], "k": 2.5}, r"k=2\.5"),
    (object(), r"spec=<object object.* is not understood"),
])
def test_bad_specs_name_the_bad_entry(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparsify(torchvision.models.alexnet(), bad)


def test_other_errors():
    model = torchvision.models.alexnet()
    with pytest.raises(ValueError, match=r"method='graph'.*\['auto', 'fx', 'hooks'\]"):
        sparsify(model, "paper", method="graph")
    with pytest.raises(ValueError, match=r"preset 'paper' has no entry for MobileNetV2; it covers \["):
        sparsify(torchvision.models.mobilenet_v2(), "paper")
    sparse = sparsify(model, "paper")
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(sparse, "paper")
    with pytest.raises(ValueError, match="is not sparsified"):
        desparsify(model)
    with pytest.raises(ValueError, match=r"k=0"):
        set_k(sparse, 0)
    with pytest.raises(ValueError, match=r"'layer9' matches no Top-K layer; the layers are \['features\.2'"):
        set_k(sparse, 0.2, positions="layer9")
    on_linear = sparsify(model, ["classifier.1"])
    with pytest.raises(ValueError, match=r"position 'classifier\.1'.*\(N, C, H, W\)"):
        on_linear(torch.randn(1, 3, 64, 64))


def test_inplace_false_leaves_the_model_untouched_and_desparsify_returns_it():
    model = torchvision.models.resnet18().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
    for method in ("fx", "hooks"):
        sparse = sparsify(model, "paper", method=method)
        assert not hasattr(model, "topk_layers") and not model.layer2._forward_hooks
        restored = desparsify(sparse)
        assert type(restored) is torchvision.models.ResNet and not hasattr(restored, "topk_layers")
        with torch.no_grad():
            assert torch.equal(restored(x), dense)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value)
    hooked = sparsify(model, "paper", method="hooks", inplace=True)
    assert hooked is model and hasattr(model, "topk_layers")
    assert desparsify(hooked) is model and not model.layer2._forward_hooks


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_training_updates_reach_the_desparsified_model(method):
    model = torchvision.models.resnet18(num_classes=4)
    sparse = sparsify(model, "paper", method=method).train()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(sparse(x), y).backward()
    assert sparse.fc.weight.grad is not None and sparse.conv1.weight.grad.abs().sum() > 0
    optimizer.step()
    dense = desparsify(sparse)
    assert torch.equal(dense.fc.weight, sparse.fc.weight)
    assert not torch.equal(dense.fc.weight, model.fc.weight)
    assert torch.equal(dense.bn1.running_mean, sparse.state_dict()["bn1.running_mean"])


def test_set_k_changes_all_or_selected_layers_and_the_measured_sparsity():
    model = torchvision.models.alexnet().eval()
    sparse = sparsify(model, "paper")
    x = torch.randn(1, 3, 224, 224)
    set_k(sparse, 0.3)
    assert {l.k for l in topk_layers(sparse).values()} == {0.3}
    set_k(sparse, 0.05, positions=["features.2", "features.1?"])
    ks = {p: l.k for p, l in topk_layers(sparse).items()}
    assert ks == {"features.2": 0.05, "features.5": 0.3, "features.7": 0.3, "features.9": 0.3, "features.12": 0.05}
    kept = {row["position"]: row["kept"] for row in sparsity_report(sparse, x)}
    assert kept["features.2"] == pytest.approx(int(0.05 * 27 * 27) / (27 * 27))
    assert kept["features.5"] == pytest.approx(int(0.3 * 13 * 13) / (13 * 13))


def test_identity_mode_is_measured_but_changes_nothing():
    model = torchvision.models.alexnet().eval()
    sparse = sparsify(model, "paper", mode="identity")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(sparse(x), model(x))
    rows = sparsity_report(sparse, x)
    assert all(row["kept"] == 1.0 and 0 < row["nonzero_out"] == row["nonzero_in"] for row in rows)
    sparse_rows = sparsity_report(sparsify(model, "paper", mode="topk"), x)
    assert all(row["kept"] == row["count"] / (row["shape"][2] * row["shape"][3]) < 1 for row in sparse_rows)


def test_list_positions_reports_modules_in_call_order_with_shapes():
    model = torchvision.models.alexnet()
    rows = list_positions(model, torch.randn(1, 3, 224, 224))
    by_name = {row["position"]: row for row in rows}
    assert [row["position"] for row in rows][:3] == ["features", "features.0", "features.1"]
    assert by_name["features.2"]["output"] == (1, 64, 27, 27)
    assert by_name["features.2"]["type"] == "MaxPool2d"
    assert by_name["classifier.1"]["output"] == (1, 4096)
    assert "features.2" in str(rows)


class DataDependent(nn.Module):
    """Python control flow on tensor values: not traceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y


class ModeDependent(nn.Module):
    """Control flow on self.training inside a non-leaf submodule: fx keeps one graph per mode."""

    class Inner(nn.Module):
        def forward(self, x):
            return x * 3 if self.training else x - 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inner = self.Inner()

    def forward(self, x):
        return self.inner(self.conv(x))


def test_auto_falls_back_to_hooks_with_a_warning_and_fx_refuses():
    model = DataDependent()
    with pytest.warns(UserWarning, match="torch.fx cannot trace DataDependent.*using forward hooks"):
        sparse = sparsify(model, ["conv"], k=0.2)
    assert not isinstance(sparse, SparsifiedGraphModule)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(sparse(x), sparsify(model, ["conv"], k=0.2, method="hooks")(x))
    with pytest.raises(RuntimeError, match="use method='hooks'"):
        sparsify(model, ["conv"], method="fx")


def test_fx_follows_train_and_eval_control_flow():
    model = ModeDependent()
    fx_model = sparsify(model, ["conv"], k=0.2, method="fx")
    hook_model = sparsify(model, ["conv"], k=0.2, method="hooks")
    x = torch.randn(1, 3, 8, 8)
    for mode in (True, False):
        fx_model.train(mode)
        hook_model.train(mode)
        assert torch.equal(fx_model(x), hook_model(x)), mode
    assert not torch.equal(fx_model.train()(x), fx_model.eval()(x))


@pytest.mark.parametrize("report", [sparsity_report, list_positions])
def test_reports_leave_an_fx_model_in_train_mode_running_its_train_graph(report):
    """The reports run the model in eval mode and restore each module's flag: the graph must follow the flag."""
    model = sparsify(ModeDependent(), ["conv"], k=1.0, method="fx").train()
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    report(model, x)
    assert model.training
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("method", ["fx", "hooks", "auto"])
def test_sparsify_keeps_each_submodules_own_mode(method):
    """A model in train mode with frozen BatchNorm (the usual fine-tuning set-up) keeps it frozen; copies too."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in frozen:
        bn.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    sparse = sparsify(model, "layer2", k=1.0, method=method)
    for copied in (sparse, copy.deepcopy(sparse)):
        assert copied.training
        assert not any(m.training for m in copied.modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():
            assert torch.equal(copied(x), expected)


def test_a_position_fx_never_reaches_is_refused_not_left_to_hooks():
    """A module that forward never calls (here: reached nowhere) gets no Top-K under hooks either: an error."""
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spare = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)

    for method in ("auto", "fx"):
        with pytest.raises(ValueError, match=r"'spare'.*never called"):
            sparsify(Unused(), ["conv", "spare"], method=method)


def test_hooks_warn_after_the_first_forward_about_positions_that_never_ran():
    """nn.MultiheadAttention uses its out_proj weights without calling the module: fx keeps the attention opaque,
    so auto falls back to hooks, and the first forward names the position whose Top-K never ran."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    x = torch.randn(2, 5, 16)
    spec = dict(positions=["attn.out_proj", "head"], k=1, kind="token")
    for method in ("hooks", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's fallback warning
            sparse = sparsify(Attention(), spec, method=method)
        with pytest.warns(UserWarning, match=r"\['attn.out_proj'\] were not called in the model's first forward"):
            sparse(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sparse(x)  # once only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(Attention(), dict(spec, positions=["head"]), method="hooks")(x)  # every position ran: no warning


def test_fx_model_survives_deepcopy_and_pickle():
    model = torchvision.models.resnet18().eval()
    sparse = sparsify(model, "paper")
    set_k(sparse, 0.3)
    x = torch.randn(1, 3, 64, 64)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(sparse), torch.load(buffer, weights_only=False)):
        assert isinstance(clone, SparsifiedGraphModule) and topk_layers(clone)["layer2"].k == 0.3
        with torch.no_grad():
            assert torch.equal(clone(x), sparse(x))
        clone.fc.weight.data.zero_()
        dense = desparsify(clone)
        assert type(dense) is torchvision.models.ResNet and not hasattr(dense, "topk_layers")
        assert (dense.fc.weight == 0).all() and not (sparse.fc.weight == 0).all()  # the clone's, not a shared one


def test_fx_model_exposes_plain_attributes_but_not_original_methods():
    model = timm.create_model("resnet18", num_classes=7)
    sparse = sparsify(model, "paper", method="fx")
    assert sparse.num_classes == 7
    with pytest.raises(AttributeError, match="forward_features.*method='hooks'"):
        sparse.forward_features
    assert callable(sparsify(model, "paper", method="hooks").forward_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsified_model_moves_to_a_device_dtype_and_channels_last(dtype, device):
    """Sparsified on CPU in float32, then moved: both methods follow ``.to`` and agree (and their reports)."""
    model = torchvision.models.resnet18().eval()
    fx_model, hook_model = (sparsify(model, "paper", method=m).to(device, dtype).to(memory_format=torch.channels_last)
                            for m in ("fx", "hooks"))
    x = torch.randn(1, 3, 64, 64, device=device).to(dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fx_model(x)
        assert (out.dtype, out.device.type) == (dtype, device.type) and torch.equal(out, hook_model(x))
    reports = [sparsity_report(m, x) for m in (fx_model, hook_model)]
    assert reports[0] == reports[1]
    shapes = [r["shape"] for r in reports[0]]
    assert reports[0] and all(r["kept"] == r["count"] / (s[2] * s[3]) for r, s in zip(reports[0], shapes))


def test_register_preset_extends_lookup_by_architecture():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    register_preset("paper", "tiny-test", TopKSpec(["body.1"], k=2), lambda m: isinstance(m, Tiny))
    try:
        sparse = sparsify(Tiny(), "paper")
        out = sparse(torch.randn(1, 3, 6, 6))
        assert ((out != 0).flatten(2).sum(-1) <= 2).all()
    finally:
        unregister_preset("paper", "tiny-test")
    with pytest.raises(ValueError, match=r"preset 'paper' has no entry for Tiny"):
        sparsify(Tiny(), "paper")


# ----------------------------------------------------------------------------- issue 10 / 13 regressions

class CalledOutOfOrder(nn.Module):
    """Modules defined a, b, c but called c, a, b (as FastGAN's generator does): fx copies in call order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.b(self.a(self.c(x)))


def test_fx_keeps_the_dense_parameter_and_buffer_order():
    model = CalledOutOfOrder()
    sparse = sparsify(model, ["a"], method="fx")
    assert isinstance(sparse, SparsifiedGraphModule)
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in sparse.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert list(sparse.state_dict()) == list(model.state_dict())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_desparsify_keeps_a_replaced_head_and_indexing_works_as_on_the_dense_model():
    sparse = sparsify(Net().eval(), ["features.1"], method="fx")
    assert isinstance(sparse.features, nn.Sequential) and isinstance(sparse.features[0], nn.Conv2d)
    new_head = nn.Linear(8, 2)
    sparse.head = new_head
    x = torch.randn(2, 3, 10, 10)
    assert sparse(x).shape == (2, 2)
    dense = desparsify(sparse)
    assert dense.head is new_head and dense(x).shape == (2, 2)
    assert list(dense.state_dict()) == list(Net().state_dict())[:-2] + ["head.weight", "head.bias"]


def test_replacing_a_module_whose_forward_the_graph_inlined_is_refused():
    sparse = sparsify(Net(), ["features.1"], method="fx")
    sparse.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    with pytest.raises(RuntimeError, match=r"'features' was replaced after sparsify.*desparsify\(model\)"):
        sparse(torch.randn(1, 3, 10, 10))
    assert desparsify(sparse).features is sparse.features  # the edit reaches the dense model


@pytest.mark.parametrize("method", ["hooks", "auto"])
def test_hooks_work_on_models_whose_forward_calls_every_child(method):
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), DataDependent()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto: DataDependent cannot be traced
        sparse = sparsify(model, ["1"], k=0.25, method=method)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        expected = model[2](topk(model[1](model[0](x)), 0.25))
        assert torch.equal(sparse(x), expected)
    assert "topk_layers" not in dict(sparse.named_children())
    assert list(topk_layers(sparse)) == ["1"] and sparse.to(torch.float64) is sparse
    assert sparsity_report(sparse, x.double())[0]["count"] == 16  # 25% of 8x8
    features = torchvision.models.alexnet().features
    assert sparsify(features, "stage-ends", method="hooks", input_size=(3, 64, 64))(torch.randn(1, 3, 64, 64)).ndim == 4


def test_hooks_are_removed_by_their_handles_also_on_a_deep_copy():
    model = Net()
    hooked = sparsify(model, ["features.1", "before:head"], method="hooks")
    clone = copy.deepcopy(hooked)
    dense_clone = desparsify(clone)
    assert not dense_clone.features[1]._forward_hooks and not dense_clone.head._forward_pre_hooks
    assert hooked.features[1]._forward_hooks and hooked.head._forward_pre_hooks  # the copy's hooks only
    desparsify(hooked)
    assert not hooked.features[1]._forward_hooks and not hooked.head._forward_pre_hooks_with_kwargs


def test_set_k_takes_every_selector_sparsify_takes():
    sparse = sparsify(torchvision.models.alexnet(), "paper", method="hooks")
    set_k(sparse, 0.3, positions="type:MaxPool2d")
    assert {p: l.k for p, l in topk_layers(sparse).items()} == {
        "features.2": 0.3, "features.5": 0.3, "features.7": 0.1, "features.9": 0.1, "features.12": 0.3}
    set_k(sparse, 0.4, positions=[nn.ReLU])
    assert {p for p, l in topk_layers(sparse).items() if l.k == 0.4} == {"features.7", "features.9"}
    with pytest.raises(ValueError, match=r"positions is empty; the Top-K layers are \['features\.2'"):
        set_k(sparse, 0.2, positions=[])
    with pytest.raises(ValueError, match=r"'before:features\.2' matches no Top-K layer"):
        set_k(sparse, 0.2, positions="before:features.2")


def test_presets_are_frozen_copies_and_registration_is_explicit():
    model = torchvision.models.alexnet()
    preset = get_preset("paper", model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.spec.k = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.spec.positions = ["features.0"]
    assert get_preset("paper", model).spec.k == 0.1
    spec = TopKSpec(["features.2"], k=0.3)
    with pytest.raises(ValueError, match=r"preset 'paper' already has an entry for 'alexnet'; pass replace=True"):
        register_preset("paper", "alexnet", spec, lambda m: True)
    original = register_preset("paper", "alexnet", spec, preset.matches, replace=True)
    try:
        assert get_preset("paper", model) is original
    finally:
        register_preset("paper", "alexnet", preset.spec, preset.matches, preset.note, replace=True)
    assert get_preset("paper", model) == preset
    with pytest.raises(ValueError, match=r"no preset 'paper' for 'nope'"):
        unregister_preset("paper", "nope")
    with pytest.raises(ValueError, match=r"taken by a computed placement"):
        register_preset("stage-ends", "x", spec, lambda m: True)


def test_the_fastgan_preset_is_in_the_core_registry():
    from topk_plugin.recipes.fastgan_models import Generator

    preset = get_preset("paper", Generator(size=64, ngf=4, nz=8))
    assert (preset.arch, preset.spec.positions, preset.spec.k) == ("fastgan", ("feat_32",), 0.05)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_reports_list_every_call_of_a_module_called_twice():
    model = CalledTwice()
    x = torch.randn(1, 3, 9, 9)
    rows = [(r["position"], r["call"], r["output"]) for r in list_positions(model, x)]
    assert rows == [("conv1", 0, (1, 4, 9, 9)), ("act", 0, (1, 4, 9, 9)), ("conv2", 0, (1, 4, 4, 4)),
                    ("act", 1, (1, 4, 4, 4))]
    for method in ("fx", "hooks"):
        report = sparsity_report(sparsify(model, ["act"], k=2, method=method), x)
        assert [(r["position"], r["call"], r["shape"], r["count"]) for r in report] == [
            ("act", 0, (1, 4, 9, 9), 2), ("act", 1, (1, 4, 4, 4), 2)], method


class OptionalMask(nn.Module):
    """timm hiera's pattern: an optional argument tested with ``is not None``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, mask=None):
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return y


def test_fx_with_an_optional_argument_runs_and_refuses_a_value_it_fixed():
    model = OptionalMask().eval()
    sparse = sparsify(model, "conv", k=0.1)
    x = torch.randn(1, 3, 8, 8)
    assert isinstance(sparse, SparsifiedGraphModule)
    assert torch.equal(sparse(x), topk(model(x), 0.1))
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        sparse(x, torch.ones(1))


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)


def test_fx_keeps_tensor_constants_out_of_the_state_dict():
    model = WithConstant().eval()
    sparse = sparsify(model, ["conv"], k=0.5, method="fx")
    assert list(sparse.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(sparse(x), topk(model.conv(x), 0.5) * torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1))
    assert not hasattr(desparsify(sparse), "_tensor_constant0")


def test_fx_sparsifies_a_container_and_its_child():
    model = torchvision.models.squeezenet1_1().eval()
    x = torch.randn(1, 3, 64, 64)
    fx_model = sparsify(model, ["features.1", "features"], k=0.2, method="fx")
    hooks = sparsify(model, ["features.1", "features"], k=0.2, method="hooks")
    with torch.no_grad():
        assert torch.equal(fx_model(x), hooks(x))
    assert [r["position"] for r in sparsity_report(fx_model, x) if r["shape"] != "not reached"] == [
        "features.1", "features"]


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def opaque_scale(x):
    return x * 2 if x.sum() > 0 else x


class UsesOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.act = Opaque(), nn.ReLU()

    def forward(self, x):
        return opaque_scale(self.act(self.block(x)))


def test_user_notrace_registries_keep_a_model_on_fx():
    from topk_plugin import register_notrace_function, register_notrace_module

    with pytest.warns(UserWarning, match="using forward hooks"):
        sparsify(UsesOpaque(), ["act"])
    register_notrace_module(Opaque)
    register_notrace_function(opaque_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = sparsify(UsesOpaque(), ["act"], k=0.5)
    assert isinstance(sparse, SparsifiedGraphModule)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_notrace_module(opaque_scale)


def test_parse_spec_reads_positions_names_and_json():
    from topk_plugin import parse_spec

    assert parse_spec("features.2, features.5") == ["features.2", "features.5"]
    assert parse_spec("paper") == "paper" and parse_spec("preset:stage-ends") == "preset:stage-ends"
    assert parse_spec('{"positions": ["layer2"], "k": 0.2}') == TopKSpec(["layer2"], k=0.2)
    assert parse_spec('[{"positions": "a"}, {"positions": "b", "k": 3}]') == [TopKSpec("a"), TopKSpec("b", k=3)]
    for bad, message in [("", "empty"), ("a,,b", "empty position"), ("{k: 1}", "not valid JSON"),
                         ('{"positons": ["a"]}', r"unknown TopKSpec field\(s\) \['positons'\]"),
                         ('{"positions": ["a"], "k": 0}', "k=0")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)
    sparse = sparsify(torchvision.models.alexnet(), parse_spec("features.2,before:features.3"), method="hooks")
    assert list(topk_layers(sparse)) == ["features.2", "before:features.3"]
