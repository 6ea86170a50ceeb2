"""Finding and verifying a GAP + linear head, and the gradient it implies in closed form.

When the hooked activations ``A`` (B, C, h, w) reach the logits only through global average pooling and a
linear map, ``s_c = sum_k w_ck * mean(A_k) + b_c``, the gradient of every class score is constant in space:
``dS_c / dA_k(i, j) = w_ck / (h * w)``. The gradient methods then need no backward pass at all. A candidate
head is trusted only after it reproduces the model's own logits on the batch at hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

HEAD_NAMES = ("head", "fc", "classifier")
"""Attribute names searched for a head, shallowest module first."""

# Modules that are the identity on a pooled (B, C) vector in eval mode.
_PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Flatten)

# Largest |head(GAP(A)) - logits| accepted, relative to max |logits|, for the least precise dtype involved.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class LinearHead:
    """A linear layer applied to the globally average pooled activations.

    Attributes:
        name: the module's dotted name in the model ("" when passed explicitly and not found in it).
        layer: the ``nn.Linear`` or 1x1 ``nn.Conv2d`` holding the weights.
    """

    name: str
    layer: nn.Linear | nn.Conv2d

    @property
    def in_channels(self) -> int:
        """Number of input channels the head expects."""
        return self.layer.in_features if isinstance(self.layer, nn.Linear) else self.layer.in_channels

    @property
    def num_classes(self) -> int:
        """Number of logits the head produces."""
        return self.layer.out_features if isinstance(self.layer, nn.Linear) else self.layer.out_channels

    def weight(self) -> Tensor:
        """The (N, C) weight matrix, read at call time so that training updates are seen."""
        return self.layer.weight.reshape(self.num_classes, self.in_channels)

    def reproduces(self, activations: Tensor, logits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Whether ``head(GAP(activations))`` equals ``logits`` on this batch, as a 0-d bool tensor.

        Args:
            activations: hooked activations, (B, C, h, w).
            logits: the model's output on the same batch, (B, N).
            dtype: the autocast dtype the model ran under, if any (loosens the tolerance).

        Returns:
            A 0-d bool tensor on the activations' device (no host sync here).
        """
        compute = torch.promote_types(activations.dtype, torch.float32)
        pooled = activations.to(compute).mean((2, 3))  # (B, C)
        bias = self.layer.bias
        predicted = F.linear(pooled, self.weight().to(compute), None if bias is None else bias.to(compute))  # (B, N)
        dtypes = [activations.dtype, logits.dtype] + ([dtype] if dtype is not None else [])
        tolerance = max(_TOLERANCE.get(d, 1e-4) for d in dtypes)
        reference = logits.to(compute)
        error = (predicted - reference).abs().amax()
        return error <= tolerance * reference.abs().amax()

    def score_gradients(
        self, classes: Tensor, spatial_size: tuple[int, int], dtype: torch.dtype, coefficients: Tensor | None = None
    ) -> Tensor:
        """The closed-form gradient ``dS_c / dA_k(i, j) = w_ck / (h * w)`` for every requested class.

        Args:
            classes: (B, K) class indices (no padding: callers clamp it away).
            spatial_size: (h, w) of the hooked activations.
            dtype: dtype of the result.
            coefficients: (B, K, N): scores that combine logits, ``S_k = sum_n c_kn y_n`` (their gradient is
                ``sum_n c_kn w_n / (h * w)``); None for one logit per class.

        Returns:
            (B, K, C, 1, 1) gradients, constant over the (h, w) positions they stand for.
        """
        h, w = spatial_size
        weight = self.weight().to(dtype)  # (N, C)
        rows = weight[classes] if coefficients is None else torch.einsum("bkn,nc->bkc", coefficients.to(dtype), weight)
        return (rows / (h * w))[..., None, None]  # (B, K, C, 1, 1)


def as_linear_head(module: nn.Module, name: str = "") -> LinearHead | None:
    """Return the module as a :class:`LinearHead` if it is one, else None.

    Accepted: ``nn.Linear``; a 1x1 ``nn.Conv2d`` with stride 1, no padding and one group; or an
    ``nn.Sequential`` holding exactly one of those plus dropout / identity / flatten layers (identities in
    eval mode).
    """
    if isinstance(module, nn.Linear):
        return LinearHead(name, module)
    if isinstance(module, nn.Conv2d):
        pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
        unpadded = module.padding in ((0, 0), "valid")
        return LinearHead(name, module) if pointwise and unpadded else None
    if isinstance(module, nn.Sequential):
        inner = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
        linear = [(n, m) for n, m in inner if not isinstance(m, _PASSTHROUGH)]
        if len(linear) == 1:
            return as_linear_head(linear[0][1], linear[0][0])
    return None


def find_head_candidates(model: nn.Module) -> list[LinearHead]:
    """Candidate heads of a classifier, most likely first; none of them is trusted before verification.

    The search takes modules named ``head``, ``fc`` or ``classifier`` (e.g. torchvision ResNet's ``fc``, the
    project's ``Classifier.head``), shallowest first, then the last linear-like module registered in the
    model.
    """
    named = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if name and name.rsplit(".", 1)[-1] in HEAD_NAMES
    ]
    candidates = [
        head for _, name, module in sorted(named, key=lambda t: t[0]) if (head := as_linear_head(module, name))
    ]
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and (head := as_linear_head(module, name)):
            last = head
    if last is not None and all(c.layer is not last.layer for c in candidates):
        candidates.append(last)
    return candidates


def explicit_head(model: nn.Module, head: nn.Module) -> LinearHead:
    """Wrap a head passed by the caller, raising ValueError if it is not a linear layer on pooled features."""
    wrapped = as_linear_head(head, next((n for n, m in model.named_modules() if m is head), ""))
    if wrapped is None:
        raise ValueError(
            f"head={type(head).__name__} is not an nn.Linear, a 1x1 nn.Conv2d, or an nn.Sequential holding "
            "one of those with dropout/identity/flatten"
        )
    return wrapped


def verified_head(
    candidates: list[LinearHead], activations: Tensor, logits: Tensor, amp_dtype: torch.dtype | None
) -> LinearHead | None:
    """The first candidate whose shape fits and which reproduces the logits on this batch, or None.

    This is the one place where the engine reads a value back to the host: one boolean per fitting candidate.
    """
    for head in candidates:
        if head.in_channels != activations.shape[1] or head.num_classes != logits.shape[1]:
            continue
        if bool(head.reproduces(activations, logits, amp_dtype)):
            return head
        logger.info("head %r does not reproduce the logits from the hooked layer; not using it", head.name)
    return None
