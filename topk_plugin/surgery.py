"""``sparsify``: insert ``TopK`` layers into a model by ``torch.fx`` rewriting, or by forward hooks.

Both methods keep every original module name and parameter, so a sparsified model's ``state_dict``
loads into the dense model and vice versa. The inserted layers live in a ``topk_layers`` container
(``ModuleDict``, keys are positions with dots as underscores) and hold no state.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from .layers import TopK
from .presets import get_preset, preset_names
from .spec import Target, TopKSpec, position_matches, resolve_targets

CONTAINER = "topk_layers"
METHODS = ("auto", "fx", "hooks")


class Table(list):
    """Rows (dicts) that print as an aligned text table."""

    def __str__(self) -> str:
        if not self:
            return "(empty)"
        columns = list(self[0])
        cells = [[_fmt(row.get(c, "")) for c in columns] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


# ----------------------------------------------------------------------------- spec handling

def _as_specs(model: nn.Module, spec) -> list[TopKSpec]:
    if isinstance(spec, TopKSpec):
        return [spec]
    if isinstance(spec, str) and spec in preset_names():
        return [get_preset(spec, model).spec]
    if isinstance(spec, dict):
        return [TopKSpec(**spec)]
    if isinstance(spec, (str, type)):
        return [TopKSpec([spec])]
    if isinstance(spec, Sequence) and spec and all(isinstance(s, TopKSpec) for s in spec):
        return list(spec)
    if isinstance(spec, Sequence) and all(isinstance(s, (str, type)) for s in spec):
        return [TopKSpec(list(spec))]
    raise ValueError(f"spec={spec!r} is not understood; pass a preset name {preset_names()}, module names, "
                     "a dict of TopKSpec fields, a TopKSpec or a list of TopKSpec")


def _model_prefix_tokens(model: nn.Module) -> int:
    count = getattr(model, "num_prefix_tokens", None)  # timm
    if isinstance(count, int):
        return count
    return 1 if isinstance(getattr(model, "class_token", None), torch.Tensor) else 0  # torchvision ViT


def _build_layers(model: nn.Module, specs: list[TopKSpec]) -> tuple[nn.ModuleDict, list[Target]]:
    container, targets = nn.ModuleDict(), []
    for spec in specs:
        prefix = spec.num_prefix_tokens if spec.num_prefix_tokens is not None else (
            _model_prefix_tokens(model) if spec.kind == "token" else 0)
        for target in resolve_targets(model, spec.positions):
            if target.key in container:
                raise ValueError(f"position {str(target)!r} is selected by more than one spec")
            container[target.key] = TopK(spec.k, spec.mode, spec.kind, spec.ties, prefix, str(target))
            targets.append(target)
    return container, targets


# ----------------------------------------------------------------------------- hooks

class _OutputHook:
    def __init__(self, layer: TopK):
        self.layer = layer

    def __call__(self, module, args, output):
        return self.layer(output)


class _InputHook:
    def __init__(self, layer: TopK):
        self.layer = layer

    def __call__(self, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        new = self.layer(first)
        return (tuple(new if a is first else a for a in args),
                {key: new if v is first else v for key, v in kwargs.items()})


def _sparsify_hooks(model: nn.Module, container: nn.ModuleDict, targets: list[Target]) -> nn.Module:
    modules = dict(model.named_modules())
    model.add_module(CONTAINER, container)
    for target in targets:
        layer = container[target.key]
        if target.side == "after":
            modules[target.module].register_forward_hook(_OutputHook(layer))
        else:
            modules[target.module].register_forward_pre_hook(_InputHook(layer), with_kwargs=True)
    return model


def _remove_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook_id in [i for i, h in hooks.items() if isinstance(h, (_OutputHook, _InputHook))]:
                del hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                module._forward_hooks_with_kwargs.pop(hook_id, None)


# ----------------------------------------------------------------------------- torch.fx

class _TraceFailure(RuntimeError):
    """Tracing cannot express this sparsification; ``method="auto"`` falls back to hooks."""


def _timm_notrace() -> tuple[tuple[type, ...], list]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), []
    return tuple(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        self.notrace_modules, autowrap = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, (TopK, *self.notrace_modules))
                or super().is_leaf_module(m, qualname))


def _trace(model: nn.Module, targets: list[Target], training: bool) -> fx.Graph:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        graph = _Tracer({t.module for t in targets}).trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing error means "use hooks"
        raise _TraceFailure(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    _insert_layers(graph, targets)
    return graph


def _insert_layers(graph: fx.Graph, targets: list[Target]) -> None:
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.module, []).append(t)
    reached = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in by_module:
            continue
        for target in by_module[node.target]:
            reached.add(target)
            layer = f"{CONTAINER}.{target.key}"
            if target.side == "after":
                with graph.inserting_after(node):
                    new = graph.call_module(layer, (node,))
                node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
                continue
            first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if not isinstance(first, fx.Node):
                raise _TraceFailure(f"position {str(target)!r}: the module's first argument is not a traced tensor")
            with graph.inserting_before(node):
                new = graph.call_module(layer, (first,))
            node.args = tuple(new if a is first else a for a in node.args)
            node.kwargs = {key: new if v is first else v for key, v in node.kwargs.items()}
    missing = [str(t) for t in targets if t not in reached]
    if missing:
        raise _TraceFailure(f"positions {missing} are never called as modules in the traced graph "
                            "(called inside another traced unit, or not called in forward)")
    graph.lint()


def _resolve_attr(root: nn.Module, qualname: str):
    obj = root
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _attach(root: nn.Module, qualname: str, value, persistent: bool = True) -> None:
    """Set ``value`` at dotted ``qualname`` under ``root``, creating plain containers on the way."""
    *path, leaf = qualname.split(".")
    owner = root
    for part in path:
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value, persistent=persistent)
    else:
        owner.add_module(leaf, value)


def _tensor_slots(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """(qualified name, tensor, persistent) for every parameter and buffer, shared ones included."""
    for name, owner in module.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for pname, p in owner._parameters.items():
            if p is not None:
                yield prefix + pname, p, True
        for bname, b in owner._buffers.items():
            if b is not None:
                yield prefix + bname, b, bname not in owner._non_persistent_buffers_set


class SparsifiedGraphModule(fx.GraphModule):
    """A ``GraphModule`` with Top-K calls inserted, that remembers the model it was made from.

    When the model's Python control flow depends on ``self.training`` it holds one graph per mode
    and switches on ``train()``/``eval()``. Methods of the original class (e.g. timm's
    ``forward_features``) are not available here; plain attributes (``num_classes``...) are.
    """

    def train(self, mode: bool = True):
        graphs = self.__dict__.get("_topk_graphs")
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]
        return super().train(mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_topk_original")
            value = getattr(original, name, None) if original is not None else None
            if value is None or callable(value):
                hint = (" (a method of the original class; sparsify with method='hooks' to keep it)"
                        if callable(value) else "")
                raise AttributeError(f"{type(self).__name__} has no attribute {name!r}{hint}") from None
            return value

    def __deepcopy__(self, memo):
        state = (self._topk_original, getattr(self, CONTAINER), self._topk_targets)
        return _build_graph_module(*copy.deepcopy(state, memo), training=self.training)

    def __reduce__(self):
        return (_rebuild_graph_module,
                (self._topk_original, getattr(self, CONTAINER), self._topk_targets, self.training))


def _rebuild_graph_module(original, container, targets, training):
    return _build_graph_module(original, container, targets, training=training)


def _build_graph_module(original: nn.Module, container: nn.ModuleDict, targets: list[Target],
                        training: bool | None = None) -> SparsifiedGraphModule:
    training = original.training if training is None else training
    graphs = {mode: _trace(original, targets, mode) for mode in (True, False)}
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    original.add_module(CONTAINER, container)
    try:
        gm = SparsifiedGraphModule(original, graphs[training], class_name=type(original).__name__)
        for node in graphs[not training].nodes:  # attributes used only by the other mode's graph
            if node.op in ("call_module", "get_attr") and _resolve_attr(gm, node.target) is None:
                _attach(gm, node.target, _resolve_attr(original, node.target))
    finally:
        delattr(original, CONTAINER)
    gm.add_module(CONTAINER, container)  # fx rebuilt it as a plain Module; keep the ModuleDict
    # Keep the state_dict identical: add tensors no node references, restore buffers' persistence.
    for name, tensor, persistent in _tensor_slots(original):
        if _resolve_attr(gm, name) is None:
            _attach(gm, name, tensor, persistent)
        elif not persistent:
            owner_name, _, leaf = name.rpartition(".")
            owner = _resolve_attr(gm, owner_name) if owner_name else gm
            owner._non_persistent_buffers_set.add(leaf)
    expected = set(original.state_dict())
    got = set(gm.state_dict())
    if expected != got:
        raise _TraceFailure(f"the traced module's state_dict keys differ: missing {sorted(expected - got)[:5]}, "
                            f"extra {sorted(got - expected)[:5]}")
    gm.__dict__["_topk_graphs"] = None if same else graphs
    gm.__dict__["_topk_original"] = original
    gm.__dict__["_topk_targets"] = targets
    gm.train(training)
    return gm


# ----------------------------------------------------------------------------- public API

def is_sparsified(model: nn.Module) -> bool:
    return isinstance(getattr(model, CONTAINER, None), nn.ModuleDict)


def sparsify(model: nn.Module, spec, *, k=None, mode: str | None = None, method: str = "auto",
             inplace: bool = False) -> nn.Module:
    """Insert Top-K layers into ``model`` as ``spec`` says.

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own).
        spec: a preset name (``"paper"``), a module name or list of positions, a dict of ``TopKSpec``
            fields, a ``TopKSpec``, or a list of ``TopKSpec``.
        k, mode: override the spec's ``k`` / ``mode`` (for every spec in a list).
        method: ``"fx"`` (graph rewrite), ``"hooks"`` (forward hooks), or ``"auto"``: fx, falling back
            to hooks with a warning when the model cannot be traced.
        inplace: hooks: modify and return ``model``. fx: skip the defensive copy; the returned
            ``GraphModule`` then shares every submodule and parameter with ``model``.

    Returns:
        The sparsified model; ``desparsify`` gives back the dense one.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {list(METHODS)}")
    if is_sparsified(model):
        raise ValueError("model is already sparsified; call desparsify first, or pass every placement "
                         "in one call (a list of TopKSpec)")
    specs = [s.replace(k=k, mode=mode) for s in _as_specs(model, spec)]
    container, targets = _build_layers(model, specs)
    if not inplace:
        model = copy.deepcopy(model)
    if method in ("auto", "fx"):
        try:
            return _build_graph_module(model, container, targets)
        except _TraceFailure as failure:
            if method == "fx":
                raise RuntimeError(f"{failure}; use method='hooks'") from failure
            warnings.warn(f"sparsify: {failure}; using forward hooks instead", stacklevel=2)
    return _sparsify_hooks(model, container, targets)


