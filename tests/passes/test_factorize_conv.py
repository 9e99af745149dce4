"""Conv → k×k Conv (to rank r) + 1×1 Conv (with the bias): 1-D/2-D, strides, pads, dilations, auto_pad, groups."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.passes import FactorizeConv
from inhercc.pipeline import Factorizer
from tests.helpers import factor_product, make_model, rel_err, run

CASES = [
    # (spatial dims, kernel, attrs, groups)
    ((12, 12), (3, 3), {"pads": [1, 1, 1, 1]}, 1),
    ((13, 11), (3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 2]}, 1),
    ((14, 14), (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, 1),
    ((10, 10), (5, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}, 1),
    ((10, 10), (3, 3), {"auto_pad": "VALID"}, 1),
    ((9, 9), (3, 3), {"pads": [1, 1, 1, 1]}, 2),
    ((9, 9), (1, 1), {}, 4),
    ((20,), (3,), {"pads": [1, 1]}, 1),
    ((21,), (5,), {"strides": [2], "dilations": [2], "pads": [3, 1]}, 1),
    ((16,), (3,), {"auto_pad": "SAME_LOWER"}, 2),
]


def conv_model(spatial, kernel, attrs, groups, rng, bias: bool = True, c_in: int = 8, c_out: int = 12):
    w = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(np.float32)
    weights = {"W": w}
    inputs = ["x", "W"]
    if bias:
        weights["B"] = rng.standard_normal(c_out).astype(np.float32)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=groups, kernel_shape=list(kernel), **attrs)
    return make_model([node], {"x": ["N", c_in, *spatial]}, ["y"], weights)


def factorize(model, rank: int):
    m = prepare_model(model)
    layers = {la.name: la for la in find_layers(m, min_params=0)}
    return FactorizeConv({"conv": rank}, layers, Factorizer("svd"))(m).model


@pytest.mark.parametrize("spatial,kernel,attrs,groups", CASES)
def test_full_rank_parity(spatial, kernel, attrs, groups) -> None:
    rng = np.random.default_rng(len(spatial) * 10 + groups)
    teacher = conv_model(spatial, kernel, attrs, groups, rng)
    c_in_k = (8 // groups) * int(np.prod(kernel))
    full = min(12 // groups, c_in_k) * groups
    student = factorize(teacher, full)
    nodes = student.graph.node
    assert [n.op_type for n in nodes] == ["Conv", "Conv"]
    second = {a.name: helper.get_attribute_value(a) for a in nodes[1].attribute}
    assert second["kernel_shape"] == [1] * len(kernel) and second["group"] == groups
    assert len(nodes[1].input) == 3  # the bias moved to the 1×1 output factor
    x = rng.standard_normal((2, 8, *spatial)).astype(np.float32)
    (yt,), (ys,) = run(teacher, {"x": x}), run(student, {"x": x})
    assert ys.shape == yt.shape
    assert rel_err(ys, yt) < 1e-4


@pytest.mark.parametrize("groups", [1, 2])
def test_rank_r_weight_error_is_eckart_young_per_group(groups: int) -> None:
    rng = np.random.default_rng(11)
    teacher = conv_model((8, 8), (3, 3), {"pads": [1, 1, 1, 1]}, groups, rng, bias=False)
    w = next(t for t in teacher.graph.initializer if t.name == "W")
    from onnx import numpy_helper

    w = numpy_helper.to_array(w).astype(np.float64)
    per_group = 3
    student = factorize(teacher, per_group * groups)
    a, b = factor_product(student, "W")
    assert a.shape == (per_group * groups, 8 // groups, 3, 3)
    assert b.shape == (12, per_group, 1, 1)
    tail = 0.0
    err = 0.0
    for g in range(groups):
        wg = w[g * 12 // groups : (g + 1) * 12 // groups].reshape(12 // groups, -1)
        s = np.linalg.svd(wg, compute_uv=False)
        tail += np.sum(s[per_group:] ** 2)
        ag = a[g * per_group : (g + 1) * per_group].reshape(per_group, -1).astype(np.float64)
        bg = b[g * 12 // groups : (g + 1) * 12 // groups, :, 0, 0].astype(np.float64)
        err += np.linalg.norm(wg - bg @ ag) ** 2
    assert np.sqrt(err) == pytest.approx(np.sqrt(tail), rel=1e-5)


def test_depthwise_and_3d_conv_skipped_with_reasons() -> None:
    rng = np.random.default_rng(12)
    dw = helper.make_node("Conv", ["x", "Wd"], ["h"], name="dw", group=64, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c3 = helper.make_node("Conv", ["v", "W3"], ["z"], name="c3", kernel_shape=[3, 3, 3])
    weights = {
        "Wd": rng.standard_normal((64, 1, 3, 3)).astype(np.float32),
        "W3": rng.standard_normal((64, 64, 3, 3, 3)).astype(np.float32),
    }
    m = make_model([dw, c3], {"x": [1, 64, 8, 8], "v": [1, 64, 4, 4, 4]}, ["h", "z"], weights)
    reasons = {la.name: la.reason for la in find_layers(prepare_model(m), min_params=0)}
    assert reasons["dw"].startswith("no saving at any rank")
    assert reasons["c3"] == "3-D convolution is not supported (1-D and 2-D are)"
