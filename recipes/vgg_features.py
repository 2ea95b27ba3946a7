"""What the texture-synthesis and reconstruction recipes share: their run configuration, a VGG feature
extractor with named read-out taps, its weights, the input images, Gram matrices, the image optimiser
and the figures.

Top-K is never computed here: the recipes ``sparsify`` the extractor's taps (``taps.<layer>``), so every
mask is the core's op. A tap reads a layer's activation without changing what flows on to deeper layers,
so each layer's mask acts on that layer's true response.
"""
from __future__ import annotations

import argparse
import dataclasses
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.transforms import functional as TF
from tqdm import tqdm

from topk_plugin import sparsify, topk_layers
from topk_plugin.checkpoints import CheckpointError, load_checkpoint
from topk_plugin.integrations.imagenet16 import IMAGENET_MEAN, IMAGENET_STD
from topk_plugin.ops import check_k
from topk_plugin.recipes._common import (apply_smoke, image_files, parse_k, positive_int, pyplot, read_image,
                                         require_dir, resolve_device, save_figure, seed_everything,
                                         warn_meaningless)

# Convolutions per block; torchvision's ``features`` is conv, ReLU per conv and a max-pool per block.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CFGS = {"vgg16": "D", "vgg19": "E"}  # torchvision.models.vgg.cfgs keys
RANDOM_NOTE = "RANDOM WEIGHTS - MEANINGLESS"
#: what ``--smoke`` sets (options given on the command line win): seconds on a CPU
SMOKE = {"size": 64, "steps": 2, "lbfgs_iters": 2, "images": 1}


def _layer_table(blocks: tuple[int, ...]) -> dict[str, int]:
    table, index = {}, 0
    for block, convs in enumerate(blocks, 1):
        for conv in range(1, convs + 1):
            table[f"conv{block}_{conv}"] = index
            table[f"relu{block}_{conv}"] = index + 1
            index += 2
        table[f"pool{block}"] = index
        index += 1
    return table


#: Layer name (``relu1_1``, ``pool4``...) to index in torchvision's ``vgg16().features`` / ``vgg19().features``.
LAYERS: dict[str, dict[str, int]] = {arch: _layer_table(blocks) for arch, blocks in BLOCKS.items()}


def check_arch(arch: str) -> str:
    if arch not in BLOCKS:
        raise ValueError(f"arch={arch!r} is not supported; choose one of {list(BLOCKS)}")
    return arch


def check_layers(arch: str, layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    unknown = [name for name in layers if name not in LAYERS[check_arch(arch)]]
    if unknown:
        raise ValueError(f"unknown {arch} layer(s) {unknown}; choose from {list(LAYERS[arch])}")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} must name at least one layer, each once")
    return layers


