"""INT8 students through ONNX Runtime's quantizer (``quantization.quantize``): the nodes ORT emits, the size,
the outputs against the fp32 student, static calibration on data, the report's fidelity before and after, the
factor-pair equalization, quantization-aware distillation (fake-quantized weights = ORT's), and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from inhercc import compress
from inhercc.errors import InherccError
from inhercc.quantize import (
    activation_ranges,
    dynamic_activations,
    equalize_factor_pairs,
    factor_pairs,
    qdq_weights,
    quantize_model,
    quantized_node_counts,
    quantized_weights,
)
from inhercc.recipe import Recipe
from inhercc.runtime import make_session
from inhercc.torchrt import OnnxModule
from inhercc.torchrt.fakequant import FakeQuant, fake_quantize_weights, remove_fake_quant, with_activation_fake_quant
from inhercc.verify import output_fidelity
from tests.helpers import make_model, mlp, run
from tests.test_cli import invoke

DIMS = (64, 256, 64)


@pytest.fixture(scope="module")
def case() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A MatMul-heavy FFN teacher 64→256→64, 512 calibration samples and 128 held-out ones."""
    rng = np.random.default_rng(0)
    teacher = mlp(rng, DIMS)
    return teacher, rng.standard_normal((512, 64)).astype(np.float32), rng.standard_normal((128, 64)).astype(np.float32)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_int8_dynamic_emits_integer_ops_is_over_3x_smaller_and_close_to_the_fp32_student() -> None:
    rng = np.random.default_rng(1)
    teacher, held = mlp(rng, (256, 1024, 256)), rng.standard_normal((64, 256)).astype(np.float32)
    fp32 = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    result = compress(teacher, Recipe.of(ratio=0.5, init="svd", quantize="int8", verify=False))
    nodes = quantized_node_counts(result.model)
    assert nodes == {"DynamicQuantizeLinear": 4, "MatMulInteger": 4}  # both factors of both layers
    q = result.report["quantization"]
    assert q["nodes"] == nodes and q["mode"] == "int8" and q["per_channel"] and q["equalized_pairs"] == 2
    assert q["size"]["fp32"] == pytest.approx(fp32.ByteSize(), rel=0.01)  # (with inferred shapes)
    assert fp32.ByteSize() / result.model.ByteSize() >= 3.0  # measured 3.83
    fid = output_fidelity(run(fp32, {"x": held})[0], run(result.model, {"x": held})[0])
    assert fid["cosine"] >= 0.999  # measured 0.99996


