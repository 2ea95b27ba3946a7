"""FastGAN (Liu et al., ICLR 2021): generator, discriminator with self-supervised decoders, DiffAugment.

Written from the paper's description: a 4x4 init layer from noise (GLU), up-sampling blocks with
skip-layer excitation (SLE) up to ``size`` (256 in the paper; 512 and 1024 also), switchable noise
injection and an auxiliary low-resolution output; a discriminator whose 8x8 feature and a random
quadrant of its 16x16 feature are decoded back to images (the self-supervised reconstruction loss),
and DiffAugment (Zhao et al., 2020: colour, translation, cutout) on everything the discriminator sees.

Every generator block is named by the resolution it outputs (``feat_8`` ... ``feat_1024``), so the
32x32 block is ``feat_32``: importing this module registers the ``"paper"`` preset that puts spatial
Top-K (5%) on its output, so ``sparsify(generator, "paper")`` works.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from topk_plugin import TopKSpec, register_preset

SIZES = (64, 128, 256, 512, 1024)
GEN_WIDTH = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DISC_WIDTH = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
TOPK_POSITION = "feat_32"
PAPER_K = 0.05


def check_size(size: int) -> int:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not supported; choose one of {list(SIZES)}")
    return size


def small_size(size: int) -> int:
    """Resolution of the auxiliary output and of the reconstructions: 128, or half of smaller images."""
    return min(128, check_size(size) // 2)


def conv(*args, **kwargs) -> nn.Module:
    return spectral_norm(nn.Conv2d(*args, **kwargs))


def conv_transpose(*args, **kwargs) -> nn.Module:
    return spectral_norm(nn.ConvTranspose2d(*args, **kwargs))


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise scaled by a learned scalar (zero at start, as in StyleGAN)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight * torch.randn_like(x[:, :1])


class SkipLayerExcitation(nn.Module):
    """SLE: channel gates computed from a low-resolution feature multiply a high-resolution one."""

    def __init__(self, small_channels: int, big_channels: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), conv(small_channels, big_channels, 4, 1, 0, bias=False), nn.SiLU(),
            conv(big_channels, big_channels, 1, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return big * self.gate(small)


def up_block(cin: int, cout: int, noise: bool, double: bool) -> nn.Sequential:
    """Nearest x2, conv, (noise), BN, GLU; ``double`` repeats conv-(noise)-BN-GLU once more."""
    def unit(c_in):
        return [conv(c_in, cout * 2, 3, 1, 1, bias=False), NoiseInjection() if noise else nn.Identity(),
                nn.BatchNorm2d(cout * 2), nn.GLU(dim=1)]
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *unit(cin), *(unit(cout) if double else []))


class Generator(nn.Module):
    """FastGAN generator: ``forward(z)`` returns ``(image, aux)``, both in [-1, 1].

    Args:
        size: output resolution, one of ``SIZES``; ``aux`` has ``small_size(size)``.
        ngf: width multiplier (paper: 64). nz: noise dimension (paper: 256).
        noise: noise injection in every other up-sampling block.
    """

    def __init__(self, size: int = 256, ngf: int = 64, nz: int = 256, noise: bool = True, nc: int = 3):
        super().__init__()
        self.size, self.nz, self.small = check_size(size), nz, small_size(size)
        width = {r: max(1, int(m * ngf)) for r, m in GEN_WIDTH.items()}
        self.init = nn.Sequential(conv_transpose(nz, width[4] * 2, 4, 1, 0, bias=False),
                                  nn.BatchNorm2d(width[4] * 2), nn.GLU(dim=1))
        self.resolutions = [2 ** i for i in range(3, int(math.log2(size)) + 1)]
        for i, r in enumerate(self.resolutions):  # feat_8, feat_32, ... are doubled and noisy, as in the paper
            self.add_module(f"feat_{r}", up_block(width[r // 2], width[r], noise and i % 2 == 0, i % 2 == 0))
        # SLE from 4->64, 8->128, 16->256 and 32->512, when the big side exists
        self.sle = {r: r // 16 for r in self.resolutions if r >= 64 and r // 16 <= 32}
        for big, small in self.sle.items():
            self.add_module(f"se_{big}", SkipLayerExcitation(width[small], width[big]))
        self.to_small = conv(width[self.small], nc, 1, 1, 0, bias=False)
        self.to_big = conv(width[size], nc, 3, 1, 1, bias=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = {4: self.init(z.view(z.shape[0], -1, 1, 1))}
        for r in self.resolutions:
            x = getattr(self, f"feat_{r}")(feats[r // 2])
            if r in self.sle:
                x = getattr(self, f"se_{r}")(feats[self.sle[r]], x)
            feats[r] = x
        return torch.tanh(self.to_big(feats[self.size])), torch.tanh(self.to_small(feats[self.small]))


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

    def __init__(self, cin: int, out_size: int, ndf: int, nc: int = 3):
        width = {r: max(1, int(m * ndf)) for r, m in GEN_WIDTH.items()}
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
    """

    def __init__(self, size: int = 256, ndf: int = 64, nc: int = 3):
        super().__init__()
        self.size, self.small = check_size(size), small_size(size)
        width = {r: max(1, int(m * ndf)) for r, m in DISC_WIDTH.items()}
        top = min(size, 256)  # features start at 256x256 at most; bigger images are strided down first
        stem, r, c = [], size, nc
        while r > top:
            r //= 2
            stem += [conv(c, width[2 * r], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
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
            self.add_module(f"se_{r}", SkipLayerExcitation(width[2 * src], width[2 * r]))
        self.logits_big = nn.Sequential(conv(width[16], width[8], 1, 1, 0, bias=False), nn.BatchNorm2d(width[8]),
                                        nn.LeakyReLU(0.2), conv(width[8], 1, 4, 1, 0, bias=False))
        small, r = [conv(nc, width[2 * self.small], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)], self.small // 2
        while r > 8:
            small.append(DownBlock(width[4 * r], width[2 * r]))
            r //= 2
        self.from_small = nn.Sequential(*small)
        self.logits_small = conv(width[32], 1, 4, 1, 0, bias=False)
        self.decoder_big = Decoder(width[16], self.small, ndf, nc)
        self.decoder_part = Decoder(width[32], self.small, ndf, nc)
        self.decoder_small = Decoder(width[32], self.small, ndf, nc)

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


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout") -> torch.Tensor:
    """DiffAugment: differentiable random augmentations, applied alike to real and generated images."""
    for name in filter(None, policy.split(",")):
        if name not in AUGMENTS:
            raise ValueError(f"DiffAugment policy {name!r} is not supported; choose from {list(AUGMENTS)}")
        for fn in AUGMENTS[name]:
            x = fn(x)
    return x


register_preset("paper", "fastgan", TopKSpec([TOPK_POSITION], k=PAPER_K), lambda m: isinstance(m, Generator),
                "FastGAN generator: Top-K after the 32x32 block (paper §4.4: 5%; Table-100 uses 15%)")
