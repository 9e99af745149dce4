"""Robustness of everything that runs user data or user files through ONNX Runtime: IR versions newer than
ORT's, data of another number type, fixed batch dims, ORT failures, ORT's log noise, huge shapes."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import inhercc.bench
from inhercc.bench import BenchOptions, bench
from inhercc.calibrate import collect_grams
from inhercc.distill import distill
from inhercc.errors import InherccError
from inhercc.layers import find_layers
from inhercc.pipeline import compress, inspect_model
from inhercc.recipe import Recipe
from inhercc.runtime import (
    DataWarning,
    _max_ir_version,
    cuda_available,
    make_session,
    run_session,
    session_feeds,
)
from inhercc.verify import fidelity
from tests.helpers import make_model, mlp

FAST = BenchOptions(provider="cpu", repeat=2, warmup=0)


def ids_model(vocab: int = 10) -> onnx.ModelProto:
    """ids [batch, 3] (int64) → Gather from a [vocab, 64] table → MatMul 64×64."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
            helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
        ],
        "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((vocab, 64)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fixed_batch_model(batch: int = 4) -> onnx.ModelProto:
    """x [batch fixed, 32] → MatMul 32×48 → Relu → MatMul 48×16."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
    ]
    weights = {
        "w1": rng.standard_normal((32, 48)).astype(np.float32),
        "w2": rng.standard_normal((48, 16)).astype(np.float32),
    }
    return make_model(nodes, {"x": [batch, 32]}, ["y"], weights)


# --- 1. IR versions newer than ONNX Runtime's ------------------------------------------------------------


def test_bench_runs_files_with_an_ir_version_above_ort_max_inline_and_external(tmp_path) -> None:
    model = mlp(np.random.default_rng(0))
    model.ir_version = _max_ir_version() + 1  # always above what this ORT loads from a file: never skips
    inline, external = tmp_path / "inline.onnx", tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    x = np.ones((2, 64), np.float32)
    ref = make_session(model).run(None, {"x": x})[0]
    onnx.save(model, str(inline))
    onnx.save(model, str(external), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (external.parent / "model.onnx.data").stat().st_size > 0
    result = bench([str(inline), str(external)], FAST)
    assert [r["model"] for r in result["runs"][0]["results"]] == ["inline", "ext/model"]
    for path in (inline, external):
        np.testing.assert_allclose(make_session(path).run(None, {"x": x})[0], ref, rtol=1e-6)
    assert onnx.load(str(inline)).ir_version == _max_ir_version() + 1  # the user's file is untouched


# --- 2. data of another number type -----------------------------------------------------------------------


def test_fidelity_and_compress_cast_float64_float16_and_int32_data() -> None:
    rng = np.random.default_rng(0)
    model = mlp(rng)
    x = rng.standard_normal((12, 64))
    for dtype in (np.float64, np.float16):
        fid = fidelity(model, model, {"x": x.astype(dtype)})
        assert fid["y"]["cosine"] == pytest.approx(1.0)
    result = compress(model, Recipe.of(ratio=0.5, verify_samples=4), data={"x": x.astype(np.float64)})
    assert result.report["fidelity_inputs"] == "data" and result.report["fidelity"]["y"]["cosine"] > 0.5
    ids = ids_model()
    feeds = {"ids": rng.integers(0, 10, (12, 3)).astype(np.int32)}
    assert fidelity(ids, ids, feeds)["y"]["cosine"] == pytest.approx(1.0)
    compress(ids, Recipe.of(ratio=0.5, verify_samples=4, min_params=1), data=feeds)


def test_run_session_casts_without_copying_arrays_of_the_right_dtype() -> None:
    sess = make_session(mlp(np.random.default_rng(0)))
    right = np.ones((3, 64), np.float32)
    assert session_feeds(sess, {"x": right})["x"] is right
    cast = session_feeds(sess, {"x": right.astype(np.float64)})["x"]
    assert cast.dtype == np.float32
    expected = sess.run(None, {"x": right})[0]
    np.testing.assert_array_equal(run_session(sess, {"x": right.astype(np.float64)})[0], expected)


# --- 3. fixed batch dims ----------------------------------------------------------------------------------


def test_fixed_batch_models_calibrate_verify_and_compress_in_batches_of_that_size() -> None:
    model = fixed_batch_model(4)
    x = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    layers = [la for la in find_layers(model, min_params=1) if la.compressible]
    with pytest.warns(DataWarning, match="fixed at 4, so the last 2 of 10 samples are left out"):
        grams = collect_grams(model, layers, {"x": x}, batch_size=3)
    np.testing.assert_allclose(grams["fc1"], x[:8].T.astype(np.float64) @ x[:8], rtol=1e-5)
    with pytest.warns(DataWarning):
        assert fidelity(model, model, {"x": x})["y"]["cosine"] == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        result = compress(model, Recipe.of(ratio=0.5, verify_samples=4, min_params=1), data={"x": x})
        assert result.report["fidelity_inputs"] == "data"
        greedy = compress(
            model, Recipe.of(ratio=0.5, init="svd", allocation="greedy", verify=False, min_params=1), data={"x": x}
        )
        assert greedy.report["flops"]["student"] < greedy.report["flops"]["teacher"]
        report = inspect_model(model, data={"x": x}, min_params=1)
        assert report["spectrum"] == "whitened"


def test_fixed_batch_with_fewer_samples_than_one_batch_is_a_one_line_error() -> None:
    model = fixed_batch_model(4)
    x = np.ones((2, 32), np.float32)
    with pytest.raises(InherccError, match=r"2 sample\(s\), but the model's batch dim is fixed at 4 \(input x\)"):
        fidelity(model, model, {"x": x}, source="few.npz")
    x8 = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    with warnings.catch_warnings():  # fixed-batch models distil in batches of exactly that size
        warnings.simplefilter("ignore")
        result = compress(model, Recipe.of(ratio=0.5, epochs=1, min_params=1), data={"x": x8})
        tuned = distill(model, model, {"x": x8}, steps=1, train="all")  # finetune: the same rule
    assert result.report["training"]["batch_size"] == 4
    assert tuned.report["training"]["batch_size"] == 4


# --- 4. ONNX Runtime failures on user data ----------------------------------------------------------------


def test_out_of_range_token_ids_are_a_one_line_error_naming_the_stage() -> None:
    model = ids_model(vocab=10)
    feeds = {"ids": np.full((6, 3), 12, np.int64)}
    with pytest.raises(InherccError, match=r"the teacher on oob.npz: ONNX Runtime failed: .*out of data bounds") as e:
        fidelity(model, model, feeds, source="oob.npz")
    assert "\n" not in str(e.value) and "[ONNXRuntimeError]" not in str(e.value)
    layers = [la for la in find_layers(model, min_params=1) if la.compressible]
    with pytest.raises(InherccError, match="calibration on ids.npz: ONNX Runtime failed"):
        collect_grams(model, layers, feeds, source="ids.npz")


def test_inhercc_own_errors_are_not_disguised_as_ort_failures() -> None:
    sess = make_session(mlp(np.random.default_rng(0)))
    with pytest.raises(KeyError):
        run_session(sess, {"not_x": np.ones((2, 64), np.float32)})


# --- 5. ONNX Runtime's log noise ---------------------------------------------------------------------------


def test_a_cpu_run_and_a_failing_run_print_nothing_from_onnxruntime(tmp_path, capfd) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(np.random.default_rng(0)), str(path))
    capfd.readouterr()
    bench([str(path)], FAST)
    inhercc.bench.default_provider()  # probes CUDA: silently
    with pytest.raises(InherccError):
        fidelity(ids_model(), ids_model(), {"ids": np.full((2, 3), 99, np.int64)})
    if not cuda_available():
        with pytest.raises(InherccError, match="requested CUDAExecutionProvider, but ONNX Runtime cannot run it"):
            bench([str(path)], BenchOptions(provider="cuda", repeat=2, warmup=0))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "\x1b[" not in err, err


# --- 6. shapes too big for memory --------------------------------------------------------------------------


def test_bench_refuses_inputs_larger_than_available_memory_before_allocating(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(np.random.default_rng(0)), str(path))
    monkeypatch.setattr(inhercc.bench, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(inhercc.bench, "synthetic_feeds", lambda *a, **k: pytest.fail("allocated the inputs"))
    options = BenchOptions(provider="cpu", repeat=2, warmup=0, shape_sets=[{"x": [100_000, 64]}])
    need = r"`shape_sets` x=100000x64: the inputs need 0.1 GiB of memory, only 0.0 GiB"
    with pytest.raises(InherccError, match=need):
        bench([str(path)], options)
