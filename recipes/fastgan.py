"""Few-shot FastGAN with Top-K, FID/KID through torch-fidelity (paper §4.4, supp. Table 1).

Commands:
  train   train on an image folder; every --eval-every iterations: a sample grid, FID/KID of the EMA
          generator against the training images (best checkpoint by FID kept), Top-K maps of the 32x32 layer
  sample  write --n images and a grid from a checkpoint
  eval    FID/KID of a checkpoint (or of a --samples folder) against --data
  sweep   the K ablation: dense and Top-K at each --ks, for each --seeds; prints mean ± std as in the paper

Examples:
  python -m topk_plugin.recipes.fastgan train --data ../shared/data/few-shot/jeep --topk paper --inception-weights pt_inception.pth
  python -m topk_plugin.recipes.fastgan train --data ../shared/data/few-shot/table --topk paper --k 0.15
  python -m topk_plugin.recipes.fastgan sweep --data ../shared/data/few-shot/jeep --seeds 0,1,2 --iters 50000
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.utils import save_image
from tqdm import tqdm

from topk_plugin.integrations.fidelity import FEATURE_LAYERS, InceptionWeightsUnavailable, fid_kid, resolve_inception_weights
from topk_plugin.recipes._common import (SHARED_DATA, format_mean_std, image_files, mean_std, parse_k, recipe_parser,
                             require_dir, resolve_device, seed_everything, warn_meaningless, write_json)
from topk_plugin.recipes.fastgan_models import (PAPER_K, TOPK_POSITION, Discriminator, Generator, crop_part, diff_augment,
                                    small_size)
from topk_plugin import is_sparsified, preset_names, sparsify, topk_layers, topk_mask

PAPER_KS = "0.02,0.05,0.07,0.1,0.15,0.2,0.5"
SMOKE = dict(size=64, ngf=8, ndf=8, nz=32, iters=50, batch_size=4, eval_every=50, n_samples=8, n_real=8,
             fid_features="64", grid=16, ks="0.05,0.15", seeds="0", n=8)
MAP_IMAGES, MAP_CHANNELS, MAP_ROWS = 2, 6, 8


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the command list and examples as written, and still shows defaults."""


def build_parser():
    parser = recipe_parser(__doc__.split("\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/fastgan")
    parser.description, parser.formatter_class = __doc__, _HelpFormatter
    parser.add_argument("command", choices=list(COMMANDS), help="what to do (see above)")
    model = parser.add_argument_group("model")
    model.add_argument("--size", type=int, default=256, help="image resolution (64, 128, 256, 512, 1024)")
    model.add_argument("--ngf", type=int, default=64, help="generator width")
    model.add_argument("--ndf", type=int, default=64, help="discriminator width")
    model.add_argument("--nz", type=int, default=256, help="noise dimension")
    model.add_argument("--no-noise", action="store_true", help="build the generator without noise injection")
    model.add_argument("--topk", default="none",
                       help="'none' (dense), a preset ('paper': Top-K after feat_32, 5%%), comma-separated module "
                            "names ('feat_32,feat_64'), or a JSON dict of TopKSpec fields")
    model.add_argument("--k", type=parse_k, default=None,
                       help="override the spec's k: a fraction kept (Table-100: 0.15) or an integer count")
    train = parser.add_argument_group("train")
    train.add_argument("--iters", type=int, default=50000, help="training iterations")
    train.add_argument("--batch-size", type=int, default=8, help="batch size")
    train.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, betas (0.5, 0.999)")
    train.add_argument("--ema-decay", type=float, default=0.999, help="EMA generator decay")
    train.add_argument("--policy", default="color,translation,cutout", help="DiffAugment policy")
    train.add_argument("--lpips-weights", type=Path, default=None,
                       help="LPIPS (vgg) linear-layer weights for the reconstruction loss; needs the lpips "
                            "package. Without it the loss is L1 (logged)")
    train.add_argument("--no-amp", action="store_true", help="disable mixed precision (only used on CUDA)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--eval-every", type=int, default=5000, help="iterations between evaluations")
    metrics.add_argument("--n-samples", type=int, default=3000, help="generated images per FID/KID (paper: 3000)")
    metrics.add_argument("--n-real", type=int, default=0, help="reference images for FID/KID (0: all of --data)")
    metrics.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at set sizes)")
    metrics.add_argument("--fid-features", default="2048", choices=FEATURE_LAYERS,
                         help="Inception layer for FID/KID (2048 is the standard; --smoke uses 64)")
    metrics.add_argument("--inception-weights", type=Path, default=None,
                         help="torch-fidelity Inception weights file; default: its normal download (hub cache)")
    metrics.add_argument("--no-metrics", action="store_true", help="skip FID/KID (no Inception weights needed)")
    metrics.add_argument("--grid", type=int, default=64, help="images in each sample grid")
    other = parser.add_argument_group("sample / eval / sweep")
    other.add_argument("--ckpt", type=Path, default=None, help="checkpoint for sample/eval (default OUT/best.pt, "
                                                                "else OUT/last.pt)")
    other.add_argument("--n", type=int, default=64, help="images 'sample' writes")
    other.add_argument("--samples", type=Path, default=None, help="'eval': score this folder instead of a checkpoint")
    other.add_argument("--ks", default=PAPER_KS, help="'sweep': K fractions")
    other.add_argument("--seeds", default="0,1,2", help="'sweep': seeds")
    return parser


