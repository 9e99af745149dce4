"""Comparisons, boolean logic and Where."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inhercc.torchrt.ops.common import widen_unsigned
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register

_COMPARE: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int]] = {
    # op -> (function, first version implemented)
    "Equal": (torch.eq, 7),
    "Less": (widen_unsigned(torch.lt), 7),
    "Greater": (widen_unsigned(torch.gt), 7),
    "LessOrEqual": (widen_unsigned(torch.le), 12),
    "GreaterOrEqual": (widen_unsigned(torch.ge), 12),
    "And": (torch.logical_and, 7),
    "Or": (torch.logical_or, 7),
    "Xor": (torch.logical_xor, 7),
}


def _builder(fn: Callable[..., torch.Tensor]) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return fn

    return build


for _name, (_fn, _since) in _COMPARE.items():
    register(_name, since=_since)(_builder(_fn))


@register("Not", since=1)
def not_(ctx: NodeContext) -> Kernel:
    return torch.logical_not


@register("Where", since=9, fresh=True)
def where(ctx: NodeContext) -> Kernel:
    return torch.where
