"""Position selectors: which modules get Top-K, and on which side. One language for ``sparsify`` and ``set_k``.

A selector is one of
  ``"features.2"``            a module name from ``named_modules()``: Top-K on its output;
  ``"layer*"``                a glob; ``*`` stays within one name component, ``**`` crosses dots;
  ``"type:MaxPool2d"``        every module of that class name (or pass the class itself, ``nn.MaxPool2d``);
  ``"before:blocks.*.attn"``  any of the above prefixed by ``before:``: Top-K on the module's input
                              (its first tensor argument, and every other argument that is the same tensor);
                              ``after:`` is the default and may be written out.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from torch import nn

Position = Union[str, type]
SIDES = ("after", "before")
CONTAINER = "topk_layers"  # where a sparsified model keeps its Top-K layers


@dataclass(frozen=True)
class Target:
    """One resolved insertion point: a module name and the side of it that gets Top-K."""

    module: str
    side: str = "after"

    @property
    def key(self) -> str:
        """Name of the layer inside the ``topk_layers`` container (module names may not hold dots)."""
        return self.module.replace(".", "_") + ("_in" if self.side == "before" else "")

    def __str__(self) -> str:
        return self.module if self.side == "after" else f"before:{self.module}"

    @classmethod
    def parse(cls, position: str) -> "Target":
        """The target a layer's ``position`` string (``str(target)``) names."""
        return cls(position[len("before:"):], "before") if position.startswith("before:") else cls(position)


@dataclass(frozen=True)
class Selector:
    """A parsed position: ``side`` and a ``pattern`` (name, glob, ``type:Name``, or a module class)."""

    side: str
    pattern: Union[str, type]

    @classmethod
    def parse(cls, entry: Position) -> "Selector":
        if isinstance(entry, type):
            if not issubclass(entry, nn.Module):
                raise ValueError(f"position {entry!r} is a class but not an nn.Module subclass")
            return cls("after", entry)
        if not isinstance(entry, str):
            raise ValueError(f"position {entry!r} must be a module name, glob, 'type:Name' or a module class")
        side, pattern = "after", entry
        for name in SIDES:
            if entry.startswith(name + ":"):
                side, pattern = name, entry[len(name) + 1:]
        if not pattern or pattern == "type:":
            raise ValueError(f"position {entry!r} names no module")
        return cls(side, pattern)

    def matches(self, name: str, module: nn.Module) -> bool:
        """Does the module ``name`` select this side of ``module``?"""
        if isinstance(self.pattern, type):
            return isinstance(module, self.pattern)
        if self.pattern.startswith("type:"):
            wanted = self.pattern[len("type:"):].split(".")[-1]
            return any(cls.__name__ == wanted for cls in type(module).__mro__)
        if any(ch in self.pattern for ch in "*?"):
            return _glob_regex(self.pattern).match(name) is not None
        return name == self.pattern

    def by_type(self) -> bool:
        return isinstance(self.pattern, type) or self.pattern.startswith("type:")

    def __str__(self) -> str:
        pattern = f"type:{self.pattern.__name__}" if isinstance(self.pattern, type) else self.pattern
        return pattern if self.side == "after" else f"{self.side}:{pattern}"


def _glob_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    translated = {"**": ".*", "*": r"[^.]*", "?": r"[^.]"}
    return re.compile("".join(translated.get(p, re.escape(p)) for p in parts) + r"\Z")


def _candidate_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    from .layers import TopK  # the library's own layers are never positions

    return ((n, m) for n, m in model.named_modules() if n and not isinstance(m, TopK) and n != CONTAINER)


def _no_match_message(entry: Position, selector: Selector, model: nn.Module) -> str:
    names = [n for n, _ in _candidate_modules(model)]
    if selector.by_type():
        types = sorted({type(m).__name__ for _, m in _candidate_modules(model)})
        return f"position {entry!r} matches no module of {type(model).__name__}; its module types are {types}"
    close = difflib.get_close_matches(str(selector.pattern), names, n=5, cutoff=0.5)
    hint = f"closest names: {close}" if close else f"valid names include {names[:8]}"
    return (f"position {entry!r} matches no module of {type(model).__name__}; {hint}. "
            "list_positions(model, example_input) shows every candidate with its output shape")


def resolve_targets(model: nn.Module, positions: Sequence[Position]) -> list[Target]:
    """Expand position selectors into targets, in module order per selector.

    Raises ``ValueError`` for an empty list, an entry that matches no module (naming the closest names),
    and two targets whose container keys collide.
    """
    if isinstance(positions, (str, type)):
        positions = [positions]
    positions = list(positions)
    if not positions:
        raise ValueError("positions is empty; name at least one module (list_positions shows them)")
    modules = list(_candidate_modules(model))
    targets: list[Target] = []
    for entry in positions:
        selector = Selector.parse(entry)
        hits = [Target(name, selector.side) for name, module in modules if selector.matches(name, module)]
        if not hits:
            raise ValueError(_no_match_message(entry, selector, model))
        targets.extend(t for t in hits if t not in targets)
    keys = [t.key for t in targets]
    clashes = {k for k in keys if keys.count(k) > 1}
    if clashes:
        raise ValueError(f"positions {sorted(clashes)} collide once dots become underscores; name them differently")
    return targets
