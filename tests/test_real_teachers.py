"""Real pretrained teachers end to end: compress at ratio 0.5, run the student in ONNX Runtime, and check
that the reported parameter counts are the real ones."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from inhercc.model import float_param_count, load_model
from inhercc.pipeline import compress_file
from inhercc.recipe import Recipe
from inhercc.runtime import make_session

teachers = pytest.importorskip("benchmarks.teachers")


def _check_student(report: dict, student_path, teacher_path) -> None:
    student = onnx.load(str(student_path))
    assert report["params"]["student"] == float_param_count(student)
    assert report["params"]["teacher"] == float_param_count(load_model(teacher_path))  # Constants count too
    rows = [r for r in report["layers"] if r["rank"] is not None]
    saved = sum(r["params_before"] - r["params_after"] for r in report["layers"])
    assert report["params"]["teacher"] - report["params"]["student"] == saved
    assert rows, "nothing factorized"
    compressible = sum(r["params_before"] for r in report["layers"] if r["reason"] is None or r["rank"] is not None)
    kept = sum(r["params_after"] for r in report["layers"] if r["reason"] is None or r["rank"] is not None)
    assert kept <= 0.5 * compressible + 1e5  # biases are counted in params_* but not in the budget


def test_minilm_compress_half(tmp_path) -> None:
    pytest.importorskip("transformers")
    teacher = teachers.cached_teacher("minilm")
    out = tmp_path / "student.onnx"
    sentences = teachers.english_sentences("heldout", n=16)
    feeds = teachers.encode(sentences, max_length=64)
    res = compress_file(teacher, out, Recipe.of(ratio=0.5, init="svd"), verify_data=feeds)
    _check_student(res.report, out, teacher)
    s_out = make_session(out).run(None, feeds)[0]
    t_out = make_session(teacher).run(None, feeds)[0]
    assert s_out.shape == t_out.shape == (16, 384)
    cos = np.sum(s_out * t_out, axis=1) / np.linalg.norm(s_out, axis=1) / np.linalg.norm(t_out, axis=1)
    assert res.report["fidelity"]["sentence_embedding"]["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert cos.mean() > 0.2  # untrained plain-SVD student at half the params is degraded but not garbage


def test_mobilenet_v2_compress_half(tmp_path) -> None:
    teacher = teachers.cached_teacher("mobilenetv2")
    out = tmp_path / "student.onnx"
    images = teachers.imagenet_images(4, seed=0)
    res = compress_file(teacher, out, Recipe.of(ratio=0.5, init="svd"), verify_data={"images": images})
    _check_student(res.report, out, teacher)
    ops = [r["op"] for r in res.report["layers"] if r["rank"] is not None]
    assert "Conv" in ops
    reasons = {r["reason"] for r in res.report["layers"] if r["rank"] is None}
    assert any(r and r.startswith("no saving at any rank") for r in reasons)  # depthwise convs
    logits = make_session(out).run(None, {"images": images})[0]
    assert logits.shape == (4, 1000) and np.all(np.isfinite(logits))
    assert 0.0 <= res.report["fidelity"]["logits"]["top1_agreement"] <= 1.0
