"""Train ResNet-18 with Top-K and evaluate on val and on an AdaIN-stylized val (paper §4.3, supplementary Table 2).

Rows of the table (supplementary Table 2), each mean ± std over --seeds:
  (1) dense training;
  (2) the dense models + Top-K at inference, with the training K;
  (3) the dense models + the best Top-K at inference (K swept over --sweep-k, best mean val accuracy);
  (4) Top-K training;
  (5) dense training + an L1 activation penalty at the Top-K position, one row per lambda;
  (6) Top_K_Mean_Rpl training (kept entries replaced by their channel mean).

The model is torchvision's ResNet-18 with a 3x3/1 stem conv, no stem max-pool and one output per class;
Top-K sits where the core's "paper" preset puts it (after layer2, K = 20%). The L1 penalty is
lambda * mean(|a|) with the mean over every entry (N, C, H, W) of the activation at each Top-K position,
averaged over positions, added to the cross-entropy.

Data: --data ROOT with train/ and val/ class folders (any ImageFolder pair; --subset in-s1|in-s2 picks the
paper's ImageNet classes), or a root of class folders only, split per class (--val-fraction held out).
Multi-GPU: torchrun --nproc_per_node N -m topk_plugin.recipes.train_topk ... (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import csv
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Subset  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.models import resnet18  # noqa: E402
from tqdm import tqdm  # noqa: E402

from topk_plugin.integrations.imagenet16 import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from topk_plugin.recipes._common import (SHARED_DATA, format_mean_std, mean_std, parse_k, recipe_parser,  # noqa: E402
                             resolve_device, seed_everything, warn_meaningless, write_json)
from topk_plugin.recipes.datasets import SUBSETS, FileListDataset, Splits, class_folders, folder_samples, load_splits  # noqa: E402
from topk_plugin.recipes.stylize import build_adain, style_images, stylize_samples  # noqa: E402
from topk_plugin import TopKSpec, get_preset, preset_names, set_k, sparsify, topk_layers  # noqa: E402

# How each trained variant uses the Top-K layers: the sparsify mode (None: no layers at all).
VARIANT_MODES = {"dense": None, "topk": "topk", "l1": "identity", "mean_replace": "mean_replace"}
ROW_OF = {"dense": "(1)", "topk": "(4)", "l1": "(5)", "mean_replace": "(6)"}


def paper_resnet18(num_classes: int) -> nn.Module:
    """ResNet-18 of the paper's Table 2: 3x3 stride-1 stem conv, no stem max-pool, ``num_classes`` outputs."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def make_spec(topk: str, k, model: nn.Module) -> TopKSpec:
    """The Top-K placement: a preset name or comma-separated positions; checked against ``model``."""
    try:
        spec = get_preset(topk, model).spec if topk in preset_names() else TopKSpec(topk.split(","))
        spec = spec.replace(k=k)
        sparsify(model, spec, method="hooks")
    except ValueError as err:
        raise SystemExit(f"--topk {topk!r} / --k {k}: {err}") from None
    return spec


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
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalize])
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), *normalize])
    return train, evaluation


