"""torch.distributed helpers: starting the process group, who am I, which ids are mine, sums across ranks.

Every helper degrades to the single-process answer when `torch.distributed` is unavailable or not initialised,
so the same code runs under `torchrun`, under Slurm (`srun` / submitit with several tasks) and in a notebook.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)

# A rank that fails makes torchrun (and srun) stop the others; a collective that still waits gives up here.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("WSSS_DIST_TIMEOUT_MIN", "30")))


def slurm_env() -> None:
    """Fill torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from Slurm's.

    Only for a Slurm step with several tasks that torchrun did not start (`srun`, or submitit's
    `tasks_per_node`); variables already set are kept. The master is the first host of the job's node list,
    the port is derived from the job id so that jobs on one node do not collide.
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
            first = out.stdout.split()[0] if out.stdout.split() else nodes
        except (OSError, subprocess.SubprocessError):
            first = nodes  # a single plain host name
        os.environ["MASTER_ADDR"] = first


def local_device(name: str) -> torch.device:
    """The device this process works on: `auto` -> cuda:LOCAL_RANK when CUDA is there, else cpu.

    Raises:
        ValueError: CUDA asked for but not available.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(device: torch.device) -> bool:
    """Start the default process group from the environment when there is more than one process.

    NCCL for CUDA devices, gloo for the CPU; `env://` rendezvous (torchrun, or `slurm_env`). Returns whether
    a group was started here (then `teardown` ends it).
    """
    slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or is_dist():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    return True


def teardown() -> None:
    """End the default process group (no-op without one)."""
    if is_dist():
        dist.destroy_process_group()


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


def broadcast(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (a picklable object); identity when not distributed."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); `[obj]` when not distributed."""
    if not is_dist():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def sum_int(value: int) -> int:
    """An integer summed over ranks."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=reduce_device())
    return int(all_reduce_sum(t).item())


def progress(*args: Any, **kwargs: Any) -> Any:
    """Progress of a loop as the run's `progress=` says (wsss.progress: a tqdm bar on a terminal, log lines
    elsewhere), shown by rank 0 only. Takes tqdm's arguments."""
    from wsss import progress as p

    mode = p.resolved_mode()
    kwargs["disable"] = kwargs.get("disable", False) or not is_main() or mode == "off"
    return p.LogProgress(*args, **kwargs) if mode == "log" else tqdm(*args, **kwargs)


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s (no-op when not distributed)."""
    if is_dist():
        for t in tensors:
            dist.broadcast(t, src=src)
