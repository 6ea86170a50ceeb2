"""Export COCO semantic ground truth once, as palette PNGs, so scoring never re-rasterises polygons.

    python scripts/prepare_coco.py --root /data/coco --year 2014 --splits train val --workers 8

For each split writes `<root>/SegmentationClass<split><year>/<stem>.png` (or under `--out`) for every image of
`annotations/instances_<split><year>.json`, empty ones included (all background), built by
`wsss.data.coco.COCOSource.build_mask` (the composition rule is documented there). Writes are atomic; a re-run
skips every PNG that exists with the image's size (resumable), `--overwrite` rewrites them. `export.json` is
written last: the reader uses the folder only once it exists, and checks its class list and rule.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from wsss.artifacts import read_json, write_json, write_mask
from wsss.data.coco import EXPORT_MARKER, COCOSource

log = logging.getLogger("prepare_coco")

_source: COCOSource | None = None  # per worker process, set by _init


def _init(source: COCOSource) -> None:
    global _source
    _source = source


def is_complete(path: Path, size: tuple[int, int]) -> bool:
    """An existing PNG whose header has the expected (H, W); atomic writes mean it was written whole."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and (img.size[1], img.size[0]) == size
    except (OSError, SyntaxError):
        return False


def _export(image_id: str) -> None:
    assert _source is not None
    write_mask(_source.export_path(image_id), _source.build_mask(image_id))


def export_split(source: COCOSource, overwrite: bool = False, workers: int = 1) -> dict[str, int]:
    """Write every mask of `source` (built with empty_images="keep", masks="rasterise"), then the marker."""
    marker = source.export_dir / EXPORT_MARKER
    if marker.is_file():
        old = read_json(marker)
        if not overwrite and any(old.get(k) != v for k, v in source.export_record().items()):
            log.warning("%s: made under %s; rewriting every mask", marker, old.get("rule"))
            overwrite = True
        marker.unlink()  # the folder is being changed: unfinished until the marker is written again
    todo = [i for i in source.ids if overwrite or not is_complete(source.export_path(i), source.json_size(i))]
    source.export_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"{source.split}{source.year} masks", unit="img")
    t0 = time.perf_counter()
    if workers > 1 and len(todo) > 1:
        with Pool(workers, initializer=_init, initargs=(source,)) as pool:
            for _ in pool.imap_unordered(_export, todo, chunksize=16):
                bar.update()
    else:
        _init(source)
        for image_id in todo:
            _export(image_id)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    write_json(marker, source.export_record())
    counts = {"images": len(source.ids), "written": len(todo), "kept": len(source.ids) - len(todo)}
    log.info("%s: %s in %.1f s", source.export_dir, counts, seconds)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder with annotations/ and <split><year>/")
    p.add_argument("--year", type=int, default=2017, choices=(2014, 2017))
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--out", type=Path, default=None, help="default <root>/SegmentationClass<split><year>")
    p.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out is not None and len(args.splits) > 1:
        raise ValueError("--out names one folder: give one split with it")
    out = args.out.resolve() if args.out is not None else None
    for split in args.splits:
        source = COCOSource(args.root, split, args.year, empty_images="keep", masks="rasterise", export_dir=out)
        export_split(source, overwrite=args.overwrite, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
