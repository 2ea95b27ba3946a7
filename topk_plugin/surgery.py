"""The public API: ``sparsify`` / ``desparsify`` / ``set_k`` / ``topk_layers``.

``sparsify`` inserts ``TopK`` layers by ``torch.fx`` rewriting (``_fx``) or by forward hooks (``_hooks``).
Both keep every original module name and parameter, so a sparsified model's ``state_dict`` loads into the
dense model and vice versa. The inserted layers hold no state; ``model.topk_layers`` holds them (an
``nn.ModuleDict`` whose keys are positions with dots as underscores).
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

from torch import nn

from . import _fx, _hooks
from .layers import TopK
from .ops import check_k
from .parse import as_specs
from .placement import model_prefix_tokens, per_stage
from .selectors import CONTAINER, Position, Selector, Target, resolve_targets
from .spec import TopKSpec

METHODS = ("auto", "fx", "hooks")


def _build_layers(model: nn.Module, specs: list[TopKSpec]) -> tuple[nn.ModuleDict, list[Target]]:
    layers, targets = nn.ModuleDict(), []
    for spec in specs:
        prefix = spec.num_prefix_tokens if spec.num_prefix_tokens is not None else (
            model_prefix_tokens(model) if spec.kind == "token" else 0)
        for target in resolve_targets(model, spec.positions):
            if target.key in layers:
                raise ValueError(f"position {str(target)!r} is selected by more than one spec")
            layers[target.key] = TopK(spec.k, spec.mode, spec.kind, spec.ties, prefix, str(target))
            targets.append(target)
    return layers, targets


def is_sparsified(model: nn.Module) -> bool:
    return isinstance(getattr(model, CONTAINER, None), nn.ModuleDict)


def sparsify(model: nn.Module, spec, *, k=None, mode: str | None = None, method: str = "auto",
             inplace: bool = False, example_input=None, input_size=None) -> nn.Module:
    """Insert Top-K layers into ``model`` as ``spec`` says.

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own).
        spec: a preset name (``"paper"``), the computed placement ``"stage-ends"`` (any model), a module
            name or list of positions, a dict of ``TopKSpec`` fields, a ``TopKSpec``, or a list of
            ``TopKSpec``. A name that is both a preset and a module is refused: write ``"preset:NAME"``
            or ``"after:NAME"``. ``parse_spec`` reads the same from a string.
        k: override the spec's ``k``: one value, or a sequence with one per ``TopKSpec`` (one per stage
            for ``"stage-ends"``).
        mode: override the spec's ``mode``.
        method: ``"fx"`` (graph rewrite), ``"hooks"`` (forward hooks), or ``"auto"``: fx, falling back
            to hooks with a warning when the model cannot be traced.
        inplace: hooks: modify and return ``model``. fx: skip the defensive copy; the returned
            ``GraphModule`` then shares every submodule and parameter with ``model``.
        example_input, input_size: the probe input of ``"stage-ends"`` (a tensor, a tuple of arguments, a
            dict of keywords) or its (C, H, W); default: the model's own input size, else 3x224x224.

    Returns:
        The sparsified model; ``desparsify`` gives back the dense one.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {list(METHODS)}")
    if is_sparsified(model):
        raise ValueError("model is already sparsified; call desparsify first, or pass every placement "
                         "in one call (a list of TopKSpec)")
    specs = as_specs(model, spec, example_input=example_input, input_size=input_size)
    ks = per_stage(k, [", ".join(map(str, s.positions)) for s in specs])
    specs = [s.replace(k=kk, mode=mode) for s, kk in zip(specs, ks)]
    layers, targets = _build_layers(model, specs)
    if not inplace:
        model = copy.deepcopy(model)
    if method in ("auto", "fx"):
        try:
            return _fx.build(model, layers, targets)
        except _fx.TraceFailure as failure:
            if method == "fx":
                raise RuntimeError(f"{failure}; use method='hooks'") from failure
            warnings.warn(f"sparsify: {failure}; using forward hooks instead", stacklevel=2)
    return _hooks.attach(model, layers, targets)


def _require_sparsified(model: nn.Module) -> None:
    if not is_sparsified(model):
        raise ValueError(f"{type(model).__name__} is not sparsified (it has no {CONTAINER!r})")


def desparsify(model: nn.Module) -> nn.Module:
    """The dense model back, with the sparsified model's current modules, parameters and buffers."""
    _require_sparsified(model)
    if isinstance(model, _fx.SparsifiedGraphModule):
        return _fx.dense_model(model)
    return _hooks.detach(model)


def topk_layers(model: nn.Module) -> dict[str, TopK]:
    """The Top-K layers of a sparsified model, by position (``"features.2"``, ``"before:blocks.0.attn"``)."""
    _require_sparsified(model)
    return {layer.position: layer for layer in getattr(model, CONTAINER).values()}


def select_layers(model: nn.Module, positions: Sequence[Position] | Position) -> dict[str, TopK]:
    """The Top-K layers whose position a selector of ``positions`` matches (the language of ``sparsify``).

    An empty list, or a selector that matches no Top-K layer, raises ``ValueError``.
    """
    layers = topk_layers(model)
    entries = [positions] if isinstance(positions, (str, type)) else list(positions)
    if not entries:
        raise ValueError(f"positions is empty; the Top-K layers are {list(layers)}")
    modules = dict(model.named_modules())
    chosen: dict[str, TopK] = {}
    for entry in entries:
        selector = Selector.parse(entry)
        hits = {p: layer for p, layer in layers.items()
                if Target.parse(p).side == selector.side
                and selector.matches(Target.parse(p).module, modules[Target.parse(p).module])}
        if not hits:
            raise ValueError(f"position {entry!r} matches no Top-K layer; the layers are {list(layers)}")
        chosen.update(hits)
    return {p: layer for p, layer in layers.items() if p in chosen}


def set_k(model: nn.Module, k, *, positions: Sequence[Position] | Position | None = None) -> nn.Module:
    """Set ``k`` on every Top-K layer of ``model``, or on those ``positions`` selects (see ``select_layers``)."""
    check_k(k)
    layers = topk_layers(model) if positions is None else select_layers(model, positions)
    for layer in layers.values():
        layer.k = k
    return model
