"""Bad user input gives one-line InherccErrors naming the culprit: malformed or oversized plan files, data
files that are not .npz archives, corrupt checkpoints, non-finite distillation settings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

from inhercc.cli import cli
from inhercc.data import load_npz, open_samples
from inhercc.distill import CHECKPOINT_FILE, DistillConfig, distill
from inhercc.errors import InherccError
from inhercc.layers import find_layers
from inhercc.model import prepare_model
from inhercc.pipeline import compress
from inhercc.plan import RankPlan, apply_plan
from inhercc.recipe import Recipe
from tests.helpers import make_model, mlp

FAST: dict[str, Any] = {"threads": 1, "quiet": True, "batch_size": 16, "lr": 1e-3}


@pytest.fixture(scope="module")
def teacher() -> onnx.ModelProto:
    """x [batch, 64] → fc1 (64×96) → ReLU → fc2 (96×48) + bias."""
    return mlp(np.random.default_rng(0), (64, 96, 48))


@pytest.fixture(scope="module")
def layers(teacher):
    return find_layers(prepare_model(teacher), min_params=0)


def plan_dict(**changes: Any) -> dict[str, Any]:
    """A valid plan file's content (as --save-plan writes it) with top-level fields replaced."""
    data: dict[str, Any] = {
        "format": "inhercc-plan",
        "version": 1,
        "method": {"mode": "ratio", "value": 0.5, "rank_multiple": 8, "init": "svd", "split": "output"},
        "layers": [
            {"name": "fc1", "rank": 16, "op": "MatMul", "shape": [64, 96]},
            {"name": "fc2", "rank": None, "op": "MatMul", "shape": [96, 48], "reason": "by hand"},
        ],
    }
    return data | changes


def with_row(index: int, **changes: Any) -> dict[str, Any]:
    data = plan_dict()
    data["layers"][index] = data["layers"][index] | changes
    return data


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- 1. malformed plan files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        (plan_dict(layers=None), '"layers" must be a list of .* got null'),
        (plan_dict(layers=["fc1"]), r"layers\[0\] must be an object like .* got 'fc1'"),
        (plan_dict(layers={"fc1": 16}), '"layers" must be a list .* got an object'),
        (plan_dict(method=None), '"method" must be an object, got null'),
        (plan_dict(method=[1]), '"method" must be an object, got a list'),
        (plan_dict(method={"rank_multiple": 0}), '"method.rank_multiple" must be positive'),
        (plan_dict(method={"value": "half"}), '"method.value" must be a number'),
        (plan_dict(method={"init": 3}), '"method.init" must be a string'),
        (plan_dict(version=99), '"version" 99 is not one this inhercc reads'),
        (plan_dict(version="1"), "\"version\" '1' is not one"),
        ({k: v for k, v in plan_dict().items() if k != "layers"}, '"layers" is missing'),
        (with_row(1, name=None), r'layers\[1\]: every layer needs a "name"'),
        (with_row(1, name="fc1"), r"layers\[1\]: layer fc1 is listed twice"),
        ({**plan_dict(), "layers": [{"name": "fc1"}]}, r'layers\[0\] \(fc1\) needs a "rank"'),
        (with_row(0, rank=True), "rank of fc1 must be a positive integer or null, got True"),
        (with_row(0, rank=16.5), "rank of fc1 must be a positive integer or null, got 16.5"),
        (with_row(0, shape="64x96"), '"shape" of fc1 must be a list of dims'),
        (with_row(0, op=7), '"op" of fc1 must be a string'),
        (with_row(1, reason=["x"]), '"reason" of fc2 must be a string'),
    ],
)
def test_malformed_plan_is_one_line_error_naming_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InherccError, match=message) as info:
        RankPlan.from_dict(data, "p.json")
    assert str(info.value).startswith("p.json") and "\n" not in str(info.value)


