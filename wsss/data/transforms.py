"""Image transforms: IRN-style training augmentation (torchvision `transforms.v2`) and inference normalisation.

Three ways to rescale a training image (`TrainTransform(resize=...)`):

| resize | draw | how | IRN's |
|---|---|---|---|
| `scale` | factor log-uniform in `scale_range` | normalised tensor, bilinear, no antialias | (wsss's default) |
| `long_side` | long side an integer uniform in `long_side` | uint8, PIL bicubic | `train_cam.py` resize_long |
| `pil_scale` | factor uniform in `scale_range` | uint8, PIL bicubic | `train_irn.py` rescale |

The PIL ones resize the uint8 image with Pillow itself before normalising, as IRN's `imutils.pil_rescale` does
(target size `round(h * s), round(w * s)`), and a label map with Pillow's nearest neighbour.

The training pipeline works on an image alone or jointly on an image and its label map (`tv_tensors.Mask`,
resized with nearest neighbours and padded with 255 = ignore), so the affinity and segmentation stages can use
the same augmentation as the classifier.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
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


RESIZES = ("scale", "long_side", "pil_scale")


def pil_resize(image: Tensor, size: tuple[int, int], nearest: bool = False) -> Tensor:
    """Resize a uint8 (3, H, W) image (Pillow bicubic) or a (H, W) label map (Pillow nearest) to `size` (h, w);
    IRN's `imutils.pil_resize`, a no-op at the same size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    array = image.numpy() if image.dim() == 2 else image.permute(1, 2, 0).numpy()
    out = Image.fromarray(np.ascontiguousarray(array)).resize(
        (size[1], size[0]), Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    )
    result = torch.from_numpy(np.asarray(out).copy())
    return result if image.dim() == 2 else result.permute(2, 0, 1).contiguous()


class PilRescale(v2.Transform):
    """IRN's PIL rescaling of a uint8 image (bicubic) and its label map (nearest), before normalisation.

    With `long_side` the image's longer side becomes an integer drawn uniformly from [lo, hi] (both included,
    `random.randint`'s range in IRN's `random_resize_long`); otherwise the factor is uniform in `scale_range`
    (IRN's `random_scale`). The size is `round(h * s), round(w * s)` as `pil_rescale` computes it.
    """

    def __init__(self, *, long_side: tuple[int, int] | None = None, scale_range: tuple[float, float] | None = None):
        super().__init__()
        if (long_side is None) == (scale_range is None):
            raise ValueError("PilRescale takes one of long_side or scale_range")
        lo, hi = long_side if long_side is not None else scale_range  # type: ignore[misc]
        if not 0 < lo <= hi:
            raise ValueError(f"range must satisfy 0 < lo <= hi, got {(lo, hi)}")
        self.long_side = None if long_side is None else (int(lo), int(hi))
        self.scale_range = None if scale_range is None else (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        if self.long_side is not None:
            s = int(torch.randint(self.long_side[0], self.long_side[1] + 1, ()).item()) / max(h, w)
        else:
            lo, hi = self.scale_range  # type: ignore[misc]
            s = lo + torch.rand(()).item() * (hi - lo)
        return {"size": (max(1, round(h * s)), max(1, round(w * s)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.Mask(pil_resize(inpt.as_subclass(Tensor), params["size"], nearest=True))
        if isinstance(inpt, tv_tensors.Image) or type(inpt) is Tensor:  # a plain tensor is the image (v2's rule)
            if inpt.dtype != torch.uint8:
                raise TypeError(f"PilRescale resizes uint8 images, got {inpt.dtype}")
            out = pil_resize(inpt.as_subclass(Tensor), params["size"])
            return tv_tensors.Image(out) if isinstance(inpt, tv_tensors.Image) else out
        return inpt


class TrainTransform:
    """IRN-style augmentation: random rescale, normalise, horizontal flip, random crop zero-padded to a square.

    Args:
        crop_size: Side of the square crop fed to the network (an image smaller than it is placed at a random
            position in the crop; the rest is 0, the mean colour after normalisation, and 255 in a mask).
        scale_range: (lo, hi) factors applied to the image side before cropping (`scale`, `pil_scale`).
        resize: `scale`, `long_side` or `pil_scale` (module docstring).
        long_side: (lo, hi) pixels of the longer side (`long_side`).
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.7, 1.3),
        *,
        resize: str = "scale",
        long_side: tuple[int, int] = (320, 640),
    ) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        to_float = [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        if resize == "scale":
            rescale = [*to_float, RandomScale(self.scale_range)]
        elif resize == "long_side":
            rescale = [PilRescale(long_side=(int(long_side[0]), int(long_side[1]))), *to_float]
        else:
            rescale = [PilRescale(scale_range=self.scale_range), *to_float]
        self.pipeline = v2.Compose(
            [
                *rescale,
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
