"""The CAM methods: each overrides :meth:`BaseCAM.weights` with its paper's formula.

Notation: ``A`` (B, C, h, w) hooked activations; ``g = dS_c/dA`` (B, K, C, h, w) the gradients of the
pre-softmax score of each requested class (on the closed-form path (B, K, C, 1, 1), a gradient constant in
space). Formulas use spatial means and broadcasting so that one expression serves both shapes; ``sum_ij`` is
written as ``h * w * mean_ij``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseCAM
from .guided import guided_backprop
from .ops import resize_maps, zero_channels


def _positions(activations: Tensor) -> int:
    h, w = activations.shape[-2:]
    return h * w


class CAM(BaseCAM):
    """CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

    With a GAP + linear head the weights are the head's weights. At a layer not followed by such a head the
    weights are ``sum_ij dS_c/dA_k(i, j)``, which equals the head weight when there is one (Selvaraju et al.
    2017, Sec. 3.1 show Grad-CAM generalises CAM this way): CAM is then Grad-CAM times h*w.
    """

    supports_counterfactual = False

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        # Zhou et al. 2016, Sec. 2: M_c(x, y) = sum_k w_k^c f_k(x, y); for s_c = sum_k w_k^c mean(f_k) + b_c,
        # w_k^c = sum_xy dS_c / df_k(x, y).
        return grads.mean((-2, -1)) * _positions(activations)  # (B, K, C)


class GradCAM(BaseCAM):
    """Grad-CAM: channel weights are the spatial mean of the class score's gradients.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    ICCV 2017, arXiv:1610.02391.
    """

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        # Selvaraju et al. 2017, Eq. 1: alpha_k^c = 1/Z sum_i sum_j dy^c / dA^k_ij
        # (Eq. 2, the map: ReLU(sum_k alpha_k^c A^k))
        return grads.mean((-2, -1))  # (B, K, C)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: positive gradients weighted per position by the paper's alpha.

    Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks", WACV 2018,
    arXiv:1710.11063, in the score-gradient form of pytorch-grad-cam.

    ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)`` is evaluated as ``1 / (2 + sum_ab A_ab g)`` for ``g != 0``:
    the same number without an epsilon and without underflow of ``g^2``, ``g^3`` at small gradient scales.
    Where the denominator is exactly 0 (``g == 0``, or ``sum_ab A_ab g == -2``) alpha is 0.

    On the closed-form path (``g = w_ck / (h w)`` everywhere) this reduces to
    ``weight_k = relu(w_ck) / (2 + w_ck * mean(A_k))`` (0 where that denominator is 0), because
    ``sum_ab A_ab g = w_ck * mean(A_k)`` and the h*w identical terms of the sum cancel the 1/(h w) of
    ``relu(g)``.
    """

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        total = activations.sum((-2, -1))[:, None, :, None, None]  # (B, 1, C, 1, 1): sum_ab A^k_ab
        # Chattopadhay et al. 2018, Eq. 19 (Y^c = exp(S^c), g = dS^c/dA^k_ij):
        #   alpha^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)  =  1 / (2 + sum_ab A^k_ab g)   for g != 0
        denominator = 2 + total * grads  # (B, K, C, h, w)
        defined = (grads != 0) & (denominator != 0)
        alpha = torch.where(defined, 1 / torch.where(defined, denominator, 1), 0)
        # Eq. 7: w_k^c = sum_ij alpha^kc_ij relu(dY^c/dA^k_ij); dY/dA = exp(S^c) g, the positive per-map
        # factor exp(S^c) is dropped (it cancels in the normalised map).
        return (alpha * F.relu(grads)).mean((-2, -1)) * _positions(activations)  # (B, K, C)


