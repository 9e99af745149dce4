"""The entry points: :func:`reskd` (rounds of residual students, the skip thresholds calibrated, the cascade
built) and :func:`reskd_file` (files to a file and its JSON report)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto

from inhercc.data import LABELS_KEY, Feed, Samples, fixed_shape_flops, open_samples, split_indices
from inhercc.errors import InherccError
from inhercc.model import as_model, float_param_count
from inhercc.options import to_dict
from inhercc.reskd.calibrate import Cascade, calibrate, scores
from inhercc.reskd.cascade import build_cascade, check_members
from inhercc.reskd.options import ResKDOptions
from inhercc.reskd.train import initial_scale, mean_cosine, train_residual, with_output_scale
from inhercc.runtime import make_session, run_session
from inhercc.verify import graph_output_kinds

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

Log = Callable[[str], None]


class ReskdWarning(UserWarning):
    """The cascade runs without skipping (an output that is not logits)."""


@dataclass
class Member:
    """One member of the cascade: its model, where it came from and what it costs."""

    model: ModelProto
    source: str  # "inherited" (made here, at ``ratio``) or "given"
    ratio: float | None = None
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResKDResult:
    """The cascade (one ONNX model), its members and the report."""

    model: ModelProto
    members: list[ModelProto]
    report: dict[str, Any]


@dataclass
class _Run:
    """What every round shares: the teacher, the data and its split, the validation outputs and labels."""

    teacher: ModelProto
    samples: Samples
    data: Any
    options: ResKDOptions
    val: Feed
    labels: np.ndarray
    reference: str  # "labels" or "teacher" (its argmax)
    teacher_val: np.ndarray
    logits: bool
    say: Log


def member_outputs(
    model: ModelProto | InferenceSession, feeds: Mapping[str, np.ndarray], batch_size: int | None = None
) -> np.ndarray:
    """The one output of ``model`` (or its session, made once by a caller that runs it often) on ``feeds`` (ONNX
    Runtime, in batches)."""
    sess = make_session(model) if isinstance(model, ModelProto) else model
    names = {i.name for i in sess.get_inputs()}
    return run_session(sess, {k: v for k, v in feeds.items() if k in names}, batch_size, "running a member")[0]


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (%) of [rows, classes] outputs (other outputs flattened per row)."""
    return float((outputs.reshape(len(outputs), -1).argmax(-1) == labels).mean() * 100)


def _score(run: _Run, outputs: np.ndarray) -> float:
    """How good summed outputs are on the validation split: top-1 accuracy (%) of logits, else (embeddings,
    regression, probabilities) the mean cosine to the teacher's outputs."""
    return _accuracy(outputs, run.labels) if run.logits else mean_cosine(outputs, run.teacher_val)


def _open(teacher: ModelProto, data: Any, options: ResKDOptions, say: Log) -> _Run:
    """The data opened once, the validation split (distillation's: same fraction, same seed) and its outputs."""
    cfg = options.distill
    samples = open_samples(data, teacher, synthetic=cfg.synthetic_samples, seed=cfg.seed)
    if not cfg.val_split > 0:
        raise InherccError("ResKD calibrates and stops on the validation split: `distill.val_split` must be > 0")
    _, val_idx = split_indices(len(samples), cfg.val_split, cfg.seed)
    val = samples.gather(val_idx)
    teacher_val = member_outputs(teacher, val, cfg.batch_size)
    out = teacher.graph.output[0].name
    kind = graph_output_kinds(teacher, cfg.output_kinds)[out]
    logits = kind == "logits" and teacher_val.ndim == 2
    if samples.labels and logits:
        labels, reference = np.asarray(val[LABELS_KEY]).reshape(-1), "labels"
    else:
        labels, reference = teacher_val.reshape(len(teacher_val), -1).argmax(-1), "teacher"
    say(f"validation: {len(val_idx)} samples, accuracy against the {reference}")
    return _Run(teacher, samples, data, options, val, labels, reference, teacher_val, logits, say)


def _check_target(run: _Run) -> None:
    """Skipping needs class logits [batch, classes]: otherwise a given target is an error, else a warning."""
    if run.logits or not run.options.skip:
        return
    o = run.options
    out = run.teacher.graph.output[0].name
    for name, value in (("max_drop", o.max_drop), ("target_flops", o.target_flops)):
        if value is not None:
            raise InherccError(
                f"`reskd.{name}` needs a classification output (logits [batch, classes]); {out} is not one"
            )
    warnings.warn(
        f"output {out} is not class logits [batch, classes]: the cascade runs every member on every sample "
        "(no skipping)",
        ReskdWarning,
        stacklevel=3,
    )


