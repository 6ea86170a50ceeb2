"""Stage `irn`: IRN's relation labels and IRNet's class-boundary branch (Ahn, Cho and Kwak, CVPR 2019).

1. Relation labels for every image of the training split from its CAMs (`wsss.refine.irn.ir_label`: the
   confident fg / bg bands, each smoothed by IRN's dense CRF), written as palette PNGs `ir_labels/<id>.png`
   (0 background, c + 1 class c, 255 no relation), in a pool of `refine.workers` processes, resumable.
2. The boundary branch (`wsss.models.irn.BoundaryNet`) on a frozen trunk (the ImageNet weights of
   `model.weights` with `irn.trunk=weights`, IRN's; or the trained classifier's trunk with `irn.trunk=classifier`,
   the only trained one when there are no pretrained weights), trained with IRN's boundary loss over the pairs
   within `irn.radius` of the labels reduced to 1/4 (Pillow nearest, IRN's `pil_rescale(label, 0.25, 0)`),
   on IRN's augmentation (uniform rescale in `irn.scale_range` with Pillow bicubic, flip, crop padded with
   0 / 255) and IRN's optimizer (SGD, `irn.momentum`, poly decay per step). Writes `irn.pt`.
   (IRN's `EdgeDisplacement` pads images to 512 at inference whatever the training crop: `refine.irn_pad`.)

`pseudo.refine=irn` then walks the CAMs with this network's boundaries (stage `refine`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from wsss import dist
from wsss.artifacts import read_cams, read_mask, write_mask
from wsss.data import SegmentationSource, dataset_identity
from wsss.data.transforms import TrainTransform, pil_resize
from wsss.models import load_checkpoint
from wsss.models.io import save_network
from wsss.models.irn import BoundaryNet
from wsss.parallel import WORKER, pool_map
from wsss.refine.irn import boundary_loss, ir_label
from wsss.stages.affinity import summarise_pairs
from wsss.stages.base import Need, Stage, StageContext, check_classes, plain
from wsss.stages.train import default_crop_size
from wsss.training import Loop, distributed_loader, wrap

log = logging.getLogger(__name__)

STATE = "irn_state.pt"


def _label_one(image_id: str) -> str:
    """The relation labels of one image, written atomically (runs in a pool worker or in-process)."""
    w = WORKER
    cams = read_cams(w["maps_dir"] / f"{image_id}.npz")
    image = w["source"].load_image(image_id).permute(1, 2, 0).numpy()
    label = ir_label(image, cams["maps"], cams["keys"], w["conf_fg"], w["conf_bg"], crf=w["crf"])
    write_mask(w["out"] / f"{image_id}.png", label)
    return image_id


def make_ir_labels(ctx: StageContext, source: SegmentationSource, maps_dir: Path, ids: list[str]) -> None:
    """Write `ir_labels/<id>.png` for `ids` not yet written (forkserver pool: see the refine stage)."""
    out = ctx.out_dir / "ir_labels"
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in dist.shard(ids) if not (out / f"{i}.png").is_file()]
    ic = ctx.cfg.irn
    state = {"source": source, "maps_dir": maps_dir, "out": out, "conf_fg": ic.conf_fg, "conf_bg": ic.conf_bg}
    state["crf"] = ic.crf
    pool_map(_label_one, todo, state, ctx.cfg.refine.workers, "irn labels")
    dist.barrier()


class RelationDataset(Dataset):
    """(image crop, relation labels at 1/4) pairs, augmented together."""

    def __init__(self, source: SegmentationSource, labels_dir: Path, transform: TrainTransform) -> None:
        self.source, self.labels_dir, self.transform = source, labels_dir, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_id = self.source.ids[i]
        labels = torch.from_numpy(read_mask(self.labels_dir / f"{image_id}.png"))
        image, labels = self.transform(self.source.load_image(image_id), labels)  # (3, S, S), (S, S)
        s = labels.shape
        return image, pil_resize(labels, (round(s[0] * 0.25), round(s[1] * 0.25)), nearest=True).long()


def build_boundary_net(cfg: DictConfig, train: Any, class_names: list[str]) -> BoundaryNet:
    """The boundary network on the trunk `irn.trunk` names (random branch weights from the seed)."""
    m = cfg.model
    if cfg.irn.trunk == "weights":
        return BoundaryNet(str(m.backbone), m.output_stride, str(m.stride_mode), weights=m.weights)
    classifier, _ = load_checkpoint(train.path("checkpoint"), class_names)
    k = classifier.kwargs
    net = BoundaryNet(str(k["backbone"]), k["output_stride"], str(k["stride_mode"]))
    net.backbone.load_state_dict(classifier.backbone.state_dict())
    return net


def build_run(
    cfg: DictConfig, source: SegmentationSource, labels_dir: Path, device: torch.device, train: Any
) -> tuple[Any, Loop, Any]:
    """The loader, the loop (network, IRN's optimizer and schedule) and the batch loss of one IRNet training;
    `run` fits them (scripts comparing with IRN's code replay IRN's batches through them)."""
    ic = cfg.irn
    crop = ic.crop_size or default_crop_size(source)
    transform = TrainTransform(crop, tuple(ic.scale_range), resize="pil_scale")
    dataset = RelationDataset(source, labels_dir, transform)
    batch = min(ic.batch_size, len(dataset))
    loader = distributed_loader(dataset, batch, cfg.seed, cfg.dataset.num_workers, device)
    torch.manual_seed(cfg.seed)
    model = build_boundary_net(cfg, train, source.class_names)
    model, net = wrap(model.to(device), device)
    # IRN's PolyOptimizer: plain SGD (its third positional argument, weight_decay, lands in SGD's momentum:
    # irn.momentum = 1e-4 reproduces that), weight decay per group, lr * (1 - step / max_step) ** 0.9 per step
    optimizer = torch.optim.SGD(
        model.trainable_parameters(), lr=ic.lr, momentum=ic.momentum, weight_decay=ic.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=ic.epochs * len(loader), power=0.9)
    loop = Loop("irn", model, net, optimizer, scheduler, None, device, cfg.seed, ic.epochs)
    log.info(
        "irn: %d images, crop %d, radius %d, conf_fg %s, conf_bg %s, trunk %s",
        len(dataset),
        crop,
        ic.radius,
        ic.conf_fg,
        ic.conf_bg,
        ic.trunk,
    )

    def batch_loss(b: tuple[Tensor, Tensor]) -> tuple[Tensor, int, Tensor]:
        images, labels = (t.to(device, non_blocking=True) for t in b)
        boundary = torch.sigmoid(net(images)[:, 0].float())
        loss, counts = boundary_loss(boundary, labels, ic.radius)
        return loss, images.shape[0], counts.double()

    return loader, loop, batch_loss


def run(ctx: StageContext) -> dict[str, Any]:
    """Relation labels, then the boundary branch trained on them; writes `ir_labels/` and `irn.pt`."""
    cfg, ic = ctx.cfg, ctx.cfg.irn
    source = ctx.source()
    cams = ctx.inputs["cams"]
    check_classes(cams, source.class_names)
    crop = ic.crop_size or default_crop_size(source)
    need = min_crop(ic.radius)
    if crop < need:
        raise ValueError(f"irn.radius={ic.radius} needs a crop of at least {need} px (its pairs at 1/4), got {crop}")
    make_ir_labels(ctx, source, cams.path("maps_dir"), list(source.ids))
    loader, loop, batch_loss = build_run(cfg, source, ctx.out_dir / "ir_labels", ctx.device, ctx.inputs.get("train"))
    model = loop.model
    start = time.perf_counter()
    done = loop.fit(loader, batch_loss, summarise_pairs, ctx.out_dir, STATE)
    if dist.is_main():
        from wsss import viz

        viz.plot_training_curves(loop.history, ctx.out_dir / "curves.png")
        save_network(ctx.out_dir / "irn.pt", model.cpu())
        (ctx.out_dir / STATE).unlink()
    shares = _label_shares(ctx.out_dir / "ir_labels", source.ids[: min(len(source.ids), 200)])
    return {
        "checkpoint": "irn.pt",
        "ir_labels_dir": "ir_labels",
        "class_names": source.class_names,
        "dataset": source.identity(),
        "counts": {"images": len(source), "ranks": dist.world_size(), "label_shares_first_200": shares},
        "losses": [r["loss"] for r in loop.history],
        "resumed_after_epoch": done,
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def min_crop(radius: int) -> int:
    """The smallest crop whose 1/4 grid holds a source pixel of IRN's window at `radius`."""
    return 4 * (2 * (radius - 1) + 1)


def _label_shares(labels_dir: Path, ids: list[str]) -> dict[str, float]:
    """Shares of background, foreground and no-relation pixels over some relation label maps (a sanity figure)."""
    counts = np.zeros(3)
    for image_id in ids:
        m = read_mask(labels_dir / f"{image_id}.png")
        counts += [(m == 0).sum(), ((m > 0) & (m < 255)).sum(), (m == 255).sum()]
    total = max(counts.sum(), 1)
    return dict(zip(("background", "foreground", "none"), (round(c / total, 4) for c in counts), strict=True))


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    params = {
        "dataset": dataset_identity(cfg.dataset, split),
        "irn": plain(cfg.irn),
        "seed": cfg.seed,
        "ranks": dist.world_size(),
    }
    if cfg.irn.trunk == "weights":
        m = cfg.model
        params["trunk"] = {"backbone": str(m.backbone), "weights": m.weights, "output_stride": m.output_stride}
        params["trunk"]["stride_mode"] = str(m.stride_mode)
    return params


def _needs(cfg: DictConfig, split: str) -> dict[str, Need]:
    needs = {"cams": Need("cams", split)}
    if cfg.irn.trunk == "classifier":
        needs["train"] = Need("train", str(cfg.dataset.train_split))
    return needs


STAGE = Stage(
    name="irn",
    run=run,
    config=("dataset", "irn", "refine", "model", "seed"),
    params=_params,
    needs=_needs,
    files=lambda cfg, split, fp: fp.dataset(split),
    split=lambda cfg: str(cfg.dataset.train_split),
)
