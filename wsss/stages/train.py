"""Stage `train`: fit the GAP classifier on image-level labels (multilabel soft margin loss)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.data import ClassificationDataset, SegmentationSource
from wsss.data.transforms import TrainTransform
from wsss.models import Classifier, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def default_crop_size(source: SegmentationSource) -> int:
    """The first image's longer side rounded up to a multiple of 32, at most 512."""
    h, w = source.load_image(source.ids[0]).shape[-2:]
    return min(512, 32 * math.ceil(max(h, w) / 32))


def build_optimizer(model: Classifier, tc: DictConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over backbone and head groups; the head's lr is `head_lr_mult` times larger."""
    backbone, head = model.param_groups()
    groups = [{**backbone, "lr": tc.lr}, {**head, "lr": tc.lr * tc.head_lr_mult}]
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=tc.momentum > 0
        )
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {tc.optimizer!r}")


def run(cfg: DictConfig, ctx) -> dict[str, Any]:
    source = ctx.source(cfg.dataset.train_split)
    ckpt_path = ctx.out_dir / "model.pt"
    if cfg.model.checkpoint:
        # A given checkpoint replaces training; it must carry this dataset's classes.
        load_checkpoint(cfg.model.checkpoint, source.class_names)
        log.info("train: using checkpoint %s", cfg.model.checkpoint)
        return {
            "checkpoint": str(cfg.model.checkpoint),
            "class_names": source.class_names,
            "dataset": source.identity(),
        }

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
    # Workers' torch RNGs (which the transforms draw from) are seeded from this generator.
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=tc.num_workers,
        generator=gen,
        persistent_workers=tc.num_workers > 0,
        pin_memory=ctx.device.type == "cuda",
    )
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = Classifier(source.num_classes, m.backbone, m.output_stride, m.weights).to(ctx.device)
    optimizer = build_optimizer(model, tc)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    total = tc.epochs * len(loader)
    log.info(
        "train: %d images, crop %d, %d epochs x %d steps on %s",
        len(dataset),
        crop,
        tc.epochs,
        len(loader),
        ctx.device,
    )
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    for epoch in range(tc.epochs):
        running, n = torch.zeros((), device=ctx.device), 0
        bar = tqdm(loader, desc=f"train {epoch + 1}/{tc.epochs}", unit="batch", leave=False)
        for images, targets in bar:
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = lr * (1 - step / total) ** 0.9  # poly decay, as IRN
            loss = F.multilabel_soft_margin_loss(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            n += 1
            step += 1
        losses.append(float(running) / max(n, 1))
        log.info("train: epoch %d/%d loss %.4f", epoch + 1, tc.epochs, losses[-1])
    seconds = time.perf_counter() - start
    save_checkpoint(ckpt_path, model.cpu(), source.class_names, epochs=tc.epochs)
    return {
        "checkpoint": str(ckpt_path),
        "class_names": source.class_names,
        "dataset": source.identity(),
        "counts": {"images": len(dataset), "steps": step, "skipped": dict(source.skipped)},
        "losses": [round(x, 5) for x in losses],
        "train_seconds": round(seconds, 2),
    }
