"""Exact CPU Top-K selection on float bit patterns (a small C kernel, the CPU kernel of the registered op).

The magnitude ``|x|`` of an IEEE float, read as an unsigned integer with the sign bit cleared, orders
exactly like the magnitude itself (-0.0 and 0.0 get the same key); every NaN gets one key above the
infinity's, so NaN ranks largest as in ``torch.topk``. Per channel row, one pass packs the non-zero keys
(after a ReLU about half the row; zeros rank below every non-zero and never need ranking). If at most K are
non-zero the threshold is 0; otherwise an MSB-first radix select finds the K-th largest key. Its first digit
(the exponent, plus one bit when K is in the upper half) is found by counting the keys above a few digits
below the largest key's, where the K-th largest of an activation map lies; later digits by 8-bit
histograms; each level packs the survivors into a shorter list, and the last <= 32 are ranked by counting.
One final pass writes the masked values and/or the boolean mask (only what the caller asks for) from the
threshold and, for the tie rule 'first' of ``ops.py``, the position after which ties are dropped.

Channel-last rows (tokens (N, T, D), channels_last maps: positions strided, channels adjacent) are done 8
channels at a time: their keys gathered into contiguous rows by 8x8 transposes (zeros too: the gather
counts them, and packing would cost another pass), the values written back across the channels. On
x86-64 the packing (a permute table), counting, ranking, gathering and writing loops also exist as AVX2
versions, chosen at run time when the CPU has AVX2; elsewhere the portable loops run. The AVX2 loops end
short lists with one masked vector and short rows with one overlapping vector instead of a scalar tail (a
13 x 13 map's rows run several short loops each). ``masked_grad`` is the backward: the gradient where the
mask is set, in one pass.

The kernel is plain C (no torch headers), compiled on first use with the system C compiler into a cache
directory (``$TOPK_PLUGIN_CACHE``, default ``~/.cache/topk_plugin``) and loaded with ``ctypes``, which
releases the GIL. If no compiler works, or ``TOPK_PLUGIN_NO_EXT=1``, ``available()`` is False and the op
uses its pure-torch path (``_library.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

# The key every NaN gets: one above the infinity's bit pattern (sign cleared), so NaN ranks largest.
NAN_KEYS = {torch.float32: 0x7F800001, torch.float16: 0x7C01, torch.bfloat16: 0x7F81}
EXPONENT_BITS = {torch.float32: 8, torch.float16: 5, torch.bfloat16: 8}
DTYPES = tuple(NAN_KEYS)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2")))
#endif

typedef int64_t i64;
#define RANK_MAX 32  /* at most this many candidates are ranked by counting (measured crossover) */
#define RANK_PAD 8   /* rank_select pads its candidates to whole vectors of this many keys */
#define SLACK 16     /* keys after each scratch buffer: vector stores may run up to 7 keys past the end */
/* Channel-last rows: positions lie s_pos elements apart, too far for the hardware prefetchers, and a group
   of 8 float32 channels uses half a cache line: the vector loops ask for the next line (the group after
   next) while they read or write this one (measured faster on ViT-B-sized tokens). */
#define NEXT_LINE 16

/* Histogram of the digit (c >> lo) & dmask into counts (zeroed here). Inputs of 256 keys or more count
   into 4 tables to break the store-to-load chain when most keys share a digit (activations share few
   exponents); merging the tables costs less than the chain already at 256 keys. */
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

/* The need-th largest of few candidates: the smallest key with fewer than `need` keys above it, found by
   counting the keys above each candidate, a vector of candidates at a time. O(n^2) but branch-free, with no
   256-bin histogram to clear and scan. Keys are below 2^31, so signed compares order them. INT32_MAX pads
   the candidates to whole vectors (cand has the room): never below the result, so never chosen. *room: how
   many keys equal to the result are among the `need` largest; *equal: how many keys equal it. */
static uint32_t rank_select_plain(uint32_t *cand, i64 n, i64 need, i64 *room, i64 *equal) {
    const int32_t *s = (const int32_t *)cand;
    const i64 padded = (n + RANK_PAD - 1) & ~(i64)(RANK_PAD - 1);
    for (i64 j = n; j < padded; j++) cand[j] = INT32_MAX;
    int32_t t = INT32_MAX;
    for (i64 i = 0; i < padded; i += RANK_PAD) {  /* RANK_PAD keys at once: one vector */
        int32_t above[RANK_PAD] = {0};
        for (i64 j = 0; j < n; j++)
            for (int l = 0; l < RANK_PAD; l++) above[l] += s[j] > s[i + l];
        for (int l = 0; l < RANK_PAD; l++)
            t = above[l] < need && s[i + l] < t ? s[i + l] : t;
    }
    i64 above = 0, same = 0;
    for (i64 j = 0; j < n; j++) { above += s[j] > t; same += s[j] == t; }
    *room = need - above;
    *equal = same;
    return (uint32_t)t;
}

/* at_least[j] = how many of c[0..n) are > bounds[j] (signed: keys are below 2^31, and -1 counts all). */
static void count_above_plain(const uint32_t *c, i64 n, const int32_t bounds[4], i64 at_least[4]) {
    const int32_t *s = (const int32_t *)c;
    int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (i64 i = 0; i < n; i++) {
        c0 += s[i] > bounds[0]; c1 += s[i] > bounds[1];
        c2 += s[i] > bounds[2]; c3 += s[i] > bounds[3];
    }
    at_least[0] = c0; at_least[1] = c1; at_least[2] = c2; at_least[3] = c3;
}

/* Write positions [from, to) of one row: keep p iff (key(x[p]) >= lowest) ^ invert; y = kept ? x : +0.
   mask or y may be NULL (not wanted). restrict: a uint8 mask store may not alias x, which lets the loops
   vectorise. */
#define WRITE_RANGE(NAME, T, MAGNITUDE, ATTR)                                                           \
    ATTR static void NAME(const T *restrict x, T *restrict y, uint8_t *restrict mask, i64 from, i64 to, \
                          i64 s_pos, uint32_t nan_key, uint32_t lowest, int invert) {                   \
        const T nan = (T)nan_key;                                                                       \
        if (s_pos == 1 && y && mask) {                                                                  \
            for (i64 p = from; p < to; p++) {                                                           \
                const T k = (T)(x[p] & MAGNITUDE) < nan ? (T)(x[p] & MAGNITUDE) : nan;                  \
                const T keep = (T)((k >= lowest) ^ invert);                                             \
                mask[p] = (uint8_t)keep;                                                                \
                y[p] = x[p] & (T)(0u - keep);                                                           \
            }                                                                                           \
        } else if (s_pos == 1 && y) {                                                                   \
            for (i64 p = from; p < to; p++) {                                                           \
                const T k = (T)(x[p] & MAGNITUDE) < nan ? (T)(x[p] & MAGNITUDE) : nan;                  \
                y[p] = x[p] & (T)(0u - (T)((k >= lowest) ^ invert));                                    \
            }                                                                                           \
        } else if (s_pos == 1) {                                                                        \
            for (i64 p = from; p < to; p++) {                                                           \
                const T k = (T)(x[p] & MAGNITUDE) < nan ? (T)(x[p] & MAGNITUDE) : nan;                  \
                mask[p] = (uint8_t)((k >= lowest) ^ invert);                                            \
            }                                                                                           \
        } else {                                                                                        \
            for (i64 p = from; p < to; p++) {                                                           \
                const i64 at = p * s_pos;                                                               \
                const T k = (T)(x[at] & MAGNITUDE) < nan ? (T)(x[at] & MAGNITUDE) : nan;                \
                const T keep = (T)((k >= lowest) ^ invert);                                             \
                if (mask) mask[at] = (uint8_t)keep;                                                     \
                if (y) y[at] = x[at] & (T)(0u - keep);                                                  \
            }                                                                                           \
        }                                                                                               \
    }

/* out[i] = mask[i] ? grad[i] : +0 for i in [from, to) (the compiler vectorises it). */
#define MASKED_GRAD(NAME, T, ATTR)                                                                      \
    ATTR static void NAME(const T *restrict grad, const uint8_t *restrict mask, T *restrict out, i64 from, \
                          i64 to) {                                                                     \
        for (i64 i = from; i < to; i++) out[i] = grad[i] & (T)(0u - (uint32_t)mask[i]);                 \
    }

/* Write one row of len positions from its threshold t: keep the keys above t, and those equal to t before
   position cut (ranges of WRITE_RANGE). */
#define WRITE_ROW(NAME, RANGE, T, ATTR)                                                                 \
    ATTR static void NAME(const T *x, T *y, uint8_t *mask, i64 len, i64 s_pos, uint32_t nan_key, uint32_t t, \
                          i64 cut, int invert) {                                                        \
        RANGE(x, y, mask, 0, cut, s_pos, nan_key, t, invert);                                           \
        RANGE(x, y, mask, cut, len, s_pos, nan_key, t + 1, invert);                                     \
    }

WRITE_RANGE(write_range32_plain, uint32_t, 0x7fffffffu, )
WRITE_RANGE(write_range16_plain, uint16_t, 0x7fffu, )
WRITE_ROW(write_row32_plain, write_range32_plain, uint32_t, )
WRITE_ROW(write_row16_plain, write_range16_plain, uint16_t, )
MASKED_GRAD(masked_grad32_plain, uint32_t, )
MASKED_GRAD(masked_grad16_plain, uint16_t, )

static inline uint32_t key_of(const void *x, i64 i, int wide, uint32_t nan_key) {
    const uint32_t k = wide ? ((const uint32_t *)x)[i] & 0x7fffffffu : ((const uint16_t *)x)[i] & 0x7fffu;
    return k < nan_key ? k : nan_key;
}

/* The non-zero keys of a row (element p at x[p * s_pos]) into out, in order; returns how many, *top the
   largest key. */
static i64 nonzero_keys_plain(const void *x, i64 len, i64 s_pos, int wide, uint32_t nan_key, uint32_t *out,
                              uint32_t *top) {
    i64 m = 0;
    uint32_t t = 0;
    for (i64 p = 0; p < len; p++) {
        const uint32_t k = key_of(x, p * s_pos, wide, nan_key);
        out[m] = k;
        m += k != 0;
        t = k > t ? k : t;
    }
    *top = t;
    return m;
}

/* The keys of src whose bits above lo equal want, into dst in order; returns how many. */
static i64 compact_plain(const uint32_t *src, i64 n, int lo, uint32_t want, uint32_t *dst) {
    i64 m = 0;
    for (i64 i = 0; i < n; i++) {  /* branch-free */
        dst[m] = src[i];
        m += (src[i] >> lo) == want;
    }
    return m;
}

#ifdef HAVE_AVX2_PATH
/* rank_select (same contract) with each vector of 8 candidates compared against every key in turn. */
AVX2 static uint32_t rank_select_avx2(uint32_t *cand, i64 n, i64 need, i64 *room, i64 *equal) {
    const int32_t *s = (const int32_t *)cand;
    const i64 padded = (n + 7) & ~(i64)7;
    for (i64 j = n; j < padded; j++) cand[j] = INT32_MAX;  /* never below the result: never chosen */
    /* The pads are counted too (whole vectors, no tail): they lie above every key. */
    const __m256i needv = _mm256_set1_epi32((int)(need + padded - n));
    __m256i best = _mm256_set1_epi32(INT32_MAX);
    for (i64 i = 0; i < padded; i += 8) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(s + i));
        __m256i above0 = _mm256_setzero_si256(), above1 = _mm256_setzero_si256();  /* minus the counts */
        for (i64 j = 0; j < padded; j += 8)
            for (int l = 0; l < 8; l += 2) {
                above0 = _mm256_add_epi32(above0, _mm256_cmpgt_epi32(_mm256_set1_epi32(s[j + l]), k));
                above1 = _mm256_add_epi32(above1, _mm256_cmpgt_epi32(_mm256_set1_epi32(s[j + l + 1]), k));
            }
        const __m256i above = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_add_epi32(above0, above1));
        const __m256i fits = _mm256_cmpgt_epi32(needv, above);  /* fewer than need keys above */
        best = _mm256_min_epi32(best, _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), k, fits));
    }
    /* the smallest lane of best, in every lane: the result */
    best = _mm256_min_epi32(best, _mm256_permute2x128_si256(best, best, 1));
    best = _mm256_min_epi32(best, _mm256_shuffle_epi32(best, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m256i tv = _mm256_min_epi32(best, _mm256_shuffle_epi32(best, _MM_SHUFFLE(2, 3, 0, 1)));
    __m256i above = _mm256_setzero_si256(), same = _mm256_setzero_si256();  /* minus the counts */
    for (i64 i = 0; i < padded; i += 8) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(s + i));
        above = _mm256_add_epi32(above, _mm256_cmpgt_epi32(k, tv));
        same = _mm256_add_epi32(same, _mm256_cmpeq_epi32(k, tv));
    }
    /* lane 0: the sum of above's lanes, lane 1: of same's */
    const __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(above, same), _mm256_setzero_si256());
    const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    const i64 n_above = -(i64)_mm_cvtsi128_si32(sums) - (padded - n);  /* the INT32_MAX pads are above t */
    *room = need - n_above;
    *equal = -(i64)_mm_extract_epi32(sums, 1);
    return (uint32_t)_mm256_cvtsi256_si32(tv);
}
/* The lanes of the partial last vector at index i of a list of n (n - i < 8) that hold list entries: the
   vector is read whole (scratch lists have SLACK keys after them) and its lanes past the end masked off. */
AVX2 static inline __m256i lanes_within(i64 i, i64 n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* count_above (same contract); a partial last vector is masked, not counted key by key. */
AVX2 static void count_above_avx2(const uint32_t *c, i64 n, const int32_t bounds[4], i64 at_least[4]) {
    const __m256i b0 = _mm256_set1_epi32(bounds[0]), b1 = _mm256_set1_epi32(bounds[1]);
    const __m256i b2 = _mm256_set1_epi32(bounds[2]), b3 = _mm256_set1_epi32(bounds[3]);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;  /* minus the counts */
    i64 i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(c + i));
        c0 = _mm256_add_epi32(c0, _mm256_cmpgt_epi32(k, b0));
        c1 = _mm256_add_epi32(c1, _mm256_cmpgt_epi32(k, b1));
        c2 = _mm256_add_epi32(c2, _mm256_cmpgt_epi32(k, b2));
        c3 = _mm256_add_epi32(c3, _mm256_cmpgt_epi32(k, b3));
    }
    if (i < n) {
        const __m256i valid = lanes_within(i, n), k = _mm256_loadu_si256((const __m256i *)(c + i));
        c0 = _mm256_add_epi32(c0, _mm256_and_si256(_mm256_cmpgt_epi32(k, b0), valid));
        c1 = _mm256_add_epi32(c1, _mm256_and_si256(_mm256_cmpgt_epi32(k, b1), valid));
        c2 = _mm256_add_epi32(c2, _mm256_and_si256(_mm256_cmpgt_epi32(k, b2), valid));
        c3 = _mm256_add_epi32(c3, _mm256_and_si256(_mm256_cmpgt_epi32(k, b3), valid));
    }
    /* lane j of the sum: the total of c_j */
    const __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(c0, c1), _mm256_hadd_epi32(c2, c3));
    int32_t sums[4];
    _mm_storeu_si128((__m128i *)sums, _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1)));
    for (int j = 0; j < 4; j++) at_least[j] = -sums[j];
}
WRITE_RANGE(write_range32_avx2, uint32_t, 0x7fffffffu, AVX2)
WRITE_RANGE(write_range16_avx2, uint16_t, 0x7fffu, AVX2)
WRITE_ROW(write_ranges32_avx2, write_range32_avx2, uint32_t, AVX2)
WRITE_ROW(write_row16_avx2, write_range16_avx2, uint16_t, AVX2)
MASKED_GRAD(masked_grad32_avx2, uint32_t, AVX2)
MASKED_GRAD(masked_grad16_avx2, uint16_t, AVX2)

/* LEFT_PACK[bits]: the lane numbers of the set bits of an 8-lane mask, lowest first, one per byte; a
   permute by them packs the selected lanes to the front of a vector (stream compaction).
   BYTES_OF[bits]: byte j is bit j of an 8-lane mask (0 or 1): a bool mask from a vector compare. */
static uint64_t LEFT_PACK[256], BYTES_OF[256];
__attribute__((constructor)) static void build_tables(void) {
    for (int bits = 0; bits < 256; bits++) {
        uint64_t lanes = 0, bytes = 0;
        int m = 0;
        for (int j = 0; j < 8; j++) {
            if (bits >> j & 1) lanes |= (uint64_t)j << (8 * m++);
            bytes |= (uint64_t)(bits >> j & 1) << (8 * j);
        }
        LEFT_PACK[bits] = lanes;
        BYTES_OF[bits] = bytes;
    }
}

/* Append the lanes of v selected by bits to out + m (8 keys are stored: out needs slack); returns new m. */
AVX2 static inline i64 append_selected(__m256i v, int bits, uint32_t *out, i64 m) {
    const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)LEFT_PACK[bits]));
    _mm256_storeu_si256((__m256i *)(out + m), _mm256_permutevar8x32_epi32(v, lanes));
    return m + __builtin_popcount(bits);
}

/* The outputs of one vector: y = v in the lanes keep sets, +0 elsewhere; mask bytes 1 and 0. y or mask may be
   NULL (not wanted). */
AVX2 static inline __attribute__((always_inline)) void store_kept(__m256i v, __m256i keep, uint32_t *y, uint8_t *mask) {
    if (y) _mm256_storeu_si256((__m256i *)y, _mm256_and_si256(v, keep));
    if (mask) {
        const uint64_t bytes = BYTES_OF[_mm256_movemask_ps(_mm256_castsi256_ps(keep))];
        memcpy(mask, &bytes, 8);
    }
}

/* One vector of a write pass: lane j keeps v where key(v) >= low's lane j; flip all ones inverts the choice. */
AVX2 static inline void write_kept(__m256i v, __m256i low, __m256i nan, __m256i flip, uint32_t *y, uint8_t *mask) {
    const __m256i k = _mm256_min_epu32(_mm256_and_si256(v, _mm256_set1_epi32(0x7fffffff)), nan);
    store_kept(v, _mm256_xor_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(k, low), k), flip), y, mask);
}

AVX2 static i64 nonzero_keys_avx2(const void *x, i64 len, i64 s_pos, int wide, uint32_t nan_key, uint32_t *out,
                                  uint32_t *top) {
    if (s_pos != 1) return nonzero_keys_plain(x, len, s_pos, wide, nan_key, out, top);
    const __m256i magnitude = _mm256_set1_epi32(wide ? 0x7fffffff : 0x7fff), nan = _mm256_set1_epi32((int)nan_key);
    const __m256i zero = _mm256_setzero_si256();
    __m256i vtop = zero;
    i64 m = 0, p = 0;
    for (; p + 8 <= len; p += 8) {
        const __m256i raw = wide ? _mm256_loadu_si256((const __m256i *)((const uint32_t *)x + p))
                                 : _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + p)));
        const __m256i k = _mm256_min_epu32(_mm256_and_si256(raw, magnitude), nan);
        vtop = _mm256_max_epu32(vtop, k);
        m = append_selected(k, _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, zero))), out, m);
    }
    vtop = _mm256_max_epu32(vtop, _mm256_permute2x128_si256(vtop, vtop, 1));
    vtop = _mm256_max_epu32(vtop, _mm256_shuffle_epi32(vtop, _MM_SHUFFLE(1, 0, 3, 2)));
    vtop = _mm256_max_epu32(vtop, _mm256_shuffle_epi32(vtop, _MM_SHUFFLE(2, 3, 0, 1)));
    const uint32_t t = (uint32_t)_mm256_cvtsi256_si32(vtop);
    uint32_t tail_top;
    m += nonzero_keys_plain(wide ? (const void *)((const uint32_t *)x + p) : (const void *)((const uint16_t *)x + p),
                            len - p, 1, wide, nan_key, out + m, &tail_top);
    *top = tail_top > t ? tail_top : t;
    return m;
}

/* Write a contiguous row (len >= 8) keeping the elements whose magnitude bits exceed `below` (xor flip): one
   compare on the raw bits, no NaN clamp (write_row32_avx2 says when that is exact). The last vector overlaps
   the one before it (rewriting the same values: y never aliases x) instead of a scalar tail. Inlined with
   constant want_y / want_mask, so each output combination gets its own loop. */
AVX2 static inline __attribute__((always_inline)) void keep_above32(const uint32_t *x, uint32_t *y, uint8_t *mask,
                                                                 i64 len, int32_t below, int invert, int want_y,
                                                                 int want_mask) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), belowv = _mm256_set1_epi32(below);
    const __m256i flip = _mm256_set1_epi32(invert ? -1 : 0);
    for (i64 p = 0; p < len; p += 8) {
        const i64 q = p + 8 <= len ? p : len - 8;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + q));
        const __m256i keep = _mm256_xor_si256(_mm256_cmpgt_epi32(_mm256_and_si256(v, magnitude), belowv), flip);
        store_kept(v, keep, want_y ? y + q : NULL, want_mask ? mask + q : NULL);
    }
}

/* write_row32 with a contiguous row in one vector pass. Where one threshold holds for the whole row (cut at
   len, or at 0, which only t == 0 gives: the usual case), it is at most the NaN key (t is a key), so
   key(x) >= lowest is (x's magnitude bits) > lowest - 1 without clamping NaNs to the NaN key (every NaN's
   bits lie at or above it): keep_above32, about half the instructions. Otherwise ties past cut are dropped
   by comparing positions. */
AVX2 static void write_row32_avx2(const uint32_t *x, uint32_t *y, uint8_t *mask, i64 len, i64 s_pos,
                                  uint32_t nan_key, uint32_t t, i64 cut, int invert) {
    if (s_pos != 1 || len < 8 || len > INT32_MAX) {
        write_ranges32_avx2(x, y, mask, len, s_pos, nan_key, t, cut, invert);
        return;
    }
    if (cut <= 0 || cut >= len) {
        const int32_t below = (int32_t)(cut >= len ? t : t + 1) - 1;  /* -1 when t is 0 and cut len: keeps all */
        if (y && mask) keep_above32(x, y, mask, len, below, invert, 1, 1);
        else if (y) keep_above32(x, y, mask, len, below, invert, 1, 0);
        else keep_above32(x, y, mask, len, below, invert, 0, 1);
        return;
    }
    const __m256i nan = _mm256_set1_epi32((int)nan_key), flip = _mm256_set1_epi32(invert ? -1 : 0);
    const __m256i low = _mm256_set1_epi32((int)t), before_cut = _mm256_set1_epi32((int32_t)cut - 1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (i64 p = 0; p < len; p += 8) {
        const i64 q = p + 8 <= len ? p : len - 8;
        /* t + 1 from cut on: q + lane > cut - 1 is all ones there, and subtracting -1 adds 1 */
        const __m256i lowq = _mm256_sub_epi32(low, _mm256_cmpgt_epi32(_mm256_add_epi32(_mm256_set1_epi32((int32_t)q), lane), before_cut));
        write_kept(_mm256_loadu_si256((const __m256i *)(x + q)), lowq, nan, flip, y ? y + q : NULL, mask ? mask + q : NULL);
    }
}

AVX2 static i64 compact_avx2(const uint32_t *src, i64 n, int lo, uint32_t want, uint32_t *dst) {
    const __m256i w = _mm256_set1_epi32((int)want);
    const __m128i shift = _mm_cvtsi32_si128(lo);
    i64 m = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(src + i));
        const __m256i hit = _mm256_cmpeq_epi32(_mm256_srl_epi32(k, shift), w);
        m = append_selected(k, _mm256_movemask_ps(_mm256_castsi256_ps(hit)), dst, m);
    }
    if (i < n) {
        const __m256i k = _mm256_loadu_si256((const __m256i *)(src + i));
        const __m256i hit = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_srl_epi32(k, shift), w), lanes_within(i, n));
        m = append_selected(k, _mm256_movemask_ps(_mm256_castsi256_ps(hit)), dst, m);
    }
    return m;
}
#endif

/* The write pass of LANES adjacent channel rows (channel stride 1, position stride s_pos: tokens (N, T, D),
   channels_last maps) across the channels, LANES contiguous elements at a time: lane l keeps key >= lowest
   before cut[l] and key > lowest after it. */
#define LANES 8
#define WRITE_LANES(NAME, T, MAGNITUDE, ATTR)                                                           \
    ATTR static void NAME(const T *restrict x, T *restrict y, uint8_t *restrict mask, i64 len, i64 s_pos, \
                          uint32_t nan_key, const uint32_t *lowest, const i64 *cut, int invert) {        \
        const T nan = (T)nan_key;                                                                       \
        for (i64 p = 0; p < len; p++) {                                                                 \
            const i64 at = p * s_pos;                                                                   \
            for (int l = 0; l < LANES; l++) {                                                           \
                const T k = (T)(x[at + l] & MAGNITUDE) < nan ? (T)(x[at + l] & MAGNITUDE) : nan;        \
                const T keep = (T)((k >= lowest[l] + (uint32_t)(p >= cut[l])) ^ invert);                \
                if (mask) mask[at + l] = (uint8_t)keep;                                                 \
                if (y) y[at + l] = x[at + l] & (T)(0u - keep);                                          \
            }                                                                                           \
        }                                                                                               \
    }
WRITE_LANES(write_lanes32_plain, uint32_t, 0x7fffffffu, )
WRITE_LANES(write_lanes16_plain, uint16_t, 0x7fffu, )
/* The keys of positions [from, len) of LANES strided rows (element p of lane l at x[p * s_pos + l]) into
   contiguous rows rows[l * ld + p]; top[l] rises to lane l's largest key, nonzero[l] counts its keys that are
   not 0. */
static void gather_lanes_from(const void *x, uint32_t *rows, i64 from, i64 len, i64 s_pos, i64 ld, int wide,
                              uint32_t nan_key, uint32_t *top, i64 *nonzero) {
    for (i64 p = from; p < len; p++)
        for (int l = 0; l < LANES; l++) {
            const uint32_t k = key_of(x, p * s_pos + l, wide, nan_key);
            rows[l * ld + p] = k;
            top[l] = k > top[l] ? k : top[l];
            nonzero[l] += k != 0;
        }
}

/* The keys of LANES strided rows into contiguous rows; top[l]: lane l's largest key, nonzero[l]: how many of
   its keys are not 0. */
static void gather_lanes(const void *x, uint32_t *rows, i64 len, i64 s_pos, i64 ld, int wide, uint32_t nan_key,
                         uint32_t *top, i64 *nonzero) {
    for (int l = 0; l < LANES; l++) { top[l] = 0; nonzero[l] = 0; }
    gather_lanes_from(x, rows, 0, len, s_pos, ld, wide, nan_key, top, nonzero);
}

static void gather_lanes32(const uint32_t *x, uint32_t *rows, i64 len, i64 s_pos, i64 ld, uint32_t nan_key,
                           uint32_t *top, i64 *nonzero) {
    gather_lanes(x, rows, len, s_pos, ld, 1, nan_key, top, nonzero);
}

#ifdef HAVE_AVX2_PATH
WRITE_LANES(write_lanes16_avx2, uint16_t, 0x7fffu, AVX2)

AVX2 static void write_lanes32_avx2(const uint32_t *x, uint32_t *y, uint8_t *mask, i64 len, i64 s_pos,
                                    uint32_t nan_key, const uint32_t *lowest, const i64 *cut, int invert) {
    const __m256i nan = _mm256_set1_epi32((int)nan_key), flip = _mm256_set1_epi32(invert ? -1 : 0);
    const __m256i low = _mm256_loadu_si256((const __m256i *)lowest);
    int32_t cuts[LANES];
    for (int l = 0; l < LANES; l++) cuts[l] = (int32_t)cut[l];
    const __m256i cutv = _mm256_loadu_si256((const __m256i *)cuts);
    for (i64 p = 0; p < len; p++) {
        const i64 at = p * s_pos;
        /* lowest + 1 from cut on: p >= cut <=> p + 1 > cut, all ones there, and subtracting -1 adds 1 */
        const __m256i lowp = _mm256_sub_epi32(low, _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)p + 1), cutv));
        write_kept(_mm256_loadu_si256((const __m256i *)(x + at)), lowp, nan, flip, y ? y + at : NULL,
                   mask ? mask + at : NULL);
        if (y) __builtin_prefetch(y + at + NEXT_LINE, 1, 3);
    }
}

/* gather_lanes32 by 8x8 transposes in registers. */
AVX2 static void gather_lanes32_avx2(const uint32_t *x, uint32_t *rows, i64 len, i64 s_pos, i64 ld, uint32_t nan_key,
                                    uint32_t *top, i64 *nonzero) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), nan = _mm256_set1_epi32((int)nan_key);
    __m256i vtop = _mm256_setzero_si256(), vzeros = _mm256_setzero_si256();
    i64 p = 0;
    for (; p + 8 <= len; p += 8) {
        __m256i r[8], t[8];
        for (int j = 0; j < 8; j++) {  /* keys of 8 positions, one vector across the 8 channels each */
            r[j] = _mm256_min_epu32(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + (p + j) * s_pos)),
                                                     magnitude), nan);
            __builtin_prefetch(x + (p + j) * s_pos + NEXT_LINE, 0, 3);
            vtop = _mm256_max_epu32(vtop, r[j]);
            vzeros = _mm256_sub_epi32(vzeros, _mm256_cmpeq_epi32(r[j], _mm256_setzero_si256()));
        }
        for (int j = 0; j < 8; j += 2) {
            t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
            t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
        }
        for (int j = 0; j < 8; j += 4) {
            r[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
            r[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
            r[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
            r[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
        }
        /* r[0..3]: lanes 0,1,2,3 (low half) and 4,5,6,7 (high half) of positions p..p+3; r[4..7]: p+4..p+7 */
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_si256((__m256i *)(rows + j * ld + p), _mm256_permute2x128_si256(r[j], r[j + 4], 0x20));
            _mm256_storeu_si256((__m256i *)(rows + (j + 4) * ld + p), _mm256_permute2x128_si256(r[j], r[j + 4], 0x31));
        }
    }
    uint32_t zeros[LANES];
    _mm256_storeu_si256((__m256i *)top, vtop);
    _mm256_storeu_si256((__m256i *)zeros, vzeros);
    for (int l = 0; l < LANES; l++) nonzero[l] = p - zeros[l];
    gather_lanes_from(x, rows, p, len, s_pos, ld, 1, nan_key, top, nonzero);
}
#endif

/* One instruction set's versions of the row steps that vectorise. */
typedef struct {
    i64 (*nonzero_keys)(const void *, i64, i64, int, uint32_t, uint32_t *, uint32_t *);
    i64 (*compact)(const uint32_t *, i64, int, uint32_t, uint32_t *);
    uint32_t (*rank_select)(uint32_t *, i64, i64, i64 *, i64 *);
    void (*count_above)(const uint32_t *, i64, const int32_t *, i64 *);
    void (*write32)(const uint32_t *, uint32_t *, uint8_t *, i64, i64, uint32_t, uint32_t, i64, int);
    void (*write16)(const uint16_t *, uint16_t *, uint8_t *, i64, i64, uint32_t, uint32_t, i64, int);
    void (*gather_lanes32)(const uint32_t *, uint32_t *, i64, i64, i64, uint32_t, uint32_t *, i64 *);
    void (*write_lanes32)(const uint32_t *, uint32_t *, uint8_t *, i64, i64, uint32_t, const uint32_t *, const i64 *, int);
    void (*write_lanes16)(const uint16_t *, uint16_t *, uint8_t *, i64, i64, uint32_t, const uint32_t *, const i64 *, int);
    void (*masked32)(const uint32_t *, const uint8_t *, uint32_t *, i64, i64);
    void (*masked16)(const uint16_t *, const uint8_t *, uint16_t *, i64, i64);
} steps;

static const steps PLAIN = {nonzero_keys_plain, compact_plain, rank_select_plain, count_above_plain,
                            write_row32_plain, write_row16_plain,
                            gather_lanes32, write_lanes32_plain, write_lanes16_plain,
                            masked_grad32_plain, masked_grad16_plain};
#ifdef HAVE_AVX2_PATH
static const steps WITH_AVX2 = {nonzero_keys_avx2, compact_avx2, rank_select_avx2, count_above_avx2,
                                write_row32_avx2, write_row16_avx2,
                                gather_lanes32_avx2, write_lanes32_avx2, write_lanes16_avx2,
                                masked_grad32_avx2, masked_grad16_avx2};
#endif

/* The AVX2 steps where asked for (simd) and the CPU has AVX2, else the portable ones. */
static const steps *instruction_set(int simd) {
#ifdef HAVE_AVX2_PATH
    if (simd && __builtin_cpu_supports("avx2")) return &WITH_AVX2;
#endif
    (void)simd;
    return &PLAIN;
}

/* The need-th largest of cand[0..n) (keys <= top < 2^nbits; zeros may be among them, need never reaches
   them): an MSB-first radix select, each level
   packing the survivors of one digit into a shorter list, ranking by counting once at most RANK_MAX
   candidates are left. The first digit is the top first_bits bits (the exponent and one more bit), found by
   counting; the others are 8-bit digits found by histograms. *room, *equal as for rank_select.
   a, b: scratch of n keys; cand, a and b each have SLACK keys after them. */
static uint32_t radix_select(const steps *s, uint32_t *cand, i64 n, i64 need, uint32_t top, int nbits,
                             int first_bits, uint32_t *a, uint32_t *b, i64 *room, i64 *equal) {
    uint32_t counts[256];
    uint32_t prefix = 0;
    int hi = nbits;
    if (n > RANK_MAX) {
        /* The first digit by counting the keys at or above each digit below the largest key's, 4 digits per
           pass: the K-th largest of an activation map lies a few octaves below the largest, where this costs
           a fraction of a histogram. Digits are half-octaves (the exponent and one more bit: half the
           candidates left to rank) when need is in the upper half, where the K-th lies close to the top;
           octaves below it (fewer steps down). Two passes at most, then 8-bit histograms from the top. */
        const int lo = nbits - first_bits + (2 * need > n);
        i64 above = 0;
        for (int32_t d = (int32_t)(top >> lo), pass = 0; pass < 2; pass++, d -= 4) {
            int32_t bounds[4];
            i64 at_least[4];
            for (int j = 0; j < 4; j++) bounds[j] = d - j > 0 ? (int32_t)(((uint32_t)(d - j) << lo) - 1u) : -1;
            s->count_above(cand, n, bounds, at_least);
            int j = 0;
            while (j < 4 && at_least[j] < need) j++;
            if (j == 4) { above = at_least[3]; continue; }
            above = j ? at_least[j - 1] : above;
            need -= above;
            prefix = (uint32_t)(d - j) << lo;
            hi = lo;
            if (at_least[j] - above < n) {
                uint32_t *dst = cand == a ? b : a;
                n = s->compact(cand, n, lo, prefix >> lo, dst);
                cand = dst;
            }
            top = 0xffffffffu;
            break;
        }
    }
    while (hi > 0) {
        if (n <= RANK_MAX) return s->rank_select(cand, n, need, room, equal);
        int lo = hi > 8 ? hi - 8 : 0;
        uint32_t dmask = (1u << (hi - lo)) - 1u;
        histogram(cand, n, lo, dmask, counts);
        /* The digit d with fewer than need keys above it and at least need at or above, found from the
           nearer end: down from the largest key's digit, or up from 0 when need is in the lower half. */
        i64 above = 0;
        uint32_t d = (top >> lo) & dmask;
        if (2 * need <= n) {
            while (above + counts[d] < need) above += counts[d--];
        } else {
            i64 below = 0;
            for (d = 0; below + counts[d] <= n - need; d++) below += counts[d];
            above = n - below - counts[d];
        }
        need -= above;
        prefix |= d << lo;
        hi = lo;
        if (counts[d] == n) continue;  /* every candidate has this digit: nothing to drop */
        uint32_t *dst = cand == a ? b : a;
        n = s->compact(cand, n, lo, prefix >> lo, dst);  /* survivors share every bit above lo with prefix */
        top = 0xffffffffu;  /* no cheap bound on the survivors' next digit */
        cand = dst;
        if (n == 1) { prefix = cand[0]; break; }
    }
    *room = need;
    *equal = n;
    return prefix;
}

/* The position just after the room-th key equal to t (room >= 1 such keys exist): the tie rule 'first'
   keeps the keys equal to t before it and drops those after. */
static i64 tie_cutoff(const void *x, i64 len, i64 s_pos, int wide, uint32_t nan_key, uint32_t t, i64 room) {
    i64 p = 0;
    for (i64 seen = 0; p < len && seen < room; p++) seen += key_of(x, p * s_pos, wide, nan_key) == t;
    return p;
}

/* out[i] = mask[i] ? grad[i] : +0 for n elements that grad, mask and out lay out alike: the gradient of a
   Top-K layer, in one pass at memory speed (torch.where with a scalar takes several times as long). The
   threads take equal contiguous parts. */
void topk_masked_grad(const void *grad, const uint8_t *mask, void *out, i64 n, int wide, int threads, int simd) {
    const steps *s = instruction_set(simd);
    #pragma omp parallel num_threads(threads)
    {
        const i64 parts = THREAD_COUNT, from = n * THREAD_ID / parts, to = n * (THREAD_ID + 1) / parts;
        if (wide) s->masked32((const uint32_t *)grad, mask, (uint32_t *)out, from, to);
        else s->masked16((const uint16_t *)grad, mask, (uint16_t *)out, from, to);
    }
}

/* The threshold of one row (element p at x[p * s_pos], wide: 32-bit elements) from candidate keys
   cand[0..n) of nbits bits: its non-zero keys, or all its keys; nonzero of them are non-zero, top is the
   largest. Keep the keys above *t, and the keys equal to *t before position *cut. a, b: scratch of n keys. */
static void threshold(const steps *s, uint32_t *cand, i64 n, i64 nonzero, uint32_t top, int nbits,
                      const void *x, i64 len, i64 s_pos, int wide, uint32_t nan_key, int first_bits, i64 count,
                      int ties_all, uint32_t *a, uint32_t *b, uint32_t *t, i64 *cut) {
    /* At most `count` non-zeros: no selection, the threshold is 0 and the first zeros fill up. */
    i64 room = count - nonzero, equal = len - nonzero;
    *t = nonzero > count ? radix_select(s, cand, n, count, top, nbits, first_bits, a, b, &room, &equal) : 0;
    /* All keys equal to t are kept when they fit (or under the tie rule 'all'), none when room == 0
       (exactly `count` non-zeros, t == 0), else the first `room`. */
    *cut = room <= 0 ? 0 : room >= equal || ties_all ? len : tie_cutoff(x, len, s_pos, wide, nan_key, *t, room);
}

/* The threshold of one row (element p at x[p * s_pos]) as threshold() sets it; the row's non-zero keys are
   packed into cand first. */
static void row_threshold(const steps *s, const void *x, i64 len, i64 s_pos, int wide, uint32_t nan_key,
                          int first_bits, i64 count, int ties_all, uint32_t *cand, uint32_t *a, uint32_t *b,
                          uint32_t *t, i64 *cut) {
    uint32_t top;
    const i64 nonzero = s->nonzero_keys(x, len, s_pos, wide, nan_key, cand, &top);
    threshold(s, cand, nonzero, nonzero, top, wide ? 31 : 15, x, len, s_pos, wide, nan_key, first_bits, count,
              ties_all, a, b, t, cut);
}

/* Scratch keys per thread for rows of len positions: the row steps' three buffers and LANES gathered rows. */
i64 topk_scratch_keys(i64 len) { return (3 + LANES) * (len + SLACK); }

/* Rows r = o * inner + i (o < outer, i < inner); element p < len of row r sits at
   offset o * s_outer + i * s_inner + p * s_pos (in elements) of x, y and mask alike.
   Keys: the bit pattern with the sign cleared (so -0.0 == 0.0), every NaN mapped to nan_key (the
   infinity's key + 1): NaN ranks largest, as in torch.topk. y or mask may be NULL. first_bits: the
   exponent's width + 1. scratch: topk_scratch_keys(len) keys per thread. simd: use AVX2 where the CPU has it.
   Where channels are adjacent (s_inner == 1) and positions strided, LANES channels are done together:
   their keys are gathered into contiguous scratch rows, and the values written back across the channels. */
void topk_select(const void *x, void *y, uint8_t *mask, uint32_t *scratch, int wide, uint32_t nan_key,
                 int first_bits, i64 outer, i64 inner, i64 len, i64 s_outer, i64 s_inner, i64 s_pos,
                 i64 count, int ties_all, int invert, int threads, int simd) {
    const steps *s = instruction_set(simd);
    const i64 esize = wide ? 4 : 2, ld = len + SLACK;
    const i64 groups = s_inner == 1 && s_pos != 1 && len > 1 ? inner / LANES : 0;  /* per outer index */
    const i64 single = inner - groups * LANES;  /* channels left to do one by one, per outer index */
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *cand = scratch + (size_t)THREAD_ID * (size_t)topk_scratch_keys(len);
        uint32_t *a = cand + ld, *b = a + ld, *gathered = b + ld;
        #pragma omp for schedule(static) nowait
        for (i64 g = 0; g < outer * groups; g++) {
            const i64 base = ((g / groups) * s_outer + (g % groups) * LANES) * esize;
            const void *xg = (const char *)x + base;
            void *yg = y ? (char *)y + base : NULL;
            uint8_t *mg = mask ? mask + base / esize : NULL;
            uint32_t lowest[LANES], top[LANES];
            i64 cut[LANES], nonzero[LANES];
            /* The lanes' keys, rank zeros and all: packing the non-zeros would cost another pass. */
            if (wide) s->gather_lanes32((const uint32_t *)xg, gathered, len, s_pos, ld, nan_key, top, nonzero);
            else gather_lanes(xg, gathered, len, s_pos, ld, 0, nan_key, top, nonzero);
            for (int l = 0; l < LANES; l++) {
                uint32_t *keys = gathered + l * ld;
                threshold(s, keys, len, nonzero[l], top[l], wide ? 31 : 15, keys, len, 1, 1, nan_key, first_bits,
                          count, ties_all, a, b, &lowest[l], &cut[l]);
            }
            if (wide) s->write_lanes32((const uint32_t *)xg, (uint32_t *)yg, mg, len, s_pos, nan_key, lowest, cut, invert);
            else s->write_lanes16((const uint16_t *)xg, (uint16_t *)yg, mg, len, s_pos, nan_key, lowest, cut, invert);
        }
        #pragma omp for schedule(static)
        for (i64 r = 0; r < outer * single; r++) {
            const i64 base = ((r / single) * s_outer + (groups * LANES + r % single) * s_inner) * esize;
            const void *xr = (const char *)x + base;
            void *yr = y ? (char *)y + base : NULL;
            uint8_t *mr = mask ? mask + base / esize : NULL;
            uint32_t t;
            i64 cut;
            row_threshold(s, xr, len, s_pos, wide, nan_key, first_bits, count, ties_all, cand, a, b, &t, &cut);
            if (wide) s->write32((const uint32_t *)xr, (uint32_t *)yr, mr, len, s_pos, nan_key, t, cut, invert);
            else s->write16((const uint16_t *)xr, (uint16_t *)yr, mr, len, s_pos, nan_key, t, cut, invert);
        }
    }
}
"""

