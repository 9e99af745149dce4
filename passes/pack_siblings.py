"""Pack the input factors of sibling chains that read one tensor into one MatMul, then Split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, numpy_helper

from inhercc.model import opset_of
from inhercc.passes.base import GraphNames, PassResult, remove_unused_initializers

INPUT_FACTOR_NODE = ".inherit_in"  # what the passes name the first product of a chain (factor_chain, heads_chain)


def pack_siblings(model: ModelProto) -> PassResult:
    """Sibling chains — Q/K/V projections, gate/up projections: factorized MatMuls reading the same input — pay one
    small GEMM each for their input factors; one wide GEMM is cheaper (fewer kernel launches, better occupancy).

    Rules (main graph, in place):

    1. Two or more ``mid_i = MatMul(x, A_i)`` nodes named ``<node>.inherit_in`` (the first product of a factor chain),
       each ``A_i`` a constant 2-D ``[in, r_i]`` initializer of one dtype read by nothing else, become
       ``packed = MatMul(x, [A_1 | … | A_n])``; ``mid_1, …, mid_n = Split(packed, [r_1, …, r_n], axis=-1)``.
    2. Every ``mid_i`` keeps its name, so the output factors (and a heads' gate) read it unchanged: the student
       computes the same products, column for column (exact up to the GEMM's summation order).
    3. The packed factor is named ``<x>.packed.inherit_in``, so distillation still finds it among the factors.
    """
    inits = {t.name: t for t in model.graph.initializer}
    reads: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    groups: dict[tuple[str, int], list[NodeProto]] = {}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or INPUT_FACTOR_NODE not in node.name or len(weight.dims) != 2 or reads[weight.name] != 1:
            continue
        groups.setdefault((node.input[0], weight.data_type), []).append(node)
    packs = [nodes for nodes in groups.values() if len(nodes) > 1]
    if not packs:
        return PassResult(model, False, [])
    names = GraphNames(model)
    replacements = {nodes[0].name: _pack(model, nodes, inits, names) for nodes in packs}
    dropped = {n.name for nodes in packs for n in nodes}
    rebuilt: list[NodeProto] = []
    for node in model.graph.node:  # each pack where its first sibling was (x is computed by then)
        rebuilt.extend(replacements[node.name] if node.name in replacements else [] if node.name in dropped else [node])
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    remove_unused_initializers(model)
    notes = [
        f"{len(n)} input factors reading {n[0].input[0]} packed into one MatMul (rank {_ranks(n, inits)})"
        for n in packs
    ]
    return PassResult(model, True, notes)


def _pack(
    model: ModelProto, nodes: Sequence[NodeProto], inits: dict[str, onnx.TensorProto], names: GraphNames
) -> list[NodeProto]:
    """The MatMul and Split replacing ``nodes`` (siblings reading one input); their initializers added."""
    x = nodes[0].input[0]
    weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
    packed = numpy_helper.from_array(np.concatenate(weights, axis=1), names.fresh(f"{x}.packed.inherit_in"))
    sizes = [w.shape[1] for w in weights]
    wide = names.fresh(f"{x}.packed.inherit_mid")
    matmul = onnx.helper.make_node("MatMul", [x, packed.name], [wide], name=names.fresh(f"{x}.packed.inherit_in"))
    outputs = [n.output[0] for n in nodes]
    split_name = names.fresh(f"{x}.packed.inherit_split")
    if opset_of(model) >= 13:
        split_sizes = numpy_helper.from_array(np.asarray(sizes, np.int64), names.fresh(f"{x}.packed.split_sizes"))
        model.graph.initializer.append(split_sizes)
        split = onnx.helper.make_node("Split", [wide, split_sizes.name], outputs, name=split_name, axis=-1)
    else:
        split = onnx.helper.make_node("Split", [wide], outputs, name=split_name, axis=-1, split=sizes)
    model.graph.initializer.append(packed)
    return [matmul, split]


def _ranks(nodes: Sequence[NodeProto], inits: dict[str, onnx.TensorProto]) -> str:
    """``r_1 + … + r_n``: the ranks of packed siblings."""
    return " + ".join(str(inits[n.input[1]].dims[1]) for n in nodes)
