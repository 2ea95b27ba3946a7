"""Texture synthesis with and without the Top-K responses (paper §3.2, Fig. 2).

Gatys et al.: optimise an image from noise until its Gram matrices at --layers match the target's
(every layer weighted --layer-weight). "with Top-K" uses all responses; "without Top-K" removes each
channel's Top-K responses (the core's ``non_topk`` mode, sparsified onto the VGG taps) before the Gram
matrices, in the target and in the image being synthesised alike.

Writes, in --out: <image>.png (target | with Top-K | without Top-K), losses.csv, losses.png, summary.json.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from topk_plugin.recipes._common import SHARED_DATA, recipe_parser, write_json
from topk_plugin.recipes.vgg_features import (RANDOM_NOTE, add_vgg_args, apply_smoke, build_extractor, gram, load_image,
                                  loss_rows, optimise_image, plot_loss_curves, prepare_run, save_image_grid,
                                  set_topk_mode, write_csv)

LAYERS = ["relu1_1", "pool1", "pool2", "pool3", "pool4"]
#: condition -> the Top-K mode of every tap
CONDITIONS = {"with_topk": "identity", "without_topk": "non_topk"}
CAPTIONS = {"with_topk": "with Top-K\n(all responses)", "without_topk": "without Top-K\n(non-Top-K only)"}


def texture_loss(extractor: torch.nn.Module, target: torch.Tensor, layer_weight: float) -> Callable:
    """Weighted Gram-matrix MSE to ``target``, both through ``extractor`` as it is now (its Top-K mode)."""
    with torch.no_grad():
        targets = {name: gram(f) for name, f in extractor(target).items()}

    def loss(image: torch.Tensor) -> torch.Tensor:
        return sum(layer_weight * F.mse_loss(gram(f), targets[name]) for name, f in extractor(image).items())

    return loss


def main(argv=None) -> dict:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/texture_synthesis")
    add_vgg_args(parser, layers=LAYERS, k=0.05, steps=100, lr=1.0)
    parser.add_argument("--layer-weight", type=float, default=1e9, help="weight of every layer's Gram loss")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    device, paths, features, source = prepare_run(args, "texture synthesis")
    meaningless = source == "random"

    extractor = build_extractor(features, args.arch, args.layers, args.k).to(device)
    tag = "_MEANINGLESS" if meaningless else ""
    title = (f"{args.arch} ({source}), Gram at {', '.join(args.layers)}, k={args.k}, {args.steps} L-BFGS steps"
             + (f"\n{RANDOM_NOTE}" if meaningless else ""))
    rows, results, started = [], [], time.time()
    for i, path in enumerate(paths):
        target = load_image(path, args.size).to(device)
        images, finals = [target.cpu()], {}
        for condition, mode in CONDITIONS.items():
            set_topk_mode(extractor, mode)
            image, losses = optimise_image(texture_loss(extractor, target, args.layer_weight), target.shape,
                                           steps=args.steps, lbfgs_iters=args.lbfgs_iters, lr=args.lr,
                                           seed=args.seed + i, device=device, desc=f"{path.stem} {condition}")
            images.append(image)
            rows += loss_rows(path.stem, condition, losses)
            finals[condition] = {"initial_loss": losses[0], "final_loss": losses[-1]}
        figure = save_image_grid(args.out / f"{path.stem}{tag}.png", [images],
                                 ["target", *CAPTIONS.values()], [path.stem], title)
        results.append({"image": str(path), "figure": figure.name, **finals})

    csv_path = write_csv(args.out / f"losses{tag}.csv", rows)
    curves = plot_loss_curves(args.out / f"losses{tag}.png", rows, CAPTIONS, title)
    summary = {"recipe": "texture_synthesis", "meaningless": meaningless, "weights": source, "device": str(device),
               "args": vars(args), "modes": CONDITIONS, "seconds": round(time.time() - started, 1),
               "losses_csv": csv_path.name, "loss_curves": curves.name, "images": results}
    write_json(args.out / f"summary{tag}.json", summary)
    print(f"wrote {len(results)} figures, {curves.name} and {csv_path.name} to {args.out}")
    return summary


if __name__ == "__main__":
    main()
