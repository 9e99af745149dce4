"""Gemm with a constant B → two Gemms ``Gemm(Gemm(x, A), B, C)``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import NodeProto

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
class GemmFamily(OpFamily):
    """A constant 2-D ``B`` (``[out, in]`` with ``transB = 1``, ``[in, out]`` without), ``alpha`` folded into
    the matrix; ``transA = 1`` is not supported.

    Rewrite rules:

    1. ``Y = alpha·X·B' + beta·C`` (``transA = 0``; ``B' = B`` or ``Bᵀ`` by ``transB``; ``B`` constant) with
       a planned rank ``r`` becomes ``T = Gemm(X, A)``; ``Y = Gemm(T, B2, C, beta)``.
    2. ``alpha`` is folded into the factorized weight; both new Gemms have ``alpha = 1``.
    3. The teacher's weight layout is kept: with ``transB = 1`` the factors are stored ``[r, in]`` and
       ``[out, r]`` (torch ``Linear`` layout) with ``transB = 1``; with ``transB = 0`` as ``[in, r]``, ``[r, out]``.
    4. ``C`` (constant, broadcast or computed) and ``beta`` move to the second Gemm unchanged.
    5. With ``heads`` H > 1, ``B2`` is the H heads stacked along ``out`` (one Gemm to ``[N, H·out]``), reshaped
       to ``[N, H, out]`` and mixed per row by ``softmax(T·G)``; ``beta·C`` is added once after the mix.
    """

    op_type = "Gemm"
    order = 1

    def describe(self, node: NodeProto, layer: Layer, shapes: Mapping[str, list[Dim]]) -> None:
        dims = layer.weight_shape
        if len(dims) != 2:
            return
        trans_b = node_attr(node, "transB", 0)
        layer.transposed = not trans_b
        layer.out_features, layer.in_features = (dims[0], dims[1]) if trans_b else (dims[1], dims[0])
        layer.scale = float(node_attr(node, "alpha", 1.0))
        layer.bias_params = bias_params(node, shapes)

    def check(self, node: NodeProto, layer: Layer) -> str | None:
        reason = super().check(node, layer)
        if reason is None and node_attr(node, "transA", 0):
            return "unsupported attribute transA=1"
        return reason

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        trans_b = 0 if layer.transposed else 1
        heads = stacked_heads(output_factor, layer.heads)
        if trans_b:
            a, b = factor_tensors(names, node, layer, input_factor[0], heads[0])
        else:
            a, b = factor_tensors(names, node, layer, input_factor[0].T, heads[0].T)
        attrs = copy_attributes(node, skip=("alpha", "beta", "transB", "transA"))
        beta = copy_attributes(node).get("beta", 1.0)
        first, second = {"transB": trans_b, **attrs}, {"transB": trans_b, "beta": beta, **attrs}
        if layer.heads == 1:
            return factor_chain(node, names, a, b, first, second), [a, b]
        layout = HeadLayout(layer.heads, input_factor.shape[1], (layer.heads, layer.out_features), 1, 1)
        return heads_chain(node, names, layer, (a, b), (first, first), layout, beta=float(beta))


class FactorizeGemm(FactorizePass):
    """The Gemm factorization pass (rules: :class:`GemmFamily`)."""

    op_type = "Gemm"
