"""MatMul → (x·A)·B: exact at full rank, Eckart–Young optimal at rank r, parity in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from inhercc import linalg
from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.passes import FactorizeMatMul
from inhercc.pipeline import Factorizer, compress
from inhercc.recipe import Recipe
from tests.helpers import factor_product, make_model, rel_err, run


def matmul_model(act_shape: list[int], w: np.ndarray, dtype: int = TensorProto.FLOAT):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    return make_model([node], {"x": act_shape}, ["y"], {"W": w}, dtype=dtype)


def factorize(model, rank: int, split: str = "output"):
    m = prepare_model(model)
    layers = {la.name: la for la in find_layers(m, min_params=0)}
    return FactorizeMatMul({"proj": rank}, layers, Factorizer("svd", split))(m)


@pytest.mark.parametrize("act_shape", [[5, 24], [2, 7, 24], [2, 3, 4, 24]])
def test_full_rank_matches_teacher_in_ort(act_shape: list[int]) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    teacher = matmul_model(act_shape, w)
    result = factorize(teacher, rank=24)
    assert result.modified
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["MatMul", "MatMul"]
    x = rng.standard_normal(act_shape).astype(np.float32)
    (yt,), (ys,) = run(teacher, {"x": x}), run(result.model, {"x": x})
    assert ys.shape == yt.shape
    assert rel_err(ys, yt) < 1e-4


@pytest.mark.parametrize("split", ["output", "sqrt", "input"])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_rank_r_error_is_eckart_young_tail(split: str, rank: int) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 20)).astype(np.float32)
    result = factorize(matmul_model([3, 32], w), rank, split)
    a, b = factor_product(result.model, "W")
    assert a.shape == (32, rank) and b.shape == (rank, 20)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    err = np.linalg.norm(w.astype(np.float64) - a.astype(np.float64) @ b.astype(np.float64))
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-5)


def test_split_places_singular_values() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 16))
    s = np.linalg.svd(w, compute_uv=False)
    for split, expect_in, expect_out in [
        ("output", 1.0, s[:4]),
        ("input", s[:4], 1.0),
        ("sqrt", np.sqrt(s[:4]), np.sqrt(s[:4])),
    ]:
        a, b = linalg.factorize(w, 4, split)  # a: [1, r, in] rows, b: [1, out, r] columns
        np.testing.assert_allclose(np.linalg.norm(a[0], axis=1), expect_in, rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(b[0], axis=0), expect_out, rtol=1e-10)


def test_fp16_weights_factorized_in_float64_and_stored_fp16() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 24)).astype(np.float16)
    teacher = matmul_model([2, 24], w, dtype=TensorProto.FLOAT16)
    result = factorize(teacher, rank=24)
    a, b = factor_product(result.model, "W")
    assert a.dtype == np.float16 and b.dtype == np.float16
    x = rng.standard_normal((2, 24)).astype(np.float16)
    (yt,), (ys,) = run(teacher, {"x": x}), run(result.model, {"x": x})
    assert rel_err(ys, yt) < 5e-3  # fp16 storage of the factors


def test_names_derive_from_teacher_and_bias_add_untouched() -> None:
    from tests.helpers import mlp

    rng = np.random.default_rng(5)
    teacher = mlp(rng)
    res = compress(teacher, Recipe.of(rank=16, rank_multiple=8, min_params=0, verify=False))
    names = {t.name for t in res.model.graph.initializer}
    assert {
        "fc1.weight.inherit_in",
        "fc1.weight.inherit_out",
        "fc2.weight.inherit_in",
        "fc2.weight.inherit_out",
        "fc2.bias",
    } <= names
    assert "fc1.weight" not in names and "fc2.weight" not in names
    assert [n.op_type for n in res.model.graph.node] == ["MatMul", "MatMul", "Relu", "MatMul", "MatMul", "Add"]
    assert [o.name for o in res.model.graph.output] == ["y"]


def test_anonymous_exporter_names_use_the_module_path() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((24, 24)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_123"], ["y"], name="/encoder/layer.0/query/MatMul")
    teacher = make_model([node], {"x": [2, 24]}, ["y"], {"onnx::MatMul_123": w})
    res = compress(teacher, Recipe.of(rank=8, min_params=0, verify=False))
    names = {t.name for t in res.model.graph.initializer}
    assert names == {"encoder.layer.0.query.weight.inherit_in", "encoder.layer.0.query.weight.inherit_out"}


def test_shared_weight_is_skipped_with_reason() -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="b"),
    ]
    layers = find_layers(prepare_model(make_model(nodes, {"x": [2, 64]}, ["y"], {"W": w})), min_params=0)
    assert [la.reason for la in layers] == ["weight shared by 2 uses (tied weights)"] * 2
