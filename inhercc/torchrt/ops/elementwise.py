"""Elementwise arithmetic and math: Add … Pow, Mod, variadic Sum/Mean/Max/Min, unary math, bitwise."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.common import widen_unsigned
from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register, with_inplace

Binary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div: true division for floats, truncation toward zero for integers."""
    if a.is_floating_point() or a.is_complex():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Pow: the result has the base's dtype whatever the exponent's."""
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


def _legacy_broadcast(ctx: NodeContext, fn: Binary) -> Kernel:
    """Opset < 7 binary ops: `broadcast=1` aligns B with A starting at `axis` (suffix if no axis)."""
    broadcast = ctx.attr("broadcast", 0)
    ax = ctx.attr("axis", None)
    if not broadcast or ax is None:
        return fn

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        start = ax + a.dim() if ax < 0 else ax
        trailing = a.dim() - start - b.dim()
        return fn(a, b.reshape(tuple(b.shape) + (1,) * trailing) if trailing > 0 else b)

    return kernel


def _add(ctx: NodeContext) -> Kernel:
    fn = widen_unsigned(torch.add)
    return with_inplace(lambda a, b: fn(a, b), {0: lambda a, b: a.add_(b), 1: lambda a, b: b.add_(a)}, grad="always")


def _sub(ctx: NodeContext) -> Kernel:
    fn = widen_unsigned(torch.sub)
    return with_inplace(
        lambda a, b: fn(a, b), {0: lambda a, b: a.sub_(b), 1: lambda a, b: b.neg_().add_(a)}, grad="always"
    )


def _mul(ctx: NodeContext) -> Kernel:
    return with_inplace(
        lambda a, b: torch.mul(a, b), {0: lambda a, b: a.mul_(b), 1: lambda a, b: b.mul_(a)}, grad="if_others_constant"
    )


def _div_builder(ctx: NodeContext) -> Kernel:
    fn = widen_unsigned(_div)
    return with_inplace(lambda a, b: fn(a, b), {0: lambda a, b: a.div_(b)}, grad="if_others_constant")


_BINARY: dict[str, tuple[Binary, Callable[[NodeContext], Kernel], int]] = {
    # op -> (function, builder for numpy broadcasting, first version with numpy broadcasting)
    "Add": (widen_unsigned(torch.add), _add, 7),
    "Sub": (widen_unsigned(torch.sub), _sub, 7),
    "Mul": (torch.mul, _mul, 7),
    "Div": (widen_unsigned(_div), _div_builder, 7),
}


def _legacy_builder(fn: Binary) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return _legacy_broadcast(ctx, fn)

    return build


def _plain_builder(fn: Binary) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return fn

    return build


for _name, (_fn, _build, _numpy_since) in _BINARY.items():
    register(_name, since=6, until=_numpy_since - 1)(_legacy_builder(_fn))
    register(_name, since=_numpy_since, fresh=True)(_build)


register("Pow", since=1, until=6)(_legacy_builder(widen_unsigned(_pow)))
register("Pow", since=7, fresh=True, saves_output=True)(_plain_builder(widen_unsigned(_pow)))


@register("Mod", since=10)
def mod(ctx: NodeContext) -> Kernel:
    """fmod=1: C fmod (sign of the dividend); fmod=0: Python-style modulus (sign of the divisor)."""
    return widen_unsigned(torch.fmod if ctx.attr("fmod", 0) else torch.remainder)


def _variadic(fn: Binary) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return lambda *xs: functools.reduce(fn, xs)

    return build


register("Sum", since=6)(_variadic(widen_unsigned(torch.add)))
register("Max", since=6)(_variadic(widen_unsigned(torch.maximum)))
register("Min", since=6)(_variadic(widen_unsigned(torch.minimum)))


@register("Mean", since=6)
def mean(ctx: NodeContext) -> Kernel:
    return lambda *xs: functools.reduce(torch.add, xs) / len(xs)


_UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, bool]] = {
    # op -> (function, first version implemented, whether its backward keeps the output)
    "Sqrt": (torch.sqrt, 6, True),
    "Exp": (torch.exp, 6, True),
    "Log": (torch.log, 6, False),
    "Neg": (torch.neg, 6, False),
    "Abs": (torch.abs, 6, False),
    "Reciprocal": (torch.reciprocal, 6, True),
    "Floor": (torch.floor, 6, False),
    "Ceil": (torch.ceil, 6, False),
    "Round": (torch.round, 11, False),
    "Sign": (torch.sign, 9, False),
    "Erf": (torch.erf, 9, False),
    "Sin": (torch.sin, 7, False),
    "Cos": (torch.cos, 7, False),
    "Tan": (torch.tan, 7, True),
    "Asin": (torch.asin, 7, False),
    "Acos": (torch.acos, 7, False),
    "Atan": (torch.atan, 7, False),
    "Sinh": (torch.sinh, 9, False),
    "Cosh": (torch.cosh, 9, False),
    "Asinh": (torch.asinh, 9, False),
    "Acosh": (torch.acosh, 9, False),
    "Atanh": (torch.atanh, 9, False),
    "IsNaN": (torch.isnan, 9, False),
    "BitwiseNot": (widen_unsigned(torch.bitwise_not), 18, False),
}


def unary_builder(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[NodeContext], Kernel]:
    """A builder for a one-input op; torch's in-place twin (`Tensor.<name>_`), if any, is attached."""
    twin = getattr(torch.Tensor, f"{getattr(fn, '__name__', '')}_", None)

    def build(ctx: NodeContext) -> Kernel:
        if twin is None:
            return fn
        return with_inplace(lambda x: fn(x), {0: twin})

    return build


