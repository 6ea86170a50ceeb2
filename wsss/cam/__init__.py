"""Class activation maps for any torchvision-style classifier: tensors in, tensors out, on the model's device.

```python
import torch, torchvision
from wsss.cam import GradCAMPlusPlus
model = torchvision.models.resnet18(weights=None)
with GradCAMPlusPlus(model, target_layer="layer4") as cam:
    maps = cam(torch.rand(2, 3, 224, 224), torch.tensor([[3, 7], [1, 2]]))  # (2, 2, 224, 224) in [0, 1]
```

Every method takes images (B, 3, H, W) and class indices (B, K) and returns (B, K, H, W) maps, ReLU'd and
divided by their max unless asked otherwise. Where the hooked layer feeds global average pooling and a linear
head (checked on every batch), CAM, Grad-CAM, Grad-CAM++, XGradCAM and LayerCAM come in closed form from one
forward; elsewhere one backward, batched over the K classes, runs from the logits down to the hooked layer
only. ``cam.multiscale(images, classes)`` gives IRN's multi-scale, flip-augmented maps. This package imports
nothing else from ``wsss`` and does no file I/O.
"""

from .base import BaseCAM
from .guided import guided_backprop
from .head import LinearHead, find_head_candidates
from .methods import (
    CAM,
    METHODS,
    AblationCAM,
    EigenCAM,
    FinerCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    build_cam,
)
from .ops import normalize_maps, resize_maps

__all__ = [
    "CAM",
    "METHODS",
    "AblationCAM",
    "BaseCAM",
    "EigenCAM",
    "FinerCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "LinearHead",
    "ScoreCAM",
    "XGradCAM",
    "build_cam",
    "find_head_candidates",
    "guided_backprop",
    "normalize_maps",
    "resize_maps",
]
