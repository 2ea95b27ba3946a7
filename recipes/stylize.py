"""Build a stylized copy of an image folder with AdaIN (the stylized evaluation sets of the Top-K training experiment).

Defaults are the settings of the PyTorch AdaIN port's ``test.py`` that the paper's authors used, with the
paper's ``--alpha 0.5``: content and style images resized so that their shorter side is 512 px (aspect kept,
no crop), every content image stylized with every style image, results saved as JPEG the way the port saves
them. Each result is ``OUT/<class>/<content>_stylized_<style>.<ext>``; ``OUT/manifest.csv`` records the content
and style of each, ``OUT/preview.png/pdf`` shows a few content / style / result triples. AdaIN weights come from
the user (``--vgg``, ``--decoder``).

    python -m topk_plugin.recipes.stylize --data imagenet/val --vgg vgg_normalised.pth --decoder decoder.pth --out stylized-val
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from topk_plugin.recipes._common import (SHARED_DATA, apply_smoke, image_files, positive_int, prepare_out,
                                         pyplot, read_image, recipe_parser, require_dir, resolve_device,
                                         save_config, save_figure, seed_everything, warn_meaningless, write_csv)
from topk_plugin.recipes.adain import AdaIN, load_adain
from topk_plugin.recipes.datasets import class_folders, drop_unreadable, folder_samples

MEANINGLESS = "MEANINGLESS.txt"
STYLE_CHOICES = ("all", "random")
FORMATS = ("jpg", "png")
# torchvision.utils.save_image (what the port saves with) leaves PIL's default JPEG quality.
JPEG_QUALITY = 75


@dataclass(frozen=True)
class StyleSettings:
    """How images are stylized; the defaults are the port's ``test.py`` with the paper's alpha."""

    alpha: float = 0.5
    content_size: int = 512  # shorter side; 0 keeps the image's size
    style_size: int = 512
    crop: bool = False  # center-crop to content_size x content_size (style_size for styles) after resizing
    style_choice: str = "all"  # "all": every content x every style (the port); "random": one seeded style each
    image_format: str = "jpg"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise SystemExit(f"--alpha {self.alpha} must lie in [0, 1] (0 = content only, 1 = full style)")
        for flag, size in (("--content-size", self.content_size), ("--style-size", self.style_size)):
            if size < 0 or (self.crop and size == 0):
                raise SystemExit(f"{flag} {size}: give a shorter side >= 1 (0 keeps the size, not with --crop)")


def add_style_options(parser) -> None:
    """The stylization options (shared by this recipe and train_topk's built-in stylized val)."""
    default = StyleSettings()
    parser.add_argument("--styles", type=Path, default=SHARED_DATA / "style-targets", help="folder of style images")
    parser.add_argument("--vgg", type=Path, help="the port's normalised VGG-19 weights (vgg_normalised.pth)")
    parser.add_argument("--decoder", type=Path, help="the port's AdaIN decoder weights (decoder.pth)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random AdaIN weights, for tests and smoke runs only: the output is meaningless")
    parser.add_argument("--alpha", type=float, default=default.alpha,
                        help="style strength (the paper: 0.5; the port's default 1.0)")
    parser.add_argument("--content-size", type=int, default=default.content_size,
                        help="shorter side content images are resized to (0: keep; the port: 512)")
    parser.add_argument("--style-size", type=int, default=default.style_size,
                        help="shorter side style images are resized to (0: keep; the port: 512)")
    parser.add_argument("--crop", action="store_true", help="center-crop squares after resizing (the port's --crop)")
    parser.add_argument("--style-choice", choices=STYLE_CHOICES, default=default.style_choice,
                        help="'all': each content image with every style (the port's --style_dir); "
                             "'random': one seeded random style per image")
    parser.add_argument("--format", dest="image_format", choices=FORMATS, default=default.image_format,
                        help=f"output format (the port: jpg, quality {JPEG_QUALITY})")


def style_settings(args) -> StyleSettings:
    return StyleSettings(alpha=args.alpha, content_size=args.content_size, style_size=args.style_size,
                         crop=args.crop, style_choice=args.style_choice, image_format=args.image_format)


def build_adain(vgg: Path | None, decoder: Path | None, random_weights: bool) -> AdaIN:
    """AdaIN from the user's weight files; random weights only when asked, with a loud warning."""
    if random_weights:
        warn_meaningless("AdaIN has RANDOM weights (--random-weights): the 'stylized' images are noise")
        return AdaIN().eval()
    if vgg is None or decoder is None:
        raise SystemExit("AdaIN needs trained weights: pass --vgg vgg_normalised.pth and --decoder decoder.pth "
                         "(the files of the PyTorch AdaIN port); --random-weights exists only for tests and "
                         "smoke runs")
    return load_adain(vgg, decoder)


def style_images(folder: Path) -> list[Path]:
    return image_files(require_dir(folder, "style folder"), what="style folder")


def image_tensor(path: Path, size: int, crop: bool = False) -> torch.Tensor:
    """(1, 3, H, W) RGB in [0, 1] as the port reads it: shorter side resized to ``size`` (0: kept), then cropped."""
    image = read_image(path)
    if size:
        image = TF.resize(image, size)
        if crop:
            image = TF.center_crop(image, size)
    return TF.to_tensor(image)[None]


def save_image(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] rounded to 8 bits as ``torchvision.utils.save_image`` does; JPEG at PIL's default."""
    pixels = image.float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    options = {"quality": JPEG_QUALITY} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels).save(path, **options)


