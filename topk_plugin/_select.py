"""Exact CPU Top-K selection on float bit patterns (a small C kernel, the CPU kernel of the registered op).

The magnitude ``|x|`` of an IEEE float, read as an unsigned integer with the sign bit cleared, orders
exactly like the magnitude itself (-0.0 and 0.0 get the same key); every NaN gets one key above the
infinity's, so NaN ranks largest as in ``torch.topk``. The K-th largest key of a channel is found by an
MSB-first radix select over 8-bit digits (one histogram pass, then passes over a shrinking set of
candidates); once at most 32 candidates are left (at once on rows as short as 6×6) they are ranked by
counting, which costs less than clearing and scanning a 256-bin histogram. A channel with at most K
non-zeros needs no selection at all (threshold 0). One final pass writes the masked values and/or the
boolean mask (only what the caller asks for), following the tie rule of ``ops.py``.

The kernel is plain C (no torch headers), compiled on first use with the system C compiler into a
cache directory (``$TOPK_PLUGIN_CACHE``, default ``~/.cache/topk_plugin``) and loaded with ``ctypes``,
which releases the GIL. If no compiler works, or ``TOPK_PLUGIN_NO_EXT=1``, ``available()`` is False and
the op uses its pure-torch path (``_library.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

# The key every NaN gets: one above the infinity's bit pattern (sign cleared), so NaN ranks largest.
NAN_KEYS = {torch.float32: 0x7F800001, torch.float16: 0x7C01, torch.bfloat16: 0x7F81}
DTYPES = tuple(NAN_KEYS)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#else
#define THREAD_ID 0
#endif

typedef int64_t i64;
#define RANK_MAX 32  /* at most this many candidates are ranked by counting (measured crossover) */

/* Histogram of the digit (c >> lo) & dmask into counts (zeroed here). Inputs of 256 keys or more count
   into 4 tables to break the store-to-load chain when most keys share a digit (activations share few
   exponents); merging the tables costs less than the chain already at a 27x27 map. */
static void histogram(const uint32_t *c, i64 n, int lo, uint32_t dmask, uint32_t *counts) {
    memset(counts, 0, sizeof(uint32_t) * (dmask + 1));
    if (n < 256) {
        for (i64 i = 0; i < n; i++) counts[(c[i] >> lo) & dmask]++;
        return;
    }
    uint32_t h[3][256];
    for (int j = 0; j < 3; j++) memset(h[j], 0, sizeof(uint32_t) * (dmask + 1));
    i64 i = 0;
    for (; i + 4 <= n; i += 4) {
        counts[(c[i] >> lo) & dmask]++;
        h[0][(c[i + 1] >> lo) & dmask]++;
        h[1][(c[i + 2] >> lo) & dmask]++;
        h[2][(c[i + 3] >> lo) & dmask]++;
    }
    for (; i < n; i++) counts[(c[i] >> lo) & dmask]++;
    for (uint32_t d = 0; d <= dmask; d++) counts[d] += h[0][d] + h[1][d] + h[2][d];
}

/* radix_select's contract for few candidates: the need-th largest is the smallest key with fewer than
   `need` keys above it, found by counting. O(n^2) but branch-free and vectorised, with no 256-bin
   histogram to clear and scan, which dominates once few keys are left (and on short rows such as 6x6).
   Keys are below 2^31, so signed compares (one SSE2 instruction) order them. cand has room for RANK_PAD
   more keys: zeros pad the inner loop to whole vectors; no key is below 0, so they never count as above. */
static uint32_t rank_select(uint32_t *cand, i64 n, i64 need, i64 *room, i64 *equal) {
    const int32_t *s = (const int32_t *)cand;
    const i64 padded = (n + RANK_PAD - 1) & ~(i64)(RANK_PAD - 1);
    for (i64 j = n; j < padded; j++) cand[j] = 0;
    int32_t t = INT32_MAX;
    for (i64 i = 0; i < n; i++) {
        const int32_t k = s[i];
        int32_t above = 0;
        for (i64 j = 0; j < padded; j++) above += s[j] > k;
        t = above < need && k < t ? k : t;
    }
    i64 above = 0, same = 0;
    for (i64 j = 0; j < n; j++) { above += s[j] > t; same += s[j] == t; }
    *room = need - above;
    *equal = same;
    return (uint32_t)t;
}

/* The need-th largest of cand[0..n) (keys <= top < 2^nbits). On return *room is how many keys equal to
   the result are among the `need` largest and *equal how many keys equal it. a, b: scratch of n keys;
   cand, a and b each have RANK_PAD keys of slack after them (rank_select writes there). */
static uint32_t radix_select(uint32_t *cand, i64 n, i64 need, uint32_t top, int nbits,
                             uint32_t *a, uint32_t *b, i64 *room, i64 *equal) {
    uint32_t counts[256];
    uint32_t prefix = 0;
    int hi = nbits;
    while (hi > 0) {
        if (n <= RANK_MAX) return rank_select(cand, n, need, room, equal);
        int lo = hi > 8 ? hi - 8 : 0;
        uint32_t dmask = (1u << (hi - lo)) - 1u;
        histogram(cand, n, lo, dmask, counts);
        i64 above = 0;
        uint32_t d = (top >> lo) & dmask;  /* no candidate has a larger digit */
        while (above + counts[d] < need) above += counts[d--];
        need -= above;
        prefix |= d << lo;
        hi = lo;
        if (counts[d] == n) continue;  /* every candidate has this digit: nothing to drop */
        uint32_t *dst = cand == a ? b : a;
        i64 m = 0;
        const uint32_t want = prefix >> lo;  /* survivors share every bit above lo with prefix */
        for (i64 i = 0; i < n; i++) {  /* branch-free compaction */
            dst[m] = cand[i];
            m += (cand[i] >> lo) == want;
        }
        top = 0xffffffffu;  /* no cheap bound on the survivors' next digit */
        cand = dst;
        n = m;
        if (n == 1) { prefix = cand[0]; break; }
    }
    *room = need;
    *equal = n;
    return prefix;
}

/* Keep key k iff k >= lowest; y = kept ? x : +0. mask or y may be NULL (not wanted). restrict: a uint8
   mask store may not alias x or keys, which lets the contiguous loops vectorise. */
#define WRITE_ROW(NAME, T)                                                                       \
    static void NAME(const T *restrict x, T *restrict y, uint8_t *restrict mask,               \
                     const uint32_t *restrict keys, i64 len, i64 s_pos, uint32_t lowest, int invert) { \
        if (s_pos == 1 && y && mask) {                                                           \
            for (i64 p = 0; p < len; p++) {                                                      \
                const int keep = (keys[p] >= lowest) ^ invert;                                   \
                mask[p] = (uint8_t)keep;                                                         \
                y[p] = x[p] & (T)(0u - keep);                                                    \
            }                                                                                    \
        } else if (s_pos == 1 && y) {                                                            \
            for (i64 p = 0; p < len; p++) y[p] = x[p] & (T)(0u - ((keys[p] >= lowest) ^ invert)); \
        } else if (s_pos == 1) {                                                                 \
            for (i64 p = 0; p < len; p++) mask[p] = (uint8_t)((keys[p] >= lowest) ^ invert);     \
        } else {                                                                                 \
            for (i64 p = 0; p < len; p++) {                                                      \
                const int keep = (keys[p] >= lowest) ^ invert;                                   \
                if (mask) mask[p * s_pos] = (uint8_t)keep;                                       \
                if (y) y[p * s_pos] = x[p * s_pos] & (T)(0u - keep);                             \
            }                                                                                    \
        }                                                                                        \
    }
WRITE_ROW(write_row32, uint32_t)
WRITE_ROW(write_row16, uint16_t)

/* Rows r = o * inner + i (o < outer, i < inner); element p < len of row r sits at
   offset o * s_outer + i * s_inner + p * s_pos (in elements) of x, y and mask alike.
   Keys: the bit pattern with the sign cleared (so -0.0 == 0.0), every NaN mapped to nan_key (the
   infinity's key + 1): NaN ranks largest, as in torch.topk. y or mask may be NULL.
   scratch: 3 * len + RANK_PAD keys per thread. */
void topk_select(const void *x, void *y, uint8_t *mask, uint32_t *scratch, int wide, uint32_t nan_key,
                 i64 outer, i64 inner, i64 len, i64 s_outer, i64 s_inner, i64 s_pos,
                 i64 count, int ties_all, int invert, int threads) {
    const i64 rows = outer * inner;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *keys = scratch + (size_t)THREAD_ID * (3 * (size_t)len + RANK_PAD);
        #pragma omp for schedule(static)
        for (i64 r = 0; r < rows; r++) {
            const i64 base = (r / inner) * s_outer + (r % inner) * s_inner;
            i64 nonzero = 0;
            uint32_t top = 0;
            if (wide) {
                const uint32_t *xs = (const uint32_t *)x;
                for (i64 p = 0; p < len; p++) {
                    uint32_t k = xs[base + p * s_pos] & 0x7fffffffu;
                    k = k < nan_key ? k : nan_key;
                    keys[p] = k; nonzero += k != 0; top = k > top ? k : top;
                }
            } else {
                const uint16_t *xs = (const uint16_t *)x;
                for (i64 p = 0; p < len; p++) {
                    uint32_t k = xs[base + p * s_pos] & 0x7fffu;
                    k = k < nan_key ? k : nan_key;
                    keys[p] = k; nonzero += k != 0; top = k > top ? k : top;
                }
            }
            /* At most `count` non-zeros: no selection, the threshold is 0 and the first zeros fill up. */
            uint32_t t = 0;
            i64 room = count - nonzero, equal = len - nonzero;
            if (nonzero > count) {
                t = radix_select(keys, len, count, top, wide ? 31 : 15, keys + len, keys + 2 * len, &room, &equal);
            }
            /* room == 0 only when exactly `count` non-zeros: then 0 is below the K-th largest. */
            if (room > 0 && room < equal && !ties_all) {  /* keep only the first `room` ties */
                i64 seen = 0;
                for (i64 p = 0; p < len; p++) {
                    keys[p] = keys[p] == t ? seen++ < room : keys[p] > t;
                }
                t = 1;
            }
            const uint32_t lowest = room > 0 ? t : t + 1;
            if (wide)
                write_row32((const uint32_t *)x + base, y ? (uint32_t *)y + base : NULL, mask ? mask + base : NULL,
                            keys, len, s_pos, lowest, invert);
            else
                write_row16((const uint16_t *)x + base, y ? (uint16_t *)y + base : NULL, mask ? mask + base : NULL,
                            keys, len, s_pos, lowest, invert);
        }
    }
}
"""

