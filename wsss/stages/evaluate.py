"""Stage `evaluate`: score pseudo masks (or any folder of PNG masks) against ground truth.

One pass over the split accumulates the confusion matrix of the masks as written and, when the CAMs are
available, the confusion matrices of every threshold of `evaluate.thresholds` plus PxAP. With
`evaluate.select_on=SPLIT`, the threshold is chosen on SPLIT's labels and the evaluation split is reported at
it, so the headline number uses no label of the split it describes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from wsss import dist
from wsss.artifacts import atomic_open, read_cams, read_json, read_mask, write_json
from wsss.data import SegmentationSource, dataset_identity
from wsss.dist import progress
from wsss.fingerprint import FileGroup
from wsss.metrics import (
    ConfusionMatrix,
    ImageStats,
    ImageStatsBuilder,
    ThresholdSweep,
    best_threshold,
    confusion_matrix,
    image_record,
    interval,
    parse_thresholds,
    resample_weights,
    resampled_metrics,
    scores,
    threshold_curves,
)
from wsss.pseudo import threshold_mask
from wsss.stages.base import (
    Fingerprints,
    Need,
    Stage,
    StageContext,
    environment,
    plain,
)
from wsss.stages.evaluate_boxes import ImageBoxes, box_pass, box_report
from wsss.stages.evaluate_inputs import cam_provenance, inputs, missing_imports, model_provenance
from wsss.stages.evaluate_report import report
from wsss.stages.figures import write_figures, write_overlays

log = logging.getLogger(__name__)

PXAP_BINS = 1000  # thresholds i / 1000, the WSOL protocol's cam_curve_interval = 0.001
CURVE_KEYS = ("miou", "fg_miou", "mprecision", "mrecall", "mfp_ratio", "mfn_ratio")


def _named(values: list[float], names: list[str]) -> dict[str, float]:
    return {n: (None if np.isnan(v) else round(v, 4)) for n, v in zip(names, values, strict=True)}


def named_scores(s: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A scores dict with per-label lists keyed by label name."""
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if not isinstance(v, list)}
    for k in ("iou", "precision", "recall", "fp_ratio", "fn_ratio"):
        out[k] = _named(s[k], names)
    out["absent"] = [names[i] for i in s.get("absent", [])]
    return out


def sweep_split(
    source: SegmentationSource, maps_dir: Path, thresholds: list[float], device: torch.device, desc: str
) -> ThresholdSweep:
    """A threshold sweep (with PxAP) over one split's CAM files; one pass."""
    sweep = ThresholdSweep(source.num_classes + 1, thresholds, pxap_bins=PXAP_BINS, device=device)
    for image_id in progress(dist.shard(source.ids), desc=desc, unit="img"):
        cams = read_cams(maps_dir / f"{image_id}.npz")
        gt = torch.from_numpy(source.load_mask(image_id)).to(device)
        maps = torch.from_numpy(cams["maps"]).to(device, torch.float32)
        sweep.update(maps, torch.from_numpy(cams["keys"]).to(device).long(), gt)
    return sweep


def _read_prediction(masks_dir: Path, image_id: str, gt: torch.Tensor, split: str) -> torch.Tensor:
    """The predicted mask of `image_id`, which must exist and match the ground truth's size."""
    pred_path = masks_dir / f"{image_id}.png"
    if not pred_path.is_file():
        raise FileNotFoundError(f"{pred_path}: no predicted mask for image {image_id!r} of split {split!r}")
    pred = torch.from_numpy(read_mask(pred_path)).to(gt.device)
    if pred.shape != gt.shape:
        raise ValueError(
            f"{pred_path}: mask is {pred.shape[1]}x{pred.shape[0]} but the ground truth of {image_id!r} "
            f"is {gt.shape[1]}x{gt.shape[0]}"
        )
    return pred


class _Seeds:
    """The seeds beside refined masks: the rule applied to the raw CAMs, scored, and the CAMs swept."""

    def __init__(self, maps_dir: Path, rule: dict[str, Any], num_labels: int, thresholds: list[float], device) -> None:
        self.maps_dir, self.rule = maps_dir, rule
        self.cm = ConfusionMatrix(num_labels, device=device)
        self.sweep = ThresholdSweep(num_labels, thresholds, pxap_bins=PXAP_BINS, device=device)

    def update(self, image_id: str, gt: Tensor) -> None:
        cams = read_cams(self.maps_dir / f"{image_id}.npz")
        maps = torch.from_numpy(cams["maps"]).to(gt.device)  # (K, H, W)
        keys = torch.from_numpy(cams["keys"]).to(gt.device)
        self.cm.update(gt, threshold_mask(maps, keys, self.rule["threshold"]))
        self.sweep.update(maps, keys, gt)


