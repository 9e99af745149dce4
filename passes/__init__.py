"""Graph rewrites, installed as ``inhercc.passes``: one pass per file, composable, CLI-agnostic."""

from inhercc.passes.base import PASSES, FactorSource, Pass, PassResult, get_pass, run_passes
from inhercc.passes.factorize_conv import FactorizeConv
from inhercc.passes.factorize_gemm import FactorizeGemm
from inhercc.passes.factorize_matmul import FactorizeMatMul

__all__ = [
    "PASSES",
    "FactorSource",
    "FactorizeConv",
    "FactorizeGemm",
    "FactorizeMatMul",
    "Pass",
    "PassResult",
    "get_pass",
    "run_passes",
]
