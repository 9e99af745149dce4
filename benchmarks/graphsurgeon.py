"""onnx-graphsurgeon against inhercc's own graph surgery, on the synthetic BERT-base of ``bench_compress``.

Issue 14 asks whether onnx-graphsurgeon earns its place in the dependencies. Side by side, each in a fresh
process (peak RSS from ``resource.getrusage``), variants interleaved, every measurement repeated:

* ``compress``: the whole ``compress`` at ratio 0.5 without verification, with inhercc's rewrite step, with
  the onnx-graphsurgeon one swapped in (``_gs``), and with inhercc's rewrite starting from a copy of the
  teacher that leaves out the weights it replaces (``_lean``, a proposed change prototyped here:
  :func:`lean_rewrite_ranks`);
* ``rewrite``: the rewrite step alone, same three ways (same plan, same plain-SVD factors, loaded before the
  clock starts). The gs way: ``import_onnx`` → two MatMuls per layer with ``gs.Constant`` factors →
  ``cleanup().toposort()`` → ``export_onnx``; the shape inference inhercc's rewrite ends with is timed
  apart so both can be compared with and without it;
* ``micro``: every factorized layer's latency micro-models (the dense node alone and its chain):
  ``inhercc.latency.micro_models`` against a gs extraction (graph inputs/outputs set to the layer's,
  ``cleanup``, export; then the same gs rewrite on it).

Every student and a few micro-models are checked against inhercc's in ONNX Runtime (max abs difference),
and the lines of code of each side are counted.

    python -m benchmarks.graphsurgeon [--repeats 3]

Writes ``benchmarks/results/graphsurgeon.json`` and ``graphsurgeon.md``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from inhercc.report import format_markdown, format_table, write_json, write_text_atomic

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"x": [1, 128, 768]}
RATIO = 0.5
WAYS = {"": "inhercc", "_gs": "onnx-graphsurgeon", "_lean": "inhercc, lean copy (proposal)"}
VARIANTS = (
    "compress", "compress_gs", "compress_lean", "rewrite", "rewrite_gs", "rewrite_lean", "micro", "micro_gs"
)  # fmt: skip
PARITY_LAYERS = ("layer.0.query", "layer.0.ffn.up", "layer.0.ffn.down")

# (layer name, total rank) -> (input factor [1, r, in], output factor [1, out, r]), as a FactorSource gives
NamedFactors = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
# (teacher, ranks, layers, FactorSource) -> student, the signature of inhercc.passes.rewrite_ranks
RewriteRanks = Callable[[onnx.ModelProto, Mapping[str, int], Sequence[Any], Any], onnx.ModelProto]


# --- the onnx-graphsurgeon side ------------------------------------------------------------------------


def gs_factorize(graph: Any, node: Any, input_factor: np.ndarray, output_factor: np.ndarray) -> None:
    """Replace the MatMul ``node`` of a gs graph by ``(x·A)·B``; the old node is left without outputs, so
    ``graph.cleanup()`` removes it and its weight."""
    import onnx_graphsurgeon as gs

    x, w = node.inputs
    y = node.outputs[0]
    a = gs.Constant(f"{w.name}.inherit_in", np.ascontiguousarray(input_factor[0].T.astype(w.dtype)))
    b = gs.Constant(f"{w.name}.inherit_out", np.ascontiguousarray(output_factor[0].T.astype(w.dtype)))
    mid = gs.Variable(f"{y.name}.inherit_mid", dtype=w.dtype)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.append(gs.Node("MatMul", f"{node.name}.inherit_in", inputs=[x, a], outputs=[mid]))
    graph.nodes.append(gs.Node("MatMul", f"{node.name}.inherit_out", inputs=[mid, b], outputs=[y]))


def gs_rewrite(
    model: onnx.ModelProto, ranks: Mapping[str, int], factors: NamedFactors, phases: dict[str, float] | None = None
) -> onnx.ModelProto:
    """inhercc's MatMul rewrite done with onnx-graphsurgeon (main graph only); ``phases`` gets the seconds of
    import, surgery (with cleanup and toposort) and export."""
    import onnx_graphsurgeon as gs

    phases = {} if phases is None else phases
    t0 = time.perf_counter()
    graph = gs.import_onnx(model)
    t1 = time.perf_counter()
    for node in [n for n in graph.nodes if n.op == "MatMul" and ranks.get(n.name)]:
        gs_factorize(graph, node, *factors(node.name, ranks[node.name]))
    graph.cleanup().toposort()
    t2 = time.perf_counter()
    student = gs.export_onnx(graph)
    phases.update(import_s=t1 - t0, surgery_s=t2 - t1, export_s=time.perf_counter() - t2)
    return student


def gs_rewrite_ranks(
    model: onnx.ModelProto, ranks: Mapping[str, int], layers: Sequence[Any], factors: Any
) -> onnx.ModelProto:
    """Drop-in for inhercc's rewrite by ranks (a FactorSource, shapes re-inferred like inhercc's)."""
    from inhercc.model import infer_model_shapes

    by_name = {layer.name: layer for layer in layers}
    return infer_model_shapes(gs_rewrite(model, ranks, lambda name, rank: factors(by_name[name], rank)))


def gs_micro_models(
    graph: Any, name: str, rank: int, input_shape: Sequence[int], seed: int = 0
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The dense node ``name`` alone and its chain at ``rank`` (random factors, as inhercc's micro-models),
    extracted from an imported gs ``graph`` (left untouched) by setting the graph's inputs and outputs."""
    import onnx_graphsurgeon as gs

    from inhercc import linalg

    g = graph.copy()
    node = next(n for n in g.nodes if n.name == name)
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    x.shape, y.shape = list(input_shape), None
    g.inputs, g.outputs = [x], [y]
    dense = gs.export_onnx(g.cleanup())
    n_in, n_out = w.shape
    gs_factorize(g, node, *linalg.random_factors(n_out, n_in, rank, 1, seed=seed))
    return dense, gs.export_onnx(g.cleanup().toposort())


