"""Train ResNet-18 with Top-K and evaluate on val and on an AdaIN-stylized val (paper §4.3, supplementary Table 2).

Rows of the table (supplementary Table 2), each mean ± std over --seeds:
  (1) dense training;
  (2) the dense models + Top-K at inference, with the training K;
  (3) the dense models + the best Top-K at inference (K swept over --sweep-k, best mean val accuracy);
  (4) Top-K training;
  (5) dense training + an L1 activation penalty at the Top-K position, one row per lambda;
  (6) Top_K_Mean_Rpl training (kept entries replaced by their channel mean).
Two tables: the paper's protocol (the best val and the best stylized-val accuracy over the epochs, each
maximised separately, as the authors' script reports them) and the final epoch.

The network is the authors' CIFAR-style ResNet-18 (--arch resnet18_paper: 3x3 stem, no max-pool,
avg_pool2d(4) and a Linear over 512x7x7 at 224 px) or torchvision's with a 3x3/1 stem and no max-pool
(--arch resnet18_tv). Top-K sits where the "paper" preset puts it (after layer2, K = 20%). The L1 penalty
is lambda * mean(|a|) over every entry (N, C, H, W) of the activation at each Top-K position, averaged over
positions, added to the cross-entropy.

Data: --data ROOT with train/ and val/ class folders (any ImageFolder pair; --subset in-s1|in-s2 picks the
paper's ImageNet classes), or a root of class folders only, split per class (--val-fraction held out).
--weights FILE evaluates a checkpoint (the authors' {'net': ...} ckpt.pth, or a last.pt of this recipe) instead
of training. Multi-GPU: torchrun --nproc_per_node N -m topk_plugin.recipes.train_topk ... (DDP).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms
from tqdm import tqdm

from topk_plugin import TopKSpec, parse_spec, set_k, sparsify, topk_layers
from topk_plugin.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from topk_plugin.integrations.imagenet16 import IMAGENET_MEAN, IMAGENET_STD
from topk_plugin.models import create_model
from topk_plugin.recipes._common import (SHARED_DATA, apply_smoke, atomic_save, check_distinct, check_resume_config,
                                         format_mean_std, k_list, mean_std, parse_k, positive_int, prepare_out,
                                         pyplot, recipe_parser, resolve_device, save_config, save_figure,
                                         seed_everything, warn_meaningless, write_csv, write_json)
from topk_plugin.recipes.datasets import (SUBSETS, FileListDataset, Splits, bad_images_exit, class_folders,
                                          drop_unreadable, folder_samples, load_splits)
from topk_plugin.recipes.stylize import (StyleSettings, add_style_options, build_adain, style_images, style_settings,
                                         stylize_samples)

# How each trained variant uses the Top-K layers: the sparsify mode (None: no layers at all).
VARIANT_MODES = {"dense": None, "topk": "topk", "l1": "identity", "mean_replace": "mean_replace"}
ROW_OF = {"dense": "(1)", "topk": "(4)", "l1": "(5)", "mean_replace": "(6)"}
PROTOCOLS = {"paper": "paper protocol: best val and best stylized val over the epochs, each maximised separately",
             "final": "final epoch"}


# ----------------------------------------------------------------------------- networks

def _paper_resnet18(num_classes: int, size: int) -> nn.Module:
    if size % 32:
        raise SystemExit(f"--size {size}: --arch resnet18_paper needs a multiple of 32 (224 as the paper)")
    model = create_model("resnet18_paper", num_classes=num_classes)
    if size != 224:  # smoke runs: the same head for the smaller map avg_pool2d(4) leaves, 512 x (size/32)^2
        model.linear = nn.Linear(512 * (size // 32) ** 2, num_classes)
    return model


def _torchvision_resnet18(num_classes: int, size: int) -> nn.Module:
    model = create_model("torchvision/resnet18", num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# name -> builder(num_classes, image size) of the dense network
ARCHS: dict[str, Callable[[int, int], nn.Module]] = {"resnet18_paper": _paper_resnet18,
                                                     "resnet18_tv": _torchvision_resnet18}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that rebuilds a trained network; stored by field in every checkpoint."""

    arch: str
    num_classes: int
    image_size: int
    topk: dict | None = None  # TopKSpec fields (positions, k, mode, kind, ties), None for a dense network

    def build(self) -> nn.Module:
        model = ARCHS[self.arch](self.num_classes, self.image_size)
        return model if self.topk is None else sparsify(model, TopKSpec(**self.topk))


