"""Stage `train`: fit the GAP classifier on image-level labels (multilabel soft margin loss).

One process or several (torchrun, Slurm): under N ranks the model is wrapped in DistributedDataParallel, a
DistributedSampler splits each epoch, and `train.batch_size` stays the global batch (batch_size / N per rank).
`train.amp_dtype` trains under autocast (bfloat16, or float16 with a gradient scaler), `train.sync_bn` syncs
BatchNorm statistics across ranks, and channels-last memory is used on CUDA (`train.channels_last`).

After every epoch the artifact keeps `train_state.pt` (model, optimizer, scheduler, scaler, RNG states, epoch),
written atomically; a rerun after a kill or a preemption resumes after the last finished epoch. Each epoch's
randomness (the sampler's order, the augmentation in the main process and in every DataLoader worker) is
seeded from (seed, epoch, rank), so a resumed run ends with exactly the weights of an uninterrupted one on the
CPU. Per-epoch loss and accuracy go to `history.csv`, `curves.png` and, when tensorboard is installed, to
event files under `tensorboard/`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from wsss import dist
from wsss.artifacts import atomic_open
from wsss.data import ClassificationDataset, SegmentationSource, dataset_identity
from wsss.data.transforms import TrainTransform
from wsss.dist import progress
from wsss.fingerprint import FileGroup
from wsss.models import Classifier, load_checkpoint, save_checkpoint
from wsss.stages.base import Fingerprints, Stage, StageContext, plain

log = logging.getLogger(__name__)

STATE = "train_state.pt"
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "lr", "seconds")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def default_crop_size(source: SegmentationSource) -> int:
    """The first image's longer side rounded up to a multiple of 32, at most 512."""
    h, w = source.load_image(source.ids[0]).shape[-2:]
    return min(512, 32 * math.ceil(max(h, w) / 32))


def build_optimizer(model: Classifier, tc: DictConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over backbone and head groups; the head's lr is `head_lr_mult` times larger."""
    backbone, head = model.param_groups()
    groups = [{**backbone, "lr": tc.lr}, {**head, "lr": tc.lr * tc.head_lr_mult}]
    if tc.optimizer == "adamw":  # a Choice compares equal to its string value
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=tc.momentum > 0
        )
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {tc.optimizer!r}")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank: every epoch's randomness is a function of (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (1 << 63)


def _loader(source: SegmentationSource, cfg: DictConfig, device: torch.device) -> DataLoader:
    """This rank's shuffled, augmented batches (a split smaller than a batch gives one batch)."""
    tc, world = cfg.train, dist.world_size()
    crop = tc.crop_size or default_crop_size(source)
    dataset = ClassificationDataset(source, TrainTransform(crop, tuple(tc.scale_range)))
    batch_size = tc.batch_size
    if len(dataset) < batch_size:
        batch_size = len(dataset)
        log.warning(
            "train: split %r has %d images, fewer than train.batch_size=%d", source.split, len(dataset), tc.batch_size
        )
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is the global batch: it must divide by the {world} ranks")
    log.info(
        "train: %d images, crop %d, %d epochs, batch %d on each of %d ranks",
        len(dataset),
        crop,
        tc.epochs,
        batch_size // world,
        world,
    )
    # The sampler's order depends on (seed, epoch); the workers' seeds come from the generator, reseeded per epoch.
    sampler = DistributedSampler(dataset, world, dist.rank(), shuffle=True, seed=cfg.seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.dataset.num_workers,
        generator=torch.Generator(),
        persistent_workers=False,  # fresh workers per epoch, seeded from (seed, epoch, rank): resumable exactly
        pin_memory=device.type == "cuda",
    )


def _model(cfg: DictConfig, num_classes: int, device: torch.device) -> tuple[Classifier, nn.Module]:
    """The classifier and what the loop calls: itself, or its DDP wrapper (SyncBatchNorm if asked)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    m = cfg.model
    model = Classifier(num_classes, str(m.backbone), m.output_stride, m.weights).to(device)
    if cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if not dist.is_dist():
        return model, model
    if cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


class Trainer:
    """The training loop with its state: optimizer, poly schedule, AMP scaler, history; saves and resumes."""

    def __init__(self, cfg: DictConfig, model: Classifier, net: nn.Module, steps: int, device: torch.device) -> None:
        self.cfg, self.model, self.net, self.device = cfg, model, net, device
        self.optimizer = build_optimizer(model, cfg.train)
        # IRN's poly decay, lr * (1 - step / total) ** 0.9, stepped once per batch.
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=steps, power=0.9)
        amp = cfg.train.amp_dtype
        self.amp_dtype = None if amp is None else AMP_DTYPES[str(amp)]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.history: list[dict[str, float]] = []

    def epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        """One epoch on this rank's shard; loss and per-label accuracy averaged over every rank."""
        seed = epoch_seed(self.cfg.seed, epoch, dist.rank())
        torch.manual_seed(seed)  # augmentation in the main process (num_workers=0)
        loader.generator.manual_seed(seed)  # the workers' seeds
        loader.sampler.set_epoch(epoch)
        self.net.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss * n, correct labels, labels, n
        lr, start = self.optimizer.param_groups[0]["lr"], time.perf_counter()
        autocast = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        bar = progress(loader, desc=f"train {epoch + 1}/{self.cfg.train.epochs}", unit="batch", leave=False)
        for images, targets in bar:
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with autocast:
                logits = self.net(images)  # (B, K)
                loss = F.multilabel_soft_margin_loss(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            n, correct = images.shape[0], ((logits.detach() > 0) == (targets > 0.5)).sum()
            sums[0] += loss.detach().double() * n
            sums[1] += correct
            sums[2] += targets.numel()
            sums[3] += n
        sums = dist.all_reduce_sum(sums.to(dist.reduce_device())).cpu() if dist.is_dist() else sums.cpu()
        # DDP broadcasts BatchNorm statistics before each forward, so the last batch leaves every rank with its
        # own: take rank 0's, which it saves, so that every rank ends the epoch with the same state.
        dist.broadcast_tensors(list(self.model.buffers()))
        row = {
            "epoch": epoch + 1,
            "loss": round(sums[0].item() / max(sums[3].item(), 1), 6),
            "accuracy": round(100.0 * sums[1].item() / max(sums[2].item(), 1), 4),
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 2),
        }
        self.history.append(row)
        return row

    def save(self, path: Path, epochs_done: int) -> None:
        """`train_state.pt` after `epochs_done` epochs (rank 0 writes; atomic)."""
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
        buf = io.BytesIO()
        torch.save(state, buf)
        with atomic_open(path, "wb") as f:
            f.write(buf.getvalue())

    def resume(self, path: Path) -> int:
        """Load `train_state.pt` if there is one; the number of epochs it holds (0 for a fresh start)."""
        if not path.is_file():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        _set_rng_state(state["rng"])
        return int(state["epoch"])


