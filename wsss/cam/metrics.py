"""Faithfulness of class activation maps: does a map show what the model used? Batched over (image, class) pairs.

Every function takes the model, normalised images (B, 3, H, W), the (image index, class) pairs to judge as a
(N, 2) long tensor, and one map per pair (N, h, w) in [0, 1], resized bilinearly to the image (as torchcam
does). Perturbed inputs of every pair (and every step) go through the model in batches of at most `batch_size`
images, on the model's device; the results do not depend on `batch_size`. `score_fn` turns logits into the
scores that are compared: sigmoid for the multi-label classifiers of wsss (the default), softmax for a
single-label model.

- `average_drop_increase` (Chattopadhyay et al. 2018, torchcam's `ClassificationMetric`): Y = the class score
  on the image, O = on the image multiplied by the map. Drop = max(0, Y - O) / Y (0 where Y = 0), Average Drop =
  its mean in percent (lower is better); Increase in Confidence = percent of pairs with O > Y (higher is better).
- `deletion_insertion` (Petsiuk et al. 2018, RISE): the pixels ordered by the map, highest first, ties broken
  by the lower pixel index (row-major); after step k of `steps`, the first floor(k * H * W / steps) pixels are
  replaced by the baseline (Deletion) or revealed on the baseline (Insertion), and the class score is taken.
  The area under each curve is the trapezoid rule over the fraction axis [0, 1]. Deletion: lower is better;
  Insertion: higher is better. Baselines: `zeros` (0 after normalisation, the mean colour), `blur` (RISE's
  insertion baseline: a Gaussian blur of the image, kernel 11, sigma 5), or a tensor broadcast to the image.

A constant map (all zeros included) is defined: every pixel ties, so the order is the pixel index order, and
the image times an all-zero map is the zero image; no metric is ever NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScoreFn = Callable[[Tensor], Tensor]
BASELINES = ("zeros", "blur")


def _check(images: Tensor, targets: Tensor, maps: Tensor) -> None:
    """Shapes, ranges and finiteness of the inputs, each problem named."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if targets.dim() != 2 or targets.shape[1] != 2:
        raise ValueError(f"targets must be (N, 2) (image index, class), got {tuple(targets.shape)}")
    if maps.dim() != 3 or maps.shape[0] != targets.shape[0]:
        raise ValueError(f"maps must be (N, h, w) with N = {targets.shape[0]} targets, got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps hold NaN or infinite values")
    if maps.numel() and (maps.min() < 0 or maps.max() > 1):
        raise ValueError(f"maps must be in [0, 1], got [{maps.min().item():.4g}, {maps.max().item():.4g}]")
    if targets.numel() and (targets[:, 0].min() < 0 or targets[:, 0].max() >= images.shape[0]):
        raise ValueError(f"target image indices must be in [0, {images.shape[0]}), got {targets[:, 0].tolist()}")


def _scores(model: nn.Module, inputs: Tensor, classes: Tensor, score_fn: ScoreFn, batch_size: int) -> Tensor:
    """score_fn(model(inputs))[i, classes[i]] for every row, in batches of `batch_size`."""
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            s = score_fn(model(inputs[i : i + batch_size]).float())
            c = classes[i : i + batch_size]
            if c.numel() and (c.min() < 0 or c.max() >= s.shape[1]):
                raise ValueError(f"target classes must be in [0, {s.shape[1]}) (the model's classes), got {c.tolist()}")
            out.append(s.gather(1, classes[i : i + batch_size, None]).squeeze(1))
    return torch.cat(out) if out else inputs.new_zeros(0)


def _resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) maps bilinearly at `size` (align_corners=False, as torchcam), clamped back into [0, 1]."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def average_drop_increase(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    score_fn: ScoreFn = torch.sigmoid,
    batch_size: int = 64,
) -> dict[str, Tensor | float]:
    """Average Drop and Increase in Confidence (module docstring) of each (image, class) pair and over all.

    Returns:
        {"drop": (N,) per pair in [0, 1], "increase": (N,) bool, "average_drop": percent,
         "increase_in_confidence": percent} (the percentages 0 for N = 0).
    """
    _check(images, targets, maps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, targets = images.float(), targets.long().to(images.device)
    classes = targets[:, 1]
    base = _scores(model, images[targets[:, 0]], classes, score_fn, batch_size)
    masked = images[targets[:, 0]] * _resized(maps.to(images.device), tuple(images.shape[-2:]))[:, None]
    kept = _scores(model, masked, classes, score_fn, batch_size)
    drop = torch.where(base > 0, torch.relu(base - kept) / base.clamp_min(torch.finfo(base.dtype).tiny), 0.0)
    increase = kept > base
    n = max(len(drop), 1)
    return {
        "drop": drop,
        "increase": increase,
        "average_drop": 100.0 * drop.sum().item() / n,
        "increase_in_confidence": 100.0 * increase.sum().item() / n,
    }


def pixel_ranks(maps: Tensor) -> Tensor:
    """(N, H, W) rank of each pixel in its map: 0 for the highest value, ties by the lower row-major index."""
    n, h, w = maps.shape
    flat = maps.reshape(n, h * w)
    order = torch.sort(-flat, dim=1, stable=True).indices  # stable: equal values keep index order
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(n, -1))
    return ranks.reshape(n, h, w)


def _baseline(images: Tensor, baseline: str | Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        return torch.broadcast_to(baseline.to(images), images.shape)
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        return gaussian_blur(images, kernel_size=[11, 11], sigma=[5.0, 5.0])
    raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    steps: int = 32,
    baseline: str | Tensor = "zeros",
    score_fn: ScoreFn = torch.sigmoid,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Deletion and Insertion curves and their areas (module docstring) for each (image, class) pair.

    Returns:
        {"deletion": (N, steps + 1) scores, "insertion": (N, steps + 1), "deletion_auc": (N,),
         "insertion_auc": (N,)}; column k is after a fraction k / steps of the pixels.
    """
    _check(images, targets, maps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, targets = images.float(), targets.long().to(images.device)
    h, w = images.shape[-2:]
    counts = torch.arange(steps + 1, device=images.device) * (h * w) // steps  # pixels changed after step k
    out: dict[str, list[Tensor]] = {"deletion": [], "insertion": []}
    pairs_per_batch = max(1, batch_size // (steps + 1))
    for p in range(0, len(targets), pairs_per_batch):
        t = targets[p : p + pairs_per_batch]
        image = images[t[:, 0]]  # (P, 3, H, W)
        base = _baseline(image, baseline)
        ranks = pixel_ranks(_resized(maps[p : p + pairs_per_batch].to(images.device), (h, w)))
        changed = ranks[:, None] < counts[None, :, None, None]  # (P, S + 1, H, W): the top pixels after step k
        classes = t[:, 1].repeat_interleave(steps + 1)
        for name, (inside, outside) in (("deletion", (base, image)), ("insertion", (image, base))):
            inputs = torch.where(changed[:, :, None], inside[:, None], outside[:, None]).flatten(0, 1)
            out[name].append(_scores(model, inputs, classes, score_fn, batch_size).reshape(len(t), steps + 1))
    result = {k: torch.cat(v) if v else images.new_zeros(0, steps + 1) for k, v in out.items()}
    for k in ("deletion", "insertion"):
        c = result[k]
        result[f"{k}_auc"] = (c.sum(1) - (c[:, 0] + c[:, -1]) / 2) / steps
    return result


__all__ = ["BASELINES", "average_drop_increase", "deletion_insertion", "pixel_ranks"]