def test_malformed_plan_file_on_the_command_line_exits_2_with_one_line(teacher, tmp_path) -> None:
    model, plan = tmp_path / "t.onnx", tmp_path / "p.json"
    onnx.save(teacher, str(model))
    for bad, message in [
        (plan_dict(layers=None), '"layers" must be a list'),
        (plan_dict(layers=["fc1"]), "layers[0] must be an object"),
        (plan_dict(method=None), '"method" must be an object'),
    ]:
        plan.write_text(json.dumps(bad))
        r = invoke("compress", model, "-o", tmp_path / "s.onnx", "--plan", plan)
        assert r.exit_code == 2, r.output
        assert message in r.output and "Traceback" not in r.output
        assert r.output.strip().count("\n") == 0 and r.output.startswith("error:")


def test_saved_plan_still_loads_and_replays(teacher, layers, tmp_path) -> None:
    result = compress(teacher, Recipe.of(rank=16, rank_multiple=8, min_params=0, verify=False))
    path = tmp_path / "plan.json"
    result.plan.save(path, result.layers)
    replayed = apply_plan(layers, RankPlan.load(path))
    assert replayed.ranks == {"fc1": 16, "fc2": 16}
    assert RankPlan.load(path).shapes == {"fc1": [64, 96], "fc2": [96, 48]}


def test_plan_for_another_model_is_refused(layers) -> None:
    with pytest.raises(InherccError, match=r"plan records fc1 with weight shape \[3, 3\], the model's is \[64, 96\]"):
        apply_plan(layers, RankPlan.from_dict(with_row(0, shape=[3, 3])))
    with pytest.raises(InherccError, match="plan records fc1 as Conv, the model's is MatMul"):
        apply_plan(layers, RankPlan.from_dict(with_row(0, op="Conv")))


def test_replay_records_this_runs_init_not_the_plan_files(teacher, tmp_path) -> None:
    path = tmp_path / "p.json"
    data = plan_dict()
    data["method"] |= {"init": "bogus", "split": "bogus"}
    path.write_text(json.dumps(data))
    result = compress(teacher, Recipe.of(plan=path, min_params=0, verify=False))
    assert result.plan.method["init"] == "svd" and result.plan.method["split"] == "output"
    assert result.plan.method["replayed"] is True and result.plan.method["value"] == 0.5


# --- 2. plan ranks above the layer or saving nothing ------------------------------------------------------


def test_plan_rank_above_the_layer_is_refused(layers) -> None:
    with pytest.raises(InherccError, match="plan rank 1000 of fc1 \\(weight 64x96\\) exceeds its maximum rank 64"):
        apply_plan(layers, RankPlan.from_dict(with_row(0, rank=1000)))
    assert apply_plan(layers, RankPlan.from_dict(with_row(0, rank=24))).ranks["fc1"] == 24


def test_plan_rank_saving_under_ten_percent_stays_dense_like_rank(layers) -> None:
    # fc1 64×96: rank 40 keeps 40·160 = 6400 of 6144 weights (more than dense); rank 34 keeps 5440 (saves 11 %)
    plan = apply_plan(layers, RankPlan.from_dict(with_row(0, rank=40)))
    assert plan.ranks["fc1"] is None
    assert plan.reasons["fc1"] == "rank 40 would save only 0% (< 10%)"
    assert apply_plan(layers, RankPlan.from_dict(with_row(0, rank=34))).ranks["fc1"] == 34
    # the same rule as --rank; a higher min_saving is honoured too
    assert apply_plan(layers, RankPlan.from_dict(with_row(0, rank=34)), min_saving=0.5).ranks["fc1"] is None


def test_oversized_plan_rank_on_the_command_line(teacher, tmp_path) -> None:
    model, plan = tmp_path / "t.onnx", tmp_path / "p.json"
    onnx.save(teacher, str(model))
    plan.write_text(json.dumps(with_row(0, rank=1000)))
    r = invoke("compress", model, "-o", tmp_path / "s.onnx", "--plan", plan)
    assert r.exit_code == 2
    assert r.output.strip() == "error: plan rank 1000 of fc1 (weight 64x96) exceeds its maximum rank 64"
    assert not (tmp_path / "s.onnx").exists()


# --- 3. data files ---------------------------------------------------------------------------------------


