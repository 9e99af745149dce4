"""Graph rewrites, installed as ``inhercc.passes``: one file per op family (recognition, checks, calibration
rows, the rewrite pass, the latency micro-model), composable, CLI-agnostic. Importing this package registers
the families (:mod:`inhercc.families`); adding a family is adding one file and its import here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import ModelProto

from inhercc.families import Layer
from inhercc.passes.base import (
    FactorizePass,
    FactorSource,
    OpFamily,
    Pass,
    PassResult,
    rewrite_ranks,
    run_passes,
)
from inhercc.passes.factorize_conv import ConvFamily, FactorizeConv
from inhercc.passes.factorize_gather import FactorizeGather, GatherFamily
from inhercc.passes.factorize_gemm import FactorizeGemm, GemmFamily
from inhercc.passes.factorize_matmul import FactorizeMatMul, MatMulFamily

if TYPE_CHECKING:
    from inhercc.plan import RankPlan

__all__ = [
    "ConvFamily",
    "FactorSource",
    "FactorizeConv",
    "FactorizeGather",
    "FactorizeGemm",
    "FactorizeMatMul",
    "FactorizePass",
    "GatherFamily",
    "GemmFamily",
    "MatMulFamily",
    "OpFamily",
    "Pass",
    "PassResult",
    "rewrite",
    "rewrite_ranks",
    "run_passes",
]


def rewrite(model: ModelProto, plan: RankPlan, layers: list[Layer], factors: FactorSource) -> ModelProto:
    """Apply the factorization passes of every registered family (MatMul, Gemm, Conv, Gather) for the planned ranks
    to a copy of ``model`` (:func:`rewrite_ranks` also says what each pass did)."""
    return rewrite_ranks(model, plan.factorized(), layers, factors).model
