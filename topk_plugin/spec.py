"""``TopKSpec``: where Top-K goes (position selectors, see ``selectors``) and how it behaves."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from .ops import KINDS, MODES, TIES, check_choice, check_k
from .selectors import Position, Selector


@dataclass(frozen=True)
class TopKSpec:
    """What ``sparsify`` inserts. Frozen: ``replace`` returns a changed copy.

    Attributes:
        positions: module names, globs, ``type:Name`` selectors or classes, optionally ``before:``-prefixed
            (a tuple; a single selector or a list is accepted).
        k: fraction of positions in (0, 1], or an int count >= 1.
        mode: ``topk`` | ``non_topk`` | ``mean_replace`` | ``identity``.
        kind: ``spatial`` (N, C, H, W) | ``token`` (N, T, D) or (N, H, W, D).
        ties: ``first`` (exactly K per channel, earliest position wins) | ``all`` (Eq. 1 literally).
        num_prefix_tokens: tokens kept out of the ranking; ``None`` takes the model's own
            (timm ``num_prefix_tokens``, torchvision's class token) for ``kind="token"``, else 0.
    """

    positions: Sequence[Position] = ()
    k: float | int = 0.1
    mode: str = "topk"
    kind: str = "spatial"
    ties: str = "first"
    num_prefix_tokens: int | None = None

    def __post_init__(self):
        positions = self.positions
        if isinstance(positions, (str, type)):
            positions = [positions]
        if not isinstance(positions, Sequence):
            raise ValueError(f"TopKSpec.positions={positions!r} must be a selector or a list of selectors")
        object.__setattr__(self, "positions", tuple(positions))
        if not self.positions:
            raise ValueError("TopKSpec.positions is empty; name at least one module (see list_positions)")
        for entry in self.positions:
            Selector.parse(entry)
        check_k(self.k)
        check_choice("mode", self.mode, MODES)
        check_choice("kind", self.kind, KINDS)
        check_choice("ties", self.ties, TIES)
        if self.num_prefix_tokens is not None and (isinstance(self.num_prefix_tokens, bool)
                                                   or not isinstance(self.num_prefix_tokens, int)
                                                   or self.num_prefix_tokens < 0):
            raise ValueError(f"num_prefix_tokens={self.num_prefix_tokens!r} must be None or an int >= 0")

    def replace(self, **changes) -> "TopKSpec":
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
