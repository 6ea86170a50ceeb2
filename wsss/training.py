"""What every training stage shares: a seeded, resumable, optionally distributed epoch loop.

Each epoch's randomness is seeded: the sampler's order from (seed, epoch), every item's augmentation from
(seed, epoch, item index) whichever worker or rank reads it. After each epoch the state (model, optimizer,
scheduler, AMP scaler, RNG states, history) is written atomically, so a rerun after a kill resumes after the
last finished epoch and, on the CPU, ends with exactly the weights of an uninterrupted run. Under several
ranks the model is wrapped in DistributedDataParallel, a DistributedSampler splits every epoch, the global
batch is split across ranks, and BatchNorm statistics are taken from rank 0 at each epoch's end.

A state file is the `torch.save` payload followed by its sha256 digest, and the state it replaces is kept
beside it as `<name>.prev` until the loop ends. A state that cannot be trusted (truncated or altered on disk,
unreadable, or not a state of this run: other weights, optimizer or schedule) is never loaded in part: one
warning names the file and the problem, and the loop resumes from the previous state if that one is sound,
else starts afresh. Rank 0 makes that decision and every rank follows it, or all start afresh.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsss import dist
from wsss.artifacts import atomic_open
from wsss.data.loader import Loader
from wsss.dist import progress
from wsss.history import fmt, tensorboard, write_history
from wsss.progress import duration
from wsss.state import (
    StateError,
    misfit,
    one_line,
    previous_state,
    seal,
    unseal,
)

log = logging.getLogger(__name__)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA with bf16 support, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX); elsewhere bfloat16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_amp_dtype(amp_dtype: Any, device: torch.device) -> str | None:
    """`train.amp_dtype` as used on `device`: "auto" -> "bfloat16" where native (see `native_bfloat16`), else
    None (float32); any other value as given."""
    if amp_dtype is None:
        return None
    if str(amp_dtype) == "auto":
        return "bfloat16" if native_bfloat16(device) else None
    return str(amp_dtype)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank: every epoch's randomness is a function of (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (1 << 63)


class SeededSamples(Dataset):
    """A dataset whose item i is drawn with torch's RNG seeded from (the epoch's seed, i), so augmentation
    depends on neither the number of DataLoader workers nor the number of ranks (nor on which worker or rank
    reads the item): `dataset.num_workers` changes no result, and a 2-rank run sees 1 rank's samples."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.seed = dataset, 0

    def set_seed(self, seed: int) -> None:
        """The epoch's seed (set before the epoch's workers start, which copy it)."""
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also queues a CUDA reseed, which costs 1 ms per item
            torch.default_generator.manual_seed((self.seed * 1_000_003 + int(i)) % (1 << 63))
            return self.dataset[i]


def loader_workers(num_workers: int | None) -> int:
    """`dataset.num_workers`, or for null half the cores less one, at most 8 (on 2 cores the main process
    loading the small images itself is faster than workers competing with the compute threads: BENCHMARKS.md)."""
    if num_workers is not None:
        return int(num_workers)
    return max(0, min(8, (os.cpu_count() or 1) // 2 - 1))


def distributed_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int | None, device: torch.device, **kwargs: Any
) -> DataLoader:
    """This rank's shuffled batches of `dataset`: `batch_size` is the global batch, split evenly across ranks.
    Items are drawn through `SeededSamples`: the same samples whatever the number of workers or ranks."""
    world = dist.world_size()
    dataset = SeededSamples(dataset)
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is the global batch: it must divide by the {world} ranks")
    sampler = DistributedSampler(dataset, world, dist.rank(), shuffle=True, seed=seed, drop_last=True)
    return Loader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=loader_workers(num_workers),
        generator=torch.Generator(),  # reseeded per epoch: the workers' seeds
        persistent_workers=False,  # fresh workers per epoch, seeded from (seed, epoch, rank): resumable exactly
        pin_memory=device.type == "cuda",
        **kwargs,
    )


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """(model, what the loop calls): the model itself, or its DDP wrapper (with SyncBatchNorm if asked)."""
    if not dist.is_dist():
        return model, model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state_dict order (short)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [state[0], state[1].tolist(), *state[2:]],
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    random.setstate((3, tuple(state["python"]), None))


# The loss of one batch, its sample count, and extra sums to average over the epoch (all on the device).
BatchLoss = Callable[[Any], tuple[Tensor, int, Tensor]]


