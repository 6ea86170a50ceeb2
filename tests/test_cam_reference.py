"""wsss.cam against hand-computed values and independent float64 references of each paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

try:
    import tests.cam_models as cm
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import cam_models as cm

from wsss.cam import (
    METHODS,
    AblationCAM,
    EigenCAM,
    FinerCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    ScoreCAM,
    guided_backprop,
)

RAW = {"relu": False, "normalize": False, "upsample": False}
GRADIENT_METHODS = ["cam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]

# ---------------------------------------------------------------------------------------------- hand-checked
# HandNet: A_0 = [[1, 0], [2, 1]], A_1 = [[0, 3], [1, 0]] (mean 1 each), h*w = 4, head rows w_0 = (1, -2),
# w_1 = (0.5, 1). Closed form: dS_c/dA_k = w_ck / 4 everywhere.
#   CAM       c0: A_0 - 2 A_1                      c1: 0.5 A_0 + A_1
#   Grad-CAM  = CAM / 4;  XGrad-CAM: sum(A g) / sum(A) = g, so also CAM / 4
#   Grad-CAM++ weight_k = relu(w_ck) / (2 + w_ck mean(A_k)):  c0: (1/3, 0)   c1: (0.5/2.5, 1/3) = (0.2, 1/3)
#   LayerCAM  relu(w_ck / 4):                      c0: (0.25, 0)              c1: (0.125, 0.25)
HAND = {
    "cam": [[[1.0, -6.0], [0.0, 1.0]], [[0.5, 3.0], [2.0, 0.5]]],
    "gradcam": [[[0.25, -1.5], [0.0, 0.25]], [[0.125, 0.75], [0.5, 0.125]]],
    "xgradcam": [[[0.25, -1.5], [0.0, 0.25]], [[0.125, 0.75], [0.5, 0.125]]],
    "gradcampp": [[[1 / 3, 0.0], [2 / 3, 1 / 3]], [[0.2, 1.0], [0.4 + 1 / 3, 0.2]]],
    "layercam": [[[0.25, 0.0], [0.5, 0.25]], [[0.125, 0.75], [0.5, 0.125]]],
}


@pytest.mark.parametrize("fast_path", [None, False])
@pytest.mark.parametrize("method", sorted(HAND))
def test_hand_checked_values(method: str, fast_path: bool | None) -> None:
    with METHODS[method](cm.HandNet(), "features", fast_path=fast_path) as cam:
        raw = cam(cm.HandNet.image(), torch.tensor([[0, 1]]), **RAW)
        assert cam.last_path == ("closed_form" if fast_path is None else "autograd")
    torch.testing.assert_close(raw[0], torch.tensor(HAND[method]), rtol=1e-6, atol=1e-7)


def test_hand_checked_default_is_relu_and_max_normalised() -> None:
    with GradCAM(cm.HandNet(), "features") as cam:
        maps = cam(cm.HandNet.image(), torch.tensor([[0]]), upsample=False)
    torch.testing.assert_close(maps[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_hand_checked_counterfactual() -> None:
    # negated gradients: Grad-CAM c0 -> -(A_0 - 2 A_1) / 4; Grad-CAM++ c0: relu(-w)/(2 - w mean A) = (0, 2/4)
    for fast_path in (None, False):
        with GradCAM(cm.HandNet(), "features", counterfactual=True, fast_path=fast_path) as cam:
            raw = cam(cm.HandNet.image(), torch.tensor([[0]]), **RAW)
        torch.testing.assert_close(raw[0, 0], torch.tensor([[-0.25, 1.5], [0.0, -0.25]]))
        with GradCAMPlusPlus(cm.HandNet(), "features", counterfactual=True, fast_path=fast_path) as cam:
            raw = cam(cm.HandNet.image(), torch.tensor([[0]]), **RAW)
        torch.testing.assert_close(raw[0, 0], torch.tensor([[0.0, 1.5], [0.5, 0.0]]))


def test_hand_checked_scorecam() -> None:
    # masks: s(A_0) = A_0 / 2, s(A_1) = A_1 / 3 (input size = feature size). Masked inputs give pooled
    # activations (0.75, 0.25) and (1/6, 5/6); logits c0 = p0 - 2 p1 + 0.1, c1 = 0.5 p0 + p1 - 0.3.
    s0 = (0.75 - 0.5 + 0.1, 1 / 6 - 10 / 6 + 0.1)
    s1 = (0.375 + 0.25 - 0.3, 1 / 12 + 5 / 6 - 0.3)
    a0 = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    a1 = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    expected = []
    for scores in (s0, s1):
        e = [math.exp(s) for s in scores]
        expected.append((e[0] * a0 + e[1] * a1) / sum(e))
    with ScoreCAM(cm.HandNet(), "features") as cam:
        raw = cam(cm.HandNet.image(), torch.tensor([[0, 1]]), **RAW)
    torch.testing.assert_close(raw[0], torch.stack(expected))


# ----------------------------------------------------------------------------------------- float64 references


def _images(batch: int = 2, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


CLASSES = torch.tensor([[0, 3, 1], [2, 2, 0]])


@pytest.mark.parametrize("layer", ["features", "features.1", "features.2"])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_float64_reference(method: str, layer: str) -> None:
    """Every gradient method on a float64 model equals the paper's formula, with and without closed form."""
    model = cm.TwoConvGAP().double()
    images = _images().double()
    acts, grads = cm.reference_activations_and_grads(model, images, CLASSES, layer)
    expected = cm.reference_maps(method, acts, grads)  # (B, K, h, w)
    for fast_path in (None, False):
        with METHODS[method](model, layer, fast_path=fast_path) as cam:
            raw = cam(images, CLASSES, **RAW)
            closed = layer == "features" and fast_path is None
            assert cam.last_path == ("closed_form" if closed else "autograd")
        assert raw.dtype == torch.float64
        torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_float32_model_matches_float64_reference(method: str) -> None:
    model = cm.TwoConvGAP()
    acts, grads = cm.reference_activations_and_grads(model, _images(), CLASSES, "features.1")
    expected = cm.reference_maps(method, acts, grads).float()
    with METHODS[method](model, "features.1") as cam:
        raw = cam(_images(), CLASSES, **RAW)
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_scorecam_float64_reference() -> None:
    model = cm.TwoConvGAP().double()
    images = _images().double()
    expected = cm.reference_scorecam(model, images, CLASSES, "features.1")
    with ScoreCAM(model, "features.1", batch_size=5) as cam:
        raw = cam(images, CLASSES, **RAW)
    torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)