for _name, (_ufn, _since, _saves) in _UNARY.items():
    register(_name, since=_since, fresh=True, saves_output=_saves)(unary_builder(_ufn))


@register("IsInf", since=10)
def isinf(ctx: NodeContext) -> Kernel:
    negative = ctx.attr("detect_negative", 1)
    positive = ctx.attr("detect_positive", 1)
    if negative and positive:
        return torch.isinf
    if positive:
        return torch.isposinf
    if negative:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)


_BITWISE: dict[str, Binary] = {
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}
for _name, _bfn in _BITWISE.items():
    register(_name, since=18)(_plain_builder(widen_unsigned(_bfn)))


@register("BitShift", since=11)
def bitshift(ctx: NodeContext) -> Kernel:
    direction = one_of(ctx, "direction", "", ("LEFT", "RIGHT"))
    if direction == "LEFT":
        return widen_unsigned(torch.bitwise_left_shift)
    return widen_unsigned(torch.bitwise_right_shift)


def _cumulative_builder(fn: Callable[..., torch.Tensor], identity: int) -> Callable[[NodeContext], Kernel]:
    """CumSum/CumProd along a (constant or runtime) axis; `exclusive` shifts in the identity element."""

    def build(ctx: NodeContext) -> Kernel:
        exclusive = ctx.attr("exclusive", 0)
        reverse = ctx.attr("reverse", 0)
        const_axis = ctx.const_ints(1)

        def kernel(x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
            dim = const_axis[0] if const_axis is not None else int(ax.reshape(-1)[0])
            dim = dim + x.dim() if dim < 0 else dim
            y = x.flip(dim) if reverse else x
            if exclusive:
                pad = [0, 0] * (x.dim() - 1 - dim) + [1, 0]
                y = F.pad(y.narrow(dim, 0, max(y.shape[dim] - 1, 0)), pad, value=identity)
            out = fn(y, dim, dtype=x.dtype)
            return out.flip(dim) if reverse else out

        return kernel

    return build


register("CumSum", since=11, static_inputs=(1,))(_cumulative_builder(torch.cumsum, 0))
register("CumProd", since=26, static_inputs=(1,))(_cumulative_builder(torch.cumprod, 1))


@register("Det", since=11)
def det(ctx: NodeContext) -> Kernel:
    return torch.linalg.det
