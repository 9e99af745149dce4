"""Latency-aware planning: micro-models, the keep-dense decision (injected timings), budget re-planning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from inhercc.cli import cli
from inhercc.errors import InherccError
from inhercc.latency import (
    OrtLayerTimer,
    default_rank_multiple,
    latency_aware_plan,
    layer_input_shapes,
    micro_models,
)
from inhercc.layers import find_layers
from inhercc.pipeline import compress
from inhercc.plan import RankPlan
from inhercc.recipe import Recipe
from inhercc.runtime import cuda_available, make_session
from tests.helpers import make_model


def three_layer_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, 64] → fc1 (64×256) → Relu → fc2 (256×256) → Relu → fc3 (256×64), weights with
    decaying spectra (as trained weights have), so a ratio plan factorizes every layer."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (n_in, n_out) in enumerate([(64, 256), (256, 256), (256, 64)]):
        k = min(n_in, n_out)
        left = rng.standard_normal((n_in, k)) / np.sqrt(n_in)
        right = rng.standard_normal((k, n_out)) / np.sqrt(n_out)
        weights[f"fc{i + 1}.weight"] = ((left * np.exp(-np.arange(k) / 12.0)) @ right).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("MatMul", ["a1", "fc2.weight"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="act2"),
        helper.make_node("MatMul", ["a2", "fc3.weight"], ["y"], name="fc3"),
    ]
    return make_model(nodes, {"x": ["batch", "seq", 64]}, ["y"], weights)


class FakeTimer:
    """Injected timings: the chain of every layer in ``slow`` takes 2 ms against 1 ms dense, others 0.5 ms."""

    def __init__(self, slow: set[str]) -> None:
        self.slow = slow
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []

    def __call__(self, layer, rank, input_shape):
        self.calls.append((layer.name, rank, tuple(input_shape)))
        return 1.0, (2.0 if layer.name in self.slow else 0.5)


SHAPES = {"x": [4, 16, 64]}


def test_a_layer_whose_chain_is_slower_stays_dense() -> None:
    model = three_layer_mlp()
    layers = find_layers(model)
    plan = RankPlan({"fc1": 32, "fc2": 64, "fc3": 32}, {}, {"mode": "rank", "value": 32})
    timer = FakeTimer({"fc2"})
    out = latency_aware_plan(model, layers, plan, shapes=SHAPES, timer=timer)
    assert out.ranks == {"fc1": 32, "fc2": None, "fc3": 32}
    assert out.reasons["fc2"] == "kept dense for speed: chain 2 ms vs dense 1 ms on cpu"
    # every layer timed once, at its planned rank and its real input shape
    assert sorted(timer.calls) == [("fc1", 32, (4, 16, 64)), ("fc2", 64, (4, 16, 256)), ("fc3", 32, (4, 16, 256))]
    info = out.method["latency_aware"]
    assert info["kept_dense"] == ["fc2"] and not info["rebalanced"]
    assert info["layers"]["fc2"] == {"rank": 64, "input_shape": [4, 16, 256], "dense_ms": 1.0, "chain_ms": 2.0}
    assert plan.ranks["fc2"] == 64  # the input plan is not modified


def test_equal_times_keep_the_layer_dense() -> None:
    model = three_layer_mlp()
    plan = RankPlan({"fc1": 32, "fc2": 64, "fc3": 32})
    out = latency_aware_plan(model, find_layers(model), plan, shapes=SHAPES, timer=lambda la, r, s: (1.0, 1.0))
    assert out.factorized() == {}
    assert all(reason.startswith("kept dense for speed") for reason in out.reasons.values())


def test_a_chain_must_win_by_the_margin() -> None:
    model = three_layer_mlp()
    plan = RankPlan({"fc2": 64})
    barely = latency_aware_plan(model, find_layers(model), plan, shapes=SHAPES, timer=lambda la, r, s: (1.0, 0.97))
    assert barely.factorized() == {} and barely.method["latency_aware"]["margin"] == 0.05
    strict = latency_aware_plan(
        model, find_layers(model), plan, shapes=SHAPES, timer=lambda la, r, s: (1.0, 0.97), margin=0.0
    )
    assert strict.factorized() == {"fc2": 64}


def test_pipeline_hook_reports_the_reason_and_keeps_the_budget() -> None:
    model = three_layer_mlp()
    result = compress(  # rank multiple 8, not cpu's 16: three small layers
        model,
        Recipe.of(ratio=0.5, shapes=SHAPES, verify=False, latency_aware=True, rank_multiple=8),
        latency_timer=FakeTimer({"fc1"}),
    )
    rows = {row["name"]: row for row in result.report["layers"]}
    assert rows["fc1"]["rank"] is None
    assert rows["fc1"]["reason"].startswith("kept dense for speed: chain 2 ms vs dense 1 ms")
    assert rows["fc2"]["rank"] and rows["fc3"]["rank"]
    # fc1 stays a single dense MatMul, the others are two-node chains
    names = [n.name for n in result.model.graph.node]
    assert "fc1" in names and "fc2.inherit_in" in names and "fc3.inherit_out" in names
    # ratio mode: fc1's weights are charged to the budget, the other layers were re-planned smaller
    compressible = 64 * 256 + 256 * 256 + 256 * 64
    kept = sum(row["params_after"] for row in rows.values())
    assert kept <= 0.5 * compressible
    assert result.plan.method["latency_aware"]["rebalanced"]
    plain = compress(model, Recipe.of(ratio=0.5, shapes=SHAPES, verify=False))
    plain_rows = {row["name"]: row for row in plain.report["layers"]}
    assert sum(rows[n]["params_after"] for n in ("fc2", "fc3")) < sum(
        plain_rows[n]["params_after"] for n in ("fc2", "fc3")
    )


def test_replanning_keeps_the_measured_sensitivity(monkeypatch) -> None:
    """With data, the ratio is allocated by measured sensitivity; when a layer is kept dense for speed, the
    budget is re-planned with the same per-layer weights (not the bare spectra)."""
    import inhercc.latency as latency

    seen: dict[str, object] = {}
    original = latency.latency_aware_plan

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(latency, "latency_aware_plan", spy)
    model = three_layer_mlp()
    data = {"x": np.random.default_rng(0).standard_normal((64, 4, 64)).astype(np.float32)}
    result = compress(
        model,
        Recipe.of(ratio=0.5, verify=False, latency_aware=True, shapes=SHAPES),
        data=data,
        latency_timer=FakeTimer({"fc1"}),
    )
    assert result.plan.method["allocation"] == "sensitivity"
    weights = seen["layer_weights"]
    assert isinstance(weights, dict) and set(weights) == {"fc1", "fc2", "fc3"}


def test_the_saved_plan_keeps_the_reason(tmp_path) -> None:
    model = three_layer_mlp()
    result = compress(
        model, Recipe.of(rank=16, shapes=SHAPES, verify=False, latency_aware=True), latency_timer=FakeTimer({"fc3"})
    )
    path = tmp_path / "plan.json"
    result.plan.save(path, result.layers)
    rows = {row["name"]: row for row in json.loads(path.read_text())["layers"]}
    assert rows["fc3"]["rank"] is None and rows["fc3"]["reason"].startswith("kept dense for speed")


def test_micro_models_are_the_node_and_the_chain_the_passes_emit() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal((96, 48)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f2", "fc.weight"], ["y"], name="fc", transB=1),
    ]
    model = make_model(
        nodes,
        {"x": ["batch", 32, 8, 8], "f2": ["batch", 48]},
        ["f", "y"],
        {"conv.weight": w, "conv.bias": b, "fc.weight": g},
    )
    layers = {la.name: la for la in find_layers(model, min_params=1)}
    shapes = layer_input_shapes(model, list(layers.values()), {"x": [2, 32, 8, 8], "f2": [2, 48]})
    assert shapes == {"conv": [2, 32, 8, 8], "fc": [2, 48]}
    for name, rank in (("conv", 16), ("fc", 8)):
        dense, chain = micro_models(model, layers[name], rank, shapes[name])
        assert [n.op_type for n in dense.graph.node] == [layers[name].op]
        assert [n.op_type for n in chain.graph.node] == [layers[name].op] * 2
        x = rng.standard_normal(shapes[name]).astype(np.float32)
        feed = {dense.graph.input[0].name: x}
        (yd,) = make_session(dense).run(None, feed)
        (yc,) = make_session(chain).run(None, feed)
        assert yd.shape == yc.shape


def test_dynamic_dims_without_shapes_are_timed_at_the_default_sizes() -> None:
    model = three_layer_mlp()
    timer = FakeTimer(set())
    latency_aware_plan(model, find_layers(model), RankPlan({"fc1": 64}), timer=timer)
    assert timer.calls == [("fc1", 64, (1, 128, 64))]  # batch 1, sequence 128 (inhercc.data.DIM_SIZES)


def test_real_cpu_timer_on_a_tiny_layer() -> None:
    model = three_layer_mlp()
    layers = {la.name: la for la in find_layers(model)}
    timer = OrtLayerTimer(model, "cpu", threads=1, warmup=1, repeat=5)
    dense_ms, chain_ms = timer(layers["fc2"], 64, [4, 16, 256])
    assert 0 < dense_ms < 1000 and 0 < chain_ms < 1000
    assert timer(layers["fc2"], 64, [4, 16, 256]) == (dense_ms, chain_ms)  # cached, not re-timed


def test_rank_multiple_per_provider() -> None:
    assert default_rank_multiple("cpu") == 16
    assert default_rank_multiple("CUDA") == default_rank_multiple("tensorrt") == 64
    with pytest.raises(InherccError, match="unknown provider"):
        default_rank_multiple("tpu")


def test_cli_latency_aware_on_cpu(tmp_path) -> None:
    src, out, rep = tmp_path / "t.onnx", tmp_path / "s.onnx", tmp_path / "r.json"
    onnx.save(three_layer_mlp(), str(src))
    args = ["compress", src, "-o", out, "--latency-aware", "--provider", "cpu", "--threads", 1, "--shape", "x=4x16x64"]
    r = CliRunner().invoke(cli, [str(a) for a in args + ["--report", rep, "--no-verify"]])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    info = report["plan"]["latency_aware"]
    assert info["provider"] == "cpu" and set(info["layers"]) >= {"fc2"}
    assert report["plan"]["rank_multiple"] == 16
    for name in info["kept_dense"]:
        assert f"{name}: kept dense for speed" in r.output


@pytest.mark.skipif(cuda_available(), reason="needs an install where CUDA cannot run")
def test_cli_latency_aware_for_cuda_without_cuda_is_an_error(tmp_path) -> None:
    src = tmp_path / "t.onnx"
    onnx.save(three_layer_mlp(), str(src))
    args = [
        "compress",
        src,
        "-o",
        tmp_path / "s.onnx",
        "--latency-aware",
        "--provider",
        "cuda",
        "--shape",
        "x=4x16x64",
    ]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2 and "error: requested CUDAExecutionProvider" in r.output
