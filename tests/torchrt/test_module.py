"""OnnxModule: parameters keyed by ONNX name, forward conventions, errors, write-back, gradients, placement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from inhercc.errors import InherccError
from inhercc.torchrt import OnnxModule, UnsupportedModelError
from tests.helpers import initializer, make_model, mlp, run


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _dotted_model() -> onnx.ModelProto:
    """x @ W + b, a Shape-driven Reshape, int64 shape initializer; names with dots, slashes and colons."""
    rng = _rng()
    weights = {
        "layer.0/dense:weight": rng.standard_normal((8, 6)).astype(np.float32),
        "layer.0/dense:bias": rng.standard_normal(6).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "layer.0/dense:weight"], ["h"]),
        helper.make_node("Add", ["h", "layer.0/dense:bias"], ["y"]),
        helper.make_node("Reshape", ["y", "flat.shape"], ["flat"]),
    ]
    model = make_model(nodes, {"x": ["batch", 8]}, ["y", "flat"], weights)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat.shape"))
    return model


def test_parameters_are_the_float_initializers_by_onnx_name() -> None:
    model = _dotted_model()
    module = OnnxModule(model)
    params = module.onnx_parameters()
    assert list(params) == ["layer.0/dense:weight", "layer.0/dense:bias"]
    for name, param in params.items():
        assert isinstance(param, torch.nn.Parameter)
        assert module.parameter(name) is param
        np.testing.assert_array_equal(param.detach().numpy(), initializer(model, name))
    assert list(module.onnx_buffers()) == ["flat.shape"]
    assert module.onnx_buffers()["flat.shape"].dtype == torch.int64
    assert {n for n, _ in module.named_parameters()} == {
        f"initializers.{n}" for n in ("layer_0_dense_weight", "layer_0_dense_bias")
    }
    with pytest.raises(InherccError, match="flat.shape"):
        module.parameter("flat.shape")


def test_forward_takes_positional_or_named_numpy_or_torch_inputs() -> None:
    model = _dotted_model()
    module = OnnxModule(model)
    x = _rng().standard_normal((5, 8)).astype(np.float32)
    expected = run(model, {"x": x})
    assert module.input_names == ["x"]
    assert module.output_names == ["y", "flat"]
    for out in (module(x), module(x=x), module(torch.from_numpy(x)), module(x.astype(np.float64))):
        assert isinstance(out, tuple) and len(out) == 2
        assert out[0].dtype == torch.float32
        for got, want in zip(out, expected):
            np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InherccError, match="missing graph inputs"):
        module()
    with pytest.raises(InherccError, match="unknown graph input"):
        module(x, z=x)


def test_every_unsupported_op_and_attribute_is_named_at_construction() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("NoSuchOp", ["a"], ["b"], name="mystery"),
        helper.make_node("Relu", ["b"], ["c"], name="relu_with_junk", junk=3),
        helper.make_node("Resize", ["c", "", "scales"], ["d"], mode="nearest", antialias=1),
        helper.make_node("Custom", ["d"], ["y"], domain="com.example"),
    ]
    model = make_model(nodes, {"x": [1, 1, 4, 4]}, ["y"], {"scales": np.ones(4, np.float32)}, opset=19)
    with pytest.raises(UnsupportedModelError) as caught:
        OnnxModule(model)
    problems = caught.value.problems
    assert len(problems) == 4
    message = str(caught.value)
    assert "ai.onnx::NoSuchOp (opset 19): no implementation [nodes: mystery]" in message
    assert "ai.onnx::Relu (opset 19): attribute junk [nodes: relu_with_junk]" in message
    assert "ai.onnx::Resize (opset 19): antialias with nearest" in message
    assert "com.example::Custom: domain not imported" in message
    assert isinstance(caught.value, InherccError)


def test_extra_outputs_return_intermediate_values() -> None:
    model = mlp(_rng())
    x = _rng().standard_normal((3, 64)).astype(np.float32)
    module = OnnxModule(model, extra_outputs=["a", "h"])
    assert module.output_names == ["y", "a", "h"]
    y, a, h = module(x)
    w1 = initializer(model, "fc1.weight")
    np.testing.assert_allclose(h.detach().numpy(), x @ w1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.detach().numpy(), np.maximum(x @ w1, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    module.set_extra_outputs([])
    assert len(module(x)) == 1
    with pytest.raises(InherccError, match="no value named"):
        module.set_extra_outputs(["nope"])


def test_set_trainable_selects_exactly_the_given_initializers() -> None:
    module = OnnxModule(mlp(_rng()))
    module.set_trainable(None)
    assert all(p.requires_grad for p in module.onnx_parameters().values())
    module.set_trainable(["fc2.weight"])
    assert {n for n, p in module.onnx_parameters().items() if p.requires_grad} == {"fc2.weight"}
    with pytest.raises(InherccError, match="fc9.weight"):
        module.set_trainable(["fc2.weight", "fc9.weight"])


def test_optimizer_step_changes_only_the_trainable_initializers_and_writes_back() -> None:
    model = mlp(_rng())
    module = OnnxModule(model)
    module.set_trainable(["fc1.weight", "fc2.bias"])
    before = {n: p.detach().clone() for n, p in module.onnx_parameters().items()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    x = torch.from_numpy(_rng().standard_normal((16, 64)).astype(np.float32))
    module(x)[0].square().mean().backward()
    optimizer.step()
    changed = {n for n, p in module.onnx_parameters().items() if not torch.equal(p.detach(), before[n])}
    assert changed == {"fc1.weight", "fc2.bias"}

    trained = module.write_back(model)
    for name in ("fc1.weight", "fc2.weight", "fc2.bias"):
        value = initializer(trained, name)
        np.testing.assert_array_equal(value, module.parameter(name).detach().numpy())
        assert (not np.array_equal(value, initializer(model, name))) == (name in changed)
    # everything but the initializer values is untouched
    assert [n.SerializeToString() for n in trained.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in trained.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    ]
    with torch.no_grad():
        want = module(x)[0].numpy()
    np.testing.assert_allclose(run(trained, {"x": x.numpy()})[0], want, rtol=1e-5, atol=1e-6)


def test_write_back_keeps_dtypes_of_half_precision_initializers() -> None:
    rng = _rng()
    for elem, np_dtype in ((TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)):
        w = rng.standard_normal((4, 3)).astype(np_dtype)
        model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": [2, 4]}, ["y"], {"w": w}, dtype=elem)
        module = OnnxModule(model)
        param = module.parameter("w")
        assert param.dtype == torch.from_numpy(w).dtype
        with torch.no_grad():
            param.mul_(2)
        trained = module.write_back(model)
        proto = next(t for t in trained.graph.initializer if t.name == "w")
        assert proto.data_type == elem
        np.testing.assert_array_equal(numpy_helper.to_array(proto), (w * 2).astype(np_dtype))
        x = rng.standard_normal((2, 4)).astype(np_dtype)
        np.testing.assert_allclose(
            module(x)[0].detach().numpy().astype(np.float64), run(trained, {"x": x})[0].astype(np.float64), rtol=1e-3
        )


def _small_net(dtype: int) -> onnx.ModelProto:
    """Conv → Relu → Flatten → Gemm → Add → LayerNormalization → Softmax, built with onnx.helper."""
    rng = _rng()
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    weights = {
        "conv.w": rng.standard_normal((3, 2, 3, 3)),
        "conv.b": rng.standard_normal(3),
        "fc.w": rng.standard_normal((5, 18)) * 0.3,
        "fc.b": rng.standard_normal(5),
        "shift": rng.standard_normal(5),
        "ln.scale": 1 + 0.1 * rng.standard_normal(5),
        "ln.bias": 0.1 * rng.standard_normal(5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 0, 1, 0], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("Add", ["g", "shift"], ["g2"]),
        helper.make_node("LayerNormalization", ["g2", "ln.scale", "ln.bias"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    return make_model(
        nodes, {"x": [2, 2, 5, 6]}, ["y"], {k: v.astype(np_dtype) for k, v in weights.items()}, dtype=dtype
    )


def test_gradients_match_finite_differences_in_float64() -> None:
    model = _small_net(TensorProto.DOUBLE)
    module = OnnxModule(model)
    names = list(module.onnx_parameters())
    keys = [f"initializers.{name.replace('.', '_')}" for name in names]
    params = tuple(module.parameter(n).detach().clone().requires_grad_(True) for n in names)
    x = torch.from_numpy(_rng().standard_normal((2, 2, 5, 6))).requires_grad_(True)

    def f(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(keys, weights)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_in_place_reuse_does_not_change_values_or_gradients() -> None:
    """Dead temporaries are overwritten in place; results and gradients equal a plain out-of-place run."""
    model = _small_net(TensorProto.FLOAT)
    module = OnnxModule(model)
    assert any(s.inplace_grad for s in module._steps) and any(s.inplace_nograd for s in module._steps)
    x = torch.from_numpy(_rng().standard_normal((2, 2, 5, 6)).astype(np.float32))
    y = module(x)[0]
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.onnx_parameters().items()}
    with torch.no_grad():
        y_nograd = module(x)[0]
    for step in module._steps:
        step.inplace_grad = step.inplace_nograd = None
    module.zero_grad()
    y_plain = module(x)[0]
    y_plain.square().sum().backward()
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(y_nograd, y_plain.detach())
    for name, param in module.onnx_parameters().items():
        torch.testing.assert_close(param.grad, grads[name])
    np.testing.assert_allclose(y_plain.detach().numpy(), run(model, {"x": x.numpy()})[0], rtol=1e-5, atol=1e-6)


def test_intermediates_are_freed_after_their_last_consumer() -> None:
    model = _small_net(TensorProto.FLOAT)
    module = OnnxModule(model, extra_outputs=["r"])
    steps = module._steps
    results = set(module._result_slots)
    freed = [slot for step in steps for slot in step.free]
    assert len(freed) == len(set(freed))
    produced = {slot for step in steps for slot in step.outputs} | {module._slot["x"]}
    assert set(freed) == produced - results
    for index, step in enumerate(steps):
        for slot in step.free:
            assert slot in step.inputs or slot in step.outputs
            assert all(slot not in later.inputs for later in steps[index + 1 :])


def test_constant_node_weights_stay_constants() -> None:
    w = _rng().standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    model = make_model(nodes, {"x": [2, 4]}, ["y"], {})
    module = OnnxModule(model)
    assert module.onnx_parameters() == {}
    x = _rng().standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(module(x)[0].detach().numpy(), x @ w, rtol=1e-6)


def _dynamic_reshape_model() -> onnx.ModelProto:
    """Shape arithmetic (Shape → Gather → Mul → Concat → Reshape) on a dynamic batch, plus a MatMul."""
    rng = _rng()
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
        helper.make_node("Mul", ["batch", "two"], ["batch2"]),
        helper.make_node("Unsqueeze", ["batch2", "axes0"], ["batch2_1d"]),
        helper.make_node("Concat", ["batch2_1d", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["y"]),
    ]
    model = make_model(nodes, {"x": ["batch", 4]}, ["y"], {"w": rng.standard_normal((4, 6)).astype(np.float32)})
    for name, value in (
        ("zero", np.array(0)),
        ("two", np.array(2)),
        ("axes0", np.array([0])),
        ("minus1", np.array([-1])),
    ):
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
    return model


def test_shape_arithmetic_stays_on_the_host() -> None:
    """On the meta device nothing can be read back: the run proves shapes never leave the CPU."""
    model = _dynamic_reshape_model()
    module = OnnxModule(model)
    x = _rng().standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(module(x)[0].detach().numpy(), run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    meta = OnnxModule(model).to("meta")
    out = meta(torch.empty(5, 4, device="meta"))[0]
    assert out.device.type == "meta" and tuple(out.shape) == (10, 3)


@pytest.mark.cuda
def test_runs_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _dynamic_reshape_model()
    module = OnnxModule(model).to("cuda")
    x = _rng().standard_normal((5, 4)).astype(np.float32)
    out = module(x)[0]
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.detach().cpu().numpy(), run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_names_that_clash_once_sanitized_stay_distinct() -> None:
    rng = _rng()
    weights = {"a.b": rng.standard_normal(3).astype(np.float32), "a_b": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("Add", ["x", "a.b"], ["s"]), helper.make_node("Mul", ["s", "a_b"], ["y"])]
    model = make_model(nodes, {"x": [3]}, ["y"], weights)
    module = OnnxModule(model)
    assert module.parameter("a.b") is not module.parameter("a_b")
    x = rng.standard_normal(3).astype(np.float32)
    np.testing.assert_allclose(module(x)[0].detach().numpy(), (x + weights["a.b"]) * weights["a_b"], rtol=1e-6)


def test_unloaded_external_data_is_a_clear_error(tmp_path: Path) -> None:
    model = mlp(_rng())
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InherccError, match="external file") as caught:
        OnnxModule(unloaded)
    assert not isinstance(caught.value, UnsupportedModelError)
    loaded = OnnxModule(onnx.load(tmp_path / "m.onnx"))
    assert set(loaded.onnx_parameters()) == {"fc1.weight", "fc2.weight", "fc2.bias"}
