"""Spatial and token Top-K: the paper's Eq. 1 as an exact, differentiable op.

Layout conventions
  spatial  (N, C, H, W): per (n, c), rank the H*W responses.
  token    (N, T, D) or (N, H, W, D): per (n, d), rank the tokens / positions;
           the first ``num_prefix_tokens`` tokens (CLS, registers) are kept and not ranked.

Ranking is by magnitude ``|x|``. ``ties="first"`` keeps exactly K entries per channel
(as the authors' ``torch.topk`` code does); among equal magnitudes the earliest positions
in row-major order win, so the result is deterministic on every device. ``ties="all"``
is Eq. 1 read literally: every entry whose magnitude is >= the K-th largest is kept.

On CPU, float32/float16/bfloat16 inputs go through an exact radix-select kernel (``_select.py``) that
writes the mask and the masked values in one pass; other devices and dtypes use the torch path below.
Both give identical masks; autograd keeps only the boolean mask.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _select

MODES = ("topk", "non_topk", "mean_replace", "identity")
KINDS = ("spatial", "token")
TIES = ("first", "all")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


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


def _select_mask(magnitude: torch.Tensor, count: int, ties: str) -> torch.Tensor:
    """Boolean mask of the ``count`` largest entries along the last dim of ``magnitude`` (torch path)."""
    length = magnitude.shape[-1]
    if count >= length:
        return torch.ones_like(magnitude, dtype=torch.bool)
    # Unsorted topk is faster than kthvalue on CPU and a radix select on CUDA; its smallest value is the K-th.
    threshold = magnitude.topk(count, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    kept = magnitude >= threshold
    if ties == "all":
        return kept
    surplus = (kept.sum(-1) > count).nonzero().squeeze(1)
    if surplus.numel():  # only rows with ties at the threshold need the (int64) running count
        rows, row_threshold = magnitude[surplus], threshold[surplus]
        above, at = rows > row_threshold, rows == row_threshold
        room = count - above.sum(-1, keepdim=True)
        kept[surplus] = above | (at & (at.cumsum(-1) <= room))
    return kept


def _as_channel_rows(x: torch.Tensor, kind: str, num_prefix_tokens: int):
    """View ``x`` as (rows, positions) with one row per (sample, channel), and the inverse map."""
    if kind == "spatial":
        n, c = x.shape[:2]
        rows = x.reshape(n * c, -1)
        return rows, lambda r: r.reshape(x.shape)
    n, d = x.shape[0], x.shape[-1]
    body = x[:, num_prefix_tokens:] if x.dim() == 3 else x
    body_shape = body.shape
    rows = body.reshape(n, -1, d).transpose(1, 2).reshape(n * d, -1)

    def restore(r: torch.Tensor) -> torch.Tensor:
        r = r.reshape(n, d, -1).transpose(1, 2).reshape(body_shape)
        if body_shape == x.shape:
            return r
        prefix = torch.ones_like(x[:, :num_prefix_tokens], dtype=r.dtype)
        return torch.cat([prefix, r], dim=1)

    return rows, restore


def check_layout(x: torch.Tensor, kind: str, num_prefix_tokens: int = 0, where: str = "") -> None:
    at = f" at position {where!r}" if where else ""
    if kind == "spatial" and x.dim() != 4:
        raise ValueError(
            f"spatial Top-K{at} needs an (N, C, H, W) tensor, got shape {tuple(x.shape)}; "
            "use kind='token' for (N, T, D) or (N, H, W, D) channel-last tensors")
    if kind == "token":
        if x.dim() not in (3, 4):
            raise ValueError(f"token Top-K{at} needs an (N, T, D) or (N, H, W, D) tensor, got shape {tuple(x.shape)}")
        if num_prefix_tokens and (x.dim() != 3 or num_prefix_tokens >= x.shape[1]):
            raise ValueError(f"token Top-K{at}: num_prefix_tokens={num_prefix_tokens} does not fit shape {tuple(x.shape)}")


def ranked_positions(x: torch.Tensor, kind: str, num_prefix_tokens: int = 0) -> int:
    """How many positions each channel of ``x`` ranks (prefix tokens excluded)."""
    if kind == "spatial":
        return x.shape[-2] * x.shape[-1]
    return math.prod(x.shape[1:-1]) - num_prefix_tokens


def topk_mask(x: torch.Tensor, k, *, kind: str = "spatial", ties: str = "first",
              num_prefix_tokens: int = 0) -> torch.Tensor:
    """Boolean mask, shaped like ``x``, of the Top-K responses of each channel (prefix tokens: True)."""
    check_k(k)
    check_choice("kind", kind, KINDS)
    check_choice("ties", ties, TIES)
    check_layout(x, kind, num_prefix_tokens)
    count = keep_count(k, ranked_positions(x, kind, num_prefix_tokens))
    with torch.no_grad():
        if _select.supports(x):
            return _select.select(x, count, kind=kind, ties=ties, num_prefix_tokens=num_prefix_tokens,
                                  values=False)[1]
        rows, restore = _as_channel_rows(x.detach(), kind, num_prefix_tokens)
        return restore(_select_mask(rows.abs(), count, ties))


def _channel_mean_of_kept(x: torch.Tensor, mask: torch.Tensor, kind: str, num_prefix_tokens: int):
    """Per-channel mean of the kept values, broadcast back onto the kept positions."""
    rows, restore = _as_channel_rows(x, kind, num_prefix_tokens)
    mask_rows, _ = _as_channel_rows(mask, kind, num_prefix_tokens)
    kept = mask_rows.sum(-1, keepdim=True).clamp_min(1)
    mean = (rows * mask_rows).sum(-1, keepdim=True) / kept
    out = restore(torch.where(mask_rows, mean.to(rows.dtype), torch.zeros((), dtype=rows.dtype, device=rows.device)))
    if kind == "token" and x.dim() == 3 and num_prefix_tokens:
        out = torch.cat([x[:, :num_prefix_tokens], out[:, num_prefix_tokens:]], dim=1)
    return out


def _masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, grad, grad.new_zeros(()))


class _MaskedSelect(torch.autograd.Function):
    """``x`` where ``mask``, else 0; saves only the boolean mask for backward."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.masked_fill(~mask, 0)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _masked_grad(grad, mask), None


