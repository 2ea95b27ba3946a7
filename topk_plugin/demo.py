"""Demo: sparsify a torchvision (or timm) model with a preset, print its placement and measured sparsity.

    python -m topk_plugin.demo --model alexnet
    python -m topk_plugin.demo --model vit_b_16 --k 0.5

Runs offline on randomly initialised weights: the sparsity it measures is real, any accuracy is not.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import get_preset, list_presets, sparsify, sparsity_report
from .surgery import Table


def build_model(name: str) -> torch.nn.Module:
    """A randomly initialised model by torchvision name, else by timm name."""
    import torchvision

    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None)
    try:
        import timm
    except ImportError:
        raise SystemExit(f"--model {name!r} is not a torchvision model and timm is not installed") from None
    if name not in timm.list_models():
        raise SystemExit(f"--model {name!r} is neither a torchvision nor a timm model name")
    return timm.create_model(name, pretrained=False)


def preset_table(name: str = "paper") -> str:
    """The registered ``name`` presets as the markdown table the README shows."""
    lines = ["| architecture | positions | k | kind | note |", "|---|---|---|---|---|"]
    for preset in list_presets(name):
        spec = preset.spec
        positions = ", ".join(f"`{p}`" for p in spec.positions)
        lines.append(f"| {preset.arch} | {positions} | {spec.k} | {spec.kind} | {preset.note} |")
    return "\n".join(lines)


def main(argv=None) -> Table | str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet", help="torchvision or timm model name (default: alexnet)")
    parser.add_argument("--preset", default="paper", help="preset name (default: paper)")
    parser.add_argument("--k", type=float, default=None, help="override the preset's k (fraction in (0, 1])")
    parser.add_argument("--method", default="auto", choices=["auto", "fx", "hooks"], help="surgery method (default: auto)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    parser.add_argument("--presets", action="store_true", help="print the preset table (markdown) and exit")
    args = parser.parse_args(argv)
    if args.presets:
        print(preset_table(args.preset))
        return preset_table(args.preset)

    torch.manual_seed(0)
    model = build_model(args.model).eval()
    preset = get_preset(args.preset, model)
    print(f"model {args.model}: RANDOM weights (offline demo; sparsity is measured, accuracy would be meaningless)")
    print(f"preset {preset.name!r} for architecture {preset.arch!r}: {preset.note}")
    started = time.perf_counter()
    sparse = sparsify(model, args.preset, k=args.k, method=args.method)
    print(f"sparsified in {time.perf_counter() - started:.2f}s as {type(sparse).__name__}\n")
    report = sparsity_report(sparse, torch.randn(2, 3, args.size, args.size))
    print(report)
    return report


if __name__ == "__main__":
    main()
