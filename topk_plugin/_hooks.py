"""``method="hooks"``: Top-K by forward hooks (output) and forward pre-hooks (input) on the target modules.

The layers are reachable as ``model.topk_layers`` but are not a child module: a model whose forward calls
its children in turn (``nn.Sequential``, torchvision's ``vgg16().features``) would otherwise call the
container too. They hold no state, so ``.to()``, ``state_dict`` and ``train()`` have nothing to reach.
The hook handles are kept, so ``detach`` removes exactly the hooks ``attach`` added. Hooks cannot know
beforehand whether forward calls a module (``nn.MultiheadAttention`` uses its ``out_proj`` weights without
calling it): after the model's first forward, positions whose Top-K never ran are named in a warning.
"""
from __future__ import annotations

import warnings

from torch import nn

from .layers import TopK
from .selectors import CONTAINER, Target

_HANDLES = "_topk_hook_handles"


class _OutputHook:
    def __init__(self, layer: TopK):
        self.layer = layer
        self.called = False

    def __call__(self, module, args, output):
        self.called = True
        return self.layer(output)


class _InputHook:
    def __init__(self, layer: TopK):
        self.layer = layer
        self.called = False

    def __call__(self, module, args, kwargs):
        self.called = True
        first = args[0] if args else next(iter(kwargs.values()), None)
        new = self.layer(first)
        return (tuple(new if a is first else a for a in args),
                {key: new if v is first else v for key, v in kwargs.items()})


class _FirstForwardCheck:
    """A forward hook of the model: after its first forward, warn about the Top-K hooks that never ran."""

    def __init__(self, hooks: list):
        self.hooks = hooks
        self.done = False

    def __call__(self, module, args, output):
        if not self.done:
            self.done = True
            never = [hook.layer.position for hook in self.hooks if not hook.called]
            if never:
                warnings.warn(f"sparsify: positions {never} were not called in the model's first forward, so their "
                              "Top-K did not run (a module forward never calls, or uses only in the other "
                              "train/eval mode); list_positions(model, x) shows the modules forward calls",
                              stacklevel=2)


def attach(model: nn.Module, layers: nn.ModuleDict, targets: list[Target]) -> nn.Module:
    """Hook ``layers[target.key]`` onto every target of ``model``; return ``model``."""
    modules = dict(model.named_modules())
    handles, hooks = [], []
    for target in targets:
        layer = layers[target.key]
        if target.side == "after":
            hooks.append(_OutputHook(layer))
            handles.append(modules[target.module].register_forward_hook(hooks[-1]))
        else:
            hooks.append(_InputHook(layer))
            handles.append(modules[target.module].register_forward_pre_hook(hooks[-1], with_kwargs=True))
    handles.append(model.register_forward_hook(_FirstForwardCheck(hooks)))
    # In __dict__, not _modules: an attribute, never a child that a container's forward would call.
    model.__dict__[CONTAINER] = layers
    model.__dict__[_HANDLES] = handles
    return model


def is_hooked(model: nn.Module) -> bool:
    return _HANDLES in model.__dict__


def detach(model: nn.Module) -> nn.Module:
    """Remove the hooks and layers ``attach`` added; return ``model``."""
    for handle in model.__dict__.pop(_HANDLES):
        handle.remove()
    del model.__dict__[CONTAINER]
    return model