class _SelectTopK(torch.autograd.Function):
    """Top-K (or its complement) by the C kernel, mask and values in one pass; saves only the boolean mask."""

    @staticmethod
    def forward(ctx, x, count, kind, ties, num_prefix_tokens, invert):
        y, mask = _select.select(x, count, kind=kind, ties=ties, num_prefix_tokens=num_prefix_tokens,
                                 invert=invert)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _masked_grad(grad, mask), None, None, None, None, None


def topk(x: torch.Tensor, k, *, mode: str = "topk", kind: str = "spatial", ties: str = "first",
         num_prefix_tokens: int = 0, where: str = "") -> torch.Tensor:
    """Apply Top-K (``mode``) to ``x``; gradients flow only through the entries the mode keeps."""
    check_choice("mode", mode, MODES)
    check_choice("kind", kind, KINDS)
    check_choice("ties", ties, TIES)
    check_layout(x, kind, num_prefix_tokens, where)
    if mode == "identity":
        return x
    if mode != "mean_replace" and _select.supports(x):
        count = keep_count(k, ranked_positions(x, kind, num_prefix_tokens))
        return _SelectTopK.apply(x, count, kind, ties, num_prefix_tokens, mode == "non_topk")
    mask = topk_mask(x, k, kind=kind, ties=ties, num_prefix_tokens=num_prefix_tokens)
    if mode == "mean_replace":
        return _channel_mean_of_kept(x, mask, kind, num_prefix_tokens)
    if mode == "non_topk":
        mask = ~mask
        if kind == "token" and x.dim() == 3 and num_prefix_tokens:
            mask[:, :num_prefix_tokens] = True
    return _MaskedSelect.apply(x, mask)
