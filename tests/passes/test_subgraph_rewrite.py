"""The factorization passes rewrite layers inside If / Loop bodies in place: the chain stays in the body,
its factors where the body can read them; exact at full rank, the Eckart–Young error at rank r."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.passes import FactorizeGemm, FactorizeMatMul, run_passes
from inhercc.pipeline import Factorizer
from tests.helpers import run
from tests.test_subgraphs import N_HID, all_nodes, both_branches, control_flow_model, effective_weight, tensor_info


def factorize(model: onnx.ModelProto, ranks: dict[str, int]) -> onnx.ModelProto:
    m = prepare_model(model)
    layers = {la.name: la for la in find_layers(m, min_params=0)}
    factors = Factorizer("svd")
    return run_passes(m, [FactorizeMatMul(ranks, layers, factors), FactorizeGemm(ranks, layers, factors)]).model


def test_full_rank_equals_teacher_in_every_branch() -> None:
    model, _ = control_flow_model(np.random.default_rng(0))
    student = factorize(model, {"mm_then": N_HID, "mm_else": N_HID, "gemm_loop": N_HID})
    onnx.checker.check_model(student, full_check=True)
    ops = {n.name: n.op_type for n in all_nodes(student.graph)}
    assert "mm_then" not in ops and ops["mm_then.inherit_in"] == "MatMul" and ops["gemm_loop.inherit_out"] == "Gemm"
    for feeds in both_branches(np.random.default_rng(2)):
        (yt,), (ys,) = run(model, feeds), run(student, feeds)
        assert np.max(np.abs(ys - yt)) <= 1e-5


def test_rank_r_is_eckart_young_of_each_weight() -> None:
    model, weights = control_flow_model(np.random.default_rng(0))
    ranks = {"mm_then": 12, "mm_else": 20, "gemm_loop": 8}
    student = factorize(model, ranks)
    for name, r in ranks.items():
        w = weights[name].astype(np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        err = np.linalg.norm(w - effective_weight(student, name))
        assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-5)


def test_nested_if_inside_a_loop_body() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((N_HID, N_HID)) / np.sqrt(N_HID)).astype(np.float32)
    inner_then = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node("MatMul", ["v_in", "w"], ["t"]),  # unnamed: named after where it lives
        ],
        "inner_then",
        [],
        [tensor_info("t")],
    )
    inner_else = helper.make_graph([helper.make_node("Neg", ["v_in"], ["e"])], "inner_else", [], [tensor_info("e")])
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["odd_i"], to=TensorProto.BOOL),
            helper.make_node("If", ["odd_i"], ["v_out"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [tensor_info("i", TensorProto.INT64, []), tensor_info("c_in", TensorProto.BOOL, []), tensor_info("v_in")],
        [tensor_info("c_out", TensorProto.BOOL, []), tensor_info("v_out")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)],
        "nested",
        [tensor_info("x", shape=["N", N_HID])],
        [tensor_info("y", shape=["N", N_HID])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    m = prepare_model(model)
    (layer,) = find_layers(m)
    assert layer.subgraph == "Loop_0/body/If_1/then_branch"
    assert layer.name == "Loop_0/body/If_1/then_branch/MatMul_1"
    assert layer.compressible
    student = factorize(model, {layer.name: N_HID})
    x = rng.standard_normal((4, N_HID)).astype(np.float32)
    (yt,), (ys,) = run(model, {"x": x}), run(student, {"x": x})
    assert np.max(np.abs(ys - yt)) <= 1e-5


def test_scan_body_matmul_on_an_outer_weight() -> None:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((96, N_HID)) / np.sqrt(96)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "scan.weight"], ["y_t"], name="mm_scan"),
            helper.make_node("Add", ["s_in", "y_t"], ["s_out"], name="accumulate"),
        ],
        "scan_body",
        [tensor_info("s_in", shape=["N", N_HID]), tensor_info("x_t", shape=["N", 96])],
        [tensor_info("s_out", shape=["N", N_HID]), tensor_info("y_t", shape=["N", N_HID])],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1)],
        "scan",
        [tensor_info("s0", shape=["N", N_HID]), tensor_info("xs", shape=["T", "N", 96])],
        [tensor_info("s", shape=["N", N_HID]), tensor_info("ys", shape=["T", "N", N_HID])],
        [numpy_helper.from_array(w, "scan.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (layer,) = find_layers(prepare_model(model))
    assert (layer.name, layer.subgraph, layer.compressible) == ("mm_scan", "scan/body", True)
    rank = 16
    student = factorize(model, {"mm_scan": rank})
    feeds = {
        "s0": rng.standard_normal((3, N_HID)).astype(np.float32),
        "xs": rng.standard_normal((5, 3, 96)).astype(np.float32),
    }
    (st, yt), (ss, ys) = run(model, feeds), run(student, feeds)
    w_r = effective_weight(student, "mm_scan")
    np.testing.assert_allclose(ys, np.einsum("tni,io->tno", feeds["xs"], w_r), rtol=1e-4, atol=1e-4)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert np.linalg.norm(w - w_r) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-5)
    assert st.shape == ss.shape and yt.shape == ys.shape


def test_an_initializer_shadowed_by_a_body_is_unused_and_an_outer_read_keeps_one() -> None:
    """A body that defines ``t`` itself reads its own ``t``, not the main graph's: that initializer is unused;
    ``u``, read from a nested body (a Loop inside the If branch), is kept."""
    from inhercc.passes.base import remove_unused_initializers

    loop_body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "u"], ["v_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "loop_body",
        [tensor_info("i", TensorProto.INT64, []), tensor_info("c_in", TensorProto.BOOL, []), tensor_info("v_in")],
        [tensor_info("c_out", TensorProto.BOOL, []), tensor_info("v_out")],
    )
    branch = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["t"]),
            helper.make_node("Loop", ["trip", "", "t"], ["b"], body=loop_body),
        ],
        "branch",
        [],
        [tensor_info("b")],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "shadow",
        [tensor_info("x", shape=[2]), tensor_info("c", TensorProto.BOOL, [])],
        [tensor_info("y")],
        [
            numpy_helper.from_array(np.ones(2, np.float32), "t"),
            numpy_helper.from_array(np.full(2, 3.0, np.float32), "u"),
            numpy_helper.from_array(np.array(2, np.int64), "trip"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert remove_unused_initializers(model) == 1
    assert [t.name for t in model.graph.initializer] == ["u", "trip"]
    x = np.array([1.0, -2.0], np.float32)
    (y,) = run(model, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(y, -x + 6.0)
