"""``TopKSpec``: where Top-K goes and how it behaves; position selectors and their resolution.

A position is one of
  ``"features.2"``            a module name from ``named_modules()``: Top-K on its output;
  ``"layer*"``                a glob; ``*`` stays within one name component, ``**`` crosses dots;
  ``"type:MaxPool2d"``        every module of that class name (or pass the class itself, ``nn.MaxPool2d``);
  ``"before:blocks.*.attn"``  any of the above prefixed by ``before:``: Top-K on the module's input
                              (its first tensor argument, and every other argument that is the same tensor);
                              ``after:`` is the default and may be written out.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

from torch import nn

from .ops import KINDS, MODES, TIES, check_choice, check_k

Position = Union[str, type]
SIDES = ("after", "before")


@dataclass
class TopKSpec:
    """What ``sparsify`` inserts.

    Attributes:
        positions: module names, globs, ``type:Name`` selectors or classes, optionally ``before:``-prefixed.
        k: fraction of positions in (0, 1], or an int count >= 1.
        mode: ``topk`` | ``non_topk`` | ``mean_replace`` | ``identity``.
        kind: ``spatial`` (N, C, H, W) | ``token`` (N, T, D) or (N, H, W, D).
        ties: ``first`` (exactly K per channel, earliest position wins) | ``all`` (Eq. 1 literally).
        num_prefix_tokens: tokens kept out of the ranking; ``None`` takes the model's own
            (timm ``num_prefix_tokens``, torchvision's class token), else 0.
    """

    positions: Sequence[Position] = field(default_factory=list)
    k: float | int = 0.1
    mode: str = "topk"
    kind: str = "spatial"
    ties: str = "first"
    num_prefix_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.positions, (str, type)):
            self.positions = [self.positions]
        self.positions = list(self.positions)
        if not self.positions:
            raise ValueError("TopKSpec.positions is empty; name at least one module (see list_positions)")
        for entry in self.positions:
            if not isinstance(entry, (str, type)):
                raise ValueError(f"position {entry!r} must be a module name, glob, 'type:Name' or a module class")
        check_k(self.k)
        check_choice("mode", self.mode, MODES)
        check_choice("kind", self.kind, KINDS)
        check_choice("ties", self.ties, TIES)
        if self.num_prefix_tokens is not None and (not isinstance(self.num_prefix_tokens, int)
                                                   or self.num_prefix_tokens < 0):
            raise ValueError(f"num_prefix_tokens={self.num_prefix_tokens!r} must be None or an int >= 0")

    def replace(self, **changes) -> "TopKSpec":
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Target:
    """One resolved insertion point: a module name and the side of it that gets Top-K."""

    module: str
    side: str = "after"

    @property
    def key(self) -> str:
        """Child name of the layer inside the ``topk_layers`` container (module names may not hold dots)."""
        return self.module.replace(".", "_") + ("_in" if self.side == "before" else "")

    def __str__(self) -> str:
        return self.module if self.side == "after" else f"before:{self.module}"


def _split_side(entry: Position) -> tuple[str, Position]:
    if isinstance(entry, str):
        for side in SIDES:
            if entry.startswith(side + ":"):
                return side, entry[len(side) + 1:]
    return "after", entry


def _glob_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    translated = {"**": ".*", "*": r"[^.]*", "?": r"[^.]"}
    return re.compile("".join(translated.get(p, re.escape(p)) for p in parts) + r"\Z")


def _matches(selector: Position, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    if selector.startswith("type:"):
        wanted = selector[len("type:"):].split(".")[-1]
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    if any(ch in selector for ch in "*?"):
        return _glob_regex(selector).match(name) is not None
    return name == selector


def _no_match_message(entry: Position, model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    _, selector = _split_side(entry)
    if isinstance(selector, type) or (isinstance(selector, str) and selector.startswith("type:")):
        types = sorted({type(m).__name__ for m in model.modules()})
        return f"position {entry!r} matches no module of {type(model).__name__}; its module types are {types}"
    close = difflib.get_close_matches(str(selector), names, n=5, cutoff=0.5)
    hint = f"closest names: {close}" if close else f"valid names include {names[:8]}"
    return (f"position {entry!r} matches no module of {type(model).__name__}; {hint}. "
            "list_positions(model, example_input) shows every candidate with its output shape")


def resolve_targets(model: nn.Module, positions: Sequence[Position]) -> list[Target]:
    """Expand selectors into targets, in module order; an entry matching nothing raises ``ValueError``."""
    targets: list[Target] = []
    for entry in positions:
        side, selector = _split_side(entry)
        hits = [Target(name, side) for name, module in model.named_modules()
                if name and _matches(selector, name, module)]
        if not hits:
            raise ValueError(_no_match_message(entry, model))
        targets.extend(t for t in hits if t not in targets)
    keys = [t.key for t in targets]
    clashes = {k for k in keys if keys.count(k) > 1}
    if clashes:
        raise ValueError(f"positions {sorted(clashes)} collide once dots become underscores; name them differently")
    return targets


def position_matches(pattern: str, position: str) -> bool:
    """Does a position pattern (name or glob, optionally ``before:``) select a Top-K layer's position?"""
    side, selector = _split_side(pattern)
    own_side, own_name = _split_side(position)
    if side != own_side:
        return False
    if any(ch in selector for ch in "*?"):
        return _glob_regex(selector).match(own_name) is not None
    return selector == own_name
