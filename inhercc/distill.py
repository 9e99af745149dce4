"""Distillation: fine-tune an inherited student from its teacher.

The teacher runs in ONNX Runtime (its outputs computed once per sample and cached when they fit in memory;
one batch ahead in a worker thread when it has cores of its own); the student runs forward and backward in
torch through :class:`inhercc.torchrt.OnnxModule`, whose parameters are the student's initializers, and is
written back into the ONNX graph at the end. AdamW with a warm-up + cosine schedule and gradient clipping;
validation fidelity (mean cosine to the teacher on held-out samples) after every epoch; the best weights are
kept; early stop; checkpoints and resume.

Under ``torchrun --nproc_per_node N`` it trains data-parallel with DDP (NCCL on GPU, gloo on CPU): every
rank sees the same shuffled global batches and takes its own slice of each; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto

from inhercc.data import (
    LABELS_KEY,
    Axes,
    Feed,
    Samples,
    batch_axes,
    cast_feeds,
    input_specs,
    open_samples,
    slice_batch,
    split_indices,
    take_samples,
)
from inhercc.errors import InherccError
from inhercc.files import CHECKPOINT_FILE, write_atomic
from inhercc.losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DistillLoss
from inhercc.model import FLOAT_TYPES, as_model, one_line
from inhercc.progress import Progress
from inhercc.runtime import DataWarning, model_fixed_batch
from inhercc.verify import Scores, graph_class_axes, graph_output_kinds, mean_cosine

FACTOR_PATTERN = re.compile(r"\.inherit_(in|out)(_\d+)?$")
TRAIN_MODES = ("factors", "all")
DEFAULT_EPOCHS = 3
DEFAULT_CACHE_BYTES = 1 << 30
CHECKPOINT_FORMAT = 1
# Settings that shape the trajectory: resuming with other values would not continue the same run.
_RESUME_KEYS = (
    "lr",
    "batch_size",
    "weight_decay",
    "warmup",
    "clip",
    "temperature",
    "alpha",
    "losses",
    "feature_loss",
    "features",
    "train",
    "val_split",
    "seed",
    "rebalance",
    "precision",
    "output_kinds",
)
_RESUME_DEFAULTS: dict[str, Any] = {"precision": "fp32", "features": "layers", "output_kinds": {}}
PRECISIONS = ("fp32", "bf16")


@dataclass
class DistillConfig:
    """Every knob of :func:`distill` (the CLI options map one to one)."""

    epochs: int | None = None  # default DEFAULT_EPOCHS unless ``steps`` is given
    steps: int | None = None  # optimizer steps in all (overrides epochs)
    lr: float = 5e-4
    batch_size: int = 32  # per process; the global batch is batch_size × world size
    weight_decay: float = 0.0  # decay pulls inherited weights away from the teacher's: off by default
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    clip: float | None = 1.0  # gradient-norm clipping
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA  # weight of the cross-entropy on ``_labels``
    losses: dict[str, tuple[str, float]] = field(default_factory=dict)  # {output: (kind, weight)} overrides
    # {output: "logits" | "probs" | "embedding" | "values"}: what an output is, where the graph misleads
    output_kinds: dict[str, str] = field(default_factory=dict)
    feature_loss: float = 0.0  # weight of the feature inheritance loss (0 = off)
    # what the feature loss compares: "layers" (each factorized layer's output), "norms" (the outputs of the
    # normalization nodes: each block's hidden state, as TinyBERT matches them), or a regex over tensor names
    features: str = "layers"
    train: str = "factors"  # "factors" | "all" | a regex over initializer names
    val_split: float = 0.1
    seed: int = 0
    patience: int | None = 3  # evaluations without improvement before stopping (None = never)
    eval_every: int | None = None  # steps between validations (default: once per epoch)
    cache_teacher: bool | None = None  # None: cache when the teacher outputs fit in DEFAULT_CACHE_BYTES
    checkpoint: str | None = None  # folder for checkpoint.pt
    checkpoint_every: int | None = None  # steps between checkpoints (default: at every validation)
    resume: bool = False  # continue from the checkpoint in ``checkpoint`` when there is one
    device: str | None = None  # "cpu" | "cuda" | "cuda:N"; default cuda when available
    quiet: bool = False  # no progress bar and no per-epoch lines
    synthetic_samples: int = 256  # samples drawn from the input specs when no data is given
    rebalance: bool = True  # equalize the scale of each factor pair before training (product unchanged)
    threads: int | None = None  # torch and ONNX Runtime intra-op threads (default: theirs)
    # "bf16": the student's training forward under torch.autocast (bfloat16 matrix products, about twice the
    # steps per second on CPUs with AVX512-BF16/AMX and on GPUs); losses, weights, optimizer state and the
    # validation stay float32, so the kept weights are scored exactly as ONNX Runtime will run them
    precision: str = "fp32"
    # the teacher's outputs for the next batch are computed in a worker thread while the student trains on
    # this one (ONNX Runtime releases the GIL), so the teacher costs no time where it has cores to itself.
    # None: on a GPU, or on CPU when ``threads`` leaves as many cores to the teacher (2 cores, threads 1:
    # 0.48 s per MiniLM step against 0.75 s inline; torch and the teacher both on all cores: 0.58 against
    # 0.50 inline, so not then)
    prefetch: bool | None = None

    def check(self) -> None:
        """Every setting valid (an :class:`InherccError` naming the option otherwise), before any work."""
        for f in fields(self):  # NaN passes every comparison below, and ±inf most: refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InherccError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        for output, (_kind, weight) in self.losses.items():
            if not math.isfinite(weight) or weight < 0:
                raise InherccError(f"--loss {output}: weight must be a finite number ≥ 0, got {weight}")
        for name in ("epochs", "steps", "batch_size", "eval_every", "checkpoint_every", "synthetic_samples", "threads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise InherccError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.patience is not None and self.patience <= 0:
            raise InherccError(f"--patience must be positive, got {self.patience}")
        if not self.lr > 0:
            raise InherccError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise InherccError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.clip is not None and self.clip <= 0:
            raise InherccError(f"--clip must be positive, got {self.clip}")
        for name in ("weight_decay", "feature_loss"):
            if getattr(self, name) < 0:
                raise InherccError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if self.features != "layers" and not self.feature_loss > 0:
            raise InherccError(f"--features {self.features} chooses what --feature-loss compares: give --feature-loss")
        if self.resume and not self.checkpoint:
            raise InherccError("--resume needs --checkpoint DIR")
        if self.precision not in PRECISIONS:
            raise InherccError(f"unknown --precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")


def _as_float32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reduced-precision floating outputs of an autocast forward back to float32 (losses run in float32)."""
    return [t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in tensors]


