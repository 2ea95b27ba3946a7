"""Register sparsified models into model-vs-human (``modelvshuman``) so its ``Evaluate`` and ``Plot`` see them.

The benchmark's ``utils.load_model(name)`` resolves a name that is not a ``torchvision.models``
attribute through ``models.registry.list_models("pytorch")`` and then calls
``models.pytorch.model_zoo.<name>(name)``, which returns a ``PytorchModel`` wrapper. So a
registration is: a zoo function under that name, and the name in the registry (the benchmark's
own ``register_model`` decorator). ``modelvshuman`` is imported only when a function here needs it.

Typical use (``MODELVSHUMANDIR`` must point at a clone of the benchmark before the first import)::

    names = register_sweep("alexnet", lambda: torchvision.models.alexnet(weights="DEFAULT"), "paper",
                           ks=[0.05, 0.1, 0.2])
    from modelvshuman import Evaluate
    Evaluate()(names, ["cue-conflict"], batch_size=64, print_predictions=True, num_workers=4)
"""
from __future__ import annotations

import numbers
import os
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torchvision.models
from torch import nn

from topk_plugin import TopKSpec, sparsify
from topk_plugin.ops import MODES, check_choice, check_k

INSTALL_HINT = (
    "model-vs-human is not installed (it is not on PyPI). Install it from its repository:\n"
    "    git clone https://github.com/bethgelab/model-vs-human && pip install -e model-vs-human\n"
    "    export MODELVSHUMANDIR=$PWD/model-vs-human\n"
    "(it imports tensorflow, tensorflow-hub, seaborn, CLIP and more at import time). The built-in evaluator, "
    "recipes/shape_bias.py, computes the same shape-bias numbers without it.")

Factory = Callable[[], nn.Module]
HUMAN_COLOR = (165 / 255, 30 / 255, 55 / 255)  # the benchmark's colour for human observers


def require_modelvshuman():
    """``import modelvshuman``, or an ``ImportError`` that says how to install it."""
    try:
        import modelvshuman
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT}\n(import failed: {err})") from err
    return modelvshuman


def sweep_name(prefix: str, k, mode: str = "topk") -> str:
    """Registry name of the Top-K model at ``k``: ``alexnet_topk10`` for 0.1, ``alexnet_topk2p5`` for
    0.025, ``alexnet_top7`` for the count 7; ``alexnet_dense`` for ``k=None``. Another ``mode`` is appended
    (``alexnet_topk10_non_topk``, as the paper's ``AlexNet-topK-10-Revert``), so it never takes a Top-K run's name.

    Distinct K give distinct names (0.1 and 0.1000001 too): the percentage is written exactly, from the
    shortest decimal that round-trips the float, never rounded.
    """
    if k is None:
        return f"{prefix}_dense"
    check_k(k)
    check_choice("mode", mode, MODES)
    suffix = "" if mode == "topk" else f"_{mode}"
    if isinstance(k, numbers.Integral):
        return f"{prefix}_top{int(k)}{suffix}"
    percent = format((Decimal(repr(float(k))) * 100).normalize(), "f")
    return f"{prefix}_topk{percent.replace('.', 'p')}{suffix}"


def run_mode(spec, mode: str | None = None) -> str:
    """The mode a sweep runs: ``mode`` if given, else the one of ``spec`` (a ``TopKSpec``, a dict of its fields,
    or a list of them, all of one mode); presets and position lists run ``topk``."""
    if mode is not None:
        return mode
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    modes = {s.mode if isinstance(s, TopKSpec) else s.get("mode", "topk") if isinstance(s, Mapping) else "topk"
             for s in specs}
    if len(modes) > 1:
        raise ValueError(f"spec mixes modes {sorted(modes)}; give mode= to name the sweep's runs")
    return modes.pop()


