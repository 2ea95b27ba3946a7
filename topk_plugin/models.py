"""``create_model``: the one model factory, by name, like ``timm.create_model``.

A name is looked up in this library's own registry (``register_model``; ``resnet18_paper``), then among
torchvision's classification models, then in timm. ``torchvision/NAME`` and ``timm/NAME`` force a source
(timm and torchvision share names such as ``resnet18``; plain ``resnet18`` is torchvision's).

``weights``:
  ``None``                   random initialisation; never downloads;
  ``"DEFAULT"`` / ``"pretrained"``  the source's default pretrained weights (torchvision ``DEFAULT``;
                             timm ``pretrained=True``, the tag in the name, e.g. ``resnet50.a1_in1k``, picks one);
  a torchvision weights name ``"IMAGENET1K_V1"`` ...;
  a local file               loaded with ``topk_plugin.checkpoints.load_checkpoint`` (any container layout).
Named weights download through torchvision's / timm's own cache, as those libraries do.
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Callable

import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, load_checkpoint
from .presets import register_preset
from .spec import TopKSpec

PRETRAINED = ("DEFAULT", "pretrained")
SOURCES = ("topk_plugin", "torchvision", "timm")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make builder ``fn`` (taking ``num_classes`` and keyword options) a ``create_model`` name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def registered_models() -> list[str]:
    """This library's own architectures."""
    return sorted(_REGISTRY)


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _is_timm_name(name: str) -> bool:
    if not _has_timm():
        return False
    import timm

    return timm.is_model(name)  # a dict lookup of the architecture (pretrained tag stripped), no list scan


_KNOWS = {"topk_plugin": lambda name: name in _REGISTRY,
          "torchvision": lambda name: name in _torchvision_names(),
          "timm": _is_timm_name}


def _source_of(name: str) -> tuple[str, str]:
    """(source, bare name) for ``name``, honouring a ``source/`` prefix; ``ValueError`` with close names."""
    source, _, bare = name.partition("/") if "/" in name else ("", "", name)
    if source and source not in SOURCES:
        raise ValueError(f"model {name!r}: unknown source {source!r}; prefix a name with one of {list(SOURCES)}")
    if source == "timm" and not _has_timm():
        raise ValueError(f"model {name!r} asks for timm, which is not installed (pip install timm)")
    for candidate in [source] if source else SOURCES:
        if _KNOWS[candidate](bare):
            return candidate, bare
    raise ValueError(_unknown_message(name, bare, source))


def _unknown_message(name: str, bare: str, source: str) -> str:
    names = list(_REGISTRY) if source in ("", "topk_plugin") else []
    if source in ("", "torchvision"):
        names += sorted(_torchvision_names())
    if source in ("", "timm") and _has_timm():
        import timm

        names += timm.list_models()
    where = f"a {source}" if source else "a registered, torchvision or timm"
    close = difflib.get_close_matches(bare, list(dict.fromkeys(names)), n=6, cutoff=0.6)
    hint = f"; closest names: {close}" if close else ""
    return f"model {name!r} is not {where} model name{hint}"


def is_file_reference(weights: str) -> bool:
    """Does a ``weights`` string name a local file (a path separator or a suffix) rather than a weights name?"""
    return "/" in weights or "\\" in weights or Path(weights).suffix != ""


def _own(name: str, weights: str | None, num_classes: int | None, kwargs: dict) -> nn.Module:
    if weights is not None:
        raise ValueError(f"model {name!r} has no named weights (got weights={weights!r}); pass a local checkpoint file")
    return _REGISTRY[name](**({} if num_classes is None else {"num_classes": num_classes}), **kwargs)


def _torchvision(name: str, weights: str | None, num_classes: int | None, kwargs: dict) -> nn.Module:
    import torchvision

    if weights is not None:
        enum = torchvision.models.get_model_weights(name)
        allowed = ["DEFAULT", "pretrained", *(w.name for w in enum)]
        if weights not in allowed:
            raise ValueError(f"weights={weights!r} is not a torchvision weights name for {name}; choose one of "
                             f"{allowed} or pass a local checkpoint file")
        weights = "DEFAULT" if weights in PRETRAINED else weights
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    return torchvision.models.get_model(name, weights=weights, **kwargs)


def _timm(name: str, weights: str | None, num_classes: int | None, kwargs: dict) -> nn.Module:
    import timm

    if weights is not None and weights not in PRETRAINED:
        raise ValueError(f"weights={weights!r} for timm model {name!r}: timm takes {list(PRETRAINED)} (put a "
                         f"pretrained tag in the name, e.g. '{name.split('.')[0]}.<tag>') or a local checkpoint file")
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    return timm.create_model(name, pretrained=weights is not None, **kwargs)


_BUILDERS = {"topk_plugin": _own, "torchvision": _torchvision, "timm": _timm}


def create_model(name: str, *, weights: str | None = None, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build model ``name`` (registered, torchvision, or timm; ``timm/NAME`` / ``torchvision/NAME`` force one).

    Args:
        name: model name, optionally prefixed ``topk_plugin/``, ``torchvision/`` or ``timm/``.
        weights: ``None`` (random init), ``"DEFAULT"``/``"pretrained"``, a torchvision weights name, or a path
            to a local checkpoint (read with ``load_checkpoint``; a missing file is a ``CheckpointError``).
        num_classes: output classes; ``None`` keeps the architecture's default.
        **kwargs: passed to the builder.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name {name!r} must be a non-empty string")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 1 or None")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise ValueError(f"weights={weights!r} must be None, a weights name or a checkpoint path")
    source, bare = _source_of(name)
    is_file = isinstance(weights, Path) or (isinstance(weights, str) and is_file_reference(weights))
    path = Path(weights) if is_file else None
    if path is not None and not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    model = _BUILDERS[source](bare, None if path is not None else weights, num_classes, dict(kwargs))
    if path is not None:
        load_checkpoint(model, path)
    return model


# ----------------------------------------------------------------------------- the paper's ResNet-18

class PaperBasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual; the projection (1x1 conv+BN) is called ``shortcut``, empty when not needed."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PaperResNet(nn.Module):
    """The CIFAR-style ResNet of the paper's §4.3 (authors' ``models/resnet_imgnette.py``), at 224 px.

    3x3/1 stem conv+BN+ReLU and no max-pool, so ``layer4`` sees 28x28; ``avg_pool2d(4)`` leaves 7x7, and
    ``linear`` reads all 512*7*7 = 25088 values (no global pooling): the input must be 224x224.
    Module names match the authors', so their ``{'net': state_dict}`` checkpoints load.
    """

    def __init__(self, depths=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes_in = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            stride = 1 if index == 1 else 2
            blocks = []
            for block_stride in [stride] + [1] * (depth - 1):
                blocks.append(PaperBasicBlock(planes_in, planes, block_stride))
                planes_in = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512 * 7 * 7, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


@register_model
def resnet18_paper(num_classes: int = 10) -> PaperResNet:
    """ResNet-18 as trained in the paper's §4.3 / supplementary Table 2 (10 classes, as the authors' script)."""
    return PaperResNet((2, 2, 2, 2), num_classes)


register_preset("paper", "resnet18_paper", TopKSpec(["layer2"], k=0.2),
                lambda m: isinstance(m, PaperResNet) and tuple(len(getattr(m, f"layer{i}")) for i in range(1, 5))
                == (2, 2, 2, 2),
                "after layer2, 20% kept: the authors' --topk 2_20 (supplementary Table 2)")
