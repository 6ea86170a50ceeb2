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

- `road` (Rong et al. 2022, pytorch-grad-cam's ROAD): MoRF / LeRF score changes when the pixels above a
  percentile of the map (or of 1 - map) are removed and imputed from their neighbours (`impute`: ROAD's
  linear system, one sparse LU factorisation per image on the CPU, batched conjugate gradients on a GPU), and
  their combination (LeRF - MoRF) / 2.

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


# ROAD's noisy linear imputation (Rong et al. 2022): each removed pixel becomes the weighted mean of its 8
# neighbours (edges 1/6, corners 1/12, the weights of neighbours outside the image left out), a sparse linear
# system per image and channel, solved by `impute`: a sparse LU factorisation per image (CPU) or batched
# conjugate gradients (GPU).
ROAD_KERNEL = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
IMPUTE_SOLVERS = ("auto", "direct", "cg")


def _impute_direct(images: Tensor, removed: Tensor) -> Tensor:
    """`impute` by one sparse LU factorisation per image (scipy), its channels solved together in float64."""
    import numpy as np
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    b, c, h, w = images.shape
    x_all = images.detach().double().cpu().numpy()
    gone_all = removed.cpu().numpy()
    out = x_all.copy()
    kernel = np.array(ROAD_KERNEL)
    offsets = [(dy, dx, kernel[dy + 1, dx + 1]) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for i in range(b):
        gone = gone_all[i]
        if gone.all():
            out[i] = 0.0  # nothing known to impute from: the mean colour
            continue
        ys, xs = np.nonzero(gone)
        if not len(ys):
            continue
        index = np.full((h, w), -1, dtype=np.int64)
        index[ys, xs] = np.arange(len(ys))
        rows, cols, vals = [np.arange(len(ys))], [np.arange(len(ys))], []
        degree = np.zeros(len(ys))
        rhs = np.zeros((len(ys), c))
        for dy, dx, wt in offsets:
            ny, nx = ys + dy, xs + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            degree[inside] += wt
            k = np.nonzero(inside)[0]
            j = index[ny[k], nx[k]]
            unknown = j >= 0
            rows.append(k[unknown])
            cols.append(j[unknown])
            vals.append(np.full(int(unknown.sum()), -wt))
            known = k[~unknown]
            rhs[known] += wt * x_all[i][:, ny[known], nx[known]].T
        vals.insert(0, degree)
        a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(ys),) * 2)
        sol = splu(a).solve(rhs)  # (n, C)
        out[i][:, ys, xs] = sol.T
    return torch.from_numpy(out).to(images.device, images.dtype)


def impute(
    images: Tensor, removed: Tensor, tol: float = 1e-7, max_iter: int | None = None, solver: str = "auto"
) -> Tensor:
    """ROAD's linear imputation (noise-free) of the `removed` pixels of each image.

    Args:
        images: (B, C, H, W) float.
        removed: (B, H, W) bool, True where a pixel is imputed from its neighbours; an image with every pixel
            removed has nothing to impute from and becomes 0 (the mean colour after normalisation).
        tol: Conjugate gradients: stop when every residual is below `tol` times its right-hand side's norm
            (float64 solve).
        max_iter: Conjugate-gradient iterations at most (default 4 (H + W) + 1000).
        solver: "direct" (a sparse LU factorisation per image with scipy, every channel solved from it: the
            fast path on the CPU), "cg" (batched conjugate gradients over every image and channel at once, on
            the images' device: the path for GPUs), or "auto" (direct on the CPU, cg elsewhere).

    Returns:
        (B, C, H, W) with the removed pixels replaced by the solution of
        sum_j w_ij * (x_i - x_j) = 0 over each removed pixel's in-image neighbours j.
    """
    if solver not in IMPUTE_SOLVERS:
        raise ValueError(f"solver must be one of {IMPUTE_SOLVERS}, got {solver!r}")
    if solver == "direct" or (solver == "auto" and images.device.type == "cpu"):
        return _impute_direct(images, removed)
    b, c, h, w = images.shape
    everything = removed.flatten(1).all(1)  # nothing known to impute from: those images become 0 (the mean)
    kernel = torch.tensor(ROAD_KERNEL, dtype=torch.float64, device=images.device).view(1, 1, 3, 3)
    x = images.double().reshape(b * c, 1, h, w)
    unknown = removed[:, None].expand(b, c, h, w).reshape(b * c, 1, h, w)

    def neighbours(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, padding=1)

    degree = neighbours(torch.ones(1, 1, h, w, dtype=torch.float64, device=images.device))

    def apply(v: Tensor) -> Tensor:  # the system matrix on the unknowns (v is 0 at known pixels)
        return torch.where(unknown, degree * v - neighbours(v), 0.0)

    rhs = torch.where(unknown, neighbours(torch.where(unknown, 0.0, x)), 0.0)
    sol = torch.zeros_like(x)
    r = rhs.clone()
    d = r.clone()
    rr = (r * r).sum((1, 2, 3), keepdim=True)
    limit = (tol**2) * (rhs * rhs).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
    for _ in range(max_iter or 4 * (h + w) + 1000):
        if bool((rr <= limit).all()):
            break
        ad = apply(d)
        alpha = rr / (d * ad).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
        sol = sol + alpha * d
        r = r - alpha * ad
        rr_new = (r * r).sum((1, 2, 3), keepdim=True)
        d = r + (rr_new / rr.clamp_min(1e-300)) * d
        rr = rr_new
    out = torch.where(unknown, sol, x).reshape(b, c, h, w).to(images.dtype)
    return torch.where(everything[:, None, None, None], 0.0, out)


