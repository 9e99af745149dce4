"""Resampling: Resize, the deprecated Upsample, and GridSample.

Resize is separable, so each resized axis becomes one gather of n neighbours plus a weighted sum. The
neighbour indices and weights depend only on sizes, scales and attributes; they are computed on the host
with the exact formulas of ONNX's reference implementation and cached per geometry, which keeps every
coordinate mode, nearest mode, cubic coefficient, exclude_outside and antialias variant exact, while the
tensor work stays in torch (and differentiable).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.common import axes as normalize_axes
from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register

_COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")

Coefficients = Callable[[float, float], np.ndarray]


def _nearest_coeffs(mode: str) -> Coefficients:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        if mode == "round_prefer_floor":
            return np.array([ratio <= 0.5, ratio > 0.5], dtype=np.float64)
        if mode == "round_prefer_ceil":
            return np.array([ratio < 0.5, ratio >= 0.5], dtype=np.float64)
        return np.array([1.0, 0.0]) if mode == "floor" else np.array([0.0, 1.0])

    return coeffs


def _linear_coeffs(antialias: bool) -> Coefficients:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([1.0 - ratio, ratio])
        scale = min(scale, 1.0)
        start = int(np.floor(-1 / scale) + 1)
        footprint = 2 - 2 * start
        args = (np.arange(start, start + footprint) - ratio) * scale
        weights = np.clip(1 - np.abs(args), 0, 1)
        return weights / weights.sum()

    return coeffs


def _cubic_coeffs(a: float, antialias: bool) -> Coefficients:
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([kernel(ratio + 1), kernel(ratio), kernel(1 - ratio), kernel(2 - ratio)])
        scale = min(scale, 1.0)
        start = int(np.floor(-2 / scale) + 1)
        weights = np.array([kernel(scale * (i - ratio)) for i in range(start, 2 - start)])
        return weights / weights.sum()

    return coeffs


def _source_coordinates(
    mode: str, out_size: int, in_size: int, scale: float, roi: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Source coordinate of every output position, and (crop-and-resize only) which lie outside."""
    y = np.arange(out_size, dtype=np.float64)
    out_width = scale * in_size
    if mode == "align_corners":
        return (np.zeros(out_size) if out_width == 1 else y * (in_size - 1) / (out_width - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        if out_width == 1:
            x = np.full(out_size, (hi - lo) * (in_size - 1) / 2)
        else:
            x = y * (hi - lo) * (in_size - 1) / (out_width - 1)
        x = x + lo * (in_size - 1)
        return x, (x < 0) | (x > in_size - 1)
    if mode == "pytorch_half_pixel":
        return (np.full(out_size, -0.5) if out_width == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5, None
    # half_pixel_symmetric
    offset = in_size / 2 * (1 - out_size / out_width)
    return offset + (y + 0.5) / scale - 0.5, None


@functools.lru_cache(maxsize=256)
def _axis_plan(
    coefficients: Coefficients,
    mode: str,
    exclude_outside: bool,
    in_size: int,
    out_size: int,
    scale: float,
    roi: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One axis: (neighbour indices [out, n] and weights [out, n]) or, when every weight row is one-hot
    (nearest), (source index [out], None); plus the extrapolated-position mask [out] or None."""
    x, outside = _source_coordinates(mode, out_size, in_size, scale, roi)
    base = np.floor(x).astype(np.int64)
    ratios = np.where(x == base, 1.0, x - base)
    weights = np.stack([np.asarray(coefficients(float(r), scale), dtype=np.float64) for r in ratios])
    n = weights.shape[1]
    pad = int(math.ceil(n / 2))
    shifted = x + pad
    floor = np.floor(shifted).astype(np.int64)
    frac = shifted - floor
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    index = (floor + offset)[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        weights = np.where((index < 0) | (index >= in_size), 0.0, weights)
        total = weights.sum(-1, keepdims=True)
        weights = weights / np.where(total == 0, 1.0, total)
    index = np.clip(index, 0, in_size - 1)
    mask = None if outside is None or not outside.any() else torch.from_numpy(outside)
    if np.isin(weights, (0.0, 1.0)).all() and (weights.sum(-1) == 1).all():
        return torch.from_numpy(index[np.arange(len(index)), weights.argmax(-1)]), None, mask
    return torch.from_numpy(index), torch.from_numpy(weights), mask


def _resize_axis(
    x: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    weights: torch.Tensor | None,
    mask: torch.Tensor | None,
    extrapolation: float,
) -> torch.Tensor:
    """Resample one axis: gather the neighbours and blend them with their weights."""
    out = index.shape[0]
    index = index.to(x.device)
    if weights is None:  # nearest: a pure gather, exact for every dtype
        y = x.index_select(dim, index)
    else:
        n = index.shape[1]
        compute = x.dtype if x.is_floating_point() else torch.float64
        gathered = x.index_select(dim, index.reshape(-1)).to(compute)
        gathered = gathered.reshape(x.shape[:dim] + (out, n) + x.shape[dim + 1 :])
        w = weights.to(device=x.device, dtype=compute).reshape((out, n) + (1,) * (x.dim() - dim - 1))
        y = (gathered * w).sum(dim + 1)
    if mask is not None:
        shape = (out,) + (1,) * (x.dim() - dim - 1)
        y = torch.where(
            mask.to(x.device).reshape(shape), torch.tensor(extrapolation, dtype=y.dtype, device=y.device), y
        )
    return y


def _saturate(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast back to the input dtype, rounding and clamping integers as ONNX's reference does."""
    if y.dtype == dtype:
        return y
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = y.round().clamp(info.min, info.max)
    return y.to(dtype)


def _resize(
    x: torch.Tensor,
    coefficients: Coefficients,
    coordinate_mode: str,
    exclude_outside: bool,
    extrapolation: float,
    scales: Sequence[float] | None,
    sizes: Sequence[int] | None,
    axes: Sequence[int] | None,
    roi: Sequence[float] | None,
    policy: str,
) -> torch.Tensor:
    rank = x.dim()
    ax = normalize_axes(axes, rank) if axes is not None else list(range(rank))
    full_roi: list[float] | None = None
    if roi is not None and len(roi):
        full_roi = [0.0] * rank + [1.0] * rank
        for i, d in enumerate(ax):
            full_roi[d], full_roi[rank + d] = roi[i], roi[len(ax) + i]
    factor = [1.0] * rank
    out_size = list(x.shape)
    if sizes is not None:
        for i, d in enumerate(ax):
            out_size[d] = int(sizes[i])
            factor[d] = out_size[d] / x.shape[d]
        if policy != "stretch":
            chosen = [factor[d] for d in ax]
            scale = min(chosen) if policy == "not_larger" else max(chosen)
            for d in ax:
                factor[d] = scale
                out_size[d] = int(scale * x.shape[d] + 0.5)
    else:
        for i, d in enumerate(ax):
            factor[d] = float(scales[i])
            out_size[d] = int(factor[d] * x.shape[d])
    y = x
    for d in ax:
        axis_roi = None if full_roi is None else (full_roi[d], full_roi[rank + d])
        trivial_roi = axis_roi is None or (math.isclose(axis_roi[0], 0.0) and math.isclose(axis_roi[1], 1.0))
        if math.isclose(factor[d], 1.0) and out_size[d] == y.shape[d] and trivial_roi:
            continue
        if out_size[d] == 0:
            shape = list(y.shape)
            shape[d] = 0
            y = y.new_empty(shape)
            continue
        index, weights, mask = _axis_plan(
            coefficients, coordinate_mode, exclude_outside, y.shape[d], out_size[d], factor[d], axis_roi
        )
        y = _resize_axis(y, d, index, weights, mask, extrapolation)
    return _saturate(y, x.dtype)


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None or t.numel() == 0 else [float(v) for v in t.reshape(-1).tolist()]


@register("Resize", since=10, static_inputs=(1, 2, 3))
def resize(ctx: NodeContext) -> Kernel:
    mode = one_of(ctx, "mode", "nearest", ("nearest", "linear", "cubic"))
    if ctx.version < 11:
        coordinate_mode, nearest_mode = "asymmetric", "floor"
    else:
        modes = (
            _COORDINATE_MODES
            if ctx.version >= 19
            else tuple(m for m in _COORDINATE_MODES if m != "half_pixel_symmetric")
        )
        coordinate_mode = one_of(ctx, "coordinate_transformation_mode", "half_pixel", modes)
        nearest_mode = one_of(ctx, "nearest_mode", "round_prefer_floor", _NEAREST_MODES)
    cubic_a = ctx.attr("cubic_coeff_a", -0.75)
    exclude_outside = bool(ctx.attr("exclude_outside", 0))
    extrapolation = ctx.attr("extrapolation_value", 0.0)
    antialias = bool(ctx.attr("antialias", 0))
    axes = ctx.attr("axes", None)
    policy = one_of(ctx, "keep_aspect_ratio_policy", "stretch", ("stretch", "not_larger", "not_smaller"))
    ctx.require(not (antialias and mode == "nearest"), "antialias with nearest")
    if mode == "nearest":
        coefficients = _nearest_coeffs(nearest_mode)
    elif mode == "linear":
        coefficients = _linear_coeffs(antialias)
    else:
        coefficients = _cubic_coeffs(cubic_a, antialias)
    has_roi = ctx.version >= 11
    scale_input, size_input = (2, 3) if has_roi else (1, None)

    def kernel(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        given = (x, *rest) + (None,) * 4
        roi = _floats(given[1]) if has_roi else None
        scales = _floats(given[scale_input])
        sizes = None if size_input is None else _floats(given[size_input])
        return _resize(
            x,
            coefficients,
            coordinate_mode,
            exclude_outside,
            extrapolation,
            scales,
            None if sizes is None else [int(s) for s in sizes],
            axes,
            roi,
            policy,
        )

    return kernel


@register("Upsample", since=7, until=9, static_inputs=(1,))
def upsample(ctx: NodeContext) -> Kernel:
    """Deprecated Upsample: Resize with asymmetric coordinates (floor for nearest)."""
    mode = one_of(ctx, "mode", "nearest", ("nearest", "linear", "bilinear"))
    coefficients = _nearest_coeffs("floor") if mode == "nearest" else _linear_coeffs(False)
    attr_scales = ctx.attr("scales", None) if ctx.version < 9 else None

    def kernel(x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        factor = attr_scales if attr_scales is not None else _floats(scales)
        return _resize(x, coefficients, "asymmetric", False, 0.0, factor, None, None, None, "stretch")

    return kernel


_GRID_MODES = {
    "linear": "bilinear",
    "bilinear": "bilinear",
    "nearest": "nearest",
    "cubic": "bicubic",
    "bicubic": "bicubic",
}


@register("GridSample", since=16, fresh=True)
def grid_sample(ctx: NodeContext) -> Kernel:
    """torch's grid_sample (4-D all modes, 5-D linear/nearest), whose conventions ONNX adopted."""
    names = ("bilinear", "nearest", "bicubic") if ctx.version < 20 else ("linear", "nearest", "cubic")
    mode = _GRID_MODES[one_of(ctx, "mode", names[0], names)]
    padding = one_of(ctx, "padding_mode", "zeros", ("zeros", "border", "reflection"))
    align = bool(ctx.attr("align_corners", 0))

    def kernel(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (4, 5) or (x.dim() == 5 and mode == "bicubic"):
            raise ValueError(f"GridSample on {x.dim()}-D input with mode {mode} is not supported")
        return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding, align_corners=align)

    return kernel
