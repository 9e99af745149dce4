"""The pass protocol, the op-family interface, the registries, and the rewrite helpers every factorization
pass shares.

Like onnx-ir passes, a pass is a callable ``pass(model) -> PassResult(model, modified, notes)``. Passes
rewrite the ModelProto they are given in place (the pipeline hands them its own copy) and know nothing
of the CLI. A factorization pass gets the planned ranks, the :class:`~inhercc.layers.Layer` records and a
:data:`FactorSource` that produces the factor matrices (plain SVD, whitened SVD or random).

An :class:`OpFamily` is everything inhercc knows about one op (recognition and checks, FLOPs, calibration rows,
the weight matrix and its inverse, the rewrite, the latency micro-model); each lives in its own file and is
registered by op type (:func:`inhercc.families.family_for` finds it). Adding a family is adding one file.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, numpy_helper

from inhercc import linalg
from inhercc.errors import InherccError
from inhercc.families import FactorSource, Layer, families, family_for
from inhercc.graph import Dim, node_flops
from inhercc.model import MIN_OPSET, copy_without, graph_scopes, implicit_inputs, infer_model_shapes, opset_of


@dataclass
class PassResult:
    """What a pass did: the (rewritten) model, whether anything changed, and one note per rewrite."""

    model: ModelProto
    modified: bool
    notes: list[str] = field(default_factory=list)


class Pass(Protocol):
    def __call__(self, model: ModelProto) -> PassResult: ...


def run_passes(model: ModelProto, passes: Iterable[Pass]) -> PassResult:
    """Run passes in order, threading the model through; notes are concatenated."""
    modified, notes = False, []
    for p in passes:
        result = p(model)
        model, modified = result.model, modified or result.modified
        notes += result.notes
    return PassResult(model, modified, notes)


class OpFamily:
    """One op family. The defaults describe a 2-D weight multiplying the last axis of the input (MatMul's
    ``[in, out]`` layout); a family overrides what differs. Register an instance with
    :func:`inhercc.families.register_family`."""

    op_type: str = ""
    order: int = 100  # the rewrite runs the families' passes in this order
    pooled_gate: bool = False  # True: the heads' gate reads the globally pooled bottleneck (one per sample)
    computed_weight_is_layer: bool = True  # False: a node whose weight is computed at run time is no layer
    weight_input: int = 1  # which node input is the weight
    activation_input: int = 0  # which node input the weight multiplies (calibration taps it)
    optional: bool = False  # True: a candidate only when asked for (embedding tables: `select.embeddings`)
    diagonal_gram: bool = False  # True: the input is one-hot ids, its Gram kept as row counts (count_rows)

    def describe(self, node: NodeProto, layer: Layer, shapes: Mapping[str, list[Dim]]) -> None:
        """Fill the layer's geometry (features, groups, kernel, transposed, scale, bias) from its node."""
        if len(layer.weight_shape) == 2:
            layer.in_features, layer.out_features = layer.weight_shape
            layer.transposed = True

    def check(self, node: NodeProto, layer: Layer) -> str | None:
        """Why this family cannot compress the node (a reason shown to the user), or None."""
        dims = layer.weight_shape
        return f"weight is {len(dims)}-D, expected 2-D" if len(dims) != 2 else None

    def flops(self, node: NodeProto, shapes: Mapping[str, list[Dim]]) -> tuple[int, tuple[str, ...]] | None:
        """FLOPs per sample and the symbolic dims counted as 1, or None when shapes are unknown."""
        return node_flops(node, dict(shapes))

    def matrix(self, layer: Layer) -> np.ndarray:
        """The loaded weight as a float64 ``[groups, out, in]`` stack (``y = W x``)."""
        w = np.asarray(layer.weight, dtype=np.float64)
        m = w.T if layer.transposed else w
        return (layer.scale * m)[None]

    def stored_weight(self, layer: Layer, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: a ``[groups, out, in]`` stack back in the initializer's layout."""
        m = matrix[0] / layer.scale
        return m.T if layer.transposed else m

    def decompose(self, layer: Layer, gram: np.ndarray) -> linalg.SVD | linalg.WhitenedSVD:
        """The output-optimal decomposition of the layer's weight under its input Gram (a whitened SVD)."""
        return linalg.whitened_svd(layer.matrix(), gram)

    def count_rows(
        self, counts: np.ndarray | None, ids: np.ndarray, geometry: Hashable | None, mask: np.ndarray | None
    ) -> np.ndarray:
        """For a ``diagonal_gram`` family: ``counts`` plus the rows ``ids`` selects."""
        raise NotImplementedError

    def calibration_geometry(self, node: NodeProto, layer: Layer) -> Hashable | None:
        """What, beside the input tensor, decides the calibration rows (layers sharing both share a Gram)."""
        return None

    def calibration_rows(
        self, value: np.ndarray, geometry: Hashable | None, mask: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        """The rows the weight multiplies, as ``[g, rows, k]`` blocks: here the input's last axis, padding
        positions (``mask == 0``) left out."""
        x = value
        if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x[mask != 0]  # drop padding positions
        elif mask is not None and x.ndim == 2 and x.shape[0] == mask.size:
            x = x[mask.reshape(-1) != 0]  # [batch·seq, in]: an exporter flattened the tokens
        yield x.reshape(1, -1, x.shape[-1])

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        """The nodes replacing ``node`` (the teacher's output name kept) and their factor initializers."""
        raise NotImplementedError

    def micro_feed(self, layer: Layer, input_shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """A random input of ``input_shape`` for the micro-models (normal values in the weight's dtype)."""
        return rng.standard_normal(list(input_shape)).astype(layer.weight_dtype)

    def micro_model(
        self, model: ModelProto, node: NodeProto, layer: Layer, rank: int, input_shape: Sequence[int], seed: int = 0
    ) -> tuple[ModelProto, ModelProto]:
        """The dense node alone (one node) and the chain its rewrite emits at ``rank``, both reading one input
        of ``input_shape``. Factor values are random: only their shapes matter for timing."""
        inits = {t.name: t for t in model.graph.initializer}
        dtype = onnx.helper.np_dtype_to_tensor_dtype(layer.weight_dtype)
        tensors = [inits[layer.weight_name]]
        for extra in node.input[2:]:
            if extra and extra not in inits:
                raise InherccError(f"{layer.name}: input {extra} is computed at run time; cannot time the node alone")
            if extra:
                tensors.append(inits[extra])
        x = onnx.helper.make_tensor_value_info(node.input[0], dtype, list(input_shape))
        y = onnx.helper.make_tensor_value_info(node.output[0], dtype, None)
        single = onnx.helper.make_node(node.op_type, list(node.input), [node.output[0]], name=node.name)
        single.attribute.extend(node.attribute)
        graph = onnx.helper.make_graph([single], "dense", [x], [y], tensors)
        dense = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

        def factors(la: Layer, r: int) -> tuple[np.ndarray, np.ndarray]:
            return linalg.random_factors(la.out_features, la.in_features, r // la.groups, la.groups, seed=seed)

        return dense, rewrite_ranks(dense, {layer.name: rank}, [layer], factors).model


def int_dims(dims: Sequence[Dim] | None) -> list[int]:
    """The known (integer) dims of a shape."""
    return [d for d in (dims or []) if isinstance(d, int)]


def bias_params(node: NodeProto, shapes: Mapping[str, list[Dim]]) -> int:
    """Parameters of a node's optional third input (bias / C), 0 without one."""
    if len(node.input) > 2 and node.input[2]:
        return int(np.prod(int_dims(shapes.get(node.input[2])) or [0]))
    return 0


def rewrite_ranks(
    model: ModelProto, ranks: Mapping[str, int], layers: Sequence[Layer], factors: FactorSource
) -> PassResult:
    """Apply every registered family's factorization pass for ``ranks`` (layer name → total rank) to a copy
    of ``model``; shapes re-inferred. The notes say one line per rewritten node."""
    by_name = {layer.name: layer for layer in layers}
    heads = [n for n in ranks if n in by_name and by_name[n].heads > 1]
    if heads and opset_of(model) < MIN_OPSET:
        raise InherccError(
            f"gated heads need opset >= {MIN_OPSET}, the model has {opset_of(model)} "
            "(inhercc.model.prepare_model upgrades it)"
        )
    student = copy_without(model, replaced_weights(model, ranks, by_name))
    result = run_passes(student, [FactorizePass(ranks, by_name, factors, f.op_type) for f in families()])
    out = result.model
    del out.graph.value_info[:]  # stale for the rewritten nodes; re-inferred below
    return PassResult(infer_model_shapes(out), result.modified, result.notes)


def replaced_weights(model: ModelProto, ranks: Mapping[str, int], layers: Mapping[str, Layer]) -> set[str]:
    """The main-graph weights the rewrite replaces and nothing else reads (not graph inputs): the student's copy
    leaves them out rather than copying and then dropping them."""
    reads = Counter(name for scope in graph_scopes(model) for node in scope.graph.node for name in node.input)
    inputs = {i.name for i in model.graph.input}
    planned = [layers[n] for n in ranks if n in layers and layers[n].subgraph is None]
    return {la.weight_name for la in planned if reads[la.weight_name] == 1 and la.weight_name not in inputs}


class FactorizePass:
    """Shared driver: for every node of ``op_type`` with a planned rank, ask the op's family
    (:meth:`OpFamily.rewrite`) for the nodes that replace it; then drop weights nothing uses any more.

    Nodes inside If / Loop / Scan bodies (any depth) are rewritten in place in their body; their factor
    initializers, like all others, go to the main graph, which every body reads as its outer scope."""

    op_type: str = ""

    def __init__(
        self, ranks: Mapping[str, int], layers: Mapping[str, Layer], factors: FactorSource, op_type: str | None = None
    ) -> None:
        self.op_type = op_type or self.op_type
        self.ranks = dict(ranks)
        self.layers = dict(layers)
        self.factors = factors

    def __call__(self, model: ModelProto) -> PassResult:
        names = GraphNames(model)
        factors: list[onnx.TensorProto] = []
        notes: list[list[str]] = []
        # innermost bodies first: rebuilding a graph's node list copies the bodies its nodes hold
        for scope in reversed(graph_scopes(model)):
            notes.insert(0, self._rewrite_graph(scope.graph, names, factors))
        if not factors:
            return PassResult(model, False, [])
        model.graph.initializer.extend(factors)  # the main graph: every body can read them (outer scope)
        remove_unused_initializers(model)
        return PassResult(model, True, [note for graph_notes in notes for note in graph_notes])

    def _rewrite_graph(self, graph: GraphProto, names: GraphNames, factors: list[onnx.TensorProto]) -> list[str]:
        """Replace the planned nodes of one graph (not its bodies) by their chains, in place; the factor
        initializers are appended to ``factors``. Returns one note per rewrite."""
        new_nodes: list[NodeProto] = []
        notes: list[str] = []
        for node in graph.node:
            rank = self.ranks.get(node.name) if node.op_type == self.op_type else None
            if rank is None or node.name not in self.layers:
                new_nodes.append(node)
                continue
            layer = self.layers[node.name]
            input_factor, output_factor = self.factors(layer, rank)
            replacement, tensors = self.rewrite(node, layer, input_factor, output_factor, names)
            for n in replacement:
                n.metadata_props.extend(node.metadata_props)
            new_nodes.extend(replacement)
            factors.extend(tensors)
            heads = f" x {layer.heads} heads" if layer.heads > 1 else ""
            notes.append(f"{node.name}: {self.op_type} {list(layer.weight_shape)} -> rank {rank}{heads}")
        if notes:
            del graph.node[:]
            graph.node.extend(new_nodes)
        return notes

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        """The replacement of one node: its family's rewrite."""
        return family_for(self.op_type).rewrite(node, layer, input_factor, output_factor, names)


class GraphNames:
    """Hands out tensor/node names not yet used anywhere in the model (its subgraphs included)."""

    def __init__(self, model: ModelProto) -> None:
        self.used: set[str] = set()
        for scope in graph_scopes(model):
            g = scope.graph
            self.used |= {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                self.used.add(n.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


_ANONYMOUS = re.compile(r"^(onnx::|val_\d+$|_v_\d+$|v\d+$|\d+$|_?param_?\d+$)")


def weight_base_name(node: NodeProto, weight_name: str) -> str:
    """A readable base for the factor names: the teacher's weight name, or — when the exporter named it
    anonymously (``onnx::MatMul_123``, ``val_8``) — the module path recorded on the node."""
    if not _ANONYMOUS.search(weight_name):
        return weight_name
    for kv in node.metadata_props:
        if kv.key == "pkg.torch.onnx.name_scopes":
            scopes = re.findall(r"'([^']*)'", kv.value) or [kv.value]
            scope = scopes[-1].strip("/ ") if scopes else ""
            if scope:
                return f"{scope}.weight"
    parts = [p for p in node.name.strip("/").split("/") if p]
    if len(parts) > 1:
        return ".".join(parts[:-1]) + ".weight"
    return weight_name


def factor_tensors(
    names: GraphNames, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray
) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    """The two factor initializers, in the teacher weight's dtype, named ``<weight>.inherit_in/_out``."""
    base = weight_base_name(node, layer.weight_name)
    a = numpy_helper.from_array(
        np.ascontiguousarray(input_factor.astype(layer.weight_dtype)), names.fresh(f"{base}.inherit_in")
    )
    b = numpy_helper.from_array(
        np.ascontiguousarray(output_factor.astype(layer.weight_dtype)), names.fresh(f"{base}.inherit_out")
    )
    return a, b


def factor_chain(
    node: NodeProto,
    names: GraphNames,
    a: onnx.TensorProto,
    b: onnx.TensorProto,
    first_attrs: dict[str, object],
    second_attrs: dict[str, object],
) -> list[NodeProto]:
    """The two runtime products replacing ``node``: ``mid = op(x, A)`` then ``y = op(mid, B[, bias])``; the
    output keeps the teacher's name and the optional third input (bias / C) moves to the second node."""
    op = node.op_type
    mid = names.fresh(f"{node.output[0]}.inherit_mid")
    first = onnx.helper.make_node(
        op, [node.input[0], a.name], [mid], name=names.fresh(f"{node.name}.inherit_in"), **first_attrs
    )
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    second = onnx.helper.make_node(
        op, [mid, b.name, *bias], [node.output[0]], name=names.fresh(f"{node.name}.inherit_out"), **second_attrs
    )
    return [first, second]


def copy_attributes(node: NodeProto, skip: Iterable[str] = ()) -> dict[str, object]:
    skip = set(skip)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in skip}


def remove_unused_initializers(model: ModelProto) -> int:
    """Drop initializers nothing reads — in the main graph and in every If / Loop / Scan body: an initializer
    of a graph is used when a node of that graph or of a body below it reads it, or it is a graph output (or,
    in a body, a body input's default value). Dropped main-graph initializers leave the graph inputs too."""
    removed = 0
    for scope in reversed(graph_scopes(model)):
        g = scope.graph
        used = {i for n in g.node for i in (*n.input, *implicit_inputs(n))} | {o.name for o in g.output}
        used |= {i.name for i in g.input} if scope.path else set()
        keep = [t for t in g.initializer if t.name in used]
        if len(keep) == len(g.initializer):
            continue
        dropped = {t.name for t in g.initializer} - {t.name for t in keep}
        removed += len(dropped)
        del g.initializer[:]
        g.initializer.extend(keep)
        if not scope.path:
            graph_inputs = [i for i in g.input if i.name not in dropped]
            del g.input[:]
            g.input.extend(graph_inputs)
    return removed


GATE_STD = 0.01  # the heads' gate starts N(0, GATE_STD²): near-even mixing, random enough for the heads to diverge
INT64_MAX = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class HeadLayout:
    """How a family's heads sit in the wide head output ``[..., C, *spatial]`` and how its gate reads the rank-r
    bottleneck. ``dims`` replaces the channel axis C (``(H, out)``; a grouped conv's channels are group-major:
    ``(g, H, out/g)``) and ``head_axis`` is the axis of H after that reshape."""

    heads: int
    rank: int  # total rank: the bottleneck's channels, the gate's inputs
    dims: tuple[int, ...]
    channel_axis: int  # 1 (Gemm, Conv) or -1 (MatMul: the last axis)
    head_axis: int
    spatial: int = 0  # axes after the channel axis (a conv's spatial axes)
    pooled: bool = False  # one gate per sample from GlobalAveragePool(bottleneck), else one per row / token

    @property
    def grouped(self) -> bool:
        return len(self.dims) > 2


def stacked_heads(output_factor: np.ndarray, heads: int) -> np.ndarray:
    """``heads`` copies of each group's output factor stacked along its output axis: ``[g, out, r]`` becomes
    ``[g, heads·out, r]`` (head-major within a group). Every head starts as the same factor, so the gated mix of
    the heads equals the one-head chain exactly whatever the gate (the function-preserving init)."""
    if heads == 1:
        return output_factor
    g, out, r = output_factor.shape
    return np.broadcast_to(output_factor[:, None], (g, heads, out, r)).reshape(g, heads * out, r)


def gate_tensor(names: GraphNames, node: NodeProto, layer: Layer, rank: int) -> onnx.TensorProto:
    """The heads' gate ``<weight>.inherit_gate`` ``[r, H]`` (a linear r→H on the bottleneck), drawn from
    N(0, GATE_STD²) seeded by the layer's seed and name: the same student for the same recipe."""
    rng = np.random.default_rng([layer.seed % 2**32, zlib.crc32(layer.name.encode())])
    gate = rng.normal(0.0, GATE_STD, (rank, layer.heads)).astype(layer.weight_dtype)
    return numpy_helper.from_array(gate, names.fresh(f"{weight_base_name(node, layer.weight_name)}.inherit_gate"))


class _Emitter:
    """Collects the nodes and constants of one rewrite, each named after the node it replaces."""

    def __init__(self, node: NodeProto, names: GraphNames) -> None:
        self.node, self.names = node, names
        self.nodes: list[NodeProto] = []
        self.tensors: list[onnx.TensorProto] = []

    def add(
        self, op: str, inputs: Sequence[str], what: str, last: bool = False, label: str = "", **attrs: object
    ) -> str:
        """One node named ``<node>.inherit_<label or what>``; its output is the teacher node's output when
        ``last``, else a fresh ``<output>.inherit_<what>``."""
        out = self.node.output[0] if last else self.names.fresh(f"{self.node.output[0]}.inherit_{what}")
        name = self.names.fresh(f"{self.node.name}.inherit_{label or what}")
        self.nodes.append(onnx.helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, what: str, values: Iterable[float] | float, dtype: np.dtype | type = np.int64) -> str:
        """A constant vector: shape, axes, slice bounds (int64), or a scale in the layer's dtype."""
        name = self.names.fresh(f"{self.node.name}.inherit_{what}")
        array = np.asarray(list(values) if isinstance(values, Iterable) else values, dtype)
        self.tensors.append(numpy_helper.from_array(array, name))
        return name


def heads_chain(
    node: NodeProto,
    names: GraphNames,
    layer: Layer,
    factors: tuple[onnx.TensorProto, onnx.TensorProto],
    attrs: tuple[dict[str, object], dict[str, object]],
    layout: HeadLayout,
    beta: float = 1.0,
) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
    """The gated multi-head chain replacing ``node`` (its output name kept): ``z = op(x, A)``; the heads as ONE
    wide product ``w = op(z, B_wide)``; the gate ``softmax(z·G)`` per row / token, or
    ``softmax(Flatten(GlobalAveragePool(z))·G)`` per sample; ``y = ReduceSum(reshape(w)·gate) + beta·bias`` with
    the optional bias (third input) added once, after the mix. Returns the nodes and the initializers (factors,
    gate, constants)."""
    emit = _Emitter(node, names)
    (a, b), bias = factors, node.input[2] if len(node.input) > 2 and node.input[2] else None
    gate = gate_tensor(names, node, layer, layout.rank)
    emit.tensors += [a, b, gate]
    mid = emit.add(node.op_type, [node.input[0], a.name], "mid", label="in", **attrs[0])
    wide = emit.add(node.op_type, [mid, b.name], "heads", label="out", **attrs[1])
    source = mid
    if layout.pooled:
        source = emit.add("Flatten", [emit.add("GlobalAveragePool", [mid], "pool")], "pooled", axis=1)
    weights = emit.add("Softmax", [emit.add("MatMul", [source, gate.name], "gate_logits")], "gate", axis=-1)
    if layout.pooled:  # [N, H] → [N, 1…, H, 1…]: broadcast over the reshaped heads [N, *dims, *spatial]
        ones = [layout.heads if i == layout.head_axis else 1 for i in range(1, len(layout.dims) + 1 + layout.spatial)]
        weights = emit.add("Reshape", [weights, emit.const("gate_shape", [0, *ones])], "gate_b")
    else:  # [..., H] → [..., H, 1]
        weights = emit.add("Unsqueeze", [weights, emit.const("gate_axes", [-1])], "gate_b")
    prefix, suffix = _around_channels(emit, wide, layout)
    by_head = emit.add("Reshape", [wide, _shape(emit, prefix, layout.dims, suffix, "head_shape")], "by_head")
    weighted = emit.add("Mul", [by_head, weights], "weighted")
    last = bias is None and not layout.grouped
    y = emit.add("ReduceSum", [weighted, emit.const("head_axis", [layout.head_axis])], "mixed", last, keepdims=0)
    if layout.grouped:  # [N, g, out/g, *spatial] → [N, out, *spatial]
        channels = int(np.prod(layout.dims)) // layout.heads
        restore = _shape(emit, prefix, (channels,), suffix, "out_shape")
        y = emit.add("Reshape", [y, restore], "restored", last=bias is None)
    if bias is not None:
        if beta != 1.0:
            bias = emit.add("Mul", [bias, emit.const("beta", beta, layer.weight_dtype)], "beta_bias")
        if layout.spatial:  # a conv bias [out] → [out, 1, …]
            bias = emit.add("Unsqueeze", [bias, emit.const("bias_axes", range(1, layout.spatial + 1))], "bias")
        emit.add("Add", [y, bias], "bias_add", last=True)
    return emit.nodes, emit.tensors


def _around_channels(emit: _Emitter, wide: str, layout: HeadLayout) -> tuple[list[str] | None, list[str]]:
    """The wide output's dims before and after its channel axis, read at run time (Shape, Slice) where they may
    be symbolic; None for a Gemm's 2-D ``[N, C]`` (a Reshape's 0 keeps N)."""
    if layout.channel_axis == 1 and layout.spatial == 0:
        return None, []
    shape = emit.add("Shape", [wide], "shape")
    prefix = [emit.add("Slice", [shape, emit.const("start", [0]), emit.const("end", [layout.channel_axis])], "lead")]
    if layout.spatial == 0:
        return prefix, []
    bounds = [emit.const("after", [layout.channel_axis + 1]), emit.const("stop", [INT64_MAX])]
    return prefix, [emit.add("Slice", [shape, *bounds], "trail")]


def _shape(emit: _Emitter, prefix: list[str] | None, dims: Sequence[int], suffix: list[str], what: str) -> str:
    """The target shape ``prefix + dims + suffix`` of a Reshape (a constant ``[0, *dims]`` without a prefix)."""
    if prefix is None:
        return emit.const(what, [0, *dims])
    return emit.add("Concat", [*prefix, emit.const(f"{what}_dims", dims), *suffix], what, axis=0)
