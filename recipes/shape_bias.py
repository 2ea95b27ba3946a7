"""Shape bias (paper Fig. 4) of one or more models under Top-K at several K, beside humans and the paper's runs.

    python recipes/shape_bias.py --model alexnet,vgg16,resnet50,convnext_tiny --preset stage-ends \\
        --weights DEFAULT --k 0.05,0.1,0.2,0.3,0.5 --data ../shared/data/texture-shape --out runs/fig4

Every option is checked before any model is built or image decoded. Each stimulus is decoded once; every
model, dense and at every K, is evaluated on the same decoded images. Writes per-image decisions in
model-vs-human's raw-data CSV format (``responses/<dataset>/``), ``summary.csv`` (one row per model and K),
``per_category.csv``, ``summary.json``, ``config.json`` and the plots ``shape_bias_vs_k``, ``frontier`` and
``per_category`` (PNG + PDF).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from topk_plugin import (CheckpointError, create_model, load_checkpoint, parse_spec, read_checkpoint, set_k,
                         sparsify)
from topk_plugin.integrations import cue_conflict as cc
from topk_plugin.integrations.modelvshuman import HUMAN_COLOR, sweep_name
from topk_plugin.integrations.shape_bias import (accuracy, category_shape_bias, conflict_trials,
                                                 shape_texture_fractions, summarize)
from topk_plugin.models import is_file_reference
from topk_plugin.ops import MODES
from topk_plugin.parse import named_placements
from topk_plugin.recipes._common import (SHARED_DATA, apply_smoke, k_list, positive_int, prepare_out, pyplot,
                                         recipe_parser, require_dir, resolve_device, save_config, save_figure,
                                         seed_everything, warn_meaningless, write_csv, write_json)

SMOKE = {"per_category": 1, "k": [0.1, 0.5], "device": "cpu"}
# The paper's recorded runs (../shared/data/paper-responses): the architecture in their file names, its label,
# and the model names whose curves they go beside.
PAPER_LABELS = {"AlexNet": "AlexNet", "VGG": "VGG16"}
PAPER_ARCH_OF = {"alexnet": "AlexNet", "vgg16": "VGG"}
UNIT = (-0.02, 1.02)  # axis limits of a fraction, so that points at 0 and 1 stay visible
PAPER_RUN = re.compile(r"^cue-conflict_(?P<arch>AlexNet|VGG)-(?:normal|topK-(?P<k>\d+)(?P<revert>-Revert)?)"
                       r"_session-1\.csv$")
# How each mode's runs are labelled, and which of the paper's recorded runs it is compared with ("-Revert": the
# non-Top-K responses kept); the paper recorded none of the other modes.
MODE_LABELS = {"topk": "Top-K", "non_topk": "non-Top-K (Revert)", "mean_replace": "Top-K mean-replace",
               "identity": "identity"}
PAPER_RUNS_OF_MODE = {"topk": False, "non_topk": True}


@dataclass
class ShapeBiasConfig:
    """One comparison run: ``weights[model]`` is a weights name, a checkpoint file, or None (random init)."""

    models: list[str]
    weights: dict[str, str | None]
    placement: object  # a placement name ("paper", "stage-ends") or parse_spec's reading of --positions
    ks: list[float | int]
    mode: str
    datasets: list[str]
    data: Path
    per_category: int | None
    batch_size: int
    device: str
    seed: int
    skip_bad_images: bool
    humans: Path | None  # raw-data folders holding cue-conflict/; None: not drawn
    paper: Path | None

    @property
    def random_models(self) -> list[str]:
        return [m for m in self.models if self.weights[m] is None]


# ----------------------------------------------------------------------------- options

def model_list(text: str) -> list[str]:
    """argparse type: comma-separated model names, none empty or repeated, each with its own run name."""
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated model names, e.g. alexnet,vgg16")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} names {repeated} more than once")
    prefixes = [run_prefix(n) for n in names]
    clashes = sorted({n for n, p in zip(names, prefixes) if prefixes.count(p) > 1})
    if clashes:
        raise argparse.ArgumentTypeError(f"{text!r}: {clashes} would share run names; list one of them only")
    return names


def run_prefix(model: str) -> str:
    """The run-name prefix of a model name (``timm/resnet50.a1_in1k`` -> ``timm_resnet50_a1_in1k``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", model).strip("_")


def parse_weights(text: str | None, models: list[str]) -> dict[str, str | None]:
    """``--weights``: one value for every model, or ``model=value`` pairs (unnamed models: random init)."""
    if text is None:
        return dict.fromkeys(models)
    items = [item.strip() for item in text.split(",")]
    if "=" not in text or Path(text).is_file():
        if len(items) > 1 and not Path(text).is_file():
            raise SystemExit(f"--weights {text!r}: give one value for every model, or MODEL=WEIGHTS pairs")
        return dict.fromkeys(models, text.strip())
    weights: dict[str, str | None] = dict.fromkeys(models)
    for item in items:
        model, _, value = item.partition("=")
        if not model or not value:
            raise SystemExit(f"--weights {text!r}: {item!r} is not MODEL=WEIGHTS")
        if model not in weights:
            raise SystemExit(f"--weights {text!r}: {model!r} is not one of --model {models}")
        if weights[model] is not None:
            raise SystemExit(f"--weights {text!r} gives {model!r} twice")
        weights[model] = value
    return weights


def read_checkpoints(weights: dict[str, str | None]) -> dict[str, object]:
    """Every checkpoint file named in ``weights``, read now so that a bad file stops the run before any work."""
    loaded = {}
    for model, value in weights.items():
        if value is None:
            continue
        if Path(value).is_file():
            try:
                loaded[model] = read_checkpoint(value)
            except CheckpointError as err:
                raise SystemExit(f"--weights {model}={value}: {err}") from None
        elif is_file_reference(value):
            raise SystemExit(f"--weights {model}={value}: no such checkpoint file")
    return loaded


def check_placement(args):
    if args.positions is not None:
        try:
            return parse_spec(args.positions)
        except ValueError as err:
            raise SystemExit(f"--positions {args.positions!r}: {err}") from None
    if args.preset not in named_placements():
        raise SystemExit(f"--preset {args.preset!r} is not a placement; choose one of {named_placements()} "
                         "(or name modules with --positions)")
    return args.preset


def build_parser():
    parser = recipe_parser(__doc__.splitlines()[0], SHARED_DATA / "texture-shape", "runs/shape-bias")
    parser.add_argument("--model", type=model_list, default="alexnet",
                        help="comma-separated model names: torchvision, timm (timm/NAME forces timm) or this "
                             "library's (topk_plugin.models.create_model)")
    parser.add_argument("--weights", default=None,
                        help="one value for every model, or MODEL=WEIGHTS,... per model; a value is a weights name "
                             "(DEFAULT, IMAGENET1K_V1, ...) or a local checkpoint file. Models without weights "
                             "run on random initialisation: their numbers are meaningless")
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--preset", default="paper",
                           help=f"Top-K placement for every model, one of {named_placements()}: 'stage-ends' fits "
                                "any model (Top-K after each stage); a preset must have an entry for each model")
    placement.add_argument("--positions", default=None,
                           help="instead of --preset, for every model: comma-separated positions "
                                "(topk_plugin.list_positions shows them) or JSON TopKSpec fields "
                                "(topk_plugin.parse_spec)")
    parser.add_argument("--k", type=k_list, default="0.05,0.1,0.2,0.3,0.5",
                        help="comma-separated K: fractions in (0, 1] or counts >= 1 "
                             f"({','.join(map(str, SMOKE['k']))} with --smoke)")
    parser.add_argument("--mode", default="topk", choices=MODES, help="Top-K mode")
    parser.add_argument("--datasets", default=",".join(cc.DATASETS),
                        help="comma-separated subfolders of --data; cue-conflict gives shape bias, others accuracy")
    parser.add_argument("--per-category", type=positive_int, default=None,
                        help=f"use the first N images of each category; unset: all ({SMOKE['per_category']} "
                             "with --smoke)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out images that cannot be decoded (listed in summary.json) instead of stopping")
    parser.add_argument("--humans", type=Path, default=SHARED_DATA / "human-responses",
                        help="human raw-data folder (cue-conflict/*.csv), or 'none'; the default is drawn if present")
    parser.add_argument("--paper", type=Path, default=SHARED_DATA / "paper-responses",
                        help="the paper's recorded runs (cue-conflict/*.csv), or 'none'; the default is drawn if "
                             "present")
    return parser


