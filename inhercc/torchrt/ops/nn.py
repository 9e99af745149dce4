"""Convolution, pooling and normalization: Conv, ConvTranspose, *Pool, BatchNormalization, LayerNormalization…

Padding follows ONNX: explicit begin/end pads (asymmetric allowed) or auto_pad SAME_UPPER/SAME_LOWER/VALID,
computed from the runtime input size. Symmetric padding goes to torch's own padding argument; anything
else is padded explicitly first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.common import axes, axis
from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry shared by Conv and the pools (None = default for the runtime rank)."""

    kernel: list[int] | None
    strides: list[int] | None
    dilations: list[int] | None
    pads: list[int] | None
    auto_pad: str

    @staticmethod
    def parse(ctx: NodeContext, dilations: bool = True) -> Window:
        return Window(
            kernel=ctx.attr("kernel_shape", None),
            strides=ctx.attr("strides", None),
            dilations=ctx.attr("dilations", None) if dilations else None,
            pads=ctx.attr("pads", None),
            auto_pad=one_of(ctx, "auto_pad", "NOTSET", _AUTO_PAD),
        )

    def resolve(
        self, spatial: Sequence[int], kernel: Sequence[int]
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """(strides, dilations, pads_begin, pads_end) for an input with these spatial sizes."""
        rank = len(spatial)
        strides = self.strides or [1] * rank
        dilations = self.dilations or [1] * rank
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for n, k, s, d in zip(spatial, kernel, strides, dilations):
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                small, large = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else large)
                end.append(large if self.auto_pad == "SAME_UPPER" else small)
            return strides, dilations, begin, end
        if self.auto_pad == "VALID" or not self.pads:
            return strides, dilations, [0] * rank, [0] * rank
        return strides, dilations, list(self.pads[:rank]), list(self.pads[rank:])


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX (begin, end) per spatial axis -> F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


@register("Conv", since=1, fresh=True)
def conv(ctx: NodeContext) -> Kernel:
    window = Window.parse(ctx)
    groups = ctx.attr("group", 1)

    def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rank = w.dim() - 2
        strides, dilations, begin, end = window.resolve(x.shape[2:], w.shape[2:])
        if begin != end:
            x = F.pad(x, _torch_pads(begin, end))
            begin = [0] * rank
        return _CONV[rank](x, w, b, strides, begin, dilations, groups)

    return kernel


@register("ConvTranspose", since=1, fresh=True)
def conv_transpose(ctx: NodeContext) -> Kernel:
    window = Window.parse(ctx)
    groups = ctx.attr("group", 1)
    output_padding_attr = ctx.attr("output_padding", None)
    output_shape = ctx.attr("output_shape", None)

    def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rank = w.dim() - 2
        spatial = list(x.shape[2:])
        kernel_size = list(w.shape[2:])
        strides = window.strides or [1] * rank
        dilations = window.dilations or [1] * rank
        output_padding = output_padding_attr or [0] * rank
        full = [(n - 1) * s + (k - 1) * d + 1 for n, k, s, d in zip(spatial, kernel_size, strides, dilations)]
        target = output_shape[-rank:] if output_shape else None
        if target is None and window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = [n * s for n, s in zip(spatial, strides)]
        if target is not None:
            begin, end = [], []
            for f, p, t in zip(full, output_padding, target):
                total = f + p - t
                small, large = total // 2, total - total // 2
                upper = window.auto_pad == "SAME_UPPER"
                begin.append(small if upper else large)
                end.append(large if upper else small)
        elif window.pads and window.auto_pad == "NOTSET":
            begin, end = list(window.pads[:rank]), list(window.pads[rank:])
        else:
            begin, end = [0] * rank, [0] * rank
        fits = all(p < max(s, d) for p, s, d in zip(output_padding, strides, dilations))
        if begin == end and fits:
            return _CONV_T[rank](x, w, b, strides, begin, output_padding, groups, dilations)
        y = _CONV_T[rank](x, w, None, strides, 0, 0, groups, dilations)
        y = F.pad(y, _torch_pads([-v for v in begin], [p - e for p, e in zip(output_padding, end)]))
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * rank)
        return y

    return kernel


def _pool_pads(
    x: torch.Tensor, window: Window, kernel: Sequence[int], fill: float
) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """Input (explicitly padded when torch cannot express the pads), strides, dilations, torch padding."""
    strides, dilations, begin, end = window.resolve(x.shape[2:], kernel)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if begin == end and all(2 * p <= k for p, k in zip(begin, effective)):
        return x, strides, dilations, begin
    return F.pad(x, _torch_pads(begin, end), value=fill), strides, dilations, [0] * len(kernel)


