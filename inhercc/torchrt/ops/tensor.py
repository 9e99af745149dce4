"""Shape and data-movement ops: Shape, Reshape, Transpose, Concat, Split, Slice, Gather, Scatter, Pad, Cast…

Shape-valued inputs (Reshape's shape, Slice's starts…) are read as Python ints: baked in when they are
build-time constants, otherwise taken from the runtime tensor, which the module keeps on the CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from inhercc.errors import InherccError
from inhercc.torchrt.dtypes import FLOAT8_DTYPES, torch_dtype
from inhercc.torchrt.ops.common import axes, axis, ints, scalar
from inhercc.torchrt.ops.registry import Kernel, NodeContext, Unsupported, one_of, register


def _target_dtype(elem_type: int) -> torch.dtype:
    try:
        return torch_dtype(elem_type)
    except InherccError as e:
        raise Unsupported(str(e)) from None


@register("Constant", since=1)
def constant(ctx: NodeContext) -> Kernel:
    """The node's value; the module folds it into a constant at build time."""
    value: torch.Tensor | None = None
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if not ctx.has_attr(name):
            continue
        v = ctx.attr(name)
        if name == "value":
            value = v
        elif name.startswith("value_float"):
            value = torch.tensor(v, dtype=torch.float32)
        else:
            value = torch.tensor(v, dtype=torch.int64)
    if value is None:
        present = [n for n in ("sparse_value", "value_string", "value_strings") if ctx.has_attr(n)]
        raise Unsupported(f"Constant with {present[0] if present else 'no value'}")
    return lambda: value


@register("Identity", since=1)
def identity(ctx: NodeContext) -> Kernel:
    return lambda x: x


@register("Shape", since=1, static_inputs=(0,))
def shape(ctx: NodeContext) -> Kernel:
    """The input's shape as a CPU int64 tensor (shape arithmetic stays on the host)."""
    start = ctx.attr("start", 0)
    end = ctx.attr("end", None)
    if start == 0 and end is None:
        return lambda x: torch.tensor(x.shape, dtype=torch.int64)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        rank = x.dim()
        lo = min(max(start + rank if start < 0 else start, 0), rank)
        hi = rank if end is None else min(max(end + rank if end < 0 else end, 0), rank)
        return torch.tensor(x.shape[lo:hi], dtype=torch.int64)

    return kernel


@register("Size", since=1, static_inputs=(0,))
def size(ctx: NodeContext) -> Kernel:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


def _float8_overflow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where x rounds (to nearest even) beyond the largest finite value of a float8 type."""
    finite = torch.finfo(dtype).max
    mantissa_bits = 3 if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else 2
    exponent = math.floor(math.log2(finite))
    threshold = finite + 2.0 ** (exponent - mantissa_bits) / 2
    max_is_odd = int(finite / 2.0**exponent * 2**mantissa_bits) % 2 == 1  # a tie then rounds up
    magnitude = x.abs()
    return magnitude >= threshold if max_is_odd else magnitude > threshold


def _to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """ONNX float8 casts: saturate=1 clamps to the finite range (inf included), saturate=0 overflows
    to inf where the type has one (e5m2) and to NaN otherwise. torch's own casts do neither uniformly."""
    if not x.is_floating_point():
        return x.to(dtype)
    x = x.float()
    if saturate:
        finite = torch.finfo(dtype).max
        return torch.where(x.isnan(), x, x.clamp(-finite, finite)).to(dtype)
    if dtype == torch.float8_e5m2:
        return x.to(dtype)
    return torch.where(_float8_overflow(x, dtype), torch.full_like(x, float("nan")), x).to(dtype)


def _saturate_attr(ctx: NodeContext) -> bool:
    """Cast/CastLike's float8 attributes: `saturate` (returned) and `round_mode` (float8e8m0 only)."""
    ctx.require(ctx.attr("round_mode", "up") == "up", "round_mode other than 'up'")
    return bool(ctx.attr("saturate", 1))