@dataclass
class DistillResult:
    """The fine-tuned student and the report entries ``fidelity_before``, ``fidelity`` and ``training``."""

    model: ModelProto
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 of a torchrun/DDP run (and in a plain single process): the one that writes files."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_processes(device_type: str) -> Processes:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) when ``WORLD_SIZE`` > 1."""
    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), local, False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    if not dist.is_available():
        raise InherccError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local, True)


def resolve_device(device: str | None, procs: Processes | None = None) -> torch.device:
    """``cpu``, ``cuda`` (this rank's GPU under torchrun) or ``cuda:N``; default cuda when available."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise InherccError(f"unknown --device {name!r}; choose cpu or cuda")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InherccError(f"--device {name} but torch sees no CUDA GPU")
        if name == "cuda":
            return torch.device("cuda", (procs.local_rank if procs else 0) % torch.cuda.device_count())
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------
# What is trained, and what the feature loss compares


def factor_names(names: Iterable[str]) -> list[str]:
    """The factor initializers (``<weight>.inherit_in`` / ``.inherit_out``) among ``names``."""
    return [n for n in names if FACTOR_PATTERN.search(n)]


def select_trainable(model: ModelProto, train: str = "factors") -> list[str]:
    """Names of the initializers to train: ``factors`` (the inherited factor chains), ``all`` (every float
    initializer with more than one element — scalars are constants such as epsilons), or a regex matched
    (``re.search``) against the names of those."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    floats = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES]
    if train == "factors":
        chosen = factor_names(floats)
        if not chosen:
            raise InherccError(
                "the student has no factor initializers (<weight>.inherit_in/.inherit_out): is it a compressed "
                "student? use --train all or a regex to train other weights"
            )
        return chosen
    if train == "all":
        return [n for n in floats if sizes[n] > 1]
    try:
        pattern = re.compile(train)
    except re.error as e:
        raise InherccError(f"--train {train!r} is neither factors, all nor a valid regex: {e}") from None
    chosen = [n for n in floats if sizes[n] > 1 and pattern.search(n)]
    if not chosen:
        raise InherccError(f"--train {train!r} matches no float initializer of the student")
    return chosen


def rebalance_factors(params: Mapping[str, torch.nn.Parameter], trainable: Iterable[str]) -> int:
    """Rescale each factor chain's input factors by ``c`` and its output factors by ``1/c`` so both have the
    same RMS: the product — the student's function — is unchanged, but an optimizer with one learning
    rate no longer meets factors 10⁵ times apart in scale (whitened factors: ``S⁻ᵀU`` is tiny, ``ΣVᵀ``
    huge). Chains are grouped by weight name (every chain of a group runs through one ``inherit_in`` and
    one ``inherit_out`` of it, heads included); only groups whose factors are all trained are touched.
    Returns the number of groups rescaled."""
    trainable = set(trainable)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for name in factor_names(params):
        m = FACTOR_PATTERN.search(name)
        assert m is not None
        ins, outs = groups.setdefault(name[: m.start()], ([], []))
        (ins if m.group(1) == "in" else outs).append(name)
    done = 0
    with torch.no_grad():
        for ins, outs in groups.values():
            if not ins or not outs or not all(n in trainable for n in ins + outs):
                continue
            rms_in = torch.sqrt(sum(params[n].float().pow(2).sum() for n in ins) / sum(params[n].numel() for n in ins))
            rms_out = torch.sqrt(
                sum(params[n].float().pow(2).sum() for n in outs) / sum(params[n].numel() for n in outs)
            )
            if not (rms_in > 0 and rms_out > 0):
                continue
            c = torch.sqrt(rms_out / rms_in)
            for n in ins:
                params[n].mul_(c.to(params[n].dtype))
            for n in outs:
                params[n].div_(c.to(params[n].dtype))
            done += 1
    return done


def inherited_outputs(student: ModelProto, teacher: ModelProto) -> list[str]:
    """Tensors produced in both graphs by different nodes — the outputs of the factorized layers (a factor
    chain keeps the original node's output name) —, graph outputs excluded, in student order."""
    teacher_by = {o: n.name or f"#{i}" for i, n in enumerate(teacher.graph.node) for o in n.output if o}
    graph_out = {o.name for o in student.graph.output}
    out = []
    for i, node in enumerate(student.graph.node):
        for o in node.output:
            if o and o in teacher_by and o not in graph_out and teacher_by[o] != (node.name or f"#{i}"):
                out.append(o)
    return out


# Normalization ops whose output is a block's hidden state (the residual stream of a transformer).
NORM_OPS = frozenset(
    {
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
    }
)


