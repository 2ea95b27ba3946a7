"""read_checkpoint / unwrap_state_dict / load_checkpoint on synthetic files in the layouts researchers hold.

Each file is written here with random tensors under the real key names and shapes; every test compares the
loaded tensors with the file's, so a wrong mapping fails. The VGG16/AlexNet classifiers keep their real key
names with narrower hidden layers (25088x4096 weights would make each file 400 MB).
"""
import importlib.util

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from topk_plugin import sparsify
from topk_plugin.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, unwrap_state_dict

HIDDEN = 32  # classifier width in the synthetic VGG16 / AlexNet files

# torchvision's layer indices of the parameterised layers in ``features``, and where the authors' Top-K
# models hold them after inserting a TopKLayer after every max-pool (VGG16) / stage (AlexNet)
# (nips2023_shape_vs_texture, cnns-inference-top-k/network_architecture.txt).
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_CONVS_TOPK = [0, 2, 6, 8, 12, 14, 16, 20, 22, 24, 28, 30, 32]
VGG16_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                  (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
ALEXNET_CONVS = [0, 3, 6, 8, 10]
ALEXNET_CONVS_TOPK = [0, 4, 8, 11, 14]
ALEXNET_SHAPES = [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]


def narrow_classifier(model: nn.Module, inputs: int, order: str) -> nn.Module:
    """Replace the classifier by one of the same layout (same key names) with HIDDEN-wide hidden layers."""
    first, second, last = nn.Linear(inputs, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 1000)
    layers = {"vgg": [first, nn.ReLU(), nn.Dropout(), second, nn.ReLU(), nn.Dropout(), last],
              "alexnet": [nn.Dropout(), first, nn.ReLU(), nn.Dropout(), second, nn.ReLU(), last]}[order]
    model.classifier = nn.Sequential(*layers)
    return model


def vgg16() -> nn.Module:
    with torch.device("meta"):  # skip initialising weights that every test overwrites
        vgg = torchvision.models.vgg16()
    return narrow_classifier(vgg, 512 * 7 * 7, "vgg").to_empty(device="cpu")


def alexnet() -> nn.Module:
    with torch.device("meta"):
        model = torchvision.models.alexnet()
    return narrow_classifier(model, 256 * 6 * 6, "alexnet").to_empty(device="cpu")


def classifier_tensors(prefix: str, indices: list[int], inputs: int) -> dict:
    shapes = [(HIDDEN, inputs), (HIDDEN, HIDDEN), (1000, HIDDEN)]
    state = {}
    for index, (rows, cols) in zip(indices, shapes):
        state[f"{prefix}classifier.{index}.weight"] = torch.randn(rows, cols)
        state[f"{prefix}classifier.{index}.bias"] = torch.randn(rows)
    return state


def vgg16_tensors(features: str, indices: list[int], prefix: str = "") -> dict:
    state = {}
    for index, (cin, cout) in zip(indices, VGG16_CHANNELS):
        state[f"{features}.{index}.weight"] = torch.randn(cout, cin, 3, 3)
        state[f"{features}.{index}.bias"] = torch.randn(cout)
    return {**state, **classifier_tensors(prefix, [0, 3, 6], 512 * 7 * 7)}


def alexnet_tensors(features: str, indices: list[int], prefix: str = "") -> dict:
    state = {}
    for index, shape in zip(indices, ALEXNET_SHAPES):
        state[f"{features}.{index}.weight"] = torch.randn(shape)
        state[f"{features}.{index}.bias"] = torch.randn(shape[0])
    return {**state, **classifier_tensors(prefix, [1, 4, 6], 256 * 6 * 6)}


def assert_features_loaded(model, file_state, features, file_indices, model_indices, prefix=""):
    params = dict(model.named_parameters())
    for theirs, ours in zip(file_indices, model_indices):
        for kind in ("weight", "bias"):
            assert torch.equal(params[f"features.{ours}.{kind}"], file_state[f"{features}.{theirs}.{kind}"]), \
                f"features.{ours}.{kind} is not the file's {features}.{theirs}.{kind}"
    for name, value in params.items():
        if name.startswith("classifier."):
            assert torch.equal(value, file_state[prefix + name]), name


# ----------------------------------------------------------------------------- real layouts

# arch: (model factory, tensors factory, dense conv indices, the authors' Top-K conv indices)
ARCHS = {"vgg16": (vgg16, vgg16_tensors, VGG16_CONVS, VGG16_CONVS_TOPK),
         "alexnet": (alexnet, alexnet_tensors, ALEXNET_CONVS, ALEXNET_CONVS_TOPK)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stylized_imagenet_files_load(tmp_path, arch):
    # texture-vs-shape: model.features = DataParallel(model.features); checkpoint["state_dict"] with
    # features.module.N.* and plain classifier.N.* keys, beside the ImageNet training script's bookkeeping.
    build, tensors, convs, _ = ARCHS[arch]
    state = tensors("features.module", convs)
    path = tmp_path / f"{arch}_train_60_epochs.pth.tar"
    torch.save({"epoch": 60, "arch": arch, "state_dict": state, "best_prec1": torch.tensor(52.3)}, path)
    assert_features_loaded(load_checkpoint(build(), path), state, "features.module", convs, convs)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_authors_topk_files_with_shifted_indices_load_into_dense_and_sparsified(tmp_path, arch):
    # The authors' topK_VGG / topK_AlexNet: DataParallel(model with TopKLayer inserted into features),
    # saved as a bare state_dict.
    build, tensors, convs, shifted = ARCHS[arch]
    state = tensors("module.features", shifted, prefix="module.")
    path = tmp_path / f"{arch}_topk.pth"
    torch.save(state, path)
    assert_features_loaded(load_checkpoint(build(), path), state, "module.features", shifted, convs, "module.")
    if arch == "alexnet":  # tracing VGG16 as well would only add seconds
        sparse = load_checkpoint(sparsify(build(), "paper", method="fx"), path)  # a GraphModule: names kept
        assert_features_loaded(sparse, state, "module.features", shifted, convs, "module.")


def test_a_sparsified_state_dict_loads_into_the_dense_model():
    source = alexnet()
    for parameter in source.parameters():
        nn.init.normal_(parameter)
    source = sparsify(source, "paper", method="fx")
    model = load_checkpoint(alexnet(), source)
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_whole_pickled_model_is_refused_with_the_explicit_way_out(tmp_path):
    saved = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    path = tmp_path / "whole.pt"
    torch.save(saved, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "a whole saved model" in message and "weights_only=False" in message
    assert "torch.nn.modules.container.Sequential" in message
    assert "In PyTorch 2.6" not in message  # torch's own text is not passed through
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    load_checkpoint(target, read_checkpoint(path, weights_only=False))
    assert torch.equal(target[2].weight, saved[2].weight)


@pytest.mark.parametrize("damage", ["truncated", "legacy_truncated", "empty", "text"])
def test_unreadable_files_name_the_file(tmp_path, damage):
    good = tmp_path / "good.pt"
    torch.save(nn.Linear(64, 64).state_dict(), good, _use_new_zipfile_serialization=damage != "legacy_truncated")
    data = {"truncated": good.read_bytes()[:900], "legacy_truncated": good.read_bytes()[:900], "empty": b"",
            "text": b"not a checkpoint\n"}[damage]
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as info:
        load_checkpoint(nn.Linear(64, 64), path)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is not a file"):
        read_checkpoint(tmp_path)


def test_wrong_architecture_lists_missing_unexpected_and_closest(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(torchvision.models.alexnet(), path)
    message = str(info.value)
    assert str(path) in message and "does not fit AlexNet (0 of its 16 keys found)" in message
    assert "missing from the checkpoint (16)" in message and "features.0.weight" in message
    assert "unexpected in the checkpoint (122)" in message and "bn1.running_mean" in message


def test_shape_mismatch_names_key_and_both_shapes():
    source = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(torchvision.models.resnet18(), source, strict=False)
    assert "fc.weight: (10, 512) vs (1000, 512)" in str(info.value)


def test_unwrap_containers_nested_and_module_anywhere():
    weight = torch.randn(3, 3)
    for wrapped in ({"state_dict": {"module.a.module.b.weight": weight}},
                    {"epoch": 3, "model": {"state_dict": {"a.b.weight": weight}}},
                    {"net": {"module.a.b.weight": weight}, "acc": 91.0},
                    {"g": {"a.b.weight": torch.zeros(1)}, "g_ema": {"a.b.weight": weight}}):
        assert list(unwrap_state_dict(wrapped)) == ["a.b.weight"]
        assert unwrap_state_dict(wrapped)["a.b.weight"] is weight
    assert unwrap_state_dict({"d": {"x": weight}, "g": {"y": weight}}, key="d") == {"x": weight}
    with pytest.raises(CheckpointError, match=r"keys \['epoch', 'acc'\]"):
        unwrap_state_dict({"epoch": 3, "acc": 1.0})
    with pytest.raises(CheckpointError, match="both mean 'a.weight'"):
        unwrap_state_dict({"module.a.weight": weight, "a.weight": weight})


def test_a_model_with_a_submodule_called_module_still_loads():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    source = Wrapper()
    target = load_checkpoint(Wrapper(), {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}})
    assert torch.equal(target.module.weight, source.module.weight)
    parallel = load_checkpoint(nn.DataParallel(Wrapper()), source.state_dict())
    assert torch.equal(parallel.module.module.weight, source.module.weight)


def test_key_map_renames_and_drops():
    source = {"body.0.weight_orig": torch.randn(4, 2), "body.0.bias": torch.randn(4), "extra.noise": torch.ones(1)}

    def old_names(key):
        return None if key.startswith("extra.") else key.replace("weight_orig", "weight").replace("body.", "")

    model = load_checkpoint(nn.Sequential(nn.Linear(2, 4)), source, key_map=old_names)
    assert torch.equal(model[0].weight, source["body.0.weight_orig"])
    with pytest.raises(CheckpointError, match="key_map sends two keys"):
        load_checkpoint(nn.Sequential(nn.Linear(2, 4)), source, key_map=lambda key: "0.weight")


def test_strict_false_loads_what_fits_and_warns():
    source = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 3)).state_dict()
    del source["1.bias"]
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="1.bias"):
        load_checkpoint(model, source, strict=False)
    assert torch.equal(model[1].weight, source["1.weight"])
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        load_checkpoint(model, source)


