"""ONNX Runtime latency harness (``inhercc bench``): what a student buys in milliseconds.

Measured the way ONNX Runtime's perf tool and Olive measure it:

* one session per model on the requested execution provider, which must be the one ONNX Runtime really
  uses (it silently falls back to CPU when CUDA libraries are missing; see :func:`inhercc.runtime.make_session`);
* inputs and outputs bound on the device with IO binding, so the timed loop has no host copies;
* every shape set warmed up on its own, then the models timed *interleaved* (A B A B …) so that drift on a
  shared machine hits all of them alike;
* p50/p90/p99 per model and the ratio of medians against the first model (the teacher) with a seeded
  paired-bootstrap confidence interval.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from inhercc.data import (
    available_memory,
    batch_axes,
    check_memory,
    confirmed_shapes,
    fixed_shape_flops,
    input_specs,
    parse_shapes,
    resolve_shapes,
    shape_text,
    synthetic_bytes,
    synthetic_feeds,
)
from inhercc.errors import InherccError
from inhercc.options import check_options, non_negative, option, positive
from inhercc.runtime import (  # noqa: F401  (the timing primitives are re-exported: they lived here)
    DEFAULT_REPEAT,
    DEFAULT_WARMUP,
    GPU_PROVIDERS,
    MIN_DURATION_ROUNDS,
    BoundRunner,
    Runner,
    make_session,
    ort_failures,
    provider_name,
    time_interleaved,
)

BENCH_FORMAT = "inhercc-bench"
BENCH_VERSION = 1
PROVIDERS = ("cuda", "cpu", "tensorrt")
CUDNN_ALGO_SEARCH = ("heuristic", "exhaustive", "default")  # ONNX Runtime spells them in capitals
OPT_LEVELS = ("disable", "basic", "extended", "all")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

ShapeSet = dict[str, list[int]]


def default_provider() -> str:
    """``cuda`` when a session can really run on the CUDA provider, else ``cpu``."""
    from inhercc.runtime import cuda_available

    return "cuda" if cuda_available() else "cpu"


def parse_shape_sets(items: Iterable[str]) -> list[ShapeSet]:
    """``--shape`` values → shape sets. Within a set every input is named once; a name that appears again
    starts the next set: ``ids=1x128 mask=1x128 ids=32x128 mask=32x128`` → two sets. Inputs whose dims
    share a symbolic name with a given one (``batch``, ``sequence``) follow it and need not be repeated."""
    sets: list[ShapeSet] = []
    current: ShapeSet = {}
    for item in items:
        ((name, dims),) = parse_shapes([item]).items()
        if name in current:
            sets.append(current)
            current = {}
        current[name] = dims
    if current:
        sets.append(current)
    return sets


def _at_least(low: int) -> Callable[[int], str | None]:
    """A check: an integer option's smallest sensible value."""
    return lambda value: f"must be at least {low}" if value is not None and value < low else None


def _open_unit_interval(value: float) -> str | None:
    """(0, 1): a confidence level."""
    return "must be in (0, 1)" if not 0.0 < value < 1.0 else None


