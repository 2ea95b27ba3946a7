"""Shape bias of a model under Top-K at several K, beside its dense self, humans and the paper's runs.

    python recipes/shape_bias.py --model alexnet --preset paper --k 0.05,0.1,0.2,0.3,0.5 \\
        --weights DEFAULT --data ../shared/data/texture-shape --out runs/shape-bias-alexnet

Each stimulus is decoded once; every run (dense, then each K) is evaluated on the same decoded images.
Writes per-image decisions in model-vs-human's raw-data CSV format (``responses/<dataset>/``),
``summary.csv``, ``per_category.csv``, ``summary.json`` and three plots (PNG + PDF).
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from topk_plugin.integrations import cue_conflict as cc  # noqa: E402
from topk_plugin.integrations.modelvshuman import HUMAN_COLOR, sweep_name  # noqa: E402
from topk_plugin.integrations.shape_bias import (accuracy, category_shape_bias, read_responses,  # noqa: E402
                                     shape_texture_fractions, summarize)
from topk_plugin.recipes._common import (SHARED_DATA, parse_k, recipe_parser, require_dir, resolve_device,  # noqa: E402
                             seed_everything, warn_meaningless, write_json)
from topk_plugin import set_k, sparsify  # noqa: E402
from topk_plugin.ops import MODES  # noqa: E402
from topk_plugin.presets import preset_names  # noqa: E402

SMOKE_PER_CATEGORY = 3
# The paper's recorded runs (../shared/data/paper-responses) by the architecture they belong to.
PAPER_RUNS = {"alexnet": "AlexNet", "vgg16": "VGG", "vgg16_bn": "VGG"}
PAPER_RUN = re.compile(r"^cue-conflict_(?P<arch>[A-Za-z]+)-(?:normal|topK-(?P<k>\d+))_session-1\.csv$")


# ----------------------------------------------------------------------------- model loading

def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    return torchvision.models.get_model(name, weights=weights)


def _timm_model(name: str, weights: str | None) -> nn.Module:
    import timm
    if weights is None:
        return timm.create_model(name, pretrained=False)
    # timm names pretrained weights by tag ("resnet50.a1_in1k"); DEFAULT takes the architecture's default tag.
    return timm.create_model(name if weights == "DEFAULT" else f"{name}.{weights}", pretrained=True)


def _timm_names() -> set[str]:
    try:
        import timm
    except ImportError:
        return set()
    return set(timm.list_models())


MODEL_SOURCES = {"torchvision": (lambda: set(torchvision.models.list_models()), _torchvision_model),
                 "timm": (_timm_names, _timm_model)}


def load_state(path: Path) -> dict:
    """A state_dict from a checkpoint file: bare, or under ``state_dict``/``model``; ``module.`` prefixes dropped."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def build_model(name: str, weights: str | None) -> nn.Module:
    """``name`` from torchvision (first) or timm, with named pretrained weights, a local file, or random init."""
    path = Path(weights) if weights and Path(weights).is_file() else None
    if weights and path is None and ("/" in weights or Path(weights).suffix):
        raise SystemExit(f"--weights {weights!r}: no such checkpoint file")
    named = weights if path is None else None
    for source, (names, make) in MODEL_SOURCES.items():
        if name in names():
            try:
                model = make(name, named)
            except Exception as err:  # noqa: BLE001 - a failed download or an unknown weight name
                raise SystemExit(f"--model {name} --weights {weights!r}: {source} could not load these weights "
                                 f"({type(err).__name__}: {err}). Pass a local checkpoint file instead.") from err
            if path is not None:
                model.load_state_dict(load_state(path))
            return model
    raise SystemExit(f"--model {name!r} is neither a torchvision nor a timm model name")


# ----------------------------------------------------------------------------- references

def paper_runs(folder: Path, arch: str | None) -> dict[str, pd.DataFrame]:
    """The paper's recorded cue-conflict runs of ``arch``: ``{"dense": df, "5": df, "10": df, ...}``."""
    runs = {}
    if arch is None or not folder.is_dir():
        return runs
    for path in sorted(folder.glob("*.csv")):
        match = PAPER_RUN.match(path.name)
        if match and match["arch"] == arch:
            runs[match["k"] or "dense"] = read_responses(path)
    return runs


# ----------------------------------------------------------------------------- plots

