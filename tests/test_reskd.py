"""ResKD's pieces: the ONNX cascade (real ONNX Runtime sessions), the threshold calibration and the residual
targets, on hand-made models and logits."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from inhercc.errors import InherccError
from inhercc.losses import relative_mse
from inhercc.reskd import Cascade, build_cascade, calibrate, residual_target
from inhercc.reskd.calibrate import scores
from inhercc.reskd.options import ResKDOptions, parse_ratios
from inhercc.reskd.train import (
    SCALE,
    initial_scale,
    least_squares_scale,
    member_of,
    trainable_pattern,
    with_output_scale,
    with_residual_output,
)
from tests.helpers import make_model, mlp, run

CLASSES = 5


def members(count: int = 3, hidden: tuple[int, ...] = (16, 12, 8)) -> list[onnx.ModelProto]:
    """``count`` different x[8] → hidden → y[5] MLPs, scaled so that some rows are confident and some not."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        m = mlp(rng, (8, hidden[i % len(hidden)], CLASSES))
        for t in m.graph.initializer:
            if t.name == "fc2.weight":
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 3, t.name))
        out.append(m)
    return out


@pytest.fixture(scope="module")
def case() -> tuple[list[onnx.ModelProto], np.ndarray, list[np.ndarray]]:
    ms = members()
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    return ms, x, [run(m, {"x": x})[0] for m in ms]


def simulate(zs: list[np.ndarray], thresholds: list[float], rule: str = "confidence") -> tuple[np.ndarray, np.ndarray]:
    """The adaptive sum and each row's exit member, computed in numpy (the definition the graph must meet)."""
    total = zs[0].astype(np.float64).copy()
    exits = np.zeros(len(total), int)
    active = np.arange(len(total))
    for k, tau in enumerate(thresholds, start=1):
        active = active[scores(total[active], rule) < tau]
        total[active] += zs[k][active]
        exits[active] = k
    return total, exits


# --------------------------------------------------------------------------------------------------------
# the cascade graph


def test_plain_sum_equals_the_members_sum(case) -> None:
    ms, x, zs = case
    cascade = build_cascade(ms)
    assert [o.name for o in cascade.graph.output] == ["y"] and [i.name for i in cascade.graph.input] == ["x"]
    np.testing.assert_allclose(run(cascade, {"x": x})[0], zs[0] + zs[1] + zs[2], atol=1e-5)
    assert {t.name.split("_")[0] for t in cascade.graph.initializer} == {"m0", "m1", "m2"}


def test_each_skipped_members_weights_live_in_its_own_branch(case) -> None:
    """ONNX Runtime folds a subgraph's own initializers as constants, not outer-scope ones (1.4× at batch 32)."""
    ms, _, _ = case
    graph = build_cascade(ms, [0.5, 0.5]).graph
    assert {t.name.split("_")[0] for t in graph.initializer} == {"m0", "reskd"}
    first = next(n for n in graph.node if n.op_type == "If").attribute
    then1 = next(a.g for a in first if a.name == "then_branch")
    assert {t.name.split("_")[0] for t in then1.initializer} == {"m1"}
    second = next(n for n in then1.node if n.op_type == "If").attribute
    then2 = next(a.g for a in second if a.name == "then_branch")
    assert {t.name for t in then2.initializer} == {"m2_" + t.name for t in ms[2].graph.initializer}


@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_rows_that_exit_early_get_exactly_their_prefix_sum(case, rule: str) -> None:
    ms, x, zs = case
    s0 = scores(zs[0], rule)
    s1 = scores(zs[0] + zs[1], rule)
    taus = [float(np.median(s0)), float(np.median(s1))]
    total, exits = simulate(zs, taus, rule)
    assert set(exits) == {0, 1, 2}  # rows leave after every member
    out = run(build_cascade(ms, taus, rule), {"x": x})[0]
    np.testing.assert_array_equal(out[exits == 0], zs[0][exits == 0])  # never touched: bit-exact
    np.testing.assert_allclose(out[exits == 1], (zs[0] + zs[1])[exits == 1], atol=1e-5)
    np.testing.assert_allclose(out[exits == 2], (zs[0] + zs[1] + zs[2])[exits == 2], atol=1e-5)
    np.testing.assert_allclose(out, total, atol=1e-5)


@pytest.mark.parametrize(
    ("taus", "expect"),
    [([0.0, 0.0], (0,)), ([math.inf, math.inf], (0, 1, 2)), ([math.inf, 0.0], (0, 1)), ([0.0, math.inf], (0,))],
)
def test_none_some_or_all_rows_continue(case, taus: list[float], expect: tuple[int, ...]) -> None:
    ms, x, zs = case
    out = run(build_cascade(ms, taus), {"x": x})[0]
    np.testing.assert_allclose(out, sum(zs[i] for i in expect), atol=1e-5)


