"""Time a many-threshold `ThresholdSweep` against one single-threshold evaluation over the same CAMs.

Synthetic VOC-like data (about 500 x 375, 21 labels, 1-3 classes per image, 255 bands at object borders) is
generated once, in memory, from a seeded torch generator before any timing. Then, in interleaved repeats:

- single: `pseudo_mask` at one threshold + `ConfusionMatrix.update`, over every image;
- sweep:  `ThresholdSweep.update` with all thresholds, over every image;
- sweep + PxAP (with --pxap-bins > 0): the same sweep that also accumulates PxAP histograms.

Each path ends with its `compute()`. The sweep's matrix at the single threshold must equal the single path's.
The last output line ends with the sweep/single ratio of median times as a bare number.

    python scripts/bench_eval.py --images 300 --device cpu [--threads 1] [--pxap-bins 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss.metrics import ConfusionMatrix, ThresholdSweep, best_threshold, parse_thresholds
from wsss.pseudo import pseudo_mask

NUM_LABELS = 21
SIZES = [(375, 500), (500, 375), (333, 500), (375, 500), (281, 500)]


def synthetic(n: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`n` (maps (K,H,W) float32 in [0,1], keys (K,) int64, gt (H,W) uint8) triples on `device`."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        k = int(torch.randint(1, 4, (1,), generator=gen))
        keys = torch.randperm(NUM_LABELS - 1, generator=gen)[:k].sort().values
        coarse = torch.rand((1, k, h // 40 + 2, w // 40 + 2), generator=gen)
        maps = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] ** 2  # (K, H, W)
        m, arg = maps.max(0)
        gt = torch.where(m > 0.3, (keys + 1)[arg], 0).to(torch.uint8)  # (H, W)
        gt[(m - 0.3).abs() < 0.01] = 255  # ignore band at object borders, as in VOC
        noise = 0.1 * torch.rand((k, h, w), generator=gen)
        maps = (maps + noise).clamp_(0, 1)
        data.append((maps.to(device), keys.to(device), gt.to(device)))
    return data


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of `fn`, with the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--thresholds", default="0.00:0.99:0.01", help="sweep thresholds (default: 100)")
    parser.add_argument("--threshold", type=float, default=0.3, help="threshold of the single evaluation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pxap-bins", type=int, default=0, help="also time the sweep with PxAP (e.g. 1000)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0: torch's default). On a CPU shared with other jobs, intra-op "
        "threads time the scheduler more than the maths",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    thresholds = parse_thresholds(args.thresholds)
    if args.threshold not in thresholds:
        raise SystemExit(f"--threshold {args.threshold} must be one of the sweep thresholds")
    data = synthetic(args.images, device, args.seed)
    pixels = sum(gt.numel() for _, _, gt in data)

    def single() -> torch.Tensor:
        cm = ConfusionMatrix(NUM_LABELS)
        for maps, keys, gt in data:
            cm.update(gt, pseudo_mask(maps, keys, args.threshold))
        return cm.compute()

    def sweep(pxap_bins: int | None = None) -> ThresholdSweep:
        sw = ThresholdSweep(NUM_LABELS, thresholds, pxap_bins=pxap_bins)
        for maps, keys, gt in data:
            sw.update(maps, keys, gt)
        sw.compute()
        if pxap_bins:
            sw.compute_pxap()
        return sw

    # Warm-up, and the check that both paths agree at the shared threshold.
    cm_single = single()
    sw = sweep()
    cms = sw.compute()
    agree = torch.equal(cms[thresholds.index(args.threshold)], cm_single)
    paths: dict[str, Callable[[], object]] = {
        f"single threshold (t={args.threshold})": single,
        f"sweep ({len(thresholds)} thresholds)": sweep,
    }
    if args.pxap_bins:
        paths[f"sweep + PxAP ({args.pxap_bins} bins)"] = lambda: sweep(args.pxap_bins)
        sweep(args.pxap_bins)
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # interleave, alternating the order
        for name in order:
            times[name].append(timed(paths[name], device))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    t_best, s_best = best_threshold(cms, thresholds)
    print(
        f"images {len(data)}  pixels {pixels / 1e6:.1f} M  device {device}  "
        f"threads {torch.get_num_threads()}  repeats {args.repeats}"
    )
    print(f"{'path':<34}{'median s':>10}{'ms/image':>10}{'vs single':>11}")
    base = med[names[0]]
    for name in names:
        print(f"{name:<34}{med[name]:>10.3f}{1e3 * med[name] / len(data):>10.2f}{med[name] / base:>11.2f}")
    print(f"sweep at t={args.threshold} equals the single-threshold matrix: {agree}")
    print(f"best threshold by mIoU: {t_best:.2f} (mIoU {s_best['miou']:.2f})")
    if not agree:
        raise SystemExit("the sweep and the single-threshold evaluation disagree")
    print(f"sweep/single ratio: {med[names[1]] / base:.2f}")


if __name__ == "__main__":
    main()
