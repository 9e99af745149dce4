"""Gemm → Gemm(Gemm(x, A), B, C): transB, alpha, beta and C folded correctly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.passes import FactorizeGemm
from inhercc.pipeline import Factorizer
from tests.helpers import make_model, rel_err, run


def gemm_model(trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None, rng: np.random.Generator):
    n_in, n_out = 20, 28
    w = rng.standard_normal((n_out, n_in) if trans_b else (n_in, n_out)).astype(np.float32)
    weights = {"W": w}
    inputs = ["x", "W"]
    if c_shape is not None:
        weights["C"] = rng.standard_normal(c_shape).astype(np.float32)
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], {"x": ["N", n_in]}, ["y"], weights)


def factorize(model, rank: int):
    m = prepare_model(model)
    layers = {la.name: la for la in find_layers(m, min_params=0)}
    return FactorizeGemm({"fc": rank}, layers, Factorizer("svd"))(m).model


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)])
@pytest.mark.parametrize("c_shape", [None, (28,), (1, 28), (4, 28)])
def test_full_rank_parity(trans_b: int, alpha: float, beta: float, c_shape) -> None:
    rng = np.random.default_rng(trans_b * 100 + len(c_shape or ()))
    teacher = gemm_model(trans_b, alpha, beta, c_shape, rng)
    student = factorize(teacher, rank=20)
    assert [n.op_type for n in student.graph.node] == ["Gemm", "Gemm"]
    x = rng.standard_normal((4, 20)).astype(np.float32)
    (yt,), (ys,) = run(teacher, {"x": x}), run(student, {"x": x})
    assert rel_err(ys, yt) < 1e-4


@pytest.mark.parametrize("trans_b", [0, 1])
def test_rank_r_is_eckart_young_of_alpha_weight(trans_b: int) -> None:
    rng = np.random.default_rng(9)
    alpha = 0.7
    teacher = gemm_model(trans_b, alpha, 1.0, None, rng)
    w = next(t for t in teacher.graph.initializer if t.name == "W")
    from onnx import numpy_helper

    w_eff = alpha * numpy_helper.to_array(w).astype(np.float64)
    w_eff = w_eff if trans_b else w_eff.T  # [out, in]
    s = np.linalg.svd(w_eff, compute_uv=False)
    rank = 6
    student = factorize(teacher, rank)
    # The student's effective weight: identity inputs through the chain (C absent, beta irrelevant).
    eye = np.eye(20, dtype=np.float32)
    (y,) = run(student, {"x": eye})  # y = I · W_effᵀ
    err = np.linalg.norm(y.T.astype(np.float64) - w_eff)
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-4)
    node_attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in student.graph.node]
    assert all(a.get("transB") == trans_b for a in node_attrs)
    assert all(a.get("alpha", 1.0) == 1.0 for a in node_attrs)


def test_trans_a_is_skipped_with_reason() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1)
    layers = find_layers(prepare_model(make_model([node], {"x": [64, 2]}, ["y"], {"W": w})), min_params=0)
    assert layers[0].reason == "unsupported attribute transA=1"
