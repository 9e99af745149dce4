"""MatMul with a constant 2-D weight → two runtime MatMuls ``(x·A)·B``."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto

from inhercc.families import Layer, register_family
from inhercc.passes.base import (
    FactorizePass,
    GraphNames,
    HeadLayout,
    OpFamily,
    factor_chain,
    factor_tensors,
    heads_chain,
    stacked_heads,
)


@register_family
class MatMulFamily(OpFamily):
    """A constant ``[in, out]`` weight multiplying the last axis of the input (the :class:`OpFamily` defaults).
    A MatMul of two activations (attention scores) is no layer.

    Rewrite rules:

    1. ``Y = MatMul(X, W)``, ``W`` a constant ``[in, out]`` initializer with a planned rank ``r``, becomes
       ``T = MatMul(X, A)``; ``Y = MatMul(T, B)`` with ``A = [in, r]`` (the input factor, a linear in→r) and
       ``B = [r, out]`` (the output factor carrying Σ under the default split).
    2. ``X`` may have any rank ≥ 1 (the products broadcast exactly like the original).
    3. ``Y`` keeps its name, so consumers (a following bias ``Add``, say) are untouched; ``A`` and ``B``
       are separate initializers, so ONNX Runtime cannot fold them back into one matrix.
    4. With ``heads`` H > 1, ``B`` is the H heads side by side (``[r, H·out]``, one MatMul), reshaped to
       ``[..., H, out]`` and mixed per token by ``softmax(T·G)`` (``G = [r, H]``, :func:`heads_chain`).
    """

    op_type = "MatMul"
    order = 0
    computed_weight_is_layer = False

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        heads = stacked_heads(output_factor, layer.heads)
        a, b = factor_tensors(names, node, layer, input_factor[0].T, heads[0].T)
        if layer.heads == 1:
            return factor_chain(node, names, a, b, {}, {}), [a, b]
        layout = HeadLayout(layer.heads, input_factor.shape[1], (layer.heads, layer.out_features), -1, -2)
        return heads_chain(node, names, layer, (a, b), ({}, {}), layout)


class FactorizeMatMul(FactorizePass):
    """The MatMul factorization pass (rules: :class:`MatMulFamily`)."""

    op_type = "MatMul"
