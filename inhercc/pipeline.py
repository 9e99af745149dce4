"""The compiler pipeline: load → find layers → plan ranks → rewrite (passes) → verify → save."""

from __future__ import annotations

import os
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from onnx import ModelProto

from inhercc import linalg
from inhercc.calibrate import DEFAULT_BATCH_SIZE as DEFAULT_CALIB_BATCH_SIZE
from inhercc.calibrate import DEFAULT_SAMPLES as DEFAULT_CALIB_SAMPLES
from inhercc.data import (
    Feed,
    Samples,
    batch_axes,
    check_feeds,
    check_synthetic_memory,
    confirmed_shapes,
    default_shapes,
    fixed_shape_flops,
    input_specs,
    load_npz,
    open_samples,
    resolve_shapes,
    sample_count,
    slice_batch,
    split_indices,
    synthetic_feeds,
    warn_synthetic,
    with_batch,
    with_fixed_inputs,
)
from inhercc.distill import DistillConfig, is_main_process
from inhercc.errors import InherccError
from inhercc.files import check_paths, file_size, path_or_none
from inhercc.layers import (
    DEFAULT_MIN_PARAMS,
    DEFAULT_MIN_SAVING,
    FAMILIES,
    SUBGRAPH_NOTE,
    FactorSource,
    Layer,
    family_for,
    find_layers,
    tensor_shapes,
)
from inhercc.model import (
    as_model,
    drop_inferred_shapes,
    float_param_count,
    has_value_info,
    model_bytes,
    save_model,
)
from inhercc.passes import rewrite
from inhercc.plan import RankPlan, apply_plan, plan_energy, plan_proportional, plan_ratio, plan_uniform
from inhercc.runtime import check_provider, model_fixed_batch
from inhercc.verify import graph_output_kinds, score_models

INITS = ("svd", "whitened", "random")
ALLOCATIONS = ("greedy", "uniform", "sensitivity")
CALIBRATION_LIMIT = 4096  # samples read into memory for calibration from a streamed source
DEFAULT_RATIO = 0.5
DEFAULT_RANK_MULTIPLE = 8


@dataclass
class CompressResult:
    """The student, the plan that made it, the layer records and the report (JSON-ready dict)."""

    model: ModelProto
    plan: RankPlan
    layers: list[Layer]
    report: dict[str, Any] = field(default_factory=dict)


def as_parts(data: Any, model: ModelProto) -> list[Feed]:
    """Samples in memory from any data source (``inhercc.data.open_samples``), one feed dict per sample
    shape: a dict or an ``.npz`` is one part; a folder of shards, an iterable of feed dicts or a reader gives
    its first ``CALIBRATION_LIMIT`` samples grouped by shape (length-bucketed text: one part per length).
    Empty without data."""
    if data is None:
        return []
    if isinstance(data, (str, os.PathLike)) and not os.path.isdir(data):
        return [load_npz(data, model)]
    if isinstance(data, Mapping):
        feeds = {k: np.asarray(v) for k, v in data.items()}
        check_feeds(feeds, model)
        return [feeds]
    samples = open_samples(data, model)
    return calibration_parts(samples, np.arange(len(samples)))


def data_label(data: Any, default: str = "data") -> str:
    """How errors name a data source: its path, else ``default``."""
    path = path_or_none(data)
    return default if path is None else str(path)


def calibration_parts(samples: Samples, indices: np.ndarray) -> list[Feed]:
    """The first ``CALIBRATION_LIMIT`` of the given samples, one feed dict per sample shape (shards of a
    folder may differ in, say, sequence length)."""
    return [feeds for _, feeds in samples.batches(indices[:CALIBRATION_LIMIT], CALIBRATION_LIMIT)]


