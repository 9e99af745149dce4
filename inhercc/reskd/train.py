"""Training a res-student on the residual ``z_T − (z_S0 + Σ_{j<i} z_Rj)`` with the existing distillation.

The earlier members and the new res-student ``R`` are merged into one graph summing their outputs (the cascade
without skipping, :func:`inhercc.reskd.cascade.build_cascade`) and that graph is distilled from the teacher with
only ``R``'s initializers trained. The loss, on the summed output: KD (and CE on labels) — and, on a copy of it,
the relative MSE to the teacher's output, which with the earlier members frozen *is* the residual MSE
``‖z_R − (z_T − z_prefix)‖²`` (divided by the constant ``mean(z_T²)``) — plus the embedding loss's cosine term.

``R`` (an inherited copy of the teacher) starts out close to the teacher, not to the residual: its output is
multiplied by a per-class scale, set to the least-squares fit of its outputs to the residual before training
(or to zero when that fit would lower the sum's agreement with the teacher, :func:`initial_scale`) and trained
with it (``reskd.residual_scale``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from inhercc.data import Samples
from inhercc.distill import DEFAULT_EPOCHS, DistillConfig, distill
from inhercc.errors import InherccError
from inhercc.reskd.cascade import build_cascade, member_prefix

SCALE = "reskd.residual_scale"
RESIDUAL_SUFFIX = ".residual"  # the copy of the summed output that carries the residual MSE in training
FACTOR_RE = r".*\.inherit_(in|out|gate)(_\d+)?$"


def residual_target(teacher: np.ndarray, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """What the next res-student learns: the teacher's output minus the sum of the members' so far."""
    target = np.asarray(teacher, np.float64).copy()
    for z in outputs:
        target -= np.asarray(z, np.float64)
    return target


def least_squares_scale(outputs: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Per class (last axis) the ``s`` minimizing ``‖s·z − r‖²`` over every row: ``Σ z·r / Σ z²`` (0 where
    the res-student's output is all zero)."""
    z = np.asarray(outputs, np.float64).reshape(-1, outputs.shape[-1])
    r = np.asarray(residual, np.float64).reshape(-1, outputs.shape[-1])
    den = (z * z).sum(0)
    return np.where(den > 0, (z * r).sum(0) / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)


def initial_scale(teacher: np.ndarray, members: Sequence[np.ndarray], outputs: np.ndarray, logits: bool) -> np.ndarray:
    """The res-student's starting output scale: the least-squares fit of its ``outputs`` to the residual of
    ``members`` — unless the fitted sum is less faithful to the teacher than the members' sum alone (logits: it
    agrees with the teacher's predictions less often; other outputs: its mean cosine to the teacher is lower): a
    poor inherited copy fits the residual with wild per-class scales. Then zero, so the round starts from the
    members' sum (measured on MNIST: 91.05 % → 73.5 % at the fit, → 91.4 % trained from 0)."""
    prefix = np.sum(members, axis=0)
    scale = least_squares_scale(outputs, residual_target(teacher, members))
    fitted = prefix + outputs * scale
    if logits:
        target = teacher.argmax(-1)
        worse = (fitted.argmax(-1) == target).mean() < (prefix.argmax(-1) == target).mean()
    else:
        worse = mean_cosine(fitted, teacher) < mean_cosine(prefix, teacher)
    return np.zeros_like(scale) if worse else scale


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The mean over rows of the cosine between flattened rows of ``a`` and the reference ``b`` (verification's
    definition)."""
    from inhercc.verify import output_fidelity

    return float(output_fidelity(np.asarray(b, np.float32), np.asarray(a, np.float32))["cosine"])


def with_output_scale(member: ModelProto, scale: np.ndarray) -> ModelProto:
    """The member with its output multiplied by ``scale`` (an initializer, :data:`SCALE`); the output keeps
    its name."""
    out = ModelProto()
    out.CopyFrom(member)
    name = out.graph.output[0].name
    raw = f"{SCALE}.input"
    for node in out.graph.node:
        node.output[:] = [raw if o == name else o for o in node.output]
        node.input[:] = [raw if i == name else i for i in node.input]
    out.graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32), SCALE))
    out.graph.node.append(helper.make_node("Mul", [raw, SCALE], [name], name=SCALE))
    return out


def with_residual_output(model: ModelProto) -> ModelProto:
    """The model with a second output, a copy of its one output (:data:`RESIDUAL_SUFFIX`), so that the
    distillation can put a second loss on it."""
    out = ModelProto()
    out.CopyFrom(model)
    name = out.graph.output[0].name
    copy = out.graph.output.add()
    copy.CopyFrom(out.graph.output[0])
    copy.name = name + RESIDUAL_SUFFIX
    out.graph.node.append(helper.make_node("Identity", [name], [copy.name], name=copy.name))
    return out


def trainable_pattern(i: int, train: str) -> str:
    """The regex of member ``i``'s initializers in the merged graph that train: its factors and scale
    (``factors``), all of it (``all``), or the user's regex over its own names."""
    p = re.escape(member_prefix(i))
    if train == "factors":
        return f"^{p}({FACTOR_RE}|{re.escape(SCALE)}$)"
    if train == "all":
        return f"^{p}"
    return f"^{p}.*(?:{train})"


def member_of(merged: ModelProto, i: int, member: ModelProto) -> ModelProto:
    """``member`` with the initializers member ``i`` has in the (trained) merged graph."""
    p = member_prefix(i)
    trained = {t.name[len(p) :]: t for t in merged.graph.initializer if t.name.startswith(p)}
    out = ModelProto()
    out.CopyFrom(member)
    for t in out.graph.initializer:
        if t.name in trained:
            name = t.name
            t.CopyFrom(trained[name])
            t.name = name
    return out


def residual_config(cfg: DistillConfig, i: int, output: str, logits: bool, weight: float) -> DistillConfig:
    """Distillation settings of round ``i``: member ``i`` trained, KD (CE) on the summed logits (an embedding
    loss for other outputs) and the residual MSE at ``weight``."""
    losses = {output: ("kd" if logits else "embedding", 1.0), output + RESIDUAL_SUFFIX: ("embedding", weight)}
    epochs = cfg.epochs if cfg.epochs is not None or cfg.steps is not None else DEFAULT_EPOCHS
    kinds = {k: v for k, v in cfg.output_kinds.items() if k == output}
    return replace(cfg, train=trainable_pattern(i, cfg.train), losses=losses, epochs=epochs, output_kinds=kinds)


def train_residual(
    members: Sequence[ModelProto],
    teacher: ModelProto,
    samples: Samples,
    cfg: DistillConfig,
    *,
    logits: bool,
    weight: float,
    log: Callable[[str], None] | None = None,
) -> tuple[ModelProto, dict[str, Any]]:
    """The last of ``members`` trained on the residual of the earlier ones (frozen); its training report."""
    i = len(members) - 1
    if i < 1:
        raise InherccError("a res-student trains after a student: give at least two members")
    merged = with_residual_output(build_cascade(members, reference=teacher))
    target = with_residual_output(teacher)
    config = residual_config(cfg, i, teacher.graph.output[0].name, logits, weight)
    result = distill(merged, target, samples, config=config, log=log)
    return member_of(result.model, i, members[i]), result.report.get("training", {})
