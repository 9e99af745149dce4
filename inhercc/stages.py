"""The compress stages as passes: each ``stage(state) -> StageResult(state, modified, notes)``.

:data:`STAGES` is the default list — load, find layers, calibrate, measure sensitivity, plan, latency-aware
re-planning, sequential fitting, rewrite, distil, optimize, quantize, precision, verify, report — and
:func:`run_stages` the runner: it times every stage that did something (the report's ``time_s``) and says each
stage's notes on the log, so the stages themselves only work. A custom list (a stage dropped, one added) runs the
same way from Python::

    state = open_state("teacher.onnx", Recipe.of(ratio=0.3), data="calib.npz")
    state = run_stages([*STAGES[:5], my_stage, *STAGES[5:]], state)
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from onnx import ModelProto

from inhercc.data import (
    Feed,
    Samples,
    batch_axes,
    check_synthetic_memory,
    confirmed_shapes,
    fixed_shape_flops,
    input_specs,
    open_samples,
    resolve_shapes,
    sample_count,
    split_indices,
    synthetic_feeds,
    warn_synthetic,
    with_batch,
    with_fixed_inputs,
)
from inhercc.distill import distill as run_distill
from inhercc.errors import InherccError
from inhercc.factorizer import Factorizer
from inhercc.files import path_or_none
from inhercc.layers import FAMILIES, SUBGRAPH_NOTE, FactorSource, Layer, family_for, find_layers, tensor_shapes
from inhercc.model import as_model, drop_inferred_shapes, float_param_count, has_value_info, model_bytes
from inhercc.optimize import fused_counts, keep_teacher_fusions, optimize_transformer
from inhercc.passes import rewrite as rewrite_graph
from inhercc.passes import rewrite_ranks
from inhercc.passes.pack_siblings import pack_siblings
from inhercc.plan import RankPlan, apply_plan, plan_energy, plan_proportional, plan_ratio, plan_uniform
from inhercc.precision import convert_precision
from inhercc.quantize import equalize_factor_pairs, quantize_model, quantized_node_counts
from inhercc.recipe import Recipe
from inhercc.runtime import check_provider, model_fixed_batch
from inhercc.verify import graph_output_kinds, score_models

CALIBRATION_LIMIT = 4096  # samples read into memory for calibration from a streamed source


@dataclass
class CompressState:
    """Everything the stages share: the inputs (teacher, recipe, data) and what each stage adds."""

    teacher: ModelProto
    recipe: Recipe
    data: Any = None
    verify_data: Any = None
    grams: Mapping[str, np.ndarray] | None = None
    timer: Any = None  # a latency timer (layer, rank, input shape) -> (dense ms, chain ms); None: ONNX Runtime
    progress: bool = False
    say: Callable[[str], None] = lambda _msg: None
    teacher_value_info: bool = True
    samples: Samples | None = None  # the training samples (distillation)
    calibration: list[Feed] = field(default_factory=list)  # calibration samples, one feed per sample shape
    held_out: list[Feed] = field(default_factory=list)  # verification samples (model inputs only)
    data_source: str = "calibration data"
    verify_source: str = "held-out samples"
    work_shapes: dict[str, list[int]] | None = None  # FLOPs, synthetic inputs and latency timing; None: the data's
    report_shapes: dict[str, Any] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    factorizer: Factorizer | None = None
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    layer_weights: dict[str, float] | None = None
    plan: RankPlan | None = None
    factors: FactorSource | None = None
    student: ModelProto | None = None
    fp32_student: ModelProto | None = None  # the student before the quantize / precision stages converted it
    equalized: int | None = None  # factor pairs equalized for quantization (before distillation when it trains)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        return bool(self.calibration)

    def first_feeds(self) -> Feed | None:
        return self.calibration[0] if self.calibration else None


@dataclass
class StageResult:
    """The onnx-ir ``PassResult`` shape: the state after the stage, whether it changed anything, what to say."""

    state: CompressState
    modified: bool
    notes: list[str] = field(default_factory=list)


Stage = Callable[[CompressState], StageResult]


def unchanged(state: CompressState) -> StageResult:
    return StageResult(state, False)


def run_stages(stages: Sequence[Stage], state: CompressState) -> CompressState:
    """Run ``stages`` in order: each one that modified the state is timed into ``state.timings`` (by the
    stage's name) and said on ``state.say`` with its time and notes (the stages themselves only work)."""
    t0 = time.perf_counter()
    for stage in stages:
        t = time.perf_counter()
        result = stage(state)
        state = result.state
        if result.modified:
            seconds = state.timings[stage.__name__] = round(time.perf_counter() - t, 3)
            one = f": {result.notes[0]}" if len(result.notes) == 1 else ""
            state.say(f"{stage.__name__} ({seconds:.1f} s){one}")
        if len(result.notes) > 1 or not result.modified:
            for note in result.notes:
                state.say(f"  {note}")
    state.timings["total"] = round(time.perf_counter() - t0, 3)
    state.report["time_s"] = dict(state.timings)
    return state


# --- the stages -----------------------------------------------------------------------------------------------


def load(state: CompressState) -> StageResult:
    """Checks before any work (output kinds, the latency provider, input shapes), the recipe resolved against the
    data, and the data opened once: calibration samples and the held-out verification samples (:func:`holdout`)."""
    recipe, model = state.recipe, state.teacher
    graph_output_kinds(model, recipe.output_kinds)  # unknown outputs or kinds: an error before any work
    has_data = state.data is not None
    recipe = recipe.resolved(has_data)
    if recipe.latency.aware and state.timer is None:
        check_provider(recipe.latency.provider)  # a GPU that cannot run is a one-line error now, not after calibration
    state.recipe = recipe
    state.data_source = data_label(state.data, "calibration data")
    if recipe.training():
        open_training_data(state)
    else:
        open_compress_data(state)
    if state.verify_data is not None:
        state.held_out = model_inputs(model, all_parts(open_samples(state.verify_data, model)))
        state.verify_source = data_label(state.verify_data)
    else:
        state.verify_source = f"{state.data_source} (held-out samples)"
    if state.work_shapes is None and not state.report_shapes:
        parts = state.held_out or state.calibration
        state.work_shapes, state.report_shapes = choose_shapes(model, recipe.shapes, parts)
    return StageResult(state, True)


def open_compress_data(state: CompressState) -> None:
    """Without training: the calibration samples, less the held-out ones when the check runs on ``data``."""
    if state.data is None:
        return
    samples = open_samples(state.data, state.teacher)
    train_idx, held_idx = np.arange(len(samples)), np.arange(0)
    if state.verify_data is None and state.recipe.verify.enabled:
        train_idx, held_idx = holdout(len(samples), state.recipe.verify.samples, state.recipe.seed)
    state.calibration = calibration_parts(samples, train_idx)
    state.held_out = model_inputs(state.teacher, calibration_parts(samples, held_idx))


def open_training_data(state: CompressState) -> None:
    """With training: the samples distillation trains on (synthetic without data, at sizes chosen now); the
    calibration uses the training split only (the validation split of :func:`holdout` is distillation's)."""
    recipe, model, config = state.recipe, state.teacher, state.recipe.distill
    assert config is not None
    synthetic = recipe.shapes
    if state.data is None:
        state.work_shapes, state.report_shapes = choose_shapes(model, recipe.shapes, [])
        if state.work_shapes and not synthetic:
            synthetic = with_batch(model, state.work_shapes, config.synthetic_samples)
    samples = open_samples(state.data, model, shapes=synthetic, synthetic=config.synthetic_samples, seed=config.seed)
    train_idx, _ = split_indices(len(samples), config.val_split, config.seed)
    state.samples = samples
    state.calibration = [] if samples.synthetic else calibration_parts(samples, train_idx)


def find(state: CompressState) -> StageResult:
    """The candidate layers, each compressible or with the reason why not; none compressible is an error."""
    select, model = state.recipe.select, state.teacher
    layers = find_layers(
        model,
        include=select.include or None,
        exclude=select.exclude or None,
        min_params=select.min_params,
        rank_multiple=state.recipe.plan.rank_multiple or 1,
        min_saving=select.min_saving,
        allow_nonfinite=select.allow_nonfinite,
        heads=state.recipe.factors.heads,
        embeddings=select.embeddings,
    )
    fusion = state.recipe.fusion
    if fusion.optimize:  # what ONNX Runtime fuses into attention in the teacher stays dense: the student keeps it
        state.report["optimize"] = keep_teacher_fusions(model, layers, fusion.attention_heads, fusion.hidden_size)
    if not any(layer.compressible for layer in layers):
        none = "no MatMul/Gemm/Conv with a constant weight"
        found = f"{len(layers)} candidate(s), none compressible" if layers else none
        raise InherccError(f"no compressible layer in the model ({found}){skip_reason(layers)}")
    for layer in layers:  # the seed of the heads' gate
        layer.seed = state.recipe.seed
    state.layers = layers
    n = sum(1 for la in layers if la.compressible)
    return StageResult(state, True, [f"{n} of {len(layers)} candidate layer(s) compressible"])


def calibrate(state: CompressState) -> StageResult:
    """Gram matrices of the layer inputs over the calibration samples (whitened init), unless given."""
    options = state.recipe.calibration
    if state.recipe.factors.init != "whitened" or state.grams is not None:
        return unchanged(state)
    from inhercc.calibrate import collect_grams

    compressible = [la for la in state.layers if la.compressible]
    state.grams = collect_grams(
        state.teacher,
        compressible,
        state.calibration,
        samples=options.samples,
        batch_size=options.batch_size,
        progress=state.progress,
        source=state.data_source,
    )
    return StageResult(state, True, [f"Gram matrices of the inputs of {len(compressible)} layer(s)"])


def sensitivity(state: CompressState) -> StageResult:
    """The factorizer, the spectra the planner needs, and — for a ratio spread by sensitivity — each layer's
    measured effect on the outputs (:mod:`inhercc.sensitivity`)."""
    recipe = state.recipe
    state.factorizer = Factorizer(recipe.factors.init or "svd", recipe.factors.split, state.grams, recipe.seed)
    if recipe.factors.init == "whitened":  # calibration cannot tap a body's activations: those take plain SVD
        for layer in state.layers:
            layer.note = SUBGRAPH_NOTE if layer.subgraph and layer.compressible else layer.note
    if recipe.plan.file is not None or recipe.plan.rank is not None:
        return unchanged(state)
    state.spectra = state.factorizer.spectra(state.layers)
    if recipe.plan.ratio is None or recipe.plan.allocation != "sensitivity":
        return unchanged(state)
    from inhercc.sensitivity import measure_sensitivity, sensitivity_feeds, sensitivity_weights

    options = recipe.calibration
    measured = measure_sensitivity(
        state.teacher,
        state.layers,
        sensitivity_feeds(state.calibration, options.samples, axes=batch_axes(state.teacher)),  # every sample shape
        state.factorizer,
        state.spectra,
        ratio=recipe.plan.ratio,
        batch_size=options.batch_size,
        progress=state.progress,
        source=state.data_source,
    )
    state.layer_weights = sensitivity_weights(measured)
    return StageResult(state, True, [f"the effect on the outputs of {len(measured)} layer(s) measured"])


def plan(state: CompressState) -> StageResult:
    """The rank of every layer (:func:`choose_plan`); a plan that factorizes nothing is an error."""
    rank_plan = choose_plan(state.layers, state.spectra, state.recipe, state.layer_weights)
    rank_plan.method.setdefault("init", state.recipe.factors.init)
    rank_plan.method.setdefault("split", state.recipe.factors.split)
    rank_plan.method["heads"] = state.recipe.factors.heads  # this run's, also when a plan file is replayed
    if not rank_plan.factorized():
        raise InherccError("the plan factorizes no layer (every layer would stay dense)")
    state.plan = rank_plan
    return StageResult(state, True, [f"{len(rank_plan.factorized())} layer(s) planned"])


def choose_plan(
    layers: list[Layer],
    spectra: Mapping[str, np.ndarray],
    recipe: Recipe,
    layer_weights: Mapping[str, float] | None = None,
) -> RankPlan:
    """The recipe's way of choosing ranks (resolved: exactly one of ratio / rank / energy / file). A ratio is
    allocated by ``plan.allocation``: greedy over the spectra (weighted by ``layer_weights`` when given), or
    uniform."""
    options, min_saving = recipe.plan, recipe.select.min_saving
    multiple = options.rank_multiple or 1
    if options.file is not None:
        return apply_plan(layers, given_plan(options.file), min_saving=min_saving)
    if options.rank is not None:
        return plan_uniform(layers, options.rank, rank_multiple=multiple, min_saving=min_saving)
    if options.energy is not None:
        return plan_energy(layers, spectra, options.energy, rank_multiple=multiple, min_saving=min_saving)
    ratio = options.ratio if options.ratio is not None else 0.5
    if options.allocation == "uniform":
        return plan_proportional(layers, ratio, rank_multiple=multiple, min_saving=min_saving)
    spectrum = "whitened" if recipe.factors.init == "whitened" else "weight"
    return plan_ratio(
        layers,
        spectra,
        ratio,
        rank_multiple=multiple,
        min_saving=min_saving,
        spectrum=spectrum,
        layer_weights=layer_weights if options.allocation == "sensitivity" else None,
    )


def given_plan(file: Any) -> RankPlan:
    """A plan given as a RankPlan, a plan file, or a plan's dict (a replayed report of an API run)."""
    if isinstance(file, RankPlan):
        return file
    if isinstance(file, Mapping):
        return RankPlan.from_dict(file, source="`plan.file`")
    return RankPlan.load(file)


def latency(state: CompressState) -> StageResult:
    """Every planned chain timed against its dense layer on the target provider; slower ones stay dense (a ratio
    plan is re-planned so its budget still holds, :mod:`inhercc.latency`)."""
    options = state.recipe.latency
    if not options.aware:
        return unchanged(state)
    from inhercc.latency import latency_aware_plan

    assert state.plan is not None
    planned = len(state.plan.factorized())
    state.plan = latency_aware_plan(
        state.teacher,
        state.layers,
        state.plan,
        provider=options.provider,
        shapes=state.work_shapes or sample_shapes(state.first_feeds(), state.teacher),
        timer=state.timer,
        threads=state.recipe.threads,
        spectra=state.spectra,
        min_saving=state.recipe.select.min_saving,
        layer_weights=state.layer_weights,  # re-planning keeps the measured sensitivity
        log=state.say,
        ratio=state.recipe.plan.ratio,
    )
    if not state.plan.factorized():
        raise InherccError("every factor chain is slower than its dense layer on this provider: nothing to do")
    dense = len(state.plan.method["latency_aware"]["kept_dense"])
    return StageResult(state, True, [f"{planned} chain(s) timed on {options.provider}, {dense} kept dense for speed"])


def sequential(state: CompressState) -> StageResult:
    """Error-compensating factors (:func:`inhercc.calibrate.sequential_factors`): each layer fitted to the
    teacher's outputs from the student's own inputs; the factorizer's where a layer's input cannot be exposed."""
    options = state.recipe.calibration
    assert state.factorizer is not None and state.plan is not None
    state.factors = state.factorizer
    if not options.sequential:
        return unchanged(state)
    from inhercc.calibrate import sequential_factors

    model, layers, planned, factorizer = state.teacher, state.layers, state.plan, state.factorizer

    def build(done: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> ModelProto:
        return rewrite_graph(model, RankPlan({n: planned.rank(n) for n in done}), layers, lambda la, _r: done[la.name])

    compensated = sequential_factors(
        model,
        layers,
        planned.factorized(),
        state.calibration,
        build,
        split=factorizer.split,
        samples=options.samples,
        batch_size=options.batch_size,
        progress=state.progress,
        source=state.data_source,
    )

    def chosen(layer: Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return compensated[layer.name] if layer.name in compensated else factorizer(layer, rank)

    state.factors = chosen
    planned.method["sequential"] = True
    return StageResult(state, True, [f"{len(compensated)} layer(s) fitted on the student's own inputs"])


def rewrite(state: CompressState) -> StageResult:
    """The student: every planned layer replaced by its factor chain (:func:`inhercc.passes.rewrite`)."""
    assert state.plan is not None and state.factors is not None and state.factorizer is not None
    result = rewrite_ranks(state.teacher, state.plan.factorized(), state.layers, state.factors)
    state.student = result.model
    state.factorizer.release()
    return StageResult(state, result.modified, result.notes)


def distil(state: CompressState) -> StageResult:
    """Fine-tune the student from the teacher (:func:`inhercc.distill.distill`) on the training samples; with
    ``verify_data``, score it there too (``fidelity_verify_data``)."""
    config = state.recipe.distill
    if config is None:
        return unchanged(state)
    assert state.student is not None
    # trained through the quantized bottlenecks: equalized first, so the fake quantization meets the ranges ORT will
    if state.recipe.quantization.quantize is not None:
        state.student, state.equalized = equalize_student(state)
    tuned = run_distill(state.student, state.teacher, state.samples, config=config, shapes=state.recipe.shapes)
    state.student = tuned.model
    state.report.update(tuned.report)
    if state.held_out and state.recipe.verify.enabled:
        scores = score_models(
            state.teacher,
            state.student,
            state.held_out,
            source=state.verify_source,
            output_kinds=state.recipe.output_kinds,
        )
        state.report.update(scores.report("fidelity_verify_data"))
    return StageResult(state, True, ["the student distilled from the teacher"])


def optimize(state: CompressState) -> StageResult:
    """Sibling input factors packed into one MatMul (:func:`inhercc.passes.pack_siblings.pack_siblings`), then
    ONNX Runtime's transformer optimizer on the student (:func:`inhercc.optimize.optimize_transformer`); the fused
    nodes of both models in the report (``optimize``)."""
    fusion, notes = state.recipe.fusion, []
    if not fusion.optimize and not fusion.pack:
        return unchanged(state)
    assert state.student is not None
    if fusion.pack:
        if state.recipe.quantization.quantize is not None and state.equalized is None:
            # equalized while each pair is still a MatMul → MatMul chain: a packed input factor feeds a Split
            state.student, state.equalized = equalize_student(state)
        packed = pack_siblings(state.student)  # in place, as passes are: the stage's own student
        state.student, notes = packed.model, notes + packed.notes
    if fusion.optimize:
        state.student = optimize_transformer(state.student, fusion.attention_heads, fusion.hidden_size)
        record = state.report.setdefault("optimize", {})
        record["student"] = fused_counts(state.student)
        teacher, student = record.get("teacher", {}), record["student"]
        notes.append(f"fused: teacher {teacher or 'none'}, student {student or 'none'}")
    return StageResult(state, True, notes)


def quantize(state: CompressState) -> StageResult:
    """The student quantized to INT8 by ONNX Runtime (:func:`inhercc.quantize.quantize_model`): dynamic, or static
    QDQ with activation ranges calibrated on the calibration samples, after its factor pairs are equalized across
    their bottlenecks (:func:`inhercc.quantize.equalize_factor_pairs`); the fp32 student kept for the check."""
    options, calibration = state.recipe.quantization, state.recipe.calibration
    if options.quantize is None:
        return unchanged(state)
    assert state.student is not None
    before = state.fp32_student = state.fp32_student or state.student
    equalized, pairs = (state.student, state.equalized) if state.equalized is not None else equalize_student(state)
    state.student = quantize_model(
        equalized,
        options.quantize,
        per_channel=options.per_channel,
        calibration=state.calibration,
        samples=calibration.samples,
        batch_size=calibration.batch_size,
    )
    nodes = quantized_node_counts(state.student)
    size = {"fp32": model_bytes(before), "quantized": model_bytes(state.student)}
    state.report["quantization"] = {
        "mode": options.quantize,
        "per_channel": options.per_channel,
        "equalized_pairs": pairs,
        "nodes": nodes,
        "size": size,
    }
    counts = ", ".join(f"{n} {op}" for op, n in nodes.items())
    return StageResult(state, True, [f"{options.quantize}: {counts}; {size['fp32']:,} → {size['quantized']:,} bytes"])


def equalize_student(state: CompressState) -> tuple[ModelProto, int]:
    """The student's factor pairs equalized across their bottlenecks (:func:`inhercc.quantize.equalize_factor_pairs`,
    the function unchanged) on the calibration samples when there are any, and how many pairs."""
    assert state.student is not None
    options = state.recipe.calibration
    return equalize_factor_pairs(state.student, state.calibration, options.samples, options.batch_size)


def precision(state: CompressState) -> StageResult:
    """The student stored in float16 (:func:`inhercc.precision.convert_precision`: sensitive ops kept float32);
    the fp32 student kept for the check."""
    chosen = state.recipe.quantization.precision
    if chosen == "fp32":
        return unchanged(state)
    assert state.student is not None
    state.fp32_student = state.fp32_student or state.student
    state.student = convert_precision(state.student, chosen)
    state.report["precision"] = chosen
    return StageResult(state, True, [f"the student stored in {chosen}"])


def verify(state: CompressState) -> StageResult:
    """Teacher against student in ONNX Runtime on the held-out samples, else on synthetic inputs (after
    distillation its own validation split has scored the student). A student the quantize / precision stages
    converted is scored as written, beside the fp32 student before them (``fidelity_fp32``)."""
    recipe = state.recipe
    if not recipe.verify.enabled or (recipe.training() and state.fp32_student is None):
        return unchanged(state)
    assert state.student is not None
    if recipe.training():
        return verify_converted_training(state)
    feeds = state.held_out
    if not feeds:
        n = recipe.verify.samples
        shapes = recipe.shapes or (with_batch(state.teacher, state.work_shapes, n) if state.work_shapes else None)
        warn_synthetic("verification")
        feeds = [synthetic_feeds(state.teacher, shapes, batch=n, seed=recipe.seed)]
    source = state.verify_source if state.held_out else "synthetic inputs"
    scores = score_models(state.teacher, state.student, feeds, source=source, output_kinds=recipe.output_kinds)
    state.report.update(scores.report())
    state.report["fidelity_inputs"] = "data" if state.held_out else "synthetic"
    if state.fp32_student is not None:
        state.report.update(score_fp32(state, feeds, source, "fidelity_fp32"))
    return StageResult(state, True, [f"teacher and student compared in ONNX Runtime on {source}"])


def verify_converted_training(state: CompressState) -> StageResult:
    """After distillation and a conversion: the written student scored on distillation's evaluation samples (its
    ``fidelity``; the fp32 student's becomes ``fidelity_fp32``), and on ``verify_data`` when given."""
    assert state.samples is not None and state.recipe.distill is not None
    recipe, samples = state.recipe, state.samples
    train_idx, val_idx = split_indices(len(samples), recipe.distill.val_split, recipe.seed)
    feeds = model_inputs(state.teacher, calibration_parts(samples, val_idx if len(val_idx) else train_idx))
    source = "the validation split"
    state.report["fidelity_fp32"] = state.report.get("fidelity")
    kinds = recipe.output_kinds
    state.report.update(score_models(state.teacher, state.student, feeds, source=source, output_kinds=kinds).report())
    if state.held_out:
        state.report["fidelity_verify_data_fp32"] = state.report.get("fidelity_verify_data")
        scores = score_models(
            state.teacher, state.student, state.held_out, source=state.verify_source, output_kinds=recipe.output_kinds
        )
        state.report.update(scores.report("fidelity_verify_data"))
    return StageResult(state, True, [f"the converted student compared in ONNX Runtime on {source}"])


def score_fp32(state: CompressState, feeds: list[Feed], source: str, key: str) -> dict[str, Any]:
    """The fp32 student's fidelity (before the quantize / precision stages) as ``{key: metrics}``."""
    assert state.fp32_student is not None
    kinds = state.recipe.output_kinds
    return {key: score_models(state.teacher, state.fp32_student, feeds, source=source, output_kinds=kinds).fidelity()}


def report(state: CompressState) -> StageResult:
    """Params / FLOPs / size / per-layer table, the resolved recipe (replayable); the student's graph shipped as
    plain as the teacher's came (no inferred shapes when it had none)."""
    assert state.student is not None and state.plan is not None
    largest = largest_part(state.held_out, state.teacher)
    shapes = state.work_shapes or sample_shapes(largest, state.teacher)
    # a quantized student's weights are int8 and its products MatMulInteger: params and FLOPs are the fp32 one's
    counted = state.fp32_student or state.student
    base = build_report(state.teacher, counted, state.layers, state.plan, shapes, written=state.student)
    base["init"] = state.recipe.factors.init
    base["shapes"] = state.report_shapes
    base["recipe"] = state.recipe.to_dict()
    state.report = {**base, **state.report}
    if not state.teacher_value_info:
        # Inferred shapes are ours, not the teacher's: with them ONNX Runtime's CPU provider fused
        # Add+Add+LayerNorm into a SkipLayerNormalization 4.6× slower than the separate ops (MiniLM, batch
        # 32×128), costing the student 0.04 of its latency ratio. Ship the graph as plain as it came.
        del state.student.graph.value_info[:]
        drop_inferred_shapes(state.student)
    return StageResult(state, True)


STAGES: tuple[Stage, ...] = (
    load,
    find,
    calibrate,
    sensitivity,
    plan,
    latency,
    sequential,
    rewrite,
    distil,
    optimize,
    quantize,
    precision,
    verify,
    report,
)


def open_state(
    teacher: ModelProto | str,
    recipe: Recipe,
    data: Any = None,
    verify_data: Any = None,
    **runtime: Any,
) -> CompressState:
    """The state the stages start from: the teacher loaded (its own value_info noted), nothing else done."""
    value_info = has_value_info(teacher)
    return CompressState(as_model(teacher), recipe, data, verify_data, teacher_value_info=value_info, **runtime)


# --- helpers of the stages ------------------------------------------------------------------------------------


def holdout(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one hold-out rule (:func:`inhercc.data.split_indices`): a seeded random ``count`` samples are held out
    for the check when at least as many remain; otherwise both are every sample (a warning says so)."""
    if n < 2 * count:
        warnings.warn(
            f"only {n} calibration samples, fewer than twice `verify.samples` {count}: the fidelity check "
            "reuses the calibration samples (pass `verify_data`, or a lower `verify.samples`)",
            stacklevel=3,
        )
        return np.arange(n), np.arange(n)
    return split_indices(n, count, seed)


def data_label(data: Any, default: str = "data") -> str:
    """How errors name a data source: its path, else ``default``."""
    path = path_or_none(data)
    return default if path is None else str(path)


def calibration_parts(samples: Samples, indices: np.ndarray) -> list[Feed]:
    """The first ``CALIBRATION_LIMIT`` of the given samples, one feed dict per sample shape (shards of a
    folder may differ in, say, sequence length)."""
    return [feeds for _, feeds in samples.batches(indices[:CALIBRATION_LIMIT], CALIBRATION_LIMIT)]


def all_parts(samples: Samples) -> list[Feed]:
    return calibration_parts(samples, np.arange(len(samples)))


def model_inputs(model: ModelProto, parts: Sequence[Feed]) -> list[Feed]:
    """The parts with only the model's inputs (no ``_labels``)."""
    names = {s.name for s in input_specs(model)}
    return [{k: v for k, v in feeds.items() if k in names} for feeds in parts if feeds]


def largest_part(parts: Sequence[Feed], model: ModelProto) -> Feed | None:
    return max(parts, key=lambda f: sample_count(f, batch_axes(model))) if parts else None


def skip_reason(layers: Sequence[Layer]) -> str:
    """Why none of ``layers`` is compressible: the most common reason, with a count and an example."""
    skipped = [la for la in layers if la.reason]
    if not skipped:
        return ""
    kind, n = Counter(la.reason.split(" (")[0] for la in skipped).most_common(1)[0]
    example = next(la for la in skipped if la.reason.split(" (")[0] == kind)
    return f"; main reason ({n} of {len(layers)} layers, e.g. {example.name}): {example.reason}"


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
        return None, {"values": sample_shapes(largest_part(parts, model), model), "chosen": "data"}
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
    written: ModelProto | None = None,
) -> dict[str, Any]:
    """Params / FLOPs / size of both models and the per-layer table; ``written``: the file's model when it is
    not ``student`` (a quantized one: its size, ``student``'s params and FLOPs)."""
    ft, sym = fixed_shape_flops(teacher, shapes)
    fs, _ = fixed_shape_flops(student, shapes)
    flops_at = layer_flops(teacher, shapes)
    rows = [layer_row(replace(la, flops=flops_at.get(la.name, la.flops)), plan) for la in layers]
    return {
        "params": {"teacher": float_param_count(teacher), "student": float_param_count(student)},
        "flops": {"teacher": int(ft), "student": int(fs), "symbolic_dims_counted_as_1": list(sym)},
        "size": {"teacher": model_bytes(teacher), "student": model_bytes(written or student)},
        "plan": plan.method,
        "layers": rows,
    }


def layer_row(layer: Layer, plan: RankPlan) -> dict[str, Any]:
    """One layer of the report: its rank, params and FLOPs before and after, the reason when it stays dense."""
    r = plan.rank(layer.name)
    return {
        "name": layer.name,
        "op": layer.op,
        "shape": layer.shape,
        "rank": r,
        "heads": layer.heads if r is not None else None,
        "params_before": layer.params,
        "params_after": layer.factor_params(r) + layer.bias_params if r is not None else layer.params,
        "flops_before": layer.flops,
        "flops_after": layer.factor_flops(r) if r is not None else layer.flops,
        "reason": None if r is not None else plan.reasons.get(layer.name, layer.reason),
        "note": layer.note if r is not None else None,
        "subgraph": layer.subgraph,
    }


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