def choose_plan(
    layers: list[Layer],
    spectra: Mapping[str, np.ndarray],
    *,
    ratio: float | None,
    rank: int | None,
    energy: float | None,
    plan: RankPlan | str | os.PathLike[str] | None,
    rank_multiple: int,
    min_saving: float,
    spectrum: str,
    allocation: str = "greedy",
    layer_weights: Mapping[str, float] | None = None,
) -> RankPlan:
    """Exactly one of ratio / rank / energy / plan (ratio 0.5 when none is given). A ratio is allocated by
    ``allocation``: 'greedy' over the spectra (scaled by ``layer_weights`` when given), or 'uniform'."""
    given = [
        n for n, v in (("--ratio", ratio), ("--rank", rank), ("--energy", energy), ("--plan", plan)) if v is not None
    ]
    if len(given) > 1:
        raise InherccError(f"choose one of --ratio, --rank, --energy, --plan (got {', '.join(given)})")
    if rank_multiple <= 0:
        raise InherccError(f"--rank-multiple must be positive, got {rank_multiple}")
    if plan is not None:
        return apply_plan(layers, plan if isinstance(plan, RankPlan) else RankPlan.load(plan), min_saving=min_saving)
    if rank is not None:
        return plan_uniform(layers, rank, rank_multiple=rank_multiple, min_saving=min_saving)
    if energy is not None:
        return plan_energy(layers, spectra, energy, rank_multiple=rank_multiple, min_saving=min_saving)
    ratio = DEFAULT_RATIO if ratio is None else ratio
    if allocation == "uniform":
        return plan_proportional(layers, ratio, rank_multiple=rank_multiple, min_saving=min_saving)
    return plan_ratio(
        layers,
        spectra,
        ratio,
        rank_multiple=rank_multiple,
        min_saving=min_saving,
        spectrum=spectrum,
        layer_weights=layer_weights,
    )


