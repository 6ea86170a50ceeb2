"""IRN's classifier options: frozen stages, fixed BatchNorm, layer4 at stride 1 without dilation.

References are built independently of `Classifier`'s code paths: a forward that detaches after layer2 (IRN's
`self.stage2(x).detach()`), and a plain torchvision ResNet whose layer4 strides are set to 1 by hand (IRN's
`resnet50(strides=(2, 2, 2, 1))`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tests.tiny import assert_miou_counted, error_line, run_cli
from wsss.models import Classifier, load_checkpoint, save_checkpoint


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_frozen_stages_get_no_gradient_and_the_rest_gets_irns():
    torch.manual_seed(0)
    model = Classifier(3, "resnet_tiny", 16)
    ref = Classifier(3, "resnet_tiny", 16)
    ref.load_state_dict(model.state_dict())
    frozen = model.freeze_through("layer2")
    assert frozen
    assert all(n.split(".")[1] in ("stem", "layer1", "layer2") for n in frozen)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss = nn.functional.multilabel_soft_margin_loss(model(x), y)
    loss.backward()
    b = ref.backbone  # IRN's forward: stage 2's output detached
    feats = b.layer4(b.layer3(b.layer2(b.layer1(b.stem(x))).detach()))
    nn.functional.multilabel_soft_margin_loss(ref.head(feats.mean((2, 3), keepdim=True)).flatten(1), y).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if name.split(".")[1] in ("stem", "layer1", "layer2"):
            assert p.grad is None, name
            assert not p.requires_grad, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for g in model.param_groups() for p in g["params"])  # the optimizer sees the rest


def test_frozen_bn_keeps_statistics_and_trains_affine_as_irns_fixed_batchnorm():
    """IRN's FixedBatchNorm calls batch_norm(training=False): the running statistics normalise every batch and
    never change; weight and bias are ordinary parameters and learn (IRN's trained res50_cam.pth differs from its
    initial weights in layer3 / layer4 BN weights, BENCHMARKS.md)."""
    torch.manual_seed(0)
    model = Classifier(3, "resnet_tiny", 16, frozen_bn=True).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    affine = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("bn1.weight", "bn2.bias"))}
    assert stats
    assert affine
    assert all(not m.training for m in _bns(model))
    assert all(p.requires_grad for m in _bns(model) for p in m.parameters())
    opt = torch.optim.SGD([p for g in model.param_groups() for p in g["params"]], lr=0.01, weight_decay=0.1)
    x = torch.randn(4, 3, 64, 64) * 3 + 1
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in stats.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(after[k], v) for k, v in affine.items())
    # eval-mode normalisation: the first BN's output is (x - running_mean) / sqrt(running_var + eps) * w + b
    bn = model.backbone.stem[1]
    conv_out = model.backbone.stem[0](x)
    ref = (conv_out - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    assert torch.isfinite(conv_out).all()
    torch.testing.assert_close(bn(conv_out), ref * bn.weight[:, None, None] + bn.bias[:, None, None])
    assert model.head.weight.grad is not None
    model.eval().train()  # switching modes keeps the BatchNorms in eval mode
    assert all(not m.training for m in _bns(model))
    plain = Classifier(3, "resnet_tiny", 16).train()
    assert all(m.training for m in _bns(plain))


def test_irn_stride_is_layer4_at_stride_1_without_dilation():
    torch.manual_seed(0)
    model = Classifier(2, "resnet18", 16, stride_mode="irn").eval()
    ref = torchvision.models.resnet18(weights=None)  # the same weights, IRN's strides set by hand
    ref.conv1.load_state_dict(model.backbone.stem[0].state_dict())
    ref.bn1.load_state_dict(model.backbone.stem[1].state_dict())
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(ref, name).load_state_dict(getattr(model.backbone, name).state_dict())
    ref.layer4[0].conv1.stride = (1, 1)  # BasicBlock: the 3x3 conv1 strides; IRN's Bottleneck strides conv2
    ref.layer4[0].downsample[0].stride = (1, 1)
    ref.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        got = model.backbone(x)
    assert got.shape[-2:] == (6, 8)  # stride 16
    torch.testing.assert_close(got, r, rtol=0, atol=0)
    assert all(m.dilation == (1, 1) for m in model.backbone.layer4.modules() if isinstance(m, nn.Conv2d))
    dilated = Classifier(2, "resnet18", 16).eval()
    dilated.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(dilated.backbone(x), got)  # torchvision's dilation gives another map
    with pytest.raises(ValueError, match="stride_mode=irn"):
        model.set_output_stride(8)


def test_checkpoint_keeps_the_options(tmp_path):
    model = Classifier(2, "resnet_tiny", 16, stride_mode="irn", frozen_bn=True)
    save_checkpoint(tmp_path / "m.pt", model, ["a", "b"])
    back, _ = load_checkpoint(tmp_path / "m.pt", ["a", "b"])
    assert back.stride_mode == "irn"
    assert back.frozen_bn
    back.train()
    assert all(not m.training for m in _bns(back))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["model.stride_mode=irn"], "cam.output_stride=8: must be null or 16 with model.stride_mode=irn"),
        (["model.stride_mode=irn", "model.output_stride=8", "cam.output_stride=null"], "model.output_stride=8"),
        (["train.freeze=layer9"], "train.freeze=layer9: must be null or one of"),
        (["model.stride_mode=atrous"], "model.stride_mode=atrous: must be one of"),
        (["dataset.labels_from=boxes"], "dataset.labels_from=boxes: must be masks or xml"),
        (["dataset=coco", "dataset.labels_from=xml", "dataset.root=."], "dataset.labels_from=xml: COCO's labels"),
    ],
)
def test_bad_irn_options_are_one_error_line(tmp_path, override, needle):
    proc = run_cli(tmp_path, override, timeout=120)
    assert proc.returncode == 2
    assert needle in error_line(proc.stderr)


def test_irn_options_run_end_to_end_and_leave_the_frozen_weights_as_initialised(tmp_path):
    from tests.tiny import tiny_cfg
    from wsss.pipeline import Pipeline

    overrides = [
        "stage=evaluate",
        "model.stride_mode=irn",
        "model.frozen_bn=true",
        "train.freeze=layer2",
        "train.ema_decay=null",
        "cam.output_stride=16",
    ]
    cfg = tiny_cfg(tmp_path, overrides)
    pipe = Pipeline(cfg)
    pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert_miou_counted(metrics, tmp_path / "data" / "synthetic" / "SegmentationClass")
    trained, _ = load_checkpoint(pipe.artifact_dir("train") / "model.pt")
    torch.manual_seed(cfg.seed)  # the train stage's initial weights
    initial = Classifier(trained.kwargs["num_classes"], "resnet_tiny", 16, None, "irn", True)
    got, start = trained.state_dict(), initial.state_dict()
    for k, v in start.items():
        frozen = k.split(".")[1] in ("stem", "layer1", "layer2") or "running_" in k or "num_batches" in k
        if frozen:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(got["head.weight"], start["head.weight"])
    assert not torch.equal(got["backbone.layer3.0.conv1.weight"], start["backbone.layer3.0.conv1.weight"])


NAMES = ["disc", "triangle", "square", "star", "ring", "cross"]


def _irn_cls_labels(xml_path, class_names) -> list[int]:
    """IRN's `load_image_label_from_xml`: every <name> element of the file that is a class (minidom)."""
    from xml.dom import minidom

    names = [e.firstChild.data for e in minidom.parse(str(xml_path)).getElementsByTagName("name")]
    return sorted({class_names.index(n) for n in names if n in class_names})


