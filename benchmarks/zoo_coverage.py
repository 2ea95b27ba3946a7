"""Coverage of the timm / torchvision zoo by ``sparsify(model, "stage-ends")``, measured (random weights).

    python benchmarks/zoo_coverage.py --out runs/zoo_coverage                 # the whole zoo, ~180 models
    python benchmarks/zoo_coverage.py --families-subset ci --size 64 --out runs/zoo_ci
    python benchmarks/zoo_coverage.py --models resnet18,timm/vit_tiny_patch16_224 --out runs/zoo_two
    python benchmarks/zoo_coverage.py --out runs/zoo_coverage --resume        # after an interruption

The zoo: per timm family (timm module), the model with the fewest parameters among the ``COUNTED_PER_FAMILY``
(6) names that rank smallest by name (size word: test < atto < ... < tiny < small < base < large, then the
numbers in the name; every name counted in families of at most 6); every torchvision classification model; and
a few torchvision segmentation / detection models; listed in zoo.csv (family, model, params). For each model and
each ``--methods`` entry it sparsifies a copy with ``"stage-ends"`` (probe and checks at ``--size`` pixels,
or at the model's own input size when the dense model cannot run at ``--size``) and checks, in order:

  build      ``sparsify`` raises nothing;
  shape      the eval output has the dense output's shape;
  effect     the output differs from the dense one. When it does not, the Top-K layers tell why: if
             every one was reached and zeroed entries, the model itself damps the change (random-init
             LayerScale of 1e-5, vanishing activations): a ``limitation`` if every later check passes,
             not a pass; a Top-K that was not reached or removed nothing is a failure;
  fx=hooks   fx and auto outputs equal the hooks output;
  keys       ``state_dict`` keys identical to the dense model's;
  backward   a train-mode forward + backward gives a gradient to every parameter the dense model's does;
  desparsify ``desparsify`` gives back the dense output.

Linear/conv weights that a model initialises to zero (torchvision ViT's head) are re-initialised first,
or no output could differ. Writes in --out: coverage.csv (one row per model x method: status pass /
limitation / fail / timeout and a one-line cause; rewritten after every model, so --resume continues),
summary.md (pass rate per method and every row that did not pass: the block for docs/RESULTS.md) and
summary.json.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from topk_plugin import desparsify, sparsify, topk_layers
from topk_plugin.models import create_model
from topk_plugin.recipes._common import (check_resume_config, load_config, positive_int, prepare_out, save_config,
                                         write_csv, write_json)

METHODS = ("fx", "hooks", "auto")
STATUSES = ("pass", "limitation", "fail", "timeout", "skipped")
#: a representative model per family for CI, each the smallest (or timm's ``test_*``) of its family: plain
#: and residual CNNs, inverted residuals, Inception branches, dense connections, ConvNeXt, RegNet, hybrids,
#: ViT with a class token, two prefix tokens, LayerScale, LeViT, Swin and other channel-last maps, Hiera,
#: segmentation
CI_MODELS = (
    "torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/squeezenet1_1",
    "torchvision/shufflenet_v2_x0_5", "torchvision/googlenet", "torchvision/densenet121",
    "torchvision/regnet_x_400mf", "torchvision/mnasnet0_5", "torchvision/lraspp_mobilenet_v3_large",
    "timm/test_resnet", "timm/test_convnext", "timm/test_efficientnet", "timm/test_maxvit", "timm/test_mambaout",
    "timm/mobilevit_xxs", "timm/test_vit", "timm/deit_tiny_distilled_patch16_224", "timm/cait_xxs24_224",
    "timm/levit_128s", "timm/swin_tiny_patch4_window7_224", "timm/hiera_tiny_224",
)
#: torchvision models outside classification that the zoo adds (built with no backbone download)
DENSE_PREDICTION = {
    "deeplabv3_mobilenet_v3_large": "segment", "lraspp_mobilenet_v3_large": "segment",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "detect",
}
#: words timm uses for a model's size, smallest first; a name with none of them ranks in the middle
SIZE_WORDS = ("test", "atto", "femto", "pico", "nano", "xxxs", "xxs", "xxtiny", "xtiny", "tiny", "t", "xs", "mini",
              "small", "s", "lite", "", "medium", "m", "base", "b", "large", "l", "xlarge", "huge", "h", "giant", "g",
              "gigantic")
#: how many names per timm family are counted (built on the meta device), the smallest by name first
COUNTED_PER_FAMILY = 6
# Relative output change (max |sparse - dense| / max |dense|) below which the output counts as unchanged:
# a Top-K that changed nothing leaves the very same computation, hence a change of exactly 0.
NO_CHANGE = 1e-6
# fx and hooks run the same computation; they may differ only by float reordering.
SAME = 1e-5


# ----------------------------------------------------------------------------- tasks

def _tensors(value) -> list[torch.Tensor]:
    """Every floating tensor in a model output (tensors, tuples, lists, dicts, named tuples), in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _flat(value) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in _tensors(value)])


