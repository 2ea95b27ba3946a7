"""``TopK``: the module that ``sparsify`` inserts; it holds no parameters or buffers.

Measurement: while ``layer.measure`` is True, every call appends one dict to the list ``layer.stats``
(``shape``, ``count``, ``positions``, ``kept``, ``nonzero_in``, ``nonzero_out``), so a layer called several
times per forward reports each call. Whoever starts a measurement resets ``layer.stats = []``.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import (KINDS, MODES, TIES, check_choice, check_k, check_prefix, keep_count, prefix_tokens, ranked_positions,
                  topk, topk_and_mask)


class TopK(nn.Module):
    """Top-K over the spatial positions (``kind="spatial"``) or tokens (``kind="token"``) of each channel.

    Args:
        k: fraction of positions in (0, 1] (count = ``max(1, int(k * positions))``) or an int count >= 1.
        mode: ``topk`` (Eq. 1), ``non_topk`` (keep the complement), ``mean_replace`` (kept entries take the
            channel's mean kept value) or ``identity`` (pass-through, still measured by ``sparsity_report``).
        kind: ``spatial`` for (N, C, H, W); ``token`` for channel-last (N, T, D) or (N, H, W, D).
        ties: ``first`` keeps exactly K per channel (earliest positions win ties); ``all`` keeps every tie.
        num_prefix_tokens: leading tokens (CLS, registers) that ``token`` Top-K keeps and does not rank.
        position: where the layer sits in its model, for messages and reports.
    """

    def __init__(self, k=0.1, mode: str = "topk", kind: str = "spatial", ties: str = "first",
                 num_prefix_tokens: int = 0, position: str = ""):
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("ties", ties, TIES)
        check_prefix(num_prefix_tokens, kind)
        self.k = k
        self.mode = mode
        self.kind = kind
        self.ties = ties
        self.num_prefix_tokens = num_prefix_tokens
        self.position = position
        self.measure = False
        self.stats: list[dict] = []

    def __setattr__(self, name, value):
        if name == "k":
            check_k(value)
        elif name == "mode":
            check_choice("mode", value, MODES)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.measure:
            return topk(x, self.k, mode=self.mode, kind=self.kind, ties=self.ties,
                        num_prefix_tokens=self.num_prefix_tokens, where=self.position)
        y, kept = topk_and_mask(x, self.k, mode=self.mode, kind=self.kind, ties=self.ties,
                                num_prefix_tokens=self.num_prefix_tokens, where=self.position)
        positions = ranked_positions(x, self.kind, prefix_tokens(x, self.kind, self.num_prefix_tokens))
        self.stats.append({"shape": tuple(x.shape), "count": keep_count(self.k, positions), "positions": positions,
                           "kept": _fraction(kept), "nonzero_in": _fraction(x != 0), "nonzero_out": _fraction(y != 0)})
        return y

    def extra_repr(self) -> str:
        prefix = f", num_prefix_tokens={self.num_prefix_tokens}" if self.kind == "token" else ""
        return f"k={self.k}, mode={self.mode}, kind={self.kind}, ties={self.ties}{prefix}"


def _fraction(mask: torch.Tensor) -> float:
    """Fraction of True entries (NaN for an empty tensor)."""
    return mask.sum().item() / mask.numel() if mask.numel() else float("nan")