class Factorizer:
    """Computes each layer's decomposition once and serves spectra (for planning) and factors (for the
    passes) from it. ``init``: 'svd' (Eckart–Young optimal in the weights), 'whitened' (optimal in the
    layer outputs given per-layer Gram matrices) or 'random' (Kaiming; same architecture, no inheritance)."""

    def __init__(
        self, init: str = "svd", split: str = "output", grams: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> None:
        if init not in INITS:
            raise InherccError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")
        if split not in linalg.SPLITS:
            raise InherccError(f"unknown --split {split!r}; choose from {', '.join(linalg.SPLITS)}")
        if init == "whitened" and grams is None:
            raise InherccError("--init whitened needs calibration data (--data)")
        self.init, self.split, self.grams, self.seed = init, split, grams, seed
        self._cache: dict[str, Any] = {}

    def decomposition(self, layer: Layer) -> linalg.SVD | linalg.WhitenedSVD:
        if layer.name not in self._cache:
            self._cache[layer.name] = self._decompose(layer)
        return self._cache[layer.name]

    def spectrum(self, layer: Layer) -> np.ndarray:
        return self.decomposition(layer).s

    def spectra(self, layers: Iterable[Layer]) -> dict[str, np.ndarray]:
        """Spectra of the compressible layers; the decompositions run on a small thread pool (LAPACK
        releases the GIL; each call is single-threaded, see :func:`linalg.thin_svd`)."""
        todo = [layer for layer in layers if layer.compressible]
        workers = max(1, min(len(todo), os.cpu_count() or 1, 4))
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with linalg.single_threaded_torch(), ThreadPoolExecutor(workers) as pool:
                for layer, d in zip(todo, pool.map(self._decompose, todo)):
                    self._cache.setdefault(layer.name, d)
        return {layer.name: self.spectrum(layer) for layer in todo}

    def _decompose(self, layer: Layer) -> linalg.SVD | linalg.WhitenedSVD:
        if self.init == "whitened" and self.grams is not None and layer.name in self.grams:
            return linalg.whitened_svd(layer.matrix(), self.grams[layer.name])
        return linalg.svd(layer.matrix())

    def __call__(self, layer: Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
        per_group = rank // layer.groups
        if self.init == "random":
            seed = self.seed + zlib.crc32(layer.name.encode()) % 1000  # hash() differs between processes
            return linalg.random_factors(layer.out_features, layer.in_features, per_group, layer.groups, seed=seed)
        return self.decomposition(layer).factors(per_group, self.split)  # no weight copy: the cached SVD suffices

    def release(self) -> None:
        self._cache.clear()


def split_holdout(feeds: Feed, samples: int, axes: Mapping[str, int | None] | None = None) -> tuple[Feed, Feed]:
    """``(head, tail)``: the last ``samples`` samples (along each input's batch axis, ``axes``) are held out
    for verification when at least as many remain for calibration; otherwise both are the whole set (too
    little data to split; a warning says so)."""
    n = sample_count(feeds, axes)
    if n < 2 * samples:
        warnings.warn(
            f"only {n} calibration samples, fewer than twice --verify-samples {samples}: the fidelity check "
            "reuses the calibration samples (pass --verify-data, or a lower --verify-samples)",
            stacklevel=2,
        )
        return feeds, feeds
    return slice_batch(feeds, axes or {}, 0, n - samples), slice_batch(feeds, axes or {}, n - samples, n)


def skip_reason(layers: Sequence[Layer]) -> str:
    """Why none of ``layers`` is compressible: the most common reason, with a count and an example."""
    skipped = [la for la in layers if la.reason]
    if not skipped:
        return ""
    kind, n = Counter(la.reason.split(" (")[0] for la in skipped).most_common(1)[0]
    example = next(la for la in skipped if la.reason.split(" (")[0] == kind)
    return f"; main reason ({n} of {len(layers)} layers, e.g. {example.name}): {example.reason}"


def verification_feeds(
    model: ModelProto, parts: Sequence[Feed], shapes: Mapping[str, list[int]] | None, samples: int, seed: int
) -> list[Feed]:
    """Real samples when given (model inputs only, one feed per sample shape), else one synthetic batch of
    ``samples``."""
    if parts:
        names = {s.name for s in input_specs(model)}
        return [{k: v for k, v in feeds.items() if k in names} for feeds in parts]
    warn_synthetic("verification")
    return [synthetic_feeds(model, shapes, batch=samples, seed=seed)]


def compress(
    teacher: ModelProto | str | os.PathLike[str],
    *,
    ratio: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    plan: RankPlan | str | os.PathLike[str] | None = None,
    rank_multiple: int = DEFAULT_RANK_MULTIPLE,
    split: str = "output",
    init: str | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_params: int = DEFAULT_MIN_PARAMS,
    min_saving: float = DEFAULT_MIN_SAVING,
    allow_nonfinite: bool = False,
    data: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | str | os.PathLike[str] | None = None,
    verify_data: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    grams: Mapping[str, np.ndarray] | None = None,
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES,
    calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
    allocation: str | None = None,
    sequential: bool = False,
    progress: bool = False,
    verify: bool = True,
    verify_samples: int = 8,
    seed: int = 0,
    epochs: int | None = None,
    steps: int | None = None,
    distill: DistillConfig | None = None,
    latency_aware: bool = False,
    provider: str = "cpu",
    threads: int | None = None,
    latency_timer: Callable[[Layer, int, Any], tuple[float, float]] | None = None,
    log: Callable[[str], None] | None = None,
    output_kinds: Mapping[str, str] | None = None,
) -> CompressResult:
    """Compress a teacher (path or ModelProto) into a student with SVD-initialized factor chains.

    With ``latency_aware`` every planned chain is timed against its dense layer on ``provider`` (at the
    ``shapes`` given) and layers whose chain is not faster stay dense (:mod:`inhercc.latency`).

    With ``epochs``, ``steps`` or a ``distill`` config the student is then fine-tuned from the teacher
    (:func:`inhercc.distill.distill`) on ``data`` — any source ``inhercc.data.open_samples`` takes; the
    calibration uses its training split only — and the report gains ``fidelity_before`` / ``fidelity``
    (on the held-out validation split) and ``training`` (and ``fidelity_verify_data`` on ``verify_data``).

    Calibration (``init='whitened'``, the default with data): Gram matrices of the layer inputs over the
    first ``calib_samples`` samples (:mod:`inhercc.calibrate`). ``allocation`` of a ratio: 'sensitivity'
    (the default with calibration data: a greedy over the spectra weighted by each layer's measured effect
    on the outputs, :mod:`inhercc.sensitivity`), 'greedy' (over the spectra alone; the default without
    data) or 'uniform' (every layer keeps ``ratio`` of its weights). ``sequential`` fits each layer to the
    teacher's outputs from the student's own inputs, stage by stage (slower, better). ``progress`` draws
    bars on stderr. A NaN / Inf in a weight that would be factorized is an error, unless ``allow_nonfinite``
    (that layer then stays dense, with the reason).

    Exactly one of ``ratio`` (default 0.5), ``rank``, ``energy`` or ``plan``. Returns the student model,
    the plan and a report with params, FLOPs, size and fidelity (teacher vs student in ONNX Runtime on
    ``verify_data``, else on the last ``verify_samples`` samples of ``data`` — held out from calibration —,
    else on synthetic inputs).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    say = log or (lambda _msg: None)
    if latency_aware and latency_timer is None:
        check_provider(provider)  # before any calibration: a GPU that cannot run is a one-line error now
    teacher_value_info = has_value_info(teacher)
    model = as_model(teacher)
    training = distill is not None or epochs is not None or steps is not None
    chosen: tuple[dict[str, list[int]] | None, dict[str, Any]] | None = None
    graph_output_kinds(model, output_kinds)  # unknown outputs or kinds: an error before any work
    if training:
        options = {k: v for k, v in (("epochs", epochs), ("steps", steps)) if v is not None}
        options |= {"output_kinds": dict(output_kinds)} if output_kinds else {}
        config = replace(distill or DistillConfig(), **options)
        config.check()
        chosen = choose_shapes(model, shapes, []) if data is None else None  # synthetic: sizes chosen now
        synthetic = shapes or (with_batch(model, chosen[0], config.synthetic_samples) if chosen and chosen[0] else None)
        samples = open_samples(data, model, shapes=synthetic, synthetic=config.synthetic_samples, seed=config.seed)
        train_idx, _ = split_indices(len(samples), config.val_split, config.seed)
        calibration = [] if samples.synthetic else calibration_parts(samples, train_idx)
        held_out = as_parts(verify_data, model)  # scored after training, besides the validation split
    else:
        calibration = as_parts(data, model)
        held_out = as_parts(verify_data, model)
        if calibration and not held_out and verify:  # held out of the largest part
            axes = batch_axes(model)
            i = max(range(len(calibration)), key=lambda j: sample_count(calibration[j], axes))
            calibration[i], held = split_holdout(calibration[i], verify_samples, axes)
            held_out = [held]
    feeds = calibration[0] if calibration else None
    data_source = data_label(data, "calibration data")
    verify_source = data_label(verify_data) if verify_data is not None else f"{data_source} (held-out samples)"
    work_shapes, report_shapes = chosen or choose_shapes(model, shapes, held_out or calibration)
    layers = find_layers(
        model,
        include=include,
        exclude=exclude,
        min_params=min_params,
        rank_multiple=rank_multiple,
        min_saving=min_saving,
        allow_nonfinite=allow_nonfinite,
    )
    if not any(layer.compressible for layer in layers):
        found = (
            f"{len(layers)} candidate(s), none compressible" if layers else "no MatMul/Gemm/Conv with a constant weight"
        )
        raise InherccError(f"no compressible layer in the model ({found}){skip_reason(layers)}")
    init = init or ("whitened" if feeds is not None else "svd")
    if init == "whitened" and grams is None:
        if feeds is None:
            raise InherccError("--init whitened needs calibration data (--data)")
        from inhercc.calibrate import collect_grams

        say("calibrating (Gram matrices of the layer inputs)")
        t_calib = time.perf_counter()
        compressible = [la for la in layers if la.compressible]
        grams = collect_grams(
            model,
            compressible,
            calibration,
            samples=calib_samples,
            batch_size=calib_batch_size,
            progress=progress,
            source=data_source,
        )
        timings["calibrate"] = round(time.perf_counter() - t_calib, 3)
    factorizer = Factorizer(init, split, grams, seed)
    if init == "whitened":  # calibration cannot tap a body's activations: those layers take plain SVD
        for layer in layers:
            layer.note = SUBGRAPH_NOTE if layer.subgraph and layer.compressible else layer.note
    spectrum = "whitened" if init == "whitened" else "weight"
    needs_spectra = plan is None and rank is None
    spectra = factorizer.spectra(layers) if needs_spectra else {}
    # Measured on MiniLM-L6 and MobileNetV2 at ratio 0.5 (benchmarks/results/whitened.md): neither spectrum
    # greedy nor uniform ranks win on both; the measured sensitivity is best on both, at ~2× the Gram time.
    allocation = allocation or ("sensitivity" if init == "whitened" and feeds is not None else "greedy")
    if allocation not in ALLOCATIONS:
        raise InherccError(f"unknown --allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    layer_weights = None
    if allocation == "sensitivity" and needs_spectra and energy is None:
        if feeds is None:
            raise InherccError("--sensitivity needs calibration data (--data)")
        if init == "random":
            raise InherccError("--sensitivity measures truncation errors; use it with --init svd or whitened")
        from inhercc.sensitivity import measure_sensitivity, sensitivity_feeds, sensitivity_weights

        say("measuring each layer's effect on the outputs")
        t_sens = time.perf_counter()
        measured = measure_sensitivity(
            model,
            layers,
            sensitivity_feeds(calibration, calib_samples, axes=batch_axes(model)),  # every sample shape
            factorizer,
            spectra,
            ratio=DEFAULT_RATIO if ratio is None else ratio,
            batch_size=calib_batch_size,
            progress=progress,
            source=data_source,
        )
        layer_weights = sensitivity_weights(measured)
        timings["sensitivity"] = round(time.perf_counter() - t_sens, 3)
    rank_plan = choose_plan(
        layers,
        spectra,
        ratio=ratio,
        rank=rank,
        energy=energy,
        plan=plan,
        rank_multiple=rank_multiple,
        min_saving=min_saving,
        spectrum=spectrum,
        allocation=allocation,
        layer_weights=layer_weights,
    )
    rank_plan.method.setdefault("init", init)
    rank_plan.method.setdefault("split", split)
    if not rank_plan.factorized():
        raise InherccError("the plan factorizes no layer (every layer would stay dense)")
    if latency_aware:
        from inhercc.latency import latency_aware_plan

        say(f"timing {len(rank_plan.factorized())} chain(s) against their dense layers on {provider}")
        rank_plan = latency_aware_plan(
            model,
            layers,
            rank_plan,
            provider=provider,
            shapes=work_shapes or sample_shapes(feeds, model),
            timer=latency_timer,
            threads=threads,
            spectra=spectra,
            min_saving=min_saving,
            layer_weights=layer_weights,  # re-planning keeps the measured sensitivity
            log=say,
        )
        if not rank_plan.factorized():
            raise InherccError("every factor chain is slower than its dense layer on this provider: nothing to do")
    factors: FactorSource = factorizer
    if sequential:
        if feeds is None or init != "whitened":
            raise InherccError("--sequential needs calibration data (--data) and --init whitened")
        t_seq = time.perf_counter()
        factors = sequential_source(
            model,
            layers,
            rank_plan,
            calibration,
            factorizer,
            calib_samples,
            calib_batch_size,
            progress,
            say,
            data_source,
        )
        timings["sequential"] = round(time.perf_counter() - t_seq, 3)
        rank_plan.method["sequential"] = True
    say(f"rewriting {len(rank_plan.factorized())} layer(s)")
    student = rewrite(model, rank_plan, layers, factors)
    factorizer.release()
    t_rewrite = time.perf_counter() - t0
    largest = max(held_out, key=lambda f: sample_count(f, batch_axes(model))) if held_out else None
    report = build_report(model, student, layers, rank_plan, work_shapes or sample_shapes(largest, model))
    report["init"] = init
    report["shapes"] = report_shapes
    if training:
        from inhercc.distill import distill as run_distill

        say("distilling from the teacher")
        tuned = run_distill(student, model, samples, config=config, shapes=shapes)
        student = tuned.model
        report.update(tuned.report)
        if held_out and verify:
            scores = score_models(
                model,
                student,
                verification_feeds(model, held_out, None, 0, 0),
                source=verify_source,
                output_kinds=output_kinds,
            )
            report.update(scores.report("fidelity_verify_data"))
    elif verify:
        say("verifying in ONNX Runtime")
        vshapes = shapes or (with_batch(model, work_shapes, verify_samples) if work_shapes else None)
        vfeeds = verification_feeds(model, held_out, vshapes, verify_samples, seed)
        source = verify_source if held_out else "synthetic inputs"
        report.update(score_models(model, student, vfeeds, source=source, output_kinds=output_kinds).report())
        report["fidelity_inputs"] = "data" if held_out else "synthetic"
    report["time_s"] = {**timings, "rewrite": round(t_rewrite, 3), "total": round(time.perf_counter() - t0, 3)}
    if not teacher_value_info:
        # Inferred shapes are ours, not the teacher's: with them ONNX Runtime's CPU provider fused
        # Add+Add+LayerNorm into a SkipLayerNormalization 4.6× slower than the separate ops (MiniLM, batch
        # 32×128), costing the student 0.04 of its latency ratio. Ship the graph as plain as it came.
        del student.graph.value_info[:]
        drop_inferred_shapes(student)
    return CompressResult(student, rank_plan, layers, report)


def sequential_source(
    model: ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    feeds: Sequence[Feed],
    factorizer: Factorizer,
    samples: int | None,
    batch_size: int,
    progress: bool,
    say: Callable[[str], None],
    source: str = "calibration data",
) -> FactorSource:
    """Error-compensating factors (:func:`inhercc.calibrate.sequential_factors`) for the planned layers;
    the factorizer's for any layer whose input could not be exposed."""
    from inhercc.calibrate import sequential_factors

    def build(done: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ModelProto:
        return rewrite(model, RankPlan({n: plan.rank(n) for n in done}), layers, lambda la, _r: done[la.name])

    say("sequential calibration (each layer fitted on the student's own inputs)")
    compensated = sequential_factors(
        model,
        layers,
        plan.factorized(),
        feeds,
        build,
        split=factorizer.split,
        samples=samples,
        batch_size=batch_size,
        progress=progress,
        source=source,
    )

    def chosen(layer: Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return compensated[layer.name] if layer.name in compensated else factorizer(layer, rank)

    return chosen


def sample_shapes(feeds: Feed | None, model: ModelProto) -> dict[str, list[int]] | None:
    """Input shapes of one sample of real data (batch 1, or the model's batch size when it fixes one, on
    each input's batch axis), so FLOPs are counted at the data's sizes."""
    if feeds is None:
        return None
    batch = model_fixed_batch(model) or 1
    axes = batch_axes(model)
    out = {}
    for s in input_specs(model):
        if s.name in feeds:
            shape, axis = list(np.shape(feeds[s.name])), axes.get(s.name)
            if axis is not None and axis < len(shape):
                shape[axis] = batch
            out[s.name] = shape
    return out


def choose_shapes(
    model: ModelProto, shapes: Mapping[str, list[int]] | None, parts: Sequence[Feed]
) -> tuple[dict[str, list[int]] | None, dict[str, Any]]:
    """The input shapes FLOPs are counted at and synthetic inputs take (None: the data's), and the report's
    record of them: the given ones (completed: a bad one fails here, before any work), the data's (one
    sample), else sizes chosen for the dynamic dims (:func:`inhercc.data.confirmed_shapes`, said in one
    warning)."""
    if shapes:
        values = resolve_shapes(input_specs(model), shapes, model=model)
        if not parts:
            check_synthetic_memory(model, values)  # before any work: synthetic inputs of these shapes follow
        return values, {"values": values, "chosen": "given"}
    if parts:
        largest = max(parts, key=lambda f: sample_count(f, batch_axes(model)))
        return None, {"values": sample_shapes(largest, model), "chosen": "data"}
    values, note = confirmed_shapes(model)
    if note:
        warnings.warn(note, stacklevel=3)
    return values, {"values": values, "chosen": "default"}


def build_report(
    teacher: ModelProto,
    student: ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    shapes: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Params / FLOPs / size of both models and the per-layer table."""
    ft, sym = fixed_shape_flops(teacher, shapes)
    fs, _ = fixed_shape_flops(student, shapes)
    flops_at = layer_flops(teacher, shapes)
    rows = []
    for layer in layers:
        r = plan.rank(layer.name)
        layer = replace(layer, flops=flops_at.get(layer.name, layer.flops))  # at the report's input sizes
        after = layer.factor_params(r) + layer.bias_params if r is not None else layer.params
        rows.append(
            {
                "name": layer.name,
                "op": layer.op,
                "shape": layer.shape,
                "rank": r,
                "params_before": layer.params,
                "params_after": after,
                "flops_before": layer.flops,
                "flops_after": layer.factor_flops(r) if r is not None else layer.flops,
                "reason": None if r is not None else plan.reasons.get(layer.name, layer.reason),
                "note": layer.note if r is not None else None,
                "subgraph": layer.subgraph,
            }
        )
    return {
        "params": {"teacher": float_param_count(teacher), "student": float_param_count(student)},
        "flops": {"teacher": int(ft), "student": int(fs), "symbolic_dims_counted_as_1": list(sym)},
        "size": {"teacher": model_bytes(teacher), "student": model_bytes(student)},
        "plan": plan.method,
        "layers": rows,
    }


def compress_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    report_path: str | os.PathLike[str] | None = None,
    save_plan: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    **kwargs: Any,
) -> CompressResult:
    """:func:`compress` from a file to a file: the outputs are checked before any work (none over an input —
    model, data, plan — or over another output), written atomically. Sizes in the report are the real sizes
    on disk."""
    distill = kwargs.get("distill")
    check_paths(
        [("MODEL", input_path)]
        + [(f"--{k.replace('_', '-')}", path_or_none(kwargs.get(k))) for k in ("data", "verify_data", "plan")],
        {"-o": output_path, "--report": report_path, "--save-plan": save_plan},
        models=(input_path,),
        checkpoint=distill.checkpoint if distill is not None else None,
    )
    result = compress(input_path, **kwargs)
    if not is_main_process():  # under torchrun only rank 0 writes
        return result
    save_model(result.model, output_path, external_data=external_data)
    result.report["size"] = {"teacher": file_size(input_path), "student": file_size(output_path)}
    result.report["files"] = {"teacher": str(input_path), "student": str(output_path)}
    if save_plan is not None:
        result.plan.save(save_plan, result.layers)
    if report_path is not None:
        from inhercc.files import write_json

        write_json(report_path, result.report)
    return result


def inspect_model(
    model: ModelProto | str | os.PathLike[str],
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_params: int = DEFAULT_MIN_PARAMS,
    rank_multiple: int = DEFAULT_RANK_MULTIPLE,
    data: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    grams: Mapping[str, np.ndarray] | None = None,
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES,
    calib_batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
    progress: bool = False,
    shapes: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Per-layer table (name, op, weight shape, params, FLOPs, the ranks keeping 90 % / 99 % of the
    spectral energy — of the weights, or of the layer outputs when ``grams`` are given or calibrated on
    the first ``calib_samples`` of ``data`` — and the reason for every layer that cannot be compressed)
    with totals. FLOPs are per sample at ``shapes``, else at the data's shapes, else at sizes chosen for the
    dynamic dims (:func:`inhercc.data.default_shapes`, said in one warning)."""
    from inhercc.plan import rank_keeping

    m = as_model(model)
    layers = find_layers(m, include=include, exclude=exclude, min_params=min_params, rank_multiple=rank_multiple)
    feeds = as_parts(data, m)
    if feeds and grams is None:
        from inhercc.calibrate import collect_grams

        grams = collect_grams(
            m,
            [la for la in layers if la.weight is not None and la.out_features],
            feeds,
            samples=calib_samples,
            batch_size=calib_batch_size,
            progress=progress,
            source=data_label(data),
        )
    factorizer = Factorizer("whitened" if grams is not None else "svd", grams=grams)
    values, record = inspect_shapes(m, shapes, feeds)
    flops_at = layer_flops(m, values)
    rows = []
    for layer in layers:
        row: dict[str, Any] = {
            "name": layer.name,
            "op": layer.op,
            "shape": layer.shape,
            "params": layer.params,
            "flops": flops_at.get(layer.name, layer.flops),
            "full_rank": layer.full_rank * layer.groups,
            "rank90": None,
            "rank99": None,
            "reason": layer.reason,
            "subgraph": layer.subgraph,
        }
        if layer.weight is not None and layer.out_features and layer.in_features:
            s = factorizer.spectrum(layer)
            row["rank90"] = rank_keeping(s, 0.90) * layer.groups
            row["rank99"] = rank_keeping(s, 0.99) * layer.groups
        rows.append(row)
    total_flops, symbolic = fixed_shape_flops(m, values)
    return {
        "spectrum": "whitened" if grams is not None else "weight",
        "shapes": record,
        "layers": rows,
        "totals": {
            "layers": len(layers),
            "compressible": sum(1 for la in layers if la.compressible),
            "params": float_param_count(m),
            "compressible_params": sum(la.params for la in layers if la.compressible),
            "flops": total_flops,
            "symbolic_dims_counted_as_1": list(symbolic),
        },
    }


def inspect_shapes(
    model: ModelProto, shapes: Mapping[str, list[int]] | None, parts: Sequence[Feed]
) -> tuple[dict[str, list[int]] | None, dict[str, Any]]:
    """:func:`choose_shapes` (the sizes compress would use, confirmed by ONNX Runtime); when ONNX Runtime runs
    none of the sizes tried, inspect still counts, at :func:`inhercc.data.default_shapes`' first guess, and
    the warning says why."""
    try:
        return choose_shapes(model, shapes, parts)
    except InherccError as e:
        if shapes or parts:
            raise
        values, note = default_shapes(model)
        warnings.warn(f"{note}; FLOPs counted at the first guess: {e}", stacklevel=3)
        return values, {"values": values, "chosen": "default"}


def layer_flops(model: ModelProto, shapes: Mapping[str, list[int]] | None) -> dict[str, int]:
    """FLOPs per sample of every MatMul/Gemm/Conv node (by name) with the inputs fixed at ``shapes``; empty
    without shapes (the layers' own counts, symbolic dims as 1, stand)."""
    if not shapes:
        return {}
    fixed = with_fixed_inputs(model, shapes)
    known = tensor_shapes(fixed)
    out = {}
    for node in fixed.graph.node:
        f = family_for(node.op_type).flops(node, known) if node.op_type in FAMILIES else None
        if f is not None:
            out[node.name] = f[0]
    return out
