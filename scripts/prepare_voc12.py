"""Prepare PASCAL VOC 2012 + SBD for wsss: SBD masks as palette PNGs, and the train_aug split list.

    python scripts/prepare_voc12.py --voc /data/VOCdevkit/VOC2012 --sbd /data/benchmark_RELEASE/dataset

Reads the two downloaded releases and writes into the VOC folder:

- `SegmentationClassAug/<id>.png`: SBD's `cls/<id>.mat` (`GTcls.Segmentation`, values 0..20) for every id
  in SBD's train.txt and val.txt, as palette PNGs with the VOC colour map. Writes are atomic, so an existing
  PNG is complete and is skipped on a re-run (resumable); `--overwrite` rewrites them. `--no-convert` skips
  this step (for instance when SegmentationClassAug was downloaded ready-made).
- `ImageSets/Segmentation/train_aug.txt`: (SBD train + SBD val + VOC train) - VOC val, sorted; 10,582 ids for
  the full releases. An existing list with the same ids is left alone; a different one needs `--overwrite`.

Then it checks that every train_aug id has a JPEG and a mask (SegmentationClass, else SegmentationClassAug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from wsss.artifacts import IGNORE_INDEX, atomic_open, write_mask
from wsss.data.voc import VOC_CLASSES, read_split

log = logging.getLogger("prepare_voc12")

EXPECTED_TRAIN_AUG = 10582


def read_sbd_list(path: Path) -> list[str]:
    """Ids of an SBD list (train.txt / val.txt), one per line."""
    if not path.is_file():
        raise FileNotFoundError(f"SBD list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"SBD list is empty: {path}")
    return ids


def load_sbd_mask(path: Path) -> np.ndarray:
    """The class mask of an SBD `cls/<id>.mat` as (H, W) uint8, values 0..20."""
    import scipy.io

    if not path.is_file():
        raise FileNotFoundError(f"SBD mask not found: {path}")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: unreadable .mat file ({e})") from e
    if "GTcls" not in mat or not hasattr(mat["GTcls"], "Segmentation"):
        raise ValueError(f"{path}: no GTcls.Segmentation field (not an SBD cls file)")
    seg = np.asarray(mat["GTcls"].Segmentation)
    if seg.ndim != 2:
        raise ValueError(f"{path}: GTcls.Segmentation has shape {seg.shape}, expected (H, W)")
    bad = (seg > len(VOC_CLASSES)) & (seg != IGNORE_INDEX) | (seg < 0)
    if bad.any():
        raise ValueError(f"{path}: class value {int(seg[bad].max())} outside 0..{len(VOC_CLASSES)}")
    return seg.astype(np.uint8)


def _convert(job: tuple[Path, Path]) -> None:
    src, dst = job
    write_mask(dst, load_sbd_mask(src))


def convert_sbd(sbd: Path, ids: list[str], out_dir: Path, overwrite: bool, workers: int) -> tuple[int, int]:
    """Write `out_dir/<id>.png` from `sbd/cls/<id>.mat`; returns (written, skipped as already present)."""
    jobs = [(sbd / "cls" / f"{i}.mat", out_dir / f"{i}.png") for i in ids]
    todo = [j for j in jobs if overwrite or not j[1].is_file()]
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="SBD cls/*.mat -> SegmentationClassAug", unit="mask")
    if workers > 1 and len(todo) > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_convert, todo, chunksize=32):
                bar.update()
    else:
        for job in todo:
            _convert(job)
            bar.update()
    bar.close()
    return len(todo), len(jobs) - len(todo)


def build_train_aug(voc: Path, sbd: Path) -> list[str]:
    """(SBD train + SBD val + VOC train) - VOC val, sorted."""
    voc_train = read_split(voc, "train")
    voc_val = set(read_split(voc, "val"))
    sbd_ids = read_sbd_list(sbd / "train.txt") + read_sbd_list(sbd / "val.txt")
    ids = sorted((set(sbd_ids) | set(voc_train)) - voc_val)
    log.info(
        "train_aug: SBD %d ids + VOC train %d, minus VOC val %d -> %d",
        len(set(sbd_ids)),
        len(voc_train),
        len(voc_val),
        len(ids),
    )
    return ids


def write_split(voc: Path, name: str, ids: list[str], overwrite: bool) -> Path:
    """Write ImageSets/Segmentation/<name>.txt atomically; a differing existing list needs `overwrite`."""
    path = voc / "ImageSets" / "Segmentation" / f"{name}.txt"
    if path.is_file():
        try:
            existing = read_split(voc, name)
        except ValueError:
            existing = []
        if sorted(existing) == ids and not overwrite:
            log.info("%s already lists the same %d ids; left as is", path, len(ids))
            return path
        if not overwrite:
            raise FileExistsError(
                f"{path} exists with {len(existing)} ids that differ from the {len(ids)} built here; "
                "pass --overwrite to replace it"
            )
    with atomic_open(path, "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    log.info("wrote %s (%d ids)", path, len(ids))
    return path


def check_split(voc: Path, ids: list[str], mask_dirs: list[str]) -> None:
    """Every id needs a JPEG and a mask in one of `mask_dirs`; raise naming the first missing files."""
    no_image = [i for i in ids if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
    no_mask = [i for i in ids if not any((voc / d / f"{i}.png").is_file() for d in mask_dirs)]
    problems = []
    if no_image:
        problems.append(f"{len(no_image)} ids without JPEGImages/<id>.jpg (e.g. {no_image[:3]})")
    if no_mask:
        problems.append(f"{len(no_mask)} ids without a mask in {mask_dirs} (e.g. {no_mask[:3]})")
    if problems:
        raise FileNotFoundError(f"{voc}: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, required=True, help="the VOCdevkit/VOC2012 folder")
    p.add_argument("--sbd", type=Path, required=True, help="SBD's benchmark_RELEASE/dataset folder (cls/, *.txt)")
    p.add_argument("--mask-dir", default="SegmentationClassAug", help="output folder name under --voc")
    p.add_argument("--no-convert", action="store_true", help="only build and check the train_aug list")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing PNGs and a differing list")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    for d in (args.voc / "JPEGImages", args.voc / "ImageSets" / "Segmentation"):
        if not d.is_dir():
            raise FileNotFoundError(f"not a VOC2012 folder, missing {d}")
    if not args.no_convert:
        sbd_ids = sorted(set(read_sbd_list(args.sbd / "train.txt") + read_sbd_list(args.sbd / "val.txt")))
        written, kept = convert_sbd(args.sbd, sbd_ids, args.voc / args.mask_dir, args.overwrite, args.workers)
        log.info("%s: %d masks written, %d already present", args.voc / args.mask_dir, written, kept)
    ids = build_train_aug(args.voc, args.sbd)
    write_split(args.voc, "train_aug", ids, args.overwrite)
    check_split(args.voc, ids, ["SegmentationClass", args.mask_dir])
    if len(ids) != EXPECTED_TRAIN_AUG:
        log.warning("train_aug has %d ids; the full VOC 2012 + SBD releases give %d", len(ids), EXPECTED_TRAIN_AUG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