# ----------------------------------------------------------------------------- data, models, losses

def load_images(folder: Path, size: int, limit: int = 0) -> torch.Tensor:
    """Every image under ``folder``, resized (shorter side) and centre-cropped to ``size``: uint8 (N, 3, S, S)."""
    paths = image_files(require_dir(folder, "image folder"), recursive=True, what="image folder")
    paths = paths[:limit] if limit else paths
    images = [TF.pil_to_tensor(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), size), size))
              for p in tqdm(paths, desc=f"loading {folder.name}", leave=False)]
    return torch.stack(images)


def parse_topk(value: str):
    """``--topk`` as something ``sparsify`` takes, or ``None`` for a dense generator."""
    if value == "none":
        return None
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--topk {value!r} is not valid JSON: {err}") from None
    if value in preset_names():
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def build_generator(cfg: dict) -> torch.nn.Module:
    generator = Generator(cfg["size"], cfg["ngf"], cfg["nz"], noise=not cfg["no_noise"])
    spec = parse_topk(cfg["topk"])
    if spec is None:
        return generator
    try:
        return sparsify(generator, spec, k=cfg["k"])
    except ValueError as err:
        raise SystemExit(f"--topk {cfg['topk']!r}: {err}") from None


def describe_topk(generator: torch.nn.Module) -> str:
    if not is_sparsified(generator):
        return "dense"
    return "Top-K " + ", ".join(f"{p} k={layer.k:g} ({layer.mode})" for p, layer in topk_layers(generator).items())


def map_k(generator: torch.nn.Module) -> float:
    """K of the Top-K maps: the model's own at ``feat_32``, else the preset's (5%) for a dense model."""
    layers = topk_layers(generator) if is_sparsified(generator) else {}
    return layers[TOPK_POSITION].k if TOPK_POSITION in layers else PAPER_K


def reconstruction_loss(weights: Path | None, device: torch.device):
    """(loss(pred, target), description): LPIPS when the package and ``weights`` are there, else L1."""
    if weights is None:
        return F.l1_loss, "L1 (fallback: no --lpips-weights given)"
    if not Path(weights).is_file():
        raise SystemExit(f"--lpips-weights {weights} is not a file")
    try:
        import lpips
    except ImportError:
        return F.l1_loss, "L1 (fallback: the lpips package is not installed; pip install lpips)"
    net = lpips.LPIPS(net="vgg", model_path=str(weights), verbose=False).to(device).eval().requires_grad_(False)
    return (lambda pred, target: net(pred, target).mean()), f"LPIPS-vgg ({weights})"


