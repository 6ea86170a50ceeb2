"""Per-image work in a pool of CPU processes (crf, superpixels, IRN's labels): `pool_map`, and `WORKER`, the
state each worker reads (set once per worker: a COCO source is too large to send per image)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from wsss.dist import progress

WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    """Pool worker start: keep the shared state, one torch thread (the pool is the parallelism)."""
    torch.set_num_threads(1)
    WORKER.update(state)


def pool_map(fn: Callable[[str], str], todo: list[str], state: dict[str, Any], workers: int, desc: str) -> None:
    """`fn(image_id)` for every id of `todo`, `fn` reading its shared state from `WORKER` (set to `state`): in
    `workers` processes started from a fork server, or in this process with one worker.

    A fork server, not this process: a child forked from a process whose OpenMP threads ran (training, CAMs)
    can hang in its first parallel torch op.
    """
    bar = progress(total=len(todo), desc=desc, unit="img")
    if workers <= 1 or len(todo) <= 1:
        WORKER.update(state)
        for image_id in todo:
            fn(image_id)
            bar.update()
    else:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(state,)) as pool:
            for _ in pool.map(fn, todo, chunksize=8):
                bar.update()
    bar.close()
