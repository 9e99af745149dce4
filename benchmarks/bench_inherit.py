"""The InherNet claim on real labels: inherited low-rank students against same-size conventional students on MNIST.

Teacher: the ResNet of :mod:`benchmarks.mnist` (cached ONNX, ≈ 99.5 % test accuracy). At each parameter budget
(a fraction of the teacher's parameters; the compress ratio is bisected on the compress report's parameter count,
the plan then replayed so every inherited variant has the same ranks) and in each data regime (``full``: the
60,000 training digits; ``low``: 1,000 of them, the same for every variant and seed), with the same KD recipe,
epochs and data for all, over ``--seeds`` seeds:

* ``inhernet``: ``compress --ratio r`` + KD (with CE on the real labels, ``_labels``);
* ``inhernet-h3``: the same with ``--heads 3`` (its own ratio, so heads and gates fit the same budget);
* ``random-init``: the same factor architecture as ``inhernet``, ``--init random`` + KD;
* ``conventional``: ``MnistResNet(width=w)``, ``w`` matching the budget, from scratch, ``finetune --train all``;
* ``inhernet-ie`` / ``conventional-ie``: IE-KD (``--ie``) on top of ``inhernet`` / ``conventional``;
* ``labels-only``: ``conventional`` trained on the labels alone (``alpha`` 1: the KD term has weight 0);
* ``conventional-bn``: the same thinner network trained in PyTorch *with* batch norm (the export folds it, so
  ``finetune`` trains the folded net without it), the same KD + CE objective (:func:`inhercc.losses.kd_loss`),
  training samples, optimizer, schedule, epochs and batch size — the baseline a PyTorch user would train.

Scored on the 10,000 real test labels in ONNX Runtime; params, FLOPs per image and CPU latency (batch 1,
interleaved against the teacher, :func:`inhercc.bench.bench`). Mean ± std over seeds.

    python -m benchmarks.bench_inherit [--seeds 5] [--epochs 5] [--budgets 0.10 0.03] [--regimes full low]
                                       [--variants inhernet conventional ...] [--out benchmarks/results]

Writes ``inherit.json``, ``inherit.md`` and ``inherit.png`` (accuracy against params) under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

RESULTS = Path(__file__).parent / "results"
VARIANTS = (  # in the order they run: the claim's baselines first, the slowest variant (heads) last
    "inhernet",
    "conventional-bn",
    "conventional",
    "random-init",
    "labels-only",
    "inhernet-ie",
    "conventional-ie",
    "inhernet-h3",
)
INHERITED = {"inhernet": {}, "inhernet-h3": {"heads": 3}, "random-init": {"init": "random"}, "inhernet-ie": {}}
CONVENTIONAL = {"conventional": {}, "conventional-ie": {"ie": True}, "labels-only": {"alpha": 1.0}}
RECIPE_SETTINGS = ("epochs", "low_epochs", "full_images", "lr", "batch_size", "temperature", "alpha", "patience")
TORCH_TRAINED = ("conventional-bn",)  # trained outside inhercc (same objective and schedule), same width
REGIMES = {"full": None, "low": 1000}  # training images (None: all 60,000)
LOW_SEED = 1234  # which 1,000 images make the low-data regime: the same for every variant and seed


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (recorded in the results)."""

    seeds: int = 5
    epochs: int = 5
    low_epochs: int | None = None  # epochs in the low-data regime (None: ``epochs``)
    full_images: int = 60000  # a reduced run may subsample the full regime (the first N of a seeded permutation)
    budgets: tuple[float, ...] = (0.10, 0.03)
    regimes: tuple[str, ...] = ("full", "low")
    variants: tuple[str, ...] = VARIANTS
    lr: float = 3e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.3
    patience: int | None = 0  # never: 10 % of 1,000 images is too few to stop on (every variant alike)
    rank_multiple: int = 1
    threads: int = 1
    bench_repeat: int = 200
    reduced: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_npz(path: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """Training data as compress / finetune read it: the model input plus the real labels as ``_labels``."""
    np.savez(path, **{name: images, "_labels": labels.astype(np.int64)})
    return path


def input_name(model: ModelProto) -> str:
    """The model's one real input (initializers listed as inputs are not)."""
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def calibration_grams(teacher: ModelProto, data: Any, threads: int | None = None) -> Any:
    """The Gram matrices compress would calibrate on ``data`` (the stages up to calibration), computed once so
    the bisection and every inherited student of a regime reuse them instead of calibrating each time."""
    from inhercc.recipe import Recipe
    from inhercc.stages import calibrate, find, load, open_state, run_stages

    state = open_state(teacher, Recipe.of(verify=False, threads=threads), data)
    return run_stages([load, find, calibrate], state).grams


def compressed_params(teacher: ModelProto, data: Any, ratio: float, grams: Any = None, **recipe_kw: Any) -> Any:
    """The student's parameter count in the compress report at ``ratio`` (no distillation, no check) and its plan."""
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe

    result = compress(teacher, Recipe.of(ratio=ratio, verify=False, **recipe_kw), data=data, grams=grams)
    return int(result.report["params"]["student"]), result.plan


def match_ratio(
    teacher: ModelProto, target: float, data: Any = None, iters: int = 12, tol: float = 0.005, **kw: Any
) -> dict[str, Any]:
    """The compress ratio whose student has ``target`` parameters (the count grows with the ratio, about
    linearly): bracketed false position (a bisection step when one end stalls), from ratio 0 (≈ no parameters)
    and 1 (≈ the teacher's). Returns the closest ``{"ratio", "params", "plan"}`` seen; stops within ``tol``.
    ``kw``: recipe keywords, and ``grams`` (:func:`calibration_grams`)."""
    from inhercc.errors import InherccError

    lo, hi = (0.0, 0.0), (1.0, float(onnx_params(teacher)))
    best: dict[str, Any] | None = None
    last_side = ""
    for _ in range(iters):
        mid = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / max(hi[1] - lo[1], 1e-9)
        if not lo[0] < mid < hi[0] or last_side.endswith("lolo") or last_side.endswith("hihi"):
            mid = (lo[0] + hi[0]) / 2
        try:
            params, plan = compressed_params(teacher, data, mid, **kw)
        except InherccError:  # below the smallest plan (rank 1 everywhere): raise the low end
            lo, last_side = (mid, lo[1]), last_side + "lolo"
            continue
        if best is None or abs(params - target) < abs(best["params"] - target):
            best = {"ratio": mid, "params": params, "plan": plan}
        if abs(params - target) <= tol * target:
            break
        side = "lo" if params < target else "hi"
        lo, hi = ((mid, params), hi) if side == "lo" else (lo, (mid, params))
        last_side += side
    assert best is not None
    return best


def onnx_params(model: ModelProto) -> int:
    from inhercc.model import float_param_count

    return int(float_param_count(model))


def conventional_width(target: float, build: Callable[[int], Any], export: Callable[[Any, Path], Path]) -> int:
    """The width whose exported student has the parameter count closest to ``target`` (params grow with width)."""
    import onnx

    def params(width: int) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return onnx_params(onnx.load(export(build(width), Path(tmp) / "s.onnx")))

    lo, hi = 1, 2
    while params(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda w: abs(params(w) - target))


def accuracy(model: ModelProto | str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """Top-1 accuracy of the ONNX model's first output on the labelled images (ONNX Runtime)."""
    return float((first_output(model, images, threads).argmax(1) == labels).mean())


def first_output(model: ModelProto | str | os.PathLike[str], images: np.ndarray, threads: int) -> np.ndarray:
    """The ONNX model's first output (its logits) on ``images``, in ONNX Runtime batches of 500."""
    from inhercc.runtime import make_session, run_session

    sess = make_session(model, threads=threads)
    return run_session(sess, {sess.get_inputs()[0].name: images}, batch_size=500)[0]


def flops(model: ModelProto, name: str, shape: Sequence[int]) -> float:
    from inhercc.data import fixed_shape_flops

    return float(fixed_shape_flops(model, {name: [1, *shape]})[0])


def distill_config(s: Settings, seed: int, regime: str = "full", **over: Any) -> Any:
    """The one KD recipe of every variant (CE on ``_labels`` weighted ``alpha``), with per-variant changes."""
    from inhercc.distill import DistillConfig

    base = DistillConfig(
        epochs=s.low_epochs or s.epochs if regime == "low" else s.epochs,
        lr=s.lr,
        batch_size=s.batch_size,
        temperature=s.temperature,
        alpha=s.alpha,
        patience=s.patience,
        seed=seed,
        threads=s.threads,
        quiet=True,
    )
    return replace(base, **over)


@dataclass
class Budget:
    """One parameter budget in one regime: the plans of the inherited students and the conventional width."""

    fraction: float
    target: float
    plans: dict[int, dict[str, Any]]  # heads -> match_ratio result
    width: int
    width_params: int
    grams: Any = None  # the regime's calibration (:func:`calibration_grams`), shared by its inherited students


def inherited_student(
    teacher: ModelProto, data: Path, budget: Budget, variant: str, s: Settings, seed: int, regime: str = "full"
) -> ModelProto:
    """An inherited variant: the budget's plan replayed (``heads`` its own), compressed and distilled."""
    from inhercc.pipeline import compress
    from inhercc.recipe import Recipe

    kw = dict(INHERITED[variant])
    heads = int(kw.get("heads", 1))
    cfg = distill_config(s, seed, regime, ie=variant.endswith("-ie"))
    recipe = Recipe.of(
        plan=budget.plans[heads]["plan"], rank_multiple=s.rank_multiple, verify=False, seed=seed,
        threads=s.threads, distill=cfg, **kw,
    )  # fmt: skip
    return compress(teacher, recipe, data=str(data), grams=budget.grams).model


def set_bn_statistics(model: Any, images: np.ndarray) -> Any:
    """The batch-norm statistics of a fresh network measured on ``images`` (one pass, exact averages), so the
    exported graph — where export folds batch norm into the convs — starts with normalized activations instead
    of the identity statistics of an untrained net (which leave a deep net without BN at its worst init)."""
    import torch

    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: after one batch, that batch's statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))  # one batch (1,000 images of 28×28 fit easily)
    return model.eval()


def conventional_student(
    teacher: ModelProto,
    data: Path,
    budget: Budget,
    variant: str,
    s: Settings,
    seed: int,
    build: Callable[[int], Any],
    export: Callable[[Any, Path], Path],
    regime: str = "full",
    bn_images: np.ndarray | None = None,
) -> ModelProto:
    """A conventional variant: a fresh ``build(width)`` (torch seed = ``seed``; batch-norm statistics set on
    ``bn_images``, :func:`set_bn_statistics`) exported and distilled, all weights trained."""
    import torch

    from inhercc.distill import distill

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(budget.width)
        if bn_images is not None:
            set_bn_statistics(model, bn_images)
        path = export(model, Path(tmp) / "student.onnx")
        cfg = distill_config(s, seed, regime, train="all", **CONVENTIONAL[variant])
        return distill(str(path), teacher, str(data), config=cfg).model


def torch_bn_student(
    teacher: ModelProto, data: Path, budget: Budget, s: Settings, seed: int, build: Callable[[int], Any],
    export: Callable[[Any, Path], Path], regime: str = "full",
) -> ModelProto:  # fmt: skip
    """``conventional-bn``: ``build(width)`` trained in PyTorch with its batch norms, on the samples distillation
    trains on (the same validation split held out), with the same objective, AdamW, warm-up + cosine schedule,
    clipping, epochs and batch size as :func:`distill_config`; then exported (batch norm folded)."""
    import onnx
    import torch
    import torch.nn.functional as F

    from inhercc.data import split_indices
    from inhercc.distill.config import CNN_LR
    from inhercc.distill.trainer import lr_schedule
    from inhercc.losses import kd_loss

    cfg = distill_config(s, seed, regime)
    with np.load(data) as z:
        x, y = z[input_name(teacher)], z["_labels"]
    keep, _ = split_indices(len(x), cfg.val_split, cfg.seed)
    x, y = x[keep], y[keep]
    zt = torch.from_numpy(first_output(teacher, x, s.threads))
    torch.manual_seed(seed)
    model = build(budget.width)
    lr = CNN_LR if cfg.lr is None else cfg.lr  # what distillation resolves for this CNN
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(per_epoch * int(cfg.epochs or 1), cfg.warmup))
    rng = np.random.default_rng(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model.train()
    for _ in range(int(cfg.epochs or 1)):
        for b in np.array_split(rng.permutation(len(x)), per_epoch):
            out = model(xs[b])
            loss = (1 - cfg.alpha) * kd_loss(out, zt[b], cfg.temperature) + cfg.alpha * F.cross_entropy(out, ys[b])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
            opt.step()
            sched.step()
    with tempfile.TemporaryDirectory() as tmp:
        return onnx.load(str(export(model.eval(), Path(tmp) / "student.onnx")))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def latency(paths: dict[str, Path], teacher_path: Path, s: Settings) -> dict[str, dict[str, float]]:
    """Median CPU latency (batch 1) of the teacher and each student, timed interleaved."""
    from inhercc.bench import BenchOptions, bench

    labels = ["teacher", *paths]
    result = bench(
        [str(teacher_path), *map(str, paths.values())],
        BenchOptions(provider="cpu", threads=s.threads, batch=1, repeat=s.bench_repeat),
        labels=labels,
    )
    return {m["model"]: {"median_ms": m["latency_ms"]["p50"]} for m in result["runs"][0]["results"]}


def plan_budgets(
    teacher: ModelProto, data: Path, s: Settings, variants: Sequence[str], build: Callable[[int], Any], export: Any
) -> list[Budget]:
    """Per budget: the ratio (per head count the variants need) and the conventional width matching it."""
    total = onnx_params(teacher)
    heads = sorted({int(INHERITED[v].get("heads", 1)) for v in variants if v in INHERITED} | {1})
    grams = calibration_grams(teacher, str(data), s.threads)
    out = []
    for fraction in s.budgets:
        target = fraction * total
        kw = {"rank_multiple": s.rank_multiple, "threads": s.threads, "grams": grams}
        plans = {h: match_ratio(teacher, target, str(data), heads=h, **kw) for h in heads}
        width = (
            conventional_width(plans[1]["params"], build, export)
            if set(variants) & {*CONVENTIONAL, *TORCH_TRAINED}
            else 0
        )
        width_params = 0
        if width:
            with tempfile.TemporaryDirectory() as tmp:
                import onnx

                width_params = onnx_params(onnx.load(export(build(width), Path(tmp) / "s.onnx")))
        out.append(Budget(fraction, target, plans, width, width_params, grams))
        say = ", ".join(f"heads {h}: ratio {p['ratio']:.4f} → {p['params']:,}" for h, p in plans.items())
        print(f"budget {fraction:.0%} of {total:,} = {target:,.0f}: {say}; conventional width {width}", flush=True)
    return out


def run(s: Settings, out: Path | None = None) -> dict[str, Any]:
    """The whole benchmark: per regime and budget, every variant over the seeds; each architecture's latency timed
    interleaved against the teacher when it first appears. With ``out``, the results so far are saved there
    after every variant (``inherit.json`` / ``.md``), so a run cut short still leaves its finished rows."""
    import onnx
    import torch

    from benchmarks.mnist import MnistResNet, cached_mnist_teacher, export, load_mnist

    torch.set_num_threads(s.threads)
    teacher_path, teacher_acc_torch = cached_mnist_teacher()
    teacher = onnx.load(str(teacher_path))
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    low_idx = np.sort(np.random.default_rng(LOW_SEED).choice(len(x), REGIMES["low"], replace=False))
    results = start_results(s, teacher, teacher_path, teacher_acc_torch, low_idx, xt, yt)
    keep = Path(tempfile.mkdtemp(prefix="bench_inherit_"))
    ctx = {"teacher": teacher, "teacher_path": teacher_path, "xt": xt, "yt": yt, "keep": keep, "s": s}
    for regime in s.regimes:
        idx = low_idx if regime == "low" else np.random.default_rng(LOW_SEED).permutation(len(x))[: s.full_images]
        data = write_npz(keep / f"{regime}.npz", input_name(teacher), x[idx], y[idx])
        entries = results["regimes"].setdefault(regime, {"train_images": int(len(idx)), "entries": []})["entries"]
        for b in plan_budgets(teacher, data, s, s.variants, MnistResNet, export):
            for v in s.variants:
                entries.append(run_variant(ctx, results, regime, data, b, v, x[idx[:1000]]))
                if out is not None:
                    save(finish(results, s, teacher_acc_torch), out, quiet=True)
    shutil.rmtree(keep, ignore_errors=True)
    return finish(results, s, teacher_acc_torch)


def start_results(
    s: Settings, teacher: ModelProto, teacher_path: Path, torch_acc: float, low_idx: np.ndarray, xt: Any, yt: Any
) -> dict[str, Any]:
    """The results' header: the teacher scored in ONNX Runtime, the settings, which images make the low regime."""
    acc = accuracy(teacher, xt, yt, s.threads)
    print(f"teacher: {onnx_params(teacher):,} params, test accuracy {acc:.4f}", flush=True)
    return {
        "teacher": {
            "path": str(teacher_path), "params": onnx_params(teacher), "accuracy": acc,
            "flops": flops(teacher, input_name(teacher), xt.shape[1:]), "torch_accuracy": torch_acc,
        },
        "settings": asdict(s),
        "low_regime_indices_sha256": hashlib.sha256(low_idx.tobytes()).hexdigest(),
        "regimes": {},
        "latency": {},
    }  # fmt: skip


def architecture(b: Budget, variant: str, ratio: float | None) -> str:
    """The latency table's key of a student's architecture: budget and kind, and for inherited students the plan's
    ratio (each regime plans its own ranks: 0.0895 and 0.0897 are two architectures)."""
    kind = "h3" if variant == "inhernet-h3" else "inh" if variant in INHERITED else "conv"
    return f"{b.fraction:g}-{kind}" + (f"-{ratio:.4f}" if ratio is not None else "")


def run_variant(
    ctx: dict[str, Any], results: dict[str, Any], regime: str, data: Path, b: Budget, v: str, bn_images: np.ndarray
) -> dict[str, Any]:
    """One variant over the seeds: its entry (accuracies, mean ± std, params, FLOPs); its architecture's latency
    timed against the teacher the first time it appears."""
    import onnx

    from benchmarks.mnist import MnistResNet, export

    teacher, s, xt, yt = ctx["teacher"], ctx["s"], ctx["xt"], ctx["yt"]
    accs, models, t0 = [], [], time.perf_counter()
    for seed in range(s.seeds):
        if v in INHERITED:
            m = inherited_student(teacher, data, b, v, s, seed, regime)
        elif v in TORCH_TRAINED:
            m = torch_bn_student(teacher, data, b, s, seed, MnistResNet, export, regime)
        else:
            m = conventional_student(teacher, data, b, v, s, seed, MnistResNet, export, regime, bn_images)
        accs.append(accuracy(m, xt, yt, s.threads))
        models.append(m)
        print(f"{regime} {b.fraction:.0%} {v} seed {seed}: {accs[-1]:.4f}", flush=True)
    ratio = b.plans[3 if v == "inhernet-h3" else 1]["ratio"] if v in INHERITED else None
    arch = architecture(b, v, ratio)
    if arch not in results["latency"]:
        path = ctx["keep"] / f"{arch}.onnx"
        onnx.save(models[0], str(path))
        lat = latency({arch: path}, ctx["teacher_path"], s)
        results["latency"][arch] = {"median_ms": lat[arch]["median_ms"], "teacher_ms": lat["teacher"]["median_ms"]}
    mean, std = mean_std(accs)
    return {
        "budget": b.fraction, "variant": v, "accuracies": accs, "mean": mean, "std": std,
        "params": onnx_params(models[0]), "flops": flops(models[0], input_name(teacher), xt.shape[1:]), "arch": arch,
        "ratio": ratio,
        "width": None if v in INHERITED else b.width, "time_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def finish(results: dict[str, Any], s: Settings, torch_acc: float) -> dict[str, Any]:
    """The teacher's latency (median of its interleaved runs) and the machine, added to ``results``."""
    import torch

    results["teacher"]["latency_ms"] = teacher_latency(results)
    results["machine"] = {
        "cpus": os.cpu_count(), "threads": s.threads, "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    return results


def teacher_latency(results: dict[str, Any]) -> float | None:
    """The teacher's latency: the median of its medians in the per-architecture interleaved runs (None: none yet)."""
    teacher_ms = [v["teacher_ms"] for v in results["latency"].values()]
    return float(np.median(teacher_ms)) if teacher_ms else None


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Several runs' results (e.g. one per budget, run side by side) as one: their entries per regime and their
    latencies together (an architecture timed by several runs: the first run's timing); the first run's header.
    Runs must share the training recipe (they may differ in budgets, variants and seeds: each row says its number
    of seeds)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"cannot merge: no such results file {missing[0]}")
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = runs[0]
    for r in runs[1:]:
        a, b = ({k: x["settings"][k] for k in RECIPE_SETTINGS} for x in (out, r))
        if a != b:
            raise SystemExit(f"cannot merge runs with different settings: {sorted(k for k in a if a[k] != b[k])}")
        for regime, body in r["regimes"].items():
            out["regimes"].setdefault(regime, {**body, "entries": []})["entries"] += body["entries"]
        for arch, timing in r["latency"].items():  # the first run that timed an architecture keeps its timing
            out["latency"].setdefault(arch, timing)
        out["settings"]["budgets"] = sorted({*out["settings"]["budgets"], *r["settings"]["budgets"]}, reverse=True)
        out["settings"]["seeds"] = max(out["settings"]["seeds"], r["settings"]["seeds"])
        out["settings"]["variants"] = [
            v for v in VARIANTS if v in {*out["settings"]["variants"], *r["settings"]["variants"]}
        ]
        out["time_s"] = max(out.get("time_s") or 0, r.get("time_s") or 0)
    out["teacher"]["latency_ms"] = teacher_latency(out)
    for body in out["regimes"].values():  # a variant run twice at a budget: the run with more seeds stands
        best: dict[tuple[float, str], dict[str, Any]] = {}
        for e in body["entries"]:
            key = (e["budget"], e["variant"])
            if key not in best or len(e["accuracies"]) > len(best[key]["accuracies"]):
                best[key] = e
        body["entries"] = sorted(best.values(), key=lambda e: (-e["budget"], VARIANTS.index(e["variant"])))
    return out


def rows(results: dict[str, Any]) -> list[list[Any]]:
    """One table row per regime × budget × variant."""
    from inhercc.report import human_count

    lat, t = results["latency"], results["teacher"]
    out = []
    for regime, r in results["regimes"].items():
        out.append([f"teacher ({regime})", "", f"{100 * t['accuracy']:.2f}", "", human_count(t["params"]),
                    human_count(t["flops"]), f"{t['latency_ms']:.3f}" if t.get("latency_ms") else "", ""])  # fmt: skip
        for e in r["entries"]:
            ms = lat.get(e["arch"], {}).get("median_ms")
            t_ms = lat.get(e["arch"], {}).get("teacher_ms")
            shape = f"ratio {e['ratio']:.4f}" if e["ratio"] is not None else f"width {e['width']}"
            out.append([
                f"{e['variant']} ({regime}, {e['budget']:.0%})", shape,
                f"{100 * e['mean']:.2f} ± {100 * e['std']:.2f}", len(e["accuracies"]), human_count(e["params"]),
                human_count(e["flops"]),
                f"{ms:.3f}" if ms is not None else "", f"{t_ms / ms:.2f}×" if ms and t_ms else "",
            ])  # fmt: skip
    return out


HEADERS = ["student", "shape", "test acc % (mean ± std)", "seeds", "params", "FLOPs", "latency ms", "speedup"]


def markdown(results: dict[str, Any]) -> str:
    from inhercc.report import format_markdown

    s, t = results["settings"], results["teacher"]
    lines = ["# Inherited vs same-size students on MNIST (real labels)", ""]
    if s["reduced"]:
        lines += [f"**Reduced run: {s['reduced']}** — not the issue's full protocol.", ""]
    lines += [
        f"Teacher: `{Path(t['path']).parent.name}`, {t['params']:,} params, test accuracy {100 * t['accuracy']:.2f} %"
        f" (ONNX Runtime, 10,000 test labels). Regimes: "
        + ", ".join(f"{k} ({v['train_images']:,} training images)" for k, v in results["regimes"].items())
        + f". Seeds {s['seeds']}, epochs {s['epochs']} (low regime {s['low_epochs'] or s['epochs']}), lr {s['lr']},"
        f" batch {s['batch_size']}, T {s['temperature']},"
        f" α (CE weight) {s['alpha']}, patience {s['patience']}, rank multiple {s['rank_multiple']}, val split 0.1,"
        f" threads {s['threads']}. Latency: batch 1, CPU, {s['bench_repeat']} rounds interleaved with the teacher"
        " (one run per architecture; speedup: the teacher's median in that run over the student's).",
        "",
        format_markdown(HEADERS, rows(results)),
        "",
        "Variants: `inhernet` compress (whitened SVD, InherNet split) + KD + CE; `inhernet-h3` 3 gated heads; "
        "`random-init` the same factor shapes, random init; `conventional` a thinner MnistResNet from scratch "
        "(batch-norm statistics of the random net measured on 1,000 training images, then folded by the export), "
        "all weights distilled; `*-ie` with IE-KD; `labels-only` the conventional student on CE alone (α = 1); "
        "`conventional-bn` the same thinner net trained in PyTorch with its batch norms (same objective, samples, "
        "optimizer, schedule and epochs), then exported.",
        "",
    ]
    m = results["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['processor']}), Python {m['python']}, torch {m['torch']}, "
                 f"load average at the end {m['load_average_1min_at_end']}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Accuracy (mean ± std) against params, one panel per regime, one series per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        entries = results["regimes"][regime]["entries"]
        for v in dict.fromkeys(e["variant"] for e in entries):
            es = sorted((e for e in entries if e["variant"] == v), key=lambda e: e["params"])
            ax.errorbar([e["params"] for e in es], [100 * e["mean"] for e in es], [100 * e["std"] for e in es],
                        marker="o", capsize=3, label=v)  # fmt: skip
        ax.axhline(100 * results["teacher"]["accuracy"], color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_title(f"{regime} ({results['regimes'][regime]['train_images']:,} images)")
        ax.set_xlabel("params")
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(results: dict[str, Any], out_dir: Path, quiet: bool = False) -> None:
    from inhercc.files import write_json, write_text_atomic
    from inhercc.report import format_table

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "inherit.json", results)
    write_text_atomic(out_dir / "inherit.md", markdown(results))
    if quiet:
        return
    print(format_table(HEADERS, rows(results)))
    try:
        plot(results, out_dir / "inherit.png")
    except ImportError as e:  # matplotlib missing: the JSON and markdown still stand
        print(f"no plot: {e}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    ap.add_argument("--seeds", type=int, default=d.seeds)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--low-epochs", type=int, default=None, help="epochs in the low regime (default --epochs)")
    ap.add_argument("--full-images", type=int, default=d.full_images, help="reduced runs: subsample the full regime")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(d.budgets), help="fractions of teacher params")
    ap.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(d.regimes))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(d.variants))
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="CE weight (1 − α on KD)")
    ap.add_argument("--patience", type=int, default=d.patience)
    ap.add_argument("--rank-multiple", type=int, default=d.rank_multiple)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--bench-repeat", type=int, default=d.bench_repeat)
    ap.add_argument(
        "--reduced", help="say in the results' header that this run is reduced, and how (with --merge: '' clears it)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", type=Path, nargs="+", help="combine these runs' inherit.json into one table")
    a = ap.parse_args(argv)
    s = Settings(
        seeds=a.seeds, epochs=a.epochs, low_epochs=a.low_epochs, full_images=a.full_images,
        budgets=tuple(a.budgets), regimes=tuple(a.regimes), variants=tuple(a.variants),
        lr=a.lr, batch_size=a.batch_size, temperature=a.temperature, alpha=a.alpha, patience=a.patience,
        rank_multiple=a.rank_multiple, threads=a.threads, bench_repeat=a.bench_repeat, reduced=a.reduced or "",
    )  # fmt: skip
    if a.merge:
        merged = merge(a.merge)
        if a.reduced is not None:  # else the first run's note stands
            merged["settings"]["reduced"] = a.reduced
        save(merged, a.out)
        return
    t0 = time.perf_counter()
    results = run(s, a.out)
    results["time_s"] = round(time.perf_counter() - t0, 1)
    save(results, a.out)


if __name__ == "__main__":
    main()