def min_size(arch: str, layers: Sequence[str]) -> int:
    """Smallest image side for which every pooling up to the deepest of ``layers`` has an output."""
    deepest = max(LAYERS[arch][name] for name in layers)
    return 2 ** sum(1 for name, i in LAYERS[arch].items() if name.startswith("pool") and i <= deepest)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class VGGRunConfig:
    """One run of an image-optimisation recipe on VGG features; invalid values raise ``ValueError``.

    ``weights``: a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) or a state_dict file;
    exactly one of ``weights`` and ``random_weights`` (tests and smoke runs: results are meaningless).
    """

    data: Path
    out: Path
    layers: tuple[str, ...]
    k: float | int
    steps: int
    lr: float
    arch: str = "vgg19"
    weights: str | None = None
    random_weights: bool = False
    lbfgs_iters: int = 20
    size: int = 224
    images: int = 3
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(check_layers(self.arch, self.layers)))
        check_k(self.k)
        for name in ("steps", "lbfgs_iters", "size", "images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if self.size < min_size(self.arch, self.layers):
            raise ValueError(f"size={self.size} is too small for {self.arch} layer(s) {list(self.layers)}: "
                             f"their poolings need at least {min_size(self.arch, self.layers)} px")
        if self.random_weights == (self.weights is not None):
            names = list(torchvision.models.get_model_weights(self.arch).__members__)
            raise ValueError(
                f"{'both' if self.random_weights else 'no'} VGG weights given: pass exactly one of --weights NAME "
                f"(torchvision's {self.arch} weights {names}, downloaded to / read from torch's cache), "
                f"--weights PATH (a saved {self.arch} state_dict), or --random-weights (tests and smoke runs; "
                "results are meaningless)")

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The config of parsed command-line options (one option per field); a bad value exits naming it."""
        try:
            return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def add_vgg_args(parser: argparse.ArgumentParser, layers: list[str], k: float, steps: int, lr: float) -> None:
    """The options of ``VGGRunConfig`` that both recipes share (network, weights, layers, optimisation)."""
    parser.add_argument("--arch", default="vgg19", choices=list(BLOCKS), help="torchvision VGG")
    parser.add_argument("--weights", default=None,
                        help="torchvision weights name (IMAGENET1K_V1, DEFAULT: torchvision's download/cache) or a "
                             "path to a saved VGG state_dict; required unless --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="random VGG (tests; implied by --smoke without --weights): outputs marked MEANINGLESS")
    parser.add_argument("--layers", nargs="+", default=layers, help="VGG layers (relu1_1, pool1, conv3_2, ...)")
    parser.add_argument("--k", type=parse_k, default=k,
                        help="Top-K: fraction in (0, 1] of each channel's positions, or an integer count")
    parser.add_argument("--steps", type=positive_int, default=steps, help="optimiser steps (loss recorded after each)")
    parser.add_argument("--lbfgs-iters", type=positive_int, default=20, help="L-BFGS iterations per step")
    parser.add_argument("--lr", type=float, default=lr, help="L-BFGS learning rate (first trial step length)")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="image side in pixels (shorter side, centre crop)")
    parser.add_argument("--images", type=positive_int, default=3, help="how many images of --data (sorted by name)")


def parse_config(parser: argparse.ArgumentParser, argv, config_type: type, **smoke) -> tuple:
    """(config, parsed options): ``--smoke`` applies ``SMOKE`` and ``smoke`` and random weights unless
    ``--weights`` was given. Every option, the device and the image folder are checked here, before the
    run touches anything."""
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args, parser, **SMOKE, **smoke)
        args.random_weights = args.random_weights or args.weights is None
    config = config_type.from_args(args)
    resolve_device(config.device)
    image_files(require_dir(config.data, "--data image folder"), what="--data image folder")
    return config, args


# ----------------------------------------------------------------------------- network

class VGGTaps(nn.Module):
    """VGG ``features`` (torchvision names ``features.N``) up to the deepest requested layer.

    Takes RGB images in [0, 1], normalises them for ImageNet, and returns ``{layer: activation}`` as read
    through ``taps.<layer>`` (identities: the place where ``sparsify`` puts Top-K).
    """

    def __init__(self, features: nn.Sequential, arch: str, layers: Sequence[str]):
        super().__init__()
        check_layers(arch, layers)
        index = {name: LAYERS[arch][name] for name in layers}
        self.features = features[:max(index.values()) + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # an in-place ReLU would overwrite a tapped conv output
        self.taps = nn.ModuleDict({name: nn.Identity() for name in layers})
        self.tap_at = {i: name for name, i in index.items()}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (image - self.mean) / self.std
        out = {}
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.tap_at:
                out[self.tap_at[i]] = self.taps[self.tap_at[i]](x)
        return out


def tap_positions(layers: Sequence[str]) -> list[str]:
    """``sparsify`` positions of the taps for ``layers``."""
    return [f"taps.{name}" for name in layers]


def build_extractor(features: nn.Sequential, arch: str, layers: Sequence[str], k) -> nn.Module:
    """``VGGTaps`` frozen, with the core's Top-K (``identity`` mode until ``set_topk_mode``) on every tap."""
    taps = VGGTaps(features, arch, layers).requires_grad_(False)
    return sparsify(taps, tap_positions(layers), k=k, mode="identity").eval()


def set_topk_mode(extractor: nn.Module, mode: str) -> None:
    """Switch every Top-K layer of a sparsified extractor to ``mode`` (``identity``, ``topk``, ``non_topk``)."""
    for layer in topk_layers(extractor).values():
        layer.mode = mode


# ----------------------------------------------------------------------------- weights

def _features_key(key: str) -> str | None:
    """A whole VGG's ``features.0.weight`` as ``features``' own ``0.weight``; its classifier is not used here."""
    return None if key.startswith("classifier.") else key.removeprefix("features.")


def _torchvision_state(weights) -> dict[str, torch.Tensor]:
    """torchvision ``weights``' state_dict, by torchvision's own loading (hub cache or download)."""
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # noqa: BLE001 - no network, no cache: say how to provide them instead
        raise SystemExit(f"could not load torchvision weights {weights} ({type(err).__name__}: {err}). "
                         f"Put {weights.url.rsplit('/', 1)[-1]} in torch's hub cache "
                         f"({torch.hub.get_dir()}/checkpoints), or pass --weights PATH to a saved VGG "
                         "state_dict") from None


def _features(arch: str) -> nn.Sequential:
    """torchvision's ``<arch>().features`` with its VGG initialisation.

    Built alone rather than by the model factory: the 100M-weight classifier that a whole VGG would
    initialise is never used here.
    """
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[CFGS[arch]])
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def load_features(arch: str, weights: str | None) -> tuple[nn.Sequential, str]:
    """torchvision ``<arch>().features`` and its source: ``weights`` a torchvision weights name or a file,
    ``None`` for random weights (source ``"random"``)."""
    features = _features(check_arch(arch))
    if weights is None:
        return features, "random"
    enum = torchvision.models.get_model_weights(arch)
    names = list(enum.__members__)
    if Path(weights).is_file():
        state, source = weights, str(Path(weights).resolve())
    elif weights.split(".")[-1] in names:
        chosen = enum[weights.split(".")[-1]]
        state, source = _torchvision_state(chosen), f"torchvision:{chosen}"
    else:
        raise SystemExit(f"--weights {weights!r} is neither a file nor a torchvision {arch} weights name {names}")
    try:  # the core loader: any container layout, DataParallel names, shifted Sequential indices
        load_checkpoint(features, state, key_map=_features_key)
    except CheckpointError as err:
        raise SystemExit(f"--weights {weights!r} does not fit torchvision {arch}.features: {err}") from None
    return features, source


