"""The entry points: :func:`distill` (settings checked, models paired, data opened and split, processes and
device settled, then the :class:`~inhercc.distill.trainer.Trainer`) and :func:`finetune_file` (files to a file)."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from onnx import ModelProto

from inhercc.data import Samples, open_samples, split_indices
from inhercc.distill.config import DistillConfig, DistillResult, fixed_batch_config, resolved_lr
from inhercc.distill.features import check_pair
from inhercc.distill.processes import init_processes, is_main_process, resolve_device
from inhercc.distill.trainer import Trainer
from inhercc.model import as_model
from inhercc.runtime import DataWarning, model_fixed_batch
from inhercc.verify import graph_output_kinds


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
    cfg = resolved_lr(fixed_batch_config(cfg, fixed), student_model)
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
        split = (train_idx, val_idx)
        return Trainer(student_model, teacher_model, samples, split, cfg, procs, device, log, callback, t0).run()
    finally:
        torch.set_num_threads(threads)
        if procs.owns_group:
            torch.distributed.destroy_process_group()


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
        [("`student`", student_path), ("`teacher`", teacher_path), ("`data`", path_or_none(data))],
        {"`output`": output_path, "`report`": report_path},
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