def _write_history(out_dir: Path, history: list[dict[str, float]], writer: Any) -> None:
    """history.csv (rewritten whole, atomically) and the epoch's TensorBoard scalars (rank 0)."""
    if not dist.is_main():
        return
    with atomic_open(out_dir / "history.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(history)
    if writer is not None:
        row = history[-1]
        for k in ("loss", "accuracy", "lr"):
            writer.add_scalar(f"train/{k}", row[k], row["epoch"])
        writer.flush()


def _tensorboard(out_dir: Path) -> Any:
    """A SummaryWriter into `tensorboard/` on rank 0 when tensorboard is installed, else None."""
    if not dist.is_main() or importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))


def _weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in state_dict order (short)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _given_checkpoint(ctx: StageContext) -> dict[str, Any]:
    """`model.checkpoint` replaces training; it must be a wsss checkpoint with this dataset's classes."""
    source = ctx.source()
    path = Path(ctx.cfg.model.checkpoint).resolve()
    load_checkpoint(path, source.class_names)
    log.info("train: using checkpoint %s", path)
    return {"checkpoint": str(path), "class_names": source.class_names, "dataset": source.identity()}


def run(ctx: StageContext) -> dict[str, Any]:
    """Fit the classifier on the training split, resuming after the last finished epoch; write `model.pt`."""
    cfg = ctx.cfg
    if cfg.model.checkpoint:
        return _given_checkpoint(ctx)
    source = ctx.source()
    loader = _loader(source, cfg, ctx.device)
    model, net = _model(cfg, source.num_classes, ctx.device)
    epochs = cfg.train.epochs
    trainer = Trainer(cfg, model, net, epochs * len(loader), ctx.device)
    done = trainer.resume(ctx.out_dir / STATE)
    if done:
        log.info("train: resuming after epoch %d of %d (%s)", done, epochs, ctx.out_dir / STATE)
    writer, start = _tensorboard(ctx.out_dir), time.perf_counter()
    for epoch in range(done, epochs):
        row = trainer.epoch(loader, epoch)
        log.info("train: epoch %d/%d loss %.4f accuracy %.2f", epoch + 1, epochs, row["loss"], row["accuracy"])
        trainer.save(ctx.out_dir / STATE, epoch + 1)
        _write_history(ctx.out_dir, trainer.history, writer)
    if writer is not None:
        writer.close()
    # Every rank logs a digest of its final weights: under DDP they must agree.
    log.info("train: final weights sha256 %s (rank %d)", _weights_digest(model), dist.rank())
    if dist.is_main():
        from wsss import viz

        viz.plot_training_curves(trainer.history, ctx.out_dir / "curves.png")
        save_checkpoint(ctx.out_dir / "model.pt", model.cpu(), source.class_names, epochs=epochs)
        (ctx.out_dir / STATE).unlink()  # the model is final: the resume state has done its job
    return {
        "checkpoint": "model.pt",
        "class_names": source.class_names,
        "dataset": source.identity(),
        "counts": {
            "images": len(source),
            "steps": epochs * len(loader),
            "skipped": dict(source.skipped),
            "ranks": dist.world_size(),
        },
        "losses": [r["loss"] for r in trainer.history],
        "resumed_after_epoch": done,
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    if cfg.model.checkpoint:  # the checkpoint's bytes are in the key (see _files); training settings are not
        return {
            "dataset": dataset_identity(cfg.dataset, split),
            "checkpoint": str(Path(cfg.model.checkpoint).resolve()),
        }
    model = plain(cfg.model)
    model.pop("checkpoint")
    return {
        "dataset": dataset_identity(cfg.dataset, split),
        "model": model,
        "train": plain(cfg.train),
        "seed": cfg.seed,
        # N ranks split every batch and keep their own BatchNorm statistics: another training, another model
        "ranks": dist.world_size(),
    }


def _files(cfg: DictConfig, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint not found: {path}")
        return {"checkpoint": fp.content(path, "model.checkpoint")}
    return fp.dataset(split)


STAGE = Stage(
    name="train",
    run=run,
    config=("dataset", "model", "train", "seed"),
    params=_params,
    files=_files,
    split=lambda cfg: str(cfg.dataset.train_split),
)
