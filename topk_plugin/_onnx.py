"""ONNX for the registered Top-K ops: one graph builder, emitted by both exporters.

``torch.onnx.export(..., dynamo=False)`` (TorchScript) uses the symbolics registered here on import;
``torch.onnx.export(..., dynamo=True)`` needs ``custom_translation_table=onnx_translation_table()``.

The graph ranks an exact key (ONNX has no bit casts): ``|x|`` in float64, where every float32/float16/
bfloat16 value and every integer up to 32 bits is exact, with ``inf`` mapped to the largest finite double
and NaN to ``inf``, so NaN ranks largest as in ``torch.topk``. The K-th largest key comes from ``TopK``;
``ties="first"`` then keeps the keys above it and the first ``room`` keys equal to it by a ``CumSum``, so
exactly K survive whatever order ``TopK`` gives equal keys. float64 and 64-bit integers have no exact
double key and are refused.
"""
from __future__ import annotations

import torch

OPSET = 18  # the oldest opset with every op below in the form used (ReduceSum/Slice with tensor inputs)
_DOUBLE, _INT64, _BOOL = 11, 7, 9  # onnx.TensorProto data types
# onnx.TensorProto types with an exact float64 key: FLOAT, UINT8, INT8, UINT16, INT16, INT32, FLOAT16, UINT32,
# BFLOAT16
_EXACT_IN_DOUBLE = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 10: "float16",
                    12: "uint32", 16: "bfloat16"}


def _magnitude_key(op, x):
    """|x| as an exact float64 ordering key: inf below NaN, both above every finite value."""
    d = op("Cast", x, to=_DOUBLE)
    key = op("Abs", d)
    key = op("Where", op("IsInf", d), op.const(torch.tensor(torch.finfo(torch.float64).max, dtype=torch.float64)), key)
    return op("Where", op("IsNaN", d), op.const(torch.tensor(float("inf"), dtype=torch.float64)), key)


def _rows(op, x, kind):
    """``x`` as (N, C, positions) for spatial (rank along axis 2) or (N, positions, D) for token (axis 1)."""
    if kind == "spatial":
        return op("Reshape", x, op.const(torch.tensor([0, 0, -1]))), 2
    shape = op("Shape", x)
    first, last = (op("Slice", shape, op.const(torch.tensor([a])), op.const(torch.tensor([b])))
                   for a, b in ((0, 1), (-1, 2**62)))
    return op("Reshape", x, op("Concat", first, op.const(torch.tensor([-1])), last, axis=0)), 1


def build_mask(op, x, count: int, kind: str, ties: str, num_prefix_tokens: int, invert: bool):
    """The boolean mask of ``topk_plugin::topk_with_mask`` for ``x``, emitted through ``op``."""
    dtype = op.dtype(x)
    if dtype not in _EXACT_IN_DOUBLE:
        raise ValueError(f"ONNX export of Top-K supports {sorted(_EXACT_IN_DOUBLE.values())} inputs (ranked "
                         f"exactly in float64); got ONNX data type {dtype}: cast the model, e.g. to float32")
    body = x
    if num_prefix_tokens:
        body = op("Slice", x, op.const(torch.tensor([num_prefix_tokens])), op.const(torch.tensor([2**62])),
                  op.const(torch.tensor([1])))
    rows, axis = _rows(op, body, kind)
    key = _magnitude_key(op, rows)
    axes = op.const(torch.tensor([axis]))
    length = op("Slice", op("Shape", key), axes, op.const(torch.tensor([axis + 1])))
    k = op("Min", length, op.const(torch.tensor([count])))
    top = op("TopK", key, k, axis=axis, largest=1, sorted=1, outputs=2)[0]
    kth = op("Slice", top, op("Sub", k, op.const(torch.tensor([1]))), k, axes)
    if ties == "all":
        kept = op("GreaterOrEqual", key, kth)
    else:  # the keys above the K-th, then the earliest of those equal to it until K are kept
        above, at = op("Greater", key, kth), op("Equal", key, kth)
        room = op("Sub", k, op("ReduceSum", op("Cast", above, to=_INT64), axes, keepdims=1))
        seen = op("CumSum", op("Cast", at, to=_INT64), op.const(torch.tensor(axis)))
        kept = op("Or", above, op("And", at, op("LessOrEqual", seen, room)))
    kept = op("Reshape", kept, op("Shape", body))
    if invert:
        kept = op("Not", kept)
    if num_prefix_tokens:
        prefix = op("Slice", x, op.const(torch.tensor([0])), op.const(torch.tensor([num_prefix_tokens])),
                    op.const(torch.tensor([1])))
        kept = op("Concat", op("Expand", op.const(torch.tensor(True)), op("Shape", prefix)), kept, axis=1)
    return kept