def _sum_squares(value) -> torch.Tensor:
    return sum(t.float().square().mean() for t in _tensors(value))


def _detection_target(x: torch.Tensor) -> list[dict]:
    h, w = x.shape[-2:]
    box = torch.tensor([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]])
    return [{"boxes": box, "labels": torch.tensor([1])} for _ in range(x.shape[0])]


@dataclass(frozen=True)
class Task:
    """How to read a model's eval output as one tensor, and a scalar to back-propagate in train mode."""

    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]


TASKS = {
    "classify": Task(lambda m, x: _flat(m(x)), lambda m, x: _sum_squares(m(x))),
    "segment": Task(lambda m, x: _flat(m(x)["out"]), lambda m, x: _sum_squares(m(x))),
    # eval: every detection's box and score (score threshold 0: always 100 detections); train: the losses
    "detect": Task(lambda m, x: _flat([[d["boxes"], d["scores"]] for d in m(list(x))]),
                   lambda m, x: sum(m(list(x), _detection_target(x)).values())),
}


# ----------------------------------------------------------------------------- the zoo

@dataclass(frozen=True)
class ZooModel:
    name: str  # create_model name: "timm/..." or "torchvision/..."
    family: str
    task: str = "classify"
    params: int = 0


def _count_on_meta(build: Callable[[], nn.Module]) -> int | None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in build().parameters())
    except Exception:  # noqa: BLE001 - some models cannot be built on meta (torchvision's RegNet init)
        return None


def _parameter_count(entry: ZooModel) -> int | None:
    """Parameters without a real build: counted on the meta device, else torchvision's weights metadata."""
    count = _count_on_meta(lambda: _build(entry, {}))
    if count is None and entry.name.startswith("torchvision/") and entry.task == "classify":
        count = torchvision.models.get_model_weights(entry.name.rpartition("/")[2]).DEFAULT.meta["num_params"]
    return count


def name_size_rank(name: str) -> tuple:
    """How small a timm name says its model is: the smallest size word in it, then its numbers (depth, width)."""
    tokens = re.split(r"[_.\-]", name.lower())
    words = [SIZE_WORDS.index(t) for t in tokens if t in SIZE_WORDS]
    word = min(words) if words else SIZE_WORDS.index("")
    # "v2" in "ghostnetv2_100" is a version, not a size
    return word, [int(n) for n in re.findall(r"\d+", re.sub(r"v\d+", "", name.lower()))], name


def timm_smallest_per_family(counted: int = COUNTED_PER_FAMILY) -> list[ZooModel]:
    """Per timm module: the fewest parameters among the ``counted`` names that ``name_size_rank`` ranks smallest.

    Counting a model builds it on the meta device (0.02-1 s); counting all ~1400 took too long on a shared
    machine, and the name ranks the family's small members first (``test_*``, ``*_atto``, ``resnet10t``).
    """
    import timm

    chosen = []
    for family in tqdm(timm.list_modules(), desc="timm families", unit="family"):
        names = sorted(timm.list_models(module=family), key=name_size_rank)[:counted]
        sized = [(_count_on_meta(lambda n=name: timm.create_model(n)), name) for name in names]
        sized = [(count, name) for count, name in sized if count is not None]
        if sized:
            count, name = min(sized)
            chosen.append(ZooModel(f"timm/{name}", f"timm:{family}", params=count))
    return chosen


