"""Checkpoints: written atomically, read back safely (tensors and plain data only) and only into the same run
(the settings that shape the trajectory must match)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from inhercc.distill.config import DistillConfig
from inhercc.errors import InherccError
from inhercc.files import check_checkpoint_folder, write_atomic
from inhercc.model import one_line

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


def checkpoint_folder(folder: Path) -> None:
    """Create the ``distill.checkpoint`` folder (checked before training, so a bad one costs no training time)."""
    check_checkpoint_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InherccError(f"cannot create checkpoint folder {folder}: {e.strerror or one_line(e)}") from e


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
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


# What the trainer writes into a checkpoint (and reads back on resume).
_CHECKPOINT_KEYS = ("format", "config", "shapes", "params", "best_params", "optimizer", "scheduler", "state")


def checkpoint_error(path: Path, why: str) -> InherccError:
    """A checkpoint that cannot be resumed from: say why and what to do (never to unpickle it)."""
    return InherccError(f"checkpoint {path} cannot be read ({why}); remove it or start without `distill.resume`")


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


def load_checkpoint(path: Path, cfg: DistillConfig, trainable: Mapping[str, torch.nn.Parameter]) -> dict[str, Any]:
    """The checkpoint at ``path``, read safely (tensors and plain data only) and checked to continue this run:
    same format, same trajectory-shaping settings, same trained tensors; one clear error otherwise."""
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
    ours = resume_config(cfg)
    diff = [k for k in _RESUME_KEYS if theirs.get(k) != ours.get(k)]
    if diff:
        detail = ", ".join(f"{k} {theirs.get(k)!r} → {ours.get(k)!r}" for k in diff)
        raise InherccError(f"cannot resume from {path}: settings differ ({detail})")
    shapes = {k: list(v.shape) for k, v in trainable.items()}
    if ckpt["shapes"] != shapes:
        raise InherccError(f"cannot resume from {path}: it trains other tensors than this student's")
    return ckpt


def resume_config(cfg: DistillConfig) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match (loss overrides as sorted lists)."""
    d = asdict(cfg)
    d["losses"] = {k: list(v) for k, v in sorted(cfg.losses.items())}
    return {k: d[k] for k in _RESUME_KEYS}