def _score_pass(
    source: SegmentationSource,
    masks_dir: Path,
    maps_dir: Path | None,
    thresholds: list[float],
    device: torch.device,
    seeds: _Seeds | None = None,
    boxes: ImageBoxes | None = None,
) -> tuple[ConfusionMatrix, ThresholdSweep | None, dict[str, dict[str, Any]]]:
    """One pass over the split: the masks' confusion matrix, the maps' sweep (and the seeds'), and what each
    image contributes (`records`: its mIoU and the per-image counts the bootstrap resamples)."""
    num_labels = source.num_classes + 1
    cm = ConfusionMatrix(num_labels, device=device)
    sweep = (
        ThresholdSweep(num_labels, thresholds, pxap_bins=PXAP_BINS, device=device, keep_last=True) if maps_dir else None
    )
    records: dict[str, dict[str, Any]] = {}
    try:
        for image_id in progress(dist.shard(source.ids), desc="evaluate", unit="img"):
            gt = torch.from_numpy(source.load_mask(image_id)).to(device)
            pred = _read_prediction(masks_dir, image_id, gt, source.split)
            cm_image = confusion_matrix(gt, pred, num_labels)
            cm.update(gt, pred)
            parts: dict[str, Any] = {"masks_cm": cm_image}
            if sweep is not None:
                cams = read_cams(maps_dir / f"{image_id}.npz")
                maps = torch.from_numpy(cams["maps"]).to(device, torch.float32)  # (K, H, W)
                sweep.update(maps, torch.from_numpy(cams["keys"]).to(device).long(), gt)
                parts.update(sweep_hist=sweep.last_hist, pxap_hist=sweep.last_pxap_hist)
            if seeds is not None:
                seeds.update(image_id, gt)
            records[image_id] = {"miou": scores(cm_image)["miou"], "stats": image_record(**parts)}
            if boxes is not None and sweep is not None:
                boxes.submit(image_id, cams["maps"], cams["keys"], records[image_id]["stats"])
        if boxes is not None:
            boxes.drain()
    finally:
        if boxes is not None:  # an error in the loop: stop the worker, drop what it has not started
            boxes.pool.shutdown(wait=True, cancel_futures=True)
    return cm, sweep, records


def image_stats(records: dict[str, dict[str, Any]], ids: list[str], num_labels: int, thresholds) -> ImageStats:
    """The per-image statistics in split order, from every rank's records."""
    b = ImageStatsBuilder(num_labels, thresholds)
    for image_id in ids:
        b.add_record(image_id, records[image_id]["stats"])
    return b.build()


def bootstrap_block(stats: ImageStats, ev: DictConfig, miou_at: int | None) -> dict[str, Any] | None:
    """The bootstrap block of metrics.json, or None when `evaluate.bootstrap=0`."""
    if not ev.bootstrap:
        return None
    t0 = time.perf_counter()
    values = resampled_metrics(stats, resample_weights(stats.num_images, ev.bootstrap, ev.bootstrap_seed), miou_at)
    seconds = time.perf_counter() - t0
    stats.store_resampled(values, ev.bootstrap_seed, miou_at)  # python -m wsss.report reads them back
    log.info("evaluate: %d bootstrap resamples of %d images in %.1f s", ev.bootstrap, stats.num_images, seconds)
    return {
        "method": "percentile bootstrap over images (ratio of resampled sums)",
        "level": 0.95,
        "resamples": int(ev.bootstrap),
        "seed": int(ev.bootstrap_seed),
        "seconds": round(seconds, 3),
        **{k: [round(x, 4) for x in interval(v)] for k, v in values.items()},
    }


def _side_by_side(name: str, split: str, masks: dict, entries: dict, names: list[str]) -> dict[str, Any]:
    """The "seeds" or "masks" block: mIoU of the masks made by the rule, and the sweep's best and PxAP."""
    return {
        "name": name,
        "split": split,
        "miou": round(masks["miou"], 4),
        "iou": _named(masks["iou"], names),
        "sweep_best_miou": entries["sweep"]["best"]["miou"],
        "sweep_best_threshold": entries["sweep"]["best_threshold"],
        "pxap": entries["pxap"]["pxap"],
    }