def test_int8_static_is_qdq_with_activation_ranges_calibrated_on_the_data(case) -> None:
    teacher, x, held = case
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    q = quantize_model(student, "int8-static", calibration=[{"x": x}], samples=None, batch_size=64)
    nodes = quantized_node_counts(q)
    assert nodes["QuantizeLinear"] >= 4 and nodes["DequantizeLinear"] >= 8  # activations and the 4 weights
    inits = _inits(q)
    quant_x = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # MinMax calibration, uint8 asymmetric
    assert float(inits[quant_x.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(inits[quant_x.input[2]]) == round(-lo / ((hi - lo) / 255))
    part = quantize_model(student, "int8-static", calibration=[{"x": x}], samples=100, batch_size=64)
    quant_p = next(n for n in part.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    first = x[:100]
    want = (max(float(first.max()), 0.0) - min(float(first.min()), 0.0)) / 255  # only the first 100 samples
    assert float(_inits(part)[quant_p.input[1]]) == pytest.approx(want, rel=1e-6)
    fid = output_fidelity(run(student, {"x": held})[0], run(q, {"x": held})[0])
    assert fid["cosine"] >= 0.99


def test_int8_static_without_data_is_a_one_line_error(case) -> None:
    teacher, _, _ = case
    with pytest.raises(InherccError, match=r"^`quantization.quantize` int8-static calibrates activations: it needs"):
        compress(teacher, Recipe.of(rank=8, quantize="int8-static"))
    with pytest.raises(InherccError, match="needs calibration data"):
        quantize_model(teacher, "int8-static")
    with pytest.raises(InherccError, match="unknown `quantization.quantize` 'int4'"):
        Recipe.of(quantize="int4").check()


def test_the_report_has_fidelity_before_and_after_quantization(case) -> None:
    teacher, x, _ = case
    plain = compress(teacher, Recipe.of(ratio=0.5), data={"x": x}).report
    rep = compress(teacher, Recipe.of(ratio=0.5, quantize="int8"), data={"x": x}).report
    assert rep["fidelity_fp32"] == plain["fidelity"]  # the same held-out samples, the fp32 student
    before, after = rep["fidelity_fp32"]["y"], rep["fidelity"]["y"]
    assert after["cosine"] != before["cosine"] and abs(after["cosine"] - before["cosine"]) < 0.002
    assert rep["recipe"]["quantization"] == {"quantize": "int8", "per_channel": True, "precision": "fp32"}
    assert "quantize" in rep["time_s"]


def test_equalization_keeps_the_function_and_rescues_a_whitened_student() -> None:
    """Whitened factors on an FFN 256→512→128: one bottleneck channel 10³× the others; ORT's one activation
    scale for the bottleneck then rounds the rest away (cosine 0.78 to the fp32 student), equalized 0.9999."""
    rng = np.random.default_rng(0)
    teacher, x = mlp(rng, (256, 512, 128)), rng.standard_normal((64, 256)).astype(np.float32)
    student = compress(teacher, Recipe.of(ratio=0.5), data={"x": x}).model
    y = run(student, {"x": x})[0]
    assert len(factor_pairs(student)) == 2
    equal, n = equalize_factor_pairs(student, [{"x": x}])
    assert n == 2
    np.testing.assert_allclose(run(equal, {"x": x})[0], y, rtol=1e-4, atol=1e-4 * np.abs(y).max())
    raw = output_fidelity(y, run(quantize_model(student, "int8"), {"x": x})[0])["cosine"]
    fixed = output_fidelity(y, run(quantize_model(equal, "int8"), {"x": x})[0])["cosine"]
    assert raw < 0.9 and fixed > 0.999  # measured 0.784 and 0.99995


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_factor_pairs_are_equalized_too(trans_b: int) -> None:
    """The same whitened FFN written as Gemms (a torch classifier head: transB = 1) — its factor pairs were left
    out of equalization, and ORT's dynamic INT8 then ruined the student (MobileNetV2 at ratio 0.75, whose
    classifier is such a pair: cosine 0.014 to the teacher; equalized 0.963)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((512, 256)) / 16, rng.standard_normal((128, 512)) / 22
    weights = {"w1": w1 if trans_b else w1.T, "b1": rng.standard_normal(512) * 0.1,
               "w2": w2 if trans_b else w2.T, "b2": rng.standard_normal(128) * 0.1}  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=trans_b),
    ]
    teacher = make_model(nodes, {"x": ["N", 256]}, ["y"], {k: v.astype(np.float32) for k, v in weights.items()})
    x = rng.standard_normal((64, 256)).astype(np.float32)
    student = compress(teacher, Recipe.of(ratio=0.5), data={"x": x}).model
    assert {n.op_type for n in student.graph.node} == {"Gemm", "Relu"}
    y = run(student, {"x": x})[0]
    equal, n = equalize_factor_pairs(student, [{"x": x}])
    assert n == len(factor_pairs(student)) == 2
    np.testing.assert_allclose(run(equal, {"x": x})[0], y, rtol=1e-4, atol=1e-4 * np.abs(y).max())
    raw = output_fidelity(y, run(quantize_model(student, "int8"), {"x": x})[0])["cosine"]
    fixed = output_fidelity(y, run(quantize_model(equal, "int8"), {"x": x})[0])["cosine"]
    assert fixed > 0.999 and fixed > raw


def _dequantized(q: onnx.ModelProto, name: str) -> np.ndarray:
    """ORT's int8 weight ``name`` times its scale (zero point 0), per channel or per tensor."""
    inits = _inits(q)
    dq = (
        next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in (f"{name}_quantized", name))
        if f"{name}_quantized" not in inits
        else None
    )
    if dq is None:  # dynamic: <name>_quantized, <name>_scale
        values, scale = inits[f"{name}_quantized"].astype(np.float32), inits[f"{name}_scale"]
        axis = -1
    else:  # static QDQ: DequantizeLinear(int8 weight, scale, zero point, axis)
        values, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return values * scale


@pytest.mark.parametrize("mode", ["int8", "int8-static"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_in_torch_is_ort_dequantized_weights(case, mode: str, per_channel: bool) -> None:
    teacher, x, _ = case
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    q = quantize_model(student, mode, per_channel=per_channel, calibration=[{"x": x}])
    module = OnnxModule(student)
    weights = quantized_weights(student, mode, per_channel)
    assert sorted(weights) == sorted(n for n in _inits(student) if n.endswith((".inherit_in", ".inherit_out")))
    for name, (axis, symmetric) in weights.items():
        fake = FakeQuant(axis, symmetric)(module.parameter(name).detach()).numpy()
        ort = _dequantized(q, name)
        step = np.abs(ort).max() / 127
        assert np.abs(fake - ort).max() <= 1e-6 * step + 1e-12, name  # the same int8 grid, the same rounding


def test_fake_quant_parametrizes_the_forward_and_comes_off(case) -> None:
    teacher, x, _ = case
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    module = OnnxModule(student)
    params = module.onnx_parameters()  # (while parametrized, the module's ONNX lookups are off: keep these)
    before = {k: v.detach().clone() for k, v in params.items()}
    done = fake_quantize_weights(module, quantized_weights(student, "int8"))
    assert len(done) == 4
    with torch.no_grad():
        y_fake = module(x=torch.from_numpy(x[:64]))[0].numpy()
    y_ort = run(quantize_model(student, "int8"), {"x": x[:64]})[0]  # ORT also quantizes activations: close
    assert output_fidelity(y_ort, y_fake)["cosine"] > 0.9999
    y = module(x=torch.from_numpy(x[:8]))[0]
    y.sum().backward()  # straight-through: gradients reach the float parameters
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in done)
    assert remove_fake_quant(module) == 4
    after = module.onnx_parameters()
    assert all(torch.equal(before[k], after[k].detach()) for k in before)  # the float weights, untouched


@pytest.mark.parametrize("opt_level", ["disable", "all"])
def test_static_fake_quant_forward_is_ort_qdq_bit_for_bit(case, opt_level: str) -> None:
    """Activations through FakeQuantize nodes at ORT's calibrated ranges and the weights (and the Add's bias,
    which ORT quantizes as an activation) as the QDQ model stores them: torch gives ORT's QDQ outputs exactly."""
    teacher, x, held = case
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    qdq = quantize_model(student, "int8-static", calibration=[{"x": x}])
    ranges = activation_ranges(qdq)
    assert set(ranges) == {"x", "h.inherit_mid", "a", "m.inherit_mid", "m", "y"}  # y: a graph output ORT quantizes
    weights = qdq_weights(qdq)
    assert weights["fc2.bias"] == (None, False) and weights["fc1.weight.inherit_in"] == (1, True)
    module = OnnxModule(with_activation_fake_quant(student, ranges))
    assert len(fake_quantize_weights(module, weights)) == 5
    with torch.no_grad():
        y_torch = module(x=torch.from_numpy(held))[0].numpy()
    y_ort = make_session(qdq, opt_level=opt_level).run(None, {"x": held})[0]
    np.testing.assert_array_equal(y_torch, y_ort)
    y_fp32 = run(student, {"x": held})[0]
    assert output_fidelity(y_fp32, y_ort)["rel_l2"] > 0.005  # measured 0.013: the quantization is really there


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_fake_quant_forward_is_ort_dynamic_quantization(case, per_channel: bool) -> None:
    """Weights on ORT's int8 grid and the MatMul inputs at each batch's uint8 range (``DynamicQuantizeLinear``):
    torch gives ORT's MatMulInteger outputs up to float rounding."""
    teacher, x, held = case
    student = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False)).model
    module = OnnxModule(with_activation_fake_quant(student, dict.fromkeys(dynamic_activations(student))))
    assert len(fake_quantize_weights(module, quantized_weights(student, "int8", per_channel))) == 4
    with torch.no_grad():
        y_torch = module(x=torch.from_numpy(held))[0].numpy()
    y_ort = run(quantize_model(student, "int8", per_channel=per_channel), {"x": held})[0]
    err = output_fidelity(y_ort, y_torch)["rel_l2"]
    assert err < (1e-6 if per_channel else 1e-3), err  # measured 6.5e-8; per tensor 4.1e-4 (rounding ties)
    assert output_fidelity(run(student, {"x": held})[0], y_ort)["rel_l2"] > 0.005  # measured 0.0076


@pytest.fixture(scope="module")
def outlier_case() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """An FFN 128→512→128 whose fc2 has 4 input rows 40× the others: one int8 scale per tensor then costs more
    than the rank-64 factorization does, so what quantization-aware training buys is measurable."""
    rng = np.random.default_rng(0)
    teacher = mlp(rng, (128, 512, 128))
    for t in teacher.graph.initializer:
        if t.name == "fc2.weight":
            w = numpy_helper.to_array(t).copy()
            w[:4] *= 40
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    x, held = rng.standard_normal((1024, 128)), rng.standard_normal((256, 128))
    return teacher, x.astype(np.float32), held.astype(np.float32)


# rel. L2 to the teacher on the held-out samples (seeds 0 / 1): the fp32 student after plain distillation, that
# student quantized (equalized as the quantize stage does), and the quantization-aware one
#   int8:        0.30434 / 0.30794   0.30751 / 0.31020   QAT 0.30431 / 0.30797 (the whole int8 loss recovered)
#   int8-static: 0.30434 / 0.30794   0.30855 / 0.31165   QAT 0.30712 / 0.30879
@pytest.mark.parametrize(
    ("mode", "counts", "nodes"),
    [
        ("int8", {"weights": 4, "activations": 4}, {"MatMulInteger": 4}),
        ("int8-static", {"weights": 5, "activations": 6}, {"QuantizeLinear": 6}),
    ],
)
def test_quantization_aware_distillation_beats_quantizing_after(outlier_case, mode, counts, nodes) -> None:
    teacher, x, held = outlier_case
    common = dict(rank=64, init="svd", epochs=4, lr=5e-4, quiet=True, seed=0, verify=False)
    y = run(teacher, {"x": held})[0]
    plain = compress(teacher, Recipe.of(**common), data={"x": x}).model
    calibration = [{"x": x}]
    ptq = quantize_model(equalize_factor_pairs(plain, calibration)[0], mode, per_channel=False, calibration=calibration)
    qat = compress(teacher, Recipe.of(quantize=mode, per_channel=False, **common), data={"x": x})
    training = qat.report["training"]
    assert training["fake_quant"] == {"mode": mode, **counts}
    losses = [h["loss"] for h in training["history"] if h["loss"] is not None]
    assert losses[-1] < losses[0]
    assert quantized_node_counts(qat.model).items() >= nodes.items()
    err = {name: output_fidelity(y, run(m, {"x": held})[0])["rel_l2"] for name, m in [("ptq", ptq), ("qat", qat.model)]}
    assert err["qat"] < err["ptq"] - 0.001, err


@pytest.mark.parametrize("conversion", [{"quantize": "int8"}, {"student_precision": "fp16"}])
def test_report_counts_the_fp32_students_params_and_flops_and_the_written_files_size(case, conversion) -> None:
    """A quantized / fp16 student has no float32 weights and no MatMul left to count: params and FLOPs are the
    fp32 student's (the same factors), the size the written file's."""
    teacher, _, _ = case
    plain = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False))
    converted = compress(teacher, Recipe.of(ratio=0.5, init="svd", verify=False, **conversion))
    assert converted.report["params"] == plain.report["params"]
    assert converted.report["flops"] == plain.report["flops"]
    size = converted.report["size"]["student"]  # (counted with the inferred shapes the written file drops)
    assert size == pytest.approx(converted.model.ByteSize(), rel=0.02) and size < 0.6 * plain.report["size"]["student"]


