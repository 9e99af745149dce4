"""Gated multi-head output factors (``heads`` H > 1): the H heads as one wide output factor, mixed by a softmax
gate computed from the rank-r bottleneck. At init every head is the same output factor, so the student equals the
H = 1 student whatever the gate; the parameters are counted exactly; distillation trains heads and gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from inhercc.cli import cli
from inhercc.distill import distill
from inhercc.errors import InherccError
from inhercc.factorizer import Factorizer
from inhercc.latency import micro_models
from inhercc.layers import find_layers
from inhercc.model import float_param_count, prepare_model
from inhercc.passes.base import rewrite_ranks
from inhercc.pipeline import compress
from inhercc.recipe import Recipe
from inhercc.torchrt.parity import compare
from tests.helpers import make_model, run
from tests.passes.test_factorize_conv import conv_model
from tests.passes.test_factorize_gemm import gemm_model

H = 3


def student(model: onnx.ModelProto, ranks: dict[str, int], heads: int, init: str = "svd", seed: int = 0):
    """The rewrite of ``model`` at ``ranks`` with ``heads`` output heads per layer (gate seeded by ``seed``)."""
    m = prepare_model(model)
    layers = find_layers(m, min_params=0)
    for layer in layers:
        layer.heads, layer.seed = heads, seed
    return rewrite_ranks(m, ranks, layers, Factorizer(init, seed=1)).model


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def matmul3d(rng: np.random.Generator, n_in: int = 24, n_out: int = 20) -> onnx.ModelProto:
    """x [batch, seq, in] → MatMul(W) → Add(bias): a projection on token activations."""
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "proj.weight"], ["m"], name="proj"),
        helper.make_node("Add", ["m", "proj.bias"], ["y"], name="proj_bias"),
    ]
    return make_model(nodes, {"x": ["batch", "seq", n_in]}, ["y"], {"proj.weight": w, "proj.bias": b})


CONV_CASES = [
    ((9, 9), (3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 2]}, 1),
    ((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 2),
    ((10, 10), (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, 1),
    ((10, 10), (5, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}, 1),
    ((16,), (3,), {"pads": [1, 1]}, 2),
]


@pytest.mark.parametrize("spatial,kernel,attrs,groups", CONV_CASES)
def test_conv_heads_equal_one_head_at_init(spatial, kernel, attrs, groups) -> None:
    rng = np.random.default_rng(groups * 10 + len(spatial))
    teacher = conv_model(spatial, kernel, attrs, groups, rng)
    one, three = student(teacher, {"conv": 4}, 1), student(teacher, {"conv": 4}, H, seed=7)
    x = rng.standard_normal((3, 8, *spatial)).astype(np.float32)
    (y1,), (y3,) = run(one, {"x": x}), run(three, {"x": x})
    assert y3.shape == y1.shape
    assert max_rel(y3, y1) < 1e-5
    ops = [n.op_type for n in three.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Softmax") == 1 and ops.count("GlobalAveragePool") == 1
    assert ops.count("Add") == 1  # the bias, once, after the mix
    assert compare(three, {"x": x}).ok


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gemm_heads_equal_one_head_at_init(trans_b: int, beta: float) -> None:
    rng = np.random.default_rng(trans_b)
    teacher = gemm_model(trans_b, 0.7, beta, (28,), rng)
    one, three = student(teacher, {"fc": 6}, 1), student(teacher, {"fc": 6}, H, seed=3)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    (y1,), (y3,) = run(one, {"x": x}), run(three, {"x": x})
    assert max_rel(y3, y1) < 1e-5
    assert [n.op_type for n in three.graph.node].count("Gemm") == 2
    assert compare(three, {"x": x}).ok


def test_matmul_heads_on_tokens_equal_one_head_at_init() -> None:
    rng = np.random.default_rng(5)
    teacher = matmul3d(rng)
    one, three = student(teacher, {"proj": 8}, 1), student(teacher, {"proj": 8}, H, seed=11)
    x = rng.standard_normal((2, 7, 24)).astype(np.float32)
    (y1,), (y3,) = run(one, {"x": x}), run(three, {"x": x})
    assert y3.shape == (2, 7, 20)
    assert max_rel(y3, y1) < 1e-5
    assert compare(three, {"x": x}).ok


def test_the_gate_decides_once_heads_differ() -> None:
    """Not a no-op: with distinct heads the output is the gate-weighted mix (per token), computed by hand."""
    rng = np.random.default_rng(6)
    teacher = matmul3d(rng)
    three = student(teacher, {"proj": 8}, H, seed=2)
    w = inits(three)
    a, b, g = w["proj.weight.inherit_in"], w["proj.weight.inherit_out"], w["proj.weight.inherit_gate"]
    b = b + rng.standard_normal(b.shape).astype(np.float32)  # heads now differ
    g = g * 100
    for t in three.graph.initializer:
        if t.name in ("proj.weight.inherit_out", "proj.weight.inherit_gate"):
            t.CopyFrom(numpy_helper.from_array(b if t.name.endswith("out") else g, t.name))
    x = rng.standard_normal((2, 7, 24)).astype(np.float32)
    (y,) = run(three, {"x": x})
    z = x.astype(np.float64) @ a
    logits = z @ g
    gate = np.exp(logits - logits.max(-1, keepdims=True))
    gate /= gate.sum(-1, keepdims=True)
    heads = (z @ b).reshape(2, 7, H, 20)
    expected = (gate[..., None] * heads).sum(-2) + w["proj.bias"]
    assert max_rel(y, expected) < 1e-5
    assert compare(three, {"x": x}).ok  # the torch runtime agrees once the heads differ too


def test_one_wide_head_node_per_layer_and_the_gate_init() -> None:
    rng = np.random.default_rng(7)
    teacher = conv_model((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng)
    three = student(teacher, {"conv": 4}, H, seed=4)
    w = inits(three)
    wide = w["W.inherit_out"]
    assert wide.shape == (H * 12, 4, 1, 1)
    readers = [n for n in three.graph.node if "W.inherit_out" in n.input]
    assert len(readers) == 1 and readers[0].op_type == "Conv"
    heads = wide.reshape(H, 12, 4)
    assert all(np.array_equal(heads[0], heads[h]) for h in range(H))  # every head the same output factor
    gate = w["W.inherit_gate"]
    assert gate.shape == (4, H) and 0.001 < gate.std() < 0.03  # small, random
    again = inits(student(teacher, {"conv": 4}, H, seed=4))["W.inherit_gate"]
    other = inits(student(teacher, {"conv": 4}, H, seed=5))["W.inherit_gate"]
    assert np.array_equal(gate, again) and not np.array_equal(gate, other)  # seeded


def test_one_head_is_todays_graph_and_ignores_the_seed() -> None:
    rng = np.random.default_rng(8)
    teacher = matmul3d(rng)
    default = rewrite_ranks(prepare_model(teacher), {"proj": 8}, find_layers(teacher, min_params=0), Factorizer("svd"))
    seeded = student(teacher, {"proj": 8}, 1, seed=9)
    assert [n.op_type for n in seeded.graph.node] == ["MatMul", "MatMul", "Add"]
    assert seeded.SerializeToString() == default.model.SerializeToString()


def test_layer_params_and_flops_count_heads_and_gate() -> None:
    rng = np.random.default_rng(9)
    conv = conv_model((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 2, rng)
    (layer,) = find_layers(prepare_model(conv), min_params=0)
    r, n_in, n_out = 4, 4 * 9, 6  # per group: in/g·k·k inputs, out/g outputs
    one = layer.factor_params(r)
    layer.heads = H
    assert one == r * n_in + r * n_out
    assert layer.factor_params(r) == r * n_in + H * r * n_out + r * H
    positions = 81
    assert layer.factor_flops(r) == 2 * positions * (r * n_in + H * r * n_out) + 2 * r * H  # the gate: per sample
    tokens = matmul3d(rng)
    (proj,) = find_layers(prepare_model(tokens), min_params=0)
    proj.heads = H
    assert proj.factor_params(8) == 8 * 24 + H * 8 * 20 + 8 * H
    assert proj.factor_flops(8) == 2 * (8 * 24 + H * 8 * 20 + 8 * H)  # per token; symbolic seq counted as 1


def test_compress_report_counts_heads_exactly() -> None:
    rng = np.random.default_rng(10)
    teacher = conv_model((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng, c_in=16, c_out=32)
    result = compress(teacher, Recipe.of(rank=8, heads=H, seed=3))
    (row,) = result.report["layers"]
    r, n_in, n_out = 8, 16 * 9, 32
    assert row["heads"] == H
    assert row["params_after"] == r * n_in + H * r * n_out + r * H + n_out
    assert result.report["params"]["student"] == float_param_count(result.model) == row["params_after"]
    assert result.report["plan"]["heads"] == H
    gate = inits(result.model)["W.inherit_gate"]
    assert gate.shape == (r, H)
    fidelity = result.report["fidelity"]["y"]
    baseline = compress(teacher, Recipe.of(rank=8, seed=3)).report["fidelity"]["y"]
    assert fidelity["rel_l2"] == pytest.approx(baseline["rel_l2"], abs=1e-6)


def test_the_plan_budget_counts_heads() -> None:
    """A ratio plan with heads keeps the same fraction of parameters, heads and gates included: lower ranks."""
    rng = np.random.default_rng(11)
    teacher = conv_model((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng, c_in=32, c_out=64)
    one = compress(teacher, Recipe.of(ratio=0.5, rank_multiple=1, heads=1)).report
    three = compress(teacher, Recipe.of(ratio=0.5, rank_multiple=1, heads=H)).report
    (r1,), (r3,) = one["layers"], three["layers"]
    assert r3["rank"] < r1["rank"]
    budget = 0.5 * 64 * 32 * 9
    for row in (r1, r3):
        assert row["params_after"] - 64 <= budget  # the bias is not budgeted
    assert r3["params_after"] - 64 == r3["rank"] * (32 * 9 + H * 64 + H)


def test_distillation_trains_gate_and_heads_apart() -> None:
    rng = np.random.default_rng(12)
    teacher = conv_model((8, 8), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng, c_in=8, c_out=16)
    three = student(teacher, {"conv": 4}, H, seed=1)
    data = {"x": rng.standard_normal((32, 8, 8, 8)).astype(np.float32)}
    options = {
        "steps": 5,
        "train": "factors",
        "batch_size": 8,
        "lr": 1e-2,
        "seed": 0,
        "rebalance": False,
        "val_split": 0.0,
    }
    tuned = distill(three, teacher, data, **options).model
    before, after = inits(three), inits(tuned)
    assert not np.allclose(before["W.inherit_gate"], after["W.inherit_gate"])
    heads = after["W.inherit_out"].reshape(H, 16, 4)
    assert not np.allclose(heads[0], heads[1]) and not np.allclose(heads[1], heads[2])


def test_cli_heads_and_report(tmp_path) -> None:
    rng = np.random.default_rng(13)
    path, out, rep = tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "r.json"
    onnx.save(matmul3d(rng, 96, 64), str(path))
    args = ["compress", str(path), "-o", str(out), "--rank", "8", "--report", str(rep), "--shape", "x=2x5x96"]
    r = CliRunner().invoke(cli, [*args, "--heads", "3"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(rep.read_text())["layers"]
    assert row["heads"] == 3 and row["params_after"] == 8 * 96 + 3 * 8 * 64 + 8 * 3
    assert "proj.weight.inherit_gate" in {t.name for t in onnx.load(str(out)).graph.initializer}
    r = CliRunner().invoke(cli, [*args, "--heads", "0"])
    assert r.exit_code != 0 and "--heads" in r.output and "Traceback" not in r.output


def test_recipe_round_trips_heads(tmp_path) -> None:
    recipe = Recipe.of(heads=3, ratio=0.3).resolved(has_data=False)
    assert recipe.factors.heads == 3 and Recipe().factors.heads == 1
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))).factors.heads == 3
    with pytest.raises(InherccError, match="heads"):
        Recipe.of(heads=0).resolved(has_data=False)


def test_latency_micro_model_times_the_heads_form() -> None:
    rng = np.random.default_rng(14)
    teacher = prepare_model(conv_model((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng))
    (layer,) = find_layers(teacher, min_params=0)
    layer.heads = H
    dense, chain = micro_models(teacher, layer, 4, [2, 8, 9, 9])
    ops = [n.op_type for n in chain.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Softmax") == 1 and len(dense.graph.node) == 1
    wide = next(t for t in chain.graph.initializer if t.name.endswith("inherit_out"))
    assert list(wide.dims) == [H * 12, 4, 1, 1]
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    assert run(chain, {"x": x})[0].shape == run(dense, {"x": x})[0].shape


def test_compress_with_data_whitened_and_sequential_keeps_one_head_fidelity() -> None:
    """Calibration (whitened factors, sequential fitting) works on the heads student: at init it scores like the
    one-head student."""
    rng = np.random.default_rng(15)
    teacher = conv_model((8, 8), (3, 3), {"pads": [1, 1, 1, 1]}, 1, rng, c_in=16, c_out=32)
    data = {"x": rng.standard_normal((24, 16, 8, 8)).astype(np.float32)}
    scores = {}
    for heads in (1, H):
        recipe = Recipe.of(rank=8, heads=heads, sequential=True, calib_samples=16, verify_samples=8)
        result = compress(teacher, recipe, data)
        assert result.report["plan"]["init"] == "whitened" and result.report["plan"]["sequential"]
        scores[heads] = result.report["fidelity"]["y"]["rel_l2"]
    assert scores[H] == pytest.approx(scores[1], abs=1e-5)


def test_heads_below_opset_13_are_refused_in_one_line() -> None:
    teacher = matmul3d(np.random.default_rng(16))
    teacher.opset_import[0].version = 12
    layers = find_layers(teacher, min_params=0)
    layers[0].heads = H
    with pytest.raises(InherccError, match="gated heads need opset >= 13, the model has 12"):
        rewrite_ranks(teacher, {"proj": 8}, layers, Factorizer("svd"))


def test_find_layers_checks_the_saving_with_the_heads() -> None:
    """A wide layer (16 → 96) saves at rank 8 with one head (896 of 1,536) but not with three (2,456)."""
    w = np.random.default_rng(17).standard_normal((16, 96)).astype(np.float32)
    teacher = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="up")], {"x": ["N", 16]}, ["y"], {"w": w})
    (one,) = find_layers(teacher, min_params=0, rank_multiple=8)
    (three,) = find_layers(teacher, min_params=0, rank_multiple=8, heads=H)
    assert one.compressible and one.factor_params(8) == 896
    assert three.heads == H and three.factor_params(8) == 2456
    assert three.reason == "no saving at any rank (the smallest factor pair, rank 8, keeps 160% of the weights)"
