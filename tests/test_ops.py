"""Properties of the Top-K op against a plain reference written here."""
import contextlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from topk_plugin import TopK, _library, keep_count, topk, topk_mask
from topk_plugin.ops import MODES

from conftest import needs_cuda


def reference_mask(x: torch.Tensor, count: int, ties: str) -> torch.Tensor:
    """Spatial Top-K mask of (N, C, H, W), one channel at a time, by a stable descending sort."""
    n, c, h, w = x.shape
    rows = x.reshape(n * c, h * w).abs()
    mask = torch.zeros_like(rows, dtype=torch.bool)
    for i, row in enumerate(rows):
        order = torch.sort(row, descending=True, stable=True).indices
        if ties == "first":
            mask[i, order[:count]] = True
        else:
            mask[i] = row >= row[order[min(count, row.numel()) - 1]]
    return mask.reshape(x.shape)


# Small integers give many ties and exact zeros, the cases where the two tie rules differ.
tie_heavy = st.integers(-3, 3).map(float)
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
ks = st.one_of(st.floats(0.01, 1.0), st.integers(1, 40))


@st.composite
def feature_maps(draw, values=tie_heavy):
    shape = draw(shapes)
    flat = draw(st.lists(values, min_size=shape[0] * shape[1] * shape[2] * shape[3],
                         max_size=shape[0] * shape[1] * shape[2] * shape[3]))
    return torch.tensor(flat, dtype=torch.float32).reshape(shape)


@settings(max_examples=150, deadline=None)
@given(x=feature_maps(), k=ks, ties=st.sampled_from(["first", "all"]))
def test_mask_matches_reference(x, k, ties, device):
    count = keep_count(k, x.shape[2] * x.shape[3])
    assert torch.equal(topk_mask(x.to(device), k, ties=ties).cpu(), reference_mask(x, count, ties))


@settings(max_examples=100, deadline=None)
@given(x=feature_maps(st.floats(-1e3, 1e3, allow_nan=False, width=32)), k=ks)
def test_exactly_k_kept_per_channel_and_kept_dominate_dropped(x, k, device):
    count = keep_count(k, x.shape[2] * x.shape[3])
    mask = topk_mask(x.to(device), k).cpu().flatten(2)
    assert (mask.sum(-1) == count).all()
    magnitude = x.abs().flatten(2)
    smallest_kept = magnitude.masked_fill(~mask, float("inf")).amin(-1)
    largest_dropped = magnitude.masked_fill(mask, -1.0).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


@settings(max_examples=100, deadline=None)
@given(x=feature_maps(), k=ks)
def test_all_ties_keeps_every_entry_equal_to_the_kth(x, k, device):
    first, every = (topk_mask(x.to(device), k, ties=ties).cpu() for ties in ("first", "all"))
    assert (every | ~first).all(), "ties='all' keeps a superset of ties='first'"
    count = keep_count(k, x.shape[2] * x.shape[3])
    kth = x.abs().flatten(2).sort(-1, descending=True).values[..., count - 1]
    assert torch.equal(every.flatten(2), x.abs().flatten(2) >= kth[..., None])


@settings(max_examples=60, deadline=None)
@given(x=feature_maps(), k=ks)
def test_topk_and_non_topk_partition_the_input(x, k, device):
    x = x.to(device)
    kept = topk(x, k, mode="topk")
    rest = topk(x, k, mode="non_topk")
    assert torch.equal(kept + rest, x)
    mask = topk_mask(x, k)
    assert torch.equal(kept, torch.where(mask, x, torch.zeros_like(x)))


