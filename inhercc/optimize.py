"""ONNX Runtime's transformer optimizer on teacher and student, and the layers it must find dense to fuse.

ONNX Runtime fuses a BERT attention block into one ``Attention`` node only when Q, K and V are single MatMuls
of the block's input with constant weights (``onnxruntime/transformers/fusion_attention.py`` packs the three
weights into one) and the output projection is a single MatMul (the pattern is matched back from the layer norm
after it): a factor chain ``(x·A)·B`` in any of the four breaks it, and so does packing the input factors (the
three products then read the bottleneck, not ``x``). So with the optimizer on, those four layers of every block
the optimizer fuses in the teacher stay dense (:func:`fused_layers`) and the budget goes to the other layers; the
FFN keeps its fusions (bias-GELU, skip layer norm) when factorized, since those patterns start after its MatMuls.
Measured on a 2-layer BERT (eager attention, tests/test_optimize.py): teacher 2 ``Attention`` nodes; the student
with every layer factorized 0, packed or not; with Q/K/V dense and the output projection factorized 0; with the
four dense 2. Embedding tables are not kept dense for ``EmbedLayerNormalization``: a factorized word table ends
that fusion, and the table's parameters (half of a small BERT) were judged worth more.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, numpy_helper

from inhercc.errors import InherccError
from inhercc.families import Layer
from inhercc.graph import FLOP_COUNTERS, Dim, product_flops
from inhercc.model import constant_tensor, initializer_map, one_line
from inhercc.passes.base import remove_unused_initializers

FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention")
FUSED_AWAY_REASON = "kept dense: ONNX Runtime's attention fusion needs it single"


def attention_flops(node: NodeProto, shapes: Mapping[str, list[Dim]]) -> tuple[int, tuple[str, ...]] | None:
    """FLOPs per sample of a fused ``Attention`` node, as the unfused graph counts them: the packed Q/K/V
    projection ``x[S, in] · W[in, 3D]`` plus the scores ``Q·Kᵀ`` and the context ``P·V`` (``2·S²·D`` each)."""
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1]) if len(node.input) > 1 else None
    if x is None or w is None or len(x) != 3 or len(w) != 2 or not isinstance(w[1], int):
        return None
    seq: Dim = x[1]
    projection, symbolic = product_flops([seq, w[1]], w[0])
    scores, _ = product_flops([seq, seq], w[1] // 3)
    return projection + 2 * scores, symbolic


FLOP_COUNTERS.setdefault("Attention", attention_flops)  # whole-model totals count the fused attention too


@contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """The optimizer logs every fusion it tries at WARNING; only errors reach the user."""
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def optimize_transformer(model: ModelProto, num_heads: int = 0, hidden_size: int = 0) -> ModelProto:
    """``model`` through ``onnxruntime.transformers.optimizer.optimize_model`` (BERT fusions, ``opt_level`` 0: the
    Python fusions only, so the result runs on every provider; ONNX Runtime's own graph optimizations still run
    when a session loads it). ``num_heads`` / ``hidden_size`` 0: read from the graph (:func:`detect_attention`)."""
    from onnxruntime.transformers.optimizer import optimize_model

    if not num_heads or not hidden_size:
        found = detect_attention(model)
        num_heads, hidden_size = num_heads or found[0], hidden_size or found[1]
    copy = ModelProto()
    copy.CopyFrom(model)
    try:
        with _quiet_optimizer():
            optimized = optimize_model(copy, "bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    except Exception as e:  # the optimizer raises whatever its fusions meet
        raise InherccError(f"ONNX Runtime's transformer optimizer failed: {one_line(e)[:300]}") from None
    remove_unused_initializers(optimized.model)  # it leaves the packed Q/K/V biases behind
    imported = {o.domain for o in optimized.model.opset_import}
    if "com.microsoft" not in imported and any(n.domain == "com.microsoft" for n in optimized.model.graph.node):
        optimized.model.opset_import.add(domain="com.microsoft", version=1)  # its save() adds it; ONNX's checks need it
    return optimized.model


def fused_counts(model: ModelProto) -> dict[str, int]:
    """How many nodes of each contrib (``com.microsoft``) op a model holds: what the optimizer fused."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft").items()))


def attention_count(model: ModelProto) -> int:
    """Fused attention nodes (``Attention``, ``MultiHeadAttention``, …) in the main graph."""
    return sum(1 for n in model.graph.node if n.op_type in FUSED_ATTENTION and n.domain == "com.microsoft")


