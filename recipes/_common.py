"""What every recipe shares: options, run folders, checkpoints on disk, writers, images, devices, smoke runs.

One place each, so that every recipe refuses to mix runs, saves atomically and writes results the same way.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from topk_plugin.integrations import images
from topk_plugin.ops import check_k

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TOPK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
RUN_MARKER = "run.json"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- options

class RecipeParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also remembers which options the command line gave explicitly (``given``).

    ``apply_smoke`` needs that: a smoke run changes only the options the user left at their defaults.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given: set[str] = set()
        self._probing = False

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if not self._probing:
            self.given = self._explicit_dests(args)
        return parsed, extras

    def _parsers(self) -> list[argparse.ArgumentParser]:
        found = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += sub._parsers() if isinstance(sub, RecipeParser) else [sub]
        return found

    def _explicit_dests(self, args) -> set[str]:
        parsers = self._parsers()
        saved = [(a, a.default) for p in parsers for a in p._actions]
        saved_parser_defaults = [(p, dict(p._defaults)) for p in parsers]
        for p in parsers:
            p._probing = True
            p._defaults.clear()
            for a in p._actions:
                a.default = argparse.SUPPRESS
        try:
            probe, _ = argparse.ArgumentParser.parse_known_args(self, args, argparse.Namespace())
        finally:
            for a, default in saved:
                a.default = default
            for p, defaults in saved_parser_defaults:
                p._defaults.update(defaults)
                p._probing = False
        return set(vars(probe))


def recipe_parser(description: str, default_data: Path | str, default_out: str, *,
                  trains: bool = False) -> RecipeParser:
    """A parser with ``--data --out --device --seed --smoke --overwrite`` (and ``--resume`` if ``trains``)."""
    parser = RecipeParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_options(parser, default_data, default_out, trains=trains)
    return parser


def add_run_options(parser: argparse.ArgumentParser, default_data: Path | str, default_out: str, *,
                    trains: bool = False) -> None:
    """The standard options, for a parser or a sub-command's parser."""
    parser.add_argument("--data", type=Path, default=Path(default_data), help="input folder")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="folder for everything the run writes; must be new or empty (see --overwrite)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed (python, numpy, torch)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run of seconds that still writes every output (options you give are kept)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier run in --out (only a folder written by these recipes)")
    if trains:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --out from its last checkpoint; its saved config is authoritative")