@settings(max_examples=60, deadline=None)
@given(x=feature_maps(st.floats(-10, 10, allow_nan=False, width=32)), k=ks, ties=st.sampled_from(["first", "all"]))
def test_mean_replace_puts_the_channel_mean_of_kept_values_on_kept_positions(x, k, ties, device):
    x = x.to(device)
    mask = topk_mask(x, k, ties=ties)
    out = topk(x, k, mode="mean_replace", ties=ties)
    flat_x, flat_m, flat_o = x.flatten(2), mask.flatten(2), out.flatten(2)
    mean = (flat_x * flat_m).sum(-1) / flat_m.sum(-1)
    expected = torch.where(flat_m, mean[..., None], torch.zeros_like(flat_x))
    torch.testing.assert_close(flat_o, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mean_replace_ignores_dropped_infinities(dtype, device):
    """A dropped ±inf takes no part in the mean (multiplying it by a 0 mask gave NaN)."""
    inf = float("inf")
    x = torch.tensor([inf, inf, 1.0, 2.0], dtype=dtype, device=device).reshape(1, 1, 2, 2)
    assert topk(x, 1, mode="mean_replace").flatten().tolist() == [inf, 0.0, 0.0, 0.0]
    tokens = torch.tensor([[[5.0], [-inf], [-inf], [3.0]]], dtype=dtype, device=device)
    out = topk(tokens, 1, mode="mean_replace", kind="token", num_prefix_tokens=1)
    assert out.flatten().tolist() == [5.0, -inf, 0.0, 0.0]


def test_mean_replace_of_float16_does_not_overflow_where_the_mean_fits(device):
    """The kept values' sum is formed in float32: two float16 values near its maximum have a mean that fits."""
    x = torch.tensor([40000.0, 40000.0, 1.0, 1.0], dtype=torch.float16, device=device).reshape(1, 1, 2, 2)
    out = topk(x, 2, mode="mean_replace")
    assert out.flatten().tolist() == [40000.0, 40000.0, 0.0, 0.0]
    assert out.dtype == torch.float16


def test_mean_replace_of_integers_truncates_the_mean_toward_zero():
    for values, mean in (([3, 4, 0, 0], 3), ([-3, -4, 0, 0], -3)):
        x = torch.tensor(values, dtype=torch.int8).reshape(1, 1, 2, 2)
        assert topk(x, 2, mode="mean_replace").flatten().tolist() == [mean, mean, 0, 0]


def test_k_one_and_large_counts_are_identity():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(topk(x, 1.0), x)
    assert torch.equal(topk(x, 35), x)
    assert torch.equal(topk(x, 1000), x)
    assert not topk_mask(x, 1.0, ties="first").logical_not().any()


def test_all_zero_channel_keeps_k_entries_and_outputs_zero(device):
    x = torch.zeros(1, 2, 4, 4)
    x[0, 1] = torch.arange(16.0).reshape(4, 4)
    mask = topk_mask(x.to(device), 3).cpu()
    assert mask[0, 0].sum() == 3 and mask[0, 0].flatten()[:3].all(), "earliest positions win ties"
    assert torch.equal(mask[0, 1].flatten().nonzero().flatten(), torch.tensor([13, 14, 15]))
    assert torch.equal(topk(x.to(device), 3)[0, 0].cpu(), torch.zeros(4, 4))


def test_tie_rules_on_a_max_pooled_map(device):
    # Overlapping max-pools repeat values: the case where the authors' code and Eq. 1 disagree.
    x = torch.nn.functional.max_pool2d(torch.rand(1, 8, 13, 13, device=device), 3, stride=1, padding=1)
    first, every = topk_mask(x, 0.1, ties="first"), topk_mask(x, 0.1, ties="all")
    count = keep_count(0.1, 13 * 13)
    assert (first.flatten(2).sum(-1) == count).all()
    assert (every.flatten(2).sum(-1) > count).any()


def test_keep_count_follows_the_papers_formula():
    assert keep_count(0.1, 55 * 55) == int(0.1 * 55 * 55)
    assert keep_count(0.05, 6 * 6) == 1
    assert keep_count(0.001, 4) == 1
    assert keep_count(7, 4) == 4
    assert keep_count(1.0, 9) == 9


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, -0.2, True, "0.1", None, float("nan")])
def test_bad_k_is_a_value_error_naming_the_value(bad):
    with pytest.raises(ValueError, match=r"k=" + ("nan" if bad != bad else repr(bad).replace(".", r"\.").replace("(", r"\(").replace(")", r"\)"))):
        topk(torch.randn(1, 1, 2, 2), bad)


