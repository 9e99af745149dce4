"""Fidelity of a student to its teacher: run both in ONNX Runtime on the same inputs and compare.

Scores are pooled batch by batch — sums of squares, per-sample cosines, top-1 counts — and never need the
outputs of different batches joined (token-level outputs cut to different lengths, ragged outputs). What is
scored depends on each output's *kind* (:func:`graph_output_kinds`): top-1 agreement for logits and
probabilities only, exact agreement for integer outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.data import Feed, batch_axes, iter_batches, sample_count
from inhercc.errors import InherccError
from inhercc.options import option
from inhercc.runtime import batch_size_for, full_batches, make_session, run_session

MaskT = TypeVar("MaskT")  # a numpy array or a torch tensor
OUTPUT_KINDS = ("logits", "probs", "embedding", "values")
INTEGER = "integer"  # the kind of a non-float output: scored by exact agreement
TOP1_KINDS = ("logits", "probs")
NOT_LOGITS = ("embed", "hidden", "pool", "feature")  # names of float outputs that are no logits
_PROBS_NAMES = ("prob",)
_LOGITS_NAMES = ("logit", "score", "cls")
_PRODUCED = {
    "Softmax": "probs",
    "Sigmoid": "probs",  # at rank ≤ 2 only (a per-pixel sigmoid map is values: _graph_kind)
    "LogSoftmax": "logits",
    "LpNormalization": "embedding",
    "ReduceMean": "embedding",
    "ReduceSum": "embedding",
    "ReduceMax": "embedding",
    "GlobalAveragePool": "embedding",
    "GlobalMaxPool": "embedding",
}
_LOGITS_READERS = frozenset({"Softmax", "LogSoftmax", "ArgMax", "TopK"})
# ops that pass a tensor on without changing what it is (walked through, both ways)
_PASS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose"})
# what a norm's divisor is made of: x / max(‖x‖, ε), x / sqrt(Σx²), a masked mean's x / count
_NORM_PARTS = frozenset({"Clip", "Max", "Expand", "Add", "Cast", "Unsqueeze", "Sqrt", "Pow", "Mul"})
_NORM_ROOTS = frozenset({"ReduceL2", "ReduceSumSquare", "ReduceSum", "ReduceMean", "Sqrt"})


# ---------------------------------------------------------------------------------------------------------
# Output kinds


def name_kind(name: str, dtype: np.dtype | type = np.float32) -> str:
    """An output's kind judged by its name and dtype alone: ``integer`` for non-float outputs; ``probs`` /
    ``logits`` / ``embedding`` for names that say so; ``values`` otherwise."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return INTEGER
    lower = name.lower()
    if any(k in lower for k in _PROBS_NAMES):
        return "probs"
    if "logit" in lower:
        return "logits"
    if any(k in lower for k in NOT_LOGITS):
        return "embedding"
    return "logits" if any(k in lower for k in _LOGITS_NAMES) else "values"


def _graph_kind(
    name: str,
    producer: Mapping[str, onnx.NodeProto],
    readers: Mapping[str, list[onnx.NodeProto]],
    rank: int | None = None,
) -> str:
    """``logits`` / ``probs`` / ``embedding`` from the nodes around ``name`` (of rank ``rank`` when known), or
    "" when they do not say. A Sigmoid makes probabilities of classes at rank ≤ 2 only: above, it is a map
    (a detector's heatmap), ``values``."""
    todo, seen = [name], set()
    while todo:  # downstream: a softmax / argmax / top-k reads it
        t = todo.pop()
        seen.add(t)
        for node in readers.get(t, []):
            if node.op_type in _LOGITS_READERS:
                return "logits"
            if node.op_type in _PASS:
                todo.extend(o for o in node.output if o not in seen)
    node = producer.get(name)
    while node is not None and node.op_type in _PASS and node.input:  # upstream, through reshapes
        node = producer.get(node.input[0])
    if node is None:
        return ""
    if node.op_type == "Sigmoid" and rank is not None and rank > 2:
        return "values"
    if node.op_type in _PRODUCED:
        return _PRODUCED[node.op_type]
    if node.op_type == "Div" and any(_is_norm(i, producer) for i in node.input):
        return "embedding"
    return ""


