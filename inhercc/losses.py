"""Distillation losses: knowledge distillation on logits, MSE + cosine on embeddings, cross-entropy on
labels and the feature inheritance loss, combined per graph output into one objective."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inhercc.errors import InherccError
from inhercc.verify import name_kind, token_mask

LOSS_KINDS = ("kd", "probs", "embedding", "none")
# the loss of each output kind (inhercc.verify.graph_output_kinds): KD with a temperature for logits only
LOSS_OF_KIND = {"logits": "kd", "probs": "probs", "embedding": "embedding", "values": "embedding", "integer": "none"}
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.3
_EPS = 1e-12
_PROB_EPS = 1e-7


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last axis, averaged over all other
    positions (Hinton et al.; the T² keeps gradient magnitudes independent of T)."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1).reshape(-1, student.shape[-1])
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1).reshape(-1, teacher.shape[-1])
    return t * t * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean((s − t)²) / mean(t²)``: MSE made independent of the tensor's scale, so that outputs and layers
    of very different magnitudes weigh alike. ``weight`` (broadcast to the tensors, e.g. a 0/1 token mask):
    ``Σ w·(s − t)² / Σ w·t²``, the positions with weight 0 left out."""
    s, t = student.float(), teacher.float()
    if weight is None:
        return ((s - t) ** 2).mean() / (t.pow(2).mean() + _EPS)
    w = weight.to(s.dtype)
    return (w * (s - t) ** 2).sum() / ((w * t.pow(2)).sum() + _EPS)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``1 − cos(s, t)`` between the flattened per-sample tensors."""
    s = student.float().reshape(student.shape[0], -1)
    t = teacher.float().reshape(teacher.shape[0], -1)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Relative MSE + (1 − cosine): the magnitude and the direction of an embedding. ``weight`` (a token
    mask broadcast to the tensors): padding positions left out of both."""
    if weight is None:
        return relative_mse(student, teacher) + cosine_distance(student, teacher)
    w = weight.to(student.dtype)
    return relative_mse(student, teacher, weight) + cosine_distance(student * w, teacher * w)


