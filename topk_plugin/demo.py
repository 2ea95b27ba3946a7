"""Demo: sparsify a torchvision or timm model, print its placement and the sparsity it measures.

    topk-plugin-demo --model alexnet
    topk-plugin-demo --model vit_b_16 --k 0.5
    topk-plugin-demo --model timm/convnext_atto --spec stage-ends --size 128

Runs offline on randomly initialised weights: the sparsity it measures is real, any accuracy is not.
"""
from __future__ import annotations

import argparse
import time

import torch

from .models import create_model
from .parse import parse_spec
from .placement import COMPUTED
from .presets import get_preset, list_presets, preset_names
from .report import sparsity_report
from .surgery import sparsify
from .table import Table


def preset_table(name: str = "paper") -> str:
    """The registered ``name`` presets as the markdown table the README shows."""
    lines = ["| architecture | positions | k | kind | note |", "|---|---|---|---|---|"]
    for preset in list_presets(name):
        spec = preset.spec
        positions = ", ".join(f"`{p}`" for p in spec.positions)
        lines.append(f"| {preset.arch} | {positions} | {spec.k} | {spec.kind} | {preset.note} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet",
                        help="torchvision or timm model name; timm/NAME forces timm (default: alexnet)")
    parser.add_argument("--spec", "--preset", dest="spec", default="paper",
                        help="a preset ('paper'), 'stage-ends' (any model), positions 'a,b' or JSON (default: paper)")
    parser.add_argument("--k", type=float, default=None, help="override the spec's k (fraction in (0, 1])")
    parser.add_argument("--method", default="auto", choices=["auto", "fx", "hooks"], help="surgery method (default: auto)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    parser.add_argument("--presets", action="store_true", help="print the 'paper' preset table (markdown) and exit")
    return parser


def run(argv=None) -> Table | str:
    """Parse ``argv``, print and return the measured report (or the preset table)."""
    args = _parser().parse_args(argv)
    if args.presets:
        table = preset_table("paper")
        print(table)
        return table
    spec = parse_spec(args.spec)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x = torch.randn(2, 3, args.size, args.size)
    print(f"model {args.model} ({type(model).__module__}.{type(model).__name__}): RANDOM weights "
          "(offline demo; sparsity is measured, accuracy would be meaningless)")
    if isinstance(spec, str) and spec in preset_names():
        preset = get_preset(spec, model)
        print(f"preset {preset.name!r} for architecture {preset.arch!r}: {preset.note}")
    started = time.perf_counter()
    probe = {"example_input": x[:1]} if isinstance(spec, str) and spec.removeprefix("preset:") in COMPUTED else {}
    sparse = sparsify(model, spec, k=args.k, method=args.method, **probe)
    print(f"sparsified in {time.perf_counter() - started:.2f}s as {type(sparse).__name__}\n")
    report = sparsity_report(sparse, x)
    print(report)
    return report


def main(argv=None) -> int:
    """Console entry point (``topk-plugin-demo``): exit status 0 on success."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
