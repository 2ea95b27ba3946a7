"""Top-K registered with ``torch.library`` (namespace ``topk_plugin``), so that compile, export and ONNX see it.

Every op takes ``(x, count, kind, ties, num_prefix_tokens)``: ``count`` entries kept per channel and the
prefix tokens of ``x`` as ``ops.py`` resolved them; ``invert`` keeps the complement (prefix tokens still kept).

    topk_plugin::topk_mask(x, ...)                 -> mask of the Top-K (bool)
    topk_plugin::topk(x, ..., invert)              -> values only: no mask written (inference)
    topk_plugin::topk_with_mask(x, ..., invert)    -> (values, mask of what values keeps); differentiable,
                                                      autograd saves only the boolean mask
    topk_plugin::masked_grad(grad, mask)           -> grad where mask, else 0: the backward (differentiable)

CPU float32/float16/bfloat16 run the C kernel (``_select.py``), CUDA float32/float16/bfloat16 the Triton kernel
(``_triton.py``); every other device and dtype runs the torch path below, which ranks the same integer keys.
None of them synchronises with the host on a GPU, so CUDA graphs (``torch.compile(mode="reduce-overhead")``)
capture the ops. Fake implementations give shapes only (no data access), so
``torch.compile``, ``torch.export`` and ``FakeTensorMode`` trace the ops; ``_onnx.py`` translates them to ONNX.
Outputs always have the layout of ``torch.empty_like(x)``, as the fake implementations promise.
"""
from __future__ import annotations

import math

import torch

from . import _onnx, _select, _triton

KINDS = ("spatial", "token")
TIES = ("first", "all")
# Real dtypes the op ranks; unsigned types other than uint8 have too little torch support to rank.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_BITS_AS_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                torch.float64: torch.int64}


# ----------------------------------------------------------------------------- argument checks

