"""What a forward pass does: ``list_positions`` (every module call) and ``sparsity_report`` (every Top-K call)."""
from __future__ import annotations

import torch
from torch import nn

from ._probe import record_calls, run
from .layers import TopK
from .selectors import CONTAINER
from .surgery import topk_layers
from .table import Table


def _shape(value) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def list_positions(model: nn.Module, example_input) -> Table:
    """Every module call of one eval-mode forward, in call order (parents before their children), one row
    per call (``call`` counts a module's earlier calls), with its first input's and its output's shape."""
    calls = record_calls(model, example_input,
                         skip=lambda name, module: isinstance(module, TopK) or name == CONTAINER)
    return Table({"position": c.name, "call": c.occurrence, "type": type(c.module).__name__,
                  "input": _shape(c.input) if c.input is not None else "-", "output": _shape(c.output)}
                 for c in calls)


def sparsity_report(model: nn.Module, example_input) -> Table:
    """Measured fraction of entries each Top-K layer keeps, and non-zero fractions in and out, one row per
    call of each layer (``call`` 0, 1, ... for a module called several times per forward); a layer the
    forward never reached has one row with shape ``"not reached"``."""
    layers = topk_layers(model)
    for layer in layers.values():
        layer.measure, layer.stats = True, []
    try:
        run(model, example_input)
    finally:
        for layer in layers.values():
            layer.measure = False
    missing = {"shape": "not reached", "count": "-", "kept": float("nan"), "nonzero_in": float("nan"),
               "nonzero_out": float("nan")}
    rows = Table()
    for position, layer in layers.items():
        for call, stats in enumerate(layer.stats or [missing]):
            rows.append({"position": position, "call": call, "kind": layer.kind, "mode": layer.mode, "k": layer.k,
                         "shape": stats["shape"], "count": stats["count"], "kept": stats["kept"],
                         "nonzero_in": stats["nonzero_in"], "nonzero_out": stats["nonzero_out"]})
    return rows
