"""LSTM / GRU / RNN in the torch runtime: parity with ONNX Runtime on the options ONNX's conformance data
lacks (reverse, bidirectional, sequence_lens, initial states, peepholes, clip, input_forget, activations),
layout=1 against the same node in layout 0, gradients, and torch-exported nn.LSTM / nn.GRU models."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from inhercc.torchrt import OnnxModule
from inhercc.torchrt.parity import compare
from tests.helpers import run

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
T, B, I, H = 5, 3, 4, 6


def _recurrent_model(
    op: str,
    attrs: dict,
    *,
    layout: int = 0,
    lens: bool = False,
    initial: bool = False,
    peepholes: bool = False,
    dtype: type = np.float32,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node with random weights (initializers) and feeds in the node's layout."""
    rng = np.random.default_rng(seed)
    gates = _GATES[op]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    weights = {
        "W": rng.standard_normal((dirs, gates * H, I)) * 0.5,
        "R": rng.standard_normal((dirs, gates * H, H)) * 0.5,
        "B": rng.standard_normal((dirs, 2 * gates * H)) * 0.5,
    }
    if peepholes:
        weights["P"] = rng.standard_normal((dirs, 3 * H)) * 0.5
    x_shape = [B, T, I] if layout else [T, B, I]
    h_shape = [B, dirs, H] if layout else [dirs, B, H]
    feeds = {"x": rng.standard_normal(x_shape).astype(dtype)}
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    names = ["x", "W", "R", "B", "", "", ""][: 7 if op == "LSTM" else 6]
    if lens:
        names[4] = "lens"
        feeds["lens"] = np.array([T, 2, 4], np.int32)
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
    if initial:
        states = ["h0", "c0"] if op == "LSTM" else ["h0"]
        for k, name in enumerate(states):
            names[5 + k] = name
            feeds[name] = rng.standard_normal(h_shape).astype(dtype)
            inputs.append(helper.make_tensor_value_info(name, elem, h_shape))
    if peepholes:
        names.append("P")
    while not names[-1]:
        names.pop()
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outputs, hidden_size=H, layout=layout, **attrs)
    graph = helper.make_graph(
        [node],
        "recurrent",
        inputs,
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        [numpy_helper.from_array(v.astype(dtype), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, feeds


CASES = {
    "lstm_reverse_lens_states_peepholes": (
        "LSTM",
        {"direction": "reverse"},
        dict(lens=True, initial=True, peepholes=True),
    ),
    "lstm_bidirectional_lens_states_peepholes": (
        "LSTM",
        {"direction": "bidirectional"},
        dict(lens=True, initial=True, peepholes=True),
    ),
    "lstm_clip": ("LSTM", {"clip": 0.5}, dict(initial=True)),
    "lstm_input_forget": ("LSTM", {"input_forget": 1}, dict(initial=True, peepholes=True)),
    "lstm_activations_alpha_beta": (
        "LSTM",
        {
            "direction": "bidirectional",
            "activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh", "Sigmoid", "Tanh", "Affine"],
            "activation_alpha": [0.3, 0.1, 0.9, 0.7],
            "activation_beta": [0.4, 1.2, 0.2],
        },
        dict(initial=True),
    ),
    "gru_bidirectional_linear_before_reset_lens": (
        "GRU",
        {"direction": "bidirectional", "linear_before_reset": 1},
        dict(lens=True, initial=True),
    ),
    "gru_reverse_lens": ("GRU", {"direction": "reverse"}, dict(lens=True, initial=True)),
    "gru_clip_softsign_elu": ("GRU", {"clip": 0.3, "activations": ["Softsign", "Elu"], "activation_alpha": [0.5]}, {}),
    "rnn_bidirectional_relu_thresholded_lens": (
        "RNN",
        {"direction": "bidirectional", "activations": ["Relu", "ThresholdedRelu"], "activation_alpha": [0.2]},
        dict(lens=True, initial=True),
    ),
    "rnn_reverse_softplus": ("RNN", {"direction": "reverse", "activations": ["Softplus"]}, dict(initial=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_onnx_runtime(case: str) -> None:
    op, attrs, options = CASES[case]
    model, feeds = _recurrent_model(op, attrs, **options)
    parity = compare(model, feeds, rtol=1e-5)
    assert parity.ok, parity
    assert parity.max_rel < 5e-6


def test_sequence_lens_zero_the_padding_and_keep_the_last_valid_state() -> None:
    """Past its length an entry's Y is 0 and Y_h is the state at its last step (reverse: step 0)."""
    model, feeds = _recurrent_model("LSTM", {"direction": "bidirectional"}, lens=True, initial=True)
    y, y_h, _ = (t.detach().numpy() for t in OnnxModule(model)(**feeds))
    assert np.all(y[2:, :, 1] == 0) and np.all(y[4:, :, 2] == 0) and np.any(y[1, :, 1] != 0)
    np.testing.assert_array_equal(y_h[0, 1], y[1, 0, 1])  # forward: last valid step 1 of entry 1
    np.testing.assert_array_equal(y_h[1, 1], y[0, 1, 1])  # reverse ends at step 0


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_layout_1_equals_layout_0_transposed(op: str) -> None:
    """ONNX Runtime refuses layout=1, so the batch-major node is held to ORT's run of the time-major one."""
    attrs = {"direction": "bidirectional"}
    time_major, feeds = _recurrent_model(op, attrs, lens=True, initial=True)
    batch_major, _ = _recurrent_model(op, attrs, layout=1, lens=True, initial=True)
    expected = run(time_major, feeds)
    batch_feeds = {k: (v.swapaxes(0, 1) if k != "lens" else v) for k, v in feeds.items()}
    got = [t.detach().numpy() for t in OnnxModule(batch_major)(**batch_feeds)]
    np.testing.assert_allclose(got[0], expected[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-6)
    for g, e in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(g, e.swapaxes(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_gradients_are_exact(op: str) -> None:
    """Finite differences in float64 through every weight, the input and the initial states."""
    attrs = {"direction": "bidirectional"}
    model, feeds = _recurrent_model(op, attrs, lens=True, initial=True, peepholes=op == "LSTM", dtype=np.float64)
    module = OnnxModule(model)
    names = list(module.onnx_parameters())
    keys = [f"initializers.{n}" for n in names]
    weights = tuple(module.parameter(n).detach().clone().requires_grad_(True) for n in names)
    states = {k: torch.from_numpy(v).requires_grad_(True) for k, v in feeds.items() if k != "lens"}
    lens = torch.from_numpy(feeds["lens"])

    def f(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = dict(zip(states, args[: len(states)]))
        return torch.func.functional_call(module, dict(zip(keys, args[len(states) :])), (), {**given, "lens": lens})

    assert torch.autograd.gradcheck(f, (*states.values(), *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


class _Recurrent(torch.nn.Module):
    """A bidirectional 2-layer batch-first LSTM feeding a GRU and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = torch.nn.GRU(32, 12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = self.lstm(x)
        z, h = self.gru(y.transpose(0, 1))
        return self.head(z), h


def test_torch_exported_lstm_and_gru() -> None:
    torch.manual_seed(0)
    net = _Recurrent().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # tracer and GRU-batch warnings of the legacy exporter
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(3, 7, 8),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y", "h"],
            dynamic_axes={"x": {0: "batch", 1: "time"}},
            opset_version=17,
        )
    model = onnx.load_from_string(buffer.getvalue())
    assert {"LSTM", "GRU"} <= {n.op_type for n in model.graph.node}
    x = np.random.default_rng(1).standard_normal((4, 9, 8)).astype(np.float32)
    parity = compare(model, {"x": x})
    assert parity.ok and parity.max_rel < 1e-5, parity
    with torch.no_grad():
        expected = [t.numpy() for t in net(torch.from_numpy(x))]
        got = [t.numpy() for t in OnnxModule(model)(x)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
