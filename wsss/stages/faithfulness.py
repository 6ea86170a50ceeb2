"""Stage `faithfulness`: do the stored CAMs show what the classifier used? `wsss.cam.metrics` on every (image,
class) pair of the eval split (or a seeded subset), sharded across ranks.

The model is the classifier that made the maps, read as the `cams` stage reads it (`cam.output_stride`,
eval mode); scores are its sigmoid (the pipeline's classifiers are multi-label). Each pair's map is its stored
CAM (per-class max-normalised, in [0, 1], at the image's size). Per pair: Average Drop's drop and whether the
confidence increased, the Deletion and Insertion areas, ROAD's combined score. The summary is the mean over
pairs, with percentile-bootstrap intervals over images (ratio of resampled sums, `evaluate.bootstrap`
resamples, `evaluate.bootstrap_seed`), and `evaluate` writes it into metrics.json when
`faithfulness.enabled=true`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from wsss import dist
from wsss.artifacts import read_cams, read_json, write_json
from wsss.cam import metrics as M
from wsss.data import InferenceDataset, by_size, collate_list, dataset_identity
from wsss.data.loader import Loader
from wsss.data.transforms import normalize
from wsss.dist import progress
from wsss.metrics.bootstrap import interval, resample_weights
from wsss.stages.base import Artifact, Need, Stage, StageContext, plain
from wsss.stages.cams import cam_model
from wsss.training import loader_workers

log = logging.getLogger(__name__)

# per-pair values and the summary's name, unit and direction for each
COLUMNS = {
    "average_drop": ("drop", "average_drop", 100.0),  # percent, lower is better
    "increase_in_confidence": ("increase", "increase_in_confidence", 100.0),  # percent, higher is better
    "deletion_auc": ("deletion_auc", "deletion_auc", 1.0),  # lower is better
    "insertion_auc": ("insertion_auc", "insertion_auc", 1.0),  # higher is better
    "road": ("road", "road", 1.0),  # (LeRF - MoRF) / 2 over the percentiles, higher is better
}
BETTER = {
    "average_drop": "lower",
    "increase_in_confidence": "higher",
    "deletion_auc": "lower",
    "insertion_auc": "higher",
    "road": "higher",
}


def image_ids(ids: list[str], max_images: int | None, seed: int) -> list[str]:
    """The split's images, or a seeded subset of `max_images` of them in split order."""
    if max_images is None or max_images >= len(ids):
        return list(ids)
    keep = np.sort(np.random.default_rng(seed).choice(len(ids), max_images, replace=False))
    return [ids[i] for i in keep]


