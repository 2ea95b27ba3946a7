"""topk_plugin.recipes.vgg_features: the layer table, taps, run config, weights, images and the image optimiser."""
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from topk_plugin import TopK, get_preset, topk, topk_layers
from topk_plugin.recipes.vgg_features import (LAYERS, VGGRunConfig, VGGTaps, build_extractor, check_layers, gram,
                                              load_features, optimise_image, set_topk_mode, square_image)

KINDS = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}


def _meta_model(arch):
    with torch.device("meta"):  # module structure only, no weight initialisation
        return getattr(torchvision.models, arch)()


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_layer_table_names_every_torchvision_module(arch):
    features = _meta_model(arch).features
    assert str(load_features(arch, None)[0]) == str(features)
    table = LAYERS[arch]
    assert sorted(table.values()) == list(range(len(features)))
    for name, index in table.items():
        kind = name.rstrip("0123456789_")
        assert isinstance(features[index], KINDS[kind]), (name, index)


def test_layer_table_pools_are_the_core_vgg16_preset():
    preset = get_preset("paper", _meta_model("vgg16"))
    pools = [f"features.{LAYERS['vgg16'][f'pool{i}']}" for i in range(1, 6)]
    assert tuple(pools) == tuple(preset.spec.positions)
    assert [LAYERS["vgg19"][f"pool{i}"] for i in range(1, 6)] == [4, 9, 18, 27, 36]
    assert LAYERS["vgg19"]["relu1_1"] == 1


def test_check_layers_names_the_bad_layer_and_the_choices():
    with pytest.raises(ValueError, match=r"pool6.*relu1_1"):
        check_layers("vgg19", ["pool1", "pool6"])
    with pytest.raises(ValueError, match="each once"):
        check_layers("vgg19", ["pool1", "pool1"])
    with pytest.raises(ValueError, match="at least one"):
        check_layers("vgg19", [])


def test_taps_read_the_true_activations_and_do_not_alter_the_trunk():
    torch.manual_seed(0)
    features, _ = load_features("vgg16", None)
    x = torch.rand(2, 3, 32, 32)
    taps = VGGTaps(features, "vgg16", ["conv1_1", "relu1_1", "pool2"])
    out = taps(x)
    assert len(taps.features) == LAYERS["vgg16"]["pool2"] + 1
    h = (x - taps.mean) / taps.std
    expected = {}
    for i, module in enumerate(features[:10]):
        h = module(h)
        expected[i] = h.clone()
    # conv1_1 is followed by a ReLU: the tap must hold the pre-ReLU values (no in-place overwrite).
    assert (out["conv1_1"] < 0).any()
    for name in out:
        torch.testing.assert_close(out[name], expected[LAYERS["vgg16"][name]])


def test_extractor_masks_are_the_core_topk_in_every_mode():
    torch.manual_seed(0)
    features, _ = load_features("vgg19", None)
    layers = ["relu1_1", "pool2"]
    extractor = build_extractor(features, "vgg19", layers, 0.05)
    assert {p: type(l) for p, l in topk_layers(extractor).items()} == {"taps.relu1_1": TopK, "taps.pool2": TopK}
    torch.manual_seed(0)
    x = torch.rand(1, 3, 48, 48)
    dense = VGGTaps(features, "vgg19", layers)(x)
    for mode in ("identity", "topk", "non_topk"):
        set_topk_mode(extractor, mode)
        out = extractor(x)
        for name in layers:
            assert torch.equal(out[name], topk(dense[name], 0.05, mode=mode)), (mode, name)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_gram_is_the_normalised_channel_correlation():
    f = torch.randn(2, 3, 4, 5)
    expected = torch.einsum("nchw,ndhw->ncd", f, f) / (3 * 4 * 5)
    torch.testing.assert_close(gram(f), expected)


