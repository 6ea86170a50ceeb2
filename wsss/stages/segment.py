"""Stages `segment` and `segment_gt`: predict `segment.eval_split` with a trained segmentation network
(multi-scale + flip inference) and score it with evaluate's scorer.

The network is the `segment_train` artifact (trained on the pseudo masks of `dataset.train_split`), the
`segment_gt_train` one (trained on its ground truth: `segment.labels=gt`, and `segment_gt`, the fully supervised
bound), or `segment.checkpoint`. Training lives upstream, keyed by the training settings alone: the settings read
here (`segment.scales`, `flip`, `crf`, `rle_json`, `batch_size_eval`, `evaluate.bootstrap`) predict and score again
from the same network. `segment_gt` holds no pseudo-label setting, so every pseudo-label variant reuses it
(`segment.compare_gt=true`).

Inference averages the softmax over `segment.scales` and their flips, one scale at a time (`predict_probs`);
`segment.crf=true` adds a dense CRF on those probabilities with the `refine.crf_*` settings. Predictions are
palette PNGs (and COCO RLE with `segment.rle_json`), sharded across ranks like the CAMs; the scores are a
confusion matrix reduced across ranks, per-class IoU, precision / recall and bootstrap intervals over images.

metrics.json and summary.md hold the WSSS table: the seeds (train), the refined masks (train), the segmenter
(eval split) and, with `compare_gt`, the bound (eval split), each with its split named.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from wsss import dist
from wsss.artifacts import atomic_open, read_json, rle_results, write_json, write_mask
from wsss.data import InferenceDataset, by_size, collate_list, dataset_identity
from wsss.data.loader import Loader
from wsss.data.transforms import normalize
from wsss.dist import progress
from wsss.fingerprint import FileGroup
from wsss.metrics import ConfusionMatrix, confusion_matrix, image_record, scores
from wsss.models.io import load_network
from wsss.models.segmenter import Segmenter
from wsss.stages.base import Artifact, Fingerprints, Need, Stage, StageContext, check_classes, environment, plain
from wsss.stages.evaluate import bootstrap_block, image_stats, named_scores
from wsss.training import AMP_DTYPES, loader_workers, resolve_amp_dtype

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: Tensor,
    scales: list[float] | tuple[float, ...],
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Class probabilities (B, L, H, W) of normalised images (B, 3, H, W): the mean over `scales` (and each
    one's horizontal flip) of the softmax of the logits resized bilinearly to (H, W). One scale is in memory at
    a time beside the running sum; an image and its flip go through one forward."""
    b, _, h, w = images.shape
    total: Tensor | None = None
    autocast = torch.autocast(images.device.type, amp_dtype) if amp_dtype else nullcontext()
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, h', w')
        with autocast:
            logits = model(x)
        p = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        if flip:
            p = p[:b] + p[b:].flip(-1)
        total = p if total is None else total + p
    assert total is not None, "no scale"
    return total / (len(scales) * (2 if flip else 1))


def _crf(image: Tensor, probs: Tensor, rc: DictConfig) -> Tensor:
    """The dense CRF's labelling (H, W) of one image's probabilities (L, H, W), on the CPU."""
    from wsss.refine.crf import dense_crf_probs
    from wsss.stages.refine import crf_sxy

    rgb = image.permute(1, 2, 0).cpu().numpy()
    q = dense_crf_probs(
        np.ascontiguousarray(rgb),
        probs.cpu().numpy(),
        iterations=rc.crf_iterations,
        bilateral_sxy=crf_sxy(rc.crf_bilateral_sxy, rgb.shape[:2]),
        bilateral_srgb=rc.crf_bilateral_srgb,
    )
    return torch.from_numpy(q.argmax(0)).to(probs.device)


