"""One recorded forward pass: every module call with its input and output, for placement and reports."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Call:
    """One call of one module during a probe forward.

    ``start``/``end`` number the call's entry and exit in one counter, so a call nests inside another
    exactly when its span lies inside the other's; ``occurrence`` counts earlier calls of the module.
    """

    name: str
    module: nn.Module
    occurrence: int
    depth: int
    start: int
    input: object = None
    output: object = None
    end: int = -1

    def inside(self, other: "Call") -> bool:
        return other.start < self.start and self.end < other.end


def first_tensor(value):
    """The first tensor in a call's arguments or output (tuples, lists and dicts searched in order)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class eval_mode:
    """Run in eval mode (no BatchNorm statistic updates), restoring every module's own mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def run(model: nn.Module, example_input):
    """Call ``model`` on ``example_input`` (a tensor, a tuple of arguments, or a dict of keywords) in eval mode."""
    with torch.no_grad(), eval_mode(model):
        if isinstance(example_input, (tuple, list)):
            return model(*example_input)
        if isinstance(example_input, dict):
            return model(**example_input)
        return model(example_input)


def record_calls(model: nn.Module, example_input, *, skip=lambda name, module: False) -> list[Call]:
    """Every module call of one eval-mode forward, in call order, holding the tensors it saw.

    The root module and modules for which ``skip(name, module)`` is true are not recorded.
    """
    calls: list[Call] = []
    open_calls: list[Call] = []
    occurrences: dict[str, int] = {}
    clock = iter(range(1 << 62))

    def enter(name):
        def hook(module, args, kwargs):
            occurrence = occurrences.get(name, 0)
            occurrences[name] = occurrence + 1
            call = Call(name, module, occurrence, len(open_calls), next(clock),
                        first_tensor(args) if args else first_tensor(kwargs))
            calls.append(call)
            open_calls.append(call)
        return hook

    def leave(name):
        def hook(module, args, kwargs, output):
            call = open_calls.pop()
            call.output, call.end = output, next(clock)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name and not skip(name, module):
            handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(leave(name), with_kwargs=True, always_call=True))
    try:
        run(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return calls
