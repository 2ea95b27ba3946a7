"""Few-shot FastGAN with Top-K, FID/KID through torch-fidelity (paper §4.4, supp. Table 1).

Commands:
  train   train on an image folder; every --eval-every iterations: a sample grid, FID/KID of the EMA
          generator against the training images (best checkpoint by FID kept; after --rollback-patience
          evaluations without a new best, training rolls back to it), Top-K maps of the 32x32 layer
  sample  write --n images and a grid from --ckpt (a run folder, our checkpoint, or an official/fork file)
  eval    FID/KID of --ckpt (or of a --samples folder) against --data
  sweep   the K ablation: dense and Top-K at each --ks, for each --seeds; prints mean ± std as in the paper

Defaults reproduce the authors' runs (few-shot-img-syn/TopKGen/scripts/*/run.sh in
Crazy-Jack/nips2023_shape_vs_texture); README "Few-shot FastGAN" lists every difference and its option.

Examples:
  python -m topk_plugin.recipes.fastgan train --data ../shared/data/few-shot/jeep --out runs/jeep-topk --topk paper --inception-weights pt_inception.pth
  python -m topk_plugin.recipes.fastgan train --data ../shared/data/few-shot/table --out runs/table-topk --topk paper --k 0.15
  python -m topk_plugin.recipes.fastgan sample --ckpt runs/jeep-topk --out runs/jeep-topk-samples --n 3000
  python -m topk_plugin.recipes.fastgan sweep --data ../shared/data/few-shot/jeep --out runs/jeep-sweep --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.utils import save_image
from tqdm import tqdm

from topk_plugin import TopKSpec, get_preset, is_sparsified, parse_spec, sparsify, topk_layers, topk_mask
from topk_plugin.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from topk_plugin.integrations.fidelity import (FEATURE_LAYERS, PROTOCOLS, InceptionWeightsUnavailable, draw_images,
                                               fid_kid, resolve_inception_weights)
from topk_plugin.recipes._common import (SHARED_DATA, UnreadableImage, apply_smoke, atomic_save, check_distinct,
                                         check_resume_config, format_mean_std, image_files, k_list, load_config,
                                         mean_std, parse_k, positive_int, prepare_out, pyplot, read_image,
                                         recipe_parser, require_dir, resolve_device, save_config, save_figure,
                                         seed_everything, warn_meaningless, write_csv, write_json)
from topk_plugin.recipes.fastgan_models import (OUTPUTS, PAPER_POLICY, SE_GATES, Discriminator, GeneratorConfig,
                                                crop_part, diff_augment, small_size, upstream_generator_config,
                                                upstream_generator_state, upstream_key_map)

CHECKPOINT_FORMAT = "topk_plugin.fastgan/2"
PAPER_KS = "0.02,0.05,0.07,0.1,0.15,0.2,0.5"
RESIZES = ("stretch", "crop")
SMOKE = dict(size=64, ngf=8, ndf=8, nz=32, iters=6, batch_size=2, eval_every=3, n_samples=4, n_real=4,
             fid_features="64", grid=4, ks=[0.05, 0.15], seeds="0", n=8)
MAP_IMAGES, MAP_CHANNELS, MAP_ROWS, MAP_GAP = 2, 6, 8, 2
MAP_GAP_COLOUR = torch.tensor([70, 130, 180], dtype=torch.uint8)  # neither black nor white: maps stay readable
MODEL_FIELDS = ("size", "ngf", "nz", "noise", "se_gate", "output", "topk", "k")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (saved as config.json; on --resume the saved one is authoritative)."""

    data: str
    size: int = 256
    ngf: int = 64
    ndf: int = 64
    nz: int = 256
    noise: bool = False
    se_gate: str = "none"
    output: str = "fastgan"
    topk: str = "none"
    k: float | int | None = None
    iters: int = 100000
    batch_size: int = 8
    lr: float = 2e-4
    ema_decay: float = 0.999
    policy: str = PAPER_POLICY
    resize: str = "stretch"
    skip_bad_images: bool = False
    lpips_weights: str | None = None
    amp: bool = False
    seed: int = 0
    eval_every: int = 1000
    metrics: bool = True
    inception_weights: str | None = None
    fid_protocol: str = "paper"
    n_samples: int = 3000
    n_real: int = 0
    kid_subset_size: int | None = None
    fid_features: str = "2048"
    rollback_patience: int = 10
    rollback_eps_g: float = 1e-4
    rollback_eps_d: float = 0.0
    max_rollbacks: int = 20
    grid: int = 16

    def generator(self) -> GeneratorConfig:
        return GeneratorConfig(self.size, self.ngf, self.nz, self.noise, self.se_gate, self.output)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the command list and examples as written, and still shows defaults."""


def build_parser():
    parser = recipe_parser(__doc__.split("\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/fastgan", trains=True)
    parser.description, parser.formatter_class = __doc__, _HelpFormatter
    parser.add_argument("command", choices=list(COMMANDS), help="what to do (see above)")
    model = parser.add_argument_group("model (defaults: the paper's runs)")
    model.add_argument("--size", type=int, default=256, help="image resolution (64, 128, 256, 512, 1024)")
    model.add_argument("--ngf", type=positive_int, default=64, help="generator width")
    model.add_argument("--ndf", type=positive_int, default=64, help="discriminator width")
    model.add_argument("--nz", type=positive_int, default=256, help="noise dimension")
    model.add_argument("--noise", action=argparse.BooleanOptionalAction, default=False,
                       help="noise injection in the generator (the paper's runs: --nonoise, i.e. off)")
    model.add_argument("--se-gate", choices=SE_GATES, default="none",
                       help="skip-layer excitation gate: 'none' = raw conv output as in the authors' fork (the "
                            "paper's numbers); 'sigmoid' = official FastGAN")
    model.add_argument("--output", choices=OUTPUTS, default="fastgan",
                       help="'fastgan': raw generator outputs at 256/512 px, tanh at 1024 (official and fork); "
                            "'tanh': tanh at every size")
    model.add_argument("--topk", default="none",
                       help="'none' (dense), or a spec as topk_plugin.parse_spec reads it: 'paper' (the core "
                            "preset: Top-K after feat_32, 5%%, the fork's --sparse_hw_info 32_5), module names "
                            "('feat_32,feat_64'), or JSON (TopKSpec fields, a list of them, or of positions)")
    model.add_argument("--k", type=parse_k, default=None,
                       help="override the spec's k: a fraction kept (table: 0.15) or an integer count")
    train = parser.add_argument_group("train")
    train.add_argument("--iters", type=positive_int, default=100000,
                       help="training iterations (the paper's run.sh: 100000); may be raised on --resume")
    train.add_argument("--batch-size", type=positive_int, default=8, help="batch size")
    train.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, betas (0.5, 0.999)")
    train.add_argument("--ema-decay", type=float, default=0.999, help="EMA generator decay")
    train.add_argument("--policy", default=PAPER_POLICY, help="DiffAugment policy (add ',cutout' for DiffAugment's full one)")
    train.add_argument("--resize", choices=RESIZES, default="stretch",
                       help="images to SIZE x SIZE: 'stretch' (the fork: no crop, aspect changes) or 'crop' "
                            "(shorter side, centre crop); also the real images' for FID/KID")
    train.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (listed) instead of stopping")
    train.add_argument("--lpips-weights", type=Path, default=None,
                       help="LPIPS (vgg) linear-layer weights for the reconstruction loss; needs the lpips "
                            "package. Without it the loss is L1 (logged)")
    train.add_argument("--amp", action="store_true", help="mixed precision on CUDA (the paper: float32)")
    train.add_argument("--rollback-patience", type=int, default=10,
                       help="roll back to the best checkpoint after this many evaluations without a new best FID "
                            "(the fork's --backup_scheduler_patience); 0 disables")
    train.add_argument("--rollback-eps-g", type=float, default=1e-4,
                       help="after a rollback add U(-eps, eps) to every generator parameter (run.sh: --eps_G 1e-4)")
    train.add_argument("--rollback-eps-d", type=float, default=0.0, help="the same for the discriminator (--eps_D)")
    train.add_argument("--max-rollbacks", type=int, default=20,
                       help="stop rolling back after this many (the fork: unlimited; 0 = unlimited)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--eval-every", type=positive_int, default=1000, help="iterations between evaluations")
    metrics.add_argument("--fid-protocol", choices=list(PROTOCOLS), default="paper",
                         help="'paper': the fork's evaluator (batch-statistics sampling, [127, 255] pixel range, "
                              "best FID of 3 draws, KID subsets of 100); 'standard': torch-fidelity as documented")
    metrics.add_argument("--n-samples", type=positive_int, default=3000, help="generated images per FID/KID (paper: 3000)")
    metrics.add_argument("--n-real", type=int, default=0, help="reference images for FID/KID (0: all of --data)")
    metrics.add_argument("--kid-subset-size", type=positive_int, default=None,
                         help="KID subset size (capped at set sizes); default: the protocol's (paper 100, standard 1000)")
    metrics.add_argument("--fid-features", default="2048", choices=FEATURE_LAYERS,
                         help="Inception layer for FID/KID (2048 is the standard; --smoke uses 64)")
    metrics.add_argument("--inception-weights", type=Path, default=None,
                         help="torch-fidelity Inception weights file; default: its normal download (hub cache)")
    metrics.add_argument("--no-metrics", action="store_true", help="skip FID/KID (no Inception weights needed)")
    metrics.add_argument("--grid", type=positive_int, default=16, help="images in each sample grid")
    other = parser.add_argument_group("sample / eval / sweep")
    other.add_argument("--ckpt", type=Path, default=None,
                       help="'sample'/'eval': a train run folder (its best.pt, else last.pt), one of our checkpoints, "
                            "or an official FastGAN / fork file ({'g','d'}, all_*.pth, best_all_*.pth; give the "
                            "model options it was trained with: --se-gate, --noise, --topk, --k)")
    other.add_argument("--n", type=positive_int, default=64, help="images 'sample' writes")
    other.add_argument("--samples", type=Path, default=None, help="'eval': score this folder instead of a checkpoint")
    other.add_argument("--ks", type=k_list, default=k_list(PAPER_KS), help="'sweep': K values")
    other.add_argument("--seeds", default="0,1,2", help="'sweep': seeds")
    return parser


def train_config(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values.update(data=str(args.data), metrics=not args.no_metrics,
                  lpips_weights=str(args.lpips_weights) if args.lpips_weights else None,
                  inception_weights=str(args.inception_weights) if args.inception_weights else None)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- data, models, losses

def load_images(folder: Path, size: int, *, resize: str = "stretch", limit: int = 0,
                skip_bad: bool = False) -> torch.Tensor:
    """Every image under ``folder`` as uint8 (N, 3, size, size): stretched (the fork) or centre-cropped.

    An unreadable image stops with its name, or with ``skip_bad`` is left out and listed.
    """
    paths = image_files(require_dir(folder, "image folder"), recursive=True, what="image folder")
    paths = paths[:limit] if limit else paths
    images, skipped = [], []
    for path in tqdm(paths, desc=f"loading {Path(folder).name}", leave=False):
        try:
            image = read_image(path)
        except UnreadableImage as err:
            if not skip_bad:
                raise
            skipped.append(f"{path} ({err})")
            continue
        image = TF.resize(image, [size, size]) if resize == "stretch" else TF.center_crop(TF.resize(image, size), size)
        images.append(TF.pil_to_tensor(image))
    if skipped:
        print(f"--skip-bad-images: left out {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped))
    if len(images) < 2:
        raise SystemExit(f"image folder {folder} has {len(images)} readable image(s); FastGAN needs at least 2")
    return torch.stack(images)


def build_generator(config: GeneratorConfig, topk: str, k) -> torch.nn.Module:
    """The generator of ``config``, dense for ``topk="none"``, else sparsified by the spec ``topk`` (read by
    ``topk_plugin.parse_spec``; ``"paper"`` is the core FastGAN preset) with ``k`` overriding its K."""
    try:
        generator = config.build()
    except ValueError as err:
        raise SystemExit(f"generator: {err}") from None
    if topk == "none":
        return generator
    try:
        return sparsify(generator, parse_spec(topk), k=k, inplace=True)  # no copy: the dense one is ours
    except ValueError as err:
        raise SystemExit(f"--topk {topk!r}: {err}") from None


def describe_topk(generator: torch.nn.Module) -> str:
    if not is_sparsified(generator):
        return "dense"
    return "Top-K " + ", ".join(f"{p} k={layer.k:g} ({layer.mode})" for p, layer in topk_layers(generator).items())


def paper_topk(generator: torch.nn.Module) -> TopKSpec:
    """The paper's Top-K for the FastGAN generator: the core preset ``"paper"`` (``feat_32``, 5%)."""
    return get_preset("paper", generator).spec


