"""Calibration: run the teacher in ONNX Runtime with the compressible layers' inputs exposed as extra graph
outputs and stream their Gram matrices ``G = XᵀX`` (float64, O(k²) memory per layer, never O(samples)).

Rows of ``X`` are what the layer's weight multiplies: the last axis of a MatMul/Gemm input; for a Conv, the
unfolded patches (``in/g·kh·kw`` columns in the order of ``W[out, in/g, kh, kw].reshape(out, -1)``, one Gram
per group). Padding positions are left out when the model has an attention-mask-like input. The Grams feed
:func:`inhercc.linalg.whitened_svd` (output-optimal factors) and the calibrated rank allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto

from inhercc.data import (
    Feed,
    batch_axes,
    cast_feeds,
    input_specs,
    iter_batches,
    sample_count,
    slice_batch,
    take_samples,
)
from inhercc.errors import InherccError
from inhercc.families import FAMILIES, family_for
from inhercc.layers import Layer
from inhercc.model import implicit_inputs
from inhercc.passes.factorize_conv import ConvGeometry, conv_patches  # noqa: F401  (re-exported)
from inhercc.progress import Progress
from inhercc.runtime import batch_size_for, full_batches, make_session, model_fixed_batch, ort_failures
from inhercc.specs import mask_input

DEFAULT_SAMPLES = 256
DEFAULT_BATCH_SIZE = 16
# Sequential calibration's ridge toward the teacher's weight (linalg.whitened_svd shrinkage). MiniLM-L6 at
# ratio 0.5, 201 held-out sentences: 256 calibration sentences 0.895 → 0.905 cosine (0.1: 0.905, 0.3: 0.903);
# with all 1,699 training sentences the compensation no longer overfits and it changes nothing (0.921).
DEFAULT_SHRINKAGE = 0.03
DEFAULT_MAX_BYTES = 1 << 30  # exposed activations per batch; more taps than fit are run in several groups
DEFAULT_CUT_BYTES = 4 << 30  # sequential calibration: both models' values at a stage's cut, over all batches
_CHUNK_ELEMS = 1 << 22  # rows·columns converted to float64 at a time (32 MiB)


@dataclass
class _Tap:
    """One exposed tensor and how its rows are read (layers sharing both share the Gram). With a teacher
    value next to the student's, also the cross term ``X_sᵀ X_t`` (sequential calibration)."""

    tensor: str
    op: str  # the op type of the first layer reading it (its family reads the rows)
    geom: Hashable | None  # the family's calibration geometry (a ConvGeometry; None: the last axis)
    layers: list[str]
    position: int = -1  # index of the producing node (-1: a graph input)
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    rows: int = 0
    _pending: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    _pending_rows: int = 0

    def blocks(self, value: np.ndarray, mask: np.ndarray | None) -> Iterator[np.ndarray]:
        """The rows the weight multiplies, as ``[g, rows, k]`` blocks (one per sample for a conv)."""
        return family_for(self.op).calibration_rows(value, self.geom, mask)

    def add(self, value: np.ndarray, mask: np.ndarray | None, teacher: np.ndarray | None = None) -> None:
        """Queue a batch's rows; multiply once enough rows are queued (big products run faster). One-hot rows
        (an embedding's ids) are counted instead: their Gram is diagonal."""
        family = family_for(self.op)
        if family.diagonal_gram:
            self.gram = family.count_rows(self.gram, value, self.geom, mask)
            self.rows = int(self.gram.sum())
            return
        student_blocks = self.blocks(value, mask)
        teacher_blocks = self.blocks(teacher, mask) if teacher is not None else None
        for block in student_blocks:
            t_block = next(teacher_blocks) if teacher_blocks is not None else None
            g, rows, k = block.shape
            if self.gram is None:
                self.gram = np.zeros((g, k, k), dtype=np.float64)
                self.cross = np.zeros((g, k, k), dtype=np.float64) if teacher is not None else None
            self._pending.append((block, t_block))
            self._pending_rows += rows
            self.rows += rows
            if self._pending_rows * g * k >= _CHUNK_ELEMS:
                self.flush()

    def flush(self) -> None:
        """``gram[g] += Pᵀ P`` (and ``cross[g] += Pᵀ P_teacher``) in float64 over the queued rows, a bounded
        chunk of rows at a time."""
        if not self._pending or self.gram is None:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        student = np.concatenate([p for p, _ in pending], axis=1)
        teacher = np.concatenate([t for _, t in pending], axis=1) if self.cross is not None else None
        g, rows, k = student.shape
        step = max(1, _CHUNK_ELEMS // max(1, g * k))
        for i in range(0, rows, step):
            p = student[:, i : i + step].astype(np.float64)
            pt = p.transpose(0, 2, 1)
            self.gram += np.matmul(pt, p)
            if self.cross is not None and teacher is not None:
                self.cross += np.matmul(pt, teacher[:, i : i + step].astype(np.float64))

    def result(self, stack: np.ndarray) -> np.ndarray:
        """``[k, k]`` for one group, the ``[g, k, k]`` stack for a grouped conv."""
        return stack if stack.shape[0] > 1 else stack[0]


def _lengths(mask: np.ndarray) -> np.ndarray:
    """Per row of a [batch, seq] mask: one past the last non-zero position (0 for an all-zero row)."""
    nonzero = mask != 0
    return np.where(nonzero.any(axis=1), mask.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)


def padding_trimmer(model: ModelProto, feed: Feed) -> tuple[Feed, Callable[[Feed], Feed]]:
    """Padding costs run time but adds nothing to the Grams: with a mask input whose sequence dim is dynamic,
    sort the samples by length (Grams are sums, order is irrelevant) and return a function that cuts each
    batch's [batch, seq] inputs to its longest sample. Without such a mask: the feed as is, no cutting."""
    name = mask_input(model)
    specs = {s.name: s for s in input_specs(model)}
    if name is None or isinstance(specs[name].shape[1], int) and specs[name].shape[1] > 0:
        return feed, lambda batch: batch
    mask = feed[name]
    order = np.argsort(_lengths(mask), kind="stable")
    sorted_feed = take_samples(feed, batch_axes(model), order)
    cuttable = [
        k
        for k, v in feed.items()
        if v.ndim >= 2
        and v.shape[:2] == mask.shape
        and len(specs[k].shape) >= 2
        and not isinstance(specs[k].shape[1], int)
    ]

    def cut(batch: Feed) -> Feed:
        longest = max(1, int(np.max(_lengths(batch[name]))))
        return {k: (v[:, :longest] if k in cuttable else v) for k, v in batch.items()}

    return sorted_feed, cut


def calibration_feeds(model: ModelProto, feeds: Mapping[str, np.ndarray], samples: int | None) -> Feed:
    """The model inputs of the first ``samples`` samples (all when None), cast to the declared dtypes."""
    cast = cast_feeds(feeds, model)
    axes = batch_axes(model)
    n = sample_count(cast, axes)
    return slice_batch(cast, axes, 0, n if samples is None else min(n, samples))


Parts = Sequence[Mapping[str, np.ndarray]]  # calibration data: one feed per sample shape


def feed_parts(feeds: Mapping[str, np.ndarray] | Parts) -> list[Mapping[str, np.ndarray]]:
    """One feed dict, or several (length-bucketed text, images of several sizes), as a list of feeds."""
    if isinstance(feeds, Mapping):
        return [feeds]
    parts = [p for p in feeds if len(next(iter(p.values()), ()))]
    if not parts:
        raise InherccError("no calibration samples")
    return parts


def quotas(sizes: Sequence[int], samples: int | None) -> list[int]:
    """``samples`` (None: all) spread over parts of ``sizes`` in proportion (largest remainders)."""
    if samples is None or samples >= sum(sizes):
        return [int(n) for n in sizes]
    size = np.asarray(sizes, dtype=np.int64)
    exact = size * samples / int(size.sum())
    take = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - take), kind="stable")[: samples - int(take.sum())]:
        take[i] += 1
    return [int(n) for n in take]


