"""Time the segment stage against the classifier's train stage on the same machine, in one process.

Builds both stages' own training runs (the loader, model, optimizer, schedule and loop of `stage=train` and of
`stage=segment`, from one composed config) and alternates their epochs (train, segment, train, segment, ...)
so that a noisy machine slows both alike; the first epoch of each is a warm-up and not counted. Then the
segmenter predicts and scores `segment.eval_split` once, as the stage does (multi-scale + flip, palette PNGs
into a temporary folder, the confusion matrix). Projections: the classifier's median seconds per epoch x
`train.epochs`; the segmenter's median x `segment.epochs` + the prediction time. The last line is the ratio
segment / train as a bare number (at most 1: the segment stage costs no more than training the classifier).

The segmenter trains on the pseudo masks in `--masks` (a pseudo_masks artifact's `masks/` folder) or, without
it, on the train split's ground truth: the same images, crops and number of label PNGs read per epoch.

    python scripts/bench_segment.py --masks $WSSS_CACHE/pseudo_masks/KEY/masks --out segment.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from wsss.config import register_configs
from wsss.data import build_source
from wsss.stages import segment as P
from wsss.stages import segment_train as S
from wsss.stages import train as T
from wsss.stages.base import StageContext, environment

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=Path, help="pseudo masks to train the segmenter on (default: ground truth)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each, after one warm-up epoch")
    parser.add_argument("--out", type=Path, help="also write the times and projections as JSON here")
    parser.add_argument(
        "--predictions", type=Path, help="keep the timed prediction's PNGs in DIR/masks (default: dropped)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of both (e.g. segment.network=lraspp)")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=segment", *args.overrides])
    device = torch.device("cpu")
    source = build_source(cfg.dataset, str(cfg.dataset.train_split))
    if args.masks is not None and not args.masks.is_dir():
        parser.error(f"--masks {args.masks}: no such folder")
    train_loader, train_loop, train_loss = T.build_run(cfg, source, device)
    _, seg_loader, seg_loop, seg_loss = S.build_run(cfg, source, args.masks, device)
    times: dict[str, list[float]] = {"train": [], "segment": []}
    runs = {"train": (train_loader, train_loop, train_loss), "segment": (seg_loader, seg_loop, seg_loss)}
    for epoch in range(args.epochs + 1):
        for name, (loader, loop, batch_loss) in runs.items():
            start = time.perf_counter()
            loop.epoch(loader, epoch, batch_loss)
            if epoch > 0:
                times[name].append(time.perf_counter() - start)
    split = str(cfg.segment.eval_split)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext("segment", split, cfg, {}, args.predictions or Path(tmp), device)
        start = time.perf_counter()
        scored, records = P.predict_and_score(ctx, seg_loop.final_model().eval())
        predict_s = time.perf_counter() - start
    env = environment(device)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}")
    per_epoch = {name: statistics.median(t) for name, t in times.items()}
    projected = {
        "train": per_epoch["train"] * cfg.train.epochs,
        "segment": per_epoch["segment"] * cfg.segment.epochs + predict_s,
    }
    for name, epochs in (("train", cfg.train.epochs), ("segment", cfg.segment.epochs)):
        loader = runs[name][0]
        print(
            f"{name}: {len(loader)} batches/epoch, {per_epoch[name]:.2f} s/epoch (median of {len(times[name])}: "
            f"{', '.join(f'{t:.2f}' for t in times[name])}) x {epochs} epochs"
        )
    print(f"segment predict + score {split}: {len(records)} images, {predict_s:.1f} s (weights after the timed epochs)")
    print(f"projected: train {projected['train']:.0f} s, segment {projected['segment']:.0f} s")
    ratio = projected["segment"] / projected["train"]
    print(f"segment / train projected time: {ratio:.3f}")
    if args.out:
        payload = {
            "overrides": args.overrides,
            "masks": str(args.masks) if args.masks else "ground truth",
            "seconds_per_epoch": times,
            "epochs": {"train": cfg.train.epochs, "segment": cfg.segment.epochs},
            "predict_seconds": predict_s,
            "predict_images": len(records),
            "projected_seconds": projected,
            "ratio": ratio,
            "miou_after_timed_epochs": scored["miou"],
            "environment": env,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{ratio:.3f}")


if __name__ == "__main__":
    main()
