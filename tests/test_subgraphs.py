"""Layers inside If / Loop bodies: found (weights as body Constants, body initializers or outer-scope
initializers), planned, factorized in place and exact at full rank; the plain and calibrated compress work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inhercc.layers import SUBGRAPH_NOTE, find_layers
from inhercc.model import prepare_model
from inhercc.passes import FactorizeConv, run_passes
from inhercc.pipeline import Factorizer, compress, inspect_model
from inhercc.recipe import Recipe
from tests.helpers import rel_err, run

N_IN, N_HID = 96, 80


def tensor_info(name: str, elem: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def control_flow_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``h = If(sum(x) > 0, x·W_then, x·W_else)``, then ``y = Loop(3 × v ← tanh(Gemm(v, W_loop, b)))``.

    W_then is a Constant node inside the then branch, W_else an initializer of the main graph read from the
    else branch (outer scope), W_loop an initializer of the Loop body and the bias a Constant in the body."""
    w_then = (rng.standard_normal((N_IN, N_HID)) / np.sqrt(N_IN)).astype(np.float32)
    w_else = (rng.standard_normal((N_IN, N_HID)) / np.sqrt(N_IN)).astype(np.float32)
    w_loop = (rng.standard_normal((N_HID, N_HID)) / np.sqrt(N_HID)).astype(np.float32)  # [out, in], transB=1
    b_loop = rng.standard_normal(N_HID).astype(np.float32)
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["then.weight"], value=numpy_helper.from_array(w_then)),
            helper.make_node("MatMul", ["x", "then.weight"], ["h_then"], name="mm_then"),
        ],
        "then_body",
        [],
        [tensor_info("h_then")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "else.weight"], ["h_else"], name="mm_else")],
        "else_body",
        [],
        [tensor_info("h_else")],
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["loop.bias"], value=numpy_helper.from_array(b_loop)),
            helper.make_node("Gemm", ["v_in", "loop.weight", "loop.bias"], ["g"], name="gemm_loop", transB=1),
            helper.make_node("Tanh", ["g"], ["v_out"], name="tanh_loop"),
            helper.make_node("Identity", ["c_in"], ["c_out"], name="keep_going"),
        ],
        "loop_body",
        [tensor_info("i", TensorProto.INT64, []), tensor_info("c_in", TensorProto.BOOL, []), tensor_info("v_in")],
        [tensor_info("c_out", TensorProto.BOOL, []), tensor_info("v_out")],
        [numpy_helper.from_array(w_loop, "loop.weight")],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="total", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["h"], name="If_12", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["trip", "go", "h"], ["y"], name="Loop_3", body=loop_body),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [tensor_info("x", shape=["N", N_IN])],
        [tensor_info("y", shape=["N", N_HID])],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(3, np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "go"),
            numpy_helper.from_array(w_else, "else.weight"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, {"mm_then": w_then, "mm_else": w_else, "gemm_loop": w_loop.T}  # [in, out] each


def both_branches(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """One feed whose sum is positive (then branch) and one whose sum is negative (else branch)."""
    x = rng.standard_normal((5, N_IN)).astype(np.float32)
    return [{"x": np.abs(x)}, {"x": -np.abs(x)}]


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for node in graph.node:
        out.append(node)
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                out.extend(all_nodes(g))
    return out


def all_initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                out.update(all_initializers(g))
    return out


def effective_weight(student: onnx.ModelProto, layer: str) -> np.ndarray:
    """``A·B`` ([in, out]) of the factor chain that replaced ``layer``, wherever the chain and its factors live."""
    nodes = {n.name: n for n in all_nodes(student.graph)}
    inits = all_initializers(student.graph)
    first, second = nodes[f"{layer}.inherit_in"], nodes[f"{layer}.inherit_out"]
    a, b = inits[first.input[1]].astype(np.float64), inits[second.input[1]].astype(np.float64)
    if first.op_type == "Gemm":  # transB=1: stored [r, in] and [out, r]
        return a.T @ b.T
    return a @ b


def test_layers_in_if_and_loop_bodies_are_found() -> None:
    model, weights = control_flow_model(np.random.default_rng(0))
    layers = {la.name: la for la in find_layers(prepare_model(model))}
    assert sorted(layers) == ["gemm_loop", "mm_else", "mm_then"]
    assert {n: la.subgraph for n, la in layers.items()} == {
        "mm_then": "If_12/then_branch",
        "mm_else": "If_12/else_branch",
        "gemm_loop": "Loop_3/body",
    }
    for name, la in layers.items():
        assert la.compressible, la.reason
        assert la.weight_shape == (weights[name].shape if name != "gemm_loop" else weights[name].T.shape)
        np.testing.assert_array_equal(la.matrix()[0], weights[name].T.astype(np.float64))


def test_reasons_name_the_subgraph() -> None:
    model, _ = control_flow_model(np.random.default_rng(0))
    m = prepare_model(model)
    layers = {la.name: la for la in find_layers(m, exclude="mm_then", min_params=7000)}
    assert layers["mm_then"].reason == "inside If 'If_12' then_branch: excluded by pattern (matches an exclude pattern)"
    assert layers["gemm_loop"].reason == "inside Loop 'Loop_3' body: too small (6400 params < 7000)"
    assert layers["mm_else"].compressible
    # a pattern may name the subgraph a layer lives in
    layers = {la.name: la for la in find_layers(m, exclude=r"^If_12/")}
    assert not layers["mm_then"].compressible and not layers["mm_else"].compressible
    assert layers["gemm_loop"].compressible


def test_body_constants_are_moved_to_initializers_with_unique_names() -> None:
    model, _ = control_flow_model(np.random.default_rng(0))
    # both branches define a Constant "scale" (sibling scopes may): hoisted, they must not clash
    for attr, value in ((0, 2.0), (1, -3.0)):
        branch = model.graph.node[2].attribute[attr].g
        out = branch.output[0].name
        scale = numpy_helper.from_array(np.full(N_HID, value, np.float32))  # a weight: 0-d ones stay (below)
        branch.node.insert(0, helper.make_node("Constant", [], ["scale"], value=scale))
        branch.node.append(helper.make_node("Mul", [out, "scale"], [f"{out}_scaled"], name=f"scale_{attr}"))
        branch.output[0].name = f"{out}_scaled"
    m = prepare_model(model)
    assert not [n for n in all_nodes(m.graph) if n.op_type == "Constant"]
    names = [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names))
    assert {"scale", "If_12/else_branch/scale"} <= set(names) or {"scale", "If_12/then_branch/scale"} <= set(names)
    rng = np.random.default_rng(1)
    for feeds in both_branches(rng):
        (teacher,), (prepared,) = run(model, feeds), run(m, feeds)
        np.testing.assert_allclose(prepared, teacher, rtol=1e-6, atol=1e-6)


def test_plain_compress_factorizes_subgraph_layers() -> None:
    model, weights = control_flow_model(np.random.default_rng(0))
    result = compress(model, Recipe.of(rank=16))
    rows = {row["name"]: row for row in result.report["layers"]}
    assert {n: rows[n]["rank"] for n in weights} == {"mm_then": 16, "mm_else": 16, "gemm_loop": 16}
    factor = 16 * (N_IN + N_HID) * 2 + 16 * (N_HID + N_HID)
    dense = 2 * N_IN * N_HID + N_HID * N_HID
    assert result.report["params"]["teacher"] - result.report["params"]["student"] == dense - factor
    assert result.report["flops"]["teacher"] > result.report["flops"]["student"]
    for feeds in both_branches(np.random.default_rng(3)):
        (yt,), (ys,) = run(model, feeds), run(result.model, feeds)
        assert ys.shape == yt.shape and np.all(np.isfinite(ys))


def test_calibrated_compress_takes_plain_svd_inside_subgraphs() -> None:
    model, weights = control_flow_model(np.random.default_rng(0))
    rng = np.random.default_rng(4)
    data = {"x": rng.standard_normal((64, N_IN)).astype(np.float32)}
    for sequential in (False, True):
        result = compress(model, Recipe.of(ratio=0.5, sequential=sequential), data=data)
        rows = {row["name"]: row for row in result.report["layers"]}
        assert result.report["init"] == "whitened"
        for name in weights:
            if rows[name]["rank"] is not None:
                assert rows[name]["note"] == SUBGRAPH_NOTE
        planned = [n for n in weights if rows[n]["rank"] is not None]
        assert planned
        for name in planned:  # plain SVD of the weight: the Eckart–Young error
            w = weights[name].astype(np.float64)
            s = np.linalg.svd(w, compute_uv=False)
            err = np.linalg.norm(w - effective_weight(result.model, name))
            assert err == pytest.approx(np.sqrt(np.sum(s[rows[name]["rank"] :] ** 2)), rel=1e-4)


def silero_file() -> Path | None:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    return path if path.exists() else None


@pytest.mark.skipif(silero_file() is None, reason="silero-vad is not installed")
def test_silero_vad_weights_in_if_branches() -> None:
    path = silero_file()
    assert path is not None
    layers = find_layers(prepare_model(onnx.load(str(path))))
    convs = [la for la in layers if la.op == "Conv"]
    assert len(convs) == 12 and all(la.subgraph and la.subgraph.startswith("If_0/") for la in convs)
    assert sum(la.compressible for la in convs) == 10  # the 1×1 decoder convs [1, 128, 1] are too small
    result = compress(str(path), Recipe.of(rank=32, shapes={"input": [2, 512], "state": [2, 2, 128]}, verify=False))
    assert sum(row["rank"] == 32 for row in result.report["layers"]) == 10
    full = {la.name: la.full_rank for la in convs if la.compressible}
    exact = run_passes(
        prepare_model(onnx.load(str(path))), [FactorizeConv(full, {la.name: la for la in convs}, Factorizer("svd"))]
    )
    rng = np.random.default_rng(0)
    for sr, n in ((16000, 512), (8000, 256)):  # the two branches: 16 kHz and 8 kHz
        feeds = {
            "input": rng.standard_normal((2, n)).astype(np.float32) * 0.1,
            "state": np.zeros((2, 2, 128), np.float32),
            "sr": np.array(sr, np.int64),
        }
        teacher = run(onnx.load(str(path)), feeds)
        student = run(result.model, feeds)
        assert [s.shape for s in student] == [t.shape for t in teacher]
        assert all(np.all(np.isfinite(s)) for s in student)
        probability, state = run(exact.model, feeds)
        assert np.max(np.abs(probability - teacher[0])) <= 1e-5
        assert rel_err(state, teacher[1]) <= 1e-4


def test_inspect_with_data_lists_subgraph_layers() -> None:
    model, weights = control_flow_model(np.random.default_rng(0))
    data = {"x": np.random.default_rng(6).standard_normal((32, N_IN)).astype(np.float32)}
    info = inspect_model(model, data=data)
    rows = {row["name"]: row for row in info["layers"]}
    for name, w in weights.items():  # the weight spectrum (no activations to whiten by): plain rank90
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        assert rows[name]["rank90"] == int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.90) + 1)
    assert info["totals"]["compressible"] == 3
    assert rows["gemm_loop"]["subgraph"] == "Loop_3/body"


