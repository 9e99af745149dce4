"""Gemm with a constant B → two Gemms ``Gemm(Gemm(x, A), B, C)``."""

from __future__ import annotations

import numpy as np
import onnx
from inhercc.passes.base import FactorizePass, GraphNames, copy_attributes, factor_chain, factor_tensors, register
from onnx import NodeProto

from inhercc.layers import Layer


@register("factorize_gemm")
class FactorizeGemm(FactorizePass):
    """Rules:

    1. ``Y = alpha·X·B' + beta·C`` (``transA = 0``; ``B' = B`` or ``Bᵀ`` by ``transB``; ``B`` constant) with
       a planned rank ``r`` becomes ``T = Gemm(X, A)``; ``Y = Gemm(T, B2, C, beta)``.
    2. ``alpha`` is folded into the factorized weight; both new Gemms have ``alpha = 1``.
    3. The teacher's weight layout is kept: with ``transB = 1`` the factors are stored ``[r, in]`` and
       ``[out, r]`` (torch ``Linear`` layout) with ``transB = 1``; with ``transB = 0`` as ``[in, r]``, ``[r, out]``.
    4. ``C`` (constant, broadcast or computed) and ``beta`` move to the second Gemm unchanged.
    """

    op_type = "Gemm"

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        trans_b = 0 if layer.transposed else 1
        if trans_b:
            a, b = factor_tensors(names, node, layer, input_factor[0], output_factor[0])
        else:
            a, b = factor_tensors(names, node, layer, input_factor[0].T, output_factor[0].T)
        attrs = copy_attributes(node, skip=("alpha", "beta", "transB", "transA"))
        beta = copy_attributes(node).get("beta", 1.0)
        first, second = {"transB": trans_b, **attrs}, {"transB": trans_b, "beta": beta, **attrs}
        return factor_chain(node, names, a, b, first, second), [a, b]