class XGradCAM(BaseCAM):
    """XGrad-CAM: gradients averaged with the activations as weights.

    Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs", BMVC 2020,
    arXiv:2008.02312. Channels whose activations sum to 0 get weight 0.
    """

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        # Fu et al. 2020, Eq. 11: alpha_k^c = sum_xy (A^k_xy / sum_ab A^k_ab) dS^c / dA^k_xy
        weighted = (activations.unsqueeze(1) * grads).mean((-2, -1))  # (B, K, C): mean_xy A g
        mean = activations.mean((-2, -1)).unsqueeze(1)  # (B, 1, C): mean_ab A
        return torch.where(mean != 0, weighted / torch.where(mean != 0, mean, 1), 0)


class LayerCAM(BaseCAM):
    """LayerCAM: a weight per channel and position, the positive gradient there.

    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization", IEEE TIP 2021.
    """

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        # Jiang et al. 2021, Eq. 5: w^kc_ij = relu(dy^c / dA^k_ij)
        # (Eqs. 6-7, the map: M^c = ReLU(sum_k w^kc_ij A^k_ij))
        return F.relu(grads)  # (B, K, C, h, w)


class ScoreCAM(BaseCAM):
    """Score-CAM: channel weights are the softmax of the class scores of the channel-masked images.

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks", CVPR
    workshops 2020, arXiv:1910.01279. No gradients.

    Every channel, upsampled to the input size and min-max normalised, masks the image; the masked images are
    scored in batches of ``batch_size`` (``ceil(B * C / batch_size)`` forwards, all K classes read from each).

    Args:
        model: see :class:`BaseCAM`.
        target_layer: see :class:`BaseCAM`.
        batch_size: masked images per forward.
        **kwargs: ``amp_dtype``, ``norm_eps`` (see :class:`BaseCAM`).
    """

    uses_gradients = False
    has_closed_form = False
    supports_counterfactual = False

    def __init__(self, model: nn.Module, target_layer: str | nn.Module, *, batch_size: int = 32, **kwargs) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        super().__init__(model, target_layer, **kwargs)
        self.batch_size = batch_size

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        batch, channels = activations.shape[:2]
        size = tuple(images.shape[-2:])
        flat = activations.flatten(0, 1)  # (B*C, h, w)
        scores = []
        for start in range(0, batch * channels, self.batch_size):
            chunk = flat[start : start + self.batch_size].unsqueeze(1)  # (n, 1, h, w)
            up = resize_maps(chunk, size)  # (n, 1, H, W)
            # Wang et al. 2020, Definition 1: H^k = s(Up(A^k)), s(M) = (M - min M) / (max M - min M);
            # a constant channel gives an all-zero mask
            low = up.amin((-2, -1), keepdim=True)
            span = up.amax((-2, -1), keepdim=True) - low
            mask = (up - low) / torch.where(span > 0, span, torch.ones_like(span))  # (n, 1, H, W)
            # (n,) index of the image each masked copy comes from
            image = torch.arange(start, start + len(chunk), device=flat.device) // channels
            logits = self._logits(images[image] * mask.to(images.dtype))  # (n, N)
            # Definition 1 (increase of confidence): C(A^k) = f^c(X o H^k) - f^c(X_b), f^c the pre-softmax
            # score; the baseline term is constant over k and cancels in the softmax below: not computed.
            scores.append(logits.gather(1, classes[image]))  # (n, K)
        per_channel = torch.cat(scores).view(batch, channels, -1).transpose(1, 2)  # (B, K, C)
        # Definition 2 with Algorithm 1: alpha_k^c = softmax_k(C(A^k)); the map is ReLU(sum_k alpha_k^c A^k)
        return torch.softmax(per_channel.to(activations.dtype), dim=-1)  # (B, K, C)