_FLAGS = ["-O3", "-fno-strict-aliasing", "-shared", "-fPIC"]
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
                                ctypes.c_uint32, ctypes.c_int, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.topk_masked_grad.restype = None
    lib.topk_masked_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _I64, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int]
    lib.topk_scratch_keys.restype = _I64
    lib.topk_scratch_keys.argtypes = [_I64]
    return lib


def extensions_disabled() -> bool:
    """``TOPK_PLUGIN_NO_EXT=1``: neither the C kernel nor the Triton kernel is used, only the torch path."""
    return os.environ.get("TOPK_PLUGIN_NO_EXT", "") not in ("", "0")


def _build():
    if extensions_disabled():
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


def supports(x: torch.Tensor, kind: str = "spatial", num_prefix_tokens: int = 0) -> bool:
    """Whether ``select`` handles ``x`` (CPU, float32/float16/bfloat16, kernel available; any rows)."""
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
           invert: bool = False, values: bool = True, mask: bool = True, simd: bool = True):
    """``(y, mask)``: ``x`` zeroed outside the Top-``count`` entries of each channel row (``invert``: inside
    them) and the boolean mask of the entries ``y`` keeps; ``None`` for an output not asked for. Prefix tokens
    are kept. ``x`` must pass ``supports``; the caller validates the arguments (``count`` >= 1, the prefix).
    ``simd=False`` runs the portable loops even on a CPU with AVX2 (the tests compare both)."""
    x, y, kept, (offset, *rows) = channel_rows(x, kind, num_prefix_tokens, values, mask)
    if x.numel():
        esize, threads = x.element_size(), torch.get_num_threads()
        scratch = _scratch(threads * _library().topk_scratch_keys(rows[2]))
        _library().topk_select(
            x.data_ptr() + offset * esize, y.data_ptr() + offset * esize if y is not None else None,
            kept.data_ptr() + offset if kept is not None else None, scratch.data_ptr(), int(esize == 4),
            NAN_KEYS[x.dtype], EXPONENT_BITS[x.dtype] + 1, *rows, count, int(ties == "all"), int(invert), threads, int(simd))
    return y, kept