_RANK_PAD = 8  # keys of slack after each thread's scratch: rank_select pads to whole vectors
_FLAGS = ["-O3", "-fno-strict-aliasing", "-shared", "-fPIC", f"-DRANK_PAD={_RANK_PAD}"]
_UNBUILT = object()
_LIB = _UNBUILT
_I64 = ctypes.c_int64


def _cache_dir() -> Path:
    return Path(os.environ.get("TOPK_PLUGIN_CACHE", Path.home() / ".cache" / "topk_plugin"))


def _compile(flags: list[str]) -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    tag = hashlib.sha256(" ".join([compiler, *flags, _SOURCE]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"select_{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / "select.c"
            source.write_text(_SOURCE)
            built = Path(tmp) / "select.so"
            subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True)
            os.replace(built, target)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(target))
    lib.topk_select.restype = None
    lib.topk_select.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_uint32, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _build():
    if os.environ.get("TOPK_PLUGIN_NO_EXT", "") not in ("", "0"):
        return None
    errors = []
    # OpenMP first; the same libgomp as torch's is picked up by soname. Serial if -fopenmp is missing.
    for flags in ([*_FLAGS, "-fopenmp"], _FLAGS):
        try:
            return _compile(flags)
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(getattr(err, "stderr", b"") or str(err))
    warnings.warn(f"topk_plugin: could not build the C selection kernel, using the slower pure-torch path: "
                  f"{errors[-1]!r}", RuntimeWarning, stacklevel=3)
    return None