def _min_value(dtype: torch.dtype) -> float:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


@register("MaxPool", since=1)
def max_pool(ctx: NodeContext) -> Kernel:
    window = Window.parse(ctx)
    kernel_shape = window.kernel
    ctx.require(kernel_shape is not None, "MaxPool without kernel_shape")
    rank = len(kernel_shape)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    storage_order = ctx.attr("storage_order", 0)
    want_indices = ctx.has_output(1)
    ctx.require(rank in _MAX_POOL, f"{rank}-D MaxPool")
    if want_indices:
        pads = window.pads or [0] * 2 * rank
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_shape, window.dilations or [1] * rank)]
        ctx.require(
            window.auto_pad in ("NOTSET", "VALID")
            and pads[:rank] == pads[rank:]
            and all(2 * p <= k for p, k in zip(pads, dilated)),
            "MaxPool indices with padding torch cannot express",
        )

    def kernel(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        source, strides, dilations, padding = _pool_pads(x, window, kernel_shape, _min_value(x.dtype))
        if not want_indices:
            return _MAX_POOL[rank](source, kernel_shape, strides, padding, dilations, ceil_mode)
        y, index = _MAX_POOL[rank](x, kernel_shape, strides, padding, dilations, ceil_mode, return_indices=True)
        spatial = list(x.shape[2:])
        if storage_order == 1:
            coords = []
            rest = index
            for n in reversed(spatial):
                coords.append(rest % n)
                rest = rest // n
            coords.reverse()  # row-major coordinates, then re-linearise column-major
            index = torch.zeros_like(index)
            for c, n in zip(reversed(coords), reversed(spatial)):
                index = index * n + c
        planes = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *[1] * rank)
        return y, index + planes * math.prod(spatial)

    return kernel


def _averaging_window(ctx: NodeContext, op: str) -> tuple[Window, list[int], int, bool]:
    """The window of an averaging pool (AveragePool, LpPool): a kernel shape torch can average over,
    no dilations; returns ``(window, kernel_shape, rank, ceil_mode)``."""
    window = Window.parse(ctx)
    kernel_shape = window.kernel
    ctx.require(kernel_shape is not None, f"{op} without kernel_shape")
    rank = len(kernel_shape)
    ctx.require(rank in _AVG_POOL, f"{rank}-D {op}")
    ctx.require(window.dilations is None or all(d == 1 for d in window.dilations), f"{op} dilations")
    return window, kernel_shape, rank, bool(ctx.attr("ceil_mode", 0))


@register("AveragePool", since=1)
def average_pool(ctx: NodeContext) -> Kernel:
    window, kernel_shape, rank, ceil_mode = _averaging_window(ctx, "AveragePool")
    include_pad = bool(ctx.attr("count_include_pad", 0))
    pool = _AVG_POOL[rank]

    def kernel(x: torch.Tensor) -> torch.Tensor:
        source, strides, _, padding = _pool_pads(x, window, kernel_shape, 0.0)
        if source is x:
            if rank == 1:
                return pool(x, kernel_shape, strides, padding, ceil_mode, include_pad)
            return pool(x, kernel_shape, strides, padding, ceil_mode, include_pad, None)
        # Explicitly padded: the sum over each window divided by the count of real (or all) cells.
        total = pool(source, kernel_shape, strides, 0, ceil_mode, True)
        if include_pad:
            return total
        _, _, begin, end = window.resolve(x.shape[2:], kernel_shape)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        count = pool(F.pad(ones, _torch_pads(begin, end)), kernel_shape, strides, 0, ceil_mode, True)
        return total / count

    return kernel


@register("LpPool", since=11)
def lp_pool(ctx: NodeContext) -> Kernel:
    window, kernel_shape, rank, ceil_mode = _averaging_window(ctx, "LpPool")
    p = ctx.attr("p", 2)
    cells = math.prod(kernel_shape)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        strides, _, begin, end = window.resolve(x.shape[2:], kernel_shape)
        powered = F.pad(x.abs().pow(p), _torch_pads(begin, end))
        mean = _AVG_POOL[rank](powered, kernel_shape, strides, 0, ceil_mode, True)
        return (mean * cells).pow(1.0 / p)

    return kernel


@register("GlobalAveragePool", since=1)
def global_average_pool(ctx: NodeContext) -> Kernel:
    return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(ctx: NodeContext) -> Kernel:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


def _channel_view(v: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (rank - 2))