def _round0(run: _Run, student: ModelProto | None) -> Member:
    """Round 0: the given student, or an inherited one (compress at ``student_ratio`` and distil)."""
    if student is not None:
        return Member(student, "given")
    from inhercc.distill import DEFAULT_EPOCHS

    o, cfg = run.options, run.options.distill
    epochs = cfg.epochs if cfg.epochs is not None or cfg.steps is not None else DEFAULT_EPOCHS
    train = replace(cfg, epochs=epochs, output_kinds=dict(cfg.output_kinds))
    run.say(f"round 0: the student at ratio {o.student_ratio}")
    result = _compress(run, "student_ratio", o.student_ratio, output_kinds=train.output_kinds, distill=train)
    return Member(result.model, "inherited", o.student_ratio, result.report.get("training", {}))


def _compress(run: _Run, field: str, ratio: float, **kw: Any) -> Any:
    """``compress`` of the teacher at ``ratio`` (ResKD's allocation and rank multiple, recipe keywords ``kw``).
    Without a rank multiple given, a ratio below the smallest plan at compress's default multiple is retried at
    multiple 1 (small res-students need it; the log says so); below every plan, an error naming the ResKD option
    that set the ratio (``field``)."""
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe

    o, cfg = run.options, run.options.distill
    multiples = [o.rank_multiple] if o.rank_multiple is not None else [None, 1]
    for multiple in multiples:
        recipe = Recipe.of(ratio=ratio, allocation=o.allocation, rank_multiple=multiple, verify=False, seed=cfg.seed,
                           threads=cfg.threads, **kw)  # fmt: skip
        try:
            return compress(run.teacher, recipe, run.data)
        except InherccError as e:
            if "`plan.ratio`" not in str(e):
                raise
            error = str(e).replace("`plan.ratio`", f"`reskd.{field}`")
            if multiple is None:
                run.say(f"`reskd.{field}` {ratio}: below the smallest plan at the default rank multiple; trying 1")
    hint = "" if multiples[-1] == 1 else "; a smaller `reskd.rank_multiple` allows smaller ratios"
    raise InherccError(error + hint)


def _inherited(run: _Run, ratio: float) -> ModelProto:
    """An inherited copy of the teacher at ``ratio`` (no distillation: the round trains it)."""
    return _compress(run, "res_ratios", ratio).model


def _scaled(run: _Run, members: Sequence[Member], model: ModelProto, focus: Feed | None) -> ModelProto:
    """The new res-student with its output scaled to fit the residual of ``members`` on training samples (the
    first 512 it trains on)."""
    cfg = run.options.distill
    if focus is None:
        train_idx, _ = split_indices(len(run.samples), cfg.val_split, cfg.seed)
        feeds = run.samples.gather(train_idx[: min(len(train_idx), 512)])
    else:
        feeds = {k: v[:512] for k, v in focus.items()}
    batch = cfg.batch_size
    teacher = member_outputs(run.teacher, feeds, batch)
    prefix = [member_outputs(m.model, feeds, batch) for m in members]
    scale = initial_scale(teacher, prefix, member_outputs(model, feeds, batch), run.logits)
    return with_output_scale(model, scale)


FOCUS_CHUNK = 4096  # training samples scored per ONNX Runtime call when choosing a round's focus


def _focus(run: _Run, members: Sequence[Member]) -> Feed | None:
    """The samples the next res-student trains on: None (all of them) unless ``res_focus`` < 1 and the output is
    class logits; else the ``res_focus`` fraction of the training samples (the validation split left
    out) whose prefix sum scores lowest under the skip rule — the rows that reach the new member once it skips."""
    o, cfg = run.options, run.options.distill
    if o.res_focus >= 1 or not run.logits:
        return None
    train_idx, _ = split_indices(len(run.samples), cfg.val_split, cfg.seed)
    sessions = [make_session(m.model) for m in members]
    order, score = [], []
    for idx, feeds in run.samples.batches(train_idx, FOCUS_CHUNK):
        total = sum(member_outputs(s, feeds, cfg.batch_size) for s in sessions)
        order.append(np.asarray(idx))
        score.append(scores(np.asarray(total).reshape(len(idx), -1), o.skip_rule))
    keep = max(1, round(o.res_focus * len(train_idx)))
    chosen = np.concatenate(order)[np.argsort(np.concatenate(score), kind="stable")[:keep]]
    return run.samples.gather(np.sort(chosen))


