"""The engine's helpers: map resizing and normalisation, layer lookup, mode bookkeeping, batched gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from difflib import get_close_matches

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize (B, K, h, w) maps to ``size`` (align_corners=False); a no-op at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def normalize_maps(maps: Tensor, eps: float = 0.0) -> Tensor:
    """Divide every (b, k) map by its peak magnitude.

    With ``eps == 0`` (the default) each map is divided by exactly its max, so a non-zero ReLU'd map peaks at
    1 whatever its raw scale (Grad-CAM's maps carry a 1/(h*w) factor, Score-CAM's a softmax); an all-zero map
    stays zero instead of becoming NaN. With ``eps > 0`` it divides by ``max + eps`` as IRN does
    (``eps=1e-5``). Maps that were not ReLU'd are divided by their max absolute value and so lie in [-1, 1].

    Args:
        maps: (B, K, h, w) maps.
        eps: added to the peak before dividing; 0 selects the exact-max form.

    Returns:
        Maps of the same shape.
    """
    peak = maps.abs().amax(dim=(-2, -1), keepdim=True)  # (B, K, 1, 1)
    if eps > 0:
        return maps / (peak + eps)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def resolve_layer(model: nn.Module, target_layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Find the hooked module from a dotted path such as ``"backbone.layer4"`` or from the module itself."""
    if isinstance(target_layer, nn.Module):
        for name, module in model.named_modules():
            if module is target_layer:
                return name, module
        raise ValueError(f"target_layer {type(target_layer).__name__} is not a submodule of the model")
    if not isinstance(target_layer, str):
        raise TypeError(f"target_layer must be a dotted module path or an nn.Module, got {type(target_layer)!r}")
    try:
        return target_layer, model.get_submodule(target_layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        hint = get_close_matches(target_layer, names, n=3)
        raise ValueError(
            f"no module {target_layer!r} in the model" + (f"; did you mean {hint}?" if hint else "")
        ) from None


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for one call; the caller's modes and flags come back on any exit."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """Device of the model's first parameter (or buffer); ``default`` for a model without either."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return default if tensor is None else tensor.device


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when dtype is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def combine(weights: Tensor, activations: Tensor) -> Tensor:
    """``sum_k weights_k * A_k``: (B, K, C) or (B, K, C, h|1, w|1) weights with (B, C, h, w) activations."""
    if weights.ndim == 5 and weights.shape[-2:] == (1, 1):
        weights = weights.flatten(2)  # (B, K, C): constant in space
    if weights.ndim == 3:
        return torch.einsum("bkc,bchw->bkhw", weights, activations.to(weights.dtype))
    return (weights * activations.unsqueeze(1)).sum(2)  # (B, K, h, w)


def class_gradients(logits: Tensor, classes: Tensor, activations: Tensor, coefficients: Tensor | None = None) -> Tensor:
    """``dS[b, k] / dA[b]`` for all K classes in one vmapped backward that stops at the hooked layer.

    Samples are independent in eval mode, so the gradient of ``sum_b S[b, k]`` w.r.t. ``A[b]`` is the
    per-sample one; the K one-hot ``grad_outputs`` are batched with ``is_grads_batched`` instead of K separate
    backwards. With ``coefficients`` (B, K, N), the score k is the combination ``sum_n coefficients[b, k, n]
    logits[b, n]`` instead of one logit (FinerCAM's target against similar classes).

    Returns:
        (B, K, *activations.shape[1:]) gradients.
    """
    if coefficients is not None:
        with torch.inference_mode(False), torch.enable_grad():
            grad_outputs = coefficients.to(logits.dtype).transpose(0, 1).contiguous()  # (K, B, N)
            (grads,) = torch.autograd.grad(
                logits, activations, grad_outputs=grad_outputs, is_grads_batched=True, allow_unused=True
            )
        return used_grads(grads).transpose(0, 1)
    with torch.inference_mode(False), torch.enable_grad():  # also inside the caller's no_grad/inference_mode
        # gather saves its index for backward; a clone is never an inference tensor
        scores = logits.gather(1, classes.clone())  # (B, K)
        num = classes.shape[1]
        if num == 1:
            (grads,) = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
            return used_grads(grads).unsqueeze(1)
        one_hot = torch.eye(num, dtype=scores.dtype, device=scores.device)  # (K, K)
        grad_outputs = one_hot[:, None, :].expand(num, *scores.shape)  # (K, B, K)
        (grads,) = torch.autograd.grad(
            scores, activations, grad_outputs=grad_outputs, is_grads_batched=True, allow_unused=True
        )  # (K, B, C, h, w)
    return used_grads(grads).transpose(0, 1)


def used_grads(grads: Tensor | None) -> Tensor:
    if grads is None:
        raise ValueError("the logits do not depend on the target layer's output")
    return grads


# ------------------------------------------------------------------ token layers (ViT, Swin) as maps

Reshape = Callable[[Tensor, tuple[int, int]], Tensor]
"""(hooked output, input size (H, W)) -> (B, C, h, w): how a non-convolutional layer's output becomes maps."""


def identity_layout(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A (B, C, h, w) output as it is."""
    if x.ndim != 4:
        raise ValueError(
            f"target layer output must be a (B, C, h, w) tensor, got {tuple(x.shape)}; for tokens pass reshape="
        )
    return x


def vit_tokens(patch_size: int) -> Reshape:
    """(B, N, C) ViT tokens -> (B, C, H/p, W/p).

    The last (H/p)(W/p) tokens are the patches, row-major; the ones before them (class token, register tokens)
    are dropped.
    """

    def reshape(x: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = size[0] // patch_size, size[1] // patch_size
        if x.ndim != 3 or x.shape[1] < h * w:
            raise ValueError(f"ViT tokens must be (B, N >= {h * w}, C) for a {size} input, got {tuple(x.shape)}")
        return x[:, x.shape[1] - h * w :].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    reshape.layout = "tokens"  # where channel k lives in the raw output (AblationCAM zeroes it there)
    return reshape


def channels_last(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w, C) (Swin's stages) -> (B, C, h, w)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, h, w, C) output, got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


identity_layout.layout = "maps"
channels_last.layout = "channels_last"


def zero_channels(raw: Tensor, channels: Tensor, num_patches: int, layout: str) -> Tensor:
    """A copy of `raw` (n copies of one output, in its own layout) with channel channels[i] zeroed in copy i."""
    out = raw.clone()
    rows = torch.arange(out.shape[0], device=out.device)
    if layout == "maps":
        out[rows, channels] = 0
    elif layout == "channels_last":
        out.permute(0, 3, 1, 2)[rows, channels] = 0
    elif layout == "tokens":
        out[:, out.shape[1] - num_patches :].permute(0, 2, 1)[rows, channels] = 0
    else:
        raise ValueError(f"cannot ablate channels of a layer with layout {layout!r}")
    return out


def default_reshape(model: nn.Module, layer: nn.Module) -> Reshape:
    """The layout of `layer`'s output, from where it sits in `model`.

    Tokens inside a torchvision VisionTransformer, channels-last inside a torchvision SwinTransformer (its
    `features` and `norm`), (B, C, h, w) otherwise.
    """
    from torchvision.models import SwinTransformer, VisionTransformer

    for m in model.modules():
        inside = any(sub is layer for sub in m.modules())
        if isinstance(m, VisionTransformer) and inside and layer is not m.heads and layer is not m.conv_proj:
            return vit_tokens(m.patch_size)
        if isinstance(m, SwinTransformer) and any(sub is layer for sub in m.features.modules()):
            return channels_last
        if isinstance(m, SwinTransformer) and layer is m.norm:
            return channels_last
    return identity_layout