_SCRATCH = threading.local()
_SCRATCH_KEPT = 2**19  # int32 keys (2 MiB): rows of up to 56x56 positions on 8 threads


def _scratch(keys: int) -> torch.Tensor:
    """At least ``keys`` int32 of kernel scratch. Up to ``_SCRATCH_KEPT`` keys one buffer is kept and reused: a
    fresh one cost ~3 us per call, ~20 us inside a model whose weights evict the caches between calls. One
    buffer per Python thread, since the kernel runs with the GIL released."""
    if keys > _SCRATCH_KEPT:
        return torch.empty(keys, dtype=torch.int32)
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None:
        buffer = _SCRATCH.buffer = torch.empty(_SCRATCH_KEPT, dtype=torch.int32)
    return buffer


def channel_rows(x: torch.Tensor, kind: str, num_prefix_tokens: int, values: bool, mask: bool):
    """``(x, y, kept, geometry)`` for a row kernel: ``x`` detached (made contiguous where its channel rows or its
    outputs' do not share one geometry), the empty outputs asked for (``None`` otherwise) with the prefix tokens
    already written (kept, copied), and ``(offset, outer, inner, length, s_outer, s_inner, s_pos)``: row
    ``(o, i)``, position ``p`` of ``x`` and of both outputs lies at ``offset + o*s_outer + i*s_inner + p*s_pos``."""
    if x.requires_grad:  # a contiguous() copy below must not be recorded
        x = x.detach()
    wanted = [values, mask]
    outputs = _outputs(x, wanted)
    geometry = _geometry(x, kind, num_prefix_tokens)
    if geometry is None or any(t.stride() != x.stride() and _geometry(t, kind, num_prefix_tokens) != geometry
                               for t in outputs if t is not None):
        x = x.contiguous()
        outputs = _outputs(x, wanted)
        geometry = _geometry(x, kind, num_prefix_tokens)
    y, kept = outputs
    if num_prefix_tokens:
        if kept is not None:
            kept[:, :num_prefix_tokens] = True
        if y is not None:
            y[:, :num_prefix_tokens] = x[:, :num_prefix_tokens]
    return x, y, kept, geometry


def masked_grad(grad: torch.Tensor, mask: torch.Tensor, *, simd: bool = True):
    """``grad`` where ``mask``, +0 elsewhere, in the layout of ``torch.empty_like(grad)``; None where the kernel
    does not apply (``supports(grad)`` false, a mask that is not bool, or the two not laid out alike and densely).
    ``simd`` as for ``select``."""
    if not (supports(grad) and mask.dtype == torch.bool and grad.shape == mask.shape):
        return None
    out = torch.empty_like(grad)  # dense: its strides equal grad's only where grad is dense too
    if not out.stride() == grad.stride() == mask.stride():
        return None
    _library().topk_masked_grad(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(),
                                int(grad.element_size() == 4), torch.get_num_threads(), int(simd))
    return out


def _outputs(x: torch.Tensor, wanted) -> list:
    """Empty values and mask like ``x`` (its memory format), or None where not wanted."""
    values, mask = wanted
    return [torch.empty_like(x) if values else None, torch.empty_like(x, dtype=torch.bool) if mask else None]
