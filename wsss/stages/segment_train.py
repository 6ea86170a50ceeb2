"""Stages `segment_train` and `segment_gt_train`: fit the segmentation network on the train split's masks.

`segment_train` trains on the pseudo masks of `dataset.train_split` (whichever `pseudo.refine` made them; 255 is
ignored by the loss), `segment_gt_train` on its ground truth (the fully supervised bound, and `segment.labels=gt`).
Their keys hold the training settings only: the inference settings of `segment` (`segment.scales`, `flip`, `crf`,
`rle_json`, `batch_size_eval`, `eval_split`) and `evaluate.bootstrap` shape the `segment` artifact downstream,
so changing them predicts and scores again from the trained network, without training another.

Training is the shared loop (`wsss.training`: DDP, AMP, EMA, per-epoch resume, history.csv, curves,
TensorBoard), with the classifier's optimizer and poly schedule (`build_optimizer`, `build_scheduler`) and
IRN's joint image + mask augmentation (`TrainTransform`: random rescale, flip, crop padded with 255).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from wsss import dist
from wsss.artifacts import IGNORE_INDEX
from wsss.data import SegmentationSource, dataset_identity
from wsss.data.base import read_label_mask
from wsss.data.transforms import TrainTransform
from wsss.dist import progress
from wsss.fingerprint import FileGroup
from wsss.models.io import save_network
from wsss.models.segmenter import Segmenter
from wsss.stages.base import Artifact, Fingerprints, Need, Stage, StageContext, check_classes, plain
from wsss.stages.train import build_optimizer, build_scheduler, default_crop_size
from wsss.training import BatchLoss, Loop, distributed_loader, resolve_amp_dtype, wrap

log = logging.getLogger(__name__)

STATE = "segment_state.pt"
NETWORK = "segment.pt"
# segment settings that act after training (prediction, scoring, which rows the table shows): not in the key
INFERENCE = ("labels", "compare_gt", "eval_split", "checkpoint", "scales", "flip", "batch_size_eval", "crf", "rle_json")


class SegmentationDataset(Dataset):
    """(image, label map) pairs augmented together: the pseudo masks of a folder, or the split's ground truth."""

    def __init__(self, source: SegmentationSource, masks_dir: Path | None, transform: TrainTransform) -> None:
        self.source, self.masks_dir, self.transform = source, masks_dir, transform

    def __len__(self) -> int:
        return len(self.source)

    def label_map(self, image_id: str) -> np.ndarray:
        """(H, W) uint8: 0 background, c + 1 class c, 255 ignored."""
        if self.masks_dir is None:
            return self.source.load_mask(image_id)
        size = self.source.image_size(image_id)
        return read_label_mask(self.masks_dir / f"{image_id}.png", self.source.num_classes, size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_id = self.source.ids[i]
        mask = torch.from_numpy(self.label_map(image_id))
        image, mask = self.transform(self.source.load_image(image_id), mask)  # (3, S, S), (S, S)
        return image, mask.long()


def check_label_maps(dataset: SegmentationDataset) -> int:
    """Read every label map once before training: a value outside the class list, a size other than its
    image's or a missing file stops the run naming the file. Returns the labelled (non-255) pixel count."""
    labelled = 0
    for image_id in progress(dist.shard(dataset.source.ids), desc="segment: check masks", unit="img"):
        labelled += int((dataset.label_map(image_id) != IGNORE_INDEX).sum())
    return dist.sum_int(labelled)


def segmentation_loss(logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the labelled pixels (255 ignored), averaged over them; a batch without any labelled
    pixel gives 0, not NaN. Returns the loss and [correct, labelled] pixel counts."""
    labelled = masks != IGNORE_INDEX
    n = labelled.sum()
    loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum") / n.clamp(min=1)
    correct = ((logits.detach().argmax(1) == masks) & labelled).sum()
    return loss, torch.stack([correct.double(), n.double()])


def _summarise(sums: Tensor) -> dict[str, float]:
    """[loss * n, n, correct pixels, labelled pixels] -> mean loss and pixel accuracy on labelled pixels."""
    return {
        "loss": round(sums[0].item() / max(sums[1].item(), 1), 6),
        "pixel_accuracy": round(100.0 * sums[2].item() / max(sums[3].item(), 1), 4),
    }


def build_run(
    cfg: DictConfig, source: SegmentationSource, masks_dir: Path | None, device: torch.device
) -> tuple[SegmentationDataset, DataLoader, Loop, BatchLoss]:
    """The dataset (masks from `masks_dir`, or the ground truth when None), loader, loop and batch loss of one
    segmenter training; `run` fits them, `scripts/bench_segment.py` times their epochs."""
    sc = cfg.segment
    crop = sc.crop_size or default_crop_size(source)
    dataset = SegmentationDataset(source, masks_dir, TrainTransform(crop, tuple(sc.scale_range)))
    batch = min(sc.batch_size, len(dataset))
    loader = distributed_loader(dataset, batch, cfg.seed, cfg.dataset.num_workers, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Segmenter(
        source.num_classes + 1, str(sc.network), str(sc.backbone), sc.output_stride, sc.weights, sc.frozen_bn
    )
    model = model.to(device)
    if sc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, net = wrap(model, device)
    optimizer = build_optimizer(model, sc)
    scheduler = build_scheduler(optimizer, sc.epochs * len(loader), round(sc.warmup_epochs * len(loader)))
    amp = resolve_amp_dtype(sc.amp_dtype, device)
    loop = Loop("segment", model, net, optimizer, scheduler, amp, device, cfg.seed, sc.epochs, sc.ema_decay)

    def batch_loss(b: tuple[Tensor, Tensor]) -> tuple[Tensor, int, Tensor]:
        images, targets = (t.to(device, non_blocking=True) for t in b)
        loss, counts = segmentation_loss(net(images), targets)
        return loss, images.shape[0], counts

    return dataset, loader, loop, batch_loss


def _labels(stage: str) -> str:
    return "gt" if stage == "segment_gt_train" else "pseudo"


def run(ctx: StageContext) -> dict[str, Any]:
    """Fit the network on the train split's masks (resuming after the last finished epoch); write segment.pt."""
    cfg, sc = ctx.cfg, ctx.cfg.segment
    labels = _labels(ctx.stage)
    source = ctx.source()
    masks_dir = None
    if labels == "pseudo":
        masks = ctx.inputs["masks"]
        check_classes(masks, source.class_names)
        masks_dir = masks.path("masks_dir")
    dataset, loader, loop, batch_loss = build_run(cfg, source, masks_dir, ctx.device)
    labelled = check_label_maps(dataset)
    log.info(
        "segment: %s on %s at output stride %d, trained on %d %s masks of %s (%.1f %% of pixels labelled), crop %d, "
        "%d epochs, batch %d over %d rank(s), %s",
        sc.network,
        sc.backbone if sc.network != "lraspp" else "mobilenet_v3_large",
        sc.output_stride,
        len(dataset),
        "ground-truth" if labels == "gt" else "pseudo",
        source.split,
        100.0 * labelled / max(1, sum(int(np.prod(source.image_size(i))) for i in source.ids)),
        dataset.transform.crop_size,
        sc.epochs,
        loader.batch_size,
        dist.world_size(),
        f"autocast {amp}" if (amp := resolve_amp_dtype(sc.amp_dtype, ctx.device)) else "float32",
    )
    start = time.perf_counter()
    done = loop.fit(loader, batch_loss, _summarise, ctx.out_dir, STATE)
    if dist.is_main():
        from wsss import viz

        viz.plot_training_curves(loop.history, ctx.out_dir / "curves.png")
        save_network(ctx.out_dir / NETWORK, loop.final_model().cpu())
        (ctx.out_dir / STATE).unlink()
    dist.barrier()
    training = {
        "images": len(dataset),
        "labels": labels,
        "labelled_pixels": labelled,
        "epochs": sc.epochs,
        "steps": sc.epochs * len(loader),
        "losses": [r["loss"] for r in loop.history],
        "resumed_after_epoch": done,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return {"class_names": source.class_names, "dataset": source.identity(), "network": NETWORK, "training": training}


def report(artifact: Artifact, run_dir: Path | None) -> None:
    """Log where the trained network is and its last epoch's loss."""
    t = artifact.manifest["training"]
    log.info(
        "%s: %s trained %d epochs on %s %s masks (last loss %s)",
        artifact.stage,
        artifact.path("network"),
        t["epochs"],
        artifact.split,
        "ground-truth" if t["labels"] == "gt" else "pseudo",
        t["losses"][-1] if t["losses"] else None,
    )


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The segment settings that shape the trained network (none of `INFERENCE`), the seed and the rank count."""
    s = {k: v for k, v in plain(cfg.segment).items() if k not in INFERENCE}
    if s["amp_dtype"] == "auto":
        s["amp_dtype"] = resolve_amp_dtype("auto", dist.local_device(str(cfg.device)))
    # N ranks split every batch: another training, another network
    return {"segment": s, "seed": cfg.seed, "ranks": dist.world_size()}


def _params(cfg: DictConfig, split: str, labels: str) -> dict[str, Any]:
    return {"dataset": dataset_identity(cfg.dataset, split), "labels": labels, **training_settings(cfg)}


def _files(cfg: DictConfig, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    return fp.dataset(split)


def _train_split(cfg: DictConfig) -> str:
    return str(cfg.dataset.train_split)


STAGE = Stage(
    name="segment_train",
    run=run,
    config=("dataset", "segment", "seed"),
    params=lambda cfg, split: _params(cfg, split, "pseudo"),
    needs=lambda cfg, split: {"masks": Need("pseudo_masks", split)},
    files=_files,
    split=_train_split,
    report=report,
)

GT_STAGE = Stage(
    name="segment_gt_train",
    run=run,
    config=("dataset", "segment", "seed"),
    params=lambda cfg, split: _params(cfg, split, "gt"),
    files=_files,
    split=_train_split,
    report=report,
    summary="Fit the segmentation network on the train split's ground truth (the fully supervised bound, and "
    "`segment.labels=gt`).",
    ground_truth=lambda cfg, split: True,
)