def predict_and_score(ctx: StageContext, model: torch.nn.Module) -> tuple[dict[str, Any], list]:
    """Predict every image of this rank's shard of the eval split, write its PNG and score it; returns the
    rank-reduced confusion matrix's scores and the per-image records (rank 0: every rank's)."""
    sc, source = ctx.cfg.segment, ctx.source()
    num_labels = source.num_classes + 1
    masks_dir = ctx.out_dir / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    amp = AMP_DTYPES.get(str(resolve_amp_dtype(sc.amp_dtype, ctx.device)))
    cm = ConfusionMatrix(num_labels, device=ctx.device)
    records: dict[str, dict[str, Any]] = {}
    rle: list[dict[str, Any]] = []
    ids = dist.shard(source.ids)
    loader = Loader(
        InferenceDataset(source, ids, with_labels=False),
        batch_size=sc.batch_size_eval,
        num_workers=loader_workers(ctx.cfg.dataset.num_workers),
        collate_fn=collate_list,
    )
    bar = progress(total=len(ids), desc=f"segment predict {source.split}", unit="img")
    for batch in loader:
        for group in by_size(batch):
            raw = torch.stack([it["image"] for it in group]).to(ctx.device)  # (B, 3, H, W) uint8
            probs = predict_probs(model, normalize(raw), list(sc.scales), sc.flip, amp)  # (B, L, H, W)
            for row, it in enumerate(group):
                pred = _crf(raw[row], probs[row], ctx.cfg.refine) if sc.crf else probs[row].argmax(0)
                pred_np = pred.to(torch.uint8).cpu().numpy()
                write_mask(masks_dir / f"{it['id']}.png", pred_np)
                if sc.rle_json:
                    rle.extend(rle_results(it["id"], pred_np, source.class_names))
                if source.has_mask(it["id"]):
                    gt = torch.from_numpy(source.load_mask(it["id"])).to(ctx.device)
                    image_cm = confusion_matrix(gt, pred, num_labels)
                    cm.update(gt, pred)
                    records[it["id"]] = {"miou": scores(image_cm)["miou"], "stats": image_record(masks_cm=image_cm)}
            bar.update(len(group))
    bar.close()
    result = cm.scores()  # reduced across ranks
    parts = dist.gather({"records": records, "rle": rle})
    if not dist.is_main():
        return result, []
    merged = {k: v for part in parts for k, v in part["records"].items()}
    if sc.rle_json:
        order = {image_id: i for i, image_id in enumerate(source.ids)}
        rows = sorted((r for part in parts for r in part["rle"]), key=lambda r: order[r["image_id"]])
        write_json(ctx.out_dir / "masks.rle.json", rows)
    return result, [(i, merged[i]) for i in source.ids if i in merged]