def split_quota(
    parts: Sequence[Feed], samples: int | None, axes: Mapping[str, int | None] | None = None
) -> list[tuple[Feed, int | None]]:
    """Spread a total of ``samples`` (None: all) over several feeds in proportion to their sizes (largest
    remainders), so a sample count taken from length-bucketed data is drawn from every bucket rather than
    from the first ones; feeds left with nothing are dropped."""
    if samples is None:
        return [(part, None) for part in parts]
    take = quotas([sample_count(p, axes) for p in parts], samples)
    return [(part, n) for part, n in zip(parts, take) if n > 0]


def trimmed_parts(
    model: ModelProto, feeds: Mapping[str, np.ndarray] | Parts, samples: int | None, source: str = "calibration data"
) -> list[tuple[Feed, Callable[[Feed], Feed]]]:
    """``samples`` samples (all when None) of one feed or several parts, drawn in proportion, each part as
    model inputs sorted by length with its padding cutter (:func:`padding_trimmer`). With a fixed batch dim
    each part is cut to whole batches (:func:`inhercc.runtime.full_batches`); a part smaller than one batch
    is left out, unless every part is (an error)."""
    if samples is not None and samples <= 0:
        raise InherccError(f"`calibration.samples` must be positive, got {samples}")
    axes = batch_axes(model)
    chosen = [calibration_feeds(model, part, n) for part, n in split_quota(feed_parts(feeds), samples, axes)]
    fixed = model_fixed_batch(model)
    if fixed and len(chosen) > 1 and any(sample_count(f, axes) >= fixed for f in chosen):
        chosen = [f for f in chosen if sample_count(f, axes) >= fixed]
    return [padding_trimmer(model, full_batches(model, feed, source)) for feed in chosen]