def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def check_prefix(num_prefix_tokens, kind: str) -> None:
    """``num_prefix_tokens`` is an int >= 0, and 0 for spatial Top-K (maps have no tokens)."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, (int, torch.SymInt)):
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0")
    if num_prefix_tokens and kind != "token":
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens!r} applies to kind='token' only, not kind={kind!r}")


def check_layout(x: torch.Tensor, kind: str, where: str = "") -> None:
    """``x`` is a tensor of the rank ``kind`` needs and of a dtype the op ranks."""
    at = f" at position {where!r}" if where else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Top-K{at} needs a tensor, got a {type(x).__name__}")
    if kind == "spatial" and x.dim() != 4:
        raise ValueError(
            f"spatial Top-K{at} needs an (N, C, H, W) tensor, got shape {tuple(x.shape)}; "
            "use kind='token' for (N, T, D) or (N, H, W, D) channel-last tensors")
    if kind == "token" and x.dim() not in (3, 4):
        raise ValueError(f"token Top-K{at} needs an (N, T, D) or (N, H, W, D) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"Top-K{at} ranks real numbers: dtype {x.dtype} is not supported; "
                         f"use one of {[str(d).removeprefix('torch.') for d in DTYPES]}")


def check_prefix_fits(x: torch.Tensor, num_prefix_tokens: int, where: str = "") -> None:
    """Prefix tokens lead an (N, T, D) sequence and leave at least one token to rank."""
    if num_prefix_tokens and (x.dim() != 3 or num_prefix_tokens >= x.shape[1]):
        at = f" at position {where!r}" if where else ""
        raise ValueError(f"token Top-K{at}: num_prefix_tokens={num_prefix_tokens} does not fit shape "
                         f"{tuple(x.shape)}; prefix tokens lead an (N, T, D) sequence and leave at least one token")


def ranked_positions(x: torch.Tensor, kind: str, num_prefix_tokens: int = 0) -> int:
    """How many positions each channel of ``x`` ranks (prefix tokens excluded)."""
    if kind == "spatial":
        return x.shape[-2] * x.shape[-1]
    return math.prod(x.shape[1:-1]) - num_prefix_tokens


def _check_args(x, count, kind, ties, num_prefix_tokens) -> None:
    """Everything the kernels rely on, checked before any of them runs (also for direct ``torch.ops`` calls)."""
    check_choice("kind", kind, KINDS)
    check_choice("ties", ties, TIES)
    check_prefix(num_prefix_tokens, kind)
    check_layout(x, kind)
    check_prefix_fits(x, num_prefix_tokens)
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)) or count < 1:
        raise ValueError(f"count={count!r} must be an int >= 1 (entries kept per channel)")


# ----------------------------------------------------------------------------- the torch path

def _magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """An integer key per entry ordered like ``|x|``: -0.0 ties 0.0, NaN above inf, no overflow at int minima."""
    if x.is_floating_point():  # the bit pattern with the sign cleared; every NaN above the infinity's
        int_dtype = _BITS_AS_INT[x.dtype]
        infinity = torch.tensor(float("inf"), dtype=x.dtype).view(int_dtype).item()
        return (x.view(int_dtype) & torch.iinfo(int_dtype).max).clamp_max(infinity + 1)
    if x.dtype == torch.uint8:
        return x
    return torch.where(x > 0, -x, x).bitwise_not()  # ~(-|x|) = |x| - 1: -|x| never overflows


def _channel_rows(x: torch.Tensor, kind: str):
    """View ``x`` as (rows, positions) with one row per (sample, channel), and the inverse map."""
    if kind == "spatial":
        n, c, h, w = x.shape
        return x.reshape(n * c, h * w), lambda r: r.reshape(x.shape)
    n, d = x.shape[0], x.shape[-1]
    positions = math.prod(x.shape[1:-1])
    rows = x.reshape(n, positions, d).transpose(1, 2).reshape(n * d, positions)
    return rows, lambda r: r.reshape(n, d, positions).transpose(1, 2).reshape(x.shape)


def _select_rows(key: torch.Tensor, count: int, ties: str) -> torch.Tensor:
    """Boolean mask of the ``count`` largest keys of each row (``ties``: which equal keys at the K-th count)."""
    length = key.shape[-1]
    if count >= length:
        return torch.ones_like(key, dtype=torch.bool)
    # Unsorted topk is faster than kthvalue on CPU and a radix select on CUDA; its smallest value is the K-th.
    threshold = key.topk(count, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    if ties == "all":
        return key >= threshold
    if key.device.type != "cpu":  # no host sync, so that a CUDA graph can capture it: every row takes the count
        return _earliest_ties(key, threshold, count)
    kept = key >= threshold
    surplus = (kept.sum(-1) > count).nonzero().squeeze(1)
    if surplus.numel():  # on CPU only rows with ties at the threshold pay for the (int64) running count
        kept[surplus] = _earliest_ties(key[surplus], threshold[surplus], count)
    return kept


def _earliest_ties(key: torch.Tensor, threshold: torch.Tensor, count: int) -> torch.Tensor:
    """The keys above each row's threshold, and of those equal to it the earliest that bring the row to ``count``."""
    above, at = key > threshold, key == threshold
    room = count - above.sum(-1, keepdim=True)
    return above | (at & (at.cumsum(-1) <= room))


def _torch_select(x, count, kind, ties, num_prefix_tokens, invert, values: bool):
    """``(values or None, mask)`` as the ops define them, on any device and dtype."""
    body = x[:, num_prefix_tokens:]
    rows, restore = _channel_rows(body, kind)
    kept = restore(_select_rows(_magnitude_key(rows), count, ties))
    if invert:
        kept = ~kept
    if num_prefix_tokens:
        kept = torch.cat([torch.ones_like(x[:, :num_prefix_tokens], dtype=torch.bool), kept], dim=1)
    kept = _like(x, kept)
    return (_like(x, torch.where(kept, x, 0)) if values else None), kept


