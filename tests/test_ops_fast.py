"""The C kernel (``topk_plugin._select``) against a plain sort-based reference and the torch path; the benchmark."""
import contextlib
import csv
import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topk_plugin import TopK, TopKSpec, _select, _triton, keep_count, sparsify, topk, topk_mask
from topk_plugin._library import _BITS_AS_INT, ranked_positions
from topk_plugin.ops import MODES, topk_and_mask

needs_kernel = pytest.mark.skipif(not _select.available(), reason="no C compiler: the C kernel is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_rows(rows: torch.Tensor, count: int, ties: str) -> torch.Tensor:
    """Top-``count`` mask of each row of magnitudes (float64) by stable descending sorts: NaN above every
    magnitude (as torch.topk ranks it), then the magnitude, the earliest position first among equals."""
    nan = rows.isnan()
    magnitude = rows.nan_to_num(nan=0.0)
    order = torch.sort(magnitude, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(nan.gather(-1, order).byte(), dim=-1, descending=True, stable=True).indices)
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, order[:, :count], True)
    if ties == "all":  # every entry whose (is NaN, magnitude) is >= the K-th's
        kth_nan, kth = nan.gather(-1, order[:, count - 1:count]), magnitude.gather(-1, order[:, count - 1:count])
        mask = (nan & ~kth_nan) | ((nan == kth_nan) & (magnitude >= kth))
    return mask


def reference_mask(x: torch.Tensor, count: int, kind: str, ties: str, prefix: int = 0) -> torch.Tensor:
    """The documented rule, per (sample, channel) row, in float64 (exact for every float16/bfloat16/float32)."""
    mag = x.double().abs()
    if kind == "spatial":
        rows = mag.flatten(2).flatten(0, 1)
        return reference_rows(rows, count, ties).reshape(x.shape)
    body = mag[:, prefix:] if x.dim() == 3 else mag.flatten(1, 2)
    n, t, d = body.shape
    mask = reference_rows(body.transpose(1, 2).reshape(n * d, t), count, ties).reshape(n, d, t).transpose(1, 2)
    if x.dim() == 4:
        return mask.reshape(x.shape)
    return torch.cat([torch.ones_like(mask[:, :prefix]), mask], dim=1)


# Small integers scaled by a power of two: many ties and exact zeros, exact in every dtype.
tie_heavy = st.integers(-4, 4).map(lambda v: v * 0.25)
spread = st.floats(-1e3, 1e3, allow_nan=False, width=16)
specials = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0, 0.5])
dims = st.integers(1, 7)


@st.composite
def tensors(draw, kind, value_sets=(tie_heavy, spread)):
    if kind == "spatial" or draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), draw(dims), draw(dims), draw(dims))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(2, 12)), draw(dims))
    values = draw(st.sampled_from(value_sets))
    flat = draw(st.lists(values, min_size=torch.Size(shape).numel(), max_size=torch.Size(shape).numel()))
    x = torch.tensor(flat, dtype=draw(st.sampled_from(DTYPES))).reshape(shape)
    if draw(st.booleans()):  # all-zero channel
        channel_dim = -1 if kind == "token" else 1
        x.narrow(channel_dim, draw(st.integers(0, shape[channel_dim] - 1)), 1).zero_()
    return x


ks = st.one_of(st.floats(0.01, 1.0), st.just(1.0), st.integers(1, 60))


