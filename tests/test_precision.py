"""fp16 students (``quantization.precision``) through ONNX Runtime's float16 converter: parity on the CPU EP within
float16 tolerance, Softmax / normalization kept float32, the compress stage and its report, bf16 refused in one
line, and the latency on the CUDA EP when a GPU is there (skipped otherwise)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inhercc import compress
from inhercc.errors import InherccError
from inhercc.precision import SENSITIVE_OPS, convert_precision, to_float16
from inhercc.recipe import Recipe
from inhercc.runtime import make_session, provider_usable
from inhercc.verify import output_fidelity
from tests.helpers import make_model, mlp, run
from tests.test_cli import invoke


def block(rng: np.random.Generator, d: int = 64, seq: int = 16) -> onnx.ModelProto:
    """A transformer-style block: x [b, seq, d] → MatMul → Softmax over the last axis (attention-like scores)
    → MatMul → Add residual → LayerNormalization → MatMul."""
    w = {n: (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for n in ("wq", "wv", "wo")}
    w |= {"gamma": np.ones(d, np.float32), "beta": np.zeros(d, np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"),
        helper.make_node("MatMul", ["q", "xt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="ctx"),
        helper.make_node("Add", ["ctx", "x"], ["res"], name="res"),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "wo"], ["y"], name="out"),
    ]
    return make_model(nodes, {"x": ["b", seq, d]}, ["y"], w)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (shape inference over the converted graph)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in vis}


def test_fp16_runs_on_the_cpu_ep_within_fp16_tolerance_with_sensitive_ops_kept_fp32() -> None:
    rng = np.random.default_rng(0)
    model = block(rng)
    x = rng.standard_normal((4, 16, 64)).astype(np.float32)
    half = convert_precision(model, "fp16")
    y32, y16 = run(model, {"x": x})[0], run(half, {"x": x})[0]
    assert y16.dtype == np.float32  # inputs and outputs stay float32
    np.testing.assert_allclose(y16, y32, rtol=0, atol=2e-2 * np.abs(y32).max())  # float16: ~3 decimal digits
    assert output_fidelity(y32, y16)["cosine"] > 0.9999
    ops = [n.op_type for n in half.graph.node]
    assert ops.count("Softmax") == 1 and ops.count("LayerNormalization") == 1 and ops.count("MatMul") == 5
    types = _types(half)
    node = {n.name: n for n in half.graph.node}
    for name in ("softmax", "ln"):  # fed and producing float32 …
        assert types[node[name].input[0]] == TensorProto.FLOAT and types[node[name].output[0]] == TensorProto.FLOAT
    for name in ("q", "v", "out"):  # … the matrix products in float16
        assert types[node[name].output[0]] == TensorProto.FLOAT16
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert weights["wq"] == TensorProto.FLOAT16 and weights["gamma"] == TensorProto.FLOAT
    assert ops.count("Cast") >= 4  # around the two float32 islands and at the float32 input / output
    plain = to_float16(model)  # ORT's default block list: Softmax and LayerNormalization in float16
    assert _types(plain)[next(n for n in plain.graph.node if n.op_type == "Softmax").output[0]] == TensorProto.FLOAT16
    assert {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt"} <= set(SENSITIVE_OPS)


def test_compress_stores_an_fp16_student_with_fidelity_before_and_after() -> None:
    rng = np.random.default_rng(0)
    teacher, x = mlp(rng, (64, 256, 64)), rng.standard_normal((256, 64)).astype(np.float32)
    plain = compress(teacher, Recipe.of(ratio=0.5), data={"x": x})
    half = compress(teacher, Recipe.of(ratio=0.5, student_precision="fp16"), data={"x": x})
    assert half.report["precision"] == "fp16" and "precision" in half.report["time_s"]
    assert half.report["fidelity_fp32"] == plain.report["fidelity"]
    b, a = plain.report["fidelity"]["y"]["cosine"], half.report["fidelity"]["y"]["cosine"]
    assert abs(a - b) < 1e-4  # measured 5e-6
    assert half.model.ByteSize() < 0.56 * plain.model.ByteSize()  # measured 0.507
    assert {t.data_type for t in half.model.graph.initializer} == {TensorProto.FLOAT16}


def test_bf16_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InherccError, match=r"^`quantization.precision` must be fp32 or fp16 .*no bfloat16.*'bf16'$"):
        Recipe.of(student_precision="bf16").check()
    with pytest.raises(InherccError, match="no bfloat16"):
        convert_precision(mlp(np.random.default_rng(0)), "bf16")
    onnx.save(mlp(np.random.default_rng(0)), str(tmp_path / "t.onnx"))
    r = invoke("compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "8", "--student-precision", "bf16")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert lines[0].startswith("error: --student-precision must be fp32 or fp16"), r.output
    assert not (tmp_path / "s.onnx").exists()


def _median_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 30) -> float:
    session = make_session(model, ("cuda",))
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


@pytest.mark.skipif(not provider_usable("cuda"), reason="needs the CUDA execution provider and a GPU")
def test_fp16_student_is_faster_on_the_cuda_ep() -> None:
    """A MatMul-heavy student (FFN 1024→4096→1024 at ratio 0.5, batch 2048): float16 tensor-core products."""
    rng = np.random.default_rng(0)
    teacher = mlp(rng, (1024, 4096, 1024))
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    half = convert_precision(student, "fp16")
    feeds = {"x": rng.standard_normal((2048, 1024)).astype(np.float32)}
    fp32_ms, fp16_ms = _median_ms(student, feeds), _median_ms(half, feeds)
    assert fp16_ms < fp32_ms, (fp16_ms, fp32_ms)


def test_cli_compress_student_precision_fp16(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    onnx.save(mlp(rng, (64, 256, 64)), str(tmp_path / "t.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((128, 64)).astype(np.float32))
    r = invoke(
        "compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--data", tmp_path / "d.npz",
        "--student-precision", "fp16",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "y, the fp32 student before fp16 conversion: cosine 0." in r.output
    student = onnx.load(str(tmp_path / "s.onnx"))
    assert {t.data_type for t in student.graph.initializer} == {TensorProto.FLOAT16}
    assert student.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
