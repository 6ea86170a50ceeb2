"""Benchmark wsss.cam.metrics: the faithfulness metrics' cost against plain forwards, and against the peers.

On a trained wsss classifier and the first `--images` images of a split (their image-level classes as the
targets, CAM maps from `wsss.cam`, one scale), it times, in interleaved rounds after one untimed warm-up:

- Deletion + Insertion with `--steps` steps (2 (steps + 1) perturbed inputs per pair) against the same number
  of plain batched forwards of the unperturbed images: the issue's bound is 1.3x;
- `average_drop_increase` against torchcam's `ClassificationMetric` (one pair per update, as it scores one
  class per image) on the same maps;
- `road` at `--percentiles` against pytorch-grad-cam's `ROADMostRelevantFirst` + `ROADLeastRelevantFirst`
  with the noise at 0, on the same maps.

Medians over `--repeats` rounds, written as ratios; a JSON with the command, commit and machine goes to `--out`.

    python scripts/bench_faithfulness.py --checkpoint PATH --images 32 --steps 32 --repeats 3
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
    model = model.eval()
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


def _plain(model, images, targets, n, batch):
    """`n` plain forwards per pair, batched like the metrics."""
    inputs = images[targets[:, 0]].repeat_interleave(n, 0)
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            model(inputs[i : i + batch])


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
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--percentiles", type=int, nargs="+", default=[20, 50, 80])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_faithfulness.json"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the dataset (after --)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, images, targets, maps = _pairs(args)
    forwards = 2 * (args.steps + 1)
    jobs = {
        "deletion_insertion": lambda: deletion_insertion(
            model, images, targets, maps, args.steps, batch_size=args.batch
        ),
        "plain_forwards": lambda: _plain(model, images, targets, forwards, args.batch),
        "average_drop_increase": lambda: average_drop_increase(model, images, targets, maps, batch_size=args.batch),
        "torchcam_average_drop": lambda: _torchcam(model, images, targets, maps),
        "road": lambda: road(model, images, targets, maps, tuple(args.percentiles), batch_size=args.batch),
        "grad_cam_road": lambda: _grad_cam_road(model, images, targets, maps, args.percentiles),
    }
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
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "ratios": {
            "deletion_insertion / plain forwards (same count)": round(
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
