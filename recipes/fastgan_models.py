"""FastGAN (Liu et al., ICLR 2021) as the paper's authors ran it: generator, discriminator, DiffAugment.

Written from the paper and checked against the official code (odegeasslbc/FastGAN-pytorch) and the
authors' fork (Crazy-Jack/nips2023_shape_vs_texture, ``few-shot-img-syn/TopKGen``). A 4x4 init layer
from noise (GLU), up-sampling blocks with skip-layer excitation (SLE) up to ``size``, optional noise
injection and an auxiliary 128 px output; a discriminator whose 8x8 feature and a random quadrant of its
16x16 feature are decoded back to images (its self-supervised reconstruction loss); DiffAugment.

Generator blocks are named by the resolution they output (``feat_8`` ... ``feat_1024``), as in the
official code, so the paper's Top-K position is ``feat_32`` (the core preset ``"paper"``:
``sparsify(generator, "paper")``, 5% kept). Where the two upstream codes differ the
choice is a constructor argument (``GeneratorConfig`` field); the defaults are the fork's (the paper's):

* ``se_gate``: ``"none"`` -- the fork's SLE multiplies by the raw 1x1-conv output (its ``nn.Sigmoid``
  is built but never called); ``"sigmoid"`` -- the official gate.
* ``noise``: ``False`` -- the paper's runs pass ``--nonoise`` (and the fork's injection is disabled anyway).
* ``output``: ``"fastgan"`` -- raw conv outputs at 256 and 512 px, ``tanh`` only at 1024 px, as both
  upstream codes; ``"tanh"`` -- ``tanh`` at every size.

``upstream_generator_state``, ``upstream_generator_config`` and ``upstream_key_map`` load generator files
from either upstream code (official ``{'g', 'd'}`` / ``all_*.pth``, the fork's ``best_all_*.pth``) with
``topk_plugin.checkpoints.load_checkpoint``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from topk_plugin.checkpoints import CheckpointError, unwrap_state_dict

SIZES = (64, 128, 256, 512, 1024)
SE_GATES = ("none", "sigmoid")
OUTPUTS = ("fastgan", "tanh")
GEN_WIDTH = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DISC_WIDTH = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DECODER_BASE = 32  # the discriminator's decoders have a fixed width in the official code, whatever ndf is


def check_size(size: int) -> int:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not supported; choose one of {list(SIZES)}")
    return size


def check_choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")
    return value


def small_size(size: int) -> int:
    """Resolution of the auxiliary output and of the reconstructions: 128, or half of smaller images."""
    return min(128, check_size(size) // 2)


def _normal_init(module: nn.Module) -> nn.Module:
    """The upstream ``weights_init`` of a conv: weights N(0, 0.02); spectral norm then fits its vectors to them."""
    nn.init.normal_(module.weight, 0.0, 0.02)
    return spectral_norm(module)


def conv(*args, **kwargs) -> nn.Module:
    return _normal_init(nn.Conv2d(*args, **kwargs))


def conv_transpose(*args, **kwargs) -> nn.Module:
    return _normal_init(nn.ConvTranspose2d(*args, **kwargs))


def init_batchnorm(model: nn.Module) -> nn.Module:
    """The upstream ``weights_init`` of BatchNorm: weights N(1, 0.02), biases 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
                m.bias.zero_()
    return model


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise scaled by a learned scalar (zero at start, as in StyleGAN)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight * torch.randn_like(x[:, :1])


class SkipLayerExcitation(nn.Module):
    """SLE: channel gates computed from a low-resolution feature multiply a high-resolution one.

    ``gate="sigmoid"`` squashes the gates (official FastGAN); ``"none"`` uses the raw conv output (the fork).
    """

    def __init__(self, small_channels: int, big_channels: int, gate: str = "none"):
        super().__init__()
        check_choice("se_gate", gate, SE_GATES)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), conv(small_channels, big_channels, 4, 1, 0, bias=False), nn.SiLU(),
            conv(big_channels, big_channels, 1, 1, 0, bias=False), nn.Sigmoid() if gate == "sigmoid" else nn.Identity())

    def forward(self, small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return big * self.gate(small)


def up_block(cin: int, cout: int, noise: bool, double: bool) -> nn.Sequential:
    """Nearest x2, conv, BN, GLU; ``double`` (the official ``UpBlockComp``) adds a noise slot after each conv
    and a second conv-(noise)-BN-GLU. The slot is ``nn.Identity`` without noise, so indices match upstream."""
    def unit(c_in):
        slot = [NoiseInjection() if noise else nn.Identity()] if double else []
        return [conv(c_in, cout * 2, 3, 1, 1, bias=False), *slot, nn.BatchNorm2d(cout * 2), nn.GLU(dim=1)]
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *unit(cin), *(unit(cout) if double else []))


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that defines a ``Generator``'s layers and forward (stored by field in checkpoints)."""

    size: int = 256
    ngf: int = 64
    nz: int = 256
    noise: bool = False
    se_gate: str = "none"
    output: str = "fastgan"

    def build(self) -> "Generator":
        return Generator(**vars(self))