def fused_layers(teacher: ModelProto, optimized: ModelProto, layers: Sequence[Layer]) -> list[str]:
    """The MatMul / Gemm layers of the main graph the attention fusion needs single: those the optimizer removed
    from ``teacher`` (Q, K, V: packed into the attention node) and those reading an attention node's output (the
    output projection: the fusion matches back from it). Factorizing either loses the fusion."""
    attention = {o for n in optimized.graph.node if n.op_type in FUSED_ATTENTION for o in n.output}
    if not attention:
        return []
    kept = {n.name: n for n in optimized.graph.node}
    main = {n.name for n in teacher.graph.node}

    def needed(layer: Layer) -> bool:
        if layer.op not in ("MatMul", "Gemm") or layer.subgraph is not None or layer.name not in main:
            return False
        node = kept.get(layer.name)
        return node is None or node.input[0] in attention

    return [la.name for la in layers if needed(la)]


def keep_fused_dense(layers: Sequence[Layer], names: Sequence[str]) -> int:
    """Mark the compressible ``layers`` named in ``names`` dense with :data:`FUSED_AWAY_REASON`; how many."""
    chosen = set(names)
    marked = 0
    for layer in layers:
        if layer.name in chosen and layer.compressible:
            layer.reason = FUSED_AWAY_REASON
            marked += 1
    return marked


def detect_attention(model: ModelProto) -> tuple[int, int]:
    """``(num_heads, hidden_size)`` of the first attention projection found — ``Reshape(Add(MatMul(x, W), b),
    [batch, seq, H, D])`` with constant ``W [in, hidden]`` and a shape whose last two entries are constants —, or
    ``(0, 0)`` (the optimizer then tries its own detection). An exporter that writes ``H`` as -1 (transformers'
    eager attention through torch's legacy exporter) has ``H = hidden / D``."""
    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        hidden = _projection_width(node.input[0], producer, consts)
        tail = _shape_tail(node.input[1], producer, consts)
        if hidden is None or tail is None:
            continue
        heads, head_dim = tail
        if heads == -1 and head_dim > 0 and hidden % head_dim == 0:
            heads = hidden // head_dim
        if heads > 0 and head_dim > 0 and heads * head_dim == hidden:
            return heads, hidden
    return 0, 0


def _constants(model: ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values by tensor name."""
    out = {name: numpy_helper.to_array(t) for name, t in initializer_map(model).items()}
    for node in model.graph.node:
        tensor = constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is not None:
            out[node.output[0]] = numpy_helper.to_array(tensor)
    return out


def _projection_width(name: str, producer: Mapping, consts: Mapping[str, np.ndarray]) -> int | None:
    """``hidden`` when ``name`` is ``Add(MatMul(x, W[in, hidden]), b)`` (or the MatMul alone), else None."""
    node = producer.get(name)
    if node is not None and node.op_type == "Add":
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
    if node is None or node.op_type != "MatMul" or node.input[1] not in consts:
        return None
    w = consts[node.input[1]]
    return int(w.shape[1]) if w.ndim == 2 else None


def _shape_tail(name: str, producer: Mapping, consts: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """The last two entries of a 4-D Reshape target when both are constants (a constant shape, or a Concat)."""
    if name in consts:
        shape = consts[name].reshape(-1)
        return (int(shape[-2]), int(shape[-1])) if shape.size == 4 else None
    node = producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for i in node.input:  # a computed part (batch, sequence) counts as one entry
        entries += [None] if i not in consts else [int(v) for v in consts[i].reshape(-1)]
    if len(entries) != 4 or entries[2] is None or entries[3] is None:
        return None
    return entries[2], entries[3]


def keep_teacher_fusions(
    teacher: ModelProto, layers: Sequence[Layer], num_heads: int = 0, hidden_size: int = 0
) -> dict[str, Any]:
    """The teacher through the optimizer; the layers it fuses into attention nodes marked dense (so the student
    keeps the fusion). Returns the report's record: the teacher's fused nodes and the layers kept dense."""
    optimized = optimize_transformer(teacher, num_heads, hidden_size)
    names = fused_layers(teacher, optimized, layers)
    keep_fused_dense(layers, names)
    return {"teacher": fused_counts(optimized), "kept_dense": names}