def test_labels_from_xml_are_irns_cls_labels(synthetic_root, tmp_path):
    import shutil

    from wsss.data.voc import VOCSource

    root = tmp_path / "voc"
    shutil.copytree(synthetic_root, root)
    (root / "generator.json").unlink()
    # An extra difficult object of a class the mask lacks: the XML has it, the mask does not.
    xml = root / "Annotations" / "train_00000.xml"
    src_masks = VOCSource(root, "train", NAMES)
    absent = next(c for c in range(len(NAMES)) if c not in src_masks.labels("train_00000"))
    text = xml.read_text()
    extra = (
        f"<object><name>{NAMES[absent]}</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object>"
    )
    xml.write_text(text.replace("</annotation>", extra + "</annotation>"))
    src_xml = VOCSource(root, "train", NAMES, labels_from="xml")
    for image_id in src_xml.ids:
        expected = _irn_cls_labels(root / "Annotations" / f"{image_id}.xml", NAMES)
        src_xml.load_mask(image_id)  # reading the mask first never puts the mask's classes in the label cache
        assert src_xml.labels(image_id).tolist() == expected, image_id
    assert absent in src_xml.labels("train_00000")
    assert absent not in VOCSource(root, "train", NAMES).labels("train_00000")


def test_labels_from_is_in_the_dataset_identity():
    from tests.tiny import tiny_cfg
    from wsss.data import dataset_identity

    a = dataset_identity(tiny_cfg(Path("/tmp/x")).dataset, "train")
    b = dataset_identity(tiny_cfg(Path("/tmp/x"), ["dataset.labels_from=xml"]).dataset, "train")
    assert a != b
    assert b["labels_from"] == "xml"
