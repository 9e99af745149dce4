"""Activations and (log-)softmax: Relu … Gelu, Clip, PRelu, Softmax, LogSoftmax, Hardmax."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.common import axis, scalar
from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register, with_inplace


@register("Relu", since=6, fresh=True, saves_output=True)
def relu(ctx: NodeContext) -> Kernel:
    return with_inplace(lambda x: torch.relu(x), {0: torch.relu_})


@register("Sigmoid", since=6, fresh=True, saves_output=True)
def sigmoid(ctx: NodeContext) -> Kernel:
    return with_inplace(lambda x: torch.sigmoid(x), {0: torch.sigmoid_})


@register("Tanh", since=6, fresh=True, saves_output=True)
def tanh(ctx: NodeContext) -> Kernel:
    return with_inplace(lambda x: torch.tanh(x), {0: torch.tanh_})


@register("LeakyRelu", since=6, fresh=True)
def leaky_relu(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu", since=6, fresh=True, saves_output=True)
def elu(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@register("Celu", since=12, fresh=True, saves_output=True)
def celu(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@register("Selu", since=6, fresh=True, saves_output=True)
def selu(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * F.elu(x, alpha)


@register("ThresholdedRelu", since=10)
def thresholded_relu(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, torch.zeros((), dtype=x.dtype, device=x.device))


@register("HardSigmoid", since=6, fresh=True)
def hard_sigmoid(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 0.2)
    beta = ctx.attr("beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("HardSwish", since=14, fresh=True)
def hard_swish(ctx: NodeContext) -> Kernel:
    return F.hardswish


@register("Softplus", since=1, fresh=True)
def softplus(ctx: NodeContext) -> Kernel:
    return F.softplus


@register("Softsign", since=1)
def softsign(ctx: NodeContext) -> Kernel:
    return F.softsign


@register("Mish", since=18)
def mish(ctx: NodeContext) -> Kernel:
    return F.mish


@register("Swish", since=24)
def swish(ctx: NodeContext) -> Kernel:
    alpha = ctx.attr("alpha", 1.0)
    if alpha == 1.0:
        return F.silu
    return lambda x: x * torch.sigmoid(x * alpha)


@register("Gelu", since=20, fresh=True)
def gelu(ctx: NodeContext) -> Kernel:
    approximate = one_of(ctx, "approximate", "none", ("none", "tanh"))
    return lambda x: F.gelu(x, approximate=approximate)


@register("PRelu", since=6, until=6, fresh=True)
def prelu_6(ctx: NodeContext) -> Kernel:
    """Opset 6: a 1-D slope holds one value per channel (axis 1)."""

    def kernel(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        if slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
            slope = slope.reshape((-1,) + (1,) * (x.dim() - 2))
        return torch.where(x >= 0, x, x * slope)

    return kernel


@register("PRelu", since=7, fresh=True)
def prelu(ctx: NodeContext) -> Kernel:
    """x for x >= 0 else slope * x, the slope broadcasting to x (not only per channel as in F.prelu)."""
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


@register("Shrink", since=9)
def shrink(ctx: NodeContext) -> Kernel:
    bias = ctx.attr("bias", 0.0)
    lambd = ctx.attr("lambd", 0.5)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero))
        return out.to(x.dtype)

    return kernel


@register("Clip", since=6, until=10)
def clip_6(ctx: NodeContext) -> Kernel:
    low = ctx.attr("min", float("-inf"))
    high = ctx.attr("max", float("inf"))
    return lambda x: torch.clamp(x, low, high)


@register("Clip", since=11)
def clip(ctx: NodeContext) -> Kernel:
    """Bounds from constant inputs are baked in as numbers; runtime bounds stay tensors (differentiable)."""
    low_const, high_const = ctx.const(1), ctx.const(2)
    low_value = None if low_const is None else scalar(low_const)
    high_value = None if high_const is None else scalar(high_const)
    has_low, has_high = ctx.has_input(1), ctx.has_input(2)

    def bound(given: torch.Tensor | None, const: float | None, present: bool) -> torch.Tensor | float | None:
        if not present:
            return None
        return const if const is not None else given.reshape(())

    def kernel(x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
        lo = bound(low, low_value, has_low)
        hi = bound(high, high_value, has_high)
        if lo is None and hi is None:
            return x
        return torch.clamp(x, lo, hi)

    return kernel


def _softmax_builder(fn: Callable[..., torch.Tensor], legacy: bool) -> Callable[[NodeContext], Kernel]:
    """Softmax-like ops; before opset 13 the input is flattened to 2-D at `axis` (default 1)."""

    def build(ctx: NodeContext) -> Kernel:
        ax = ctx.attr("axis", 1 if legacy else -1)
        if not legacy:
            return lambda x: fn(x, ax)

        def kernel(x: torch.Tensor) -> torch.Tensor:
            a = axis(ax, x.dim())
            rows = 1
            for d in x.shape[:a]:
                rows *= d
            return fn(x.reshape(rows, -1), 1).reshape(x.shape)

        return kernel

    return build


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of the first maximum along `dim`."""
    index = torch.argmax(x, dim, keepdim=True)
    return torch.zeros_like(x).scatter_(dim, index, 1)


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)


def _log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.log_softmax(x, dim)


for _name, _fn in (("Softmax", _softmax), ("LogSoftmax", _log_softmax), ("Hardmax", _hardmax)):
    register(_name, since=1, until=12)(_softmax_builder(_fn, legacy=True))
    register(_name, since=13, fresh=True, saves_output=True)(_softmax_builder(_fn, legacy=False))