def eval_loader(samples, transform, ctx: Context, args) -> DataLoader:
    """Each rank reads every world-th image, so summed counts are exact (no sampler padding)."""
    shard = Subset(FileListDataset(samples, transform), range(ctx.rank, len(samples), ctx.world))
    return DataLoader(shard, batch_size=args.eval_batch_size, num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


def stylized_val(args, splits: Splits, ctx: Context) -> list:
    """Samples of the stylized val: the user's folder, or one built here from the val split with AdaIN."""
    if args.stylized_val is not None:
        found = class_folders(args.stylized_val, "--stylized-val folder")
        missing = [c for c in splits.classes if c not in found]
        if missing:
            raise SystemExit(f"class mismatch: --stylized-val {args.stylized_val} lacks classes {missing} "
                             f"of the val split (it has {found[:5]}...)")
        return folder_samples(args.stylized_val, splits.classes)
    out = args.out / "stylized-val"
    if ctx.main and not (args.resume and (out / "manifest.csv").is_file()):
        net = build_adain(args.vgg, args.decoder, args.random_weights)
        stylize_samples(net, [(p, splits.classes[label]) for p, label in splits.val], style_images(args.styles), out,
                        alpha=args.alpha, size=args.resize, style_size=args.resize, device=ctx.device,
                        seed=args.seed, meaningless=args.random_weights)
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


def build_model(variant: str, spec: TopKSpec, num_classes: int) -> nn.Module:
    model = paper_resnet18(num_classes)
    mode = VARIANT_MODES[variant]
    return model if mode is None else sparsify(model, spec, mode=mode)


def train_run(run: Run, args, spec: TopKSpec, splits: Splits, loaders: dict, ctx: Context,
              history: list[dict]) -> None:
    """Train one run for ``args.epochs``, evaluating and checkpointing every epoch (resumable)."""
    checkpoint = args.out / "runs" / run.name / f"seed{run.seed}" / "last.pt"
    seed_everything(run.seed)
    model = build_model(run.variant, spec, len(splits.classes)).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    start, rows = 0, []
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=ctx.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, rows = state["epoch"], state["history"]
        if ctx.main:
            print(f"resuming {run.name} seed {run.seed} after epoch {start}/{args.epochs}")
    history.extend(rows)
    penalty = ActivationL1(model, run.lam) if run.variant == "l1" else None
    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.world > 1 else model
    train_set = FileListDataset(splits.train, loaders["train_transform"])
    sampler = DistributedSampler(train_set, ctx.world, ctx.rank, seed=run.seed) if ctx.world > 1 else None
    generator = torch.Generator().manual_seed(run.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size // ctx.world, shuffle=sampler is None,
                              sampler=sampler, generator=generator, num_workers=args.workers,
                              pin_memory=ctx.device.type == "cuda", drop_last=len(train_set) > args.batch_size)
    for epoch in range(start, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        began = time.time()
        lr = optimizer.param_groups[0]["lr"]
        loss, train_acc = train_epoch(net, train_loader, optimizer, penalty, ctx, args.amp,
                                      f"{run.name} s{run.seed} ep {epoch + 1}/{args.epochs}")
        scheduler.step()
        row = {"run": run.name, "variant": run.variant, "lambda": run.lam, "seed": run.seed, "epoch": epoch + 1,
               "lr": lr, "train_loss": loss, "train_acc": train_acc,
               "val_acc": evaluate(model, loaders["val"], ctx, args.amp),
               "stylized_acc": evaluate(model, loaders["stylized"], ctx, args.amp), "seconds": time.time() - began}
        rows.append(row)
        history.append(row)
        if ctx.main:
            print(f"{run.name:>12} seed {run.seed} epoch {epoch + 1:3d}: loss {loss:.3f} train {train_acc:5.1f}% "
                  f"val {row['val_acc']:5.1f}% stylized {row['stylized_acc']:5.1f}%")
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": rows,
                        "classes": splits.classes, "spec": spec}, checkpoint)
            write_history(args.out, history)
        barrier(ctx)


def inference_sweep(args, spec: TopKSpec, splits: Splits, loaders: dict, ctx: Context) -> list[dict]:
    """Rows (2)/(3): each seed's trained dense model with Top-K inserted at inference, for every K swept."""
    rows = []
    for seed in args.seeds:
        state = torch.load(args.out / "runs" / "dense" / f"seed{seed}" / "last.pt", map_location=ctx.device,
                           weights_only=False)
        dense = paper_resnet18(len(splits.classes))
        dense.load_state_dict(state["model"])
        model = sparsify(dense, spec).to(ctx.device)
        for k in tqdm(args.sweep_k, desc=f"Top-K sweep on dense seed {seed}", leave=False, disable=not ctx.main):
            set_k(model, k)
            rows.append({"seed": seed, "k": k, "val_acc": evaluate(model, loaders["val"], ctx, args.amp),
                         "stylized_acc": evaluate(model, loaders["stylized"], ctx, args.amp)})
    return rows


# ----------------------------------------------------------------------------- results

def write_history(out: Path, history: list[dict]) -> None:
    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_json(out / "history.json", history)