def test_fastgan_all_file_applies_g_ema_over_g():
    # FastGAN all_*.pth: 'g' is the raw generator's state_dict, 'g_ema' a list of its parameters in order.
    generator = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    raw = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in generator.state_dict().items()}
    ema = [torch.randn_like(p) for p in generator.parameters()]
    checkpoint = {"g": raw, "d": {"x": torch.ones(1)}, "g_ema": ema, "opt_g": {}, "opt_d": {}}
    load_checkpoint(generator, checkpoint)
    assert torch.equal(generator[0].weight, ema[0]) and torch.equal(generator[1].bias, ema[3])
    assert torch.equal(generator[1].running_mean, raw["1.running_mean"])
    load_checkpoint(generator, checkpoint, key="g")
    assert torch.equal(generator[0].weight, raw["0.weight"])
    with pytest.raises(CheckpointError, match="'g_ema' as a list"):
        unwrap_state_dict(checkpoint)
    with pytest.raises(CheckpointError, match="holds 3 tensors"):
        load_checkpoint(generator, {**checkpoint, "g_ema": ema[:3]})


def test_old_checkpoints_with_numpy_scalars_and_options_read(tmp_path):
    import argparse

    import numpy as np

    path = tmp_path / "old.pth"
    torch.save({"net": {"w": torch.ones(2)}, "acc": np.float64(91.5), "args": argparse.Namespace(lr=0.1)}, path)
    loaded = read_checkpoint(path)
    assert loaded["acc"] == 91.5 and loaded["args"].lr == 0.1


