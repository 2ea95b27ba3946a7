"""Preset registry: named placements (``"paper"``) per architecture, found from the model itself.

Entries are frozen (``Preset`` and its ``TopKSpec``), so what ``get_preset`` returns cannot change the
registry. ``register_preset`` adds one (refusing a duplicate unless ``replace=True``), ``unregister_preset``
removes one. Every preset of this library is registered here, none as a side effect of importing a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .placement import COMPUTED
from .spec import TopKSpec


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    spec: TopKSpec
    matches: Callable[[nn.Module], bool]
    note: str = ""


_PRESETS: dict[str, dict[str, Preset]] = {}
_RESERVED_CHARACTERS = ",:*?[{"  # spec strings use them: lists, prefixes, globs, JSON


def register_preset(name: str, arch: str, spec: TopKSpec, matches: Callable[[nn.Module], bool],
                    note: str = "", *, replace: bool = False) -> Preset:
    """Register preset ``name`` for models of architecture ``arch`` recognised by ``matches``.

    An existing ``(name, arch)`` entry is replaced only with ``replace=True``.
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in _RESERVED_CHARACTERS):
        raise ValueError(f"preset name {name!r} must be a non-empty string without any of {_RESERVED_CHARACTERS!r}")
    if name in COMPUTED:
        raise ValueError(f"preset name {name!r} is taken by a computed placement; choose another name")
    if not isinstance(spec, TopKSpec):
        raise ValueError(f"spec={spec!r} must be a TopKSpec")
    if not callable(matches):
        raise ValueError(f"matches={matches!r} must be a callable taking the model")
    if arch in _PRESETS.get(name, {}) and not replace:
        raise ValueError(f"preset {name!r} already has an entry for {arch!r}; pass replace=True to replace it "
                         "or call unregister_preset first")
    preset = Preset(name, arch, spec, matches, note)
    _PRESETS.setdefault(name, {})[arch] = preset
    return preset


def unregister_preset(name: str, arch: str) -> Preset:
    """Remove and return the ``(name, arch)`` entry; ``ValueError`` names the entries there are."""
    if arch not in _PRESETS.get(name, {}):
        entries = [(p.name, p.arch) for p in list_presets()]
        raise ValueError(f"no preset {name!r} for {arch!r}; registered (name, arch): {entries}")
    preset = _PRESETS[name].pop(arch)
    if not _PRESETS[name]:
        del _PRESETS[name]
    return preset


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def list_presets(name: str | None = None) -> list[Preset]:
    """Every registered preset, or those called ``name``, in registration order."""
    groups = list(_PRESETS.values()) if name is None else [_PRESETS.get(name, {})]
    return [p for group in groups for p in group.values()]


def get_preset(name: str, model: nn.Module) -> Preset:
    """The preset ``name`` for ``model``'s architecture; ``ValueError`` names what is available."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; registered presets: {preset_names()}, "
                         f"computed placements: {sorted(COMPUTED)}")
    for preset in _PRESETS[name].values():
        if preset.matches(model):
            return preset
    raise ValueError(
        f"preset {name!r} has no entry for {type(model).__name__}; it covers {sorted(_PRESETS[name])}. "
        "Use the placement 'stage-ends' (any model), pass positions (list_positions shows them), "
        "or add one with register_preset")


# ----- architecture recognisers: by class name, so torchvision and timm builds both match -----

def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _is_torchvision(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torchvision.")


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.")


def _resnet_depths(model: nn.Module, block: str) -> tuple[int, ...] | None:
    if "ResNet" not in _class_names(model):
        return None
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if any(s is None or len(s) == 0 or type(s[0]).__name__ != block for s in stages):
        return None
    return tuple(len(s) for s in stages)


def _is_alexnet(model: nn.Module) -> bool:
    return "AlexNet" in _class_names(model) and hasattr(model, "features")


def _is_vgg16(model: nn.Module, batch_norm: bool) -> bool:
    """VGG16 with (vgg16_bn) or without BatchNorm: 13 convolutions either way, but max-pools at other indices."""
    if "VGG" not in _class_names(model) or not hasattr(model, "features"):
        return False
    return (sum(isinstance(m, nn.Conv2d) for m in model.features) == 13
            and any(isinstance(m, nn.BatchNorm2d) for m in model.features) == batch_norm)


def _is_vit(model: nn.Module, library_check: Callable[[nn.Module], bool]) -> bool:
    return "VisionTransformer" in _class_names(model) and library_check(model)


def _is_fastgan_generator(model: nn.Module) -> bool:
    """The FastGAN generator of ``recipes/fastgan_models.py``, recognised by its block names."""
    return type(model).__name__ == "Generator" and all(hasattr(model, n) for n in ("feat_32", "to_big", "to_small"))


_ALEXNET_NOTE = "after ReLU/max-pool of every conv stage (paper Fig. 4: 10% best)"
register_preset("paper", "alexnet", TopKSpec(["features.2", "features.5", "features.7", "features.9", "features.12"], k=0.1),
                _is_alexnet, _ALEXNET_NOTE)
register_preset("paper", "vgg16", TopKSpec(["features.4", "features.9", "features.16", "features.23", "features.30"], k=0.05),
                lambda m: _is_vgg16(m, batch_norm=False), "after each max-pool (paper Fig. 4: 5% best)")
register_preset("paper", "vgg16_bn", TopKSpec(["features.6", "features.13", "features.23", "features.33", "features.43"],
                                              k=0.05),
                lambda m: _is_vgg16(m, batch_norm=True), "our choice: after each max-pool, 5% as for VGG16")
register_preset("paper", "resnet18", TopKSpec(["layer2"], k=0.2),
                lambda m: _resnet_depths(m, "BasicBlock") == (2, 2, 2, 2),
                "after layer2, as trained in the paper's Table 2 (also the 3x3-stem, no-max-pool variant)")
register_preset("paper", "resnet50", TopKSpec(["maxpool", "layer1", "layer2", "layer3", "layer4"], k=0.1),
                lambda m: _resnet_depths(m, "Bottleneck") == (3, 4, 6, 3),
                "our choice: after the stem max-pool and every stage, 10% as for AlexNet")
register_preset("paper", "vit_torchvision",
                TopKSpec(["before:encoder.layers.*.self_attention"], k=0.6, kind="token"),
                lambda m: _is_vit(m, _is_torchvision), "token Top-K (60% kept) on every block's attention input")
register_preset("paper", "vit_timm", TopKSpec(["before:blocks.*.attn"], k=0.6, kind="token"),
                lambda m: _is_vit(m, _is_timm), "token Top-K (60% kept) on every block's attention input")


register_preset("paper", "fastgan", TopKSpec(["feat_32"], k=0.05), _is_fastgan_generator,
                "FastGAN generator: Top-K after the 32x32 block (paper §4.4: 5%; Table-100 uses 15%)")