def summary_rows(args, spec: TopKSpec, runs: list[Run], history: list[dict], sweep: list[dict]) -> list[dict]:
    """The table: final-epoch accuracies of every trained row, and the two inference rows from the sweep."""
    final = [r for r in history if r["epoch"] == args.epochs]

    def row(label: str, method: str, picked: list[dict]) -> dict:
        val, sty = mean_std([r["val_acc"] for r in picked]), mean_std([r["stylized_acc"] for r in picked])
        return {"row": label, "method": method, "val_mean": val[0], "val_std": val[1], "stylized_mean": sty[0],
                "stylized_std": sty[1], "seeds": len(picked)}

    k = f"K={spec.k:g}" if isinstance(spec.k, float) else f"K={spec.k}"
    methods = {"dense": "dense", "topk": f"Top-K training ({k})", "mean_replace": f"Top_K_Mean_Rpl training ({k})"}
    rows = []
    for name in dict.fromkeys(r.name for r in runs):
        run = next(r for r in runs if r.name == name)
        method = f"L1 penalty, lambda={run.lam:g}" if run.variant == "l1" else methods[run.variant]
        rows.append(row(ROW_OF[run.variant], method, [r for r in final if r["run"] == name]))
        if run.variant == "dense" and sweep:
            rows.append(row("(2)", f"dense + Top-K at inference ({k})", [r for r in sweep if r["k"] == spec.k]))
            best = max(args.sweep_k, key=lambda kk: np.mean([r["val_acc"] for r in sweep if r["k"] == kk]))
            rows.append(row("(3)", f"dense + best Top-K at inference (K={best:g})",
                            [r for r in sweep if r["k"] == best]))
    return sorted(rows, key=lambda r: r["row"])


def write_table(out: Path, rows: list[dict], note: str) -> str:
    lines = ["| Row | Method | Val acc (%) | Stylized val acc (%) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['row']} | {r['method']} | {format_mean_std(r['val_mean'], r['val_std'])} | "
              f"{format_mean_std(r['stylized_mean'], r['stylized_std'])} |" for r in rows]
    text = "\n".join(lines) + f"\n\n{note}\n"
    (out / "table.md").write_text(text)
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "table.json", rows)
    return text


