"""Distillation settings: :class:`DistillConfig` (every knob, checked once) and :class:`DistillResult`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

from onnx import ModelProto

from inhercc.errors import InherccError
from inhercc.losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, parse_loss_overrides
from inhercc.options import check_options, fraction, non_negative, option, positive
from inhercc.quantize import QUANTIZE_MODES
from inhercc.runtime import DataWarning
from inhercc.verify import output_kinds_option

TRAIN_MODES = ("factors", "all")
DEFAULT_EPOCHS = 3
DEFAULT_CACHE_BYTES = 1 << 30
PRECISIONS = ("fp32", "bf16")
IE_SPLITS = ("half", "random")
IE_EXPLORE = ("l1", "cos")


@dataclass(frozen=True)
class DistillConfig:
    """Every knob of :func:`distill`, declared once (:func:`inhercc.options.option`): the CLI's distillation
    options are generated from these fields, and a recipe's ``distill`` section is one of these."""

    epochs: int | None = option(
        None,
        check=positive,
        help="Distil for this many epochs (finetune: 3 unless --steps is given; compress distils only when "
        "--epochs or --steps is given).",
    )
    steps: int | None = option(None, check=positive, help="Distil for this many optimizer steps (not epochs).")
    lr: float | None = option(
        None, check=positive, help="AdamW peak learning rate.", default_text="3e-3 for CNN students, 5e-4 otherwise"
    )
    batch_size: int = option(32, check=positive, help="Per process; the global batch is batch size × world size.")
    val_split: float = option(0.1, check=fraction, help="Held-out fraction.")
    train: str = option(
        "factors",
        help="Which initializers to train: factors (<w>.inherit_in/out/gate), all, or a regex over names "
        "(never one-element constants).",
    )
    temperature: float = option(DEFAULT_TEMPERATURE, help="KD temperature.")
    alpha: float = option(DEFAULT_ALPHA, help="Weight of CE on _labels.")
    losses: dict[str, tuple[str, float]] = option(
        {},
        name="losses",
        flag="--loss",
        metavar="OUTPUT=KIND[:WEIGHT]",
        parse=parse_loss_overrides,
        help="OUTPUT=KIND[:WEIGHT], KIND kd|probs|embedding|none (default by the output's kind: kd for logits, "
        "probs for probabilities, else embedding).",
    )
    # {output: "logits" | "probs" | "embedding" | "values"}: what an output is, where the graph misleads
    output_kinds: dict[str, str] = output_kinds_option()
    feature_loss: float = option(
        0.0,
        check=non_negative,
        metavar="[WEIGHT]",
        help="Feature inheritance loss (intermediate tensors vs the teacher's), optional weight [1].",
    )
    # what the feature loss compares: "layers" (each factorized layer's output), "norms" (the outputs of the
    # normalization nodes: each block's hidden state, as TinyBERT matches them), or a regex over tensor names
    features: str = option(
        "layers",
        help="What --feature-loss compares: layers (factorized layer outputs), norms (normalization outputs: "
        "each block's hidden state) or a regex over tensor names.",
    )
    # IE-KD (inhercc.distill.ie): a frozen factor auto-encoder on the teacher's feature, two trainable encoders
    # on the student's (an inheritance and an exploration half); the encoders exist in training only
    ie: bool = option(
        False, help="IE-KD: inheritance and exploration losses on one feature tensor (the exported model unchanged)."
    )
    ie_feature: str | None = option(
        None,
        metavar="NAME",
        help="The tensor --ie compares (computed by both graphs).",
        default_text="input of the last global pooling, else the last normalization output",
    )
    ie_ae_steps: int = option(200, check=positive, help="Training steps of the teacher's factor auto-encoder.")
    ie_split: str = option(
        "half", choices=IE_SPLITS, help="Student channels: two fixed halves, or a seeded random permutation."
    )
    ie_inherit_weight: float = option(1.0, check=non_negative, help="Weight of the inheritance term.")
    ie_explore_weight: float = option(1.0, check=non_negative, help="Weight of the exploration term.")
    ie_explore: str = option(
        "l1",
        choices=IE_EXPLORE,
        help="Exploration term: l1 (− distance of the normalized factors) or cos (+ |cosine|, toward orthogonal).",
    )
    # decay pulls inherited weights away from the teacher's: off by default
    weight_decay: float = option(0.0, check=non_negative, help="AdamW weight decay.")
    warmup: float = option(0.05, check=fraction, help="Warm-up fraction of the steps.")
    clip: float | None = option(1.0, check=positive, help="Gradient-norm clipping.")
    patience: int | None = option(
        3, check=non_negative, help="Early stop after this many validations without gain (0 or None: never)."
    )
    eval_every: int | None = option(None, check=positive, help="Validate every N steps.", default_text="per epoch")
    cache_teacher: bool | None = option(
        None, flag="--cache-teacher/--no-cache-teacher", help="Cache teacher outputs.", default_text="when they fit"
    )
    checkpoint: str | None = option(None, metavar="DIR", help="Checkpoint folder.")
    checkpoint_every: int | None = option(
        None, check=positive, help="Steps between checkpoints.", default_text="every validation"
    )
    resume: bool = option(False, help="Continue from the checkpoint in the checkpoint folder when there is one.")
    device: str | None = option(None, help="cpu, cuda or cuda:N.", default_text="cuda when available")
    # "bf16": the student's training forward under torch.autocast (bfloat16 matrix products, about twice the
    # steps per second on CPUs with AVX512-BF16/AMX and on GPUs); losses, weights, optimizer state and the
    # validation stay float32, so the kept weights are scored exactly as ONNX Runtime will run them
    precision: str = option(
        "fp32",
        choices=PRECISIONS,
        help="bf16: the student's training forward in bfloat16 autocast (faster; validation stays fp32).",
    )
    threads: int | None = option(None, check=positive, help="torch / ONNX Runtime threads.", default_text="theirs")
    seed: int = option(0, help="Validation split, shuffling and synthetic inputs.")
    quiet: bool = option(False, flag="-q --quiet", help="No progress bar and no per-epoch lines.")
    synthetic_samples: int = option(256, check=positive, cli=False, help="Samples drawn when no data is given.")
    rebalance: bool = option(
        True, cli=False, help="Equalize the scale of each factor pair before training (product unchanged)."
    )
    # the teacher's outputs for the next batch are computed in a worker thread while the student trains on
    # this one (ONNX Runtime releases the GIL), so the teacher costs no time where it has cores to itself.
    # None: on a GPU, or on CPU when ``threads`` leaves as many cores to the teacher (2 cores, threads 1:
    # 0.48 s per MiniLM step against 0.75 s inline; torch and the teacher both on all cores: 0.58 against
    # 0.50 inline, so not then)
    prefetch: bool | None = option(None, cli=False, help="Compute the next batch's teacher outputs meanwhile.")
    # quantization-aware distillation: the student's forward runs through the weights (and, int8-static, the
    # activations) ONNX Runtime will quantize, fake-quantized alike (inhercc.torchrt.fakequant); set by the
    # recipe from `quantization.quantize` so the INT8 student keeps what distillation bought
    fake_quant: str | None = option(
        None, choices=QUANTIZE_MODES, cli=False, help="Distil through this quantization, fake-quantized."
    )
    fake_quant_per_channel: bool = option(True, cli=False, help="Fake-quantize weights per output channel.")

    def __post_init__(self) -> None:  # (kind, weight) pairs read back from JSON / YAML as lists
        object.__setattr__(self, "losses", {k: (str(v[0]), float(v[1])) for k, v in self.losses.items()})

    def check(self, prefix: str = "distill.") -> None:
        """Every setting valid (an :class:`InherccError` naming the field), before any work."""
        check_options(self, prefix)
        for output, (_kind, weight) in self.losses.items():
            if not math.isfinite(weight) or weight < 0:
                raise InherccError(f"`{prefix}losses` {output}: weight must be a finite number ≥ 0, got {weight}")
        if self.epochs is not None and self.steps is not None:
            raise InherccError(f"choose one of `{prefix}epochs`, `{prefix}steps` (got both)")
        if self.features != "layers" and not self.feature_loss > 0:
            raise InherccError(
                f"`{prefix}features` {self.features} chooses what `{prefix}feature_loss` compares: "
                f"give `{prefix}feature_loss`"
            )
        if self.ie_feature is not None and not self.ie:
            raise InherccError(
                f"`{prefix}ie_feature` {self.ie_feature} chooses what `{prefix}ie` compares: give `{prefix}ie`"
            )
        if self.resume and not self.checkpoint:
            raise InherccError(f"`{prefix}resume` needs `{prefix}checkpoint`")
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise InherccError(f"`{prefix}checkpoint_every`: a checkpoint option, only used with `{prefix}checkpoint`")


