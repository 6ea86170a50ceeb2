"""Stage `pseudo_masks`: threshold the CAMs into uint8 palette PNGs (0 background, 255 ignore)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from wsss import dist
from wsss.artifacts import read_cams, rle_results, write_json, write_mask
from wsss.pseudo import threshold_mask

log = logging.getLogger(__name__)


def run(cfg: DictConfig, ctx) -> dict[str, Any]:
    source = ctx.source(cfg.dataset.eval_split)
    ctx.check_classes("cams", source)
    maps_dir = Path(ctx.manifests["cams"]["maps_dir"])
    masks_dir = ctx.out_dir / "masks"
    p = cfg.pseudo
    if p.crf:
        raise ValueError(
            "pseudo.crf=true: no dense-CRF package is installed with wsss; see README (Pseudo masks)"
        )
    ignored = torch.zeros((), dtype=torch.long)
    total = 0
    rle: list[dict[str, Any]] = []
    for image_id in tqdm(dist.shard(source.ids), desc="pseudo masks", unit="img"):
        cams = read_cams(maps_dir / f"{image_id}.npz")
        maps = torch.from_numpy(cams["maps"]).to(ctx.device, torch.float32)  # (K, H, W)
        keys = torch.from_numpy(cams["keys"]).to(ctx.device)
        mask = threshold_mask(maps, keys, p.threshold, p.conf_fg, p.conf_bg)
        ignored += (mask == 255).sum().cpu()
        total += mask.numel()
        mask_np = mask.cpu().numpy()
        write_mask(masks_dir / f"{image_id}.png", mask_np)
        if p.rle_json:
            rle.extend(rle_results(image_id, mask_np, source.class_names))
    ignored = dist.all_reduce_sum(ignored)
    if p.rle_json:
        write_json(
            ctx.out_dir / f"masks.rle.rank{dist.rank()}.json"
            if dist.is_dist()
            else ctx.out_dir / "masks.rle.json",
            rle,
        )
    dist.barrier()
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "masks_dir": str(masks_dir),
        "rle_json": str(ctx.out_dir / "masks.rle.json") if p.rle_json else None,
        "maps_dir": str(maps_dir),
        "counts": {"images": len(source.ids), "ignored_pixel_share": float(ignored) / max(total, 1)},
    }
