"""The Recipe: every option declared once, checked once, round-tripped through JSON / YAML, embedded in the
report and replayable; the CLI generated from it gives the same student as the API; the stages run as passes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import inhercc.latency as latency
from inhercc.cli import cli
from inhercc.distill import DistillConfig
from inhercc.errors import InherccError
from inhercc.options import name_of, option_fields
from inhercc.pipeline import compress, compress_file
from inhercc.recipe import PlanOptions, Recipe, flat_paths
from inhercc.stages import STAGES, StageResult, open_state, run_stages
from tests.helpers import mlp
from tests.test_latency import three_layer_mlp


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def same_student(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    wa, wb = weights(a), weights(b)
    nodes = [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    return nodes and wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.onnx"
    onnx.save(three_layer_mlp(), str(path))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((40, 16, 64)).astype(np.float32))
    return path


def cli_run(*args: object) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_every_recipe_option_is_a_compress_flag_with_its_declared_default() -> None:
    """The click options are generated: each command-line field of the Recipe is one option of compress, named
    by its flat name, with the declared help; a field added to a stage's options shows up without CLI code."""
    command = cli.commands["compress"]
    params = {p.name: p for p in command.params}
    first = flat_paths()
    for path, f in option_fields(Recipe):
        if not f.metadata.get("cli", True) or name_of(f) == "quiet" or first[name_of(f)] != path:
            continue  # Python-only, the command's own -q, or the same name declared earlier (seed, threads)
        assert name_of(f) in params, path
        assert params[name_of(f)].default is None  # an option left out is not an override
        assert (f.metadata["help"] or "")[:30] in (params[name_of(f)].help or ""), path
    help_text = " ".join(CliRunner().invoke(cli, ["compress", "--help"]).output.split())
    assert "--calib-samples INTEGER" in help_text and "[default: 256]" in help_text
    assert "--verify / --no-verify" in help_text and "--min-params INTEGER" in help_text


def test_flat_names_are_unique_per_field_and_cover_distillation() -> None:
    paths = flat_paths()
    assert paths["ratio"] == "plan.ratio" and paths["calib_samples"] == "calibration.samples"
    assert paths["lr"] == "distill.lr" and paths["seed"] == "seed"  # the recipe's seed also seeds distillation
    recipe = Recipe.of(ratio=0.3, lr=1e-3, seed=5).resolved(has_data=False)
    assert recipe.plan.ratio == 0.3 and recipe.distill is not None and recipe.distill.lr == 1e-3
    assert recipe.distill.seed == 5


def test_context_defaults_are_resolved_once() -> None:
    plain = Recipe().resolved(has_data=False)
    assert (plain.plan.ratio, plain.plan.rank_multiple, plain.factors.init, plain.plan.allocation) == (
        0.5,
        8,
        "svd",
        "greedy",
    )
    with_data = Recipe().resolved(has_data=True)
    assert (with_data.factors.init, with_data.plan.allocation) == ("whitened", "sensitivity")
    for provider, multiple in (("cpu", 16), ("cuda", 64), ("tensorrt", 64)):
        aware = Recipe.of(latency_aware=True, provider=provider).resolved(has_data=False)
        assert aware.plan.rank_multiple == multiple
    given = Recipe.of(latency_aware=True, rank_multiple=4).resolved(has_data=False)
    assert given.plan.rank_multiple == 4
    assert Recipe.of(rank=16).resolved(has_data=False).plan.ratio is None  # one way of choosing ranks