def _sweep_report(sweep: ThresholdSweep, thresholds: list[float], source: SegmentationSource) -> tuple[Tensor, dict]:
    """The sweep's matrices (T, L, L) and its metrics.json entries: curves, best threshold, PxAP."""
    names = ["background", *source.class_names]
    cms = sweep.compute()
    curves = threshold_curves(cms)
    best_t, best = best_threshold(cms, thresholds)
    px = sweep.compute_pxap()
    return cms, {
        "sweep": {
            "thresholds": thresholds,
            **{k: [round(float(v), 4) for v in curves[k]] for k in CURVE_KEYS},
            "best_threshold": best_t,
            "best_chosen_on": source.split,  # oracle: chosen with this split's own labels
            "best": named_scores(best, names),
        },
        "pxap": {
            "pxap": round(px["pxap"], 4),
            "mpxap": round(px["mpxap"], 4),
            "per_class": _named(px["pxap_per_class"], source.class_names),
        },
    }


def _scored(ctx: StageContext, source: SegmentationSource) -> tuple[list[str], list[str]]:
    """The ids to score (a ground-truth mask and, for another method's output, its map or mask), and the ids
    an import left out: named, never scored as empty."""
    scored = [i for i in source.ids if source.has_mask(i)]
    not_imported = missing_imports(ctx, scored)
    if not_imported:
        log.warning(
            "evaluate: %d images have no imported maps or masks and are not scored: %s",
            len(not_imported),
            ", ".join(not_imported[:10]) + (" ..." if len(not_imported) > 10 else ""),
        )
        left = set(not_imported)
        scored = [i for i in scored if i not in left]
    return scored, not_imported


def _headline(ctx, result, sweep, seeds, thresholds, source, masks_scores) -> tuple[dict, str | None, Any]:
    """The sweep's blocks into `result` (and the seeds' beside the refined masks'); the scores reported as the
    headline, the split their threshold was chosen on (None: the masks as written) and that threshold."""
    headline, chosen_on, headline_t = masks_scores, None, (result["masks_rule"] or {}).get("threshold")
    if sweep is None:
        return headline, chosen_on, headline_t
    names = ["background", *source.class_names]
    cms, entries = _sweep_report(sweep, thresholds, source)
    result.update(entries)
    if seeds is not None:  # refined: the seeds and the masks side by side, on the same split
        _, seed_entries = _sweep_report(seeds.sweep, thresholds, source)
        result["seeds"] = _side_by_side("seeds", source.split, seeds.cm.scores(), seed_entries, names)
        result["masks"] = _side_by_side(f"masks ({result['refine']})", source.split, masks_scores, entries, names)
    ev = ctx.cfg.evaluate
    if ev.select_on:
        sel_source = ctx.source(ev.select_on)
        sel_maps = ctx.inputs["select_maps"].path("maps_dir")
        sel = sweep_split(sel_source, sel_maps, thresholds, ctx.device, f"select on {ev.select_on}")
        headline_t, _ = best_threshold(sel.compute(), thresholds)
        headline = scores(cms[thresholds.index(headline_t)])
        chosen_on = ev.select_on
    return headline, chosen_on, headline_t


def run(ctx: StageContext) -> dict[str, Any]:
    """Score the masks (and sweep the maps) of the split; write metrics.json, summary.md and figures."""
    ev = ctx.cfg.evaluate
    source = ctx.source()
    names = ["background", *source.class_names]
    masks_dir, maps_dir, rule, seeds_dir = inputs(ctx)
    scored, not_imported = _scored(ctx, source)
    if not scored:
        return _nothing_to_score(ctx, source, masks_dir, maps_dir)
    no_gt = len(source.ids) - len(scored)
    if no_gt:
        log.info(
            "evaluate: %d of %d images of %s/%s have no ground-truth mask: scoring the other %d",
            no_gt,
            len(source.ids),
            source.name,
            source.split,
            len(scored),
        )
        source = source.subset(scored)
    thresholds = parse_thresholds(ev.thresholds)
    seeds = _Seeds(seeds_dir, rule, len(names), thresholds, ctx.device) if seeds_dir else None
    boxes = box_pass(source, ev, maps_dir, thresholds)
    cm, sweep, records = _score_pass(source, masks_dir, maps_dir, thresholds, ctx.device, seeds, boxes)
    masks_scores = cm.scores()
    result: dict[str, Any] = {
        "dataset": source.identity(),
        "split": source.split,
        "class_names": source.class_names,
        "masks_dir": str(masks_dir),
        "masks_rule": rule,
        "refine": ctx.inputs["maps"].manifest.get("method") if "maps" in ctx.inputs else None,
        "not_imported": not_imported,
        "model": model_provenance(ctx),
        "cam": cam_provenance(ctx),
        "environment": environment(ctx.device),
        "num_images": len(source.ids),
        "no_ground_truth": no_gt,  # images of the split without a mask, not scored
        "skipped": dict(source.skipped),
        "pseudo_masks": named_scores(masks_scores, names),
    }
    headline, chosen_on, headline_t = _headline(ctx, result, sweep, seeds, thresholds, source, masks_scores)
    no_box = dist.sum_int(boxes.acc.pairs_without_box) if boxes is not None else 0
    parts = dist.gather(records)  # every rank's images, on rank 0, which alone writes
    if not dist.is_main():
        return {}
    records = {k: v for part in parts for k, v in part.items()}
    stats = image_stats(records, source.ids, len(names), thresholds)
    intervals = bootstrap_block(stats, ev, thresholds.index(headline_t) if chosen_on else None)
    stats.save(ctx.out_dir / "per_image.npz")
    result.update(
        miou=round(headline["miou"], 4),
        iou=_named(headline["iou"], names),
        reported_threshold=headline_t,
        threshold_chosen_on=chosen_on,
        scores=named_scores(headline, names),
        boxes=box_report(stats, no_box) if boxes is not None else None,
        intervals=intervals,
        per_image_bytes=round((ctx.out_dir / "per_image.npz").stat().st_size / len(source.ids)),
        per_image_miou={i: round(records[i]["miou"], 3) for i in source.ids},
    )
    if "faithfulness" in ctx.inputs:  # the summary, and each pair's values for the leaderboard's paired differences
        result["faithfulness"] = read_json(ctx.inputs["faithfulness"].path("metrics"))
        shutil.copy2(ctx.inputs["faithfulness"].path("per_image"), ctx.out_dir / "faithfulness_per_image.json")
    write_json(ctx.out_dir / "metrics.json", result)
    write_figures(ctx.cfg, ctx.out_dir, result, source, maps_dir, masks_dir, seeds_dir)
    return {"class_names": source.class_names, "dataset": source.identity(), "miou": result["miou"]}