def test_quantization_aware_report_scores_the_written_student(case) -> None:
    """After distillation and quantization the check scores the written student on distillation's validation
    split (``fidelity``) beside the fp32 student there (``fidelity_fp32``)."""
    teacher, x, _ = case
    qat = compress(teacher, Recipe.of(rank=16, init="svd", epochs=1, quiet=True, quantize="int8"), data={"x": x})
    before, after = qat.report["fidelity_fp32"]["y"], qat.report["fidelity"]["y"]
    assert before != after and abs(after["cosine"] - before["cosine"]) < 0.002
    assert "fidelity_before" in qat.report  # distillation's own: before training


def test_cli_compress_quantize_int8_end_to_end(case, tmp_path: Path) -> None:
    teacher, x, _ = case
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    np.savez(tmp_path / "d.npz", x=x[:128])
    r = invoke(
        "compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--data", tmp_path / "d.npz",
        "--quantize", "int8", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "y, the fp32 student before int8 quantization: cosine 0." in r.output
    student = onnx.load(str(tmp_path / "s.onnx"))
    assert quantized_node_counts(student)["MatMulInteger"] == 4
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["fidelity"]["y"]["cosine"] > 0.9 and rep["fidelity_fp32"]["y"]["cosine"] > 0.9
    assert Recipe.load(tmp_path / "r.json").quantization.quantize == "int8"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4"], "error: Invalid value for '--quantize'"),
        (["--quantize", "int8-static"], "error: --quantize int8-static calibrates activations: it needs"),
        (["--quantize", "int8", "--student-precision", "fp16"], "error: choose one of --quantize, --student-precision"),
    ],
)
def test_cli_bad_quantize_is_one_line(case, tmp_path: Path, args: list[str], message: str) -> None:
    teacher, _, _ = case
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    r = invoke("compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "8", *args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith(message), r.output
    assert not (tmp_path / "s.onnx").exists()


def test_conv_students_quantize_to_convinteger_and_fake_quantize_alike() -> None:
    """Conv → Relu → Conv(3×3, bias): the factorized conv's pair (a k×k conv to r channels, a 1×1 conv back) is
    equalized along the channel axes, ORT emits ConvInteger, and torch's fake-quantized forward (weights with one
    scale each — ConvInteger takes no per-channel scales —, inputs at each batch's range) gives ORT's outputs."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": (rng.standard_normal((64, 16, 3, 3)) / 12).astype(np.float32),
        "w2": (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32),
        "b2": rng.standard_normal(64).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["h"], ["a"], name="r"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="c2"),
    ]
    teacher = make_model(nodes, {"x": ["b", 16, 12, 12]}, ["y"], weights)
    x = rng.standard_normal((64, 16, 12, 12)).astype(np.float32)
    result = compress(teacher, Recipe.of(ratio=0.5, quantize="int8"), data={"x": x})
    assert result.report["quantization"]["nodes"] == {"DynamicQuantizeLinear": 3, "ConvInteger": 3}
    assert result.report["quantization"]["equalized_pairs"] == 1
    before, after = result.report["fidelity_fp32"]["y"]["cosine"], result.report["fidelity"]["y"]["cosine"]
    assert abs(before - after) < 1e-3  # measured 0.93319 → 0.93316
    student = compress(teacher, Recipe.of(ratio=0.5), data={"x": x}).model
    (pair,) = factor_pairs(student)
    assert (pair.in_axis, pair.out_axis, pair.mid_axis) == (0, 1, 1)
    module = OnnxModule(with_activation_fake_quant(student, dict.fromkeys(dynamic_activations(student))))
    weights = quantized_weights(student, "int8")
    assert {q.axis for q in weights.values()} == {None} and len(fake_quantize_weights(module, weights)) == 3
    with torch.no_grad():
        y_torch = module(x=torch.from_numpy(x[:16]))[0].numpy()
    y_ort = run(quantize_model(student, "int8"), {"x": x[:16]})[0]
    assert output_fidelity(y_ort, y_torch)["rel_l2"] < 1e-5


def test_embedding_tables_fake_quantize_as_ort_quantizes_them() -> None:
    """A Gather table ORT quantizes as an activation (uint8, one scale, a zero point) and whose rows feed
    MatMulInteger as they are (no second quantization): torch's fake-quantized forward gives ORT's outputs."""
    rng = np.random.default_rng(0)
    weights = {"table": rng.standard_normal((100, 32)).astype(np.float32)}
    weights["w"] = rng.standard_normal((32, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    model = make_model(nodes, {"ids": ["b", 8]}, ["y"], weights)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    ids = rng.integers(0, 100, (4, 8)).astype(np.int64)
    found = quantized_weights(model, "int8")
    assert found == {"table": (None, False), "w": (1, True)} and dynamic_activations(model) == []
    module = OnnxModule(model)
    fake_quantize_weights(module, found)
    with torch.no_grad():
        y_torch = module(ids=torch.from_numpy(ids))[0].numpy()
    y_ort = run(quantize_model(model, "int8"), {"ids": ids})[0]
    assert output_fidelity(y_ort, y_torch)["rel_l2"] < 1e-6  # measured 1.1e-7


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weights_fake_quantize_as_ort_rewrites_and_quantizes_them(trans_b: int) -> None:
    """Dynamic quantization rewrites a plain Gemm to MatMul (B transposed when ``transB``) and quantizes it per
    output channel; a Gemm with alpha ≠ 1 stays float."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32) if trans_b else (32, 16)).astype(np.float32)
    weights = {"w": w, "b": rng.standard_normal(16).astype(np.float32)}
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)], {"x": ["n", 32]}, ["y"], weights
    )
    x = rng.standard_normal((8, 32)).astype(np.float32)
    assert quantized_weights(model, "int8") == {"w": (0 if trans_b else 1, True)}
    assert dynamic_activations(model) == ["x"]
    module = OnnxModule(with_activation_fake_quant(model, dict.fromkeys(dynamic_activations(model))))
    fake_quantize_weights(module, quantized_weights(model, "int8"))
    with torch.no_grad():
        y_torch = module(x=torch.from_numpy(x))[0].numpy()
    assert output_fidelity(run(quantize_model(model, "int8"), {"x": x})[0], y_torch)["rel_l2"] < 1e-6  # 1.4e-7
    scaled = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b, alpha=0.5)], {"x": ["n", 32]}, ["y"], weights
    )
    assert quantized_weights(scaled, "int8") == {}