def _is_norm(name: str, producer: Mapping[str, onnx.NodeProto], depth: int = 5) -> bool:
    """Whether ``name`` is a norm or a count: a reduction reached through a few elementwise ops."""
    node = producer.get(name)
    if node is None or depth == 0:
        return False
    if node.op_type in _NORM_ROOTS:
        return True
    return node.op_type in _NORM_PARTS and any(_is_norm(i, producer, depth - 1) for i in node.input)


def graph_output_kinds(model: ModelProto, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Per graph output its kind (:data:`OUTPUT_KINDS`, or ``integer``): from the graph (read by a
    Softmax/LogSoftmax/ArgMax/TopK → logits; made by Softmax/Sigmoid → probs, by LogSoftmax → logits, by a
    normalization or a pooling → embedding), else from its name (:func:`name_kind`), else ``values``.
    ``overrides`` ``{output: kind}`` (the user's) win; unknown outputs or kinds are an error."""
    overrides = dict(overrides or {})
    names = [o.name for o in model.graph.output]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InherccError(f"output kind given for unknown output(s) {', '.join(unknown)}; outputs: {', '.join(names)}")
    producer, readers = _producers_readers(model)
    ranks = _ranks(model)
    kinds = {}
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)
        kind = name_kind(out.name, dtype)
        if kind != INTEGER:
            kind = _graph_kind(out.name, producer, readers, ranks.get(out.name)) or kind
        if out.name in overrides:
            if overrides[out.name] not in OUTPUT_KINDS:
                raise InherccError(
                    f"unknown kind {overrides[out.name]!r} for output {out.name}; choose from {', '.join(OUTPUT_KINDS)}"
                )
            if kind == INTEGER:
                raise InherccError(f"output {out.name} is {dtype}: integer outputs are scored by exact agreement")
            kind = overrides[out.name]
        kinds[out.name] = kind
    return kinds


def _producers_readers(
    model: ModelProto,
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The node making each tensor, and the nodes reading it, in the main graph."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return producer, readers


def _ranks(model: ModelProto) -> dict[str, int]:
    """The rank of every tensor whose value info (graph outputs, then inferred shapes) gives one."""
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = len(v.type.tensor_type.shape.dim)
    return out


# ops whose ``axis`` names the class axis of the tensor they read or make (with its default when absent)
_CLASS_AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "ArgMax": 0, "ArgMin": 0, "TopK": -1}
_SAME_LAYOUT = frozenset({"Identity", "Cast"})  # ops that keep every axis where it was


def graph_class_axes(model: ModelProto) -> dict[str, int]:
    """Per graph output, the axis holding its classes where the graph says so: the ``axis`` of a Softmax,
    LogSoftmax, ArgMax or TopK reading it or making it (through Identity / Cast only: a reshape moves axes).
    Negative axes count from the end. Top-1 agreement is taken over that axis."""
    producer, readers = _producers_readers(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    def axis_of(node: onnx.NodeProto) -> int:
        default = 1 if node.op_type in ("Softmax", "LogSoftmax") and opset < 13 else _CLASS_AXIS_OPS[node.op_type]
        return next((int(a.i) for a in node.attribute if a.name == "axis"), default)

    out: dict[str, int] = {}
    for o in model.graph.output:
        todo, seen = [o.name], set()
        while todo and o.name not in out:  # downstream
            t = todo.pop()
            seen.add(t)
            for node in readers.get(t, []):
                if node.op_type in _CLASS_AXIS_OPS and node.input[0] == t:
                    out[o.name] = axis_of(node)
                    break
                if node.op_type in _SAME_LAYOUT:
                    todo.extend(x for x in node.output if x not in seen)
        node = producer.get(o.name)
        while node is not None and node.op_type in _SAME_LAYOUT and node.input:  # upstream
            node = producer.get(node.input[0])
        if o.name not in out and node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            out[o.name] = axis_of(node)
    return out


def parse_output_kinds(items: Iterable[str]) -> dict[str, str]:
    """``["emb=embedding", "out=logits"]`` → ``{"emb": "embedding", "out": "logits"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, kind = item.partition("=")
        if not sep or not name.strip() or kind.strip() not in OUTPUT_KINDS:
            kinds = ", ".join(OUTPUT_KINDS)
            raise InherccError(f"bad `output_kinds` {item!r}: expected OUTPUT=KIND, KIND one of {kinds}")
        out[name.strip()] = kind.strip()
    return out


def output_kinds_option() -> Any:
    """The declaration of the ``output_kinds`` option (compress's recipe and distillation both take it)."""
    return option(
        {},
        flag="--output-kind",
        metavar="OUTPUT=KIND",
        parse=parse_output_kinds,
        help="OUTPUT=KIND, KIND logits|probs|embedding|values: what an output is, when the graph does not say "
        "(top-1 agreement and KD for logits; default: from the graph, then the name, else values).",
    )


# ---------------------------------------------------------------------------------------------------------
# Pooled scores


def token_mask(shape: Sequence[int], mask: MaskT | None) -> MaskT | None:
    """A ``[batch, seq]`` attention mask (a numpy array or a torch tensor) as 0/1 (bool) weights broadcasting
    over a per-token tensor: ``[batch, seq, …]`` (hidden states, token logits) or ``[batch, heads, seq, seq]``
    (attention probabilities: the query rows). None when the tensor has no such token axis, or no mask. The
    one rule for both the scores here and the losses (:mod:`inhercc.losses`)."""
    if mask is None or len(shape) < 2 or len(mask.shape) != 2:
        return None
    batch, seq = (int(d) for d in mask.shape)
    m = mask != 0
    if tuple(shape[:2]) == (batch, seq):
        return m.reshape(batch, seq, *([1] * (len(shape) - 2)))
    if len(shape) == 4 and shape[0] == batch and shape[2] == shape[3] == seq:
        return m.reshape(batch, 1, seq, 1)
    return None


@dataclass
class OutputScore:
    """Running fidelity sums of one output, added batch by batch: ``‖s − t‖²``, ``‖t‖²``, per-sample
    cosines, top-1 agreements (logits, probs) or equal elements (integer outputs). ``skipped`` says why
    an output could not be scored (its teacher and student shapes differ)."""

    name: str
    kind: str
    err2: float = 0.0
    norm2: float = 0.0
    cos_sum: float = 0.0
    cos_n: float = 0.0
    agree: float = 0.0
    agree_n: float = 0.0
    snorm2: float = 0.0  # ‖s‖², for the cosine over samples of an output with one value per sample
    scalar: float = 0.0  # 1 when each sample has a single value: its cosine is taken over the samples
    skipped: str = ""
    class_axis: int | None = None  # the axis holding the classes, where the graph says (graph_class_axes)

    def add(self, teacher: np.ndarray, student: np.ndarray, mask: np.ndarray | None = None, axis: int | None = 0):
        """One batch (``axis``: its batch axis, None when the output has none: one sample). Padding
        positions of a token-level output (``mask``) are left out."""
        t, s = np.asarray(teacher), np.asarray(student)
        if self.skipped:
            return
        if t.shape != s.shape:
            self.skipped = f"shapes differ between teacher and student ({list(t.shape)} vs {list(s.shape)})"
            return
        if self.kind == INTEGER:
            self.agree += float(np.sum(t == s))
            self.agree_n += t.size
            return
        w = token_mask(t.shape, mask) if axis == 0 and t.ndim >= 3 else None
        t64, s64 = t.astype(np.float64), s.astype(np.float64)
        if w is not None:
            t64, s64 = t64 * w, s64 * w
        self.err2 += float(np.sum((s64 - t64) ** 2))
        self.norm2 += float(np.sum(t64**2))
        self.snorm2 += float(np.sum(s64**2))
        self._add_cosines(t64, s64, axis)
        c = self._top1_axis(t.ndim, w is not None)
        if self.kind in TOP1_KINDS and c is not None and c != axis and t.shape[c] > 1:
            same = np.argmax(t, axis=c) == np.argmax(s, axis=c)
            valid = np.ones(same.shape, bool)
            if w is not None and c >= 2:  # the mask's axes are 0 and 1: drop the class axis from it
                valid = np.broadcast_to(np.squeeze(w, axis=c), same.shape)
            self.agree += float(np.sum(same & valid))
            self.agree_n += float(np.sum(valid))

    def _top1_axis(self, ndim: int, masked: bool) -> int | None:
        """The class axis top-1 agreement is taken over: the graph's (:attr:`class_axis`), else the last axis
        of a ``[batch, classes]`` output or of a ``[batch, seq, classes]`` one with a token mask; None when no
        axis is known to hold classes (a sigmoid map, an image)."""
        if self.class_axis is not None:
            return self.class_axis % ndim if -ndim <= self.class_axis < ndim else None
        return ndim - 1 if ndim == 2 or (ndim == 3 and masked) else None

    def _add_cosines(self, t: np.ndarray, s: np.ndarray, axis: int | None) -> None:
        """The cosine between each sample's flattened teacher and student values (1 when both are 0)."""
        if axis is None or t.ndim <= axis:
            t2, s2 = t.reshape(1, -1), s.reshape(1, -1)
        else:
            t2 = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
            s2 = np.moveaxis(s, axis, 0).reshape(t2.shape)
        if t2.shape[1] == 1:  # a per-sample cosine of one number is only its sign: pool over samples instead
            self.scalar = 1.0
            return
        num = np.sum(t2 * s2, axis=1)
        den = np.linalg.norm(t2, axis=1) * np.linalg.norm(s2, axis=1)
        same = np.linalg.norm(t2 - s2, axis=1) == 0
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(same, 1.0, 0.0))
        self.cos_sum += float(np.sum(cos))
        self.cos_n += len(cos)

    def vector(self) -> list[float]:
        """The sums, to add up over processes (:meth:`load`)."""
        return [self.err2, self.norm2, self.cos_sum, self.cos_n, self.agree, self.agree_n, self.snorm2, self.scalar]

    def load(self, values: Sequence[float]) -> None:
        self.err2, self.norm2, self.cos_sum, self.cos_n, self.agree, self.agree_n, self.snorm2 = (
            float(v) for v in values[:7]
        )
        self.scalar = float(values[7] > 0)

    @property
    def relative_error(self) -> float:
        """``‖s − t‖² / ‖t‖²`` (for L2-normalized embeddings ≈ 2·(1 − cosine))."""
        return self.err2 / max(self.norm2, 1e-30)

    def result(self) -> dict[str, float]:
        """``cosine`` (mean over samples), ``rel_l2`` (‖s − t‖ / ‖t‖ over all values), ``top1_agreement``
        (logits, probs); ``exact_match`` for integer outputs; nothing when skipped or never added to."""
        if self.skipped:
            return {}
        if self.kind == INTEGER:
            return {"exact_match": self.agree / max(1.0, self.agree_n)}
        if not self.cos_n and not self.scalar:
            return {}
        out = {
            "cosine": self._pooled_cosine() if self.scalar else self.cos_sum / self.cos_n,
            "rel_l2": float(np.sqrt(self.err2 / self.norm2)) if self.norm2 > 0 else float(np.sqrt(self.err2)),
        }
        if self.agree_n:
            out["top1_agreement"] = self.agree / self.agree_n
        return out

    def _pooled_cosine(self) -> float:
        """The cosine between all samples' teacher and student values (``t·s`` from the three sums)."""
        den = np.sqrt(self.norm2 * self.snorm2)
        if den == 0:
            return 1.0 if self.err2 == 0 else 0.0
        return float((self.norm2 + self.snorm2 - self.err2) / 2 / den)


class Scores:
    """:class:`OutputScore` of every output, added batch by batch (``kinds``: ``{output: kind}``, in order)."""

    def __init__(
        self,
        kinds: Mapping[str, str],
        axes: Mapping[str, int | None] | None = None,
        class_axes: Mapping[str, int] | None = None,
    ) -> None:
        """``axes``: each output's batch axis (:func:`~inhercc.data.batch_axes`); ``class_axes``: the class
        axes the graph gives (:func:`graph_class_axes`)."""
        class_axes = class_axes or {}
        self.outputs = {name: OutputScore(name, kind, class_axis=class_axes.get(name)) for name, kind in kinds.items()}
        self.axes = dict(axes or {})

    def add(self, teacher: Sequence[np.ndarray], student: Sequence[np.ndarray], mask: np.ndarray | None = None):
        """One batch: every output's teacher and student values (in :attr:`outputs` order)."""
        for score, t, s in zip(self.outputs.values(), teacher, student):
            score.add(t, s, mask, self.axes.get(score.name, 0))

    @property
    def kinds(self) -> dict[str, str]:
        return {name: s.kind for name, s in self.outputs.items()}

    def fidelity(self) -> dict[str, dict[str, float]]:
        """``{output: metrics}`` of the outputs that could be scored."""
        return {name: r for name, s in self.outputs.items() if (r := s.result())}

    def skipped(self) -> dict[str, str]:
        """``{output: why it is not scored}``."""
        return {name: s.skipped for name, s in self.outputs.items() if s.skipped}

    def vector(self) -> list[float]:
        return [v for s in self.outputs.values() for v in s.vector()]

    def load(self, values: Sequence[float]) -> None:
        for i, s in enumerate(self.outputs.values()):
            s.load(values[8 * i : 8 * i + 8])

    def report(self, key: str = "fidelity") -> dict[str, object]:
        """Report entries: ``key`` (the metrics), ``output_kinds`` and, when any, ``<key>_skipped``."""
        out: dict[str, object] = {key: self.fidelity(), "output_kinds": self.kinds}
        if self.skipped():
            out[f"{key}_skipped"] = self.skipped()
        return out


def pooled_fidelity(
    teacher: Sequence[np.ndarray], student: Sequence[np.ndarray], name: str = "", kind: str | None = None
) -> dict[str, float]:
    """The metrics of one output given in parts (batches of different shapes), ``kind`` by default judged by
    its name (:func:`name_kind`): the same numbers as for one concatenated array, where one exists."""
    score = OutputScore(name, kind or name_kind(name, np.asarray(teacher[0]).dtype))
    for t, s in zip(teacher, student):
        score.add(t, s)
    return score.result()


def output_fidelity(teacher: np.ndarray, student: np.ndarray, name: str = "") -> dict[str, float]:
    """``cosine``: mean over samples of the cosine between flattened per-sample outputs; ``rel_l2``:
    ‖s − t‖ / ‖t‖ over the whole tensor; ``top1_agreement`` for logits and probabilities (by name)."""
    return pooled_fidelity([teacher], [student], name)


def model_batches(model: ModelProto, feeds: Feed, batch_size: int | None) -> Iterator[Feed]:
    """``feeds`` in batches along each input's batch axis (the model's fixed batch size when it has one)."""
    axes = batch_axes(model)
    size = batch_size_for(model, batch_size or max(1, sample_count(feeds, axes)))
    yield from iter_batches(feeds, size, axes)


def score_models(
    teacher: ModelProto,
    student: ModelProto,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    batch_size: int | None = 32,
    source: str = "verification data",
    output_kinds: Mapping[str, str] | None = None,
) -> Scores:
    """Run teacher and student on ``feeds`` — one feed dict, or several of different sample shapes — (ORT,
    CPU), batch by batch, and pool every graph output's scores. A model with a fixed batch dim runs in
    batches of that size (a remainder is left out, with a warning: :func:`inhercc.runtime.full_batches`);
    padding positions of token-level outputs are left out; ONNX Runtime failures are one-line errors naming
    ``source``."""
    from inhercc.specs import mask_input

    kinds = graph_output_kinds(teacher, output_kinds)
    scores = Scores(kinds, batch_axes(teacher), graph_class_axes(teacher))
    mask_name = mask_input(teacher)
    parts = [full_batches(teacher, p, source) for p in ([feeds] if isinstance(feeds, Mapping) else list(feeds))]
    t_sess, s_sess = make_session(teacher), make_session(student)
    for part in parts:
        for batch in model_batches(teacher, dict(part), batch_size):
            t_out = run_session(t_sess, batch, None, f"the teacher on {source}")
            s_out = run_session(s_sess, batch, None, f"the student on {source}")
            scores.add(t_out, s_out, batch.get(mask_name) if mask_name else None)
    return scores


def fidelity(
    teacher: ModelProto,
    student: ModelProto,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    batch_size: int | None = 32,
    source: str = "verification data",
    output_kinds: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{output: metrics}`` of :func:`score_models` (outputs that cannot be scored left out)."""
    return score_models(
        teacher, student, feeds, batch_size=batch_size, source=source, output_kinds=output_kinds
    ).fidelity()


def mean_cosine(fid: Mapping[str, Mapping[str, float]]) -> float:
    """One number for a multi-output fidelity: the mean cosine over float outputs."""
    vals = [v["cosine"] for v in fid.values() if "cosine" in v]
    return float(np.mean(vals)) if vals else float("nan")