@pytest.mark.parametrize("kwargs, word", [({"mode": "top"}, "mode"), ({"kind": "pixel"}, "kind"), ({"ties": "random"}, "ties")])
def test_bad_choices_are_value_errors_listing_allowed(kwargs, word):
    with pytest.raises(ValueError, match=f"{word}=.*choose one of"):
        topk(torch.randn(1, 1, 2, 2), 0.5, **kwargs)


def test_spatial_on_a_3d_tensor_names_the_position():
    layer = TopK(0.1, position="classifier.1")
    with pytest.raises(ValueError, match=r"classifier\.1.*\(N, C, H, W\).*\(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))


def test_gradient_is_the_mask_for_kept_entries_and_zero_elsewhere(device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    topk(x, 0.2).backward(grad_out)
    mask = topk_mask(x, 0.2)
    assert torch.equal(x.grad, torch.where(mask, grad_out, torch.zeros_like(grad_out)))
    x.grad = None
    topk(x, 0.2, mode="non_topk").backward(grad_out)
    assert torch.equal(x.grad, torch.where(~mask, grad_out, torch.zeros_like(grad_out)))


def test_mean_replace_gradient_is_the_gradient_of_the_mean():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: topk(t, 0.25, mode="mean_replace"), (x,))
    for mode in ("topk", "non_topk"):
        assert torch.autograd.gradcheck(lambda t: topk(t, 0.25, mode=mode), (x,))


@pytest.mark.parametrize("mode", ["topk", "non_topk"])
def test_backward_saves_only_a_boolean_mask(mode):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk(x, 0.1, mode=mode)
    assert saved and all(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() for t in saved) == x.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gives_the_float32_mask(dtype, device):
    x = torch.randint(-20, 20, (2, 3, 9, 9)).to(device, dtype)  # integers: exact in every dtype
    assert torch.equal(topk_mask(x, 0.1), topk_mask(x.float(), 0.1))
    out = topk(x, 0.1)
    assert out.dtype == dtype and torch.equal(out.float(), topk(x.float(), 0.1))


def test_channels_last_input_gives_the_contiguous_result(device):
    x = torch.randn(2, 8, 7, 7, device=device)
    nhwc = x.to(memory_format=torch.channels_last)
    for mode in ("topk", "non_topk"):
        assert torch.equal(topk(nhwc, 0.1, mode=mode), topk(x, 0.1, mode=mode))
    # the channel means sum in memory order: equal up to rounding
    torch.testing.assert_close(topk(nhwc, 0.1, mode="mean_replace"), topk(x, 0.1, mode="mean_replace"))


def test_no_grad_and_identity_mode():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with torch.no_grad():
        assert not topk(x, 0.3).requires_grad
    assert topk(x, 0.3, mode="identity") is x


@settings(max_examples=40, deadline=None)
@given(x=feature_maps(), k=ks, prefix=st.integers(0, 2), ties=st.sampled_from(["first", "all"]))
def test_token_kind_ranks_tokens_per_channel_and_keeps_prefix(x, k, prefix, ties, device):
    n, c, h, w = x.shape
    tokens = x.reshape(n, c, h * w).transpose(1, 2)  # (N, T, D) with D = channels
    body = tokens[:, prefix:]
    assume(body.shape[1] > 0)
    spatial = body.transpose(1, 2).unsqueeze(-1)  # (N, D, T', 1): same ranking as spatial Top-K
    expected = reference_mask(spatial, keep_count(k, body.shape[1]), ties).squeeze(-1).transpose(1, 2)
    mask = topk_mask(tokens.to(device), k, kind="token", ties=ties, num_prefix_tokens=prefix).cpu()
    assert mask[:, :prefix].all()
    assert torch.equal(mask[:, prefix:], expected)
    out = topk(tokens.to(device), k, kind="token", ties=ties, num_prefix_tokens=prefix).cpu()
    assert torch.equal(out[:, :prefix], tokens[:, :prefix])
    assert torch.equal(out[:, prefix:], torch.where(expected, body, torch.zeros_like(body)))


def test_token_kind_on_channel_last_4d_maps_matches_spatial_on_nchw():
    x = torch.randn(2, 6, 5, 4)  # NCHW
    nhwc = x.permute(0, 2, 3, 1)
    assert torch.equal(topk(nhwc, 0.2, kind="token"), topk(x, 0.2).permute(0, 2, 3, 1))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x = torch.randint(-9, 9, (4, 16, 13, 13)).to(dtype)  # integer values: many ties, exact in every dtype
    for mode in ("topk", "non_topk", "mean_replace"):
        for ties in ("first", "all"):
            expected = topk(x.float(), 0.1, mode=mode, ties=ties).to(dtype)
            torch.testing.assert_close(topk(x.cuda(), 0.1, mode=mode, ties=ties).cpu(), expected)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["triton", "torch_path"])
