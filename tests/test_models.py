"""create_model (one factory for registered, torchvision and timm names) and the paper's ResNet-18."""
import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from topk_plugin import get_preset, sparsify
from topk_plugin.checkpoints import CheckpointError
from topk_plugin.models import create_model, register_model, registered_models


@pytest.fixture
def no_downloads(monkeypatch):
    """Fail any attempt to fetch weights, so a test proves that nothing was downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("create_model tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)


# ----------------------------------------------------------------------------- name resolution

@pytest.mark.parametrize("name, module", [
    ("resnet18", "torchvision."),             # torchvision first where both libraries have the name
    ("torchvision/resnet18", "torchvision."),
    ("timm/resnet18", "timm."),               # timm forced
    ("resnet10t", "timm."),                   # timm only
    ("resnet18_paper", "topk_plugin."),
    ("topk_plugin/resnet18_paper", "topk_plugin."),
])
def test_sources_and_prefixes(name, module, no_downloads):
    assert type(create_model(name)).__module__.startswith(module)


@pytest.mark.parametrize("name", ["resnet18", "timm/resnet10t", "resnet18_paper"])
def test_num_classes_reaches_every_source(name, no_downloads):
    model = create_model(name, num_classes=7)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == 7


def test_unknown_names_list_close_ones():
    with pytest.raises(ValueError, match=r"not a registered, torchvision or timm model name; closest names: "
                                         r"\['resnet18'"):
        create_model("resnt18")
    with pytest.raises(ValueError, match=r"'timm/vit_tiny_patch16_22' is not a timm model name.*vit_tiny_patch16_224"):
        create_model("timm/vit_tiny_patch16_22")
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        create_model("keras/resnet18")
    with pytest.raises(ValueError, match="num_classes=0"):
        create_model("resnet18", num_classes=0)


def test_named_weights_are_checked_before_any_download(no_downloads):
    with pytest.raises(ValueError, match=r"IMAGENET1K_V9.*\['DEFAULT', 'pretrained', 'IMAGENET1K_V1'\]"):
        create_model("alexnet", weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="timm takes"):
        create_model("timm/resnet10t", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="has no named weights"):
        create_model("resnet18_paper", weights="DEFAULT")


def test_torchvision_weight_names_resolve_to_torchvision_weights(monkeypatch):
    reference = torchvision.models.squeezenet1_0().state_dict()
    asked = []

    def fake_state_dict(self, *args, **kwargs):  # stands in for torchvision's download
        asked.append(self.name)
        return reference

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_state_dict)
    for name in ("DEFAULT", "pretrained", "IMAGENET1K_V1"):
        model = create_model("squeezenet1_0", weights=name)
        assert torch.equal(model.features[0].weight, reference["features.0.weight"])
    assert asked == ["IMAGENET1K_V1"] * 3


def test_local_weights_file_is_loaded(tmp_path, no_downloads):
    source = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model("resnet18", weights=str(path), num_classes=5)
    assert torch.equal(model.fc.weight, source.fc.weight) and torch.equal(model.conv1.weight, source.conv1.weight)
    bare = path.rename(tmp_path / "weights")  # a Path is a file even without a suffix
    assert torch.equal(create_model("resnet18", weights=bare, num_classes=5).fc.weight, source.fc.weight)
    path = bare
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("resnet18", weights=str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointError, match=r"fc.weight: \(5, 512\) vs \(1000, 512\)"):
        create_model("resnet18", weights=path)


def test_register_model_adds_a_name_and_refuses_it_twice(no_downloads):
    def tiny_registry_probe(num_classes: int = 3, width: int = 4):
        return nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes))

    if "tiny_registry_probe" not in registered_models():
        register_model(tiny_registry_probe)
    assert create_model("tiny_registry_probe", num_classes=2, width=6)[1].weight.shape == (2, 6)
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny_registry_probe)


# ----------------------------------------------------------------------------- the paper's ResNet-18

def authors_resnet18_keys(num_classes: int = 10) -> dict[str, tuple]:
    """The state_dict names and shapes of the authors' ``ResNet18()`` (models/resnet_imgnette.py), by hand."""
    shapes = {"conv1.weight": (64, 3, 3, 3)}

    def batch_norm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    batch_norm("bn1", 64)
    planes_in = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, planes_in, 3, 3)
            batch_norm(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            batch_norm(f"{prefix}.bn2", planes)
            if planes_in != planes:
                shapes[f"{prefix}.shortcut.0.weight"] = (planes, planes_in, 1, 1)
                batch_norm(f"{prefix}.shortcut.1", planes)
            planes_in = planes
    shapes["linear.weight"] = (num_classes, 512 * 7 * 7)
    shapes["linear.bias"] = (num_classes,)
    return shapes


def test_paper_resnet18_has_the_authors_names_shapes_and_parameter_count():
    model = create_model("resnet18_paper")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == authors_resnet18_keys()
    convs = 3 * 64 * 9 + sum(
        (cin * cout * 9 + cout * cout * 9) + cout * cout * 9 * 2 + (cin * cout if cin != cout else 0)
        for cin, cout in ((64, 64), (64, 128), (128, 256), (256, 512)))
    norms = 2 * 64 + sum(2 * c * (4 + (1 if c != 64 else 0)) for c in (64, 128, 256, 512))
    linear = 512 * 7 * 7 * 10 + 10
    assert convs + norms + linear == 11_419_722  # the figure recorded in docs/RESULTS.md
    assert sum(p.numel() for p in model.parameters()) == 11_419_722


def test_paper_resnet18_pools_the_28x28_map_into_25088_features():
    with torch.device("meta"):  # shapes only: the full 224 px forward costs seconds on a CPU
        model = create_model("resnet18_paper", num_classes=3)
        seen = {}
        model.layer4.register_forward_hook(lambda m, args, out: seen.update(layer4=tuple(out.shape)))
        model.linear.register_forward_hook(lambda m, args, out: seen.update(linear_in=tuple(args[0].shape)))
        logits = model(torch.empty(1, 3, 224, 224))
    assert seen == {"layer4": (1, 512, 28, 28), "linear_in": (1, 25088)} and logits.shape == (1, 3)


def test_authors_net_checkpoint_with_dataparallel_names_loads(tmp_path):
    state = {f"module.{k}": torch.randn(shape) if shape else torch.tensor(7)
             for k, shape in authors_resnet18_keys().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"net": state, "acc": 81.5, "epoch": 41}, path)
    model = create_model("resnet18_paper", weights=path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"module.{name}"]), name


