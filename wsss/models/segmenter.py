"""The segmentation networks the `segment` stage trains on pseudo labels (or on ground truth, the bound).

    deeplabv2:  x (B, 3, H, W) -> ResNet trunk (B, C, H/s, W/s) -> ASPP-L: 4 dilated 3x3 convs, summed
                -> (B, K+1, H/s, W/s) -> bilinear -> (B, K+1, H, W)
    deeplabv3:  the same trunk -> torchvision's DeepLabHead (ASPP 12/24/36 + image pooling, concatenated)
    lraspp:     torchvision's lraspp_mobilenet_v3_large (its own MobileNetV3 trunk; `backbone` and
                `output_stride` do not apply)

The ResNet trunk is the classifier's (`wsss.models.classifier`): the same builders, torchvision weights names
and exact a-trous output strides (8 or 16). Every network returns logits at the input's size, background
first, then the dataset's K foreground classes.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from wsss.models.classifier import BACKBONES, NATIVE_STRIDE, Classifier, freeze_batchnorm

NETWORKS = ("deeplabv2", "deeplabv3", "lraspp")
OUTPUT_STRIDES = (8, 16)
# The trunks a DeepLab head can sit on: the ResNets (dilatable to stride 8 or 16).
RESNETS = tuple(b for b in BACKBONES if b not in NATIVE_STRIDE)


class ASPPv2(nn.Module):
    """DeepLab v2's ASPP-L (Chen et al. 2017, Fig. 4): one 3x3 conv per dilation rate straight to the classes,
    the branches' logits summed. Weights N(0, 0.01), biases 0, as DeepLab v2's prototxt initialises them."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(b(x) for b in self.branches)  # (B, K+1, h, w)


def check_network(network: str, backbone: str, output_stride: int, weights: str | None) -> None:
    """Raise ValueError naming the value when a network cannot be built from these settings."""
    if network not in NETWORKS:
        raise ValueError(f"unknown segmentation network {network!r}; choose one of {NETWORKS}")
    if network == "lraspp":
        if weights is not None:
            names = [w.name for w in torchvision.models.MobileNet_V3_Large_Weights]
            if weights not in names:
                raise ValueError(f"weights={weights!r}: lraspp's MobileNetV3 trunk takes one of {names}")
        return
    if backbone not in RESNETS:
        raise ValueError(f"backbone={backbone!r}: {network} sits on a ResNet trunk, one of {RESNETS}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}: {backbone} under {network} gives 8 or 16")


class Segmenter(nn.Module):
    """A segmentation network: logits (B, K+1, H, W) for background and K classes at the input's size.

    Args:
        num_classes: K + 1 (background included).
        network: One of `NETWORKS`.
        backbone: A ResNet of `BACKBONES` (DeepLab heads).
        output_stride: 8 or 16 (DeepLab heads).
        weights: torchvision weights name of the trunk (ResNets: e.g. IMAGENET1K_V1; lraspp: MobileNetV3's).
        frozen_bn: The trunk's BatchNorms stay in eval mode in training too (DeepLab v2 keeps them fixed at the
            pretrained statistics: its batches of 10 are too small to estimate them); their affine parameters learn.
    """

    def __init__(
        self,
        num_classes: int,
        network: str = "deeplabv2",
        backbone: str = "resnet_tiny",
        output_stride: int = 16,
        weights: str | None = None,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        check_network(network, backbone, output_stride, weights)
        self.network = network
        self.frozen_bn = frozen_bn
        self.kwargs = {
            "num_classes": num_classes,
            "network": network,
            "backbone": backbone,
            "output_stride": output_stride,
            "weights": None,  # a saved network carries its trained weights: never re-download on rebuild
            "frozen_bn": frozen_bn,
        }
        if network == "lraspp":
            trunk_weights = None if weights is None else torchvision.models.MobileNet_V3_Large_Weights[weights]
            net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=trunk_weights, num_classes=num_classes
            )
            self.backbone, self.head = net.backbone, net.classifier
            self.train(self.training)
            return
        self.backbone = Classifier(1, backbone, output_stride, weights).backbone  # (B, C, H/s, W/s)
        channels = BACKBONES[backbone][1]
        self.head = ASPPv2(channels, num_classes) if network == "deeplabv2" else DeepLabHead(channels, num_classes)
        self.train(self.training)

    def train(self, mode: bool = True) -> Segmenter:
        """Set train / eval mode; with `frozen_bn` the trunk's BatchNorms stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)  # (B, C, h, w), or lraspp's {"low": ..., "high": ...}
        logits = self.head(feats)  # (B, K+1, h', w')
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K+1, H, W)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable trunk and head parameters (the head takes `head_lr_mult` times the trunk's rate)."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad]},
            {"params": [p for p in self.head.parameters() if p.requires_grad]},
        ]