def layouts(x: torch.Tensor):
    """The same values as contiguous, channels_last (4-d) and a non-contiguous view."""
    yield x
    if x.dim() == 4:
        yield x.to(memory_format=torch.channels_last)
    yield x.transpose(0, -1).contiguous().transpose(0, -1)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values (NaN equal to NaN) and dtype."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def hard_values(shape, seed: int, levels: int, zeros: float, special: float, dtype) -> torch.Tensor:
    """Random values with few distinct magnitudes (``levels``; 0: continuous), a fraction of zeros and of
    NaN / ±inf / -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if levels:
        x = torch.randint(-levels, levels + 1, shape, generator=g) / 4.0
    x[torch.rand(shape, generator=g) < zeros] = 0.0
    pick = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])[torch.randint(0, 4, shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < special, pick, x).to(dtype)


def assert_kernel_outputs(x: torch.Tensor, count: int, expected: torch.Tensor, **options) -> None:
    """The kernel's values, mask, values alone and mask alone, inverted and not, against ``expected``; the
    outputs laid out like ``x``."""
    for invert in (False, True):
        kept = expected ^ invert
        y, mask = _select.select(x, count, invert=invert, **options)
        assert torch.equal(mask, kept)
        assert_same(y, x.masked_fill(~kept, 0))
        assert y.stride() == x.stride()
        assert_same(_select.select(x, count, invert=invert, mask=False, **options)[0], y)
        assert torch.equal(_select.select(x, count, invert=invert, values=False, **options)[1], kept)


def draw_case(data, kind: str, k, ties: str):
    """``(x, prefix, count, expected, keep_rest)``: a drawn input with NaN, ±inf, -0.0 and ties, its prefix tokens
    (0 or 1 for an (N, T, D) sequence), the count kept, the reference mask and the mask of the inverted op."""
    x = data.draw(tensors(kind, (tie_heavy, spread, specials)))
    prefix = data.draw(st.integers(0, 1)) if kind == "token" and x.dim() == 3 else 0
    count = keep_count(k, ranked_positions(x, kind, prefix))
    expected = reference_mask(x, count, kind, ties, prefix)
    keep_rest = ~expected if not prefix else torch.cat([expected[:, :prefix], ~expected[:, prefix:]], 1)
    return x, prefix, count, expected, keep_rest


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["spatial", "token"]), k=ks, ties=st.sampled_from(["first", "all"]),
       simd=st.booleans())
def test_mask_and_values_equal_reference(data, kind, k, ties, simd):
    x, prefix, count, expected, keep_rest = draw_case(data, kind, k, ties)
    for view in layouts(x):
        assert _select.supports(view)
        options = dict(kind=kind, ties=ties, num_prefix_tokens=prefix, simd=simd)
        y, mask = _select.select(view, count, **options)
        assert torch.equal(mask, expected)
        assert_same(y, x.masked_fill(~expected, 0))
        assert y.dtype == x.dtype and y.stride() == mask.stride()
        dropped, rest = _select.select(view, count, invert=True, **options)
        assert_same(dropped, x.masked_fill(~keep_rest, 0))
        assert torch.equal(rest, keep_rest)
        values_only = _select.select(view, count, mask=False, **options)
        mask_only = _select.select(view, count, values=False, **options)
        assert values_only[1] is None and mask_only[0] is None
        assert_same(values_only[0], y)
        assert torch.equal(mask_only[1], expected)


# Without a GPU, Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) runs the CUDA kernel on CPU
# tensors: test_triton_kernel_logic_without_a_gpu runs test_triton_kernel_equals_reference so, in a child pytest.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not ((torch.cuda.is_available() or INTERPRETED) and _triton._kernel() is not None),
    reason="needs a CUDA GPU (or Triton's interpreter) and Triton")


@pytest.fixture(scope="module")
def triton_device():
    """Where the Triton kernel's inputs live: the GPU, or the CPU for the interpreter (which has no CUDA device
    to launch on, so ``torch.cuda.device`` is made a no-op)."""
    with pytest.MonkeyPatch.context() as patch:
        if INTERPRETED:
            patch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        yield torch.device("cpu" if INTERPRETED else "cuda")


@needs_triton
@settings(max_examples=20 if INTERPRETED else 60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["spatial", "token"]), k=ks, ties=st.sampled_from(["first", "all"]))
def test_triton_kernel_equals_reference(data, kind, k, ties, triton_device):
    """The CUDA kernel: values and mask, inverted or not, each output alone, in every layout."""
    x, prefix, count, expected, keep_rest = draw_case(data, kind, k, ties)
    for view in layouts(x.to(triton_device)):
        assert INTERPRETED or _triton.supports(view, kind, prefix)
        options = dict(kind=kind, ties=ties, num_prefix_tokens=prefix)
        for invert, kept in ((False, expected), (True, keep_rest)):
            y, mask = _triton.select(view, count, invert=invert, **options)
            assert torch.equal(mask.cpu(), kept) and y.stride() == mask.stride()
            assert_same(y.cpu(), x.masked_fill(~kept, 0))
            assert_same(_triton.select(view, count, invert=invert, mask=False, **options)[0], y)
            assert torch.equal(_triton.select(view, count, invert=invert, values=False, **options)[1], mask)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or _select.extensions_disabled(),
                    reason="no Triton, or TOPK_PLUGIN_NO_EXT=1")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel itself")
def test_triton_kernel_logic_without_a_gpu():
    """The CUDA kernel's selection, tie rules, special values and layouts, checked on every machine: Triton's
    interpreter runs it on CPU tensors against the reference, in a child pytest (triton picks the interpreter
    when it is first imported)."""
    test = f"{__file__}::test_triton_kernel_equals_reference"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="model-sized maps take minutes in the interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind, prefix", [
    ((8, 64, 55, 55), "spatial", 0), ((4, 256, 13, 13), "spatial", 0), ((2, 16, 112, 112), "spatial", 0),
    ((2, 4, 128, 129), "spatial", 0), ((4, 197, 768), "token", 1), ((2, 14, 14, 384), "token", 0)])
def test_triton_kernel_equals_the_torch_path_on_model_sized_maps(shape, kind, prefix, dtype, monkeypatch):
    """Many programs, rows of up to 16384 positions (and one longer, which takes the torch path), ties and
    special values: the CUDA kernel and the torch path give the same outputs through the public op."""
    for seed, (levels, zeros, special) in enumerate([(0, 0.5, 0.0), (3, 0.3, 0.01), (0, 0.0, 0.05)]):
        x = hard_values(shape, seed, levels, zeros, special, dtype).cuda()
        views = [x, x.to(memory_format=torch.channels_last)] if kind == "spatial" else [x]
        for view in views:
            for ties in ("first", "all"):
                options = dict(kind=kind, ties=ties, num_prefix_tokens=prefix)
                with monkeypatch.context() as patch:
                    patch.setattr(_triton, "supports", lambda *args: False)
                    slow, slow_mask = topk_and_mask(view, 0.1, **options)
                fast, fast_mask = topk_and_mask(view, 0.1, **options)
                assert torch.equal(fast_mask, slow_mask) and fast.stride() == slow.stride()
                assert_same(fast, slow)


@needs_kernel
@settings(max_examples=120, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["spatial", "token"]), k=ks, ties=st.sampled_from(["first", "all"]),
       mode=st.sampled_from(MODES), grad=st.booleans())
def test_kernel_and_torch_path_agree(data, kind, k, ties, mode, grad, monkeypatch_module):
    """Every mode and tie rule, on inputs with NaN, ±inf, -0.0 and ties; with and without a gradient."""
    x = data.draw(tensors(kind, (tie_heavy, spread, specials)))
    prefix = data.draw(st.integers(0, 1)) if kind == "token" and x.dim() == 3 else 0
    options = dict(mode=mode, kind=kind, ties=ties, num_prefix_tokens=prefix)
    with torch.set_grad_enabled(grad):
        fast, fast_mask = topk_and_mask(x, k, **options)
        fast_values = topk(x, k, **options)
        with monkeypatch_module.context() as patch:
            patch.setattr(_select, "supports", lambda *args: False)
            slow, slow_mask = topk_and_mask(x, k, **options)
            slow_values = topk(x, k, **options)
    assert torch.equal(fast_mask, slow_mask)
    assert_same(fast, slow)
    assert_same(fast_values, slow_values)
    assert_same(fast_values, fast)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@needs_kernel
def test_zero_heavy_channels_follow_the_tie_rule():
    """After ReLU a channel often has <= K non-zeros: the kernel skips selection, the first zeros fill up."""
    x = torch.zeros(2, 3, 4, 5)
    x[0, 0, 1, 2] = 3.0           # 1 non-zero < K
    x[0, 1, :, :2] = 1.0          # 8 non-zeros > K, all tied
    x[1, 2].view(-1)[-4:] = 2.0   # exactly K non-zeros
    for ties in ("first", "all"):
        count = keep_count(0.2, 20)
        expected = reference_mask(x, count, "spatial", ties)
        assert torch.equal(topk_mask(x, 0.2, ties=ties), expected)
    assert torch.equal(topk_mask(x, 0.2)[0, 0].view(-1).nonzero().squeeze(1), torch.tensor([0, 1, 2, 7]))
    assert topk_mask(x, 0.2, ties="all")[0, 0].all()  # the K-th largest is 0: every zero ties


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["topk", "non_topk"])
def test_gradient_is_masked_and_only_a_bool_mask_is_saved(dtype, mode):
    x = torch.randn(2, 4, 6, 5, dtype=dtype).relu().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = topk(x, 0.2, mode=mode)
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = topk_mask(x, 0.2)
    keep = mask if mode == "topk" else ~mask
    assert [t.dtype for t in saved] == [torch.bool]
    assert torch.equal(x.grad, grad.masked_fill(~keep, 0))


@needs_kernel
def test_token_prefix_is_kept_and_not_ranked():
    x = torch.randn(2, 9, 5)
    x[:, 0] = 0  # a zero CLS token would lose every ranking, yet it is kept
    y = topk(x, 2, kind="token", num_prefix_tokens=1)
    assert torch.equal(y[:, 0], x[:, 0])
    assert ((y[:, 1:] != 0).sum(1) == 2).all()
    non = topk(x, 2, mode="non_topk", kind="token", num_prefix_tokens=1)
    assert torch.equal(non[:, 0], x[:, 0]) and ((non[:, 1:] != 0).sum(1) == 6).all()


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 5, 64, 80), (2, 4, 22, 23), (2, 4, 23, 23)])  # radix / quickselect / radix
def test_long_and_short_rows_with_ties_and_nan_match_reference_on_any_thread_count(shape):
    x = torch.randn(shape).relu()
    x[0, 0, :2] = x[0, 0, 2:4]  # ties inside the kept range
    x[0, 1, 1, 1] = float("nan")
    x[1, 0] = x[1, 0].round()  # ties at the K-th
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for ties in ("first", "all"):
            expected = reference_mask(x, keep_count(0.1, shape[2] * shape[3]), "spatial", ties)
            assert torch.equal(topk_mask(x, 0.1, ties=ties), expected)


@needs_kernel
def test_python_threads_calling_at_once_get_their_own_results():
    """The kernel runs with the GIL released and reuses a scratch buffer: each Python thread must have its own."""
    inputs = [torch.randn(16, 64, 13, 13).relu() for _ in range(4)]
    expected = [reference_mask(x, keep_count(0.1, 169), "spatial", "first") for x in inputs]
    failures = []

    def work(i):
        for _ in range(30):
            if not torch.equal(topk_mask(inputs[i], 0.1), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@needs_kernel
@settings(max_examples=80, deadline=None)
@given(hw=st.sampled_from([(1, 1), (1, 2), (6, 6), (5, 7), (1, 33), (3, 11), (13, 13), (16, 17), (27, 27),
                           (23, 37), (55, 55)]),
       channels=st.integers(1, 4), levels=st.sampled_from([1, 2, 3, 5, 40, 0]), special=st.floats(0, 0.3),
       zeros=st.floats(0, 0.7), fraction=st.floats(0, 1), ties=st.sampled_from(["first", "all"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), simd=st.booleans())
def test_short_rows_and_few_candidates_match_reference(hw, channels, levels, special, zeros, fraction, ties, dtype,
                                                       seed, simd):
    """Rows around the kernel's switch from radix passes to ranking the last <= 32 candidates by counting
    (at once on rows of <= 32 positions; a 27x27 row also switches histograms at 256 keys): every count from
    1 to the row length, few distinct magnitudes (ties at the K-th; levels 0: continuous), zeros (rows with
    <= K non-zeros), NaN, ±inf and -0.0; both tie rules, inverted and not, every output, every mode."""
    shape = (2, channels, *hw)
    x = hard_values(shape, seed, levels, zeros, special, dtype)
    positions = hw[0] * hw[1]
    count = 1 + int(fraction * (positions - 1))
    expected = reference_mask(x, count, "spatial", ties)
    assert_kernel_outputs(x, count, expected, kind="spatial", ties=ties, simd=simd)
    for mode in MODES:  # the op on the kernel against the op on the torch path
        fast = topk_and_mask(x, count, mode=mode, ties=ties)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_select, "supports", lambda *args: False)
            slow = topk_and_mask(x, count, mode=mode, ties=ties)
        assert torch.equal(fast[1], slow[1])
        assert_same(fast[0], slow[0])


@needs_kernel
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_threshold_drops_later_nans_of_any_payload(simd, dtype):
    """More NaNs than K: the first K NaNs are kept; later ones, whatever their payload (quiet NaN patterns sit
    far above the one NaN key), are dropped; in rows long enough for the vector loops, with a tail."""
    x = torch.arange(1, 21, dtype=torch.float32).reshape(1, 1, 4, 5)
    x.view(-1)[[0, 3, 8, 9, 12, 17, 19]] = float("nan")
    x = x.to(dtype)
    bits = x.view(_BITS_AS_INT[dtype]).view(-1)
    bits[8] = bits[8] | 1  # another payload
    bits[12] |= torch.iinfo(bits.dtype).min  # the sign bit: a negative NaN
    kept = torch.zeros(20, dtype=torch.bool)
    kept[[0, 3, 8, 9]] = True
    assert_kernel_outputs(x, 4, kept.reshape(1, 1, 4, 5), kind="spatial", ties="first", simd=simd)


@needs_kernel
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", ["first", "all"])
def test_exactly_k_nans_keeps_every_payload_and_drops_inf(simd, dtype, ties):
    """Exactly K NaNs: the threshold is the NaN key and one threshold holds for the whole row, so the write
    compares raw magnitude bits (no NaN clamp): every NaN, whatever its payload or sign, is kept, and the
    infinities just below, -inf included, are dropped; with a tail after the last whole vector."""
    x = torch.arange(1, 22, dtype=torch.float32).reshape(1, 1, 3, 7)
    x.view(-1)[[2, 9, 15, 20]] = float("nan")
    x.view(-1)[[0, 11]] = torch.tensor([float("inf"), float("-inf")])
    x = x.to(dtype)
    bits = x.view(_BITS_AS_INT[dtype]).view(-1)
    bits[9] = bits[9] | 3  # another payload
    bits[15] |= torch.iinfo(bits.dtype).min  # the sign bit: a negative NaN
    bits[20] = _select.NAN_KEYS[dtype]  # the smallest NaN pattern: the NaN key itself
    kept = torch.zeros(21, dtype=torch.bool)
    kept[[2, 9, 15, 20]] = True
    assert_kernel_outputs(x, 4, kept.reshape(1, 1, 3, 7), kind="spatial", ties=ties, simd=simd)


@needs_kernel
def test_every_nan_bit_pattern_ties(monkeypatch):
    """NaNs differ in payload and sign; all rank equal (above inf), so the earliest wins on both paths."""
    x = torch.tensor([1.0, float("inf"), 0.0, 0.0]).reshape(1, 1, 1, 4)
    x.view(torch.int32)[0, 0, 0, 2:] = torch.tensor([-0x00600000, 0x7FC00000], dtype=torch.int32)  # -nan(smaller payload), nan
    expected = torch.tensor([False, False, True, False]).reshape(1, 1, 1, 4)
    assert torch.equal(topk_mask(x, 1), expected)
    monkeypatch.setattr(_select, "supports", lambda *args: False)
    assert torch.equal(topk_mask(x, 1), expected)


def test_unsupported_input_uses_torch_path():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert not _select.supports(x)
    assert torch.equal(topk_mask(x, 3), reference_mask(x, 3, "spatial", "first"))


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.delenv("TOPK_PLUGIN_NO_EXT", raising=False)
    monkeypatch.setenv("TOPK_PLUGIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="pure-torch"):
        assert _select._build() is None
    monkeypatch.setattr(_select, "_LIB", None)
    assert not _select.supports(torch.ones(1))
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(topk(x, 0.2), x.masked_fill(~reference_mask(x, 5, "spatial", "first"), 0))


@needs_kernel
def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_PLUGIN_CACHE", str(tmp_path))
    lib = _select._build()
    built = list(tmp_path.glob("select_*.so"))
    assert lib is not None and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _select._build() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("openmp", [True, False])
def test_kernel_source_compiles_cleanly_wherever_there_is_a_compiler(tmp_path, monkeypatch, openmp):
    """A broken kernel must fail the suite, not turn every kernel test into a skip (the op would quietly fall
    back to the torch path): compile it with and without OpenMP, warnings as errors."""
    monkeypatch.setenv("TOPK_PLUGIN_CACHE", str(tmp_path))
    threading = ["-fopenmp"] if openmp else ["-Wno-unknown-pragmas"]  # serial: the omp pragmas are ignored
    try:
        lib = _select._compile([*_select._FLAGS, "-Wall", "-Werror", *threading])
    except subprocess.CalledProcessError as err:
        pytest.fail(f"the kernel does not compile:\n{err.stderr.decode()}")
    assert lib.topk_scratch_keys(10) > 30


def test_disabled_by_environment(monkeypatch):
    """TOPK_PLUGIN_NO_EXT=1 turns off both compiled kernels: the C kernel and the Triton kernel."""
    monkeypatch.setenv("TOPK_PLUGIN_NO_EXT", "1")
    assert _select._build() is None
    _triton._kernel.cache_clear()
    try:
        assert _triton._kernel() is None
    finally:
        _triton._kernel.cache_clear()


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="not glibc: no mallopt")
def test_benchmark_steady_allocator_is_accepted_by_glibc():
    """In a child process (the setting lasts for the process): glibc accepts both settings."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_topk.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "sys.exit(0 if m.keep_freed_memory() else 3)")
    assert subprocess.run([sys.executable, "-c", code, str(path)], timeout=300).returncode == 0


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_topk.py"
    spec = importlib.util.spec_from_file_location("bench_topk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_baseline_is_the_same_op_and_smoke_run_writes_its_table(tmp_path):
    """Runs with or without the C kernel (the torch path is then what it times)."""
    bench = _load_benchmark()
    x = torch.randn(2, 8, 9, 9)  # continuous values: no ties, so every exact Top-K agrees
    assert torch.equal(bench.paper_topk(x, 0.1), topk(x, 0.1))
    tokens = torch.randn(2, 11, 6)
    assert torch.equal(bench.paper_topk(tokens[:, 1:], 0.6, dim_positions=(1,)),
                       topk(tokens, 0.6, kind="token", num_prefix_tokens=1)[:, 1:])
    with pytest.raises(AssertionError, match="differ"):  # it refuses to time two different computations
        bench.same_output(bench.paper_topk(x, 0.1), topk(x, 0.2), "op")
    # paired: the median of per-round ratios, not a ratio of bests (a slow round moves both of its timings)
    rounds = [{"ours": 102.0, "dense": 100.0}, {"ours": 210.0, "dense": 200.0}, {"ours": 90.0, "dense": 100.0}]
    assert bench.paired_ratio({"rounds": rounds}, "ours", "dense") == pytest.approx(1.02)
    calls = []
    timed = bench.race({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), 2)
    assert calls == ["a", "b", "a", "b", "b", "a"] and len(timed["rounds"]) == 2  # warm-up, then rotated rounds

    out = tmp_path / "bench"
    rows = bench.main(["--smoke", "--out", str(out), "--device", "cpu", "--allocator", "system"])
    assert [r["case"] for r in rows] == ["op forward"] * 2 + ["op fwd+bwd"] * 2 + ["token forward", "model forward"]
    for row in rows:
        if row["case"] == "op fwd+bwd":  # measured: a bool mask against the paper's float mask (+ int64 indices)
            assert row["ours_saved_B/elem"] == 1.0 and row["baseline_saved_B/elem"] >= 4.0
        if row["case"] != "model forward":
            assert row["clone_ms"] > 0 and row["ours/clone_paired"] > 0
        else:
            assert abs(row["ours_overhead_paired_%"]) < 1000 and abs(row["baseline_overhead_paired_%"]) < 1000
            assert 0 < row["ours_layers_in_model_ms"] < row["ours_ms"]
    with open(out / "bench_topk.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == [r["case"] for r in rows]
    assert (out / "bench_topk.png").stat().st_size > 0 and (out / "bench_topk.pdf").stat().st_size > 0
    with pytest.raises(SystemExit, match="already holds an earlier run"):  # never mixes two runs
        bench.main(["--smoke", "--out", str(out), "--cases", "token"])
    with pytest.raises(SystemExit):
        bench.main(["--data", "x", "--out", str(tmp_path / "other")])  # no dead --data option
    for option in ("--repeats", "--threads", "--batch"):  # refused before any folder is made or work is done
        with pytest.raises(SystemExit):
            bench.main([option, "0", "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists()


class Sleep(torch.nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_benchmark_times_only_the_topk_layers_inside_the_model(monkeypatch):
    """The in-model figure sums the Top-K layers' own calls: not the model's other layers, and every call."""
    bench = _load_benchmark()
    model = sparsify(torch.nn.Sequential(Sleep(0.05), torch.nn.ReLU(), torch.nn.ReLU()), TopKSpec(["1", "2"], 0.5))
    forward = TopK.forward
    monkeypatch.setattr(TopK, "forward", lambda self, x: (time.sleep(0.01), forward(self, x))[1])
    ms = bench.layer_time_in_model(model, torch.randn(1, 2, 4, 4), torch.device("cpu"), repeats=3)
    assert 20 <= ms < 50, ms  # two layers of >= 10 ms each; the 50 ms module excluded
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded", "mismatched"])
def test_masked_grad_op_equals_where_in_every_layout(dtype, layout):
    """The backward op (the C kernel where grad and mask are laid out alike and densely, torch elsewhere)
    keeps grad where the mask is set and +0 elsewhere (NaN and -0.0 gradients included), in empty_like(grad)'s
    layout."""
    g = torch.randn(2, 3, 5, 7).to(dtype)
    g.view(-1)[:4] = torch.tensor([float("nan"), -0.0, float("inf"), -1.0]).to(dtype)
    mask = torch.rand(2, 3, 5, 7) < 0.4
    mask.view(-1)[:4] = torch.tensor([True, True, False, False])
    if layout == "channels_last":
        g, mask = g.to(memory_format=torch.channels_last), mask.to(memory_format=torch.channels_last)
    elif layout == "expanded":  # the gradient of a sum: stride 0 everywhere
        g = torch.tensor(2.5, dtype=dtype).expand(2, 3, 5, 7)
    elif layout == "mismatched":
        g = g.to(memory_format=torch.channels_last)
    out = torch.ops.topk_plugin.masked_grad(g, mask)
    expected = torch.where(mask, g, torch.zeros((), dtype=dtype))
    assert_same(out, expected)
    assert out.stride() == torch.empty_like(g).stride()
    assert not (out.view(_BITS_AS_INT[dtype])[~mask] != 0).any()  # +0, not -0


@needs_kernel
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_masked_grad_kernel_in_any_dense_layout(simd, dtype, threads):
    """The C backward takes every dense layout that grad and mask share (permuted, offset into a storage),
    lengths that split unevenly across threads and vectors, and equals torch.where bit for bit."""
    base = torch.randn(3, 5, 7, 11).to(dtype)
    layouts = {"contiguous": base, "permuted": base.permute(2, 0, 3, 1), "offset": base[1:],
               "odd length": base.reshape(-1)[: 3 * 5 * 7 * 11 - 13]}
    torch.set_num_threads(threads)  # conftest's autouse fixture sets it back for the next test
    for name, g in layouts.items():
        mask = torch.empty_like(g, dtype=torch.bool).copy_(torch.rand(g.shape) < 0.4)
        out = _select.masked_grad(g, mask, simd=simd)
        assert out is not None, name  # the kernel ran, not the torch fallback
        assert_same(out, torch.where(mask, g, torch.zeros((), dtype=dtype)))
        assert out.stride() == g.stride(), name


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5, 6)])
def test_masked_grad_op_takes_any_rank(shape):
    g = torch.randn(shape)
    mask = torch.rand(shape) < 0.5
    assert_same(torch.ops.topk_plugin.masked_grad(g, mask), torch.where(mask, g, torch.zeros(())))


def test_gradient_of_the_gradient_is_masked_too():
    """Second order (a gradient penalty through a Top-K layer): the backward is itself differentiable."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).relu().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: topk(t, 0.25), (x,))
    assert torch.autograd.gradgradcheck(lambda t: topk(t, 0.25), (x,))
    xf = x.detach().float().requires_grad_()
    (g,) = torch.autograd.grad(topk(xf, 0.25).pow(2).sum(), xf, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), xf)
    assert torch.equal(gg, 2 * topk_mask(xf, 0.25).float())


@needs_kernel
@settings(max_examples=80, deadline=None)
@given(layout=st.sampled_from(["tokens", "channels_last"]), channels=st.sampled_from([8, 11, 16, 21, 35]),
       positions=st.integers(2, 40), levels=st.sampled_from([2, 5, 0]), special=st.floats(0, 0.3),
       zeros=st.floats(0, 0.7), fraction=st.floats(0, 1), ties=st.sampled_from(["first", "all"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), simd=st.booleans())
def test_channel_last_rows_done_eight_channels_at_a_time_match_reference(layout, channels, positions, levels, special,
                                                                         zeros, fraction, ties, dtype, seed, simd):
    """Tokens (N, T, D) and channels_last maps keep channels adjacent: the kernel gathers 8 channel rows at a
    time (transposing 8x8 blocks, then a tail of positions) and writes them back across the channels; the
    channels beyond a multiple of 8 go one by one. Ties, zeros, NaN, ±inf, -0.0; every output, both tie rules."""
    shape = (2, positions, channels) if layout == "tokens" else (2, channels, 1, positions)
    x = hard_values(shape, seed, levels, zeros, special, dtype)
    kind = "token" if layout == "tokens" else "spatial"
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    count = 1 + int(fraction * (positions - 1))
    expected = reference_mask(x, count, kind, ties)
    assert_kernel_outputs(x, count, expected, kind=kind, ties=ties, simd=simd)


@needs_kernel
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread", [0, 3, 30])
def test_rows_spanning_many_exponents_match_reference(simd, dtype, spread):
    """The kernel finds the first digit by counting down a few half-exponents from the largest key and falls
    back to histograms when the K-th largest lies further down (outliers, magnitudes over many octaves)."""
    g = torch.Generator().manual_seed(spread)
    x = torch.randn(3, 5, 16, 16, generator=g) * 2.0 ** torch.randint(-spread, spread + 1, (3, 5, 16, 16), generator=g)
    x[0, 0, 0, 0] = 1e4  # one outlier far above the rest
    x = x.to(dtype)
    for count in (1, 7, 26, 128, 255):
        for ties in ("first", "all"):
            expected = reference_mask(x, count, "spatial", ties)
            y, mask = _select.select(x, count, kind="spatial", ties=ties, simd=simd)
            assert torch.equal(mask, expected)
            assert_same(y, x.masked_fill(~expected, 0))
