"""The GPU path, measured: IRN-setting CAM throughput, training throughput with and without AMP, peak memory.

    python scripts/bench_gpu.py                                   # one GPU
    torchrun --standalone --nproc_per_node=2 scripts/bench_gpu.py # two GPUs: each rank takes half the images
    python scripts/bench_gpu.py --smoke --device cpu              # tiny sizes: the CPU smoke test of the suite

CAMs: the project's classifier (ResNet-50, `weights=None`: speed does not depend on the weights) read at
output stride 16, IRN's scales 1.0 / 0.5 / 1.5 / 2.0 with flip, images of VOC size (500 x 375), every image
with 1-3 of the 20 classes (drawn once, seeded), batches of `--cam-batch` images, closed-form CAM as the
`cams` stage computes it. Training: 512 px crops, batches of `--train-batch`, SGD, float32 and bfloat16
autocast. Times follow a warm-up and `torch.cuda.synchronize`; peak memory is `max_memory_allocated`.
Prints one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from wsss import dist
from wsss.cam import CAM
from wsss.models import Classifier


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cam_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """Images per second of IRN-setting multi-scale + flip CAMs (this rank's share of the images)."""
    g = torch.Generator().manual_seed(0)
    model = Classifier(20, args.backbone, output_stride=16).to(device).eval()
    h, w = args.size
    n = args.cam_images // dist.world_size()
    classes = torch.full((n, 3), -1, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        classes[i, :k] = torch.randperm(20, generator=g)[:k]
    images = torch.randn(args.cam_batch, 3, h, w, generator=g).to(device)
    with CAM(model, "backbone.layer4") as cam:
        cam.multiscale(images[:1], classes[:1].to(device), scales=args.scales, flip=True)  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for i in range(0, n, args.cam_batch):
            batch = classes[i : i + args.cam_batch].to(device)
            high, low = cam.multiscale(images[: len(batch)], batch, scales=args.scales, flip=True)
            high.cpu(), low.cpu()  # as the stage does: the maps leave the device
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2), "peak_mb": peak}


def train_throughput(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Training images per second (this rank) at `--crop` px, SGD, optionally under autocast."""
    torch.manual_seed(0)
    model = Classifier(20, args.backbone, output_stride=16).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.is_dist():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.train_batch, 3, args.crop, args.crop, device=device)
    y = (torch.rand(args.train_batch, 20, device=device) < 0.1).float()
    context = torch.autocast(device.type, amp) if amp is not None else nullcontext()

    def step() -> None:
        with context:
            loss = F.multilabel_soft_margin_loss(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    n = args.train_steps * args.train_batch
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--scales", type=float, nargs="+", default=(1.0, 0.5, 1.5, 2.0))
    parser.add_argument("--cam-images", type=int, default=256)
    parser.add_argument("--cam-batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU smoke test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.size, args.scales = "resnet_tiny", (48, 64), (1.0, 0.5)
        args.cam_images, args.cam_batch, args.crop, args.train_batch, args.train_steps = 4, 2, 64, 2, 2
    device = dist.local_device(args.device)
    started = dist.setup(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ranks": dist.world_size(),
        "torch": torch.__version__,
        "setting": {k: v for k, v in vars(args).items() if k != "out"},
        "cams": cam_throughput(args, device),
        "train_fp32": train_throughput(args, device, None),
        "train_bf16": train_throughput(args, device, torch.bfloat16),
    }
    if dist.is_dist():  # throughput of the whole job: images of every rank over the slowest rank's time
        for k in ("cams", "train_fp32", "train_bf16"):
            parts = dist.gather(result[k])
            if dist.is_main():
                n, s = sum(p["images"] for p in parts), max(p["seconds"] for p in parts)
                result[k] = {"images": n, "seconds": s, "images_per_s": round(n / s, 2), "per_rank": parts}
    if dist.is_main():
        text = json.dumps(result, indent=2, default=str)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    if started:
        dist.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