def map_k(generator: torch.nn.Module) -> float:
    """K of the Top-K maps: the model's own at the paper's position, else the paper's K for a dense model."""
    paper = paper_topk(generator)
    layers = topk_layers(generator) if is_sparsified(generator) else {}
    return layers[paper.positions[0]].k if paper.positions[0] in layers else paper.k


def reconstruction_loss(weights: str | None, device: torch.device):
    """(loss(pred, target) summed over the batch as the fork does, description): LPIPS-vgg if available, else L1."""
    if weights is None:
        return (lambda pred, target: (pred - target).abs().flatten(1).mean(1).sum()), \
            "L1 (fallback: no --lpips-weights given)"
    if not Path(weights).is_file():
        raise SystemExit(f"--lpips-weights {weights} is not a file")
    try:
        import lpips
    except ImportError:
        raise SystemExit("--lpips-weights needs the lpips package: pip install lpips") from None
    net = lpips.LPIPS(net="vgg", model_path=str(weights), verbose=False).to(device).eval().requires_grad_(False)
    return (lambda pred, target: net(pred, target).sum()), f"LPIPS-vgg ({weights})"


class EpochSampler:
    """Batches in a fresh random order each pass over the data (the fork's ``InfiniteSamplerWrapper``), with
    random horizontal flips; its position is part of a checkpoint, so a resumed run sees the same batches."""

    def __init__(self, count: int):
        self.count, self.order, self.pos = count, torch.randperm(count), 0

    def next_indices(self, batch_size: int) -> torch.Tensor:
        picked = []
        for _ in range(batch_size):
            if self.pos == self.count:
                self.order, self.pos = torch.randperm(self.count), 0
            picked.append(int(self.order[self.pos]))
            self.pos += 1
        return torch.tensor(picked)

    def state_dict(self) -> dict:
        return {"order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = state["order"], state["pos"]


def real_batch(data: torch.Tensor, sampler: EpochSampler, batch_size: int, device: torch.device) -> torch.Tensor:
    x = data[sampler.next_indices(batch_size)].to(device).float() / 127.5 - 1
    flip = torch.rand(batch_size, 1, 1, 1, device=device) < 0.5
    return torch.where(flip, x.flip(3), x)


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in ema.named_parameters():
            p.lerp_(params[name], 1 - decay)
        buffers = dict(model.named_buffers())
        for name, b in ema.named_buffers():
            b.copy_(buffers[name])


def perturb(model: torch.nn.Module, eps: float) -> None:
    """Add U(-eps, eps) to every parameter (the fork's ``perturb_params`` after a rollback)."""
    if eps > 0:
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.rand(p.shape, device=p.device) - 0.5) * 2 * eps)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- evaluation outputs

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def feat32_maps(generator: torch.nn.Module, z: torch.Tensor, k: float) -> dict:
    """Generated images and the binary Top-K maps (``topk_mask``) of the first channels at the paper's
    position (``feat_32``)."""
    captured, position = {}, paper_topk(generator).positions[0]
    handle = generator.get_submodule(position).register_forward_hook(
        lambda module, args, output: captured.update(feat=output))
    try:
        with torch.no_grad():
            images = generator(z)[0]
    finally:
        handle.remove()
    masks = topk_mask(captured["feat"][:, :MAP_CHANNELS].float(), k)
    return {"images": to_uint8(images), "masks": masks.cpu(), "k": k, "position": position}


