"""FastGAN models: shapes, the official D size, SE-gate/output/noise variants, upstream checkpoints, DiffAugment."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topk_plugin import desparsify, keep_count, list_presets, sparsify, topk_layers
from topk_plugin.checkpoints import CheckpointError, load_checkpoint
from topk_plugin.recipes import fastgan_models
from topk_plugin.recipes.fastgan_models import (Discriminator, Generator, GeneratorConfig, NoiseInjection,
                                                SkipLayerExcitation, crop_part, diff_augment, small_size,
                                                upstream_generator_config, upstream_generator_state,
                                                upstream_key_map)


@pytest.mark.parametrize("size", [64, 128])
def test_generator_and_discriminator_shapes(size):
    generator, discriminator = Generator(size, ngf=4, nz=8), Discriminator(size, ndf=4)
    big, aux = generator(torch.randn(2, 8))
    assert big.shape == (2, 3, size, size) and aux.shape == (2, 3, small_size(size), small_size(size))
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


def test_paper_preset_puts_topk_after_feat_32_keeping_k_per_channel_and_no_state():
    generator = Generator(64, ngf=4, nz=8).eval()
    sparse = sparsify(generator, "paper")  # the core preset, found from the generator itself
    assert {p: (layer.k, layer.mode) for p, layer in topk_layers(sparse).items()} == {"feat_32": (0.05, "topk")}
    assert keep_count(0.05, 32 * 32) == 51  # the fork: max(int(0.05 * 32 * 32), 1)
    seen = {}
    sparse.get_submodule("feat_64.0").register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        out = sparse(torch.randn(3, 8))[0]
    assert seen["x"].shape[-1] == 32 and ((seen["x"] != 0).flatten(2).sum(-1) == 51).all()
    assert set(sparse.state_dict()) == set(generator.state_dict())
    with torch.no_grad():
        assert not torch.allclose(desparsify(sparse)(torch.randn(3, 8))[0], out)


def test_importing_the_models_registers_no_preset():
    # the FastGAN preset lives in the core table; nothing registered from this recipe module's import
    assert [p.name for p in list_presets() if p.matches.__module__ == fastgan_models.__name__] == []


def test_discriminator_matches_the_official_parameter_count():
    count = sum(p.numel() for p in Discriminator(256, ndf=64).parameters())
    assert count == 11_526_160  # official FastGAN at ndf=64, 256 px (decoders fixed at width 32)


def test_the_1024_discriminator_normalises_its_second_strided_convolution():
    """Official FastGAN at 1024 px: conv, LeakyReLU, conv, BatchNorm, LeakyReLU before the 256 px features."""
    stem = Discriminator(1024, ndf=64).from_big
    kinds = [type(m).__name__.removeprefix("Parametrized") for m in stem]  # spectral-normed convolutions
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU"]
    assert stem[3].num_features == stem[2].out_channels
    assert sum(p.numel() for p in Discriminator(1024, ndf=64).parameters()) == 11_528_192
    assert [type(m).__name__.removeprefix("Parametrized") for m in Discriminator(512, ndf=64).from_big] == [
        "Conv2d", "LeakyReLU"]


def test_se_gate_none_is_the_raw_conv_output_and_sigmoid_squashes_it():
    torch.manual_seed(0)
    raw_gate = SkipLayerExcitation(4, 6, gate="none").eval()
    squashed = SkipLayerExcitation(4, 6, gate="sigmoid").eval()
    squashed.load_state_dict(raw_gate.state_dict())
    small, big = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        gate = raw_gate.gate[:4](small)  # pool, conv, SiLU, conv
        assert torch.equal(raw_gate(small, big), big * gate)
        assert torch.allclose(squashed(small, big), big * torch.sigmoid(gate))
    assert (gate < 0).any()  # an ungated SLE can flip signs, a sigmoid gate never does
    with pytest.raises(ValueError, match="se_gate='relu'"):
        SkipLayerExcitation(4, 6, gate="relu")


def test_output_fastgan_is_raw_below_1024_and_tanh_applies_tanh():
    raw = Generator(64, ngf=4, nz=8, output="fastgan").eval()
    with torch.no_grad():
        raw.feat_64[2].weight.mul_(1e8)  # the last BatchNorm's scale: outputs well beyond tanh's linear range
    squashed = Generator(64, ngf=4, nz=8, output="tanh").eval()
    squashed.load_state_dict(raw.state_dict())
    z = torch.randn(2, 8)
    with torch.no_grad():
        (big, small), (tbig, tsmall) = raw(z), squashed(z)
    assert torch.allclose(tbig, torch.tanh(big)) and torch.allclose(tsmall, torch.tanh(small))
    assert not torch.allclose(tbig, big)
    assert Generator(1024, ngf=2, nz=8).tanh and not Generator(512, ngf=2, nz=8).tanh


def test_noise_injection_is_switchable():
    quiet = Generator(64, ngf=4, nz=8).eval()
    assert not any(isinstance(m, NoiseInjection) for m in quiet.modules())  # the paper's default: off
    noisy = Generator(64, ngf=4, nz=8, noise=True).eval()
    injections = [m for m in noisy.modules() if isinstance(m, NoiseInjection)]
    assert len(injections) == 4  # two in each doubled block: feat_8, feat_32
    z = torch.randn(1, 8)
    with torch.no_grad():
        assert torch.equal(noisy(z)[0], noisy(z)[0])  # zero-initialised strength: no noise yet
        for m in injections:
            m.weight.fill_(1.0)
        assert not torch.equal(noisy(z)[0], noisy(z)[0])
        assert torch.equal(quiet(z)[0], quiet(z)[0])


# ----------------------------------------------------------------------------- upstream checkpoints
# Official FastGAN (models.py) key layout, written out by hand: torch.nn.utils.spectral_norm's
# weight_orig/weight_u/weight_v, InitLayer's init.init, SEBlock's main, to_128; the fork's --nonoise
# blocks name their layers conv1/noise1/bn1/conv2/noise2/bn2.

def _sn(state, prefix, shape, out_dim=0, g=None):
    weight = torch.randn(shape, generator=g) * 0.2
    # a converged power iteration: the top singular vectors (the reduced SVD has them, in a fraction of the time)
    left, _, right = torch.linalg.svd(weight.transpose(0, out_dim).flatten(1), full_matrices=False)
    state[prefix + ".weight_orig"] = weight
    state[prefix + ".weight_u"], state[prefix + ".weight_v"] = left[:, 0], right[0]


def _bn(state, prefix, c, g):
    state[prefix + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    state[prefix + ".bias"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + ".running_var"] = 1 + torch.rand(c, generator=g)
    state[prefix + ".num_batches_tracked"] = torch.tensor(7)


def upstream_state(ngf=4, nz=8, layout="official", seed=0):
    """A 256 px upstream generator state_dict with random tensors in the real key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    nfc = {r: int(m * ngf) for r, m in {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5}.items()}
    state = {}
    _sn(state, "init.init.0", (nz, nfc[4] * 2, 4, 4), out_dim=1, g=g)
    _bn(state, "init.init.1", nfc[4] * 2, g)
    for r in (8, 16, 32, 64, 128, 256):
        cin, cout = nfc[r // 2], nfc[r]
        if r in (16, 64, 256):
            _sn(state, f"feat_{r}.1", (cout * 2, cin, 3, 3), g=g)
            _bn(state, f"feat_{r}.2", cout * 2, g)
            continue
        names = ("1", "2", "3", "5", "6", "7") if layout == "official" else (
            "conv1", "noise1", "bn1", "conv2", "noise2", "bn2")
        for (conv, noise, bn), c_in in zip((names[:3], names[3:]), (cin, cout)):
            _sn(state, f"feat_{r}.{conv}", (cout * 2, c_in, 3, 3), g=g)
            state[f"feat_{r}.{noise}.weight"] = torch.zeros(1)
            _bn(state, f"feat_{r}.{bn}", cout * 2, g)
    for big, small in ((64, 4), (128, 8), (256, 16)):
        _sn(state, f"se_{big}.main.1", (nfc[big], nfc[small], 4, 4), g=g)
        _sn(state, f"se_{big}.main.3", (nfc[big], nfc[big], 1, 1), g=g)
    _sn(state, "to_128", (3, nfc[128], 1, 1), g=g)
    _sn(state, "to_big", (3, nfc[256], 3, 3), g=g)
    return state


def reference_forward(state, z, se_gate):
    """Official FastGAN's forward at 256 px in eval mode, written from its models.py over the raw state_dict."""
    F = torch.nn.functional

    def weight(prefix, out_dim=0):
        w, u, v = (state[prefix + s] for s in (".weight_orig", ".weight_u", ".weight_v"))
        return w / (u @ w.transpose(0, out_dim).flatten(1) @ v)

    def bn(x, prefix):
        return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, 1e-5)

    def up(x, prefix, comp):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        convs = (("conv1", "bn1"), ("conv2", "bn2")) if prefix + ".conv1.weight_orig" in state else (
            ("1", "3"), ("5", "7")) if comp else (("1", "2"),)
        for conv, norm in convs:
            x = F.glu(bn(F.conv2d(x, weight(f"{prefix}.{conv}"), padding=1), f"{prefix}.{norm}"), 1)
        return x

    def se(small, big, prefix):
        y = F.silu(F.conv2d(F.adaptive_avg_pool2d(small, 4), weight(prefix + ".main.1")))
        y = F.conv2d(y, weight(prefix + ".main.3"))
        return big * (torch.sigmoid(y) if se_gate == "sigmoid" else y)

    f4 = F.glu(bn(F.conv_transpose2d(z.view(len(z), -1, 1, 1), weight("init.init.0", 1)), "init.init.1"), 1)
    f8 = up(f4, "feat_8", True)
    f16 = up(f8, "feat_16", False)
    f32 = up(f16, "feat_32", True)
    f64 = se(f4, up(f32, "feat_64", False), "se_64")
    f128 = se(f8, up(f64, "feat_128", True), "se_128")
    f256 = se(f16, up(f128, "feat_256", False), "se_256")
    return F.conv2d(f256, weight("to_big"), padding=1), F.conv2d(f128, weight("to_128"))


