"""IRN's inter-pixel relations (Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with
Inter-pixel Relations", CVPR 2019): relation labels from CAMs, a class-boundary map trained from them, and the
random walk whose transitions come from that map.

- **IR labels** (IRN's `step/cam_to_ir_label.py`): the argmax over [conf_fg, maps] and over [conf_bg, maps],
  each smoothed by a dense CRF over labels (`crf_label`), give a confident-foreground and a
  confident-background labelling; a pixel is its foreground class where the first has one, background where
  both say background, and 255 (no relation) elsewhere.
- **Paths** (`misc/indexing.py`): a pair of pixels (i, j) closer than the radius is joined by the grid points
  within distance 1 of the line through them, inside their bounding box; its affinity is 1 - the largest
  boundary score on that path. Training uses pairs whose source lies in IRN's window (rows [0, h - r + 1),
  columns [r - 1, w - r + 1) for radius r), so every destination is inside the crop.
- **Loss** (`net/resnet50_irn.py`, `step/train_irn.py`): -log(a) over the background and the foreground
  positive pairs (each averaged, then halved), -log(1 - a) over the negatives, the two halved; the
  displacement branch (instances) is not part of wsss.
- **Random walk** (`step/make_sem_seg_labels.py`, `indexing.propagate_to_edge`): pairs within radius 5, the
  transition of A = a^beta with a_ii = 1 (columns sum to 1), the strided maps times (1 - boundary) walked 2^8
  times, upsampled, divided by their largest value and thresholded against a constant background (0.25).
  IRN squares the dense transition matrix 8 times; wsss applies the sparse one 256 times (the same product,
  differing by float rounding only; measured in BENCHMARKS.md).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor

from wsss.refine.crf import crf_label
from wsss.refine.random_walk import pair_transition, walk


@cache
def path_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """IRN's search directions: (0, dx) for 0 < dx < r, then (dy, dx) for 0 < dy < r with dx^2 + dy^2 < r^2
    (one of each +- pair; the reverse pair has the same path)."""
    r = int(radius)
    dirs = [(0, dx) for dx in range(1, r)]
    dirs += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dx * dx + dy * dy < r * r]
    return tuple(dirs)


@cache
def path_points(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The grid points (y, x) of the bounding box of (0, 0) and (dy, dx) whose squared distance to the line
    through them is below 1 (both ends included)."""
    length_sq = dy * dy + dx * dx
    return tuple(
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq
    )


def window(h: int, w: int, radius: int) -> tuple[slice, slice]:
    """IRN's source window of an (h, w) grid: rows [0, h - r + 1), columns [r - 1, w - r + 1) for radius r."""
    f = math.ceil(radius) - 1
    return slice(0, h - f), slice(f, w - f)


def path_affinities(boundary: Tensor, radius: int) -> Tensor:
    """1 - max boundary over each pair's path, for sources in IRN's window.

    Args:
        boundary: (B, h, w) boundary scores in [0, 1].

    Returns:
        (B, P, h', w'): one map per offset of `path_offsets(radius)`, over the window's sources.
    """
    _, h, w = boundary.shape
    rows, cols = window(h, w, radius)
    h2, w2 = rows.stop - rows.start, cols.stop - cols.start
    if h2 <= 0 or w2 <= 0:
        raise ValueError(f"a {h}x{w} grid has no source pixel at radius {radius}")
    out = []
    for dy, dx in path_offsets(radius):
        peak = None
        for y, x in path_points(dy, dx):
            v = boundary[:, y : y + h2, cols.start + x : cols.start + x + w2]
            peak = v if peak is None else torch.maximum(peak, v)
        out.append(1 - peak)
    return torch.stack(out, 1)


