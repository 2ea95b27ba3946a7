"""Build a stylized copy of an image folder with AdaIN (the stylized evaluation sets of the Top-K training experiment).

Every content image gets one style image (a seeded random choice among ``--styles``), is resized so its
shorter side is ``--size``, stylized (AdaIN, ``--alpha`` 0.5 as in the paper) and written as
``OUT/<class>/<name>.png``; ``OUT/manifest.csv`` records the style each image got and ``OUT/preview.png``
shows a few content / style / result triples. AdaIN weights come from the user (``--vgg``, ``--decoder``).

    python -m topk_plugin.recipes.stylize --data imagenet/val --vgg vgg_normalised.pth --decoder decoder.pth --out stylized-val
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402
from tqdm import tqdm  # noqa: E402

from topk_plugin.recipes._common import (SHARED_DATA, image_files, recipe_parser, require_dir, resolve_device, seed_everything,  # noqa: E402
                             warn_meaningless, write_json)
from topk_plugin.recipes.adain import AdaIN, load_adain  # noqa: E402
from topk_plugin.recipes.datasets import class_folders, folder_samples  # noqa: E402

MEANINGLESS = "MEANINGLESS.txt"


def build_adain(vgg: Path | None, decoder: Path | None, random_weights: bool) -> AdaIN:
    """AdaIN from the user's weight files; random weights only when asked, with a loud warning."""
    if random_weights:
        warn_meaningless("AdaIN has RANDOM weights (--random-weights): the 'stylized' images are noise")
        return AdaIN().eval()
    if vgg is None or decoder is None:
        raise SystemExit("AdaIN needs trained weights: pass --vgg vgg_normalised.pth and --decoder decoder.pth "
                         "(state dicts in the layout of the PyTorch AdaIN port); --random-weights exists only "
                         "for tests and smoke runs")
    return load_adain(vgg, decoder)


def style_images(folder: Path) -> list[Path]:
    return image_files(require_dir(folder, "style folder"), what="style folder")


def load_image(path: Path, size: int) -> torch.Tensor:
    """(1, 3, H, W) RGB in [0, 1], the shorter side resized to ``size``."""
    with Image.open(path) as image:
        image = TF.resize(image.convert("RGB"), size)
    return TF.to_tensor(image)[None]


def stylize_samples(net: AdaIN, samples: Sequence[tuple[Path, str]], styles: Sequence[Path], out: Path, *,
                    alpha: float = 0.5, size: int = 256, style_size: int = 256, device: torch.device | str = "cpu",
                    seed: int = 0, meaningless: bool = False) -> Path:
    """Write ``out/<class>/<stem>.png`` for every (content path, class name); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to(device).eval()
    stats = [net.style_stats(load_image(p, style_size).to(device)) for p in styles]
    rng = random.Random(seed)
    rows = []
    for path, name in tqdm(samples, desc=f"stylize -> {out.name}", unit="img"):
        choice = rng.randrange(len(styles))
        result = net(load_image(path, size).to(device), stats[choice], alpha)
        target = out / name / f"{Path(path).stem}.png"
        target.parent.mkdir(exist_ok=True)
        TF.to_pil_image(result[0].float().cpu()).save(target)
        rows.append({"image": f"{name}/{target.name}", "content": str(path), "style": styles[choice].name})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "content", "style"])
        writer.writeheader()
        writer.writerows(rows)
    if meaningless:
        (out / MEANINGLESS).write_text("Made with RANDOM AdaIN weights (--random-weights); only for tests.\n")
    write_preview(rows[:4], styles, out, size)
    return out


def write_preview(rows: list[dict], styles: Sequence[Path], out: Path, size: int) -> None:
    """``preview.png``: content | style | result for a few images."""
    by_name = {p.name: p for p in styles}
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for row, ax in zip(rows, axes):
        images = [load_image(Path(row["content"]), size), load_image(by_name[row["style"]], size),
                  load_image(out / row["image"], size)]
        for a, image, title in zip(ax, images, ("content", f"style: {row['style'][:24]}", "stylized")):
            a.imshow(image[0].permute(1, 2, 0).numpy())
            a.set_title(title, fontsize=8)
            a.axis("off")
    if (out / MEANINGLESS).exists():
        fig.suptitle("RANDOM AdaIN weights: meaningless", color="red")
    fig.tight_layout()
    fig.savefig(out / "preview.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> Path:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot", "runs/stylized")
    parser.add_argument("--styles", type=Path, default=SHARED_DATA / "style-targets", help="folder of style images")
    parser.add_argument("--vgg", type=Path, help="normalised VGG-19 state dict (vgg_normalised.pth)")
    parser.add_argument("--decoder", type=Path, help="AdaIN decoder state dict (decoder.pth)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random AdaIN weights, for tests and smoke runs only: the output is meaningless")
    parser.add_argument("--alpha", type=float, default=0.5, help="style strength (the paper uses 0.5)")
    parser.add_argument("--size", type=int, default=256, help="shorter side of the content images and outputs")
    parser.add_argument("--style-size", type=int, default=256, help="shorter side the style images are read at")
    parser.add_argument("--max-per-class", type=int, help="stylize at most this many images per class")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; options given explicitly still win
        parser.set_defaults(size=64, style_size=64, max_per_class=2)
        args = parser.parse_args(argv)
    seed_everything(args.seed)
    net = build_adain(args.vgg, args.decoder, args.random_weights)
    classes = class_folders(args.data, "content folder")
    samples = [(path, classes[label]) for path, label in folder_samples(args.data, classes)]
    if args.max_per_class:
        samples = [s for name in classes for s in [x for x in samples if x[1] == name][:args.max_per_class]]
    out = stylize_samples(net, samples, style_images(args.styles), args.out, alpha=args.alpha, size=args.size,
                          style_size=args.style_size, device=resolve_device(args.device), seed=args.seed,
                          meaningless=args.random_weights)
    write_json(out / "config.json", vars(args))
    print(f"wrote {len(samples)} stylized images to {out}")
    return out


if __name__ == "__main__":
    main()
