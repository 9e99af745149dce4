"""Gather on a constant 2-D table (an embedding) → ``MatMul(Gather(A, ids), B)`` (ALBERT-style factorized
embedding)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto

from inhercc import linalg
from inhercc.families import Layer, register_family
from inhercc.graph import Dim, node_attr
from inhercc.passes.base import FactorizePass, GraphNames, OpFamily, factor_tensors


@dataclass(frozen=True)
class RowWeightedSVD:
    """SVD of ``diag(√w) · T`` for a table ``T [rows, d]`` and per-row weights ``w``: the rank-``r`` factors
    ``T ≈ (diag(√w)⁻¹ U_r) Σ_r V_rᵀ`` minimize ``Σ_v w_v ‖T_v − T̂_v‖²`` (a whitened SVD whose Gram is the diagonal
    ``diag(w)``: the Gram of one-hot rows). Same interface as :class:`inhercc.linalg.SVD` (``s``, ``factors``)."""

    root_weights: np.ndarray  # [rows] √w
    u: np.ndarray  # [1, rows, k] left singular vectors of diag(√w)·T
    s: np.ndarray  # [1, k]
    vt: np.ndarray  # [1, k, d]

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[1])

    def factors(self, rank: int, split: str = "output") -> tuple[np.ndarray, np.ndarray]:
        """``([1, r, rows], [1, d, r])`` in the ``y = W x`` convention (``W = Tᵀ``, ``x`` one-hot)."""
        r = min(int(rank), self.full_rank)
        table_side = self.u[:, :, :r] / self.root_weights[None, :, None]  # diag(√w)⁻¹ U_r
        # Tᵀ ≈ V_r Σ_r (diag(√w)⁻¹ U_r)ᵀ: V_r is the output side, the table's side the input side
        return linalg.split_factors(
            np.swapaxes(self.vt[:, :r, :], -1, -2), self.s[:, :r], table_side.swapaxes(-1, -2), split
        )


def row_weighted_svd(table: np.ndarray, weights: np.ndarray) -> RowWeightedSVD:
    """:class:`RowWeightedSVD` of ``table [rows, d]`` under positive per-row ``weights``."""
    root = np.sqrt(np.asarray(weights, dtype=np.float64))
    u, s, vt = linalg.thin_svd(root[:, None] * np.asarray(table, dtype=np.float64))
    return RowWeightedSVD(root, u[None], s[None], vt[None])


def token_weights(counts: np.ndarray) -> np.ndarray:
    """Row weights from calibration counts: ``count + 1`` (every row keeps weight ≥ 1, so tokens never seen in
    calibration are still reconstructed; a frequent token's error weighs in proportion to how often it occurs)."""
    return np.asarray(counts, dtype=np.float64).reshape(-1) + 1.0


@register_family
class GatherFamily(OpFamily):
    """An embedding table: ``Y = Gather(T, ids, axis=0)`` with ``T`` a constant ``[rows, d]`` initializer and ``ids``
    computed by the graph (a graph input, or a position range). In the ``y = W x`` convention the weight is ``Tᵀ``
    acting on one-hot ``x`` (``in = rows``, ``out = d``), so the shared machinery (plans, reports, the factorizer)
    applies unchanged; the Gram of one-hot rows is diagonal — the token counts — and is kept as a vector.

    Rewrite rules:

    1. ``Y = Gather(T[rows, d], ids, axis=0)`` with a planned rank ``r`` becomes ``E = Gather(A[rows, r], ids,
       axis=0)``; ``Y = MatMul(E, B[r, d])``: the table of the input factor (``U``, or ``U√Σ`` with the ``sqrt``
       split), then a linear ``r → d`` (carrying Σ under the default ``output`` split). Parameters ``r·(rows + d)``.
    2. Initialization: the plain SVD of ``T`` (Eckart–Young optimal, every row alike); with calibration data
       (``whitened`` init) the SVD of ``diag(√w)·T`` with ``w = count + 1`` per row (:func:`token_weights`), so
       frequent tokens are reconstructed best and unseen ones still count.
    3. ``ids`` may hold negative indices (counted from the end, as Gather allows); ``Y`` keeps its name.
    4. Not candidates: Gathers on computed data (shape gathers), on constant ids, ``axis ≠ 0``, non-2-D tables.
       A table also read elsewhere — a tied output projection ``MatMul(h, Transpose(T))`` — stays dense with the
       "shared" reason (factorizing both sides jointly is not implemented); gated heads are not applied to tables.
    5. A candidate only when embeddings are selected (``select.embeddings``): off by default.
    """

    op_type = "Gather"
    order = 3
    computed_weight_is_layer = False
    weight_input = 0
    activation_input = 1
    optional = True
    diagonal_gram = True

    def describe(self, node: NodeProto, layer: Layer, shapes: Mapping[str, list[Dim]]) -> None:
        if len(layer.weight_shape) == 2:
            layer.in_features, layer.out_features = layer.weight_shape
            layer.transposed = True

    def check(self, node: NodeProto, layer: Layer) -> str | None:
        """Why the table stays dense (rule 4: not a row lookup; gated heads), else None."""
        reason = super().check(node, layer)
        if reason is not None:
            return reason
        axis = int(node_attr(node, "axis", 0))
        if axis not in (0, -2):
            return f"Gather along axis {axis}, not a row lookup (axis 0)"
        if layer.heads > 1:
            return "gated heads are not applied to embedding tables"
        return None

    def flops(self, node: NodeProto, shapes: Mapping[str, list[Dim]]) -> tuple[int, tuple[str, ...]] | None:
        """A lookup multiplies nothing: 0 (the factorized table's MatMul is counted as a MatMul)."""
        return (0, ()) if len(node.input) > 1 else None

    def calibration_geometry(self, node: NodeProto, layer: Layer) -> Hashable | None:
        return ("rows", layer.in_features)

    def count_rows(
        self, counts: np.ndarray | None, ids: np.ndarray, geometry: Hashable | None, mask: np.ndarray | None
    ) -> np.ndarray:
        """``counts [1, rows]`` plus how often each row is looked up in ``ids`` (padding positions left out)."""
        assert isinstance(geometry, tuple)
        rows = int(geometry[1])
        ids = np.asarray(ids).astype(np.int64)
        if mask is not None and ids.shape == mask.shape:
            ids = ids[mask != 0]
        ids = ids.reshape(-1)
        ids = np.where(ids < 0, ids + rows, ids)
        ids = ids[(ids >= 0) & (ids < rows)]
        added = np.bincount(ids, minlength=rows).astype(np.float64)[None]
        return added if counts is None else counts + added

    def calibration_rows(
        self, value: np.ndarray, geometry: Hashable | None, mask: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        raise NotImplementedError("an embedding's Gram is diagonal: see count_rows")

    def decompose(self, layer: Layer, gram: np.ndarray) -> RowWeightedSVD:
        """The frequency-weighted SVD of the table; ``gram`` is the row counts."""
        assert layer.weight is not None
        return row_weighted_svd(np.asarray(layer.weight), token_weights(gram))

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        """Rule 1: ``Gather(A, ids)`` then ``MatMul(·, B)``, the lookup's output name kept."""
        a, b = factor_tensors(names, node, layer, input_factor[0].T, output_factor[0].T)
        mid = names.fresh(f"{node.output[0]}.inherit_mid")
        first = onnx.helper.make_node(
            "Gather", [a.name, node.input[1]], [mid], name=names.fresh(f"{node.name}.inherit_in"), axis=0
        )
        second = onnx.helper.make_node(
            "MatMul", [mid, b.name], [node.output[0]], name=names.fresh(f"{node.name}.inherit_out")
        )
        return [first, second], [a, b]

    def micro_feed(self, layer: Layer, input_shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Random row ids of ``input_shape``."""
        return rng.integers(0, layer.in_features, list(input_shape)).astype(np.int64)

    def micro_model(
        self,
        model: onnx.ModelProto,
        node: NodeProto,
        layer: Layer,
        rank: int,
        input_shape: Sequence[int],
        seed: int = 0,
    ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """The lookup alone and its factorized chain, reading int64 ids of ``input_shape``."""
        from inhercc.passes.base import rewrite_ranks

        inits = {t.name: t for t in model.graph.initializer}
        dtype = onnx.helper.np_dtype_to_tensor_dtype(layer.weight_dtype)
        ids = onnx.helper.make_tensor_value_info(node.input[1], onnx.TensorProto.INT64, list(input_shape))
        y = onnx.helper.make_tensor_value_info(node.output[0], dtype, None)
        single = onnx.helper.make_node("Gather", list(node.input), [node.output[0]], name=node.name, axis=0)
        graph = onnx.helper.make_graph([single], "dense", [ids], [y], [inits[layer.weight_name]])
        dense = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

        def factors(la: Layer, r: int) -> tuple[np.ndarray, np.ndarray]:
            return linalg.random_factors(la.out_features, la.in_features, r, 1, seed=seed)

        return dense, rewrite_ranks(dense, {layer.name: rank}, [layer], factors).model


class FactorizeGather(FactorizePass):
    """The embedding factorization pass (rules: :class:`GatherFamily`)."""

    op_type = "Gather"
