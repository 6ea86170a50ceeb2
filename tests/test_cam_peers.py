"""wsss.cam against pytorch-grad-cam and torchcam, where they are right and where they are not.

pytorch-grad-cam's Grad-CAM++ adds 1e-6 to the alpha denominator ``2 g^2 + sum(A) g^3``, which dominates once
the gradients fall below ~1e-3. torchcam's Grad-CAM++ divides ``alpha[mask]`` in place, but boolean indexing
copies, so the division is lost and alpha stays ``g^2``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

try:
    import tests.cam_models as cm
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import cam_models as cm

from wsss.cam import GradCAM, GradCAMPlusPlus

pgc = pytest.importorskip("pytorch_grad_cam")
torchcam_methods = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402 (after importorskip)

RAW = {"relu": False, "normalize": False, "upsample": False}
CLASSES = torch.tensor([[0, 1, 3], [2, 3, 1]])
LAYERS = ["features", "features.1"]  # closed form, autograd


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _model(head_scale: float) -> cm.TwoConvGAP:
    model = cm.TwoConvGAP()
    with torch.no_grad():
        model.fc.weight.mul_(head_scale)
        model.fc.bias.mul_(head_scale)
    return model


def _pytorch_grad_cam(name: str, model: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) min-max normalised maps, one pytorch-grad-cam call per class column."""
    method = getattr(pgc, name)
    maps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for column in CLASSES.T:
            with method(model=model, target_layers=[model.get_submodule(layer)]) as cam:
                targets = [ClassifierOutputTarget(int(c)) for c in column]
                maps.append(torch.from_numpy(cam(input_tensor=images, targets=targets)))
    return torch.stack(maps, 1).double()


def _torchcam(name: str, model: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) raw ReLU'd torchcam maps, one call per class column."""
    maps = []
    for column in CLASSES.T:
        with getattr(torchcam_methods, name)(model, target_layer=layer) as extractor:
            scores = model(images)
            maps.append(extractor(class_idx=column.tolist(), scores=scores, normalized=False)[0].detach())
    return torch.stack(maps, 1).double()


def _max_normalised(maps: torch.Tensor) -> torch.Tensor:
    maps = maps.clamp(min=0)
    return maps / maps.amax((-2, -1), keepdim=True)


def _min_max_normalised(maps: torch.Tensor) -> torch.Tensor:
    maps = maps.clamp(min=0)
    maps = maps - maps.amin((-2, -1), keepdim=True)
    return maps / maps.amax((-2, -1), keepdim=True)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("ours", "theirs"), [(GradCAM, "GradCAM"), (GradCAMPlusPlus, "GradCAMPlusPlus")])
def test_agrees_with_pytorch_grad_cam_where_its_epsilon_is_negligible(ours, theirs, layer: str) -> None:
    model = _model(head_scale=10.0)  # gradients ~1e-1..1, so 1e-6 / 1e-7 epsilons do not matter
    images = _images(size=8)  # no downsampling: pytorch-grad-cam's cv2 resize is the identity
    _, grads = cm.reference_activations_and_grads(model, images, CLASSES, layer)
    assert float(grads.abs().max()) > 1e-1
    with ours(model, layer) as cam:
        maps = cam(images, CLASSES)  # (B, K, H, W)
    peer = _pytorch_grad_cam(theirs, model, layer, images)
    compared = 0
    for b in range(2):
        for k in range(3):
            if maps[b, k].max() == 0:  # the class is negative everywhere: both give an all-zero map
                assert peer[b, k].max() == 0
                continue
            assert cm.pearson(maps[b, k], peer[b, k]) >= 0.999
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize("layer", LAYERS)
def test_torchcam_gradcampp_alpha_defect(layer: str) -> None:
    """torchcam's maps equal alpha = g^2; ours equal the paper's alpha and differ clearly from that."""
    model = _model(head_scale=1.0)
    images = _images(size=4)
    acts, grads = cm.reference_activations_and_grads(model, images, CLASSES, layer)
    correct = cm.reference_maps("gradcampp", acts, grads).clamp(min=0)  # (B, K, h, w)
    defective_weights = (grads**2 * grads.clamp(min=0)).sum((-2, -1))  # alpha = g^2, no division
    defective = (defective_weights[..., None, None] * acts[:, None]).sum(2).clamp(min=0)
    peer = _torchcam("GradCAMpp", model, layer, images)
    torch.testing.assert_close(peer, defective, rtol=1e-4, atol=1e-6 * float(defective.abs().max()))
    with GradCAMPlusPlus(model, layer) as cam:
        ours = cam(images, CLASSES, normalize=False, upsample=False).double()
    torch.testing.assert_close(ours, correct, rtol=1e-5, atol=1e-6 * float(correct.abs().max()))
    assert float((_max_normalised(ours) - _max_normalised(defective)).abs().max()) > 0.3


SCALES = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]


@pytest.mark.parametrize("layer", LAYERS)
def test_gradcampp_over_gradient_scales(layer: str) -> None:
    """Head weights scaled by 1e-4..1e2: ours stays within 1e-5 of the float64 reference, the peers do not."""
    images = _images(size=4)
    for scale in SCALES:
        model = _model(head_scale=scale)
        acts, grads = cm.reference_activations_and_grads(model, images, CLASSES, layer)
        reference = cm.reference_maps("gradcampp", acts, grads)  # (B, K, h, w) float64, raw
        with GradCAMPlusPlus(model, layer) as cam:
            ours = cam(images, CLASSES, **RAW).double()
        relative = float((ours - reference).abs().max() / reference.abs().max())
        assert relative <= 1e-5, (scale, relative)

        pgc_deviation = float(
            (_pytorch_grad_cam("GradCAMPlusPlus", model, layer, images) - _min_max_normalised(reference)).abs().max()
        )
        torchcam_deviation = float(
            (_max_normalised(_torchcam("GradCAMpp", model, layer, images)) - _max_normalised(reference)).abs().max()
        )
        if scale <= 1e-2:  # |dS/dA| <= ~2e-3: the 1e-6 epsilon dominates 2 g^2
            assert pgc_deviation > 0.1, (scale, pgc_deviation)
        if scale >= 1.0:
            assert pgc_deviation < 5e-3, (scale, pgc_deviation)
        assert torchcam_deviation > 0.3, (scale, torchcam_deviation)