def torchvision_models() -> list[ZooModel]:
    """Every torchvision classification model, and ``DENSE_PREDICTION``."""
    names = torchvision.models.list_models(module=torchvision.models)
    return ([ZooModel(f"torchvision/{n}", "torchvision:classification") for n in sorted(names)]
            + [ZooModel(f"torchvision/{n}", f"torchvision:{task}", task) for n, task in DENSE_PREDICTION.items()])


def named_models(names: list[str]) -> list[ZooModel]:
    """Entries for model names (``timm/x``, ``torchvision/x`` or a bare ``create_model`` name)."""
    entries = []
    for name in names:
        bare = name.rpartition("/")[2]
        if bare in DENSE_PREDICTION:
            entries.append(ZooModel(f"torchvision/{bare}", f"torchvision:{DENSE_PREDICTION[bare]}",
                                    DENSE_PREDICTION[bare]))
        else:
            entries.append(ZooModel(name, name.rpartition("/")[0] or "-"))
    return entries


def _build(entry: ZooModel, kwargs: dict) -> nn.Module:
    bare = entry.name.rpartition("/")[2]
    if entry.task == "classify":
        return create_model(entry.name, **kwargs)
    # create_model knows classification models only; weights_backbone=None: never a download
    extra = {"box_score_thresh": 0.0} if entry.task == "detect" else {}
    return torchvision.models.get_model(bare, weights=None, weights_backbone=None, **extra, **kwargs)


def _native_size(entry: ZooModel, model: nn.Module) -> int | None:
    """The input side the model was made for: timm's ``pretrained_cfg``, else torchvision's weights crop."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return size
    if entry.name.startswith("torchvision/") and entry.task == "classify":  # inception_v3: 299
        weights = torchvision.models.get_model_weights(entry.name.rpartition("/")[2]).DEFAULT
        return int(weights.transforms().crop_size[0])
    return None


def _candidates(entry: ZooModel, size: int):
    """(kwargs, size) to try in turn: the model made for ``size``, then as it comes at ``size``, then native."""
    if entry.name.startswith("timm/"):
        yield {"img_size": size}, size
    elif entry.task == "classify":
        yield {"image_size": size}, size
    yield {}, size
    yield {}, None  # the model's own input size


def _reinit_zero_weights(model: nn.Module) -> int:
    """Re-initialise all-zero Linear / conv weights (zero-initialised heads); returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(weight, torch.Tensor) and not weight.any():
            nn.init.normal_(weight, std=0.02)
            count += 1
    return count


@dataclass
class Dense:
    """A dense model that runs, and everything the checks compare with."""

    model: nn.Module
    x: torch.Tensor  # the eval input (batch 1)
    batch: torch.Tensor  # the train input (batch 2: BatchNorm needs more than one value per channel)
    output: torch.Tensor
    keys: list[str]
    grads: set[str]
    size: int
    reinit: int