def plot_curves(out: Path, history: list[dict], note: str) -> None:
    """``curves.png/pdf``: val and stylized accuracy per epoch of every trained row (mean, band = ± std)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name in dict.fromkeys(r["run"] for r in history):
        mine = [r for r in history if r["run"] == name]
        epochs = sorted({r["epoch"] for r in mine})
        for ax, key in zip(axes, ("val_acc", "stylized_acc")):
            values = [[r[key] for r in mine if r["epoch"] == e] for e in epochs]
            mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
            line, = ax.plot(epochs, mean, marker="o", ms=3, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("validation", "stylized validation (AdaIN, alpha 0.5)")):
        ax.set(title=title, xlabel="epoch", ylabel="top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(textwrap.fill(note, 100), fontsize=8)
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(out / f"curves.{suffix}", dpi=120)
    plt.close(fig)


def plot_sweep(out: Path, sweep: list[dict], spec: TopKSpec, note: str) -> None:
    """``sweep.png/pdf``: the dense models' accuracy with Top-K inserted at inference, against K."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted({r["k"] for r in sweep})
    for key, label in (("val_acc", "validation"), ("stylized_acc", "stylized validation")):
        values = [[r[key] for r in sweep if r["k"] == k] for k in ks]
        ax.errorbar(ks, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3,
                    label=label)
    ax.axvline(spec.k, color="gray", ls="--", lw=1, label=f"training K = {spec.k:g}")
    ax.set(xlabel="K (fraction of positions kept)", ylabel="top-1 accuracy (%)",
           title="dense ResNet-18 + Top-K at inference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(note, 100), fontsize=8)
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(out / f"sweep.{suffix}", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot", "runs/train_topk")
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="ImageNet root: train/val only on these wnids")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="held-out share per class when --data has no train/ and val/")
    parser.add_argument("--max-per-class", type=int, help="use at most this many images per class and split")
    parser.add_argument("--variant", nargs="+", choices=list(VARIANT_MODES), default=list(VARIANT_MODES),
                        help="variants to train; rows (2)/(3) come with dense")
    parser.add_argument("--topk", default="paper", help="preset name or comma-separated positions")
    parser.add_argument("--k", type=parse_k, help="override the spec's K (fraction or count)")
    parser.add_argument("--l1-lambdas", type=float, nargs="+", default=[10.0, 1.0, 0.1], help="row (5) weights")
    parser.add_argument("--sweep-k", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
                        help="K values for row (3); the training K is added")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (one run per row and seed); --seed fixes the data split and styles")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (cosine schedule over them)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split across processes")
    parser.add_argument("--eval-batch-size", type=int, default=100, help="batch per process for evaluation")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--size", type=int, default=224, help="training crop and eval center crop")
    parser.add_argument("--resize", type=int, default=256, help="eval resize (shorter side) before the crop")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue every run from its last checkpoint")
    group = parser.add_argument_group("stylized val (one of: a folder, AdaIN weights, --random-weights)")
    group.add_argument("--stylized-val", type=Path, help="stylized val folder made with recipes/stylize.py")
    group.add_argument("--vgg", type=Path, help="AdaIN encoder weights (vgg_normalised.pth) to build it here")
    group.add_argument("--decoder", type=Path, help="AdaIN decoder weights (decoder.pth) to build it here")
    group.add_argument("--random-weights", action="store_true", help="random AdaIN: tests only, meaningless")
    group.add_argument("--styles", type=Path, default=SHARED_DATA / "style-targets", help="style images")
    group.add_argument("--alpha", type=float, default=0.5, help="AdaIN style strength")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; options given explicitly still win
        parser.set_defaults(size=64, resize=73, epochs=1, batch_size=8, seeds=[0], max_per_class=6, workers=0,
                            sweep_k=[0.1, 0.5])
        args = parser.parse_args(argv)
        args.random_weights = args.random_weights or (args.stylized_val is None and args.vgg is None)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ctx = init_context(args.device)
    if args.batch_size % ctx.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {ctx.world} processes")
    splits = load_splits(args.data, args.subset, args.val_fraction, args.seed).limit(args.max_per_class, args.seed)
    spec = make_spec(args.topk, args.k, paper_resnet18(len(splits.classes)))
    args.sweep_k = sorted({*args.sweep_k, float(spec.k)})
    if ctx.main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val images; "
              f"Top-K {spec.positions} K={spec.k}; {ctx.world} process(es) on {ctx.device}")
        write_json(args.out / "config.json", {**vars(args), "classes": splits.classes, "spec": spec})
    train_transform, eval_transform = transforms_for(args.size, args.resize)
    loaders = {"train_transform": train_transform,
               "val": eval_loader(splits.val, eval_transform, ctx, args),
               "stylized": eval_loader(stylized_val(args, splits, ctx), eval_transform, ctx, args)}
    runs = [Run(v, s, lam) for v in args.variant for lam in (args.l1_lambdas if v == "l1" else [None])
            for s in args.seeds]
    history: list[dict] = []
    for run in runs:
        train_run(run, args, spec, splits, loaders, ctx, history)
    sweep = inference_sweep(args, spec, splits, loaders, ctx) if "dense" in args.variant else []
    result = {}
    if ctx.main:
        meaningless = args.random_weights and args.stylized_val is None
        note = (f"ResNet-18 (3x3 stem), {len(splits.classes)} classes of {args.data.name}, {args.size}px, "
                f"{args.epochs} epochs, seeds {args.seeds}"
                + ("; stylized val from RANDOM AdaIN weights: its accuracies are meaningless" if meaningless else ""))
        if meaningless:
            warn_meaningless("the stylized val was made with random AdaIN weights (--random-weights)")
        if sweep:
            with open(args.out / "sweep.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(sweep[0]))
                writer.writeheader()
                writer.writerows(sweep)
            plot_sweep(args.out, sweep, spec, note)
        rows = summary_rows(args, spec, runs, history, sweep)
        print(write_table(args.out, rows, note))
        plot_curves(args.out, history, note)
        result = {"table": rows, "history": history, "sweep": sweep}
    if ctx.world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
