"""The `cams` and `pseudo_masks` stages when their content comes from another method: `cam.source=DIR` turns a
folder of IRN / PSA / CLIP-ES / npz / wsss maps into a `cams` artifact, `pseudo.source=DIR` a folder of label
PNGs into a `pseudo_masks` artifact (formats: `wsss.external`; docs/external-maps.md).

Everything downstream (`evaluate`, `pseudo.refine=crf|par|superpixel`, `segment`, `python -m wsss.report`) reads
the artifacts as it reads wsss's own. Each file is checked (classes, size, values) and keyed by its bytes; a
file of an id outside the split, a split image without a file, or a bad file is an error naming it, or with
`dataset.on_error=skip` a skip counted by reason in the manifest and logged. Images left out this way are left
out of the score, and the leaderboard names them (never scored as empty).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsss import dist
from wsss.artifacts import strided_maps, write_cams, write_mask
from wsss.dist import progress
from wsss.external import (
    SUFFIXES,
    ExternalFileError,
    fit_size,
    list_files,
    power_background,
    read_external,
    read_label_png,
)
from wsss.fingerprint import FileGroup, hash_files
from wsss.stages.base import Fingerprints, StageContext

log = logging.getLogger(__name__)

SOURCE_KEYS = ("source", "source_format", "source_key", "source_index", "source_resize", "source_bg_power")


def source_files(folder: str, fmt: str, label: str) -> FileGroup:
    """sha256 of every file of the folder that the format reads (the artifact's key covers their bytes)."""
    return hash_files(list_files(folder, fmt).values(), label)


def cam_params(cam: dict[str, Any]) -> dict[str, Any]:
    """The `cam` settings that determine a cams artifact: the import's with `cam.source`, else all but those."""
    if cam.get("source") is None:  # CLIP-ES's settings only where they apply (other methods' keys unchanged)
        drop = SOURCE_KEYS if cam.get("method") == "clip_es" else (*SOURCE_KEYS, "clip_es")
        return {k: v for k, v in cam.items() if k not in drop}
    return {"source": str(Path(cam["source"]).resolve())} | {k: cam[k] for k in SOURCE_KEYS[1:]}


class _Skips:
    """Under `dataset.on_error=skip`, count and log each skipped file by reason; else raise its error."""

    def __init__(self, on_error: str) -> None:
        self.on_error, self.counts = on_error, {}

    def __call__(self, reason: str, error: ExternalFileError) -> None:
        if self.on_error != "skip":
            raise error
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("import: skipping %s (%s)", error, reason)


def _matched(ctx: StageContext, folder: str, fmt: str, skips: _Skips) -> tuple[list[str], dict[str, Path]]:
    """The split's ids that have a file, and id -> file; files outside the split and ids without one are
    errors (or skips)."""
    source = ctx.source()
    files = list_files(folder, fmt)
    ids = set(source.ids)
    for image_id in sorted(set(files) - ids):
        skips("not_in_split", ExternalFileError(files[image_id], f"id {image_id!r} is not in split {ctx.split!r}"))
    kept = []
    for image_id in source.ids:
        if image_id in files:
            kept.append(image_id)
        else:
            suffix = " or ".join(SUFFIXES.get(fmt, (".png",)))
            skips("no_file", ExternalFileError(Path(folder), f"no {suffix} file for image {image_id!r}"))
    return kept, files


def run_cams(ctx: StageContext) -> dict[str, Any]:
    """`cam.source`: each split image's maps from the folder, checked, as `maps/<id>.npz`."""
    cc = ctx.cfg.cam
    source = ctx.source()
    skips = _Skips(source.on_error)
    ids, files = _matched(ctx, str(cc.source), str(cc.source_format), skips)
    maps_dir = ctx.out_dir / "maps"
    kept = []
    for image_id in progress(dist.shard(ids), desc=f"import {cc.source_format} maps", unit="img"):
        path = files[image_id]
        try:
            keys, maps = read_external(path, str(cc.source_format), source.class_names, cc.source_key, cc.source_index)
            maps = fit_size(path, maps, source.image_size(image_id), bool(cc.source_resize))
        except ExternalFileError as e:
            skips("bad_file", e)
            continue
        bg = None if cc.source_bg_power is None else power_background(maps, float(cc.source_bg_power))
        maps = maps.astype(np.float32)  # kept at float32 whatever cam.store says: a float16 file's values exactly
        write_cams(maps_dir / f"{image_id}.npz", keys, maps, strided_maps(maps), store="float32", background=bg)
        kept.append(image_id)
    kept = [i for part in dist.gather(kept) for i in part]
    order = {i: n for n, i in enumerate(source.ids)}
    kept.sort(key=order.__getitem__)
    counts = {k: dist.sum_int(v) for k, v in skips.counts.items()}
    log.info("import: %d of %d images of %s from %s (%s)", len(kept), len(source.ids), ctx.split, cc.source, counts)
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "maps_dir": "maps",
        "labels": "imported",
        "predicted_labels": None,
        "ids": kept,
        "model": {"key": None, "imported": {"source": str(Path(cc.source).resolve()), "format": cc.source_format}},
        "cost": None,
        "counts": {"images": len(source.ids), "imported": len(kept), "skipped": counts},
    }


def run_masks(ctx: StageContext) -> dict[str, Any]:
    """`pseudo.source`: each split image's label PNG from the folder, checked (size, values), as `masks/<id>.png`."""
    source = ctx.source()
    folder = str(ctx.cfg.pseudo.source)
    skips = _Skips(source.on_error)
    ids, files = _matched(ctx, folder, "png", skips)
    kept, ignored, total = [], 0, 0
    for image_id in progress(dist.shard(ids), desc="import label PNGs", unit="img"):
        path = files[image_id]
        try:
            mask = read_label_png(path, source.num_classes, source.image_size(image_id))
        except ExternalFileError as e:
            skips("bad_file", e)
            continue
        write_mask(ctx.out_dir / "masks" / f"{image_id}.png", mask)
        ignored, total = ignored + int((mask == 255).sum()), total + mask.size
        kept.append(image_id)
    kept = [i for part in dist.gather(kept) for i in part]
    order = {i: n for n, i in enumerate(source.ids)}
    kept.sort(key=order.__getitem__)
    counts = {k: dist.sum_int(v) for k, v in skips.counts.items()}
    log.info("import: %d of %d label PNGs of %s from %s (%s)", len(kept), len(source.ids), ctx.split, folder, counts)
    return {
        "class_names": source.class_names,
        "dataset": source.identity(),
        "masks_dir": "masks",
        "ids": kept,
        "model": {"key": None, "imported": {"source": str(Path(folder).resolve()), "format": "png"}},
        "rle_json": None,
        "counts": {
            "images": len(source.ids),
            "imported": len(kept),
            "skipped": counts,
            "ignored_pixel_share": dist.sum_int(ignored) / max(dist.sum_int(total), 1),
        },
    }


def masks_files(cfg: Any, split: str, fp: Fingerprints) -> dict[str, FileGroup]:
    """`pseudo.source`: the PNGs' bytes and the split's files (the masks are checked against its images)."""
    if cfg.pseudo.source is None:
        return {}
    return {**fp.dataset(split), "pseudo_source": source_files(str(cfg.pseudo.source), "png", "pseudo.source")}