def norm_outputs(model: ModelProto) -> list[str]:
    """Every normalization's output, in graph order: the first output of a :data:`NORM_OPS` node, and the end
    of a normalization an exporter wrote out in primitive ops (LayerNorm before opset 17, RMSNorm):
    ``x / Sqrt(ReduceMean(…) [+ ε])`` or ``x · Reciprocal(Sqrt(…))``, followed by its elementwise affine (a
    ``Mul`` by γ, then an ``Add`` of β, constant operands) when it has one."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}

    def sqrt_mean(name: str) -> bool:
        """Whether ``name`` is ``Sqrt(ReduceMean(…) [+ ε])``."""
        node = producer.get(name)
        if node is None or node.op_type != "Sqrt":
            return False
        node = producer.get(node.input[0])
        if node is not None and node.op_type == "Add":  # + ε
            node = next(
                (producer[i] for i in node.input if i in producer and producer[i].op_type == "ReduceMean"), None
            )
        return node is not None and node.op_type == "ReduceMean"

    def inverse_sqrt_mean(name: str) -> bool:
        """Whether ``name`` is ``Reciprocal(Sqrt(…))`` or ``c / Sqrt(…)`` (how exporters write rsqrt)."""
        node = producer.get(name)
        if node is not None and node.op_type == "Reciprocal":
            return sqrt_mean(node.input[0])
        return node is not None and node.op_type == "Div" and node.input[0] in constants and sqrt_mean(node.input[1])

    out = []
    for node in model.graph.node:
        if node.op_type in NORM_OPS and node.output:
            out.append(node.output[0])
            continue
        ins = list(node.input)
        normalizes = (node.op_type == "Div" and len(ins) == 2 and ins[0] not in constants and sqrt_mean(ins[1])) or (
            node.op_type == "Mul"
            and len(ins) == 2
            and any(inverse_sqrt_mean(a) and b not in constants for a, b in (ins, ins[::-1]))
        )
        if not normalizes:
            continue
        end = node.output[0]
        for op in ("Mul", "Add"):  # the affine: γ, then β
            users = readers.get(end, [])
            if len(users) == 1 and users[0].op_type == op and any(i in constants for i in users[0].input if i != end):
                end = users[0].output[0]
        out.append(end)
    return out


def feature_tensors(student: ModelProto, teacher: ModelProto, which: str = "layers") -> list[str]:
    """The tensors the feature loss compares, named alike in both graphs (graph outputs excluded, student
    order): ``layers`` — :func:`inherited_outputs`; ``norms`` — every normalization's output
    (:func:`norm_outputs`); anything else is a regex (``re.search``) over tensor names."""
    if which == "layers":
        found = inherited_outputs(student, teacher)
        if not found:
            raise InherccError("--feature-loss: the student has no factorized layer whose output the teacher also has")
        return found
    produced = {o for n in teacher.graph.node for o in n.output if o}
    graph_out = {o.name for o in student.graph.output}
    if which == "norms":
        wanted = set(norm_outputs(teacher))
        found = [o for o in norm_outputs(student) if o in wanted and o not in graph_out]
        if not found:
            raise InherccError(
                "--features norms: the graphs have no normalization (LayerNormalization, BatchNormalization, … or "
                "one written out in primitive ops) in common; give a regex over tensor names"
            )
        return found
    try:
        pattern = re.compile(which)
    except re.error as e:
        raise InherccError(f"--features {which!r} is neither layers, norms nor a valid regex: {e}") from None
    found = list(
        dict.fromkeys(
            o
            for n in student.graph.node
            for o in n.output
            if o and o in produced and o not in graph_out and pattern.search(o)
        )
    )
    if not found:
        raise InherccError(f"--features {which!r} matches no tensor computed by both the student and the teacher")
    return found


def _signature(specs: Iterable[Any]) -> str:
    """``x float32 [batch, 64], mask int64 [batch, seq]``: what a model takes."""
    return ", ".join(f"{s.name} {np.dtype(s.dtype).name} [{', '.join(str(d or '?') for d in s.shape)}]" for s in specs)


def _compatible(a: Any, b: Any) -> bool:
    """Two input specs take the same data: one dtype, one rank, equal dims where both fix them."""
    fixed = [(x, y) for x, y in zip(a.shape, b.shape) if isinstance(x, int) and x > 0 and isinstance(y, int) and y > 0]
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(x == y for x, y in fixed)


def check_pair(student: ModelProto, teacher: ModelProto, files: str = "") -> None:
    """Student and teacher must take the same inputs (names, dtypes, ranks, fixed dims) and give the same
    outputs: one line naming both otherwise (``files``: where they come from, for the message)."""
    s_specs, t_specs = {s.name: s for s in input_specs(student)}, {s.name: s for s in input_specs(teacher)}
    where = f" ({files})" if files else ""
    if set(s_specs) != set(t_specs) or not all(_compatible(s_specs[n], t_specs[n]) for n in s_specs):
        ours, theirs = _signature(s_specs.values()), _signature(t_specs.values())
        raise InherccError(f"student inputs {ours} differ from teacher inputs {theirs}{where}")
    so, to = [o.name for o in student.graph.output], [o.name for o in teacher.graph.output]
    if so != to:
        raise InherccError(f"student outputs {', '.join(so)} differ from teacher outputs {', '.join(to)}{where}")


# ---------------------------------------------------------------------------------------------------------
# The teacher


class Teacher:
    """The teacher in ONNX Runtime with the feature tensors exposed. Its per-sample outputs are cached by
    sample index: validation samples always, training samples when ``cache`` is True, or — ``cache`` None —
    when those of the whole training set fit in ``DEFAULT_CACHE_BYTES`` (judged on the first batch)."""

    def __init__(
        self,
        model: ModelProto,
        features: Sequence[str],
        provider: str,
        device_id: int,
        cache: bool | None,
        train_samples: int,
        threads: int | None = None,
        spin: bool = True,
        output_kinds: Mapping[str, str] | None = None,
    ) -> None:
        from inhercc.calibrate import with_outputs
        from inhercc.runtime import make_session
        from inhercc.specs import mask_input

        self.model = model
        self.outputs = [o.name for o in model.graph.output]
        self.kinds = graph_output_kinds(model, output_kinds)
        self.class_axes = graph_class_axes(model)
        self.axes = batch_axes(model)
        self.fixed = model_fixed_batch(model)  # runs take exactly this many samples
        self.mask_name = mask_input(model)
        self.features = list(features)
        exposed, _ = with_outputs(model, self.outputs + self.features)
        options = [{"device_id": str(device_id)}] if provider == "cuda" else None
        self.session = make_session(exposed, [provider], threads=threads, provider_options=options, spin=spin)
        self.provider = provider
        self.train_samples = train_samples
        self.cache_train = cache
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def run(self, feeds: Feed, features: bool) -> list[np.ndarray]:
        """One ONNX Runtime run: the graph outputs, then (``features``) the feature tensors."""
        from inhercc.runtime import ort_failures

        names = self.outputs + (self.features if features else [])
        with ort_failures("distillation (the teacher)"):
            return list(self.session.run(names, cast_feeds(feeds, self.model)))

    def __call__(
        self, idx: np.ndarray, feeds: Feed, *, features: bool, train: bool = True
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Outputs and (when asked) feature tensors for the samples ``idx`` whose inputs are ``feeds``."""
        n_out = len(self.outputs)
        names = self.outputs + (self.features if features else [])
        rows: list[tuple[np.ndarray, ...] | None] = [self._cache.get(int(i)) for i in idx]
        rows = [r if r is not None and len(r) >= len(names) else None for r in rows]
        miss = [j for j, r in enumerate(rows) if r is None]
        if miss and self.fixed:
            miss = list(range(len(idx)))  # a fixed batch dim runs whole batches only
        if miss:
            sub = feeds if len(miss) == len(idx) else take_samples(feeds, self.axes, np.asarray(miss))
            values = self.run(sub, features)
            axes = [self._axis(n) for n in names]
            if not all(a is not None and v.ndim > a and v.shape[a] == len(miss) for v, a in zip(values, axes)):
                values = values if len(miss) == len(idx) else self.run(feeds, features)  # not per sample: no cache
                return values[:n_out], values[n_out:]
            if train and self.cache_train is None:
                per_sample = sum(v.nbytes for v in values) / len(miss)
                self.cache_train = per_sample * self.train_samples <= DEFAULT_CACHE_BYTES
            keep = not train or self.cache_train
            for r, j in enumerate(miss):
                rows[j] = tuple(np.take(v, r, axis=a) for v, a in zip(values, axes))
                if keep:
                    self._cache[int(idx[j])] = rows[j]
            if len(miss) == len(idx):
                return values[:n_out], values[n_out:]
        stacked = [np.stack([r[k] for r in rows], axis=self._axis(n)) for k, n in enumerate(names)]  # type: ignore[index]
        return stacked[:n_out], stacked[n_out:]

    def _axis(self, name: str) -> int | None:
        """The batch axis of an output (:func:`~inhercc.data.batch_axes`; None: shared by all samples) or of a
        feature tensor (axis 0, as the layers of a batch-major model compute)."""
        return self.axes.get(name, 0)

    def scores(self) -> Scores:
        """Empty fidelity sums for every output (its kind and batch axis known)."""
        return Scores(self.kinds, self.axes, self.class_axes)

    def mask(self, feeds: Feed) -> np.ndarray | None:
        """The batch's attention mask (padding left out of token-level scores), None without one."""
        return feeds.get(self.mask_name) if self.mask_name else None

    def batches(self, samples: Samples, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, Feed]]:
        """Unshuffled batches of ``indices`` for scoring: with a fixed batch dim, whole batches only."""
        return (
            samples.batches(indices, batch_size, min_rows=batch_size if self.fixed else 1) if len(indices) else iter(())
        )

    @property
    def caching(self) -> bool:
        """Whether training samples' teacher outputs are cached."""
        return bool(self.cache_train)