@register("Cast", since=6)
def cast(ctx: NodeContext) -> Kernel:
    dtype = _target_dtype(ctx.attr("to"))
    saturate = _saturate_attr(ctx)
    if dtype in FLOAT8_DTYPES:
        return lambda x: _to_float8(x, dtype, saturate)
    return lambda x: x.to(dtype)


@register("CastLike", since=15, static_inputs=(1,))
def cast_like(ctx: NodeContext) -> Kernel:
    saturate = _saturate_attr(ctx)

    def kernel(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dtype in FLOAT8_DTYPES:
            return _to_float8(x, like.dtype, saturate)
        return x.to(like.dtype)

    return kernel


def _reshape_target(shape: Sequence[int], x: torch.Tensor, allowzero: int) -> list[int]:
    """ONNX Reshape's target: 0 copies the input's dimension unless allowzero, -1 is inferred."""
    if allowzero or 0 not in shape:
        return list(shape)
    return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]


@register("Reshape", since=5, static_inputs=(1,))
def reshape(ctx: NodeContext) -> Kernel:
    allowzero = ctx.attr("allowzero", 0)
    const = ctx.const_ints(1)
    if const is not None and (allowzero or 0 not in const):
        return lambda x, s: x.reshape(const)
    if const is not None:
        return lambda x, s: x.reshape(_reshape_target(const, x, allowzero))
    return lambda x, s: x.reshape(_reshape_target(ints(s), x, allowzero))


