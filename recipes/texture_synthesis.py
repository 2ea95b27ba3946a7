"""Texture synthesis with and without the Top-K responses (paper §3.2, Fig. 2).

Gatys et al.: optimise an image from noise until its Gram matrices at --layers match the target's
(every layer weighted --layer-weight). "with Top-K" uses all responses; "without Top-K" removes each
channel's Top-K responses (the core's ``non_topk`` mode, sparsified onto the VGG taps) before the Gram
matrices, in the target and in the image being synthesised alike.

Writes, in --out (refused when it holds anything, unless --overwrite): <image>.png/.pdf (target | with
Top-K | without Top-K), losses.csv, losses.png/.pdf, config.json, summary.json; every name ends in
_MEANINGLESS with random weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from topk_plugin.recipes._common import SHARED_DATA, prepare_out, recipe_parser, save_config, write_csv, write_json
from topk_plugin.recipes.vgg_features import (RANDOM_NOTE, VGGRunConfig, add_vgg_args, build_extractor, gram,
                                              loss_rows, optimise_image, parse_config, plot_loss_curves,
                                              prepare_run, save_image_grid, set_topk_mode)

LAYERS = ["relu1_1", "pool1", "pool2", "pool3", "pool4"]
#: condition -> the Top-K mode of every tap
CONDITIONS = {"with_topk": "identity", "without_topk": "non_topk"}
CAPTIONS = {"with_topk": "with Top-K\n(all responses)", "without_topk": "without Top-K\n(non-Top-K only)"}


@dataclass(frozen=True)
class TextureConfig(VGGRunConfig):
    layer_weight: float = 1e9

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_weight > 0:
            raise ValueError(f"layer_weight={self.layer_weight!r} must be > 0")


def texture_loss(extractor: torch.nn.Module, target: torch.Tensor, layer_weight: float) -> Callable:
    """Gram-matrix loss to ``target``, both through ``extractor`` as it is now (its Top-K mode): per layer,
    ``layer_weight / 4`` times the summed squared difference of the Gram matrices, as the authors' code (a mean
    instead of the sum would weigh a layer of C channels C^2 times less, and deep layers almost not at all)."""
    with torch.no_grad():
        targets = {name: gram(f) for name, f in extractor(target).items()}

    def loss(image: torch.Tensor) -> torch.Tensor:
        return sum(layer_weight / 4 * (gram(f) - targets[name]).square().sum() for name, f in extractor(image).items())

    return loss


def synthesize(config: TextureConfig) -> dict:
    """Run the recipe into ``config.out`` (prepared by the caller); returns the summary it writes."""
    run = prepare_run(config, "texture synthesis")
    extractor = build_extractor(run.features, config.arch, config.layers, config.k).to(run.device)
    tag = "_MEANINGLESS" if run.meaningless else ""
    title = (f"{config.arch} ({run.source}), Gram at {', '.join(config.layers)}, k={config.k}, "
             f"{config.steps} L-BFGS steps" + (f"\n{RANDOM_NOTE}" if run.meaningless else ""))
    rows, results, started = [], [], time.time()
    for i, (path, target) in enumerate(zip(run.paths, run.targets)):
        images, finals = [target.cpu()], {}
        for condition, mode in CONDITIONS.items():
            set_topk_mode(extractor, mode)
            image, losses = optimise_image(texture_loss(extractor, target, config.layer_weight), target.shape,
                                           steps=config.steps, lbfgs_iters=config.lbfgs_iters, lr=config.lr,
                                           seed=config.seed + i, device=run.device, desc=f"{path.stem} {condition}")
            images.append(image)
            rows += loss_rows(path.stem, condition, losses)
            finals[condition] = {"initial_loss": losses[0], "final_loss": losses[-1]}
        figure, _ = save_image_grid(config.out / f"{path.stem}{tag}", [images], ["target", *CAPTIONS.values()],
                                    [path.stem], title)
        results.append({"image": str(path), "figure": figure.name, **finals})

    csv_path = write_csv(config.out / f"losses{tag}.csv", rows)
    curves, _ = plot_loss_curves(config.out / f"losses{tag}", rows, CAPTIONS, title)
    summary = {"recipe": "texture_synthesis", "meaningless": run.meaningless, "weights": run.source,
               "device": str(run.device), "config": config.asdict(), "modes": CONDITIONS,
               "seconds": round(time.time() - started, 1), "losses_csv": csv_path.name, "loss_curves": curves.name,
               "images": results}
    write_json(config.out / f"summary{tag}.json", summary)
    print(f"wrote {len(results)} figures, {curves.name} and {csv_path.name} to {config.out}")
    return summary


def main(argv=None) -> dict:
    parser = recipe_parser(__doc__.split("\n\n")[0], SHARED_DATA / "few-shot" / "jeep", "runs/texture_synthesis")
    add_vgg_args(parser, layers=LAYERS, k=0.05, steps=100, lr=1.0)
    parser.add_argument("--layer-weight", type=float, default=1e9, help="weight of every layer's Gram loss")
    config, args = parse_config(parser, argv, TextureConfig)
    prepare_out(config.out, overwrite=args.overwrite)
    save_config(config.out, config)
    return synthesize(config)


if __name__ == "__main__":
    main()