def _rounds(
    run: _Run, first: Member, given: Sequence[ModelProto], copies: Sequence[tuple[float, ModelProto]]
) -> tuple[list[Member], list[dict[str, Any]]]:
    """The members: round 0, the given res-students, then one res-student per inherited ``(ratio, copy)``, trained,
    while each round gains at least ``min_gain`` validation accuracy points (a round below it is dropped, and the
    rounds stop)."""
    o, cfg = run.options, run.options.distill
    members = [first] + [Member(m, "given") for m in given]
    rounds: list[dict[str, Any]] = []
    metric = "accuracy" if run.logits else "cosine"
    before = _score(run, _sum_val(run, members))
    for ratio, copy in copies:
        i = len(members)
        run.say(f"round {i}: a res-student at ratio {ratio}")
        focus = _focus(run, members)
        new = _scaled(run, members, copy, focus)
        model, training = train_residual(
            [m.model for m in members] + [new],
            run.teacher,
            run.samples if focus is None else focus,
            cfg,
            logits=run.logits,
            weight=o.residual_weight,
        )
        member = Member(model, "inherited", ratio, training)
        after = _score(run, _sum_val(run, [*members, member]))
        # min_gain is in accuracy points; a non-logit output runs every member on every sample: a round must help
        kept = after - before >= o.min_gain if run.logits else after > before
        rounds.append(
            {"member": i, "ratio": ratio, "trained_on": training.get("train_samples"), f"{metric}_before": before,
             metric: after, "kept": kept}
        )  # fmt: skip
        if not kept:  # its training is nowhere else in the report
            rounds[-1]["training"] = training
        form = "{:.2f}" if run.logits else "{:.4f}"
        change = f"{form.format(before)} → {form.format(after)}"
        run.say(f"round {i}: validation {metric} {change}" + ("" if kept else ", dropped"))
        if not kept:
            break
        members.append(member)
        before = after
    return members, rounds


def _sum_val(run: _Run, members: Sequence[Member]) -> np.ndarray:
    """The summed output of ``members`` on the validation split."""
    return np.sum([member_outputs(m.model, run.val, run.options.distill.batch_size) for m in members], axis=0)


def _per_sample_shapes(feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: [1, *v.shape[1:]] for k, v in feeds.items() if k != LABELS_KEY}


def _calibrated(run: _Run, members: Sequence[Member]) -> tuple[Cascade, list[float] | None]:
    """The cascade's validation statistics and thresholds (None: no skipping)."""
    shapes = _per_sample_shapes(run.val)
    flops = [fixed_shape_flops(m.model, shapes)[0] for m in members]
    teacher_flops = fixed_shape_flops(run.teacher, shapes)[0]
    outputs = [member_outputs(m.model, run.val, run.options.distill.batch_size) for m in members]
    if not run.logits:
        outputs = [o.reshape(len(o), -1) for o in outputs]
    cascade = Cascade.of(outputs, run.labels, flops, teacher_flops, run.options.skip_rule)
    skipping = run.logits and run.options.skip and len(members) > 1
    thresholds = calibrate(cascade, **run.options.target()) if skipping else None
    return cascade, thresholds


def reskd(
    teacher: ModelProto | str | os.PathLike[str],
    options: ResKDOptions | None = None,
    data: Any = None,
    *,
    student: ModelProto | str | os.PathLike[str] | None = None,
    res_students: Sequence[ModelProto | str | os.PathLike[str]] = (),
    log: Log | None = None,
) -> ResKDResult:
    """A ResKD cascade of ``teacher`` on ``data`` (any source :func:`inhercc.data.open_samples` takes; its
    ``_labels`` score accuracy, else the teacher's predictions do): round 0's student (``student``, or inherited
    at ``options.student_ratio`` and distilled), the ``res_students`` given, then one res-student per
    ``options.res_ratios`` trained on the residual; the skip thresholds calibrated on the validation split to
    ``options.max_drop`` or ``options.target_flops``. Paths in ``options.student`` / ``res_students`` are used
    when the keywords are not given."""
    options = options or ResKDOptions()
    options.check()
    options.distill.check()
    if options.distill.checkpoint is not None:
        raise InherccError("`distill.checkpoint` is not supported by ResKD's rounds")
    say = log or (lambda _m: None)
    teacher_model = as_model(teacher)
    given_student = student if student is not None else options.student
    given = [as_model(m) for m in (res_students or options.res_students)]
    first = as_model(given_student) if given_student is not None else None
    check_members([m for m in [first, *given] if m is not None], teacher_model)
    run = _open(teacher_model, data, options, say)
    _check_target(run)
    # the res-students' inherited copies first: a ratio too small fails before any training
    copies = [(r, _inherited(run, r)) for r in options.ratios(len(given))]
    members, rounds = _rounds(run, _round0(run, first), given, copies)
    cascade, thresholds = _calibrated(run, members)
    model = build_cascade([m.model for m in members], thresholds, options.skip_rule, reference=teacher_model)
    report = _report(run, members, rounds, cascade, thresholds)
    onnx_key = "cascade_accuracy_onnx" if run.logits else "cascade_cosine_onnx"
    report["validation"][onnx_key] = _score(run, member_outputs(model, run.val))
    return ResKDResult(model, [m.model for m in members], report)


