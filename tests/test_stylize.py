import csv

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from topk_plugin.recipes.adain import AdaIN, adaptive_instance_norm, build_decoder, build_encoder, channel_stats, load_adain
from topk_plugin.recipes.stylize import main


def _conv_keys(net):
    return [int(k.split(".")[0]) for k in net.state_dict() if k.endswith("weight")]


def test_networks_follow_the_pytorch_adain_port_layout():
    encoder, decoder = build_encoder(), build_decoder()
    # Layer indices of the port's vgg_normalised (up to relu4_1) and decoder state dicts.
    assert _conv_keys(encoder) == [0, 2, 5, 9, 12, 16, 19, 22, 25, 29]
    assert _conv_keys(decoder) == [1, 5, 8, 11, 14, 18, 21, 25, 28]
    assert len(encoder) == 31 and isinstance(encoder[30], torch.nn.ReLU)
    feat = encoder(torch.rand(1, 3, 64, 48))
    assert feat.shape == (1, 512, 8, 6)
    assert decoder(feat).shape == (1, 3, 64, 48)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(3, 9), st.floats(0.1, 5.0), st.floats(-3.0, 3.0))
def test_adain_output_takes_the_style_statistics(channels, side, scale, shift):
    content = torch.randn(2, channels, side, side + 1, dtype=torch.float64)
    style = torch.randn(2, channels, side + 2, side, dtype=torch.float64) * scale + shift
    mean, std = channel_stats(adaptive_instance_norm(content, *channel_stats(style)))
    s_mean, s_std = channel_stats(style)
    assert torch.allclose(mean, s_mean, atol=1e-6)
    assert torch.allclose(std, s_std, rtol=1e-3, atol=1e-3)


def test_alpha_blends_content_and_style_features():
    torch.manual_seed(0)
    net = AdaIN().eval()
    content, style = torch.rand(1, 3, 37, 45), torch.rand(1, 3, 40, 40)
    stats = net.style_stats(style)
    with torch.no_grad():
        plain = net.decoder(net.encoder(content))
    plain = torch.nn.functional.interpolate(plain, size=(37, 45), mode="bilinear", align_corners=False).clamp(0, 1)
    assert torch.allclose(net(content, stats, alpha=0.0), plain, atol=1e-6)
    out = net(content, stats, alpha=0.5)
    assert out.shape == content.shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="alpha=1.5"):
        net(content, stats, alpha=1.5)


def test_loader_takes_the_full_vgg_file_and_rejects_wrong_files(tmp_path):
    full_vgg = {**build_encoder().state_dict(), "31.weight": torch.zeros(512, 512, 3, 3), "31.bias": torch.zeros(512)}
    decoder = build_decoder().state_dict()
    torch.save(full_vgg, tmp_path / "vgg_normalised.pth")
    torch.save(decoder, tmp_path / "decoder.pth")
    net = load_adain(tmp_path / "vgg_normalised.pth", tmp_path / "decoder.pth")
    assert torch.equal(net.encoder[29].weight, full_vgg["29.weight"])
    assert torch.equal(net.decoder[28].bias, decoder["28.bias"])
    with pytest.raises(SystemExit, match="--vgg: .*layout of the PyTorch AdaIN port"):
        load_adain(tmp_path / "decoder.pth", tmp_path / "decoder.pth")
    with pytest.raises(SystemExit, match="--decoder: AdaIN decoder weights not found"):
        load_adain(tmp_path / "vgg_normalised.pth", tmp_path / "nope.pth")


def test_cli_builds_a_marked_stylized_copy(shared_data, tmp_path):
    content = tmp_path / "content"
    for name, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (content / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (90, 60), color).save(content / name / f"{name}{i}.jpg")
    out = main(["--data", str(content), "--styles", str(shared_data / "style-targets"), "--random-weights",
                "--smoke", "--out", str(tmp_path / "out")])
    with open(out / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == ["cat/cat0.png", "cat/cat1.png", "dog/dog0.png", "dog/dog1.png"]
    styles = {p.name for p in (shared_data / "style-targets").iterdir()}
    assert {r["style"] for r in rows} <= styles
    with Image.open(out / "cat" / "cat0.png") as image:
        assert image.size == (96, 64)  # the shorter side resized to --size 64, aspect kept
    assert (out / "MEANINGLESS.txt").is_file() and (out / "preview.png").is_file()


def test_cli_refuses_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="AdaIN needs trained weights"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
