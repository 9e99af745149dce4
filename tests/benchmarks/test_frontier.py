"""benchmarks.frontier with ``--quick``: on the digits classifier (always) and on the real MiniLM-L6 (when its
package is installed). The rows, their fidelity against ONNX Runtime, and latency ratios that all come from one
interleaved run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from benchmarks import frontier as F
from inhercc.runtime import make_session, run_session
from tests.test_distill import digits_teacher
from tests.test_optimize import bert  # noqa: F401  (the 2-layer BERT fixture)

sklearn_datasets = pytest.importorskip("sklearn.datasets")
pytest.importorskip("onnxruntime")


def _digits_model(tmp_path: Path) -> F.FrontierModel:
    """The digits MLP (x[64] → 10 logits) as a frontier model: rows 0-999 calibrate / train, 1400-1599 held out."""
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    path = tmp_path / "digits.onnx"
    onnx.save(digits_teacher(x, y.astype(np.int64)), str(path))
    return F.FrontierModel(
        "digits",
        "digits MLP",
        lambda: path,
        {"x": [64, 64]},
        lambda n: {"x": x[:n]},
        lambda n: {"x": x[1400 : 1400 + n]},
        lambda _work, n: {"x": x[:1000]},
        quick_sizes=(256, 200),
        distill={"batch_size": 32, "lr": 1e-3},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick`` run on the digits model, counting the bench calls."""
    tmp = tmp_path_factory.mktemp("frontier")
    calls: list[tuple[list[str], str]] = []

    def counted(models: list[Path], options: Any, labels: list[str]) -> dict[str, Any]:
        calls.append((list(labels), options.provider))
        return real(models, options, labels=labels)

    real = F.bench
    F.bench = counted  # type: ignore[assignment]
    try:
        code = F.main(
            ["--quick", "--out", str(tmp / "out"), "--work", str(tmp / "work")], {"digits": _digits_model(tmp)}
        )
    finally:
        F.bench = real  # type: ignore[assignment]
    assert code == 0
    result = json.loads((tmp / "out" / "frontier_digits.json").read_text())
    x, _ = sklearn_datasets.load_digits(return_X_y=True)
    return {"result": result, "calls": calls, "tmp": tmp, "heldout": (x[1400:1600] / 16.0).astype(np.float32)}


def test_quick_rows_are_the_teachers_then_each_variant(tiny: dict[str, Any]) -> None:
    rows = tiny["result"]["rows"]
    assert [r["model"] for r in rows] == [
        "teacher fp32",
        "teacher INT8",
        "inhercc 0.5 plain",
        "inhercc 0.5 int8",
        "inhercc 0.5 distilled-int8",
    ]
    assert [r["variant"] for r in rows] == ["fp32", "int8", "plain", "int8", "distilled-int8"]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6) and rows[0]["top1_agreement"] == 1.0
    assert rows[1]["size_bytes"] < 0.5 * rows[0]["size_bytes"]  # int8 weights
    assert rows[3]["size_bytes"] < rows[2]["size_bytes"] < rows[0]["size_bytes"]
    assert all(0.5 < r["cosine"] <= 1.0 + 1e-6 and r["top1_agreement"] > 0.5 for r in rows)
    assert tiny["result"]["target"] is None  # no optimized INT8 teacher: the target does not apply
    for suffix in ("md", "png"):
        assert (tiny["tmp"] / "out" / f"frontier_digits.{suffix}").stat().st_size > 0