def resolve_topk(text: str, k, model: nn.Module) -> TopKSpec:
    """The placement ``--topk`` names (a preset, positions or JSON), resolved on ``model``, with ``--k`` applied."""
    try:
        layers = topk_layers(sparsify(model, parse_spec(text), k=k, method="hooks"))
    except ValueError as err:
        raise SystemExit(f"--topk {text!r} / --k {k}: {err}") from None
    ks = {layer.k for layer in layers.values()}
    if len(ks) > 1:
        raise SystemExit(f"--topk {text!r} places layers with different K {sorted(ks)}; this recipe trains one K "
                         "(give --k)")
    first = next(iter(layers.values()))
    return TopKSpec(list(layers), k=first.k, kind=first.kind, ties=first.ties)


def model_config(arch: str, num_classes: int, size: int, spec: TopKSpec, variant: str) -> ModelConfig:
    mode = VARIANT_MODES[variant]
    topk = None if mode is None else {"positions": list(spec.positions), "k": spec.k, "mode": mode,
                                      "kind": spec.kind, "ties": spec.ties}
    return ModelConfig(arch, num_classes, size, topk)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class TrainConfig:
    """What a run's results depend on; saved as config.json and authoritative on --resume."""

    data: str
    subset: str | None
    val_fraction: float
    max_per_class: int | None
    skip_bad_images: bool
    split_seed: int
    arch: str
    topk: str
    k: float | int | None
    variants: tuple[str, ...]
    l1_lambdas: tuple[float, ...]
    sweep_k: tuple[float | int, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    size: int
    resize: int
    amp: bool
    stylized_val: str | None
    styles: str
    vgg: str | None
    decoder: str | None
    random_weights: bool
    style: StyleSettings

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise SystemExit(f"--val-fraction {self.val_fraction} must lie in (0, 1)")
        bad = [lam for lam in self.l1_lambdas if not (math.isfinite(lam) and lam > 0)]
        if bad:
            raise SystemExit(f"--l1-lambdas {bad}: each weight must be a finite number > 0")
        check_distinct("--seeds", self.seeds)
        check_distinct("--l1-lambdas", self.l1_lambdas, name=lambda lam: Run("l1", 0, lam).name)
        for flag, value in (("--lr", self.lr), ("--weight-decay", self.weight_decay), ("--momentum", self.momentum)):
            if not (math.isfinite(value) and value >= 0) or (flag == "--lr" and value == 0):
                raise SystemExit(f"{flag} {value} must be a finite number >= 0 (> 0 for --lr)")
        if self.resize < self.size:
            raise SystemExit(f"--resize {self.resize} must be >= --size {self.size} (eval center-crops --size)")


@dataclass(frozen=True)
class Runtime:
    """How this invocation runs, without effect on the results."""

    out: Path
    device: str
    workers: int
    eval_batch_size: int
    stop_after_epochs: int | None

    def __post_init__(self):
        if self.workers < 0:
            raise SystemExit(f"--workers {self.workers} must be >= 0 (0 loads in the main process)")


@dataclass(frozen=True)
class Run:
    """One training: a variant (and L1 weight) with one seed."""

    variant: str
    seed: int
    lam: float | None = None

    @property
    def name(self) -> str:
        return self.variant if self.lam is None else f"l1-{self.lam:g}"


class ActivationL1:
    """Sums ``lam * mean|a|`` over the model's (identity) Top-K layers while training."""

    def __init__(self, model: nn.Module, lam: float):
        self.lam, self.terms = lam, []
        for layer in topk_layers(model).values():
            layer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if module.training:
            self.terms.append(output.float().abs().mean())

    def pop(self) -> torch.Tensor:
        loss = self.lam * torch.stack(self.terms).mean()
        self.terms.clear()
        return loss


# ----------------------------------------------------------------------------- distribution

@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_context(device: str) -> Context:
    """torchrun sets WORLD_SIZE > 1: one process per GPU (NCCL), or gloo on CPU; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(resolve_device(device))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Context(torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"),
                   dist.get_rank(), world)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def all_sum(ctx: Context, *values: float) -> list[float]:
    if ctx.world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------- data

def transforms_for(size: int, resize: int) -> tuple[transforms.Compose, transforms.Compose]:
    """The authors' augmentation and evaluation transforms (at 224/256 exactly theirs)."""
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalize])
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), *normalize])
    return train, evaluation