def _config(**changes):
    values = dict(data="images", out="out", layers=("relu1_1", "pool2"), k=0.05, steps=2, lr=1.0,
                  random_weights=True)
    return VGGRunConfig(**{**values, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, r"k=0"), ({"k": 1.5}, r"k=1\.5"), ({"k": float("nan")}, r"k=nan"),
    ({"steps": 0}, r"steps=0"), ({"lbfgs_iters": -1}, r"lbfgs_iters=-1"), ({"images": 0}, r"images=0"),
    ({"size": 2.5}, r"size=2\.5"), ({"lr": 0.0}, r"lr=0\.0"), ({"arch": "vgg11"}, r"vgg11.*vgg16"),
    ({"layers": ("pool6",)}, r"pool6"),
    ({"size": 8, "layers": ("pool4",)}, r"size=8.*pool4.*16 px"),
    ({"random_weights": False}, r"no VGG weights.*IMAGENET1K_V1.*--weights PATH.*--random-weights"),
    ({"weights": "IMAGENET1K_V1"}, r"both"),
])
def test_config_names_the_bad_value(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_config_accepts_the_smallest_valid_run():
    config = _config(size=4, layers=["relu1_1", "pool2"], k=3)
    assert config.layers == ("relu1_1", "pool2") and config.asdict()["k"] == 3


def test_weights_name_must_be_a_file_or_a_torchvision_name(tmp_path):
    with pytest.raises(SystemExit, match="neither a file nor"):
        load_features("vgg19", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="vgg11"):
        load_features("vgg11", None)


def test_weights_load_from_a_user_file(tmp_path):
    saved = load_features("vgg16", None)[0].state_dict()
    full = tmp_path / "vgg16.pth"  # a whole model's state_dict: the classifier is ignored
    torch.save({**{f"features.{k}": v for k, v in saved.items()}, "classifier.0.weight": torch.zeros(2, 2)}, full)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, wrapped)
    for path in (full, wrapped):
        features, source = load_features("vgg16", str(path))
        assert source == str(path.resolve())
        assert features.state_dict().keys() == saved.keys()
        assert all(torch.equal(features.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(SystemExit, match="does not fit torchvision vgg19"):
        load_features("vgg19", str(full))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="junk.pth.*not a PyTorch checkpoint"):
        load_features("vgg16", str(tmp_path / "junk.pth"))


def test_torchvision_weights_load_through_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # offline: torchvision finds the file in its cache
    saved = load_features("vgg16", None)[0].state_dict()
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save({f"features.{k}": v for k, v in saved.items()}, tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    for name in ("DEFAULT", "IMAGENET1K_V1", "VGG16_Weights.IMAGENET1K_V1"):
        features, source = load_features("vgg16", name)
        assert source == "torchvision:VGG16_Weights.IMAGENET1K_V1"
        assert all(torch.equal(features.state_dict()[k], v) for k, v in saved.items())


def test_images_are_loaded_square_and_a_truncated_one_is_named(tmp_path, shared_data):
    path = sorted((shared_data / "few-shot" / "jeep").iterdir())[0]
    image = square_image(path, 40)
    assert image.shape == (1, 3, 40, 40) and 0 <= image.min() and image.max() <= 1
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit, match="cut.jpg"):
        square_image(truncated, 40)


def test_importing_the_recipes_does_not_import_matplotlib():
    code = ("import sys, topk_plugin.recipes.texture_synthesis, topk_plugin.recipes.reconstruct; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_optimise_image_descends_stays_in_range_and_is_seeded():
    goal = torch.linspace(-0.5, 1.5, 48).reshape(1, 3, 4, 4)

    def loss(image):
        return (image - goal).square().sum()

    runs = [optimise_image(loss, goal.shape, steps=3, lbfgs_iters=3, lr=1.0, seed=7, device=torch.device("cpu"),
                           desc="t") for _ in range(2)]
    (image, losses), (again, _) = runs
    assert torch.equal(image, again)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert 0 <= image.min() and image.max() <= 1
