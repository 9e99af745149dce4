"""The parity helper: relative-to-scale bound with an absolute floor, exact integer outputs, real mismatches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from inhercc.torchrt import OnnxModule
from inhercc.torchrt.parity import ATOL_FLOOR, Parity, compare, compare_output
from tests.helpers import make_model, mlp


def test_near_zero_output_is_held_to_the_absolute_floor() -> None:
    """A sigmoid map of ≈1e-5 with an error of 1e-7 is 1e-2 relative to its max, yet within the floor."""
    ref = np.full((4, 4), 1e-5, np.float32)
    got = ref + np.float32(1e-7)
    out = compare_output("heat", ref, got, rtol=1e-4, atol=None)
    assert out.ok and out.bound == ATOL_FLOOR["float32"] == 1e-6
    assert out.max_rel == pytest.approx(1e-2, rel=1e-3) and out.max_abs == pytest.approx(1e-7, rel=1e-2)
    assert not compare_output("heat", ref, ref + np.float32(2e-6), rtol=1e-4, atol=None).ok


def test_bound_is_relative_to_the_output_scale() -> None:
    ref = np.array([1000.0, 0.001, -3.0], np.float32)
    assert compare_output("y", ref, ref + np.float32(0.09), rtol=1e-4, atol=None).ok  # 0.09 <= 0.1
    failed = compare_output("y", ref, ref + np.array([0, 0.2, 0], np.float32), rtol=1e-4, atol=None)
    assert not failed.ok and failed.bound == pytest.approx(0.1) and failed.max_abs == pytest.approx(0.2, rel=1e-4)


def test_integer_outputs_compare_exactly_and_shapes_must_match() -> None:
    ids = np.array([3, 1, 2], np.int64)
    assert compare_output("ids", ids, ids.copy(), 1e-4, None).ok
    off = compare_output("ids", ids, np.array([3, 1, 4], np.int64), 1e-4, None)
    assert not off.ok and off.exact and off.max_abs == 2.0
    shape = compare_output("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), 1e-4, None)
    assert not shape.ok and "shape" in shape.note
    nan = compare_output("y", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 1e-4, None)
    assert not nan.ok and "NaN" in nan.note
    assert compare_output("y", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), 1e-4, None).ok


def _model_with_int_output() -> tuple:
    rng = np.random.default_rng(0)
    model = mlp(rng)
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, None))
    return model, {"x": rng.standard_normal((5, 64)).astype(np.float32)}


def test_compare_runs_both_runtimes_on_every_output() -> None:
    model, feeds = _model_with_int_output()
    parity = compare(model, feeds)
    assert isinstance(parity, Parity) and dataclasses.is_dataclass(parity)
    assert parity.ok and [o.name for o in parity.outputs] == ["y", "label"]
    assert parity.by_name()["label"].exact and parity.by_name()["label"].max_abs == 0.0
    assert parity.max_abs < 1e-5 and parity.max_rel < 1e-5 and parity.worst == "y"
    with pytest.raises(dataclasses.FrozenInstanceError):
        parity.ok = False  # type: ignore[misc]


def test_a_real_mismatch_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch side off by 1e-3 on one element of an output of scale ≈1."""
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], {"x": [2, 3]}, ["y"], {})
    feeds = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
    assert compare(model, feeds).ok
    forward = OnnxModule.forward

    def skewed(self: OnnxModule, *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        (y,) = forward(self, *args, **kwargs)
        return (y + torch.tensor([[0, 0, 1e-3], [0, 0, 0]]),)

    monkeypatch.setattr(OnnxModule, "forward", skewed)
    parity = compare(model, feeds)
    assert not parity.ok and parity.worst == "y"
    assert parity.max_abs == pytest.approx(1e-3, rel=1e-3) and parity.outputs[0].bound == pytest.approx(
        7.31e-5, rel=1e-2
    )
    assert compare(model, feeds, rtol=2e-3).ok
