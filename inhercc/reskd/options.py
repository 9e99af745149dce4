"""ResKD's options, declared once (:func:`inhercc.options.option`): the command's flags are generated from
these fields and :class:`~inhercc.distill.DistillConfig`'s (how each member is trained)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from inhercc.distill.config import DistillConfig
from inhercc.errors import InherccError
from inhercc.options import (
    check_options,
    name_of,
    non_negative,
    option,
    option_fields,
    positive,
    unit_interval,
)
from inhercc.recipe import ALLOCATIONS
from inhercc.reskd.cascade import SKIP_RULES

DEFAULT_STUDENT_RATIO = 0.3
DEFAULT_RES_RATIOS = (0.1, 0.05)
DEFAULT_MAX_DROP = 0.2
DEFAULT_RESIDUAL_WEIGHT = 1.0


def parse_ratios(items: Iterable[str] | str) -> tuple[float, ...]:
    """``("0.1,0.05",)`` or ``("0.1", "0.05")`` → ``(0.1, 0.05)``; an empty string: no res-students."""
    texts = [items] if isinstance(items, str) else list(items)
    out = []
    for part in (p.strip() for t in texts for p in str(t).split(",")):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise InherccError(f"`reskd.res_ratios`: {part!r} is not a number") from None
    return tuple(out)


def _ratios(value: Any) -> str | None:
    if value is None:
        return None
    return "must be ratios in (0, 1]" if any(unit_interval(v) for v in value) else None


@dataclass(frozen=True)
class ResKDOptions:
    """Every option of a ResKD run (:func:`inhercc.reskd.reskd`)."""

    student_ratio: float = option(
        DEFAULT_STUDENT_RATIO, check=unit_interval, help="Round 0: the inherited student's parameter ratio."
    )
    res_ratios: tuple[float, ...] | None = option(
        None,
        check=_ratios,
        parse=parse_ratios,
        metavar="R1,R2,...",
        help="One res-student per ratio, each an inherited copy of the teacher trained on the residual.",
        default_text=",".join(map(str, DEFAULT_RES_RATIOS)) + " (none when res-students are given)",
    )
    allocation: str | None = option(
        None,
        choices=ALLOCATIONS,
        help="How the inherited members' ratios spread ranks over layers (compress's allocations).",
        default_text="compress's default",
    )
    rank_multiple: int | None = option(
        None,
        check=positive,
        help="The inherited members' ranks rounded up to this (1 allows the smallest ratios).",
        default_text="compress's default",
    )
    student: str | None = option(None, metavar="ONNX", help="Round 0's student, given (used as it is).")
    res_students: tuple[str, ...] = option(
        (), flag="--res-student", metavar="ONNX", help="A given res-student (used as it is; repeat, in order)."
    )
    min_gain: float = option(
        0.0,
        help="Stop when a round improves validation accuracy by less than this (points; the round is dropped; "
        "a non-logit output's round is dropped unless it raises the validation cosine to the teacher).",
    )
    max_drop: float | None = option(
        None,
        check=non_negative,
        help="Skip thresholds: the cheapest within this many accuracy points of the full cascade.",
        default_text=f"{DEFAULT_MAX_DROP} unless --target-flops is given",
    )
    target_flops: float | None = option(
        None,
        check=unit_interval,
        help="Skip thresholds: the most accurate within this fraction of the teacher's FLOPs.",
    )
    skip_rule: str = option(
        "confidence",
        choices=SKIP_RULES,
        help="A sample skips the rest when its summed prediction's max softmax (or margin over the second) ≥ τ.",
    )
    skip: bool = option(True, help="Sample-adaptive skipping (else every member runs on every sample).")
    residual_weight: float = option(
        DEFAULT_RESIDUAL_WEIGHT,
        check=non_negative,
        help="Weight of the residual MSE (res-student vs teacher − earlier members) beside the KD/CE loss.",
    )
    res_focus: float = option(
        1.0,
        check=unit_interval,
        help="Each res-student trains on this fraction of the training samples its prefix is least sure of (by "
        "the skip rule's score): the rows that reach it once skipping is on (1: all samples).",
    )
    distill: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def of(cls, **flat: Any) -> ResKDOptions:
        """From flat keywords (the command's option names): ResKD's own and distillation's."""
        own = {name_of(f): f.name for f in dataclasses.fields(cls) if f.name != "distill"}
        train = {name_of(f): f.name for _, f in option_fields(DistillConfig)}
        unknown = sorted(set(flat) - set(own) - set(train))
        if unknown:
            raise InherccError(f"unknown ResKD option `{unknown[0]}`")
        mine = {own[k]: v for k, v in flat.items() if k in own}
        distill = replace(DistillConfig(), **{train[k]: v for k, v in flat.items() if k in train and k not in own})
        return cls(**mine, distill=distill)

    def check(self) -> None:
        """Every option valid (an error naming the field), before any work."""
        check_options(self, "reskd.")
        if self.max_drop is not None and self.target_flops is not None:
            raise InherccError("choose one of `reskd.max_drop`, `reskd.target_flops` (got both)")

    def ratios(self, given: int = 0) -> tuple[float, ...]:
        """The res-students to make: as given, else the defaults unless res-students are given (here, or
        ``given`` of them from Python)."""
        if self.res_ratios is not None:
            return self.res_ratios
        return () if self.res_students or given else DEFAULT_RES_RATIOS

    def target(self) -> dict[str, float]:
        """The calibration target: ``{"max_drop": …}`` or ``{"target_flops": …}``."""
        if self.target_flops is not None:
            return {"target_flops": self.target_flops}
        return {"max_drop": DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop}