def _lower(value: Any) -> Any:
    """Names compare in lower case (``CUDA``, ``EXHAUSTIVE`` as ONNX Runtime spells it)."""
    return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class BenchOptions:
    """How to run a benchmark, each option declared once (:func:`inhercc.options.option`): the options of
    ``inhercc bench`` are generated from these fields. ``shape_sets`` empty = one set resolved from the
    models (``batch`` for a leading dynamic dim); ``repeat`` and ``duration`` (seconds per shape set) are
    exclusive. :meth:`check` returns the checked copy with the context defaults filled in."""

    provider: str | None = option(
        None,
        choices=PROVIDERS,
        help="Execution provider.",
        default_text="cuda when a session can really use it, else cpu",
    )
    threads: int | None = option(None, check=positive, help="Intra-op threads.", default_text="ONNX Runtime's")
    opt_level: str = option("all", choices=OPT_LEVELS, help="ONNX Runtime graph optimization level.")
    shape_sets: list[ShapeSet] = option(
        [],
        flag="--shape",
        parse=parse_shape_sets,
        help="NAME=DIMS for dynamic dims, e.g. input_ids=32x128; a name given again starts another shape set "
        "(each warmed up and timed on its own).",
    )
    batch: int | None = option(None, check=positive, help="Leading dynamic dim not set by --shape.", default_text="1")
    warmup: int = option(DEFAULT_WARMUP, check=non_negative, help="Untimed runs per model and shape set.")
    repeat: int | None = option(
        None, check=_at_least(2), help="Timed rounds (A B A B …) per shape set.", default_text=str(DEFAULT_REPEAT)
    )
    duration: float | None = option(
        None, check=positive, help="Instead of --repeat: seconds of timed rounds per shape set."
    )
    cudnn_conv_algo_search: str = option(
        "heuristic",
        choices=CUDNN_ALGO_SEARCH,
        flag="--cudnn-algo",
        help="CUDA: cudnn_conv_algo_search (exhaustive also lengthens the warm-up).",
    )
    fp16: bool = option(False, help="CUDA/TensorRT: also time a float16 copy of every model.")
    cuda_graph: bool = option(False, help="CUDA: replay CUDA graphs when every model allows it.")
    seed: int = option(0, help="Synthetic inputs and bootstrap.")
    resamples: int = option(BOOTSTRAP_RESAMPLES, check=_at_least(100), cli=False, help="Bootstrap resamples.")
    confidence: float = option(
        CONFIDENCE, check=_open_unit_interval, cli=False, help="Confidence of the ratios' bootstrap interval."
    )

    def check(self) -> BenchOptions:
        """The checked copy (one-line :class:`InherccError` naming the field on a bad value), with the
        provider resolved (:func:`default_provider` when None), names in lower case and ``repeat`` filled
        when neither ``repeat`` nor ``duration`` is set."""
        out = replace(
            self,
            provider=_lower(self.provider or default_provider()),
            cudnn_conv_algo_search=_lower(self.cudnn_conv_algo_search),
        )
        check_options(out)
        if out.repeat is not None and out.duration is not None:
            raise InherccError("choose one of `repeat` and `duration`")
        if out.fp16 and out.provider not in GPU_PROVIDERS:
            raise InherccError("`fp16` needs `provider` cuda or tensorrt (the CPU provider has few fp16 kernels)")
        if out.cuda_graph and out.provider != "cuda":
            raise InherccError("`cuda_graph` needs `provider` cuda")
        return out if out.duration is not None or out.repeat is not None else replace(out, repeat=DEFAULT_REPEAT)

    def ort_cudnn_algo_search(self) -> str:
        """``cudnn_conv_algo_search`` as ONNX Runtime spells it (``HEURISTIC``)."""
        return self.cudnn_conv_algo_search.upper()


# ---------------------------------------------------------------------------------------------------------
# Statistics