def reference_dir(args, parser, option: str) -> Path | None:
    """``--humans`` / ``--paper``: a folder with ``cue-conflict/`` inside, or None ('none', or the default absent)."""
    folder = getattr(args, option)
    if str(folder) == "none":
        return None
    if (folder / cc.CUE_CONFLICT).is_dir():
        return folder
    if option in parser.given:
        raise SystemExit(f"--{option} {folder} holds no {cc.CUE_CONFLICT} folder; give the folder that does, "
                         "or 'none'")
    print(f"note: {folder / cc.CUE_CONFLICT} not found; the plots go without --{option}", file=sys.stderr)
    return None


def make_config(args, parser) -> ShapeBiasConfig:
    """Check every option (nothing is built or decoded here) and return the run's configuration."""
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if cc.CUE_CONFLICT not in datasets or len(set(datasets)) != len(datasets):
        raise SystemExit(f"--datasets {args.datasets!r} must list cue-conflict (the shape-bias stimuli) and "
                         "no folder twice")
    data = require_dir(args.data, "texture-shape stimuli (--data)")
    for name in datasets:
        require_dir(data / name, f"--datasets {name} stimuli")
    return ShapeBiasConfig(
        models=args.model, weights=parse_weights(args.weights, args.model), placement=check_placement(args),
        ks=args.k, mode=args.mode, datasets=datasets, data=data, per_category=args.per_category,
        batch_size=args.batch_size, device=str(resolve_device(args.device)), seed=args.seed,
        skip_bad_images=args.skip_bad_images, humans=reference_dir(args, parser, "humans"),
        paper=reference_dir(args, parser, "paper"))


