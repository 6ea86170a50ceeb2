"""Stage `train`: fit the GAP classifier on image-level labels (multilabel soft margin loss)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.data import ClassificationDataset, SegmentationSource, dataset_identity
from wsss.data.transforms import TrainTransform
from wsss.fingerprint import FileGroup
from wsss.models import Classifier, load_checkpoint, save_checkpoint
from wsss.stages.base import Fingerprints, Stage, StageContext, plain

log = logging.getLogger(__name__)


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


def _loader(source: SegmentationSource, cfg: DictConfig, device: torch.device) -> DataLoader:
    """Shuffled, augmented batches of the training split (a split smaller than a batch gives one batch)."""
    tc = cfg.train
    crop = tc.crop_size or default_crop_size(source)
    dataset = ClassificationDataset(source, TrainTransform(crop, tuple(tc.scale_range)))
    batch_size = tc.batch_size
    if len(dataset) < batch_size:
        batch_size = len(dataset)
        log.warning(
            "train: split %r has %d images, fewer than train.batch_size=%d; using batches of %d",
            source.split,
            len(dataset),
            tc.batch_size,
            batch_size,
        )
    log.info("train: %d images, crop %d, %d epochs", len(dataset), crop, tc.epochs)
    # Workers' torch RNGs (which the transforms draw from) are seeded from this generator.
    gen = torch.Generator().manual_seed(cfg.seed)
    workers = cfg.dataset.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        generator=gen,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )


def _given_checkpoint(ctx: StageContext) -> dict[str, Any]:
    """`model.checkpoint` replaces training; it must be a wsss checkpoint with this dataset's classes."""
    source = ctx.source()
    path = Path(ctx.cfg.model.checkpoint).resolve()
    load_checkpoint(path, source.class_names)
    log.info("train: using checkpoint %s", path)
    return {"checkpoint": str(path), "class_names": source.class_names, "dataset": source.identity()}


def run(ctx: StageContext) -> dict[str, Any]:
    """Fit the classifier on the training split; write `model.pt`."""
    cfg = ctx.cfg
    if cfg.model.checkpoint:
        return _given_checkpoint(ctx)
    source = ctx.source()
    loader = _loader(source, cfg, ctx.device)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = Classifier(source.num_classes, str(m.backbone), m.output_stride, m.weights).to(ctx.device)
    optimizer = build_optimizer(model, cfg.train)
    epochs, total = cfg.train.epochs, cfg.train.epochs * len(loader)
    # IRN's poly decay, lr * (1 - step / total) ** 0.9, stepped once per batch.
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    for epoch in range(epochs):
        running, n = torch.zeros((), device=ctx.device), 0
        for images, targets in tqdm(loader, desc=f"train {epoch + 1}/{epochs}", unit="batch", leave=False):
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            loss = F.multilabel_soft_margin_loss(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.detach()
            n += 1
            step += 1
        losses.append(float(running) / max(n, 1))
        log.info("train: epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    seconds = time.perf_counter() - start
    save_checkpoint(ctx.out_dir / "model.pt", model.cpu(), source.class_names, epochs=epochs)
    return {
        "checkpoint": "model.pt",
        "class_names": source.class_names,
        "dataset": source.identity(),
        "counts": {"images": len(source), "steps": step, "skipped": dict(source.skipped)},
        "losses": [round(x, 5) for x in losses],
        "train_seconds": round(seconds, 2),
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
