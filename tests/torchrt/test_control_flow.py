"""If / Loop / Scan in the torch runtime: parity with ONNX Runtime, outer-scope reads (nested too), weights
inside bodies as named parameters written back into their subgraph, gradients through the taken branch
and through the iterations, and a torch.cond export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from inhercc.torchrt import OnnxModule
from inhercc.torchrt.parity import compare
from tests.helpers import run

N, D = 3, 4


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(
    nodes: list, inputs: list, outputs: list[str], weights: dict, elem: int = TensorProto.FLOAT
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "control",
        inputs,
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _x_input(dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", dtype, ["n", D])


def _if_model(dtype: type = np.float32) -> onnx.ModelProto:
    """y = If(c, relu(x @ then.w), x @ else.w + bias): then.w an initializer of the then-branch, else.w a
    Constant node of the else-branch, x and bias read from the outer scope."""
    rng = _rng()
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    then_w = rng.standard_normal((D, 3)).astype(dtype)
    else_w = rng.standard_normal((D, 3)).astype(dtype)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "then.w"], ["t"]), helper.make_node("Relu", ["t"], ["then_y"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", elem, None)],
        [numpy_helper.from_array(then_w, "then.w")],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["else.w"], value=numpy_helper.from_array(else_w)),
            helper.make_node("MatMul", ["x", "else.w"], ["e"]),
            helper.make_node("Add", ["e", "bias"], ["else_y"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("else_y", elem, None)],
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    inputs = [_x_input(elem), helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    return _model(nodes, inputs, ["y"], {"bias": rng.standard_normal(3).astype(dtype)}, elem)


def test_if_matches_onnx_runtime_on_both_branches() -> None:
    model = _if_model()
    x = _rng(1).standard_normal((N, D)).astype(np.float32)
    for c in (True, False):
        parity = compare(model, {"x": x, "c": np.array(c)})
        assert parity.ok and parity.max_rel < 1e-6, parity


def test_weights_inside_branches_are_named_parameters_with_gradients_of_the_taken_branch() -> None:
    model = _if_model()
    module = OnnxModule(model)
    assert set(module.onnx_parameters()) == {"bias", "then.w", "else.w"}
    x = torch.from_numpy(_rng(1).standard_normal((N, D)).astype(np.float32))
    module(x, np.array(True))[0].square().sum().backward()
    then_w = module.parameter("then.w").detach().requires_grad_(True)
    torch.relu(x @ then_w).square().sum().backward()
    torch.testing.assert_close(module.parameter("then.w").grad, then_w.grad)
    assert module.parameter("else.w").grad is None and module.parameter("bias").grad is None
    module.zero_grad()
    module(x, np.array(False))[0].sum().backward()
    torch.testing.assert_close(module.parameter("else.w").grad, x.sum(0, keepdim=True).T.expand(D, 3))
    torch.testing.assert_close(module.parameter("bias").grad, torch.full((3,), float(N)))
    assert module.parameter("then.w").grad is None


def test_write_back_writes_subgraph_weights_where_they_live() -> None:
    model = _if_model()
    module = OnnxModule(model)
    with torch.no_grad():
        module.parameter("then.w").mul_(2.0)
        module.parameter("else.w").add_(1.0)
    written = module.write_back(model)
    branches = {a.name: a.g for a in written.graph.node[0].attribute}
    np.testing.assert_array_equal(
        numpy_helper.to_array(branches["then_branch"].initializer[0]), module.parameter("then.w").detach().numpy()
    )
    np.testing.assert_array_equal(
        numpy_helper.to_array(branches["else_branch"].node[0].attribute[0].t),
        module.parameter("else.w").detach().numpy(),
    )
    x = _rng(1).standard_normal((N, D)).astype(np.float32)
    for c in (True, False):
        with torch.no_grad():
            got = module(x, np.array(c))[0].numpy()
        np.testing.assert_allclose(run(written, {"x": x, "c": np.array(c)})[0], got, rtol=1e-6, atol=1e-6)
        assert not np.allclose(run(model, {"x": x, "c": np.array(c)})[0], got)


def test_a_value_floats_constant_in_a_branch_is_a_weight_written_back_as_a_tensor() -> None:
    """A body Constant given as ``value_floats`` (read as the model loader reads it) is a parameter too; 0-d
    float initializers of a body (a Clip bound) stay constants."""
    model = _if_model()
    else_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    else_branch.node.insert(0, helper.make_node("Constant", [], ["shift"], value_floats=[0.5, -1.0, 2.0]))
    else_branch.node.append(helper.make_node("Add", ["else_y", "shift"], ["shifted"]))
    else_branch.node.append(helper.make_node("Clip", ["shifted", "", "top"], ["clipped"]))
    else_branch.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "top"))
    else_branch.output[0].name = "clipped"
    module = OnnxModule(model)
    assert set(module.onnx_parameters()) == {"bias", "then.w", "else.w", "shift"}
    with torch.no_grad():
        module.parameter("shift").sub_(3.0)
    written = module.write_back(model)
    branch = next(a.g for a in written.graph.node[0].attribute if a.name == "else_branch")
    np.testing.assert_array_equal(numpy_helper.to_array(branch.node[0].attribute[0].t), [-2.5, -4.0, -1.0])
    x = _rng(1).standard_normal((N, D)).astype(np.float32)
    with torch.no_grad():
        got = module(x, np.array(False))[0].numpy()
    np.testing.assert_allclose(run(written, {"x": x, "c": np.array(False)})[0], got, rtol=1e-6, atol=1e-6)
    assert got.max() <= 1.5


def test_static_float_inputs_of_the_model_loader_are_static_in_the_registry() -> None:
    """The model loader keeps float constants read at these inputs in their body (no weights): the torch
    runtime must read them as static values too."""
    from inhercc.model import STATIC_FLOAT_INPUTS
    from inhercc.torchrt.ops.registry import lookup

    for op, positions in STATIC_FLOAT_INPUTS.items():
        spec = lookup("", op, 9 if op == "Upsample" else 17)
        assert set(positions) <= set(spec.static_inputs), op


def _loop_model(dtype: type = np.float32, trip_count: bool = True, early_stop: bool = True) -> onnx.ModelProto:
    """h_{i+1} = tanh(h_i @ body.w + x) for M iterations (or while i < limit - 1 when `early_stop`), also
    emitting sum(h_{i+1}) per iteration; body.w lives in the body, x and limit come from the outer scope."""
    rng = _rng(2)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    body_nodes = [
        helper.make_node("MatMul", ["h_in", "body.w"], ["hw"]),
        helper.make_node("Add", ["hw", "x"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
        helper.make_node("ReduceSum", ["h_out"], ["total"], keepdims=0),
    ]
    if early_stop:
        body_nodes += [
            helper.make_node("Add", ["i", "one"], ["next_i"]),
            helper.make_node("Less", ["next_i", "limit"], ["cond_out"]),
        ]
    else:
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        body_nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", elem, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", elem, None),
            helper.make_tensor_value_info("total", elem, None),
        ],
        [numpy_helper.from_array((rng.standard_normal((D, D)) * 0.5).astype(dtype), "body.w")],
    )
    loop_inputs = ["M" if trip_count else "", "cond" if early_stop else "", "h0"]
    nodes = [helper.make_node("Loop", loop_inputs, ["h", "totals"], body=body)]
    inputs = [_x_input(elem), helper.make_tensor_value_info("h0", elem, ["n", D])]
    if trip_count:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.INT64, []))
    weights: dict[str, np.ndarray] = {}
    if early_stop:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        weights = {"one": np.array(1, np.int64), "limit": np.array(4, np.int64)}
    return _model(nodes, inputs, ["h", "totals"], weights, elem)


@pytest.mark.parametrize(
    ("trip_count", "early_stop", "iterations"), [(True, False, 6), (True, True, 4), (False, True, 4)]
)
def test_loop_matches_onnx_runtime(trip_count: bool, early_stop: bool, iterations: int) -> None:
    model = _loop_model(trip_count=trip_count, early_stop=early_stop)
    rng = _rng(3)
    feeds = {"x": rng.standard_normal((N, D)).astype(np.float32), "h0": rng.standard_normal((N, D)).astype(np.float32)}
    if trip_count:
        feeds["M"] = np.array(6, np.int64)
    if early_stop:
        feeds["cond"] = np.array(True)
    parity = compare(model, feeds)
    assert parity.ok and parity.max_rel < 1e-5, parity
    assert OnnxModule(model)(**feeds)[1].shape == (iterations,)
    assert "body.w" in OnnxModule(model).onnx_parameters()


def test_gradients_flow_through_loop_iterations() -> None:
    """Finite differences in float64 through the body's weight, the outer-scope x and the carried state."""
    model = _loop_model(np.float64, trip_count=True, early_stop=True)
    module = OnnxModule(model)
    rng = _rng(4)
    x = torch.from_numpy(rng.standard_normal((N, D))).requires_grad_(True)
    h0 = torch.from_numpy(rng.standard_normal((N, D))).requires_grad_(True)
    w = module.parameter("body.w").detach().clone().requires_grad_(True)
    key = "initializers.body_w"

    def f(x: torch.Tensor, h0: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.functional_call(
            module, {key: w}, (), {"x": x, "h0": h0, "M": np.array(6), "cond": np.array(True)}
        )

    assert torch.autograd.gradcheck(f, (x, h0, w), eps=1e-6, atol=1e-6, rtol=1e-4)


def _scan_model() -> onnx.ModelProto:
    """s_t = tanh(s_{t-1} + a_t @ scan.w + b_t) scanning a along axis 1 (forward) and b along axis 0 (reverse);
    outputs the states along axis 1 and, prepended, their sums."""
    rng = _rng(5)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["a_t", "scan.w"], ["aw"]),
            helper.make_node("Add", ["s_in", "aw"], ["p"]),
            helper.make_node("Add", ["p", "b_t"], ["q"]),
            helper.make_node("Tanh", ["q"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
            helper.make_node("ReduceSum", ["s_out"], ["z_t"], keepdims=0),
        ],
        "scan_body",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s_in", "a_t", "b_t")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s_out", "y_t", "z_t")],
        [numpy_helper.from_array((rng.standard_normal((D, D)) * 0.5).astype(np.float32), "scan.w")],
    )
    node = helper.make_node(
        "Scan",
        ["s0", "a", "b"],
        ["s", "y", "z"],
        body=body,
        num_scan_inputs=2,
        scan_input_axes=[1, 0],
        scan_input_directions=[0, 1],
        scan_output_axes=[-2, 0],
        scan_output_directions=[0, 1],
    )
    inputs = [
        helper.make_tensor_value_info("s0", TensorProto.FLOAT, [N, D]),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [N, "t", D]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["t", N, D]),
    ]
    return _model([node], inputs, ["s", "y", "z"], {})


