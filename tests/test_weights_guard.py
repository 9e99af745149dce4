"""Bad weights and bad output names: NaN / Inf in a weight that would be factorized is refused with one line
(or left dense with ``allow_nonfinite``); output names past NAME_MAX / PATH_MAX are refused before any work,
and the longest legal name is written (the temp names are short)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from inhercc.errors import InherccError
from inhercc.model import save_model
from inhercc.pipeline import compress, compress_file
from inhercc.recipe import Recipe
from tests.helpers import mlp, rel_err, run
from tests.test_cli import invoke


def poisoned(value: float, count: int, weight: str = "fc1.weight") -> onnx.ModelProto:
    """The test FFN with ``count`` entries of ``weight`` set to ``value`` (NaN or ±Inf)."""
    model = mlp(np.random.default_rng(0), (64, 96, 48))
    for i, t in enumerate(model.graph.initializer):
        if t.name == weight:
            w = numpy_helper.to_array(t).copy()
            w.flat[: count * 7 : 7] = value
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, weight))
    return model


@pytest.mark.parametrize(
    "value,count,words", [(np.nan, 3, "NaN (3 values)"), (np.inf, 1, "Inf (1 value)"), (-np.inf, 2, "Inf (2 values)")]
)
def test_nonfinite_weight_is_refused_naming_the_tensor(value: float, count: int, words: str) -> None:
    with pytest.raises(InherccError) as e:
        compress(poisoned(value, count), Recipe.of(rank=8))
    message = str(e.value)
    assert message == (
        f"weight 'fc1.weight' of layer 'fc1' contains {words}; set `select.allow_nonfinite` to compress anyway"
    )


def test_allow_nonfinite_leaves_the_layer_dense() -> None:
    model = poisoned(np.nan, 3)
    result = compress(model, Recipe.of(rank=8, allow_nonfinite=True, verify=False))
    rows = {row["name"]: row for row in result.report["layers"]}
    assert rows["fc1"]["rank"] is None and rows["fc1"]["reason"] == "weight contains NaN (3 values)"
    assert rows["fc2"]["rank"] == 8
    student_weights = {t.name for t in result.model.graph.initializer}
    assert "fc1.weight" in student_weights and "fc2.weight" not in student_weights


def test_nonfinite_weight_of_an_excluded_layer_is_not_checked() -> None:
    model = poisoned(np.nan, 3)
    result = compress(model, Recipe.of(rank=8, exclude="fc1", verify=False))
    assert [row["rank"] for row in result.report["layers"]] == [None, 8]


def test_cli_nonfinite_weight_one_line_then_flag(tmp_path: Path) -> None:
    onnx.save(poisoned(np.inf, 2, "fc2.weight"), str(tmp_path / "t.onnx"))
    r = invoke("compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "8")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0] == (
        "error: weight 'fc2.weight' of layer 'fc2' contains Inf (2 values); set --allow-nonfinite to compress anyway"
    )
    assert not (tmp_path / "s.onnx").exists()
    r = invoke("compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--rank", "8", "--allow-nonfinite")
    assert r.exit_code == 0, r.output
    student = onnx.load(str(tmp_path / "s.onnx"))
    assert "fc2.weight" in {t.name for t in student.graph.initializer}


def _name_max(folder: Path) -> int:
    return os.pathconf(folder, "PC_NAME_MAX")


def test_longest_legal_output_name_is_written(tmp_path: Path) -> None:
    teacher = mlp(np.random.default_rng(0), (64, 96, 48))
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    name = "s" * (_name_max(tmp_path) - len(".onnx")) + ".onnx"  # exactly NAME_MAX bytes
    report = "r" * (_name_max(tmp_path) - len(".json")) + ".json"
    compress_file(tmp_path / "t.onnx", tmp_path / name, Recipe.of(rank=8), report_path=tmp_path / report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.onnx", name, report])  # no temp left
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    (ys,) = run(onnx.load(str(tmp_path / name)), {"x": x})
    (yt,) = run(teacher, {"x": x})
    assert rel_err(ys, yt) < 1.0


def test_save_model_short_temp_name(tmp_path: Path) -> None:
    name = "m" * (_name_max(tmp_path) - 5) + ".onnx"
    save_model(mlp(np.random.default_rng(0)), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("what", ["name", "path"])
def test_output_name_too_long_is_refused_before_any_work(tmp_path: Path, what: str) -> None:
    onnx.save(mlp(np.random.default_rng(0)), str(tmp_path / "t.onnx"))
    if what == "name":
        out = tmp_path / ("s" * 300 + ".onnx")
        expected = f"output name is too long ({len(out.name)} bytes; the file system allows {_name_max(tmp_path)})"
    else:
        out = tmp_path.joinpath(*["d" * 200] * 25) / "s.onnx"
        expected = "output path is too long ("
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InherccError) as e:
        compress_file(tmp_path / "t.onnx", out, Recipe.of(rank=8), data={"x": np.zeros((4, 64), np.float32)})
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = invoke("compress", tmp_path / "t.onnx", "-o", out, "--rank", "8")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and expected in lines[0], r.output


def test_long_report_name_is_refused_too(tmp_path: Path) -> None:
    onnx.save(mlp(np.random.default_rng(0)), str(tmp_path / "t.onnx"))
    r = invoke("compress", tmp_path / "t.onnx", "-o", tmp_path / "s.onnx", "--report", tmp_path / ("r" * 260))
    assert r.exit_code == 2 and "output name is too long (260 bytes" in r.output, r.output
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize("which", ["model", "data"])
def test_input_name_too_long_is_one_line(tmp_path: Path, which: str) -> None:
    onnx.save(mlp(np.random.default_rng(0)), str(tmp_path / "t.onnx"))
    long = tmp_path / ("a" * 300 + (".onnx" if which == "model" else ".npz"))
    args = [long, "-o", tmp_path / "s.onnx"] if which == "model" else [tmp_path / "t.onnx", "-o", tmp_path / "s.onnx"]
    r = invoke("compress", *args, *(["--data", long] if which == "data" else []))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
