"""wsss.cam's engine: calling convention, head detection, hooks and modes, batching, multi-scale."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torchvision
from torch import nn

try:
    import tests.cam_models as cm
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import cam_models as cm

import wsss.cam
from wsss.cam import (
    CAM,
    METHODS,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    build_cam,
    find_head_candidates,
    normalize_maps,
)

RAW = {"relu": False, "normalize": False, "upsample": False}
CLASSES = torch.tensor([[0, 3, 1], [2, 2, 0]])


def _images(batch: int = 2, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _kwargs(name: str) -> dict:
    return {"batch_size": 4} if name == "scorecam" else {}


# --------------------------------------------------------------------------------------- calling convention


def test_methods_registry() -> None:
    names = {"cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "guided_gradcam"}
    names |= {"hirescam", "ablationcam", "eigencam", "finercam"}
    assert set(METHODS) == names
    assert METHODS["gradcampp"] is GradCAMPlusPlus
    assert METHODS["guided_gradcam"] is GuidedGradCAM
    assert isinstance(build_cam("xgradcam", cm.TwoConvGAP(), "features"), XGradCAM)
    with pytest.raises(ValueError, match="unknown CAM method 'gradcam\\+\\+'"):
        build_cam("gradcam++", cm.TwoConvGAP(), "features")


def _reference_default_maps(name: str, model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str):
    """What `cam(images, classes)` must return by default, from the float64 references: ReLU, then each map
    divided by its max (an all-zero map stays zero), at the input size (this model does not downsample)."""
    m64, x64 = copy.deepcopy(model).double(), images.double()
    if name == "scorecam":
        raw = cm.reference_scorecam(m64, x64, classes, layer)
    elif name == "ablationcam":
        raw = cm.reference_ablation(m64, x64, classes, layer)
    elif name == "eigencam":
        acts, _ = cm.reference_activations_and_grads(m64, x64, classes, layer)
        raw = cm.reference_eigencam(acts)[:, None].expand(-1, classes.shape[1], -1, -1)
    elif name == "finercam":
        acts, grads = cm.reference_finer_grads(m64, x64, classes, layer)
        raw = cm.reference_maps("finercam", acts, grads)
    elif name == "guided_gradcam":
        acts, grads = cm.reference_activations_and_grads(m64, x64, classes, layer)
        raw = cm.reference_maps("gradcam", acts, grads).clamp(min=0) * cm.reference_guided_backprop(
            m64, x64, classes
        ).abs().amax(2)
    else:
        acts, grads = cm.reference_activations_and_grads(m64, x64, classes, layer)
        raw = cm.reference_maps(name, acts, grads)
    raw = raw.clamp(min=0)
    peak = raw.amax((-2, -1), keepdim=True)
    return torch.where(peak > 0, raw / peak.clamp(min=1e-300), 0.0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_default_maps_equal_the_float64_reference(name: str) -> None:
    """Default call: ReLU, max normalisation, input resolution; values from each paper's formula."""
    model = cm.TwoConvGAP()
    images = _images(size=7)
    with build_cam(name, model, model.features[1], **_kwargs(name)) as cam:  # target as a module
        maps = cam(images, CLASSES)
    expected = _reference_default_maps(name, model, images, CLASSES, "features.1").float()
    assert maps.shape == (2, 3, 7, 7)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    assert float(maps.amax((-2, -1)).max()) == pytest.approx(1.0)


def test_feature_resolution_and_bilinear_upsampling() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    images = _images(size=64)
    with GradCAM(model, "layer4") as cam:
        native = cam(images, CLASSES[:, :2] % 5, relu=True, normalize=False, upsample=False)
        up = cam(images, CLASSES[:, :2] % 5, normalize=False)
    assert native.shape == (2, 2, 2, 2)
    assert up.shape == (2, 2, 64, 64)
    expected = nn.functional.interpolate(native, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected)