# ---------------------------------------------------------------------------------------------------------
# The loop


def _as_torch(feeds: Feed, model: ModelProto, device: torch.device) -> dict[str, torch.Tensor]:
    from inhercc.torchrt.dtypes import from_numpy

    return {k: from_numpy(v).to(device) for k, v in cast_feeds(feeds, model).items()}


def _local(idx: np.ndarray, feeds: Feed, procs: Processes, axes: Axes) -> tuple[np.ndarray, Feed]:
    """This rank's contiguous slice of a global batch (each input cut along its batch axis ``axes``)."""
    if procs.world == 1:
        return idx, feeds
    n = len(idx)
    lo, hi = n * procs.rank // procs.world, n * (procs.rank + 1) // procs.world
    return idx[lo:hi], slice_batch(feeds, axes, lo, hi)


Prefetched = tuple[int, Feed, list[np.ndarray], list[np.ndarray]]


def _with_teacher(
    teacher: Teacher,
    batches: Iterable[tuple[np.ndarray, Feed]],
    features: bool,
    procs: Processes,
    skip: int,
    ahead: bool,
) -> Iterator[Prefetched]:
    """``(batch number, feeds, teacher outputs, teacher features)`` for this rank's slice of each batch
    from ``skip`` on. With ``ahead`` the teacher runs one batch ahead in a worker thread, so that ONNX Runtime
    works on the next batch while torch trains on this one; the results are the same either way."""
    todo = ((b, *_local(idx, feeds, procs, teacher.axes)) for b, (idx, feeds) in enumerate(batches) if b >= skip)
    if not ahead:
        for b, idx, feeds in todo:
            yield b, feeds, *teacher(idx, feeds, features=features)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inhercc-teacher") as pool:
        queue: deque[tuple[int, Feed, Future]] = deque()
        for b, idx, feeds in todo:
            queue.append((b, feeds, pool.submit(teacher, idx, feeds, features=features)))
            if len(queue) > 1:
                b0, feeds0, job = queue.popleft()
                yield b0, feeds0, *job.result()
        while queue:
            b0, feeds0, job = queue.popleft()
            yield b0, feeds0, *job.result()


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup·total`` steps, then cosine decay to zero."""
    w = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        progress = (step - w) / max(1, total - w)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _Progress:
    """The progress bar (:class:`inhercc.progress.Progress`) on an interactive stderr, its label carrying loss and
    validation fidelity; per-epoch summary lines otherwise."""

    def __init__(self, total: int, enabled: bool, say: Callable[[str], None]) -> None:
        self.bar = Progress(total, "distilling", enabled and sys.stderr.isatty())
        self.say = say if enabled else (lambda _m: None)
        self.loss: float | None = None
        self.val: float | None = None
        self.epoch = ""

    def step(self, loss: float, epoch: str) -> None:
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        self.epoch = epoch
        val = f" val {self.val:.4f}" if self.val is not None else ""
        self.bar.label = f"distilling epoch {epoch} loss {self.loss:.4g}{val}"
        self.bar.step()

    def line(self, text: str) -> None:
        if self.bar.enabled:
            sys.stderr.write("\r\033[K")
        self.say(text)


def _checkpoint_folder(folder: Path) -> None:
    """Create the ``--checkpoint`` folder (checked before training, so a bad one costs no training time)."""
    from inhercc.files import check_checkpoint_folder

    check_checkpoint_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InherccError(f"cannot create checkpoint folder {folder}: {e.strerror or one_line(e)}") from e


def fixed_batch_config(cfg: DistillConfig, fixed: int | None) -> DistillConfig:
    """``cfg`` with the batch size a model's fixed batch dim imposes (a warning when it differs): training,
    validation and scoring then run in batches of exactly that size."""
    if not fixed or cfg.batch_size == fixed:
        return cfg
    warnings.warn(
        f"the model's batch dim is fixed at {fixed}: distilling in batches of {fixed}, not {cfg.batch_size}",
        DataWarning,
        stacklevel=3,
    )
    return replace(cfg, batch_size=fixed)


def fixed_batch_synthetic(
    model: ModelProto, shapes: Mapping[str, list[int]] | None, count: int, fixed: int, seed: int
) -> Samples:
    """About ``count`` synthetic samples for a model whose inputs fix the batch (one draw gives ``fixed``)."""
    from inhercc.data import synthetic_feeds, warn_synthetic

    warn_synthetic("distillation")
    draws = [synthetic_feeds(model, shapes, seed=seed + i) for i in range(max(1, math.ceil(count / fixed)))]
    samples = open_samples(draws, model)
    samples.synthetic = True
    return samples


def fixed_batch_split(
    samples: Samples, train_idx: np.ndarray, val_idx: np.ndarray, fixed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """With a fixed batch size: a validation split too small for one whole batch goes back to training
    (with a warning); samples beyond whole batches are left out of validation and scoring, and each epoch
    leaves out as many training samples, with a warning (:class:`~inhercc.runtime.DataWarning`)."""
    if not fixed:
        return train_idx, val_idx
    if len(val_idx) and not samples.count_batches(val_idx, fixed, min_rows=fixed):
        warnings.warn(
            f"the validation split ({len(val_idx)} samples) is smaller than the model's fixed batch of {fixed}: "
            "no validation, the last weights are kept",
            DataWarning,
            stacklevel=3,
        )
        train_idx, val_idx = np.sort(np.concatenate([train_idx, val_idx])), val_idx[:0]
    for idx, what in ((train_idx, "training samples (other ones each epoch)"), (val_idx, "validation samples")):
        left = len(idx) - samples.count_batches(idx, fixed, min_rows=fixed) * fixed
        if left:
            warnings.warn(
                f"the model's batch dim is fixed at {fixed}, so {left} of {len(idx)} {what} are left out",
                DataWarning,
                stacklevel=3,
            )
    return train_idx, val_idx


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic ``torch.save`` (:func:`inhercc.files.write_atomic`), synced before the rename: a crash or a full
    disk never leaves a half-written checkpoint, nor a stale temporary file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # made before training; again if removed since
        write_atomic(path, write)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
        raise InherccError(f"cannot write checkpoint {path}: {reason}") from e


# What :func:`_train` writes into a checkpoint (and reads back on resume).
_CHECKPOINT_KEYS = ("format", "config", "shapes", "params", "best_params", "optimizer", "scheduler", "state")


def checkpoint_error(path: Path, why: str) -> InherccError:
    """A checkpoint that cannot be resumed from: say why and what to do (never to unpickle it)."""
    return InherccError(f"checkpoint {path} cannot be read ({why}); remove it or start without --resume")


def _unreadable(path: Path, e: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words (torch's own text recommends
    ``weights_only=False``, which would run code from the file)."""
    import pickle

    if isinstance(e, OSError):
        return e.strerror or one_line(e)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "not a torch checkpoint archive"
    if isinstance(e, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain data"
    return "truncated or corrupt"


def _load_checkpoint(path: Path, cfg: DistillConfig, trainable: Mapping[str, torch.nn.Parameter]) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise checkpoint_error(path, _unreadable(path, e)) from e
    if (
        not isinstance(ckpt, dict)
        or ckpt.get("format") != CHECKPOINT_FORMAT
        or any(k not in ckpt for k in _CHECKPOINT_KEYS)
        or not all(isinstance(ckpt[k], dict) for k in ("config", "shapes", "params", "state"))
        or not all(isinstance(ckpt["state"].get(k), int) for k in ("step", "epoch", "batch"))
    ):
        raise checkpoint_error(path, "not an inhercc distillation checkpoint")
    theirs = {**_RESUME_DEFAULTS, **ckpt["config"]}  # checkpoints written before a setting existed used its default
    ours = _resume_config(cfg)
    diff = [k for k in _RESUME_KEYS if theirs.get(k) != ours.get(k)]
    if diff:
        detail = ", ".join(f"{k} {theirs.get(k)!r} → {ours.get(k)!r}" for k in diff)
        raise InherccError(f"cannot resume from {path}: settings differ ({detail})")
    shapes = {k: list(v.shape) for k, v in trainable.items()}
    if ckpt["shapes"] != shapes:
        raise InherccError(f"cannot resume from {path}: it trains other tensors than this student's")
    return ckpt


def _resume_config(cfg: DistillConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["losses"] = {k: list(v) for k, v in sorted(cfg.losses.items())}
    return {k: d[k] for k in _RESUME_KEYS}


def distill(
    student: ModelProto | str | os.PathLike[str],
    teacher: ModelProto | str | os.PathLike[str],
    data: Any = None,
    *,
    config: DistillConfig | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    log: Callable[[str], None] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> DistillResult:
    """Fine-tune ``student`` to mimic ``teacher`` on ``data`` (see :func:`inhercc.data.open_samples`: an
    ``.npz``, a folder of shards, a dict of arrays, an iterable of feed dicts, a ``CalibrationDataReader``,
    or None for synthetic samples). Settings come from ``config`` and/or keyword ``options`` (the fields of
    :class:`DistillConfig`). ``callback`` is called after every optimizer step with
    ``{"epoch", "step", "loss"}``. Returns the student with the best validation weights written back."""
    t0 = time.perf_counter()
    cfg = replace(config or DistillConfig(), **options)
    cfg.check()
    student_model = as_model(student)
    teacher_model = as_model(teacher)
    check_pair(student_model, teacher_model, _files(student, teacher))
    graph_output_kinds(teacher_model, cfg.output_kinds)  # unknown outputs or kinds: an error before any work
    fixed = model_fixed_batch(teacher_model)
    cfg = fixed_batch_config(cfg, fixed)
    if data is None and fixed:
        samples = fixed_batch_synthetic(teacher_model, shapes, cfg.synthetic_samples, fixed, cfg.seed)
    else:
        samples = open_samples(data, teacher_model, shapes=shapes, synthetic=cfg.synthetic_samples, seed=cfg.seed)
    train_idx, val_idx = split_indices(len(samples), cfg.val_split, cfg.seed)
    train_idx, val_idx = fixed_batch_split(samples, train_idx, val_idx, fixed)

    device = resolve_device(cfg.device)
    procs = init_processes(device.type)
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device, procs)
        return _train(student_model, teacher_model, samples, train_idx, val_idx, cfg, procs, device, log, callback, t0)
    finally:
        torch.set_num_threads(threads)
        if procs.owns_group:
            torch.distributed.destroy_process_group()


def _train(
    student_model: ModelProto,
    teacher_model: ModelProto,
    samples: Samples,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: DistillConfig,
    procs: Processes,
    device: torch.device,
    log: Callable[[str], None] | None,
    callback: Callable[[dict[str, Any]], None] | None,
    t0: float,
) -> DistillResult:
    """The training loop of :func:`distill` (data split, processes and device already settled)."""
    from inhercc.runtime import cuda_available
    from inhercc.specs import mask_input
    from inhercc.torchrt import OnnxModule

    def say(msg: str) -> None:
        if procs.main and not cfg.quiet:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    features = feature_tensors(student_model, teacher_model, cfg.features) if cfg.feature_loss > 0 else []
    mask_name = mask_input(student_model)  # padding positions: out of the feature and token-level output losses
    trainable_names = select_trainable(student_model, cfg.train)
    torch.manual_seed(cfg.seed)
    module = OnnxModule(student_model, extra_outputs=features).to(device)
    module.set_trainable(trainable_names)
    params = module.onnx_parameters()
    trainable = {n: params[n] for n in trainable_names if n in params}
    if len(trainable) != len(trainable_names):
        missing = sorted(set(trainable_names) - set(trainable))
        raise InherccError(f"the torch module holds no parameter for {', '.join(missing[:5])}")
    rebalanced = rebalance_factors(params, trainable) if cfg.rebalance else 0

    provider = "cuda" if device.type == "cuda" and cuda_available() else "cpu"
    prefetch = cfg.prefetch
    if prefetch is None:
        prefetch = device.type == "cuda" or bool(cfg.threads and 2 * cfg.threads <= (os.cpu_count() or 1))
    teacher = Teacher(
        teacher_model,
        features,
        provider,
        device.index or 0,
        cfg.cache_teacher,
        len(train_idx),
        cfg.threads,
        spin=not (prefetch and provider == "cpu"),  # spinning ORT workers would slow torch's beside them
        output_kinds=cfg.output_kinds,
    )
    n_out = len(teacher.outputs)

    global_batch = cfg.batch_size * procs.world
    min_rows = global_batch if teacher.fixed else procs.world  # a fixed batch dim takes whole batches only
    per_epoch = samples.count_batches(train_idx, global_batch, min_rows=min_rows)
    if per_epoch == 0:
        raise InherccError(_too_few(len(train_idx), procs.world, teacher.fixed))
    total = cfg.steps or per_epoch * (cfg.epochs or DEFAULT_EPOCHS)
    epochs = math.ceil(total / per_epoch)

    # The loss: kinds chosen from the graph (and the user's overrides), checked on the teacher's outputs.
    probe = next(teacher.batches(samples, train_idx, teacher.fixed or 1))[1]
    probe_out = teacher.run(probe, features=bool(features))
    not_float = [f for f, v in zip(features, probe_out[n_out:]) if not np.issubdtype(v.dtype, np.floating)]
    if not_float:
        raise InherccError(f"--features: {', '.join(not_float[:3])} not float; the feature loss compares floats")
    probe_out = probe_out[:n_out]
    loss_fn = DistillLoss.for_outputs(
        dict(zip(teacher.outputs, probe_out)),
        cfg.losses,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        labels=samples.labels,
        feature_weight=cfg.feature_loss,
        kinds=teacher.kinds,
    )

    model: torch.nn.Module = module
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, cfg.warmup))

    def forward(feeds: Feed) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = model(**_as_torch(feeds, student_model, device))
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        return outs[:n_out], outs[n_out:]

    def labels_of(feeds: Feed) -> torch.Tensor | None:
        return torch.as_tensor(np.asarray(feeds[LABELS_KEY])).to(device) if samples.labels else None

    def validate() -> dict[str, Any] | None:
        """Fidelity per output pooled over this rank's share of the held-out samples, summed over ranks;
        the mean cosine as the score; plus the validation loss."""
        if not len(val_idx):
            return None
        scores, loss_sum, count = teacher.scores(), 0.0, 0
        with torch.no_grad():
            for idx, feeds in teacher.batches(samples, val_idx[procs.rank :: procs.world], cfg.batch_size):
                t_out, _ = teacher(idx, feeds, features=False, train=False)
                s_out, _ = forward(feeds)
                loss, _ = loss_fn(s_out, [torch.from_numpy(t).to(device) for t in t_out], labels_of(feeds))
                loss_sum, count = loss_sum + float(loss) * len(idx), count + len(idx)
                scores.add(t_out, [s.detach().cpu().numpy() for s in s_out], teacher.mask(feeds))
        vec = _sum_over_processes(scores.vector() + [loss_sum, count], procs, device)
        scores.load(vec[:-2])
        fid = scores.fidelity()
        return {"fidelity": fid, "score": mean_cosine(fid), "loss": vec[-2] / max(vec[-1], 1.0)}

    # Fidelity before training, in ONNX Runtime on the held-out samples (rank 0).
    eval_idx, eval_inputs = (val_idx, "validation split") if len(val_idx) else (train_idx, "training samples")
    if samples.synthetic:
        eval_inputs = f"synthetic {eval_inputs}"
    report: dict[str, Any] = {}
    if procs.main:
        say(f"fidelity before training, on the {eval_inputs} ({len(eval_idx)} samples)")
        before = onnx_fidelity(teacher, student_model, samples, eval_idx, cfg.batch_size, cfg.threads)
        report["fidelity_before"] = before.fidelity()
    report["fidelity_inputs"] = f"{eval_inputs} ({len(eval_idx)} samples)"

    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best": None,
        "best_step": None,
        "best_epoch": None,
        "bad": 0,
        "stopped_early": False,
        "history": [],
        "losses": [],
    }
    best_params: dict[str, torch.Tensor] | None = None
    ckpt_path = Path(cfg.checkpoint) / CHECKPOINT_FILE if cfg.checkpoint else None
    if ckpt_path is not None and procs.main:
        _checkpoint_folder(ckpt_path.parent)
    resumed_from = None
    if ckpt_path is not None and cfg.resume:
        if ckpt_path.exists():
            ckpt = _load_checkpoint(ckpt_path, cfg, trainable)
            try:
                with torch.no_grad():
                    for name, p in trainable.items():
                        p.copy_(ckpt["params"][name].to(p.device, p.dtype))
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                state = ckpt["state"]
                best_params = ckpt["best_params"]
                resumed_from = state["step"]
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
                raise checkpoint_error(ckpt_path, f"its contents do not fit this run: {one_line(e)}") from e
            say(f"resuming from {ckpt_path} at step {state['step']} (epoch {state['epoch'] + 1})")
        else:
            say(f"no checkpoint in {cfg.checkpoint}; starting from the beginning")

    def checkpoint() -> None:
        if ckpt_path is None or not procs.main:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": _resume_config(cfg),
                "shapes": {k: list(v.shape) for k, v in trainable.items()},
                "params": {k: v.detach().cpu().clone() for k, v in trainable.items()},
                "best_params": best_params,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": state,
            },
        )

    def evaluate(epoch_label: str) -> bool:
        """Validate, keep the best weights, say so; True when patience has run out."""
        nonlocal best_params
        val = validate()
        entry: dict[str, Any] = {
            "epoch": state["epoch"],
            "step": state["step"],
            "loss": float(np.mean(state["losses"])) if state["losses"] else None,
        }
        state["losses"] = []
        stop = False
        if val is not None:
            entry.update({"val_cosine": val["score"], "val_loss": val["loss"]})
            progress.val = val["score"]
            if state["best"] is None or val["score"] > state["best"] + 1e-7:
                state.update(best=val["score"], best_step=state["step"], best_epoch=state["epoch"], bad=0)
                best_params = {k: v.detach().cpu().clone() for k, v in trainable.items()}
            else:
                state["bad"] += 1
                stop = cfg.patience is not None and state["bad"] >= cfg.patience
        state["history"].append(entry)
        val_txt = f", val cosine {val['score']:.5f}, val loss {val['loss']:.4g}" if val else ""
        loss_txt = f"loss {entry['loss']:.4g}" if entry["loss"] is not None else "no step"
        progress.line(f"epoch {epoch_label}: step {state['step']}/{total}, {loss_txt}{val_txt}")
        return stop

    progress = _Progress(total, procs.main and not cfg.quiet, say)
    progress.bar.done = state["step"]
    if not state["history"]:  # the initialization is the first candidate: training never returns worse
        evaluate(f"0/{epochs}")
    model.train()
    stop = state["stopped_early"] or state["step"] >= total
    while not stop and state["epoch"] < epochs:
        epoch = state["epoch"]
        label = f"{epoch + 1}/{epochs}"
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = samples.batches(train_idx, global_batch, rng, min_rows=min_rows)
        # resumed inside this epoch: the batches before state["batch"] were trained on already
        for b, feeds, t_out, t_feat in _with_teacher(teacher, batches, bool(features), procs, state["batch"], prefetch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                s_out, s_feat = forward(feeds)
            if cfg.precision != "fp32":
                s_out, s_feat = _as_float32(s_out), _as_float32(s_feat)
            loss, _parts = loss_fn(
                s_out,
                [torch.from_numpy(t).to(device) for t in t_out],
                labels_of(feeds),
                s_feat,
                [torch.from_numpy(t).to(device) for t in t_feat],
                torch.as_tensor(np.asarray(feeds[mask_name])).to(device) if mask_name else None,
            )
            if not torch.isfinite(loss):
                raise InherccError(f"the loss became {float(loss)} at step {state['step'] + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.clip)
            optimizer.step()
            scheduler.step()
            state["batch"] = b + 1
            state["step"] += 1
            state["losses"].append(float(loss.detach()))
            progress.step(float(loss.detach()), label)
            if callback is not None:
                callback({"epoch": epoch, "step": state["step"], "loss": float(loss.detach())})
            done = state["step"] >= total
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and not done:
                if evaluate(f"{label} @ step {state['step']}"):
                    state["stopped_early"] = stop = True
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                checkpoint()
            if done or stop:
                break
        if not stop:
            state["epoch"], state["batch"] = epoch + 1, 0
            if evaluate(label):
                state["stopped_early"] = stop = True
        checkpoint()
        if state["step"] >= total:
            break
    progress.bar.close()

    if best_params is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(best_params[name].to(p.device, p.dtype))
    trained = module.write_back(student_model)
    if procs.main:
        report.update(onnx_fidelity(teacher, trained, samples, eval_idx, cfg.batch_size, cfg.threads).report())
    report["training"] = {
        "epochs": state["epoch"],
        "steps": state["step"],
        "steps_planned": total,
        "steps_per_epoch": per_epoch,
        "best_val_cosine": state["best"],
        "best_epoch": state["best_epoch"],
        "best_step": state["best_step"],
        "stopped_early": state["stopped_early"],
        "resumed_from_step": resumed_from,
        "train_samples": int(len(train_idx)),
        "val_samples": int(len(val_idx)),
        "batch_size": cfg.batch_size,
        "world_size": procs.world,
        "device": str(device),
        "precision": cfg.precision,
        "teacher_provider": teacher.provider,
        "teacher_cached": teacher.caching,
        "teacher_prefetched": prefetch,
        "trained": {
            "mode": cfg.train,
            "factor_pairs_rebalanced": rebalanced,
            "tensors": len(trainable),
            "params": int(sum(p.numel() for p in trainable.values())),
        },
        "losses": {o.name: o.kind for o in loss_fn.outputs}
        | ({"_labels": f"ce alpha={cfg.alpha}"} if loss_fn.labels_output else {})
        | ({"features": f"{len(features)} tensors ({cfg.features}) x {cfg.feature_loss}"} if features else {}),
        "lr": cfg.lr,
        "wall_s": round(time.perf_counter() - t0, 2),
        "history": state["history"],
    }
    return DistillResult(trained, report)


def onnx_fidelity(
    teacher: Teacher,
    student: ModelProto,
    samples: Samples,
    indices: np.ndarray,
    batch_size: int,
    threads: int | None = None,
) -> Scores:
    """Teacher vs student in ONNX Runtime on the given samples (the exported student, not the torch one),
    pooled batch by batch (batches may differ in shape: length buckets)."""
    from inhercc.runtime import make_session, ort_failures

    sess = make_session(student, threads=threads)
    scores = teacher.scores()
    for idx, feeds in teacher.batches(samples, indices, batch_size):
        t_out, _ = teacher(idx, feeds, features=False, train=False)
        with ort_failures("fidelity of the student"):
            scores.add(t_out, sess.run(teacher.outputs, cast_feeds(feeds, student)), teacher.mask(feeds))
    return scores


def _sum_over_processes(values: list[float], procs: Processes, device: torch.device) -> list[float]:
    """``values`` summed over the processes of a data-parallel run (as they are in a single process)."""
    if procs.world == 1:
        return values
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(vec)
    return vec.cpu().tolist()


def _too_few(n: int, world: int, fixed: int | None) -> str:
    """Why ``n`` training samples make no batch."""
    if fixed:
        return f"{n} training sample(s) are too few for the model's fixed batch of {fixed} (× {world} process(es))"
    return f"{n} training sample(s) are too few for {world} process(es)"


def _files(student: ModelProto | str | os.PathLike[str], teacher: ModelProto | str | os.PathLike[str]) -> str:
    """``student a.onnx, teacher b.onnx`` for the models given as paths ("" when neither is)."""
    named = [(w, m) for w, m in (("student", student), ("teacher", teacher)) if not isinstance(m, ModelProto)]
    return ", ".join(f"{w} {os.fspath(m)}" for w, m in named)


def finetune_file(
    student_path: str | os.PathLike[str],
    teacher_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    data: Any = None,
    *,
    report_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    **kwargs: Any,
) -> DistillResult:
    """:func:`distill` from files to a file: output paths checked before any work; rank 0 writes the
    student atomically (never over an input) and the JSON report."""
    from inhercc.files import check_paths, file_size, path_or_none
    from inhercc.model import save_model

    config = kwargs.get("config")
    check_paths(
        [("STUDENT", student_path), ("--teacher", teacher_path), ("--data", path_or_none(data))],
        {"-o": output_path, "--report": report_path},
        models=(student_path, teacher_path),
        checkpoint=kwargs.get("checkpoint") or (config.checkpoint if config is not None else None),
    )
    result = distill(student_path, teacher_path, data, **kwargs)
    if is_main_process():
        save_model(result.model, output_path, external_data=external_data)
        result.report["files"] = {
            "teacher": str(teacher_path),
            "student": str(student_path),
            "output": str(output_path),
        }
        result.report["size"] = {"student": file_size(output_path)}
        if report_path is not None:
            from inhercc.files import write_json

            write_json(report_path, result.report)
    return result