class Generator(nn.Module):
    """FastGAN generator: ``forward(z)`` returns ``(image, aux)``.

    Args:
        size: output resolution, one of ``SIZES``; ``aux`` has ``small_size(size)``.
        ngf: width multiplier (paper: 64). nz: noise dimension (paper: 256).
        noise: noise injection in every other up-sampling block (paper: off).
        se_gate: ``"none"`` (the fork, paper) or ``"sigmoid"`` (official FastGAN).
        output: ``"fastgan"`` (tanh only at 1024 px, as upstream) or ``"tanh"`` (always).
    """

    def __init__(self, size: int = 256, ngf: int = 64, nz: int = 256, noise: bool = False, se_gate: str = "none",
                 output: str = "fastgan", nc: int = 3):
        super().__init__()
        self.size, self.nz, self.small = check_size(size), nz, small_size(size)
        self.tanh = check_choice("output", output, OUTPUTS) == "tanh" or size == 1024
        width = {r: max(1, int(m * ngf)) for r, m in GEN_WIDTH.items()}
        self.init = nn.Sequential(conv_transpose(nz, width[4] * 2, 4, 1, 0, bias=False),
                                  nn.BatchNorm2d(width[4] * 2), nn.GLU(dim=1))
        self.resolutions = [2 ** i for i in range(3, int(math.log2(size)) + 1)]
        for i, r in enumerate(self.resolutions):  # feat_8, feat_32, ... are doubled (and noisy), as upstream
            self.add_module(f"feat_{r}", up_block(width[r // 2], width[r], noise, i % 2 == 0))
        # SLE from 4->64, 8->128, 16->256 and 32->512, when the big side exists
        self.sle = {r: r // 16 for r in self.resolutions if r >= 64 and r // 16 <= 32}
        for big, small in self.sle.items():
            self.add_module(f"se_{big}", SkipLayerExcitation(width[small], width[big], se_gate))
        self.to_small = conv(width[self.small], nc, 1, 1, 0, bias=False)
        self.to_big = conv(width[size], nc, 3, 1, 1, bias=False)
        init_batchnorm(self)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = {4: self.init(z.view(z.shape[0], -1, 1, 1))}
        for r in self.resolutions:
            x = getattr(self, f"feat_{r}")(feats[r // 2])
            if r in self.sle:
                x = getattr(self, f"se_{r}")(feats[self.sle[r]], x)
            feats[r] = x
        big, small = self.to_big(feats[self.size]), self.to_small(feats[self.small])
        return (torch.tanh(big), torch.tanh(small)) if self.tanh else (big, small)


class DownBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(conv(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


class DownBlockComp(nn.Module):
    """Strided conv path and average-pool shortcut, averaged."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(DownBlock(cin, cout), conv(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))
        self.direct = nn.Sequential(nn.AvgPool2d(2, 2), conv(cin, cout, 1, 1, 0, bias=False),
                                    nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.main(x) + self.direct(x)) / 2


class Decoder(nn.Sequential):
    """8x8 feature -> ``out_size`` image (the discriminator's self-supervised reconstruction)."""

    def __init__(self, cin: int, out_size: int, nc: int = 3):
        width = {r: int(m * DECODER_BASE) for r, m in GEN_WIDTH.items()}
        layers, c, r = [nn.AdaptiveAvgPool2d(8)], cin, 8
        while r < out_size:
            r *= 2
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c, width[r] * 2, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(width[r] * 2), nn.GLU(dim=1)]
            c = width[r]
        super().__init__(*layers, conv(c, nc, 3, 1, 1, bias=False), nn.Tanh())


class Discriminator(nn.Module):
    """FastGAN discriminator on ``(image, small image)``.

    ``forward(big, small)`` returns patch logits; ``forward(big, small, part)`` (real images) also returns
    the reconstructions of the whole image from the 8x8 feature, of the small image, and of image
    quadrant ``part`` (0..3) from that quadrant of the 16x16 feature, all at ``small_size(size)``.
    ``se_gate`` as in ``Generator`` (the fork's discriminator shares its ungated SLE).
    """

    def __init__(self, size: int = 256, ndf: int = 64, se_gate: str = "none", nc: int = 3):
        super().__init__()
        self.size, self.small = check_size(size), small_size(size)
        width = {r: max(1, int(m * ndf)) for r, m in DISC_WIDTH.items()}
        top = min(size, 256)  # features start at 256x256 at most; bigger images are strided down first
        stem, r, c = [], size, nc
        while r > top:  # every strided convolution after the first is batch-normalised (official 1024 px)
            r //= 2
            norm = [nn.BatchNorm2d(width[2 * r])] if stem else []
            stem += [conv(c, width[2 * r], 4, 2, 1, bias=False), *norm, nn.LeakyReLU(0.2)]
            c = width[2 * r]
        if not stem:
            stem = [conv(nc, width[2 * top], 3, 1, 1, bias=False), nn.LeakyReLU(0.2)]
        self.from_big = nn.Sequential(*stem)
        self.resolutions = [top // 2 ** i for i in range(1, int(math.log2(top // 8)) + 1)]  # ... 16, 8
        for r in self.resolutions:
            self.add_module(f"down_{r}", DownBlockComp(width[4 * r], width[2 * r]))
        # SLE over 8x in resolution, as 256->32, 128->16, 64->8 in the paper
        self.sle = {r: 8 * r for r in self.resolutions if 8 * r <= top}
        for r, src in self.sle.items():
            self.add_module(f"se_{r}", SkipLayerExcitation(width[2 * src], width[2 * r], se_gate))
        self.logits_big = nn.Sequential(conv(width[16], width[8], 1, 1, 0, bias=False), nn.BatchNorm2d(width[8]),
                                        nn.LeakyReLU(0.2), conv(width[8], 1, 4, 1, 0, bias=False))
        small, r = [conv(nc, width[2 * self.small], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)], self.small // 2
        while r > 8:
            small.append(DownBlock(width[4 * r], width[2 * r]))
            r //= 2
        self.from_small = nn.Sequential(*small)
        self.logits_small = conv(width[32], 1, 4, 1, 0, bias=False)
        self.decoder_big = Decoder(width[16], self.small, nc)
        self.decoder_part = Decoder(width[32], self.small, nc)
        self.decoder_small = Decoder(width[32], self.small, nc)
        init_batchnorm(self)

    def forward(self, big: torch.Tensor, small: torch.Tensor, part: int | None = None):
        feats = {self.resolutions[0] * 2: self.from_big(big)}
        for r in self.resolutions:
            x = getattr(self, f"down_{r}")(feats[2 * r])
            if r in self.sle:
                x = getattr(self, f"se_{r}")(feats[self.sle[r]], x)
            feats[r] = x
        feat_small = self.from_small(small)
        logits = torch.cat([self.logits_big(feats[8]).flatten(1), self.logits_small(feat_small).flatten(1)], 1)
        if part is None:
            return logits
        recon = (self.decoder_big(feats[8]), self.decoder_small(feat_small),
                 self.decoder_part(crop_part(feats[16], part)))
        return logits, recon


def crop_part(x: torch.Tensor, part: int) -> torch.Tensor:
    """Quadrant ``part`` of ``x``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    if part not in range(4):
        raise ValueError(f"part={part!r} must be 0, 1, 2 or 3")
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    row, col = divmod(part, 2)
    return x[..., row * h:(row + 1) * h, col * w:(col + 1) * w]


# ----------------------------------------------------------------------------- upstream checkpoints

# (pattern, replacement) applied in order to each upstream key; spectral norm's old names last
_UPSTREAM_RENAMES = [
    (r"^init\.init\.", "init."),
    (r"^(se_\d+)\.main\.", r"\1.gate."),
    (r"^to_128\.", "to_small."),
    # the fork's --nonoise blocks (UpblockComp_control) name what the official Sequential numbers
    *((rf"^(feat_\d+)\.{name}\.", rf"\1.{index}.") for name, index in
      (("conv1", 1), ("noise1", 2), ("bn1", 3), ("conv2", 5), ("noise2", 6), ("bn2", 7))),
    (r"\.weight_orig$", ".parametrizations.weight.original"),
    (r"\.weight_u$", ".parametrizations.weight.0._u"),
    (r"\.weight_v$", ".parametrizations.weight.0._v"),
]
_NOISE_KEY = re.compile(r"^feat_(8|32|128|512)\.[26]\.weight$")  # the doubled blocks' noise slots
_UPSTREAM_BUFFERS = (".weight_u", ".weight_v", ".running_mean", ".running_var", ".num_batches_tracked")


def upstream_key(key: str) -> str:
    """An official-FastGAN or fork generator key renamed to ``Generator``'s (``init.init.0.weight_orig`` ->
    ``init.0.parametrizations.weight.original``, ``se_64.main.1`` -> ``se_64.gate.1``, ``to_128`` ->
    ``to_small``, the fork's ``feat_8.conv1`` -> ``feat_8.1``)."""
    for pattern, replacement in _UPSTREAM_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def upstream_generator_state(checkpoint) -> dict[str, torch.Tensor]:
    """The generator ``state_dict`` (upstream key names) in an upstream FastGAN file, with EMA weights.

    ``{'g', 'd'}`` files (the official ``N.pth``, the fork's ``best.pth``) hold the EMA generator as ``'g'``.
    ``all_N.pth`` / ``best_all_*.pth`` hold the raw generator as ``'g'`` and the EMA parameters as the list
    ``'g_ema'``, in the upstream model's parameter order: they replace ``'g'``'s parameters in that order
    (its buffers, BatchNorm statistics and spectral-norm vectors, stay).
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("g_ema"), (list, tuple)):
        state = unwrap_state_dict(checkpoint, key="g")
        params = [k for k in state if not k.endswith(_UPSTREAM_BUFFERS)]
        ema = checkpoint["g_ema"]
        if len(ema) != len(params) or any(tuple(t.shape) != tuple(state[k].shape) for k, t in zip(params, ema)):
            raise CheckpointError(f"'g_ema' ({len(ema)} tensors) does not match the {len(params)} parameters "
                                  "of 'g' in order and shape")
        return {**state, **dict(zip(params, ema))}
    return unwrap_state_dict(checkpoint)


def upstream_key_map(state: dict[str, torch.Tensor], *, noise: bool) -> Callable[[str], str | None]:
    """``key_map`` for ``load_checkpoint``: ``upstream_key``, and without ``noise`` the noise weights dropped.

    Dropping is only allowed when they are all zero (the fork never injects noise, so its stay zero); a
    trained non-zero one raises ``ValueError``: that checkpoint needs a generator with ``noise=True``.
    """
    if not noise:
        live = [f"{k} = {v.flatten()[0].item():.4g}" for k, v in state.items()
                if _NOISE_KEY.match(upstream_key(k)) and v.abs().max() > 0]
        if live:
            raise ValueError(f"this checkpoint injects noise ({', '.join(live[:3])}); "
                             "build the generator with noise (--noise)")

    def key_map(key: str) -> str | None:
        new = upstream_key(key)
        return None if not noise and _NOISE_KEY.match(new) else new
    return key_map


def upstream_generator_config(state: dict[str, torch.Tensor], **choices) -> GeneratorConfig:
    """``GeneratorConfig`` of an upstream generator ``state_dict``: size, ngf, nz and noise read from it.

    ``se_gate`` and ``output`` cannot be read from weights: pass them in ``choices`` (defaults: the fork's).
    """
    renamed = {upstream_key(k): v for k, v in state.items()}
    init = renamed.get("init.0.parametrizations.weight.original")
    if init is None:
        raise CheckpointError(f"not a FastGAN generator state_dict: no 'init.init.0.weight_orig' "
                              f"(first keys: {list(state)[:4]})")
    sizes = [int(m.group(1)) for k in renamed if (m := re.match(r"^feat_(\d+)\.", k))]
    noise = any(v.abs().max() > 0 for k, v in renamed.items() if _NOISE_KEY.match(k))
    found = dict(size=max(sizes), ngf=init.shape[1] // (2 * GEN_WIDTH[4]), nz=init.shape[0], noise=noise)
    return GeneratorConfig(**{**found, **choices})


# ----------------------------------------------------------------------------- DiffAugment

def _brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def _saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean


def _contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size; uncovered pixels become 0."""
    n, _, h, w = x.shape
    dy = torch.randint(-int(h * ratio + 0.5), int(h * ratio + 0.5) + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-int(w * ratio + 0.5), int(w * ratio + 0.5) + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    moved = x.flatten(2).gather(2, index.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)).view_as(x)
    return moved * inside


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one random ``ratio``-sized rectangle per image (it may overhang the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h, (n, 1, 1), device=x.device)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - cy + ch // 2
    cols = torch.arange(w, device=x.device).view(1, 1, w) - cx + cw // 2
    hole = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)
    return x * (~hole).unsqueeze(1).to(x.dtype)


AUGMENTS = {
    "color": (_brightness, _saturation, _contrast),
    "translation": (_translation,),
    "cutout": (_cutout,),
}
PAPER_POLICY = "color,translation"  # the fork's and the official train.py's policy: no cutout


def diff_augment(x: torch.Tensor, policy: str = PAPER_POLICY) -> torch.Tensor:
    """DiffAugment: differentiable random augmentations, applied alike to real and generated images."""
    for name in filter(None, policy.split(",")):
        if name not in AUGMENTS:
            raise ValueError(f"DiffAugment policy {name!r} is not supported; choose from {list(AUGMENTS)}")
        for fn in AUGMENTS[name]:
            x = fn(x)
    return x
