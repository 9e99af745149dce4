"""ONNX op implementations for the torch runtime, one module per op family.

Importing this package fills the registry (`inhercc.torchrt.ops.registry`).
"""

from inhercc.torchrt.ops import (  # noqa: F401
    activation,
    attention,
    control,
    detection,
    elementwise,
    logic,
    loss,
    math,
    nn,
    recurrent,
    reduce,
    resize,
    tensor,
)
from inhercc.torchrt.ops.registry import NodeContext, OpSpec, Unsupported, lookup, register, registered_ops

__all__ = ["NodeContext", "OpSpec", "Unsupported", "lookup", "register", "registered_ops"]