def pair_labels(labels: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Background-positive, foreground-positive and negative pairs of (B, h, w) labels (255: none), as
    (B, P, h', w') bools over the window's sources and `path_offsets(radius)` (IRN's
    `GetAffinityLabelFromIndices`)."""
    _, h, w = labels.shape
    rows, cols = window(h, w, radius)
    h2, w2 = rows.stop - rows.start, cols.stop - cols.start
    src = labels[:, :h2, cols.start : cols.start + w2][:, None]  # (B, 1, h', w')
    dst = torch.stack(
        [labels[:, dy : dy + h2, cols.start + dx : cols.start + dx + w2] for dy, dx in path_offsets(radius)], 1
    )
    valid = (src != 255) & (dst != 255)
    same = valid & (src == dst)
    return same & (src == 0), same & (src > 0), valid & (src != dst)


def boundary_loss(boundary: Tensor, labels: Tensor, radius: int = 10) -> tuple[Tensor, Tensor]:
    """IRNet's class-boundary loss over the pairs within `radius`.

    Args:
        boundary: (B, h, w) boundary scores in [0, 1] (the sigmoid of the edge branch).
        labels: (B, h, w) relation labels at the same resolution: 0 background, c + 1 class c, 255 none.

    Returns:
        The loss (pos + neg) / 2 with pos = (bg-pos + fg-pos) / 2, each term a masked mean with IRN's 1e-5, and
        the pair counts (bg-pos, fg-pos, neg) as a (3,) tensor.
    """
    aff = path_affinities(boundary, radius)
    bg, fg, neg = (m.to(aff.dtype) for m in pair_labels(labels, radius))
    pos_loss = -torch.log(aff + 1e-5)
    neg_loss = -torch.log(1 + 1e-5 - aff)
    bg_term = (bg * pos_loss).sum() / (bg.sum() + 1e-5)
    fg_term = (fg * pos_loss).sum() / (fg.sum() + 1e-5)
    neg_term = (neg * neg_loss).sum() / (neg.sum() + 1e-5)
    counts = torch.stack([bg.sum(), fg.sum(), neg.sum()]).detach()
    return (bg_term / 2 + fg_term / 2 + neg_term) / 2, counts


def ir_label(
    image: np.ndarray,
    maps: np.ndarray,
    keys: np.ndarray,
    conf_fg: float,
    conf_bg: float,
    *,
    crf: bool = True,
) -> np.ndarray:
    """IRN's relation labels of one image.

    Args:
        image: (H, W, 3) uint8 RGB (the CRF's bilateral kernel).
        maps: (K, H, W) normalised maps of the image's classes.
        keys: (K,) class indices.
        conf_fg, conf_bg: IRN's `conf_fg_thres` and `conf_bg_thres`.
        crf: smooth both labellings with `crf_label` (IRN does; off, the thresholds alone).

    Returns:
        (H, W) uint8: 0 background, keys[k] + 1 foreground, 255 no relation.
    """
    k = len(keys)
    label_of = np.concatenate([[0], np.asarray(keys, np.int64) + 1])
    results = []
    for t in (conf_fg, conf_bg):
        padded = np.concatenate([np.full((1, *maps.shape[1:]), t, np.float32), maps.astype(np.float32)])
        index = padded.argmax(0)  # ties to the first: the threshold, as np.argmax
        if crf and k > 0:
            index = crf_label(image, index, k + 1)
        results.append(label_of[index])
    fg, bg = results
    out = fg.copy()
    out[fg == 0] = 255
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


def pair_graph(boundary: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair within `radius` of (B, h, w) boundary maps and its path affinity (pairs whose
    destination leaves the image are dropped; pixels of different images are never paired).

    Returns:
        (from, to, affinity): flat pixel indices into B * h * w and (P,) affinities.
    """
    b, h, w = boundary.shape
    index = torch.arange(b * h * w, device=boundary.device).view(b, h, w)
    src, dst, aff = [], [], []
    for dy, dx in path_offsets(radius):
        ys, ye = 0, h - dy
        xs, xe = max(0, -dx), min(w, w - dx)
        if ye <= 0 or xs >= xe:
            continue
        peak = None
        for y, x in path_points(dy, dx):
            v = boundary[:, ys + y : ye + y, xs + x : xe + x]
            peak = v if peak is None else torch.maximum(peak, v)
        a, c = index[:, ys:ye, xs:xe].reshape(-1), index[:, ys + dy : ye + dy, xs + dx : xe + dx].reshape(-1)
        value = (1 - peak).reshape(-1)
        src += [a, c]
        dst += [c, a]
        aff += [value, value]
    return torch.cat(src), torch.cat(dst), torch.cat(aff)


def boundary_walk(maps: Tensor, boundary: Tensor, *, radius: int = 5, beta: float = 10.0, steps: int = 256) -> Tensor:
    """IRN's random walk: maps times (1 - boundary), propagated `steps` times over path affinities^beta.

    Args:
        maps: (B, K, h, w) strided maps.
        boundary: (B, h, w) boundary scores in [0, 1] at the maps' resolution.

    Returns:
        (B, K, h, w) float32 walked maps (not normalised), on the boundary's device.
    """
    if maps.dim() != 4 or boundary.dim() != 3 or maps.shape[-2:] != boundary.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and boundary {tuple(boundary.shape)} do not match")
    b, k, h, w = maps.shape
    n = b * h * w
    boundary = boundary.float()
    t = pair_transition(*pair_graph(boundary, radius), n, beta)
    v = (maps.to(boundary.device, torch.float32) * (1 - boundary[:, None])).permute(0, 2, 3, 1).reshape(n, k)
    v = walk(t, v, steps)
    return v.reshape(b, h, w, k).permute(0, 3, 1, 2).contiguous()