def test_fidelity_is_the_files_own_output_in_onnx_runtime(tiny: dict[str, Any]) -> None:
    """The held-out cosine of the student INT8 file, recomputed here from its ONNX Runtime outputs (in batches
    of 32, as scored: dynamic INT8 scales its activations per batch)."""
    rows, work = tiny["result"]["rows"], tiny["tmp"] / "work" / "digits"
    teacher = run_session(make_session(tiny["tmp"] / "digits.onnx"), {"x": tiny["heldout"]}, 32)[0]
    student = run_session(make_session(work / "digits_0.5_int8.onnx"), {"x": tiny["heldout"]}, 32)[0]
    cos = np.sum(teacher * student, 1) / (np.linalg.norm(teacher, axis=1) * np.linalg.norm(student, axis=1))
    assert rows[3]["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert rows[3]["top1_agreement"] == pytest.approx(float(np.mean(teacher.argmax(1) == student.argmax(1))))


def test_latency_ratios_come_from_one_interleaved_run(tiny: dict[str, Any]) -> None:
    result, rows = tiny["result"], tiny["result"]["rows"]
    assert tiny["calls"] == [([r["model"] for r in rows], "cpu")]  # every file in one CPU run (no GPU here)
    timed = result["bench_cpu"]["runs"][0]["results"]
    assert [t["model"] for t in timed] == [r["model"] for r in rows]
    assert rows[0]["cpu"]["ratio"] == 1.0 and timed[0]["ratio_to_reference"] is None
    for r, t in zip(rows[1:], timed[1:]):
        assert r["cpu"]["ratio"] == t["ratio_to_reference"]["ratio"]
        assert r["cpu"]["p50_ms"] == t["latency_ms"]["p50"]
        assert len(t["samples_ms"]) == len(timed[0]["samples_ms"]) == 3  # the quick repeat, paired rounds
    assert result["bench_cpu"]["environment"]["threads"] == 1


def test_static_int8_rows_are_calibrated_qdq_models_of_teacher_and_student(tmp_path: Path) -> None:
    """``int8-static`` / ``distilled-int8-static``: the teacher through ORT's ``quantize_static`` and the students
    through the ``int8-static`` stage, all QDQ models (no dynamic activation quantization), each scored on its own
    ONNX Runtime output; distillation moves the distilled file away from the undistilled one."""
    from inhercc.quantize import quantized_node_counts

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--variants", "plain", "int8-static", "distilled-int8-static", "--out", str(out)]
    assert F.main(argv + ["--work", str(work)], {"digits": _digits_model(tmp_path)}) == 0
    rows = json.loads((out / "frontier_digits.json").read_text())["rows"]
    labels = ["teacher fp32", "teacher INT8", "teacher INT8 static", "inhercc 0.5 plain", "inhercc 0.5 int8-static"]
    assert [r["model"] for r in rows] == labels + ["inhercc 0.5 distilled-int8-static"]
    x, _ = sklearn_datasets.load_digits(return_X_y=True)
    held = {"x": (x[1400:1600] / 16.0).astype(np.float32)}
    teacher = run_session(make_session(tmp_path / "digits.onnx"), held, 32)[0]
    files = [work / "digits" / "teacher_int8_static.onnx", work / "digits" / "digits_0.5_int8-static.onnx"]
    files.append(work / "digits" / "digits_0.5_distilled-int8-static.onnx")
    outputs = []
    for path, row in zip(files, rows[2:3] + rows[4:]):
        counts = quantized_node_counts(onnx.load(str(path)))
        assert (
            counts.get("QuantizeLinear") and counts.get("DequantizeLinear") and not counts.get("DynamicQuantizeLinear")
        )
        y = run_session(make_session(path), held, 32)[0]
        cos = np.sum(teacher * y, 1) / (np.linalg.norm(teacher, axis=1) * np.linalg.norm(y, axis=1))
        assert row["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5) and row["cosine"] > 0.9
        outputs.append(y)
    assert np.abs(outputs[1] - outputs[2]).max() > 1e-3
    assert rows[2]["size_bytes"] < 0.5 * rows[0]["size_bytes"]


def test_transformer_variants_asked_of_a_cnn_are_named_not_dropped_silently() -> None:
    spec = F.FrontierModel("cnn", "cnn", Path, {}, dict, dict, dict)
    ctx = {"spec": spec, "settings": F.Settings(variants=("plain", "optimized", "embeddings", "int8-static"))}
    assert F.notes(ctx, {"runs": []}) == [
        "optimized, embeddings: transformer variants (ORT's transformer optimizer, embedding tables, dropped layers),"
        " not run on this model"
    ]
    assert F.notes({**ctx, "settings": F.Settings(variants=("plain",))}, None) == [
        "CUDA: skipped - no usable CUDA execution provider on this machine"
    ]


def test_slow_dynamic_int8_teacher_gets_a_note() -> None:
    def row(variant: str, ratio: float) -> dict[str, Any]:
        return {"model": f"teacher {variant}", "kind": "teacher", "variant": variant, "cpu": {"ratio": ratio}}

    assert F.slow_int8_notes([row("fp32", 1.0), row("int8", 0.6)]) == []
    (note,) = F.slow_int8_notes([row("fp32", 1.0), row("int8", 11.5), row("int8-static", 0.7)])
    assert note.startswith("teacher int8 (dynamic, `quantize_dynamic`) runs 11.5x") and "int8-static" in note


def test_target_verdict_names_the_winner_or_the_shortfall() -> None:
    def row(model: str, kind: str, variant: str, cosine: float, size: int, ratio: float) -> dict[str, Any]:
        return {"model": model, "kind": kind, "variant": variant, "cosine": cosine, "size_bytes": size,
                "cpu": {"ratio": ratio}}  # fmt: skip

    ref = row("teacher optimized + INT8", "teacher", "optimized-int8", 0.99, 100, 0.5)
    close = row("s fast", "student", "int8", 0.95, 80, 0.4)  # 0.8× the reference, cosine 0.03 short
    slow = row("s good", "student", "int8", 0.985, 90, 0.45)  # 0.9×: too slow
    t = F.target_check([row("teacher fp32", "teacher", "fp32", 1, 400, 1), ref, close, slow])
    assert t is not None and not t["met"]
    assert t["best_fast_small"] == {"model": "s fast", "cosine": 0.95}
    assert t["fastest_faithful"]["latency_vs_reference"] == pytest.approx(0.9)
    text = F.target_text(t)
    assert "**Not met.**" in text and "0.0300 short" in text and "0.900×" in text
    won = F.target_check([ref, row("s win", "student", "int8", 0.981, 99, 0.42)])
    assert won is not None and won["met"] and won["winners"] == ["s win"]
    assert "**Met** by: s win" in F.target_text(won)


def test_optimized_teacher_and_student_quantize(bert: Path, tmp_path: Path) -> None:  # noqa: F811
    """ONNX Runtime's quantizer meets the optimizer's contrib ops (fused attention, skip layer norms): the
    optimized teacher goes through the user's INT8 call and an optimized student through ``quantization.quantize``,
    both close to their fp32 models in ONNX Runtime."""
    from inhercc import Recipe, compress, load_model
    from inhercc.quantize import quantized_node_counts

    spec = F.FrontierModel("bert", "bert", lambda: bert, {}, dict, dict, dict, transformer=True)
    ctx: dict[str, Any] = {"spec": spec, "teacher_path": bert, "teacher": load_model(bert), "fused_attention": 0}
    ctx["settings"] = F.Settings(variants=("plain", "int8"))
    entries = F.teacher_entries(ctx, tmp_path)
    labels = ["teacher fp32", "teacher INT8", "teacher optimized", "teacher optimized + INT8"]
    assert [e.label for e in entries] == labels and ctx["fused_attention"] == 2
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 500, (4, 16)), "attention_mask": np.ones((4, 16), np.int64)}
    feed["token_type_ids"] = np.zeros((4, 16), np.int64)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    outs = [run_session(make_session(e.path), feed)[0] for e in entries]
    assert cosine(outs[0], outs[2]) > 0.9999  # the optimizer keeps the function
    assert cosine(outs[2], outs[3]) > 0.99 and cosine(outs[0], outs[1]) > 0.99
    assert quantized_node_counts(onnx.load(str(entries[3].path)))  # int8 nodes in the optimized INT8 teacher
    recipe = Recipe.of(rank=8, init="svd", min_params=0, optimize=True, quantize="int8", verify=False)
    student = compress(load_model(bert), recipe)
    assert student.report["optimize"]["student"].get("Attention") == 2
    assert student.report["quantization"]["nodes"]
