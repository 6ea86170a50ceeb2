"""Stage `train`: fit the GAP classifier on image-level labels (multilabel soft margin loss).

One process or several (torchrun, Slurm): under N ranks the model is wrapped in DistributedDataParallel, a
DistributedSampler splits each epoch, and `train.batch_size` stays the global batch (batch_size / N per rank).
`train.amp_dtype` trains under autocast: `auto` (the default) is bfloat16 where the device computes it natively
and float32 elsewhere, the resolved precision being part of the cache key; bfloat16 or float16 (with a gradient
scaler) force one, null forces float32. `train.sync_bn` syncs
BatchNorm statistics across ranks, and channels-last memory is used on CUDA (`train.channels_last`).

After every epoch the artifact keeps `train_state.pt` (model, optimizer, scheduler, scaler, RNG states, epoch),
written atomically; a rerun after a kill or a preemption resumes after the last finished epoch. Each epoch's
randomness (the sampler's order, the augmentation in the main process and in every DataLoader worker) is
seeded from (seed, epoch, rank), so a resumed run ends with exactly the weights of an uninterrupted one on the
CPU. Per-epoch loss and accuracy go to `history.csv`, `curves.png` and, when tensorboard is installed, to
event files under `tensorboard/`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from wsss import dist
from wsss.data import ClassificationDataset, SegmentationSource, dataset_identity
from wsss.data.transforms import TrainTransform
from wsss.fingerprint import FileGroup
from wsss.models import Classifier, load_checkpoint, save_checkpoint
from wsss.models.class_map import class_groups, table_path
from wsss.models.efficientnet import LITE, weight_file
from wsss.stages.base import Fingerprints, Stage, StageContext, plain
from wsss.training import BatchLoss, Loop, distributed_loader, resolve_amp_dtype, wrap

log = logging.getLogger(__name__)

STATE = "train_state.pt"


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
            groups,
            lr=tc.lr,
            momentum=tc.momentum,
            weight_decay=tc.weight_decay,
            nesterov=tc.nesterov and tc.momentum > 0,
        )
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {tc.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """IRN's poly decay, lr * (1 - step / total) ** 0.9 per batch, after `warmup` steps of linear warm-up from
    lr / 100 (torch's LinearLR, then PolynomialLR over the remaining steps, chained by SequentialLR). A warm-up
    as long as the run (a one-epoch test run) is the ramp alone."""
    if warmup <= 0:
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    if warmup >= steps:
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=steps)
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    decay = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps - warmup, power=0.9)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def _loader(source: SegmentationSource, cfg: DictConfig, device: torch.device) -> DataLoader:
    """This rank's shuffled, augmented batches (a split smaller than a batch gives one batch)."""
    tc = cfg.train
    crop = tc.crop_size or default_crop_size(source)
    transform = TrainTransform(crop, tuple(tc.scale_range), resize=tc.resize, long_side=tuple(tc.long_side))
    dataset = ClassificationDataset(source, transform)
    batch_size = min(tc.batch_size, len(dataset))
    if batch_size < tc.batch_size:
        log.warning(
            "train: split %r has %d images, fewer than train.batch_size=%d", source.split, batch_size, tc.batch_size
        )
    log.info(
        "train: %d images, crop %d, %d epochs, batch %d over %d rank(s)",
        len(dataset),
        crop,
        tc.epochs,
        batch_size,
        dist.world_size(),
    )
    return distributed_loader(dataset, batch_size, cfg.seed, cfg.dataset.num_workers, device)


def _model(cfg: DictConfig, class_names: list[str], device: torch.device) -> tuple[Classifier, nn.Module]:
    """The classifier and what the loop calls: itself, or its DDP wrapper (SyncBatchNorm if asked)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    m = cfg.model
    num_classes = len(class_names)
    init = None if m.head_init is None else class_groups(str(m.head_init), class_names)
    model = Classifier(
        num_classes, str(m.backbone), m.output_stride, m.weights, m.stride_mode, m.frozen_bn, head_init=init
    )
    if cfg.train.freeze:  # IRN: `self.stage2(x).detach()`, conv1 .. layer2 get no gradient
        frozen = model.freeze_through(str(cfg.train.freeze))
        log.info("train: %d parameter tensors frozen through %s", len(frozen), cfg.train.freeze)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return wrap(model, device, cfg.train.sync_bn)


def _summarise(sums: torch.Tensor) -> dict[str, float]:
    """[loss * n, n, correct labels, labels] summed over the epoch -> mean loss and per-label accuracy."""
    return {
        "loss": round(sums[0].item() / max(sums[1].item(), 1), 6),
        "accuracy": round(100.0 * sums[2].item() / max(sums[3].item(), 1), 4),
    }


def _given_checkpoint(ctx: StageContext) -> dict[str, Any]:
    """`model.checkpoint` replaces training; it must be a wsss checkpoint with this dataset's classes."""
    source = ctx.source()
    path = Path(ctx.cfg.model.checkpoint).resolve()
    load_checkpoint(path, source.class_names)
    log.info("train: using checkpoint %s", path)
    return {"checkpoint": str(path), "class_names": source.class_names, "dataset": source.identity()}


def _zero_shot(ctx: StageContext) -> dict[str, Any]:
    """`model.class_map`: no training; the pretrained trunk and its ImageNet layer, grouped into the dataset's
    classes (`wsss.models.class_map`), saved as `model.pt` like a trained model."""
    source = ctx.source()
    m = ctx.cfg.model
    groups = class_groups(str(m.class_map), source.class_names)
    model = Classifier(
        source.num_classes, str(m.backbone), m.output_stride, m.weights, class_map=groups, class_combine=m.class_combine
    )
    left_out = [c for c, g in zip(source.class_names, groups, strict=True) if not g]
    log.info(
        "train: zero-shot %s head from %s (%d ImageNet classes, combined by %s); no counterpart: %s",
        m.backbone,
        m.class_map,
        sum(len(g) for g in groups),
        m.class_combine,
        ", ".join(left_out) or "none",
    )
    if dist.is_main():
        save_checkpoint(ctx.out_dir / "model.pt", model.eval(), source.class_names, epochs=0)
    return {
        "checkpoint": "model.pt",
        "class_names": source.class_names,
        "dataset": source.identity(),
        "zero_shot": {"class_map": str(m.class_map), "combine": str(m.class_combine), "no_counterpart": left_out},
    }


def build_run(cfg: DictConfig, source: SegmentationSource, device: torch.device) -> tuple[DataLoader, Loop, BatchLoss]:
    """The loader, the loop (model, optimizer, schedule, precision, EMA) and the batch loss of one training run;
    `run` fits them, `scripts/bench_train.py` times their epochs."""
    loader = _loader(source, cfg, device)
    model, net = _model(cfg, source.class_names, device)
    tc = cfg.train
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc.epochs * len(loader), round(tc.warmup_epochs * len(loader)))
    amp = resolve_amp_dtype(tc.amp_dtype, device)
    log.info("train: %s", f"autocast {amp}" if amp else "float32")
    loop = Loop("train", model, net, optimizer, scheduler, amp, device, cfg.seed, tc.epochs, tc.ema_decay)

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        logits = net(images)  # (B, K)
        loss = F.multilabel_soft_margin_loss(logits.float(), targets)
        correct = ((logits.detach() > 0) == (targets > 0.5)).sum()
        return loss, images.shape[0], torch.stack([correct.double(), correct.new_tensor(targets.numel()).double()])

    return loader, loop, batch_loss


