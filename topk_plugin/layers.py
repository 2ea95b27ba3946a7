"""``TopK``: the module that ``sparsify`` inserts; it holds no parameters or buffers."""
from __future__ import annotations

import torch
from torch import nn

from .ops import KINDS, MODES, TIES, check_choice, check_k, keep_count, ranked_positions, topk, topk_mask


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
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0")
        self.k = k
        self.mode = mode
        self.kind = kind
        self.ties = ties
        self.num_prefix_tokens = num_prefix_tokens
        self.position = position
        self.measure = False
        self.stats: dict = {}

    def __setattr__(self, name, value):
        if name == "k":
            check_k(value)
        elif name == "mode":
            check_choice("mode", value, MODES)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Top-K at position {self.position!r} got a {type(x).__name__}, not a tensor")
        y = topk(x, self.k, mode=self.mode, kind=self.kind, ties=self.ties,
                 num_prefix_tokens=self._prefix(x), where=self.position)
        if self.measure:
            self._record(x, y)
        return y

    def _prefix(self, x: torch.Tensor) -> int:
        return self.num_prefix_tokens if self.kind == "token" and x.dim() == 3 else 0

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = topk_mask(x, self.k, kind=self.kind, ties=self.ties, num_prefix_tokens=self._prefix(x))
        if self.mode == "non_topk":
            mask = ~mask
        positions = ranked_positions(x, self.kind, self._prefix(x))
        self.stats = {
            "shape": tuple(x.shape),
            "count": keep_count(self.k, positions),
            "positions": positions,
            "kept": mask.sum().item() / mask.numel() if self.mode != "identity" else 1.0,
            "nonzero_in": (x != 0).sum().item() / x.numel(),
            "nonzero_out": (y != 0).sum().item() / y.numel(),
        }

    def extra_repr(self) -> str:
        prefix = f", num_prefix_tokens={self.num_prefix_tokens}" if self.kind == "token" else ""
        return f"k={self.k}, mode={self.mode}, kind={self.kind}, ties={self.ties}{prefix}"
