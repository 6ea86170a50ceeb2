"""Tiny seeded models and independent float64 reference implementations for the wsss.cam tests.

The references follow the papers directly: one backward per (image, class) and explicit formulas, sharing no
code with ``wsss.cam``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def seeded_(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Fill every parameter with seeded N(0, scale^2) values, without touching the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module


class TwoConvGAP(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> fc: the seeded two-conv GAP model.

    ``features`` feeds GAP + ``fc`` (closed form applies); ``features.1`` and ``features.2`` need autograd.
    """

    def __init__(self, width: int = 6, channels: int = 5, num_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(channels, num_classes)
        seeded_(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))  # (B, N)


class HandNet(nn.Module):
    """Hand-checkable: ``A = ReLU(x[:, :2])`` (a fixed 1x1 conv), ``fc`` weights [[1, -2], [0.5, 1]]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[1, 1] = 1.0
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.3]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))

    @staticmethod
    def image() -> Tensor:
        """(1, 3, 2, 2): A_0 = [[1, 0], [2, 1]], A_1 = [[0, 3], [1, 0]] (means 1 and 1)."""
        return torch.tensor([[[[1.0, 0.0], [2.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]]])


class ProjectClassifier(nn.Module):
    """The shape of the project's classifier: torchvision ResNet trunk as ``backbone``, 1x1 conv ``head``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet18(weights=None)
        self.backbone = nn.Sequential()
        self.backbone.add_module("stem", nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            self.backbone.add_module(name, getattr(resnet, name))
        self.head = nn.Conv2d(512, num_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)  # (B, C, h, w)
        return self.head(feats.mean((2, 3), keepdim=True)).flatten(1)  # (B, K)


class NotQuiteGAPHead(TwoConvGAP):
    """``fc`` fits the hooked channels, but the logits are ``fc(GAP(A)) * 2 + GAP(A)[:, :1]``."""

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).mean((2, 3))
        return self.fc(pooled) * 2 + pooled[:, :1]


