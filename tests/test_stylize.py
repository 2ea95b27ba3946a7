import csv

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.utils import save_image as torchvision_save_image

from topk_plugin.recipes.adain import (AdaIN, adaptive_instance_norm, build_decoder, build_encoder, channel_stats,
                                       load_adain)
from topk_plugin.recipes.stylize import StyleSettings, image_tensor, main, save_image


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


def test_alpha_blends_content_and_style_features_at_the_decoders_size():
    torch.manual_seed(0)
    net = AdaIN().eval()
    content, style = torch.rand(1, 3, 37, 45), torch.rand(1, 3, 40, 40)
    stats = net.style_stats(style)
    with torch.no_grad():
        plain = net.decoder(net.encoder(content)).clamp(0, 1)
    # As the port: ceil-mode pooling takes 37x45 to 5x6, the decoder gives 40x48, and nothing resizes it back.
    assert plain.shape == (1, 3, 40, 48)
    assert torch.allclose(net(content, stats, alpha=0.0), plain, atol=1e-6)
    with torch.no_grad():
        feat = net.encoder(content)
        half = net.decoder(0.5 * adaptive_instance_norm(feat, *stats) + 0.5 * feat).clamp(0, 1)
    assert torch.allclose(net(content, stats, alpha=0.5), half, atol=1e-6)
    with pytest.raises(ValueError, match="alpha=1.5"):
        net(content, stats, alpha=1.5)


def test_loader_takes_the_ports_files_and_names_the_bad_one(tmp_path):
    full_vgg = {**build_encoder().state_dict(), "31.weight": torch.zeros(512, 512, 3, 3), "31.bias": torch.zeros(512)}
    decoder = build_decoder().state_dict()
    torch.save(full_vgg, tmp_path / "vgg_normalised.pth")
    torch.save({f"module.{k}": v for k, v in decoder.items()}, tmp_path / "decoder.pth")  # a DataParallel save
    net = load_adain(tmp_path / "vgg_normalised.pth", tmp_path / "decoder.pth")
    assert torch.equal(net.encoder[29].weight, full_vgg["29.weight"])
    assert torch.equal(net.decoder[28].bias, decoder["28.bias"])
    with pytest.raises(SystemExit, match=r"(?s)--vgg .*decoder.pth: .*does not fit.*vgg_normalised.pth"):
        load_adain(tmp_path / "decoder.pth", tmp_path / "decoder.pth")
    with pytest.raises(SystemExit, match=r"--decoder .*nope.pth: .*does not exist"):
        load_adain(tmp_path / "vgg_normalised.pth", tmp_path / "nope.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "decoder.pth").read_bytes()[:5000])
    with pytest.raises(SystemExit, match=r"--decoder .*cut.pth: .*truncated"):
        load_adain(tmp_path / "vgg_normalised.pth", tmp_path / "cut.pth")


def test_images_are_read_and_saved_as_the_port_does(tmp_path):
    Image.new("RGB", (90, 60), (10, 200, 30)).save(tmp_path / "c.png")
    port = StyleSettings()
    assert (port.content_size, port.style_size, port.crop, port.alpha) == (512, 512, False, 0.5)
    assert image_tensor(tmp_path / "c.png", port.content_size).shape == (1, 3, 512, 768)  # shorter side, aspect kept
    assert image_tensor(tmp_path / "c.png", 40, crop=True).shape == (1, 3, 40, 40)
    assert image_tensor(tmp_path / "c.png", 0).shape == (1, 3, 60, 90)  # 0 keeps the size
    image = torch.rand(3, 9, 7)
    save_image(image, tmp_path / "ours.png")
    torchvision_save_image(image, tmp_path / "port.png")  # the port's writer: round half up to 8 bits
    with Image.open(tmp_path / "ours.png") as ours, Image.open(tmp_path / "port.png") as port_image:
        assert ours.tobytes() == port_image.tobytes()


def _content(root):
    for name, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (90, 60), color).save(root / name / f"{name}{i}.jpg")
    return root


def test_cli_stylizes_every_content_with_every_style_and_marks_random_weights(shared_data, tmp_path):
    content = _content(tmp_path / "content")
    argv = ["--data", str(content), "--styles", str(shared_data / "style-targets"), "--random-weights", "--smoke",
            "--out", str(tmp_path / "out")]
    out = main(argv)
    with open(out / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    styles = sorted(p for p in (shared_data / "style-targets").iterdir())
    expected = [f"{name}/{name}{i}_stylized_{s.stem}.jpg" for name in ("cat", "dog") for i in range(2) for s in styles]
    assert [r["image"] for r in rows] == expected
    with Image.open(out / "cat" / f"cat0_stylized_{styles[0].stem}.jpg") as image:
        assert image.size == (48, 32) and image.format == "JPEG"  # shorter side resized to the smoke 32
    for name in ("MEANINGLESS.txt", "preview.png", "preview.pdf", "config.json", "run.json"):
        assert (out / name).is_file(), name
    with pytest.raises(SystemExit, match="already holds an earlier run"):
        main(argv)
    again = main([*argv, "--overwrite", "--style-choice", "random", "--format", "png"])
    with open(again / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["image"].endswith(".png") for r in rows)  # one seeded style per image
    assert not list(again.glob("*/*.jpg"))  # --overwrite cleared the earlier run


def test_cli_refuses_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="AdaIN needs trained weights"):
        main(["--data", str(_content(tmp_path / "content")), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unreadable_content_image_is_named_or_skipped(shared_data, tmp_path):
    content = _content(tmp_path / "content")
    (content / "cat" / "cat0.jpg").write_bytes((content / "cat" / "cat1.jpg").read_bytes()[:200])
    argv = ["--data", str(content), "--styles", str(shared_data / "style-targets"), "--random-weights", "--smoke",
            "--style-choice", "random", "--max-per-class", "3"]
    with pytest.raises(SystemExit, match=r"cannot read image .*cat0.jpg"):
        main([*argv, "--out", str(tmp_path / "o1")])
    out = main([*argv, "--out", str(tmp_path / "o2"), "--skip-bad-images"])
    assert (out / "skipped_images.txt").read_text().strip() == str(content / "cat" / "cat0.jpg")
    assert len(list(out.glob("cat/*"))) == 2 and len(list(out.glob("dog/*"))) == 3
