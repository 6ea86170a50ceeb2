"""Time cache-key computation (file fingerprints included) on a generated tree of many small files.

    python scripts/bench_keys.py --ids 40000 --repeats 5

Writes a VOC-layout tree (JPEGImages/, SegmentationClass/ and a folder of predicted masks, one tiny file per id
in each: 3 x ids files) under a temp dir, then resolves the stage graph of `stage=evaluate` with
`evaluate.masks_dir` set (the node reads every file of the three folders) and of the default graph (train ->
cams -> pseudo_masks -> evaluate on the same split). The first resolution runs on whatever the page cache
holds; the figures are the median and min of the later, warm ones. Nothing is decoded: keys stamp files by
name, size and mtime.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, n: int) -> Path:
    """n ids, each with a 64-byte .jpg, a 64-byte mask .png and a 64-byte predicted .png."""
    ids = [f"{i:07d}" for i in range(n)]
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("pred", ".png")):
        d = root / sub
        d.mkdir(parents=True)
        blob = bytes(64)
        for i in ids:
            (d / f"{i}{ext}").write_bytes(blob)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def time_keys(overrides: list[str], repeats: int) -> list[float]:
    """Seconds to build a Pipeline and resolve every node's key, `repeats` times."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        Pipeline(cfg).node("evaluate")
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=40000, help="ids; the tree holds 3 files per id")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_tree(Path(tmp) / "voc", args.ids)
        print(f"tree: {3 * args.ids:,} files written in {time.perf_counter() - start:.1f} s")
        base = [
            "dataset=voc12",
            f"dataset.root={root}",
            "dataset.class_names=[a,b]",
            "dataset.train_split=train",
            "dataset.eval_split=train",
            f"paths.cache_dir={Path(tmp) / 'cache'}",
        ]
        cases = {
            f"evaluate with masks_dir ({3 * args.ids:,} files)": [*base, f"evaluate.masks_dir={root / 'pred'}"],
            f"default graph, 4 nodes ({2 * args.ids:,} files)": base,
        }
        for name, overrides in cases.items():
            t = time_keys(overrides, args.repeats)
            warm = t[1:] or t
            print(f"{name}: first {t[0]:.3f} s, warm median {statistics.median(warm):.3f} s, min {min(warm):.3f} s")


if __name__ == "__main__":
    main()