def desparsify(model: nn.Module) -> nn.Module:
    """The dense model back, with the sparsified model's current parameters and buffers."""
    if not is_sparsified(model):
        raise ValueError(f"{type(model).__name__} is not sparsified (it has no {CONTAINER!r})")
    if isinstance(model, SparsifiedGraphModule):
        original = model._topk_original
        current = {name: t for name, t, _ in _tensor_slots(model)}
        for name, tensor, persistent in _tensor_slots(original):
            if name in current and current[name] is not tensor:
                _attach(original, name, current[name], persistent)
        return original.train(model.training)
    _remove_hooks(model)
    delattr(model, CONTAINER)
    return model


def topk_layers(model: nn.Module) -> dict[str, TopK]:
    """The Top-K layers of a sparsified model, by position (``"features.2"``, ``"before:blocks.0.attn"``)."""
    if not is_sparsified(model):
        raise ValueError(f"{type(model).__name__} is not sparsified (it has no {CONTAINER!r})")
    return {layer.position: layer for layer in getattr(model, CONTAINER).values()}


def set_k(model: nn.Module, k, *, positions: Sequence[str] | str | None = None) -> nn.Module:
    """Set ``k`` on every Top-K layer of ``model``, or on those whose position matches ``positions``."""
    layers = topk_layers(model)
    if positions is not None:
        patterns = [positions] if isinstance(positions, str) else list(positions)
        for pattern in patterns:
            if not any(position_matches(pattern, p) for p in layers):
                raise ValueError(f"position {pattern!r} matches no Top-K layer; the layers are {list(layers)}")
        layers = {p: l for p, l in layers.items() if any(position_matches(pat, p) for pat in patterns)}
    for layer in layers.values():
        layer.k = k
    return model


