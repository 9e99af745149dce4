"""Small helpers shared by the op families (axes, shape values, dtype workarounds)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from inhercc.torchrt.dtypes import WIDE_UNSIGNED


def ints(value: torch.Tensor | Sequence[int]) -> list[int]:
    """A shape-valued input as Python ints (a host tensor's `.tolist()`, no device round trip on CPU)."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def scalar(value: torch.Tensor) -> Any:
    """The Python number held by a one-element tensor."""
    return value.reshape(-1)[0].item()


def axis(a: int, rank: int) -> int:
    """A possibly negative axis as an index in 0..rank-1."""
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {a} out of range for rank {rank}")
    return a + rank if a < 0 else a


def axes(values: Sequence[int], rank: int) -> list[int]:
    """Possibly negative axes as indices in 0..rank-1."""
    return [axis(a, rank) for a in values]


def widen_unsigned(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `fn` in int64 when an input is uint16/32/64 (torch lacks most kernels for them), then cast back.

    Exact for uint16/uint32 and for uint64 below 2**63.
    """

    @functools.wraps(fn)
    def wrapped(*args: torch.Tensor) -> torch.Tensor:
        dtype = args[0].dtype if isinstance(args[0], torch.Tensor) else None
        if dtype not in WIDE_UNSIGNED:
            return fn(*args)
        out = fn(*[a.to(torch.int64) if isinstance(a, torch.Tensor) else a for a in args])
        return out.to(dtype) if out.dtype == torch.int64 else out

    return wrapped