def latency_stats(samples_ms: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """p50 / p90 / p99 / mean / std / min / max (ms) and the sample count."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def ratio_of_medians(
    reference: Sequence[float] | np.ndarray,
    other: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    paired: bool | None = None,
) -> dict[str, Any]:
    """``median(other) / median(reference)`` with a percentile-bootstrap confidence interval.

    ``paired`` (default: when both have the same length, as interleaved rounds do) resamples *rounds*, so a
    slow spell that hit both models in the same round stays paired; otherwise each sample is resampled
    on its own. Seeded: the same samples always give the same interval."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("no latency samples")
    if paired is None:
        paired = a.size == b.size
    if paired and a.size != b.size:
        raise ValueError("paired bootstrap needs the same number of samples")
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, min(resamples, 2_000_000 // max(a.size, b.size)))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        ia = rng.integers(0, a.size, size=(k, a.size))
        ib = ia if paired else rng.integers(0, b.size, size=(k, b.size))
        ratios[start : start + k] = np.median(b[ib], axis=1) / np.median(a[ia], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {
        "ratio": float(np.median(b) / np.median(a)),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "resamples": resamples,
        "paired": bool(paired),
        "seed": seed,
    }


# ---------------------------------------------------------------------------------------------------------
# Environment


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``, else the platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=4)
def gpu_model(device_id: int = 0) -> str:
    """The GPU name from ``nvidia-smi`` (``CUDA device N`` when it is not there)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"CUDA device {device_id}"


def device_description(provider: str) -> str:
    if provider in GPU_PROVIDERS:
        return gpu_model()
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def environment(options: BenchOptions, providers_used: Sequence[str]) -> dict[str, Any]:
    """What every result is recorded with: device, provider, ONNX Runtime version, threads, options."""
    import onnxruntime as ort

    from inhercc._version import __version__

    gpu = options.provider in GPU_PROVIDERS
    return {
        "provider": provider_name(options.provider),
        "providers_used": list(providers_used),
        "device": device_description(options.provider),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": options.threads,
        "opt_level": options.opt_level,
        "onnxruntime": ort.__version__,
        "onnxruntime_build": ort.get_device(),
        "inhercc": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cudnn_conv_algo_search": options.ort_cudnn_algo_search() if options.provider == "cuda" else None,
        "cuda_graph": options.cuda_graph if gpu else None,
        "io_binding": True,
    }


# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Subject:
    """One model at one precision: what gets timed."""

    label: str
    path: str
    precision: str
    model: ModelProto
    size_bytes: int
    session: Any = None


def fp16_copy(model: ModelProto) -> ModelProto:
    """A float16 copy (initializers and compute; inputs/outputs stay float32, ops without fp16 kernels are
    blocked): :func:`inhercc.precision.to_float16` with its default block list."""
    from inhercc.precision import to_float16

    return to_float16(model)


def labels_for(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """File stems, made unique (``student``, ``student#2``); a bare ``model`` gets its folder's name."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        base = path.stem if path.stem != "model" or not path.parent.name else f"{path.parent.name}/{path.stem}"
        label, i = base, 2
        while label in out:
            label, i = f"{base}#{i}", i + 1
        out.append(label)
    return out


def session_setup(options: BenchOptions, cuda_graph: bool) -> tuple[list[str], list[dict[str, str]], str]:
    """Providers, their options and the IO-binding device for the requested provider (TensorRT falls back
    to CUDA, not to the CPU, for the nodes it does not take)."""
    cuda_opts = {"device_id": "0", "cudnn_conv_algo_search": options.ort_cudnn_algo_search()}
    if cuda_graph:
        cuda_opts["enable_cuda_graph"] = "1"
    if options.provider == "cuda":
        return ["cuda"], [cuda_opts], "cuda"
    if options.provider == "tensorrt":
        return ["tensorrt", "cuda"], [{"device_id": "0"}, cuda_opts], "cuda"
    return ["cpu"], [{}], "cpu"


def _open(subject: Subject, options: BenchOptions, cuda_graph: bool) -> Any:
    providers, provider_options, _ = session_setup(options, cuda_graph)
    source: ModelProto | str = subject.model if subject.precision == "fp16" else subject.path
    return make_session(
        source,
        providers,
        threads=options.threads,
        opt_level=options.opt_level,
        provider_options=provider_options,
        require=True,
    )


def load_subjects(
    paths: Sequence[str | os.PathLike[str]], options: BenchOptions, labels: Sequence[str] | None = None
) -> list[Subject]:
    from inhercc.model import file_size, load_model

    if labels is not None and (len(labels) != len(paths) or len(set(labels)) != len(labels)):
        raise InherccError("give one distinct label per model")
    subjects = []
    for label, p in zip(labels or labels_for(paths), paths):
        model = load_model(p)
        subjects.append(Subject(label, str(p), "fp32", model, file_size(p)))
    if options.fp16:
        from inhercc.model import model_bytes

        for s in list(subjects):
            half = fp16_copy(s.model)
            subjects.append(Subject(f"{s.label} fp16", s.path, "fp16", half, model_bytes(half)))
    return subjects


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def bench(
    models: Sequence[str | os.PathLike[str]],
    options: BenchOptions | None = None,
    *,
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``models`` (the first is the reference, normally the teacher) on ONNX Runtime; returns the
    JSON-ready result (format ``inhercc-bench``): environment, per-model params/FLOPs/size and, per shape
    set, each model's latency distribution, throughput and ratio of medians to the reference. ``labels``
    name the models (default: the file stems)."""
    say = log or (lambda _msg: None)
    options = _checked_options(models, options)
    subjects = load_subjects(models, options, labels)
    shape_sets = options.shape_sets or [{}]
    concrete, chosen = bench_shapes(subjects, shape_sets, options.batch)

    notes: list[str] = []
    cuda_graph = options.cuda_graph
    warmup = _warmup_runs(options, notes)
    say(f"opening {len(subjects)} session(s) on {provider_name(options.provider)}")
    providers_used = _open_sessions(subjects, options)
    runs = []
    for k, shape_set in enumerate(shape_sets):
        shapes_k = [c[k] for c in concrete]
        title = f"shape set {k + 1}/{len(shape_sets)} {shape_text(shapes_k[0])}"
        samples, cuda_graph = _time_shape_set(subjects, shapes_k, options, cuda_graph, warmup, notes, say, title)
        runs.append(_shape_set_entry(subjects, shapes_k, samples, options, shape_set, chosen[k]))
    if options.cuda_graph and not cuda_graph:
        notes.append("CUDA graphs were requested but not used (see the note above)")
    return _bench_document(subjects, options, providers_used, warmup, cuda_graph, runs, notes)


def _checked_options(models: Sequence[str | os.PathLike[str]], options: BenchOptions | None) -> BenchOptions:
    """The checked options (the defaults when none are given), after making sure every model file exists."""
    if not models:
        raise InherccError("bench needs at least one model")
    options = (options or BenchOptions()).check()
    for p in models:
        if not Path(p).is_file():
            raise InherccError(f"no such file: {p}")
    return options


def _warmup_runs(options: BenchOptions, notes: list[str]) -> int:
    """Warm-up runs per shape set: cuDNN's EXHAUSTIVE search tries every convolution algorithm in the first
    runs, so those would land in the timing; the warm-up is raised for it (and the notes say so)."""
    warmup = options.warmup
    if options.provider == "cuda" and options.cudnn_conv_algo_search == "exhaustive":
        warmup = max(2 * warmup, warmup + 10)
        notes.append(f"cuDNN EXHAUSTIVE algo search: warm-up raised to {warmup} runs per shape set")
    return warmup


def _open_sessions(subjects: Sequence[Subject], options: BenchOptions) -> list[str]:
    """One plain (no CUDA graph) session per subject; returns the providers ONNX Runtime really uses."""
    for s in subjects:
        s.session = _open(s, options, cuda_graph=False)
    return subjects[0].session.get_providers()


def _time_shape_set(
    subjects: Sequence[Subject],
    shapes: Sequence[ShapeSet],
    options: BenchOptions,
    cuda_graph: bool,
    warmup: int,
    notes: list[str],
    say: Callable[[str], None],
    title: str,
) -> tuple[list[np.ndarray], bool]:
    """Every subject's latency samples (ms) at one shape set, warmed up on it and timed interleaved, and
    whether CUDA graphs are still in use: when one model cannot be captured, all models (here and at the
    later shape sets) run without, so that the ratios stay fair."""
    check_input_memory(subjects, shapes)
    with ort_failures(f"benchmarking at {shape_text(shapes[0])}"):
        runners = _runners(subjects, shapes, options, cuda_graph, notes)
        if runners is None:
            cuda_graph = False
            runners = _runners(subjects, shapes, options, False, notes)
        assert runners is not None
        say(f"{title}: warm-up {warmup}, timing")
        samples = time_interleaved(runners, warmup=warmup, repeat=options.repeat, duration=options.duration)
    return samples, cuda_graph


def _shape_set_entry(
    subjects: Sequence[Subject],
    shapes: Sequence[ShapeSet],
    samples: Sequence[np.ndarray],
    options: BenchOptions,
    requested: ShapeSet,
    chosen: str,
) -> dict[str, Any]:
    """One element of the result's ``runs``: the shapes (``requested`` by the user, ``chosen`` ``given`` or
    ``default``), samples per run, timing rounds, FLOPs per sample and each model's result."""
    batch = _batch_of(subjects[0].model, shapes[0])
    results = _model_results(subjects, shapes, samples, options, batch)
    flops = {s.label: fixed_shape_flops(s.model, shapes[i])[0] for i, s in enumerate(subjects)}
    return {
        "shapes": shapes[0],
        "requested": requested,
        "shapes_chosen": chosen,
        "batch": batch,
        "rounds": int(len(samples[0])),
        "flops_per_sample": flops,
        "results": results,
    }


def _model_results(
    subjects: Sequence[Subject],
    shapes: Sequence[ShapeSet],
    samples: Sequence[np.ndarray],
    options: BenchOptions,
    batch: int,
) -> list[dict[str, Any]]:
    """Each model's latency distribution, throughput and ratio of medians (with its bootstrap interval) to
    the first model of the same precision, which is its reference (and has no ratio)."""
    results = []
    for i, (s, lat) in enumerate(zip(subjects, samples)):
        stats = latency_stats(lat)
        ref = next(j for j, r in enumerate(subjects) if r.precision == s.precision)
        ratio = None
        if i != ref:
            ratio = ratio_of_medians(
                samples[ref], lat, resamples=options.resamples, confidence=options.confidence, seed=options.seed
            )
        results.append(
            {
                "model": s.label,
                "precision": s.precision,
                "reference": subjects[ref].label,
                "latency_ms": stats,
                "throughput_per_s": batch / (stats["p50"] / 1e3) if stats["p50"] > 0 else None,
                "ratio_to_reference": ratio,
                "provider": provider_name(options.provider),
                "device": device_description(options.provider),
                "threads": options.threads,
                "shapes": shapes[i],
                "samples_ms": [round(float(x), 6) for x in lat],
            }
        )
    return results


def _bench_document(
    subjects: Sequence[Subject],
    options: BenchOptions,
    providers_used: list[str],
    warmup: int,
    cuda_graph: bool,
    runs: list[dict[str, Any]],
    notes: list[str],
) -> dict[str, Any]:
    """The ``inhercc-bench`` result: environment, the settings really used (warm-up as raised, CUDA graphs
    only when used), per-model params/size/FLOPs (at the first shape set), the runs and the notes."""
    from inhercc.model import float_param_count

    settings = asdict(options)
    settings.update({"cudnn_conv_algo_search": options.ort_cudnn_algo_search()})  # the format's spelling
    settings.update({"warmup": warmup, "interleaved": True, "cuda_graph": cuda_graph if options.cuda_graph else False})
    models_out = [
        {
            "label": s.label,
            "path": s.path,
            "precision": s.precision,
            "params": float_param_count(s.model),
            "size_bytes": s.size_bytes,
            "flops_per_sample": runs[0]["flops_per_sample"][s.label] if runs else None,
        }
        for s in subjects
    ]
    return {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "environment": environment(options, providers_used),
        "settings": settings,
        "models": models_out,
        "runs": runs,
        "notes": notes,
    }


def bench_shapes(
    subjects: Sequence[Subject], shape_sets: Sequence[ShapeSet], batch: int | None
) -> tuple[list[list[dict[str, list[int]]]], list[str]]:
    """Concrete shapes per subject and shape set, and per shape set whether they were ``given`` or chosen
    (``default``): dynamic dims no ``--shape`` fixes are chosen on the reference model
    (:func:`inhercc.data.confirmed_shapes`, said in one warning) and shared by the models with its inputs."""
    reference = subjects[0].model
    names = [s.name for s in input_specs(reference)]
    concrete: list[list[dict[str, list[int]]]] = [[] for _ in subjects]
    chosen = []
    for shape_set in shape_sets:
        values, note = confirmed_shapes(reference, batch or 1, shape_set)
        if note:
            warnings.warn(note, stacklevel=3)
        chosen.append("default" if note or not shape_set else "given")
        for i, s in enumerate(subjects):
            specs = input_specs(s.model)
            same = [x.name for x in specs] == names
            concrete[i].append(values if same else resolve_shapes(specs, shape_set, batch, model=s.model))
    return concrete, chosen


def check_input_memory(subjects: Sequence[Subject], shapes: Sequence[ShapeSet]) -> None:
    """A one-line error before allocating when the synthetic inputs of one shape set (every model's, plus
    the largest temporary draw) would not fit in the memory available."""
    sizes = [synthetic_bytes(s.model, shape) for s, shape in zip(subjects, shapes)]
    need = sum(total for total, _ in sizes) + max((biggest for _, biggest in sizes), default=0)
    check_memory(need, f"`shape_sets` {shape_text(shapes[0])}: the inputs", available_memory())


def _runners(
    subjects: Sequence[Subject], shapes: Sequence[ShapeSet], options: BenchOptions, cuda_graph: bool, notes: list[str]
) -> list[Runner] | None:
    _, _, device = session_setup(options, cuda_graph)
    runners: list[Runner] = []
    for s, shape in zip(subjects, shapes):
        feeds = synthetic_feeds(s.model, shape, seed=options.seed)
        plain = BoundRunner(s.session, feeds, device, None)
        if not cuda_graph:
            runners.append(plain)
            continue
        plain()  # one plain run gives the output shapes to pre-allocate
        try:
            graph_session = _open(s, options, cuda_graph=True)
            runners.append(BoundRunner(graph_session, feeds, device, plain.output_specs()))
            runners[-1]()  # capture now: a model that cannot be captured fails here, not in the timed loop
        except Exception as e:  # ORT raises plain RuntimeErrors
            notes.append(f"CUDA graph not possible for {s.label}: {' '.join(str(e).split())[:200]}")
            return None
    return runners


def _batch_of(model: ModelProto, shapes: ShapeSet) -> int:
    """Samples per run at ``shapes``: the size of the first input's batch axis (:func:`inhercc.data.batch_axes`)."""
    axes = batch_axes(model)
    return next((int(v[a]) for k, v in shapes.items() if (a := axes.get(k)) is not None and a < len(v)), 1)