class InplaceAfterTarget(nn.Module):
    """The hooked conv output is modified in place by the next layer (ReLU(inplace=True))."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)
        seeded_(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


# ----------------------------------------------------------------------------------------- float64 references


def reference_activations_and_grads(
    model: nn.Module, images: Tensor, classes: Tensor, layer_name: str
) -> tuple[Tensor, Tensor]:
    """A (B, C, h, w) and dS/dA (B, K, C, h, w) in float64, one backward per (image, class)."""
    model = copy.deepcopy(model).double().eval()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # the stored activations must stay as the layer produced them
    store: dict[str, Tensor] = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(images.double())
    finally:
        handle.remove()
    acts = store["a"]
    grads = torch.zeros(classes.shape + acts.shape[1:], dtype=torch.float64)
    for b in range(classes.shape[0]):
        for k in range(classes.shape[1]):
            (g,) = torch.autograd.grad(logits[b, classes[b, k]], acts, retain_graph=True)
            grads[b, k] = g[b]
    return acts.detach(), grads


def reference_weights(method: str, acts: Tensor, grads: Tensor) -> Tensor:
    """Channel (B, K, C) or per-position (B, K, C, h, w) weights, straight from each paper."""
    h, w = acts.shape[-2:]
    a = acts[:, None]  # (B, 1, C, h, w)
    if method == "cam":  # Zhou et al.: the head weight = sum of the (constant) gradient over positions
        return grads.sum((-2, -1))
    if method == "gradcam":  # Selvaraju et al. Eq. 1
        return grads.sum((-2, -1)) / (h * w)
    if method == "gradcampp":  # Chattopadhay et al. Eq. 19 and Eq. 7, with a 0/0 -> 0 guard
        g2, g3 = grads**2, grads**3
        denominator = 2 * g2 + a.sum((-2, -1), keepdim=True) * g3
        alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
        return (alpha * grads.clamp(min=0)).sum((-2, -1))
    if method == "xgradcam":  # Fu et al.
        return (a * grads).sum((-2, -1)) / a.sum((-2, -1))
    if method == "layercam":  # Jiang et al.
        return grads.clamp(min=0)
    if method in ("hirescam", "finercam"):  # Draelos and Carin: element-wise; Finer-CAM: Grad-CAM of its score
        return grads if method == "hirescam" else grads.sum((-2, -1)) / (h * w)
    raise KeyError(method)


def reference_maps(method: str, acts: Tensor, grads: Tensor) -> Tensor:
    """Raw (un-ReLU'd, un-normalised) maps (B, K, h, w) from reference weights."""
    weights = reference_weights(method, acts, grads)
    if weights.ndim == 3:
        weights = weights[..., None, None]
    return (weights * acts[:, None]).sum(2)


def reference_scorecam(model: nn.Module, images: Tensor, classes: Tensor, layer_name: str) -> Tensor:
    """Score-CAM raw maps (B, K, h, w) in float64: one forward per (image, channel)."""
    model = copy.deepcopy(model).double().eval()
    layer = model.get_submodule(layer_name)
    store: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(images.double())
        handle.remove()
        acts = store["a"]
        batch, channels = acts.shape[:2]
        maps = torch.zeros(classes.shape + acts.shape[-2:], dtype=torch.float64)
        for b in range(batch):
            scores = torch.zeros(channels, classes.shape[1], dtype=torch.float64)
            for k in range(channels):
                up = F.interpolate(acts[b, k][None, None], images.shape[-2:], mode="bilinear")[0, 0]
                span = up.max() - up.min()
                mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
                logits = model(images[b : b + 1].double() * mask)[0]
                scores[k] = logits[classes[b]]
            for j in range(classes.shape[1]):
                alpha = torch.softmax(scores[:, j], dim=0)  # (C,)
                maps[b, j] = (alpha[:, None, None] * acts[b]).sum(0)
    return maps


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


class _GuidedReLUModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _GuidedReLU.apply(x)


def reference_guided_backprop(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """(B, K, 3, H, W) guided backprop in float64 with every nn.ReLU replaced by a guided ReLU module."""
    model = copy.deepcopy(model).double().eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _GuidedReLUModule())
    out = torch.zeros(classes.shape + images.shape[1:], dtype=torch.float64)
    for b in range(classes.shape[0]):
        for k in range(classes.shape[1]):
            x = images[b : b + 1].double().requires_grad_(True)
            (g,) = torch.autograd.grad(model(x)[0, classes[b, k]], x)
            out[b, k] = g[0]
    return out


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def reference_finer_grads(
    model: nn.Module, images: Tensor, classes: Tensor, layer_name: str, alpha: float = 1.0, m: int = 3
) -> tuple[Tensor, Tensor]:
    """A and dS/dA for Finer-CAM's score y_c - alpha sum_j p^_j y_j (the m classes with the nearest logits,
    p^ their softmax renormalised over them, held constant): numpy picks the classes, one backward each."""
    model = copy.deepcopy(model).double().eval()
    store: dict[str, Tensor] = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    try:
        logits = model(images.double())
    finally:
        handle.remove()
    acts, y = store["a"], logits.detach().numpy()
    grads = torch.zeros(classes.shape + acts.shape[1:], dtype=torch.float64)
    for b in range(classes.shape[0]):
        p = np.exp(y[b] - y[b].max()) / np.exp(y[b] - y[b].max()).sum()
        for k in range(classes.shape[1]):
            c = int(classes[b, k])
            order = [j for j in np.argsort(np.abs(y[b] - y[b, c]), kind="stable") if j != c][:m]
            w = p[order] / p[order].sum()
            score = logits[b, c] - alpha * sum(float(wj) * logits[b, j] for wj, j in zip(w, order, strict=True))
            (g,) = torch.autograd.grad(score, acts, retain_graph=True)
            grads[b, k] = g[b]
    return acts.detach(), grads


def reference_ablation(model: nn.Module, images: Tensor, classes: Tensor, layer_name: str) -> Tensor:
    """Ablation-CAM raw maps (B, K, h, w) in float64: one forward per (image, zeroed channel)."""
    model = copy.deepcopy(model).double().eval()
    layer = model.get_submodule(layer_name)
    store: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda mod, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        logits = model(images.double())
    handle.remove()
    acts = store["a"]
    out = torch.zeros(classes.shape + acts.shape[-2:], dtype=torch.float64)
    for b in range(classes.shape[0]):
        for ch in range(acts.shape[1]):

            def zero(mod, i, o, ch=ch):
                o = o.clone()
                o[:, ch] = 0
                return o

            handle = layer.register_forward_hook(zero)
            with torch.no_grad():
                ablated = model(images[b : b + 1].double())[0]
            handle.remove()
            for k in range(classes.shape[1]):
                c = int(classes[b, k])
                weight = (logits[b, c] - ablated[c]) / logits[b, c]  # Desai and Ramaswamy Eq. 3
                out[b, k] += weight * acts[b, ch]
    return out


def reference_eigencam(acts: Tensor) -> Tensor:
    """Eigen-CAM raw maps (B, h, w): O V_1 with numpy's SVD of the uncentred (hw, C) matrix, sign to correlate
    positively with the channel sum."""
    out = []
    for a in acts.double().numpy():
        o = a.reshape(a.shape[0], -1).T  # (hw, C)
        v = np.linalg.svd(o, full_matrices=False)[2][0]
        proj = o @ v
        if np.corrcoef(proj, o.sum(1))[0, 1] < 0:
            proj = -proj
        out.append(proj.reshape(a.shape[1:]))
    return torch.tensor(np.stack(out))
