"""torch.distributed helpers: who am I, which ids are mine, and summing tensors across ranks.

Every helper degrades to the single-process answer when `torch.distributed` is unavailable or not initialised,
so the same evaluation code runs under `torchrun` and in a notebook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def is_dist() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that writes shared outputs and logs summaries."""
    return rank() == 0


def shard(ids: Sequence[T]) -> list[T]:
    """This rank's share of `ids`: every `world_size()`-th item starting at `rank()`, in the original order.

    Args:
        ids: The full, identically ordered list on every rank.

    Returns:
        `ids[rank()::world_size()]` as a list; the shards of all ranks partition `ids`.
    """
    return list(ids[rank() :: world_size()])


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over all ranks, in place, and return it; a no-op when not distributed.

    Args:
        t: A tensor on a device the process group's backend supports (CUDA for NCCL, CPU for gloo).

    Returns:
        `t` itself, now holding the sum over ranks.
    """
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_device() -> torch.device:
    """The device collectives expect tensors on: the current CUDA device under NCCL, otherwise the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_dist():
        dist.barrier()


def summed_copy(t: Tensor | None, shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """A copy of counts `t` (int64 zeros of `shape` when None: a rank that saw nothing), summed over ranks.

    Collective when distributed: every rank must call it.
    """
    if t is None:
        t = torch.zeros(shape, dtype=torch.int64, device=device or reduce_device())
    return all_reduce_sum(t.clone()) if is_dist() else t.clone()
