"""Data-parallel helpers for runs launched with torchrun or ``accelerate launch`` (both set RANK,
WORLD_SIZE, LOCAL_RANK): one process group from the environment, rank-0-only writes, gradient averaging.

A single process (no WORLD_SIZE, or 1) never creates a group and every helper is a no-op.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA with one GPU per local rank)."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, size


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process)."""
    if active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