def eval_loader(samples, transform, ctx: Context, rt: Runtime) -> DataLoader:
    """Each rank reads every world-th image, so summed counts are exact (no sampler padding)."""
    shard = Subset(FileListDataset(samples, transform), range(ctx.rank, len(samples), ctx.world))
    return DataLoader(shard, batch_size=rt.eval_batch_size, num_workers=rt.workers,
                      pin_memory=ctx.device.type == "cuda")


def check_stylized_folder(cfg: TrainConfig, splits: Splits) -> None:
    found = class_folders(Path(cfg.stylized_val), "--stylized-val folder")
    missing = [c for c in splits.classes if c not in found]
    if missing:
        raise SystemExit(f"class mismatch: --stylized-val {cfg.stylized_val} lacks classes {missing} "
                         f"of the val split (it has {found[:5]}...)")


def stylized_val(cfg: TrainConfig, splits: Splits, ctx: Context, rt: Runtime, adain) -> list:
    """Samples of the stylized val: the user's folder, or one built in the run folder from the val split."""
    if cfg.stylized_val is not None:
        return folder_samples(Path(cfg.stylized_val), splits.classes)
    out = rt.out / "stylized-val"
    if ctx.main and not (out / "manifest.csv").is_file():  # a complete earlier build is reused on --resume
        stylize_samples(adain, [(p, splits.classes[label]) for p, label in splits.val], style_images(Path(cfg.styles)),
                        out, cfg.style, device=ctx.device, seed=cfg.split_seed, meaningless=cfg.random_weights)
    barrier(ctx)
    return folder_samples(out, splits.classes)


# ----------------------------------------------------------------------------- training