def test_padding_classes_give_zero_maps() -> None:
    model = cm.TwoConvGAP()
    with GradCAMPlusPlus(model, "features.1") as cam:
        full = cam(_images(), CLASSES)
        padded = cam(_images(), torch.tensor([[0, 3, -1], [2, -1, -1]]))
    assert padded[0, 2].abs().max() == 0
    assert padded[1, 1:].abs().max() == 0
    torch.testing.assert_close(padded[0, :2], full[0, :2])
    torch.testing.assert_close(padded[1, 0], full[1, 0])


def test_input_validation() -> None:
    model = cm.TwoConvGAP()
    with GradCAM(model, "features") as cam:
        with pytest.raises(ValueError, match="classes must be an integer \\(B, K\\) tensor, got \\(2,\\)"):
            cam(_images(), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="must be \\(B, K>=1\\)"):
            cam(_images(), torch.tensor([[0], [1], [2]]))
        with pytest.raises(ValueError, match="images must be a float"):
            cam(torch.zeros(3, 6, 6), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="no module 'feature' in the model; did you mean \\['features'"):
        GradCAM(model, "feature")
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="counterfactual=True needs a gradient method"):
        CAM(model, "features", counterfactual=True)
    with pytest.raises(ValueError, match="has no closed form"):
        ScoreCAM(model, "features", fast_path=True)
    model.features[3] = model.features[1]  # a module used twice in one forward
    with GradCAM(model, "features.1") as cam, pytest.raises(ValueError, match="ran 2 times in one forward"):
        cam(_images(), CLASSES)


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        wsss.cam.BaseCAM(cm.TwoConvGAP(), "features")


