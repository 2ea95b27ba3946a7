"""Reconstruction from masked activations (paper §3.3, Fig. 3).

For each image and each layer of --layers, optimise an image from noise so that its activation X(I) at
that layer matches M * X(T), the target's activation under a mask M: identity (all responses), Top-K
only (the core's ``topk`` mode) or non-Top-K only (``non_topk``), sparsified onto the VGG taps. The loss
is ||X(I) - M * X(T)||^2 / ||X(T)||^2.

Writes, in --out (refused when it holds anything, unless --overwrite): reconstruction.png/.pdf (rows
image @ layer; target | identity | Top-K only | non-Top-K only), losses.csv, losses.png/.pdf,
config.json, summary.json; every name ends in _MEANINGLESS with random weights.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from topk_plugin.recipes._common import SHARED_DATA, prepare_out, recipe_parser, save_config, write_csv, write_json
from topk_plugin.recipes.vgg_features import (RANDOM_NOTE, VGGRunConfig, add_vgg_args, build_extractor, loss_rows,
                                              optimise_image, parse_config, plot_loss_curves, prepare_run,
                                              save_image_grid, set_topk_mode)

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


def reconstruct(config: VGGRunConfig) -> dict:
    """Run the recipe into ``config.out`` (prepared by the caller); returns the summary it writes."""
    run = prepare_run(config, "reconstruction")
    # One extractor per layer, each cut after its own layer: a reconstruction matches one layer.
    extractors = {layer: build_extractor(run.features, config.arch, [layer], config.k).to(run.device)
                  for layer in config.layers}
    tag = "_MEANINGLESS" if run.meaningless else ""
    title = (f"{config.arch} ({run.source}), k={config.k}, {config.steps} L-BFGS steps, lr {config.lr}"
             + (f"\n{RANDOM_NOTE}" if run.meaningless else ""))
    grid, labels, rows, results, started = [], [], [], [], time.time()
    for i, (path, target) in enumerate(zip(run.paths, run.targets)):
        for layer, extractor in extractors.items():
            dense = masked_targets(extractor, target, "identity")
            scale = {name: f.square().sum().clamp_min(1e-12) for name, f in dense.items()}
            images, finals = [target.cpu()], {}
            for condition, mode in CONDITIONS.items():
                loss_fn = reconstruction_loss(extractor, masked_targets(extractor, target, mode), scale)
                image, losses = optimise_image(loss_fn, target.shape, steps=config.steps,
                                               lbfgs_iters=config.lbfgs_iters, lr=config.lr, seed=config.seed + i,
                                               device=run.device, desc=f"{path.stem} {layer} {condition}")
                images.append(image)
                rows += loss_rows(f"{path.stem}@{layer}", condition, losses, image=path.stem, layer=layer)
                finals[condition] = {"initial_loss": losses[0], "final_loss": losses[-1]}
            grid.append(images)
            labels.append(f"{path.stem}\n{layer}")
            results.append({"image": str(path), "layer": layer, **finals})

    figure, _ = save_image_grid(config.out / f"reconstruction{tag}", grid, ["target", *CAPTIONS.values()], labels,
                                title)
    csv_path = write_csv(config.out / f"losses{tag}.csv", rows)
    curves, _ = plot_loss_curves(config.out / f"losses{tag}", rows, CAPTIONS, title)
    summary = {"recipe": "reconstruct", "meaningless": run.meaningless, "weights": run.source,
               "device": str(run.device), "config": config.asdict(), "modes": CONDITIONS,
               "seconds": round(time.time() - started, 1), "figure": figure.name, "losses_csv": csv_path.name,
               "loss_curves": curves.name, "reconstructions": results}
    write_json(config.out / f"summary{tag}.json", summary)
    print(f"wrote {figure.name}, {curves.name} and {csv_path.name} to {config.out}")
    return summary


def main(argv=None) -> dict:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/reconstruct")
    add_vgg_args(parser, layers=LAYERS, k=0.05, steps=100, lr=10.0)
    # each layer is three more optimisations: a smoke run reconstructs at the first one only
    config, args = parse_config(parser, argv, VGGRunConfig, layers=LAYERS[:1])
    prepare_out(config.out, overwrite=args.overwrite)
    save_config(config.out, config)
    return reconstruct(config)


if __name__ == "__main__":
    main()
