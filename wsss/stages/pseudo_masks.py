"""Stage `pseudo_masks`: threshold the CAMs into uint8 palette PNGs (0 background, 255 ignore)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from wsss import dist
from wsss.artifacts import read_cams, rle_results, write_json, write_mask
from wsss.data import dataset_identity
from wsss.dist import progress
from wsss.pseudo import threshold_mask
from wsss.stages.base import Artifact, Need, Stage, StageContext, plain
from wsss.stages.cams_import import masks_files, run_masks

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict[str, Any]:
    """Write `masks/<id>.png` for every image the CAM artifact covers (and `masks.rle.json` if asked)."""
    cams = ctx.inputs["maps"]  # the CAMs, or the refined maps with pseudo.refine
    class_names = list(cams.manifest["class_names"])
    maps_dir = cams.path("maps_dir")
    masks_dir = ctx.out_dir / "masks"
    p = ctx.cfg.pseudo
    ignored, total = torch.zeros((), dtype=torch.long), 0
    rle: list[dict[str, Any]] = []
    for image_id in progress(dist.shard(cams.manifest["ids"]), desc="pseudo masks", unit="img"):
        stored = read_cams(maps_dir / f"{image_id}.npz")
        maps = torch.from_numpy(stored["maps"]).to(ctx.device, torch.float32)  # (K, H, W)
        keys = torch.from_numpy(stored["keys"]).to(ctx.device)
        bg = torch.from_numpy(stored["background"]).to(ctx.device) if "background" in stored else None
        mask = threshold_mask(maps, keys, p.threshold, p.conf_fg, p.conf_bg, background=bg)
        ignored += (mask == 255).sum().cpu()
        total += mask.numel()
        mask_np = mask.cpu().numpy()
        write_mask(masks_dir / f"{image_id}.png", mask_np)
        if p.rle_json:
            rle.extend(rle_results(image_id, mask_np, class_names))
    ignored, total = dist.sum_int(int(ignored)), dist.sum_int(total)
    if p.rle_json:
        parts = dist.gather(rle)  # one file: every rank's results, on rank 0
        if dist.is_main():
            order = {image_id: i for i, image_id in enumerate(cams.manifest["ids"])}
            merged = sorted((r for part in parts for r in part), key=lambda r: order[r["image_id"]])  # stable
            write_json(ctx.out_dir / "masks.rle.json", merged)
    return {
        "class_names": class_names,
        "dataset": cams.manifest["dataset"],
        "masks_dir": "masks",
        "ids": list(cams.manifest["ids"]),
        "model": cams.manifest.get("model"),
        "rle_json": "masks.rle.json" if p.rle_json else None,
        "counts": {"images": len(cams.manifest["ids"]), "ignored_pixel_share": float(ignored) / max(total, 1)},
    }


def report(artifact: Artifact, run_dir: Path | None) -> None:
    """Say where the masks are and how many (when `stage=pseudo_masks` was the request)."""
    m = artifact.manifest
    masks = artifact.path("masks_dir")
    rle = f", and COCO RLE in {artifact.path('rle_json')}" if m.get("rle_json") else ""
    log.info(
        "pseudo_masks: %d masks of split %r in %s (palette PNGs: 0 background, c + 1 class c, 255 ignore%s)",
        m["counts"]["images"],
        artifact.split,
        masks,
        rle,
    )


def _run(ctx: StageContext) -> dict[str, Any]:
    return run_masks(ctx) if ctx.cfg.pseudo.source is not None else run(ctx)


def _params(cfg: Any, split: str) -> dict[str, Any]:
    p = plain(cfg.pseudo)
    if p["source"] is None:
        return {"pseudo": {k: v for k, v in p.items() if k != "source"}}
    return {"dataset": dataset_identity(cfg.dataset, split), "pseudo": {"source": str(Path(p["source"]).resolve())}}


def _needs(cfg: Any, split: str) -> dict[str, Need]:
    if cfg.pseudo.source is not None:
        return {}
    return {"maps": Need("cams" if cfg.pseudo.refine == "none" else "refine")}


STAGE = Stage(
    name="pseudo_masks",
    run=_run,
    config=("dataset", "pseudo"),
    params=_params,
    needs=_needs,
    files=masks_files,
    report=report,
    summary="Pseudo masks as palette PNGs: the maps thresholded (0 background, 255 ignore), or another method's "
    "label PNGs read from `pseudo.source`.",
)