def _like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` in the layout of ``torch.empty_like(x)`` (copied only where it differs)."""
    if t.stride() == x.stride() and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return t  # empty_like keeps a dense tensor's strides: no need to ask it (a meta call costs ~10 us)
    layout = torch.empty_like(x, dtype=t.dtype, device="meta")  # strides only: nothing allocated
    return t if layout.stride() == t.stride() else torch.empty_like(x, dtype=t.dtype).copy_(t)


def _run(x, count, kind, ties, num_prefix_tokens, invert, values: bool, mask: bool):
    """The kernel for ``x`` after checking the arguments (also those of a direct ``torch.ops`` call)."""
    _check_args(x, count, kind, ties, num_prefix_tokens)
    return _run_checked(x, count, kind, ties, num_prefix_tokens, invert, values, mask)


def _run_checked(x, count, kind, ties, num_prefix_tokens, invert, values: bool, mask: bool):
    """The C kernel (CPU) or the Triton kernel (CUDA) where one applies, else the torch path."""
    for kernel in (_select, _triton):
        if kernel.supports(x, kind, num_prefix_tokens):
            y, kept = kernel.select(x, count, kind=kind, ties=ties, num_prefix_tokens=num_prefix_tokens,
                                    invert=invert, values=values, mask=mask)
            return (_like(x, y) if y is not None else None), (_like(x, kept) if kept is not None else None)
    return _torch_select(x, count, kind, ties, num_prefix_tokens, invert, values)


# ----------------------------------------------------------------------------- the ops

# Defined with the dispatcher directly (``Library``), not ``torch.library.custom_op``: the same schema, kernels,
# fake impls and autograd, without custom_op's per-call Python layers (default filling, alias checks, dynamo
# guards). The autograd Functions are of the ``forward(ctx, ...)`` style: one with ``setup_context`` has its
# arguments bound by ``inspect.signature`` on every call.
_LIB = torch.library.Library("topk_plugin", "DEF")
_SELECT_ARGS = "Tensor x, SymInt count, str kind, str ties, SymInt num_prefix_tokens"
for _schema in (f"topk_mask({_SELECT_ARGS}) -> Tensor", f"topk({_SELECT_ARGS}, bool invert) -> Tensor",
                f"topk_with_mask({_SELECT_ARGS}, bool invert) -> (Tensor, Tensor)",
                "masked_grad(Tensor grad, Tensor mask) -> Tensor"):
    # pt2_compliant: compile and export may trust the op (torch.library.opcheck passes: the tests run it)
    _LIB.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))
_OPS = torch.ops.topk_plugin


def _impl(name: str, dispatch_key: str):
    """Register ``fn`` for op ``name`` at ``dispatch_key``: ``"CompositeExplicitAutograd"`` for the kernel of every
    device (it picks the C kernel or the torch path), ``"Autograd"`` for what the op does when autograd is on
    (every op has one: for an op without one, torch backpropagates no gradient through it, with only a warning)."""
    def register(fn):
        _LIB.impl(name, fn, dispatch_key)
        return fn
    return register


def _fake(name: str):
    """Register ``fn`` as the fake impl of op ``name``: shapes only, for compile, export and FakeTensorMode."""
    return torch.library.register_fake(f"topk_plugin::{name}", lib=_LIB)


@_impl("topk_mask", "CompositeExplicitAutograd")
def _topk_mask(x, count, kind, ties, num_prefix_tokens):
    return _run(x, count, kind, ties, num_prefix_tokens, False, values=False, mask=True)[1]


@_impl("topk", "CompositeExplicitAutograd")
def _topk(x, count, kind, ties, num_prefix_tokens, invert):
    return _run(x, count, kind, ties, num_prefix_tokens, invert, values=True, mask=False)[0]


@_impl("topk_with_mask", "CompositeExplicitAutograd")
def _topk_with_mask(x, count, kind, ties, num_prefix_tokens, invert):
    return _run(x, count, kind, ties, num_prefix_tokens, invert, values=True, mask=True)


@_impl("masked_grad", "CompositeExplicitAutograd")
def _masked_grad(grad, mask):
    """``grad`` where ``mask``, 0 elsewhere: the backward of ``topk_with_mask`` (the C kernel on CPU)."""
    fast = _select.masked_grad(grad, mask)
    return fast if fast is not None else _like(grad, torch.where(mask, grad, 0))


@_fake("topk_mask")
def _(x, count, kind, ties, num_prefix_tokens):
    _check_args(x, count, kind, ties, num_prefix_tokens)
    return torch.empty_like(x, dtype=torch.bool)


@_fake("topk")
def _(x, count, kind, ties, num_prefix_tokens, invert):
    _check_args(x, count, kind, ties, num_prefix_tokens)
    return torch.empty_like(x)


@_fake("topk_with_mask")
def _(x, count, kind, ties, num_prefix_tokens, invert):
    _check_args(x, count, kind, ties, num_prefix_tokens)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


@_fake("masked_grad")
def _(grad, mask):
    return torch.empty_like(grad)


def _below_autograd(op, *args):
    """``op`` with autograd's kernel skipped: the kernel of its device (or the fake impl)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _save_mask(ctx, mask):
    ctx.save_for_backward(mask)
    ctx.mark_non_differentiable(mask)
    ctx.set_materialize_grads(False)  # the mask gets no gradient: no zeros tensor made for it


def _masked_backward(ctx, grad, _grad_mask):
    (mask,) = ctx.saved_tensors
    return (None if grad is None else masked_grad(grad, mask)), None, None, None, None, None


def _mask_grad_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return masked_grad(grad, mask), None


class _TopKWithMask(torch.autograd.Function):
    """``topk_with_mask`` under autograd: saves only the boolean mask; the backward is ``masked_grad``."""

    @staticmethod
    def forward(ctx, *args):
        values, mask = _below_autograd(_OPS.topk_with_mask, *args)
        _save_mask(ctx, mask)
        return values, mask

    backward = staticmethod(_masked_backward)


class _MaskedGrad(torch.autograd.Function):
    """``masked_grad`` under autograd: linear in ``grad``, so its backward masks the same way (double backward)."""

    @staticmethod
    def forward(ctx, grad, mask):
        ctx.save_for_backward(mask)
        return _below_autograd(_OPS.masked_grad, grad, mask)

    backward = staticmethod(_mask_grad_backward)


# The same two Functions for torch.func (grad, vjp, jacrev, vmap of them), which accepts only Functions with a
# ``setup_context`` and applied above the dispatcher (as the calls below do), not in an op's autograd kernel;
# their vmap rule is generated from the ops' own (below).
class _TopKWithMaskTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _OPS.topk_with_mask.default(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_mask(ctx, output[1])

    backward = staticmethod(_masked_backward)


class _MaskedGradTransformable(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, mask):
        return _OPS.masked_grad.default(grad, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    backward = staticmethod(_mask_grad_backward)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# Without a gradient to compute the autograd kernels call the device kernel at once: an autograd Function
# that records nothing still costs tens of microseconds (a backward's masked_grad is such a call).
@_impl("topk_with_mask", "Autograd")
def _(x, *args):
    return _TopKWithMask.apply(x, *args) if _needs_grad(x) else _below_autograd(_OPS.topk_with_mask, x, *args)


@_impl("topk", "Autograd")
def _(x, *args):
    if _needs_grad(x):  # the values-only op has no mask to backpropagate with
        return _TopKWithMask.apply(x, *args)[0]
    return _below_autograd(_OPS.topk, x, *args)


@_impl("masked_grad", "Autograd")
def _(grad, mask):
    return _MaskedGrad.apply(grad, mask) if _needs_grad(grad) else _below_autograd(_OPS.masked_grad, grad, mask)


@_impl("topk_mask", "Autograd")
def _(*args):
    return _below_autograd(_OPS.topk_mask, *args)  # a boolean output: nothing to differentiate


# ----------------------------------------------------------------------------- vmap

# Rows are (sample, channel) pairs, so a vmapped dimension folds into the batch dimension: one kernel call for
# the whole vmap instead of torch's per-sample fallback loop. torch calls a rule only when a tensor argument is
# vmapped: for these ops, x.
def _vmap_select(name: str):
    def rule(info, in_dims, x, *args):
        out = getattr(_OPS, name)(x.movedim(in_dims[0], 0).flatten(0, 1), *args)
        unfold = lambda t: t.unflatten(0, (info.batch_size, -1))  # noqa: E731
        return (tuple(map(unfold, out)), (0,) * len(out)) if isinstance(out, tuple) else (unfold(out), 0)
    return rule


for _name in ("topk_mask", "topk", "topk_with_mask"):
    torch.library.register_vmap(f"topk_plugin::{_name}", _vmap_select(_name), lib=_LIB)


@torch.library.register_vmap("topk_plugin::masked_grad", lib=_LIB)
def _(info, in_dims, grad, mask):
    grad, mask = (t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                  for t, d in zip((grad, mask), in_dims))
    return _OPS.masked_grad(grad, mask), 0


# ----------------------------------------------------------------------------- eager calls

def _dispatcher_needed(x) -> bool:
    """Whether anything but the kernel could take part in a call on ``x``: compile, export or a JIT trace,
    autograd, a tensor subclass (FakeTensor, ...), a dispatch or function mode, a functorch transform, the
    profiler, or a device other than the CPU. Only then must a call go through the dispatcher."""
    return (torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu"
            or x.layout != torch.strided or x.is_nested or (torch.is_grad_enabled() and x.requires_grad)
            or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled())


# The calls of ops.py, with arguments it has checked (``ops._resolve``). A plain eager call runs the kernel the
# dispatcher would reach, without its round trip through two Python kernels (autograd's, then the device's)
# and without checking again: ~25 us less per call in a loop on CPU, ~100 us inside a model, whose weights evict
# the caches between calls (AlexNet at batch 1). Under a torch.func transform the calls apply the transformable
# Functions.
def topk_values(x, count, kind, ties, num_prefix_tokens, invert):
    """``topk_plugin::topk``."""
    if torch._C._are_functorch_transforms_active():
        return _TopKWithMaskTransformable.apply(x, count, kind, ties, num_prefix_tokens, invert)[0]
    if _dispatcher_needed(x):
        return _OPS.topk.default(x, count, kind, ties, num_prefix_tokens, invert)
    return _run_checked(x, count, kind, ties, num_prefix_tokens, invert, values=True, mask=False)[0]


def topk_with_mask(x, count, kind, ties, num_prefix_tokens, invert):
    """``topk_plugin::topk_with_mask``."""
    if torch._C._are_functorch_transforms_active():
        return _TopKWithMaskTransformable.apply(x, count, kind, ties, num_prefix_tokens, invert)
    return _OPS.topk_with_mask.default(x, count, kind, ties, num_prefix_tokens, invert)


def topk_mask(x, count, kind, ties, num_prefix_tokens):
    """``topk_plugin::topk_mask``."""
    if _dispatcher_needed(x):
        return _OPS.topk_mask.default(x, count, kind, ties, num_prefix_tokens)
    return _run_checked(x, count, kind, ties, num_prefix_tokens, False, values=False, mask=True)[1]


def masked_grad(grad, mask):
    """``topk_plugin::masked_grad``."""
    if torch._C._are_functorch_transforms_active():
        return _MaskedGradTransformable.apply(grad, mask)
    return _OPS.masked_grad.default(grad, mask)


_onnx.register_torchscript_symbolics()
