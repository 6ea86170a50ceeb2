"""Stage `cams`: multi-scale + flip class activation maps for every image-level class of each image."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from wsss import dist
from wsss.artifacts import read_cams, write_cams, write_json
from wsss.cam import build_cam
from wsss.cam.ops import resize_maps
from wsss.data import InferenceDataset, by_size, collate_list, dataset_identity
from wsss.data.loader import Loader
from wsss.data.transforms import normalize, pil_resize
from wsss.dist import progress
from wsss.models import load_checkpoint
from wsss.stages.base import Need, Stage, StageContext, check_classes, model_provenance, plain
from wsss.stages.cams_clip import run_clip_es, weights_identity
from wsss.stages.cams_import import cam_params, run_cams, source_files
from wsss.training import loader_workers

log = logging.getLogger(__name__)

AMP_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_IMAGES = 8  # images whose CAMs are timed against a plain forward of the same inputs (the cost ratio)


def _class_table(group: list[dict[str, Any]]) -> torch.Tensor:
    """(B, K) image-level classes of a group, padded with -1 (a -1 column gives zero maps)."""
    k = max(len(it["labels"]) for it in group)
    classes = torch.full((len(group), max(k, 1)), -1, dtype=torch.long)
    for row, it in enumerate(group):
        classes[row, : len(it["labels"])] = it["labels"]
    return classes


def _pil_scaled(raw: torch.Tensor, scales: tuple[float, ...], device: torch.device) -> list[torch.Tensor]:
    """IRN's `pil_rescale(img, s, order=3)` of uint8 (B, 3, H, W) images at every scale, then normalised: one
    (B, 3, round(H s), round(W s)) batch per scale on `device` (scale 1 is the image itself, as in IRN)."""
    h, w = raw.shape[-2:]
    out = []
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        out.append(normalize(torch.stack([pil_resize(im, size) for im in raw]).to(device)))
    return out


def _multiscale(
    cam: Any, images: torch.Tensor, classes: torch.Tensor, cc: Any, raw: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's multi-scale maps of a batch, in chunks of images and classes that fit `cam.memory_mb`; on the CPU.

    Maps are normalised per (image, class), so chunks give the maps of one call; each chunk's maps leave the
    device before the next is computed. With `cam.resize=pil_bicubic`, `raw` (the uint8 images, on the CPU)
    is rescaled with PIL per chunk of rows.
    """
    b, _, h, w = images.shape
    k = classes.shape[1]
    per_map = h * w * 4 * 3  # float32: the high-res sum, one scale's upsampled maps, and their copy out
    budget = cc.memory_mb << 20
    rows = max(1, min(b, budget // (per_map * k)))
    cols = max(1, min(k, budget // (per_map * rows)))
    high, low = [], []
    for r in range(0, b, rows):
        row_high, row_low = [], []
        pil = getattr(cc, "resize", "bilinear") == "pil_bicubic"
        scaled = _pil_scaled(raw[r : r + rows], tuple(cc.scales), images.device) if pil and raw is not None else None
        for c in range(0, k, cols):
            chunk = classes[r : r + rows, c : c + cols]
            canvas = getattr(cc, "canvas_stride", None)
            hi, lo = cam.multiscale(
                images[r : r + rows], chunk, tuple(cc.scales), cc.flip, canvas_stride=canvas, scaled=scaled
            )
            row_high.append(hi.cpu())
            row_low.append(lo.cpu())
        high.append(torch.cat(row_high, 1))
        low.append(torch.cat(row_low, 1))
    return torch.cat(high), torch.cat(low)


def _predict(model: torch.nn.Module, images: torch.Tensor, threshold: float, amp: torch.dtype | None) -> list:
    """`cam.labels=predicted`: each image's classes whose sigmoid score on the whole image (scale 1, no flip)
    exceeds `threshold`, as (sorted class indices, their scores)."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        scores = torch.sigmoid(model(images).float()).cpu()
    return [(torch.nonzero(row > threshold).flatten(), row) for row in scores]


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _plain_forward(model: torch.nn.Module, images: torch.Tensor, cc: Any, amp: torch.dtype | None) -> None:
    """The classifier's forward on the inputs `_multiscale` feeds it (every scale, with its flip), no CAM."""
    h, w = images.shape[-2:]
    with torch.no_grad(), torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        for scale in cc.scales:
            x = resize_maps(images, (max(1, round(h * scale)), max(1, round(w * scale))))
            model(torch.cat([x, x.flip(-1)]) if cc.flip else x)


def cam_model(ctx: StageContext, class_names: list[str]) -> torch.nn.Module:
    """The trained classifier, read at `cam.output_stride`, in eval mode on the device."""
    train = ctx.inputs["train"]
    check_classes(train, class_names)
    model, _ = load_checkpoint(train.path("checkpoint"), class_names)
    if ctx.cfg.cam.output_stride is not None:
        model.set_output_stride(ctx.cfg.cam.output_stride)
    if ctx.cfg.cam.channels_last:  # same maps up to rounding, 1.3-1.6x faster convolutions (BENCHMARKS.md)
        model = model.to(memory_format=torch.channels_last)
    return model.to(ctx.device).eval()


def _timed(cam, model, images, classes, cc, raw, amp, cost: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_multiscale`'s (B, K, H, W) and (B, K, H/4, W/4) maps, its seconds added to `cost`; the first
    `PROBE_IMAGES` images also go through a plain forward of the same inputs (the cost ratio)."""
    t0 = _clock(images.device)
    highres, strided = _multiscale(cam, images, classes, cc, raw)
    t1 = _clock(images.device)
    cost["cam_s"] += t1 - t0
    if cost["probe_images"] < PROBE_IMAGES:
        _plain_forward(model, images, cc, amp)
        cost["probe_cam_s"] += t1 - t0
        cost["probe_forward_s"] += _clock(images.device) - t1
        cost["probe_images"] += len(images)
    return highres, strided


def run(ctx: StageContext) -> dict[str, Any]:
    """Write `maps/<id>.npz` for every image of the split; images already written (a killed run) are kept."""
    cfg, cc = ctx.cfg, ctx.cfg.cam
    source = ctx.source()
    model = cam_model(ctx, source.class_names)
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
    predicted = cc.labels == "predicted"
    if not predicted and not source.has_labels:
        raise ValueError(f"{source.root}: the images have no labels file; label them with cam.labels=predicted")
    loader = Loader(
        InferenceDataset(source, todo, with_labels=not predicted),
        batch_size=cc.batch_size,
        num_workers=loader_workers(cfg.dataset.num_workers),
        collate_fn=collate_list,
    )
    empty = 0
    scores: dict[str, dict[str, float]] = {}  # cam.labels=predicted: each image's predicted classes and scores
    cost = {"cam_s": 0.0, "probe_cam_s": 0.0, "probe_forward_s": 0.0, "probe_images": 0}
    bar = progress(total=len(todo), desc=f"cams {cc.method}", unit="img")
    amp = AMP_DTYPES[None if cc.amp_dtype is None else str(cc.amp_dtype)]
    with build_cam(str(cc.method), model, target_layer=cc.target_layer, amp_dtype=amp, norm_eps=cc.norm_eps) as cam:
        for batch in loader:
            for group in by_size(batch):
                raw = torch.stack([it["image"] for it in group])  # (B, 3, H, W) uint8
                images = normalize(raw.to(ctx.device))
                if predicted:
                    for it, (labels, row) in zip(group, _predict(model, images, cc.score_threshold, amp), strict=True):
                        it["labels"] = labels = source.drop_void(labels)
                        scores[it["id"]] = {source.class_names[c]: round(float(row[c]), 4) for c in labels.tolist()}
                classes = _class_table(group).to(ctx.device)
                highres, strided = _timed(cam, model, images, classes, cc, raw, amp, cost)
                for row, it in enumerate(group):
                    n = len(it["labels"])
                    empty += n == 0
                    write_cams(
                        maps_dir / f"{it['id']}.npz", it["labels"], highres[row, :n], strided[row, :n], str(cc.store)
                    )
                bar.update(len(group))
    bar.close()
    if predicted:
        _write_predictions(ctx.out_dir / "predicted_labels.json", scores, source)
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "maps_dir": "maps",
        "labels": "predicted" if predicted else "given",
        "predicted_labels": "predicted_labels.json" if predicted else None,
        "ids": list(source.ids),
        "model": model_provenance(ctx.inputs["train"]),
        "cost": _cost(cost, len(todo)),
        "counts": {
            "images": len(source.ids),
            "computed": dist.sum_int(len(todo)),
            "no_labels": dist.sum_int(empty),
            "skipped": dict(source.skipped),
        },
    }


def _write_predictions(path, scores: dict[str, dict[str, float]], source) -> None:
    """Every rank's predicted classes with their scores, in one JSON on rank 0, in split order. Images a killed
    run had finished keep their classes (read back from their maps' keys) with the score null."""
    parts = dist.gather(scores)
    if not dist.is_main():
        return
    merged = {k: v for part in parts for k, v in part.items()}
    out = {}
    for image_id in source.ids:
        if image_id not in merged:
            keys = read_cams(path.parent / "maps" / f"{image_id}.npz")["keys"]
            merged[image_id] = {source.class_names[int(c)]: None for c in keys}
        out[image_id] = merged[image_id]
    write_json(path, out)


def _cost(cost: dict[str, Any], computed: int) -> dict[str, Any] | None:
    """CAM seconds per image (this rank, this run's images) and the ratio to a plain forward of the same inputs
    (timed on the first `PROBE_IMAGES` images); None when nothing was computed (a resumed, finished run)."""
    if not computed or not cost["probe_forward_s"]:
        return None
    return {
        "cam_seconds_per_image": round(cost["cam_s"] / computed, 5),
        "forward_seconds_per_image": round(cost["probe_forward_s"] / cost["probe_images"], 5),
        "ratio_to_forward": round(cost["probe_cam_s"] / cost["probe_forward_s"], 3),
        "probe_images": cost["probe_images"],
        "images_timed": computed,
    }


def _clip_es(cfg: Any) -> bool:
    """CLIP-ES's maps from a frozen CLIP (`cam=clip_es`): no classifier, so no `train` stage."""
    return cfg.cam.source is None and str(cfg.cam.method) == "clip_es"


def _run(ctx: StageContext) -> dict[str, Any]:
    if ctx.cfg.cam.source is not None:
        return run_cams(ctx)
    return run_clip_es(ctx) if _clip_es(ctx.cfg) else run(ctx)


def _files(cfg: Any, split: str, fp: Any) -> dict[str, Any]:
    files = dict(fp.dataset(split))
    if cfg.cam.source is not None:  # another method's maps: keyed by their bytes
        files["cam_source"] = source_files(str(cfg.cam.source), str(cfg.cam.source_format), "cam.source")
    elif _clip_es(cfg) and cfg.model.weights not in (None, "openai"):  # CLIP's weights: keyed by their bytes
        files["clip_weights"] = fp.content(str(cfg.model.weights), "model.weights")
    return files


def _params(cfg: Any, split: str) -> dict[str, Any]:
    params = {"dataset": dataset_identity(cfg.dataset, split), "cam": cam_params(plain(cfg.cam))}
    if _clip_es(cfg):
        params["model"] = {"backbone": str(cfg.model.backbone), "weights": weights_identity(cfg.model.weights)}
    return params


def _needs(cfg: Any, split: str) -> dict[str, Need]:
    if cfg.cam.source is not None or _clip_es(cfg):
        return {}
    return {"train": Need("train", cfg.dataset.train_split)}


STAGE = Stage(
    name="cams",
    run=_run,
    config=("dataset", "cam", "model"),
    params=_params,
    needs=_needs,
    files=_files,
    summary="Class activation maps of every image's classes: wsss's classifier's (multi-scale + flip), CLIP-ES's "
    "from a frozen CLIP (`cam=clip_es`), or another method's read from `cam.source`.",
)