def _save(fig, out: Path, stem: str) -> None:
    for suffix in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{suffix}", dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_bias_vs_k(summary: pd.DataFrame, ks: list, humans: pd.DataFrame, paper: dict, label: str,
                   out: Path) -> None:
    """``summary``: the dense run first, then one row per entry of ``ks``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fractions = all(isinstance(k, float) for k in ks)
    x = [k * 100 if fractions else k for k in ks]
    ax.plot(x, summary["shape_bias"].iloc[1:], "o-", color="tab:blue", label=f"{label} + Top-K (this run)")
    ax.axhline(summary["shape_bias"].iloc[0], color="tab:blue", ls="--", label=f"{label} dense (this run)")
    if len(humans):
        ax.axhspan(humans["shape_bias"].min(), humans["shape_bias"].max(), color=HUMAN_COLOR, alpha=0.15)
        ax.axhline(humans["shape_bias"].mean(), color=HUMAN_COLOR, label="humans (mean, range)")
    if paper and fractions:
        points = sorted((int(k), shape_texture_fractions(df)["shape_bias"]) for k, df in paper.items() if k != "dense")
        if points:
            ax.plot(*zip(*points), "s-", color="tab:gray", label="paper's Top-K runs")
        if "dense" in paper:
            ax.axhline(shape_texture_fractions(paper["dense"])["shape_bias"], color="tab:gray", ls=":",
                       label="paper's dense run")
    xlabel = "K (% of positions kept per channel)" if fractions else "K (positions kept per channel)"
    ax.set(xlabel=xlabel, ylabel="shape bias", ylim=(0, 1),
           title=f"Shape bias vs K: {label}")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, out, "shape_bias_vs_k")


def plot_per_category(per_category: pd.DataFrame, label: str, out: Path) -> None:
    """The benchmark's matrix-plot layout: one row per category, shape fraction along x, humans' order."""
    order = per_category["humans"].sort_values().index if "humans" in per_category else per_category.index
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(order) + 1.5))
    colors = plt.colormaps["viridis"]
    runs = [c for c in per_category.columns if c != "humans"]
    rows = range(len(order))
    for i, run in enumerate(runs):
        color = colors(i / max(1, len(runs) - 1))
        ax.scatter(per_category.loc[order, run], rows, color=color, s=40, label=run, zorder=3, clip_on=False)
    if "humans" in per_category:
        ax.scatter(per_category.loc[order, "humans"], rows, color=HUMAN_COLOR, marker="D", s=50, label="humans",
                   zorder=4, clip_on=False)
    for y in rows[:-1]:
        ax.axhline(y + 0.5, color="gray", ls=":", alpha=0.4)
    ax.set_yticks(list(rows), list(order))
    ax.set(xlim=(0, 1), ylim=(-0.5, len(order) - 0.5), xlabel="fraction of 'shape' decisions (shape bias)",
           ylabel="shape category", title=f"Shape bias per category: {label}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, out, "per_category")


def plot_bias_vs_accuracy(summary: pd.DataFrame, humans: pd.DataFrame, paper: dict, label: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.colormaps["viridis"]
    for i, row in enumerate(summary.itertuples()):
        ax.scatter(row.shape_or_texture, row.shape_bias, color=colors(i / max(1, len(summary) - 1)), label=row.run,
                   zorder=3)
    if len(humans):
        ax.scatter(humans["shape_or_texture"], humans["shape_bias"], color=HUMAN_COLOR, marker="D", label="humans")
    if paper:
        stats = {k: shape_texture_fractions(df) for k, df in paper.items()}
        ax.scatter([s["shape_or_texture"] for s in stats.values()], [s["shape_bias"] for s in stats.values()],
                   facecolors="none", edgecolors="tab:gray", label="paper's runs (K %)")
        for k, s in stats.items():
            ax.annotate(k, (s["shape_or_texture"], s["shape_bias"]), fontsize=7, color="tab:gray",
                        xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="fraction of cue-conflict decisions that are shape or texture", ylabel="shape bias",
           xlim=(0, 1), ylim=(0, 1), title=f"Shape bias vs shape-or-texture accuracy: {label}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    _save(fig, out, "shape_bias_vs_accuracy")


# ----------------------------------------------------------------------------- main

def parse_ks(text: str) -> list:
    return [parse_k(item) for item in filter(None, (t.strip() for t in text.split(",")))]


def main(argv=None) -> dict:
    parser = recipe_parser(__doc__.splitlines()[0], SHARED_DATA / "texture-shape", "runs/shape-bias")
    parser.add_argument("--model", default="alexnet", help="torchvision or timm model name")
    parser.add_argument("--weights", default=None,
                        help="weight name (torchvision: DEFAULT, IMAGENET1K_V1, ...; timm: DEFAULT or a pretrained "
                             "tag) or a local checkpoint file; none = random init (numbers meaningless)")
    parser.add_argument("--preset", default="paper", help=f"Top-K placement preset {preset_names()}")
    parser.add_argument("--positions", default=None,
                        help="comma-separated positions to use instead of --preset (see topk_plugin.list_positions)")
    parser.add_argument("--k", default="0.05,0.1,0.2,0.3,0.5", help="comma-separated K: fractions or counts")
    parser.add_argument("--mode", default="topk", choices=MODES, help="Top-K mode")
    parser.add_argument("--datasets", default=",".join(cc.DATASETS),
                        help="comma-separated subfolders of --data; cue-conflict gives shape bias, others accuracy")
    parser.add_argument("--per-category", type=int, default=None,
                        help=f"use the first N images of each category; unset: all ({SMOKE_PER_CATEGORY} with --smoke)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--humans", type=Path, default=SHARED_DATA / "human-responses",
                        help="human raw-data folder (<dataset>/*.csv)")
    parser.add_argument("--paper", type=Path, default=SHARED_DATA / "paper-responses",
                        help="the paper's recorded runs (<dataset>/*.csv)")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    device = torch.device("cpu") if args.smoke else resolve_device(args.device)
    data = require_dir(args.data, "texture-shape stimuli (--data)")
    datasets = [d for d in args.datasets.split(",") if d]
    if "cue-conflict" not in datasets:
        raise SystemExit(f"--datasets {args.datasets!r} must include cue-conflict (the shape-bias stimuli)")
    ks = parse_ks(args.k)
    per_category = args.per_category or (SMOKE_PER_CATEGORY if args.smoke else None)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    if args.weights is None:
        warn_meaningless(f"--model {args.model} has no --weights: it runs on RANDOM initialisation")
    dense = build_model(args.model, args.weights).eval().to(device)
    spec = args.positions.split(",") if args.positions else args.preset
    sparse = sparsify(dense, spec, mode=args.mode).eval() if ks else None

    timing = {}
    start = time.perf_counter()
    stimuli = {d: cc.load_stimuli(require_dir(data / d, f"{d} stimuli"), d, per_category) for d in datasets}
    timing["decode_s"] = time.perf_counter() - start

    runs = [(sweep_name(args.model, None), None, dense)] + [(sweep_name(args.model, k), k, sparse) for k in ks]
    rows, per_category_bias = [], {}
    for subj, k, model in runs:
        if k is not None:
            set_k(model, k)
        row = {"run": subj, "k": k}
        tick = time.perf_counter()
        for name, stim in stimuli.items():
            frame = cc.responses_frame(cc.evaluate(model, stim, args.batch_size, device, f"{subj} {name}"), stim, subj)
            cc.write_responses(frame, out / "responses", name)
            if name == "cue-conflict":
                row.update(shape_texture_fractions(frame))
                per_category_bias[subj] = category_shape_bias(frame)
            else:
                row[f"{name}_accuracy"] = accuracy(frame)
        row["eval_s"] = time.perf_counter() - tick
        rows.append(row)
    timing["total_s"] = time.perf_counter() - start
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)

    humans_dir = args.humans / "cue-conflict"
    humans = summarize(humans_dir).reset_index() if humans_dir.is_dir() else pd.DataFrame()
    if humans_dir.is_dir():
        per_category_bias["humans"] = category_shape_bias(humans_dir)
    per_category_table = pd.DataFrame(per_category_bias)
    per_category_table.to_csv(out / "per_category.csv", index_label="category")
    arch = PAPER_RUNS.get(args.model)
    paper = paper_runs(args.paper / "cue-conflict", arch)

    label = args.model if args.weights else f"{args.model} (random init)"
    plot_bias_vs_k(summary, ks, humans, paper, label, out)
    plot_per_category(per_category_table, label, out)
    plot_bias_vs_accuracy(summary, humans, paper, label, out)

    result = {
        "model": args.model, "weights": args.weights or "random init (meaningless)",
        "placement": spec, "mode": args.mode, "device": str(device), "images": {d: len(s) for d, s in stimuli.items()},
        "timing": timing, "runs": summary.astype(object).where(summary.notna(), None).to_dict(orient="records"),
        "humans_shape_bias": ({"min": humans["shape_bias"].min(), "mean": humans["shape_bias"].mean(),
                               "max": humans["shape_bias"].max()} if len(humans) else None),
        "paper_shape_bias": {k: shape_texture_fractions(df)["shape_bias"] for k, df in paper.items()},
        "argv": sys.argv if argv is None else list(argv),
    }
    write_json(out / "summary.json", result)
    print(summary[["run", "shape_bias", "shape_or_texture", "eval_s"]].to_string(index=False))
    print(f"decode {timing['decode_s']:.1f}s, total {timing['total_s']:.1f}s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