@pytest.mark.parametrize("ties", ["first", "all"])
@pytest.mark.parametrize("mode", MODES)
def test_a_cuda_graph_captures_the_op_and_replays_it_on_new_data(mode, ties, dtype):
    """No host sync inside the op, so it can be captured in a CUDA graph (torch.compile's "reduce-overhead"):
    a sync while capturing is an error, and a replay must compute on the data it finds in the inputs."""
    maps = torch.randint(-3, 4, (2, 8, 13, 13), device="cuda").to(dtype)  # ties at the K-th value
    tokens = torch.randn(2, 17, 8, device="cuda", dtype=dtype)

    def run():
        return (topk(maps, 0.1, mode=mode, ties=ties),
                topk(tokens, 0.2, mode=mode, ties=ties, kind="token", num_prefix_tokens=1))

    side = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graph's docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    maps.copy_(torch.randint(-3, 4, maps.shape, device="cuda"))  # copy_ casts to the dtype
    tokens.copy_(torch.randn_like(tokens))
    graph.replay()
    for replayed, eager in zip(captured, run()):
        assert torch.equal(replayed, eager)


# ----------------------------------------------------------------------------- special values and integers

def python_reference_mask(x: torch.Tensor, count: int, ties: str) -> torch.Tensor:
    """Spatial Top-K mask by sorting Python numbers: NaN above every magnitude (as torch.topk ranks it), then
    ``abs`` (exact for every integer, -0.0 == 0.0), the earliest position first among equals."""
    n, c, h, w = x.shape
    mask = torch.zeros(n * c, h * w, dtype=torch.bool)
    for r, row in enumerate(x.reshape(n * c, h * w).tolist()):
        key = [(1, 0) if v != v else (0, abs(v)) for v in row]
        order = sorted(range(len(row)), key=lambda i: (-key[i][0], -key[i][1], i))
        kth = key[order[min(count, len(row)) - 1]]
        mask[r, order[:count] if ties == "first" else [i for i in range(len(row)) if key[i] >= kth]] = True
    return mask.reshape(x.shape)


specials = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 0.5])


@settings(max_examples=80, deadline=None)
@given(x=feature_maps(specials), k=ks, ties=st.sampled_from(["first", "all"]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_nan_inf_and_signed_zeros_rank_like_torch_topk(x, k, ties, dtype, device):
    x = x.to(dtype)
    count = keep_count(k, x.shape[2] * x.shape[3])
    expected = python_reference_mask(x, count, ties)
    assert torch.equal(topk_mask(x.to(device), k, ties=ties).cpu(), expected)
    torch.testing.assert_close(topk(x.to(device), k, ties=ties).cpu(), x.masked_fill(~expected, 0),
                               rtol=0, atol=0, equal_nan=True)


@st.composite
def integer_maps(draw):
    dtype = draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]))
    info = torch.iinfo(dtype)
    extremes = st.sampled_from(sorted({info.min, info.min + 1, info.max, info.max - 1, 0, 1, min(info.max, 3)}))
    values = st.one_of(extremes, st.integers(info.min, info.max))
    shape = draw(shapes)
    flat = draw(st.lists(values, min_size=torch.Size(shape).numel(), max_size=torch.Size(shape).numel()))
    return torch.tensor(flat, dtype=dtype).reshape(shape)


