"""Train a recipe with N seeds and report the spread of its headline numbers (mean, std, min, max).

    python scripts/seed_spread.py                         # the default recipe, seeds 0, 1, 2
    python scripts/seed_spread.py --seeds 5 -- train.lr=1e-3 train.epochs=40

Each seed is an ordinary pipeline run (`python -m wsss.run seed=S <overrides>`), cached like any other, so a
later `python -m wsss.run -m seed=0,1,2 cam=gradcampp` reuses the same N models and CAMs. Reports the mIoU
at `pseudo.threshold` (the headline), the one-pass sweep's best mIoU and PxAP, and each run's train and total
time; `--out FILE.json` also writes them. The standard deviation is the sample one (ddof = 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.pipeline import Pipeline
from wsss.stages.base import environment

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("miou", "sweep_best", "pxap")


def run_seed(seed: int, overrides: list[str]) -> dict:
    """One pipeline run with `seed=S`; its headline numbers and timings."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"seed={seed}"])
    pipe = Pipeline(cfg)
    start = time.perf_counter()
    pipe.run("evaluate")
    seconds = time.perf_counter() - start
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    train = json.loads((pipe.artifact_dir("train") / "manifest.json").read_text())
    return {
        "seed": seed,
        "miou": metrics["miou"],
        "sweep_best": metrics["sweep"]["best"]["miou"],
        "best_threshold": metrics["sweep"]["best_threshold"],
        "pxap": metrics["pxap"]["pxap"],
        "train_seconds": train["timings"]["seconds"],
        "wall_seconds": round(seconds, 1),
        "reused": dict(pipe.report),
    }


def summarise(rows: list[dict]) -> dict:
    """mean, sample std, min, max of each headline field."""
    out = {}
    for f in FIELDS:
        values = [r[f] for r in rows]
        out[f] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--out", type=Path, help="also write the rows and the summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    rows = []
    for seed in range(args.first, args.first + args.seeds):
        rows.append(run_seed(seed, args.overrides))
        r = rows[-1]
        print(
            f"seed {seed}: mIoU {r['miou']:.2f}  sweep best {r['sweep_best']:.2f} at {r['best_threshold']}"
            f"  PxAP {r['pxap']:.2f}  train {r['train_seconds']:.0f} s  wall {r['wall_seconds']:.0f} s",
            flush=True,
        )
    summary = summarise(rows)
    print(f"\n{len(rows)} seeds, overrides {args.overrides or '(none)'}")
    for f in FIELDS:
        s = summary[f]
        print(f"{f:<11} {s['mean']:6.2f} +- {s['std']:.2f}  (min {s['min']:.2f}, max {s['max']:.2f})")
    if args.out:
        machine = environment(torch.device("cpu"))
        payload = {"overrides": args.overrides, "rows": rows, "summary": summary, "machine": machine}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