def test_guided_backprop_float64_reference() -> None:
    model = cm.TwoConvGAP().double()
    images = _images().double()
    expected = cm.reference_guided_backprop(model, images, CLASSES)  # (B, K, 3, H, W)
    got = guided_backprop(model, images, CLASSES)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # guided backprop is not the plain input gradient on this model
    plain = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(plain)[0, 0], plain)
    assert not torch.allclose(g[0], expected[0, 0])


def test_guided_gradcam_is_upsampled_gradcam_times_guided_magnitude() -> None:
    model = cm.TwoConvGAP().double()
    images = _images(size=8).double()
    acts, grads = cm.reference_activations_and_grads(model, images, CLASSES, "features.1")
    gradcam = cm.reference_maps("gradcam", acts, grads).clamp(min=0)  # (B, K, h, w), here h = H
    guided = cm.reference_guided_backprop(model, images, CLASSES)  # (B, K, 3, H, W)
    expected = gradcam * guided.abs().amax(2)
    with GuidedGradCAM(model, "features.1") as cam:
        raw = cam(images, CLASSES, normalize=False)
        torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)
        signed = cam.saliency(images, CLASSES)
    torch.testing.assert_close(signed, gradcam.unsqueeze(2) * guided, rtol=1e-9, atol=1e-12)