def _library():
    global _LIB
    if _LIB is _UNBUILT:
        _LIB = _build()
    return _LIB


def available() -> bool:
    """Whether the C kernel is built (building it on first call)."""
    return _library() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether ``select`` handles ``x`` (CPU, float32/float16/bfloat16, kernel available)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and available()


def _geometry(t: torch.Tensor, kind: str, num_prefix_tokens: int):
    """(offset, outer, inner, length, s_outer, s_inner, s_pos) of the channel rows of ``t``, or None."""
    st = t.stride()
    if kind == "spatial" or t.dim() == 4:  # (N, C, H, W) or token (N, H, W, D): flatten the two position dims
        pos_dims = (2, 3) if kind == "spatial" else (1, 2)
        channel = 1 if kind == "spatial" else 3
        h, w = (t.shape[d] for d in pos_dims)
        if h > 1 and w > 1 and st[pos_dims[0]] != w * st[pos_dims[1]]:
            return None
        s_pos = st[pos_dims[1]] if w > 1 else st[pos_dims[0]]
        offset, length = 0, h * w
    else:  # token (N, T, D)
        channel, s_pos = 2, st[1]
        offset, length = num_prefix_tokens * st[1], t.shape[1] - num_prefix_tokens
    outer, inner = t.shape[0], t.shape[channel]
    # A size-1 dim's stride is arbitrary; zero it so equal layouts compare equal.
    return (offset, outer, inner, length, st[0] if outer > 1 else 0, st[channel] if inner > 1 else 0,
            s_pos if length > 1 else 0)