@pytest.mark.parametrize("ext", [".json", ".yaml"])
def test_recipe_round_trips_through_files(tmp_path: Path, ext: str) -> None:
    recipe = Recipe.of(
        ratio=0.4,
        include=("fc.*",),
        shapes={"x": [1, 16, 64]},
        output_kinds={"y": "embedding"},
        epochs=2,
        losses={"y": ("embedding", 0.5)},
        latency_aware=True,
    ).resolved(has_data=True)
    path = tmp_path / f"r{ext}"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_errors_name_the_field_in_the_api_and_the_flag_on_the_command_line(teacher: Path, tmp_path: Path) -> None:
    cases = [
        ({"ratio": 2.0}, "`plan.ratio` must be in (0, 1], got 2.0", ["--ratio", "2"], "--ratio must be in (0, 1]"),
        ({"lr": -1.0, "epochs": 1}, "`distill.lr` must be positive", ["--lr", "-1", "--epochs", "1"], "--lr must be"),
        ({"ratio": 0.5, "rank": 8}, "choose one of `plan.ratio`", ["--ratio", "0.5", "--rank", "8"], "--plan (got"),
        ({"sequential": True}, "`calibration.sequential` needs", ["--sequential"], "--sequential needs calibration"),
    ]
    for keywords, api_text, args, cli_text in cases:
        with pytest.raises(InherccError) as e:
            compress(teacher, Recipe.of(**keywords))
        assert api_text in str(e.value) and "--" not in str(e.value)
        r = CliRunner().invoke(cli, ["compress", str(teacher), "-o", str(tmp_path / "s.onnx"), *args])
        assert r.exit_code == 2 and cli_text in r.output and "`" not in r.output, r.output
    assert not (tmp_path / "s.onnx").exists()