def test_norm_eps_as_irn() -> None:
    maps = torch.tensor([[[[0.0, 2.0], [1.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]])
    exact = normalize_maps(maps)
    torch.testing.assert_close(exact[0, 0], maps[0, 0] / 2)
    assert exact[0, 1].abs().max() == 0  # all-zero map stays zero, no NaN
    torch.testing.assert_close(normalize_maps(maps, eps=1e-5)[0, 0], maps[0, 0] / (2 + 1e-5))


# ------------------------------------------------------------------------------------------- head detection


def test_head_detection_on_torchvision_resnet_and_project_classifier() -> None:
    resnet = torchvision.models.resnet18(weights=None, num_classes=5)
    assert find_head_candidates(resnet)[0].name == "fc"
    project = cm.ProjectClassifier(num_classes=5)
    assert find_head_candidates(project)[0].name == "head"
    images = _images(size=64)
    classes = CLASSES % 5
    for model, layer in ((resnet, "layer4"), (project, "backbone.layer4")):
        with GradCAMPlusPlus(model, layer) as cam:
            fast = cam(images, classes, **RAW)
            assert cam.last_path == "closed_form"
        with GradCAMPlusPlus(model, layer, fast_path=False) as cam:
            slow = cam(images, classes, **RAW)
            assert cam.last_path == "autograd"
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


def test_candidate_head_that_does_not_reproduce_logits_falls_back_to_autograd() -> None:
    model = cm.NotQuiteGAPHead()
    acts, grads = cm.reference_activations_and_grads(model, _images(), CLASSES, "features")
    for method in ("gradcam", "gradcampp", "cam"):
        with METHODS[method](model, "features") as cam:
            raw = cam(_images(), CLASSES, **RAW)
            assert cam.last_path == "autograd"
        expected = cm.reference_maps(method, acts, grads).float()
        torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    with (
        GradCAM(model, "features", fast_path=True) as cam,
        pytest.raises(ValueError, match=r"fast_path=True but no head maps GAP\(features\) to the logits"),
    ):
        cam(_images(), CLASSES)


def test_explicit_head_and_forced_fast_path_runs_without_autograd() -> None:
    model = cm.TwoConvGAP()
    requires_grad = []
    model.fc.register_forward_hook(lambda m, i, o: requires_grad.append(o.requires_grad))
    with GradCAM(model, "features", head=model.fc, fast_path=True) as cam:
        forced = cam(_images(), CLASSES)
        assert cam.last_path == "closed_form"
        assert requires_grad == [False]
    with GradCAM(model, "features", fast_path=False) as cam:
        torch.testing.assert_close(forced, cam(_images(), CLASSES))
    with pytest.raises(ValueError, match=r"head=ReLU is not an nn\.Linear"):
        GradCAM(model, "features", head=model.features[1])


def test_no_head_means_autograd() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).relu().mean((2, 3))  # the channels are the classes

    model = Pooled()
    with GradCAM(model, "conv") as cam:
        maps = cam(_images(), CLASSES, **RAW)
        assert cam.last_path == "autograd"
    # Class k only sees channel k: dS_k/dA_k = 1[A_k > 0] / hw, so Grad-CAM = mean(1[A_k > 0]) / hw * A_k.
    with torch.no_grad():
        a = model.conv(_images().double().to(torch.float32)).double()  # (B, C, h, w)
    hw = a.shape[-1] * a.shape[-2]
    expected = torch.stack(
        [torch.stack([(a[b, k] > 0).double().mean() / hw * a[b, k] for k in CLASSES[b].tolist()]) for b in range(2)]
    )
    torch.testing.assert_close(maps.double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- autograd path structure


def test_autograd_is_one_batched_call_that_stops_at_the_hooked_layer(monkeypatch) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    grad_calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        grad_calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    graph = {}
    for name in ("layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: graph.__setitem__(name, (i[0].requires_grad, o.requires_grad))
        )
    with LayerCAM(model, "layer3") as cam:
        cam(_images(size=64), CLASSES % 5)
    assert grad_calls == [True]  # one backward for all K = 3 classes
    assert graph["layer2"] == (False, False)  # nothing before the hooked layer is recorded
    assert graph["layer3"] == (False, False)  # its output is replaced by a fresh leaf in the hook
    assert graph["layer4"] == (True, True)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", ["gradcampp", "guided_gradcam", "scorecam"])
def test_works_under_callers_no_grad_and_inference_mode(context, name: str) -> None:
    model = cm.TwoConvGAP()
    for layer in ("features", "features.1"):
        with build_cam(name, model, layer, **_kwargs(name)) as cam:
            expected = cam(_images(), CLASSES)
            with context():
                images = _images()  # an inference tensor under inference_mode
                torch.testing.assert_close(cam(images, CLASSES), expected)


# ------------------------------------------------------------------------------------------ hooks and modes


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


class Explodes(nn.Module):
    """Raises in forward after the hooked layer ran."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features(x)
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hooks_removed_and_modes_restored_after_exception(name: str) -> None:
    model = Explodes()
    model.train()
    model.features[1].eval()
    model.fc.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"), build_cam(name, model, "features.2", **_kwargs(name)) as cam:
        cam(_images(), CLASSES)
    assert _hook_count(model) == 0
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_exception_in_with_body_propagates_and_hooks_are_gone() -> None:
    model = cm.TwoConvGAP()

    def body() -> None:
        with GuidedGradCAM(model, "features") as cam:
            cam(_images(), CLASSES)
            raise KeyError("caller's error")

    with pytest.raises(KeyError, match="caller's error"):
        body()
    assert _hook_count(model) == 0


def test_modes_restored_and_bn_statistics_untouched() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=5).train()
    model.layer1.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    running = model.bn1.running_mean.clone()
    for name in ("gradcam", "gradcampp", "guided_gradcam"):
        with build_cam(name, model, "layer3") as cam:
            cam(_images(size=32), CLASSES % 5)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model.bn1.running_mean, running)
    assert _hook_count(model) == 0


# ------------------------------------------------------------------------------------------------ Score-CAM


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_scorecam_batches_masked_inputs(batch_size: int) -> None:
    model = cm.TwoConvGAP()  # C = 5 channels at "features"
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    with ScoreCAM(model, "features", batch_size=batch_size) as cam:
        maps = cam(_images(batch=2), CLASSES, **RAW)
    channels, batch = 5, 2
    assert len(forwards) == 1 + math.ceil(batch * channels / batch_size)  # the plain forward + masked batches
    assert sum(forwards[1:]) == batch * channels
    with ScoreCAM(model, "features", batch_size=1) as cam:
        torch.testing.assert_close(maps, cam(_images(batch=2), CLASSES, **RAW))


# ----------------------------------------------------------------------------------------------- multiscale


def _float64_multiscale(model: nn.Module, images, classes, scales, flip, eps: float = 0.0):
    """IRN's recipe in float64 without wsss.cam: for each scale (and its flip), CAM = ReLU(sum_c w_kc A_c)
    from the model's own last conv features and fc weights, upsampled bilinearly to (H, W) and to
    (ceil(H/4), ceil(W/4)), summed over scales, each map divided by its max (+ eps)."""
    m64 = copy.deepcopy(model).double().eval()
    weight = m64.fc.weight.detach()  # (N, C)
    height, width = images.shape[-2:]
    strided = (math.ceil(height / 4), math.ceil(width / 4))
    high = torch.zeros(*classes.shape, height, width, dtype=torch.float64)
    low = torch.zeros(*classes.shape, *strided, dtype=torch.float64)
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        x = nn.functional.interpolate(images.double(), size=size, mode="bilinear", align_corners=False)
        for xx, unflip in ((x, False), (x.flip(-1), True)) if flip else ((x, False),):
            with torch.no_grad():
                a = m64.features(xx)  # (B, C, h, w)
            cams = torch.einsum("bkc,bchw->bkhw", weight[classes.clamp(min=0)], a).relu()
            cams = cams * (classes >= 0)[:, :, None, None]  # padding slots give zero maps
            if unflip:
                cams = cams.flip(-1)
            high += nn.functional.interpolate(cams, (height, width), mode="bilinear", align_corners=False)
            low += nn.functional.interpolate(cams, strided, mode="bilinear", align_corners=False)

    def norm(m):
        peak = m.amax((-2, -1), keepdim=True)
        return torch.where(peak > 0, m / (peak + eps), 0.0)

    return norm(high), norm(low)


@pytest.mark.parametrize("flip", [True, False])
def test_multiscale_matches_irn_recipe_with_one_forward_per_scale(flip: bool) -> None:
    model = cm.TwoConvGAP(num_classes=5)
    images = _images(batch=2, size=45, seed=4)[..., :30, :]  # (2, 3, 30, 45)
    classes = torch.tensor([[1, 4], [0, -1]])
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape))
    with CAM(model, "features", norm_eps=1e-5) as cam:
        highres, strided = cam.multiscale(images, classes, scales=(1.0, 0.5, 1.5), flip=flip)
        assert len(forwards) == 3
        assert forwards[0][0] == (4 if flip else 2)
    expected_high, expected_low = _float64_multiscale(model, images, classes, (1.0, 0.5, 1.5), flip, eps=1e-5)
    assert highres.shape == (2, 2, 30, 45)
    assert strided.shape == (2, 2, 8, 12)
    torch.testing.assert_close(highres.double(), expected_high, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(strided.double(), expected_low, rtol=1e-4, atol=1e-5)
    assert highres[1, 1].abs().max() == 0  # the padding slot


def test_multiscale_default_scales_are_irns() -> None:
    """Default scales (1.0, 0.5, 1.5, 2.0) and flip, checked against the float64 recipe computed here."""
    model = cm.TwoConvGAP()
    images = _images(size=9)
    with CAM(model, "features") as cam:
        highres, strided = cam.multiscale(images, CLASSES)
    assert highres.shape == (2, 3, 9, 9)
    assert strided.shape == (2, 3, 3, 3)
    expected_high, expected_low = _float64_multiscale(model, images, CLASSES, (1.0, 0.5, 1.5, 2.0), True)
    torch.testing.assert_close(highres.double(), expected_high, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(strided.double(), expected_low, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scales must be"):
        cam.multiscale(_images(size=9), CLASSES, scales=(1.0, -0.5))


# ------------------------------------------------------------------------------------ precision and devices


def test_float64_model_gives_float64_maps() -> None:
    model = cm.TwoConvGAP().double()
    with GradCAM(model, "features") as cam:
        maps = cam(_images().double(), CLASSES)
    assert maps.dtype == torch.float64
    torch.testing.assert_close(maps, _reference_default_maps("gradcam", model, _images(), CLASSES, "features"))


@pytest.mark.parametrize("name", ["gradcampp", "layercam"])
def test_bfloat16_autocast_on_cpu(name: str) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    images = _images(size=64)
    for layer, path in (("layer4", "closed_form"), ("layer3", "autograd")):
        with build_cam(name, model, layer) as cam:
            reference = cam(images, CLASSES % 5)
        with build_cam(name, model, layer, amp_dtype=torch.bfloat16) as cam:
            maps = cam(images, CLASSES % 5)
            assert cam.last_path == path
        assert maps.dtype == torch.float32
        assert torch.isfinite(maps).all()
        for b in range(2):
            for k in range(3):
                assert cm.pearson(maps[b, k], reference[b, k]) > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_matches_cpu(name: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    images, classes = _images(size=64), CLASSES % 5
    kwargs = {"batch_size": 256} if name == "scorecam" else {}
    with build_cam(name, model, "layer4", **kwargs) as cam:
        expected = cam(images, classes)
    model.cuda()
    with build_cam(name, model, "layer4", **kwargs) as cam:
        maps = cam(images, classes)  # images are moved to the model's device
    assert maps.device.type == "cuda"
    torch.testing.assert_close(maps.cpu(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype: torch.dtype) -> None:
    model = torchvision.models.resnet50(weights=None, num_classes=5).cuda()
    images, classes = _images(size=128).cuda(), (CLASSES % 5).cuda()
    for layer in ("layer4", "layer3"):
        with GradCAMPlusPlus(model, layer) as cam:
            reference = cam(images, classes)
        with GradCAMPlusPlus(model, layer, amp_dtype=dtype) as cam:
            maps = cam(images, classes)
        assert maps.dtype == torch.float32
        assert torch.isfinite(maps).all()
        assert cm.pearson(maps[0, 0].cpu(), reference[0, 0].cpu()) > 0.95


# ----------------------------------------------------------------------------------------------- the README


def test_module_docstring_example_runs() -> None:
    """The README / docstring example runs and returns Grad-CAM++ as the closed form computed here says."""
    match = re.search(r"```python\n(.*?)```", wsss.cam.__doc__, re.S)
    assert match is not None
    code = match.group(1)
    assert len(code.strip().splitlines()) == 5
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "wsss.cam docstring", "exec"), namespace)
    maps, model = namespace["maps"], namespace["model"]
    torch.manual_seed(0)  # replay the example's random draws: the same weights, then the same images
    torchvision.models.resnet18(weights=None)
    images = torch.rand(2, 3, 224, 224)
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach().double()))
    with torch.no_grad():
        model.eval()(images)  # CAMs are read in eval mode (the engine restores the caller's mode after)
    handle.remove()
    acts = store["a"]  # (2, 512, 7, 7)
    w = model.fc.weight.detach().double()[torch.tensor([[3, 7], [1, 2]])]  # (2, 2, 512)
    weights = w.clamp(min=0) / (2 + w * acts.mean((2, 3))[:, None])  # Grad-CAM++ at a GAP + fc head
    raw = torch.einsum("bkc,bchw->bkhw", weights, acts).relu()
    up = nn.functional.interpolate(raw, (224, 224), mode="bilinear", align_corners=False)
    expected = up / up.amax((-2, -1), keepdim=True)
    assert maps.shape == (2, 2, 224, 224)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-4, atol=1e-5)
