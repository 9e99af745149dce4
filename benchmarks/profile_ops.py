"""Where the time goes: ONNX Runtime's per-op kernel times, teacher against its student, on the CPU provider.

Factorization only shrinks the weight MatMuls; attention scores, softmax, masking, layer norm, GELU and the
residual adds run unchanged. This profile splits each model's kernel time by op type, so the latency ratio
of ``benchmarks.run_suite`` can be read against the bound those untouched ops set:

    bound = (½ · teacher MatMul time + teacher's other ops) / teacher total

MiniLM-L6 at batch 32 × 128 (the suite's shape), compressed to ``--ratio`` with the default calibrated
allocation on real training sentences; ``--runs`` profiled runs after one warm-up, ``--threads`` intra-op
threads (recorded).

    python -m benchmarks.profile_ops [--ratio 0.5] [--threads 2] [--runs 6]

Writes ``benchmarks/results/profile_minilm.json`` and ``profile_minilm.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from inhercc.report import format_markdown, format_table, write_json, write_text_atomic

RESULTS = Path(__file__).parent / "results"
SHAPE = (32, 128)


def profile(path: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int, work: Path) -> dict[str, Any]:
    """Kernel time per op type (ms per run) of ``runs`` profiled runs after one warm-up."""
    from inhercc.runtime import make_session

    sess = make_session(path, threads=threads, profile_prefix=work / Path(path).stem)
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feed)  # warm-up; its events are dropped below by counting the last ``runs`` runs only
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    wall_ms = (time.perf_counter() - t0) / runs * 1e3
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    keep_from = runs_seen[-runs]["ts"] if len(runs_seen) >= runs else 0
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= keep_from:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return {"wall_ms": wall_ms, "kernel_ms": sum(by_op.values()), "by_op": dict(by_op.most_common())}


def run(ratio: float, threads: int, runs: int) -> dict[str, Any]:
    from benchmarks.teachers import cached_teacher, encode, english_sentences
    from inhercc import Recipe, compress, load_model, save_model

    teacher_path = cached_teacher("minilm")
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1000, 20000, SHAPE).astype(np.int64),
        "attention_mask": np.ones(SHAPE, np.int64),
        "token_type_ids": np.zeros(SHAPE, np.int64),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibration = encode(english_sentences("train", 256), max_length=128)
        student = compress(load_model(teacher_path), Recipe.of(ratio=ratio, verify=False), data=calibration).model
        student_path = save_model(student, work / "student.onnx")
        teacher = profile(teacher_path, feeds, threads, runs, work)
        student_prof = profile(student_path, feeds, threads, runs, work)
    t_mm, s_mm = teacher["by_op"].get("MatMul", 0.0), student_prof["by_op"].get("MatMul", 0.0)
    other = teacher["kernel_ms"] - t_mm
    return {
        "teacher": "minilm (all-MiniLM-L6-v2, legacy exporter, opset 17)",
        "ratio": ratio,
        "shape": list(SHAPE),
        "threads": threads,
        "runs": runs,
        "models": {"teacher": teacher, "student": student_prof},
        "kernel_ratio": student_prof["kernel_ms"] / teacher["kernel_ms"],
        "matmul_ratio": s_mm / t_mm if t_mm else None,
        "other_share": other / teacher["kernel_ms"],
        "half_matmul_bound": (0.5 * t_mm + other) / teacher["kernel_ms"],
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    t, s = result["models"]["teacher"], result["models"]["student"]
    ops = sorted(set(t["by_op"]) | set(s["by_op"]), key=lambda op: (-t["by_op"].get(op, 0.0), op))  # ties: by name
    rows = []
    for op in ops:
        a, b = t["by_op"].get(op, 0.0), s["by_op"].get(op, 0.0)
        if max(a, b) < 0.05 * t["kernel_ms"] / 100:  # under 0.05 % of the teacher's time
            continue
        rows.append([op, f"{a:.1f}", f"{a / t['kernel_ms']:.1%}", f"{b:.1f}", f"{b / a:.2f}" if a else "-"])
    ratio = result["kernel_ratio"]
    rows.append(["all kernels", f"{t['kernel_ms']:.1f}", "100%", f"{s['kernel_ms']:.1f}", f"{ratio:.3f}"])
    rows.append(["wall (run)", f"{t['wall_ms']:.1f}", "", f"{s['wall_ms']:.1f}", f"{s['wall_ms'] / t['wall_ms']:.3f}"])
    return ["op", "teacher ms", "share", "student ms", "student/teacher"], rows


def summary(result: dict[str, Any]) -> str:
    return (
        f"MatMul time ratio {result['matmul_ratio']:.3f}; all kernels {result['kernel_ratio']:.3f}. The ops "
        f"factorization leaves alone take {result['other_share']:.1%} of the teacher's kernel time: even MatMuls "
        f"halved exactly would leave the student at {result['half_matmul_bound']:.3f} of the teacher."
    )


def markdown(result: dict[str, Any]) -> str:
    headers, rows = table(result)
    return "\n".join(
        [
            f"# Kernel time by op: MiniLM-L6 teacher vs its ratio-{result['ratio']} student",
            "",
            f"ONNX Runtime CPU provider, {result['threads']} threads, batch {result['shape'][0]} × seq "
            f"{result['shape'][1]}, mean of {result['runs']} profiled runs (ms per run); "
            f"{result['machine']['cpus']} CPUs ({result['machine']['processor']}). 'MatMul' holds the factorized "
            "weight products and the attention-times-values products; `FusedMatMul` is the scaled QKᵀ.",
            "",
            format_markdown(headers, rows),
            "",
            summary(result),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args(argv)
    result = run(args.ratio, args.threads, args.runs)
    headers, rows = table(result)
    print(format_table(headers, rows, align="lrrrr"))
    print(summary(result))
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "profile_minilm.json", result)
    write_text_atomic(RESULTS / "profile_minilm.md", markdown(result))
    print(f"wrote {RESULTS / 'profile_minilm.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
