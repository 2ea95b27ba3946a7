"""What the texture-synthesis and reconstruction recipes share: a VGG feature extractor with named
read-out taps, its weights, image I/O, Gram matrices, the image optimiser and the figures.

Top-K is never computed here: the recipes ``sparsify`` the extractor's taps (``taps.<layer>``), so every
mask is the core's op. A tap reads a layer's activation without changing what flows on to deeper layers,
so each layer's mask acts on that layer's true response.
"""
from __future__ import annotations

import argparse
import csv
import textwrap
from pathlib import Path
from typing import Callable

import torch
import torchvision
from PIL import Image
from torch import nn
from tqdm import tqdm

from topk_plugin.integrations.imagenet16 import IMAGENET_MEAN, IMAGENET_STD
from topk_plugin.recipes._common import image_files, require_dir, resolve_device, seed_everything, warn_meaningless
from topk_plugin import sparsify, topk_layers

# Convolutions per block; torchvision's ``features`` is conv, ReLU per conv and a max-pool per block.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CFGS = {"vgg16": "D", "vgg19": "E"}  # torchvision.models.vgg.cfgs keys
RANDOM_NOTE = "RANDOM WEIGHTS - MEANINGLESS"


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


def check_layers(arch: str, layers: list[str]) -> list[str]:
    unknown = [name for name in layers if name not in LAYERS[arch]]
    if unknown:
        raise ValueError(f"unknown {arch} layer(s) {unknown}; choose from {list(LAYERS[arch])}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} name a layer twice")
    return layers


class VGGTaps(nn.Module):
    """VGG ``features`` (torchvision names ``features.N``) up to the deepest requested layer.

    Takes RGB images in [0, 1], normalises them for ImageNet, and returns ``{layer: activation}`` as read
    through ``taps.<layer>`` (identities: the place where ``sparsify`` puts Top-K).
    """

    def __init__(self, features: nn.Sequential, arch: str, layers: list[str]):
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


def tap_positions(layers: list[str]) -> list[str]:
    """``sparsify`` positions of the taps for ``layers``."""
    return [f"taps.{name}" for name in layers]


def build_extractor(features: nn.Sequential, arch: str, layers: list[str], k) -> nn.Module:
    """``VGGTaps`` frozen, with the core's Top-K (``identity`` mode until ``set_topk_mode``) on every tap."""
    taps = VGGTaps(features, arch, layers).requires_grad_(False)
    return sparsify(taps, tap_positions(layers), k=k, mode="identity").eval()


def set_topk_mode(extractor: nn.Module, mode: str) -> None:
    """Switch every Top-K layer of a sparsified extractor to ``mode`` (``identity``, ``topk``, ``non_topk``)."""
    for layer in topk_layers(extractor).values():
        layer.mode = mode


# ----------------------------------------------------------------------------- weights

def _file_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``features`` part of a saved VGG state_dict (full model, ``features`` only, or wrapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise SystemExit(f"--weights {path}: not a readable state_dict ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SystemExit(f"--weights {path} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("features.") for k in state):
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


def _torchvision_state(weights) -> dict[str, torch.Tensor]:
    """The ``features`` part of torchvision ``weights``, by torchvision's own loading (hub cache or download)."""
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as err:  # noqa: BLE001 - no network, no cache: say how to provide them instead
        raise SystemExit(f"could not load torchvision weights {weights} ({type(err).__name__}: {err}). "
                         f"Put {weights.url.rsplit('/', 1)[-1]} in torch's hub cache "
                         f"({torch.hub.get_dir()}/checkpoints), or pass --weights PATH to a saved VGG "
                         "state_dict") from None
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


def _features(arch: str) -> nn.Sequential:
    """torchvision's ``<arch>().features`` with its VGG initialisation, without building the 100M-weight classifier."""
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[CFGS[arch]])
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def load_features(arch: str, weights: str | None, random_weights: bool) -> tuple[nn.Sequential, str]:
    """torchvision ``<arch>().features`` with ``weights`` (a torchvision weights name or a file), and its source."""
    if arch not in BLOCKS:
        raise ValueError(f"arch={arch!r} is not supported; choose one of {list(BLOCKS)}")
    enum = torchvision.models.get_model_weights(arch)
    names = list(enum.__members__)
    if random_weights == (weights is not None):
        raise SystemExit(
            f"{'both' if random_weights else 'no'} VGG weights given: pass exactly one of --weights NAME "
            f"(torchvision's {arch} weights {names}, downloaded to / read from torch's cache), --weights PATH "
            f"(a saved {arch} state_dict), or --random-weights (tests and smoke runs; results are meaningless)")
    features = _features(arch)
    if random_weights:
        return features, "random"
    if Path(weights).is_file():
        state, source = _file_state(Path(weights)), str(Path(weights).resolve())
    elif weights.split(".")[-1] in names:
        chosen = enum[weights.split(".")[-1]]
        state, source = _torchvision_state(chosen), f"torchvision:{chosen}"
    else:
        raise SystemExit(f"--weights {weights!r} is neither a file nor a torchvision {arch} weights name {names}")
    try:
        features.load_state_dict(state)
    except RuntimeError as err:
        raise SystemExit(f"--weights {weights!r} does not fit torchvision {arch}.features: {err}") from None
    return features, source