def test_scan_axes_and_directions_match_onnx_runtime() -> None:
    rng = _rng(6)
    feeds = {
        "s0": rng.standard_normal((N, D)).astype(np.float32),
        "a": rng.standard_normal((N, 5, D)).astype(np.float32),
        "b": rng.standard_normal((5, N, D)).astype(np.float32),
    }
    model = _scan_model()
    parity = compare(model, feeds)
    assert parity.ok and parity.max_rel < 1e-5, parity
    assert [o.name for o in parity.outputs] == ["s", "y", "z"]
    assert OnnxModule(model)(**feeds)[1].shape == (N, 5, D)


def test_nested_if_in_loop_reads_values_of_both_enclosing_graphs() -> None:
    """An If inside a Loop body reads the top graph's x and the body's h_in; its branch holds a weight."""
    rng = _rng(7)
    inner_then = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "inner.w"], ["hw"]), helper.make_node("Add", ["hw", "x"], ["r"])],
        "inner_then",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.5, "inner.w")],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Sub", ["h_in", "x"], ["r2"])],
        "inner_else",
        [],
        [helper.make_tensor_value_info("r2", 1, None)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Mod", ["i", "two"], ["parity"]),
            helper.make_node("Equal", ["parity", "zero"], ["even"]),
            helper.make_node("If", ["even"], ["branch"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Tanh", ["branch"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [helper.make_node("Loop", ["M", "", "x"], ["h"], body=body)]
    weights = {"M": np.array(5, np.int64), "two": np.array(2, np.int64), "zero": np.array(0, np.int64)}
    model = _model(nodes, [_x_input()], ["h"], weights)
    parity = compare(model, {"x": rng.standard_normal((N, D)).astype(np.float32)})
    assert parity.ok and parity.max_rel < 1e-5, parity
    assert "inner.w" in OnnxModule(model).onnx_parameters()


class _Cond(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda v: torch.relu(self.a(v)), lambda v: torch.sigmoid(self.b(v)) * 2, (x,))


def test_torch_cond_export() -> None:
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = _Cond().eval()
    program = torch.onnx.export(
        net, (torch.randn(3, 6),), dynamo=True, verbose=False, dynamic_shapes={"x": {0: torch.export.Dim("b")}}
    )
    model = program.model_proto
    assert "If" in {n.op_type for n in model.graph.node}
    module = OnnxModule(model)
    name = module.input_names[0]
    for sign in (1.0, -1.0):
        x = (np.abs(_rng(8).standard_normal((5, 6))) * sign).astype(np.float32)
        parity = compare(model, {name: x})
        assert parity.ok and parity.max_rel < 1e-6, parity
        with torch.no_grad():
            np.testing.assert_allclose(module(x)[0].numpy(), net(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)


def test_weights_named_alike_in_two_branches_stay_distinct() -> None:
    """Each branch holds its own initializer 'w': the second is keyed by its node and attribute."""
    rng = _rng(9)
    branches = {}
    for attr in ("then_branch", "else_branch"):
        branches[attr] = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], [f"{attr}_y"])],
            attr,
            [],
            [helper.make_tensor_value_info(f"{attr}_y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(rng.standard_normal((D, 2)).astype(np.float32), "w")],
        )
    nodes = [helper.make_node("If", ["c"], ["y"], **branches)]
    model = _model(nodes, [_x_input(), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], ["y"], {})
    module = OnnxModule(model)
    assert list(module.onnx_parameters()) == ["w", "w@0.else_branch"]
    with torch.no_grad():
        module.parameter("w@0.else_branch").mul_(-1.0)
    written = module.write_back(model)
    x = _rng(10).standard_normal((N, D)).astype(np.float32)
    for c in (True, False):
        assert compare(written, {"x": x, "c": np.array(c)}).ok
        with torch.no_grad():
            np.testing.assert_allclose(
                module(x, np.array(c))[0].numpy(), run(written, {"x": x, "c": np.array(c)})[0], rtol=1e-6
            )
    assert not np.allclose(
        run(written, {"x": x, "c": np.array(False)})[0], run(model, {"x": x, "c": np.array(False)})[0]
    )


def _placement_model() -> onnx.ModelProto:
    """If on a host condition (x's row count, from Shape) whose branch reshapes by a shape computed inside
    it, feeding a Loop (constant trip count) whose body holds a weight, reads x from the outer scope and
    emits a host value (its state's Shape) per iteration."""
    rng = _rng(11)
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "then.w"], ["xw"]),
            helper.make_node("Shape", ["xw"], ["xw_shape"]),
            helper.make_node("Reshape", ["xw", "xw_shape"], ["then_y"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "then.w")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_y"])], "else", [], [helper.make_tensor_value_info("else_y", 1, None)]
    )
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "body.w"], ["hw"]),
            helper.make_node("Add", ["hw", "x"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Shape", ["h_out"], ["h_shape"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("h_shape", TensorProto.INT64, None),
        ],
        [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.5, "body.w")],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["rows"], axis=0),
        helper.make_node("Equal", ["rows", "three"], ["is_three"]),
        helper.make_node("If", ["is_three"], ["start"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["M", "", "start"], ["h", "shapes"], body=body),
    ]
    weights = {"zero": np.array(0, np.int64), "three": np.array(3, np.int64), "M": np.array(3, np.int64)}
    model = _model(nodes, [_x_input()], ["h", "shapes"], weights)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.INT64
    return model


