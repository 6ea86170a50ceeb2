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


def run(cfg: DictConfig, ctx) -> dict[str, Any]:
    source = ctx.source(cfg.dataset.eval_split)
    ctx.check_classes("train", source)
    train = ctx.manifests["train"]
    model, _ = load_checkpoint(train["checkpoint"], source.class_names)
    model = model.to(ctx.device).eval()
    cc = cfg.cam
    if cc.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"cam.amp_dtype must be one of {list(AMP_DTYPES)}, got {cc.amp_dtype!r}")
    maps_dir = ctx.out_dir / "maps"
    # Resume: npz files are written atomically, so an existing one is complete.
    todo = [i for i in dist.shard(source.ids) if not (maps_dir / f"{i}.npz").is_file()]
    log.info("cams: %s on %s, %d of %d images to do", cc.method, cc.target_layer, len(todo), len(source.ids))
    loader = DataLoader(InferenceDataset(source, todo), batch_size=1, num_workers=cfg.train.num_workers,
                        collate_fn=collate_list)  # fmt: skip
    empty = 0
    with build_cam(cc.method, model, target_layer=cc.target_layer, amp_dtype=AMP_DTYPES[cc.amp_dtype]) as cam:
        for (item,) in tqdm(loader, desc=f"cams {cc.method}", unit="img"):
            image = normalize(item["image"].to(ctx.device))[None]  # (1, 3, H, W)
            keys = item["labels"].to(ctx.device)  # (K,)
            h, w = image.shape[-2:]
            if keys.numel() == 0:  # no foreground class: nothing to localise
                empty += 1
                highres = torch.zeros((0, h, w))
                strided = torch.zeros((0, (h + 3) // 4, (w + 3) // 4))
            else:
                highres, strided = cam.multiscale(image, keys[None], scales=tuple(cc.scales), flip=cc.flip)
                highres, strided = highres[0], strided[0]  # (K, H, W), (K, H/4, W/4)
            write_cams(maps_dir / f"{item['id']}.npz", keys.cpu(), highres.cpu(), strided=strided.cpu().half())
    dist.barrier()
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "maps_dir": str(maps_dir),
        "counts": {"images": len(source.ids), "computed": len(todo), "no_labels": empty,
                   "skipped": dict(source.skipped)},  # fmt: skip
    }
