"""Stage `affinity`: train AffinityNet on the confident labels of the CAMs (Ahn and Kwak, CVPR 2018).

Labels come from the training split's CAMs by IRN's band rule: a pixel whose best map exceeds
`affinity.conf_fg` takes that class, one whose best map is at most `affinity.conf_bg` is background, and the
rest is unlabelled (255). Image and label map are augmented together (transforms.v2), the labels are taken to
the feature resolution (1/4) by nearest neighbours, and pairs of pixels closer than `affinity.radius` are
positives (same label) or negatives (different labels). The trunk starts from the trained classifier's.
Seeded, resumable per epoch and distributed like `train` (see `wsss.training`).
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
from torch import Tensor
from torch.utils.data import Dataset

from wsss import dist
from wsss.artifacts import read_cams
from wsss.data import SegmentationSource, dataset_identity
from wsss.data.transforms import TrainTransform
from wsss.models import AffinityNet, load_checkpoint
from wsss.models.affinity import affinity_loss
from wsss.models.io import save_network
from wsss.pseudo import pseudo_mask
from wsss.stages.base import Need, Stage, StageContext, check_classes, plain
from wsss.stages.train import default_crop_size
from wsss.training import Loop, distributed_loader, wrap

log = logging.getLogger(__name__)

STATE = "affinity_state.pt"


class AffinityDataset(Dataset):
    """(image, label map at 1/4) pairs: labels from the CAMs by the confident band, augmented with the image."""

    def __init__(
        self, source: SegmentationSource, maps_dir: Path, transform: TrainTransform, conf_fg: float, conf_bg: float
    ) -> None:
        self.source, self.maps_dir, self.transform = source, maps_dir, transform
        self.conf_fg, self.conf_bg = conf_fg, conf_bg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_id = self.source.ids[i]
        cams = read_cams(self.maps_dir / f"{image_id}.npz")
        labels = pseudo_mask(
            torch.from_numpy(cams["maps"]), torch.from_numpy(cams["keys"]), conf_fg=self.conf_fg, conf_bg=self.conf_bg
        )
        image, labels = self.transform(self.source.load_image(image_id), labels)  # (3, S, S), (S, S)
        size = (math.ceil(labels.shape[0] / 4), math.ceil(labels.shape[1] / 4))
        quarter = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, quarter


def summarise_pairs(sums: Tensor) -> dict[str, float]:
    """[loss * n, n, bg-pos, fg-pos, neg pairs] -> mean loss and the mean pair counts per image."""
    n = max(sums[1].item(), 1)
    return {
        "loss": round(sums[0].item() / n, 6),
        "bg_pairs": round(sums[2].item() / n, 1),
        "fg_pairs": round(sums[3].item() / n, 1),
        "neg_pairs": round(sums[4].item() / n, 1),
    }


def run(ctx: StageContext) -> dict[str, Any]:
    """Train AffinityNet on the training split's confident CAM labels; write `affinity.pt`."""
    cfg, ac = ctx.cfg, ctx.cfg.affinity
    source = ctx.source()
    cams, train = ctx.inputs["cams"], ctx.inputs["train"]
    check_classes(cams, source.class_names)
    crop = ac.crop_size or default_crop_size(source)
    transform = TrainTransform(crop, tuple(ac.scale_range))
    dataset = AffinityDataset(source, cams.path("maps_dir"), transform, ac.conf_fg, ac.conf_bg)
    batch = min(ac.batch_size, len(dataset))
    loader = distributed_loader(dataset, batch, cfg.seed, cfg.dataset.num_workers, ctx.device)
    torch.manual_seed(cfg.seed)
    classifier, _ = load_checkpoint(train.path("checkpoint"), source.class_names)
    model = AffinityNet(str(classifier.kwargs["backbone"]), ac.dim)
    model.init_from_classifier(classifier)
    model, net = wrap(model.to(ctx.device), ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ac.lr, weight_decay=ac.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=ac.epochs * len(loader), power=0.9)
    loop = Loop("affinity", model, net, optimizer, scheduler, ac.amp_dtype, ctx.device, cfg.seed, ac.epochs)
    log.info(
        "affinity: %d images, crop %d, radius %d, conf_fg %s, conf_bg %s",
        len(dataset),
        crop,
        ac.radius,
        ac.conf_fg,
        ac.conf_bg,
    )

    def batch_loss(b: tuple[Tensor, Tensor]) -> tuple[Tensor, int, Tensor]:
        images, labels = (t.to(ctx.device, non_blocking=True) for t in b)
        loss, counts = affinity_loss(net(images).float(), labels, ac.radius)
        return loss, images.shape[0], counts.double()

    start = time.perf_counter()
    done = loop.fit(loader, batch_loss, summarise_pairs, ctx.out_dir, STATE)
    if dist.is_main():
        from wsss import viz

        viz.plot_training_curves(loop.history, ctx.out_dir / "curves.png")
        save_network(ctx.out_dir / "affinity.pt", model.cpu())
        (ctx.out_dir / STATE).unlink()
    return {
        "checkpoint": "affinity.pt",
        "class_names": source.class_names,
        "dataset": source.identity(),
        "counts": {"images": len(dataset), "ranks": dist.world_size(), "skipped": dict(source.skipped)},
        "losses": [r["loss"] for r in loop.history],
        "resumed_after_epoch": done,
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    return {
        "dataset": dataset_identity(cfg.dataset, split),
        "affinity": plain(cfg.affinity),
        "seed": cfg.seed,
        "ranks": dist.world_size(),
    }


STAGE = Stage(
    name="affinity",
    run=run,
    config=("dataset", "affinity", "seed"),
    params=_params,
    needs=lambda cfg, split: {"cams": Need("cams", split), "train": Need("train", str(cfg.dataset.train_split))},
    files=lambda cfg, split, fp: fp.dataset(split),
    split=lambda cfg: str(cfg.dataset.train_split),
)