def apply_smoke(args: argparse.Namespace, parser: RecipeParser, **smoke_values) -> argparse.Namespace:
    """The one smoke mechanism: with ``--smoke``, set each option to its smoke value unless the user gave it."""
    if getattr(args, "smoke", False):
        unknown = [name for name in smoke_values if not hasattr(args, name)]
        if unknown:
            raise ValueError(f"apply_smoke: the parser has no options {unknown}")
        for name, value in smoke_values.items():
            if name not in parser.given:
                setattr(args, name, value)
    return args


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (need one >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: need an integer >= 1")
    return value


def parse_k(text: str) -> float | int:
    """A command-line K: ``"0.2"`` is a fraction in (0, 1], ``"12"`` a count >= 1; anything else exits naming it."""
    stripped = text.strip()
    try:
        value = int(stripped) if stripped.isdigit() else float(stripped)
        check_k(value)
    except ValueError:
        raise SystemExit(f"--k {text!r} is not a K: give a fraction in (0, 1] or an integer count >= 1") from None
    return value


def k_list(text: str) -> list[float | int]:
    """argparse type: comma-separated K values (fractions in (0, 1] or counts >= 1), each checked."""
    items = [item for item in text.split(",")]
    if not text.strip() or any(not item.strip() for item in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated K values such as 0.05,0.1 or 12")
    try:
        values = [parse_k(item) for item in items]
        check_distinct(repr(text), values)  # by repr: 1 (a count) and 1.0 (every position) differ, 0.1 and 0.10 not
    except SystemExit as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--k ")) from None
    return values


def check_distinct(flag: str, values, name=repr) -> None:
    """Exit naming ``flag`` when two of ``values`` would be one run (the same ``name``: a folder, a table row)."""
    seen = {}
    for value in values:
        key = name(value)
        if key not in seen:
            seen[key] = value
        elif seen[key] == value:
            raise SystemExit(f"{flag}: {value!r} is given more than once")
        else:
            raise SystemExit(f"{flag}: {seen[key]!r} and {value!r} name the same run ({key}); give distinct values")


# ----------------------------------------------------------------------------- run folders

def prepare_out(out: Path | str, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``out`` ready for a run and mark it as this library's; never mix two runs in one folder.

    A non-empty folder is refused unless ``resume`` (continue the run there) or ``overwrite`` (delete the earlier
    run first; only a folder that carries this library's ``run.json`` marker, so foreign files are never deleted).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; name a folder for the run's outputs")
    if resume and overwrite:
        raise SystemExit("--resume and --overwrite contradict each other; choose one")
    contents = sorted(out.iterdir()) if out.is_dir() else []
    marker = out / RUN_MARKER
    started_only = bool(contents) and marker.is_file() and {p.name for p in contents} <= {RUN_MARKER, CONFIG_FILE}
    if resume:
        if not marker.is_file():
            raise SystemExit(f"--resume: {out} holds no run of these recipes (no {RUN_MARKER}); drop --resume to start one")
        if started_only:
            raise SystemExit(f"--resume: {out} holds no results to resume (the run stopped before writing any); "
                             "drop --resume to start it again")
        return out
    if started_only:  # a run that stopped before writing anything (bad weights, a bad image): nothing to lose
        overwrite = True
    if contents:
        if not overwrite:
            shown = ", ".join(p.name for p in contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise SystemExit(f"--out {out} already holds an earlier run ({shown}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose a new folder")
        if not marker.is_file():
            raise SystemExit(f"--overwrite: {out} was not written by these recipes (no {RUN_MARKER}); "
                             "refusing to delete it: clear it yourself or choose a new folder")
        for path in contents:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    from topk_plugin import __version__

    write_json(marker, {"recipe": Path(sys.argv[0]).name, "argv": sys.argv[1:], "topk_plugin": __version__,
                        "started": datetime.datetime.now().isoformat(timespec="seconds")})
    return out


def _plain(value: Any) -> Any:
    """JSON-ready form of a config value (paths and tuples as JSON has them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    return value


def save_config(out: Path, config) -> Path:
    """Write the run's configuration (a dataclass or a dict) to ``out/config.json``."""
    return write_json(Path(out) / CONFIG_FILE, _plain(config))


def load_config(out: Path) -> dict:
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise SystemExit(f"--resume: {path} is missing; this run cannot be resumed")
    return json.loads(path.read_text())


def check_resume_config(out: Path, config, *, ignore: Iterable[str] = ()) -> dict:
    """On resume the saved config is authoritative: any field given differently exits naming both values."""
    saved, given = load_config(out), _plain(config)
    ignored = set(ignore)
    conflicts = [f"{name}: the run has {saved[name]!r}, this command gives {given[name]!r}"
                 for name in given if name in saved and name not in ignored and saved[name] != given[name]]
    if conflicts:
        raise SystemExit(f"--resume {out}: options conflict with the saved run ({CONFIG_FILE}):\n  "
                         + "\n  ".join(conflicts) + "\nDrop them (the saved values are used) or start a new --out")
    return saved


def atomic_save(obj, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never destroys the last good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- writers

def write_json(path: Path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(payload), indent=2, default=str) + "\n")
    return path


def write_csv(path: Path, rows) -> Path:
    """Rows (a list of dicts, columns in first-seen order, or a pandas DataFrame) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(rows, "to_csv"):
        rows.to_csv(path, index=False)
        return path
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(_plain(row) for row in rows)
    return path


def pyplot():
    """``matplotlib.pyplot``, imported on first use with the file-only Agg backend unless one is already chosen."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf``, then close it."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150 if path.suffix == ".png" else None, bbox_inches="tight")
    pyplot().close(fig)
    return paths


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN with fewer than two values): the tables' "mean ± std" over seeds."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def format_mean_std(mean: float, std: float) -> str:
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


# ----------------------------------------------------------------------------- images and folders

class UnreadableImage(SystemExit):
    """An image file that cannot be decoded; uncaught it ends a recipe with one line naming the file."""


def read_image(path: Path, mode: str = "RGB"):
    """The image at ``path``, fully decoded and converted to ``mode``; ``UnreadableImage`` names a bad file."""
    try:
        return images.read_image(path, mode)
    except images.UnreadableImage as err:
        raise UnreadableImage(f"{err} (re-create or remove it; recipes that read folders take --skip-bad-images)"
                              ) from None


def image_files(folder: Path, *, recursive: bool = False, what: str | None = None) -> list[Path]:
    """Sorted image files in ``folder`` (``recursive``: below it); with ``what``, exit if there are none."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if what and not paths:
        raise SystemExit(f"{what} {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return paths


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else exit with a message naming it and what was expected there."""
    if not Path(path).is_dir():
        raise SystemExit(f"{what} not found: {path} is not a folder")
    return Path(path)


# ----------------------------------------------------------------------------- devices, seeds, warnings

def resolve_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device`` that exists on this machine; anything else exits naming the value."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name!r} is not a device ({err}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"--device {name!r}: recipes run on 'cpu', 'cuda' or 'mps'")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warn_meaningless(reason: str) -> None:
    """A loud banner for runs whose numbers mean nothing (random weights)."""
    bar = "!" * 78
    print(f"\n{bar}\n!! WARNING: {reason}\n!! The numbers this run prints and writes are MEANINGLESS.\n{bar}\n",
          file=sys.stderr, flush=True)