@settings(max_examples=80, deadline=None)
@given(x=integer_maps(), k=ks, ties=st.sampled_from(["first", "all"]))
def test_integer_magnitudes_are_exact_at_the_extremes(x, k, ties, device):
    expected = python_reference_mask(x, keep_count(k, x.shape[2] * x.shape[3]), ties)
    assert torch.equal(topk_mask(x.to(device), k, ties=ties).cpu(), expected)
    assert torch.equal(topk(x.to(device), k, ties=ties).cpu(), x.masked_fill(~expected, 0))
    assert torch.equal(topk(x.to(device), k, mode="non_topk", ties=ties).cpu(), x.masked_fill(expected, 0))


def test_int8_minimum_is_the_largest_magnitude(device):
    x = torch.tensor([5, 127, -128, -3], dtype=torch.int8, device=device).reshape(1, 1, 1, 4)
    assert topk_mask(x, 1).flatten().tolist() == [False, False, True, False]


def test_one_nan_keeps_the_channel_on_the_torch_path(device):
    x = torch.randn(1, 1, 14, 14, dtype=torch.float64, device=device)  # float64: the torch path on every device
    x[0, 0, 3, 4] = float("nan")
    mask = topk_mask(x, 0.1)
    assert mask.sum() == keep_count(0.1, 196) == 19 and mask[0, 0, 3, 4]


# ----------------------------------------------------------------------------- validation, fake tensors

@pytest.mark.parametrize("bad", [-1, -5, 1.5, True, "1", None])
def test_bad_num_prefix_tokens_is_refused_before_any_kernel(bad):
    with pytest.raises(ValueError, match=f"num_prefix_tokens={bad!r}"):
        topk(torch.randn(2, 5, 3), 0.5, kind="token", num_prefix_tokens=bad)
    with pytest.raises(ValueError, match=f"num_prefix_tokens={bad!r}"):
        TopK(0.5, kind="token", num_prefix_tokens=bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "token", "num_prefix_tokens": 5}, r"num_prefix_tokens=5 does not fit shape \(2, 5, 3\)"),
    ({"num_prefix_tokens": 1}, "applies to kind='token' only"),
])
def test_prefix_tokens_that_do_not_fit_are_refused(kwargs, match):
    x = torch.randn(2, 5, 3) if kwargs.get("kind") == "token" else torch.randn(2, 5, 3, 3)
    with pytest.raises(ValueError, match=match):
        topk(x, 0.5, **kwargs)


def test_a_token_map_has_no_prefix_tokens():
    x = torch.randn(2, 4, 4, 6)  # (N, H, W, D): the model's CLS count does not apply
    assert torch.equal(topk(x, 0.25, kind="token", num_prefix_tokens=1), topk(x, 0.25, kind="token"))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_unrankable_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match=f"dtype {dtype} is not supported"):
        topk(torch.ones(1, 1, 2, 2, dtype=dtype), 1)


@pytest.mark.parametrize("count", [0, -3])  # non-ints: the op schema (SymInt) refuses them
def test_registered_ops_check_their_arguments(count):
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=f"count={count!r}"):
        torch.ops.topk_plugin.topk(x, count, "spatial", "first", 0, False)
    with pytest.raises(ValueError, match="num_prefix_tokens=-1"):
        torch.ops.topk_plugin.topk_mask(torch.randn(1, 4, 2), 1, "token", "first", -1)


