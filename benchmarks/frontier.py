"""The frontier (issue 17, part 5): fidelity vs latency vs file size of what users do to a model, side by side.

For each model (MiniLM-L6 sentence encoder, ImageNet MobileNetV2):

* **teachers**: fp32; ONNX Runtime's transformer optimizer (:func:`inhercc.optimize.optimize_transformer`);
  INT8 by ``onnxruntime.quantization.quantize_dynamic`` (per-channel, int8 weights: the call users make); the
  optimized teacher through the same call;
* **inhercc students** at each ratio (whitened init, sensitivity allocation from the same calibration Grams),
  each as ``plain``, ``optimized`` (``fusion.optimize``), ``int8`` (``quantization.quantize``),
  ``optimized-int8``, ``distilled-int8`` (a short quantization-aware distillation, ``--distill-steps``),
  ``optimized-distilled-int8``, ``int8-static`` / ``distilled-int8-static`` (``quantize_static``, QDQ, calibrated
  on the calibration samples: the CNN recipe; the teacher gets the same call) and ``embeddings``
  (``select.embeddings``); the variants of one ratio replay the plan of its plain (or optimized) student, so they
  differ only in the stage named;
* the **layer-dropped** MiniLM student of :mod:`benchmarks.bench_text_students` (layers 0, 2, 4; distilled with
  the same steps), fp32 and through the INT8 call.

Fidelity on held-out real data (never calibrated or trained on): mean cosine to the fp32 teacher and, for the
text model, the Spearman correlation of pairwise similarities; top-1 agreement for logits. Latency: every file
timed in ONE interleaved run (:func:`inhercc.bench.bench`, CPU provider), as a ratio of medians to the fp32
teacher; a CUDA column only when a CUDA provider is really usable. The text table states whether the issue's
target holds (a student ≤ 0.85× the latency of the optimized INT8 teacher, a smaller file, cosine ≥ 0.98).

    python -m benchmarks.frontier [--models minilm mobilenetv2] [--ratios 0.5 0.3] [--variants plain int8 …]
        [--distill-steps 150] [--repeat 20] [--threads 1] [--quick]

Writes ``frontier_<model>.{json,md,png}`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inhercc.bench import BenchOptions, bench, shape_text
from inhercc.data import Feed
from inhercc.report import bench_header, format_markdown, format_table, human_bytes, write_json, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (
    "plain",
    "optimized",
    "int8",
    "optimized-int8",
    "distilled-int8",
    "optimized-distilled-int8",
    "int8-static",
    "distilled-int8-static",
    "embeddings",
    "layer-drop",
)
STATIC = ("int8-static", "distilled-int8-static")  # ORT's quantize_static (QDQ), calibrated: the CNN recipe
TRANSFORMER_ONLY = ("optimized", "optimized-int8", "optimized-distilled-int8", "embeddings", "layer-drop")
RATIOS = (0.75, 0.5, 0.3)
TARGET_LATENCY = 0.85  # × the optimized INT8 teacher's
TARGET_COSINE = 0.98
QUICK = {"ratios": (0.5,), "variants": ("plain", "int8", "distilled-int8"), "distill_steps": 4, "repeat": 3}


@dataclass(frozen=True)
class Settings:
    """One frontier run's knobs (the command line's)."""

    ratios: tuple[float, ...] = RATIOS
    variants: tuple[str, ...] = VARIANTS
    distill_steps: int = 150
    repeat: int = 20
    threads: int = 1
    quick: bool = False
    seed: int = 0
    batch: int | None = None  # the timing shape's batch (None: the model's)


@dataclass(frozen=True)
class FrontierModel:
    """A model of the frontier: where its teacher is, its real data (``n`` samples each) and its timing shape."""

    name: str
    title: str
    teacher: Callable[[], Path]
    shapes: dict[str, list[int]]
    calibration: Callable[[int], Feed]
    heldout: Callable[[int], Feed]
    training: Callable[[Path, int], Any]  # (work folder, samples wanted) -> distillation data
    sizes: tuple[int, int] = (256, 201)  # calibration, held-out samples
    quick_sizes: tuple[int, int] = (32, 32)
    quick_shapes: dict[str, list[int]] = field(default_factory=dict)
    transformer: bool = False  # the optimizer / embeddings / layer-drop variants apply
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields besides steps / seed / threads


@dataclass
class Entry:
    """One row: a model file and what it is."""

    label: str
    path: Path
    kind: str  # teacher / student / layer-drop
    ratio: float | None = None
    variant: str = "fp32"
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""


def log(message: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The models


def _minilm_feed(split: str, n: int) -> Feed:
    from benchmarks.teachers import encode, english_sentences

    return encode(english_sentences(split, n), max_length=128)


def _minilm_training(work: Path, samples: int) -> Path:
    """Shards of the pydoc training sentences and augmented variants (:mod:`benchmarks.bench_distill`'s)."""
    from benchmarks.bench_distill import augment, write_shards
    from benchmarks.teachers import english_sentences

    train = english_sentences("train")
    copies = max(0, min(6, -(-samples // max(1, len(train))) - 1))
    folder = work / "shards"
    if not folder.exists():
        folder.mkdir(parents=True)
        write_shards(train + augment(train, copies, 0), folder, 128)
    return folder


def _mobilenet_feed(seed: int, n: int) -> Feed:
    from benchmarks.teachers import MOBILENET_INPUT, imagenet_images

    return {MOBILENET_INPUT: imagenet_images(n, seed=seed)}


def _cached(name: str) -> Callable[[], Path]:
    def path() -> Path:
        from benchmarks.teachers import cached_teacher

        return cached_teacher(name)

    return path


MODELS: dict[str, FrontierModel] = {
    "minilm": FrontierModel(
        "minilm",
        "MiniLM-L6 (all-MiniLM-L6-v2 sentence encoder)",
        _cached("minilm"),
        {"input_ids": [32, 128]},
        lambda n: _minilm_feed("train", n),
        lambda n: _minilm_feed("heldout", n),
        _minilm_training,
        quick_shapes={"input_ids": [4, 64]},
        transformer=True,
        distill={
            "lr": 3e-4,
            "batch_size": 32,
            "feature_loss": 10.0,
            "features": "norms",
            "train": "all",
            "warmup": 0.05,
            "precision": "bf16",
        },
    ),
    "mobilenetv2": FrontierModel(
        "mobilenetv2",
        "MobileNetV2 (ImageNet)",
        _cached("mobilenetv2"),
        {"images": [8, 3, 224, 224]},
        lambda n: _mobilenet_feed(0, n),
        lambda n: _mobilenet_feed(12345, n),
        lambda _work, n: _mobilenet_feed(1, min(n, 512)),
        sizes=(96, 48),
        quick_sizes=(16, 16),
        quick_shapes={"images": [2, 3, 224, 224]},
        distill={"batch_size": 16, "train": "all"},
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Building the files


def quantized_file(model: Any, dst: Path, calibration: Feed | None = None) -> Path:
    """``model`` (a path or ModelProto) through ONNX Runtime's INT8 call as users make it, written to ``dst``:
    ``quantize_dynamic`` (per-channel int8 weights) without ``calibration``, else ``quantize_static`` (QDQ, U8S8,
    per-channel, activation ranges calibrated on it: the CNN recipe). Via :func:`inhercc.quantize.quantize_model`,
    the call the students' quantization stage makes (``DefaultTensorType`` float, as ONNX Runtime's error advises
    for an optimized model whose contrib ops are untyped), from a temporary folder: ONNX Runtime writes a
    shape-inferred copy beside its input and deletes it, so two runs quantizing the shared cached teacher at once
    raced on that file."""
    from inhercc.model import as_model, save_model
    from inhercc.quantize import quantize_model

    mode, parts = ("int8", ()) if calibration is None else ("int8-static", [calibration])
    save_model(quantize_model(as_model(model), mode, calibration=parts), dst)
    return dst


def teacher_entries(ctx: dict[str, Any], work: Path) -> list[Entry]:
    """The fp32 teacher, and (for transformers) optimized; each also through the user's INT8 call. Notes in
    ``ctx`` how many attention nodes the optimizer fused in the teacher."""
    from inhercc.model import save_model
    from inhercc.optimize import attention_count, optimize_transformer

    spec, teacher = ctx["spec"], ctx["teacher_path"]

    entries = [Entry("teacher fp32", teacher, "teacher")]
    entries.append(
        Entry("teacher INT8", quantized_file(teacher, work / "teacher_int8.onnx"), "teacher", variant="int8")
    )
    if any(v in STATIC for v in ctx["settings"].variants):
        static = quantized_file(ctx["teacher"], work / "teacher_int8_static.onnx", ctx["calibration"])
        entries.append(Entry("teacher INT8 static", static, "teacher", variant="int8-static"))
    if spec.transformer:
        optimized = work / "teacher_opt.onnx"
        fused = optimize_transformer(ctx["teacher"])
        ctx["fused_attention"] = attention_count(fused)
        save_model(fused, optimized)
        int8 = quantized_file(optimized, work / "teacher_opt_int8.onnx")
        entries.append(Entry("teacher optimized", optimized, "teacher", variant="optimized"))
        entries.append(Entry("teacher optimized + INT8", int8, "teacher", variant="optimized-int8"))
    return entries


def variant_recipe(variant: str, base: dict[str, Any], plans: dict[str, Any]) -> dict[str, Any]:
    """The flat recipe keywords of one student variant: the plain / optimized plan replayed, plus its stages."""
    optimized = variant.startswith("optimized")
    flat = dict(base)
    if variant != "embeddings":
        flat.pop("ratio")
        flat["plan"] = plans["optimized" if optimized else "plain"]
    if optimized:
        flat["optimize"] = True
    if variant.endswith(("int8", "int8-static")):
        flat["quantize"] = "int8-static" if variant in STATIC else "int8"
    if variant == "embeddings":
        flat["embeddings"] = True
    return flat


def build_variant(
    variant: str, ratio: float, ctx: dict[str, Any], plans: dict[str, Any], work: Path
) -> tuple[Path, dict[str, Any]]:
    """Compress the teacher into one variant at ``ratio``; the file and the result's report."""
    from inhercc import Recipe, compress, save_model

    s: Settings = ctx["settings"]
    base = {"ratio": ratio, "init": "whitened", "threads": s.threads, "seed": s.seed, "verify": False}
    if variant == "optimized" and not ctx["fused_attention"]:
        plans["optimized"] = plans["plain"]  # the teacher has no attention fusion to keep: nothing stays dense
    if variant == "plain" or (variant == "optimized" and "optimized" not in plans):
        flat = dict(base, optimize=variant == "optimized")
    else:
        flat = variant_recipe(variant, base, plans)
    data, grams = ctx["calibration"], ctx["grams"]
    if "distilled" in variant:
        flat["distill"] = distill_config(ctx["spec"], s)
        data = ctx["training"]()
    if variant == "embeddings":
        grams = None  # the table's token counts come from the data; the Grams of the other layers are recomputed
    result = compress(ctx["teacher"], Recipe.of(**flat), data=data, grams=grams)
    if variant in ("plain", "optimized"):
        plans.setdefault(variant, result.plan)
    path = work / f"{ctx['spec'].name}_{ratio}_{variant}.onnx"
    save_model(result.model, path)
    return path, result.report


def distill_config(spec: FrontierModel, s: Settings) -> Any:
    """The short distillation every distilled variant gets (the model's recipe at ``distill_steps``)."""
    from inhercc.distill import DistillConfig

    return DistillConfig(
        steps=s.distill_steps, seed=s.seed, threads=s.threads, val_split=0.1, quiet=True, **spec.distill
    )


def layer_drop_entries(ctx: dict[str, Any], work: Path) -> list[Entry]:
    """The layer-dropped MiniLM student (:mod:`benchmarks.bench_text_students`), distilled with the same steps
    as the inhercc students; fp32 and through the user's INT8 call."""
    from benchmarks.bench_text_students import build_dropped
    from inhercc.distill import distill
    from inhercc.model import load_model, save_model

    s: Settings = ctx["settings"]
    path, _ = build_dropped(work / "dropped_init.onnx")
    note = "undistilled"
    if s.distill_steps > 0:
        tuned = distill(load_model(path), ctx["teacher"], ctx["training"](), config=distill_config(ctx["spec"], s))
        path = work / "dropped.onnx"
        save_model(tuned.model, path)
        note = f"distilled {s.distill_steps} steps"
    int8 = quantized_file(path, work / "dropped_int8.onnx")
    return [
        Entry("layer-drop (3 of 6 layers)", path, "layer-drop", variant="layer-drop", note=note),
        Entry("layer-drop + INT8", int8, "layer-drop", variant="layer-drop-int8", note=note),
    ]


def student_entries(ctx: dict[str, Any], work: Path) -> list[Entry]:
    """Every chosen variant at every ratio (plain / optimized first: the others replay their plans)."""
    s, spec = ctx["settings"], ctx["spec"]
    chosen = [v for v in VARIANTS if v in s.variants and v != "layer-drop"]
    chosen = [v for v in chosen if spec.transformer or v not in TRANSFORMER_ONLY]
    needed = sorted(
        {"plain"} | ({"optimized"} if any(v.startswith("optimized") for v in chosen) else set()), key=VARIANTS.index
    )
    entries = []
    for ratio in s.ratios:
        plans: dict[str, Any] = {}
        for variant in needed + [v for v in chosen if v not in needed]:
            if variant == "optimized" and variant not in chosen and not ctx["fused_attention"]:
                plans["optimized"] = plans["plain"]  # nothing to keep dense for a fusion: no file needed
                continue
            t0 = time.perf_counter()
            path, report = build_variant(variant, ratio, ctx, plans, work)
            log(f"{spec.name}: ratio {ratio} {variant} built in {time.perf_counter() - t0:.0f} s")
            if variant in chosen:
                note = f"distilled {s.distill_steps} steps (QAT)" if "distilled" in variant else ""
                entries.append(Entry(f"inhercc {ratio} {variant}", path, "student", ratio, variant, note=note))
    return entries


# ---------------------------------------------------------------------------------------------------------
# Scoring and timing


def fidelity(path: Path, heldout: Feed, reference: np.ndarray, name: str, spearman: bool, threads: int) -> dict:
    """Mean cosine (and top-1 agreement for logits, pairwise Spearman for embeddings) of a model's first output
    on the held-out data against the fp32 teacher's."""
    from benchmarks.bench_compress import spearman_pairwise
    from inhercc.runtime import make_session, run_session
    from inhercc.verify import output_fidelity

    out = run_session(make_session(path, threads=threads), heldout, batch_size=32)[0]
    scores = {k: float(v) for k, v in output_fidelity(reference, out, name).items()}
    if spearman:
        scores["spearman"] = spearman_pairwise(reference, out)
    return scores


def timing(entries: Sequence[Entry], shapes: dict[str, list[int]], s: Settings, provider: str) -> dict[str, Any]:
    """Every file in one interleaved run on ``provider``; the first (the fp32 teacher) is the reference."""
    options = BenchOptions(
        provider=provider,
        threads=s.threads if provider == "cpu" else None,
        shape_sets=[shapes],
        warmup=3 if provider == "cpu" else 20,
        repeat=s.repeat if provider == "cpu" else max(s.repeat, 100),
    )
    return bench([e.path for e in entries], options, labels=[e.label for e in entries])


def timing_shapes(spec: FrontierModel, s: Settings) -> dict[str, list[int]]:
    """The shapes every file is timed at: the model's (quick: its tiny ones), the batch replaced when given."""
    shapes = spec.quick_shapes if s.quick and spec.quick_shapes else spec.shapes
    return {k: [s.batch or v[0], *v[1:]] for k, v in shapes.items()}


def rows_of(entries: Sequence[Entry], cpu: dict[str, Any], cuda: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One JSON row per file: what it is, size, params, fidelity and latency ratios (from the bench documents)."""

    def latency(doc: dict[str, Any] | None, i: int) -> dict[str, Any] | None:
        if doc is None:
            return None
        r = doc["runs"][0]["results"][i]
        ratio = r["ratio_to_reference"] or {"ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0}
        return {"p50_ms": r["latency_ms"]["p50"], **{k: ratio[k] for k in ("ratio", "ci_low", "ci_high")}}

    rows = []
    for i, (e, m) in enumerate(zip(entries, cpu["models"])):
        rows.append(
            {
                "model": e.label,
                "kind": e.kind,
                "ratio": e.ratio,
                "variant": e.variant,
                "note": e.note,
                "size_bytes": m["size_bytes"],
                "params": m["params"],
                **e.scores,
                "cpu": latency(cpu, i),
                "cuda": latency(cuda, i),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# The target


def target_check(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Whether a student beats the optimized INT8 teacher: ≤ 0.85× its CPU latency, a smaller file, cosine ≥ 0.98;
    else the closest misses. None when there is no optimized INT8 teacher row."""
    ref = next((r for r in rows if r["kind"] == "teacher" and r["variant"] == "optimized-int8"), None)
    if ref is None:
        return None
    students = [r for r in rows if r["kind"] != "teacher"]
    rel = {r["model"]: r["cpu"]["ratio"] / ref["cpu"]["ratio"] for r in students}
    fast_small = [r for r in students if rel[r["model"]] <= TARGET_LATENCY and r["size_bytes"] < ref["size_bytes"]]
    met = [r for r in fast_small if r["cosine"] >= TARGET_COSINE]
    faithful = [r for r in students if r["cosine"] >= TARGET_COSINE and r["size_bytes"] < ref["size_bytes"]]
    best_fast = max(fast_small, key=lambda r: r["cosine"], default=None)
    best_faithful = min(faithful, key=lambda r: rel[r["model"]], default=None)
    return {
        "reference": ref["model"],
        "met": bool(met),
        "winners": [r["model"] for r in met],
        "latency_vs_reference": rel,
        "best_fast_small": best_fast and {"model": best_fast["model"], "cosine": best_fast["cosine"]},
        "fastest_faithful": best_faithful
        and {"model": best_faithful["model"], "latency_vs_reference": rel[best_faithful["model"]]},
    }


def target_text(t: dict[str, Any] | None) -> str:
    """The target's verdict in plain words."""
    if t is None:
        return "Target: not applicable (no optimized INT8 teacher for this model)."
    head = (
        f"Target (issue 17): a student ≤ {TARGET_LATENCY}× the CPU latency of the {t['reference']}, with a smaller "
        f"file and held-out cosine ≥ {TARGET_COSINE}. "
    )
    if t["met"]:
        return head + f"**Met** by: {', '.join(t['winners'])}."
    parts = ["**Not met.**"]
    fast = t["best_fast_small"]
    if fast:
        parts.append(
            f"Among students fast and small enough, the most faithful is {fast['model']} at cosine "
            f"{fast['cosine']:.4f}: {TARGET_COSINE - fast['cosine']:.4f} short."
        )
    else:
        parts.append("No student is both ≤ the latency bound and smaller.")
    slow = t["fastest_faithful"]
    if slow:
        parts.append(
            f"The fastest smaller student with cosine ≥ {TARGET_COSINE} is {slow['model']} at "
            f"{slow['latency_vs_reference']:.3f}× the reference's latency (needs ≤ {TARGET_LATENCY})."
        )
    else:
        parts.append(f"No smaller student reaches cosine {TARGET_COSINE}.")
    return head + " ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# One model


def prepare(spec: FrontierModel, s: Settings, work: Path) -> dict[str, Any]:
    """The teacher, its calibration Grams, the held-out data and the teacher's outputs there."""
    from inhercc import find_layers, load_model
    from inhercc.calibrate import collect_grams
    from inhercc.runtime import make_session, run_session

    n_cal, n_held = spec.quick_sizes if s.quick else spec.sizes
    teacher_path = spec.teacher()
    teacher = load_model(teacher_path)
    calibration, heldout = spec.calibration(n_cal), spec.heldout(n_held)
    layers = [la for la in find_layers(teacher) if la.compressible]
    log(f"{spec.name}: Grams of {len(layers)} layers on {n_cal} calibration samples")
    grams = collect_grams(teacher, layers, calibration)
    session = make_session(teacher_path, threads=s.threads)
    reference = run_session(session, heldout, batch_size=32)[0]
    samples = max(64, s.distill_steps * int(spec.distill.get("batch_size", 32)))
    training: dict[str, Any] = {}

    def train_data() -> Any:  # made once, on first use
        if "data" not in training:
            training["data"] = spec.training(work, samples)
        return training["data"]

    return {
        "spec": spec,
        "settings": s,
        "teacher_path": teacher_path,
        "teacher": teacher,
        "calibration": calibration,
        "heldout": heldout,
        "reference": reference,
        "output": session.get_outputs()[0].name,
        "grams": grams,
        "training": train_data,
        "sizes": (n_cal, n_held),
        "fused_attention": 0,
    }


def notes(ctx: dict[str, Any], cuda: dict[str, Any] | None) -> list[str]:
    """What the table cannot show: the teacher's fusions, a skipped CUDA column."""
    out = []
    if ctx["spec"].transformer:
        out.append(
            f"ONNX Runtime's transformer optimizer fused {ctx['fused_attention']} attention node(s) in the teacher"
            + ("" if ctx["fused_attention"] else ": the optimized students replay the plain plan (nothing kept dense)")
        )
    else:
        left = [v for v in ctx["settings"].variants if v in TRANSFORMER_ONLY]
        if left:
            out.append(f"{', '.join(left)}: transformer variants (ORT's transformer optimizer, embedding tables, "
                       "dropped layers), not run on this model")  # fmt: skip
    if cuda is None:
        out.append("CUDA: skipped - no usable CUDA execution provider on this machine")
    return out


def slow_int8_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A note when the teacher's dynamic INT8 is slower than its fp32 on this CPU (ConvInteger on CNNs)."""
    slow = [r for r in rows if r["kind"] == "teacher" and r["variant"] == "int8" and r["cpu"]["ratio"] > 1]
    return [
        f"{r['model']} (dynamic, `quantize_dynamic`) runs {r['cpu']['ratio']:.1f}x the fp32 teacher's latency "
        "on this CPU (its integer kernels, e.g. ConvInteger, are slower than the fp32 ones): static QDQ INT8 "
        "(`int8-static`) is the recipe there"
        for r in slow
    ]


def run_model(spec: FrontierModel, s: Settings, work: Path) -> dict[str, Any]:
    """Build, score and time every row of one model; the JSON-ready result."""
    from inhercc.runtime import cuda_available

    start = time.perf_counter()
    ctx = prepare(spec, s, work)
    entries = teacher_entries(ctx, work) + student_entries(ctx, work)
    if spec.transformer and "layer-drop" in s.variants:
        entries += layer_drop_entries(ctx, work)
    for e in entries:
        e.scores = fidelity(e.path, ctx["heldout"], ctx["reference"], ctx["output"], spec.transformer, s.threads)
    shapes = timing_shapes(spec, s)
    log(f"{spec.name}: timing {len(entries)} files interleaved on CPU ({s.threads} thread(s), {shape_text(shapes)})")
    cpu = timing(entries, shapes, s, "cpu")
    cuda = timing(entries, shapes, s, "cuda") if cuda_available() else None
    rows = rows_of(entries, cpu, cuda)
    return {
        "format": "inhercc-frontier",
        "version": 1,
        "model": spec.name,
        "title": spec.title,
        "settings": {
            **vars(s),
            "calibration_samples": ctx["sizes"][0],
            "heldout_samples": ctx["sizes"][1],
            "shapes": shapes,
            "distill": spec.distill,
        },
        "rows": rows,
        "target": target_check(rows),
        "bench_cpu": cpu,
        "bench_cuda": cuda,
        "notes": notes(ctx, cuda) + slow_int8_notes(rows),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.perf_counter() - start),
        "load_1min": round(os.getloadavg()[0], 1),
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the frontier table."""
    text = result["model"] == "minilm" or any("spearman" in r for r in result["rows"])
    headers = [
        "model",
        "cosine",
        "Spearman" if text else "top-1 agreement",
        "size",
        "CPU p50 ms",
        "CPU latency / teacher [95% CI]",
    ]
    cuda = result["bench_cuda"] is not None
    headers += ["CUDA latency / teacher"] if cuda else []
    teacher_size = result["rows"][0]["size_bytes"]
    out = []
    for r in result["rows"]:
        second = r.get("spearman" if text else "top1_agreement")
        c = r["cpu"]
        row = [
            r["model"] + (f" ({r['note']})" if r["note"] else ""),
            f"{r['cosine']:.4f}",
            "" if second is None else f"{second:.4f}",
            f"{human_bytes(r['size_bytes'])} ({r['size_bytes'] / teacher_size:.2f})",
            f"{c['p50_ms']:.1f}",
            "1" if r is result["rows"][0] else f"{c['ratio']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]",
        ]
        out.append(row + ([f"{r['cuda']['ratio']:.3f}"] if cuda else []))
    return headers, out


def settings_text(result: dict[str, Any]) -> str:
    """The exact settings of the run, in words."""
    s = result["settings"]
    wall = f"{result['wall_s'] / 60:.0f} min in all" if "wall_s" in result else "wall time not recorded"
    return (
        f"Settings: ratios {', '.join(map(str, s['ratios']))}; variants {', '.join(s['variants'])}; distillation "
        f"{s['distill_steps']} steps ({', '.join(f'{k} {v}' for k, v in s['distill'].items())}; QAT through ORT's "
        f"INT8 for the INT8 variants: dynamic, or static QDQ for `int8-static`); {s['calibration_samples']} "
        "calibration samples (whitened init, "
        f"sensitivity allocation), {s['heldout_samples']} held-out samples; timing {bench_header(result['bench_cpu'])}"
        f", shapes {shape_text(s['shapes'])}, {s['repeat']} interleaved rounds, {s['threads']} thread(s)"
        f"{', quick mode' if s['quick'] else ''}; seed {s['seed']}. Machine: {os.cpu_count()} cores shared with "
        f"other jobs (load {result.get('load_1min', os.getloadavg()[0]):.1f} at the end); {wall}. {result['date']}."
    )


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown page: settings, the target's verdict, the table, notes."""
    headers, rows = table(result)
    lines = [f"# Frontier: {result['title']}", "", settings_text(result), ""]
    if result["target"] is not None or result["model"] == "minilm":
        lines += [target_text(result["target"]), ""]
    lines += [format_markdown(headers, rows), ""]
    lines += [f"- note: {n}" for n in result["notes"]]
    lines += ["", "Generated by `python -m benchmarks.frontier`."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Fidelity (cosine) against CPU latency ratio, marker area by file size; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inhercc.files import write_atomic

    fig, ax = plt.subplots(figsize=(8, 5.5))
    biggest = max(r["size_bytes"] for r in result["rows"])
    colors = {"teacher": "black", "student": "tab:blue", "layer-drop": "tab:red"}
    for r in result["rows"]:
        x, y = r["cpu"]["ratio"], r["cosine"]
        ax.scatter(x, y, s=30 + 300 * r["size_bytes"] / biggest, c=colors[r["kind"]], alpha=0.6)
        ax.annotate(r["model"].replace("inhercc ", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ref = next((r for r in result["rows"] if r["model"] == (result["target"] or {}).get("reference")), None)
    if ref is not None:  # the target's corner: left of 0.85× the reference's latency, above cosine 0.98
        ax.axvline(TARGET_LATENCY * ref["cpu"]["ratio"], color="tab:green", ls="--", lw=1)
        ax.axhline(TARGET_COSINE, color="tab:green", ls="--", lw=1)
    ax.set_xlabel("CPU latency / fp32 teacher (one interleaved run)")
    ax.set_ylabel("held-out cosine to the teacher")
    ax.set_title(f"{result['title']}: marker area = file size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def write_results(result: dict[str, Any], out: Path) -> list[Path]:
    """``frontier_<model>.{json,md,png}`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"frontier_{result['model']}"
    write_json(stem.with_suffix(".json"), result)
    write_text_atomic(stem.with_suffix(".md"), markdown(result))
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    try:
        paths.append(plot(result, stem.with_suffix(".png")))
    except ImportError as e:  # matplotlib missing: the JSON and markdown still stand
        log(f"no plot: {e}")
    return paths


def settings_from(args: argparse.Namespace) -> Settings:
    """The command line's settings; ``--quick`` fills what was not given with the tiny run's."""
    quick = QUICK if args.quick else {}
    return Settings(
        ratios=tuple(args.ratios or quick.get("ratios", RATIOS)),
        variants=tuple(args.variants or quick.get("variants", VARIANTS)),
        distill_steps=args.distill_steps if args.distill_steps is not None else quick.get("distill_steps", 150),
        repeat=args.repeat or quick.get("repeat", 20),
        threads=args.threads,
        quick=args.quick,
        seed=args.seed,
        batch=args.batch,
    )


def main(argv: Sequence[str] | None = None, models: dict[str, FrontierModel] | None = None) -> int:
    models = models or MODELS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=sorted(models), default=list(models))
    ap.add_argument("--ratios", nargs="+", type=float, help=f"Student ratios (default {' '.join(map(str, RATIOS))}).")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, help="Student variants (default: all).")
    ap.add_argument("--distill-steps", type=int, help="Steps of the short distillation (default 150).")
    ap.add_argument("--repeat", type=int, help="Interleaved timing rounds (default 20).")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads, timing included.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, help="Batch of the timing shape (default: the model's, e.g. 32 x 128).")
    ap.add_argument("--quick", action="store_true", help="A tiny run (one ratio, 3 variants, few samples).")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, help="Where the model files go (default: a temp folder).")
    args = ap.parse_args(argv)
    s = settings_from(args)
    if s.distill_steps < 1 and any("distilled" in v for v in s.variants):
        ap.error("--distill-steps must be at least 1 with a distilled variant")
    with tempfile.TemporaryDirectory(prefix="inhercc-frontier-") as tmp:
        for name in args.models:
            work = (args.work or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            result = run_model(models[name], s, work)
            for p in write_results(result, args.out):
                log(f"wrote {p}")
            headers, rows = table(result)
            print(f"\n{result['title']}\n{settings_text(result)}\n{target_text(result['target'])}\n")
            print(format_table(headers, rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
