"""Image transforms: IRN-style training augmentation (torchvision `transforms.v2`) and inference normalisation.

The training pipeline works on an image alone or jointly on an image and its label map (`tv_tensors.Mask`,
resized with nearest neighbours and padded with 255 = ignore), so the affinity and segmentation stages can use
the same augmentation as the classifier.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.artifacts import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float (..., 3, H, W), ImageNet mean/std, on the image's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


class RandomScale(v2.Transform):
    """Rescale by a factor drawn log-uniformly from `scale_range`, relative to each image's own size (IRN).

    torchvision's `RandomResize` draws an absolute shorter side instead, which would scale a 500 px VOC image
    and a 128 px one by different factors.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.log_range = (math.log(lo), math.log(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = math.exp(torch.empty(1).uniform_(*self.log_range).item())
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # bilinear without antialias (as IRN's imresize of a float image); masks go nearest automatically
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=False)


class TrainTransform:
    """IRN-style augmentation: normalise, random rescale, horizontal flip, random crop zero-padded to a square.

    Args:
        crop_size: Side of the square crop fed to the network (an image smaller than it is placed at a random
            position in the crop; the rest is 0, the mean colour after normalisation, and 255 in a mask).
        scale_range: (lo, hi) factors applied to the image side before cropping.
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.7, 1.3)) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.pipeline = v2.Compose(
            [
                v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                RandomScale(self.scale_range),
                v2.RandomHorizontalFlip(),
                v2.RandomCrop(
                    crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}
                ),
            ]
        )

    def __call__(self, image: Tensor, mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """uint8 (3, H, W) -> float (3, S, S); with a (H, W) uint8 mask, also the mask (S, S) transformed alike."""
        if mask is None:
            return self.pipeline(tv_tensors.Image(image)).as_subclass(Tensor)
        out_image, out_mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)
