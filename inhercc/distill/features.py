"""What is trained (the factor initializers, or a choice) and what the feature loss compares (the factorized
layers' outputs, the normalizations' outputs, or a regex), and whether a student fits its teacher."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto

from inhercc.data import input_specs
from inhercc.errors import InherccError
from inhercc.model import FLOAT_TYPES

# the heads' gate counts as an output factor: rebalancing divides it by c too, so the gate's logits keep their values
FACTOR_PATTERN = re.compile(r"\.inherit_(in|out|gate)(_\d+)?$")


def factor_names(names: Iterable[str]) -> list[str]:
    """The factor initializers (``<weight>.inherit_in`` / ``.inherit_out`` / the heads' ``.inherit_gate``)
    among ``names``."""
    return [n for n in names if FACTOR_PATTERN.search(n)]


def select_trainable(model: ModelProto, train: str = "factors") -> list[str]:
    """Names of the initializers to train: ``factors`` (the inherited factor chains), ``all`` (every float
    initializer with more than one element — scalars are constants such as epsilons), or a regex matched
    (``re.search``) against the names of those."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    floats = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES]
    if train == "factors":
        chosen = factor_names(floats)
        if not chosen:
            raise InherccError(
                "the student has no factor initializers (<weight>.inherit_in/.inherit_out): is it a compressed "
                "student? use `distill.train` all or a regex to train other weights"
            )
        return chosen
    if train == "all":
        return [n for n in floats if sizes[n] > 1]
    try:
        pattern = re.compile(train)
    except re.error as e:
        raise InherccError(f"`distill.train` {train!r} is neither factors, all nor a valid regex: {e}") from None
    chosen = [n for n in floats if sizes[n] > 1 and pattern.search(n)]
    if not chosen:
        raise InherccError(f"`distill.train` {train!r} matches no float initializer of the student")
    return chosen


def rebalance_factors(params: Mapping[str, torch.nn.Parameter], trainable: Iterable[str]) -> int:
    """Rescale each factor chain's input factors by ``c`` and its output factors by ``1/c`` so both have the
    same RMS: the product — the student's function — is unchanged, but an optimizer with one learning
    rate no longer meets factors 10⁵ times apart in scale (whitened factors: ``S⁻ᵀU`` is tiny, ``ΣVᵀ``
    huge). Chains are grouped by weight name (every chain of a group runs through one ``inherit_in`` and
    one ``inherit_out`` of it, heads included); only groups whose factors are all trained are touched.
    Returns the number of groups rescaled."""
    trainable = set(trainable)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for name in factor_names(params):
        m = FACTOR_PATTERN.search(name)
        assert m is not None
        ins, outs = groups.setdefault(name[: m.start()], ([], []))
        (ins if m.group(1) == "in" else outs).append(name)
    done = 0
    with torch.no_grad():
        for ins, outs in groups.values():
            if not ins or not outs or not all(n in trainable for n in ins + outs):
                continue
            rms_in = torch.sqrt(sum(params[n].float().pow(2).sum() for n in ins) / sum(params[n].numel() for n in ins))
            rms_out = torch.sqrt(
                sum(params[n].float().pow(2).sum() for n in outs) / sum(params[n].numel() for n in outs)
            )
            if not (rms_in > 0 and rms_out > 0):
                continue
            c = torch.sqrt(rms_out / rms_in)
            for n in ins:
                params[n].mul_(c.to(params[n].dtype))
            for n in outs:
                params[n].div_(c.to(params[n].dtype))
            done += 1
    return done


def inherited_outputs(student: ModelProto, teacher: ModelProto) -> list[str]:
    """Tensors produced in both graphs by different nodes — the outputs of the factorized layers (a factor
    chain keeps the original node's output name) —, graph outputs excluded, in student order."""
    teacher_by = {o: n.name or f"#{i}" for i, n in enumerate(teacher.graph.node) for o in n.output if o}
    graph_out = {o.name for o in student.graph.output}
    out = []
    for i, node in enumerate(student.graph.node):
        for o in node.output:
            if o and o in teacher_by and o not in graph_out and teacher_by[o] != (node.name or f"#{i}"):
                out.append(o)
    return out


# Normalization ops whose output is a block's hidden state (the residual stream of a transformer).
NORM_OPS = frozenset(
    {
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
    }
)


def norm_outputs(model: ModelProto) -> list[str]:
    """Every normalization's output, in graph order: the first output of a :data:`NORM_OPS` node, and the end
    of a normalization an exporter wrote out in primitive ops (LayerNorm before opset 17, RMSNorm):
    ``x / Sqrt(ReduceMean(…) [+ ε])`` or ``x · Reciprocal(Sqrt(…))``, followed by its elementwise affine (a
    ``Mul`` by γ, then an ``Add`` of β, constant operands) when it has one."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}

    def sqrt_mean(name: str) -> bool:
        """Whether ``name`` is ``Sqrt(ReduceMean(…) [+ ε])``."""
        node = producer.get(name)
        if node is None or node.op_type != "Sqrt":
            return False
        node = producer.get(node.input[0])
        if node is not None and node.op_type == "Add":  # + ε
            node = next(
                (producer[i] for i in node.input if i in producer and producer[i].op_type == "ReduceMean"), None
            )
        return node is not None and node.op_type == "ReduceMean"

    def inverse_sqrt_mean(name: str) -> bool:
        """Whether ``name`` is ``Reciprocal(Sqrt(…))`` or ``c / Sqrt(…)`` (how exporters write rsqrt)."""
        node = producer.get(name)
        if node is not None and node.op_type == "Reciprocal":
            return sqrt_mean(node.input[0])
        return node is not None and node.op_type == "Div" and node.input[0] in constants and sqrt_mean(node.input[1])

    out = []
    for node in model.graph.node:
        if node.op_type in NORM_OPS and node.output:
            out.append(node.output[0])
            continue
        ins = list(node.input)
        normalizes = (node.op_type == "Div" and len(ins) == 2 and ins[0] not in constants and sqrt_mean(ins[1])) or (
            node.op_type == "Mul"
            and len(ins) == 2
            and any(inverse_sqrt_mean(a) and b not in constants for a, b in (ins, ins[::-1]))
        )
        if not normalizes:
            continue
        end = node.output[0]
        for op in ("Mul", "Add"):  # the affine: γ, then β
            users = readers.get(end, [])
            if len(users) == 1 and users[0].op_type == op and any(i in constants for i in users[0].input if i != end):
                end = users[0].output[0]
        out.append(end)
    return out


def feature_tensors(student: ModelProto, teacher: ModelProto, which: str = "layers") -> list[str]:
    """The tensors the feature loss compares, named alike in both graphs (graph outputs excluded, student
    order): ``layers`` — :func:`inherited_outputs`; ``norms`` — every normalization's output
    (:func:`norm_outputs`); anything else is a regex (``re.search``) over tensor names."""
    if which == "layers":
        found = inherited_outputs(student, teacher)
        if not found:
            raise InherccError(
                "`distill.feature_loss`: the student has no factorized layer whose output the teacher also has"
            )
        return found
    produced = {o for n in teacher.graph.node for o in n.output if o}
    graph_out = {o.name for o in student.graph.output}
    if which == "norms":
        wanted = set(norm_outputs(teacher))
        found = [o for o in norm_outputs(student) if o in wanted and o not in graph_out]
        if not found:
            raise InherccError(
                "`distill.features` norms: the graphs have no normalization (LayerNormalization, BatchNormalization, "
                "… or one written out in primitive ops) in common; give a regex over tensor names"
            )
        return found
    try:
        pattern = re.compile(which)
    except re.error as e:
        raise InherccError(f"`distill.features` {which!r} is neither layers, norms nor a valid regex: {e}") from None
    found = list(
        dict.fromkeys(
            o
            for n in student.graph.node
            for o in n.output
            if o and o in produced and o not in graph_out and pattern.search(o)
        )
    )
    if not found:
        raise InherccError(
            f"`distill.features` {which!r} matches no tensor computed by both the student and the teacher"
        )
    return found


def _signature(specs: Iterable[Any]) -> str:
    """``x float32 [batch, 64], mask int64 [batch, seq]``: what a model takes."""
    return ", ".join(f"{s.name} {np.dtype(s.dtype).name} [{', '.join(str(d or '?') for d in s.shape)}]" for s in specs)


def _compatible(a: Any, b: Any) -> bool:
    """Two input specs take the same data: one dtype, one rank, equal dims where both fix them."""
    fixed = [(x, y) for x, y in zip(a.shape, b.shape) if isinstance(x, int) and x > 0 and isinstance(y, int) and y > 0]
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(x == y for x, y in fixed)


def check_pair(student: ModelProto, teacher: ModelProto, files: str = "") -> None:
    """Student and teacher must take the same inputs (names, dtypes, ranks, fixed dims) and give the same
    outputs: one line naming both otherwise (``files``: where they come from, for the message)."""
    s_specs, t_specs = {s.name: s for s in input_specs(student)}, {s.name: s for s in input_specs(teacher)}
    where = f" ({files})" if files else ""
    if set(s_specs) != set(t_specs) or not all(_compatible(s_specs[n], t_specs[n]) for n in s_specs):
        ours, theirs = _signature(s_specs.values()), _signature(t_specs.values())
        raise InherccError(f"student inputs {ours} differ from teacher inputs {theirs}{where}")
    so, to = [o.name for o in student.graph.output], [o.name for o in teacher.graph.output]
    if so != to:
        raise InherccError(f"student outputs {', '.join(so)} differ from teacher outputs {', '.join(to)}{where}")
