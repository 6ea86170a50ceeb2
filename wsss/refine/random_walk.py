"""AffinityNet's random walk (Ahn and Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision",
CVPR 2018): propagate class maps over a graph of pixel pairs whose weights come from learned features.

For pixels i, j closer than `radius` (in the feature grid), a_ij = exp(-mean_d |f_i,d - f_j,d|) (Eq. 3 of the
paper); with a_ii = 1, A = a^beta, and the transition T = A D^-1 (each column sums to 1), the maps become
v T^t: every pixel takes a weighted average of its neighbourhood, t times (PSA: t = 2^8, beta = 8). T is
sparse (one row block per offset), so the walk costs t sparse products, batched over the classes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def radius_offsets(radius: int) -> list[tuple[int, int]]:
    """Every (dy, dx) with 0 < dy^2 + dx^2 < radius^2, both directions."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r + 1, r) for dx in range(-r + 1, r) if 0 < dy * dy + dx * dx < r * r]


def affinity_pairs(features: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs within `radius` of a (D, h, w) feature map and their affinities exp(-mean |f_i - f_j|).

    Returns:
        (from, to, affinity): flat pixel indices (P,) int64 and (P,) float, every ordered pair once.
    """
    _d, h, w = features.shape
    index = torch.arange(h * w, device=features.device).view(h, w)
    src, dst, aff = [], [], []
    for dy, dx in radius_offsets(radius):
        ys, ye = max(0, -dy), min(h, h - dy)
        xs, xe = max(0, -dx), min(w, w - dx)
        if ys >= ye or xs >= xe:
            continue
        a = features[:, ys:ye, xs:xe]
        b = features[:, ys + dy : ye + dy, xs + dx : xe + dx]
        src.append(index[ys:ye, xs:xe].reshape(-1))
        dst.append(index[ys + dy : ye + dy, xs + dx : xe + dx].reshape(-1))
        aff.append(torch.exp(-(a - b).abs().mean(0)).reshape(-1))
    return torch.cat(src), torch.cat(dst), torch.cat(aff)


def transition(features: Tensor, radius: int, beta: float) -> Tensor:
    """The (N, N) sparse transition T = A D^-1 of a (D, h, w) feature map (columns sum to 1)."""
    _, h, w = features.shape
    n = h * w
    src, dst, aff = affinity_pairs(features, radius)
    diag = torch.arange(n, device=features.device)
    rows = torch.cat([src, diag])
    cols = torch.cat([dst, diag])
    values = torch.cat([aff.pow(beta), torch.ones(n, device=features.device, dtype=aff.dtype)])
    column_sum = torch.zeros(n, device=features.device, dtype=aff.dtype).index_add_(0, cols, values)
    indices = torch.stack([rows, cols])  # in range by construction
    return torch.sparse_coo_tensor(indices, values / column_sum[cols], (n, n), check_invariants=False).coalesce()


def random_walk(maps: Tensor, features: Tensor, *, radius: int = 5, beta: float = 8.0, steps: int = 256) -> Tensor:
    """Propagate (K, h, w) maps with the walk defined by (D, h, w) features: v <- v T, `steps` times.

    Returns:
        (K, h, w) maps (float32), on the features' device.
    """
    k, h, w = maps.shape
    if features.shape[-2:] != (h, w):
        raise ValueError(f"maps {tuple(maps.shape)} and features {tuple(features.shape)} differ in size")
    t_transposed = transition(features.float(), radius, beta).t().coalesce()  # (v T)^T = T^T v^T
    v = maps.reshape(k, h * w).to(features.device, torch.float32).t()  # (N, K)
    for _ in range(steps):
        v = torch.sparse.mm(t_transposed, v)
    return v.t().reshape(k, h, w)
