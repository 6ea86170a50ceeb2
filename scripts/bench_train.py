"""Time training epochs of two recipes in one process, interleaved, and project each recipe's training time.

Both recipes are the default pipeline's training (same data, loader, model, optimizer, schedule and loop as
`python -m wsss.run stage=train`) with their own Hydra overrides. Epochs alternate between the two (A, B, A, B,
...) so that a noisy machine slows both alike; the first epoch of each is a warm-up and not counted. The
projection is median seconds per epoch x the recipe's `train.epochs`; the last line is the B/A ratio of the
projections as a bare number (below 1: B trains faster than A); `--out FILE.json` also writes them.

    python scripts/bench_train.py --a train.amp_dtype=null train.epochs=36 --b ''   # float32 36 epochs vs default
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.data import build_source
from wsss.stages import train as T
from wsss.stages.base import environment
from wsss.training import resolve_amp_dtype

REPO = Path(__file__).resolve().parents[1]


def recipe(overrides: list[str]):
    """The composed config and the train stage's own loader, loop and batch loss for it, on the CPU."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    device = torch.device("cpu")
    source = build_source(cfg.dataset, str(cfg.dataset.train_split))
    loader, loop, batch_loss = T.build_run(cfg, source, device)
    return cfg, loader, loop, batch_loss, resolve_amp_dtype(cfg.train.amp_dtype, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="train.amp_dtype=null train.epochs=36", help="overrides of recipe A")
    parser.add_argument("--b", default="", help="overrides of recipe B (default: the default recipe)")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs of each, after one warm-up epoch")
    parser.add_argument("--out", type=Path, help="also write the times and projections as JSON here")
    args = parser.parse_args()
    texts = {"A": args.a, "B": args.b}
    runs = {name: recipe(shlex.split(text)) for name, text in texts.items()}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for epoch in range(args.epochs + 1):
        for name, (_, loader, loop, batch_loss, _) in runs.items():
            start = time.perf_counter()
            loop.epoch(loader, epoch, batch_loss)
            if epoch > 0:
                times[name].append(time.perf_counter() - start)
    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}")
    projected = {}
    for name, (cfg, loader, _, _, amp) in runs.items():
        per_epoch = statistics.median(times[name])
        projected[name] = per_epoch * cfg.train.epochs
        print(
            f"{name} [{texts[name] or 'default'}]: {amp or 'float32'}, {len(loader)} batches/epoch, "
            f"{per_epoch:.2f} s/epoch (median of {len(times[name])}: "
            f"{', '.join(f'{t:.2f}' for t in times[name])}) x {cfg.train.epochs} epochs = {projected[name]:.0f} s"
        )
    ratio = projected["B"] / projected["A"]
    print(f"B/A projected training time: {ratio:.3f}")
    if args.out:
        recipes = {
            name: {
                "overrides": texts[name],
                "precision": amp or "float32",
                "epochs": cfg.train.epochs,
                "seconds_per_epoch": times[name],
                "projected_seconds": projected[name],
            }
            for name, (cfg, _, _, _, amp) in runs.items()
        }
        payload = {"recipes": recipes, "ratio": ratio, "machine": env}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
