"""Stage `cams`: multi-scale + flip class activation maps for every image-level class of each image."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss import dist
from wsss.artifacts import write_cams
from wsss.cam import build_cam
from wsss.data import InferenceDataset, collate_list
from wsss.data.transforms import normalize
from wsss.models import load_checkpoint

log = logging.getLogger(__name__)

AMP_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _by_size(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a list of samples into groups of equal image size (order kept within a group)."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape[-2:]), []).append(item)
    return list(groups.values())


def run(cfg: DictConfig, ctx) -> dict[str, Any]:
    source = ctx.source(cfg.dataset.eval_split)
    ctx.check_classes("train", source)
    train = ctx.manifests["train"]
    model, _ = load_checkpoint(train["checkpoint"], source.class_names)
    cc = cfg.cam
    if cc.output_stride is not None:
        model.set_output_stride(cc.output_stride)
    model = model.to(ctx.device).eval()
    if cc.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"cam.amp_dtype must be one of {list(AMP_DTYPES)}, got {cc.amp_dtype!r}")
    maps_dir = ctx.out_dir / "maps"
    # Resume: npz files are written atomically, so an existing one is complete.
    todo = [i for i in dist.shard(source.ids) if not (maps_dir / f"{i}.npz").is_file()]
    log.info(
        "cams: %s on %s at output stride %s, %d of %d images to do",
        cc.method,
        cc.target_layer,
        model.output_stride,
        len(todo),
        len(source.ids),
    )
    loader = DataLoader(
        InferenceDataset(source, todo),
        batch_size=cc.batch_size,
        num_workers=cfg.train.num_workers,
        collate_fn=collate_list,
    )
    empty = 0
    bar = tqdm(total=len(todo), desc=f"cams {cc.method}", unit="img")
    with build_cam(cc.method, model, target_layer=cc.target_layer, amp_dtype=AMP_DTYPES[cc.amp_dtype]) as cam:
        for batch in loader:
            for group in _by_size(batch):
                images = normalize(torch.stack([it["image"] for it in group]).to(ctx.device))  # (B, 3, H, W)
                h, w = images.shape[-2:]
                k = max(len(it["labels"]) for it in group)
                classes = torch.full((len(group), max(k, 1)), -1, dtype=torch.long)  # -1 pads: zero maps
                for row, it in enumerate(group):
                    classes[row, : len(it["labels"])] = it["labels"]
                highres, strided = cam.multiscale(
                    images, classes.to(ctx.device), scales=tuple(cc.scales), flip=cc.flip
                )  # (B, K, H, W), (B, K, H/4, W/4)
                highres, strided = highres.cpu(), strided.cpu().half()
                for row, it in enumerate(group):
                    n = len(it["labels"])
                    empty += n == 0
                    write_cams(
                        maps_dir / f"{it['id']}.npz", it["labels"], highres[row, :n], strided=strided[row, :n]
                    )
                bar.update(len(group))
    bar.close()
    dist.barrier()
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "maps_dir": str(maps_dir),
        "counts": {
            "images": len(source.ids),
            "computed": len(todo),
            "no_labels": empty,
            "skipped": dict(source.skipped),
        },
    }