def test_a_recipe_file_with_an_unknown_option_is_one_line(teacher: Path, tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("plan:\n  ratoi: 0.3\n")
    r = CliRunner().invoke(cli, ["compress", str(teacher), "-o", str(tmp_path / "s.onnx"), "--recipe", str(bad)])
    assert r.exit_code == 2 and "unknown recipe option plan.ratoi" in r.output.replace("`", ""), r.output


class FixedTimer:
    """ONNX Runtime's timing replaced by fixed figures (so two runs decide alike): fc1's chain is slower."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, layer, rank, input_shape):  # noqa: ANN001
        return 1.0, (2.0 if layer.name == "fc1" else 0.5)


def test_cli_and_api_give_the_same_student_latency_aware_included(
    teacher: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same options through the CLI and through ``compress(teacher, Recipe.of(...), data)``: the same student,
    bit for bit — including --latency-aware, whose rank multiple (16 on cpu) the Recipe resolves for both."""
    monkeypatch.setattr(latency, "OrtLayerTimer", FixedTimer)
    out, report = tmp_path / "cli.onnx", tmp_path / "r.json"
    cli_run("compress", teacher, "-o", out, "--data", data, "--ratio", "0.5", "--latency-aware", "--shape",
            "x=4x16x64", "--allocation", "greedy", "--init", "svd", "--report", report)  # fmt: skip
    api = compress(
        teacher,
        Recipe.of(ratio=0.5, latency_aware=True, shapes={"x": [4, 16, 64]}, allocation="greedy", init="svd"),
        data=data,
    )
    assert same_student(onnx.load(str(out)), api.model)
    rep = json.loads(report.read_text())
    assert rep["recipe"]["plan"]["rank_multiple"] == 16 and api.report["recipe"] == rep["recipe"]
    assert rep["recipe"]["factors"]["init"] == "svd" and rep["recipe"]["verify"]["samples"] == 8
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["fc1"]["rank"] is None and rows["fc1"]["reason"].startswith("kept dense for speed")
    assert all(r["rank"] % 16 == 0 for r in rep["layers"] if r["rank"])


def test_a_report_replays_the_run_exactly(teacher: Path, data: Path, tmp_path: Path) -> None:
    """``--recipe report.json`` (or the --save-recipe file) runs the resolved recipe: the same student."""
    first, report, saved = tmp_path / "a.onnx", tmp_path / "r.json", tmp_path / "recipe.yaml"
    cli_run("compress", teacher, "-o", first, "--data", data, "--ratio", "0.3", "--init", "svd",
            "--verify-samples", "4", "--report", report, "--save-recipe", saved)  # fmt: skip
    assert Recipe.load(saved) == Recipe.load(report)
    for source in (report, saved):
        again = tmp_path / f"again-{source.suffix[1:]}.onnx"
        cli_run("compress", teacher, "-o", again, "--data", data, "--recipe", source)
        assert same_student(onnx.load(str(first)), onnx.load(str(again)))
    overridden = compress(teacher, dataclasses.replace(Recipe.load(saved), plan=PlanOptions(ratio=0.6)), data)
    assert overridden.report["params"]["student"] > json.loads(report.read_text())["params"]["student"]


def test_old_keywords_still_work_with_a_deprecation_warning(teacher: Path) -> None:
    with pytest.warns(DeprecationWarning, match="option keywords are deprecated"):
        old = compress(teacher, ratio=0.4, verify=False, distill=None)
    new = compress(teacher, Recipe.of(ratio=0.4, verify=False))
    assert same_student(old.model, new.model) and old.report["recipe"] == new.report["recipe"]
    with pytest.warns(DeprecationWarning):
        compress_file(teacher, teacher.parent / "s.onnx", rank=16, verify=False)
    assert (teacher.parent / "s.onnx").is_file()


def test_epochs_keyword_builds_the_distillation_section() -> None:
    recipe = Recipe.of(epochs=1, batch_size=8)
    assert recipe.distill == DistillConfig(epochs=1, batch_size=8)
    assert Recipe.of(distill=DistillConfig(steps=3)).distill == DistillConfig(steps=3)


def test_stages_run_as_passes_and_a_custom_list_runs_from_python() -> None:
    """Each stage returns StageResult(state, modified, notes); the runner times the modifying ones and says the
    notes; a stage can be added to (or dropped from) the list."""
    model = mlp(np.random.default_rng(0))
    seen: list[str] = []

    def count(state):  # noqa: ANN001, ANN202
        return StageResult(state, False, [f"{len(state.plan.factorized())} layers planned (custom stage)"])

    stages = [s for s in STAGES if s.__name__ != "verify"]
    stages.insert([s.__name__ for s in stages].index("plan") + 1, count)
    state = open_state(model, Recipe.of(rank=16), say=seen.append)
    state = run_stages(stages, state)
    assert "  2 layers planned (custom stage)" in seen and "fidelity" not in state.report
    assert any(line.startswith("rewrite (") for line in seen) and "  fc1: MatMul [64, 96] -> rank 16" in seen
    timed = state.report["time_s"]
    assert {"load", "find", "plan", "rewrite", "report", "total"} <= set(timed) and "count" not in timed
    assert "calibrate" not in timed and "latency" not in timed  # nothing to do: not modified, not timed
    full = compress(model, Recipe.of(rank=16))
    assert same_student(full.model, state.student) and "fidelity" in full.report


def test_a_plan_given_from_python_is_embedded_and_replays() -> None:
    """A RankPlan passed as ``plan.file`` goes into the report's recipe as the plan itself, and replays."""
    from inhercc.plan import RankPlan

    model = mlp(np.random.default_rng(0))
    first = compress(model, Recipe.of(plan=RankPlan({"fc1": 16, "fc2": 24}), verify=False))
    embedded = json.loads(json.dumps(first.report["recipe"]))
    assert embedded["plan"]["file"]["format"] == "inhercc-plan"
    again = compress(model, Recipe.from_dict(embedded))
    assert same_student(first.model, again.model) and again.plan.factorized() == {"fc1": 16, "fc2": 24}


def test_unset_distillation_keywords_do_not_switch_training_on() -> None:
    """``epochs=None`` (the old API's "no distillation") leaves the recipe without a distillation section; a value
    switches it on; over a recipe that distils, None is a value like any other."""
    assert Recipe.of(epochs=None, steps=None).distill is None
    assert Recipe.of(epochs=None, lr=1e-3).distill == DistillConfig(lr=1e-3)
    distilling = Recipe.of(epochs=2, device="cpu")
    assert Recipe.of(distilling, device=None).distill == DistillConfig(epochs=2)
    with pytest.warns(DeprecationWarning):
        old = compress(mlp(np.random.default_rng(0)), rank=16, epochs=None, steps=None, include=None, verify=False)
    assert "training" not in old.report and old.report["recipe"]["distill"] is None