def test_batch_one_and_batch_32_give_the_same_predictions(case) -> None:
    ms, x, zs = case
    taus = [float(np.quantile(scores(zs[0], "confidence"), 0.4)), 0.9]
    cascade = build_cascade(ms, taus)
    whole = run(cascade, {"x": x})[0]
    single = np.concatenate([run(cascade, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(whole.argmax(1), single.argmax(1))
    np.testing.assert_allclose(whole, single, atol=1e-5)


def test_the_calibrated_simulation_is_what_the_graph_runs(case) -> None:
    ms, x, zs = case
    labels = (zs[0] + zs[1] + zs[2]).argmax(1)
    cascade = Cascade.of(zs, labels, [100.0, 50.0, 25.0], 400.0)
    taus = calibrate(cascade, target_flops=0.3)
    exits, _ = cascade.run(taus)
    out = run(build_cascade(ms, taus), {"x": x})[0]
    assert float((out.argmax(1) == labels).mean() * 100) == pytest.approx(cascade.measure(taus)["accuracy"])
    np.testing.assert_array_equal(exits, simulate(zs, taus)[1])


def test_members_must_match_the_teacher() -> None:
    ms = members(2)
    other = onnx.ModelProto()
    other.CopyFrom(ms[1])
    other.graph.input[0].name = "pixels"
    for n in other.graph.node:
        n.input[:] = ["pixels" if i == "x" else i for i in n.input]
    with pytest.raises(InherccError, match=r"^member 1 takes inputs pixels \(float32, rank 2\), the teacher x") as e:
        build_cascade([ms[0], other])
    assert "\n" not in str(e.value)
    shaped = [onnx.ModelProto(), onnx.ModelProto()]
    for m, classes in zip(shaped, (5, 6)):
        m.CopyFrom(ms[0])
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", classes]))
    with pytest.raises(InherccError, match=r"^member 1's output y has shape \[batch, 6\], the teacher's \[batch, 5\]$"):
        build_cascade(shaped)
    two = make_model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
        {"x": ["b", 8]},
        ["y", "z"],
        {},
    )
    with pytest.raises(InherccError, match="sums one output; the teacher has 2: y, z"):
        build_cascade([two])
    with pytest.raises(InherccError, match="3 members take 2 thresholds, got 1"):
        build_cascade(members(3), [0.5])


# --------------------------------------------------------------------------------------------------------
# calibration


def hand_made() -> Cascade:
    """Two members, 10 rows: rows 0-5 confident and right after member 0; rows 6-7 unsure and wrong, right with
    member 1; rows 8-9 less unsure, right after member 0 and wrong with member 1. FLOPs: 100 + 100, teacher 400."""
    z0 = np.zeros((10, 2))
    z0[:6, 0] = 8.0  # confident class 0, correct
    z0[6:8, 1] = 0.2  # unsure: predicts 1, label 0
    z0[8:, 0] = 0.5  # less unsure (0.62 against 0.55), correct
    z1 = np.zeros((10, 2))
    z1[6:8, 0] = 1.0  # corrects rows 6-7
    z1[8:, 1] = 1.0  # spoils rows 8-9
    return Cascade.of([z0, z1], np.zeros(10, int), [100.0, 100.0], 400.0)


def test_prefix_accuracy_reach_and_expected_flops_on_hand_made_logits() -> None:
    c = hand_made()
    assert c.prefix_accuracy() == [80.0, 80.0]
    m = c.measure([0.9])  # the six confident rows exit; member 1 fixes rows 6-7, spoils rows 8-9
    assert m["reach"] == [1.0, 0.4] and m["accuracy"] == 80.0
    assert m["expected_flops"] == pytest.approx(140.0) and m["flops_fraction"] == pytest.approx(0.35)
    m = c.measure([0.6])  # rows 8-9 exit too
    assert m["reach"] == [1.0, 0.2] and m["accuracy"] == 100.0 and m["expected_flops"] == pytest.approx(120.0)
    assert c.measure([math.inf]) == {
        "accuracy": 80.0,
        "reach": [1.0, 1.0],
        "expected_flops": 200.0,
        "flops_fraction": 0.5,
    }


def test_max_drop_picks_the_cheapest_thresholds_within_the_drop() -> None:
    c = hand_made()
    taus = calibrate(c, max_drop=0.0)
    m = c.measure(taus)
    assert m["accuracy"] >= 80.0  # the full cascade's, within 0 points
    assert m["expected_flops"] == pytest.approx(100.0)  # everyone exits: rows 6-9 trade two wrongs for two rights
    big = Cascade.of(
        [np.eye(2)[[0, 1, 1, 1]] * [4, 0.1], np.eye(2)[[0, 0, 0, 0]]], np.zeros(4, int), [10.0, 10.0], 40.0
    )
    taus = calibrate(big, max_drop=0.0)  # member 1 fixes the three unsure rows: only the confident row may exit
    assert big.measure(taus)["accuracy"] == 100.0 and big.measure(taus)["reach"] == [1.0, 0.75]


def test_target_flops_gets_the_most_accurate_thresholds_within_the_budget() -> None:
    c = hand_made()
    taus = calibrate(c, target_flops=0.35)
    m = c.measure(taus)
    assert m["flops_fraction"] <= 0.35 and m["accuracy"] == 100.0
    with pytest.raises(InherccError, match="give one of"):
        calibrate(c)


def test_scores_confidence_and_margin() -> None:
    z = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(scores(z, "confidence"), [0.7, 0.4])
    np.testing.assert_allclose(scores(z, "margin"), [0.5, 0.05])


# --------------------------------------------------------------------------------------------------------
# residual training


def test_residual_target_and_its_least_squares_scale() -> None:
    teacher = np.array([[3.0, 1.0], [0.0, 2.0]])
    s0, r1 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.5, 0.5], [0.0, 0.0]])
    np.testing.assert_array_equal(residual_target(teacher, [s0, r1]), [[1.5, 0.5], [0.0, 1.0]])
    z = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    np.testing.assert_allclose(least_squares_scale(z, 2.5 * z + [[0, 1], [0, 1]]), [2.5, 0.0])


