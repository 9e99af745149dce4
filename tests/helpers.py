"""Builders shared by the tests: small ONNX graphs made with onnx.helper, ORT runs, compressed students."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inhercc.runtime import make_session


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int | str]],
    outputs: Sequence[str],
    weights: Mapping[str, np.ndarray],
    opset: int = 17,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A one-graph model: float inputs with the given (possibly symbolic) shapes, weights as initializers."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(k, dtype, list(v)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, dtype, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return list(make_session(model).run(None, dict(feeds)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def factor_product(model: onnx.ModelProto, weight_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The two factor initializers a pass made for ``weight_name``."""
    return initializer(model, f"{weight_name}.inherit_in"), initializer(model, f"{weight_name}.inherit_out")


def mlp(rng: np.random.Generator, dims: Sequence[int] = (64, 96, 48)) -> onnx.ModelProto:
    """x → MatMul → Relu → MatMul (+bias Add): a tiny transformer-like FFN."""
    w1 = (rng.standard_normal((dims[0], dims[1])) / np.sqrt(dims[0])).astype(np.float32)
    w2 = (rng.standard_normal((dims[1], dims[2])) / np.sqrt(dims[1])).astype(np.float32)
    b2 = rng.standard_normal(dims[2]).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "fc2.bias"], ["y"], name="fc2_bias"),
    ]
    return make_model(nodes, {"x": ["batch", dims[0]]}, ["y"], {"fc1.weight": w1, "fc2.weight": w2, "fc2.bias": b2})


def masked_model(seq: int | str) -> onnx.ModelProto:
    """x [batch, seq, 4] → MatMul(W 4×3); an int64 attention_mask [batch, seq] used by a second output."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, 4]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("m", 1, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
