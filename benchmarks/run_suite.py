"""The benchmark suite: real teachers compressed at 0.75 / 0.5 / 0.3, one table per teacher.

For every teacher (``benchmarks.teachers``: MiniLM-L6 sentence encoder, ImageNet MobileNetV2):

1. calibrate once on real training data (whitened SVD) and compress at each ratio with
   :func:`inhercc.compress` — its default allocation with data, the measured sensitivity — (plus, at 0.5,
   a ``latency_aware`` student for the CPU provider);
2. check fidelity against the teacher on held-out real data;
3. time teacher and students interleaved with :func:`inhercc.bench.bench` on the CPU provider (the thread
   count is recorded) and, when a CUDA GPU is really usable, on the CUDA provider — otherwise the CUDA
   part is skipped with a note in the results;
4. write ``benchmarks/results/suite_<teacher>.{json,md,png}`` and refresh the summary in README.md
   between ``<!-- suite:start -->`` and ``<!-- suite:end -->``.

``python -m benchmarks.run_suite [--teachers minilm mobilenetv2] [--threads 2] [--repeat N]``
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inhercc import Recipe, compress, find_layers, load_model, save_model
from inhercc.bench import BenchOptions, bench, shape_text
from inhercc.calibrate import collect_grams
from inhercc.data import sample_count
from inhercc.report import (
    bench_header,
    format_markdown,
    format_table,
    human_bytes,
    human_count,
    plot_bench,
    ratio_text,
    write_json,
    write_text_atomic,
)
from inhercc.runtime import cuda_available
from inhercc.verify import mean_cosine

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- suite:start -->", "<!-- suite:end -->")
RATIOS = (0.75, 0.5, 0.3)
LATENCY_AWARE_RATIO = 0.5
DEFAULT_THREADS = 2
SUITE_FORMAT = "inhercc-suite"

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class SuiteTeacher:
    """A teacher of the suite: its real calibration / held-out data and the shapes it is timed at."""

    name: str
    title: str
    shapes: dict[str, list[int]]
    calibration: Callable[[], Feed]
    heldout: Callable[[], Feed]
    cpu_repeat: int
    cuda_repeat: int


def _minilm_calibration() -> Feed:
    from benchmarks.teachers import encode, english_sentences

    return encode(english_sentences("train", 256), max_length=128)


def _minilm_heldout() -> Feed:
    from benchmarks.teachers import encode, english_sentences

    return encode(english_sentences("heldout", 128), max_length=128)


def _mobilenet_calibration() -> Feed:
    from benchmarks.teachers import MOBILENET_INPUT, imagenet_images

    return {MOBILENET_INPUT: imagenet_images(96, seed=0)}


def _mobilenet_heldout() -> Feed:
    from benchmarks.teachers import MOBILENET_INPUT, imagenet_images

    return {MOBILENET_INPUT: imagenet_images(48, seed=12345)}


TEACHERS: dict[str, SuiteTeacher] = {
    "minilm": SuiteTeacher(
        "minilm",
        "MiniLM-L6 (all-MiniLM-L6-v2 sentence encoder)",
        {"input_ids": [32, 128]},
        _minilm_calibration,
        _minilm_heldout,
        cpu_repeat=20,
        cuda_repeat=200,
    ),
    "mobilenetv2": SuiteTeacher(
        "mobilenetv2",
        "MobileNetV2 (ImageNet)",
        {"images": [8, 3, 224, 224]},
        _mobilenet_calibration,
        _mobilenet_heldout,
        cpu_repeat=40,
        cuda_repeat=300,
    ),
}


def log(message: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# One teacher


@dataclass
class Variant:
    label: str
    ratio: float | None
    latency_aware: bool
    path: Path
    report: dict[str, Any]


def build_students(
    spec: SuiteTeacher, teacher_path: Path, work: Path, threads: int, latency_aware: bool
) -> list[Variant]:
    """Calibrate once, then compress at every ratio (and latency-aware at 0.5); students go to ``work``."""
    teacher = load_model(teacher_path)
    calibration, heldout = spec.calibration(), spec.heldout()
    layers = [la for la in find_layers(teacher) if la.compressible]
    log(f"{spec.name}: calibrating {len(layers)} layers on {sample_count(calibration)} real samples")
    grams = collect_grams(teacher, layers, calibration)
    runs: list[tuple[str, float, bool]] = [(f"ratio {r}", r, False) for r in RATIOS]
    if latency_aware:
        runs.append((f"ratio {LATENCY_AWARE_RATIO} latency-aware", LATENCY_AWARE_RATIO, True))
    variants = []
    for label, ratio, aware in runs:
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if aware:
            extra = {"latency_aware": True, "provider": "cpu", "threads": threads, "rank_multiple": 16}
        result = compress(
            teacher,
            Recipe.of(ratio=ratio, init="whitened", shapes=spec.shapes, **extra),
            data=calibration,  # the default allocation with data: measured sensitivity (Grams reused)
            verify_data=heldout,
            grams=grams,
            log=lambda m, n=spec.name: log(f"{n}: {m}"),
        )
        path = work / f"{spec.name}_{ratio}{'_latency' if aware else ''}.onnx"
        save_model(result.model, path)
        log(f"{spec.name}: {label} done in {time.perf_counter() - t0:.0f} s")
        variants.append(Variant(label, ratio, aware, path, result.report))
    return variants


def run_teacher(
    spec: SuiteTeacher,
    *,
    threads: int,
    repeat: int | None,
    work: Path,
    latency_aware: bool = True,
) -> dict[str, Any]:
    """Build, compress, verify and time one teacher; returns the suite result (JSON-ready)."""
    from benchmarks.teachers import cached_teacher

    teacher_path = cached_teacher(spec.name)
    variants = build_students(spec, teacher_path, work, threads, latency_aware)
    paths = [teacher_path] + [v.path for v in variants]
    notes: list[str] = []
    log(f"{spec.name}: timing {len(paths)} models on CPU ({threads} threads, {shape_text(spec.shapes)})")
    labels = ["teacher"] + [v.label for v in variants]
    cpu = bench(
        paths,
        labels=labels,
        options=BenchOptions(
            provider="cpu", threads=threads, shape_sets=[spec.shapes], warmup=3, repeat=repeat or spec.cpu_repeat
        ),
    )
    gpu = None
    if cuda_available():
        log(f"{spec.name}: timing on CUDA")
        gpu = bench(
            paths,
            labels=labels,
            options=BenchOptions(
                provider="cuda", shape_sets=[spec.shapes], warmup=20, repeat=repeat or spec.cuda_repeat
            ),
        )
    else:
        notes.append(
            "CUDA: skipped - no usable CUDA execution provider on this machine (onnxruntime-gpu without the "
            "CUDA/cuDNN libraries, or no GPU); rerun on a GPU machine to fill the CUDA column"
        )
    return summarize(spec, teacher_path, variants, cpu, gpu, notes)


def summarize(
    spec: SuiteTeacher,
    teacher_path: Path,
    variants: Sequence[Variant],
    cpu: dict[str, Any],
    gpu: dict[str, Any] | None,
    notes: list[str],
) -> dict[str, Any]:
    """One row per model: params, FLOPs, size, fidelity, CPU (and CUDA) latency and ratio with CI."""

    def timing(result: dict[str, Any] | None, i: int) -> dict[str, Any] | None:
        if result is None:
            return None
        row = result["runs"][0]["results"][i]
        return {
            "p50_ms": row["latency_ms"]["p50"],
            "p90_ms": row["latency_ms"]["p90"],
            "ratio": row["ratio_to_reference"],
        }

    flops = cpu["runs"][0]["flops_per_sample"]
    rows = []
    for i, m in enumerate(cpu["models"]):
        v = variants[i - 1] if i else None
        rep = v.report if v else None
        kept = (
            [r["name"] for r in rep["layers"] if (r["reason"] or "").startswith("kept dense for speed")] if rep else []
        )
        rows.append(
            {
                "model": "teacher" if v is None else v.label,
                "ratio": None if v is None else v.ratio,
                "latency_aware": bool(v and v.latency_aware),
                "params": m["params"],
                "flops_per_sample": flops[m["label"]],
                "size_bytes": m["size_bytes"],
                "fidelity": rep["fidelity"] if rep else None,
                "fidelity_inputs": rep.get("fidelity_inputs") if rep else None,
                "mean_cosine": mean_cosine(rep["fidelity"]) if rep else 1.0,
                "layers_factorized": sum(1 for r in rep["layers"] if r["rank"] is not None) if rep else 0,
                "kept_dense_for_speed": kept,
                "cpu": timing(cpu, i),
                "cuda": timing(gpu, i),
            }
        )
    return {
        "format": SUITE_FORMAT,
        "version": 1,
        "teacher": spec.name,
        "title": spec.title,
        "teacher_path": str(teacher_path),
        "shapes": spec.shapes,
        "threads": cpu["environment"]["threads"],
        "rows": rows,
        "bench_cpu": cpu,
        "bench_cuda": gpu,
        "notes": notes + cpu.get("notes", []) + (gpu or {}).get("notes", []),
        "date": time.strftime("%Y-%m-%d"),
    }


# ---------------------------------------------------------------------------------------------------------
# Tables


HEADERS = [
    "model",
    "params",
    "FLOPs/sample",
    "size",
    "fidelity (cos / top-1)",
    "CPU p50 ms",
    "CPU ratio [95% CI]",
    "CUDA ratio",
]


def table_rows(suite: dict[str, Any]) -> list[list[str]]:
    teacher = suite["rows"][0]
    out = []
    for r in suite["rows"]:

        def rel(key: str, r: dict[str, Any] = r) -> str:
            return "" if r is teacher else f" ({r[key] / teacher[key]:.2f})"

        model = r["model"]
        if r["kept_dense_for_speed"]:
            model += f" [{len(r['kept_dense_for_speed'])} dense for speed]"
        out.append(
            [
                model,
                human_count(r["params"]) + rel("params"),
                human_count(r["flops_per_sample"]) + rel("flops_per_sample"),
                human_bytes(r["size_bytes"]) + rel("size_bytes"),
                fidelity_text(r),
                f"{r['cpu']['p50_ms']:.1f}",
                ratio_text(r["cpu"]["ratio"]),
                ratio_text(r["cuda"]["ratio"]) if r["cuda"] else "skipped (no GPU)",
            ]
        )
    return out


def fidelity_text(row: dict[str, Any]) -> str:
    """Mean cosine to the teacher, and the top-1 agreement where the output is logits."""
    text = f"{row['mean_cosine']:.4f}"
    top1 = [v["top1_agreement"] for v in (row["fidelity"] or {}).values() if "top1_agreement" in v]
    return text + (f" / top-1 {np.mean(top1):.3f}" if top1 else "")


def environment_line(suite: dict[str, Any]) -> str:
    """How the suite was timed (each provider's :func:`inhercc.report.bench_header`), at which shapes."""
    timed = [f"CPU: {bench_header(suite['bench_cpu'])}"]
    if suite.get("bench_cuda"):
        timed.append(f"CUDA: {bench_header(suite['bench_cuda'])}")
    return (
        f"{'. '.join(timed)}. Shapes {shape_text(suite['shapes'])}. "
        "Fidelity: mean cosine (and top-1 agreement for logits) to the teacher on held-out real data."
    )


def markdown(suite: dict[str, Any]) -> str:
    lines = [
        f"# {suite['title']}",
        "",
        environment_line(suite),
        "",
        format_markdown(HEADERS, table_rows(suite)),
        "",
    ]
    for r in suite["rows"]:
        if r["kept_dense_for_speed"]:
            lines.append(f"- {r['model']}: kept dense for speed: {', '.join(r['kept_dense_for_speed'])}")
    lines += [f"- note: {n}" for n in suite["notes"]]
    lines += ["", f"Generated by `python -m benchmarks.run_suite` on {suite['date']}."]
    return "\n".join(lines) + "\n"


def readme_summary(suites: Sequence[dict[str, Any]]) -> str:
    """The README block: one short table per teacher, linking the full results."""
    out = []
    for s in suites:
        out += [
            f"**{s['title']}** — {shape_text(s['shapes'])}, CPU {s['threads']} threads "
            f"([full table](benchmarks/results/suite_{s['teacher']}.md))",
            "",
        ]
        rows = [[r[0], r[1], r[2], r[4], r[6], r[7]] for r in table_rows(s)]
        out += [
            format_markdown(["model", "params", "FLOPs/sample", "fidelity", "CPU ratio [95% CI]", "CUDA"], rows),
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def refresh_readme(suites: Sequence[dict[str, Any]], path: Path = README) -> bool:
    """Replace the text between the suite markers of README.md; False when the markers are missing."""
    if not path.exists():
        return False
    text = path.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    block = f"{start}\n{readme_summary(suites)}{end}"
    write_text_atomic(path, pattern.sub(lambda _m: block, text, count=1))
    return True


def write_results(suite: dict[str, Any], out_dir: Path = RESULTS) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"suite_{suite['teacher']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    write_json(paths[0], suite)
    write_text_atomic(paths[1], markdown(suite))
    try:
        paths.append(plot_bench(suite["bench_cpu"], stem.with_suffix(".png")))
    except Exception as e:  # matplotlib missing: the JSON and markdown still stand
        log(f"no plot: {e}")
    return paths


def load_results(names: Sequence[str], out_dir: Path = RESULTS) -> list[dict[str, Any]]:
    import json

    out = []
    for name in names:
        p = out_dir / f"suite_{name}.json"
        if p.exists():
            out.append(json.loads(p.read_text()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", choices=sorted(TEACHERS), default=list(TEACHERS))
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="CPU intra-op threads (recorded)")
    parser.add_argument("--repeat", type=int, help="timed rounds per provider (default: per teacher)")
    parser.add_argument("--no-latency-aware", action="store_true", help="skip the latency-aware student")
    parser.add_argument("--no-readme", action="store_true", help="do not refresh README.md")
    parser.add_argument("--readme-only", action="store_true", help="refresh README.md from the saved results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="where students are written (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.readme_only:
        args.teachers = []
    with tempfile.TemporaryDirectory(prefix="inhercc-suite-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.teachers:
            suite = run_teacher(
                TEACHERS[name],
                threads=args.threads,
                repeat=args.repeat,
                work=work,
                latency_aware=not args.no_latency_aware,
            )
            for p in write_results(suite, args.out):
                log(f"wrote {p}")
            print(f"\n{suite['title']}\n{environment_line(suite)}\n")
            print(format_table(HEADERS, table_rows(suite), align="lrrrrrll"))
            for n in suite["notes"]:
                print(f"note: {n}")
    if not args.no_readme:
        suites = load_results(list(TEACHERS), args.out)
        if refresh_readme(suites):
            log(f"refreshed the summary in {README}")
        else:
            log(f"README.md has no {MARKERS[0]} … {MARKERS[1]} block; summary not written")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