def test_nodes_named_alike_in_two_branches_get_unique_layer_names() -> None:
    model, _ = control_flow_model(np.random.default_rng(0))
    for attr in model.graph.node[2].attribute:
        next(n for n in attr.g.node if n.op_type == "MatMul").name = "fc"
    m = prepare_model(model)
    layers = [la for la in find_layers(m) if la.op == "MatMul"]
    assert [(la.name, la.subgraph) for la in layers] == [
        ("fc", "If_12/else_branch"),  # onnx.helper sorts attributes: else_branch comes first
        ("If_12/then_branch/fc", "If_12/then_branch"),
    ]
    assert prepare_model(m) == m  # stable: preparing again renames nothing


def scalar_bounds_model() -> onnx.ModelProto:
    """``y = If(sum(x) > 0, CastLike(Clip(x·W, lo, hi), like), x·W_else)``: W [8, 8] a Constant of the then
    branch, its Clip bounds a 0-d Constant (lo) and a 0-d body initializer (hi), ``like`` a 2-element float
    Constant read only for its type (a static input); W_else a main-graph initializer."""
    rng = np.random.default_rng(3)
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["then.weight"], value=numpy_helper.from_array(rng.random((8, 8), "f"))),
            helper.make_node("Constant", [], ["lo"], value_float=-0.25),
            helper.make_node("Constant", [], ["like"], value=numpy_helper.from_array(np.zeros(2, np.float32))),
            helper.make_node("MatMul", ["x", "then.weight"], ["m"], name="mm_then"),
            helper.make_node("Clip", ["m", "lo", "hi"], ["c"], name="clip"),
            helper.make_node("CastLike", ["c", "like"], ["h_then"], name="like"),
        ],
        "then_body",
        [],
        [tensor_info("h_then")],
        [numpy_helper.from_array(np.array(0.5, np.float32), "hi")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "else.weight"], ["h_else"], name="mm_else")],
        "else_body",
        [],
        [tensor_info("h_else")],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="total", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="If_0", then_branch=then_branch, else_branch=else_branch),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "else.weight"),
    ]
    graph = helper.make_graph(nodes, "bounds", [tensor_info("x", shape=["N", 8])], [tensor_info("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_hoist_and_torch_runtime_agree_on_what_a_body_weight_is() -> None:
    """Only float tensors of two or more elements that no node reads as a static input (shape, type) are
    weights: hoisted to the main graph at load, and the torch runtime's parameters (prepared or not)."""
    from inhercc.torchrt import OnnxModule

    model = scalar_bounds_model()
    prepared = prepare_model(model)
    floats = {t.name for t in prepared.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert floats == {"zero", "else.weight", "then.weight"}  # the Clip bounds and `like` stay in the branch
    then_body = next(a.g for a in prepared.graph.node[2].attribute if a.name == "then_branch")
    assert {t.name for t in then_body.initializer} == {"hi"}
    assert sorted(n.output[0] for n in then_body.node if n.op_type == "Constant") == ["like", "lo"]
    for m in (model, prepared):
        assert set(OnnxModule(m).onnx_parameters()) == {"zero", "else.weight", "then.weight"}
    for feeds in both_branches(np.random.default_rng(4)):
        feeds = {"x": feeds["x"][:, :8]}
        (teacher,) = run(model, feeds)
        np.testing.assert_allclose(run(prepared, feeds)[0], teacher, rtol=1e-6)
        got = OnnxModule(prepared)(feeds["x"])[0].detach().numpy()
        np.testing.assert_allclose(got, teacher, rtol=1e-5, atol=1e-6)