def _normal(
    shape: torch.Size, generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> Tensor:
    """A standard normal draw of `shape` (N, ...): from one generator, or row i from generator i of a list."""
    if not isinstance(generator, list):
        return torch.randn(shape, generator=generator, device=device)
    if not generator:
        return torch.zeros(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])


def road(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    percentiles: tuple[float, ...] = ROAD_PERCENTILES,
    noise: float = 0.0,
    score_fn: ScoreFn = torch.sigmoid,
    batch_size: int = 64,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> dict[str, Tensor]:
    """ROAD's MoRF and LeRF score changes at each percentile, batched.

    As pytorch-grad-cam's `ROADMostRelevantFirst` / `ROADLeastRelevantFirst` and their combination.

    At percentile p, MoRF removes the pixels whose map value is at least the p-th percentile of the map (numpy's
    linear definition), LeRF those whose 1 - map is; the removed pixels are imputed (`impute`, plus `noise`
    times a standard normal draw) and the change of the class score is taken (after - before). The combined
    score is (LeRF - MoRF) / 2 averaged over the percentiles (higher is better).

    `generator` draws the noise: one for every pair, or a list of one per pair, each drawing its pair's noise
    (MoRF's percentiles, then LeRF's), so a pair's values do not depend on which pairs share its call.

    Returns:
        {"morf": (N, P), "lerf": (N, P), "combined": (N,)}.
    """
    _check(images, targets, maps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(generator, list) and len(generator) != len(targets):
        raise ValueError(f"generator: one per pair needs {len(targets)} generators, got {len(generator)}")
    images, targets = images.float(), targets.long().to(images.device)
    if not len(targets):  # no pair: empty columns (torch.quantile refuses an empty input)
        empty = images.new_zeros(0, len(percentiles))
        return {"morf": empty, "lerf": empty.clone(), "combined": images.new_zeros(0)}
    classes = targets[:, 1]
    before = _scores(model, images[targets[:, 0]], classes, score_fn, batch_size)
    up = _resized(maps.to(images.device), tuple(images.shape[-2:]))
    q = torch.tensor([p / 100 for p in percentiles], dtype=torch.float64, device=images.device)
    out = {}
    for name, ranking in (("morf", up), ("lerf", 1 - up)):
        flat = ranking.double().flatten(1)
        cut = torch.quantile(flat, q, dim=1).T  # (N, P), linear interpolation as np.percentile
        changes = []
        for k in range(len(percentiles)):
            removed = ranking.double() >= cut[:, k, None, None]
            imputed = impute(images[targets[:, 0]], removed)
            if noise:
                draw = _normal(imputed.shape, generator, imputed.device)
                imputed = torch.where(removed[:, None], imputed + noise * draw, imputed)
            changes.append(_scores(model, imputed, classes, score_fn, batch_size) - before)
        out[name] = torch.stack(changes, 1)
    out["combined"] = ((out["lerf"] - out["morf"]) / 2).mean(1)
    return out


__all__ = [
    "BASELINES",
    "IMPUTE_SOLVERS",
    "ROAD_PERCENTILES",
    "average_drop_increase",
    "deletion_insertion",
    "impute",
    "pixel_ranks",
    "road",
]