def _nothing_to_score(ctx: StageContext, source: SegmentationSource, masks_dir: Path, maps_dir: Path | None) -> dict:
    """No image of the split has ground truth (new images): overlays and a metrics.json that says so."""
    ev = ctx.cfg.evaluate
    if not dist.is_main():
        return {}
    drawn = write_overlays(ctx.out_dir, ev.overlays, source, masks_dir, maps_dir) if ev.overlays else 0
    result = {
        "dataset": source.identity(),
        "split": source.split,
        "class_names": source.class_names,
        "masks_dir": str(masks_dir),
        "num_images": 0,
        "no_ground_truth": len(source.ids),
        "miou": None,
        "overlays": drawn,
    }
    write_json(ctx.out_dir / "metrics.json", result)
    with atomic_open(ctx.out_dir / "summary.md", "w") as f:
        f.write(f"Nothing scored: none of the {len(source.ids)} images of {source.split} has a ground-truth mask.\n")
    return {"class_names": source.class_names, "dataset": source.identity(), "miou": None}


def _needs(cfg: DictConfig, split: str) -> dict[str, Need]:
    if cfg.evaluate.masks_dir:
        return {}
    if cfg.pseudo.source is not None:  # another method's masks: nothing to sweep
        return {"masks": Need("pseudo_masks")}
    maps = "cams" if cfg.pseudo.refine == "none" else "refine"  # the sweep reads the maps the masks come from
    needs = {"masks": Need("pseudo_masks"), "maps": Need(maps)}
    if maps != "cams":
        needs["seeds"] = Need("cams")
    if cfg.evaluate.select_on:
        needs["select_maps"] = Need(maps, str(cfg.evaluate.select_on))
    if cfg.faithfulness.enabled:  # the CAMs' faithfulness, merged into metrics.json
        needs["faithfulness"] = Need("faithfulness")
    return needs


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    ev = plain(cfg.evaluate)
    if ev["masks_dir"]:
        ev["masks_dir"] = str(Path(ev["masks_dir"]).resolve())
    return {"dataset": dataset_identity(cfg.dataset, split), "evaluate": ev}


def _files(cfg: DictConfig, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    files = dict(fp.dataset(split))
    if cfg.evaluate.select_on:
        files.update({f"select_on/{k}": v for k, v in fp.dataset(str(cfg.evaluate.select_on)).items()})
    if cfg.evaluate.masks_dir:
        if not Path(cfg.evaluate.masks_dir).is_dir():
            raise FileNotFoundError(f"evaluate.masks_dir not found: {cfg.evaluate.masks_dir}")
        files["masks_dir"] = fp.folder(cfg.evaluate.masks_dir, "masks_dir")
    return files


STAGE = Stage(
    name="evaluate",
    run=run,
    config=("dataset", "evaluate"),
    params=_params,
    needs=_needs,
    files=_files,
    report=report,
)