def ema_decay_at(decay: float, updates: int) -> float:
    """The moving average's decay after `updates` updates: min(decay, (1 + n) / (10 + n)) (TensorFlow's
    ExponentialMovingAverage with num_updates), so that a short run does not keep its random initial weights
    (0.99 ** 60 = 55 % of them after 60 steps at a fixed 0.99); from 890 updates on it is 0.99 itself."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _ema_update(decay: float):
    """AveragedModel's multi_avg_fn: lerp the floating tensors by 1 - decay_n; counters take the current value."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        d = ema_decay_at(decay, int(num_averaged))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


class Loop:
    """Epochs of `batch_loss` with an optimizer, a per-step scheduler and AMP; saves and resumes its state.

    Args:
        name: For progress bars and logs ("train", "affinity").
        model: The unwrapped model (what is saved); `net` what the loop calls (the model or its DDP wrapper).
        optimizer, scheduler: Stepped once per batch.
        amp_dtype: "bfloat16" or "float16" (with a gradient scaler) autocast, or None.
        seed, epochs: The run's seed and number of epochs.
        ema_decay: Keep an exponential moving average of the weights and buffers, updated after every step
            (torch's AveragedModel, decay warmed up as in `ema_decay_at`); `final_model()` is then the average.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        amp_dtype: str | None,
        device: torch.device,
        seed: int,
        epochs: int,
        ema_decay: float | None = None,
    ) -> None:
        self.name, self.model, self.net, self.device = name, model, net, device
        self.optimizer, self.scheduler, self.seed, self.epochs = optimizer, scheduler, seed, epochs
        self.amp_dtype = None if amp_dtype is None else AMP_DTYPES[str(amp_dtype)]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.history: list[dict[str, float]] = []
        self._sound_state: Path | None = None  # a state file this loop wrote or checked: may become `.prev`
        self.ema = (
            None
            if ema_decay is None
            else AveragedModel(model, multi_avg_fn=_ema_update(float(ema_decay)), use_buffers=True)
        )

    def final_model(self) -> nn.Module:
        """What the loop produced: the weights' moving average when one is kept, else the model itself."""
        return self.model if self.ema is None else self.ema.module

    def epoch(self, loader: DataLoader, epoch: int, batch_loss: BatchLoss) -> Tensor:
        """One epoch on this rank's shard; returns [sum of loss * n, sum of n, *extra sums] over every rank."""
        seed = epoch_seed(self.seed, epoch, dist.rank())
        torch.manual_seed(seed)
        loader.generator.manual_seed(seed)  # the workers' base seeds (items reseed themselves: SeededSamples)
        samples = loader.items if isinstance(loader, Loader) else loader.dataset
        if isinstance(samples, SeededSamples):
            samples.set_seed(epoch_seed(self.seed, epoch, 0))  # one seed for all ranks: items are global
        loader.sampler.set_epoch(epoch)
        self.net.train()
        autocast = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        sums: Tensor | None = None
        for batch in progress(loader, desc=f"{self.name} {epoch + 1}/{self.epochs}", unit="batch", leave=False):
            with autocast:
                loss, n, extra = batch_loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            row = torch.cat(
                [torch.stack([loss.detach().double() * n, torch.tensor(float(n), device=loss.device)]), extra.double()]
            )
            sums = row if sums is None else sums + row
        assert sums is not None, "an epoch without a batch"
        sums = dist.all_reduce_sum(sums.to(dist.reduce_device())) if dist.is_dist() else sums
        # DDP broadcasts BatchNorm statistics before each forward, so the last batch leaves every rank with its
        # own: take rank 0's, which it saves, so that every rank ends the epoch with the same state.
        dist.broadcast_tensors(list(self.model.buffers()) + ([] if self.ema is None else list(self.ema.buffers())))
        return sums.cpu()

    def save(self, path: Path, epochs_done: int) -> None:
        """The state after `epochs_done` epochs (rank 0 writes; atomic, sealed with its digest); the sound state
        it replaces becomes `<name>.prev`."""
        if not dist.is_main():
            return
        state = {
            "epoch": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "rng": _rng_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        if self._sound_state == path and path.is_file():
            # Only a state known sound becomes the fallback (a damaged one is simply replaced). A kill between
            # this rename and the write leaves `.prev` alone, which `resume` then takes.
            os.replace(path, previous_state(path))
        with atomic_open(path, "wb") as f:
            f.write(buf.getbuffer())
            f.write(seal(buf.getbuffer()))
        self._sound_state = path

    def resume(self, path: Path) -> int:
        """Load the last sound state, `path` or else its `.prev`; the number of epochs it holds (0: fresh start).

        A file that is damaged or belongs to another run is named in one warning and skipped, never loaded in
        part. Under several ranks, rank 0 chooses the file and every rank loads that one (checked against rank
        0's digest); should any rank fail to, every rank starts afresh.
        """
        candidates = [path, previous_state(path)]
        problems: list[str] = []
        choice: tuple[int, str] | None = None  # (index into candidates, sha256 of its payload)
        state: dict[str, Any] | None = None
        if dist.is_main():
            for i, candidate in enumerate(candidates):
                try:
                    state, digest = self._read_state(candidate)
                except FileNotFoundError:
                    continue
                except StateError as e:
                    problems.append(str(e))
                    continue
                choice = (i, digest)
                break
        choice = dist.broadcast(choice)
        if choice is not None and not dist.is_main():
            try:
                state, digest = self._read_state(candidates[choice[0]])
                if digest != choice[1]:
                    raise StateError(candidates[choice[0]], "differs from the file rank 0 read")
            except (FileNotFoundError, StateError) as e:
                state = None
                problems.append(f"{e} on rank {dist.rank()}")
        if dist.is_dist() and choice is not None and dist.sum_int(state is None) > 0:
            if state is not None:  # this rank read it, another did not (and says why in its own log)
                problems.append(f"{candidates[choice[0]]} cannot be read on another rank")
            choice, state = None, None
        if choice is None:
            if problems:  # one line: every file tried and what was wrong with it
                log.warning("%s: %s; starting afresh", self.name, "; ".join(problems))
            return 0
        assert state is not None
        self._load(state)
        self._sound_state = path if choice[0] == 0 else None
        done, chosen = int(state["epoch"]), candidates[choice[0]]
        if problems:
            log.warning(
                "%s: %s; resuming after epoch %d of %d from %s",
                self.name,
                "; ".join(problems),
                done,
                self.epochs,
                chosen,
            )
        else:
            log.info("%s: resuming after epoch %d of %d (%s)", self.name, done, self.epochs, chosen)
        return done

    def _read_state(self, path: Path) -> tuple[dict[str, Any], str]:
        """The state in `path` and its payload's sha256, checked whole before anything is loaded.

        Raises:
            FileNotFoundError: No such file.
            StateError: It is damaged, unreadable, or a state of another run.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StateError(path, f"cannot be read ({e.strerror or e})") from e
        payload, digest = unseal(path, data)
        try:
            state = torch.load(io.BytesIO(payload), map_location=self.device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise StateError(path, f"cannot be unpickled ({type(e).__name__}: {one_line(e)})") from e
        try:
            problem = misfit(state, self.epochs, self.model, self.ema, self.optimizer, self.scheduler, self.scaler)
        except (TypeError, AttributeError, KeyError, ValueError) as e:  # parts of an unexpected type
            problem = f"its parts are malformed ({type(e).__name__}: {one_line(e)})"
        if problem is not None:
            raise StateError(path, f"is not a state of this run: {problem}")
        return state, digest

    def _load(self, state: dict[str, Any]) -> None:
        """Put a state `_read_state` checked into the model, optimizer, scheduler, scaler, history and RNGs."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])

    def fit(
        self,
        loader: DataLoader,
        batch_loss: BatchLoss,
        summarise: Callable[[Tensor], dict[str, float]],
        out_dir: Path,
        state_name: str,
    ) -> int:
        """Every remaining epoch: train, log, save the state, write history.csv and TensorBoard; returns the
        number of epochs found done at the start (resumed)."""
        done = self.resume(out_dir / state_name)
        writer = tensorboard(out_dir)
        for epoch in range(done, self.epochs):
            lr, start = self.optimizer.param_groups[0]["lr"], time.perf_counter()
            row = {"epoch": epoch + 1, **summarise(self.epoch(loader, epoch, batch_loss)), "lr": lr}
            row["seconds"] = round(time.perf_counter() - start, 2)
            self.history.append(row)
            left = duration(row["seconds"] * (self.epochs - epoch - 1))  # at this epoch's pace
            log.info("%s: epoch %d/%d %s (%s left)", self.name, epoch + 1, self.epochs, fmt(row), left)
            self.save(out_dir / state_name, epoch + 1)
            write_history(out_dir, self.history, writer, self.name)
        if writer is not None:
            writer.close()
        if dist.is_main():  # the last state is written (the stage removes it once its model is final)
            previous_state(out_dir / state_name).unlink(missing_ok=True)
        # Every rank logs a digest of its final weights: under DDP they must agree.
        log.info("%s: final weights sha256 %s (rank %d)", self.name, weights_digest(self.final_model()), dist.rank())
        return done