def _taps(model: ModelProto, layers: Sequence[Layer]) -> list[_Tap]:
    """The exposed tensors for ``layers`` (the input each weight multiplies), in topological order."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {out: i for i, n in enumerate(model.graph.node) for out in n.output}
    taps: dict[tuple, _Tap] = {}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is None or not node.input or layer.op not in FAMILIES:
            continue
        family = family_for(layer.op)
        geom, tensor = family.calibration_geometry(node, layer), node.input[family.activation_input]
        key = (tensor, geom)
        if key not in taps:
            taps[key] = _Tap(tensor, layer.op, geom, [], producer.get(tensor, -1))
        taps[key].layers.append(layer.name)
    return sorted(taps.values(), key=lambda t: t.position)


def with_outputs(
    model: ModelProto, tensors: Sequence[str], fed: Mapping[str, np.ndarray] | None = None
) -> tuple[ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are exactly ``tensors`` that are not graph inputs (those are fed),
    with the nodes nothing of that needs removed (a tap early in the graph runs only the graph's head), and
    the initializers no kept node reads. ``fed``: tensors whose values are given (example values: their dtype
    and rank type the new graph inputs), so the nodes computing them are left out too (a sequential stage
    starts where the one before stopped)."""
    fed = fed or {}
    inputs = {i.name for i in model.graph.input} | set(fed)
    types = {vi.name: vi.type for vi in list(model.graph.value_info) + list(model.graph.output)}
    names = list(dict.fromkeys(t for t in tensors if t not in inputs))
    out = ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    for t in names:
        vi = onnx.ValueInfoProto(name=t)
        if t in types:
            vi.type.CopyFrom(types[t])
        else:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        out.graph.output.append(vi)
    for name, value in fed.items():
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, [None] * np.ndim(value)))
    needed = set(names)
    keep = []
    for node in reversed(out.graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(implicit_inputs(node))
            needed.difference_update(fed)
    del out.graph.node[:]
    out.graph.node.extend(reversed(keep))
    declared = {i.name for i in model.graph.input}
    used = [t for t in out.graph.initializer if t.name in needed or t.name in declared]
    if len(used) < len(out.graph.initializer):
        del out.graph.initializer[:]
        out.graph.initializer.extend(used)
    return out, names


def frontiers(model: ModelProto, stage_tensors: Sequence[Sequence[str]]) -> list[list[str]]:
    """For each stage (its tap tensors, in order), the tensors computed up to it that the rest of the graph
    still reads: with their values kept, the next stage runs only the nodes between the two."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in list(node.input) + sorted(implicit_inputs(node)):
            readers.setdefault(name, set()).add(i)
    done: set[int] = set()
    out = []
    for tensors in stage_tensors:
        todo = [producer[t] for t in tensors if t in producer]
        while todo:
            i = todo.pop()
            if i in done:
                continue
            done.add(i)
            node = model.graph.node[i]
            todo.extend(producer[t] for t in list(node.input) + sorted(implicit_inputs(node)) if t in producer)
        computed = [o for i in sorted(done) for o in model.graph.node[i].output if o]
        out.append([t for t in computed if readers.get(t, set()) - done])
    return out


def _groups(taps: list[_Tap], sizes: Mapping[str, int], budget: int) -> list[list[_Tap]]:
    """Split taps into runs whose exposed activations (bytes per batch) fit in ``budget``."""
    groups: list[list[_Tap]] = [[]]
    used = 0
    for tap in taps:
        size = sizes.get(tap.tensor, 0)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(tap)
        used += size
    return groups


class _Runner:
    """Runs a model (and optionally a student beside it) over the calibration batches of every part,
    feeding the taps."""

    def __init__(
        self,
        model: ModelProto,
        feeds: Mapping[str, np.ndarray] | Parts,
        samples: int | None,
        batch_size: int,
        source: str = "calibration data",
    ):
        if batch_size <= 0:
            raise InherccError(f"calibration batch size must be positive, got {batch_size}")
        batch_size = batch_size_for(model, batch_size)  # a fixed batch dim takes exactly its size
        self.model, self.batch_size, self.source = model, batch_size, source
        self.parts = trimmed_parts(model, feeds, samples, source)
        self.mask_name = mask_input(model)
        self.axes = batch_axes(model)
        sizes = [sample_count(feed, self.axes) for feed, _ in self.parts]
        self.samples = sum(sizes)
        self.batches = sum(math.ceil(n / batch_size) for n in sizes)

    def iter_batches(self) -> Iterator[Feed]:
        """Every part's batches, padding cut."""
        for feed, cut in self.parts:
            yield from map(cut, iter_batches(feed, self.batch_size, self.axes))

    def activation_bytes(self, taps: Sequence[_Tap]) -> dict[str, int]:
        """Bytes per batch of each exposed tensor, the most any part needs (one run on its longest sample, or
        on its last batch when the model fixes the batch size)."""
        probe_model, names = with_outputs(self.model, [t.tensor for t in taps])
        if not names:
            return {}
        sess = make_session(probe_model)
        probe = model_fixed_batch(self.model) or 1
        out: dict[str, int] = {}
        for feed, cut in self.parts:
            with ort_failures(f"calibration on {self.source}"):
                n = sample_count(feed, self.axes)
                values = sess.run(names, cut(slice_batch(feed, self.axes, max(0, n - probe), n)))
            rows = min(self.batch_size, n)
            for name, v in zip(names, values):
                out[name] = max(out.get(name, 0), int(v.nbytes) * rows // probe)
        return out

    def run(
        self,
        taps: Sequence[_Tap],
        bar: Progress,
        student: ModelProto | None = None,
        given: Sequence[tuple[Feed, ...]] | None = None,
        keep: Sequence[str] = (),
        keep_bytes: int = DEFAULT_CUT_BYTES,
    ) -> list[tuple[Feed, ...]] | None:
        """Stream every batch through the taps (with ``student``: its values, the model's as the teacher's).
        ``given``: per batch, values computed by an earlier run (one dict per model) that are fed instead of
        recomputed; returns, per batch, the values of ``keep`` (one dict per model), or None when they would
        take more than ``keep_bytes``."""
        tensors = [t.tensor for t in taps]
        models = (self.model, student) if student is not None else (self.model,)
        sessions = []
        for i, m in enumerate(models):
            sub, names = with_outputs(m, tensors + list(keep), given[0][i] if given else None)
            sessions.append((make_session(sub) if names else None, names))
            del sub
        kept: list[tuple[Feed, ...]] | None = [] if keep else None
        held = 0
        for b, batch in enumerate(self.iter_batches()):
            outs = []
            for i, (sess, names) in enumerate(sessions):
                fed = {**batch, **given[b][i]} if given else batch
                with ort_failures(f"calibration on {self.source}"):
                    values = dict(zip(names, sess.run(names, fed))) if sess is not None else {}
                outs.append({**fed, **values})
            mask = batch.get(self.mask_name) if self.mask_name else None
            for tap in taps:
                if student is None:
                    tap.add(np.asarray(outs[0][tap.tensor]), mask)
                else:
                    tap.add(np.asarray(outs[1][tap.tensor]), mask, np.asarray(outs[0][tap.tensor]))
            if kept is not None:
                kept.append(tuple({k: out[k] for k in keep} for out in outs))
                held += sum(np.asarray(v).nbytes for values in kept[-1] for v in values.values())
                kept = kept if held <= keep_bytes else None
            bar.step()
        for tap in taps:
            tap.flush()
        return kept


def collect_grams(
    model: ModelProto,
    layers: Sequence[Layer],
    feeds: Mapping[str, np.ndarray] | Parts,
    *,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str = "calibration data",
) -> dict[str, np.ndarray]:
    """Per-layer Gram matrices ``XᵀX`` (sums, not means) of the layer inputs over ``samples`` samples of
    ``feeds`` (all when None): one feed dict, or several of different sample shapes, drawn from in
    proportion to their sizes.

    Returns ``{layer name: G}``, ``G`` of shape ``[k, k]`` (``groups == 1``) or ``[g, k, k]`` (grouped
    conv), ``k`` the layer's ``in_features``. Layers whose input cannot be exposed are left out (they fall
    back to plain SVD). Taps are run in several passes when their activations for one batch would exceed
    ``max_bytes``. ``source`` names the data in errors (ONNX Runtime failing on it, too few samples).
    """
    runner = _Runner(model, feeds, samples, batch_size, source)
    taps = _taps(model, layers)
    if not taps:
        return {}
    groups = _groups(taps, runner.activation_bytes(taps), max_bytes)
    bar = Progress(runner.batches * len(groups), f"calibrating {runner.samples} samples", progress)
    try:
        for group in groups:
            runner.run(group, bar)
    finally:
        bar.close()
    return {name: tap.result(tap.gram) for tap in taps if tap.gram is not None for name in tap.layers}


def stages(model: ModelProto, taps: Sequence[_Tap]) -> list[list[_Tap]]:
    """Consecutive groups of taps (topological order) in which no tap depends on a layer of its own group:
    each group can be calibrated in one run once the groups before it are compressed."""
    bit = {name: 1 << i for i, name in enumerate(n for t in taps for n in t.layers)}
    deps: dict[str, int] = {}
    for node in model.graph.node:
        m = 0
        for name in list(node.input) + sorted(implicit_inputs(node)):
            m |= deps.get(name, 0)
        m |= bit.get(node.name, 0)
        for out in node.output:
            deps[out] = m
    out: list[list[_Tap]] = []
    current = 0
    for tap in taps:
        own = sum(bit[n] for n in tap.layers)
        if not out or deps.get(tap.tensor, 0) & current:
            out.append([])
            current = 0
        out[-1].append(tap)
        current |= own
    return out


Factors = tuple[np.ndarray, np.ndarray]


def sequential_factors(
    model: ModelProto,
    layers: Sequence[Layer],
    ranks: Mapping[str, int],
    feeds: Mapping[str, np.ndarray] | Parts,
    build_student: Callable[[Mapping[str, Factors]], ModelProto],
    *,
    split: str = "output",
    ridge: float = 1e-6,
    shrinkage: float = DEFAULT_SHRINKAGE,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    max_bytes: int = DEFAULT_CUT_BYTES,
    source: str = "calibration data",
) -> dict[str, Factors]:
    """Error-compensating whitened factors, stage by stage in topological order: each layer's factors map
    the *student's* input (all earlier layers already compressed) to the *teacher's* output, so the error
    of the layers before is partly undone instead of passed on (``linalg.whitened_svd(cross=...)``), with
    ``shrinkage`` toward the teacher's weight so that the compensation does not overfit few samples.

    ``ranks``: the planned total rank per layer; ``build_student(factors)`` returns the teacher with the
    layers in ``factors`` replaced by their chains. Returns ``{layer name: (input_factor, output_factor)}``
    for every planned layer whose input could be exposed.
    """
    from inhercc import linalg

    # an embedding's ids are the teacher's own: nothing to compensate (the factorizer's counts serve it)
    planned = [layer for layer in layers if ranks.get(layer.name) and not family_for(layer.op).diagonal_gram]
    by_name = {layer.name: layer for layer in planned}
    runner = _Runner(model, feeds, samples, batch_size, source)
    plan_stages = stages(model, _taps(model, planned))
    cuts = frontiers(model, [[t.tensor for t in stage] for stage in plan_stages])
    bar = Progress(runner.batches * len(plan_stages), f"sequential calibration, {len(plan_stages)} stages", progress)
    factors: dict[str, Factors] = {}
    given: list[tuple[Feed, ...]] | None = None
    try:
        for stage, cut in zip(plan_stages, cuts):
            student = build_student(factors) if factors else model
            # both models' values at this stage's cut are kept, so the next stage starts there: each node
            # runs once over all stages, not once per stage (unless the cut would not fit in max_bytes)
            given = runner.run(stage, bar, student, given, cut, max_bytes)
            for tap in stage:
                assert tap.gram is not None and tap.cross is not None
                gram, cross = tap.result(tap.gram), tap.result(tap.cross)
                for name in tap.layers:
                    layer = by_name[name]
                    w = layer.matrix()
                    d = linalg.whitened_svd(w, gram, ridge, cross=cross, shrinkage=shrinkage)
                    factors[name] = linalg.whitened_factorize(w, gram, ranks[name] // layer.groups, split, d)
                tap.gram = tap.cross = None  # O(k²) each; not needed any more
    finally:
        bar.close()
    return factors