def authors_sparse_hw(x: torch.Tensor, topk: float) -> torch.Tensor:
    """The authors' ``ResNet.sparse_hw`` (tau = 1): keep the int(max(1, topk*h*w)) largest |x| per channel."""
    n, c, h, w = x.shape
    rows = x.reshape(n, c, h * w)
    index = rows.abs().topk(int(max(1, topk * h * w)), dim=2).indices
    return (torch.zeros_like(rows).scatter_(2, index, 1) * rows).reshape(n, c, h, w)


def test_paper_preset_is_the_authors_topk_2_20():
    model = create_model("resnet18_paper").eval()
    preset = get_preset("paper", model)
    assert preset.arch == "resnet18_paper" and list(preset.spec.positions) == ["layer2"] and preset.spec.k == 0.2
    dense = copy.deepcopy(model)
    sparse = sparsify(model, "paper", method="hooks")
    features = torch.relu(torch.randn(2, 64, 20, 20))
    with torch.no_grad():
        ours, dense_out = sparse.layer2(features), dense.layer2(features)
    theirs = authors_sparse_hw(dense_out, 0.2)
    assert not torch.equal(ours, dense_out)
    assert torch.equal(ours, theirs)
    assert (ours != 0).sum((2, 3)).max() <= int(0.2 * 10 * 10)


def test_timm_pretrained_goes_through_timms_loader(monkeypatch):
    calls = []
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda model, *args, **kwargs: calls.append(model))
    create_model("timm/resnet10t")
    assert calls == []
    model = create_model("timm/resnet10t", weights="pretrained")
    assert calls == [model]
