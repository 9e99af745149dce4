"""Measured sensitivity: how much each layer's truncation costs at the model's *final* outputs.

The whitened spectrum says how much of a layer's own output a rank keeps; it cannot say how much that
layer matters downstream (an error in a query projection passes a softmax, one in an FFN output lands in
the residual stream). Here every compressible weight becomes a graph input of one ONNX Runtime session;
each layer in turn gets its low-rank approximation at a few ranks while all others keep the teacher's
weights, and the relative squared error of the final outputs is measured. Per layer, a least-squares fit
``error ≈ c · tail(rank)`` (``tail`` = share of the spectrum's energy the rank drops) gives the weight
``c`` that :func:`inhercc.plan.plan_ratio` multiplies that layer's energy shares by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from inhercc.calibrate import Parts, feed_parts, quotas, split_quota, trimmed_parts
from inhercc.data import Axes, Feed, batch_axes, iter_batches, sample_count, slice_batch
from inhercc.errors import InherccError
from inhercc.families import family_for
from inhercc.layers import FactorSource, Layer
from inhercc.plan import keep_ratio_rank, spectrum_energy
from inhercc.progress import Progress
from inhercc.runtime import batch_size_for, make_session, ort_failures
from inhercc.specs import mask_input
from inhercc.verify import INTEGER, Scores, name_kind

DEFAULT_SAMPLES = 32
DEFAULT_PROBES = (0.5, 1.0)  # ranks probed, as multiples of the layer's rank under uniform ``ratio``

# (layer, total rank) -> (input_factor [g, r/g, in], output_factor [g, out, r/g])


def stored_weight(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """Inverse of :meth:`Layer.matrix`: a ``[groups, out, in]`` stack back in the initializer's layout and
    dtype (MatMul ``[in, out]``, Gemm with ``transB``/``alpha``, Conv ``[out, in/g, *kernel]``)."""
    w = family_for(layer.op).stored_weight(layer, matrix)
    return np.ascontiguousarray(w.astype(layer.weight_dtype))


def weights_as_inputs(model: ModelProto, layers: Sequence[Layer]) -> ModelProto:
    """A copy of ``model`` whose weights of ``layers`` are graph inputs (fed per run) instead of constants."""
    out = ModelProto()
    out.CopyFrom(model)
    names = {layer.weight_name for layer in layers}
    keep = [t for t in out.graph.initializer if t.name not in names]
    moved = [t for t in out.graph.initializer if t.name in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    existing = {i.name for i in out.graph.input}
    for t in moved:
        if t.name not in existing:
            out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def relative_output_error(
    teacher: Sequence[Sequence[np.ndarray]],
    student: Sequence[Sequence[np.ndarray]],
    masks: Sequence[np.ndarray | None] | None = None,
) -> float:
    """Mean over float outputs of ``‖s − t‖² / ‖t‖²`` (for L2-normalized embeddings ≈ 2·(1 − cosine)), the
    norms summed over the batches (``teacher[batch][output]``, shapes free to differ between batches;
    ``masks``: each batch's attention mask, whose padding positions are left out of token-level outputs).
    Outputs whose teacher and student shapes differ are left out."""
    if not teacher:
        return 0.0
    scores = Scores({str(j): name_kind("", np.asarray(t).dtype) for j, t in enumerate(teacher[0])})
    for i, (t, s) in enumerate(zip(teacher, student)):
        scores.add(t, s, masks[i] if masks else None)
    errs = [o.relative_error for o in scores.outputs.values() if o.kind != INTEGER and not o.skipped]
    return float(np.mean(errs)) if errs else 0.0


def _run(
    sess,
    feed: Feed,
    weights: Mapping[str, np.ndarray],
    batch_size: int,
    cut: Callable[[Feed], Feed],
    what: str = "the sensitivity measurement",
    axes: Axes | None = None,
) -> list[list[np.ndarray]]:
    """All outputs of every batch of ``feed`` (padding cut), the weights fed whole with every batch; batches
    are kept apart (outputs cut to different lengths do not join)."""
    with ort_failures(what):
        return [sess.run(None, {**cut(batch), **weights}) for batch in iter_batches(feed, batch_size, axes)]


def _masks(feed: Feed, batch_size: int, cut: Callable[[Feed], Feed], mask: str | None, axes: Axes) -> list:
    """The attention mask of every batch :func:`_run` runs (None without a mask input)."""
    return [cut(batch).get(mask) if mask else None for batch in iter_batches(feed, batch_size, axes)]


def sensitivity_feeds(
    feeds: Mapping[str, np.ndarray] | Parts,
    calib_samples: int | None,
    samples: int = DEFAULT_SAMPLES,
    axes: Axes | None = None,
) -> list[Feed]:
    """Samples for the measurement (``samples`` in all, from every part in proportion), held apart from the
    Gram samples when the data has enough (factors fit on the very samples they are judged on look better
    than they are), else the first ones."""
    parts = feed_parts(feeds)
    sizes = [sample_count(p, axes) for p in parts]
    spare = calib_samples is not None and sum(sizes) >= calib_samples + samples
    start = quotas(sizes, calib_samples) if spare else [0] * len(parts)
    rest = [slice_batch(p, axes or {}, s, n) for p, s, n in zip(parts, start, sizes)]
    return [p if n is None else slice_batch(p, axes or {}, 0, n) for p, n in split_quota(rest, samples, axes)]


def measure_sensitivity(
    model: ModelProto,
    layers: Sequence[Layer],
    feeds: Mapping[str, np.ndarray] | Parts,
    factors: FactorSource,
    spectra: Mapping[str, np.ndarray],
    *,
    ratio: float = 0.5,
    probes: Sequence[float] = DEFAULT_PROBES,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = 16,
    progress: bool = False,
    source: str = "calibration data",
) -> dict[str, dict[str, object]]:
    """Per compressible layer: the end-to-end relative output error with only that layer truncated, at
    ranks ``probe × keep_ratio_rank(layer, ratio)``, and the fitted weight ``c`` (error per unit of dropped
    spectral energy share). Returns ``{name: {"ranks": [...], "errors": [...], "weight": c}}``. A model
    with a fixed batch dim runs in batches of that size; ``source`` names the data in errors."""
    cands = [layer for layer in layers if layer.compressible]
    if not cands:
        return {}
    if not probes or any(p <= 0 for p in probes):
        raise InherccError("sensitivity probes must be positive multiples of the uniform rank")
    chunks = trimmed_parts(model, feeds, samples, source)
    batch_size = batch_size_for(model, batch_size)
    what = f"the sensitivity measurement on {source}"
    open_model = weights_as_inputs(model, cands)
    sess = make_session(open_model)
    inits = {t.name: t for t in model.graph.initializer}
    teacher_weights = {la.weight_name: numpy_helper.to_array(inits[la.weight_name]) for la in cands}
    axes = batch_axes(model)
    reference = [o for feed, cut in chunks for o in _run(sess, feed, teacher_weights, batch_size, cut, what, axes)]
    masks = [m for feed, cut in chunks for m in _masks(feed, batch_size, cut, mask_input(model), axes)]
    bar = Progress(len(cands) * len(probes), "sensitivity", progress)
    result: dict[str, dict[str, object]] = {}
    try:
        for layer in cands:
            share = spectrum_energy(spectra[layer.name])
            tail = np.concatenate([np.cumsum(share[::-1])[::-1], [0.0]])  # tail[r] = energy share dropped at r
            ranks = sorted({min(layer.full_rank, max(1, round(p * keep_ratio_rank(layer, ratio)))) for p in probes})
            errors = []
            for r in ranks:
                a, b = factors(layer, r * layer.groups)
                approx = stored_weight(layer, np.matmul(b, a))
                weights = {**teacher_weights, layer.weight_name: approx}
                out = [o for feed, cut in chunks for o in _run(sess, feed, weights, batch_size, cut, what, axes)]
                errors.append(relative_output_error(reference, out, masks))
                bar.step()
            t = np.array([tail[r] for r in ranks])
            e = np.array(errors)
            weight = float(e @ t / (t @ t)) if float(t @ t) > 0 else 0.0
            result[layer.name] = {"ranks": [r * layer.groups for r in ranks], "errors": errors, "weight": weight}
    finally:
        bar.close()
    return result


def sensitivity_weights(measured: Mapping[str, Mapping[str, object]]) -> dict[str, float]:
    """The per-layer weights for :func:`inhercc.plan.plan_ratio` (a floor keeps every layer in the race)."""
    weights = {name: float(m["weight"]) for name, m in measured.items()}  # type: ignore[arg-type]
    positive = [w for w in weights.values() if w > 0]
    floor = 1e-3 * (float(np.median(positive)) if positive else 1.0)
    return {name: max(w, floor) for name, w in weights.items()}
