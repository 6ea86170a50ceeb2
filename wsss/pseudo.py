"""Maps -> pseudo masks: IRN's background threshold, with an optional confident fg / bg ignore band."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss.artifacts import IGNORE_INDEX


def threshold_mask(
    maps: Tensor,
    keys: Tensor,
    threshold: float,
    conf_fg: float | None = None,
    conf_bg: float | None = None,
) -> Tensor:
    """Label map from normalised CAMs.

    The plain rule is IRN's: argmax over [threshold, maps_0, ..., maps_{K-1}], ties to background, so a pixel
    is class keys[k] + 1 iff its largest map is maps_k and exceeds `threshold`. With `conf_fg` and `conf_bg`
    (IRN's cam_to_ir_label, without CRF), a pixel is foreground iff its largest map exceeds `conf_fg`,
    background iff it is at most `conf_bg`, and 255 (ignore) in between; `threshold` is then unused.

    Args:
        maps: (K, H, W) float maps in [0, 1].
        keys: (K,) int foreground class indices.
        threshold: Background score.
        conf_fg: Confident-foreground threshold (needs conf_bg).
        conf_bg: Confident-background threshold (needs conf_fg), at most conf_fg.

    Returns:
        (H, W) uint8 mask on maps' device: 0 background, keys[k] + 1 foreground, 255 ignore.
    """
    if maps.ndim != 3 or keys.ndim != 1 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"maps (K, H, W) and keys (K,) disagree: {tuple(maps.shape)} vs {tuple(keys.shape)}")
    if (conf_fg is None) != (conf_bg is None):
        raise ValueError(f"conf_fg and conf_bg go together, got conf_fg={conf_fg}, conf_bg={conf_bg}")
    if conf_fg is not None and conf_bg > conf_fg:
        raise ValueError(f"conf_bg={conf_bg} must not exceed conf_fg={conf_fg}")
    h, w = maps.shape[-2:]
    if maps.shape[0] == 0:  # no foreground class in the image
        return torch.zeros((h, w), dtype=torch.uint8, device=maps.device)
    top, arg = maps.max(dim=0)  # (H, W) each; the winning class does not depend on the threshold
    labels = (keys.to(maps.device).long() + 1)[arg].to(torch.uint8)  # (H, W)
    zero = torch.zeros((), dtype=torch.uint8, device=maps.device)
    if conf_fg is None:
        return torch.where(top > threshold, labels, zero)
    out = torch.full((h, w), IGNORE_INDEX, dtype=torch.uint8, device=maps.device)
    out = torch.where(top > conf_fg, labels, out)
    return torch.where(top <= conf_bg, zero, out)