def _grad_names(model: nn.Module, task: Task, batch: torch.Tensor) -> set[str]:
    """Parameters that a train-mode forward + backward gives a finite gradient; state and grads restored."""
    state = copy.deepcopy(model.state_dict())  # with its _metadata: MNASNet's loader reads the version there
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise FloatingPointError(f"non-finite gradient at {bad[:3]}")
        return {n for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.load_state_dict(state)


def build_dense(entry: ZooModel, size: int, seed: int) -> Dense:
    """The first of ``_candidates`` whose dense model builds and runs; the last error if none does."""
    task, error = TASKS[entry.task], None
    for kwargs, wanted in _candidates(entry, size):
        try:
            torch.manual_seed(seed)
            model = _build(entry, kwargs).eval()
            side = wanted or _native_size(entry, model) or 224
            reinit = _reinit_zero_weights(model)
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(1, 3, side, side, generator=generator)
            batch = torch.randn(2, 3, side, side, generator=generator)
            if entry.task == "detect":  # images in [0, 1] as the detector's transform expects
                x, batch = x.sigmoid(), batch.sigmoid()
            return dense_reference(model, task, x, batch, reinit)
        except Exception as err:  # noqa: BLE001 - try the next way of building it
            error = err
    raise RuntimeError(f"the dense model does not run: {_one_line(error)}")


def dense_reference(model: nn.Module, task: Task, x: torch.Tensor, batch: torch.Tensor, reinit: int = 0) -> Dense:
    """What the checks compare with: ``model``'s eval output on ``x``, its keys and the parameters it trains."""
    with torch.no_grad():
        output = task.output(model.eval(), x)
    return Dense(model, x, batch, output, sorted(model.state_dict()), _grad_names(model, task, batch), x.shape[-1],
                 reinit)


# ----------------------------------------------------------------------------- checks

def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:220]}{'...' if len(text) > 220 else ''}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class CheckFailed(Exception):
    def __init__(self, check: str, cause: str):
        super().__init__(f"{check}: {cause}")
        self.check = check


