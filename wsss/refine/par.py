"""Pixel-adaptive refinement (Ru et al., "Learning Affinity from Attention", CVPR 2022; also ToCo, CVPR 2023).

For every pixel and its 8 neighbours at each dilation d, an RGB affinity -(|I_i - I_j| / (sigma_I w1))^2
(sigma_I the standard deviation over the neighbourhood, averaged over colour channels) and a position affinity
-(|p_i - p_j| / (sigma_p w1))^2 become weights softmax(RGB) + w2 softmax(position) over the neighbourhood; the
maps are then averaged with these weights `iterations` times. The weights sum to 1 + w2, so a constant map is
scaled by (1 + w2) per iteration: AFA refines a constant background channel alongside the classes and takes
the argmax, which is the same as dividing the refined classes by (1 + w2)^iterations and keeping the
threshold fixed, as done here. Batched over images and classes; replicate padding at the border, as AFA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The 8 neighbours of a 3 x 3 window, as (row, col) offsets in units of the dilation, in AFA's order.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """(B, C, H, W) -> (B, C, 8 * len(dilations), H, W): each pixel's dilated neighbours (replicate padding)."""
    _b, _c, h, w = x.shape
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in NEIGHBOURS:
            out.append(padded[:, :, d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, 2)


def par_refine(
    images: Tensor,
    maps: Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iterations: int = 10,
    w1: float = 0.3,
    w2: float = 0.01,
) -> Tensor:
    """Refine maps with PAR (AFA's defaults for VOC: dilations 1, 2, 4, 8, 12, 24, 10 iterations).

    Args:
        images: (B, 3, H, W) float RGB (any scale: the affinity divides by the neighbourhood's spread).
        maps: (B, K, H, W) maps in [0, 1].

    Returns:
        (B, K, H, W) refined maps, on the maps' device.
    """
    images = images.to(maps.device, torch.float32)
    nb = _neighbours(images, dilations)  # (B, 3, N, H, W)
    rgb = (nb - images.unsqueeze(2)).abs() / (nb.std(2, keepdim=True) + 1e-8) / w1
    rgb_aff = -(rgb**2).mean(1, keepdim=True)  # (B, 1, N, H, W)
    dist = torch.tensor(
        [math.hypot(dy, dx) * d for d in dilations for dy, dx in NEIGHBOURS], device=maps.device, dtype=torch.float32
    )  # (N,) distance of each neighbour
    pos_aff = -((dist / (dist.std() + 1e-8) / w1) ** 2).view(1, 1, -1, 1, 1)
    weights = F.softmax(rgb_aff, 2) + w2 * F.softmax(pos_aff, 2)  # (B, 1, N, H, W), sums to 1 + w2
    out = maps.float()
    for _ in range(iterations):
        out = (_neighbours(out, dilations) * weights).sum(2)
    return out / (1 + w2) ** iterations