def _masked(op, x, kept):
    return op("Where", kept, x, op("CastLike", op.const(torch.tensor(0)), x))


# ----------------------------------------------------------------------------- TorchScript exporter

class _TorchScriptEmitter:
    """``op("Name", *inputs, outputs=n, **attributes)`` on a TorchScript graph (attribute suffixes added)."""

    def __init__(self, g):
        self.g = g

    def __call__(self, name, *inputs, outputs=1, **attributes):
        suffixed = {f"{key}_{'i' if isinstance(value, int) else 's'}": value for key, value in attributes.items()}
        return self.g.op(name, *inputs, outputs=outputs, **suffixed)

    def const(self, value: torch.Tensor):
        return self.g.op("Constant", value_t=value)

    @staticmethod
    def dtype(x) -> int:
        from torch.onnx._internal.torchscript_exporter import _type_utils

        return int(_type_utils.JitScalarType.from_value(x).onnx_type())


def _torchscript_symbolics():
    """Symbolic functions for the three ops (TorchScript exporter)."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i", "s", "s", "i")
    def topk_mask(g, x, count, kind, ties, num_prefix_tokens):
        return build_mask(_TorchScriptEmitter(g), x, count, kind, ties, num_prefix_tokens, False)

    @symbolic_helper.parse_args("v", "i", "s", "s", "i", "b")
    def topk(g, x, count, kind, ties, num_prefix_tokens, invert):
        op = _TorchScriptEmitter(g)
        return _masked(op, x, build_mask(op, x, count, kind, ties, num_prefix_tokens, invert))

    @symbolic_helper.parse_args("v", "i", "s", "s", "i", "b")
    def topk_with_mask(g, x, count, kind, ties, num_prefix_tokens, invert):
        op = _TorchScriptEmitter(g)
        kept = build_mask(op, x, count, kind, ties, num_prefix_tokens, invert)
        return _masked(op, x, kept), kept

    return {"topk_mask": topk_mask, "topk": topk, "topk_with_mask": topk_with_mask}


def register_torchscript_symbolics() -> None:
    for name, symbolic in _torchscript_symbolics().items():
        torch.onnx.register_custom_op_symbolic(f"topk_plugin::{name}", symbolic, OPSET)


# ----------------------------------------------------------------------------- dynamo exporter

class _OnnxScriptEmitter:
    """``op("Name", *inputs, outputs=n, **attributes)`` through an onnxscript opset (traced by the exporter)."""

    def __init__(self, opset):
        self.opset = opset

    def __call__(self, name, *inputs, outputs=1, **attributes):
        return getattr(self.opset, name)(*inputs, **attributes)

    def const(self, value: torch.Tensor):
        from onnxscript import ir

        return self.opset.Constant(value=ir.tensor(value.numpy()))

    @staticmethod
    def dtype(x) -> int:
        return int(x.dtype)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` of a model using Top-K."""
    try:
        from onnxscript import opset18
    except ImportError as err:
        raise ImportError("ONNX export needs onnxscript: pip install 'topk-plugin[onnx]'") from err
    op = _OnnxScriptEmitter(opset18)

    def topk_mask(x, count: int, kind: str, ties: str, num_prefix_tokens: int):
        return build_mask(op, x, count, kind, ties, num_prefix_tokens, False)

    def topk(x, count: int, kind: str, ties: str, num_prefix_tokens: int, invert: bool):
        return _masked(op, x, build_mask(op, x, count, kind, ties, num_prefix_tokens, invert))

    def topk_with_mask(x, count: int, kind: str, ties: str, num_prefix_tokens: int, invert: bool):
        kept = build_mask(op, x, count, kind, ties, num_prefix_tokens, invert)
        return _masked(op, x, kept), kept

    ops = torch.ops.topk_plugin
    return {ops.topk_mask.default: topk_mask, ops.topk.default: topk, ops.topk_with_mask.default: topk_with_mask}
