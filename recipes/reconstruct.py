"""Reconstruction from masked activations (paper §3.3, Fig. 3).

For each image and each layer of --layers, optimise an image from noise so that its activation X(I) at
that layer matches M * X(T), the target's activation under a mask M: identity (all responses), Top-K
only (the core's ``topk`` mode) or non-Top-K only (``non_topk``), sparsified onto the VGG taps. The loss
is ||X(I) - M * X(T)||^2 / ||X(T)||^2.

Writes, in --out: reconstruction.png (rows image @ layer; target | identity | Top-K only | non-Top-K
only), losses.csv, losses.png, summary.json.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from topk_plugin.recipes._common import SHARED_DATA, recipe_parser, write_json
from topk_plugin.recipes.vgg_features import (RANDOM_NOTE, add_vgg_args, apply_smoke, build_extractor, load_image, loss_rows,
                                  optimise_image, plot_loss_curves, prepare_run, save_image_grid, set_topk_mode,
                                  write_csv)

LAYERS = ["pool2", "pool3", "pool4"]
#: condition -> the Top-K mode that masks the target's activation
CONDITIONS = {"identity": "identity", "topk_only": "topk", "non_topk_only": "non_topk"}
CAPTIONS = {"identity": "identity", "topk_only": "Top-K only", "non_topk_only": "non-Top-K only"}


def masked_targets(extractor: torch.nn.Module, target: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """M * X(T) at every tap, M being the Top-K layers' ``mode``; leaves the extractor in ``identity``."""
    set_topk_mode(extractor, mode)
    try:
        with torch.no_grad():
            return extractor(target)
    finally:
        set_topk_mode(extractor, "identity")


def reconstruction_loss(extractor: torch.nn.Module, targets: dict[str, torch.Tensor],
                        scale: dict[str, torch.Tensor]) -> Callable:
    """Summed squared error of the image's unmasked activations to ``targets``, each over ``scale``."""

    def loss(image: torch.Tensor) -> torch.Tensor:
        features = extractor(image)
        return sum((features[name] - t).square().sum() / scale[name] for name, t in targets.items())

    return loss


def main(argv=None) -> dict:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/reconstruct")
    add_vgg_args(parser, layers=LAYERS, k=0.05, steps=100, lr=10.0)
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
        args.layers = args.layers[:1]  # each layer is three more optimisations
    device, paths, features, source = prepare_run(args, "reconstruction")
    meaningless = source == "random"

    # One extractor per layer, each cut after its own layer: a reconstruction matches one layer.
    extractors = {layer: build_extractor(features, args.arch, [layer], args.k).to(device) for layer in args.layers}
    tag = "_MEANINGLESS" if meaningless else ""
    title = (f"{args.arch} ({source}), k={args.k}, {args.steps} L-BFGS steps, lr {args.lr}"
             + (f"\n{RANDOM_NOTE}" if meaningless else ""))
    grid, labels, rows, results, started = [], [], [], [], time.time()
    for i, path in enumerate(paths):
        target = load_image(path, args.size).to(device)
        for layer, extractor in extractors.items():
            dense = masked_targets(extractor, target, "identity")
            scale = {name: f.square().sum().clamp_min(1e-12) for name, f in dense.items()}
            images, finals = [target.cpu()], {}
            for condition, mode in CONDITIONS.items():
                loss_fn = reconstruction_loss(extractor, masked_targets(extractor, target, mode), scale)
                image, losses = optimise_image(loss_fn, target.shape, steps=args.steps, lbfgs_iters=args.lbfgs_iters,
                                               lr=args.lr, seed=args.seed + i, device=device,
                                               desc=f"{path.stem} {layer} {condition}")
                images.append(image)
                rows += loss_rows(f"{path.stem}@{layer}", condition, losses, image=path.stem, layer=layer)
                finals[condition] = {"initial_loss": losses[0], "final_loss": losses[-1]}
            grid.append(images)
            labels.append(f"{path.stem}\n{layer}")
            results.append({"image": str(path), "layer": layer, **finals})

    figure = save_image_grid(args.out / f"reconstruction{tag}.png", grid, ["target", *CAPTIONS.values()], labels,
                             title)
    csv_path = write_csv(args.out / f"losses{tag}.csv", rows)
    curves = plot_loss_curves(args.out / f"losses{tag}.png", rows, CAPTIONS, title)
    summary = {"recipe": "reconstruct", "meaningless": meaningless, "weights": source, "device": str(device),
               "args": vars(args), "modes": CONDITIONS, "seconds": round(time.time() - started, 1),
               "figure": figure.name, "losses_csv": csv_path.name, "loss_curves": curves.name,
               "reconstructions": results}
    write_json(args.out / f"summary{tag}.json", summary)
    print(f"wrote {figure.name}, {curves.name} and {csv_path.name} to {args.out}")
    return summary


if __name__ == "__main__":
    main()