def _map_strip(entry: dict) -> torch.Tensor:
    """One evaluation as one RGB strip: per image, its sample then its channels' maps (white: kept), each
    map enlarged (nearest) to the sample's size, cells parted by coloured gaps."""
    images, masks = entry["images"], entry["masks"]
    size = images.shape[-1]
    gap = MAP_GAP_COLOUR.view(3, 1, 1).expand(3, size, MAP_GAP)
    cells = []
    for image, image_masks in zip(images, masks):
        maps = F.interpolate(image_masks[:, None].float(), size=(size, size), mode="nearest") * 255
        cells += [image, *maps.to(torch.uint8).expand(-1, 3, -1, -1)]
    return torch.cat([part for cell in cells for part in (cell, gap)][:-1], dim=2)


def plot_topk_maps(map_dir: Path, stem: Path) -> list[Path]:
    """Grid: one row per evaluation (at most ``MAP_ROWS``), per image its sample then its channels' maps,
    drawn as one image (one axes, not one per cell: the figure is written at every run's end)."""
    plt = pyplot()
    files = sorted(map_dir.glob("iter_*.pt"))
    if len(files) > MAP_ROWS:
        files = [files[round(i * (len(files) - 1) / (MAP_ROWS - 1))] for i in range(MAP_ROWS)]
    entries = [(int(p.stem.split("_")[1]), torch.load(p)) for p in files]
    strips = [_map_strip(entry) for _, entry in entries]
    height, width = strips[0].shape[1:]
    gap = MAP_GAP_COLOUR.view(3, 1, 1).expand(3, MAP_GAP, width)
    mosaic = torch.cat([part for strip in strips for part in (strip, gap)][:-1], dim=1)
    n_img, n_ch = entries[0][1]["masks"].shape[:2]
    cell = height + MAP_GAP
    fig, ax = plt.subplots(figsize=(n_img * (1 + n_ch) * 0.9, len(entries) * 0.95 + 0.6))
    ax.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.xaxis.tick_top()
    ax.set_xticks([i * cell + height / 2 for i in range(n_img * (1 + n_ch))],
                  [f"image {i // (1 + n_ch)}" if i % (1 + n_ch) == 0 else f"ch {i % (1 + n_ch) - 1}"
                   for i in range(n_img * (1 + n_ch))], fontsize=7)
    ax.set_yticks([i * cell + height / 2 for i in range(len(entries))], [f"it {it}" for it, _ in entries], fontsize=7)
    ax.tick_params(length=0)
    first = entries[0][1]
    fig.suptitle(f"Top-K maps of {first['position']} (K={first['k']:.0%}, white: kept) over training", fontsize=9)
    return save_figure(fig, stem)