def _report(
    run: _Run, members: Sequence[Member], rounds: list[dict[str, Any]], cascade: Cascade, thresholds: list[float] | None
) -> dict[str, Any]:
    """Per member its params and FLOPs; the thresholds; each prefix's accuracy; the fraction reaching each
    member and the expected FLOPs per sample."""
    measured = cascade.measure(thresholds if thresholds is not None else [float("inf")] * (cascade.members - 1))
    rows = [
        {
            "name": "S0" if i == 0 else f"R{i}",
            "source": m.source,
            "ratio": m.ratio,
            "params": float_param_count(m.model),
            "flops": float(cascade.flops[i]),
            "reach": measured["reach"][i],  # type: ignore[index]
            "training": m.training,
        }
        for i, m in enumerate(members)
    ]
    skip = {"enabled": thresholds is not None, "rule": run.options.skip_rule, "thresholds": thresholds}
    if thresholds is not None:
        skip["target"] = run.options.target()
    elif not run.logits:
        skip["note"] = "the output is not class logits: every member runs on every sample"
    validation = {
        "samples": int(len(run.labels)),
        "reference": run.reference,
        "teacher_accuracy": _accuracy(run.teacher_val, run.labels) if run.logits else None,
        "prefix_accuracy": cascade.prefix_accuracy() if run.logits else None,
        "prefix_cosine": None if run.logits else _prefix_cosines(run, members),
        "accuracy": measured["accuracy"] if run.logits else None,
        "expected_flops": measured["expected_flops"],
        "flops_fraction": measured["flops_fraction"],
    }
    teacher = {"params": float_param_count(run.teacher), "flops": cascade.teacher_flops}
    options = to_dict(run.options)
    return {
        "teacher": teacher,
        "members": rows,
        "rounds": rounds,
        "skip": skip,
        "validation": validation,
        "options": options,
    }


def _prefix_cosines(run: _Run, members: Sequence[Member]) -> list[float]:
    """The mean cosine to the teacher of each prefix sum of the members (a non-logit output's prefix scores)."""
    outs = [member_outputs(m.model, run.val, run.options.distill.batch_size) for m in members]
    return [_score(run, np.sum(outs[: k + 1], axis=0)) for k in range(len(outs))]


def report_path_for(output: str | os.PathLike[str]) -> Path:
    """The report beside the cascade: ``cascade.onnx`` → ``cascade.json``."""
    return Path(output).with_suffix(".json")


def reskd_file(
    teacher_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: ResKDOptions | None = None,
    data: Any = None,
    *,
    report_path: str | os.PathLike[str] | None = None,
    log: Log | None = None,
) -> ResKDResult:
    """:func:`reskd` from files to a file: paths checked before any work, the cascade and its JSON report
    (default: beside it, ``.json``) written atomically, never over an input."""
    from inhercc.files import check_paths, path_or_none, write_json
    from inhercc.model import save_model

    options = options or ResKDOptions()
    report_path = report_path or report_path_for(output_path)
    given = [("`reskd.student`", options.student)] + [("`reskd.res_students`", p) for p in options.res_students]
    check_paths(
        [("`teacher`", teacher_path), ("`data`", path_or_none(data)), *given],
        {"`output`": output_path, "`report`": report_path},
        models=[teacher_path, *(p for _, p in given if p is not None)],
    )
    result = reskd(teacher_path, options, data, log=log)
    save_model(result.model, output_path)
    result.report["files"] = {"teacher": str(teacher_path), "cascade": str(output_path)}
    write_json(report_path, result.report)
    return result