def _close(mine, theirs):
    return torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def _load(state, **choices):
    config = upstream_generator_config(state, **choices)
    generator = config.build()
    load_checkpoint(generator, state, key_map=upstream_key_map(state, noise=config.noise))
    return generator.eval(), config


@pytest.mark.parametrize("layout, se_gate", [("official", "sigmoid"), ("fork", "none")])
def test_upstream_generator_loads_and_matches_the_official_forward(layout, se_gate):
    state = upstream_state(layout=layout)
    generator, config = _load(state, se_gate=se_gate)
    assert config == GeneratorConfig(size=256, ngf=4, nz=8, noise=False, se_gate=se_gate, output="fastgan")
    z = torch.randn(2, 8)
    with torch.no_grad():
        ours, reference = generator(z), reference_forward(state, z, se_gate)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape and _close(mine, theirs)
    mapped = generator.state_dict()
    assert torch.equal(mapped["init.0.parametrizations.weight.original"], state["init.init.0.weight_orig"])
    assert torch.equal(mapped["se_128.gate.3.parametrizations.weight.0._u"], state["se_128.main.3.weight_u"])
    assert torch.equal(mapped["to_small.parametrizations.weight.original"], state["to_128.weight_orig"])


def test_all_pth_g_ema_list_replaces_the_parameters_in_upstream_order():
    raw = upstream_state(seed=1)
    params = [k for k in raw if not k.endswith((".weight_u", ".weight_v", ".running_mean", ".running_var",
                                                ".num_batches_tracked"))]
    # EMA weights: scaled copies, so the stored spectral-norm vectors stay right for them
    ema = {k: raw[k] * (1.5 + 0.01 * i) for i, k in enumerate(params)}
    checkpoint = {"g": raw, "d": {}, "g_ema": [ema[k] for k in params], "opt_g": {}, "opt_d": {}}
    state = upstream_generator_state(checkpoint)
    expected = {**raw, **ema}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    generator, _ = _load(state, se_gate="sigmoid")
    z = torch.randn(2, 8)
    with torch.no_grad():
        image = generator(z)[0]
        assert _close(image, reference_forward(expected, z, "sigmoid")[0])
        assert not _close(image, reference_forward(raw, z, "sigmoid")[0])
    with pytest.raises(CheckpointError, match="'g_ema'"):
        upstream_generator_state({**checkpoint, "g_ema": checkpoint["g_ema"][:-1]})


def test_trained_noise_weights_need_a_noisy_generator():
    state = upstream_state()
    state["feat_32.6.weight"] = torch.tensor([0.3])
    generator, config = _load(state)  # read from the weights: noise on
    assert config.noise and generator.get_submodule("feat_32.6").weight.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"feat_32\.6\.weight = 0\.3.*--noise"):
        upstream_key_map(state, noise=False)


def test_what_does_not_map_is_listed():
    state = upstream_state()
    state["feat_16.9.weight_orig"] = state.pop("feat_16.1.weight_orig")
    with pytest.raises(CheckpointError, match=r"(?s)missing.*feat_16\.1\.parametrizations\.weight\.original"
                                              r".*unexpected.*feat_16\.9\.parametrizations\.weight\.original"):
        _load(state)
    with pytest.raises(CheckpointError, match="not a FastGAN generator"):
        upstream_generator_config({"fc.weight": torch.zeros(1)})


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
