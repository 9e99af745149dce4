"""Inherited vs layer-dropped students of MiniLM-L6 (issue 15, part 3, text): at the same parameter count,
does InherNet's low-rank student beat the student a sentence-transformers user would otherwise build?

* **InherNet**: ``inhercc.compress(teacher, Recipe.of(ratio=0.5, <distillation>), data=shards)`` — whitened,
  sequential SVD of every MatMul at half its parameters, then distilled from the teacher.
* **Layer-dropped**: the sentence-transformers recipe (``model_distillation_layer_reduction``) — a 3-layer
  student keeping the teacher's layers 0, 2 and 4 (embeddings and mean pooling kept), exported to ONNX like
  the teacher (:mod:`benchmarks.teachers`) and distilled by ``inhercc.distill.distill`` with ``train="all"``.

Both see the same training shards (the pydoc ``train`` sentences and their augmented variants, as
:mod:`benchmarks.bench_distill` makes them), the same steps, optimizer and losses (embedding loss + feature
loss on the normalization outputs). The feature loss pairs tensors by name: the layer-dropped student's block
``i`` stands in for the teacher's blocks ``2i`` and ``2i+1``, so its activations are renamed after teacher
block ``2i+1`` (TinyBERT's uniform mapping) and its hidden states are matched to the end of the span it
replaces. Scored on the 201 held-out sentences (mean cosine, Spearman of pairwise similarities) and timed
against the teacher on ONNX Runtime CPU (interleaved, ``input_ids`` 32×128, 2 threads).

    python -m benchmarks.bench_text_students [--steps 600] [--out benchmarks/results]

Writes ``text_students.json`` and ``text_students.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from onnx import ModelProto

RESULTS = Path(__file__).parent / "results"
KEEP_LAYERS = (0, 2, 4)
LATENCY_SHAPE = {"input_ids": [32, 128]}
OUT = "sentence_embedding"  # the teachers' output (benchmarks.teachers.MINILM_OUTPUT)
_LAYER = re.compile(r"(?<=layer\.)(\d+)(?=[./])")


# ---------------------------------------------------------------------------------------------------------
# The layer-dropped student


def drop_layers(encoder: torch.nn.Module, keep: tuple[int, ...] = KEEP_LAYERS) -> torch.nn.Module:
    """A copy of the Hugging Face ``BertModel`` `encoder` with only the transformer layers `keep` (in order);
    embeddings kept. The sentence-transformers layer-reduction recipe."""
    layers = encoder.encoder.layer
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise ValueError(f"layers to keep must be in 0..{len(layers) - 1}, got {keep}")
    student = copy.deepcopy(encoder)
    student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(student.encoder.layer):  # the attention's cache index follows the position
        attention = getattr(layer.attention, "self", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i
    return student.eval()


def rename_blocks(model: ModelProto, mapping: dict[int, int]) -> None:
    """Rename the activations (node outputs and names, not weights) of transformer block ``i`` after block
    ``mapping[i]`` (``…/layer.1/…`` → ``…/layer.3/…``), in place: the feature loss pairs tensors by name."""
    weights = {t.name for t in model.graph.initializer}

    def new(name: str) -> str:
        if name in weights:
            return name
        return _LAYER.sub(lambda m: str(mapping.get(int(m.group(1)), int(m.group(1)))), name)

    for node in model.graph.node:
        node.name = new(node.name)
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for info in model.graph.value_info:
        info.name = new(info.name)


def build_dropped(path: Path, keep: tuple[int, ...] = KEEP_LAYERS) -> tuple[Path, torch.nn.Module]:
    """Export the layer-dropped sentence encoder to `path` as the MiniLM teacher is exported (legacy exporter,
    opset 17, dynamic batch and sequence), its block ``i`` named after teacher block ``2i+1``; returns the path
    and the torch module."""
    import onnx

    from benchmarks.teachers import (
        LEGACY_OPSET,
        MINILM_DIM,
        MINILM_INPUTS,
        MINILM_OUTPUT,
        _export,
        _set_output_dims,
        encode,
        english_sentences,
        load_minilm_torch,
        sentence_encoder,
    )

    teacher = load_minilm_torch()
    span = len(teacher.encoder.layer) // len(keep)
    module = sentence_encoder(drop_layers(teacher, keep))
    feed = encode(english_sentences("train", 2), max_length=16, pad_to=16)
    args = tuple(torch.from_numpy(feed[name]) for name in MINILM_INPUTS)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in MINILM_INPUTS}
    dynamic[MINILM_OUTPUT] = {0: "batch"}
    _export(module, args, path, MINILM_INPUTS, [MINILM_OUTPUT], dynamic, "legacy", LEGACY_OPSET)
    _set_output_dims(path, MINILM_OUTPUT, {0: "batch", 1: MINILM_DIM})
    model = onnx.load(str(path))
    rename_blocks(model, {i: span * i + span - 1 for i in range(len(keep))})
    onnx.save(model, str(path))
    return path, module


# ---------------------------------------------------------------------------------------------------------
# The run


def distill_config(args: argparse.Namespace) -> Any:
    """The one distillation recipe both students get (:mod:`benchmarks.bench_distill`'s, at ``--steps``)."""
    from inhercc.distill import DistillConfig

    return DistillConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        feature_loss=args.feature_loss,
        features="norms",
        train="all",
        val_split=0.1,
        warmup=0.05,
        seed=args.seed,
        threads=args.threads,
        precision=args.precision,
        quiet=args.quiet,
    )