def test_the_initial_scale_is_the_fit_unless_it_is_less_faithful_to_the_teacher() -> None:
    teacher, prefix = np.array([[3.0, 0.0], [0.0, 3.0]]), np.array([[1.0, 0.9], [0.0, 1.0]])
    residual = teacher - prefix  # [[2, -0.9], [0, 2]]
    np.testing.assert_allclose(initial_scale(teacher, [prefix], 2 * residual, True), [0.5, 0.5])
    poor = np.array([[0.0, 1.0], [0.0, 1.0]])  # fit: class 1 × 0.55, which flips row 0 to class 1
    assert least_squares_scale(poor, residual)[1] == pytest.approx(0.55)
    np.testing.assert_array_equal(initial_scale(teacher, [prefix], poor, True), [0.0, 0.0])
    # not logits: the fit unless it lowers the mean cosine to the teacher (row 0: 0.743 → 0.568 at the fit)
    np.testing.assert_array_equal(initial_scale(teacher, [prefix], poor, False), [0.0, 0.0])
    np.testing.assert_allclose(initial_scale(teacher, [prefix], 2 * residual, False), [0.5, 0.5])


def test_the_relative_mse_of_the_sum_is_the_residual_mse() -> None:
    g = torch.Generator().manual_seed(0)
    t, prefix, r = (torch.randn(6, 4, generator=g) for _ in range(3))
    residual_mse = ((r - (t - prefix)) ** 2).mean() / (t**2).mean()
    assert float(relative_mse(prefix + r, t)) == pytest.approx(float(residual_mse), rel=1e-6)


def test_output_scale_residual_copy_and_trained_names(case) -> None:
    ms, x, zs = case
    scaled = with_output_scale(ms[1], np.arange(CLASSES, dtype=np.float32))
    np.testing.assert_allclose(run(scaled, {"x": x})[0], zs[1] * np.arange(CLASSES), rtol=1e-6)
    y, copy = run(with_residual_output(scaled), {"x": x})
    np.testing.assert_array_equal(y, copy)
    import re

    names = [
        "m1_fc1.weight.inherit_in",
        "m1_fc1.weight.inherit_out_2",
        f"m1_{SCALE}",
        "m1_fc2.bias",
        "m0_" + SCALE,
        "m0_fc1.weight.inherit_in",
    ]
    chosen = [n for n in names if re.search(trainable_pattern(1, "factors"), n)]
    assert chosen == names[:3]
    assert [n for n in names if re.search(trainable_pattern(1, "all"), n)] == names[:4]
    merged = build_cascade([ms[0], scaled])
    for t in merged.graph.initializer:
        if t.name == f"m1_{SCALE}":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(CLASSES, 7.0, np.float32), t.name))
    back = member_of(merged, 1, scaled)
    np.testing.assert_allclose(run(back, {"x": x})[0], zs[1] * 7, rtol=1e-6)


def test_options_parse_and_check() -> None:
    assert parse_ratios(("0.1,0.05",)) == (0.1, 0.05) == parse_ratios(["0.1", "0.05"])
    assert parse_ratios(("",)) == ()
    o = ResKDOptions.of(res_ratios=(0.2,), steps=5, max_drop=0.5)
    assert o.distill.steps == 5 and o.ratios() == (0.2,) and o.target() == {"max_drop": 0.5}
    assert ResKDOptions(res_students=("r.onnx",)).ratios() == ()
    assert ResKDOptions().ratios() == (0.1, 0.05) and ResKDOptions().target() == {"max_drop": 0.2}
    with pytest.raises(InherccError, match=r"^`reskd.res_ratios` must be ratios in \(0, 1\], got \(0.1, 2.0\)$"):
        ResKDOptions(res_ratios=(0.1, 2.0)).check()
    with pytest.raises(InherccError, match="choose one of `reskd.max_drop`, `reskd.target_flops`"):
        ResKDOptions(max_drop=0.1, target_flops=0.2).check()
    with pytest.raises(InherccError, match="unknown ResKD option `ratio`"):
        ResKDOptions.of(ratio=0.5)
    with pytest.raises(InherccError, match="^unknown `reskd.allocation` .best.; choose from greedy"):
        ResKDOptions(allocation="best").check()
