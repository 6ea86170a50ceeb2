"""AffinityNet's random walk (Ahn and Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision",
CVPR 2018): propagate class maps over a graph of pixel pairs whose weights come from learned features.

For pixels i, j closer than `radius` (in the feature grid), a_ij = exp(-mean_d |f_i,d - f_j,d|) (Eq. 3 of the
paper); with a_ii = 1, A = a^beta, and the transition T = A D^-1 (each column sums to 1), the maps become
v T^t: every pixel takes a weighted average of its neighbourhood, t times (PSA: t = 2^8, beta = 8). T is
sparse (one row block per offset) and block-diagonal over the images of a batch, so the walk of a whole batch
costs t sparse products, over all images and classes at once.

As in PSA's `infer_aff.py`, the background walks too: its map is (1 - max_k m_k)^alpha, and the label is the
argmax over [background, maps] after the walk. PSA's alpha = 16 suits peaky ImageNet-pretrained CAMs; here the
default alpha is the one that makes the unwalked maps give exactly the threshold rule's seeds (see
`background_alpha`), so the walk alone decides what changes.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


def radius_offsets(radius: int) -> list[tuple[int, int]]:
    """Every (dy, dx) with 0 < dy^2 + dx^2 < radius^2, both directions."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r + 1, r) for dx in range(-r + 1, r) if 0 < dy * dy + dx * dx < r * r]


def affinity_pairs(features: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs within `radius` of (B, D, h, w) feature maps (or one (D, h, w)) and their affinities
    exp(-mean |f_i - f_j|); pixels of different images are never paired.

    Returns:
        (from, to, affinity): flat pixel indices into B * h * w (P,) int64 and (P,) float, every ordered pair once.
    """
    f = features if features.dim() == 4 else features[None]
    b, _d, h, w = f.shape
    index = torch.arange(b * h * w, device=f.device).view(b, h, w)
    src, dst, aff = [], [], []
    for dy, dx in radius_offsets(radius):
        ys, ye = max(0, -dy), min(h, h - dy)
        xs, xe = max(0, -dx), min(w, w - dx)
        if ys >= ye or xs >= xe:
            continue
        a = f[:, :, ys:ye, xs:xe]
        c = f[:, :, ys + dy : ye + dy, xs + dx : xe + dx]
        src.append(index[:, ys:ye, xs:xe].reshape(-1))
        dst.append(index[:, ys + dy : ye + dy, xs + dx : xe + dx].reshape(-1))
        aff.append(torch.exp(-(a - c).abs().mean(1)).reshape(-1))
    return torch.cat(src), torch.cat(dst), torch.cat(aff)


def pair_transition(src: Tensor, dst: Tensor, aff: Tensor, n: int, beta: float) -> Tensor:
    """The sparse transition T = A D^-1 (columns sum to 1) over n pixels: A = aff^beta on the ordered pairs
    (src, dst), 1 on the diagonal."""
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, diag])
    cols = torch.cat([dst, diag])
    values = torch.cat([aff.pow(beta), torch.ones(n, device=aff.device, dtype=aff.dtype)])
    column_sum = torch.zeros(n, device=aff.device, dtype=aff.dtype).index_add_(0, cols, values)
    indices = torch.stack([rows, cols])  # in range by construction
    return torch.sparse_coo_tensor(indices, values / column_sum[cols], (n, n), check_invariants=False).coalesce()


def transition(features: Tensor, radius: int, beta: float) -> Tensor:
    """The sparse transition of (B, D, h, w) features, (B h w, B h w) and block-diagonal over the images (or
    (h w, h w) for one (D, h, w) map)."""
    n = features.numel() // features.shape[-3]  # pixels over all images
    return pair_transition(*affinity_pairs(features, radius), n, beta)


def walk(t: Tensor, v: Tensor, steps: int) -> Tensor:
    """v <- v T, `steps` times, for (n, K) v: with T^T in CSR (~20x COO's products on the CPU)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        t_transposed = t.t().to_sparse_csr()  # (v T)^T = T^T v^T
    for _ in range(steps):
        v = t_transposed @ v
    return v


def random_walk(maps: Tensor, features: Tensor, *, radius: int = 5, beta: float = 8.0, steps: int = 256) -> Tensor:
    """Propagate maps with the walk defined by features: v <- v T, `steps` times.

    Args:
        maps: (B, K, h, w), or (K, h, w) for one image.
        features: (B, D, h, w), or (D, h, w), on the device the walk runs on.

    Returns:
        Maps of the input's shape (float32), on the features' device.
    """
    if maps.shape[-2:] != features.shape[-2:] or maps.dim() != features.dim() or maps.dim() not in (3, 4):
        raise ValueError(f"maps {tuple(maps.shape)} and features {tuple(features.shape)} differ in size")
    if maps.dim() == 4 and maps.shape[0] != features.shape[0]:
        raise ValueError(f"maps {tuple(maps.shape)} and features {tuple(features.shape)} differ in batch size")
    shape = maps.shape
    m = maps if maps.dim() == 4 else maps[None]
    b, k, h, w = m.shape
    v = m.to(features.device, torch.float32).permute(0, 2, 3, 1).reshape(b * h * w, k)  # (B h w, K)
    v = walk(transition(features.float(), radius, beta), v, steps)
    return v.reshape(b, h, w, k).permute(0, 3, 1, 2).reshape(shape).contiguous()


def background_alpha(threshold: float) -> float:
    """The alpha for which (1 - m)^alpha = m exactly at m = `threshold`: with a background map (1 - max_k m_k)^alpha,
    the argmax over [background, maps] is then the threshold rule (m > threshold), so an unwalked map gives the
    seeds. 1 at threshold 0.5; about 10.5 at IRN's 0.16 (PSA uses 16)."""
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise ValueError(f"background threshold must be in (0, 1) for the random walk's background, got {t}")
    return math.log(t) / math.log1p(-t)


def background_map(maps: Tensor, alpha: float) -> Tensor:
    """PSA's background score (1 - max_k m_k)^alpha of (..., K, h, w) maps, (..., h, w); 1 where K = 0."""
    if maps.shape[-3] == 0:
        return maps.new_ones(maps.shape[:-3] + maps.shape[-2:])
    return (1 - maps.amax(-3).clamp(0, 1)).pow(alpha)