def run_inhernet(teacher: ModelProto, data: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``compress`` at ``--ratio`` with the distillation recipe, in one call; the student saved to `out`."""
    from inhercc.model import save_model
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe

    recipe = Recipe.of(
        ratio=args.ratio,
        sequential=True,
        calib_samples=args.calib_samples,
        seed=args.seed,
        threads=args.threads,
        distill=distill_config(args),
    )
    t0 = time.perf_counter()
    result = compress(teacher, recipe, data=str(data))
    wall = time.perf_counter() - t0
    save_model(result.model, out)
    times = result.report["time_s"]
    return {
        "student": f"InherNet (compress ratio {args.ratio}, whitened sequential SVD)",
        "params": result.report["params"]["student"],
        "layers_factorized": sum(1 for r in result.report["layers"] if r["rank"] is not None),
        "validation_before": result.report["fidelity_before"],
        "validation_after": result.report["fidelity"],
        "training": result.report["training"],
        "time_s": {
            "calibration": round(sum(times.get(k, 0.0) for k in ("calibrate", "sensitivity", "sequential")), 1),
            "distillation": round(times.get("distil", 0.0), 1),
            "total": round(wall, 1),
        },
    }


def run_dropped(teacher: ModelProto, data: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Build and export the layer-dropped student, then ``distill`` it with the same recipe; saved to `out`."""
    from inhercc.distill import distill
    from inhercc.model import float_param_count, load_model, save_model

    t0 = time.perf_counter()
    path, _ = build_dropped(out.with_name("dropped_init.onnx"))
    student = load_model(path)
    t_build = time.perf_counter() - t0
    result = distill(student, teacher, str(data), config=distill_config(args))
    wall = time.perf_counter() - t0
    save_model(result.model, out)
    return {
        "student": f"layer-dropped (teacher layers {', '.join(map(str, KEEP_LAYERS))}; sentence-transformers recipe)",
        "params": float_param_count(result.model),
        "validation_before": result.report["fidelity_before"],
        "validation_after": result.report["fidelity"],
        "training": result.report["training"],
        "time_s": {
            "build_export": round(t_build, 1),
            "distillation": round(wall - t_build, 1),
            "total": round(wall, 1),
        },
    }


def latency(paths: list[Path], labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """CPU latency of every model against the first (the teacher), interleaved, at :data:`LATENCY_SHAPE`."""
    from inhercc.bench import BenchOptions, bench

    options = BenchOptions(
        provider="cpu", threads=args.bench_threads, shape_sets=[LATENCY_SHAPE], warmup=3, repeat=args.repeat
    )
    doc = bench(paths, options, labels=labels)
    out = {}
    for r in doc["runs"][0]["results"]:
        ratio = r["ratio_to_reference"]
        out[r["model"]] = {
            "p50_ms": round(r["latency_ms"]["p50"], 2),
            "ratio": None if ratio is None else {k: round(ratio[k], 3) for k in ("ratio", "ci_low", "ci_high")},
        }
    return {"settings": {"threads": args.bench_threads, "shape": LATENCY_SHAPE, "repeat": args.repeat}, "models": out}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both students from the same shards; held-out scores, latency and the settings, JSON-ready."""
    from benchmarks.bench_distill import augment, heldout_scores, write_shards
    from benchmarks.teachers import cached_teacher, encode, english_sentences
    from inhercc.model import float_param_count, load_model
    from inhercc.runtime import make_session, run_session

    torch.set_num_threads(args.threads)
    teacher_path = cached_teacher("minilm")
    teacher = load_model(teacher_path)
    train = english_sentences("train")
    heldout = encode(english_sentences("heldout"), max_length=args.max_length)
    teacher_heldout = run_session(make_session(teacher, threads=args.threads), heldout, batch_size=32)[0]
    texts = train + augment(train, args.augment, args.seed)
    students = []
    with tempfile.TemporaryDirectory(prefix="text_students.") as tmp:
        work = Path(tmp)
        shards = work / "shards"
        shards.mkdir()
        n_shards = write_shards(texts, shards, args.max_length)
        paths = [teacher_path]
        for name, runner in (("inhernet", run_inhernet), ("dropped", run_dropped)):
            print(f"{name}: training", flush=True)
            paths.append(work / f"{name}.onnx")
            entry = runner(teacher, shards, args, paths[-1])
            entry["heldout"] = heldout_scores(load_model(paths[-1]), heldout, teacher_heldout, args.threads)
            print(f"{name}: held-out {entry['heldout']}, {entry['time_s']}", flush=True)
            students.append({"name": name, **entry})
        print("timing on CPU", flush=True)
        lat = latency(paths, ["teacher"] + [s["name"] for s in students], args)
    return {
        "teacher": {"name": "all-MiniLM-L6-v2 (legacy export, opset 17)", "params": float_param_count(teacher)},
        "students": students,
        "latency_cpu": lat,
        "data": {
            "train_sentences": len(train),
            "augmented_copies": args.augment,
            "train_inputs": len(texts),
            "shards": n_shards,
            "heldout_sentences": int(len(teacher_heldout)),
            "max_length": args.max_length,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "distill_config": {k: v for k, v in vars(distill_config(args)).items() if k != "losses"},
        "feature_pairing": "norm outputs by name; layer-dropped block i renamed after teacher block 2i+1",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    """One row per model: params, held-out cosine / Spearman, latency ratio, wall time."""
    teacher_params = r["teacher"]["params"]
    lat = r["latency_cpu"]["models"]
    teacher_ms = f"{lat['teacher']['p50_ms']:.0f}"
    rows = [["teacher (MiniLM-L6)", f"{teacher_params / 1e6:.2f} M (100 %)", "1", "1", teacher_ms, "1", "–"]]
    for s in r["students"]:
        ratio = lat[s["name"]]["ratio"]
        rows.append(
            [
                s["student"],
                f"{s['params'] / 1e6:.2f} M ({s['params'] / teacher_params:.1%})",
                f"{s['heldout']['cosine']:.4f}",
                f"{s['heldout']['spearman']:.4f}",
                f"{lat[s['name']]['p50_ms']:.0f}",
                f"{ratio['ratio']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]",
                f"{s['time_s']['total'] / 60:.1f} min",
            ]
        )
    return rows


def _validation(student: dict[str, Any]) -> str:
    """``0.9176 → 0.9687``: the student's validation cosine before and after training."""
    before, after = student["validation_before"][OUT]["cosine"], student["validation_after"][OUT]["cosine"]
    return f"{before:.4f} → {after:.4f}"


def _times(student: dict[str, Any]) -> str:
    """``calibration 104, distillation 64, total 168``: a student's wall times in seconds."""
    return ", ".join(f"{k.replace('_', '/')} {v:.0f}" for k, v in student["time_s"].items())


def markdown(r: dict[str, Any]) -> str:
    """The result as a Markdown page: the table, then the settings in words."""
    from inhercc.report import format_markdown

    headers = ["model", "params", "held-out cosine", "Spearman pairwise", "p50 ms", "latency / teacher", "wall"]
    c, d, lat = r["distill_config"], r["data"], r["latency_cpu"]["settings"]
    inh, drop = r["students"]
    gap = (drop["params"] - inh["params"]) / inh["params"]
    return "\n".join(
        [
            "# MiniLM-L6: inherited (InherNet, ratio 0.5) vs layer-dropped (3 of 6 layers) student",
            "",
            format_markdown(headers, table_rows(r)),
            "",
            f"Params: InherNet {inh['params']:,}, layer-dropped {drop['params']:,} ({gap:+.2%} of InherNet's)"
            + (": the same budget, so no InherNet run at a matched ratio was needed." if abs(gap) < 0.02 else "."),
            "",
            f"Both distilled from the teacher for {c['steps']} steps (AdamW lr {c['lr']}, batch {c['batch_size']}, "
            f"warm-up {c['warmup']:.0%} + cosine, clip {c['clip']}, train all, embedding loss + feature loss "
            f"{c['feature_loss']} on the normalization outputs, {c['precision']} forward, validation split "
            f"{c['val_split']:.0%}, seed {c['seed']}) on the same {d['train_inputs']} inputs ({d['train_sentences']} "
            f"pydoc training sentences + {d['augmented_copies']} augmented variants each, max length "
            f"{d['max_length']}). Feature-loss pairing: tensors by name; the layer-dropped student's block i "
            "(initialized from teacher layer 2i) is matched to teacher block 2i+1, the end of the span it replaces.",
            "",
            f"Scored on the {d['heldout_sentences']} held-out sentences (never trained on): mean cosine to the "
            "teacher's embeddings and the Spearman correlation of all pairwise similarities. Validation cosine "
            f"before → after training: InherNet {_validation(inh)}, layer-dropped {_validation(drop)}.",
            "",
            f"Latency: ONNX Runtime CPU, {lat['threads']} threads, input_ids "
            f"{'x'.join(map(str, lat['shape']['input_ids']))}, "
            f"{lat['repeat']} interleaved rounds, ratio of medians to the teacher [95 % paired-bootstrap interval]. "
            f"Wall (s): InherNet {_times(inh)}; layer-dropped {_times(drop)}; "
            f"{r['machine']['cpus']} CPU cores shared with other jobs (load {r['machine']['load_average_1min_at_end']} "
            f"at the end), training on {r['settings']['threads']} thread(s).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="Distillation steps, the same for both students.")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--feature-loss", type=float, default=10.0)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--augment", type=int, default=6, help="Variants per training sentence (crop/concat/drop).")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=1536, help="Training inputs for InherNet's Gram matrices.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="Training threads (1: see benchmarks.bench_distill).")
    ap.add_argument("--bench-threads", type=int, default=2, help="ONNX Runtime threads for the latency timing.")
    ap.add_argument("--repeat", type=int, default=30, help="Interleaved timing rounds.")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Folder of text_students.json / .md.")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    from inhercc.report import write_json, write_text_atomic

    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "text_students.json", result)
    write_text_atomic(args.out / "text_students.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