def pair_seed(seed: int, image_id: str, class_index: int) -> int:
    """The seed of one (image, class) pair's ROAD noise: the same whichever images share its batch or rank."""
    h = hashlib.sha256(f"{seed}/{image_id}/{class_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1  # 63 bits: any torch.Generator seed


def score_pairs(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    f: DictConfig,
    seeds: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-pair values of the configured metrics for normalised `images` (B, 3, H, W), `targets` (N, 2) and
    `maps` (N, H, W) in [0, 1]: {column: (N,) float64}, every configured column present, empty when N = 0.
    `seeds` (one per pair, `pair_seed`) draw each pair's ROAD noise when `road_noise` > 0."""
    wanted = {str(m) for m in f.metrics}
    out: dict[str, torch.Tensor] = {}
    if "average_drop" in wanted:
        ad = M.average_drop_increase(model, images, targets, maps, batch_size=f.batch_size)
        out["drop"], out["increase"] = ad["drop"].double(), ad["increase"].double()
    if "deletion_insertion" in wanted:
        di = M.deletion_insertion(model, images, targets, maps, f.steps, str(f.baseline), batch_size=f.batch_size)
        out["deletion_auc"], out["insertion_auc"] = di["deletion_auc"].double(), di["insertion_auc"].double()
    if "road" in wanted:
        gen = None
        if f.road_noise:
            if seeds is None or len(seeds) != len(targets):
                raise ValueError(f"road_noise={f.road_noise}: one seed per pair needed for {len(targets)} pairs")
            gen = [torch.Generator(images.device).manual_seed(s) for s in seeds]
        pct = tuple(f.percentiles)
        r = M.road(model, images, targets, maps, pct, f.road_noise, batch_size=f.batch_size, generator=gen)
        out["road"] = r["combined"].double()
    return out


def image_sums(records: dict[str, dict[str, Any]], ids: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per image of `ids`: its number of pairs, and per summary metric present the sum of its pairs' values,
    scaled as the summary reports it (percent for Average Drop and Increase); a mean over pairs is a ratio of
    these sums, over all images or a resample of them."""
    pairs = np.array([len(records[i]["classes"]) for i in ids], dtype=np.float64)
    columns = {name: column for name, (column, _, _) in COLUMNS.items() if ids and column in records[ids[0]]}
    for i in ids:  # the stage writes every configured column for every image, empty ones included
        if missing := [c for c in columns.values() if c not in records[i]]:
            raise ValueError(f"faithfulness record of image {i!r} lacks {missing}, which {ids[0]!r} has")
    sums = {
        name: COLUMNS[name][2] * np.array([float(np.sum(records[i][column])) for i in ids], dtype=np.float64)
        for name, column in columns.items()
    }
    return pairs, sums


def summarise(records: dict[str, dict[str, Any]], ids: list[str], resamples: int, seed: int) -> dict[str, Any]:
    """Means over pairs and their bootstrap intervals over images (ratio of resampled per-image sums)."""
    pairs, sums = image_sums(records, ids)
    total = pairs.sum()
    result: dict[str, Any] = {"images": len(ids), "pairs": int(total)}
    weights = resample_weights(len(ids), resamples, seed) if resamples and ids else None
    for name, s in sums.items():
        entry = {"mean": round(s.sum() / total, 4) if total else None, "better": BETTER[name]}
        if weights is not None and total:
            with np.errstate(invalid="ignore", divide="ignore"):
                values = (weights @ s) / (weights @ pairs)
            entry["interval"] = [round(x, 4) for x in interval(values)]
        result[name] = entry
    return result


def run(ctx: StageContext) -> dict[str, Any]:
    """Score every (image, class) pair of the split's stored CAMs; write per_image.json and metrics.json."""
    cfg, f = ctx.cfg, ctx.cfg.faithfulness
    cams = ctx.inputs["cams"]
    source = ctx.source()
    model = cam_model(ctx, source.class_names)
    ids = image_ids(list(cams.manifest["ids"]), f.max_images, f.subset_seed)
    maps_dir = cams.path("maps_dir")
    mine = dist.shard(ids)
    log.info(
        "faithfulness: %s on %d of %d images of %s (%s), sigmoid scores, batches of %d perturbed images",
        ", ".join(str(m) for m in f.metrics),
        len(ids),
        len(cams.manifest["ids"]),
        source.split,
        f"{f.steps} steps, {f.baseline} baseline" if "deletion_insertion" in f.metrics else "",
        f.batch_size,
    )
    loader = Loader(
        InferenceDataset(source, mine, with_labels=False),
        batch_size=8,
        num_workers=loader_workers(cfg.dataset.num_workers),
        collate_fn=collate_list,
    )
    records: dict[str, dict[str, Any]] = {}
    bar = progress(total=len(mine), desc="faithfulness", unit="img")
    for batch in loader:
        for group in by_size(batch):
            images = normalize(torch.stack([it["image"] for it in group]).to(ctx.device))  # (B, 3, H, W)
            targets, maps = [], []
            for row, it in enumerate(group):
                stored = read_cams(maps_dir / f"{it['id']}.npz")
                keys = torch.from_numpy(stored["keys"]).long()
                targets.append(torch.stack([torch.full_like(keys, row), keys], 1))
                maps.append(torch.from_numpy(stored["maps"]).float())
            t = torch.cat(targets).to(ctx.device)  # (N, 2) (row in the group, class)
            m = torch.cat(maps).to(ctx.device).clamp(0, 1)  # (N, H, W); stored float16 may round a hair past 1
            rows = t[:, 0].tolist()
            seeds = [pair_seed(int(f.subset_seed), group[r]["id"], int(c)) for r, c in t.tolist()]
            values = {k: v.tolist() for k, v in score_pairs(model, images, t, m, f, seeds).items()}
            for row, it in enumerate(group):
                mine_pairs = [j for j, r in enumerate(rows) if r == row]
                rec: dict[str, Any] = {"classes": [source.class_names[int(t[j, 1])] for j in mine_pairs]}
                rec.update({k: [round(v[j], 6) for j in mine_pairs] for k, v in values.items()})
                records[it["id"]] = rec
            bar.update(len(group))
    bar.close()
    parts = dist.gather(records)
    if not dist.is_main():
        return {}
    merged = {k: v for part in parts for k, v in part.items()}
    summary = summarise(merged, ids, int(cfg.evaluate.bootstrap), int(cfg.evaluate.bootstrap_seed))
    summary.update(
        split=source.split,
        score="sigmoid",
        settings={k: v for k, v in plain(f).items() if k not in ("enabled", "batch_size")},
        intervals="95 % percentile bootstrap over images (ratio of resampled sums)",
    )
    write_json(ctx.out_dir / "per_image.json", {i: merged[i] for i in ids})
    write_json(ctx.out_dir / "metrics.json", summary)
    return {"class_names": source.class_names, "ids": ids, "metrics": "metrics.json", "per_image": "per_image.json"}


def report(artifact: Artifact, run_dir: Path | None) -> None:
    """Log the summary (when `stage=faithfulness` was the request)."""
    s = read_json(artifact.path("metrics"))
    for name in COLUMNS:
        if name in s:
            e = s[name]
            iv = f" [{e['interval'][0]:.2f}, {e['interval'][1]:.2f}]" if e.get("interval") else ""
            log.info("faithfulness: %s %s%s (%s is better)", name, e["mean"], iv, e["better"])
    log.info("faithfulness: %d pairs of %d images, %s", s["pairs"], s["images"], artifact.path("metrics"))


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    f = {k: v for k, v in plain(cfg.faithfulness).items() if k not in ("enabled", "batch_size")}  # no effect
    return {
        "dataset": dataset_identity(cfg.dataset, split),
        "faithfulness": f,
        "cam_read": {"output_stride": cfg.cam.output_stride, "channels_last": cfg.cam.channels_last},
        "bootstrap": [cfg.evaluate.bootstrap, cfg.evaluate.bootstrap_seed],
    }


STAGE = Stage(
    name="faithfulness",
    run=run,
    config=("dataset", "cam", "faithfulness", "evaluate"),
    params=_params,
    needs=lambda cfg, split: {"train": Need("train", str(cfg.dataset.train_split)), "cams": Need("cams")},
    files=lambda cfg, split, fp: fp.dataset(split),
    report=report,
)