def add_vgg_args(parser: argparse.ArgumentParser, layers: list[str], k: float, steps: int, lr: float) -> None:
    """The options both recipes share (network, weights, layers, optimisation)."""
    parser.add_argument("--arch", default="vgg19", choices=list(BLOCKS), help="torchvision VGG")
    parser.add_argument("--weights", default=None,
                        help="torchvision weights name (IMAGENET1K_V1, DEFAULT: torchvision's download/cache) or a "
                             "path to a saved VGG state_dict; required unless --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="random VGG (tests; implied by --smoke without --weights): outputs marked MEANINGLESS")
    parser.add_argument("--layers", nargs="+", default=layers, help="VGG layers (relu1_1, pool1, conv3_2, ...)")
    parser.add_argument("--k", type=float, default=k, help="Top-K: fraction in (0, 1] of each channel's positions")
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps (loss recorded after each)")
    parser.add_argument("--lbfgs-iters", type=int, default=20, help="L-BFGS iterations per step")
    parser.add_argument("--lr", type=float, default=lr, help="L-BFGS learning rate (first trial step length)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (shorter side, centre crop)")
    parser.add_argument("--images", type=int, default=3, help="how many images of --data (sorted by name)")


def prepare_run(args: argparse.Namespace, what: str) -> tuple[torch.device, list[Path], nn.Sequential, str]:
    """Seed, device, input images and VGG features of a run (``source`` is "random" for random weights)."""
    seed_everything(args.seed)
    device = resolve_device(args.device)
    paths = list_images(require_dir(args.data, "image folder"), args.images)
    features, source = load_features(args.arch, args.weights, args.random_weights)
    if source == "random":
        warn_meaningless(f"{what} with a randomly initialised VGG")
    return device, paths, features, source


def apply_smoke(args: argparse.Namespace) -> None:
    """Seconds-long CPU settings; random weights unless weights were given."""
    args.size, args.steps, args.lbfgs_iters, args.images = 64, 2, 2, 1
    args.random_weights = args.random_weights or args.weights is None


# ----------------------------------------------------------------------------- images

def list_images(folder: Path, count: int) -> list[Path]:
    paths = image_files(folder, what="image folder")
    if count < 1:
        raise SystemExit(f"--images {count}: need at least 1")
    return paths[:count]


def load_image(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) RGB in [0, 1]: shorter side resized to ``size``, centre crop."""
    image = Image.open(path).convert("RGB")
    image = torchvision.transforms.functional.resize(image, size)
    image = torchvision.transforms.functional.center_crop(image, size)
    return torchvision.transforms.functional.to_tensor(image).unsqueeze(0)


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


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- figures

def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_image_grid(path: Path, rows: list[list[torch.Tensor]], columns: list[str], row_labels: list[str],
                    title: str) -> Path:
    """Images (1, 3, H, W) in a grid at about their own resolution, with column and row labels."""
    plt = _pyplot()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_curves(path: Path, rows: list[dict], conditions: dict[str, str], title: str) -> Path:
    """One panel per condition (log loss vs step), one line per run (``label`` of each row)."""
    plt = _pyplot()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
