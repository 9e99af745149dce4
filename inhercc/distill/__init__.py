"""Distillation: fine-tune an inherited student from its teacher.

The teacher runs in ONNX Runtime (its outputs computed once per sample and cached when they fit in memory;
one batch ahead in a worker thread when it has cores of its own); the student runs forward and backward in
torch through :class:`inhercc.torchrt.OnnxModule`, whose parameters are the student's initializers, and is
written back into the ONNX graph at the end. AdamW with a warm-up + cosine schedule and gradient clipping;
validation fidelity (mean cosine to the teacher on held-out samples) after every epoch; the best weights are
kept; early stop; checkpoints and resume.

Under ``torchrun --nproc_per_node N`` it trains data-parallel with DDP (NCCL on GPU, gloo on CPU): every
rank sees the same shuffled global batches and takes its own slice of each; only rank 0 writes files.

The modules: :mod:`~inhercc.distill.config` (settings), :mod:`~inhercc.distill.processes` (ranks, device),
:mod:`~inhercc.distill.features` (what is trained and compared), :mod:`~inhercc.distill.teacher`,
:mod:`~inhercc.distill.checkpoint`, :mod:`~inhercc.distill.trainer` (the loop) and :mod:`~inhercc.distill.run`
(:func:`distill`, :func:`finetune_file`).
"""

from __future__ import annotations

from inhercc.distill.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_error,
    checkpoint_folder,
    load_checkpoint,
    resume_config,
    save_checkpoint,
)
from inhercc.distill.config import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_EPOCHS,
    PRECISIONS,
    TRAIN_MODES,
    DistillConfig,
    DistillResult,
    fixed_batch_config,
)
from inhercc.distill.features import (
    FACTOR_PATTERN,
    NORM_OPS,
    check_pair,
    factor_names,
    feature_tensors,
    inherited_outputs,
    norm_outputs,
    rebalance_factors,
    select_trainable,
)
from inhercc.distill.processes import Processes, init_processes, is_main_process, resolve_device
from inhercc.distill.run import distill, finetune_file, fixed_batch_split, fixed_batch_synthetic
from inhercc.distill.teacher import Teacher, onnx_fidelity
from inhercc.distill.trainer import Trainer, TrainState
from inhercc.files import CHECKPOINT_FILE

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_EPOCHS",
    "FACTOR_PATTERN",
    "NORM_OPS",
    "PRECISIONS",
    "TRAIN_MODES",
    "DistillConfig",
    "DistillResult",
    "Processes",
    "Teacher",
    "TrainState",
    "Trainer",
    "check_pair",
    "checkpoint_error",
    "checkpoint_folder",
    "distill",
    "factor_names",
    "feature_tensors",
    "finetune_file",
    "fixed_batch_config",
    "fixed_batch_split",
    "fixed_batch_synthetic",
    "inherited_outputs",
    "init_processes",
    "is_main_process",
    "load_checkpoint",
    "norm_outputs",
    "onnx_fidelity",
    "rebalance_factors",
    "resolve_device",
    "resume_config",
    "save_checkpoint",
    "select_trainable",
]