def test_non_npz_data_file_says_so_without_pickle_advice(teacher, tmp_path) -> None:
    text, empty, onnx_file = tmp_path / "notnpz.npz", tmp_path / "empty.npz", tmp_path / "model.onnx"
    text.write_text("hello")
    empty.write_bytes(b"")
    onnx.save(teacher, str(onnx_file))
    for path, what in [(text, "not a zip file"), (empty, "an empty file"), (onnx_file, "not a zip file")]:
        for load in (lambda p: load_npz(p, teacher), lambda p: open_samples(p, teacher)):
            with pytest.raises(InherccError, match=f"^cannot read {path}: not a .npz archive \\({what}") as info:
                load(path)
            assert "pickle" not in str(info.value)


def test_object_arrays_are_named_without_pickle_advice(teacher, tmp_path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([np.zeros(3), np.zeros(2)], dtype=object))
    with pytest.raises(InherccError, match=r"obj.npz holds Python objects \(dtype=object\)") as info:
        load_npz(path, teacher)
    assert "pickle" not in str(info.value)


def test_single_npy_file_is_the_only_input(teacher, tmp_path) -> None:
    x = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
    np.save(tmp_path / "arr.npy", x)
    feeds = load_npz(tmp_path / "arr.npy", teacher)
    assert list(feeds) == ["x"] and np.array_equal(feeds["x"], x)
    samples = open_samples(tmp_path / "arr.npy", teacher)
    assert len(samples) == 10 and np.array_equal(samples.gather(np.arange(10))["x"], x)


def test_single_npy_file_for_a_two_input_model(tmp_path) -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    two = make_model(nodes, {"a": ["N", 4], "b": ["N", 4]}, ["y"], {})
    np.save(tmp_path / "arr.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(InherccError, match="arr.npy holds one array and is not named after an input.*inputs a, b"):
        load_npz(tmp_path / "arr.npy", two)
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))  # named after an input, as in a folder
    with pytest.raises(InherccError, match=r"a.npy lacks model input\(s\) b \(has: a\)"):
        load_npz(tmp_path / "a.npy", two)


def test_shard_errors_list_the_arrays_the_file_really_holds(teacher, tmp_path) -> None:
    x = np.zeros((4, 64), np.float32)
    npz_dir, npy_dir = tmp_path / "npz", tmp_path / "npy"
    npz_dir.mkdir()
    npy_dir.mkdir()
    np.savez(npz_dir / "a.npz", x=x)
    np.savez(npz_dir / "b.npz", z=x, w=x)
    np.save(npy_dir / "zz.npy", x)
    with pytest.raises(InherccError, match=r"b.npz lacks model input\(s\) x \(has: w, z\)"):
        open_samples(npz_dir, teacher)
    with pytest.raises(InherccError, match=r"npy lacks model input\(s\) x \(has: zz\)"):
        open_samples(npy_dir, teacher)
    with pytest.raises(InherccError, match=r"data lacks model input\(s\) x \(has: q\)"):
        open_samples({"q": x}, teacher)
    with pytest.raises(InherccError, match=r"data item 0 lacks model input\(s\) x \(has: q\)"):
        open_samples([{"q": x}], teacher)


def test_non_npz_shard_in_a_folder(teacher, tmp_path) -> None:
    (tmp_path / "a.npz").write_text("not numpy")
    with pytest.raises(InherccError, match=r"a.npz: not a .npz archive \(not a zip file"):
        open_samples(tmp_path, teacher)


# --- 4. checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory, teacher):
    """(student, teacher, data): a rank-8 student of the tiny MLP and 48 samples."""
    d = tmp_path_factory.mktemp("pair")
    student = compress(teacher, Recipe.of(rank=8, rank_multiple=8, min_params=0, verify=False)).model
    np.savez(d / "train.npz", x=np.random.default_rng(2).standard_normal((48, 64)).astype(np.float32))
    return student, teacher, d / "train.npz"