@dataclass
class DistillResult:
    """The fine-tuned student and the report entries ``fidelity_before``, ``fidelity`` and ``training``."""

    model: ModelProto
    report: dict[str, Any]


# the peak learning rate when none is given (:func:`resolved_lr`). Transformers: 5e-4 (MiniLM, results/distill.md).
# CNNs: 3e-3 — the InherNet benchmark (MNIST, a 10 %-parameter inherited student, 1,000 labelled images,
# 15 epochs): 5e-4 reached 95.99 % test accuracy, 3e-3 98.03 %, 1e-2 98.09 % (benchmarks/results/inherit.md)
DEFAULT_LR = 5e-4
CNN_LR = 3e-3


def resolved_lr(cfg: DistillConfig, student: ModelProto) -> DistillConfig:
    """``cfg`` with ``lr`` set when it is None: :data:`CNN_LR` when the student's Conv nodes outnumber its
    MatMul / Gemm nodes (a convolutional network), else :data:`DEFAULT_LR`."""
    if cfg.lr is not None:
        return cfg
    ops = [n.op_type for n in student.graph.node]
    convs, products = ops.count("Conv"), ops.count("MatMul") + ops.count("Gemm")
    return replace(cfg, lr=CNN_LR if convs > products else DEFAULT_LR)


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
