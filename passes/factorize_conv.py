"""Conv (1-D / 2-D, any group) → k×k Conv to rank r, then 1×1 Conv r→out carrying the bias."""

from __future__ import annotations

import numpy as np
import onnx
from inhercc.passes.base import FactorizePass, GraphNames, copy_attributes, factor_chain, factor_tensors, register
from onnx import NodeProto

from inhercc.layers import Layer


@register("factorize_conv")
class FactorizeConv(FactorizePass):
    """Rules (the InherNet asymmetric split):

    1. ``Y = Conv(X, W[out, in/g, *k], bias)`` with a planned total rank ``r`` (``r/g`` per group)
       becomes ``T = Conv(X, W_in[r, in/g, *k])`` with the original ``kernel_shape``, ``strides``,
       ``pads``, ``auto_pad``, ``dilations`` and ``group`` and no bias, then
       ``Y = Conv(T, W_out[out, r/g, 1, …], bias)``, a 1×1 conv with the same ``group``.
    2. Each group is factorized on its own ``[out/g, in/g·kh·kw]`` matrix; group ``j``'s rank channels
       feed only group ``j``'s outputs, so the chain equals the grouped original at full rank.
    """

    op_type = "Conv"

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        g, rg = input_factor.shape[0], input_factor.shape[1]
        in_per_group = layer.weight_shape[1]
        kernel = tuple(layer.kernel)
        w_in = input_factor.reshape(g * rg, in_per_group, *kernel)
        w_out = output_factor.reshape(g * layer.out_features, rg, *([1] * len(kernel)))
        a, b = factor_tensors(names, node, layer, w_in, w_out)
        attrs = copy_attributes(node)
        attrs["kernel_shape"] = list(kernel)
        return factor_chain(node, names, a, b, attrs, {"kernel_shape": [1] * len(kernel), "group": g}), [a, b]