@pytest.mark.parametrize("mode", MODES)
def test_fake_tensors_take_the_shape_only_implementation(mode):
    with FakeTensorMode():
        x = torch.empty(2, 3, 8, 8)
        y = topk(x, 0.1, mode=mode)
        mask = topk_mask(x, 0.1)
        tokens = topk(torch.empty(2, 5, 4), 0.5, mode=mode, kind="token", num_prefix_tokens=1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mask.shape == x.shape and mask.dtype == torch.bool and tokens.shape == (2, 5, 4)


@pytest.mark.parametrize("mode", MODES)
def test_meta_tensors_take_the_shape_only_implementation(mode):
    x = torch.empty(2, 3, 8, 8, device="meta", requires_grad=True)
    y = topk(x, 0.1, mode=mode)
    assert (y.shape, y.dtype, y.device.type) == (x.shape, x.dtype, "meta")
    assert topk_mask(x, 0.1).dtype == torch.bool


OPS = torch.ops.topk_plugin
OPCHECK_CASES = {  # (op, args): spatial maps (dense, channels_last, half, the torch path), tokens with a CLS
    "with_mask": (OPS.topk_with_mask.default, (torch.randn(2, 3, 5, 5).relu(), 5, "spatial", "first", 0, False)),
    "with_mask_channels_last": (OPS.topk_with_mask.default, (
        torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last), 3, "spatial", "all", 0, True)),
    "with_mask_tokens": (OPS.topk_with_mask.default, (torch.randn(2, 6, 4), 2, "token", "first", 1, False)),
    "with_mask_float64": (OPS.topk_with_mask.default, (torch.randn(2, 3, 4, 4, dtype=torch.float64), 4, "spatial",
                                                       "first", 0, False)),
    "values": (OPS.topk.default, (torch.randn(2, 3, 5, 5).half(), 5, "spatial", "first", 0, True)),
    "mask": (OPS.topk_mask.default, (torch.randn(2, 6, 4), 2, "token", "all", 1)),
    "masked_grad": (OPS.masked_grad.default, (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4) > 0.5)),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_registered_ops_pass_torch_opcheck(case, requires_grad):
    """Schema, fake impl, autograd registration and AOT tracing checked by torch's own test of custom ops."""
    op, (x, *args) = OPCHECK_CASES[case]
    x = x.clone().requires_grad_(requires_grad and x.is_floating_point())
    assert all(r == "SUCCESS" for r in torch.library.opcheck(op, (x, *args)).values())
    assert torch.Tag.pt2_compliant_tag in op.tags  # what opcheck vouches for, declared to compile and export