@register("BatchNormalization", since=6, fresh=True)
def batch_normalization(ctx: NodeContext) -> Kernel:
    """Batch norm with the given statistics, or (training_mode=1, opset 14+) with the batch's own,
    also returning the updated running mean and variance.

    F.batch_norm cannot differentiate the running statistics, so when they require grad the formula
    is spelled out instead.
    """
    eps = ctx.attr("epsilon", 1e-5)
    momentum = ctx.attr("momentum", 0.9)
    if ctx.version < 9:
        ctx.require(ctx.attr("spatial", 1) == 1, "BatchNormalization spatial=0")
    if ctx.version < 7:
        ctx.attr("is_test", 0)
    training = bool(ctx.attr("training_mode", 0))
    ctx.require(training or ctx.n_outputs == 1, "BatchNormalization training outputs without training_mode")

    def normalize(
        x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad):
            rank = x.dim()
            factor = scale * torch.rsqrt(var + eps)
            return (x - _channel_view(mean, rank)) * _channel_view(factor, rank) + _channel_view(bias, rank)
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    if not training:
        return normalize

    def train_kernel(
        x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [d for d in range(x.dim()) if d != 1]
        batch_var, batch_mean = torch.var_mean(x, dims, correction=0)
        y = normalize(x, scale, bias, batch_mean, batch_var)
        return y, mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum)

    return train_kernel


@register("InstanceNormalization", since=6, fresh=True)
def instance_normalization(ctx: NodeContext) -> Kernel:
    eps = ctx.attr("epsilon", 1e-5)
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@register("LayerNormalization", since=17, fresh=True)
def layer_normalization(ctx: NodeContext) -> Kernel:
    """Normalize over axes axis..-1; stash_type=1 (float32 statistics) is what torch does internally."""
    ax = ctx.attr("axis", -1)
    eps = ctx.attr("epsilon", 1e-5)
    ctx.require(ctx.attr("stash_type", 1) == 1, "LayerNormalization stash_type != 1")
    stats = ctx.has_output(1) or ctx.has_output(2)

    def kernel(
        x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x.shape[axis(ax, x.dim()) :]
        if scale.shape != shape:
            scale = scale.expand(shape)
        if bias is not None and bias.shape != shape:
            bias = bias.expand(shape)
        if not stats:
            return F.layer_norm(x, shape, scale, bias, eps)
        return torch.native_layer_norm(x, shape, scale, bias, eps)

    return kernel


@register("GroupNormalization", since=21)
def group_normalization(ctx: NodeContext) -> Kernel:
    groups = ctx.attr("num_groups")
    eps = ctx.attr("epsilon", 1e-5)
    ctx.require(ctx.attr("stash_type", 1) == 1, "GroupNormalization stash_type != 1")
    return lambda x, scale, bias: F.group_norm(x, groups, scale, bias, eps)


@register("RMSNormalization", since=23)
def rms_normalization(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", -1)
    eps = ctx.attr("epsilon", 1e-5)
    ctx.require(ctx.attr("stash_type", 1) == 1, "RMSNormalization stash_type != 1")

    def kernel(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(axis(ax, x.dim()), x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
        return y.to(x.dtype) * scale

    return kernel


@register("LRN", since=1)
def lrn(ctx: NodeContext) -> Kernel:
    """x / (bias + alpha/size · Σ x²)^beta over the channel window [c - ⌊(size-1)/2⌋, c + ⌈(size-1)/2⌉]."""
    size = ctx.attr("size")
    alpha = ctx.attr("alpha", 1e-4)
    beta = ctx.attr("beta", 0.75)
    bias = ctx.attr("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def kernel(x: torch.Tensor) -> torch.Tensor:
        sq = x * x
        channels = x.shape[1]
        padded = F.pad(sq.movedim(1, -1), (before, after)).movedim(-1, 1)
        total = sum(padded.narrow(1, i, channels) for i in range(size))
        return x / (bias + (alpha / size) * total).pow(beta)

    return kernel


@register("LpNormalization", since=1)
def lp_normalization(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", -1)
    p = ctx.attr("p", 2)
    ctx.require(p in (1, 2), f"LpNormalization p={p}")

    def kernel(x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, p, dim=ax, keepdim=True)
        return torch.where(norm == 0, torch.zeros_like(x), x / norm)

    return kernel


@register("MeanVarianceNormalization", since=9)
def mean_variance_normalization(ctx: NodeContext) -> Kernel:
    given = ctx.attr("axes", [0, 2, 3])

    def kernel(x: torch.Tensor) -> torch.Tensor:
        dims = tuple(axes(given, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = (x * x).mean(dims, keepdim=True) - mean * mean
        return (x - mean) / (var.sqrt() + 1e-9)

    return kernel
