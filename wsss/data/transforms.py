"""Image transforms on uint8 (3, H, W) tensors: training augmentation and inference normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float (..., 3, H, W), ImageNet mean/std, on the image's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


class TrainTransform:
    """IRN-style augmentation: random rescale, horizontal flip, normalise, random crop (zero-padded) to a square.

    Args:
        crop_size: Side of the square crop fed to the network.
        scale_range: (lo, hi) factors applied to the image side before cropping.
        generator: Optional torch.Generator for reproducible draws (each DataLoader worker reseeds it).
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.7, 1.3)) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.crop_size = crop_size
        self.scale_range = (float(lo), float(hi))

    def __call__(self, image: Tensor) -> Tensor:
        lo, hi = self.scale_range
        s = math.exp(torch.empty(1).uniform_(math.log(lo), math.log(hi)).item())
        h, w = image.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(normalize(image)[None], size=size, mode="bilinear", align_corners=False)[0]
        if torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return random_crop(x, self.crop_size)


def random_crop(x: Tensor, size: int) -> Tensor:
    """Random (3, size, size) window of x, zero-padded where x is smaller (zero = the mean colour)."""
    _, h, w = x.shape
    out = x.new_zeros(3, size, size)
    # Offsets: where the crop window starts in x (if x is larger) or where x starts in the window.
    ch, cw = min(h, size), min(w, size)
    sy = int(torch.randint(0, h - ch + 1, (1,)))
    sx = int(torch.randint(0, w - cw + 1, (1,)))
    dy = int(torch.randint(0, size - ch + 1, (1,)))
    dx = int(torch.randint(0, size - cw + 1, (1,)))
    out[:, dy : dy + ch, dx : dx + cw] = x[:, sy : sy + ch, sx : sx + cw]
    return out
