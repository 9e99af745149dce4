"""Matrix products: MatMul, Gemm, Einsum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.registry import Kernel, NodeContext, register


@register("MatMul", since=1, fresh=True)
def matmul(ctx: NodeContext) -> Kernel:
    """numpy.matmul semantics, which torch.matmul shares (1-D promotion, batch broadcasting)."""
    return torch.matmul


@register("Gemm", since=6, fresh=True)
def gemm(ctx: NodeContext) -> Kernel:
    """alpha·A'·B' + beta·C; the common Linear form (transB=1, alpha=beta=1, 1-D C) maps to F.linear."""
    alpha = ctx.attr("alpha", 1.0)
    beta = ctx.attr("beta", 1.0)
    trans_a = ctx.attr("transA", 0)
    trans_b = ctx.attr("transB", 0)
    if ctx.version < 7:
        ctx.ignore("broadcast")
    linear = alpha == 1.0 and beta == 1.0 and not trans_a and trans_b

    def kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if linear and a.is_floating_point() and (c is None or c.dim() == 1):
            return F.linear(a, b, c)
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is not None and beta != 0.0 and a.is_floating_point():
            return torch.addmm(c, a, b, beta=beta, alpha=alpha)
        y = a @ b
        if alpha != 1.0:
            y = y * alpha
        if c is not None and beta != 0.0:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return kernel


@register("Einsum", since=12)
def einsum(ctx: NodeContext) -> Kernel:
    equation = ctx.attr("equation").replace(" ", "")
    return lambda *xs: torch.einsum(equation, *xs)
