"""Reduced-precision students: a float16 copy by ONNX Runtime's own converter
(``onnxruntime.transformers.float16``, shipped in the onnxruntime wheel), numerically sensitive ops kept float32.

Softmax, the normalizations and the reductions / powers they decompose into lose most in float16 (overflowing
sums of squares, exponentials); :data:`SENSITIVE_OPS` stay float32 with casts around them, the matrix products
and everything else run in float16. bfloat16 has no converter in ONNX Runtime's tools: asking for it is a
one-line error before any work (:func:`check_precision`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.model import one_line

PRECISIONS = ("fp32", "fp16", "bf16")
SENSITIVE_OPS = (
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceLogSumExp",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
)


def check_precision(value: str | None) -> str | None:
    """The problem with a student precision (the option's check): bf16 cannot be written."""
    if value == "bf16":
        return "must be fp32 or fp16 (ONNX Runtime's converter, onnxruntime.transformers.float16, writes no bfloat16)"
    return None


def to_float16(model: ModelProto, keep_fp32: Sequence[str] = ()) -> ModelProto:
    """A float16 copy (initializers and compute; inputs and outputs stay float32) by
    ``onnxruntime.transformers.float16``: ops without float16 kernels (its default block list) and the op types
    ``keep_fp32`` stay float32."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as e:
        raise InherccError(f"float16 conversion needs onnxruntime.transformers.float16 ({e})") from e
    blocked = list(dict.fromkeys([*DEFAULT_OP_BLOCK_LIST, *keep_fp32]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
        except Exception as e:
            raise InherccError(f"cannot convert the model to float16: {one_line(e)}") from e


def convert_precision(model: ModelProto, precision: str) -> ModelProto:
    """``model`` at ``precision`` (one of :data:`PRECISIONS`): fp32 as it is, fp16 with :data:`SENSITIVE_OPS`
    kept float32."""
    problem = check_precision(precision) if precision in PRECISIONS else f"must be one of {', '.join(PRECISIONS)}"
    if problem:
        raise InherccError(f"`quantization.precision` {problem}, got {precision!r}")
    return model if precision == "fp32" else to_float16(model, SENSITIVE_OPS)
