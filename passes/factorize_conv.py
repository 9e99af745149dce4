"""Conv (1-D / 2-D, any group) → k×k Conv to rank r, then 1×1 Conv r→out carrying the bias."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto

from inhercc.errors import InherccError
from inhercc.families import Layer, register_family
from inhercc.graph import Dim, node_attr
from inhercc.passes.base import (
    FactorizePass,
    GraphNames,
    HeadLayout,
    OpFamily,
    bias_params,
    copy_attributes,
    factor_chain,
    factor_tensors,
    heads_chain,
    stacked_heads,
)


@register_family
class ConvFamily(OpFamily):
    """A constant ``W[out, in/g, *kernel]``, one ``[out/g, in/g·prod(kernel)]`` matrix per group; calibration
    rows are the unfolded input patches (:func:`conv_patches`).

    Rewrite rules (the InherNet asymmetric split):

    1. ``Y = Conv(X, W[out, in/g, *k], bias)`` with a planned total rank ``r`` (``r/g`` per group)
       becomes ``T = Conv(X, W_in[r, in/g, *k])`` with the original ``kernel_shape``, ``strides``,
       ``pads``, ``auto_pad``, ``dilations`` and ``group`` and no bias, then
       ``Y = Conv(T, W_out[out, r/g, 1, …], bias)``, a 1×1 conv with the same ``group``.
    2. Each group is factorized on its own ``[out/g, in/g·kh·kw]`` matrix; group ``j``'s rank channels
       feed only group ``j``'s outputs, so the chain equals the grouped original at full rank.
    3. With ``heads`` H > 1 (InherNet), the 1×1 conv is the H heads at once (``r → H·out``, channels
       group-major: ``[g, H, out/g]``), reshaped to expose the head axis and mixed per sample by
       ``softmax(Flatten(GlobalAveragePool(T))·G)`` (``G = [r, H]``); the bias is added once after the mix.
    """

    op_type = "Conv"
    order = 2
    pooled_gate = True

    def describe(self, node: NodeProto, layer: Layer, shapes: Mapping[str, list[Dim]]) -> None:
        dims = layer.weight_shape
        if len(dims) < 3:
            return
        g = int(node_attr(node, "group", 1))
        layer.groups = g
        layer.kernel = dims[2:]
        layer.out_features = dims[0] // g if dims[0] % g == 0 else 0
        layer.in_features = int(np.prod(dims[1:]))
        layer.bias_params = bias_params(node, shapes)

    def check(self, node: NodeProto, layer: Layer) -> str | None:
        dims = layer.weight_shape
        if len(dims) not in (3, 4):
            return f"{len(dims) - 2}-D convolution is not supported (1-D and 2-D are)"
        if layer.out_features == 0:
            return f"output channels {dims[0]} not divisible by group={layer.groups}"
        return None

    def matrix(self, layer: Layer) -> np.ndarray:
        w = np.asarray(layer.weight, dtype=np.float64)
        return w.reshape(layer.groups, layer.out_features, layer.in_features)

    def stored_weight(self, layer: Layer, matrix: np.ndarray) -> np.ndarray:
        return matrix.reshape(layer.weight_shape)

    def calibration_geometry(self, node: NodeProto, layer: Layer) -> Hashable | None:
        return ConvGeometry.of(node, layer.kernel, layer.groups)

    def calibration_rows(
        self, value: np.ndarray, geometry: Hashable | None, mask: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        """The unfolded patches, one ``[g, positions, k]`` block per sample (no padding mask: images)."""
        assert isinstance(geometry, ConvGeometry)
        for sample in value:
            yield conv_patches(sample, geometry)

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        g, rg = input_factor.shape[0], input_factor.shape[1]
        in_per_group = layer.weight_shape[1]
        kernel = tuple(layer.kernel)
        w_in = input_factor.reshape(g * rg, in_per_group, *kernel)
        h, out = layer.heads, layer.out_features
        w_out = stacked_heads(output_factor, h).reshape(g * h * out, rg, *([1] * len(kernel)))
        a, b = factor_tensors(names, node, layer, w_in, w_out)
        attrs = copy_attributes(node)
        attrs["kernel_shape"] = list(kernel)
        second = {"kernel_shape": [1] * len(kernel), "group": g}
        if h == 1:
            return factor_chain(node, names, a, b, attrs, second), [a, b]
        dims, axis = ((h, out), 1) if g == 1 else ((g, h, out), 2)
        layout = HeadLayout(h, g * rg, dims, 1, axis, spatial=len(kernel), pooled=self.pooled_gate)
        return heads_chain(node, names, layer, (a, b), (attrs, second), layout)


class FactorizeConv(FactorizePass):
    """The Conv factorization pass (rules: :class:`ConvFamily`)."""

    op_type = "Conv"


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv does to its input's spatial axes (ONNX attributes, resolved to explicit pads)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... (ONNX order); ignored unless auto_pad is NOTSET
    dilations: tuple[int, ...]
    auto_pad: str
    groups: int

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel: Sequence[int], groups: int) -> ConvGeometry:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n = len(kernel)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        return cls(
            tuple(int(k) for k in kernel),
            tuple(int(s) for s in attrs.get("strides", [1] * n)),
            tuple(int(p) for p in attrs.get("pads", [0] * (2 * n))),
            tuple(int(d) for d in attrs.get("dilations", [1] * n)),
            auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
            int(groups),
        )

    def explicit_pads(self, spatial: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """(begin, end) padding per spatial axis for an input of size ``spatial``."""
        if self.auto_pad in ("", "NOTSET"):
            n = len(self.kernel)
            return tuple((self.pads[i], self.pads[i + n]) for i in range(n))
        if self.auto_pad == "VALID":
            return tuple((0, 0) for _ in self.kernel)
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            raise InherccError(f"unsupported Conv auto_pad {self.auto_pad!r}")
        out = []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((small, big) if self.auto_pad == "SAME_UPPER" else (big, small))
        return tuple(out)


def conv_patches(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Unfold one sample ``x[C, *spatial]`` into the patch matrix ``[groups, positions, C/g·prod(kernel)]``
    seen by a Conv with geometry ``geom`` (zero padding included, as the Conv sees it)."""
    c = x.shape[0]
    g = geom.groups
    pads = geom.explicit_pads(x.shape[1:])
    xp = np.pad(x, ((0, 0),) + pads) if any(p for pair in pads for p in pair) else x
    n = len(geom.kernel)
    span = tuple((k - 1) * d + 1 for k, d in zip(geom.kernel, geom.dilations))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(1, n + 1)))  # [C, *out_full, *span]
    index = (slice(None),) + tuple(slice(None, None, s) for s in geom.strides)
    index += tuple(slice(None, None, d) for d in geom.dilations)
    win = win[index]  # [C, *out, *kernel]
    positions = int(np.prod(win.shape[1 : n + 1]))
    kk = int(np.prod(geom.kernel))
    win = win.reshape(g, c // g, positions, kk)
    return np.ascontiguousarray(win.transpose(0, 2, 1, 3)).reshape(g, positions, (c // g) * kk)