def autocast(ctx: Context, enabled: bool):
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=enabled and ctx.device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: Context, amp: bool) -> float:
    """Top-1 accuracy (%) over the whole set, summed across ranks."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        with autocast(ctx, amp):
            correct += (model(images).argmax(1) == labels).sum().item()
        total += labels.numel()
    correct, total = all_sum(ctx, correct, total)
    return 100.0 * correct / max(total, 1)


def train_epoch(net: nn.Module, loader: DataLoader, optimizer, penalty: ActivationL1 | None, ctx: Context,
                amp: bool, desc: str) -> tuple[float, float]:
    """One epoch; returns mean loss (cross-entropy plus any penalty) and accuracy (%)."""
    net.train()
    loss_sum = correct = total = 0.0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not ctx.main):
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        with autocast(ctx, amp):
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            if penalty is not None:
                loss = loss + penalty.pop()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        total += labels.numel()
    loss_sum, correct, total = all_sum(ctx, loss_sum, correct, total)
    return loss_sum / total, 100.0 * correct / total


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness (data order, augmentation): a resumed run replays it exactly."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def checkpoint_path(out: Path, run: Run) -> Path:
    return out / "runs" / run.name / f"seed{run.seed}" / "last.pt"


def read_run_checkpoint(path: Path) -> dict:
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"--resume: {err}") from None


def train_run(run: Run, cfg: TrainConfig, rt: Runtime, spec: TopKSpec, splits: Splits, loaders: dict,
              ctx: Context) -> tuple[list[dict], bool]:
    """Train one run, evaluating and checkpointing every epoch; returns (its history rows, finished)."""
    checkpoint = checkpoint_path(rt.out, run)
    seed_everything(run.seed)
    mcfg = model_config(cfg.arch, len(splits.classes), cfg.size, spec, run.variant)
    model = mcfg.build().to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    start, rows = 0, []
    if checkpoint.is_file():  # only on --resume: prepare_out refuses a non-empty folder otherwise
        state = read_run_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, rows = state["epoch"], state["history"]
        if ctx.main and start < cfg.epochs:
            print(f"resuming {run.name} seed {run.seed} after epoch {start}/{cfg.epochs}")
    penalty = ActivationL1(model, run.lam) if run.variant == "l1" else None
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.world > 1 else model
    train_set = FileListDataset(splits.train, loaders["train_transform"])
    sampler = DistributedSampler(train_set, ctx.world, ctx.rank, seed=run.seed) if ctx.world > 1 else None
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size // ctx.world, shuffle=sampler is None,
                              sampler=sampler, generator=generator, num_workers=rt.workers,
                              pin_memory=ctx.device.type == "cuda", drop_last=len(train_set) > cfg.batch_size)
    stop = cfg.epochs if rt.stop_after_epochs is None else min(cfg.epochs, rt.stop_after_epochs)
    for epoch in range(start, stop):
        seed_everything(epoch_seed(run.seed, epoch))
        generator.manual_seed(epoch_seed(run.seed, epoch))
        if sampler is not None:
            sampler.set_epoch(epoch)
        began = time.time()
        lr = optimizer.param_groups[0]["lr"]
        loss, train_acc = train_epoch(net, train_loader, optimizer, penalty, ctx, cfg.amp,
                                      f"{run.name} s{run.seed} ep {epoch + 1}/{cfg.epochs}")
        scheduler.step()
        row = {"run": run.name, "variant": run.variant, "lambda": run.lam, "seed": run.seed, "epoch": epoch + 1,
               "lr": lr, "train_loss": loss, "train_acc": train_acc,
               "val_acc": evaluate(model, loaders["val"], ctx, cfg.amp),
               "stylized_acc": evaluate(model, loaders["stylized"], ctx, cfg.amp)}
        rows.append(row)
        if ctx.main:
            print(f"{run.name:>12} seed {run.seed} epoch {epoch + 1:3d}: loss {loss:.3f} train {train_acc:5.1f}% "
                  f"val {row['val_acc']:5.1f}% stylized {row['stylized_acc']:5.1f}% ({time.time() - began:.0f} s)")
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": rows,
                         "classes": splits.classes, "model_config": dataclasses.asdict(mcfg)}, checkpoint)
        barrier(ctx)
    return rows, len(rows) == cfg.epochs


def topk_sweep(dense: nn.Module, spec: TopKSpec, ks, loaders: dict, ctx: Context, amp: bool, desc: str) -> list[dict]:
    """Accuracies of a dense network with Top-K (``spec``'s placement) inserted at inference, at each K of ``ks``."""
    model, rows = sparsify(dense, spec), []
    for k in tqdm(ks, desc=desc, leave=False, disable=not ctx.main):
        set_k(model, k)
        rows.append({"k": k, "val_acc": evaluate(model, loaders["val"], ctx, amp),
                     "stylized_acc": evaluate(model, loaders["stylized"], ctx, amp)})
    return rows


def inference_sweep(cfg: TrainConfig, rt: Runtime, spec: TopKSpec, splits: Splits, loaders: dict,
                    ctx: Context) -> list[dict]:
    """Rows (2)/(3): each seed's final dense model with Top-K inserted at inference, for every K swept."""
    rows = []
    for seed in cfg.seeds:
        dense = model_config(cfg.arch, len(splits.classes), cfg.size, spec, "dense").build()
        dense.load_state_dict(read_run_checkpoint(checkpoint_path(rt.out, Run("dense", seed)))["model"])
        rows += [{"seed": seed, **row} for row in topk_sweep(dense.to(ctx.device), spec, sweep_ks(cfg, spec), loaders,
                                                             ctx, cfg.amp, f"Top-K sweep on dense seed {seed}")]
    return rows


def sweep_ks(cfg: TrainConfig, spec: TopKSpec) -> list:
    return sorted({*cfg.sweep_k, spec.k})


# ----------------------------------------------------------------------------- results

def k_label(k) -> str:
    return f"K={k:g}" if isinstance(k, float) else f"K={k}"


def summary_rows(cfg: TrainConfig, spec: TopKSpec, runs: list[Run], history: list[dict],
                 sweep: list[dict]) -> list[dict]:
    """Both tables: per trained row and protocol, mean ± std over seeds; rows (2)/(3) from the sweep."""

    def per_seed(name: str, protocol: str) -> list[dict]:
        mine = [r for r in history if r["run"] == name]
        if protocol == "final":
            return [r for r in mine if r["epoch"] == cfg.epochs]
        seeds = sorted({r["seed"] for r in mine})
        return [{"val_acc": max(r["val_acc"] for r in mine if r["seed"] == s),
                 "stylized_acc": max(r["stylized_acc"] for r in mine if r["seed"] == s)} for s in seeds]

    def row(protocol: str, label: str, method: str, picked: list[dict]) -> dict:
        val, sty = mean_std([r["val_acc"] for r in picked]), mean_std([r["stylized_acc"] for r in picked])
        return {"protocol": protocol, "row": label, "method": method, "val_mean": val[0], "val_std": val[1],
                "stylized_mean": sty[0], "stylized_std": sty[1], "seeds": len(picked)}

    k = k_label(spec.k)
    methods = {"dense": "dense", "topk": f"Top-K training ({k})", "mean_replace": f"Top_K_Mean_Rpl training ({k})"}
    rows = []
    for protocol in PROTOCOLS:
        mine = []
        for name in dict.fromkeys(r.name for r in runs):
            run = next(r for r in runs if r.name == name)
            method = f"L1 penalty, lambda={run.lam:g}" if run.variant == "l1" else methods[run.variant]
            mine.append(row(protocol, ROW_OF[run.variant], method, per_seed(name, protocol)))
            if run.variant == "dense" and sweep:
                mine.append(row(protocol, "(2)", f"dense (final weights) + Top-K at inference ({k})",
                                [r for r in sweep if r["k"] == spec.k]))
                best = max(sweep_ks(cfg, spec), key=lambda kk: np.mean([r["val_acc"] for r in sweep if r["k"] == kk]))
                mine.append(row(protocol, "(3)", f"dense (final weights) + best Top-K at inference ({k_label(best)})",
                                [r for r in sweep if r["k"] == best]))
        rows += sorted(mine, key=lambda r: r["row"])
    return rows


def write_table(out: Path, rows: list[dict], note: str) -> str:
    """``table.md`` (one table per protocol), ``table.csv`` and ``table.json``."""
    parts = []
    for protocol, title in PROTOCOLS.items():
        lines = [f"### {title[0].upper()}{title[1:]}", "", "| Row | Method | Val acc (%) | Stylized val acc (%) |",
                 "| --- | --- | --- | --- |"]
        lines += [f"| {r['row']} | {r['method']} | {format_mean_std(r['val_mean'], r['val_std'])} | "
                  f"{format_mean_std(r['stylized_mean'], r['stylized_std'])} |" for r in rows if r["protocol"] == protocol]
        parts.append("\n".join(lines))
    text = "\n\n".join(parts) + f"\n\n{note}\n"
    (out / "table.md").write_text(text)
    write_csv(out / "table.csv", rows)
    write_json(out / "table.json", rows)
    return text


def plot_curves(out: Path, history: list[dict], note: str) -> None:
    """``curves.png/pdf``: val and stylized accuracy per epoch of every trained row (mean, band = ± std)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name in dict.fromkeys(r["run"] for r in history):
        mine = [r for r in history if r["run"] == name]
        epochs = sorted({r["epoch"] for r in mine})
        for ax, key in zip(axes, ("val_acc", "stylized_acc")):
            values = [[r[key] for r in mine if r["epoch"] == e] for e in epochs]
            mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
            line, = ax.plot(epochs, mean, marker="o", ms=3, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("validation", "stylized validation (AdaIN)")):
        ax.set(title=title, xlabel="epoch", ylabel="top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(textwrap.fill(note, 100), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "curves")


def plot_sweep(out: Path, sweep: list[dict], spec: TopKSpec, note: str, title: str) -> None:
    """``sweep.png/pdf``: accuracy of dense weights with Top-K inserted at inference, against K."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted({r["k"] for r in sweep if r["k"] != "dense"})
    for key, label in (("val_acc", "validation"), ("stylized_acc", "stylized validation")):
        values = [[r[key] for r in sweep if r["k"] == k] for k in ks]
        ax.errorbar(ks, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3,
                    label=label)
    ax.axvline(spec.k, color="gray", ls="--", lw=1, label=f"training {k_label(spec.k)}")
    ax.set(xlabel="K (fraction of positions kept)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(note, 100), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "sweep")


# ----------------------------------------------------------------------------- main

def parse_args(argv) -> argparse.Namespace:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot", "runs/train_topk", trains=True)
    parser.add_argument("--arch", choices=list(ARCHS), default="resnet18_paper",
                        help="the authors' CIFAR-style ResNet-18, or torchvision's with a 3x3 stem")
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="ImageNet root: train/val only on these wnids")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="held-out share per class when --data has no train/ and val/")
    parser.add_argument("--max-per-class", type=positive_int, help="use at most this many images per class and split")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out images that cannot be decoded (checked up front, listed in skipped_images.txt)")
    parser.add_argument("--variant", nargs="+", choices=list(VARIANT_MODES), default=list(VARIANT_MODES),
                        help="variants to train; rows (2)/(3) come with dense")
    parser.add_argument("--topk", default="paper", help="placement: a preset name, comma-separated positions, or JSON")
    parser.add_argument("--k", type=parse_k, help="override the placement's K (fraction or count)")
    parser.add_argument("--l1-lambdas", type=float, nargs="+", default=[10.0, 1.0, 0.1], help="row (5) weights")
    parser.add_argument("--sweep-k", type=k_list, default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
                        help="comma-separated K values for row (3) and --weights; the training K is added")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (one run per row and seed); --seed fixes the data split and styles")
    parser.add_argument("--epochs", type=positive_int, default=50, help="training epochs (cosine schedule over them)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global batch, split across processes")
    parser.add_argument("--eval-batch-size", type=positive_int, default=100, help="batch per process for evaluation")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--size", type=positive_int, default=224, help="training crop and eval center crop")
    parser.add_argument("--resize", type=positive_int, default=256, help="eval resize (shorter side) before the crop")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader workers")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                        help="bfloat16 autocast on CUDA (the authors train in float32)")
    parser.add_argument("--stop-after-epochs", type=positive_int,
                        help="end every run after this epoch, checkpointed; continue later with --resume")
    parser.add_argument("--weights", type=Path,
                        help="evaluate this checkpoint (the authors' ckpt.pth or a last.pt) instead of training")
    group = parser.add_argument_group("stylized val (one of: a folder, AdaIN weights, --random-weights)")
    group.add_argument("--stylized-val", type=Path, help="stylized val folder made with recipes/stylize.py")
    add_style_options(group)
    args = parser.parse_args(argv)
    apply_smoke(args, parser, size=32, resize=37, epochs=1, batch_size=8, seeds=[0], max_per_class=2, workers=0,
                l1_lambdas=[1.0], sweep_k=[0.1, 0.5], content_size=32, style_size=32, style_choice="random")
    if args.smoke and args.stylized_val is None and args.vgg is None:
        args.random_weights = True  # a smoke run needs no AdaIN weights; given ones are used
    return args


