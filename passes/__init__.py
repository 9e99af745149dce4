"""Graph rewrites, installed as ``inhercc.passes``: one pass per file, composable, CLI-agnostic."""

from __future__ import annotations

from inhercc.passes.base import PASSES, FactorSource, Pass, PassResult, get_pass, run_passes
from inhercc.passes.factorize_conv import FactorizeConv
from inhercc.passes.factorize_gemm import FactorizeGemm
from inhercc.passes.factorize_matmul import FactorizeMatMul
from onnx import ModelProto

from inhercc.layers import Layer
from inhercc.model import infer_model_shapes
from inhercc.plan import RankPlan

__all__ = [
    "PASSES",
    "FactorSource",
    "FactorizeConv",
    "FactorizeGemm",
    "FactorizeMatMul",
    "Pass",
    "PassResult",
    "get_pass",
    "rewrite",
    "run_passes",
]


def rewrite(model: ModelProto, plan: RankPlan, layers: list[Layer], factors: FactorSource) -> ModelProto:
    """Apply the factorization passes (MatMul, Gemm, Conv) for the planned ranks to a copy of ``model``."""
    student = ModelProto()
    student.CopyFrom(model)
    ranks = plan.factorized()
    by_name = {layer.name: layer for layer in layers}
    result = run_passes(
        student, [cls(ranks, by_name, factors) for cls in (FactorizeMatMul, FactorizeGemm, FactorizeConv)]
    )
    out = result.model
    del out.graph.value_info[:]  # stale for the rewritten nodes; re-inferred below
    return infer_model_shapes(out)
