"""How good are AffinityNet's training labels? Precision and coverage of the confident band, per (conf_fg, conf_bg).

    python scripts/affinity_labels.py                       # the default run's CAMs (trains them if missing)
    python scripts/affinity_labels.py --fg 0.3 0.5 0.7 --bg 0.05 0.2 0.3 -- seed=1

The `affinity` stage labels a pixel with its best class where that map exceeds `affinity.conf_fg`, background
where every map is at most `affinity.conf_bg`, and leaves the rest out. AffinityNet learns boundaries where
labels change, so labels that cross the true object edge teach it the wrong edges. For each band this prints,
against the ground truth of the CAMs' split: the share of labelled foreground pixels that carry the right class
(fg precision), the share of labelled background pixels that are background (bg precision), and the share of
all pixels labelled. One pass over the maps; every band is counted from the same per-pixel maxima.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from wsss.artifacts import read_cams
from wsss.config import register_configs
from wsss.data import build_source
from wsss.dist import progress
from wsss.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fg", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--bg", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*args.overrides, "stage=cams"])
    pipe = Pipeline(cfg)
    split = str(cfg.dataset.train_split)
    pipe.run("cams")
    maps_dir = pipe.artifact_dir("cams", split) / "maps"
    source = build_source(cfg.dataset, split)
    fg, bg = np.asarray(args.fg), np.asarray(args.bg)
    # counts[band] of: fg labelled, fg right, bg labelled, bg right; and all pixels
    fg_n, fg_ok = np.zeros(len(fg)), np.zeros(len(fg))
    bg_n, bg_ok = np.zeros(len(bg)), np.zeros(len(bg))
    pixels = 0
    for image_id in progress(source.ids, desc="labels", unit="img"):
        cams = read_cams(maps_dir / f"{image_id}.npz")
        gt = source.load_mask(image_id).astype(np.int64)
        valid = gt != 255
        pixels += int(valid.sum())
        if len(cams["keys"]) == 0:
            best, label = np.zeros(gt.shape), np.zeros(gt.shape, np.int64)
        else:
            m = cams["maps"].astype(np.float32)
            best, label = m.max(0), cams["keys"][m.argmax(0)] + 1
        b, lab, g = best[valid], label[valid], gt[valid]
        above = b[None] > fg[:, None]  # (F, P)
        fg_n += above.sum(1)
        fg_ok += (above & (lab == g)[None]).sum(1)
        below = b[None] <= bg[:, None]
        bg_n += below.sum(1)
        bg_ok += (below & (g == 0)[None]).sum(1)
    print(f"\n{len(source)} images of split {split!r}, {pixels} pixels with ground truth")
    print("conf_fg  fg precision  fg share  |  conf_bg  bg precision  bg share")
    for i in range(max(len(fg), len(bg))):
        left = (
            f"{fg[i]:7.2f}  {100 * fg_ok[i] / max(fg_n[i], 1):12.2f}  {100 * fg_n[i] / pixels:8.2f}"
            if i < len(fg)
            else " " * 31
        )
        right = (
            f"{bg[i]:7.2f}  {100 * bg_ok[i] / max(bg_n[i], 1):12.2f}  {100 * bg_n[i] / pixels:8.2f}"
            if i < len(bg)
            else ""
        )
        print(f"{left}  |  {right}")


if __name__ == "__main__":
    main()