def configs(args: argparse.Namespace) -> tuple[TrainConfig, Runtime]:
    cfg = TrainConfig(
        data=str(args.data), subset=args.subset, val_fraction=args.val_fraction, max_per_class=args.max_per_class,
        skip_bad_images=args.skip_bad_images, split_seed=args.seed, arch=args.arch, topk=args.topk, k=args.k,
        variants=tuple(args.variant), l1_lambdas=tuple(args.l1_lambdas), sweep_k=tuple(args.sweep_k),
        seeds=tuple(args.seeds), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, size=args.size, resize=args.resize, amp=args.amp,
        stylized_val=None if args.stylized_val is None else str(args.stylized_val), styles=str(args.styles),
        vgg=None if args.vgg is None else str(args.vgg), decoder=None if args.decoder is None else str(args.decoder),
        random_weights=args.random_weights, style=style_settings(args))
    return cfg, Runtime(args.out, args.device, args.workers, args.eval_batch_size, args.stop_after_epochs)


def load_weights(cfg: TrainConfig, path: Path, classes: list[str]) -> nn.Module:
    """The dense ``--arch`` network with ``path``'s weights (any container the core loader knows); a checkpoint
    that names its classes (this recipe's ``last.pt``) must name the data's."""
    try:
        saved = read_checkpoint(path)
        trained_on = saved.get("classes") if isinstance(saved, dict) else None
        if trained_on is not None and list(trained_on) != list(classes):
            raise SystemExit(f"--weights {path} was trained on classes {list(trained_on)}, but --data has "
                             f"{list(classes)}: its accuracies here would mean nothing")
        return load_checkpoint(ARCHS[cfg.arch](len(classes), cfg.size), saved)
    except CheckpointError as err:
        raise SystemExit(f"--weights {path}: {err}") from None


