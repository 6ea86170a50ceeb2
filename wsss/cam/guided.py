"""Guided backpropagation (Springenberg et al., ICLR workshop 2015), batched over the requested classes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import autocast, class_gradients, frozen_eval, model_device


def _positive(grad: Tensor) -> Tensor:
    return grad.clamp(min=0)


def _guide(module: nn.Module, args: tuple[object, ...], output: object) -> None:
    """Forward hook on an nn.ReLU: keep only positive gradients flowing back into it.

    Springenberg et al. 2015, Fig. 1: R_i^l = (f_i^l > 0) * (R_i^{l+1} > 0) * R_i^{l+1}. ReLU's own backward
    supplies the (f > 0) factor; clamping the incoming gradient supplies (R > 0).
    """
    if isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(_positive)


def guided_backprop(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    negate: bool = False,
) -> Tensor:
    """Guided-backpropagation gradients of every requested class score with respect to the input.

    Only ``nn.ReLU`` modules are guided (functional ``F.relu`` calls are not seen). The model runs in eval
    mode with frozen parameters; modes, flags and hooks are restored on any exit.

    Args:
        model: classifier mapping (B, 3, H, W) images to (B, N) logits.
        images: (B, 3, H, W) float images.
        classes: (B, K) class indices (>= 0).
        amp_dtype: optional autocast dtype for the forward.
        negate: differentiate ``-S_c`` (the counterfactual of Grad-CAM).

    Returns:
        (B, K, 3, H, W) float32 (float64 for a float64 model) input gradients.
    """
    device = model_device(model, images.device)
    classes = classes.to(device)
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    handles = []
    try:
        with frozen_eval(model), torch.inference_mode(False):
            # a clone: the caller's images may be inference tensors, which cannot require grad
            inputs = images.detach().to(device).clone().requires_grad_(True)  # (B, 3, H, W)
            handles = [module.register_forward_hook(_guide) for module in relus]
            with torch.enable_grad(), autocast(device, amp_dtype):
                logits = model(inputs)  # (B, N)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError("the model must return (B, N) logits")
            grads = class_gradients(-logits if negate else logits, classes, inputs)  # (B, K, 3, H, W)
    finally:
        for handle in handles:
            handle.remove()
    return grads.to(torch.promote_types(images.dtype, torch.float32))