def _row(name: str, split: str, trained_on: str | None, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the WSSS table (mIoU None where the split has no ground truth)."""
    iv = (metrics or {}).get("intervals") or {}
    return {
        "name": name,
        "split": split,
        "trained_on": trained_on,
        "miou": None if metrics is None else metrics.get("miou"),
        "interval": iv.get("miou"),
    }


def _table(ctx: StageContext, labels: str, own: dict[str, Any]) -> list[dict[str, Any]]:
    """The WSSS table: seeds and refined masks (train), the segmenter (eval split), the bound (eval split)."""
    train_split = str(ctx.cfg.dataset.train_split)
    rows = []
    if "train_scores" in ctx.inputs:
        ev = read_json(ctx.inputs["train_scores"].dir / "metrics.json")
        if ev.get("miou") is None:  # the train split has no ground truth: nothing to show
            pass
        elif ev.get("seeds"):  # refined: the seeds' and the masks' own scores
            rows.append(_row("seeds (CAMs)", train_split, None, {"miou": ev["seeds"]["miou"]}))
            rows.append(_row(f"pseudo masks ({ev['refine']})", train_split, None, ev))
        else:
            rows.append(_row("pseudo masks (CAMs)", train_split, None, ev))
    what = "ground truth" if labels == "gt" else "pseudo masks"
    rows.append(_row(f"segmenter ({ctx.cfg.segment.network})", ctx.split, f"{train_split} {what}", own))
    if "bound" in ctx.inputs:
        bound = read_json(ctx.inputs["bound"].path("metrics"))
        rows.append(_row("fully supervised bound", ctx.split, f"{train_split} ground truth", bound))
    return rows


def _summary_md(result: dict[str, Any]) -> str:
    """summary.md: the WSSS table, then the segmenter's per-class IoU."""

    def fmt(r: dict[str, Any]) -> str:
        if r["miou"] is None:
            return "-"
        iv = r["interval"]
        return f"{r['miou']:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")

    lines = ["| what | split | trained on | mIoU [95 % CI] |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['split']} | {r['trained_on'] or ''} | {fmt(r)} |" for r in result["table"]]
    lines += ["", f"Segmenter on {result['split']} ({result['num_images']} images), per class:", ""]
    lines += ["| class | IoU | precision | recall |", "|---|---|---|---|"]
    s = result["scores"]
    for n in s["iou"]:
        vals = [s[k][n] for k in ("iou", "precision", "recall")]
        lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _model(ctx: StageContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (the upstream training artifact's, or `segment.checkpoint`) and what trained it."""
    sc = ctx.cfg.segment
    if sc.checkpoint:
        path = Path(sc.checkpoint).resolve()
        log.info("segment: using %s", path)
        training: dict[str, Any] = {"checkpoint": str(path)}
    else:
        network = ctx.inputs["network"]
        check_classes(network, ctx.source().class_names)
        path = network.path("network")
        training = {**network.manifest["training"], "artifact": network.stage, "key": network.key}
    model = load_network(path, Segmenter, ctx.device)
    if sc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, training


def run(ctx: StageContext) -> dict[str, Any]:
    """Train (or load) the segmenter, predict and score the eval split; write masks/, metrics.json, summary.md."""
    labels = "gt" if ctx.stage == "segment_gt" else str(ctx.cfg.segment.labels)
    source = ctx.source()
    model, training = _model(ctx)
    n = model.kwargs["num_classes"]
    if n != source.num_classes + 1:
        raise ValueError(f"segment.checkpoint has {n - 1} classes, the dataset {source.num_classes}")
    start = time.perf_counter()
    own, per_image = predict_and_score(ctx, model)
    predict_s = time.perf_counter() - start
    out = {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "masks_dir": "masks",
        "metrics": "metrics.json",
        "rle_json": "masks.rle.json" if ctx.cfg.segment.rle_json else None,
        "network": str(training.get("checkpoint") or ctx.inputs["network"].path("network")),
        "training": training,
        "predict_seconds": round(predict_s, 2),
    }
    if not dist.is_main():
        return out
    names = ["background", *source.class_names]
    records = dict(per_image)
    stats = image_stats(records, list(records), len(names), [])
    result: dict[str, Any] = {
        "dataset": source.identity(),
        "split": source.split,
        "class_names": source.class_names,
        "labels": labels,
        "network": {k: v for k, v in model.kwargs.items() if k != "weights"},
        "environment": environment(ctx.device),
        "num_images": len(records),
        "no_ground_truth": len(source.ids) - len(records),
        "miou": round(own["miou"], 4),
        "iou": named_scores(own, names)["iou"],
        "scores": named_scores(own, names),
        "intervals": bootstrap_block(stats, ctx.cfg.evaluate, None),
        "per_image_miou": {i: round(r["miou"], 3) for i, r in per_image},
        "predict_seconds": round(predict_s, 2),
        "training": training,
    }
    result["table"] = _table(ctx, labels, result)
    write_json(ctx.out_dir / "metrics.json", result)
    with atomic_open(ctx.out_dir / "summary.md", "w") as f:
        f.write(_summary_md(result))
    return out


def report(artifact: Artifact, run_dir: Path | None) -> None:
    """Log the WSSS table and copy metrics.json and summary.md into the run directory."""
    result = read_json(artifact.path("metrics"))
    lines = [f"{'what':<28} {'split':<8} {'mIoU':>7}  95 % interval"]
    for r in result["table"]:
        miou = "-" if r["miou"] is None else f"{r['miou']:7.2f}"
        iv = f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] else ""
        lines.append(f"{r['name']:<28} {r['split']:<8} {miou:>7}  {iv}")
    log.info("%s: masks of %s in %s\n%s", artifact.stage, artifact.split, artifact.path("masks_dir"), "\n".join(lines))
    if run_dir is not None:
        import shutil

        for name in ("metrics.json", "summary.md"):
            shutil.copy2(artifact.dir / name, Path(run_dir) / name)
        log.info("%s: wrote %s", artifact.stage, Path(run_dir) / "metrics.json")


def _params(cfg: DictConfig, split: str, labels: str) -> dict[str, Any]:
    """What shapes the predictions and scores beyond the network (whose training key is the input's)."""
    sc = cfg.segment
    predict = {k: v for k, v in plain(sc).items() if k in ("scales", "flip", "amp_dtype", "channels_last")}
    if predict["amp_dtype"] == "auto":
        predict["amp_dtype"] = resolve_amp_dtype("auto", dist.local_device(str(cfg.device)))
    out = {
        "dataset": dataset_identity(cfg.dataset, split),
        "train_split": str(cfg.dataset.train_split),  # named in the table
        "labels": labels,
        "predict": predict,
        "rle_json": sc.rle_json,
        "bootstrap": [cfg.evaluate.bootstrap, cfg.evaluate.bootstrap_seed],
        "checkpoint": str(Path(sc.checkpoint).resolve()) if sc.checkpoint else None,
    }
    if sc.crf:
        out["crf"] = {k: v for k, v in plain(cfg.refine).items() if k.startswith("crf_")}
    return out


def _network(cfg: DictConfig, labels: str) -> dict[str, Need]:
    """The training artifact of the network (none with `segment.checkpoint`)."""
    if cfg.segment.checkpoint:
        return {}
    return {"network": Need("segment_gt_train" if labels == "gt" else "segment_train", str(cfg.dataset.train_split))}


def _needs(cfg: DictConfig, split: str) -> dict[str, Need]:
    sc, train_split = cfg.segment, str(cfg.dataset.train_split)
    needs = _network(cfg, str(sc.labels))
    if sc.checkpoint:  # a trained network: nothing to train on, no table of what it was trained on
        return needs
    if sc.labels == "pseudo":
        needs["train_scores"] = Need("evaluate", train_split)  # the seeds' and masks' own scores, for the table
        if sc.compare_gt:
            needs["bound"] = Need("segment_gt")
    return needs


def _files(cfg: DictConfig, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    files = dict(fp.dataset(split))
    if cfg.segment.checkpoint:
        files["checkpoint"] = fp.content(cfg.segment.checkpoint, "segment.checkpoint")
    return files


def _eval_split(cfg: DictConfig) -> str:
    return str(cfg.segment.eval_split)


STAGE = Stage(
    name="segment",
    run=run,
    config=("dataset", "segment", "refine", "evaluate", "seed"),
    params=lambda cfg, split: _params(cfg, split, str(cfg.segment.labels)),
    needs=_needs,
    files=_files,
    split=_eval_split,
    report=report,
)

GT_STAGE = Stage(
    name="segment_gt",
    run=run,
    config=("dataset", "segment", "refine", "evaluate", "seed"),
    params=lambda cfg, split: _params(cfg, split, "gt"),
    needs=lambda cfg, split: _network(cfg, "gt"),
    files=_files,
    split=_eval_split,
    report=report,
    summary="The fully supervised bound: `segment_gt_train`'s network, fitted on the ground truth, predicting and "
    "scoring `segment.eval_split` as `segment` does (every pseudo-label variant reuses it).",
)
