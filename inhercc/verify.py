"""Fidelity of a student to its teacher: run both in ONNX Runtime on the same inputs and compare.

Scores are pooled batch by batch — sums of squares, per-sample cosines, top-1 counts — and never need the
outputs of different batches joined (token-level outputs cut to different lengths, ragged outputs). What is
scored depends on each output's *kind* (:func:`graph_output_kinds`): top-1 agreement for logits and
probabilities only, exact agreement for integer outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.data import Feed, batch_axes, batch_count, slice_batch
from inhercc.errors import InherccError
from inhercc.runtime import batch_size_for, full_batches, make_session, run_session

OUTPUT_KINDS = ("logits", "probs", "embedding", "values")
INTEGER = "integer"  # the kind of a non-float output: scored by exact agreement
TOP1_KINDS = ("logits", "probs")
NOT_LOGITS = ("embed", "hidden", "pool", "feature")  # names of float outputs that are no logits
_PROBS_NAMES = ("prob",)
_LOGITS_NAMES = ("logit", "score", "cls")
_PRODUCED = {
    "Softmax": "probs",
    "Sigmoid": "probs",
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


def _graph_kind(name: str, producer: Mapping[str, onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]]) -> str:
    """``logits`` / ``probs`` / ``embedding`` from the nodes around ``name``, or "" when they do not say."""
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
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    kinds = {}
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)
        kind = name_kind(out.name, dtype)
        if kind != INTEGER:
            kind = _graph_kind(out.name, producer, readers) or kind
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


def parse_output_kinds(items: Iterable[str]) -> dict[str, str]:
    """``["emb=embedding", "out=logits"]`` → ``{"emb": "embedding", "out": "logits"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, kind = item.partition("=")
        if not sep or not name.strip() or kind.strip() not in OUTPUT_KINDS:
            kinds = ", ".join(OUTPUT_KINDS)
            raise InherccError(f"bad --output-kind {item!r}: expected OUTPUT=KIND, KIND one of {kinds}")
        out[name.strip()] = kind.strip()
    return out


# ---------------------------------------------------------------------------------------------------------
# Pooled scores


def token_mask(shape: Sequence[int], mask: np.ndarray | None) -> np.ndarray | None:
    """A ``[batch, seq]`` attention mask as 0/1 weights broadcasting over a token-level output
    ``[batch, seq, …]`` (rank ≥ 3); None for any other output or without a mask."""
    if mask is None or len(shape) < 3 or np.ndim(mask) != 2 or tuple(shape[:2]) != np.shape(mask):
        return None
    m = np.asarray(mask) != 0
    return m.reshape(m.shape + (1,) * (len(shape) - 2))


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
    skipped: str = ""

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
        w = token_mask(t.shape, mask) if axis == 0 else None
        t64, s64 = t.astype(np.float64), s.astype(np.float64)
        if w is not None:
            t64, s64 = t64 * w, s64 * w
        self.err2 += float(np.sum((s64 - t64) ** 2))
        self.norm2 += float(np.sum(t64**2))
        self._add_cosines(t64, s64, axis)
        if self.kind in TOP1_KINDS and t.ndim >= 2 and t.shape[-1] > 1:
            same = np.argmax(t, axis=-1) == np.argmax(s, axis=-1)
            valid = np.broadcast_to(w[..., 0], same.shape) if w is not None else np.ones(same.shape, bool)
            self.agree += float(np.sum(same & valid))
            self.agree_n += float(np.sum(valid))

    def _add_cosines(self, t: np.ndarray, s: np.ndarray, axis: int | None) -> None:
        """The cosine between each sample's flattened teacher and student values (1 when both are 0)."""
        if axis is None or t.ndim <= axis:
            t2, s2 = t.reshape(1, -1), s.reshape(1, -1)
        else:
            t2 = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
            s2 = np.moveaxis(s, axis, 0).reshape(t2.shape)
        num = np.sum(t2 * s2, axis=1)
        den = np.linalg.norm(t2, axis=1) * np.linalg.norm(s2, axis=1)
        same = np.linalg.norm(t2 - s2, axis=1) == 0
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(same, 1.0, 0.0))
        self.cos_sum += float(np.sum(cos))
        self.cos_n += len(cos)

    def vector(self) -> list[float]:
        """The sums, to add up over processes (:meth:`load`)."""
        return [self.err2, self.norm2, self.cos_sum, self.cos_n, self.agree, self.agree_n]

    def load(self, values: Sequence[float]) -> None:
        self.err2, self.norm2, self.cos_sum, self.cos_n, self.agree, self.agree_n = (float(v) for v in values)

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
        if not self.cos_n:
            return {}
        out = {
            "cosine": self.cos_sum / self.cos_n,
            "rel_l2": float(np.sqrt(self.err2 / self.norm2)) if self.norm2 > 0 else float(np.sqrt(self.err2)),
        }
        if self.agree_n:
            out["top1_agreement"] = self.agree / self.agree_n
        return out


class Scores:
    """:class:`OutputScore` of every output, added batch by batch (``kinds``: ``{output: kind}``, in order)."""

    def __init__(self, kinds: Mapping[str, str], axes: Mapping[str, int | None] | None = None) -> None:
        self.outputs = {name: OutputScore(name, kind) for name, kind in kinds.items()}
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
            s.load(values[6 * i : 6 * i + 6])

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


def pooled_squared_error(teacher: Sequence[np.ndarray], student: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(‖s − t‖², ‖t‖²)`` of one output given in parts, each summed over all parts (in float64)."""
    score = OutputScore("", "values")
    for t, s in zip(teacher, student):
        score.add(t, s)
    return score.err2, score.norm2


def compare_output_parts(
    names: list[str],
    teacher: Sequence[Sequence[np.ndarray]],
    student: Sequence[Sequence[np.ndarray]],
    kinds: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per output name, its metrics pooled over several parts (``teacher[part][output]``), kinds by name
    unless given (integer outputs: exact-match rate)."""
    if not teacher:
        return {}
    kinds = kinds or {n: name_kind(n, np.asarray(v).dtype) for n, v in zip(names, teacher[0])}
    scores = Scores({n: kinds[n] for n in names})
    for t, s in zip(teacher, student):
        scores.add(t, s)
    return scores.fidelity()


def model_batches(model: ModelProto, feeds: Feed, batch_size: int | None) -> Iterator[Feed]:
    """``feeds`` in batches along each input's batch axis (the model's fixed batch size when it has one)."""
    axes = batch_axes(model)
    n = batch_count(feeds, axes)
    size = batch_size_for(model, batch_size or max(1, n))
    for i in range(0, max(n, 1), size):
        yield slice_batch(feeds, axes, i, i + size)


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
    from inhercc.calibrate import mask_input

    kinds = graph_output_kinds(teacher, output_kinds)
    scores = Scores(kinds, batch_axes(teacher))
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
