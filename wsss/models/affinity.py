"""AffinityNet (Ahn and Kwak, CVPR 2018): features whose L1 distances give pixel affinities.

    x (B, 3, H, W) -> ResNet trunk -> stages 1-4 (B, C_i, H/4 .. H/32) -> 1x1 conv each to D -> upsampled to
    H/4 and summed -> ReLU -> 1x1 conv -> f (B, D, H/4, W/4);  a_ij = exp(-mean_d |f_i,d - f_j,d|)

PSA takes ResNet-38 features of three stages at 1/8; here the trunk is the classifier's own (so it can start
from the trained classifier's weights: no ImageNet weights are downloaded) and the features are at 1/4, the
resolution of the stored strided CAMs the random walk refines.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.models.classifier import Classifier
from wsss.models.io import load_network

# Output channels of stages 1-4 of each backbone.
STAGE_CHANNELS = {
    "resnet_tiny": (32, 64, 128, 256),
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class AffinityNet(nn.Module):
    """Pixel features at 1/4 resolution for affinities.

    Args:
        backbone: A key of `STAGE_CHANNELS` (the classifier's backbones).
        dim: Feature dimension D.
    """

    def __init__(self, backbone: str = "resnet_tiny", dim: int = 64) -> None:
        super().__init__()
        if backbone not in STAGE_CHANNELS:
            raise ValueError(
                f"AffinityNet has no stage widths for backbone {backbone!r}; one of {sorted(STAGE_CHANNELS)}"
            )
        self.kwargs = {"backbone": backbone, "dim": dim}
        # The classifier's trunk, built the same way (output stride 32: every stage halves the size).
        self.backbone = Classifier(1, backbone, output_stride=32).backbone
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.BatchNorm2d(dim)) for c in STAGE_CHANNELS[backbone]
        )
        self.head = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        b = self.backbone
        f1 = b.layer1(b.stem(x))  # (B, C1, H/4, W/4)
        f2 = b.layer2(f1)  # (B, C2, H/8, W/8)
        f3 = b.layer3(f2)  # (B, C3, H/16, W/16)
        f4 = b.layer4(f3)  # (B, C4, H/32, W/32)
        size = f1.shape[-2:]
        out = self.project[0](f1)
        for proj, f in zip(self.project[1:], (f2, f3, f4), strict=True):
            out = out + F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
        return self.head(out)  # (B, D, H/4, W/4)

    def init_from_classifier(self, classifier: Classifier) -> None:
        """Start the trunk from a trained classifier's (output stride restored to 32 by shape, weights unchanged)."""
        self.backbone.load_state_dict(classifier.backbone.state_dict())


def half_disk(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2, one of each +-pair (dy > 0, or dy = 0 and dx > 0)."""
    r = int(radius)
    return [
        (dy, dx)
        for dy in range(0, r)
        for dx in range(-r + 1, r)
        if 0 < dy * dy + dx * dx < r * r and (dy > 0 or dx > 0)
    ]


def affinity_loss(features: Tensor, labels: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """AffinityNet's loss (Ahn and Kwak 2018, Eqs. 5-7) over the pixel pairs closer than `radius`.

    A pair of labelled pixels (labels not 255) is a positive when both carry the same label (background or the
    same class) and a negative otherwise. With a = exp(-mean |f_i - f_j|):
    L = 1/4 mean_bg-pos(-log a) + 1/4 mean_fg-pos(-log a) + 1/2 mean_neg(-log(1 - a)) (PSA's weights).

    Args:
        features: (B, D, h, w).
        labels: (B, h, w) int labels: 0 background, c + 1 class c, 255 unlabelled.

    Returns:
        The loss and the pair counts (bg-pos, fg-pos, neg) as a (3,) tensor.
    """
    _, _, h, w = features.shape
    sums = features.new_zeros(3)
    counts = features.new_zeros(3)
    for dy, dx in half_disk(radius):
        xs, xe = max(0, -dx), min(w, w - dx)
        if dy >= h or xs >= xe:
            continue
        fa, fb = features[:, :, : h - dy, xs:xe], features[:, :, dy:, xs + dx : xe + dx]
        la, lb = labels[:, : h - dy, xs:xe], labels[:, dy:, xs + dx : xe + dx]
        aff = torch.exp(-(fa - fb).abs().mean(1))  # (B, h', w')
        valid = (la != 255) & (lb != 255)
        same = valid & (la == lb)
        masks = (same & (la == 0), same & (la > 0), valid & (la != lb))
        terms = (-torch.log(aff + 1e-5), -torch.log(aff + 1e-5), -torch.log(1 + 1e-5 - aff))
        for i, (m, t) in enumerate(zip(masks, terms, strict=True)):
            sums[i] = sums[i] + (t * m).sum()
            counts[i] = counts[i] + m.sum()
    means = sums / counts.clamp(min=1)
    return means[0] / 4 + means[1] / 4 + means[2] / 2, counts.detach()


def load_affinity(path: Path, device: torch.device) -> AffinityNet:
    """The trained AffinityNet of an affinity artifact, in eval mode on `device`."""
    return load_network(path, AffinityNet, device)