def stylize_samples(net: AdaIN, samples: Sequence[tuple[Path, str]], styles: Sequence[Path], out: Path,
                    settings: StyleSettings, *, device: torch.device | str = "cpu", seed: int = 0,
                    meaningless: bool = False) -> Path:
    """Write ``out/<class>/<stem>_stylized_<style>.<ext>`` for every (content path, class name); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to(device).eval()
    stats = [net.style_stats(image_tensor(p, settings.style_size, settings.crop).to(device)) for p in styles]
    rng = random.Random(seed)
    rows = []
    for path, name in tqdm(samples, desc=f"stylize -> {out.name}", unit="img"):
        chosen = range(len(styles)) if settings.style_choice == "all" else [rng.randrange(len(styles))]
        content = image_tensor(path, settings.content_size, settings.crop).to(device)
        (out / name).mkdir(exist_ok=True)
        for index in chosen:
            target = out / name / f"{Path(path).stem}_stylized_{styles[index].stem}.{settings.image_format}"
            save_image(net(content, stats[index], settings.alpha)[0], target)
            rows.append({"image": f"{name}/{target.name}", "content": str(path), "style": styles[index].name})
    if meaningless:
        (out / MEANINGLESS).write_text("Made with RANDOM AdaIN weights (--random-weights); only for tests.\n")
    write_preview(rows[:3], styles, out, settings)
    write_csv(out / "manifest.csv", rows)  # last: a folder with its manifest is complete
    return out


def write_preview(rows: list[dict], styles: Sequence[Path], out: Path, settings: StyleSettings) -> None:
    """``preview.png/pdf``: content | style | result for a few images."""
    plt = pyplot()
    by_name = {p.name: p for p in styles}
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for row, ax in zip(rows, axes):
        images = [image_tensor(Path(row["content"]), settings.content_size, settings.crop),
                  image_tensor(by_name[row["style"]], settings.style_size, settings.crop),
                  image_tensor(out / row["image"], 0)]
        for a, image, title in zip(ax, images, ("content", f"style: {row['style'][:24]}", "stylized")):
            a.imshow(image[0].permute(1, 2, 0).numpy())
            a.set_title(title, fontsize=8)
            a.axis("off")
    if (out / MEANINGLESS).exists():
        fig.suptitle("RANDOM AdaIN weights: meaningless", color="red")
    fig.tight_layout()
    save_figure(fig, out / "preview")


def main(argv=None) -> Path:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot", "runs/stylized")
    add_style_options(parser)
    parser.add_argument("--max-per-class", type=positive_int, help="stylize at most this many images per class")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out content images that cannot be decoded (listed in skipped_images.txt)")
    args = apply_smoke(parser.parse_args(argv), parser, content_size=32, style_size=32, max_per_class=2)
    settings = style_settings(args)
    device = resolve_device(args.device)
    classes = class_folders(args.data, "content folder")
    styles = style_images(args.styles)
    net = build_adain(args.vgg, args.decoder, args.random_weights)
    out = prepare_out(args.out, overwrite=args.overwrite)
    seed_everything(args.seed)
    samples = folder_samples(args.data, classes)
    if args.max_per_class:
        samples = [s for label in range(len(classes)) for s in [x for x in samples if x[1] == label][:args.max_per_class]]
    if args.skip_bad_images:
        samples, bad = drop_unreadable(samples, "content")
        (out / "skipped_images.txt").write_text("".join(f"{p}\n" for p in bad))
    save_config(out, {**vars(args), "settings": settings})
    stylize_samples(net, [(path, classes[label]) for path, label in samples], styles, out, settings, device=device,
                    seed=args.seed, meaningless=args.random_weights)
    print(f"wrote {len(samples)} content images x {len(styles) if settings.style_choice == 'all' else 1} "
          f"style(s) to {out}")
    return out


if __name__ == "__main__":
    main()
