"""Attention (opset 23+): scaled dot-product attention with masks, KV cache, GQA, softcap, windows.

Follows ONNX's reference implementation step by step (both Q and K scaled by sqrt(scale), additive
bias built from the boolean/float mask, bottom-right causal alignment, rows with every key masked give
zeros) so results match the conformance data, while every step stays a differentiable torch op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inhercc.torchrt.dtypes import torch_dtype
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register

_NEG_INF = float("-inf")


def _allowed_to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True (attend) -> 0, False (masked) -> -inf."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), _NEG_INF, dtype=dtype, device=allowed.device))


def _frontier(q_len: int, kv_len: int, offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(query position + offset) - key position, as (q, kv) or (batch, q, kv) for per-batch offsets."""
    rows = torch.arange(q_len, device=device).reshape(q_len, 1)
    cols = torch.arange(kv_len, device=device).reshape(1, kv_len)
    if isinstance(offset, torch.Tensor):
        return rows + offset.reshape(-1, 1, 1).to(device) - cols
    return rows + offset - cols


def _add_per_batch(base: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """base + bias, a (batch, q, kv) bias entering as (batch, 1, q, kv) (masks broadcast right-aligned)."""
    if bias.dim() == 3:
        bias = bias.unsqueeze(1)
    return base + bias


@dataclass(frozen=True)
class _Span:
    """What every mask step shares: ``batch`` sequences of ``q_len`` queries against ``kv_len`` keys (cache
    included), query 0 sitting at key position ``offset`` (an int, or one per batch), bias in ``dtype`` on
    ``device``."""

    batch: int
    q_len: int
    kv_len: int
    offset: int | torch.Tensor
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        """An all-attend (q, kv) bias."""
        return torch.zeros((self.q_len, self.kv_len), dtype=self.dtype, device=self.device)

    def frontier(self) -> torch.Tensor:
        """(query position + offset) - key position (see :func:`_frontier`)."""
        return _frontier(self.q_len, self.kv_len, self.offset, self.device)


def _split_heads(x: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """(batch, seq, n * size) -> (batch, n, seq, size): 3-D inputs carry their heads packed in the last axis."""
    return x.reshape(batch, x.shape[1], n, x.shape[2] // n).transpose(1, 2)


def _with_cache(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The present key (or value): the past cache followed by this step's entries along the sequence axis."""
    return torch.cat((past, new), 2) if past is not None else new


def _query_offset(past_key: torch.Tensor | None, nonpad: torch.Tensor | None, q_len: int) -> int | torch.Tensor:
    """Key position of query 0: after the cache, or (no cache, per-batch valid lengths given) the valid
    length minus the queries, so the queries are the last valid positions."""
    if past_key is None and nonpad is not None:
        return nonpad.reshape(-1) - q_len
    return past_key.shape[2] if past_key is not None else 0


def _pad_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """A mask shorter than the keys, padded on the right with "masked" (False or -inf)."""
    if mask is None or mask.shape[-1] >= kv_len:
        return mask
    fill = False if mask.dtype == torch.bool else _NEG_INF
    return torch.nn.functional.pad(mask, (0, kv_len - mask.shape[-1]), value=fill)


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as an additive bias; a float mask already is one."""
    return _allowed_to_bias(mask, dtype) if mask.dtype == torch.bool else mask


def _causal_bias(mask: torch.Tensor | None, windowed: bool, span: _Span) -> torch.Tensor:
    """The mask's bias (zeros without one) with every key after the query's (offset) position masked."""
    bias = span.zeros()
    base = bias if mask is None else _as_bias(mask, span.dtype)
    if windowed:
        base = bias + base
    return _add_per_batch(base, _allowed_to_bias(span.frontier() >= 0, span.dtype))


def _window_bias(bias: torch.Tensor, left: int, right: int, span: _Span) -> torch.Tensor:
    """``bias`` with keys more than ``left`` before or ``right`` after the query's position masked (-1: no limit)."""
    diff = span.frontier()
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    return _add_per_batch(span.zeros() + bias, _allowed_to_bias(allowed, span.dtype))


def _padding_bias(nonpad: torch.Tensor, span: _Span) -> torch.Tensor:
    """(batch, 1, 1, kv) bias masking each batch's keys at or past its valid length."""
    valid = torch.arange(span.kv_len, device=span.device).reshape(1, -1) < nonpad.reshape(-1, 1).to(span.device)
    return _allowed_to_bias(valid, span.dtype).reshape(span.batch, 1, 1, span.kv_len)


def _mask_bias(
    mask: torch.Tensor | None,
    nonpad: torch.Tensor | None,
    causal: bool,
    left: int,
    right: int,
    span: _Span,
) -> torch.Tensor:
    """The additive bias (0 attend, -inf masked) from the mask, causality, the sliding window and the
    per-batch valid lengths, combined in the order of ONNX's reference (so -inf rows match it exactly)."""
    mask = _pad_mask(mask, span.kv_len)
    windowed = left >= 0 or right >= 0
    if causal:
        bias = _causal_bias(mask, windowed, span)
    elif mask is not None:
        bias = span.zeros() + _as_bias(mask, span.dtype)
    else:
        bias = span.zeros()
    if windowed:
        bias = _window_bias(bias, left, right, span)
    if nonpad is not None:
        bias = bias + _padding_bias(nonpad, span)
    return bias


def _repeat_kv_heads(n_q: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each key/value head repeated for the ``n_q / n_kv`` query heads it serves."""
    n_k, n_v = k.shape[1], v.shape[1]
    if n_q != n_k and n_q % n_k == 0 and n_k == n_v:
        k = k.repeat_interleave(n_q // n_k, 1)
        v = v.repeat_interleave(n_q // n_k, 1)
    return k, v


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """q kᵀ with Q and K each scaled by sqrt(scale) (default scale 1/sqrt(head size)), then soft-capped."""
    factor = torch.tensor(
        math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[3])), dtype=q.dtype, device=q.device
    )
    scores = torch.matmul(q * factor, (k * factor).transpose(-1, -2))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _masked_softmax(with_bias: torch.Tensor, bias: torch.Tensor, softmax_dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax over the keys (in ``softmax_dtype`` when given); rows with every key masked give zeros, not NaN."""
    if softmax_dtype is not None:
        with_bias = with_bias.to(softmax_dtype)
    probs = torch.softmax(with_bias, -1)
    fully_masked = torch.isneginf(bias.amax(-1, keepdim=True))
    return torch.where(fully_masked, torch.zeros((), dtype=probs.dtype, device=probs.device), probs)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    nonpad: torch.Tensor | None,
    scale: float | None,
    causal: bool,
    q_heads: int | None,
    kv_heads: int | None,
    softmax_dtype: torch.dtype | None,
    softcap: float | None,
    qk_mode: int,
    left: int,
    right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y, present key, present value and the ``qk_mode`` output (0/1 scaled scores, 2 with the bias, 3 the
    probabilities) for 4-D (batch, heads, seq, size) or 3-D (batch, seq, heads * size) inputs."""
    three_d = q.dim() == 3
    batch = q.shape[0]
    if three_d:
        q, k, v = _split_heads(q, batch, q_heads), _split_heads(k, batch, kv_heads), _split_heads(v, batch, kv_heads)
    present_key, present_value = _with_cache(past_key, k), _with_cache(past_value, v)
    q_len, kv_len = q.shape[2], present_key.shape[2]
    span = _Span(batch, q_len, kv_len, _query_offset(past_key, nonpad, q_len), q.dtype, q.device)
    bias = _mask_bias(mask, nonpad, causal, left, right, span)
    k, v = _repeat_kv_heads(q.shape[1], present_key, present_value)

    scores = _scores(q, k, scale, softcap)
    with_bias = scores + bias
    probs = _masked_softmax(with_bias, bias, softmax_dtype)
    exposed = probs if qk_mode == 3 else with_bias if qk_mode == 2 else scores
    y = torch.matmul(probs.to(q.dtype), v)
    if three_d:
        y = y.transpose(1, 2).reshape(batch, q_len, -1)
    return y, present_key, present_value, exposed.to(q.dtype)


@register("Attention", since=23)
def attention(ctx: NodeContext) -> Kernel:
    scale = ctx.attr("scale", None)
    causal = bool(ctx.attr("is_causal", 0))
    q_heads = ctx.attr("q_num_heads", None)
    kv_heads = ctx.attr("kv_num_heads", None)
    precision = ctx.attr("softmax_precision", None)
    softmax_dtype = None if precision is None else torch_dtype(precision)
    softcap = ctx.attr("softcap", 0.0)
    qk_mode = ctx.attr("qk_matmul_output_mode", 0)
    ctx.require(qk_mode in (0, 1, 2, 3), f"qk_matmul_output_mode={qk_mode}")
    left = ctx.attr("left_window_size", -1) if ctx.version >= 25 else -1
    right = ctx.attr("right_window_size", -1) if ctx.version >= 25 else -1

    def kernel(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        nonpad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if q.dim() == 3 and (q_heads is None or kv_heads is None):
            raise ValueError("3-D Attention inputs need q_num_heads and kv_num_heads")
        return _attention(
            q,
            k,
            v,
            mask,
            past_key,
            past_value,
            nonpad,
            scale,
            causal,
            q_heads,
            kv_heads,
            softmax_dtype,
            softcap,
            qk_mode,
            left,
            right,
        )

    return kernel


@register("RotaryEmbedding", since=23, fresh=True)
def rotary_embedding(ctx: NodeContext) -> Kernel:
    """Rotate the first rotary_embedding_dim features of each head by the cached cos/sin (opset 23)."""
    interleaved = bool(ctx.attr("interleaved", 0))
    rotary_dim = ctx.attr("rotary_embedding_dim", 0)
    num_heads = ctx.attr("num_heads", 0)

    def kernel(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = x.shape
        y = x.transpose(1, 2) if x.dim() == 4 else x.reshape(shape[0], shape[1], num_heads, -1)
        dim = rotary_dim or y.shape[3]
        rotate, keep = y[..., :dim], y[..., dim:]
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if interleaved:
            x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
        else:
            x1, x2 = rotate.chunk(2, -1)
        real = cos * x1 - sin * x2
        imag = sin * x1 + cos * x2
        if interleaved:
            rotated = torch.stack((real, imag), -1).reshape(rotate.shape)
        else:
            rotated = torch.cat((real, imag), -1)
        out = torch.cat((rotated, keep), -1)
        return out.reshape(shape) if x.dim() == 3 else out.transpose(1, 2)

    return kernel
