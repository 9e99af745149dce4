"""The CLI end to end (click's runner): compress, inspect, and every user error as one line with exit ≠ 0."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from inhercc.cli import cli
from tests.helpers import make_model, mlp


@pytest.fixture()
def teacher_path(tmp_path):
    path = tmp_path / "teacher.onnx"
    onnx.save(mlp(np.random.default_rng(0), (128, 256, 64)), str(path))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compress_writes_student_report_and_plan(teacher_path, tmp_path) -> None:
    out, rep, plan = tmp_path / "s.onnx", tmp_path / "r.json", tmp_path / "p.json"
    before = teacher_path.read_bytes()
    r = invoke("compress", teacher_path, "-o", out, "--ratio", "0.5", "--report", rep, "--save-plan", plan, "-v")
    assert r.exit_code == 0, r.output
    assert "params" in r.output and "FLOPs/sample" in r.output and "y cosine" in r.output
    assert "fc1" in r.output  # -v layer table
    report = json.loads(rep.read_text())
    assert report["params"]["teacher"] == 128 * 256 + 256 * 64 + 64
    student = onnx.load(str(out))
    n_student = sum(int(np.prod(t.dims)) for t in student.graph.initializer)
    assert report["params"]["student"] == n_student
    compressible = 128 * 256 + 256 * 64
    assert n_student - 64 <= 0.5 * compressible
    assert {"teacher", "student"} == set(report["flops"]) - {"symbolic_dims_counted_as_1"}
    assert report["size"]["student"] == os.path.getsize(out)
    for row in report["layers"]:
        assert set(row) >= {"name", "op", "shape", "rank", "params_before", "params_after", "reason"}
    assert set(report["fidelity"]["y"]) >= {"cosine", "rel_l2"}
    assert teacher_path.read_bytes() == before
    # replay the saved plan
    out2 = tmp_path / "s2.onnx"
    r = invoke("compress", teacher_path, "-o", out2, "--plan", plan, "--report", tmp_path / "r2.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r2.json").read_text())["params"] == report["params"]


def test_inspect_table_and_json(teacher_path) -> None:
    r = invoke("inspect", teacher_path)
    assert r.exit_code == 0, r.output
    assert "rank@90%" in r.output and "fc2" in r.output
    r = invoke("inspect", teacher_path, "--json")
    info = json.loads(r.output)
    rows = {row["name"]: row for row in info["layers"]}
    assert rows["fc1"]["params"] == 128 * 256 and rows["fc1"]["flops"] == 2 * 128 * 256
    assert 0 < rows["fc1"]["rank90"] <= rows["fc1"]["rank99"] <= 128
    assert info["totals"]["compressible"] == 2


def test_python_m_entry_point(teacher_path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "inhercc", "inspect", str(teacher_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "fc1" in p.stdout


def _old_unconvertible(tmp_path):
    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    m = make_model([node], {"x": [1]}, ["y"], {}, opset=9)
    p = tmp_path / "old.onnx"
    onnx.save(m, str(p))
    return p


def _no_layers(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 4]}, ["y"], {})
    p = tmp_path / "relu.onnx"
    onnx.save(m, str(p))
    return p


def _dynamic(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": ["N", "S", 64]}, ["y"], {"W": w})
    p = tmp_path / "dyn.onnx"
    onnx.save(m, str(p))
    return p


def _file(tmp_path, content: bytes, name: str = "bad.onnx"):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def _truncated(tmp_path, teacher_path):
    data = teacher_path.read_bytes()
    return _file(tmp_path, data[: len(data) // 3], "trunc.onnx")


CASES = {
    "missing file": (lambda tp, t: ["compress", tp / "nope.onnx", "-o", tp / "s.onnx"], "no such file"),
    "not onnx": (lambda tp, t: ["compress", _file(tp, b"just text\n"), "-o", tp / "s.onnx"], "not a readable ONNX"),
    "truncated": (lambda tp, t: ["compress", _truncated(tp, t), "-o", tp / "s.onnx"], "truncated"),
    "old opset": (lambda tp, t: ["compress", _old_unconvertible(tp), "-o", tp / "s.onnx"], "opset 9"),
    "no layers": (lambda tp, t: ["compress", _no_layers(tp), "-o", tp / "s.onnx"], "no compressible layer"),
    "ratio 0": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--ratio", "0"], "--ratio must be in (0, 1]"),
    "ratio 1.5": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--ratio", "1.5"], "--ratio must be in (0, 1]"),
    "rank 0": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--rank", "0"], "--rank must be positive"),
    "rank -4": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--rank", "-4"], "--rank must be positive"),
    "output = input": (lambda tp, t: ["compress", t, "-o", t], "would overwrite the input"),
    "output dir missing": (lambda tp, t: ["compress", t, "-o", tp / "no" / "s.onnx"], "does not exist"),
    "output dir unwritable": (lambda tp, t: ["compress", t, "-o", "/proc/self/s.onnx"], "is not writable"),
    "shape of the wrong rank": (
        lambda tp, t: ["compress", _dynamic(tp), "-o", tp / "s.onnx", "--rank", "8", "--shape", "x=2x5"],
        "--shape x has 2 dims, the input has 3",
    ),
    "bad shape": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--shape", "x=1xfoo"], "bad --shape"),
    "two modes": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--ratio", "0.5", "--rank", "8"], "choose one of"),
    "unknown option": (lambda tp, t: ["compress", t, "-o", tp / "s.onnx", "--ratoi", "0.5"], "No such option"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line(case: str, tmp_path, teacher_path) -> None:
    make_args, message = CASES[case]
    r = invoke(*make_args(tmp_path, teacher_path))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "s.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_dynamic_dims_resolved_by_shape(tmp_path) -> None:
    r = invoke("compress", _dynamic(tmp_path), "-o", tmp_path / "s.onnx", "--rank", "8", "--shape", "x=2x5x64")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.onnx").exists()
