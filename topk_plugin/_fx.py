"""``method="fx"``: Top-K inserted into a ``torch.fx`` graph of the model.

Tracing: Top-K is added while tracing, at each call of a target module (on its output, or on its first
tensor argument), so a target that contains another target is traced through and both get Top-K. Modules
and functions in timm's no-trace registries or in this library's (``register_notrace_module`` /
``register_notrace_function``) stay opaque. ``forward`` arguments with a plain default (``None``, a
bool, number or string: ``mask=None``, ``is_causal=False``) are fixed to it, and fx inserts a check that
refuses another value at call time, instead of tracing an optional input as a tensor that is never given.

The module: a ``SparsifiedGraphModule`` whose children *are* the model's children (shared, in their
order), so parameter and buffer order, ``state_dict`` keys, indexing (``S.features[0]``) and edits (a new
head) are the model's. Tensor constants of the trace are non-persistent buffers, outside the
``state_dict``. Replacing a module whose forward the graph inlined is refused at the next call.
"""
from __future__ import annotations

import copy
import inspect
import sys
from collections import OrderedDict
from typing import Callable

import torch
from torch import fx, nn

from .layers import TopK
from .selectors import CONTAINER, Target

_NOTRACE_MODULES: list[type] = []
_NOTRACE_FUNCTIONS: list[Callable] = []


