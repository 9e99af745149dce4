"""Training-free compression benchmark.

1. Compress time and peak memory for a synthetic BERT-base-size graph (12 layers, hidden 768, FFN 3072,
   ≈85 M MatMul parameters), in a fresh process each run. Target: ≤ 20 s on 2 cores.
2. Fidelity of the real MiniLM-L6 teacher at ratios 0.75 / 0.5 / 0.3 (plain SVD, greedy allocation) on
   held-out English sentences: mean cosine, relative L2 and Spearman correlation of pairwise similarities.

    python -m benchmarks.bench_compress [--skip-bert] [--skip-minilm]

Writes ``benchmarks/results/compress.json`` and ``compress.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inhercc.report import format_markdown, format_table, write_json, write_text_atomic

RESULTS = Path(__file__).parent / "results"


def bert_base_graph(layers: int = 12, hidden: int = 768, ffn: int = 3072, seed: int = 0) -> onnx.ModelProto:
    """A BERT-base-shaped encoder (single-head attention, LayerNorm, FFN with biases) with random weights
    whose spectra decay like trained ones (so ranks are non-trivial)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, n_in: int, n_out: int) -> str:
        k = min(n_in, n_out)
        s = (np.arange(1, k + 1) ** -0.6).astype(np.float32)
        a = rng.standard_normal((n_in, k)).astype(np.float32) / np.sqrt(n_in)
        b = rng.standard_normal((k, n_out)).astype(np.float32) / np.sqrt(k)
        inits.append(numpy_helper.from_array(((a * s) @ b * 4.0).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    scale = const("scale", np.array(1.0 / np.sqrt(hidden)))
    x = "x"
    for i in range(layers):
        p = f"layer.{i}"
        for proj in ("query", "key", "value"):
            nodes.append(
                helper.make_node(
                    "MatMul", [x, weight(f"{p}.{proj}.weight", hidden, hidden)], [f"{p}.{proj}"], name=f"{p}.{proj}"
                )
            )
        nodes += [
            helper.make_node("Transpose", [f"{p}.key"], [f"{p}.keyT"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}.query", f"{p}.keyT"], [f"{p}.scores"]),
            helper.make_node("Mul", [f"{p}.scores", scale], [f"{p}.scaled"]),
            helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", f"{p}.value"], [f"{p}.ctx"]),
            helper.make_node(
                "MatMul", [f"{p}.ctx", weight(f"{p}.out.weight", hidden, hidden)], [f"{p}.attn"], name=f"{p}.out"
            ),
            helper.make_node("Add", [f"{p}.attn", x], [f"{p}.res1"]),
            helper.make_node(
                "LayerNormalization",
                [f"{p}.res1", const(f"{p}.ln1.g", np.ones(hidden)), const(f"{p}.ln1.b", np.zeros(hidden))],
                [f"{p}.h1"],
                axis=-1,
            ),
            helper.make_node(
                "MatMul", [f"{p}.h1", weight(f"{p}.ffn.up.weight", hidden, ffn)], [f"{p}.up"], name=f"{p}.ffn.up"
            ),
            helper.make_node("Add", [f"{p}.up", const(f"{p}.ffn.up.bias", np.zeros(ffn))], [f"{p}.upb"]),
            helper.make_node("Relu", [f"{p}.upb"], [f"{p}.act"]),
            helper.make_node(
                "MatMul", [f"{p}.act", weight(f"{p}.ffn.down.weight", ffn, hidden)], [f"{p}.down"], name=f"{p}.ffn.down"
            ),
            helper.make_node("Add", [f"{p}.down", f"{p}.h1"], [f"{p}.res2"]),
            helper.make_node(
                "LayerNormalization",
                [f"{p}.res2", const(f"{p}.ln2.g", np.ones(hidden)), const(f"{p}.ln2.b", np.zeros(hidden))],
                [f"{p}.out_h"],
                axis=-1,
            ),
        ]
        x = f"{p}.out_h"
    graph = helper.make_graph(
        nodes,
        "bert_base_synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "sequence", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from inhercc.pipeline import compress_file
from inhercc.recipe import Recipe
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
r = compress_file(sys.argv[1], sys.argv[2], Recipe.of(ratio=0.5, shapes={"x": [1, 128, 768]}))
t = time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
fid = next(iter(r.report["fidelity"].values()))
print(json.dumps({"compress_s": t, "import_s": t_import, "peak_rss_mb": rss, "rewrite_s": r.report["time_s"]["rewrite"],
                  "params": r.report["params"], "flops": r.report["flops"], "cosine": fid["cosine"]}))
"""


def bench_bert(repeats: int = 2) -> list[dict]:
    """Compress the synthetic BERT-base in fresh processes; returns one row per run."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        teacher = Path(d) / "bert.onnx"
        onnx.save(bert_base_graph(), str(teacher))
        n_matmul = sum(
            int(np.prod(t.dims)) for t in onnx.load(str(teacher)).graph.initializer if t.name.endswith("weight")
        )
        for i in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(teacher), str(Path(d) / f"s{i}.onnx")],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["matmul_params"] = n_matmul
            rows.append(res)
            print(f"  run {i}: {res['compress_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def spearman_pairwise(teacher: np.ndarray, student: np.ndarray) -> float:
    """Spearman correlation between the pairwise cosine similarities of two sets of embeddings."""
    from scipy.stats import spearmanr

    def sims(e: np.ndarray) -> np.ndarray:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        return s[np.triu_indices(len(e), 1)]

    return float(spearmanr(sims(teacher), sims(student)).statistic)


def bench_minilm(ratios: tuple[float, ...] = (0.75, 0.5, 0.3)) -> list[dict]:
    from benchmarks.teachers import cached_teacher, encode, english_sentences
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe
    from inhercc.runtime import make_session

    teacher = cached_teacher("minilm")
    heldout = encode(english_sentences("heldout"), max_length=128)
    t_out = make_session(teacher).run(None, heldout)[0]
    rows = []
    for ratio in ratios:
        t0 = time.perf_counter()
        res = compress(teacher, Recipe.of(ratio=ratio, init="svd", verify=False))
        dt = time.perf_counter() - t0
        s_out = make_session(res.model).run(None, heldout)[0]
        from inhercc.verify import output_fidelity

        fid = output_fidelity(t_out, s_out, "sentence_embedding")
        rows.append(
            {
                "ratio": ratio,
                "init": "svd",
                "allocation": "greedy",
                "cosine": fid["cosine"],
                "rel_l2": fid["rel_l2"],
                "spearman": spearman_pairwise(t_out, s_out),
                "params_teacher": res.report["params"]["teacher"],
                "params_student": res.report["params"]["student"],
                "layers_factorized": sum(1 for r in res.report["layers"] if r["rank"] is not None),
                "compress_s": dt,
                "sentences": len(s_out),
            }
        )
        print(f"  ratio {ratio}: cosine {fid['cosine']:.4f}, spearman {rows[-1]['spearman']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        }
    }
    md = ["# Training-free compression benchmark", ""]
    if not args.skip_bert:
        print("synthetic BERT-base, ratio 0.5:", flush=True)
        rows = bench_bert(args.repeats)
        out["bert_base"] = rows
        table = [
            [
                f"{r['matmul_params'] / 1e6:.1f}M",
                f"{r['compress_s']:.1f}",
                f"{r['rewrite_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['params']['student'] / r['params']['teacher']:.3f}",
                f"{r['flops']['student'] / r['flops']['teacher']:.3f}",
                f"{r['cosine']:.4f}",
            ]
            for r in rows
        ]
        headers = [
            "MatMul params",
            "compress s (target ≤ 20)",
            "of which rewrite s",
            "peak RSS MB",
            "params ratio",
            "FLOPs ratio",
            "cosine (synthetic)",
        ]
        print(format_table(headers, table))
        md += [
            f"## Synthetic BERT-base (12×768, FFN 3072), ratio 0.5, {os.cpu_count()} CPUs, fresh process per run",
            "",
            format_markdown(headers, table),
            "",
        ]
    if not args.skip_minilm:
        print("MiniLM-L6, plain SVD + greedy, held-out sentences:", flush=True)
        rows = bench_minilm()
        out["minilm"] = rows
        headers = [
            "ratio",
            "params (student/teacher)",
            "layers factorized",
            "cosine",
            "rel L2",
            "Spearman",
            "compress s",
        ]
        table = [
            [
                r["ratio"],
                f"{r['params_student'] / 1e6:.2f}M / {r['params_teacher'] / 1e6:.2f}M",
                f"{r['layers_factorized']}/36",
                f"{r['cosine']:.4f}",
                f"{r['rel_l2']:.4f}",
                f"{r['spearman']:.4f}",
                f"{r['compress_s']:.1f}",
            ]
            for r in rows
        ]
        print(format_table(headers, table))
        md += [
            f"## MiniLM-L6 fidelity, no training, plain SVD, greedy allocation ({rows[0]['sentences']} held-out "
            "sentences)",
            "",
            format_markdown(headers, table),
            "",
        ]
    write_json(RESULTS / "compress.json", out)
    write_text_atomic(RESULTS / "compress.md", "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