def test_host_and_device_values_meet_only_where_copied() -> None:
    """On the meta device nothing can be read back and host/device tensors cannot mix: the run proves the
    bodies' captured weights follow the module, shapes stay on the host and a body's host result moves."""
    model = _placement_model()
    for rows in (3, 2):
        x = _rng(12).standard_normal((rows, D)).astype(np.float32)
        parity = compare(model, {"x": x})
        assert parity.ok and parity.max_rel < 1e-5, parity
        meta = OnnxModule(model).to("meta")
        h, shapes = meta(torch.empty(rows, D, device="meta"))
        assert h.device.type == "meta" and tuple(h.shape) == (rows, D)
        assert shapes.device.type == "meta" and tuple(shapes.shape) == (3, 2)


def _silero(name: str) -> onnx.ModelProto:
    """A model file of the silero-vad wheel when it is installed (the zoo installs it; nothing downloaded)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.exists():
        pytest.skip(f"silero-vad lacks {name}")
    return onnx.load(path)


@pytest.mark.parametrize("name", ["silero_vad.onnx", "silero_vad_16k_op15.onnx"])
def test_silero_vad_if_and_lstm_match_onnx_runtime(name: str) -> None:
    """Nested Ifs on the sample rate, LSTMs inside them; in silero_vad.onnx every weight is a Constant node
    inside an If branch."""
    model = _silero(name)
    rng = _rng(13)
    for sr, samples in ((16000, 512), (8000, 256)):
        feeds = {
            "input": (rng.standard_normal((2, samples)) * 0.1).astype(np.float32),
            "state": (rng.standard_normal((2, 2, 128)) * 0.1).astype(np.float32),
            "sr": np.array(sr, np.int64),
        }
        parity = compare(model, feeds)
        assert parity.ok and parity.max_rel < 1e-4, parity
    if name == "silero_vad.onnx":
        params = OnnxModule(model).onnx_parameters()
        assert len(params) == 28 and all("_branch__" in n for n in params)