def select(x: torch.Tensor, count: int, *, kind: str, ties: str, num_prefix_tokens: int = 0,
           invert: bool = False, values: bool = True, mask: bool = True):
    """``(y, mask)``: ``x`` zeroed outside the Top-``count`` entries of each channel row (``invert``: inside
    them) and the boolean mask of the entries ``y`` keeps; ``None`` for an output not asked for. Prefix tokens
    are kept. ``x`` must pass ``supports``; the caller validates the arguments (``count`` >= 1, the prefix)."""
    x = x.detach()
    wanted = [values, mask]
    outputs = _outputs(x, wanted)
    geometry = _geometry(x, kind, num_prefix_tokens)
    if geometry is None or any(_geometry(t, kind, num_prefix_tokens) != geometry for t in outputs if t is not None):
        x = x.contiguous()
        outputs = _outputs(x, wanted)
        geometry = _geometry(x, kind, num_prefix_tokens)
    y, kept = outputs
    offset, *rows = geometry
    if num_prefix_tokens:
        if kept is not None:
            kept[:, :num_prefix_tokens] = True
        if y is not None:
            y[:, :num_prefix_tokens] = x[:, :num_prefix_tokens]
    if x.numel():
        esize, threads = x.element_size(), torch.get_num_threads()
        scratch = torch.empty(threads * (3 * rows[2] + _RANK_PAD), dtype=torch.int32)
        _library().topk_select(
            x.data_ptr() + offset * esize, y.data_ptr() + offset * esize if y is not None else None,
            kept.data_ptr() + offset if kept is not None else None, scratch.data_ptr(), int(esize == 4),
            NAN_KEYS[x.dtype], *rows, count, int(ties == "all"), int(invert), threads)
    return y, kept


def _outputs(x: torch.Tensor, wanted) -> list:
    """Empty values and mask like ``x`` (its memory format), or None where not wanted."""
    values, mask = wanted
    return [torch.empty_like(x) if values else None, torch.empty_like(x, dtype=torch.bool) if mask else None]