@pytest.mark.parametrize(
    "content,why",
    [
        (b"garbage\n", "not a torch checkpoint archive"),
        (b"", "an empty file"),
        ("truncated", "truncated or corrupt"),
        ("object", "it holds objects other than tensors and plain data"),
        ("foreign", "not an inhercc distillation checkpoint"),
    ],
)
def test_corrupt_checkpoint_is_one_line_error(pair, tmp_path, content: bytes | str, why: str) -> None:
    ckpt = tmp_path / CHECKPOINT_FILE
    if content == "truncated":
        torch.save({"a": torch.zeros(100)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif content == "object":
        import datetime

        torch.save({"when": datetime.date(2020, 1, 1)}, ckpt)
    elif content == "foreign":
        torch.save({"format": 1, "config": {}}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(InherccError) as info:
        distill(*pair, steps=2, checkpoint=str(tmp_path), resume=True, **FAST)
    assert str(info.value) == f"checkpoint {ckpt} cannot be read ({why}); remove it or start without `distill.resume`"
    assert "weights_only" not in str(info.value)


def test_checkpoint_is_written_atomically_and_resumes(pair, tmp_path) -> None:
    folder = tmp_path / "new" / "ckpt"  # created, parents included
    first = distill(*pair, steps=3, checkpoint=str(folder), **FAST)
    assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT_FILE]  # no temporary file left
    saved = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert saved["state"]["step"] == 3
    again = distill(*pair, steps=3, checkpoint=str(folder), resume=True, **FAST)
    assert again.report["training"]["resumed_from_step"] == 3
    assert first.report["training"]["steps"] == 3


def test_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    from inhercc.distill import checkpoint as checkpoint_module

    def interrupted(payload, f) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_checkpoint(tmp_path / CHECKPOINT_FILE, {"state": {}})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_folder_that_is_a_file_fails_before_training(pair, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    steps: list[int] = []
    with pytest.raises(InherccError, match=f"`distill.checkpoint` {blocker} is a file, not a folder"):
        distill(*pair, steps=2, checkpoint=str(blocker), callback=lambda i: steps.append(i["step"]), **FAST)
    assert steps == []


# --- 5. non-finite distillation settings -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight_decay", "feature_loss"])
def test_negative_weights_are_refused_by_the_config(name: str) -> None:
    option = f"`distill.{name}`"
    with pytest.raises(InherccError, match=f"^{option} must be ≥ 0, got -0.5$"):
        DistillConfig(**{name: -0.5}).check()


@pytest.mark.parametrize("name", ["lr", "weight_decay", "warmup", "clip", "temperature", "alpha", "feature_loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_refused_naming_the_option(name: str, value: float) -> None:
    option = f"`distill.{name}`"
    with pytest.raises(InherccError, match=f"^{option} must be a finite number, got {value}$"):
        DistillConfig(**{name: value}).check()


def test_non_finite_val_split_and_loss_weight() -> None:
    with pytest.raises(InherccError, match="`distill.val_split` must be a finite number, got nan"):
        DistillConfig(val_split=math.nan).check()
    with pytest.raises(InherccError, match="`distill.losses` y: weight must be a finite number ≥ 0, got nan"):
        DistillConfig(losses={"y": ("kd", math.nan)}).check()
    DistillConfig(losses={"y": ("kd", 0.5)}, temperature=2.0, clip=None).check()  # finite values pass


def test_finetune_nan_option_on_the_command_line(pair, tmp_path) -> None:
    student, teacher, data = pair
    s, t = tmp_path / "s.onnx", tmp_path / "t.onnx"
    onnx.save(student, str(s))
    onnx.save(teacher, str(t))
    for option in ("--weight-decay", "--temperature", "--clip", "--feature-loss"):
        out = tmp_path / "f.onnx"
        r = invoke("finetune", s, "--teacher", t, "--data", data, "-o", out, "--steps", 1, option, "nan")
        assert r.exit_code == 2, r.output
        # the option is named (by DistillConfig.check or by the CLI's own check), never blamed on --lr
        assert option in r.output and "nan" in r.output.lower() and "lower --lr" not in r.output
        assert "Traceback" not in r.output and r.output.strip().count("\n") == 0
    assert not Path(tmp_path / "f.onnx").exists()
