"""README's first picture: zero-shot CAMs, pseudo masks and ground truth on COCO val2017 photos licensed CC BY.

    python scripts/readme_figure.py [--out docs/real_overlays.png] [--rows 4] [-- overrides]

Runs (or reuses from the cache) `experiment=real_coco_zero_shot` up to the pseudo masks, keeps the val2017
images whose COCO licence is "Attribution License" (CC BY 2.0) and that hold a class the zero-shot table maps,
takes the `--rows` with the best per-image mIoU, and draws image | CAM of the largest class | pseudo mask |
ground truth. Prints each photo's Flickr URL and licence, the attribution README gives under the picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from wsss.artifacts import read_cams, read_mask
from wsss.config import register_configs
from wsss.data import build_source
from wsss.pipeline import Pipeline
from wsss.viz import overlay_grid

REPO = Path(__file__).resolve().parents[1]
CC_BY = "Attribution License"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "real_overlays.png")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=real_coco_zero_shot", *args.overrides])
    pipe = Pipeline(cfg)
    pipe.run("pseudo_masks")
    split = str(cfg.dataset.eval_split)
    source = build_source(cfg.dataset, split)
    ann = json.loads((Path(cfg.dataset.root) / "annotations" / f"instances_{split}2017.json").read_text())
    licences = {lic["id"]: lic for lic in ann["licenses"]}
    images = {Path(im["file_name"]).stem: im for im in ann["images"]}
    maps_dir = pipe.artifact_dir("cams", split) / "maps"
    masks_dir = pipe.artifact_dir("pseudo_masks", split) / "masks"
    scored = []
    for image_id in source.ids:
        meta = images.get(image_id)
        if meta is None or licences[meta["license"]]["name"] != CC_BY:
            continue
        gt = source.load_mask(image_id)
        pred = read_mask(masks_dir / f"{image_id}.png")
        labels = [v for v in np.unique(gt) if v not in (0, 255)]
        if not labels:
            continue  # only unscored classes (void) in this photo
        valid = gt != 255
        ious = [((pred == v) & (gt == v) & valid).sum() / (((pred == v) | (gt == v)) & valid).sum() for v in labels]
        scored.append((float(np.mean(ious)), image_id, labels))
    if not scored:
        print("no CC BY image with a scored class", file=sys.stderr)
        return 1
    rows, credits = [], []
    for _, image_id, labels in sorted(scored, reverse=True)[: args.rows]:
        gt = source.load_mask(image_id)
        largest = max(labels, key=lambda v: int((gt == v).sum()))
        cams = read_cams(maps_dir / f"{image_id}.npz")
        keys = list(cams["keys"])
        heat = cams["maps"][keys.index(largest - 1)].astype(np.float32) if largest - 1 in keys else np.zeros(gt.shape)
        image = source.load_image(image_id).permute(1, 2, 0).numpy()
        name = source.class_names[largest - 1]
        pred = read_mask(masks_dir / f"{image_id}.png")
        rows.append((f"{image_id} ({name})", image, heat, [("pseudo mask", pred), ("ground truth", gt)]))
        meta = images[image_id]
        credits.append(f"{image_id}: {meta['flickr_url']} ({licences[meta['license']]['url']})")
    overlay_grid(rows, args.out)
    print(f"wrote {args.out}")
    print("\n".join(credits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
