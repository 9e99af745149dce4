"""The weight-carrying layer record and the op-family registry every generic module dispatches through.

An op family (:class:`inhercc.passes.base.OpFamily`: MatMul, Gemm, Conv) is one file of ``passes/`` that holds
everything inhercc knows about the op: recognition and checks, FLOPs, calibration rows, the weight matrix and
its inverse, the rewrite and the latency micro-model. Importing :mod:`inhercc.passes` registers them here.
This module sits below both :mod:`inhercc.passes` and :mod:`inhercc.layers`, so neither imports the other
to find a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inhercc import linalg
from inhercc.errors import InherccError
from inhercc.graph import FLOP_COUNTERS

if TYPE_CHECKING:
    from inhercc.passes.base import OpFamily

FAMILIES: dict[str, OpFamily] = {}


def register_family(cls: type[OpFamily]) -> type[OpFamily]:
    """Class decorator: make (an instance of) ``cls`` the family that handles nodes of its ``op_type`` (a later
    registration of the same op replaces it)."""
    family = cls()
    FAMILIES[cls.op_type] = family
    FLOP_COUNTERS[cls.op_type] = family.flops  # whole-model FLOP totals count its layers too
    return cls


def unregister_family(op_type: str) -> None:
    """Forget the family of ``op_type`` (and its FLOP counter)."""
    FAMILIES.pop(op_type, None)
    FLOP_COUNTERS.pop(op_type, None)


def family_for(op_type: str) -> OpFamily:
    """The registered family of an op type."""
    try:
        return FAMILIES[op_type]
    except KeyError:
        raise InherccError(f"no op family handles {op_type!r}; known: {', '.join(sorted(FAMILIES))}") from None


def families() -> list[OpFamily]:
    """Every registered family, in rewrite order."""
    return sorted(FAMILIES.values(), key=lambda f: f.order)


@dataclass
class Layer:
    """One weight-carrying node. ``matrix()`` gives the weight as a ``[groups, out, in]`` float64 stack in
    the ``y = W x`` convention of :mod:`inhercc.linalg` (Gemm alpha/transB folded, conv kernels flattened)."""

    name: str
    op: str
    weight_name: str
    weight_shape: tuple[int, ...]
    weight_dtype: np.dtype
    groups: int = 1
    out_features: int = 0  # per group
    in_features: int = 0  # per group, kernel included
    kernel: tuple[int, ...] = ()
    bias_params: int = 0
    flops: int = 0  # per sample; symbolic dims counted as 1
    symbolic_dims: tuple[str, ...] = ()
    reason: str | None = None
    weight: np.ndarray | None = field(default=None, repr=False)
    scale: float = 1.0  # Gemm alpha folded into the weight
    transposed: bool = False  # the stored weight is [in, out] (MatMul, Gemm transB=0)
    subgraph: str | None = None  # where a layer inside an If / Loop / Scan body lives ("If_12/then_branch")
    note: str | None = None  # how a factorized layer was initialized when not as the others (SUBGRAPH_NOTE)
    heads: int = 1  # output heads mixed by a softmax gate (InherNet); 1: the plain two-factor chain
    seed: int = 0  # seeds the random part of the layer's rewrite (the heads' gate)

    @property
    def compressible(self) -> bool:
        return self.reason is None

    @property
    def shape(self) -> list[int]:
        return list(self.weight_shape)

    @property
    def weight_params(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def params(self) -> int:
        return self.weight_params + self.bias_params

    @property
    def full_rank(self) -> int:
        """Largest useful rank per group."""
        return min(self.out_features, self.in_features)

    def factor_params(self, rank: int) -> int:
        """Weight parameters of the factor chain at a total rank ``rank`` (``rank/groups`` per group): the input
        factor ``r·in``, the ``heads`` output factors ``H·r·out`` and, with more than one head, the gate ``r·H``."""
        per_group = rank // self.groups
        chain = linalg.factor_params(self.heads * self.out_features, self.in_features, per_group, self.groups)
        return chain + self.gate_params(rank)

    def gate_params(self, rank: int) -> int:
        """Parameters of the heads' gate (linear ``r→H`` on the bottleneck); 0 with one head."""
        return (rank // self.groups) * self.groups * self.heads if self.heads > 1 else 0

    def rank_step(self) -> int:
        """Total rank grows in steps of ``groups`` (one per group)."""
        return self.groups

    def factor_flops(self, rank: int) -> int:
        """FLOPs per sample of the factor chain at total rank ``rank``."""
        if self.weight_params == 0:
            return 0
        if self.heads > 1 and family_for(self.op).pooled_gate:  # one gate per sample, on the pooled bottleneck
            chain = self.factor_params(rank) - self.gate_params(rank)
            return int(self.flops * chain / self.weight_params) + 2 * self.gate_params(rank)
        return int(self.flops * self.factor_params(rank) / self.weight_params)

    def matrix(self) -> np.ndarray:
        """The weight as a float64 ``[groups, out, in]`` stack."""
        assert self.weight is not None, f"layer {self.name} has no weight loaded"
        return family_for(self.op).matrix(self)


# (layer, total rank) -> (input_factor [g, r/g, in], output_factor [g, out, r/g]) in float64
FactorSource = Callable[[Layer, int], tuple[np.ndarray, np.ndarray]]