def run(ctx: StageContext) -> dict[str, Any]:
    """Fit the classifier on the training split, resuming after the last finished epoch; write `model.pt`."""
    cfg = ctx.cfg
    if cfg.model.checkpoint:
        return _given_checkpoint(ctx)
    if cfg.model.class_map is not None:
        return _zero_shot(ctx)
    source = ctx.source()
    if not source.has_labels:
        raise ValueError(
            f"{source.root}: training needs image-level labels (labels.csv or labels.json); to label new images "
            "with a trained model: model.checkpoint=PATH cam.labels=predicted"
        )
    loader, loop, batch_loss = build_run(cfg, source, ctx.device)
    epochs = cfg.train.epochs

    start = time.perf_counter()
    done = loop.fit(loader, batch_loss, _summarise, ctx.out_dir, STATE)
    if dist.is_main():
        from wsss import viz

        viz.plot_training_curves(loop.history, ctx.out_dir / "curves.png")
        save_checkpoint(ctx.out_dir / "model.pt", loop.final_model().cpu(), source.class_names, epochs=epochs)
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
        "losses": [r["loss"] for r in loop.history],
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
    if cfg.model.class_map is not None:  # zero-shot: no training, so no training setting or seed shapes it
        return {"dataset": dataset_identity(cfg.dataset, split), "model": model}
    train = plain(cfg.train)
    if train["amp_dtype"] == "auto":  # the precision it resolves to on this device is what shapes the model
        train["amp_dtype"] = resolve_amp_dtype("auto", dist.local_device(str(cfg.device)))
    return {
        "dataset": dataset_identity(cfg.dataset, split),
        "model": model,
        "train": train,
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
    files = fp.dataset(split)
    m = cfg.model
    if str(m.backbone) in LITE and m.weights is not None:  # the installed package's weight file, by content
        files["weights"] = fp.content(Path(weight_file(str(m.backbone))), "model.weights")
    for key in ("class_map", "head_init"):
        if m[key] is not None:
            files[key] = fp.content(table_path(str(m[key])), f"model.{key}")
    return files


STAGE = Stage(
    name="train",
    run=run,
    config=("dataset", "model", "train", "seed"),
    params=_params,
    files=_files,
    split=lambda cfg: str(cfg.dataset.train_split),
)
