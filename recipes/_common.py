"""What every recipe shares: the standard command-line options, seeding, device choice, warnings."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TOPK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def recipe_parser(description: str, default_data: Path | str, default_out: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--data --out --device --seed --smoke``; defaults are shown in ``--help``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(default_data), help="input folder")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="folder for everything the run writes")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed (python, numpy, torch)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of seconds to minutes that still writes every output")
    return parser


def image_files(folder: Path, *, recursive: bool = False, what: str | None = None) -> list[Path]:
    """Sorted image files in ``folder`` (``recursive``: below it); with ``what``, exit if there are none."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if what and not paths:
        raise SystemExit(f"{what} {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return paths


def parse_k(text: str) -> float | int:
    """A command-line K: ``"0.2"`` is a fraction, ``"12"`` a count."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise SystemExit(f"--k {text!r} must be a fraction in (0, 1] or an integer count") from None


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN with fewer than two values): the tables' "mean ± std" over seeds."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def format_mean_std(mean: float, std: float) -> str:
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name!r} is not a device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else exit with a message naming it and what was expected there."""
    if not Path(path).is_dir():
        raise SystemExit(f"{what} not found: {path} is not a folder")
    return Path(path)


def warn_meaningless(reason: str) -> None:
    """A loud banner for runs whose numbers mean nothing (random weights)."""
    bar = "!" * 78
    print(f"\n{bar}\n!! WARNING: {reason}\n!! The numbers this run prints and writes are MEANINGLESS.\n{bar}\n",
          file=sys.stderr, flush=True)


def write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
