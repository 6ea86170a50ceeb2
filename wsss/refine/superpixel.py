"""Superpixel voting: every superpixel takes, per class, the mean score of its pixels (scikit-image segments)."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb, slic


def segments(
    image: np.ndarray, method: str = "slic", n_segments: int = 100, compactness: float = 10.0, scale: float = 100.0
) -> np.ndarray:
    """(H, W) int superpixel labels of an (H, W, 3) uint8 image: SLIC (Achanta et al. 2012) or Felzenszwalb."""
    if method == "slic":
        return slic(image, n_segments=n_segments, compactness=compactness, start_label=0)
    if method == "felzenszwalb":
        return felzenszwalb(image, scale=scale)
    raise ValueError(f"superpixel method must be 'slic' or 'felzenszwalb', got {method!r}")


def superpixel_vote(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, H, W) maps -> each pixel gets the mean of its superpixel's scores, per class (one bincount per class)."""
    flat = labels.ravel()
    n = int(flat.max()) + 1
    count = np.bincount(flat, minlength=n).astype(np.float64)
    out = np.empty_like(maps, dtype=np.float32)
    for k in range(maps.shape[0]):
        mean = np.bincount(flat, weights=maps[k].ravel().astype(np.float64), minlength=n) / np.maximum(count, 1)
        out[k] = mean[flat].reshape(labels.shape)
    return out
