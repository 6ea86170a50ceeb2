"""What each CAM store costs on disk, and what it does to the scores.

    python scripts/bench_storage.py --coco ../shared/data/coco2017_sample --split val
    python scripts/bench_storage.py --cams outputs/cache/cams/<key> --dataset-root data/synthetic

`--coco`: bytes per image of the CAM artifact on COCO-sized images: for every image of the COCO split, its
real size and its real number of image-level classes, an npz written by `write_cams` in each store (random
maps: the npz is uncompressed, so the size depends on the shapes only), averaged, and projected to COCO
train2014 (82,081 images with labels).

`--cams`: the effect on the scores: every image of a finished `cams` artifact re-encoded in each store
(write, then read back as the pipeline reads it) and scored against the ground truth in one pass: mIoU at
`--threshold`, the sweep's best mIoU and PxAP, plus the mean bytes per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from wsss.artifacts import CAM_STORES, read_cams, read_mask, write_cams
from wsss.metrics import ThresholdSweep, best_threshold, parse_thresholds

COCO_TRAIN2014 = 82081


def coco_bytes(root: Path, split: str, year: int) -> dict:
    """Mean npz bytes per image in each store, on the real sizes and label counts of a COCO split."""
    from wsss.data.coco import COCOSource

    source = COCOSource(root, split, year=year)
    rng = np.random.default_rng(0)
    sizes = {s: [] for s in CAM_STORES}
    with tempfile.TemporaryDirectory() as tmp:
        for image_id in source.ids:
            h, w = source.json_size(image_id)
            keys = source.labels(image_id)
            maps = rng.random((len(keys), h, w), dtype=np.float32)
            strided = rng.random((len(keys), -(-h // 4), -(-w // 4)), dtype=np.float32)
            for store in CAM_STORES:
                path = Path(tmp) / f"{store}.npz"
                write_cams(path, keys, maps, strided, store)
                sizes[store].append(path.stat().st_size)
    k = [len(source.labels(i)) for i in source.ids]
    out = {"images": len(source.ids), "mean_classes": round(float(np.mean(k)), 2)}
    for store, b in sizes.items():
        mean = float(np.mean(b))
        out[store] = {"bytes_per_image": round(mean), "coco_train2014_gb": round(mean * COCO_TRAIN2014 / 1e9, 1)}
    return out


def store_effect(cams_dir: Path, dataset_root: Path, threshold: float) -> dict:
    """Scores of one cams artifact re-encoded in each store; mean bytes per image."""
    manifest = json.loads((cams_dir / "manifest.json").read_text())
    ids, num_labels = manifest["ids"], len(manifest["class_names"]) + 1
    thresholds = parse_thresholds("0.00:0.95:0.01")
    if threshold not in thresholds:
        raise ValueError(f"--threshold must be on the 0.01 grid, got {threshold}")
    sweeps = {s: ThresholdSweep(num_labels, thresholds, pxap_bins=1000) for s in CAM_STORES}
    sizes = {s: [] for s in CAM_STORES}
    with tempfile.TemporaryDirectory() as tmp:
        for image_id in ids:
            original = read_cams(cams_dir / "maps" / f"{image_id}.npz")
            gt = torch.from_numpy(read_mask(dataset_root / "SegmentationClass" / f"{image_id}.png"))
            for store in CAM_STORES:
                path = Path(tmp) / f"{store}.npz"
                write_cams(path, original["keys"], original["maps"], original["strided"], store)
                sizes[store].append(path.stat().st_size)
                back = read_cams(path)
                sweeps[store].update(torch.from_numpy(back["maps"]), torch.from_numpy(back["keys"]), gt)
    out = {"images": len(ids)}
    for store, sweep in sweeps.items():
        cms = sweep.compute()
        from wsss.metrics import scores

        best_t, best = best_threshold(cms, thresholds)
        out[store] = {
            "bytes_per_image": round(float(np.mean(sizes[store]))),
            f"miou_at_{threshold}": round(scores(cms[thresholds.index(threshold)])["miou"], 2),
            "best_miou": round(best["miou"], 2),
            "best_threshold": best_t,
            "pxap": round(sweep.compute_pxap()["pxap"], 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, help="a COCO root (annotations/ and <split><year>/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--year", type=int, default=2017)
    parser.add_argument("--cams", type=Path, help="a finished cams artifact directory")
    parser.add_argument("--dataset-root", type=Path, help="the VOC-layout root the cams were made for")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    result = {}
    if args.coco:
        result["coco_bytes"] = coco_bytes(args.coco, args.split, args.year)
    if args.cams:
        result["effect"] = store_effect(args.cams, args.dataset_root, args.threshold)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
