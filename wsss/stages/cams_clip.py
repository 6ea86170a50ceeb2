"""The `cams` stage with `cam=clip_es` (`model=clip_vit_b16`): CLIP-ES's maps from a frozen CLIP, no training.

Each image is resized to sides that are multiples of 16 (Pillow bicubic), CLIP-normalised, and its classes'
Grad-CAM and CAA maps computed (`wsss.cam.clip_es`) at the patch grid, then resized bilinearly to the image
(generate_cams_voc12.py:157, 196). The maps written are the CAA-refined ones (CLIP-ES's `attn_highres`), or the
Grad-CAM ones with `cam.clip_es.refine=false`; with `cam.clip_es.bg_power`, each file also carries CLIP-ES's
background score (1 - max) ** power (eval_cam.py:61), which `pseudo_masks` then uses instead of the constant
`pseudo.threshold`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss import dist
from wsss.artifacts import strided_maps, write_cams
from wsss.cam.clip_es import ClipES
from wsss.data import InferenceDataset, collate_list
from wsss.data.loader import Loader
from wsss.data.transforms import pil_resize
from wsss.dist import progress
from wsss.external import power_background
from wsss.models.clip import clip_normalize, clip_size, load_clip, prompt_names, text_embeddings
from wsss.stages.base import StageContext
from wsss.training import loader_workers

log = logging.getLogger(__name__)


def weights_identity(weights: str | None) -> str | None:
    """`model.weights` as key material: a file's resolved path (its bytes are fingerprinted), or the tag."""
    if weights is None or weights == "openai":
        return weights
    return str(Path(weights).resolve())


def _engine(ctx: StageContext, class_names: list[str]) -> ClipES:
    ce = ctx.cfg.cam.clip_es
    model = load_clip(ctx.cfg.model.weights, ctx.device)
    fg = text_embeddings(model, prompt_names(class_names), str(ce.template))
    bg = text_embeddings(model, list(ce.background), str(ce.template))
    return ClipES(model, fg, bg, int(ce.attention_layers), float(ce.box_threshold), bool(ce.refine))


def image_maps(es: ClipES, raw: torch.Tensor, labels: torch.Tensor, device: torch.device) -> np.ndarray:
    """(K, H, W) float32 maps of one uint8 (3, H, W) image's classes (sorted indices)."""
    h, w = raw.shape[-2:]
    image = clip_normalize(pil_resize(raw, clip_size(h, w)).to(device))[None]
    out = es(image, labels.to(device))
    maps = out.refined if es.refine else out.cam
    if not len(maps):
        return np.zeros((0, h, w), np.float32)
    return F.interpolate(maps[None], size=(h, w), mode="bilinear", align_corners=False)[0].cpu().numpy()


def run_clip_es(ctx: StageContext) -> dict[str, Any]:
    """`cam=clip_es`: each split image's CLIP-ES maps as `maps/<id>.npz`; files already written are kept."""
    cc = ctx.cfg.cam
    source = ctx.source()
    if not source.has_labels:
        raise ValueError(f"{source.root}: cam=clip_es needs each image's labels (its prompts are the classes')")
    maps_dir = ctx.out_dir / "maps"
    todo = [i for i in dist.shard(source.ids) if not (maps_dir / f"{i}.npz").is_file()]
    es = _engine(ctx, source.class_names)
    log.info("cams: CLIP-ES (refine=%s) on %d of %d images", es.refine, len(todo), len(source.ids))
    loader = Loader(
        InferenceDataset(source, todo),
        batch_size=1,
        num_workers=loader_workers(ctx.cfg.dataset.num_workers),
        collate_fn=collate_list,
    )
    seconds, empty = 0.0, 0
    power = cc.clip_es.bg_power
    for batch in progress(loader, total=len(todo), desc="cams clip_es", unit="img"):
        for it in batch:
            t0 = time.perf_counter()
            maps = image_maps(es, it["image"], it["labels"], ctx.device)
            seconds += time.perf_counter() - t0
            empty += len(it["labels"]) == 0
            # the background from the maps as stored (float16: in float16, as eval_cam.py:61 on CLIP-ES's files)
            kept = maps.astype(np.float16) if str(cc.store) == "float16" else maps
            bg = None if power is None else power_background(kept, float(power))
            strided = strided_maps(maps)
            write_cams(maps_dir / f"{it['id']}.npz", it["labels"], maps, strided, str(cc.store), background=bg)
    weights = weights_identity(ctx.cfg.model.weights)
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "maps_dir": "maps",
        "labels": "given",
        "predicted_labels": None,
        "ids": list(source.ids),
        "model": {"key": None, "clip_es": {"backbone": str(ctx.cfg.model.backbone), "weights": weights}},
        "cost": {"cam_seconds_per_image": round(seconds / len(todo), 5), "images_timed": len(todo)} if todo else None,
        "counts": {
            "images": len(source.ids),
            "computed": dist.sum_int(len(todo)),
            "no_labels": dist.sum_int(empty),
            "skipped": dict(source.skipped),
        },
    }
