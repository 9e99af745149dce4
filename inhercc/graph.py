"""Graph utilities below every stage: tensor shapes, dims and FLOP counts of an ONNX graph."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import ModelProto, NodeProto

from inhercc.model import graph_scopes

Dim = int | str | None  # a dim: a number, a symbol, or None when unknown


def tensor_shapes(model: ModelProto) -> dict[str, list[Dim]]:
    """Known shapes of every named tensor (graph inputs/outputs, value_info, initializers), subgraphs included
    (a name a body redefines takes the main graph's shape)."""
    shapes: dict[str, list[Dim]] = {}
    for scope in reversed(graph_scopes(model)):
        g = scope.graph
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
        for init in g.initializer:
            shapes[init.name] = list(init.dims)
    return shapes


def node_flops(node: NodeProto, shapes: dict[str, list[Dim]]) -> tuple[int, tuple[str, ...]] | None:
    """FLOPs (2 × multiply-accumulates) per sample of a MatMul/Gemm/Conv node, or None when shapes are
    unknown. The first dim of the output is the batch; other symbolic dims count as 1 and are returned."""
    out = shapes.get(node.output[0])
    if out is None or len(out) == 0:
        return None
    if node.op_type == "MatMul":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if a is None or b is None or len(a) == 0:
            return None
        k = a[-1]
    elif node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        if a is None or len(a) != 2:
            return None
        k = a[0] if node_attr(node, "transA", 0) else a[1]
    elif node.op_type in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1])
        if w is None:
            return None
        k = int(np.prod([d for d in w[1:] if isinstance(d, int)]))
        if node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0])
            if x is None:
                return None
            dims = [1] + list(x[2:]) + [w[1] * node_attr(node, "group", 1)]
            per_output = w[0] // node_attr(node, "group", 1) if isinstance(w[0], int) else 1
            return product_flops(dims, int(np.prod(w[2:])) * per_output)
    else:
        return None
    per_sample = out[1:] if len(out) >= 2 else out
    return product_flops(list(per_sample), k)


def product_flops(dims: list[Dim], k: Dim) -> tuple[int, tuple[str, ...]]:
    """``2·k·Π dims`` (the FLOPs of a product with output ``dims`` and inner size ``k``; unknown dims count as 1)
    and the names of the symbolic dims among them."""
    symbolic = tuple(
        "unnamed" if str(d).startswith("unk__") or d is None else str(d)
        for d in list(dims) + [k]
        if not isinstance(d, int)
    )
    n = 1
    for d in list(dims) + [k]:
        n *= d if isinstance(d, int) and d > 0 else 1
    return 2 * n, symbolic


FlopCounter = Callable[[NodeProto, dict[str, list[Dim]]], "tuple[int, tuple[str, ...]] | None"]
# The ops whose FLOPs are counted (the ones that dominate); an op family registered in inhercc.families adds
# its op here with its own counter, so whole-model totals count every layer the families know.
FLOP_COUNTERS: dict[str, FlopCounter] = dict.fromkeys(("MatMul", "Gemm", "Conv", "ConvTranspose"), node_flops)


def count_flops(model: ModelProto) -> tuple[int, tuple[str, ...]]:
    """FLOPs per sample of all nodes with a counter in :data:`FLOP_COUNTERS`, from inferred shapes; returns
    the total and the symbolic dims that were counted as 1. A node inside an If / Loop / Scan body counts
    once (every branch, one iteration)."""
    shapes = tensor_shapes(model)
    total, symbolic = 0, set()
    for node in (n for scope in graph_scopes(model) for n in scope.graph.node):
        counter = FLOP_COUNTERS.get(node.op_type)
        if counter is not None:
            f = counter(node, shapes)
            if f is not None:
                total += f[0]
                symbolic.update(f[1])
    return total, tuple(sorted(symbolic))


def node_attr(node: NodeProto, name: str, default: int | float) -> int | float:
    """A node attribute's value, or ``default`` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
