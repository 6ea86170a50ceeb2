"""Benchmark wsss.cam.metrics: the faithfulness metrics' cost against plain forwards, and against the peers.

On a trained wsss classifier read as the faithfulness stage reads it (`cam.output_stride`, default 8, and
`cam.channels_last`, eval mode) and the first `--images` images of a split (their image-level classes as the
targets, CAM maps from `wsss.cam`, one scale), it times, in interleaved rounds after one untimed warm-up:

- Deletion + Insertion with `--steps` steps and the stage's baseline (`faithfulness.baseline`, blur by default;
  2 (steps + 1) perturbed inputs per pair) against plain forwards of the unperturbed images in the same batches:
  the same pairs per batch, the same number of inputs per forward (recorded and checked), so the ratio is the
  perturbation's own cost;
- `average_drop_increase` against torchcam's `ClassificationMetric` (one pair per update, as it scores one
  class per image) on the same maps;
- `road` at `--percentiles` against pytorch-grad-cam's `ROADMostRelevantFirst` + `ROADLeastRelevantFirst`
  with the noise at 0, on the same maps.

Medians over `--repeats` rounds, written as ratios; a JSON with the command, commit and machine goes to `--out`.

    python scripts/bench_faithfulness.py --checkpoint PATH --images 16 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from wsss.cam import build_cam
from wsss.cam.metrics import average_drop_increase, deletion_insertion, road
from wsss.config import register_configs
from wsss.data import build_source
from wsss.data.transforms import normalize
from wsss.models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _pairs(args):
    """Images, (image, class) targets and CAM maps of the first `--images` images of the split."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    model, names = load_checkpoint(args.checkpoint)
    if cfg.cam.output_stride is not None:  # as the faithfulness stage reads the classifier (cams.cam_model)
        model.set_output_stride(cfg.cam.output_stride)
    if cfg.cam.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.eval()
    args.steps = cfg.faithfulness.steps if args.steps is None else args.steps
    args.batch = cfg.faithfulness.batch_size if args.batch is None else args.batch
    args.baseline = str(cfg.faithfulness.baseline) if args.baseline is None else args.baseline
    args.output_stride = model.output_stride
    source = build_source(cfg.dataset, args.split)
    if source.class_names != names:
        raise SystemExit(f"the checkpoint's classes {names} differ from the dataset's {source.class_names}")
    ids = [i for i in source.ids if len(source.labels(i))][: args.images]
    raw = torch.stack([source.load_image(i) for i in ids])  # equal sizes on the embedded set
    images = normalize(raw)
    targets = torch.tensor([[k, int(c)] for k, i in enumerate(ids) for c in source.labels(i)])
    with build_cam("cam", model, target_layer="backbone") as cam:
        maps = []
        for k, c in targets.tolist():
            maps.append(cam(images[k : k + 1], torch.tensor([[c]]))[0, 0])
    return model, images, targets, torch.stack(maps).clamp(0, 1)


def _plain(model, images, targets, steps, batch):
    """The forwards of `deletion_insertion` without its perturbation: per group of batch // (steps + 1) pairs, a
    deletion and an insertion pass over steps + 1 copies of each pair's image, in chunks of `batch`."""
    pairs_per_batch = max(1, batch // (steps + 1))
    with torch.no_grad():
        for p in range(0, len(targets), pairs_per_batch):
            inputs = images[targets[p : p + pairs_per_batch, 0]].repeat_interleave(steps + 1, 0)
            for _ in ("deletion", "insertion"):
                for i in range(0, len(inputs), batch):
                    model(inputs[i : i + batch])


def _forward_batches(model, job) -> list[int]:
    """The number of inputs of every forward of `job()`, in order."""
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
    try:
        job()
    finally:
        handle.remove()
    return seen


def _torchcam(model, images, targets, maps):
    from torchcam.metrics import ClassificationMetric

    class GivenMaps:
        def __init__(self, m):
            self.model, self.m = model, m

        def __call__(self, class_idx, scores):
            return [self.m]

        def fuse_cams(self, cams):
            return cams[0]

        @contextlib.contextmanager
        def _hooks_off(self):
            yield

    for k, (i, c) in enumerate(targets.tolist()):
        metric = ClassificationMetric(GivenMaps(maps[k : k + 1]), torch.sigmoid)
        metric.update(images[i : i + 1], class_idx=[c])


def _grad_cam_road(model, images, targets, maps, percentiles):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    up = torch.nn.functional.interpolate(maps[:, None], images.shape[-2:], mode="bilinear")[:, 0].clamp(0, 1)
    fns = [lambda out, c=c: torch.sigmoid(out)[c] for c in targets[:, 1].tolist()]
    for cls in (ROADMostRelevantFirst, ROADLeastRelevantFirst):
        for p in percentiles:
            metric = cls(percentile=p)
            metric.perturbation.imputer.noise = 0.0
            metric(images[targets[:, 0]], up.numpy(), fns, model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a wsss classifier checkpoint (model.pt)")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, help="default: faithfulness.steps")
    p.add_argument("--batch", type=int, help="perturbed images per forward (default: faithfulness.batch_size)")
    p.add_argument("--baseline", choices=["zeros", "blur"], help="default: faithfulness.baseline")
    p.add_argument("--percentiles", type=int, nargs="+", default=[20, 50, 80])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_faithfulness.json"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the dataset (after --)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, images, targets, maps = _pairs(args)
    jobs = {
        "deletion_insertion": lambda: deletion_insertion(
            model, images, targets, maps, args.steps, args.baseline, batch_size=args.batch
        ),
        "plain_forwards": lambda: _plain(model, images, targets, args.steps, args.batch),
        "average_drop_increase": lambda: average_drop_increase(model, images, targets, maps, batch_size=args.batch),
        "torchcam_average_drop": lambda: _torchcam(model, images, targets, maps),
        "road": lambda: road(model, images, targets, maps, tuple(args.percentiles), batch_size=args.batch),
        "grad_cam_road": lambda: _grad_cam_road(model, images, targets, maps, args.percentiles),
    }
    batches = {k: _forward_batches(model, jobs[k]) for k in ("deletion_insertion", "plain_forwards")}
    if batches["deletion_insertion"] != batches["plain_forwards"]:
        raise SystemExit(f"plain forwards are not batched like Deletion + Insertion: {batches}")
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(args.repeats + 1):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": " ".join(["python", "scripts/bench_faithfulness.py", *sys.argv[1:]]),
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "pairs": len(targets),
        "image_size": list(images.shape[-2:]),
        "steps": args.steps,
        "baseline": args.baseline,
        "output_stride": args.output_stride,
        "forward_batches": batches["deletion_insertion"],  # inputs per forward, the same for the plain forwards
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "ratios": {
            "deletion_insertion / plain forwards (same batches)": round(
                med["deletion_insertion"] / med["plain_forwards"], 3
            ),
            "torchcam average drop / ours": round(med["torchcam_average_drop"] / med["average_drop_increase"], 3),
            "pytorch-grad-cam ROAD / ours": round(med["grad_cam_road"] / med["road"], 3),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
