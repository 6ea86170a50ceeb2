"""Every refinement on the same CAMs, side by side with the seeds, in one run.

    python scripts/refine_compare.py                          # the default run's model (trained if missing)
    python scripts/refine_compare.py --out refine.json -- model.checkpoint=PATH affinity.epochs=10

For `pseudo.refine` = none, crf, par, superpixel and rw, runs the pipeline to `evaluate` on the same config
(so the model and the CAMs are made once and reused), and reports, on the evaluation split, the seeds' mIoU at
`pseudo.threshold`, the refined masks' mIoU at the same setting, the sweep's best of each and PxAP, and the
refinement's seconds per image beside the CAM stage's (from the manifests: `affinity` training is reported
apart). Extra Hydra overrides after `--` apply to every run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
METHODS = ("none", "crf", "par", "superpixel", "rw")


def run_method(method: str, overrides: list[str]) -> dict:
    """The pipeline to evaluate with `pseudo.refine=method`; its scores and stage times."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"pseudo.refine={method}"])
    pipe = Pipeline(cfg)
    pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())

    def seconds(stage: str) -> float | None:
        d = pipe.artifact_dir(stage)
        return (
            json.loads((d / "manifest.json").read_text())["timings"]["seconds"]
            if (d / "manifest.json").is_file()
            else None
        )

    n = metrics["num_images"]
    row = {
        "method": method,
        "images": n,
        "masks_miou": metrics["pseudo_masks"]["miou"],
        "masks_sweep_best": metrics["sweep"]["best"]["miou"],
        "masks_best_threshold": metrics["sweep"]["best_threshold"],
        "masks_pxap": metrics["pxap"]["pxap"],
        "cams_s_per_image": round(seconds("cams") / n, 4) if seconds("cams") else None,
    }
    if method != "none":
        row["seeds_miou"] = metrics["seeds"]["miou"]
        row["seeds_sweep_best"] = metrics["seeds"]["sweep_best_miou"]
        row["refine_s_per_image"] = round(seconds("refine") / n, 4) if seconds("refine") else None
    if method == "rw":
        row["affinity_train_s"] = seconds("affinity")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    rows = [run_method(m, args.overrides) for m in args.methods]
    print(f"\n{'method':<11} {'seeds':>7} {'masks':>7} {'gain':>6} {'best':>7} {'PxAP':>7} {'s/img':>7}")
    for r in rows:
        seeds = r.get("seeds_miou", r["masks_miou"])
        s_img = r.get("refine_s_per_image") or r["cams_s_per_image"]
        print(
            f"{r['method']:<11} {seeds:7.2f} {r['masks_miou']:7.2f} {r['masks_miou'] - seeds:+6.2f} "
            f"{r['masks_sweep_best']:7.2f} {r['masks_pxap']:7.2f} {s_img:7.4f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