# ----------------------------------------------------------------------------- models

def build_models(config: ShapeBiasConfig, checkpoints: dict) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{model: (dense, sparse)}``, every model seeded alike, so adding one to the list changes no other."""
    models = {}
    for name in config.models:
        weights = config.weights[name]
        seed_everything(config.seed)
        try:
            dense = create_model(name, weights=None if name in checkpoints else weights)
        except Exception as err:  # noqa: BLE001 - an unknown name, weight name, or a failed download
            raise SystemExit(f"--model {name} (--weights {weights!r}): {err}") from None
        if name in checkpoints:
            try:
                load_checkpoint(dense, checkpoints[name])
            except CheckpointError as err:
                raise SystemExit(f"--weights {name}={weights}: {err}") from None
        dense = dense.eval().to(config.device)
        try:
            sparse = sparsify(dense, config.placement, mode=config.mode).eval()
        except (ValueError, RuntimeError) as err:
            option = "--preset" if config.placement in named_placements() else "--positions"
            raise SystemExit(f"--model {name} {option} {config.placement!r}: {err}") from None
        models[name] = (dense, sparse)
    return models


# ----------------------------------------------------------------------------- references

def paper_runs(folder: Path | None, mode: str = "topk") -> dict[str, dict[str, dict]]:
    """Fractions of the paper's recorded cue-conflict runs of ``mode`` (and the dense ones):
    ``{"AlexNet": {"dense": {...}, "10": {...}}, ...}``; an architecture with no run of ``mode`` is left out."""
    runs: dict[str, dict[str, dict]] = {}
    if folder is None:
        return runs
    for path in sorted((folder / cc.CUE_CONFLICT).glob("*.csv")):
        match = PAPER_RUN.match(path.name)
        if match and (not match["k"] or PAPER_RUNS_OF_MODE.get(mode) == bool(match["revert"])):
            runs.setdefault(match["arch"], {})[match["k"] or "dense"] = shape_texture_fractions(path)
    return {arch: dict(sorted(r.items(), key=lambda kv: -1 if kv[0] == "dense" else int(kv[0])))
            for arch, r in runs.items() if set(r) != {"dense"}}


# ----------------------------------------------------------------------------- plots

def _k_axis(ks: list, mode: str) -> tuple[list, str, bool]:
    """x positions, axis label, and whether they are percentages (then the paper's runs can be drawn)."""
    fate = "removed" if mode == "non_topk" else "kept"  # non_topk keeps all but the Top-K
    if all(isinstance(k, float) for k in ks):
        return [k * 100 for k in ks], f"K (% of positions per channel: the Top-K {fate})", True
    if all(isinstance(k, int) for k in ks):
        return list(ks), f"K (positions per channel: the Top-K {fate})", False
    return list(range(len(ks))), "K", False


def _title(text: str, config: ShapeBiasConfig) -> str:
    if config.random_models:
        return f"{text}\nRANDOM WEIGHTS ({', '.join(config.random_models)}): numbers meaningless"
    return text


def _model_colors(count: int) -> list:
    """One colour per model from tab10 without its red, which is the humans' colour."""
    palette = [c for i, c in enumerate(pyplot().colormaps["tab10"].colors) if i != 3]
    return [palette[i % len(palette)] for i in range(count)]


def plot_bias_vs_k(summary, config: ShapeBiasConfig, humans, paper: dict, out: Path) -> list[Path]:
    """One curve per model over K, its dense run dashed; the paper's runs of the same architecture beside it."""
    plt = pyplot()
    x, xlabel, percent = _k_axis(config.ks, config.mode)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for model, color in zip(config.models, _model_colors(len(config.models))):
        runs = summary[summary["model"] == model]
        ax.plot(x, runs["shape_bias"].iloc[1:], "o-", color=color, label=f"{model} + {MODE_LABELS[config.mode]}")
        ax.axhline(runs["shape_bias"].iloc[0], color=color, ls="--", lw=1, label=f"{model} dense")
        arch = PAPER_ARCH_OF.get(model)
        if percent and arch in paper:
            label = PAPER_LABELS[arch]
            points = [(int(k), s["shape_bias"]) for k, s in paper[arch].items() if k != "dense"]
            ax.plot(*zip(*points), "s:", color=color, mfc="none",
                    label=f"paper's {label} {MODE_LABELS[config.mode]} runs")
            if "dense" in paper[arch]:
                ax.axhline(paper[arch]["dense"]["shape_bias"], color=color, ls=":", lw=1,
                           label=f"paper's {label} dense run")
    if len(humans):
        ax.axhspan(humans["shape_bias"].min(), humans["shape_bias"].max(), color=HUMAN_COLOR, alpha=0.15)
        ax.axhline(humans["shape_bias"].mean(), color=HUMAN_COLOR, label="humans (mean, range)")
    if not percent:
        ax.set_xticks(x, [str(k) for k in config.ks])
    ax.set(xlabel=xlabel, ylabel="shape bias", ylim=UNIT, title=_title("Shape bias vs K", config))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "shape_bias_vs_k")


