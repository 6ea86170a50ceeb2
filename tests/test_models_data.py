"""Model shapes and checkpoints; the synthetic set: VOC layout, determinism, and that it is not a toy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from wsss.artifacts import read_mask, voc_colormap
from wsss.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec, ensure_synthetic, render
from wsss.data.voc import VOCSource
from wsss.models import Classifier, load_checkpoint, save_checkpoint


@pytest.mark.parametrize(
    ("backbone", "os_", "feat"),
    [("resnet_tiny", 16, 4), ("resnet_tiny", 8, 8), ("resnet18", 32, 2), ("resnet18", 16, 4)],
)
def test_classifier_shapes(backbone, os_, feat):
    model = Classifier(5, backbone, os_).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.backbone(x).shape[-2:] == (feat, feat)
    assert model(x).shape == (2, 5)
    assert model.head.bias is None


def test_classifier_is_gap_then_linear():
    model = Classifier(4).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.backbone(x)
    expected = feats.mean((2, 3)) @ model.head.weight[:, :, 0, 0].T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_roundtrip(tmp_path):
    model = Classifier(3, "resnet_tiny", 8).eval()
    save_checkpoint(tmp_path / "m.pt", model, ["a", "b", "c"])
    loaded, names = load_checkpoint(tmp_path / "m.pt", ["a", "b", "c"])
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    assert names == ["a", "b", "c"]
    assert loaded.kwargs["output_stride"] == 8
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c'\].*\['a', 'b'\]"):
        load_checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unknown_weights_and_backbone_errors():
    with pytest.raises(ValueError, match="resnet_tiny has no pretrained weights"):
        Classifier(2, "resnet_tiny", weights=ResNet18_Weights.IMAGENET1K_V1.name)
    with pytest.raises(ValueError, match="unknown backbone"):
        Classifier(2, "vgg")
    with pytest.raises(KeyError):
        Classifier(2, "resnet18", weights="NOT_A_WEIGHT")


def test_synthetic_layout_and_reader(synthetic_root):
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        assert (synthetic_root / sub).is_dir()
    src = VOCSource(synthetic_root, "train", SYNTHETIC_CLASSES, name="synthetic")
    assert len(src) == 24
    assert src.ids[0] == "train_00000"
    png = Image.open(synthetic_root / "SegmentationClass" / "train_00000.png")
    assert png.mode == "P"
    assert np.array(png.getpalette()[:63]).reshape(21, 3).tolist() == voc_colormap(21).tolist()
    image = src.load_image("train_00000")
    mask = src.load_mask("train_00000")
    assert image.shape == (3, 64, 64)
    assert image.dtype == torch.uint8
    assert mask.shape == (64, 64)
    assert 255 in mask  # void borders
    labels = src.labels("train_00000")
    assert set(labels + 1) == set(np.unique(mask)) - {0, 255}


def test_synthetic_is_deterministic_and_checks_its_spec(tmp_path):
    spec = SyntheticSpec(num_train=3, num_val=1, image_size=48, seed=3)
    for i in range(4):
        a, b = render(i, spec), render(i, spec)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    ensure_synthetic(tmp_path / "s", spec)
    assert read_mask(tmp_path / "s" / "SegmentationClass" / "val_00003.png").shape == (48, 48)
    with pytest.raises(ValueError, match="generated with"):
        ensure_synthetic(tmp_path / "s", SyntheticSpec(num_train=4, num_val=1, image_size=48, seed=3))


def test_synthetic_statistics():
    """1-3 objects, every class, repeated classes, small and large objects, void borders."""
    spec = SyntheticSpec(image_size=128)
    from skimage.measure import label

    counts, sizes, repeats = np.zeros(len(SYNTHETIC_CLASSES)), [], 0
    for i in range(150):
        _, mask = render(i, spec)
        present = [v for v in np.unique(mask) if v not in (0, 255)]
        assert 1 <= len(present) <= 3
        for v in present:
            counts[v - 1] += 1
            sizes.append((mask == v).mean())
            repeats += label(mask == v, connectivity=1).max() > 1  # split instances of one class
    assert counts.min() > 10
    assert repeats > 10
    assert min(sizes) < 0.01
    assert max(sizes) > 0.2


@pytest.mark.parametrize("backbone", ["resnet_tiny", "resnet18", "resnet50"])
def test_finer_output_stride_is_exact_a_trous(backbone):
    """Reading an OS16 model at OS8 keeps every feature of the OS16 grid (the a-trous identity)."""
    torch.manual_seed(0)
    model = Classifier(3, backbone, 16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        coarse = model.backbone(x)  # (1, C, 4, 4)
        fine = model.set_output_stride(8).backbone(x)  # (1, C, 8, 8)
    assert fine.shape[-2:] == (8, 8)
    assert model.output_stride == 8
    torch.testing.assert_close(fine[..., ::2, ::2], coarse, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot coarsen"):
        model.set_output_stride(16)


def test_imagenet_weights_load_from_torch_home_offline(tmp_path, monkeypatch):
    """model.weights goes through torchvision's weights API, which reads TORCH_HOME's cache before any download."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    model = Classifier(4, "resnet18", 16, weights=ResNet18_Weights.IMAGENET1K_V1.name)
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.kwargs["weights"] is None  # the checkpoint, not the hub, rebuilds a trained model


def test_unavailable_weights_give_a_clear_error(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd\.pth.*TORCH_HOME"):
        Classifier(4, "resnet18", 16, weights=ResNet18_Weights.IMAGENET1K_V1.name)