def probs_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence of probabilities, without a temperature (they went through their softmax or sigmoid
    already): over the last axis when the teacher's rows sum to 1 (softmax), else per element between
    Bernoulli distributions (sigmoid). ``weight`` (a token mask broadcast to the tensors,
    :func:`~inhercc.verify.token_mask`): the mean over the positions it keeps, padding left out."""
    s, t = student.float(), teacher.float().clamp(0.0, 1.0)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # p·log(p/q), 0 where p = 0
        return p * (torch.log(p.clamp_min(_PROB_EPS)) - torch.log(q.clamp(_PROB_EPS, 1.0)))

    rows = t.ndim >= 2 and t.shape[-1] > 1
    if rows:
        valid = t.sum(-1) if weight is None else t.sum(-1)[torch.broadcast_to(weight[..., 0], t.shape[:-1]) != 0]
        rows = bool(torch.allclose(valid, torch.ones((), device=t.device), atol=1e-3))
    per = kl(t, s).sum(-1, keepdim=True) if rows else kl(t, s) + kl(1 - t, 1 - s)
    if weight is None:
        return per.mean()
    w = torch.broadcast_to(weight.to(per.dtype), per.shape)
    return (w * per).sum() / w.sum().clamp_min(1.0)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, output: str = "logits") -> torch.Tensor:
    """Cross-entropy of class ids ``labels`` (shape = the logits' leading axes; -100 = ignore)."""
    classes = logits.shape[-1]
    labels = labels.long().reshape(-1)
    if labels.numel() != logits.numel() // classes:
        raise InherccError(
            f"_labels has {labels.numel()} entries per batch, output {output} has "
            f"{logits.numel() // classes} rows of {classes} classes"
        )
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
        raise InherccError(
            f"_labels must be class ids in [0, {classes}) for output {output}, "
            f"got {int(valid.min())}..{int(valid.max())}"
        )
    return F.cross_entropy(logits.float().reshape(-1, classes), labels, ignore_index=-100)


@dataclass(frozen=True)
class OutputLoss:
    """How one graph output is distilled: ``kind`` in :data:`LOSS_KINDS` and its weight in the sum."""

    name: str
    kind: str
    weight: float = 1.0


def parse_loss_overrides(items: Sequence[str]) -> dict[str, tuple[str, float]]:
    """``["logits=kd", "emb=embedding:0.5", "aux=none"]`` → ``{name: (kind, weight)}``."""
    out: dict[str, tuple[str, float]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        kind, _, weight = spec.partition(":")
        if not sep or not name or kind not in LOSS_KINDS:
            raise InherccError(
                f"bad `distill.losses` {item!r}: expected OUTPUT=KIND[:WEIGHT], KIND one of {', '.join(LOSS_KINDS)}"
            )
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise InherccError(f"bad `distill.losses` {item!r}: weight {weight!r} is not a number") from None
        if w < 0:
            raise InherccError(f"bad `distill.losses` {item!r}: weight must be ≥ 0")
        out[name.strip()] = (kind, w)
    return out


class DistillLoss:
    """The training objective: ``Σ_o w_o·L_o`` over graph outputs (``kd``: T²·KL at temperature T;
    ``probs``: KL without temperature; ``embedding``: relative MSE + 1 − cosine); with labels, the first
    ``kd`` output's term becomes ``(1 − α)·KD + α·CE``; with ``feature_weight > 0``, plus ``feature_weight``
    × the mean relative MSE between each factorized layer's output and the teacher's at the same tensor."""

    def __init__(
        self,
        outputs: Sequence[OutputLoss],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        labels: bool = False,
        feature_weight: float = 0.0,
    ) -> None:
        if temperature <= 0:
            raise InherccError(f"`distill.temperature` must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise InherccError(f"`distill.alpha` must be in [0, 1], got {alpha}")
        if feature_weight < 0:
            raise InherccError(f"`distill.feature_loss` weight must be ≥ 0, got {feature_weight}")
        self.outputs, self.temperature, self.alpha, self.feature_weight = (
            list(outputs),
            temperature,
            alpha,
            feature_weight,
        )
        self.labels_output: str | None = None
        if labels:
            self.labels_output = next((o.name for o in self.outputs if o.kind == "kd"), None)
            if self.labels_output is None:
                raise InherccError(
                    "_labels given, but no output is distilled as logits (kd); set one with `distill.losses` NAME=kd"
                )
        if not any(o.kind != "none" and o.weight > 0 for o in self.outputs) and feature_weight == 0:
            raise InherccError("every output has loss 'none' or weight 0: nothing to train on")

    @classmethod
    def for_outputs(
        cls,
        examples: Mapping[str, np.ndarray],
        overrides: Mapping[str, tuple[str, float]] | None = None,
        kinds: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> DistillLoss:
        """The default loss per output — :data:`LOSS_OF_KIND` of its kind: ``kinds``
        (:func:`inhercc.verify.graph_output_kinds`) when given, else judged by its name and dtype
        (:func:`inhercc.verify.name_kind`, the rule the scores use); ``none`` for non-float outputs —, with
        ``overrides`` ``{name: (kind, weight)}``. ``examples``: the teacher's outputs for a batch."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(examples)
        if unknown:
            raise InherccError(
                f"`distill.losses` names unknown output(s) {', '.join(sorted(unknown))}; outputs: {', '.join(examples)}"
            )
        outputs = []
        for name, value in examples.items():
            is_float = np.issubdtype(value.dtype, np.floating)
            default = LOSS_OF_KIND[kinds[name] if kinds and name in kinds else name_kind(name, value.dtype)]
            kind, weight = overrides.get(name, (default if is_float else "none", 1.0))
            if kind != "none" and not is_float:
                raise InherccError(f"output {name} is {value.dtype}: only float outputs can be distilled")
            outputs.append(OutputLoss(name, kind, weight))
        return cls(outputs, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        labels: torch.Tensor | None = None,
        student_features: Sequence[torch.Tensor] = (),
        teacher_features: Sequence[torch.Tensor] = (),
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss and its parts (``{output: value, "ce": …, "features": …}``, floats for logging).
        ``mask``: the batch's ``[batch, seq]`` attention mask; padding positions of per-token features are left
        out of the feature loss (they are never pooled into an output, so they are not worth the capacity)."""
        total = torch.zeros((), device=student[0].device if student else "cpu")
        parts: dict[str, float] = {}
        for spec, s, t in zip(self.outputs, student, teacher):
            if spec.kind == "none" or spec.weight == 0:
                continue
            if spec.kind == "kd":
                term = kd_loss(s, t, self.temperature)
                if labels is not None and spec.name == self.labels_output:
                    ce = ce_loss(s, labels, spec.name)
                    parts["ce"] = float(ce.detach())
                    term = (1.0 - self.alpha) * term + self.alpha * ce
            elif spec.kind == "probs":  # token-level outputs: padding positions left out
                term = probs_loss(s, t, token_mask(t.shape, mask) if t.ndim >= 3 else None)
            else:
                term = embedding_loss(s, t, token_mask(t.shape, mask) if t.ndim >= 3 else None)
            parts[spec.name] = float(term.detach())
            total = total + spec.weight * term
        if self.feature_weight > 0 and student_features:
            feat = torch.stack(
                [relative_mse(s, t, token_mask(t.shape, mask)) for s, t in zip(student_features, teacher_features)]
            ).mean()
            parts["features"] = float(feat.detach())
            total = total + self.feature_weight * feat
        return total, parts