def real_batch(data: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    x = data[torch.randint(len(data), (batch_size,))].to(device).float() / 127.5 - 1
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


# ----------------------------------------------------------------------------- evaluation outputs

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def feat32_maps(generator: torch.nn.Module, z: torch.Tensor, k: float) -> dict:
    """Generated images and the binary Top-K maps (``topk_mask``) of the first channels of ``feat_32``."""
    captured = {}
    handle = generator.get_submodule(TOPK_POSITION).register_forward_hook(
        lambda module, args, output: captured.update(feat=output))
    try:
        with torch.no_grad():
            images = generator(z)[0]
    finally:
        handle.remove()
    masks = topk_mask(captured["feat"][:, :MAP_CHANNELS].float(), k)
    return {"images": to_uint8(images), "masks": masks.cpu(), "k": k}


def plot_topk_maps(map_dir: Path, path: Path) -> Path | None:
    """Grid: one row per checkpoint (at most ``MAP_ROWS``), per image its sample then its channels' maps."""
    files = sorted(map_dir.glob("iter_*.pt"))
    if not files:
        return None
    rows = min(MAP_ROWS, len(files))
    picks = sorted({files[round(i * (len(files) - 1) / max(1, rows - 1))] for i in range(rows)})
    entries = [(int(f.stem.split("_")[1]), torch.load(f)) for f in picks]
    n_img, n_ch = entries[0][1]["masks"].shape[:2]
    cols = n_img * (1 + n_ch)
    fig, axes = plt.subplots(len(entries), cols, figsize=(cols * 0.9, len(entries) * 0.95 + 0.5), squeeze=False)
    for row, (iteration, entry) in enumerate(entries):
        for i in range(n_img):
            base = i * (1 + n_ch)
            axes[row, base].imshow(entry["images"][i].permute(1, 2, 0).numpy())
            for c in range(n_ch):
                axes[row, base + 1 + c].imshow(entry["masks"][i, c].numpy(), cmap="gray", vmin=0, vmax=1)
                if row == 0:
                    axes[row, base + 1 + c].set_title(f"ch {c}", fontsize=7)
        axes[row, 0].set_ylabel(f"it {iteration}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Top-K maps of {TOPK_POSITION} (32x32, K={entries[0][1]['k']:.0%}) over training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: Path, title: str) -> Path | None:
    rows = [h for h in history if h.get("fid") is not None]
    if not rows:
        return None
    fig, (ax_fid, ax_kid) = plt.subplots(1, 2, figsize=(9, 3.4))
    its = [h["iteration"] for h in rows]
    ax_fid.plot(its, [h["fid"] for h in rows], marker="o")
    ax_kid.errorbar(its, [h["kid"] * 1e3 for h in rows], yerr=[h["kid_std"] * 1e3 for h in rows], marker="o")
    for ax, name in ((ax_fid, "FID"), (ax_kid, "KID x 10^3")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(useOffset=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_setup(args) -> Path | None:
    """Inception weights path, or ``None`` with ``--no-metrics``; exits with the reason when unavailable."""
    if args.no_metrics:
        print("FID/KID: not measured (--no-metrics)")
        return None
    try:
        return resolve_inception_weights(args.inception_weights)
    except InceptionWeightsUnavailable as err:
        raise SystemExit(f"FID/KID: {err}") from None


# ----------------------------------------------------------------------------- commands

def config_of(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def train(args) -> dict:
    """Train one FastGAN run into ``args.out``; returns the summary also written to ``results.json``."""
    device = resolve_device(args.device)
    seed_everything(args.seed)
    out = args.out
    weights = metric_setup(args)  # before training: a run without its metric must not start by accident
    (out / "grids").mkdir(parents=True, exist_ok=True)
    (out / "topk_maps").mkdir(exist_ok=True)
    data = load_images(args.data, args.size)
    reference = data[:args.n_real] if args.n_real else data
    recon_loss, recon_name = reconstruction_loss(args.lpips_weights, device)
    generator = build_generator(config_of(args)).to(device)
    placement = describe_topk(generator)
    print(f"FastGAN {args.size}px on {args.data} ({len(data)} images), {placement}, "
          f"reconstruction loss: {recon_name}, device {device}")
    discriminator = Discriminator(args.size, args.ndf).to(device)
    ema = copy.deepcopy(generator).eval()
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.999))
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    state = {"iteration": 0, "history": [], "best": None, "train_seconds": 0.0}
    if args.resume and (out / "last.pt").is_file():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        for module, key in ((generator, "g"), (ema, "g_ema"), (discriminator, "d"), (opt_g, "opt_g"),
                            (opt_d, "opt_d"), (scaler, "scaler")):
            module.load_state_dict(ckpt[key])
        state = ckpt["state"]
        print(f"resumed from {out / 'last.pt'} at iteration {state['iteration']}")
    fixed = torch.randn(args.grid, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    small = small_size(args.size)

    def save_maps(iteration: int) -> None:
        torch.save(feat32_maps(ema, fixed[:MAP_IMAGES], map_k(ema)), out / "topk_maps" / f"iter_{iteration:06d}.pt")

    def evaluate(iteration: int) -> None:
        save_maps(iteration)
        with torch.no_grad():
            save_image(ema(fixed)[0].float() * 0.5 + 0.5, out / "grids" / f"iter_{iteration:06d}.png",
                       nrow=int(math.sqrt(args.grid)))
        row = {"iteration": iteration, "it_per_s": iteration / max(state["train_seconds"], 1e-9)}
        if weights is not None:
            row.update(fid_kid(ema, reference, weights_path=weights, nz=args.nz, num_samples=args.n_samples,
                               device=device, kid_subset_size=args.kid_subset_size, features=args.fid_features,
                               seed=args.seed))
            tqdm.write(f"[iter {iteration}] FID {row['fid']:.2f}  KIDx10^3 {row['kid'] * 1e3:.2f}  "
                       f"(reconstruction loss: {recon_name})")
            if state["best"] is None or row["fid"] < state["best"]["fid"]:
                state["best"] = {k: row[k] for k in ("iteration", "fid", "kid", "kid_std")}
                torch.save({"g_ema": ema.state_dict(), "config": config_of(args), "metrics": state["best"]},
                           out / "best.pt")
        state["history"].append(row)
        torch.save({"g": generator.state_dict(), "g_ema": ema.state_dict(), "d": discriminator.state_dict(),
                    "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
                    "state": state, "config": config_of(args)}, out / "last.pt")

    if state["iteration"] == 0:
        save_maps(0)
    bar = tqdm(range(state["iteration"], args.iters), desc="train", initial=state["iteration"], total=args.iters)
    for it in bar:
        start = time.perf_counter()
        real = real_batch(data, args.batch_size, device)
        z = torch.randn(args.batch_size, args.nz, device=device)
        part = int(torch.randint(4, ()))
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            fake_big, fake_small = generator(z)
            real_big = diff_augment(real, args.policy)
            real_small = diff_augment(F.interpolate(real, small, mode="bilinear", antialias=True), args.policy)
            logits_real, recon = discriminator(real_big, real_small, part)
            targets = (F.interpolate(real_big, small), real_small, F.interpolate(crop_part(real_big, part), small))
            loss_recon = sum(recon_loss(r.float(), t.float()) for r, t in zip(recon, targets))
            logits_fake = discriminator(diff_augment(fake_big.detach(), args.policy),
                                        diff_augment(fake_small.detach(), args.policy))
            loss_d = F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean() + loss_recon
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.step(opt_d)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss_g = -discriminator(diff_augment(fake_big, args.policy), diff_augment(fake_small, args.policy)).mean()
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        update_ema(ema, generator, args.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["train_seconds"] += time.perf_counter() - start
        state["iteration"] = it + 1
        bar.set_postfix(d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}", rec=f"{loss_recon.item():.3f}")
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iters:
            evaluate(it + 1)

    title = f"FastGAN {args.data.name} {args.size}px, {placement}, reconstruction {recon_name.split(' ')[0]}"
    pd.DataFrame(state["history"]).to_csv(out / "metrics.csv", index=False)
    curves = plot_curves(state["history"], out / "fid_kid.png", title)
    maps = plot_topk_maps(out / "topk_maps", out / "topk_maps.png")
    summary = {"config": config_of(args), "topk": placement, "images": len(data), "reference_images": len(reference),
               "reconstruction_loss": recon_name, "device": str(device), "amp": amp,
               "iterations": state["iteration"],
               "it_per_s": state["iteration"] / max(state["train_seconds"], 1e-9),
               "metrics": "FID/KID (torch-fidelity)" if weights is not None else "not measured (--no-metrics)",
               "inception_weights": str(weights) if weights else None, "best": state["best"],
               "history": state["history"], "figures": [str(p) for p in (curves, maps) if p]}
    write_json(out / "results.json", summary)
    print(f"wrote {out}: {state['iteration']} iterations at {summary['it_per_s']:.2f} it/s, best {state['best']}")
    return summary


def load_checkpoint(args) -> tuple[torch.nn.Module, dict]:
    path = args.ckpt or next((p for p in (args.out / "best.pt", args.out / "last.pt") if p.is_file()), None)
    if path is None or not Path(path).is_file():
        raise SystemExit(f"no checkpoint: give --ckpt FILE or train into {args.out} first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    generator = build_generator(ckpt["config"])
    generator.load_state_dict(ckpt["g_ema"])
    return generator.eval(), ckpt["config"]


def sample(args) -> dict:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    generator, cfg = load_checkpoint(args)
    generator.to(device)
    folder = args.out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with torch.no_grad():
        for start in tqdm(range(0, args.n, 32), desc="sample"):
            batch = generator(torch.randn(min(32, args.n - start), cfg["nz"], device=device))[0]
            images.append(to_uint8(batch))
    images = torch.cat(images)
    for i, image in enumerate(images):
        TF.to_pil_image(image).save(folder / f"{i:05d}.png")
    save_image(images[:64].float() / 255, args.out / "samples.png", nrow=8)
    print(f"wrote {len(images)} images to {folder} and a grid to {args.out / 'samples.png'}")
    return {"folder": str(folder), "count": len(images)}


def evaluate_command(args) -> dict:
    device = resolve_device(args.device)
    weights = metric_setup(args)
    if weights is None:
        raise SystemExit("'eval' computes FID/KID; drop --no-metrics")
    if args.samples is not None:
        generated, nz, cfg = require_dir(args.samples, "--samples folder"), None, {"size": args.size}
    else:
        generated, cfg = load_checkpoint(args)
        nz = cfg["nz"]
    reference = load_images(args.data, cfg["size"], args.n_real)
    result = fid_kid(generated, reference, weights_path=weights, nz=nz, num_samples=args.n_samples,
                     size=cfg["size"], device=device, kid_subset_size=args.kid_subset_size,
                     features=args.fid_features, seed=args.seed)
    result.update(inception_weights=str(weights), data=str(args.data))
    write_json(args.out / "eval.json", result)
    print(f"FID {result['fid']:.2f}  KIDx10^3 {result['kid'] * 1e3:.2f} ± {result['kid_std'] * 1e3:.2f}")
    return result


def summary_cell(values: list[float], scale: float = 1.0) -> str:
    """``mean ± std`` over seeds, for the sweep table."""
    return format_mean_std(*mean_std(v * scale for v in values)) if values else "not measured"


def sweep(args) -> pd.DataFrame:
    """Dense and Top-K at each K, each seed; runs already finished (their results.json) are reused."""
    ks = [float(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    spec = args.topk if args.topk != "none" else "paper"
    rows = []
    for seed in seeds:
        for k in [None, *ks]:
            tag = "dense" if k is None else f"topk_{k:g}"
            run = copy.copy(args)
            run.seed, run.out = seed, args.out / tag / f"seed{seed}"
            run.topk, run.k = ("none", None) if k is None else (spec, k)
            done = run.out / "results.json"
            summary = json.loads(done.read_text()) if done.is_file() else train(run)
            best = summary["best"] or {}
            rows.append({"method": tag, "k": k, "seed": seed, "fid": best.get("fid"), "kid": best.get("kid"),
                         "it_per_s": summary["it_per_s"], "iterations": summary["iterations"]})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "sweep.csv", index=False)
    lines = [f"| Method ({args.data.name}) | FID | KID x10^3 | it/s |", "|---|---|---|---|"]
    for tag, group in table.groupby("method", sort=False):
        k = group["k"].iloc[0]
        name = "FastGAN" if k is None or pd.isna(k) else f"FastGAN + Top-K {k:.0%}"
        lines.append(f"| {name} | {summary_cell(group['fid'].dropna().tolist())} | "
                     f"{summary_cell(group['kid'].dropna().tolist(), 1e3)} | {group['it_per_s'].mean():.2f} |")
    text = "\n".join(lines)
    (args.out / "sweep.md").write_text(text + "\n")
    write_json(args.out / "sweep.json", rows)
    plot_sweep(table, args.out / "sweep.png", args.data.name)
    print(text)
    return table


def plot_sweep(table: pd.DataFrame, path: Path, name: str) -> Path | None:
    measured = table.dropna(subset=["fid"])
    if measured.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    topk = measured[measured["k"].notna()].groupby("k")["fid"].agg(["mean", "std"]).reset_index()
    ax.errorbar(topk["k"] * 100, topk["mean"], yerr=topk["std"].fillna(0), marker="o", label="Top-K")
    dense = measured[measured["k"].isna()]["fid"]
    if not dense.empty:
        ax.axhline(dense.mean(), color="gray", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("K (% kept at feat_32)")
    ax.set_ylabel("best FID")
    ax.set_title(f"FastGAN K ablation, {name}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COMMANDS = {"train": train, "sample": sample, "eval": evaluate_command, "sweep": sweep}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # smoke sizes become the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
        warn_meaningless("--smoke: a 64px FastGAN trained for 50 iterations")
    for name in ("iters", "batch_size", "eval_every", "n_samples", "grid", "n"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.out.mkdir(parents=True, exist_ok=True)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