@pytest.mark.parametrize("invert", [False, True])
def test_the_values_op_backpropagates_through_what_it_keeps(invert):
    """Called directly with a gradient to compute, ``topk`` (values only) still gives the masked gradient; an op
    without an autograd kernel would get torch's fallback, which backpropagates no gradient through it."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    grad = torch.randn_like(x)
    y = OPS.topk(x, 7, "spatial", "first", 0, invert)
    (dx,) = torch.autograd.grad(y, x, grad)
    mask = OPS.topk_mask(x.detach(), 7, "spatial", "first", 0)
    assert torch.equal(dx, torch.where(mask != invert, grad, 0))


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["topk", "non_topk"])
def test_no_mask_is_written_without_a_gradient_to_compute(mode):
    x = torch.randn(2, 3, 8, 8)
    for needs_grad, op in ((False, "topk_plugin.topk.default"), (True, "topk_plugin.topk_with_mask.default")):
        with OpLog() as log:
            topk(x.requires_grad_(needs_grad), 0.1, mode=mode)
        assert [n for n in log.names if n.startswith("topk_plugin")] == [op]
    with torch.no_grad(), OpLog() as log:
        topk(x, 0.1, mode=mode)
    assert [n for n in log.names if n.startswith("topk_plugin")] == ["topk_plugin.topk.default"]


def test_backward_writes_only_the_masked_gradient():
    """The mask output gets no gradient: the backward must not build (and fill) a zero gradient for it,
    which cost as much as the masked gradient itself on 13x13 maps."""
    x = torch.randn(2, 4, 6, 6).relu().requires_grad_()
    y = topk(x, 0.25)
    grad = torch.randn_like(y)
    with OpLog() as log:
        (g,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(g, torch.where(topk_mask(x, 0.25), grad, 0))
    ops = {name.split(".")[1] for name in log.names}  # "aten.zeros_like.default" -> "zeros_like"
    assert not {"zeros", "zeros_like", "zero_", "fill_", "full"} & ops, log.names



# ----------------------------------------------------------------------------- eager calls without the dispatcher

class DispatchedOps:
    """Stands in for ``torch.ops.topk_plugin`` in ``_library``: records which ops go through the dispatcher."""

    def __init__(self):
        self.names = []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(OPS, name)


class PassFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _under(context, x, fn):
    if context == "vmap":
        return torch.func.vmap(fn)(x.unsqueeze(0)).squeeze(0)
    manager = {"plain": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": contextlib.nullcontext, "profiler": torch.profiler.profile, "dispatch mode": OpLog,
               "function mode": PassFunctionMode, "fake tensors": FakeTensorMode}[context]()
    with manager:
        if context == "fake tensors":
            x = manager.from_tensor(x)
        return fn(x)


@pytest.mark.parametrize("context, dispatched", [
    ("plain", False), ("no_grad", False), ("inference_mode", False), ("grad", True), ("profiler", True),
    ("dispatch mode", True), ("function mode", True), ("fake tensors", True), ("vmap", True)])
@pytest.mark.parametrize("mode", ["topk", "non_topk", "mean_replace"])
def test_only_plain_eager_calls_skip_the_dispatcher(monkeypatch, context, dispatched, mode):
    """Autograd, tracing, modes, subclasses, transforms and the profiler must all see the op; nothing else
    needs the dispatcher's round trip, and skipping it changes no result."""
    if mode == "mean_replace" and context == "grad":
        dispatched = False  # its mask is of the detached input: autograd has nothing to see
    ops = DispatchedOps()
    monkeypatch.setattr(_library, "_OPS", ops)
    x = torch.randn(2, 3, 6, 6).requires_grad_(context in ("no_grad", "grad"))
    out = _under(context, x, lambda t: topk(t, 0.25, mode=mode))
    assert bool({"topk", "topk_mask", "topk_with_mask"} & set(ops.names)) == dispatched, ops.names
    monkeypatch.undo()
    with OpLog():  # a dispatch mode: the call goes through the dispatcher
        expected = topk(x, 0.25, mode=mode)
    assert out.shape == expected.shape
    if context != "fake tensors":
        assert torch.equal(out, expected)


def test_a_subclass_goes_through_the_dispatcher(monkeypatch):
    ops = DispatchedOps()
    monkeypatch.setattr(_library, "_OPS", ops)
    topk(torch.randn(1, 2, 4, 4).as_subclass(torch.nn.Parameter), 0.25)
    assert "topk" in ops.names


def test_the_profiler_records_the_op():
    with torch.profiler.profile() as profile:
        topk(torch.randn(1, 2, 4, 4), 0.25)
    assert "topk_plugin::topk" in {event.name for event in profile.events()}


@settings(max_examples=60, deadline=None)
@given(x=feature_maps(specials), k=ks, ties=st.sampled_from(["first", "all"]), mode=st.sampled_from(MODES),
       kind=st.sampled_from(["spatial", "token"]))
def test_a_direct_call_equals_the_registered_op(x, k, ties, mode, kind):
    if kind == "token":
        x = x.flatten(2).transpose(1, 2)  # (N, T, D) with D = the map's channels
    direct = topk(x, k, mode=mode, kind=kind, ties=ties)
    with OpLog():  # a dispatch mode: the call goes through the dispatcher
        dispatched = topk(x, k, mode=mode, kind=kind, ties=ties)
    assert torch.equal(direct.isnan(), dispatched.isnan())
    assert torch.equal(direct.nan_to_num(), dispatched.nan_to_num())



# ----------------------------------------------------------------------------- torch.func

