"""Distillation settings: :class:`DistillConfig` (every knob, checked once) and :class:`DistillResult`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from inhercc.runtime import DataWarning

TRAIN_MODES = ("factors", "all")
DEFAULT_EPOCHS = 3
DEFAULT_CACHE_BYTES = 1 << 30
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


@dataclass
class DistillResult:
    """The fine-tuned student and the report entries ``fidelity_before``, ``fidelity`` and ``training``."""

    model: ModelProto
    report: dict[str, Any]


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
