"""Time the `evaluate` stage with and without the box metrics, and the bootstrap, on real stored CAMs.

Runs the stage in this process (its upstream artifacts must be cached: run the same overrides once first), in
interleaved repeats, removing its artifact before each run so every repeat computes:

- base:   `evaluate.boxes=false evaluate.bootstrap=0` (masks, 100-threshold sweep, PxAP, figures);
- boxes:  `evaluate.boxes=true evaluate.bootstrap=0`;
- the bootstrap's own seconds (`intervals.seconds` of metrics.json) with `evaluate.bootstrap=1000`.

Prints the median stage seconds of each, the boxes / base ratio, and the bootstrap seconds.

    python scripts/bench_evaluate.py --repeats 3 -- model.checkpoint=PATH [more overrides]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.pipeline import Pipeline

CONF = Path(__file__).resolve().parents[1] / "conf"


def run_once(overrides: list[str]) -> tuple[float, dict]:
    """Seconds of one fresh evaluate run, and its metrics.json."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=evaluate", *overrides])
    pipe = Pipeline(cfg)
    out = pipe.artifact_dir("evaluate")
    shutil.rmtree(out, ignore_errors=True)
    pipe.run("evaluate")
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["timings"]["seconds"], json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="after --: overrides of `python -m wsss.run`")
    args = parser.parse_args()
    register_configs()
    cases = {
        "base (no boxes, no bootstrap)": ["evaluate.boxes=false", "evaluate.bootstrap=0"],
        "boxes (no bootstrap)": ["evaluate.boxes=true", "evaluate.bootstrap=0"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds, metrics = run_once([*args.overrides, *cases[name]])
            times[name].append(seconds)
    _, metrics = run_once([*args.overrides, "evaluate.boxes=true", f"evaluate.bootstrap={args.resamples}"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"images {metrics['num_images']}  split {metrics['split']}  repeats {args.repeats}")
    for name in names:
        print(f"{name:<32}{med[name]:>8.2f} s  (each: {', '.join(f'{t:.2f}' for t in times[name])})")
    boot = metrics["intervals"]["seconds"]
    print(f"bootstrap, {args.resamples} resamples of {metrics['num_images']} images: {boot:.2f} s")
    print(f"boxes/base ratio: {med[names[1]] / med[names[0]]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
