"""Dynamic dims chosen by kind, batch axes found from dim symbols, synthetic inputs of every kind (issue 13)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import inhercc
import inhercc.data
from inhercc.cli import cli
from inhercc.data import (
    batch_axes,
    batch_axes_of,
    check_feeds,
    confirmed_shapes,
    default_shapes,
    gather_table_sizes,
    index_ranges,
    position_limit,
    slice_batch,
    synthetic_feeds,
)
from inhercc.errors import InherccError
from inhercc.model import prepare_model
from inhercc.recipe import Recipe
from inhercc.runtime import full_batches, make_session, model_fixed_batch, run_session
from tests.helpers import run

RNG = np.random.default_rng(0)


def _weight(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def text_model(positions: int = 64) -> onnx.ModelProto:
    """input_ids / attention_mask [batch, sequence] → word embedding + the first ``sequence`` rows of a
    position table of ``positions`` rows (longer sequences fail to broadcast) → masked → MatMul 64×64."""
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["e"]),
        helper.make_node("Shape", ["input_ids"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["len"]),
        helper.make_node("Unsqueeze", ["len", "zero1"], ["len1"]),
        helper.make_node("Slice", ["embeddings.position_embeddings.weight", "zero1", "len1", "zero1"], ["p"]),
        helper.make_node("Add", ["e", "p"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "last"], ["mf3"]),
        helper.make_node("Mul", ["h", "mf3"], ["hm"]),
        helper.make_node("MatMul", ["hm", "dense.weight"], ["y"], name="dense"),
    ]
    inits = {
        "embeddings.word_embeddings.weight": _weight(100, 64),
        "embeddings.position_embeddings.weight": _weight(positions, 64),
        "dense.weight": _weight(64, 64),
        "one": np.array(1, np.int64),
        "zero1": np.array([0], np.int64),
        "last": np.array([-1], np.int64),
    }
    ids = [("input_ids", TensorProto.INT64, ["batch", "sequence"]), ("attention_mask", 7, ["batch", "sequence"])]
    return _model(nodes, ids, [("y", TensorProto.FLOAT, ["batch", "sequence", 64])], inits)


def image_model(nhwc: bool = False, bias_side: int | None = None) -> onnx.ModelProto:
    """x [N, 3, H, W] (or [N, H, W, 3]) → Conv 3×3/2 (3→64) → Relu → global pool → Gemm 64×64. With
    ``bias_side`` a constant [1, 3, side, side] is added to the image first: other sizes fail to broadcast."""
    nodes = []
    x = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    inits: dict[str, np.ndarray] = {"conv.weight": _weight(64, 3, 3, 3), "fc.weight": _weight(64, 64)}
    if bias_side:
        nodes.append(helper.make_node("Add", [x, "bias_image"], ["xb"]))
        inits["bias_image"] = np.zeros((1, 3, bias_side, bias_side), np.float32)
        x = "xb"
    nodes += [
        helper.make_node("Conv", [x, "conv.weight"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], name="fc"),
    ]
    shape = ["N", "H", "W", 3] if nhwc else ["N", 3, "H", "W"]
    return _model(nodes, [("x", TensorProto.FLOAT, shape)], [("logits", TensorProto.FLOAT, ["N", 64])], inits)


def audio_model() -> onnx.ModelProto:
    """A voice-activity-like model: audio [batch, samples] in frames of 400 → MatMul 400×64, scaled by a scalar
    int64 sample rate / 16000; a recurrent state [2, batch, 128] → state·0.5 + mean frame energy."""
    nodes = [
        helper.make_node("Reshape", ["input", "frames"], ["fr"]),
        helper.make_node("MatMul", ["fr", "proj.weight"], ["m"], name="proj"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k16000"], ["scale"]),
        helper.make_node("Mul", ["m", "scale"], ["output"]),
        helper.make_node("Mul", ["state", "half"], ["sh"]),
        helper.make_node("ReduceMean", ["output"], ["energy"], axes=[1, 2], keepdims=0),  # [batch]
        helper.make_node("Unsqueeze", ["energy", "last"], ["energy2"]),  # [batch, 1]
        helper.make_node("Add", ["sh", "energy2"], ["stateN"]),
    ]
    inits = {
        "frames": np.array([0, -1, 400], np.int64),
        "proj.weight": _weight(400, 64),
        "k16000": np.array(16000, np.float32),
        "half": np.array(0.5, np.float32),
        "last": np.array([-1], np.int64),
    }
    inputs = [
        ("input", TensorProto.FLOAT, ["batch", "samples"]),
        ("state", TensorProto.FLOAT, [2, "batch", 128]),
        ("sr", TensorProto.INT64, []),
    ]
    outputs = [("output", TensorProto.FLOAT, None), ("stateN", TensorProto.FLOAT, None)]
    return _model(nodes, inputs, outputs, inits, opset=13)


def bytes_model() -> onnx.ModelProto:
    """A byte-level classifier: bytes uint8 [batch, 512] → Cast → Gather (256×64 table) → mean → MatMul 64×64;
    a second output of another dtype (ArgMax, int64)."""
    nodes = [
        helper.make_node("Cast", ["bytes"], ["b64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["byte_table", "b64"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head.weight"], ["logits"], name="head"),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    inits = {"byte_table": _weight(256, 64), "head.weight": _weight(64, 64)}
    outputs = [("logits", TensorProto.FLOAT, ["batch", 64]), ("label", TensorProto.INT64, ["batch"])]
    return _model(nodes, [("bytes", TensorProto.UINT8, ["batch", 512])], outputs, inits, opset=13)


def fixed_batch_model(batch: int = 4) -> onnx.ModelProto:
    """x [4, 64] beside a state [2, 4, 32] (batch at axis 1): a model exported at a fixed batch of 4."""
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc"),
        helper.make_node("Mul", ["h0", "half"], ["h1"]),
    ]
    inits = {"fc.weight": _weight(64, 64), "half": np.array(0.5, np.float32)}
    inputs = [("x", TensorProto.FLOAT, [batch, 64]), ("h0", TensorProto.FLOAT, [2, batch, 32])]
    outputs = [("y", TensorProto.FLOAT, [batch, 64]), ("h1", TensorProto.FLOAT, [2, batch, 32])]
    return _model(nodes, inputs, outputs, inits)


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- 1. batch axes ------------------------------------------------------------------------------------------


def test_batch_axes_follow_the_shared_symbol_not_axis_0() -> None:
    model = prepare_model(audio_model())
    axes = batch_axes(model)
    assert axes == {"input": 0, "state": 1, "sr": None, "output": 0, "stateN": 1}
    assert model_fixed_batch(model) is None  # the state's leading 2 is not a fixed batch


def test_batch_axes_of_text_image_and_unnamed_dims() -> None:
    assert batch_axes(text_model()) == {"input_ids": 0, "attention_mask": 0, "y": 0}
    assert batch_axes(image_model(nhwc=True)) == {"x": 0, "logits": 0}
    unnamed = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", TensorProto.FLOAT, [None, 64]), ("s", TensorProto.FLOAT, [])],
        [("y", TensorProto.FLOAT, None)],
        {"w": _weight(64, 64)},
    )
    assert batch_axes(unnamed) == {"x": 0, "s": None, "y": 0}
    # silero-vad's graph: every dim unnamed; the state's next value takes the state's batch axis
    vad = batch_axes_of(
        {"input": [None, None], "state": [2, None, 128], "sr": []}, {"output": [None, 1], "stateN": [None] * 3}
    )
    assert vad == {"input": 0, "state": 1, "sr": None, "output": 0, "stateN": 1}
    # paddle2onnx writes -1 and "?" for unknown dims: "?" shared by H and W is no batch symbol
    paddle = _model([], [("x", 1, [-1, 3, "?", "?"])], [("x", 1, None)], {})
    assert batch_axes(paddle) == {"x": 0} and default_shapes(paddle)[0] == {"x": [1, 3, 224, 224]}
    # … and ONNX Runtime's session reports those dims as None and "?": the same axes (ppocr-cls ran its batches
    # along H before)
    assert batch_axes_of({"x": [None, 3, "?", "?"]}, {"y": [None, 2]}) == {"x": 0, "y": 0}
    assert batch_axes_of({"x": [-1, 3, "?", "?"]}, {"y": ["?", 2]}) == {"x": 0, "y": 0}


def test_fixed_batch_model_with_a_state_reports_its_fixed_batch() -> None:
    model = fixed_batch_model(4)
    assert batch_axes(model) == {"x": 0, "h0": 1, "y": 0, "h1": 1}
    assert model_fixed_batch(model) == 4
    feeds = synthetic_feeds(model, seed=0)
    assert feeds["x"].shape == (4, 64) and feeds["h0"].shape == (2, 4, 32)


def test_torch_exports_fixed_batch_4_and_dynamic_lstm_state() -> None:
    torch = pytest.importorskip("torch")
    import io

    lin = torch.nn.Linear(64, 64)
    buf = io.BytesIO()
    torch.onnx.export(lin, (torch.zeros(4, 64),), buf, input_names=["x"], output_names=["y"], dynamo=False)
    assert model_fixed_batch(onnx.load_from_string(buf.getvalue())) == 4

    class Rnn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(16, 32, batch_first=True, bidirectional=True)

        def forward(self, x, h0, c0):
            y, (h, c) = self.lstm(x, (h0, c0))
            return y, h

    buf = io.BytesIO()
    args = (torch.zeros(3, 5, 16), torch.zeros(2, 3, 32), torch.zeros(2, 3, 32))
    axes = {"x": {0: "batch", 1: "seq"}, "h0": {1: "batch"}, "c0": {1: "batch"}, "y": {0: "batch"}, "h": {1: "batch"}}
    torch.onnx.export(
        Rnn(), args, buf, input_names=["x", "h0", "c0"], output_names=["y", "h"], dynamic_axes=axes, dynamo=False
    )
    model = inhercc.load_model(_saved(buf.getvalue()))
    assert batch_axes(model) == {"x": 0, "h0": 1, "c0": 1, "y": 0, "h": 1}
    assert model_fixed_batch(model) is None
    shapes, note = default_shapes(model, batch=3)
    assert shapes == {"x": [3, 128, 16], "h0": [2, 3, 32], "c0": [2, 3, 32]}
    assert note.startswith("dynamic dims chosen: x=3x128x16 (sequence: 128)")
    feeds = synthetic_feeds(model, {"x": [5, 7, 16]}, seed=1)
    assert feeds["h0"].shape == (2, 5, 32)  # the state follows the batch symbol
    sess = make_session(model)
    whole = sess.run(None, feeds)
    batched = run_session(sess, feeds, batch_size=2)
    for a, b in zip(whole, batched):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _saved(data: bytes):
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
    f.write(data)
    f.close()
    return f.name


def test_run_session_slices_and_joins_along_each_batch_axis() -> None:
    model = prepare_model(audio_model())
    feeds = synthetic_feeds(model, {"input": [5, 1600]}, seed=3)
    assert feeds["state"].shape == (2, 5, 128) and feeds["sr"].shape == ()
    sess = make_session(model)
    whole = sess.run(None, feeds)
    parts = run_session(sess, feeds, batch_size=2)
    assert [p.shape for p in parts] == [(5, 4, 64), (2, 5, 128)]
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    part = slice_batch(feeds, batch_axes(model), 1, 3)
    assert part["state"].shape == (2, 2, 128) and part["input"].shape == (2, 1600) and part["sr"] is feeds["sr"]
    assert full_batches(model, feeds) == feeds  # dynamic batch: nothing left out


def test_fixed_batch_cut_along_the_state_batch_axis() -> None:
    model = fixed_batch_model(4)
    feeds = {"x": np.ones((10, 64), np.float32), "h0": np.ones((2, 10, 32), np.float32)}
    with pytest.warns(UserWarning, match="fixed at 4, so the last 2 of 10 samples are left out"):
        cut = full_batches(model, feeds)
    assert cut["x"].shape == (8, 64) and cut["h0"].shape == (2, 8, 32)
    out = run_session(make_session(model), cut)
    assert [o.shape for o in out] == [(8, 64), (2, 8, 32)]
    np.testing.assert_allclose(out[1], 0.5 * cut["h0"])


# --- 2. defaults for dynamic dims ---------------------------------------------------------------------------


def test_sequence_dims_default_to_128_capped_by_the_position_table() -> None:
    shapes, note = default_shapes(text_model(positions=64))
    assert shapes == {"input_ids": [1, 64], "attention_mask": [1, 64]}
    assert note == (
        "dynamic dims chosen: input_ids=1x64 attention_mask=1x64 (sequence: 64); pass `shapes` to choose other sizes"
    )
    shapes, _ = default_shapes(text_model(positions=512), batch=8)
    assert shapes == {"input_ids": [8, 128], "attention_mask": [8, 128]}
    assert gather_table_sizes(text_model()) == {"input_ids": 100}


def test_position_limit_is_the_rows_of_the_position_table() -> None:
    assert position_limit(text_model(positions=64)) == 64
    model = text_model(positions=100)  # not a size of DIM_SIZES: the cap itself, not a fallback size
    assert position_limit(model) == 100 and default_shapes(model)[0]["input_ids"] == [1, 100]
    table = next(t for t in model.graph.initializer if t.name == "embeddings.position_embeddings.weight")
    table.dims[:] = [1, 100, 64]  # [1, N, d] counts N
    assert position_limit(model) == 100
    table.name = "table"  # no position table: no limit, the first sequence size
    assert position_limit(model) is None and default_shapes(model)[0]["input_ids"] == [1, 128]


def test_spatial_dims_default_to_224_in_either_layout_and_given_shapes_win() -> None:
    assert default_shapes(image_model())[0] == {"x": [1, 3, 224, 224]}
    assert default_shapes(image_model(nhwc=True))[0] == {"x": [1, 224, 224, 3]}
    shapes, note = default_shapes(image_model(), given={"x": [2, 3, 96, 64]})
    assert shapes == {"x": [2, 3, 96, 64]} and note == ""


def test_audio_and_scalar_inputs_get_plausible_defaults() -> None:
    model = prepare_model(audio_model())
    shapes, note = default_shapes(model)
    assert shapes == {"input": [1, 16000], "state": [2, 1, 128], "sr": []}
    assert "(audio: 16000)" in note
    feeds = synthetic_feeds(model, batch=2, seed=0)
    assert feeds["sr"].dtype == np.int64 and int(feeds["sr"]) == 16000
    assert feeds["input"].shape == (2, 16000) and -1.0 <= feeds["input"].min() and feeds["input"].max() <= 1.0
    assert feeds["input"].std() > 0.5  # uniform in [-1, 1] (std 0.577), not N(0, 1) clipped


def test_plain_compress_of_a_model_with_a_state_and_a_sample_rate() -> None:
    """Was: "synthetic inputs has 1 sample(s), but the model's batch dim is fixed at 2" (the state's 2)."""
    with pytest.warns(UserWarning, match=r"dynamic dims chosen: input=1x16000 \(audio: 16000\)"):
        result = inhercc.compress(audio_model(), Recipe.of(rank=16))
    assert result.report["shapes"]["values"] == {"input": [1, 16000], "state": [2, 1, 128], "sr": []}
    assert set(result.report["fidelity"]) == {"output", "stateN"}
    assert result.report["flops"]["teacher"] == 2 * 40 * 400 * 64  # 40 frames of 400 samples × 64


def mlp_model(first: str = "MatMul") -> onnx.ModelProto:
    """A tabular MLP x [batch, features] → (Cast, Mul by a scalar) → MatMul 80×64 (or Gemm with transB, W [64, 80])
    → Relu → MatMul 64×8: nothing in its names or rank says how many features it reads, only the first weight."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xc", "two"], ["xs"]),
        helper.make_node("MatMul", ["xs", "fc1.weight"], ["h"], name="fc1")
        if first == "MatMul"
        else helper.make_node("Gemm", ["xs", "fc1.weight"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2"),
    ]
    inits = {
        "two": np.array(2.0, np.float32),
        "fc1.weight": _weight(80, 64) if first == "MatMul" else _weight(64, 80),
        "fc2.weight": _weight(64, 8),
    }
    return _model(nodes, [("x", TensorProto.FLOAT, ["batch", "features"])], [("y", 1, ["batch", 8])], inits)


@pytest.mark.parametrize("first", ["MatMul", "Gemm"])
def test_a_tabular_input_takes_its_features_from_the_first_weight(first: str) -> None:
    """Was: features guessed as audio (16000, 512, …) and "ONNX Runtime rejects every input size tried"."""
    model = mlp_model(first)
    assert default_shapes(model) == ({"x": [1, 80]}, "")  # read from the model, not chosen: no note
    assert confirmed_shapes(prepare_model(model)) == ({"x": [1, 80]}, "")
    assert synthetic_feeds(model, batch=3, seed=0)["x"].shape == (3, 80)
    result = inhercc.compress(model, Recipe.of(rank=4))
    assert result.report["shapes"]["values"] == {"x": [1, 80]}
    assert result.report["flops"]["teacher"] == 2 * 80 * 64 + 2 * 64 * 8
    assert set(result.report["fidelity"]) == {"y"}


def test_conv_channels_come_from_the_weight_times_group() -> None:
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="conv", group=2)]
    model = _model(nodes, [("x", 1, ["n", "c", "t"])], [("y", 1, None)], {"conv.weight": _weight(16, 6, 3)})
    shapes, note = default_shapes(model)
    assert shapes == {"x": [1, 12, 128]} and note.startswith("dynamic dims chosen: x=1x12x128 (sequence: 128)")


def test_an_mlp_cli_compress_without_shape(tmp_path) -> None:
    path, out = tmp_path / "m.onnx", tmp_path / "s.onnx"
    onnx.save(mlp_model(), str(path))
    r = invoke("compress", path, "-o", out, "--rank", "4")
    assert r.exit_code == 0 and "dynamic dims chosen" not in r.output, r.output
    x = RNG.standard_normal((5, 80)).astype(np.float32)
    assert run(onnx.load(str(out)), {"x": x})[0].shape == (5, 8)


def silero_files() -> list[str]:
    """The silero-vad wheel's model files when it is installed (the zoo installs it; nothing downloaded)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [str(folder / n) for n in ("silero_vad.onnx", "silero_vad_16k_op15.onnx") if (folder / n).exists()]


@pytest.mark.skipif(not silero_files(), reason="silero-vad is not installed")
def test_real_silero_vad_keeps_audio_samples_and_compresses_plainly(tmp_path) -> None:
    """Its [batch, samples] input meets an STFT (Pad, Conv through If branches), never a MatMul: audio stays."""
    for path in silero_files():
        shapes, note = default_shapes(prepare_model(onnx.load(path)))
        assert shapes == {"input": [1, 16000], "state": [2, 1, 128], "sr": []}, path
        assert "(audio: 16000)" in note
    r = invoke("compress", silero_files()[0], "-o", tmp_path / "s.onnx")
    assert r.exit_code == 0, r.output
    assert "dynamic dims chosen: input=1x512 (audio: 512)" in r.output  # ORT rejects 16000: a 512-sample chunk


def test_a_model_rejecting_224_gets_the_next_size() -> None:
    model = prepare_model(image_model(bias_side=320))
    shapes, note = confirmed_shapes(model)
    assert shapes == {"x": [1, 3, 320, 320]}
    assert note == "dynamic dims chosen: x=1x3x320x320 (spatial: 320); pass `shapes` to choose other sizes"


def test_a_model_rejecting_every_size_names_shape() -> None:
    model = prepare_model(image_model(bias_side=100))
    with pytest.raises(InherccError, match=r"rejects every input size tried \(x=1x3x224x224; x=1x3x320x320.*`shapes`"):
        confirmed_shapes(model)


def test_plain_compress_chooses_sizes_warns_once_and_reports_them() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = inhercc.compress(text_model(), Recipe.of(rank=8))
    notes = [str(w.message) for w in caught if "dynamic dims chosen" in str(w.message)]
    assert notes == [
        "dynamic dims chosen: input_ids=1x64 attention_mask=1x64 (sequence: 64); pass `shapes` to choose other sizes"
    ]
    report = result.report
    assert report["shapes"] == {"values": {"input_ids": [1, 64], "attention_mask": [1, 64]}, "chosen": "default"}
    assert report["flops"]["teacher"] == 2 * 64 * 64 * 64  # 64 tokens × a 64×64 MatMul
    assert report["flops"]["symbolic_dims_counted_as_1"] == []
    assert report["layers"][0]["flops_before"] == 2 * 64 * 64 * 64
    assert report["fidelity"]["y"]["cosine"] > 0.1
    given = inhercc.compress(text_model(), Recipe.of(rank=8, shapes={"input_ids": [2, 16]})).report["shapes"]
    assert given == {"values": {"input_ids": [2, 16], "attention_mask": [2, 16]}, "chosen": "given"}


def test_plain_compress_cli_on_an_image_model_that_rejects_224(tmp_path) -> None:
    path, out, rep = tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "r.json"
    onnx.save(image_model(bias_side=320), str(path))
    r = invoke("compress", path, "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("warning: dynamic dims")]
    assert lines == [
        "warning: dynamic dims chosen: x=1x3x320x320 (spatial: 320); pass --shape to choose other sizes"
    ], r.output
    report = json.loads(rep.read_text())
    assert report["shapes"] == {"values": {"x": [1, 3, 320, 320]}, "chosen": "default"}
    assert report["flops"]["teacher"] == 2 * 64 * 27 * 160 * 160 + 2 * 64 * 64


def test_inspect_counts_flops_at_the_chosen_sizes(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(image_model(), str(path))
    r = invoke("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    assert "warning: dynamic dims chosen: x=1x3x224x224 (spatial: 224)" in r.output
    info = json.loads(r.output[r.output.index("{") :])
    assert info["shapes"] == {"values": {"x": [1, 3, 224, 224]}, "chosen": "default"}
    conv = next(row for row in info["layers"] if row["name"] == "conv")
    assert conv["flops"] == 2 * 64 * 27 * 112 * 112
    assert info["totals"]["flops"] == 2 * 64 * 27 * 112 * 112 + 2 * 64 * 64
    r = invoke("inspect", path, "--json", "--shape", "x=1x3x32x32")
    info = json.loads(r.output[r.output.index("{") :])
    assert info["totals"]["flops"] == 2 * 64 * 27 * 16 * 16 + 2 * 64 * 64 and "warning" not in r.output


def test_inspect_counts_flops_at_the_sizes_onnx_runtime_accepts(tmp_path) -> None:
    """inspect confirms its guess like compress does: a model rejecting 224 is counted at 320, the sizes
    compress will use; one rejecting every size is still inspected, at the first guess, with the warning."""
    path, never = tmp_path / "m.onnx", tmp_path / "never.onnx"
    onnx.save(image_model(bias_side=320), str(path))
    r = invoke("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output[r.output.index("{") :])
    assert info["shapes"] == {"values": {"x": [1, 3, 320, 320]}, "chosen": "default"}
    assert info["totals"]["flops"] == 2 * 64 * 27 * 160 * 160 + 2 * 64 * 64
    onnx.save(image_model(bias_side=100), str(never))
    r = invoke("inspect", never, "--json")
    assert r.exit_code == 0, r.output
    assert "ONNX Runtime rejects every input size tried" in r.output
    info = json.loads(r.output[r.output.index("{") :])
    assert info["shapes"]["values"] == {"x": [1, 3, 224, 224]}


def test_bench_without_shape_chooses_sizes(tmp_path) -> None:
    from inhercc.bench import BenchOptions, bench

    path = tmp_path / "m.onnx"
    onnx.save(text_model(), str(path))
    with pytest.warns(UserWarning, match=r"dynamic dims chosen: input_ids=1x64 attention_mask=1x64"):
        result = bench([str(path)], BenchOptions(provider="cpu", repeat=2, warmup=0))
    run_ = result["runs"][0]
    assert run_["shapes"] == {"input_ids": [1, 64], "attention_mask": [1, 64]} and run_["shapes_chosen"] == "default"


# --- 3. inputs of every kind --------------------------------------------------------------------------------


def test_byte_inputs_span_their_table_and_mixed_dtype_outputs_verify() -> None:
    model = bytes_model()
    assert gather_table_sizes(model) == {"bytes": 256}  # through the Cast
    feeds = synthetic_feeds(model, batch=4, seed=0)
    b = feeds["bytes"]
    assert b.dtype == np.uint8 and b.shape == (4, 512) and b.min() == 0 and b.max() == 255
    result = inhercc.compress(model, Recipe.of(rank=16))
    assert set(result.report["fidelity"]) == {"logits", "label"}
    assert 0.0 <= result.report["fidelity"]["label"]["exact_match"] <= 1.0


def test_int32_bytes_into_a_written_out_one_hot_span_its_depth() -> None:
    """Magika's graph (jax2tf): int32 bytes → Reshape → Expand → Equal against a constant 0 … 256 → MatMul."""
    nodes = [
        helper.make_node("Reshape", ["bytes", "to3"], ["b3"]),
        helper.make_node("Expand", ["b3", "wide"], ["be"]),
        helper.make_node("Equal", ["be", "range"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hotf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["hotf", "dense.weight"], ["y"], name="dense"),
    ]
    inits = {
        "to3": np.array([-1, 32, 1], np.int64),
        "wide": np.array([1, 32, 1], np.int64),
        "range": np.arange(257, dtype=np.int32).reshape(1, 1, 257),
        "dense.weight": _weight(257, 64),
    }
    model = _model(nodes, [("bytes", TensorProto.INT32, ["n", 32])], [("y", 1, None)], inits)
    assert index_ranges(model) == {"bytes": 257} and gather_table_sizes(model) == {}
    b = synthetic_feeds(model, batch=64, seed=0)["bytes"]
    assert b.dtype == np.int32 and b.min() == 0 and b.max() == 256


def test_masks_counts_bools_and_other_integers() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inputs = [
        ("x", TensorProto.FLOAT, ["batch", 64]),
        ("token_mask", TensorProto.INT32, ["batch", 64]),
        ("lengths", TensorProto.INT64, ["batch"]),
        ("flag", TensorProto.BOOL, ["batch"]),
        ("other", TensorProto.INT32, ["batch", 3]),
        ("count", TensorProto.INT64, []),
    ]
    model = _model(nodes, inputs, [("y", TensorProto.FLOAT, None)], {"w": _weight(64, 64)})
    feeds = synthetic_feeds(model, batch=2, seed=0)
    assert (feeds["token_mask"] == 1).all() and feeds["token_mask"].dtype == np.int32
    assert feeds["flag"].dtype == np.bool_ and feeds["flag"].all()
    assert (feeds["other"] == 0).all() and int(feeds["count"]) == 1 and (feeds["lengths"] == 1).all()


def test_initializer_inputs_are_optional_and_left_out() -> None:
    model = image_model()
    model.graph.input.append(helper.make_tensor_value_info("fc.weight", TensorProto.FLOAT, [64, 64]))
    assert set(synthetic_feeds(model, seed=0)) == {"x"}


# --- 4. shapes too big for memory ---------------------------------------------------------------------------


def test_huge_shape_is_a_one_line_error_before_allocating(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(inhercc.data, "available_memory", lambda: 1 << 30)
    with pytest.raises(InherccError, match=r"synthetic inputs x=100000000x64 need 71.5 GiB of memory, only 1.0 GiB"):
        synthetic_feeds(_model([], [("x", 1, ["b", 64])], [("x", 1, None)], {}), {"x": [100_000_000, 64]})
    path = tmp_path / "m.onnx"
    onnx.save(text_model(), str(path))
    r = invoke("compress", path, "-o", tmp_path / "s.onnx", "--shape", "input_ids=100000000x64")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: synthetic inputs input_ids=100000000x64 attention_mask=")


# --- 5. token ids checked against the table up front --------------------------------------------------------


def test_ids_beyond_the_embedding_table_are_refused_up_front(tmp_path) -> None:
    ids = np.full((3, 8), 7, np.int64)
    ids[1, 2] = 150
    feeds = {"input_ids": ids, "attention_mask": np.ones((3, 8), np.int64)}
    message = r"^data.npz: input_ids holds ids up to 150, the embedding table has 100 rows$"
    with pytest.raises(InherccError, match=message):
        check_feeds(feeds, text_model(), "data.npz")
    np.savez(tmp_path / "data.npz", **feeds)
    path = tmp_path / "m.onnx"
    onnx.save(text_model(), str(path))
    r = invoke("compress", path, "-o", tmp_path / "s.onnx", "--data", tmp_path / "data.npz")
    assert r.exit_code == 2 and "input_ids holds ids up to 150, the embedding table has 100 rows" in r.output
    ids[1, 2] = -101
    with pytest.raises(InherccError, match="holds ids down to -101"):
        check_feeds(feeds, text_model(), "data.npz")
    ids[1, 2] = 99
    check_feeds(feeds, text_model(), "data.npz")
    assert run(text_model(), {k: v[:, :8] for k, v in feeds.items()})[0].shape == (3, 8, 64)


def test_samples_batch_a_state_input_along_its_batch_axis(tmp_path) -> None:
    model = prepare_model(audio_model())
    feeds = synthetic_feeds(model, {"input": [5, 800]}, seed=2)
    np.savez(tmp_path / "d.npz", **feeds)
    samples = inhercc.data.open_samples(tmp_path / "d.npz", model)
    assert len(samples) == 5
    got = list(samples.batches(np.array([4, 0, 2]), 2))
    assert [rows.tolist() for rows, _ in got] == [[4, 0], [2]]  # in the order given
    first = got[0][1]
    assert first["state"].shape == (2, 2, 128) and first["sr"].shape == () and first["input"].shape == (2, 800)
    np.testing.assert_array_equal(first["state"], feeds["state"][:, [4, 0]])
    np.testing.assert_array_equal(got[1][1]["state"], feeds["state"][:, [2]])
    # unbatched samples from an iterable get the batch axis where the model has it
    items = [{"input": feeds["input"][i], "state": feeds["state"][:, i], "sr": feeds["sr"]} for i in range(3)]
    joined = inhercc.data.open_samples(items, model).gather(np.arange(3))
    np.testing.assert_array_equal(joined["state"], feeds["state"][:, :3])
    assert joined["sr"].shape == ()


def test_the_data_shapes_come_from_the_part_with_most_samples_along_the_batch_axis() -> None:
    """The state [2, batch, 128] comes first in each part: axis 0 (2 in every part) is not the sample count."""
    from inhercc.pipeline import choose_shapes

    model = prepare_model(audio_model())
    parts = []
    for n, t in ((3, 800), (10, 1600)):
        f = synthetic_feeds(model, {"input": [n, t], "state": [2, n, 128]}, seed=0)
        parts.append({"state": f["state"], "input": f["input"], "sr": f["sr"]})
    _, record = choose_shapes(model, None, parts)
    assert record == {"values": {"input": [1, 1600], "state": [2, 1, 128], "sr": []}, "chosen": "data"}
