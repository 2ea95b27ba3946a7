"""FastGAN models: shapes, the registered "paper" preset at feat_32, noise switch, DiffAugment properties."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topk_plugin.recipes.fastgan_models import (PAPER_K, Discriminator, Generator, NoiseInjection, crop_part, diff_augment,
                                    small_size)
from topk_plugin import desparsify, get_preset, keep_count, sparsify, sparsity_report, topk_layers


@pytest.mark.parametrize("size", [64, 128, 256])
def test_generator_and_discriminator_shapes(size):
    generator, discriminator = Generator(size, ngf=4, nz=8), Discriminator(size, ndf=4)
    big, aux = generator(torch.randn(2, 8))
    assert big.shape == (2, 3, size, size) and aux.shape == (2, 3, small_size(size), small_size(size))
    assert big.abs().max() <= 1 and aux.abs().max() <= 1
    logits = discriminator(big, aux)
    logits_real, recon = discriminator(big, aux, part=3)
    assert logits.shape == logits_real.shape == (2, 50)  # two 5x5 patch maps
    assert [r.shape for r in recon] == [(2, 3, small_size(size), small_size(size))] * 3
    assert small_size(256) == small_size(1024) == 128


def test_bad_size_and_part_are_named():
    with pytest.raises(ValueError, match="size=100 is not supported"):
        Generator(100)
    with pytest.raises(ValueError, match="part=4"):
        crop_part(torch.zeros(1, 1, 4, 4), 4)


def test_crop_part_quadrants():
    x = torch.arange(16.).view(1, 1, 4, 4)
    assert crop_part(x, 0).flatten().tolist() == [0, 1, 4, 5]
    assert crop_part(x, 3).flatten().tolist() == [10, 11, 14, 15]


def test_paper_preset_puts_topk_after_the_32x32_block():
    generator = Generator(64, ngf=4, nz=8).eval()
    assert get_preset("paper", generator).arch == "fastgan"
    sparse = sparsify(generator, "paper")
    layers = topk_layers(sparse)
    assert list(layers) == ["feat_32"] and layers["feat_32"].k == PAPER_K == 0.05
    row = sparsity_report(sparse, torch.randn(3, 8))[0]
    assert row["shape"][-2:] == (32, 32) and row["count"] == keep_count(0.05, 1024) == 51
    # the 32x32 feature that reaches the next block keeps exactly K responses per channel
    seen = {}
    upsample = sparse.get_submodule("feat_64.0")  # first op of the next block
    upsample.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        out = sparse(torch.randn(3, 8))[0]
    assert seen["x"].shape[-1] == 32 and ((seen["x"] != 0).flatten(2).sum(-1) <= 51).all()
    assert set(sparse.state_dict()) == set(generator.state_dict())
    table = sparsify(generator, "paper", k=0.15)
    assert topk_layers(table)["feat_32"].k == 0.15
    dense = desparsify(sparse)
    with torch.no_grad():
        assert not torch.allclose(dense(torch.randn(3, 8))[0], out)


def test_noise_injection_is_switchable():
    quiet = Generator(64, ngf=4, nz=8, noise=False).eval()
    assert not any(isinstance(m, NoiseInjection) for m in quiet.modules())
    noisy = Generator(64, ngf=4, nz=8, noise=True).eval()
    injections = [m for m in noisy.modules() if isinstance(m, NoiseInjection)]
    assert injections
    z = torch.randn(1, 8)
    with torch.no_grad():
        assert torch.equal(noisy(z)[0], noisy(z)[0])  # zero-initialised strength: no noise yet
        for m in injections:
            m.weight.fill_(1.0)
        assert not torch.equal(noisy(z)[0], noisy(z)[0])
        assert torch.equal(quiet(z)[0], quiet(z)[0])


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 12), st.integers(4, 12), st.integers(0, 2 ** 16))
def test_translation_is_a_bounded_shift_with_zero_fill(h, w, seed):
    torch.manual_seed(seed)
    x = torch.arange(1., 2 * 3 * h * w + 1).view(2, 3, h, w)
    y = diff_augment(x, "translation")
    sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    for img, out in zip(x, y):
        shifted = []
        for dy in range(-sy, sy + 1):
            for dx in range(-sx, sx + 1):
                padded = torch.nn.functional.pad(img, (sx, sx, sy, sy))
                shifted.append(torch.equal(out, padded[:, sy + dy:sy + dy + h, sx + dx:sx + dx + w]))
        assert any(shifted)


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 12), st.integers(0, 2 ** 16))
def test_cutout_zeroes_one_rectangle_at_most_half_size(h, seed):
    torch.manual_seed(seed)
    x = torch.rand(3, 2, h, h) + 0.5
    y = diff_augment(x, "cutout")
    for img, out in zip(x, y):
        hole = out[0] == 0
        assert torch.equal(out[:, ~hole], img[:, ~hole]) and (out[:, hole] == 0).all()
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert hole.sum() == len(rows) * len(cols)  # a rectangle
        assert len(rows) <= int(h * 0.5 + 0.5) and len(cols) <= int(h * 0.5 + 0.5)


def test_diff_augment_is_differentiable_and_rejects_unknown_policies():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    diff_augment(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'flip' is not supported"):
        diff_augment(x, "color,flip")