@register("Flatten", since=1)
def flatten(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", 1)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        a = ax + x.dim() if ax < 0 else ax
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return kernel


@register("Transpose", since=1)
def transpose(ctx: NodeContext) -> Kernel:
    perm = ctx.attr("perm", None)
    if perm is None:
        return lambda x: x.permute(tuple(reversed(range(x.dim()))))
    return lambda x: x.permute(perm)


def _axes_input_builder(ctx: NodeContext) -> tuple[list[int] | None, bool]:
    """Axes of Squeeze/Unsqueeze: an attribute before opset 13, an input after. (axes, from_runtime)."""
    if ctx.version < 13:
        return ctx.attr("axes", None), False
    if not ctx.has_input(1):
        return None, False
    const = ctx.const_ints(1)
    return const, const is None


@register("Squeeze", since=1, static_inputs=(1,))
def squeeze(ctx: NodeContext) -> Kernel:
    const, runtime = _axes_input_builder(ctx)

    def kernel(x: torch.Tensor, ax: torch.Tensor | None = None) -> torch.Tensor:
        values = ints(ax) if runtime else const
        if values is None:
            return x.squeeze()
        if not values:
            return x
        return x.squeeze(tuple(axes(values, x.dim())))

    return kernel


@register("Unsqueeze", since=1, static_inputs=(1,))
def unsqueeze(ctx: NodeContext) -> Kernel:
    const, runtime = _axes_input_builder(ctx)
    ctx.require(runtime or const is not None, "Unsqueeze without axes")

    def kernel(x: torch.Tensor, ax: torch.Tensor | None = None) -> torch.Tensor:
        values = ints(ax) if runtime else const
        rank = x.dim() + len(values)
        for a in sorted(axes(values, rank)):
            x = x.unsqueeze(a)
        return x

    return kernel


@register("Concat", since=4)
def concat(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis")
    return lambda *xs: torch.cat(xs, ax)


@register("Split", since=2, static_inputs=(1,))
def split(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", 0)
    parts = len(ctx.outputs)
    if ctx.version >= 18:
        parts = ctx.attr("num_outputs", parts)
    if ctx.version < 13:
        const = ctx.attr("split", None)
        runtime = False
    else:
        const = ctx.const_ints(1)
        runtime = ctx.has_input(1) and const is None

    def kernel(x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        given = ints(sizes) if runtime else const
        if not given:
            length = x.shape[ax]
            chunk = -(-length // parts)
            given = [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
        return torch.split(x, given, ax)

    return kernel


def _slice(
    x: torch.Tensor, starts: Sequence[int], ends: Sequence[int], ax: Sequence[int], steps: Sequence[int]
) -> torch.Tensor:
    """ONNX Slice semantics (clamping, negative indices, negative steps via flip)."""
    index: list[slice] = [slice(None)] * x.dim()
    flips: list[int] = []
    for s, e, a, st in zip(starts, ends, ax, steps):
        a = axis(a, x.dim())
        n = x.shape[a]
        if st == 0:
            raise ValueError("Slice step 0")
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
            index[a] = slice(s, max(e, s), st)
        else:
            s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
            flips.append(a)
            lo, hi = n - 1 - s, n - 1 - e
            index[a] = slice(lo, max(hi, lo), -st)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@register("Slice", since=1, until=9)
def slice_1(ctx: NodeContext) -> Kernel:
    starts, ends = ctx.attr("starts"), ctx.attr("ends")
    ax = ctx.attr("axes", list(range(len(starts))))
    return lambda x: _slice(x, starts, ends, ax, [1] * len(starts))


@register("Slice", since=10, static_inputs=(1, 2, 3, 4))
def slice_(ctx: NodeContext) -> Kernel:
    consts = [ctx.const_ints(i) for i in range(1, 5)]
    present = [ctx.has_input(i) for i in range(1, 5)]

    def value(i: int, given: torch.Tensor | None) -> list[int] | None:
        if not present[i]:
            return None
        return consts[i] if consts[i] is not None else ints(given)

    if all(c is not None or not p for c, p in zip(consts, present)):
        starts, ends = consts[0], consts[1]
        ax = consts[2] if present[2] else list(range(len(starts)))
        steps = consts[3] if present[3] else [1] * len(starts)
        return lambda x, *_: _slice(x, starts, ends, ax, steps)

    def kernel(
        x: torch.Tensor, s: torch.Tensor, e: torch.Tensor, a: torch.Tensor | None = None, st: torch.Tensor | None = None
    ) -> torch.Tensor:
        starts, ends = value(0, s), value(1, e)
        ax = value(2, a) or list(range(len(starts)))
        steps = value(3, st) or [1] * len(starts)
        return _slice(x, starts, ends, ax, steps)

    return kernel


def _fix_negative(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices counted from the end (-1 = last) made non-negative."""
    return torch.where(index < 0, index + n, index)


@register("Gather", since=1, fresh=True)
def gather(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", 0)
    const = ctx.const(1)
    may_be_negative = const is None or bool((const < 0).any())

    def kernel(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = ax + x.dim() if ax < 0 else ax
        if may_be_negative:
            index = _fix_negative(index, x.shape[a])
        if a == 0 and x.dim() == 2 and index.dim() > 0 and x.is_floating_point():
            return F.embedding(index, x)
        out = x.index_select(a, index.reshape(-1))
        return out.reshape(x.shape[:a] + index.shape + x.shape[a + 1 :])

    return kernel


@register("GatherElements", since=11)
def gather_elements(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", 0)

    def kernel(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        return torch.gather(x, a, _fix_negative(index, x.shape[a]))

    return kernel


def _nd_index(x: torch.Tensor, index: torch.Tensor, batch_dims: int) -> tuple[torch.Tensor, ...]:
    """Advanced-index tuple for GatherND/ScatterND on x reshaped to (prod(batch), *rest)."""
    k = index.shape[-1]
    batch = math.prod(x.shape[:batch_dims])
    flat = index.reshape(batch, -1, k)
    dims = torch.tensor(x.shape[batch_dims : batch_dims + k], dtype=index.dtype, device=index.device)
    flat = torch.where(flat < 0, flat + dims, flat)
    rows = torch.arange(batch, device=index.device).reshape(batch, 1).expand(batch, flat.shape[1])
    return (rows, *flat.unbind(-1))


@register("GatherND", since=11)
def gather_nd(ctx: NodeContext) -> Kernel:
    batch_dims = ctx.attr("batch_dims", 0)

    def kernel(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        k = index.shape[-1]
        flat_x = x.reshape(math.prod(x.shape[:batch_dims]), *x.shape[batch_dims:])
        out = flat_x[_nd_index(x, index, batch_dims)]
        return out.reshape(tuple(index.shape[:-1]) + tuple(x.shape[batch_dims + k :]))

    return kernel


_INDEX_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterND", since=11)
def scatter_nd(ctx: NodeContext) -> Kernel:
    reduction = one_of(ctx, "reduction", "none", ("none", "add", "mul", "max", "min"))

    def kernel(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = index.shape[-1]
        lead, rest = x.shape[:k], x.shape[k:]
        strides = torch.tensor([math.prod(lead[j + 1 :]) for j in range(k)], dtype=torch.int64, device=index.device)
        dims = torch.tensor(lead, dtype=torch.int64, device=index.device)
        index = index.to(torch.int64)
        linear = (torch.where(index < 0, index + dims, index) * strides).sum(-1).reshape(-1)
        flat = x.reshape(math.prod(lead), *rest)
        values = updates.reshape(-1, *rest)
        if reduction == "none":
            out = flat.index_copy(0, linear, values)
        elif reduction == "add":
            out = flat.index_add(0, linear, values)
        else:
            with warnings.catch_warnings():  # "index_reduce() is in beta"
                warnings.simplefilter("ignore", UserWarning)
                out = flat.index_reduce(0, linear, values, _INDEX_REDUCE[reduction], include_self=True)
        return out.reshape(x.shape)

    return kernel


@register("ScatterElements", since=11)
def scatter_elements(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", 0)
    reduction = one_of(ctx, "reduction", "none", ("none", "add", "mul", "max", "min"))
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(reduction)

    def kernel(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        index = _fix_negative(index, x.shape[a]).to(torch.int64)
        if reduce is None:
            return torch.scatter(x, a, index, updates)
        return torch.scatter_reduce(x, a, index, updates, reduce, include_self=True)

    return kernel


register("Scatter", since=9, until=10)(scatter_elements)


@register("Expand", since=8, static_inputs=(1,))
def expand(ctx: NodeContext) -> Kernel:
    const = ctx.const_ints(1)

    def kernel(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        target = const if const is not None else ints(s)
        return x.expand(torch.broadcast_shapes(x.shape, tuple(target)))

    return kernel


@register("Tile", since=6, static_inputs=(1,))
def tile(ctx: NodeContext) -> Kernel:
    const = ctx.const_ints(1)
    return lambda x, r: x.repeat(const if const is not None else ints(r))


def _pad_index(n: int, begin: int, end: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source positions for an axis of length n padded by (begin, end) in edge/reflect/wrap mode."""
    pos = torch.arange(-begin, n + end, device=device)
    if mode == "edge":
        return pos.clamp(0, n - 1)
    if mode == "wrap":
        return pos.remainder(n)
    if n == 1:
        return torch.zeros_like(pos)
    period = 2 * (n - 1)
    pos = pos.remainder(period)
    return torch.where(pos >= n, period - pos, pos)


def _pad(x: torch.Tensor, pads: Sequence[int], mode: str, value: float | int | bool) -> torch.Tensor:
    """ONNX Pad; `pads` = [begin_0 … begin_{r-1}, end_0 … end_{r-1}], negative pads crop."""
    rank = x.dim()
    if mode == "constant":
        torch_pads: list[int] = []
        for d in reversed(range(rank)):
            torch_pads += [pads[d], pads[d + rank]]
        while torch_pads and torch_pads[-1] == 0 and torch_pads[-2] == 0:
            torch_pads = torch_pads[:-2]
        if not torch_pads:
            return x
        if x.dtype == torch.bool:
            value = bool(value)
        elif not x.is_floating_point():
            value = int(value)
        return F.pad(x, torch_pads, value=value)
    for d in range(rank):
        begin, end = pads[d], pads[d + rank]
        if begin == 0 and end == 0:
            continue
        if begin < 0 or end < 0:
            cut_begin, cut_end = max(-begin, 0), max(-end, 0)
            x = x.narrow(d, cut_begin, x.shape[d] - cut_begin - cut_end)
            begin, end = max(begin, 0), max(end, 0)
        x = x.index_select(d, _pad_index(x.shape[d], begin, end, mode, x.device))
    return x


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


@register("Pad", since=2, until=10)
def pad_2(ctx: NodeContext) -> Kernel:
    pads = ctx.attr("pads")
    mode = one_of(ctx, "mode", "constant", _PAD_MODES[:3])
    value = ctx.attr("value", 0.0)
    return lambda x: _pad(x, pads, mode, value)


@register("Pad", since=11, static_inputs=(1, 3))
def pad(ctx: NodeContext) -> Kernel:
    mode = one_of(ctx, "mode", "constant", _PAD_MODES if ctx.version >= 19 else _PAD_MODES[:3])
    const_pads = ctx.const_ints(1)
    const_axes = ctx.const_ints(3)
    runtime_axes = ctx.has_input(3) and const_axes is None
    has_value = ctx.has_input(2)
    const_value = ctx.const(2)
    value_number = 0 if const_value is None or const_value.numel() == 0 else scalar(const_value)

    def kernel(
        x: torch.Tensor, p: torch.Tensor, v: torch.Tensor | None = None, a: torch.Tensor | None = None
    ) -> torch.Tensor:
        given = const_pads if const_pads is not None else ints(p)
        ax = ints(a) if runtime_axes else const_axes
        if ax is not None:
            rank = x.dim()
            full = [0] * (2 * rank)
            for i, d in enumerate(axes(ax, rank)):
                full[d], full[d + rank] = given[i], given[i + len(ax)]
            given = full
        fill = value_number
        if has_value and const_value is None and v.numel():
            fill = scalar(v)
        return _pad(x, given, mode, fill)

    return kernel


@register("ConstantOfShape", since=9, static_inputs=(0,))
def constant_of_shape(ctx: NodeContext) -> Kernel:
    value = ctx.attr("value", None)
    fill = 0.0 if value is None else value.reshape(-1)[0].item()
    dtype = torch.float32 if value is None else value.dtype
    return lambda s: torch.full(ints(s), fill, dtype=dtype)


@register("Range", since=11, static_inputs=(0, 1, 2))
def range_(ctx: NodeContext) -> Kernel:
    """start + i * delta for i < ceil((limit - start) / delta), in the inputs' dtype."""

    def kernel(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s, lim, d = scalar(start), scalar(limit), scalar(delta)
        count = max(math.ceil((lim - s) / d), 0)
        if start.is_floating_point():
            return (torch.arange(count, dtype=torch.float64) * d + s).to(start.dtype)
        return torch.arange(s, s + count * d, d, dtype=start.dtype)

    return kernel


@register("Trilu", since=14, static_inputs=(1,))
def trilu(ctx: NodeContext) -> Kernel:
    upper = ctx.attr("upper", 1)
    const = ctx.const_ints(1)
    fn = torch.triu if upper else torch.tril

    def kernel(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diagonal = const[0] if const is not None else (0 if k is None else int(scalar(k)))
        return fn(x, diagonal)

    return kernel


@register("Dropout", since=6)
def dropout(ctx: NodeContext) -> Kernel:
    """Inference Dropout: the identity (plus an all-true mask), as in inference runtimes.

    From opset 12 training is a runtime input; a graph that turns it on is not supported.
    """
    ctx.ignore("seed", "ratio", "is_test")
    if ctx.has_input(2):
        training = ctx.const(2)
        ctx.require(training is not None and not bool(training.reshape(-1)[0]), "Dropout in training mode")
    want_mask = ctx.has_output(1)

    def kernel(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if want_mask:
            return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
        return x

    return kernel


@register("OneHot", since=9, static_inputs=(1,))
def one_hot(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", -1)
    const_depth = ctx.const(1)

    def kernel(index: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n = int(scalar(const_depth if const_depth is not None else depth))
        index = index.to(torch.int64)
        index = torch.where(index < 0, index + n, index)
        valid = (index >= 0) & (index < n)
        hot = F.one_hot(index.clamp(0, n - 1), n).bool() & valid.unsqueeze(-1)
        hot = hot.movedim(-1, axis(ax, index.dim() + 1))
        return torch.where(hot, values[1], values[0])

    return kernel


@register("NonZero", since=9)
def non_zero(ctx: NodeContext) -> Kernel:
    return lambda x: torch.nonzero(x).T.contiguous()


@register("TopK", since=10, static_inputs=(1,))
def top_k(ctx: NodeContext) -> Kernel:
    """Stable sort then narrow, so ties keep the lower index first as ONNX requires."""
    ax = ctx.attr("axis", -1)
    largest = ctx.attr("largest", 1)
    ctx.attr("sorted", 1)
    const_k = ctx.const_ints(1)

    def kernel(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = const_k[0] if const_k is not None else ints(k)[0]
        values, index = torch.sort(x, dim=ax, descending=bool(largest), stable=True)
        return values.narrow(ax, 0, count), index.narrow(ax, 0, count)

    return kernel


@register("DepthToSpace", since=11)
def depth_to_space(ctx: NodeContext) -> Kernel:
    block = ctx.attr("blocksize")
    mode = one_of(ctx, "mode", "DCR", ("DCR", "CRD"))

    def kernel(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // block**2, h * block, w * block)

    return kernel


@register("SpaceToDepth", since=1)
def space_to_depth(ctx: NodeContext) -> Kernel:
    block = ctx.attr("blocksize")
    mode = one_of(ctx, "mode", "DCR", ("DCR", "CRD")) if ctx.version >= 28 else "DCR"
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // block, block, w // block, block).permute(order)
        return y.reshape(n, c * block**2, h // block, w // block)

    return kernel


@register("CenterCropPad", since=18, static_inputs=(1,))
def center_crop_pad(ctx: NodeContext) -> Kernel:
    """Crop or zero-pad each listed axis to the target length, keeping the centre (extra cell at the end)."""
    given_axes = ctx.attr("axes", None)
    const = ctx.const_ints(1)

    def kernel(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sizes = const if const is not None else ints(target)
        dims = axes(given_axes, x.dim()) if given_axes is not None else list(range(x.dim()))
        for d, want in zip(dims, sizes):
            have = x.shape[d]
            if want < have:
                x = x.narrow(d, (have - want) // 2, want)
            elif want > have:
                before = (want - have) // 2
                pads = [0, 0] * (x.dim() - 1 - d) + [before, want - have - before]
                x = F.pad(x, pads)
        return x

    return kernel


@register("EyeLike", since=9)
def eye_like(ctx: NodeContext) -> Kernel:
    k = ctx.attr("k", 0)
    to = ctx.attr("dtype", None)
    dtype = None if to is None else _target_dtype(to)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device).reshape(-1, 1)
        cols = torch.arange(x.shape[1], device=x.device).reshape(1, -1)
        return (cols - rows == k).to(dtype or x.dtype)

    return kernel


@register("Compress", since=11)
def compress(ctx: NodeContext) -> Kernel:
    ax = ctx.attr("axis", None)

    def kernel(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        source = x.reshape(-1) if ax is None else x
        a = 0 if ax is None else axis(ax, x.dim())
        keep = torch.nonzero(condition[: source.shape[a]].to(torch.bool)).reshape(-1)
        return source.index_select(a, keep)

    return kernel


@register("ReverseSequence", since=10)
def reverse_sequence(ctx: NodeContext) -> Kernel:
    batch_axis = ctx.attr("batch_axis", 1)
    time_axis = ctx.attr("time_axis", 0)

    def kernel(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[time_axis], device=x.device).reshape(1, -1)
        lens = lengths.to(x.device).reshape(-1, 1)
        source = torch.where(steps < lens, lens - 1 - steps, steps)  # [batch, time]
        if batch_axis > time_axis:
            source = source.T
        shape = [1] * x.dim()
        shape[batch_axis], shape[time_axis] = x.shape[batch_axis], x.shape[time_axis]
        return torch.gather(x, time_axis, source.reshape(shape).expand(x.shape))

    return kernel
