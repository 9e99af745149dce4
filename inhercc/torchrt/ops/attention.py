"""Attention (opset 23+): scaled dot-product attention with masks, KV cache, GQA, softcap, windows.

Follows ONNX's reference implementation step by step (both Q and K scaled by sqrt(scale), additive
bias built from the boolean/float mask, bottom-right causal alignment, rows with every key masked give
zeros) so results match the conformance data, while every step stays a differentiable torch op.
"""

from __future__ import annotations

import math

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
    three_d = q.dim() == 3
    batch = q.shape[0]
    if three_d:

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], n, x.shape[2] // n).transpose(1, 2)

        q, k, v = heads(q, q_heads), heads(k, kv_heads), heads(v, kv_heads)
    dtype = q.dtype
    factor = torch.tensor(
        math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[3])), dtype=dtype, device=q.device
    )
    present_key = torch.cat((past_key, k), 2) if past_key is not None else k
    present_value = torch.cat((past_value, v), 2) if past_value is not None else v
    k, v = present_key, present_value
    q_len, kv_len = q.shape[2], k.shape[2]

    if mask is not None and mask.shape[-1] < kv_len:
        pad = kv_len - mask.shape[-1]
        fill = False if mask.dtype == torch.bool else _NEG_INF
        mask = torch.nn.functional.pad(mask, (0, pad), value=fill)
    if past_key is None and nonpad is not None:
        offset: int | torch.Tensor = nonpad.reshape(-1) - q_len
    else:
        offset = past_key.shape[2] if past_key is not None else 0
    windowed = left >= 0 or right >= 0
    bias = torch.zeros((q_len, kv_len), dtype=dtype, device=q.device)
    if causal:
        if mask is not None and mask.dtype == torch.bool:
            mask = _allowed_to_bias(mask, dtype)
        base = bias if mask is None else mask
        if windowed:
            base = bias + base
        bias = _add_per_batch(base, _allowed_to_bias(_frontier(q_len, kv_len, offset, q.device) >= 0, dtype))
    elif mask is not None:
        bias = bias + (_allowed_to_bias(mask, dtype) if mask.dtype == torch.bool else mask)
    if windowed:
        diff = _frontier(q_len, kv_len, offset, q.device)
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        bias = _add_per_batch(
            torch.zeros((q_len, kv_len), dtype=dtype, device=q.device) + bias, _allowed_to_bias(allowed, dtype)
        )
    if nonpad is not None:
        valid = torch.arange(kv_len, device=q.device).reshape(1, -1) < nonpad.reshape(-1, 1).to(q.device)
        bias = bias + _allowed_to_bias(valid, dtype).reshape(batch, 1, 1, kv_len)

    n_q, n_k, n_v = q.shape[1], k.shape[1], v.shape[1]
    if n_q != n_k and n_q % n_k == 0 and n_k == n_v:  # grouped-query attention
        k = k.repeat_interleave(n_q // n_k, 1)
        v = v.repeat_interleave(n_q // n_k, 1)

    scores = torch.matmul(q * factor, (k * factor).transpose(-1, -2))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    with_bias = scores + bias
    exposed = with_bias if qk_mode == 2 else scores
    if softmax_dtype is not None:
        with_bias = with_bias.to(softmax_dtype)
    probs = torch.softmax(with_bias, -1)
    fully_masked = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(fully_masked, torch.zeros((), dtype=probs.dtype, device=probs.device), probs)
    if qk_mode == 3:
        exposed = probs
    y = torch.matmul(probs.to(dtype), v)
    if three_d:
        y = y.transpose(1, 2).reshape(batch, q_len, -1)
    return y, present_key, present_value, exposed.to(dtype)


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
