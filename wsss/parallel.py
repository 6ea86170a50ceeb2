"""Per-image work in a pool of CPU processes (crf, superpixels, IRN's labels): `pool_map`, and `WORKER`, the
state each worker reads (set once per worker: a COCO source is too large to send per image)."""

from __future__ import annotations

import multiprocessing
import sys
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


def _preload(fn: Callable[[str], str]) -> list[str]:
    """The modules the fork server imports once, before it forks any worker: `fn`'s and the main module's.

    Without them each worker imports torch (and a `python -m` entry point's modules) itself, about 4 s of CPU per
    worker per pool. The server imports only, so no OpenMP thread has run in the process workers fork from.
    """
    main = getattr(sys.modules["__main__"], "__spec__", None)
    return [m for m in (fn.__module__, getattr(main, "name", None)) if m and m != "__main__"]


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
        context.set_forkserver_preload(_preload(fn))
        chunk = max(1, min(8, len(todo) // (4 * workers)))  # every worker busy on short lists, few messages on long
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(state,)) as pool:
            for _ in pool.map(fn, todo, chunksize=chunk):
                bar.update()
    bar.close()
