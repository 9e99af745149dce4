"""Training losses that appear in exported training graphs: NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.registry import Kernel, NodeContext, one_of, register

# torch needs an int ignore_index; without the attribute no target equals this.
_NO_IGNORE = -(2**62)


def _nll(
    log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore: int, reduction: str
) -> torch.Tensor:
    """ONNX NLL: -log_prob[n, target[n, …], …] · weight[target], averaged by the weights for `mean`."""
    return F.nll_loss(log_prob, target.to(torch.int64), weight, ignore_index=ignore, reduction=reduction)


@register("NegativeLogLikelihoodLoss", since=12, fresh=True)
def negative_log_likelihood_loss(ctx: NodeContext) -> Kernel:
    reduction = one_of(ctx, "reduction", "mean", ("none", "sum", "mean"))
    ignore = ctx.attr("ignore_index", _NO_IGNORE)
    return lambda x, target, weight=None: _nll(x, target, weight, ignore, reduction)


@register("SoftmaxCrossEntropyLoss", since=12, fresh=True, saves_output=True)
def softmax_cross_entropy_loss(ctx: NodeContext) -> Kernel:
    reduction = one_of(ctx, "reduction", "mean", ("none", "sum", "mean"))
    ignore = ctx.attr("ignore_index", _NO_IGNORE)
    want_log_prob = ctx.has_output(1)

    def kernel(
        scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        log_prob = torch.log_softmax(scores, 1)
        loss = _nll(log_prob, labels, weight, ignore, reduction)
        return (loss, log_prob) if want_log_prob else loss

    return kernel