class _eval_mode:
    """Run in eval mode (no BatchNorm statistic updates), restoring every module's own mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def _run(model: nn.Module, example_input) -> None:
    with torch.no_grad(), _eval_mode(model):
        if isinstance(example_input, (tuple, list)):
            model(*example_input)
        elif isinstance(example_input, dict):
            model(**example_input)
        else:
            model(example_input)


def list_positions(model: nn.Module, example_input) -> Table:
    """Every module a forward pass calls, in call order, with its input and output shapes."""
    rows: dict[str, dict] = {}

    def shape(value):
        return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__

    def enter(name):  # a pre-hook, so that parents come before their children
        def hook(module, args):
            row = rows.setdefault(name, {"position": name, "type": type(module).__name__, "calls": 0,
                                         "input": shape(args[0]) if args else "-", "output": "-"})
            row["calls"] += 1
        return hook

    def leave(name):
        def hook(module, args, output):
            rows[name]["output"] = shape(output)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, TopK) and name != CONTAINER:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name))]
    try:
        _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return Table(rows.values())


def sparsity_report(model: nn.Module, example_input) -> Table:
    """Measured fraction of entries each Top-K layer keeps, and non-zero fractions in and out."""
    layers = topk_layers(model)
    for layer in layers.values():
        layer.measure, layer.stats = True, {}
    try:
        _run(model, example_input)
    finally:
        for layer in layers.values():
            layer.measure = False
    rows = Table()
    for position, layer in layers.items():
        s = layer.stats
        rows.append({"position": position, "kind": layer.kind, "mode": layer.mode, "k": layer.k,
                     "shape": s.get("shape", "not reached"), "count": s.get("count", "-"),
                     "kept": s.get("kept", float("nan")), "nonzero_in": s.get("nonzero_in", float("nan")),
                     "nonzero_out": s.get("nonzero_out", float("nan"))})
    return rows
