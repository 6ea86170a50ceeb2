"""CAMs of token layers on plain torchvision ViT and Swin (weights=None, no reshape argument), against float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsss.cam import GradCAM, HiResCAM
from wsss.cam.ops import vit_tokens


def _reference(model, layer_name: str, images: torch.Tensor, classes: torch.Tensor, to_map, method: str):
    """Float64 Grad-CAM / HiResCAM by hand: hook the layer, one backward per (image, class), reshape by hand."""
    m = copy.deepcopy(model).double().eval()
    layer = m.get_submodule(layer_name)
    out = []
    for b in range(images.shape[0]):
        store = {}

        def hook(module, args, output, store=store):
            output.retain_grad()
            store["a"] = output

        handle = layer.register_forward_hook(hook)
        logits = m(images[b : b + 1].double())
        handle.remove()
        maps = []
        for c in classes[b].tolist():
            (g,) = torch.autograd.grad(logits[0, c], store["a"], retain_graph=True)
            a, g = to_map(store["a"].detach())[0], to_map(g)[0]  # (C, h, w)
            # Grad-CAM: Selvaraju et al. 2017, Eqs. 1-2; HiResCAM: element-wise gradient times activation
            raw = (g.mean((1, 2))[:, None, None] * a).sum(0) if method == "gradcam" else (g * a).sum(0)
            up = F.interpolate(raw.relu()[None, None], images.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            maps.append(up / up.max())
        out.append(torch.stack(maps))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_vit_b_16_last_block_input_norm_equals_float64(method):
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the ViT head at zero
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[3, 10], [7, 999]])
    layer = "encoder.layers.encoder_layer_11.ln_1"
    cls = GradCAM if method == "gradcam" else HiResCAM
    with cls(model, layer) as cam:  # no reshape: found from the model
        maps = cam(images, classes)
        assert cam.last_path == "autograd"
    manual = lambda t: t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 14, 14)  # noqa: E731
    expected = _reference(model, layer, images, classes, manual, method)
    assert maps.shape == (2, 2, 224, 224)
    torch.testing.assert_close(maps.double(), expected, rtol=0, atol=1e-4)


def test_vit_last_block_output_gets_no_gradient():
    """The class token reads patch tokens only through attention: after the last block they are ignored."""
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    with GradCAM(model, "encoder.layers.encoder_layer_11") as cam:
        maps = cam(torch.randn(1, 3, 224, 224), torch.tensor([[5]]), normalize=False, relu=False)
    assert maps.abs().max() == 0


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_swin_t_last_stage_equals_float64(method):
    """The last stage's output after Swin's final LayerNorm ((B, h, w, C)), which GAP and the head read.

    Before that norm the maps are degenerate: LayerNorm makes the score invariant to scaling a position's
    features, so sum_c a_c dS/da_c = 0 there and HiResCAM is zero up to rounding.
    """
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([[1, 500], [42, 7]])
    cls = GradCAM if method == "gradcam" else HiResCAM
    with cls(model, "norm") as cam:
        maps = cam(images, classes)
        assert cam.last_path == "closed_form"  # norm -> permute -> GAP -> head: verified on the batch
    expected = _reference(model, "norm", images, classes, lambda t: t.permute(0, 3, 1, 2), method)
    assert maps.shape == (2, 2, 128, 160)
    torch.testing.assert_close(maps.double(), expected, rtol=0, atol=1e-4)


def test_a_reshape_callable_covers_other_token_models():
    """A model the engine does not know: tokens with 4 register tokens in front, and a reshape= callable."""

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.block = torch.nn.Linear(8, 8)
            self.registers = torch.nn.Parameter(torch.randn(1, 4, 8))
            self.head = torch.nn.Linear(8, 5)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, hw, 8)
            t = torch.cat([self.registers.expand(t.shape[0], -1, -1), t], 1)
            t = self.block(t).relu()
            return self.head(t[:, 4:].mean(1))

    torch.manual_seed(0)
    model = Tokens()
    images = torch.randn(2, 3, 16, 20)
    classes = torch.tensor([[0, 4], [2, 3]])
    with GradCAM(model, "block", reshape=vit_tokens(4)) as cam:
        maps = cam(images, classes)
    expected = _reference(
        model, "block", images, classes, lambda t: t[:, 4:].transpose(1, 2).reshape(t.shape[0], 8, 4, 5), "gradcam"
    )
    torch.testing.assert_close(maps.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"reshape="), GradCAM(model, "block") as cam:
        cam(images, classes)
