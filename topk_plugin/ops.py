"""Spatial and token Top-K: the paper's Eq. 1 as an exact, differentiable op.

Layout conventions
  spatial  (N, C, H, W): per (n, c), rank the H*W responses.
  token    (N, T, D) or (N, H, W, D): per (n, d), rank the tokens / positions;
           the first ``num_prefix_tokens`` tokens (CLS, registers) of an (N, T, D) sequence are kept
           and not ranked (``prefix_tokens``: the one place this rule lives).

Ranking is by magnitude ``|x|``; -0.0 equals 0.0, ``±inf`` rank by magnitude, NaN ranks largest (as in
``torch.topk``), and integer magnitudes never overflow (``|int8 -128|`` is 128). ``ties="first"`` keeps
exactly K entries per channel (as the authors' ``torch.topk`` code does); among equal magnitudes the
earliest positions in row-major order win, so the result is deterministic on every device. ``ties="all"``
is Eq. 1 read literally: every entry whose magnitude is >= the K-th largest is kept.

The work is done by ops registered with ``torch.library`` (``_library.py``: the C kernel on CPU, a Triton
kernel on CUDA, a torch path elsewhere), so ``torch.compile``, ``torch.export`` and ONNX export see one op.
Without a gradient to compute, only the values are written; with one, autograd keeps only the boolean mask.
"""
from __future__ import annotations

import numbers

import torch

from . import _library
from ._library import KINDS, TIES, check_choice, check_layout, check_prefix, check_prefix_fits, ranked_positions


def check_k(k) -> None:
    """Raise ``ValueError`` unless ``k`` is a fraction in (0, 1] or a count >= 1."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"k={k!r} must be a float in (0, 1] (fraction of positions) or an int >= 1 (count)")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"k={k!r}: an integer k is a count and must be >= 1")
    elif not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k={k!r}: a float k is a fraction and must lie in (0, 1]")


def keep_count(k, positions: int) -> int:
    """Entries kept per channel: ``max(1, int(k * positions))`` for a fraction, ``min(k, positions)`` for a count."""
    check_k(k)
    if isinstance(k, numbers.Integral):
        return min(int(k), positions)
    return min(positions, max(1, int(float(k) * positions)))


def prefix_tokens(x: torch.Tensor, kind: str, num_prefix_tokens: int) -> int:
    """The leading tokens of ``x`` that Top-K keeps and does not rank: ``num_prefix_tokens`` of an (N, T, D)
    sequence; an (N, H, W, D) token map has none (a model's CLS count does not apply to its maps)."""
    check_prefix(num_prefix_tokens, kind)
    return num_prefix_tokens if kind == "token" and x.dim() == 3 else 0


def _resolve(x, k, kind, ties, num_prefix_tokens, where=""):
    """Check every argument (before any kernel runs); ``(count, prefix)`` for the registered ops."""
    check_choice("kind", kind, KINDS)
    check_choice("ties", ties, TIES)
    check_k(k)
    check_layout(x, kind, where)
    prefix = prefix_tokens(x, kind, num_prefix_tokens)
    check_prefix_fits(x, prefix, where)
    # an empty map keeps 0 of 0 positions; the ops take any count >= 1 for it
    return max(1, keep_count(k, ranked_positions(x, kind, prefix))), prefix


def topk_mask(x: torch.Tensor, k, *, kind: str = "spatial", ties: str = "first",
              num_prefix_tokens: int = 0) -> torch.Tensor:
    """Boolean mask, shaped like ``x``, of the Top-K responses of each channel (prefix tokens: True)."""
    count, prefix = _resolve(x, k, kind, ties, num_prefix_tokens)
    return _library.topk_mask(x.detach(), count, kind, ties, prefix)


def _channel_mean_of_kept(x: torch.Tensor, mask: torch.Tensor, kind: str, prefix: int) -> torch.Tensor:
    """Per-channel mean of the kept values on the kept positions, 0 elsewhere; prefix tokens pass through."""
    body, kept = x[:, prefix:], mask[:, prefix:]
    dims = (2, 3) if kind == "spatial" else tuple(range(1, x.dim() - 1))
    # where, not a product with the mask: a dropped ±inf times 0 is NaN. Half types sum in float32: the sum of
    # kept float16 values can overflow where their mean fits.
    accumulate = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    total = torch.where(kept, body, 0).sum(dims, keepdim=True, dtype=accumulate)
    mean = total / kept.sum(dims, keepdim=True).clamp_min(1)
    out = torch.where(kept, mean.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.cat([x[:, :prefix], out], dim=1) if prefix else out


def _keep(invert: bool):
    """``topk`` (``invert=False``) or ``non_topk``: the registered op. The values-only op writes the mask itself
    when a gradient needs it (its autograd kernel); a ``torch.jit.trace`` records the op with the mask, so the
    traced graph does not depend on the grad mode at tracing time."""
    def apply(x, count, kind, ties, prefix, with_mask):
        if with_mask or torch.jit.is_tracing():
            return _library.topk_with_mask(x, count, kind, ties, prefix, invert)
        return _library.topk_values(x, count, kind, ties, prefix, invert), None
    return apply


def _mean_replace(x, count, kind, ties, prefix, with_mask):
    mask = _library.topk_mask(x.detach(), count, kind, ties, prefix)
    return _channel_mean_of_kept(x, mask, kind, prefix), mask


def _identity(x, count, kind, ties, prefix, with_mask):
    return x, (torch.ones_like(x, dtype=torch.bool) if with_mask else None)


# mode -> fn(x, count, kind, ties, prefix, with_mask) -> (output, mask of the entries the output keeps or None)
_MODES = {"topk": _keep(False), "non_topk": _keep(True), "mean_replace": _mean_replace, "identity": _identity}
MODES = tuple(_MODES)


def topk_and_mask(x: torch.Tensor, k, *, mode: str = "topk", kind: str = "spatial", ties: str = "first",
                  num_prefix_tokens: int = 0, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``topk`` and the boolean mask of the entries its output keeps (all True for ``identity``; for
    ``mean_replace`` the positions that take the mean); prefix tokens count as kept."""
    check_choice("mode", mode, MODES)
    count, prefix = _resolve(x, k, kind, ties, num_prefix_tokens, where)
    return _MODES[mode](x, count, kind, ties, prefix, True)


def topk(x: torch.Tensor, k, *, mode: str = "topk", kind: str = "spatial", ties: str = "first",
         num_prefix_tokens: int = 0, where: str = "") -> torch.Tensor:
    """Apply Top-K (``mode``) to ``x``; gradients flow only through the entries the mode keeps."""
    check_choice("mode", mode, MODES)
    count, prefix = _resolve(x, k, kind, ties, num_prefix_tokens, where)
    return _MODES[mode](x, count, kind, ties, prefix, False)[0]