# --- the proposal: inhercc's rewrite without the full copy --------------------------------------------------


def lean_rewrite_ranks(
    model: onnx.ModelProto, ranks: Mapping[str, int], layers: Sequence[Any], factors: Any
) -> onnx.ModelProto:
    """``inhercc.passes.base.rewrite_ranks`` with one change: the student starts as a copy of the teacher
    without the weights the rewrite replaces (read by that one node only, not a graph input)."""
    from inhercc.families import families
    from inhercc.model import copy_without, graph_scopes, infer_model_shapes
    from inhercc.passes.base import FactorizePass, run_passes

    by_name = {layer.name: layer for layer in layers}
    reads = Counter(name for scope in graph_scopes(model) for node in scope.graph.node for name in node.input)
    inputs = {i.name for i in model.graph.input}
    planned = [by_name[n] for n in ranks if n in by_name and by_name[n].subgraph is None]
    drop = {la.weight_name for la in planned if reads[la.weight_name] == 1 and la.weight_name not in inputs}
    passes = [FactorizePass(ranks, by_name, factors, f.op_type) for f in families()]
    student = run_passes(copy_without(model, drop), passes).model
    del student.graph.value_info[:]
    return infer_model_shapes(student)


# --- the child processes ----------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_inputs(work: Path) -> tuple[onnx.ModelProto, Any, dict[str, np.ndarray]]:
    """The prepared teacher (as compress sees it), the plan and the factors of the setup run."""
    from inhercc.model import load_model
    from inhercc.plan import RankPlan

    with np.load(work / "factors.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return load_model(work / "bert.onnx"), RankPlan.load(work / "plan.json"), arrays


REPLACEMENTS: dict[str, RewriteRanks] = {"_gs": gs_rewrite_ranks, "_lean": lean_rewrite_ranks}


def swap_rewrite_ranks(replacement: RewriteRanks) -> list[str]:
    """Point every inhercc module's binding of ``inhercc.passes.rewrite_ranks`` (``passes.rewrite`` and the
    compress pipeline call it, wherever they import it from) at ``replacement``; the names swapped."""
    import inhercc.passes as passes

    ours = passes.rewrite_ranks
    wraps = "PassResult" in str(inspect.signature(ours).return_annotation)

    def swapped_in(model: onnx.ModelProto, ranks: Mapping[str, int], layers: Sequence[Any], factors: Any) -> Any:
        student = replacement(model, ranks, layers, factors)
        return passes.PassResult(student, True, []) if wraps else student

    swapped = []
    for name, module in list(sys.modules.items()):
        if name.startswith("inhercc") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is ours:
                    setattr(module, attr, swapped_in)
                    swapped.append(f"{name}.{attr}")
    return swapped


def run_compress(model: onnx.ModelProto) -> Any:
    """``compress`` at ratio 0.5 without verification, through a Recipe where the pipeline takes one."""
    import inhercc.pipeline as pipeline

    options: dict[str, Any] = {"ratio": RATIO, "verify": False, "shapes": SHAPES}
    recipe = getattr(pipeline, "Recipe", None)
    return pipeline.compress(model, recipe.of(**options)) if recipe else pipeline.compress(model, **options)


def child_compress(work: Path, way: str) -> tuple[dict[str, Any], onnx.ModelProto]:
    """The whole compress with inhercc's rewrite step or (``way``) one swapped in."""
    import inhercc.pipeline  # noqa: F401  (imported before the swap and the clock)

    row: dict[str, Any] = {}
    if way == "_gs":
        import onnx_graphsurgeon  # noqa: F401  (imported before the clock, like inhercc)
    if way:
        row["swapped"] = swap_rewrite_ranks(REPLACEMENTS[way])
    model = onnx.load(str(work / "bert.onnx"))
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    result = run_compress(model)
    row.update(time_s=time.perf_counter() - t0, rss_before_mb=rss0, peak_rss_mb=peak_rss_mb())
    row["report_rewrite_s"] = result.report.get("time_s", {}).get("rewrite")
    row["params"] = result.report.get("params")
    return row, result.model


def child_rewrite(work: Path, way: str) -> tuple[dict[str, Any], onnx.ModelProto]:
    """The rewrite alone, factors loaded before the clock starts; shape inference timed apart."""
    from inhercc.layers import find_layers
    from inhercc.model import infer_model_shapes
    from inhercc.passes import rewrite

    model, plan, arrays = load_inputs(work)
    layers = find_layers(model, load_weights=False)
    if way == "_gs":
        import onnx_graphsurgeon  # noqa: F401
    rss0 = peak_rss_mb()
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    if way == "_gs":
        student = gs_rewrite(model, plan.factorized(), lambda n, r: (arrays[f"{n}/in"], arrays[f"{n}/out"]), phases)
    else:
        source = lambda la, r: (arrays[f"{la.name}/in"], arrays[f"{la.name}/out"])  # noqa: E731
        student = (
            lean_rewrite_ranks(model, plan.factorized(), layers, source)
            if way
            else rewrite(model, plan, layers, source)
        )
    t = time.perf_counter() - t0
    row: dict[str, Any] = {"time_s": t, "rss_before_mb": rss0, "peak_rss_mb": peak_rss_mb(), **phases}
    t1 = time.perf_counter()
    student = infer_model_shapes(student)  # inhercc's rewrite ends with it: timed again to compare like with like
    infer = time.perf_counter() - t1
    row.update(
        infer_s=infer, with_infer_s=t + infer if way == "_gs" else t, without_infer_s=t if way == "_gs" else t - infer
    )
    return row, student


def child_micro(work: Path, way: str) -> tuple[dict[str, Any], None]:
    """Every factorized layer's micro-models (dense node, chain), timed per layer."""
    from inhercc.latency import layer_input_shapes, micro_models
    from inhercc.layers import find_layers

    model, plan, _ = load_inputs(work)
    layers = {la.name: la for la in find_layers(model, load_weights=False)}
    ranks = plan.factorized()
    shapes = layer_input_shapes(model, [layers[n] for n in ranks], SHAPES)
    row: dict[str, Any] = {"import_s": 0.0}
    rss0 = peak_rss_mb()
    if way == "_gs":
        import onnx_graphsurgeon as gs

        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        graph = gs.import_onnx(model)
        row["import_s"] = time.perf_counter() - t0
    per_layer = []
    for name, rank in ranks.items():
        t0 = time.perf_counter()
        if way == "_gs":
            gs_micro_models(graph, name, rank, shapes[name])
        else:
            micro_models(model, layers[name], rank, shapes[name])
        per_layer.append(time.perf_counter() - t0)
    row.update(
        time_s=sum(per_layer) + row["import_s"],
        per_layer_ms=1000 * float(np.median(per_layer)),
        layers=len(per_layer),
        rss_before_mb=rss0,
        peak_rss_mb=peak_rss_mb(),
    )
    return row, None


CHILDREN = {"compress": child_compress, "rewrite": child_rewrite, "micro": child_micro}


def run_child(variant: str, work: Path, save: bool) -> None:
    """One measurement (or the setup) in this (fresh) process; prints one JSON line."""
    if variant == "setup":
        setup(work)
        print("{}")
        return
    kind, _, way = variant.partition("_")
    row, student = CHILDREN[kind](work, f"_{way}" if way else "")
    if save and student is not None:
        onnx.save(student, str(work / f"{variant}.onnx"))
    print(json.dumps(row))


def spawn(variant: str, work: Path, save: bool) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON row (or the error's last line)."""
    cmd = [sys.executable, "-m", "benchmarks.graphsurgeon", "--child", variant, str(work)] + (["--save"] * save)
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- setup, parity, lines of code -------------------------------------------------------------------------


def setup(work: Path) -> None:
    """The teacher, its ratio-0.5 plan (from compress) and the plain-SVD factors of every planned layer."""
    from benchmarks.bench_compress import bert_base_graph
    from inhercc.pipeline import Factorizer

    teacher = bert_base_graph()
    onnx.save(teacher, str(work / "bert.onnx"))
    result = run_compress(teacher)
    result.plan.save(work / "plan.json")
    factorizer, by_name = Factorizer("svd"), {la.name: la for la in result.layers}
    arrays = {}
    for name, rank in result.plan.factorized().items():
        fin, fout = factorizer(by_name[name], rank)
        arrays[f"{name}/in"], arrays[f"{name}/out"] = fin.astype(np.float32), fout.astype(np.float32)
    np.savez(work / "factors.npz", **arrays)  # float32: the passes cast the factors to the weight's dtype


def max_abs_diff(a: onnx.ModelProto | str, b: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> float:
    """Largest difference between two models' outputs in ONNX Runtime; NaN (and the error printed) when one
    cannot run: the benchmark keeps its timings."""
    from inhercc.runtime import make_session

    try:
        ya, yb = (make_session(onnx.load(m) if isinstance(m, str) else m).run(None, dict(feeds)) for m in (a, b))
    except Exception as e:  # noqa: BLE001  (reported, not raised: minutes of timings stay saved)
        print(f"parity check failed: {str(e).splitlines()[0]}", flush=True)
        return float("nan")
    return max(float(np.max(np.abs(u - v))) for u, v in zip(ya, yb))


def parity(work: Path) -> dict[str, float]:
    """Max abs output difference of each student against compress's, and of the gs micro-models against
    inhercc's for a few layers."""
    import onnx_graphsurgeon as gs

    from inhercc.latency import layer_input_shapes, micro_models
    from inhercc.layers import find_layers

    x = {"x": np.random.default_rng(0).standard_normal(SHAPES["x"]).astype(np.float32)}
    ref = str(work / "compress.onnx")
    saved = [v for v in VARIANTS[1:] if (work / f"{v}.onnx").exists()]  # a failed variant saved none
    out = {f"student, {v}": max_abs_diff(ref, str(work / f"{v}.onnx"), x) for v in saved}
    model, plan, _ = load_inputs(work)
    layers = {la.name: la for la in find_layers(model, load_weights=False)}
    shapes = layer_input_shapes(model, [layers[n] for n in PARITY_LAYERS], SHAPES)
    graph = gs.import_onnx(model)
    for name in PARITY_LAYERS:
        rank = plan.factorized()[name]
        ours = micro_models(model, layers[name], rank, shapes[name])
        theirs = gs_micro_models(graph, name, rank, shapes[name])
        feeds = {ours[0].graph.input[0].name: np.random.default_rng(1).standard_normal(shapes[name]).astype(np.float32)}
        for kind, m, g in zip(("dense", "chain"), ours, theirs):
            out[f"micro-model, {name} {kind}"] = max_abs_diff(m, g, feeds)
    return out


def code_lines(obj: Any) -> int:
    """Lines of code of a function or class: no blank lines, comments or docstrings."""
    src = textwrap.dedent(inspect.getsource(obj))
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            doc = node.body[0]
            doc_lines |= set(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    lines = src.splitlines()
    return sum(1 for i, s in enumerate(lines, 1) if s.strip() and not s.strip().startswith("#") and i not in doc_lines)


# inhercc's code for the MatMul rewrite and for the micro-models ("module:attribute"; shape inference, which
# every side calls, and the subgraph walk, which the gs version lacks, are not counted)
OURS = {
    "rewrite": (
        "inhercc.passes:rewrite",
        "inhercc.passes.base:rewrite_ranks",
        "inhercc.passes.base:run_passes",
        "inhercc.passes.base:FactorizePass",
        "inhercc.passes.base:GraphNames",
        "inhercc.passes.base:weight_base_name",
        "inhercc.passes.base:factor_tensors",
        "inhercc.passes.base:factor_chain",
        "inhercc.passes.base:remove_unused_initializers",
        "inhercc.passes.factorize_matmul:MatMulFamily.rewrite",
    ),
    "micro-models": ("inhercc.latency:micro_models", "inhercc.passes.base:OpFamily.micro_model"),
}
THEIRS = {"rewrite": (gs_rewrite, gs_factorize, gs_rewrite_ranks), "micro-models": (gs_micro_models,)}


def lookup(path: str) -> Any | None:
    """The object a ``module:attribute.attribute`` path names, None when it is gone (the code is moving)."""
    module, _, attrs = path.partition(":")
    obj: Any = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr, None)
    return obj


def lines_of_code() -> dict[str, dict[str, Any]]:
    """Lines of code each way needs for the MatMul rewrite and for the micro-models (the lean way: inhercc's
    with ``rewrite_ranks`` replaced by :func:`lean_rewrite_ranks` and :func:`copy_without`)."""
    out: dict[str, dict[str, Any]] = {}
    for step, paths in OURS.items():
        found = [p for p in paths if lookup(p) is not None]
        ours = sum(code_lines(lookup(p)) for p in found)
        out[step] = {"": ours, "_gs": sum(code_lines(f) for f in THEIRS[step]), "inhercc_counted": found}
    out["rewrite"]["_lean"] = (
        out["rewrite"][""]
        - code_lines(lookup("inhercc.passes.base:rewrite_ranks"))
        + code_lines(lean_rewrite_ranks)
        + code_lines(lookup("inhercc.model:copy_without"))
    )
    return out


# --- the run and its tables ------------------------------------------------------------------------------

# (row label, variant kind, key of the child's row, lines-of-code step or None)
STEPS = (
    ("compress, whole (s)", "compress", "time_s", None),
    ("rewrite with shape inference (s)", "rewrite", "with_infer_s", "rewrite"),
    ("rewrite without shape inference (s)", "rewrite", "without_infer_s", None),
    ("micro-models, 72 layers (s)", "micro", "time_s", "micro-models"),
    ("micro-models, per layer (ms)", "micro", "per_layer_ms", None),
)
HEADERS = [
    "step",
    "implementation",
    "median",
    "× inhercc",
    "peak RSS MB",
    "× inhercc",
    "peak raised by the step MB",
    "lines of code",
]


def median(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.median(values)) if values else None


def fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def times(value: float | None, ours: float | None) -> str:
    return "–" if value is None or not ours else f"{value / ours:.2f}×"


def summary_rows(runs: Mapping[str, list[dict[str, Any]]], loc: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """One row per step and implementation: medians of time and peak RSS, their ratio to inhercc's, lines."""
    rows = []
    for label, kind, key, code in STEPS:
        ours_t, ours_rss = median(runs[kind], key), median(runs[kind], "peak_rss_mb")
        for way, name in WAYS.items():
            variant = kind + way
            if variant not in runs:
                continue
            t, rss = median(runs[variant], key), median(runs[variant], "peak_rss_mb")
            before = median(runs[variant], "rss_before_mb")
            raised = None if rss is None or before is None else rss - before
            lines = loc[code].get(way, "–") if code else "–"
            rows.append([label, name, fmt(t, 1 if key == "per_layer_ms" else 2), times(t, ours_t), fmt(rss, 0),
                         times(rss, ours_rss), fmt(raised, 0), lines])  # fmt: skip
    return rows


NOTES = [
    "Notes:",
    "",
    "- The gs rewrite covers MatMul in the main graph only: no Gemm / Conv attributes, no If / Loop / Scan "
    "bodies, no guarantee of fresh names, no readable factor names from node metadata, no metadata carried "
    "over, no per-node notes. Those are most of inhercc's lines; its lines of code understate what an equal "
    "gs version would need.",
    "- gs's lower memory comes from building the student without copying the weights it replaces; inhercc's "
    "`rewrite_ranks` copies the whole teacher (`CopyFrom`, 340 MB here) and drops them afterwards. The lean "
    "copy does what gs does in inhercc's own passes (`copy_without`, `lean_rewrite_ranks` in the benchmark) "
    "and gives byte-identical students.",
    "- Shape inference (`infer_model_shapes`) is the same call on every side; 'without' subtracts its time, "
    "measured on the student after the step.",
    "",
]


def measure(repeats: int) -> dict[str, Any]:
    """Setup, then every variant ``repeats`` times interleaved (fresh process each), then parity checks."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        t0 = time.perf_counter()
        # in a child: on Linux a child's peak RSS starts at its parent's, so the parent must stay small
        if "error" in (failed := spawn("setup", work, save=False)):
            raise RuntimeError(f"setup failed: {failed['error']}")
        print(f"setup (teacher, plan, factors): {time.perf_counter() - t0:.1f} s", flush=True)
        for i in range(repeats):
            for variant in VARIANTS:
                row = spawn(variant, work, save=i == 0)
                runs[variant].append(row)
                shown = row.get("error") or f"{row['time_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB"
                print(f"  run {i} {variant}: {shown}", flush=True)
        diffs = parity(work)
    return {"runs": runs, "max_abs_diff": diffs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child[0], Path(args.child[1]), args.save)
        return 0
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        print("this benchmark needs onnx-graphsurgeon: pip install onnx-graphsurgeon", file=sys.stderr)
        return 2

    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "onnx_graphsurgeon": gs.__version__,
            "onnx": onnx.__version__,
        },
        "repeats": args.repeats,
        "ratio": RATIO,
        "shapes": SHAPES,
    }
    out["lines_of_code"] = loc = lines_of_code()  # first: the measurements take minutes and the code moves
    out.update(measure(args.repeats))
    table = summary_rows(out["runs"], loc)
    print(format_table(HEADERS, table))
    diffs = [[name, f"{diff:.3g}"] for name, diff in out["max_abs_diff"].items()]
    print(format_table(["model against inhercc's", "max abs diff"], diffs))
    md = [
        "# onnx-graphsurgeon vs inhercc's graph surgery",
        "",
        f"Synthetic BERT-base (12×768, FFN 3072, 72 MatMuls), ratio {RATIO}, input {SHAPES['x']}, "
        f"{os.cpu_count()} CPUs, onnx-graphsurgeon {gs.__version__}; medians of {args.repeats} fresh-process runs "
        "per variant, interleaved (`python -m benchmarks.graphsurgeon`). Peak RSS is the whole process; "
        "'peak raised' is how far the step pushed it above the peak after loading the teacher, plan and factors. "
        "The lean copy is a proposed change to inhercc's `rewrite_ranks`, prototyped in the benchmark.",
        "",
        format_markdown(HEADERS, table),
        "",
        f"Outputs in ONNX Runtime against inhercc's (compress's student; inhercc's micro-models), input {SHAPES['x']}:",
        "",
        format_markdown(["model", "max abs diff"], diffs),
        "",
        *NOTES,
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "graphsurgeon.json", out)
    write_text_atomic(RESULTS / "graphsurgeon.md", "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
