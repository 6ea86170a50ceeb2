"""The CAM engine: one forward, batched class gradients, and the shared post-processing.

A method subclasses :class:`BaseCAM` and overrides :meth:`BaseCAM.weights`. Everything else lives here: hooks
(registered for the duration of a call and removed in ``finally``), the train/eval mode and ``requires_grad``
bookkeeping, the closed-form fast path for GAP + linear heads, the autograd path batched over classes, ReLU,
upsampling, normalisation and the IRN multi-scale aggregation.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .head import LinearHead, explicit_head, find_head_candidates, verified_head
from .ops import (
    Reshape,
    autocast,
    class_gradients,
    combine,
    default_reshape,
    frozen_eval,
    model_device,
    normalize_maps,
    resize_maps,
    resolve_layer,
)

logger = logging.getLogger(__name__)

CAMPath = Literal["closed_form", "autograd", "forward"]
_Self = TypeVar("_Self", bound="BaseCAM")


@dataclass
class _Capture:
    """What the forward hook on the target layer records during one forward."""

    cut: bool  # start a fresh autograd graph at the hooked activation (autograd path)
    calls: int = 0
    activations: Tensor | None = None  # the layer's output as it is (maps or tokens); a leaf requiring grad when cut
    errors: list[str] = field(default_factory=list)

    def __call__(self, module: nn.Module, args: tuple[object, ...], output: object) -> Tensor | None:
        self.calls += 1
        if not isinstance(output, Tensor) or output.ndim not in (3, 4):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            self.errors.append(f"target layer output must be a (B, C, h, w) map or (B, N, C) tokens, got {shape}")
            return None
        if self.cut:
            # Detach so that the backward stops here; hand a copy downstream so that an in-place op after the
            # hooked layer (e.g. ReLU(inplace=True)) neither corrupts the activations nor trips on a leaf.
            self.activations = output.detach().requires_grad_(True)
            return self.activations.clone()
        self.activations = output.detach().clone()  # a copy: later in-place ops must not change it
        return None


class BaseCAM(ABC):
    """Class activation maps for every requested class of every image, on any torchvision-style classifier.

    Subclasses implement one function, :meth:`weights`. Use as a context manager::

        with GradCAMPlusPlus(model, target_layer="layer4") as cam:
            maps = cam(images, classes)  # (B, 3, H, W), (B, K) -> (B, K, H, W) in [0, 1]

    During a call the model is put in eval mode and its parameters stop requiring grad; both are restored when
    the call returns or raises. Hooks exist only during a call. Entries of ``classes`` below 0 are padding:
    their maps are zero, so images with different numbers of labels share one batch.

    Args:
        model: a classifier mapping (B, 3, H, W) images to (B, N) logits.
        target_layer: dotted module path (``"layer4"``, ``"backbone.layer4"``) or the module itself. It must
            run once per forward and output (B, C, h, w).
        head: the GAP + linear head that maps pooled target-layer activations to the logits. When None it is
            looked for (``head``/``fc``/``classifier`` attributes, then the last linear layer). Either way it
            is used only after it reproduces the model's logits on the call's batch.
        fast_path: None uses the closed form whenever a verified head allows it and autograd otherwise; True
            requires it (ValueError if no head verifies) and runs the forward without autograd; False always
            uses autograd.
        counterfactual: negate the gradients (Selvaraju et al. 2017, "Counterfactual Explanations") to show
            what argues against the class. Gradient methods only.
        amp_dtype: run the model under ``torch.autocast`` with this dtype
            (``torch.bfloat16``/``torch.float16``); weights and maps are still computed in float32.
        norm_eps: 0 divides each map by exactly its max (all-zero maps stay zero); IRN uses max + 1e-5.
        reshape: ``reshape(output, (H, W)) -> (B, C, h, w)`` for a layer whose output is not a (B, C, h, w)
            map (timm or DINOv2 tokens, say). None finds it for torchvision's VisionTransformer (patch tokens,
            class and register tokens dropped, the grid from the input size and the patch size) and
            SwinTransformer ((B, h, w, C) stages); other layers are taken as they are.
    """

    uses_gradients: ClassVar[bool] = True
    """Whether :meth:`weights` needs ``dS/dA``."""
    has_closed_form: ClassVar[bool] = True
    """Whether :meth:`weights` is correct when given spatially constant (B, K, C, 1, 1) gradients."""
    supports_counterfactual: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module,
        *,
        head: nn.Module | None = None,
        fast_path: bool | None = None,
        counterfactual: bool = False,
        amp_dtype: torch.dtype | None = None,
        norm_eps: float = 0.0,
        reshape: Reshape | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
        if fast_path not in (None, True, False):
            raise ValueError(f"fast_path must be None, True or False, got {fast_path!r}")
        if counterfactual and not self.supports_counterfactual:
            raise ValueError(f"counterfactual=True needs a gradient method; {type(self).__name__} is not one")
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
        if norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps!r}")
        if fast_path and not self.has_closed_form:
            raise ValueError(f"{type(self).__name__} has no closed form; fast_path=True cannot apply")
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, target_layer)
        self.reshape = reshape if reshape is not None else default_reshape(model, self.layer)
        self.heads: list[LinearHead] = [explicit_head(model, head)] if head is not None else find_head_candidates(model)
        self.fast_path = fast_path
        self.counterfactual = counterfactual
        self.amp_dtype = amp_dtype
        self.norm_eps = norm_eps
        self.last_path: CAMPath | None = None
        """Path of the last call: "closed_form", "autograd", or "forward" (no gradients: Score-CAM)."""
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ the one function a method overrides

    def score_coefficients(self, logits: Tensor, classes: Tensor) -> Tensor | None:
        """What is differentiated for class k: None for its logit, or (B, K, N) weights of a combination."""
        return None

    @abstractmethod
    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """Per-channel (or per-position) weights of the activations for every requested class.

        Args:
            activations: (B, C, h, w) hooked activations, float32 (float64 for a float64 model).
            grads: ``dS_c/dA`` for the K requested classes, (B, K, C, h, w); on the closed-form path
                (B, K, C, 1, 1), standing for a gradient constant over the h*w positions. Formulas written
                with spatial means and broadcasting serve both. None for methods that use no gradients.
            images: (B, 3, H, W) model input (Score-CAM scores masked copies of it).
            classes: (B, K) class indices, padding already clamped to 0.

        Returns:
            (B, K, C) channel weights, or (B, K, C, h, w) per-position weights; the map is
            ``sum_k weights[..., k] * A_k``.
        """

    # ------------------------------------------------------------------ public API

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove_hooks()  # normally none are left; never swallows the exception

    def __call__(
        self,
        images: Tensor,
        classes: Tensor,
        *,
        relu: bool = True,
        normalize: bool = True,
        upsample: bool = True,
    ) -> Tensor:
        """Maps for every image and every requested class.

        Args:
            images: (B, 3, H, W) float images; moved to the model's device.
            classes: (B, K) integer class indices; entries < 0 are padding and give zero maps.
            relu: apply ReLU to the maps (at feature resolution, before upsampling).
            normalize: divide each map by its max (see :func:`normalize_maps`). ``relu=False,
                normalize=False`` gives the raw maps ``sum_k weights_k * A_k``.
            upsample: bilinearly resize to (H, W); False keeps the method's own resolution, the hooked layer's
                (h, w) (the input's for Guided Grad-CAM).

        Returns:
            (B, K, H, W) maps (or (B, K, h, w)), float32 (float64 for a float64 model), on the model's device.
        """
        images, classes = self._check_inputs(images, classes)
        maps = self._native_maps(images, classes, relu=relu)  # (B, K, h, w)
        if upsample:
            maps = resize_maps(maps, tuple(images.shape[-2:]))
        return normalize_maps(maps, self.norm_eps) if normalize else maps

    def multiscale(
        self,
        images: Tensor,
        classes: Tensor,
        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        flip: bool = True,
        *,
        stride: int = 4,
        canvas_stride: int | None = None,
        scaled: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Multi-scale, flip-augmented maps as IRN computes them for pseudo-labels (Ahn et al. 2019).

        For each scale the images are resized bilinearly; the image and its horizontal flip go through one
        forward together; their ReLU'd maps (the flipped one flipped back) are resized to the output sizes and
        summed over scales; each sum is then normalised per class (see ``norm_eps``).

        Args:
            images: (B, 3, H, W) images.
            classes: (B, K) class indices (< 0: padding, zero maps).
            scales: image scale factors.
            flip: add the horizontally flipped image at every scale.
            stride: output stride of the strided maps.
            canvas_stride: None resizes each scale's maps straight to (H, W). An integer s resizes them to the
                canvas (ceil(H/s) s, ceil(W/s) s) and crops its top-left (H, W), as IRN's ``make_cam.py``
                does with s = 16 (``get_strided_up_size``).
            scaled: the batch already at each scale, one (B, 3, h_s, w_s) tensor per entry of ``scales`` (e.g.
                resized from the uint8 images with PIL bicubic, as IRN's ``make_cam.py``); None resizes
                ``images`` bilinearly on the device. ``images`` still gives the output size.

        Returns:
            ``(highres, strided)``: (B, K, H, W) and (B, K, ceil(H/stride), ceil(W/stride)) maps in [0, 1].
        """
        images, classes = self._check_inputs(images, classes)
        _check_multiscale(images, scales, stride, canvas_stride, scaled)
        batch, _, height, width = images.shape
        strided_size = (math.ceil(height / stride), math.ceil(width / stride))
        canvas = (
            (height, width)
            if canvas_stride is None
            else (math.ceil(height / canvas_stride) * canvas_stride, math.ceil(width / canvas_stride) * canvas_stride)
        )
        pair_classes = torch.cat([classes, classes]) if flip else classes  # (2B, K) or (B, K)
        highres: Tensor | None = None
        strided: Tensor | None = None
        for i, scale in enumerate(scales):
            if scaled is None:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                x = resize_maps(images, size)  # (B, 3, h_s, w_s)
            else:
                x = scaled[i].to(images.device, images.dtype)
            if flip:
                x = torch.cat([x, x.flip(-1)])  # (2B, 3, h_s, w_s): one forward for both
            maps = self._native_maps(x, pair_classes, relu=True)  # (2B, K, h, w)
            if flip:
                maps = maps[:batch] + maps[batch:].flip(-1)  # (B, K, h, w)
            up = resize_maps(maps, canvas)[..., :height, :width]  # (B, K, H, W)
            down = resize_maps(maps, strided_size)  # (B, K, ceil(H/4), ceil(W/4))
            highres = up if highres is None else highres + up
            strided = down if strided is None else strided + down
        assert highres is not None
        assert strided is not None
        return normalize_maps(highres, self.norm_eps), normalize_maps(strided, self.norm_eps)

    # ------------------------------------------------------------------ the engine

    def _native_maps(self, images: Tensor, classes: Tensor, *, relu: bool) -> Tensor:
        """Maps at the method's own resolution, padding classes zeroed: (B, K, h, w)."""
        valid = classes >= 0  # (B, K)
        index = classes.clamp(min=0)  # (B, K)
        with self._session():
            activations, grads = self._activations_and_grads(images, index)
            weights = self.weights(activations, grads, images, index)
        maps = combine(weights, activations)  # (B, K, h, w)
        if relu:
            maps = F.relu(maps)
        return maps * valid[..., None, None].to(maps.dtype)

    def _activations_and_grads(self, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor | None]:
        """One forward; returns the hooked activations (B, C, h, w) and, for gradient methods, dS/dA."""
        try_closed_form = self.has_closed_form and self.fast_path is not False and bool(self.heads)
        if self.fast_path and not self.heads:
            raise ValueError("fast_path=True but the model has no GAP + linear head candidate; pass head=")
        # Every parameter is frozen during a call, so the trunk records no graph even with grad enabled: the
        # graph starts at the hooked activation (a fresh leaf) and covers only the layers after it. Where the
        # closed form applies that is just GAP + head, kept in case the head check fails and autograd must
        # take over. fast_path=True needs no graph at all and runs under no_grad.
        cut = self.uses_gradients and not self.fast_path
        capture = _Capture(cut=cut)
        grad_mode = torch.enable_grad() if cut else torch.no_grad()
        with self._hooks(capture), torch.inference_mode(False), grad_mode, self._autocast(images.device):
            logits = self.model(images)
        raw = self._checked_activations(capture, logits)
        size = tuple(images.shape[-2:])
        activations = self.reshape(raw, size)  # (B, C, h, w)
        compute = torch.promote_types(activations.dtype, torch.float32)
        self._last_logits = logits.detach()
        coefficients = self.score_coefficients(logits.detach(), classes)
        if try_closed_form:
            head = verified_head(self.heads, activations.detach(), logits.detach(), self.amp_dtype)
            if head is not None:
                self.last_path = "closed_form"
                grads = head.score_gradients(classes, tuple(activations.shape[-2:]), compute, coefficients)
                return activations.detach().to(compute), -grads if self.counterfactual else grads
            if self.fast_path:
                raise ValueError(
                    f"fast_path=True but no head maps GAP({self.layer_name}) to the logits "
                    f"(candidates: {[h.name for h in self.heads]})"
                )
        if not self.uses_gradients:
            self.last_path = "forward"
            return activations.detach().to(compute), None
        self.last_path = "autograd"
        grads = class_gradients(logits, classes, raw, coefficients)  # (B, K, *raw.shape[1:])
        grads = self.reshape(grads.flatten(0, 1), size).unflatten(0, grads.shape[:2]).to(compute)  # (B, K, C, h, w)
        return activations.detach().to(compute), -grads if self.counterfactual else grads

    def _checked_activations(self, capture: _Capture, logits: object) -> Tensor:
        if capture.errors:
            raise ValueError(f"{self.layer_name!r}: {capture.errors[0]}")
        if capture.calls != 1 or capture.activations is None:
            raise ValueError(
                f"target layer {self.layer_name!r} ran {capture.calls} times in one forward; it must run exactly once"
            )
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the model must return (B, N) logits, got {shape}")
        return capture.activations

    def _logits(self, images: Tensor) -> Tensor:
        """Plain forward without autograd, inside a call but after the target-layer hook is gone."""
        with torch.no_grad(), self._autocast(images.device):
            return self.model(images)

    # ------------------------------------------------------------------ bookkeeping

    def _check_inputs(self, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a float (B, 3, H, W) tensor, got {shape}")
        if not isinstance(classes, Tensor) or classes.ndim != 2 or classes.is_floating_point():
            shape = tuple(classes.shape) if isinstance(classes, Tensor) else type(classes).__name__
            raise ValueError(f"classes must be an integer (B, K) tensor, got {shape}")
        if classes.shape[0] != images.shape[0] or classes.shape[1] == 0:
            raise ValueError(f"classes {tuple(classes.shape)} must be (B, K>=1) for images {tuple(images.shape)}")
        device = model_device(self.model, images.device)
        return images.to(device), classes.to(device=device, dtype=torch.long)

    def _autocast(self, device: torch.device) -> AbstractContextManager[object]:
        return autocast(device, self.amp_dtype)

    def _session(self) -> AbstractContextManager[None]:
        return frozen_eval(self.model)

    @contextmanager
    def _hooks(self, capture: _Capture) -> Iterator[_Capture]:
        """Register the target-layer hook for one forward; remove it on any exit."""
        try:
            self._handles.append(self.layer.register_forward_hook(capture))
            yield capture
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self.layer_name!r}, heads={[h.name for h in self.heads]})"


def _check_multiscale(
    images: Tensor, scales: Sequence[float], stride: int, canvas_stride: int | None, scaled: Sequence[Tensor] | None
) -> None:
    """`CAM.multiscale`'s arguments: positive scales and strides, one batch per scale in `scaled`."""
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    if stride < 1 or (canvas_stride is not None and canvas_stride < 1):
        raise ValueError(f"stride and canvas_stride must be >= 1, got {stride!r}, {canvas_stride!r}")
    if scaled is not None and (
        len(scaled) != len(scales) or any(t.dim() != 4 or t.shape[:2] != images.shape[:2] for t in scaled)
    ):
        shapes = [tuple(t.shape) for t in scaled]
        raise ValueError(f"scaled must hold one (B, 3, h, w) batch per scale {tuple(scales)}, got {shapes}")