class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM: the upsampled Grad-CAM map times guided backpropagation.

    Selvaraju et al. 2017, Sec. 3, "Guided Grad-CAM"; guided backpropagation from Springenberg et al. 2015.

    Calls return (B, K, H, W) maps whose colour dimension is reduced with ``max_c |.|`` (Simonyan et al. 2014,
    Sec. 3.1); :meth:`saliency` gives the signed (B, K, 3, H, W) visualisation of the paper. Only ``nn.ReLU``
    modules are guided. ``counterfactual=True`` negates the score for both parts.
    """

    def _native_maps(self, images: Tensor, classes: Tensor, *, relu: bool) -> Tensor:
        gradcam = resize_maps(super()._native_maps(images, classes, relu=relu), tuple(images.shape[-2:]))
        guided = self._guided(images, classes)  # (B, K, 3, H, W)
        return gradcam * guided.abs().amax(2)  # (B, K, H, W)

    def saliency(self, images: Tensor, classes: Tensor) -> Tensor:
        """Signed Guided Grad-CAM, ``guided_backprop * upsample(ReLU(Grad-CAM))``, as the paper visualises it.

        Args:
            images: (B, 3, H, W) images.
            classes: (B, K) class indices (< 0: padding, zero maps).

        Returns:
            (B, K, 3, H, W) unnormalised saliency.
        """
        images, classes = self._check_inputs(images, classes)
        gradcam = resize_maps(super()._native_maps(images, classes, relu=True), tuple(images.shape[-2:]))
        return gradcam.unsqueeze(2) * self._guided(images, classes)

    def _guided(self, images: Tensor, classes: Tensor) -> Tensor:
        return guided_backprop(
            self.model, images, classes.clamp(min=0), amp_dtype=self.amp_dtype, negate=self.counterfactual
        )


class HiResCAM(BaseCAM):
    """HiResCAM: every position keeps its own gradient (no averaging), so the map is faithful to the score.

    Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional neural
    networks", arXiv:2011.08891 (2020). At a GAP + linear head the gradient is w_ck / hw everywhere, so the map
    is CAM's divided by hw: equal after max normalisation.
    """

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        assert grads is not None
        # Draelos and Carin 2020, Sec. 3.3: A~^c = sum_f (dy^c / dA^f) (.) A^f, element-wise per position
        return grads  # (B, K, C, h, w), or (B, K, C, 1, 1) in closed form


class AblationCAM(BaseCAM):
    """Ablation-CAM: a channel weighs as much as the class score drops when the channel is zeroed.

    Desai and Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via Gradient-free
    Localization", WACV 2020. The ablated forwards are batched (``batch_size`` copies of an image, each with
    another channel zeroed at the hooked layer). At a GAP + linear head the drop is exact without them:
    y^c - y^c_k = w_ck mean_ij A_k(i, j). Token and channels-last layers of torchvision's ViT and Swin are
    ablated in their own layout.
    """

    uses_gradients = False
    supports_counterfactual = False

    def __init__(self, model: nn.Module, target_layer: str | nn.Module, *, batch_size: int = 32, **kwargs) -> None:
        super().__init__(model, target_layer, **kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = batch_size

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        y = self._last_logits.gather(1, classes).to(activations.dtype)[..., None]  # (B, K, 1)
        if grads is not None:  # closed form: grads are w_ck / hw, so w_ck mean(A_k) = grads * sum_ij A_k
            drop = grads[..., 0, 0] * activations.sum((-2, -1))[:, None]  # (B, K, C)
        else:
            drop = y - self._ablated_scores(images, classes, activations.shape).to(y)
        # Desai and Ramaswamy 2020, Eq. 3: w_k^c = (y^c - y^c_k) / y^c
        return torch.where(y != 0, drop / torch.where(y != 0, y, 1), 0)

    def _ablated_scores(self, images: Tensor, classes: Tensor, shape: torch.Size) -> Tensor:
        """(B, K, C) class scores with each channel of the hooked layer zeroed in turn."""
        layout = getattr(self.reshape, "layout", None)
        batch, channels, h, w = shape
        out = torch.empty(batch, classes.shape[1], channels, device=images.device, dtype=torch.float64)
        for b in range(batch):
            for start in range(0, channels, self.batch_size):
                chosen = torch.arange(start, min(channels, start + self.batch_size), device=images.device)
                ablate = lambda module, args, output, chosen=chosen: zero_channels(output, chosen, h * w, layout)  # noqa: E731
                with self._hooks(ablate):
                    logits = self._logits(images[b : b + 1].expand(len(chosen), -1, -1, -1))  # (n, N)
                out[b, :, start : start + len(chosen)] = logits[:, classes[b]].T.double()
        return out


class EigenCAM(BaseCAM):
    """Eigen-CAM: the activations projected on their first principal direction; the same map for every class.

    Muhammad and Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020,
    arXiv:2008.00299: the map is O V_1, with V_1 the first right singular vector of the (hw, C) activation
    matrix O (uncentred, as the paper writes it; pytorch-grad-cam centres O first). The sign of a singular
    vector is arbitrary: it is chosen so that the map correlates positively with the channel sum of O.
    """

    uses_gradients = False
    has_closed_form = False
    supports_counterfactual = False

    def weights(self, activations: Tensor, grads: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        o = activations.flatten(2).transpose(1, 2)  # (B, hw, C)
        v = torch.linalg.svd(o, full_matrices=False).Vh[:, 0]  # (B, C) first right singular vector
        projection = torch.einsum("bpc,bc->bp", o, v)  # (B, hw)
        total = o.sum(2)
        corr = ((projection - projection.mean(1, keepdim=True)) * (total - total.mean(1, keepdim=True))).sum(1)
        v = v * torch.where(corr < 0, -1.0, 1.0).to(v)[:, None]
        return v[:, None, :].expand(-1, classes.shape[1], -1)  # (B, K, C): class-agnostic


class FinerCAM(GradCAM):
    """Finer-CAM: Grad-CAM of the target's logit against the logits of its most similar classes.

    Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation", CVPR 2025.
    The score is y_c - alpha sum_j p^_j y_j over the ``num_compare`` classes whose logits are closest to y_c,
    p^_j their softmax probabilities renormalised over them (as pytorch-grad-cam's FinerWeightedTarget; here
    the p^_j are constants of the score, so at a GAP + linear head it has the closed form
    (w_c - alpha sum_j p^_j w_j) / hw).
    """

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module, *, alpha: float = 1.0, num_compare: int = 3, **kwargs
    ) -> None:
        super().__init__(model, target_layer, **kwargs)
        if num_compare < 1:
            raise ValueError(f"num_compare must be >= 1, got {num_compare!r}")
        self.alpha, self.num_compare = alpha, num_compare

    def score_coefficients(self, logits: Tensor, classes: Tensor) -> Tensor:
        n = logits.shape[1]
        m = min(self.num_compare, n - 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        distance = (logits[:, None, :] - logits.gather(1, classes)[..., None]).abs()  # (B, K, N)
        distance.scatter_(2, classes[..., None], torch.inf)  # never compare a class with itself
        near = distance.topk(m, dim=2, largest=False).indices  # (B, K, m)
        p = torch.softmax(logits, -1)[:, None, :].expand(-1, classes.shape[1], -1).gather(2, near)  # (B, K, m)
        coefficients = F.one_hot(classes, n).to(logits.dtype)  # (B, K, N)
        return coefficients.scatter_add(2, near, -self.alpha * p / p.sum(-1, keepdim=True))


METHODS: dict[str, type[BaseCAM]] = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "guided_gradcam": GuidedGradCAM,
    "hirescam": HiResCAM,
    "ablationcam": AblationCAM,
    "eigencam": EigenCAM,
    "finercam": FinerCAM,
}
"""Method classes by name, as used in configs."""


def build_cam(name: str, model: nn.Module, target_layer: str | nn.Module, **kwargs) -> BaseCAM:
    """Build the CAM method called ``name`` (a key of :data:`METHODS`).

    Args:
        name: method name, e.g. ``"gradcampp"``.
        model: classifier mapping (B, 3, H, W) images to (B, N) logits.
        target_layer: dotted module path or module.
        **kwargs: keyword arguments of the method (see :class:`BaseCAM`, :class:`ScoreCAM`).

    Returns:
        The method instance, to be used as a context manager.
    """
    if name not in METHODS:
        raise ValueError(f"unknown CAM method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](model, target_layer, **kwargs)