def test_safetensors_files(tmp_path):
    path = tmp_path / "model.safetensors"
    source = nn.Linear(3, 2)
    if importlib.util.find_spec("safetensors") is None:
        path.write_bytes(b"x")
        with pytest.raises(CheckpointError, match="pip install safetensors"):
            read_checkpoint(path)
        return
    from safetensors.torch import save_file

    save_file(source.state_dict(), path)
    assert torch.equal(load_checkpoint(nn.Linear(3, 2), path).weight, source.weight)


# ----------------------------------------------------------------------------- realignment, as a property

@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 4), min_size=1, max_size=5),
       inserted=st.lists(st.integers(0, 6), max_size=5), data=st.data())
def test_parameter_free_layers_inserted_anywhere_are_realigned(widths, inserted, data):
    channels = [2, *widths]
    dense = nn.Sequential(*[layer for cin, cout in zip(channels, channels[1:])
                            for layer in (nn.Conv2d(cin, cout, 1), nn.ReLU())])
    layers = list(nn.Sequential(*[nn.Conv2d(cin, cout, 1) for cin, cout in zip(channels, channels[1:])]))
    for position in inserted:  # the file's model: parameter-free layers at arbitrary places
        layers.insert(min(position, len(layers)), nn.Identity())
    saved = nn.Sequential(*layers)
    nested = data.draw(st.booleans())
    state = {("body.module." if nested else "module.") + k: v for k, v in saved.state_dict().items()}
    model = dense
    if nested:
        model = nn.Module()
        model.body = dense
    load_checkpoint(model, state)
    convs = [m for m in dense if isinstance(m, nn.Conv2d)]
    for mine, theirs in zip(convs, (m for m in saved if isinstance(m, nn.Conv2d))):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)


def test_realignment_refuses_layers_that_do_not_match_in_order():
    saved = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Identity(), nn.Conv2d(3, 3, 1))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 3))  # same count, other shape
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, saved.state_dict())
    assert "1.weight (closest: 2.weight)" in str(info.value)
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(2\)"):
        load_checkpoint(nn.Sequential(nn.Conv2d(2, 3, 1)), saved.state_dict())


def test_strict_false_still_refuses_a_file_with_nothing_in_common():
    with pytest.raises(CheckpointError, match=r"0 of its 2 keys found"):
        load_checkpoint(nn.Linear(2, 2), {"conv.weight": torch.ones(1)}, strict=False)


def test_whole_model_whose_code_is_missing_says_so(tmp_path):
    import pickle
    import sys
    import types

    module = types.ModuleType("h7_vanishing_models")

    class Net(nn.Linear):
        pass

    Net.__module__, Net.__qualname__ = module.__name__, "Net"
    module.Net = Net
    sys.modules[module.__name__] = module
    path = tmp_path / "whole.pt"
    torch.save(Net(2, 2), path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    del sys.modules[module.__name__]
    with pytest.raises(CheckpointError, match="not importable here"):
        read_checkpoint(path, weights_only=False)
