"""Find the compressible layers of a model: MatMul / Gemm / Conv nodes with constant weights (and, when asked,
embedding tables: Gather on a constant 2-D table).

Every candidate becomes a :class:`Layer`; those that cannot be compressed keep a human-readable
``reason`` (shown by ``inhercc inspect`` and in reports), in the spirit of onnxscript's rewriter
``check`` that says why a pattern did not apply.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, numpy_helper

from inhercc import passes  # noqa: F401  (importing it registers the op families)
from inhercc.errors import InherccError
from inhercc.families import FAMILIES, FactorSource, Layer, families, family_for  # noqa: F401  (re-exported)
from inhercc.graph import Dim, count_flops, node_attr, node_flops, tensor_shapes  # noqa: F401  (re-exported)
from inhercc.model import FLOAT_TYPES, GraphScope, graph_scopes
from inhercc.passes.base import int_dims as _int_dims

DEFAULT_MIN_PARAMS = 4096
DEFAULT_MIN_SAVING = 0.10
SUBGRAPH_NOTE = "plain SVD: activations inside a subgraph cannot be tapped"


def find_layers(
    model: ModelProto,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_params: int = DEFAULT_MIN_PARAMS,
    rank_multiple: int = 1,
    min_saving: float = DEFAULT_MIN_SAVING,
    load_weights: bool = True,
    allow_nonfinite: bool = True,
    heads: int = 1,
    embeddings: bool = False,
) -> list[Layer]:
    """Every node of a registered op family (MatMul/Gemm/Conv), in graph order — the main graph's, then those
    inside If / Loop / Scan bodies at any depth (``Layer.subgraph`` says where) — as a :class:`Layer`;
    ``reason`` says why a layer is not compressible (weight not constant, unsupported attribute, integer
    weight, too small, no saving at any rank that is a multiple of ``rank_multiple``, excluded by pattern,
    weight shared with other nodes, NaN / Inf in the weight), prefixed by the subgraph it lives in.
    ``include`` / ``exclude`` patterns are searched in the node name and in ``<subgraph>/<node name>``. A
    NaN / Inf in a weight that would be factorized is an error unless ``allow_nonfinite`` (then the layer
    stays dense). ``heads``: the output heads of every chain (the saving check counts them and their gate).
    ``embeddings``: embedding tables (Gather on a constant 2-D table) are candidates too."""
    scopes = graph_scopes(model)
    shapes = tensor_shapes(model)
    uses = Counter(name for scope in scopes for node in scope.graph.node for name in node.input)
    lookup = _WeightLookup(scopes)
    patterns = _patterns(include), _patterns(exclude)
    checks = _Checks({i.name for i in model.graph.input}, uses, *patterns, min_params, rank_multiple, heads)
    layers: list[Layer] = []
    for scope in scopes:
        for node in scope.graph.node:
            if node.op_type not in FAMILIES or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            if FAMILIES[node.op_type].optional and not embeddings:
                continue
            layer = _find_layer(node, scope, lookup, shapes, checks, min_saving, load_weights, allow_nonfinite)
            if layer is not None:
                layers.append(layer)
    return layers


@dataclass
class _Checks:
    """What :func:`_check` compares a layer against (the options of :func:`find_layers`)."""

    graph_inputs: set[str]
    uses: Counter[str]
    includes: list[re.Pattern[str]]
    excludes: list[re.Pattern[str]]
    min_params: int
    rank_multiple: int
    heads: int = 1


class _WeightLookup:
    """Resolves a node input to the initializer it names, scope by scope from the innermost graph outward
    (a body input or a node output of the same name shadows an outer initializer)."""

    def __init__(self, scopes: list[GraphScope]) -> None:
        self.inits = {id(s.graph): {t.name: t for t in s.graph.initializer} for s in scopes}
        self.runtime = {
            id(s.graph): {i.name for i in s.graph.input} | {o for n in s.graph.node for o in n.output} for s in scopes
        }

    def __call__(self, name: str, scope: GraphScope) -> onnx.TensorProto | None:
        for g in reversed((*scope.outer, scope.graph)):
            init = self.inits[id(g)].get(name)
            if init is not None:
                return init
            if name in self.runtime[id(g)]:
                return None
        return None


def _find_layer(
    node: NodeProto,
    scope: GraphScope,
    lookup: _WeightLookup,
    shapes: dict[str, list[Dim]],
    checks: _Checks,
    min_saving: float,
    load: bool,
    allow_nonfinite: bool,
) -> Layer | None:
    """The layer of one node (None for a MatMul of two activations)."""
    family = family_for(node.op_type)
    w_name = node.input[family.weight_input]
    init = lookup(w_name, scope)
    if family.optional and init is not None and lookup(node.input[family.activation_input], scope) is not None:
        return None  # a lookup of constant ids (ONNX Runtime folds it): not a layer
    if init is None:
        if not family.computed_weight_is_layer:
            return None  # MatMul of activation × activation (attention scores): not a weight-carrying layer
        layer = Layer(node.name, node.op_type, w_name, tuple(_int_dims(shapes.get(w_name))), np.dtype(np.float32))
        layer.reason = "weight is not a constant (computed at run time)"
    else:
        layer = _describe(node, init, shapes, load)
        layer.heads = checks.heads
        layer.reason = _check(node, init, layer, checks, scope.path, min_saving)
        if layer.reason is None:
            layer.reason = _nonfinite(layer, init, allow_nonfinite)
    if scope.path:
        layer.subgraph = scope.path
        if layer.reason:
            layer.reason = f"inside {scope.where}: {layer.reason}"
    return layer


def _nonfinite(layer: Layer, init: onnx.TensorProto, allow: bool) -> str | None:
    """Why a weight with NaN / Inf values stays dense (``allow``), or None when it has none; an error otherwise."""
    w = layer.weight if layer.weight is not None else numpy_helper.to_array(init)
    if w.dtype.kind != "f":  # bfloat16 arrives as a non-numpy float type
        w = w.astype(np.float32)
    finite = np.isfinite(w)
    if finite.all():
        return None
    nan = int(np.isnan(w).sum())
    inf = int(w.size - finite.sum()) - nan
    counts = [f"{what} ({n} value{'s' if n > 1 else ''})" for what, n in (("NaN", nan), ("Inf", inf)) if n]
    what = " and ".join(counts)
    if allow:
        return f"weight contains {what}"
    raise InherccError(
        f"weight '{layer.weight_name}' of layer '{layer.name}' contains {what}; "
        "set `select.allow_nonfinite` to compress anyway"
    )


def _describe(node: NodeProto, init: onnx.TensorProto, shapes: dict[str, list[Dim]], load: bool) -> Layer:
    dims = tuple(int(d) for d in init.dims)
    is_float = init.data_type in FLOAT_TYPES
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    layer = Layer(node.name, node.op_type, init.name, dims, np.dtype(dtype))
    if load and is_float:
        layer.weight = numpy_helper.to_array(init)
    family = family_for(node.op_type)
    family.describe(node, layer, shapes)
    f = family.flops(node, shapes)
    if f is not None:
        layer.flops, layer.symbolic_dims = f
    return layer


def _check(
    node: NodeProto, init: onnx.TensorProto, layer: Layer, checks: _Checks, path: str, min_saving: float
) -> str | None:
    """Why this layer cannot be compressed, or None. ``path``: the subgraph the node lives in ("" at top)."""
    if init.data_type not in FLOAT_TYPES:
        return f"integer/quantized weight ({onnx.helper.tensor_dtype_to_string(init.data_type)})"
    if init.name in checks.graph_inputs:
        return "weight is a graph input (overridable at run time), not a constant"
    if checks.uses[init.name] > 1:
        return f"weight shared by {checks.uses[init.name]} uses (tied weights)"
    reason = family_for(node.op_type).check(node, layer)
    if reason is not None:
        return reason
    names = [node.name, f"{path}/{node.name}"] if path else [node.name]
    if checks.includes and not any(p.search(n) for p in checks.includes for n in names):
        return "excluded by pattern (matches no include pattern)"
    if any(p.search(n) for p in checks.excludes for n in names):
        return "excluded by pattern (matches an exclude pattern)"
    if layer.weight_params < checks.min_params:
        return f"too small ({layer.weight_params} params < {checks.min_params})"
    step = max(1, checks.rank_multiple)
    smallest = min(step, layer.full_rank) * layer.groups
    if layer.factor_params(smallest) > (1.0 - min_saving) * layer.weight_params:
        return (
            f"no saving at any rank (the smallest factor pair, rank {smallest}, keeps "
            f"{layer.factor_params(smallest) / layer.weight_params:.0%} of the weights)"
        )
    return None


def _patterns(p: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if p is None:
        return []
    items = [p] if isinstance(p, str) else list(p)
    out = []
    for item in items:
        try:
            out.append(re.compile(item))
        except re.error as e:
            raise InherccError(f"bad regular expression {item!r}: {e}") from e
    return out
