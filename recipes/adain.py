"""AdaIN style transfer (Huang & Belongie, ICCV 2017): normalised VGG-19 encoder to relu4_1, mirrored decoder.

Both networks are ``nn.Sequential`` with the layer indices of the common PyTorch port, so its
``vgg_normalised.pth`` (the whole VGG-19; only the layers up to relu4_1 are used) and ``decoder.pth``
state dicts load as they are. The encoder takes RGB in [0, 1]: its first 1x1 conv holds the
normalisation the converted Caffe/Torch weights expect.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from topk_plugin.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, unwrap_state_dict

# Channel plan of VGG-19 up to relu4_1; "M" is a 2x2 max-pool.
_ENCODER_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.ReLU()]


def build_encoder() -> nn.Sequential:
    """Normalised VGG-19 up to relu4_1 (31 layers, output stride 8, 512 channels)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 3, 1)]
    cin = 3
    for item in _ENCODER_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += _conv(cin, item)
            cin = item
    return nn.Sequential(*layers)


def build_decoder() -> nn.Sequential:
    """The encoder mirrored: nearest 2x upsampling where the encoder pools, no ReLU after the last conv."""
    layers: list[nn.Module] = []
    plan = [(512, 256), "U", (256, 256), (256, 256), (256, 256), (256, 128), "U", (128, 128), (128, 64), "U",
            (64, 64), (64, 3)]
    for item in plan:
        layers += [nn.Upsample(scale_factor=2, mode="nearest")] if item == "U" else _conv(*item)
    return nn.Sequential(*layers[:-1])


def channel_stats(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and standard deviation over the spatial positions."""
    flat = feat.flatten(2)
    mean = flat.mean(-1)[..., None, None]
    std = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mean, std


def adaptive_instance_norm(content: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor) -> torch.Tensor:
    """AdaIN (Eq. 8): content features re-scaled to the style's channel mean and std."""
    mean, std = channel_stats(content)
    return (content - mean) / std * style_std + style_mean


class AdaIN(nn.Module):
    """Encoder + decoder; ``forward(content, style_stats, alpha)`` returns the stylized image in [0, 1]."""

    def __init__(self, encoder: nn.Sequential | None = None, decoder: nn.Sequential | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else build_encoder()
        self.decoder = decoder if decoder is not None else build_decoder()

    @torch.no_grad()
    def style_stats(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """relu4_1 channel statistics of a style image (1, 3, H, W); computed once per style."""
        return channel_stats(self.encoder(style))

    @torch.no_grad()
    def forward(self, content: torch.Tensor, style_stats: tuple[torch.Tensor, torch.Tensor],
                alpha: float = 1.0) -> torch.Tensor:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must lie in [0, 1] (0 = content only, 1 = full style)")
        feat = self.encoder(content)
        target = alpha * adaptive_instance_norm(feat, *style_stats) + (1 - alpha) * feat
        # As the port: the decoder's size, a multiple of 8 (ceil-mode pooling rounds odd sizes up), not resized.
        return self.decoder(target).clamp(0, 1)


def _layer_index(key: str) -> int:
    head = key.split(".")[0]
    return int(head) if head.isdigit() else -1


def _load_into(net: nn.Sequential, path: Path, flag: str, expected: str) -> None:
    try:
        state = unwrap_state_dict(read_checkpoint(path))
        # vgg_normalised.pth holds the whole VGG-19 (to relu5_4); this encoder stops at relu4_1.
        load_checkpoint(net, {k: v for k, v in state.items() if _layer_index(k) < len(net)})
    except CheckpointError as err:
        raise SystemExit(f"{flag} {path}: {err} (expected the PyTorch AdaIN port's {expected})") from None


def load_adain(vgg: Path, decoder: Path) -> AdaIN:
    """AdaIN from the port's files: ``vgg_normalised.pth`` (encoder) and ``decoder.pth``; errors name the file."""
    net = AdaIN()
    _load_into(net.encoder, vgg, "--vgg", "vgg_normalised.pth")
    _load_into(net.decoder, decoder, "--decoder", "decoder.pth")
    return net.eval()