def plot_frontier(summary, config: ShapeBiasConfig, humans, paper: dict, out: Path) -> list[Path]:
    """Shape bias against the fraction of decisions that follow either cue: dense and every K, per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for model, color in zip(config.models, _model_colors(len(config.models))):
        runs = summary[summary["model"] == model]
        ax.plot(runs["shape_or_texture"], runs["shape_bias"], "-", color=color, alpha=0.5)
        ax.scatter(runs["shape_or_texture"].iloc[:1], runs["shape_bias"].iloc[:1], facecolors="none",
                   edgecolors=[color], s=60, zorder=3, label=f"{model} dense")
        ax.scatter(runs["shape_or_texture"].iloc[1:], runs["shape_bias"].iloc[1:], color=color, s=30, zorder=3,
                   label=f"{model} + {MODE_LABELS[config.mode]} (K labelled)")
        for row in runs.iloc[1:].itertuples():
            ax.annotate(_k_label(row.k), (row.shape_or_texture, row.shape_bias), fontsize=6, color=color,
                        xytext=(3, 3), textcoords="offset points")
    for arch, marker in zip(paper, ("s", "^")):
        stats = paper[arch]
        ax.scatter([s["shape_or_texture"] for s in stats.values()], [s["shape_bias"] for s in stats.values()],
                   marker=marker, facecolors="none", edgecolors="tab:gray",
                   label=f"paper's {PAPER_LABELS[arch]} {MODE_LABELS[config.mode]} runs")
        for k, s in stats.items():
            ax.annotate(k if k == "dense" else f"{k}%", (s["shape_or_texture"], s["shape_bias"]), fontsize=6,
                        color="tab:gray", xytext=(3, -8), textcoords="offset points")
    if len(humans):
        ax.scatter(humans["shape_or_texture"], humans["shape_bias"], color=HUMAN_COLOR, marker="D", label="humans")
    ax.set(xlabel="fraction of cue-conflict decisions that are the shape or the texture", ylabel="shape bias",
           xlim=UNIT, ylim=UNIT, title=_title("Shape bias vs shape-or-texture decisions", config))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "frontier")


def plot_per_category(per_category, summary, config: ShapeBiasConfig, out: Path) -> list[Path]:
    """The benchmark's matrix-plot layout, one panel per model: categories in humans' order, shape fraction on x."""
    plt = pyplot()
    order = per_category["humans"].sort_values().index if "humans" in per_category else per_category.index
    rows = range(len(order))
    fig, axes = plt.subplots(1, len(config.models), figsize=(4 * len(config.models) + 1.5, 0.42 * len(order) + 1.8),
                             sharey=True, squeeze=False)
    for ax, model in zip(axes[0], config.models):
        runs = list(summary.loc[summary["model"] == model, "run"])
        for i, run in enumerate(runs):
            ax.scatter(per_category.loc[order, run], rows, color=plt.colormaps["viridis"](i / max(1, len(runs) - 1)),
                       s=30, label=run, zorder=3, clip_on=False)
        if "humans" in per_category:
            ax.scatter(per_category.loc[order, "humans"], rows, color=HUMAN_COLOR, marker="D", s=40, label="humans",
                       zorder=4, clip_on=False)
        ax.hlines([y + 0.5 for y in rows[:-1]], 0, 1, color="gray", ls=":", alpha=0.4)
        ax.set(xlim=(0, 1), ylim=(-0.5, len(order) - 0.5), xlabel="shape bias", title=model)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    axes[0][0].set_yticks(list(rows), list(order))
    axes[0][0].set_ylabel("shape category")
    fig.suptitle(_title("Shape bias per category", config))
    return save_figure(fig, out / "per_category")


def _k_label(k) -> str:
    return f"{k * 100:g}%" if isinstance(k, float) else str(k)


# ----------------------------------------------------------------------------- the run

def evaluate_all(config: ShapeBiasConfig, models: dict, stimuli: dict, out: Path) -> tuple[list[dict], dict]:
    """Dense and every K of every model on the decoded stimuli; writes the per-image responses."""
    rows, per_category = [], {}
    for name, (dense, sparse) in models.items():
        for k in [None, *config.ks]:
            model = dense if k is None else set_k(sparse, k)
            subj = sweep_name(run_prefix(name), k, config.mode)
            row = {"model": name, "weights": config.weights[name] or "random init", "run": subj, "k": k}
            tick = time.perf_counter()
            for dataset, stim in stimuli.items():
                decisions = cc.evaluate(model, stim, config.batch_size, config.device, f"{subj} {dataset}")
                frame = cc.responses_frame(decisions, stim, subj)
                cc.write_responses(frame, out / "responses", dataset)
                if dataset == cc.CUE_CONFLICT:
                    row.update(shape_texture_fractions(frame))
                    per_category[subj] = category_shape_bias(frame)
                else:
                    row[f"{dataset}_accuracy"] = accuracy(frame)
            row["eval_s"] = time.perf_counter() - tick
            rows.append(row)
    return rows, per_category


def run(config: ShapeBiasConfig, out: Path, checkpoints: dict | None = None) -> dict:
    """Build, decode once, evaluate every model and K, write tables and plots into ``out`` (prepared)."""
    import pandas as pd

    if config.random_models:
        warn_meaningless(f"{', '.join(config.random_models)} ha{'s' if len(config.random_models) == 1 else 've'} "
                         "no --weights: random initialisation")
    models = build_models(config, checkpoints or {})
    timing = {}
    start = time.perf_counter()
    stimuli = {d: cc.load_stimuli(config.data / d, d, config.per_category, skip_bad_images=config.skip_bad_images)
               for d in config.datasets}
    skipped = [path for stim in stimuli.values() for path in stim.skipped]
    if skipped:
        print(f"--skip-bad-images: left out {len(skipped)} undecodable images: {skipped}", file=sys.stderr)
    timing["decode_s"] = time.perf_counter() - start
    rows, per_category_bias = evaluate_all(config, models, stimuli, out)
    timing["total_s"] = time.perf_counter() - start
    summary = pd.DataFrame(rows)
    write_csv(out / "summary.csv", summary)

    humans = pd.DataFrame()
    if config.humans is not None:
        trials = conflict_trials(config.humans / cc.CUE_CONFLICT)  # read and checked once, naming a bad file
        humans = summarize(trials).reset_index()
        per_category_bias["humans"] = category_shape_bias(trials)
    per_category = pd.DataFrame(per_category_bias).rename_axis("category")
    write_csv(out / "per_category.csv", per_category.reset_index())
    paper = paper_runs(config.paper, config.mode)

    plots = [*plot_bias_vs_k(summary, config, humans, paper, out), *plot_frontier(summary, config, humans, paper, out),
             *plot_per_category(per_category, summary, config, out)]
    result = {
        "config": config, "random_weights": config.random_models, "meaningless": bool(config.random_models),
        "images": {d: len(s) for d, s in stimuli.items()}, "skipped_images": skipped, "timing": timing,
        "runs": summary.astype(object).where(summary.notna(), None).to_dict(orient="records"),
        "humans_shape_bias": ({"min": humans["shape_bias"].min(), "mean": humans["shape_bias"].mean(),
                               "max": humans["shape_bias"].max()} if len(humans) else None),
        "paper_shape_bias": {arch: {k: s["shape_bias"] for k, s in runs.items()} for arch, runs in paper.items()},
        "plots": [p.name for p in plots],
    }
    write_json(out / "summary.json", result)
    print(summary[["run", "shape_bias", "shape_or_texture", "eval_s"]].to_string(index=False))
    print(f"decode {timing['decode_s']:.1f}s, total {timing['total_s']:.1f}s; wrote {out}")
    if config.random_models:
        warn_meaningless(f"random weights: {', '.join(config.random_models)}")
    return result


def main(argv=None) -> dict:
    parser = build_parser()
    args = apply_smoke(parser.parse_args(argv), parser, **SMOKE)
    config = make_config(args, parser)
    checkpoints = read_checkpoints(config.weights)
    out = prepare_out(args.out, overwrite=args.overwrite)
    save_config(out, config)
    return run(config, out, checkpoints)


if __name__ == "__main__":
    main()