def _inputs(kind):
    """A batch of 3 samples for ``kind``, and the prefix tokens it has."""
    if kind == "token":
        return torch.randn(3, 2, 9, 4), 1  # per sample (N, T, D) with a CLS token
    return torch.randn(3, 2, 4, 6, 6), 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["spatial", "token"])
def test_vmap_equals_a_loop_in_one_kernel_call(monkeypatch, mode, kind):
    """The vmapped dimension folds into the batch: per-sample results, from one call of the kernel."""
    batch, prefix = _inputs(kind)
    fn = lambda t: topk(t, 0.3, mode=mode, kind=kind, num_prefix_tokens=prefix)  # noqa: E731
    expected = torch.stack([fn(sample) for sample in batch])
    calls = []
    run = _library._run
    monkeypatch.setattr(_library, "_run", lambda *a, **kw: calls.append(a[0].shape) or run(*a, **kw))
    assert torch.equal(torch.func.vmap(fn, in_dims=2)(batch.movedim(0, 2)), expected)  # any vmapped dimension
    assert len(calls) == (mode != "identity"), calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["spatial", "token"])
def test_torch_func_grad_and_per_sample_grads_equal_autograd(mode, kind):
    batch, prefix = _inputs(kind)
    weight = torch.randn(batch.shape[1:])
    loss = lambda t: (topk(t, 0.3, mode=mode, kind=kind, num_prefix_tokens=prefix) * weight).pow(2).sum()  # noqa: E731
    per_sample = []
    for sample in batch:
        sample = sample.clone().requires_grad_()
        loss(sample).backward()
        per_sample.append(sample.grad)
    assert torch.equal(torch.func.grad(loss)(batch[0]), per_sample[0])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(batch), torch.stack(per_sample))


def test_jacobian_and_second_derivative_under_torch_func():
    x = torch.randn(1, 2, 3, 3)
    mask = topk_mask(x, 0.4).flatten().float()
    jacobian = torch.func.jacrev(lambda t: topk(t, 0.4))(x).reshape(x.numel(), x.numel())
    assert torch.equal(jacobian, torch.diag(mask))
    # d/dx sum(d/dx sum(topk(x)^3)) = d/dx sum(3 x^2 [kept]) = 6 x [kept]
    inner = torch.func.grad(lambda t: topk(t, 0.4).pow(3).sum())
    second = torch.func.grad(lambda t: inner(t).sum())(x)
    torch.testing.assert_close(second, 6 * x * mask.reshape(x.shape))


# ----------------------------------------------------------------------------- measurement

def test_layer_records_every_call_while_measuring():
    layer = TopK(0.25)
    layer(torch.randn(1, 2, 4, 4))
    assert layer.stats == [], "nothing is recorded unless measuring"
    layer.measure = True
    layer(torch.randn(1, 2, 4, 4))
    layer(torch.randn(3, 2, 2, 2))
    assert [(s["shape"], s["positions"], s["count"]) for s in layer.stats] == [((1, 2, 4, 4), 16, 4),
                                                                              ((3, 2, 2, 2), 4, 1)]


def test_measured_kept_counts_prefix_tokens_as_kept_for_non_topk():
    layer = TopK(2, mode="non_topk", kind="token", num_prefix_tokens=1)
    layer.measure = True
    layer(torch.randn(2, 9, 5))  # 8 ranked tokens: Top-K keeps 2, non_topk the other 6 and the CLS token
    assert layer.stats[0]["kept"] == pytest.approx(7 / 9)


@pytest.mark.parametrize("mode", ["topk", "non_topk", "identity"])
def test_measured_kept_is_the_fraction_the_output_passes_through(mode):
    x = torch.randn(2, 3, 6, 6)  # no zeros: an entry is kept iff the output equals the input
    layer = TopK(0.2, mode=mode)
    layer.measure = True
    y = layer(x)
    assert layer.stats[0]["kept"] == pytest.approx((y == x).float().mean().item())
    assert layer.stats[0]["nonzero_out"] == pytest.approx((y != 0).float().mean().item())
