"""The skip thresholds τᵢ of a ResKD cascade, calibrated on validation outputs (numpy only: the cascade is
simulated exactly as its ONNX graph runs it, :mod:`inhercc.reskd.cascade`).

A row exits after member ``k − 1`` when its running sum scores at least ``τ_k`` (``confidence``: the largest
softmax probability; ``margin``: the largest minus the second); its prediction is that prefix sum's. Two targets:
``max_drop`` (accuracy points below the full cascade, the cheapest thresholds that keep within it) or
``target_flops`` (a fraction of the teacher's FLOPs per sample, the most accurate thresholds within it). The search
is a coordinate descent over each τ's candidates (midpoints between observed scores, so that float32 rounding in
the graph never moves a row across a threshold)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inhercc.errors import InherccError

CANDIDATES = 48  # thresholds tried per member: midpoints at this many quantiles of the validation scores
MAX_PASSES = 10


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def scores(logits: np.ndarray, rule: str) -> np.ndarray:
    """Per row: the largest softmax probability (``confidence``) or its margin over the second (``margin``)."""
    p = np.sort(softmax(np.asarray(logits, np.float64)), axis=-1)
    if rule == "margin":
        return p[..., -1] - (p[..., -2] if p.shape[-1] > 1 else 0.0)
    return p[..., -1]


@dataclass
class Cascade:
    """What calibration needs of a cascade on the validation split: each prefix sum's score and correctness
    per row (``scores[k]``, ``correct[k]``: after members 0 … k), the members' FLOPs per sample and the
    teacher's."""

    scores: np.ndarray  # [members, rows]
    correct: np.ndarray  # [members, rows] bool
    flops: np.ndarray  # [members]
    teacher_flops: float
    rule: str = "confidence"
    thresholds: list[float] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        outputs: Sequence[np.ndarray],
        labels: np.ndarray,
        flops: Sequence[float],
        teacher_flops: float,
        rule: str = "confidence",
    ) -> Cascade:
        """From the members' validation outputs (each ``[rows, classes]``) and the reference labels."""
        if len(outputs) != len(flops):
            raise InherccError(f"{len(outputs)} member outputs but {len(flops)} FLOP counts")
        sums = np.cumsum(np.stack([np.asarray(o, np.float64) for o in outputs]), axis=0)
        correct = sums.argmax(-1) == np.asarray(labels)[None]
        return cls(scores(sums, rule), correct, np.asarray(flops, np.float64), float(teacher_flops), rule)

    @property
    def members(self) -> int:
        return len(self.flops)

    def run(self, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Per row the member after which it exits, and the fraction of rows reaching each member."""
        rows = self.scores.shape[1]
        exits = np.full(rows, self.members - 1)
        active = np.ones(rows, bool)
        reach = [1.0]
        for k, tau in enumerate(thresholds, start=1):
            going = active & (self.scores[k - 1] < tau)
            exits[active & ~going] = k - 1
            active = going
            reach.append(float(active.mean()) if rows else 0.0)
        return exits, np.asarray(reach)

    def measure(self, thresholds: Sequence[float]) -> dict[str, float | list[float]]:
        """Accuracy (%), fraction reaching each member, expected FLOPs per sample (and of the teacher's)."""
        exits, reach = self.run(thresholds)
        acc = float(self.correct[exits, np.arange(len(exits))].mean() * 100) if len(exits) else 0.0
        expected = float(reach @ self.flops)
        frac = expected / self.teacher_flops if self.teacher_flops else 0.0
        return {"accuracy": acc, "reach": reach.tolist(), "expected_flops": expected, "flops_fraction": frac}

    def prefix_accuracy(self) -> list[float]:
        """Validation accuracy (%) of each prefix of the cascade (members 0 … k, summed, no skipping)."""
        return [float(c.mean() * 100) for c in self.correct]

    def candidates(self, k: int) -> list[float]:
        """Thresholds worth trying before member ``k``: midpoints between sorted distinct scores after member
        ``k − 1`` at up to :data:`CANDIDATES` quantiles, below the lowest (every row exits) and ``inf`` (none)."""
        u = np.unique(self.scores[k - 1])
        if len(u) == 0:
            return [math.inf]
        picks = np.unique(np.linspace(1, len(u) - 1, min(CANDIDATES, len(u) - 1)).astype(int)) if len(u) > 1 else []
        mids = [float((u[i - 1] + u[i]) / 2) for i in picks]
        return [float(u[0]) / 2, *mids, math.inf]


def calibrate(cascade: Cascade, *, max_drop: float | None = None, target_flops: float | None = None) -> list[float]:
    """Per member after the first, its τ: the cheapest within ``max_drop`` accuracy points of the full cascade,
    or the most accurate within ``target_flops`` × the teacher's FLOPs (ties: the cheaper)."""
    if (max_drop is None) == (target_flops is None):
        raise InherccError("give one of `reskd.max_drop`, `reskd.target_flops`")
    full = cascade.prefix_accuracy()[-1]

    def key(thresholds: list[float]) -> tuple[float, float, float]:
        m = cascade.measure(thresholds)
        acc, flops = float(m["accuracy"]), float(m["flops_fraction"])  # type: ignore[arg-type]
        if max_drop is not None:
            return (max(0.0, full - acc - max_drop), flops, -acc)
        return (max(0.0, flops - float(target_flops)), -acc, flops)  # type: ignore[arg-type]

    taus = [math.inf] * (cascade.members - 1)
    best = key(taus)
    for _ in range(MAX_PASSES):
        improved = False
        for k in range(1, cascade.members):
            for c in cascade.candidates(k):
                trial = taus[: k - 1] + [c] + taus[k:]
                score = key(trial)
                if score < best:
                    taus, best, improved = trial, score, True
        if not improved:
            break
    cascade.thresholds = taus
    return taus
