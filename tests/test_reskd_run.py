"""ResKD end to end on a real small classifier (scikit-learn's 8×8 digits): rounds of residual students, the
calibrated cascade and its report, from the API and the command line."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from inhercc import Recipe, compress
from inhercc.cli import cli
from inhercc.cli.reskd import cascade_table
from inhercc.data import LABELS_KEY
from inhercc.errors import InherccError
from inhercc.model import float_param_count
from inhercc.reskd import ResKDOptions, ReskdWarning, reskd
from inhercc.reskd.run import member_outputs
from tests.helpers import mlp, run
from tests.test_distill import digits_teacher

FAST = {"threads": 1, "quiet": True, "batch_size": 64, "lr": 3e-3, "val_split": 0.2}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> SimpleNamespace:
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("reskd")
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    teacher = digits_teacher(x, y)
    s0 = compress(teacher, Recipe.of(ratio=0.2, verify=False), {"x": x}).model  # ≈ 72 % accurate
    r1 = compress(teacher, Recipe.of(ratio=0.3, verify=False), {"x": x}).model  # ≈ 88 %
    for name, model in (("teacher", teacher), ("s0", s0), ("r1", r1)):
        onnx.save(model, str(d / f"{name}.onnx"))
    np.savez(d / "train.npz", x=x, **{LABELS_KEY: y})
    return SimpleNamespace(dir=d, x=x, y=y, teacher=teacher, s0=s0, r1=r1)


@pytest.fixture(scope="module")
def trained(digits) -> SimpleNamespace:
    """Round 0 inherited and distilled, two residual rounds (a few steps each)."""
    options = ResKDOptions.of(student_ratio=0.2, res_ratios=(0.15, 0.15), steps=40, max_drop=0.5, **FAST)
    result = reskd(digits.teacher, options, {"x": digits.x, LABELS_KEY: digits.y})
    return result


def test_rounds_train_residual_students_and_the_cascade_meets_max_drop(digits, trained) -> None:
    rep = trained.report
    val = rep["validation"]
    assert [m["name"] for m in rep["members"]] == ["S0", "R1", "R2"] and len(trained.members) == 3
    assert val["reference"] == "labels" and val["samples"] == 359
    # each kept round raised validation accuracy, and the table says by how much
    for r in rep["rounds"]:
        assert r["kept"] and r["accuracy"] >= r["accuracy_before"]
    assert val["prefix_accuracy"][-1] == pytest.approx(rep["rounds"][-1]["accuracy"])
    # the adaptive cascade is within max_drop of the full one, cheaper, and the ONNX file scores what was simulated
    assert val["accuracy"] >= val["prefix_accuracy"][-1] - 0.5
    reach = [m["reach"] for m in rep["members"]]
    assert reach[0] == 1.0 and reach == sorted(reach, reverse=True)
    flops = [m["flops"] for m in rep["members"]]
    assert val["expected_flops"] == pytest.approx(float(np.dot(reach, flops)))
    assert val["flops_fraction"] == pytest.approx(val["expected_flops"] / rep["teacher"]["flops"])
    assert val["cascade_accuracy_onnx"] == pytest.approx(val["accuracy"])
    assert rep["skip"]["enabled"] and len(rep["skip"]["thresholds"]) == 2


def test_the_cascade_without_skipping_sums_the_trained_members(digits, trained) -> None:
    from inhercc.reskd import build_cascade

    x = digits.x[:64]
    full = run(build_cascade(trained.members, reference=digits.teacher), {"x": x})[0]
    parts = sum(member_outputs(m, {"x": x}) for m in trained.members)
    np.testing.assert_allclose(full, parts, atol=1e-4)
    out = run(trained.model, {"x": x})[0]
    taus = trained.report["skip"]["thresholds"]
    confident = np.exp(out - out.max(1, keepdims=True))
    confident = (confident / confident.sum(1, keepdims=True)).max(1) >= max(taus)
    assert (out.argmax(1) == full.argmax(1))[~confident].all()  # rows running every member: the full prediction


def test_given_members_and_the_command_line(digits) -> None:
    d = digits.dir
    out = d / "cascade.onnx"
    args = ["reskd", str(d / "teacher.onnx"), "-o", str(out), "--data", str(d / "train.npz"), "--student"]
    args += [str(d / "s0.onnx"), "--res-student", str(d / "r1.onnx"), "--target-flops", "0.3", "-q", "--val-split"]
    res = CliRunner().invoke(cli, [*args, "0.2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((d / "cascade.json").read_text())
    assert [m["source"] for m in rep["members"]] == ["given", "given"] and rep["rounds"] == []
    assert rep["validation"]["flops_fraction"] <= 0.3 and rep["skip"]["target"] == {"target_flops": 0.3}
    assert "cascade written to" in res.output and "R1" in res.output
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["logits"]
    both = member_outputs(digits.s0, {"x": digits.x}) + member_outputs(digits.r1, {"x": digits.x})
    acc = float((run(model, {"x": digits.x})[0].argmax(1) == digits.y).mean() * 100)
    assert acc > 70.0 and float((both.argmax(1) == digits.y).mean() * 100) > 80.0


def test_command_line_errors_are_one_line(digits) -> None:
    d = digits.dir
    base = ["reskd", str(d / "teacher.onnx"), "-o", str(d / "c.onnx"), "--data", str(d / "train.npz")]
    res = CliRunner().invoke(cli, [*base, "--max-drop", "0.1", "--target-flops", "0.2"])
    assert res.exit_code != 0 and res.output.strip() == "error: choose one of --max-drop, --target-flops (got both)"
    res = CliRunner().invoke(cli, [*base, "--res-ratios", "0.1,3"])
    assert res.output.strip() == "error: --res-ratios must be ratios in (0, 1], got (0.1, 3.0)"
    bad = mlp(np.random.default_rng(0), (64, 8, 10))
    onnx.save(bad, str(d / "bad.onnx"))
    res = CliRunner().invoke(cli, [*base, "--student", str(d / "bad.onnx")])
    assert res.exit_code != 0 and res.output.count("\n") == 1
    assert res.output.startswith("error: member 0 gives outputs y, the teacher gives logits")


def test_a_ratio_below_the_smallest_plan_names_the_reskd_option(digits) -> None:
    d = digits.dir
    base = ["reskd", str(d / "teacher.onnx"), "-o", str(d / "c.onnx"), "--data", str(d / "train.npz"), "-q"]
    # without --rank-multiple, a ratio below rank 8's smallest plan (14.6 % here) is retried at rank multiple 1
    too_small = "is too small: the smallest factors (rank 1 per layer) already keep 1.8%"
    res = CliRunner().invoke(cli, [*base, "--student-ratio", "0.01", "--res-ratios", "0.2"])
    assert res.exit_code == 2 and res.output.startswith(f"error: --student-ratio 0.01 {too_small}")
    assert "rank-multiple" not in res.output  # rank 1 already: no hint
    # a res-student's ratio fails before round 0 trains (no steps given: it would train for epochs)
    res = CliRunner().invoke(cli, [*base, "--res-ratios", "0.2,0.01"])
    assert res.exit_code == 2 and res.output.startswith(f"error: --res-ratios 0.01 {too_small}")
    assert res.output.count("\n") == 1 and not (d / "c.onnx").exists()
    # a rank multiple given is kept, and the error suggests a smaller one
    res = CliRunner().invoke(cli, [*base, "--res-ratios", "0.1", "--rank-multiple", "8"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --res-ratios 0.1 is too small: the smallest factors (rank 8")
    assert res.output.rstrip().endswith("; a smaller --rank-multiple allows smaller ratios")
    with pytest.raises(InherccError, match="^`reskd.rank_multiple` must be"):
        reskd(digits.teacher, ResKDOptions.of(rank_multiple=0, **FAST), {"x": digits.x})


def test_small_res_ratios_work_without_a_rank_multiple(digits) -> None:
    """Ratios 0.1 and 0.05 are below rank 8's smallest plan on this teacher (14.6 %): with no rank multiple given
    they are made at multiple 1 — the command works without flags beyond the ratios."""
    said: list[str] = []
    options = ResKDOptions.of(student_ratio=0.1, res_ratios=(0.05,), steps=5, **FAST)
    result = reskd(digits.teacher, options, {"x": digits.x, LABELS_KEY: digits.y}, log=said.append)
    assert [m["name"] for m in result.report["members"]] == ["S0", "R1"]
    params = [m["params"] for m in result.report["members"]]
    rank8 = compress(digits.teacher, Recipe.of(rank=8, verify=False), {"x": digits.x}).model  # the smallest at 8
    assert params[1] < params[0] < float_param_count(rank8)
    assert sum("trying 1" in m for m in said) == 2


def test_a_non_logit_output_runs_without_skipping(digits) -> None:
    rng = np.random.default_rng(0)
    teacher, s0, r1 = (mlp(rng, (8, 16, 4)) for _ in range(3))  # output "y": values, not logits
    x = rng.standard_normal((40, 8)).astype(np.float32)
    with pytest.warns(ReskdWarning, match="not class logits"):
        result = reskd(teacher, _opts(), {"x": x}, student=s0, res_students=[r1])
    assert not result.report["skip"]["enabled"] and "not class logits" in result.report["skip"]["note"]
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(s0, {"x": x})[0] + run(r1, {"x": x})[0], atol=1e-5)
    with pytest.raises(InherccError, match=r"^`reskd.max_drop` needs a classification output"):
        reskd(teacher, _opts(max_drop=0.1), {"x": x}, student=s0, res_students=[r1])
    assert math.isfinite(result.report["validation"]["expected_flops"])
    # not logits: each prefix is scored by its cosine to the teacher (accuracy means nothing here)
    val, t = result.report["validation"], run(teacher, {"x": x})[0]
    assert val["prefix_accuracy"] is None and len(val["prefix_cosine"]) == 2
    held = run(result.model, {"x": x})[0][_val_rows(len(x))]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    assert val["prefix_cosine"][1] == pytest.approx(cos(held, t[_val_rows(len(x))]), abs=1e-5)
    assert val["cascade_cosine_onnx"] == pytest.approx(val["prefix_cosine"][1], abs=1e-5)
    assert "cosine to T" in cascade_table(result.report)


def _val_rows(n: int) -> np.ndarray:
    """The validation rows ResKD scores on (distillation's split of ``n`` samples at 0.25, seed 0)."""
    from inhercc.data import split_indices

    return np.asarray(split_indices(n, 0.25, 0)[1])


def _opts(**kw: float) -> ResKDOptions:
    return ResKDOptions.of(val_split=0.25, quiet=True, **kw)


def test_res_focus_trains_on_the_rows_the_prefix_is_least_sure_of(digits) -> None:
    from inhercc.data import split_indices
    from inhercc.reskd.calibrate import scores
    from inhercc.reskd.run import FOCUS_CHUNK, Member, _focus, _open

    data = {"x": digits.x, LABELS_KEY: digits.y}
    options = ResKDOptions.of(res_focus=0.25, **FAST)
    state = _open(digits.teacher, data, options, lambda _m: None)
    members = [Member(digits.s0, "given"), Member(digits.r1, "given")]
    focus = _focus(state, members)
    train_idx, _ = split_indices(len(digits.x), 0.2, 0)
    count = round(0.25 * len(train_idx))
    assert count == len(focus["x"]) == len(focus[LABELS_KEY])
    assert len(train_idx) < FOCUS_CHUNK  # one chunk here; the chunked path ran the same code
    s = scores(member_outputs(digits.s0, {"x": digits.x}) + member_outputs(digits.r1, {"x": digits.x}), "confidence")
    chosen = np.sort(train_idx[np.argsort(s[train_idx], kind="stable")[:count]])
    np.testing.assert_array_equal(focus["x"], digits.x[chosen])  # the least confident training rows, in order
    np.testing.assert_array_equal(focus[LABELS_KEY], digits.y[chosen])
    assert s[chosen].max() <= np.delete(s, np.concatenate([chosen, split_indices(len(digits.x), 0.2, 0)[1]])).min()
    # all samples (the default) and non-logit outputs: no focus
    assert _focus(_open(digits.teacher, data, ResKDOptions.of(**FAST), lambda _m: None), members) is None
    # end to end: the round trains on the focused rows (less the distillation's own validation split of them)
    # and says how many
    focused = ResKDOptions.of(res_ratios=(0.3,), res_focus=0.25, steps=20, **FAST)
    result = reskd(digits.teacher, focused, data, student=digits.s0)
    assert result.report["rounds"][0]["trained_on"] == len(split_indices(count, 0.2, 0)[0]) < count
    assert result.report["options"]["res_focus"] == 0.25


def test_a_non_logit_round_that_lowers_the_cosine_is_dropped(digits, monkeypatch) -> None:
    """Not logits (the teacher's output declared ``values``): rounds are scored by the validation cosine to the
    teacher; a res-student that lowers it (here its training replaced by one that returns −5 × S0) is dropped and
    the rounds stop — the cascade is S0 alone, the report saying before and after."""
    import warnings

    from inhercc.reskd import run as reskd_run
    from inhercc.reskd.train import with_output_scale

    bad = with_output_scale(digits.s0, np.full(10, -5.0, np.float32))
    monkeypatch.setattr(reskd_run, "train_residual", lambda *a, **k: (bad, {"train_samples": 1}))
    kinds = {"output_kinds": {digits.teacher.graph.output[0].name: "values"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReskdWarning)
        result = reskd(digits.teacher, _opts(res_ratios=(0.3, 0.3), **kinds), {"x": digits.x}, student=digits.s0)
    (r,) = result.report["rounds"]
    assert not r["kept"] and r["cosine"] < 0 < r["cosine_before"] and "accuracy" not in r
    assert [m["name"] for m in result.report["members"]] == ["S0"]
    assert result.report["validation"]["prefix_cosine"] == pytest.approx([r["cosine_before"]], abs=1e-6)
    x = {"x": digits.x}
    np.testing.assert_allclose(run(result.model, x)[0], run(digits.s0, x)[0], atol=1e-5)