def _measured_output(model: nn.Module, task: Task, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Eval output, and per Top-K layer whether it was reached and how many non-zero entries it removed."""
    layers = topk_layers(model)
    for layer in layers.values():
        layer.measure, layer.stats = True, []
    try:
        with torch.no_grad():
            output = task.output(model, x)
    finally:
        for layer in layers.values():
            layer.measure = False
    removed = {p: sum(s["nonzero_in"] - s["nonzero_out"] for s in l.stats) if l.stats else None
               for p, l in layers.items()}
    return output, removed


def check_method(entry: ZooModel, dense: Dense, method: str, hooks_output: torch.Tensor | None) -> dict:
    """One row: every check of ``sparsify(dense copy, "stage-ends", method=method)``, stopping at the first failure."""
    task = TASKS[entry.task]
    row = {"status": "pass", "cause": "", "stages": "", "kinds": "", "fell_back": "", "rel_change": "",
           "zeroed": "", "fx_vs_hooks": ""}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sparse = sparsify(copy.deepcopy(dense.model), "stage-ends", method=method, example_input=dense.x)
            except Exception as err:  # noqa: BLE001
                raise CheckFailed("build", _one_line(err)) from None
        layers = topk_layers(sparse)
        row["stages"] = len(layers)
        row["kinds"] = ",".join(sorted({layer.kind for layer in layers.values()}))
        if method == "auto":
            row["fell_back"] = any("using forward hooks instead" in str(w.message) for w in caught)
        try:
            output, removed = _measured_output(sparse, task, dense.x)
        except Exception as err:  # noqa: BLE001
            raise CheckFailed("forward", _one_line(err)) from None
        row["output"] = output
        if output.shape != dense.output.shape:
            raise CheckFailed("shape", f"output {tuple(output.shape)} vs dense {tuple(dense.output.shape)}")
        change, damped = _relative(output, dense.output), ""
        zeroed = [p for p, n in removed.items() if n is not None and n > 0]
        unreached = [p for p, n in removed.items() if n is None]
        row["rel_change"], row["zeroed"] = f"{change:.2e}", f"{len(zeroed)}/{len(removed)}"
        if change <= NO_CHANGE:
            if unreached or not zeroed:
                raise CheckFailed("effect", f"output unchanged; Top-K not reached at {unreached[:3]}" if unreached
                                  else "output unchanged; no Top-K layer removed a non-zero entry")
            # the Top-K worked; the model hides it. The other checks still run: a limitation passes all of them
            damped = (f"effect: output change {change:.1e} though {len(zeroed)}/{len(removed)} Top-K layers removed "
                      "non-zero entries: the random-init model damps it (LayerScale, zero-initialised residual "
                      "branches, vanishing activations)")
        if method != "hooks" and hooks_output is not None:
            gap = _relative(output, hooks_output)
            row["fx_vs_hooks"] = f"{gap:.1e}"
            if gap > SAME:
                raise CheckFailed("fx=hooks", f"output differs from the hooks output by {gap:.1e} (relative)")
        keys = sorted(sparse.state_dict())
        if keys != dense.keys:
            extra, missing = sorted(set(keys) - set(dense.keys)), sorted(set(dense.keys) - set(keys))
            raise CheckFailed("keys", f"state_dict keys differ: extra {extra[:3]}, missing {missing[:3]}")
        try:
            grads = _grad_names(sparse, task, dense.batch)
        except Exception as err:  # noqa: BLE001
            raise CheckFailed("backward", _one_line(err)) from None
        if dense.grads - grads:
            raise CheckFailed("backward", f"no gradient reaches {sorted(dense.grads - grads)[:3]}")
        back = desparsify(sparse)
        with torch.no_grad():
            restored = task.output(back, dense.x)
        if restored.shape != dense.output.shape or _relative(restored, dense.output) > SAME:
            raise CheckFailed("desparsify", "the desparsified model's output is not the dense output")
        if damped:
            row["status"], row["cause"] = "limitation", damped
    except CheckFailed as failed:
        row["status"], row["cause"] = "fail", str(failed)
    return row


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise ``_Timeout`` in the main thread after ``seconds`` (SIGALRM; no limit where it does not exist)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_model(entry: ZooModel, methods=METHODS, *, size: int = 128, seed: int = 0, timeout: int = 600,
                max_params: int | None = None) -> list[dict]:
    """One row per method for ``entry`` (hooks checked first: the fx=hooks reference)."""
    started = time.time()
    base = {"model": entry.name, "family": entry.family, "task": entry.task}
    rows: dict[str, dict] = {}
    if max_params is not None:
        count = _parameter_count(entry)
        if count is not None and count > max_params:
            return [{**base, "params": count, "method": m, "status": "skipped",
                     "cause": f"skipped: {count / 1e6:.0f}M parameters > --max-params (memory of a shared machine)"}
                    for m in methods]
    try:
        with _time_limit(timeout):
            try:
                dense = build_dense(entry, size, seed)
            except RuntimeError as err:
                return [{**base, "method": m, "status": "limitation", "cause": f"dense: {err}"} for m in methods]
            base.update(params=sum(p.numel() for p in dense.model.parameters()), size=dense.size,
                        reinit=dense.reinit)
            hooks_output = None
            for method in sorted(methods, key=lambda m: m != "hooks"):
                rows[method] = check_method(entry, dense, method, hooks_output)
                if method == "hooks" and rows[method]["status"] != "fail":
                    hooks_output = rows[method].get("output")
    except _Timeout:
        for method in methods:
            rows.setdefault(method, {"status": "timeout", "cause": f"timeout: over {timeout} s for the model"})
    seconds = round(time.time() - started, 1)
    result = []
    for method in methods:
        row = {**base, "method": method, **rows[method], "seconds": seconds}
        row.pop("output", None)
        result.append(row)
    return result


# ----------------------------------------------------------------------------- summary

def summarize(rows: list[dict], methods) -> dict:
    """Counts per method and status, and every row that did not pass."""
    per_method = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        counts = {s: sum(r["status"] == s for r in mine) for s in STATUSES}
        checked = len(mine) - counts["skipped"]  # rates are over the models checked
        per_method[method] = {"models": len(mine), **counts,
                              "pass_rate": counts["pass"] / checked if checked else float("nan"),
                              "explained_rate": (counts["pass"] + counts["limitation"]) / checked
                              if checked else float("nan")}
    problems = [{k: r[k] for k in ("model", "method", "status", "cause")} for r in rows if r["status"] != "pass"]
    return {"per_method": per_method, "not_passed": problems}


def markdown(summary: dict, header: str) -> str:
    lines = [header, "", "| method | models | pass | limitation | fail | timeout | skipped | pass % "
             "| pass or limitation % |", "|---|---|---|---|---|---|---|---|---|"]
    for method, c in summary["per_method"].items():
        lines.append(f"| {method} | {c['models']} | {c['pass']} | {c['limitation']} | {c['fail']} | {c['timeout']} "
                     f"| {c['skipped']} | {100 * c['pass_rate']:.1f} | {100 * c['explained_rate']:.1f} |")
    if summary["not_passed"]:
        lines += ["", "| model | method | status | cause |", "|---|---|---|---|"]
        lines += [f"| `{p['model']}` | {p['method']} | {p['status']} | {p['cause'].replace('|', '/')} |"
                  for p in summary["not_passed"]]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import timm

    threads = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({threads} torch threads), "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")


# ----------------------------------------------------------------------------- command line

@dataclass(frozen=True)
class ZooConfig:
    models: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    size: int = 128
    seed: int = 0
    timeout: int = 600
    max_params: int = 150_000_000

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {list(self.methods)}: choose one or more of {list(METHODS)}")
        if not self.models:
            raise ValueError("no models to check")


def _model_names(text: str | None, subset: str, out: Path | None = None) -> list[str]:
    """The names to check; listing the whole zoo also writes it (family, model, parameters) to ``out/zoo.csv``."""
    if text is None and subset == "ci":
        return list(CI_MODELS)
    if text is None:
        zoo = timm_smallest_per_family() + torchvision_models()
        if out is not None:  # the listing is this run's first result: --resume continues from it
            write_csv(out / "zoo.csv", [{"family": e.family, "model": e.name, "params": e.params or ""}
                                        for e in zoo])
        return [e.name for e in zoo]
    path = Path(text)
    if path.is_file():
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line]
    return [name.strip() for name in text.split(",") if name.strip()]


def _read_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def main(argv=None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (timm/NAME, torchvision/NAME) or a file of "
                                         "names, one a line; default: the zoo (or --families-subset)")
    parser.add_argument("--families-subset", choices=("all", "ci"), default="all",
                        help="all: smallest model of every timm family + torchvision; ci: CI_MODELS (~20 families)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated sparsify methods")
    parser.add_argument("--size", type=positive_int, default=128, help="input side in pixels (random weights)")
    parser.add_argument("--timeout", type=positive_int, default=600, help="seconds per model (all methods)")
    parser.add_argument("--max-params", type=positive_int, default=150_000_000,
                        help="skip (status 'skipped') models with more parameters: each method holds copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/zoo_coverage"), help="folder for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace the earlier results in --out")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, skipping models done")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.models is not None and not _model_names(args.models, args.families_subset):
        raise SystemExit(f"--models {args.models!r} names no model")
    try:  # the zoo listing itself takes a minute: check the options before it
        ZooConfig(("-",), methods, args.size, args.seed, args.timeout, args.max_params)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = prepare_out(args.out, resume=args.resume, overwrite=args.overwrite)
    if args.resume and args.models is None:  # the zoo as listed when the run began (timm may have changed)
        models = load_config(out)["models"]
    else:
        models = _model_names(args.models, args.families_subset, out)
    config = ZooConfig(tuple(models), methods, args.size, args.seed, args.timeout, args.max_params)
    if args.resume:
        check_resume_config(out, config)
    else:
        save_config(out, config)

    csv_path = out / "coverage.csv"
    rows = _read_rows(csv_path)
    done = {r["model"] for r in rows}
    entries = [e for e in named_models(list(config.models)) if e.name not in done]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    progress = tqdm(entries, desc="zoo", unit="model")
    for entry in progress:
        progress.set_postfix_str(entry.name)
        rows += check_model(entry, config.methods, size=config.size, seed=config.seed, timeout=config.timeout,
                            max_params=config.max_params)
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        write_csv(tmp, rows)
        os.replace(tmp, csv_path)  # a kill never leaves a half-written table

    summary = summarize(rows, config.methods)
    command = "python benchmarks/zoo_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{command.strip()}` — {len({r['model'] for r in rows})} models, random weights, {config.size} px; "
              f"{datetime.date.today().isoformat()}; {_machine()}")
    text = markdown(summary, header)
    (out / "summary.md").write_text(text)
    write_json(out / "summary.json", {"config": dataclasses.asdict(config), "header": header, **summary})
    print(text)
    return summary


if __name__ == "__main__":
    main()