def without_unreadable(splits: Splits) -> tuple[Splits, list[Path]]:
    """``--skip-bad-images``: the splits without the images that do not decode, and those images."""
    train, bad_train = drop_unreadable(splits.train, "train")
    val, bad_val = drop_unreadable(splits.val, "val")
    return Splits(splits.classes, train, val), bad_train + bad_val


def run_note(cfg: TrainConfig, splits: Splits, trains: bool) -> str:
    """The line under every table and figure: what was run, and whether its stylized numbers mean anything."""
    note = f"{cfg.arch}, {len(splits.classes)} classes of {Path(cfg.data).name}, {cfg.size}px"
    if trains:
        note += f", {cfg.epochs} epochs, seeds {list(cfg.seeds)}"
    if cfg.random_weights and cfg.stylized_val is None:
        note += "; stylized val from RANDOM AdaIN weights: its accuracies are meaningless"
    return note


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg, rt = configs(args)
    ctx = init_context(rt.device)
    if cfg.batch_size % ctx.world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {ctx.world} processes")
    if args.resume and args.weights is not None:
        raise SystemExit("--weights evaluates a checkpoint, --resume continues a training: choose one")
    # Everything that can be wrong is checked before the run folder is touched or any image decoded.
    splits = load_splits(Path(cfg.data), cfg.subset, cfg.val_fraction, cfg.split_seed).limit(cfg.max_per_class,
                                                                                            cfg.split_seed)
    spec = resolve_topk(cfg.topk, cfg.k, ARCHS[cfg.arch](len(splits.classes), cfg.size))
    weights = None if args.weights is None else load_weights(cfg, args.weights, splits.classes)
    adain = None
    if cfg.stylized_val is not None:
        check_stylized_folder(cfg, splits)
    else:
        style_images(Path(cfg.styles))
        adain = build_adain(None if cfg.vgg is None else Path(cfg.vgg),
                            None if cfg.decoder is None else Path(cfg.decoder), cfg.random_weights)
    if ctx.main:
        prepare_out(rt.out, resume=args.resume, overwrite=args.overwrite)
        if args.resume:
            check_resume_config(rt.out, cfg)
        else:
            save_config(rt.out, cfg)
    barrier(ctx)
    if cfg.skip_bad_images:
        splits, bad = without_unreadable(splits)
        if ctx.main:
            (rt.out / "skipped_images.txt").write_text("".join(f"{p}\n" for p in bad))
    if ctx.main:
        print(f"{len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val images; {cfg.arch}, "
              f"Top-K {list(spec.positions)} {k_label(spec.k)}; {ctx.world} process(es) on {ctx.device}")
    with bad_images_exit():
        train_transform, eval_transform = transforms_for(cfg.size, cfg.resize)
        loaders = {"train_transform": train_transform,
                   "val": eval_loader(splits.val, eval_transform, ctx, rt),
                   "stylized": eval_loader(stylized_val(cfg, splits, ctx, rt, adain), eval_transform, ctx, rt)}
        if weights is not None:
            result = evaluate_weights(weights.to(ctx.device), args.weights, cfg, spec, loaders, ctx, rt.out,
                                      run_note(cfg, splits, trains=False))
        else:
            result = train_all(cfg, rt, spec, splits, loaders, ctx, run_note(cfg, splits, trains=True))
    if cfg.random_weights and cfg.stylized_val is None:
        warn_meaningless("the stylized val was made with random AdaIN weights (--random-weights)")
    if ctx.world > 1:
        dist.destroy_process_group()
    return result


