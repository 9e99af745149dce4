"""Adding an op family is adding one file: a toy Einsum family, defined and registered here alone, is found,
checked, calibrated, factorized, timed and fed back as a stored weight by the generic code."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import pytest
from onnx import NodeProto, TensorProto, helper

from inhercc import linalg
from inhercc.calibrate import collect_grams
from inhercc.families import FAMILIES, Layer, family_for, register_family, unregister_family
from inhercc.graph import Dim
from inhercc.latency import micro_models
from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.passes import rewrite
from inhercc.passes.base import GraphNames, OpFamily, factor_chain, factor_tensors
from inhercc.pipeline import compress
from inhercc.plan import RankPlan
from inhercc.recipe import Recipe
from inhercc.sensitivity import stored_weight
from tests.helpers import make_model, rel_err, run

EQUATION = "bsi,io->bso"  # x[b, s, in] · W[in, out]: a MatMul spelled as an Einsum
SEQ, IN, OUT = 5, 32, 48


class EinsumFamily(OpFamily):
    """``Einsum(x, W)`` with ``EQUATION`` and a constant ``[in, out]`` weight → two Einsums ``(x·A)·B``."""

    op_type = "Einsum"
    order = 3

    def check(self, node: NodeProto, layer: Layer) -> str | None:
        equation = helper.get_attribute_value(node.attribute[0]).decode()
        return None if equation == EQUATION else f"equation {equation} is not {EQUATION}"

    def flops(self, node: NodeProto, shapes: Mapping[str, list[Dim]]) -> tuple[int, tuple[str, ...]] | None:
        (_, s, i), (_, o) = shapes[node.input[0]], shapes[node.input[1]]
        return 2 * s * i * o, ()

    def rewrite(
        self, node: NodeProto, layer: Layer, input_factor: np.ndarray, output_factor: np.ndarray, names: GraphNames
    ) -> tuple[list[NodeProto], list[onnx.TensorProto]]:
        a, b = factor_tensors(names, node, layer, input_factor[0].T, output_factor[0].T)
        attrs = {"equation": EQUATION}
        return factor_chain(node, names, a, b, attrs, attrs), [a, b]


@pytest.fixture
def einsum_family() -> Iterator[OpFamily]:
    """The toy family registered for one test, then removed again."""
    register_family(EinsumFamily)
    try:
        yield family_for("Einsum")
    finally:
        unregister_family("Einsum")


def einsum_model(w: np.ndarray, equation: str = EQUATION) -> onnx.ModelProto:
    node = helper.make_node("Einsum", ["x", "W"], ["y"], name="proj", equation=equation)
    return prepare_model(make_model([node], {"x": ["batch", SEQ, IN]}, ["y"], {"W": w}, dtype=TensorProto.FLOAT))


def test_a_registered_family_is_found_and_checked(einsum_family: OpFamily) -> None:
    """find_layers dispatches recognition, checks and FLOPs to the new family; unknown ops stay unseen."""
    w = np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32)
    (layer,) = find_layers(einsum_model(w), min_params=0)
    assert isinstance(einsum_family, EinsumFamily)
    assert (layer.op, layer.in_features, layer.out_features, layer.transposed) == ("Einsum", IN, OUT, True)
    assert layer.flops == 2 * SEQ * IN * OUT
    assert layer.reason is None
    np.testing.assert_array_equal(layer.matrix()[0], w.T.astype(np.float64))
    np.testing.assert_array_equal(stored_weight(layer, layer.matrix()), w)
    (other,) = find_layers(einsum_model(w, "bsi,io->bos"), min_params=0)
    assert other.reason == f"equation bsi,io->bos is not {EQUATION}"


def test_without_the_family_an_einsum_is_no_layer() -> None:
    w = np.ones((IN, OUT), dtype=np.float32)
    assert "Einsum" not in FAMILIES
    assert find_layers(einsum_model(w), min_params=0) == []


def test_the_rewrite_calibration_and_micro_model_go_through_the_family(einsum_family: OpFamily) -> None:
    """The chain is two Einsums equal (in ONNX Runtime) to x·(truncated W); the Gram is XᵀX over every row;
    the latency micro-models are the node and its chain."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    model = einsum_model(w)
    layers = find_layers(model, min_params=0)
    rank = 12

    def factors(layer: Layer, r: int) -> tuple[np.ndarray, np.ndarray]:
        return linalg.factorize(layer.matrix(), r, "output")

    student = rewrite(model, RankPlan({"proj": rank}), layers, factors)
    assert [(n.op_type, n.attribute[0].s.decode()) for n in student.graph.node] == [("Einsum", EQUATION)] * 2
    x = rng.standard_normal((3, SEQ, IN)).astype(np.float32)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    expected = x.astype(np.float64) @ (u[:, :rank] * s[:rank]) @ vt[:rank]
    (y,) = run(student, {"x": x})
    assert rel_err(y, expected) < 1e-5
    grams = collect_grams(model, layers, {"x": x})
    rows = x.reshape(-1, IN).astype(np.float64)
    np.testing.assert_allclose(grams["proj"], rows.T @ rows, rtol=1e-6)
    dense, chain = micro_models(model, layers[0], rank, [2, SEQ, IN])
    assert [n.op_type for n in dense.graph.node] == ["Einsum"]
    assert [n.op_type for n in chain.graph.node] == ["Einsum", "Einsum"]
    assert [list(t.dims) for t in chain.graph.initializer] == [[IN, rank], [rank, OUT]]


def test_compress_factorizes_the_new_family(einsum_family: OpFamily) -> None:
    """The whole pipeline (plan, whitened calibration, rewrite, verification) handles the new op."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    x = rng.standard_normal((64, SEQ, IN)).astype(np.float32)
    result = compress(einsum_model(w), Recipe.of(ratio=0.5, min_params=0), data={"x": x})
    assert [n.op_type for n in result.model.graph.node] == ["Einsum", "Einsum"]
    r = result.plan.ranks["proj"]
    assert r is not None and r < IN
    (yt,), (ys,) = run(einsum_model(w), {"x": x[:4]}), run(result.model, {"x": x[:4]})
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    best = rel_err(x[:4].astype(np.float64) @ (u[:, :r] * s[:r]) @ vt[:r], yt)
    assert rel_err(ys, yt) <= best * 1.05  # whitened: no worse than the best plain truncation on this data
    assert result.report["flops"]["teacher"] == 2 * SEQ * IN * OUT  # whole-model totals count the new family
    assert result.report["flops"]["student"] == 2 * SEQ * r * (IN + OUT)
