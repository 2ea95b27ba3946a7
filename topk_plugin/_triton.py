"""Top-K on CUDA as one Triton kernel: the GPU counterpart of the C kernel in ``_select.py``.

Each program holds whole channel rows in registers and finds the K-th largest magnitude key of each row by
bisection on the key's bits (one count per bit), then writes the outputs: one read of ``x``, one write of each
output, no sort and no host sync (so CUDA graphs capture it). Keys and tie rules are the C kernel's: the
magnitude bits with the sign cleared, every NaN one above infinity, the earliest positions first among equal
keys for ``ties="first"``. Used for float32/float16/bfloat16 CUDA tensors whose rows fit in registers
(``MAX_POSITIONS``) where Triton is installed (torch's CUDA wheels for Linux depend on it); everything else
takes the torch path, as does everything with ``TOPK_PLUGIN_NO_EXT=1``.
"""
from __future__ import annotations

import functools

import torch

from . import _select

# Rows longer than this would spill registers (VGG16's 112x112 maps are 12544 positions); the torch path takes them.
MAX_POSITIONS = 16384
# Bits of the magnitude key: every float's bit pattern without its sign bit.
_KEY_BITS = {torch.float32: 31, torch.float16: 15, torch.bfloat16: 15}


@functools.cache
def _kernel():
    """The kernel (compiled by Triton on first launch), or None without Triton or with ``TOPK_PLUGIN_NO_EXT=1``."""
    if _select.extensions_disabled():
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def select_rows(x_ptr, y_ptr, mask_ptr, offset, rows, inner, s_outer, s_inner, s_pos, length, count,
                    NAN_KEY: tl.constexpr, KEY_BITS: tl.constexpr, TIES_FIRST: tl.constexpr, INVERT: tl.constexpr,
                    WRITE_VALUES: tl.constexpr, WRITE_MASK: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_POSITIONS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        position = tl.arange(0, BLOCK_POSITIONS)
        valid = (row < rows)[:, None] & (position < length)[None, :]
        base = offset + (row // inner).to(tl.int64) * s_outer + (row % inner).to(tl.int64) * s_inner
        offsets = base[:, None] + position.to(tl.int64)[None, :] * s_pos
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        if KEY_BITS == 31:
            magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        else:
            magnitude = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        key = tl.where(valid, tl.minimum(magnitude, NAN_KEY), -1)  # padding ranks below every real key
        # The K-th largest key is the largest t with at least `count` keys >= t: settle its bits high to low.
        threshold = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
        for i in tl.static_range(KEY_BITS):
            candidate = threshold | (1 << (KEY_BITS - 1 - i))
            enough = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1) >= count
            threshold = tl.where(enough, candidate, threshold)
        if TIES_FIRST:  # of the keys equal to the K-th, the earliest fill what the larger ones leave
            above = key > threshold[:, None]
            at = key == threshold[:, None]
            room = count - tl.sum(above.to(tl.int32), axis=1)
            kept = above | (at & (tl.cumsum(at.to(tl.int32), axis=1) <= room[:, None]))
        else:
            kept = key >= threshold[:, None]
        if INVERT:
            kept = ~kept
        if WRITE_VALUES:
            tl.store(y_ptr + offsets, tl.where(kept, x, tl.zeros_like(x)), mask=valid)
        if WRITE_MASK:
            tl.store(mask_ptr + offsets, kept.to(tl.int8), mask=valid)

    return select_rows


def supports(x: torch.Tensor, kind: str, num_prefix_tokens: int) -> bool:
    """Whether ``select`` handles ``x``: a CUDA float32/float16/bfloat16 tensor whose rows fit, Triton importable."""
    if not (x.is_cuda and x.dtype in _KEY_BITS):
        return False
    from ._library import ranked_positions  # _library imports this module
    return ranked_positions(x, kind, num_prefix_tokens) <= MAX_POSITIONS and _kernel() is not None


def select(x: torch.Tensor, count: int, *, kind: str, ties: str, num_prefix_tokens: int = 0,
           invert: bool = False, values: bool = True, mask: bool = True):
    """As ``_select.select``, on the GPU: ``(y, mask)``, ``None`` for an output not asked for."""
    x, y, kept, (offset, outer, inner, length, s_outer, s_inner, s_pos) = _select.channel_rows(
        x, kind, num_prefix_tokens, values, mask)
    rows = outer * inner
    if rows == 0 or length == 0:
        return y, kept
    # Programs of about 4096 entries with 8 warps were fastest on an H100 (docs/RESULTS.md); rows of up to 64
    # positions share one compiled variant.
    block_positions = max(64, 1 << (length - 1).bit_length())
    block_rows = max(1, min(64, 4096 // block_positions))
    with torch.cuda.device(x.device):  # Triton launches on the current device, which need not be x's
        _kernel()[(-(-rows // block_rows),)](  # an output not asked for gets x's pointer: never written
            x, x if y is None else y, x if kept is None else kept.view(torch.int8),
            offset, rows, inner, s_outer, s_inner, s_pos, length, count,
            NAN_KEY=_select.NAN_KEYS[x.dtype], KEY_BITS=_KEY_BITS[x.dtype], TIES_FIRST=ties == "first",
            INVERT=invert, WRITE_VALUES=y is not None, WRITE_MASK=kept is not None,
            BLOCK_ROWS=block_rows, BLOCK_POSITIONS=block_positions,
            num_warps=max(1, min(16, block_rows * block_positions // 512)))
    return y, kept