def evaluate_weights(dense: nn.Module, path: Path, cfg: TrainConfig, spec: TopKSpec, loaders: dict, ctx: Context,
                     out: Path, note: str) -> dict:
    """``--weights``: the checkpoint dense and with Top-K at every swept K; ``weights_eval.csv/json``, ``sweep``."""
    rows = [{"k": "dense", "val_acc": evaluate(dense, loaders["val"], ctx, cfg.amp),
             "stylized_acc": evaluate(dense, loaders["stylized"], ctx, cfg.amp)}]
    rows += topk_sweep(dense, spec, sweep_ks(cfg, spec), loaders, ctx, cfg.amp, f"Top-K sweep on {path.name}")
    if ctx.main:
        write_csv(out / "weights_eval.csv", rows)
        write_json(out / "weights_eval.json", rows)
        plot_sweep(out, rows, spec, f"{path.name}: {note}", f"{path.name} + Top-K at inference")
        for row in rows:
            print(f"{str(row['k']):>6}: val {row['val_acc']:5.1f}%  stylized {row['stylized_acc']:5.1f}%")
    return {"weights_eval": rows}


def train_all(cfg: TrainConfig, rt: Runtime, spec: TopKSpec, splits: Splits, loaders: dict, ctx: Context,
              note: str) -> dict:
    """Every run, then rows (2)/(3) and the tables once every run has finished."""
    runs = [Run(v, s, lam) for v in cfg.variants for lam in (cfg.l1_lambdas if v == "l1" else [None])
            for s in cfg.seeds]
    history: list[dict] = []
    finished = True
    for run in runs:
        rows, done = train_run(run, cfg, rt, spec, splits, loaders, ctx)
        history += rows
        finished &= done
        if ctx.main and history:
            write_csv(rt.out / "history.csv", history)
            write_json(rt.out / "history.json", history)
    if not finished:
        if ctx.main:
            print(f"stopped after epoch {rt.stop_after_epochs} of {cfg.epochs}; continue with --resume")
        return {"history": history, "finished": False}
    sweep = inference_sweep(cfg, rt, spec, splits, loaders, ctx) if "dense" in cfg.variants else []
    result = {"history": history, "sweep": sweep, "finished": True}
    if ctx.main:
        if sweep:
            write_csv(rt.out / "sweep.csv", sweep)
            plot_sweep(rt.out, sweep, spec, note, f"dense {cfg.arch} + Top-K at inference")
        rows = summary_rows(cfg, spec, runs, history, sweep)
        print(write_table(rt.out, rows, note))
        plot_curves(rt.out, history, note)
        result["table"] = rows
    return result


if __name__ == "__main__":
    main()
