"""Reductions (ReduceSum … ReduceLogSumExp) and ArgMax/ArgMin."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from inhercc.torchrt.ops.common import axes, axis, ints
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register

Reduction = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _in_float(fn: Reduction) -> Reduction:
    """Compute in float64 for integer inputs and cast back (truncating, as ONNX's reference does)."""

    def wrapped(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
        if x.is_floating_point():
            return fn(x, dims, keep)
        return fn(x.to(torch.float64), dims, keep).to(x.dtype)

    return wrapped


def _extreme(fn: Callable[..., torch.Tensor], largest: bool) -> Reduction:
    """amax/amin, giving the identity (∓inf or the dtype's limit) over an empty set like ONNX."""

    def reduce(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
        if all(x.shape[d] for d in dims):
            return fn(x, dims, keep)
        shape = (
            [1 if d in dims else n for d, n in enumerate(x.shape)]
            if keep
            else [n for d, n in enumerate(x.shape) if d not in dims]
        )
        if x.is_floating_point():
            fill = float("-inf") if largest else float("inf")
        elif x.dtype == torch.bool:
            fill = not largest
        else:
            info = torch.iinfo(x.dtype)
            fill = info.min if largest else info.max
        return torch.full(shape, fill, dtype=x.dtype, device=x.device)

    return reduce


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep, dtype=x.dtype)
    return x


_REDUCTIONS: dict[str, tuple[Reduction, int]] = {
    # op -> (reduction, first version taking axes as an input)
    "ReduceSum": (lambda x, d, k: torch.sum(x, d, keepdim=k, dtype=x.dtype), 13),
    "ReduceMean": (_in_float(lambda x, d, k: torch.mean(x, d, keepdim=k)), 18),
    "ReduceMax": (_extreme(torch.amax, largest=True), 18),
    "ReduceMin": (_extreme(torch.amin, largest=False), 18),
    "ReduceProd": (_prod, 18),
    "ReduceL1": (lambda x, d, k: torch.sum(x.abs(), d, keepdim=k, dtype=x.dtype), 18),
    "ReduceL2": (_in_float(lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k)), 18),
    "ReduceSumSquare": (lambda x, d, k: torch.sum(x * x, d, keepdim=k, dtype=x.dtype), 18),
    "ReduceLogSum": (lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)), 18),
    "ReduceLogSumExp": (_in_float(lambda x, d, k: torch.logsumexp(x, d, keepdim=k)), 18),
}


def _reduce_builder(fn: Reduction, axes_input: bool) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        keep = bool(ctx.attr("keepdims", 1))
        noop = 0
        runtime = False
        const: Sequence[int] | None
        if axes_input:
            noop = ctx.attr("noop_with_empty_axes", 0)
            const = ctx.const_ints(1)
            runtime = ctx.has_input(1) and const is None
        else:
            const = ctx.attr("axes", None)

        def kernel(x: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
            values = ints(given) if runtime else const
            if not values:
                if noop:
                    return x
                dims = list(range(x.dim()))
            else:
                dims = axes(values, x.dim())
            return fn(x, dims, keep)

        return kernel

    return build


for _name, (_fn, _input_since) in _REDUCTIONS.items():
    register(_name, since=1, until=_input_since - 1)(_reduce_builder(_fn, axes_input=False))
    register(_name, since=_input_since, static_inputs=(1,))(_reduce_builder(_fn, axes_input=True))


def _arg_builder(fn: Callable[..., torch.Tensor]) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        ax = ctx.attr("axis", 0)
        keep = bool(ctx.attr("keepdims", 1))
        last = ctx.attr("select_last_index", 0)

        def kernel(x: torch.Tensor) -> torch.Tensor:
            a = axis(ax, x.dim())
            if not last:
                return fn(x, a, keepdim=keep)
            return x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)

        return kernel

    return build


register("ArgMax", since=1)(_arg_builder(torch.argmax))
register("ArgMin", since=1)(_arg_builder(torch.argmin))
