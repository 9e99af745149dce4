"""The ResKD cascade as one ONNX model: members (the student and its res-students, each taking the teacher's inputs
and giving its one output) merged into one graph whose output, under the teacher's name, is the sum of the members'
outputs — and, with thresholds, a sample-adaptive sum that really saves compute with batch > 1.

Skipping (our design; the paper publishes no code and no criterion): after member ``i`` the rows still running are
scored on their running sum (``confidence``: the largest softmax probability; ``margin``: the largest minus the
second largest); rows scoring below ``τ_{i+1}`` continue. Their indices (``NonZero`` → ``Gather``) select the
rows of every input, member ``i+1`` runs on that sub-batch only, inside an ``If`` whose else-branch (no row
continues) passes the sum through, and its output is added to those rows of the sum (``ScatterND``). The stages
nest: member ``i+2``'s decision lives in member ``i+1``'s then-branch, so nothing runs on an empty batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from inhercc.errors import InherccError
from inhercc.model import MIN_OPSET, opset_of
from inhercc.specs import input_specs

SKIP_RULES = ("confidence", "margin")
PREFIX = "reskd_"  # the names of the nodes and constants the cascade adds


def member_prefix(i: int) -> str:
    """The prefix of member ``i``'s names in the merged graph (``m0_``, ``m1_`` …)."""
    return f"m{i}_"


def _output_dims(model: ModelProto) -> list[int | str | None]:
    """The one output's dims (an int, a symbol, or None when unknown)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def _shape_text(dims: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_members(members: Sequence[ModelProto], reference: ModelProto) -> None:
    """Each member takes the reference's inputs (names, dtypes, ranks) and gives one output of its name and
    shape: a one-line error naming the member otherwise."""
    if len(reference.graph.output) != 1:
        names = ", ".join(o.name for o in reference.graph.output)
        raise InherccError(f"a ResKD cascade sums one output; the teacher has {len(reference.graph.output)}: {names}")
    ref_in = {s.name: (s.dtype, len(s.shape)) for s in input_specs(reference)}
    ref_out, ref_dims = reference.graph.output[0].name, _output_dims(reference)
    for i, m in enumerate(members):
        ins = {s.name: (s.dtype, len(s.shape)) for s in input_specs(m)}
        if ins != ref_in:
            raise InherccError(f"member {i} takes inputs {_specs_text(ins)}, the teacher {_specs_text(ref_in)}")
        outs = [o.name for o in m.graph.output]
        if outs != [ref_out]:
            raise InherccError(f"member {i} gives outputs {', '.join(outs)}, the teacher gives {ref_out}")
        dims = _output_dims(m)
        if dims and ref_dims and (len(dims) != len(ref_dims) or any(_differ(a, b) for a, b in zip(dims, ref_dims))):
            raise InherccError(
                f"member {i}'s output {ref_out} has shape {_shape_text(dims)}, the teacher's {_shape_text(ref_dims)}"
            )


def _differ(a: int | str | None, b: int | str | None) -> bool:
    """Two dims that are both fixed and unequal."""
    return isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b


def _specs_text(specs: Mapping[str, tuple[np.dtype, int]]) -> str:
    return ", ".join(f"{n} ({d}, rank {r})" for n, (d, r) in specs.items()) or "none"


def _common_opset(members: Sequence[ModelProto]) -> int:
    return max([MIN_OPSET, *(opset_of(m) for m in members)])


def _at_opset(model: ModelProto, version: int, i: int) -> ModelProto:
    """The member converted to the cascade's opset when it is older (ONNX's version converter)."""
    if opset_of(model) >= version:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, version)
    except Exception as e:
        raise InherccError(f"member {i}: converting opset {opset_of(model)} to {version} failed: {e}") from None


def prefixed_graph(model: ModelProto, i: int, rename_inputs: bool) -> GraphProto:
    """Member ``i``'s graph with every name prefixed (``onnx.compose``); inputs kept when ``rename_inputs`` is
    False (the member reads the cascade's inputs directly). Value infos are dropped (ONNX Runtime infers them)."""
    graph = onnx.compose.add_prefix_graph(model.graph, member_prefix(i), rename_inputs=rename_inputs)
    del graph.value_info[:]
    return graph


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, PREFIX + name)