# ----------------------------------------------------------------------------- run inputs

@dataclass
class RunInputs:
    device: torch.device
    paths: list[Path]
    targets: list[torch.Tensor]  # (1, 3, size, size) in [0, 1], on ``device``
    features: nn.Sequential
    source: str  # "random", a file, or "torchvision:<weights>"

    @property
    def meaningless(self) -> bool:
        return self.source == "random"


def prepare_run(config: VGGRunConfig, what: str) -> RunInputs:
    """Seed, device, every input image decoded (an unreadable one exits naming it) and the VGG features."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    paths = image_files(require_dir(config.data, "image folder"), what="image folder")[:config.images]
    targets = [square_image(path, config.size).to(device) for path in paths]
    features, source = load_features(config.arch, None if config.random_weights else config.weights)
    if source == "random":
        warn_meaningless(f"{what} with a randomly initialised VGG")
    return RunInputs(device, paths, targets, features, source)


def square_image(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) RGB in [0, 1]: shorter side resized to ``size``, centre crop."""
    image = TF.center_crop(TF.resize(read_image(path), size), size)
    return TF.to_tensor(image).unsqueeze(0)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices (N, C, C) of (N, C, H, W) features, divided by C*H*W."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


# ----------------------------------------------------------------------------- optimisation

def optimise_image(loss_fn: Callable[[torch.Tensor], torch.Tensor], shape, *, steps: int, lbfgs_iters: int,
                   lr: float, seed: int, device: torch.device, desc: str) -> tuple[torch.Tensor, list[float]]:
    """L-BFGS (strong Wolfe) on an image from uniform noise, clamped to [0, 1] after every step.

    Returns the image and the loss before the first step and after each step.
    """
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed))  # same start on every device
    image = noise.to(device).requires_grad_()
    optimiser = torch.optim.LBFGS([image], lr=lr, max_iter=lbfgs_iters, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = loss_fn(image)
        loss.backward()
        return loss

    def current() -> float:
        with torch.no_grad():
            return loss_fn(image).item()

    losses = [current()]
    for _ in tqdm(range(steps), desc=desc, leave=False):
        optimiser.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)
        losses.append(current())
    return image.detach().cpu(), losses


def loss_rows(label: str, condition: str, losses: list[float], **extra) -> list[dict]:
    """CSV rows of one run's loss curve; ``label`` names the run in plots."""
    return [{"label": label, **extra, "condition": condition, "step": step, "loss": loss}
            for step, loss in enumerate(losses)]


# ----------------------------------------------------------------------------- figures

def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def save_image_grid(stem: Path, rows: list[list[torch.Tensor]], columns: list[str], row_labels: list[str],
                    title: str) -> list[Path]:
    """Images (1, 3, H, W) in a grid at about their own resolution, with column and row labels: stem.png/.pdf."""
    plt = pyplot()
    side = max(2.0, rows[0][0].shape[-1] / 100)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(side * len(columns), side * len(rows) + 0.8),
                             squeeze=False, layout="constrained")
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image[0].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(_wrap(title, 30 * len(columns)), fontsize=8)
    return save_figure(fig, stem)


def plot_loss_curves(stem: Path, rows: list[dict], conditions: dict[str, str], title: str) -> list[Path]:
    """One panel per condition (log loss vs step), one line per run (``label`` of each row): stem.png/.pdf."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(conditions), figsize=(4 * len(conditions), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (condition, caption) in zip(axes[0], conditions.items()):
        runs: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["condition"] == condition:
                runs.setdefault(row["label"], []).append((row["step"], row["loss"]))
        for label, points in runs.items():
            ax.plot(*zip(*points), marker=".", label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(caption, fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(_wrap(title, 45 * len(conditions)), fontsize=9)
    return save_figure(fig, stem)
