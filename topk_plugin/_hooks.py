"""``method="hooks"``: Top-K by forward hooks (output) and forward pre-hooks (input) on the target modules.

The layers are reachable as ``model.topk_layers`` but are not a child module: a model whose forward calls
its children in turn (``nn.Sequential``, torchvision's ``vgg16().features``) would otherwise call the
container too. They hold no state, so ``.to()``, ``state_dict`` and ``train()`` have nothing to reach.
The hook handles are kept, so ``detach`` removes exactly the hooks ``attach`` added.
"""
from __future__ import annotations

from torch import nn

from .layers import TopK
from .selectors import CONTAINER, Target

_HANDLES = "_topk_hook_handles"


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


def attach(model: nn.Module, layers: nn.ModuleDict, targets: list[Target]) -> nn.Module:
    """Hook ``layers[target.key]`` onto every target of ``model``; return ``model``."""
    modules = dict(model.named_modules())
    handles = []
    for target in targets:
        layer = layers[target.key]
        if target.side == "after":
            handles.append(modules[target.module].register_forward_hook(_OutputHook(layer)))
        else:
            handles.append(modules[target.module].register_forward_pre_hook(_InputHook(layer), with_kwargs=True))
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
