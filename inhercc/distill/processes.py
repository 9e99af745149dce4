"""Where this process stands in a (possibly single-process) torchrun/DDP run, and its device."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from inhercc.data import Axes, Feed, slice_batch
from inhercc.errors import InherccError


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
        raise InherccError(f"unknown `distill.device` {name!r}; choose cpu or cuda")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InherccError(f"`distill.device` {name} but torch sees no CUDA GPU")
        if name == "cuda":
            return torch.device("cuda", (procs.local_rank if procs else 0) % torch.cuda.device_count())
    return torch.device(name)


def local_batch(idx: np.ndarray, feeds: Feed, procs: Processes, axes: Axes) -> tuple[np.ndarray, Feed]:
    """This rank's contiguous slice of a global batch (each input cut along its batch axis ``axes``)."""
    if procs.world == 1:
        return idx, feeds
    n = len(idx)
    lo, hi = n * procs.rank // procs.world, n * (procs.rank + 1) // procs.world
    return idx[lo:hi], slice_batch(feeds, axes, lo, hi)


def sum_over_processes(values: list[float], procs: Processes, device: torch.device) -> list[float]:
    """``values`` summed over the processes of a data-parallel run (as they are in a single process)."""
    if procs.world == 1:
        return values
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(vec)
    return vec.cpu().tolist()