def register_notrace_module(cls: type) -> type:
    """Keep modules of class ``cls`` opaque to ``torch.fx`` (called as one unit, not traced into).

    Usable as a class decorator; a Top-K position inside such a module is reached by hooks only.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_notrace_module takes an nn.Module subclass, not {cls!r}")
    if cls not in _NOTRACE_MODULES:
        _NOTRACE_MODULES.append(cls)
    return cls


def register_notrace_function(fn: Callable) -> Callable:
    """Keep calls of the module-level function ``fn`` opaque to ``torch.fx``; usable as a decorator."""
    if not inspect.isfunction(fn):
        raise ValueError(f"register_notrace_function takes a plain module-level function, not {fn!r}")
    if fn not in _NOTRACE_FUNCTIONS:
        _NOTRACE_FUNCTIONS.append(fn)
    return fn


class TraceFailure(RuntimeError):
    """Tracing cannot express this sparsification; ``method="auto"`` falls back to hooks."""


def _notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    timm_modules, timm_functions = [], []
    if "timm" in sys.modules:  # no timm model can exist before timm is imported: never import it here (~2 s)
        from timm.layers import get_notrace_functions, get_notrace_modules

        timm_modules, timm_functions = list(get_notrace_modules()), list(get_notrace_functions())
    return tuple(timm_modules + _NOTRACE_MODULES), tuple(timm_functions + _NOTRACE_FUNCTIONS)


class _Tracer(fx.Tracer):
    """Adds a Top-K call at every call of a target module; records the modules it traces through."""

    def __init__(self, targets: list[Target]):
        self.notrace_modules, functions = _notrace()
        super().__init__(autowrap_functions=functions)
        self.layers: dict[tuple[str, str], str] = {(t.module, t.side): f"{CONTAINER}.{t.key}" for t in targets}
        names = {t.module for t in targets}
        # A target is a leaf unless another target lies inside it (then both must be visible).
        self.leaves = {n for n in names if not any(o.startswith(n + ".") for o in names)}
        self.reached: set[str] = set()
        self.opaque: set[str] = set()  # reached modules called as one unit (their insides are not traced)
        self.traced_through: dict[str, nn.Module] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, (TopK, *self.notrace_modules))
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward, args, kwargs):
        name = self.path_of_module(m)
        before, after = self.layers.get((name, "before")), self.layers.get((name, "after"))
        if before is not None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(first, fx.Proxy):
                raise TraceFailure(f"position 'before:{name}': the module's first argument is not a traced tensor")
            new = self.create_proxy("call_module", before, (first,), {})
            args = tuple(new if a is first else a for a in args)
            kwargs = {key: new if v is first else v for key, v in kwargs.items()}
        if self.is_leaf_module(m, name):
            self.opaque.add(name)
        else:
            self.traced_through[name] = m
        out = super().call_module(m, forward, args, kwargs)
        if after is not None:
            out = self.create_proxy("call_module", after, (out,), {})
        self.reached.add(name)
        return out


def _plain_defaults(model: nn.Module) -> dict:
    """``forward`` arguments whose default is None, a bool, a number or a string: fixed to it for tracing."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(model.forward).parameters.values()
    return {p.name: p.default for p in parameters
            if p.kind in kinds and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def _trace(model: nn.Module, targets: list[Target], training: bool) -> _Tracer:
    """The tracer after tracing ``model`` with every module in mode ``training`` (restored after)."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    tracer = _Tracer(targets)
    try:
        tracer.trace(model, concrete_args=_plain_defaults(model) or None)  # sets tracer.graph
    except TraceFailure:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing error means "use hooks"
        raise TraceFailure(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    return tracer


def _check_reached(targets: list[Target], tracers: list[_Tracer]) -> None:
    """Every position is called in one of the modes' traces. One inside a module traced as one unit may be
    called there (hooks will tell: ``TraceFailure``); one inside none is never called by forward (``ValueError``:
    hooks would silently never run it)."""
    reached = set().union(*(t.reached for t in tracers))
    opaque = set().union(*(t.opaque for t in tracers))
    missing = sorted({t.module for t in targets} - reached)
    never = [name for name in missing if not any(name.startswith(o + ".") for o in opaque)]
    if never:
        raise ValueError(f"positions {never} are never called in forward (in train or eval mode), so Top-K there "
                         "would never run; list_positions(model, x) shows the modules forward calls. If forward "
                         "calls them only inside a function fx does not trace, or only for an argument value "
                         "other than its default, use method='hooks'")
    if missing:
        raise TraceFailure(f"positions {missing} are called inside modules fx does not trace into")


class SparsifiedGraphModule(fx.GraphModule):
    """A ``GraphModule`` with Top-K calls inserted, whose submodules are the original model's own.

    When the model's Python control flow depends on ``self.training`` it holds one graph per mode
    and switches on ``train()``/``eval()``. Methods of the original class (e.g. timm's
    ``forward_features``) are not available here; plain attributes (``num_classes``...) are.
    """

    def train(self, mode: bool = True):
        super().train(mode)
        self._follow_mode()
        return self

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self._follow_mode()  # also when the flag was set without train(), as reports restore it
            self._check_inlined_modules()
        return super().__call__(*args, **kwargs)

    def _follow_mode(self) -> None:
        """Run the graph traced in the current mode (when the two modes' graphs differ)."""
        graphs = self.__dict__.get("_topk_graphs")
        if graphs is not None and self.graph is not graphs[self.training]:
            self.graph = graphs[self.training]

    def _check_inlined_modules(self) -> None:
        for owner, key, name, module in self.__dict__["_topk_inlined"]:
            if owner._modules.get(key) is not module:
                raise RuntimeError(
                    f"{name!r} was replaced after sparsify, but the graph inlines the forward of the module it "
                    "replaced, so the new one would be ignored. desparsify(model) gives the dense model with "
                    "your change; sparsify that again")

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
        state = (dense_model(self), getattr(self, CONTAINER), self.__dict__["_topk_targets"])
        return build(*copy.deepcopy(state, memo), training=self.training)

    def __reduce__(self):
        return (_rebuild, (dense_model(self), getattr(self, CONTAINER), self.__dict__["_topk_targets"],
                           self.training))


def _rebuild(original, layers, targets, training):
    return build(original, layers, targets, training=training)


def _resolve(root: nn.Module, qualname: str) -> nn.Module:
    for part in filter(None, qualname.split(".")):
        root = root._modules[part]
    return root


def build(original: nn.Module, layers: nn.ModuleDict, targets: list[Target],
          training: bool | None = None) -> SparsifiedGraphModule:
    """Trace ``original`` (both modes) with ``layers`` inserted; ``TraceFailure`` when fx cannot."""
    training = original.training if training is None else training
    before = set(original.__dict__)
    modes = {m: m.training for m in original.modules()}
    try:
        tracers = {mode: _trace(original, targets, mode) for mode in (True, False)}
    finally:
        constants = {name: original.__dict__.pop(name) for name in set(original.__dict__) - before}
    _check_reached(targets, list(tracers.values()))
    graphs = {mode: tracer.graph for mode, tracer in tracers.items()}
    # GraphModule copies what the graph names from its root; give it stand-ins, then the real children.
    stand_ins = {node.target: nn.Module() if node.op == "call_module" else torch.empty(0)
                 for graph in graphs.values() for node in graph.nodes if node.op in ("call_module", "get_attr")}
    gm = SparsifiedGraphModule(stand_ins, graphs[training], class_name=type(original).__name__)
    gm._modules = OrderedDict(original._modules)
    gm._modules[CONTAINER] = layers
    gm._parameters = OrderedDict(original._parameters)
    gm._buffers = OrderedDict(original._buffers)
    gm._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    for name, tensor in constants.items():
        gm.register_buffer(name, tensor, persistent=False)
    inlined = {name: module for tracer in tracers.values() for name, module in tracer.traced_through.items()}
    gm.__dict__["_topk_inlined"] = [
        (_resolve(gm, name.rpartition(".")[0]), name.rpartition(".")[2], name, module) for name, module in inlined.items()]
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    gm.__dict__["_topk_graphs"] = None if same else graphs
    gm.__dict__["_topk_original"] = original
    gm.__dict__["_topk_targets"] = targets
    gm.__dict__["_topk_constants"] = set(constants)
    gm.train(training)
    for module, mode in modes.items():  # each submodule keeps its own mode (frozen BatchNorm in a training model)
        if module is not original:
            module.training = mode
    return gm


def dense_model(gm: SparsifiedGraphModule) -> nn.Module:
    """The original model, given the graph module's current children, parameters and buffers."""
    original, constants = gm.__dict__["_topk_original"], gm.__dict__["_topk_constants"]
    original._modules = OrderedDict((k, v) for k, v in gm._modules.items() if k != CONTAINER)
    original._parameters = OrderedDict(gm._parameters)
    original._buffers = OrderedDict((k, v) for k, v in gm._buffers.items() if k not in constants)
    original._non_persistent_buffers_set = gm._non_persistent_buffers_set - constants
    original.training = gm.training
    return original