def check_name(name: str) -> str:
    """``name`` if the benchmark can resolve it to a registered model; else ``ValueError`` saying why."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"model name {name!r} must be a Python identifier (the benchmark looks it up as "
                         "an attribute of its model zoo): letters, digits and '_'")
    if name in torchvision.models.__dict__:
        raise ValueError(f"model name {name!r} is a torchvision model; the benchmark would load torchvision's "
                         "pretrained one instead of yours. Choose another name, e.g. "
                         f"{sweep_name(name, 0.1)!r}")
    return name


def sparsified_factory(factory: Factory, spec, k=None, mode: str | None = None) -> Factory:
    """A factory of ``sparsify(factory(), spec, k=k, mode=mode)`` in eval mode; ``spec=None`` keeps it dense."""
    def build() -> nn.Module:
        model = factory()
        if spec is not None:
            model = sparsify(model, spec, k=k, mode=mode)
        return model.eval()
    return build


def register_model(name: str, factory: Factory, *, wrapper=None) -> str:
    """Register ``factory`` (built only when the benchmark loads ``name``) as the PyTorch model ``name``.

    ``wrapper(model, name, *args)`` wraps the module for the benchmark; the default is its ``PytorchModel``.
    Registering a name again replaces the model it loads.
    """
    check_name(name)
    require_modelvshuman()
    from modelvshuman.models.pytorch import model_zoo
    from modelvshuman.models.registry import list_models, register_model as mvh_register
    if wrapper is None:
        from modelvshuman.models.wrappers.pytorch import PytorchModel as wrapper

    def entry(model_name, *args):
        return wrapper(factory(), model_name, *args)

    entry.__name__ = entry.__qualname__ = name  # the benchmark's decorator registers fn.__name__
    entry.__doc__ = f"{name}: registered by topk_plugin"
    if name not in list_models("pytorch"):
        mvh_register("pytorch")(entry)
    setattr(model_zoo, name, entry)
    return name


def register_sweep(prefix: str, factory: Factory, spec, ks: Iterable, *, mode: str | None = None,
                   dense: bool = True, wrapper=None) -> list[str]:
    """Register ``prefix_dense`` (if ``dense``) and one sparsified model per K; returns the names in order.

    ``spec`` is anything ``sparsify`` accepts (``"paper"``, module names, a ``TopKSpec``).
    """
    ks = list(ks)
    if not ks and not dense:
        raise ValueError("register_sweep needs at least one k, or dense=True")
    names = []
    if dense:
        names.append(register_model(sweep_name(prefix, None), sparsified_factory(factory, None), wrapper=wrapper))
    for k in ks:
        names.append(register_model(sweep_name(prefix, k, run_mode(spec, mode)),
                                    sparsified_factory(factory, spec, k, mode), wrapper=wrapper))
    return names


def plotting_definition(names: Sequence[str], labels: Sequence[str] | None = None, humans: bool = True):
    """A ``plotting_definition`` for the benchmark's ``Plot``: ``names`` along viridis, humans in red."""
    require_modelvshuman()
    from matplotlib import colormaps
    from modelvshuman.plotting.decision_makers import DecisionMaker

    labels = list(labels or names)
    if len(labels) != len(names):
        raise ValueError(f"{len(labels)} labels for {len(names)} names")
    ramp = colormaps["viridis"]

    def definition(df):
        makers = [DecisionMaker(name_pattern=n, df=df, color=ramp(i / max(1, len(names) - 1))[:3], marker="o",
                                plotting_name=label) for i, (n, label) in enumerate(zip(names, labels))]
        if humans:
            makers.append(DecisionMaker(name_pattern="subject-*", df=df, color=HUMAN_COLOR,
                                        marker="D", plotting_name="humans"))
        return makers
    return definition


def link_datasets(texture_shape: str | Path, home: str | Path | None = None,
                  names: Sequence[str] = ("cue-conflict", "edge", "silhouette")) -> Path:
    """Symlink local stimuli into ``<home>/datasets/<name>`` so the benchmark uses them instead of downloading.

    ``home`` defaults to ``$MODELVSHUMANDIR``; existing folders there are left alone.
    """
    home = os.environ.get("MODELVSHUMANDIR", "") if home is None else home
    if not str(home):  # Path("") is the current folder: never link there by accident
        raise ValueError("no model-vs-human home: MODELVSHUMANDIR is not set and home= is empty; pass home= or "
                         "set MODELVSHUMANDIR to your clone of the benchmark")
    home = Path(home)
    if not home.is_dir():
        raise ValueError(f"model-vs-human home {str(home)!r} is not a folder; pass home= or set MODELVSHUMANDIR "
                         "to your clone of the benchmark")
    target = home / "datasets"
    target.mkdir(exist_ok=True)
    for name in names:
        source = Path(texture_shape) / name
        if not source.is_dir():
            raise FileNotFoundError(f"no {name!r} stimuli at {source}")
        link = target / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return target
