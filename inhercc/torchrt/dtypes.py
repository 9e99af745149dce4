"""ONNX element types <-> torch dtypes, and lossless numpy/TensorProto <-> torch conversion.

numpy has no bfloat16/float8 types; onnx hands them out as `ml_dtypes` arrays, which torch cannot read
directly, so they travel as same-width unsigned integers and are reinterpreted on the other side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from inhercc.errors import InherccError

# ONNX elem_type -> torch dtype, for every type the runtime can hold.
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.COMPLEX128: torch.complex128,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}

# Floating-point types whose initializers become trainable parameters.
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
FLOAT8_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz}
)
# Unsigned types wider than uint8: torch implements few kernels for them (no add, no compare on CPU).
WIDE_UNSIGNED: frozenset[torch.dtype] = frozenset({torch.uint16, torch.uint32, torch.uint64})

# torch dtypes numpy cannot hold natively -> (ml_dtypes name, same-width integer carrier).
_CARRIED: dict[torch.dtype, tuple[str, torch.dtype, type]] = {
    torch.bfloat16: ("bfloat16", torch.int16, np.int16),
    torch.float8_e4m3fn: ("float8_e4m3fn", torch.uint8, np.uint8),
    torch.float8_e4m3fnuz: ("float8_e4m3fnuz", torch.uint8, np.uint8),
    torch.float8_e5m2: ("float8_e5m2", torch.uint8, np.uint8),
    torch.float8_e5m2fnuz: ("float8_e5m2fnuz", torch.uint8, np.uint8),
}
_CARRIED_BY_NAME: dict[str, torch.dtype] = {name: dt for dt, (name, _, _) in _CARRIED.items()}


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype for an ONNX elem_type; InherccError for types torch cannot hold (string, int4…)."""
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise InherccError(f"ONNX element type {name} is not supported by the torch runtime") from None


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ONNX elem_type for a torch dtype."""
    try:
        return TORCH_TO_ONNX[dtype]
    except KeyError:
        raise InherccError(f"torch dtype {dtype} has no ONNX element type") from None


def is_float(dtype: torch.dtype) -> bool:
    """True for the floating-point types that carry weights and gradients."""
    return dtype in FLOAT_DTYPES


def from_numpy(array: Any) -> torch.Tensor:
    """A torch tensor with the array's values and dtype (bfloat16/float8 `ml_dtypes` arrays included)."""
    a = np.asarray(array)
    name = a.dtype.name
    if name in _CARRIED_BY_NAME:
        dtype = _CARRIED_BY_NAME[name]
        _, carrier, np_carrier = _CARRIED[dtype]
        return torch.from_numpy(np.array(a, order="C").view(np_carrier)).view(dtype)
    if a.dtype == object or a.dtype.kind in "USV":
        raise InherccError(f"numpy dtype {a.dtype} is not supported by the torch runtime")
    if not a.flags.writeable or not a.flags.c_contiguous or a.dtype.byteorder == ">":
        # a writable, native-endian C-order copy (np.ascontiguousarray would turn 0-d into 1-d)
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
    return torch.from_numpy(a)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor (detached, on CPU); bfloat16/float8 come back as `ml_dtypes` arrays."""
    t = tensor.detach().cpu()
    if t.dtype in _CARRIED:
        import ml_dtypes

        name, carrier, _ = _CARRIED[t.dtype]
        return t.view(carrier).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """The value of a TensorProto (its external data must already be loaded) as a torch tensor."""
    torch_dtype(proto.data_type)  # clear error for unsupported element types
    if proto.data_location == TensorProto.EXTERNAL:
        raise InherccError(
            f"tensor {proto.name!r} keeps its data in an external file; load the model with "
            "its external data (onnx.load(path), or onnx.load_external_data_for_model)"
        )
    return from_numpy(numpy_helper.to_array(proto))


def tensor_to_proto(tensor: torch.Tensor, name: str, data_type: int | None = None) -> onnx.TensorProto:
    """A TensorProto named `name` holding the tensor's values, cast to `data_type` if given."""
    t = tensor.detach()
    if data_type is not None and ONNX_TO_TORCH.get(data_type, t.dtype) != t.dtype:
        t = t.to(ONNX_TO_TORCH[data_type])
    return numpy_helper.from_array(to_numpy(t), name)
