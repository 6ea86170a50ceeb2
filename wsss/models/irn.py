"""IRNet's class-boundary branch (Ahn, Cho and Kwak 2019, `net/resnet50_irn.py`) over a frozen ResNet trunk.

    x (B, 3, H, W) -> frozen trunk (eval mode, no gradient): stem (1/4), layer1 (1/4), layer2 (1/8),
    layer3 (1/16), layer4 (1/16 at stride 16) -> each: 1x1 conv to 32, GroupNorm(4, 32), upsampled by its
    stride / 4 (bilinear, by scale factor, cropped to layer1's size), ReLU -> concatenated (160) -> 1x1 conv
    with bias -> boundary logits (B, 1, H/4, W/4)

IRN's trunk is an ImageNet ResNet-50 with `strides=(2, 2, 2, 1)` (stride 16 without dilation); here it is any
ResNet of the classifier's (its ImageNet weights, or the trained classifier's trunk when there are none). The
displacement branch (instance segmentation) is not built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.models.classifier import Classifier
from wsss.models.io import load_network

# Output channels of the stem and of layers 1-4.
STAGE_CHANNELS = {
    "resnet_tiny": (32, 32, 64, 128, 256),
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "resnet101": (64, 256, 512, 1024, 2048),
}


class _Side(nn.Module):
    """One stage's side output: 1x1 conv, GroupNorm(4, 32), upsampling by `scale` (none at 1), ReLU."""

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 32, 1, bias=False)
        self.norm = nn.GroupNorm(4, 32)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        if self.scale > 1:  # nn.Upsample(scale_factor, bilinear): coordinates from the factor, not the sizes
            x = F.interpolate(x, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        return F.relu(x)


class BoundaryNet(nn.Module):
    """Boundary logits at 1/4 resolution from a frozen trunk.

    Args:
        backbone: A key of `STAGE_CHANNELS`.
        output_stride: The trunk's stride (16: layer4 at 1/16, as IRN; 32: at 1/32).
        stride_mode: How the trunk reaches it (`Classifier`'s `stride_mode`; IRN: "irn").
        weights: torchvision weights of the trunk (IRN: IMAGENET1K_V1), or None.
    """

    def __init__(
        self,
        backbone: str = "resnet_tiny",
        output_stride: int = 16,
        stride_mode: str = "dilate",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if backbone not in STAGE_CHANNELS:
            raise ValueError(f"IRNet has no stage widths for backbone {backbone!r}; one of {sorted(STAGE_CHANNELS)}")
        if output_stride not in (16, 32):
            raise ValueError(f"IRNet's trunk has output stride 16 or 32, got {output_stride}")
        self.kwargs = {"backbone": backbone, "output_stride": output_stride, "stride_mode": stride_mode}
        trunk = Classifier(1, backbone, output_stride, weights=weights, stride_mode=stride_mode, frozen_bn=True)
        self.backbone = trunk.backbone
        self.backbone.requires_grad_(False)
        scales = (1, 1, 2, 4, output_stride // 4)
        self.sides = nn.ModuleList(_Side(c, s) for c, s in zip(STAGE_CHANNELS[backbone], scales, strict=True))
        self.fuse = nn.Conv2d(160, 1, 1, bias=True)

    def train(self, mode: bool = True) -> BoundaryNet:
        """The trunk stays in eval mode (IRN's `self.backbone.eval()`)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1, ceil(H / 4), ceil(W / 4)) boundary logits."""
        b = self.backbone
        with torch.no_grad():  # IRN detaches every stage: nothing below the branch learns
            feats = [b.stem(x)]
            for name in ("layer1", "layer2", "layer3", "layer4"):
                feats.append(getattr(b, name)(feats[-1]))
        size = feats[1].shape[-2:]
        sides = [side(f)[..., : size[0], : size[1]] for side, f in zip(self.sides, feats, strict=True)]
        return self.fuse(torch.cat(sides, 1))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The branch's parameters (the trunk has none that learn)."""
        return [*self.sides.parameters(), *self.fuse.parameters()]

    def boundary(self, images: Tensor, pad_to: int | None = None) -> Tensor:
        """IRN's inference (`EdgeDisplacement`): each image and its flip, zero-padded at the bottom and right to
        `pad_to` (IRN: the training crop, 512; at least the image), the logits cropped to ceil(size / 4), the
        flip's flipped back, averaged, sigmoid.

        Args:
            images: (B, 3, H, W) normalised images of one size.

        Returns:
            (B, ceil(H / 4), ceil(W / 4)) boundary scores in [0, 1].
        """
        bsz, _, h, w = images.shape
        fh, fw = (h - 1) // 4 + 1, (w - 1) // 4 + 1
        x = torch.cat([images, images.flip(-1)])
        if pad_to is not None:
            x = F.pad(x, (0, max(pad_to, w) - w, 0, max(pad_to, h) - h))
        logits = self(x)[:, 0, :fh, :fw]
        return torch.sigmoid(logits[:bsz] / 2 + logits[bsz:].flip(-1) / 2)


def load_irn(path: Path, device: torch.device) -> BoundaryNet:
    """The trained boundary network of an irn artifact, in eval mode on `device`."""
    return load_network(path, BoundaryNet, device)