def _confidence_nodes(k: int, total: str, rows: str, rule: str) -> list[NodeProto]:
    """Nodes scoring the running rows' sums: ``{p}conf`` [rows] (max softmax, or its margin over the second)."""
    p = f"{PREFIX}{k}_"
    top_k = PREFIX + ("two" if rule == "margin" else "one")
    nodes = [
        helper.make_node("Gather", [total, rows], [p + "active"], axis=0, name=p + "active"),
        helper.make_node("Softmax", [p + "active"], [p + "probs"], axis=-1, name=p + "softmax"),
        helper.make_node("TopK", [p + "probs", top_k], [p + "top", p + "top_idx"], axis=-1, name=p + "topk"),
        helper.make_node("Gather", [p + "top", PREFIX + "zero"], [p + "first"], axis=1, name=p + "first"),
    ]
    if rule == "margin":
        nodes += [
            helper.make_node("Gather", [p + "top", PREFIX + "one_scalar"], [p + "second"], axis=1, name=p + "second"),
            helper.make_node("Sub", [p + "first", p + "second"], [p + "conf"], name=p + "margin"),
        ]
    else:
        nodes.append(helper.make_node("Identity", [p + "first"], [p + "conf"], name=p + "conf"))
    return nodes


def _continuing_nodes(k: int, rows: str) -> list[NodeProto]:
    """Nodes selecting the rows scoring below ``τ_k``: ``{p}rows`` (their indices) and ``{p}any`` (a bool)."""
    p = f"{PREFIX}{k}_"
    return [
        helper.make_node("Less", [p + "conf", f"{PREFIX}tau_{k}"], [p + "continue"], name=p + "less"),
        helper.make_node("NonZero", [p + "continue"], [p + "pos"], name=p + "nonzero"),
        helper.make_node("Reshape", [p + "pos", PREFIX + "flat"], [p + "pos_flat"], name=p + "flatten"),
        helper.make_node("Gather", [rows, p + "pos_flat"], [p + "rows"], axis=0, name=p + "rows"),
        helper.make_node("Size", [p + "rows"], [p + "count"], name=p + "count"),
        helper.make_node("Greater", [p + "count", PREFIX + "zero"], [p + "any"], name=p + "any"),
    ]


class _Builder:
    """The nested stages of a skipping cascade (one instance per build)."""

    def __init__(self, graphs: list[GraphProto], inputs: list[str], out: TensorProto | None, rule: str) -> None:
        self.graphs, self.inputs, self.rule = graphs, inputs, rule
        self.elem = out

    def stage(self, k: int, total: str, rows: str, result: str) -> list[NodeProto]:
        """Nodes making ``result``: the sum ``total`` with member ``k`` (and those after it) added to the rows of
        ``rows`` that are not confident yet."""
        p = f"{PREFIX}{k}_"
        nodes = _confidence_nodes(k, total, rows, self.rule) + _continuing_nodes(k, rows)
        then_branch = helper.make_graph(
            self.member_nodes(k, total), f"{p}run", [], [self.value(p + "then_out")], list(self.graphs[k].initializer)
        )
        else_branch = helper.make_graph(
            [helper.make_node("Identity", [total], [p + "else_out"], name=p + "pass")],
            f"{p}skip",
            [],
            [self.value(p + "else_out")],
        )
        nodes.append(
            helper.make_node(
                "If", [p + "any"], [result], then_branch=then_branch, else_branch=else_branch, name=p + "if"
            )
        )
        return nodes

    def member_nodes(self, k: int, total: str) -> list[NodeProto]:
        """The then-branch: member ``k`` on the gathered rows, its output added there, then the next stage."""
        p, m = f"{PREFIX}{k}_", member_prefix(k)
        graph = self.graphs[k]
        nodes = [
            helper.make_node("Gather", [x, p + "rows"], [m + x], axis=0, name=p + "take_" + x) for x in self.inputs
        ]
        nodes += list(graph.node)
        nodes += [
            helper.make_node("Gather", [total, p + "rows"], [p + "base"], axis=0, name=p + "base"),
            helper.make_node("Add", [p + "base", graph.output[0].name], [p + "added"], name=p + "add"),
            helper.make_node("Unsqueeze", [p + "rows", PREFIX + "axis1"], [p + "index"], name=p + "index"),
            helper.make_node("ScatterND", [total, p + "index", p + "added"], [p + "total"], name=p + "scatter"),
        ]
        if k + 1 < len(self.graphs):
            return nodes + self.stage(k + 1, p + "total", p + "rows", p + "then_out")
        return nodes + [helper.make_node("Identity", [p + "total"], [p + "then_out"], name=p + "out")]

    def value(self, name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, self.elem, None)


