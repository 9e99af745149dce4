"""Elementwise arithmetic and math: Add … Pow, Mod, variadic Sum/Mean/Max/Min, unary math, bitwise."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from inhercc.torchrt.ops.common import widen_unsigned
from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register

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


_BINARY: dict[str, tuple[Binary, int]] = {
    # op -> (function, first version with numpy broadcasting)
    "Add": (widen_unsigned(torch.add), 7),
    "Sub": (widen_unsigned(torch.sub), 7),
    "Mul": (torch.mul, 7),
    "Div": (widen_unsigned(_div), 7),
}


def _binary_builder(fn: Binary, legacy: bool) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return _legacy_broadcast(ctx, fn) if legacy else fn

    return build


for _name, (_fn, _numpy_since) in _BINARY.items():
    register(_name, since=6, until=_numpy_since - 1)(_binary_builder(_fn, legacy=True))
    register(_name, since=_numpy_since)(_binary_builder(_fn, legacy=False))


@register("Pow", since=7)
def pow_(ctx: NodeContext) -> Kernel:
    return widen_unsigned(_pow)


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


_UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    # op -> (function, first version implemented)
    "Sqrt": (torch.sqrt, 6),
    "Exp": (torch.exp, 6),
    "Log": (torch.log, 6),
    "Neg": (torch.neg, 6),
    "Abs": (torch.abs, 6),
    "Reciprocal": (torch.reciprocal, 6),
    "Floor": (torch.floor, 6),
    "Ceil": (torch.ceil, 6),
    "Round": (torch.round, 11),
    "Sign": (torch.sign, 9),
    "Erf": (torch.erf, 9),
    "Sin": (torch.sin, 7),
    "Cos": (torch.cos, 7),
    "Tan": (torch.tan, 7),
    "Asin": (torch.asin, 7),
    "Acos": (torch.acos, 7),
    "Atan": (torch.atan, 7),
    "Sinh": (torch.sinh, 9),
    "Cosh": (torch.cosh, 9),
    "Asinh": (torch.asinh, 9),
    "Acosh": (torch.acosh, 9),
    "Atanh": (torch.atanh, 9),
    "IsNaN": (torch.isnan, 9),
    "BitwiseNot": (torch.bitwise_not, 18),
}


def _unary_builder(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[NodeContext], Kernel]:
    def build(ctx: NodeContext) -> Kernel:
        return fn

    return build


for _name, (_ufn, _since) in _UNARY.items():
    register(_name, since=_since)(_unary_builder(_ufn))


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
    register(_name, since=18)(_binary_builder(widen_unsigned(_bfn), legacy=False))


@register("BitShift", since=11)
def bitshift(ctx: NodeContext) -> Kernel:
    direction = one_of(ctx, "direction", "", ("LEFT", "RIGHT"))
    if direction == "LEFT":
        return widen_unsigned(torch.bitwise_left_shift)
    return widen_unsigned(torch.bitwise_right_shift)


@register("CumSum", since=11, static_inputs=(1,))
def cumsum(ctx: NodeContext) -> Kernel:
    exclusive = ctx.attr("exclusive", 0)
    reverse = ctx.attr("reverse", 0)
    const_axis = ctx.const_ints(1)

    def kernel(x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        dim = const_axis[0] if const_axis is not None else int(ax.reshape(-1)[0])
        y = x.flip(dim) if reverse else x
        out = torch.cumsum(y, dim, dtype=x.dtype)
        if exclusive:
            out = out - y
        return out.flip(dim) if reverse else out

    return kernel


@register("Det", since=11)
def det(ctx: NodeContext) -> Kernel:
    return torch.linalg.det