def test_inplace_op_after_target_layer() -> None:
    """The hooked conv's output is ReLU'd in place downstream; activations and gradients stay correct."""
    model = cm.InplaceAfterTarget()
    classes = torch.tensor([[0, 2], [2, 1]])
    acts, grads = cm.reference_activations_and_grads(model, _images(), classes, "conv2")
    assert (acts < 0).any()  # the in-place ReLU would have changed them
    for method in ("gradcam", "gradcampp"):
        with METHODS[method](model, "conv2") as cam:
            raw = cam(_images(), classes, **RAW)
        expected = cm.reference_maps(method, acts, grads).float()
        torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_closed_form_equals_autograd_on_resnet18(method: str) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    images = _images(batch=2, size=64, seed=5)
    classes = torch.tensor([[0, 6, 3], [1, 2, 5]])
    maps = {}
    for fast_path in (None, False):
        with METHODS[method](model, "layer4", fast_path=fast_path) as cam:
            maps[fast_path] = cam(images, classes, relu=False, normalize=False)
            assert cam.last_path == ("closed_form" if fast_path is None else "autograd")
    scale = float(maps[False].abs().max())
    torch.testing.assert_close(maps[None], maps[False], rtol=1e-4, atol=1e-5 * scale)


def test_gradcampp_closed_form_weights_formula() -> None:
    """weight_k = relu(w_ck) / (2 + w_ck mean(A_k)), checked on resnet18's own fc and layer4 activations."""
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    images = _images(batch=2, size=64, seed=6)
    classes = torch.tensor([[4, 1], [0, 6]])
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    acts = store["a"].double()  # (B, C, h, w)
    w = model.fc.weight.detach().double()[classes]  # (B, K, C)
    weights = w.clamp(min=0) / (2 + w * acts.mean((2, 3))[:, None])  # (B, K, C)
    expected = torch.einsum("bkc,bchw->bkhw", weights, acts)
    with GradCAMPlusPlus(model, "layer4") as cam:
        raw = cam(images, classes, **RAW)
        assert cam.last_path == "closed_form"
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("layer", ["features", "features.1"])
def test_finercam_float64_reference(layer: str) -> None:
    """Finer-CAM on a float64 model: the score against the 3 nearest classes, closed form and autograd."""
    model = cm.TwoConvGAP(num_classes=6).double()
    images = _images().double()
    classes = torch.tensor([[0, 3, 1], [2, 5, 0]])
    acts, grads = cm.reference_finer_grads(model, images, classes, layer)
    expected = cm.reference_maps("finercam", acts, grads)
    for fast_path in (None, False):
        with FinerCAM(model, layer, fast_path=fast_path) as cam:
            raw = cam(images, classes, **RAW)
            assert cam.last_path == ("closed_form" if layer == "features" and fast_path is None else "autograd")
        torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", ["features", "features.1"])
def test_ablationcam_float64_reference(layer: str) -> None:
    """Ablation-CAM: batched ablations (and, at the GAP + fc layer, the closed form) equal one forward per
    zeroed channel."""
    model = cm.TwoConvGAP().double()
    images = _images().double()
    expected = cm.reference_ablation(model, images, CLASSES, layer)
    for fast_path in (None, False):
        with AblationCAM(model, layer, fast_path=fast_path, batch_size=3) as cam:
            raw = cam(images, CLASSES, **RAW)
            assert cam.last_path == ("closed_form" if layer == "features" and fast_path is None else "forward")
        torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", ["features", "features.1"])
def test_eigencam_float64_reference(layer: str) -> None:
    model = cm.TwoConvGAP().double()
    images = _images(size=7).double()
    acts, _ = cm.reference_activations_and_grads(model, images, CLASSES, layer)
    expected = cm.reference_eigencam(acts)  # (B, h, w)
    with EigenCAM(model, layer) as cam:
        raw = cam(images, CLASSES, **RAW)
    for k in range(CLASSES.shape[1]):  # class-agnostic: the same map for every class
        torch.testing.assert_close(raw[:, k], expected, rtol=1e-9, atol=1e-12)
    assert float((raw[:, 0] * acts.sum(1)).sum()) > 0  # the sign: correlated with the activations