def _constants(thresholds: Sequence[float]) -> list[TensorProto]:
    """The skipping's constants: indices, shapes and the thresholds (``τ_k`` decides who runs member ``k``)."""
    consts = [
        _const("zero", np.array(0, np.int64)),
        _const("one_scalar", np.array(1, np.int64)),
        _const("one", np.array([1], np.int64)),
        _const("two", np.array([2], np.int64)),
        _const("flat", np.array([-1], np.int64)),
        _const("axis1", np.array([1], np.int64)),
    ]
    return consts + [_const(f"tau_{k + 1}", np.array(t, np.float32)) for k, t in enumerate(thresholds)]


def _all_rows(first: str) -> list[NodeProto]:
    """``reskd_rows0``: every row index of the batch (0 … B−1), from the first member's output."""
    return [
        helper.make_node("Shape", [first], [PREFIX + "shape"], name=PREFIX + "shape"),
        helper.make_node("Gather", [PREFIX + "shape", PREFIX + "zero"], [PREFIX + "batch"], axis=0, name=PREFIX + "b"),
        helper.make_node(
            "Range", [PREFIX + "zero", PREFIX + "batch", PREFIX + "one_scalar"], [PREFIX + "rows0"], name=PREFIX + "r"
        ),
    ]


def build_cascade(
    members: Sequence[ModelProto],
    thresholds: Sequence[float] | None = None,
    rule: str = "confidence",
    reference: ModelProto | None = None,
) -> ModelProto:
    """One ONNX model summing the members' outputs under ``reference``'s output name (default: member 0's).
    ``thresholds`` (one per member after the first; ``inf`` never skips): the adaptive cascade — a row whose
    running sum scores at least ``τ_k`` (``rule``) skips member ``k`` and every later one. None: the plain sum."""
    if not members:
        raise InherccError("a ResKD cascade needs at least one member")
    if rule not in SKIP_RULES:
        raise InherccError(f"unknown `reskd.skip_rule` {rule!r}; choose from {', '.join(SKIP_RULES)}")
    reference = reference or members[0]
    check_members(members, reference)
    if thresholds is not None and len(thresholds) != len(members) - 1:
        raise InherccError(f"{len(members)} members take {len(members) - 1} thresholds, got {len(thresholds)}")
    version = _common_opset(members)
    models = [_at_opset(m, version, i) for i, m in enumerate(members)]
    skipping = thresholds is not None and len(models) > 1
    graphs = [prefixed_graph(m, i, rename_inputs=skipping and i > 0) for i, m in enumerate(models)]
    out = reference.graph.output[0]
    inputs = [s.name for s in input_specs(reference)]
    # skipping: each member's weights live in its own branch (ONNX Runtime optimizes a subgraph's own
    # initializers as constants, not those it reads from the outer graph: 1.4× slower at batch 32)
    initializers = [t for g in (graphs[:1] if skipping else graphs) for t in g.initializer]
    outs = [g.output[0].name for g in graphs]
    if not skipping:
        nodes = [n for g in graphs for n in g.node]
        nodes.append(helper.make_node("Sum", outs, [out.name], name=PREFIX + "sum"))
    else:
        initializers += _constants(thresholds or ())
        builder = _Builder(graphs, inputs, out.type.tensor_type.elem_type, rule)
        nodes = list(graphs[0].node) + _all_rows(outs[0]) + builder.stage(1, outs[0], PREFIX + "rows0", out.name)
    ins = [vi for vi in reference.graph.input if vi.name in set(inputs)]
    graph = helper.make_graph(nodes, "reskd_cascade", ins, [out], initializers)
    return _model(graph, models, version)


def _model(graph: GraphProto, models: Sequence[ModelProto], version: int) -> ModelProto:
    """The merged model: the members' opset domains (the default one at ``version``), functions, IR version."""
    domains: dict[str, int] = {}
    for m in models:
        for imp in m.opset_import:
            domains[imp.domain] = max(domains.get(imp.domain, 0), int(imp.version))
    domains[""] = version
    domains.pop("ai.onnx", None)
    opsets = [helper.make_opsetid(d, v) for d, v in domains.items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="inhercc reskd")
    model.ir_version = max(m.ir_version for m in models)
    seen: set[tuple[str, str]] = set()
    for m in models:
        for f in m.functions:
            if (f.domain, f.name) not in seen:
                seen.add((f.domain, f.name))
                model.functions.append(f)
    return model
