"""Distillation benchmark: MiniLM-L6 (sentence embeddings) compressed to half its MatMul parameters, then
fine-tuned from the teacher on English documentation sentences.

Stages, timed together (what ``inhercc compress teacher.onnx --data DIR --epochs N`` chains): calibration
on the training split (Gram matrices, summed over sequence-length buckets) → whitened-SVD compression at
``--ratio`` → distillation (torch round-trip, teacher outputs from ONNX Runtime, cached). Training text:
the ``train`` sentences of ``pydoc_data`` (tokenized into length-bucketed ``.npz`` shards, streamed from a
folder); evaluation: the ``heldout`` sentences, never trained on, before and after distillation — mean
cosine to the teacher's embeddings and the Spearman correlation of all pairwise similarities.
Target: cosine ≥ 0.99 and Spearman ≥ 0.98 within 15 minutes on 2 CPU cores.

    python -m benchmarks.bench_distill [--epochs 3] [--augment 6] [--train factors] [--features layers] [--threads 2]

Writes ``benchmarks/results/distill.json`` and ``distill.md`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
BUCKET = 16  # sequence lengths are padded up to a multiple of this
SHARD = 256  # sentences per shard file


def augment(sentences: list[str], copies: int, seed: int = 0) -> list[str]:
    """``copies`` variants of every sentence, each one of: a random contiguous crop (≥ half the words), the
    sentence followed by another random training sentence, or the sentence with 15 % of its words dropped.
    Distillation needs inputs, not labels — the teacher labels whatever it is shown —, so variants of the
    training sentences (never of held-out ones) give the student more to match without new text."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(copies):
        for s in sentences:
            words = s.split()
            kind = rng.integers(3)
            if kind == 0:
                n = int(rng.integers(max(3, len(words) // 2), len(words) + 1))
                start = int(rng.integers(0, len(words) - n + 1))
                out.append(" ".join(words[start : start + n]))
            elif kind == 1:
                out.append(f"{s} {sentences[int(rng.integers(len(sentences)))]}")
            else:
                kept = [w for w in words if rng.random() >= 0.15]
                out.append(" ".join(kept) if kept else s)
    return out


def write_shards(sentences: list[str], folder: Path, max_length: int) -> int:
    """Tokenize into ``.npz`` shards of sentences of similar length (padded to the bucket's length)."""
    from benchmarks.teachers import encode

    lengths = encode(sentences, max_length=max_length)["attention_mask"].sum(1)
    padded = np.minimum(max_length, -(-lengths // BUCKET) * BUCKET)
    n = 0
    for length in np.unique(padded):
        chosen = [s for s, p in zip(sentences, padded) if p == length]
        for i in range(0, len(chosen), SHARD):
            np.savez(
                folder / f"len{length:03d}_{i // SHARD:02d}.npz",
                **encode(chosen[i : i + SHARD], max_length, int(length)),
            )
            n += 1
    return n


def heldout_scores(model: Any, feeds: dict[str, np.ndarray], teacher_out: np.ndarray, threads: int) -> dict[str, float]:
    """Mean cosine and pairwise-similarity Spearman of a model's held-out embeddings vs the teacher's."""
    from benchmarks.bench_compress import spearman_pairwise
    from inhercc.runtime import make_session, run_session
    from inhercc.verify import output_fidelity

    out = run_session(make_session(model, threads=threads), feeds, batch_size=32)[0]
    fid = output_fidelity(teacher_out, out, "sentence_embedding")
    return {"cosine": fid["cosine"], "rel_l2": fid["rel_l2"], "spearman": spearman_pairwise(teacher_out, out)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.teachers import cached_teacher, encode, english_sentences
    from inhercc.data import open_samples, split_indices
    from inhercc.distill import DistillConfig, distill
    from inhercc.model import load_model
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe
    from inhercc.runtime import make_session, run_session
    from inhercc.stages import calibration_parts

    # One thread each on a 2-core machine shared with other jobs: with two, OpenMP / ONNX Runtime workers
    # spin-wait on a busy core and small kernels (eigh, a step's matmuls) run 10× slower.
    torch.set_num_threads(args.threads)
    teacher_path = cached_teacher("minilm")
    teacher = load_model(teacher_path)
    train_sentences = english_sentences("train")
    heldout = encode(english_sentences("heldout"), max_length=args.max_length)
    teacher_heldout = run_session(make_session(teacher, threads=args.threads), heldout, batch_size=32)[0]
    cfg = DistillConfig(
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        feature_loss=args.feature_loss,
        features=args.features,
        train=args.train,
        val_split=args.val_split,
        patience=args.patience,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
        quiet=args.quiet,
        precision=args.precision,
    )
    with tempfile.TemporaryDirectory() as tmp:
        texts = train_sentences + augment(train_sentences, args.augment, args.seed)
        shards = write_shards(texts, Path(tmp), args.max_length)
        t0 = time.perf_counter()
        samples = open_samples(tmp, teacher)
        train_idx, _ = split_indices(len(samples), cfg.val_split, cfg.seed)
        # calibration samples spread over the training split (never the validation or held-out sentences)
        spread = train_idx[:: max(1, len(train_idx) // args.calib_samples)][: args.calib_samples]
        plan = {"rank": args.rank} if args.rank else {"ratio": args.ratio, "allocation": args.allocation}
        recipe = Recipe.of(init=args.init, calib_samples=None, sequential=args.sequential, verify=False, **plan)
        student = compress(teacher, recipe, data=calibration_parts(samples, spread))
        times = student.report["time_s"]
        t_cal = sum(times.get(k, 0.0) for k in ("calibrate", "sensitivity", "sequential"))
        t_compress = time.perf_counter() - t0 - t_cal
        before = heldout_scores(student.model, heldout, teacher_heldout, args.threads)
        print(f"after compression: cosine {before['cosine']:.4f}, spearman {before['spearman']:.4f}", flush=True)
        t1 = time.perf_counter()
        result = distill(student.model, teacher, samples, config=cfg)
        t_distill = time.perf_counter() - t1
        wall = time.perf_counter() - t0  # the held-out evaluation before training is not counted
    after = heldout_scores(result.model, heldout, teacher_heldout, args.threads)
    print(f"after distillation: cosine {after['cosine']:.4f}, spearman {after['spearman']:.4f}", flush=True)
    # the same scores on the (unaugmented) sentences it trained on: the gap to the held-out ones is how much
    # of the remaining error is generalization rather than fit
    seen = encode(train_sentences, max_length=args.max_length)
    teacher_seen = run_session(make_session(teacher, threads=args.threads), seen, batch_size=32)[0]
    on_train = heldout_scores(result.model, seen, teacher_seen, args.threads)
    return {
        "teacher": "all-MiniLM-L6-v2 (legacy export, opset 17)",
        "plan": f"uniform rank {args.rank}"
        if args.rank
        else f"ratio {args.ratio} ({args.allocation} allocation{', sequential' if args.sequential else ''})",
        "init": args.init,
        "params": student.report["params"],
        "layers_factorized": sum(1 for r in student.report["layers"] if r["rank"] is not None),
        "train_sentences": len(train_sentences),
        "augmented_copies": args.augment,
        "train_shards": shards,
        "heldout_sentences": len(teacher_heldout),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("losses",)},
        "heldout_before": before,
        "heldout_after": after,
        "train_sentences_after": on_train,
        "validation_before": result.report["fidelity_before"],
        "validation_after": result.report["fidelity"],
        "training": result.report["training"],
        "time_s": {
            "calibration": round(t_cal, 1),
            "compression": round(t_compress, 1),
            "distillation": round(t_distill, 1),
            "total": round(wall, 1),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }


def markdown(r: dict[str, Any]) -> str:
    from inhercc.report import format_markdown

    b, a, t, tm = r["heldout_before"], r["heldout_after"], r["training"], r["time_s"]
    rows = [
        [
            f"after compression ({'whitened SVD' if r['init'] == 'whitened' else r['init']}, {r['plan']})",
            f"{b['cosine']:.4f}",
            f"{b['spearman']:.4f}",
            f"{b['rel_l2']:.4f}",
        ],
        [
            f"after distillation ({t['epochs']} epochs, {t['steps']} steps)",
            f"{a['cosine']:.4f}",
            f"{a['spearman']:.4f}",
            f"{a['rel_l2']:.4f}",
        ],
    ]
    if "train_sentences_after" in r:
        s = r["train_sentences_after"]
        rows.append(
            [
                "after distillation, scored on its own training sentences (not held out)",
                f"{s['cosine']:.4f}",
                f"{s['spearman']:.4f}",
                f"{s['rel_l2']:.4f}",
            ]
        )
    c = r["config"]
    return "\n".join(
        [
            f"# Distillation benchmark: MiniLM-L6, {r['plan'].split(' (')[0]}",
            "",
            f"Student: {r['params']['student'] / 1e6:.2f} M of the teacher's {r['params']['teacher'] / 1e6:.2f} M "
            f"parameters ({r['layers_factorized']}/36 MatMuls factorized; their parameters halved at ratio 0.5, "
            f"embeddings untouched). Trained on {t['train_samples']} inputs made from the {r['train_sentences']} pydoc "
            f"training sentences and {r.get('augmented_copies', 0)} augmented variant(s) of each "
            f"({t['val_samples']} more inputs of that pool held out for validation / model selection); scored on "
            f"{r['heldout_sentences']} held-out sentences, disjoint from the training sentences and never trained "
            "on.",
            "",
            format_markdown(["student", "mean cosine (≥ 0.99)", "Spearman pairwise (≥ 0.98)", "rel L2"], rows),
            "",
            "Target (cosine ≥ 0.99 and Spearman ≥ 0.98 within 15 min): "
            + ("met." if a["cosine"] >= 0.99 and a["spearman"] >= 0.98 and tm["total"] <= 900 else "**not met**."),
            "",
            f"Wall time {tm['total'] / 60:.1f} min (target ≤ 15): calibration {tm['calibration']:.0f} s, compression "
            f"{tm['compression']:.0f} s, distillation {tm['distillation']:.0f} s; {r['machine']['cpus']} CPU cores "
            f"shared with other jobs (load average {r['machine']['load_average_1min_at_end']} at the end), torch and "
            f"ONNX Runtime on {r['machine']['threads']} thread(s)"
            + (", the teacher one batch ahead in a worker thread." if t.get("teacher_prefetched") else "."),
            "",
            f"Recipe: AdamW lr {c['lr']}, batch {c['batch_size']}, warm-up {c['warmup']:.0%} + cosine, clip "
            f"{c['clip']}, train {c['train']}, feature loss {c['feature_loss']}"
            + (f" on {c.get('features', 'layers')}" if c["feature_loss"] else "")
            + ", "
            f"precision {c.get('precision', 'fp32')}, validation split {c['val_split']:.0%}; "
            f"best validation cosine {t['best_val_cosine']:.4f} at epoch {t['best_epoch']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="Keep this fraction of the MatMul parameters.")
    ap.add_argument("--rank", type=int, help="Instead of --ratio: one rank for every MatMul (128 = ratio 0.5).")
    ap.add_argument("--init", default="whitened", choices=["whitened", "svd"])
    ap.add_argument("--allocation", default="sensitivity", choices=["sensitivity", "greedy", "uniform"])
    ap.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Error-compensating (sequential) calibration (default on).",
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--feature-loss", type=float, default=10.0)
    ap.add_argument("--features", default="norms", help="What the feature loss compares: layers | norms | regex.")
    ap.add_argument("--train", default="all", help="factors | all | regex (default all: +0.003 held-out cosine).")
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--augment", type=int, default=6, help="Variants per training sentence (crop/concat/drop).")
    ap.add_argument("--calib-samples", type=int, default=1536, help="Training inputs for the Gram matrices.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="Training forward precision.")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (1: see the module doc)")
    ap.add_argument("--tag", default="", help="Suffix of the result files.")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    from inhercc.report import write_json, write_text_atomic

    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"distill{'-' + args.tag if args.tag else ''}"
    write_json(RESULTS / f"{name}.json", result)
    write_text_atomic(RESULTS / f"{name}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