def plot_curves(history: list[dict], stem: Path, title: str) -> list[Path]:
    rows = [h for h in history if h.get("fid") is not None]
    if not rows:
        return []
    plt = pyplot()
    fig, (ax_fid, ax_kid) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = range(len(rows))  # evaluation order: a rollback sends the iteration back
    ax_fid.plot(steps, [h["fid"] for h in rows], marker="o")
    ax_kid.errorbar(steps, [h["kid"] * 1e3 for h in rows], yerr=[h["kid_std"] * 1e3 for h in rows], marker="o")
    for ax, name in ((ax_fid, "FID"), (ax_kid, "KID x 10^3")):
        ax.set_xticks(list(steps), [str(h["iteration"]) for h in rows], rotation=45, fontsize=7)
        ax.set_xlabel("evaluation (iteration)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, stem)


def metric_setup(config: TrainConfig) -> Path | None:
    """Inception weights path, or ``None`` without metrics; exits with the reason when unavailable."""
    if not config.metrics:
        print("FID/KID: not measured (--no-metrics)")
        return None
    try:
        return resolve_inception_weights(config.inception_weights)
    except InceptionWeightsUnavailable as err:
        raise SystemExit(f"FID/KID: {err}") from None


# ----------------------------------------------------------------------------- train

def run_inputs(config: TrainConfig) -> tuple[Path | None, torch.Tensor]:
    """The Inception weights and the training images, checked before a run folder is touched."""
    weights = metric_setup(config)  # a run without its metric must not start by accident
    return weights, load_images(Path(config.data), config.size, resize=config.resize, skip_bad=config.skip_bad_images)


def train_run(config: TrainConfig, out: Path, device: torch.device, weights: Path | None, data: torch.Tensor, *,
              resume: bool = False) -> dict:
    """Train one run into ``out`` (already prepared); returns the summary also written to ``results.json``."""
    seed_everything(config.seed)
    reference = data[:config.n_real] if config.n_real else data
    recon_loss, recon_name = reconstruction_loss(config.lpips_weights, device)
    generator = build_generator(config.generator(), config.topk, config.k).to(device)
    placement = describe_topk(generator)
    print(f"FastGAN {config.size}px on {config.data} ({len(data)} images), {placement}, SLE gate "
          f"{config.se_gate}, noise {'on' if config.noise else 'off'}, reconstruction loss: {recon_name}, "
          f"FID protocol {config.fid_protocol}, device {device}")
    discriminator = Discriminator(config.size, config.ndf, config.se_gate).to(device)
    ema = copy.deepcopy(generator).eval()
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    amp = device.type == "cuda" and config.amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    sampler = EpochSampler(len(data))
    modules = {"g": generator, "g_ema": ema, "d": discriminator, "opt_g": opt_g, "opt_d": opt_d, "scaler": scaler,
               "sampler": sampler}
    state = {"iteration": 0, "history": [], "best": None, "bad_evals": 0, "rollbacks": 0, "iteration_count": 0,
             "train_seconds": 0.0}
    (out / "grids").mkdir(exist_ok=True)
    (out / "topk_maps").mkdir(exist_ok=True)

    def checkpoint(path: Path) -> None:
        atomic_save({"format": CHECKPOINT_FORMAT, "generator": dataclasses.asdict(config.generator()),
                     "topk": {"topk": config.topk, "k": config.k},
                     **{name: m.state_dict() for name, m in modules.items()},
                     "state": state, "rng": rng_state()}, path)

    def restore(path: Path, *, everything: bool) -> None:
        """Load a checkpoint: all of it (resume), or only the networks and optimisers (rollback: the fork keeps
        its data order and random streams going)."""
        try:
            saved = read_checkpoint(path)
        except CheckpointError as err:
            raise SystemExit(str(err)) from None
        for name, module in modules.items():
            if everything or name != "sampler":
                module.load_state_dict(saved[name])
        if everything:
            state.update(saved["state"])
            set_rng_state(saved["rng"])
        else:
            state["iteration"] = saved["state"]["iteration"]

    if resume and (out / "last.pt").is_file():
        restore(out / "last.pt", everything=True)
        print(f"resumed from {out / 'last.pt'} at iteration {state['iteration']}")
    fixed = torch.randn(config.grid, config.nz, generator=torch.Generator().manual_seed(config.seed)).to(device)
    small = small_size(config.size)
    batch_statistics = PROTOCOLS[config.fid_protocol].batch_statistics

    def evaluate(iteration: int) -> None:
        torch.save(feat32_maps(ema, fixed[:MAP_IMAGES], map_k(ema)), out / "topk_maps" / f"iter_{iteration:06d}.pt")
        images = draw_images(ema, config.nz, config.grid, config.batch_size, device, config.seed, batch_statistics)
        save_image(to_uint8(images).float() / 255, out / "grids" / f"iter_{iteration:06d}.png",
                   nrow=int(math.sqrt(config.grid)))
        row = {"iteration": iteration, "it_per_s": state["iteration_count"] / max(state["train_seconds"], 1e-9)}
        if weights is not None:
            row.update(fid_kid(ema, reference, weights_path=weights, nz=config.nz, num_samples=config.n_samples,
                               size=config.size, device=device, batch_size=config.batch_size,
                               kid_subset_size=config.kid_subset_size, features=config.fid_features,
                               seed=config.seed, protocol=config.fid_protocol))
            tqdm.write(f"[iter {iteration}] FID {row['fid']:.2f}  KIDx10^3 {row['kid'] * 1e3:.2f}")
            if state["best"] is None or row["fid"] < state["best"]["fid"]:
                state["best"], state["bad_evals"] = {k: row[k] for k in ("iteration", "fid", "kid", "kid_std")}, 0
                checkpoint(out / "best.pt")
            else:
                state["bad_evals"] += 1
        state["history"].append(row)
        patience, limit = config.rollback_patience, config.max_rollbacks
        if (weights is not None and patience and state["bad_evals"] >= patience
                and (not limit or state["rollbacks"] < limit)):
            restore(out / "best.pt", everything=False)
            perturb(generator, config.rollback_eps_g)
            perturb(discriminator, config.rollback_eps_d)
            state["rollbacks"] += 1
            state["bad_evals"] = 0
            row["rollback_to"] = state["iteration"]
            tqdm.write(f"[iter {iteration}] no better FID in {patience} evaluations: back to iteration "
                       f"{state['iteration']} (rollback {state['rollbacks']})")
        checkpoint(out / "last.pt")

    if state["iteration"] == 0 and not state["history"]:
        torch.save(feat32_maps(ema, fixed[:MAP_IMAGES], map_k(ema)), out / "topk_maps" / "iter_000000.pt")
    bar = tqdm(desc="train", initial=state["iteration"], total=config.iters)
    while state["iteration"] < config.iters:
        start = time.perf_counter()
        real = real_batch(data, sampler, config.batch_size, device)
        z = torch.randn(config.batch_size, config.nz, device=device)
        part = int(torch.randint(4, ()))
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            fake_big, fake_small = generator(z)
            real_big = diff_augment(real, config.policy)
            real_small = F.interpolate(real_big, small)  # the fork's discriminator: nearest, after augmenting
            logits_real, recon = discriminator(real_big, real_small, part)
            targets = (real_small, real_small, F.interpolate(crop_part(real_big, part), small))
            loss_recon = sum(recon_loss(r.float(), t.float()) for r, t in zip(recon, targets))
            fake_big_aug, fake_small_aug = diff_augment(fake_big, config.policy), diff_augment(fake_small, config.policy)
            logits_fake = discriminator(fake_big_aug.detach(), fake_small_aug.detach())
            # hinge loss with the fork's (and official) random margins in [0.8, 1]
            loss_d = (F.relu(torch.rand_like(logits_real) * 0.2 + 0.8 - logits_real).mean()
                      + F.relu(torch.rand_like(logits_fake) * 0.2 + 0.8 + logits_fake).mean() + loss_recon)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.step(opt_d)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss_g = -discriminator(fake_big_aug, fake_small_aug).mean()
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        update_ema(ema, generator, config.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["train_seconds"] += time.perf_counter() - start
        state["iteration"] += 1
        state["iteration_count"] += 1
        bar.n = state["iteration"]
        bar.set_postfix(d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}", rec=f"{loss_recon.item():.3f}")
        if state["iteration"] % config.eval_every == 0 or state["iteration"] == config.iters:
            evaluate(state["iteration"])
    bar.close()
    return finish_run(config, out, state, placement, recon_name, weights, device, amp, len(data), len(reference))


def finish_run(config: TrainConfig, out: Path, state: dict, placement: str, recon_name: str, weights, device,
               amp: bool, images: int, reference: int) -> dict:
    title = (f"FastGAN {Path(config.data).name} {config.size}px, {placement}, "
             f"FID protocol {config.fid_protocol}, reconstruction {recon_name.split(' ')[0]}")
    write_csv(out / "metrics.csv", state["history"])
    figures = plot_curves(state["history"], out / "fid_kid", title) + plot_topk_maps(out / "topk_maps", out / "topk_maps")
    summary = {"config": config, "topk": placement, "images": images, "reference_images": reference,
               "reconstruction_loss": recon_name, "device": str(device), "amp": amp,
               "iterations": state["iteration"], "iterations_run": state["iteration_count"],
               "rollbacks": state["rollbacks"],
               "it_per_s": state["iteration_count"] / max(state["train_seconds"], 1e-9),
               "metrics": (f"FID/KID (torch-fidelity, {config.fid_protocol} protocol)" if weights is not None
                           else "not measured (--no-metrics)"),
               "inception_weights": str(weights) if weights else None, "best": state["best"],
               "history": state["history"], "figures": [str(p) for p in figures]}
    write_json(out / "results.json", summary)
    print(f"wrote {out}: {state['iteration']} iterations at {summary['it_per_s']:.2f} it/s, best {state['best']}")
    return summary


def resolved_config(args, parser, out: Path, *, resume: bool) -> TrainConfig:
    """The run's config: from the options, or on ``resume`` the saved one (options given differently: error)."""
    config = train_config(args)
    if not resume:
        return config
    given = {name: getattr(config, name) for name in parser.given if name in dataclasses.asdict(config)}
    given.pop("iters", None)  # a resumed run may be trained further
    check_resume_config(out, given)
    saved = load_config(out)
    return TrainConfig(**{**saved, "iters": config.iters if "iters" in parser.given else saved["iters"]})


def train(args, parser) -> dict:
    device = resolve_device(args.device)
    config = resolved_config(args, parser, args.out, resume=args.resume) if args.resume else train_config(args)
    build_generator(config.generator(), config.topk, config.k)  # a bad --topk/--size stops before any work
    weights, data = run_inputs(config)
    out = prepare_out(args.out, resume=args.resume, overwrite=args.overwrite)
    save_config(out, config)
    return train_run(config, out, device, weights, data, resume=args.resume)


# ----------------------------------------------------------------------------- sample / eval

def checkpoint_path(ckpt: Path | None) -> Path:
    if ckpt is None:
        raise SystemExit("give --ckpt: a train run folder, one of its checkpoints, or an official/fork FastGAN file")
    if Path(ckpt).is_dir():
        found = next((p for p in (ckpt / "best.pt", ckpt / "last.pt") if p.is_file()), None)
        if found is None:
            raise SystemExit(f"--ckpt {ckpt}: the folder holds neither best.pt nor last.pt")
        return found
    return Path(ckpt)


def load_generator(args, parser) -> tuple[torch.nn.Module, GeneratorConfig]:
    """The EMA generator of ``--ckpt``: ours (its stored config is authoritative) or an upstream file."""
    path = checkpoint_path(args.ckpt)
    given = {name: getattr(args, name) for name in MODEL_FIELDS if name in parser.given}
    try:
        saved = read_checkpoint(path)
        if isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT:
            stored = {**saved["generator"], **saved["topk"]}
            conflicts = [f"--{n.replace('_', '-')}: the checkpoint has {stored[n]!r}, this command gives {v!r}"
                         for n, v in given.items() if stored[n] != v]
            if conflicts:
                raise SystemExit(f"--ckpt {path} defines the model:\n  " + "\n  ".join(conflicts))
            config = GeneratorConfig(**saved["generator"])
            generator = build_generator(config, saved["topk"]["topk"], saved["topk"]["k"])
            load_checkpoint(generator, saved, key="g_ema")
        else:
            state = upstream_generator_state(saved)
            choices = {n: given[n] for n in ("se_gate", "output", "noise") if n in given}
            config = upstream_generator_config(state, **choices)
            generator = build_generator(config, args.topk, args.k)
            load_checkpoint(generator, state, key_map=upstream_key_map(state, noise=config.noise))
            print(f"{path}: upstream FastGAN generator {config}, {describe_topk(generator)} "
                  "(SLE gate, output and Top-K are not stored in such files: given by the options)")
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"--ckpt {path}: {err}") from None
    return generator.eval(), config


def sample(args, parser) -> dict:
    device = resolve_device(args.device)
    generator, config = load_generator(args, parser)
    out = prepare_out(args.out, overwrite=args.overwrite)
    folder = out / "samples"
    folder.mkdir()
    batch_statistics = PROTOCOLS[args.fid_protocol].batch_statistics
    images = to_uint8(draw_images(generator, config.nz, args.n, args.batch_size, device, args.seed, batch_statistics))
    for i, image in enumerate(tqdm(images, desc="sample")):
        TF.to_pil_image(image).save(folder / f"{i:05d}.png")
    save_image(images[:64].float() / 255, out / "samples.png", nrow=8)
    write_json(out / "sample.json", {"ckpt": str(args.ckpt), "generator": config, "count": len(images),
                                     "batch_statistics": batch_statistics, "seed": args.seed})
    print(f"wrote {len(images)} images to {folder} and a grid to {out / 'samples.png'}")
    return {"folder": str(folder), "count": len(images)}


def evaluate_command(args, parser) -> dict:
    device = resolve_device(args.device)
    if args.no_metrics:
        raise SystemExit("'eval' computes FID/KID; drop --no-metrics")
    weights = metric_setup(train_config(args))
    if args.samples is not None:
        size = args.size
        generated, nz = load_images(args.samples, size, resize=args.resize, skip_bad=args.skip_bad_images), None
    else:
        generated, config = load_generator(args, parser)
        size, nz = config.size, config.nz
    reference = load_images(args.data, size, resize=args.resize, limit=args.n_real, skip_bad=args.skip_bad_images)
    out = prepare_out(args.out, overwrite=args.overwrite)
    result = fid_kid(generated, reference, weights_path=weights, nz=nz, num_samples=args.n_samples, size=size,
                     device=device, batch_size=args.batch_size, kid_subset_size=args.kid_subset_size,
                     features=args.fid_features, seed=args.seed, protocol=args.fid_protocol)
    result.update(inception_weights=str(weights), data=str(args.data), ckpt=str(args.ckpt or ""),
                  samples=str(args.samples or ""))
    write_json(out / "eval.json", result)
    print(f"FID {result['fid']:.2f}  KIDx10^3 {result['kid'] * 1e3:.2f} ± {result['kid_std'] * 1e3:.2f} "
          f"({args.fid_protocol} protocol)")
    return result


# ----------------------------------------------------------------------------- sweep

def summary_cell(values: list[float], scale: float = 1.0) -> str:
    """``mean ± std`` over seeds, for the sweep table."""
    return format_mean_std(*mean_std(v * scale for v in values)) if values else "not measured"


def sweep(args, parser) -> list[dict]:
    """Dense and Top-K at each K, each seed; finished runs (their results.json) are reused on --resume."""
    device = resolve_device(args.device)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated integers") from None
    check_distinct("--seeds", seeds)
    base = train_config(args)
    spec = base.topk if base.topk != "none" else "paper"
    build_generator(base.generator(), spec, None)
    plan = {"base": base, "ks": args.ks, "seeds": seeds}
    if args.resume:
        check_resume_config(args.out, plan)
    weights, data = run_inputs(base)
    out = prepare_out(args.out, resume=args.resume, overwrite=args.overwrite)
    save_config(out, plan)
    rows = []
    for seed in seeds:
        for k in [None, *args.ks]:
            tag = "dense" if k is None else f"topk_{k!r}"  # repr: a count 1 is topk_1, all positions topk_1.0
            config = dataclasses.replace(base, seed=seed, topk="none" if k is None else spec, k=k)
            run_out, done = out / tag / f"seed{seed}", out / tag / f"seed{seed}" / "results.json"
            if done.is_file():
                summary = json.loads(done.read_text())
            else:
                resume = (run_out / "last.pt").is_file()
                prepare_out(run_out, resume=resume, overwrite=not resume)
                save_config(run_out, config)
                summary = train_run(config, run_out, device, weights, data, resume=resume)
            best = summary["best"] or {}
            rows.append({"method": tag, "k": k, "seed": seed, "fid": best.get("fid"), "kid": best.get("kid"),
                         "it_per_s": summary["it_per_s"], "iterations": summary["iterations"]})
    write_csv(out / "sweep.csv", rows)
    write_json(out / "sweep.json", rows)
    lines = [f"| Method ({Path(base.data).name}, {base.fid_protocol} FID) | FID | KID x10^3 | it/s |", "|---|---|---|---|"]
    for tag in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == tag]
        k = group[0]["k"]
        name = "FastGAN" if k is None else f"FastGAN + Top-K {k:.0%}" if isinstance(k, float) else f"FastGAN + Top-K {k}"
        fids = [r["fid"] for r in group if r["fid"] is not None]
        kids = [r["kid"] for r in group if r["kid"] is not None]
        lines.append(f"| {name} | {summary_cell(fids)} | {summary_cell(kids, 1e3)} | "
                     f"{np.mean([r['it_per_s'] for r in group]):.2f} |")
    text = "\n".join(lines)
    (out / "sweep.md").write_text(text + "\n")
    plot_sweep(rows, out / "sweep", Path(base.data).name)
    print(text)
    return rows


def plot_sweep(rows: list[dict], stem: Path, name: str) -> list[Path]:
    measured = [r for r in rows if r["fid"] is not None]
    if not measured:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = sorted({r["k"] for r in measured if r["k"] is not None})
    stats = [mean_std(r["fid"] for r in measured if r["k"] == k) for k in ks]
    ax.errorbar([k * 100 for k in ks], [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats],
                marker="o", label="Top-K")
    dense = [r["fid"] for r in measured if r["k"] is None]
    if dense:
        ax.axhline(float(np.mean(dense)), color="gray", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("K (% kept per channel)")
    ax.set_ylabel("best FID")
    ax.set_title(f"FastGAN K ablation, {name}", fontsize=9)
    ax.legend()
    return save_figure(fig, stem)


COMMANDS = {"train": train, "sample": sample, "eval": evaluate_command, "sweep": sweep}


def main(argv=None):
    parser = build_parser()
    args = apply_smoke(parser.parse_args(argv), parser, **SMOKE)
    if args.smoke:
        warn_meaningless(f"--smoke: a {args.size}px FastGAN trained for {args.iters} iterations")
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out {args.out} is a file; name a folder for the run's outputs")
    return COMMANDS[args.command](args, parser)


if __name__ == "__main__":
    main()
