"""The segment stage: a segmentation network trained on masks, multi-scale + flip inference, its scores, the
WSSS table, resume after kill -9, two ranks, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.tiny import FORK_SERVER, error_line, kill_when, loop_iou, run_cli, tiny_cfg
from wsss.config import validate
from wsss.errors import ConfigError
from wsss.models.segmenter import Segmenter
from wsss.stages.segment import predict_probs
from wsss.stages.segment_train import segmentation_loss

COLOURS = {1: (200, 40, 40), 2: (40, 40, 200)}  # class 1 "blue" is blue, class 2 "red" is red (sorted names)


def colour_folder(root: Path, n: int = 12, size: int = 48, masks: bool = True) -> Path:
    """A folder dataset whose classes are colours: red and blue rectangles on a noisy grey background, with
    their exact masks (the "perfect masks"); every image holds one or both classes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    rows = ["image,labels"]
    for i in range(n):
        image = rng.normal(128, 12, (size, size, 3)).clip(0, 255)
        mask = np.zeros((size, size), np.uint8)
        present = [[1], [2], [1, 2]][i % 3]
        for k, c in enumerate(present):
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2, 2)
            x = x if k == 0 else min(x + size // 2, size - w)  # two classes side by side
            image[y : y + h, x : x + w] = np.array({1: COLOURS[2], 2: COLOURS[1]}[c]) + rng.normal(0, 8, (h, w, 3))
            mask[y : y + h, x : x + w] = c
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        if masks:
            Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png," + ";".join(["blue", "red"][c - 1] for c in present))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _cli(tmp_path: Path, args: list[str], cache: str = "cache") -> subprocess.CompletedProcess:
    """`python -m wsss.run dataset.num_workers=0 *args` (not TINY's settings), through the fork server."""
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / cache)}
    return FORK_SERVER.run(["dataset.num_workers=0", *args], env, timeout=900)


FAST = ["segment.batch_size=4", "segment.crop_size=48", "segment.ema_decay=null", "segment.scale_range=[1,1]"]


# -- the loss ---------------------------------------------------------------------------------------------------


def test_loss_is_the_mean_over_labelled_pixels_and_ignores_255():
    """Equal to a float64 mean of -log softmax over the labelled pixels; logits at 255 pixels change neither
    the loss nor any gradient (their own gradient is 0); an all-255 batch gives 0, not NaN."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    masks = torch.randint(0, 4, (2, 5, 6), generator=g)
    masks[0, :2] = 255
    masks[1, :, 4:] = 255
    loss, counts = segmentation_loss(logits, masks)
    ref, n = 0.0, 0
    lp = torch.log_softmax(logits.detach().double(), 1)
    for b, y, x in zip(*torch.nonzero(masks != 255, as_tuple=True), strict=True):
        ref -= float(lp[b, masks[b, y, x], y, x])
        n += 1
    assert abs(loss.item() - ref / n) < 1e-6
    assert counts[1].item() == n
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad.permute(0, 2, 3, 1)[masks == 255] == 0).all()

    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[masks == 255] = torch.randn(int((masks == 255).sum()), 4, generator=g) * 50
    other.requires_grad_(True)
    loss2, _ = segmentation_loss(other, masks)
    (grad2,) = torch.autograd.grad(loss2, other)
    assert loss2.item() == loss.item()
    assert torch.equal(grad2, grad)

    none, counts = segmentation_loss(logits, torch.full_like(masks, 255))
    assert none.item() == 0.0
    assert counts[1].item() == 0


# -- inference --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["deeplabv2", "deeplabv3", "lraspp"])
def test_multiscale_flip_equals_a_per_image_per_scale_loop(network):
    """`predict_probs` (a batch, an image and its flip in one forward) equals a float64 loop over images,
    scales and flips, each image alone, each view's softmax resized to the image and averaged."""
    torch.manual_seed(0)
    net = Segmenter(4, network, "resnet_tiny", 16).eval()

    def model(x: torch.Tensor) -> torch.Tensor:  # logits far from 0: softmax then resize differs from the reverse
        return 100 * net(x)

    images = torch.randn(3, 3, 40, 52)
    scales = [1.0, 0.75, 1.5]
    got = predict_probs(model, images, scales, flip=True)
    assert got.shape == (3, 4, 40, 52)
    for b in range(3):
        ref = torch.zeros(4, 40, 52, dtype=torch.float64)
        for s in scales:
            size = (round(40 * s), round(52 * s))
            x = images[b : b + 1]
            if size != (40, 52):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                with torch.no_grad():
                    logits = model(x.flip(-1) if flipped else x)
                p = F.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False).softmax(1)[0]
                ref += (p.flip(-1) if flipped else p).double()
        ref /= 2 * len(scales)
        assert torch.allclose(got[b].double(), ref, atol=1e-5), (got[b].double() - ref).abs().max()
    plain = predict_probs(model, images, [1.0], flip=False)
    with torch.no_grad():
        assert torch.allclose(plain, model(images).softmax(1), atol=1e-6)


def test_networks_give_logits_at_the_input_size_and_refuse_what_they_cannot_build():
    for network in ("deeplabv2", "deeplabv3", "lraspp"):
        model = Segmenter(3, network).eval()  # eval: DeepLabV3's image pooling has BatchNorm over a 1x1 map
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)
    model = Segmenter(3, "deeplabv2", "resnet18", 8)
    assert model.backbone.layer4[0].conv2.dilation == (4, 4)  # stride 8: layer3 dilated 2, layer4 4
    heads = model.head.branches
    assert [c.dilation[0] for c in heads] == [6, 12, 18, 24]
    with pytest.raises(ValueError, match="output_stride=32"):
        Segmenter(3, "deeplabv2", "resnet18", 32)
    with pytest.raises(ValueError, match="vit_b_16"):
        Segmenter(3, "deeplabv3", "vit_b_16", 16)


def test_frozen_bn_keeps_the_trunk_statistics_in_training_and_the_head_learns_its_own():
    torch.manual_seed(0)
    model = Segmenter(3, "deeplabv3", "resnet_tiny", 16, frozen_bn=True).train()
    trunk_bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head_bn = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in trunk_bn + head_bn]
    model(torch.randn(2, 3, 40, 40) * 3 + 1)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, trunk_bn, strict=False))
    assert not torch.equal(before[len(trunk_bn)], head_bn[0].running_mean)  # the new head's BN is not frozen
    assert all(not m.training for m in trunk_bn)
    assert model.kwargs["frozen_bn"] is True


# -- the stage --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_perfect_masks_train_a_segmenter_to_a_high_miou(tmp_path):
    """On a colour-coded folder set (12 images, 48 px, 2 classes), the default network (DeepLab v2 head on
    resnet_tiny) at output stride 8, trained 40 epochs on the exact masks at one scale and predicted at that scale
    (with flip), scores >= 90 mIoU on those images (93.9 when written); the scores equal a pixel loop over the
    written PNGs."""
    root = colour_folder(tmp_path / "colours")
    run = tmp_path / "run"
    args = ["dataset=folder", f"dataset.root={root}", "stage=segment", "segment.labels=gt", "segment.output_stride=8"]
    args += ["segment.eval_split=train", "segment.epochs=40", "segment.scales=[1]", *FAST, f"hydra.run.dir={run}"]
    proc = _cli(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["miou"] >= 90.0, metrics["iou"]
    masks = run / "artifacts" / "segment" / "masks"
    pairs = [
        (np.array(Image.open(root / "masks" / p.name)), np.array(Image.open(p))) for p in sorted(masks.glob("*.png"))
    ]
    assert len(pairs) == 12
    _iou, miou = loop_iou(pairs, 3)
    assert abs(miou - metrics["miou"]) < 1e-3
    assert [row["name"] for row in metrics["table"]] == ["segmenter (deeplabv2)"]
    assert Image.open(next(masks.glob("*.png"))).mode == "P"  # palette PNGs


@pytest.mark.slow
def test_wsss_table_names_seeds_masks_segmenter_and_bound_with_their_splits(tmp_path):
    """pseudo.refine=crf with compare_gt: seeds and refined masks on train, the segmenter and the bound on val,
    each row's mIoU equal to the artifact that made it; the bound is reused by a second pseudo-label variant."""
    pytest.importorskip("pydensecrf")
    common = ["stage=segment", "segment.epochs=1", "segment.batch_size=8", "segment.compare_gt=true"]
    first = run_cli(tmp_path, [*common, "pseudo.refine=crf", f"hydra.run.dir={tmp_path / 'a'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [(r["name"], r["split"]) for r in m["table"]] == [
        ("seeds (CAMs)", "train"),
        ("pseudo masks (crf)", "train"),
        ("segmenter (deeplabv2)", "val"),
        ("fully supervised bound", "val"),
    ]
    cache = tmp_path / "cache"
    ev = json.loads(next(cache.glob("evaluate/*/metrics.json")).read_text())
    bound = json.loads(next(cache.glob("segment_gt/*/metrics.json")).read_text())
    assert m["table"][0]["miou"] == ev["seeds"]["miou"]
    assert m["table"][1]["miou"] == ev["miou"]
    assert m["table"][2]["miou"] == m["miou"]
    assert m["table"][3]["miou"] == bound["miou"]
    assert m["table"][3]["trained_on"] == "train ground truth"
    second = run_cli(tmp_path, [*common, f"hydra.run.dir={tmp_path / 'b'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "segment_gt: reusing" in second.stdout + second.stderr
    assert len(list(cache.glob("segment_gt/*/manifest.json"))) == 1
    assert "| fully supervised bound | val |" in (tmp_path / "b" / "summary.md").read_text()


@pytest.mark.slow
def test_inference_settings_predict_again_from_the_trained_networks(tmp_path):
    """After a segment run with the bound, changing segment.crf, segment.scales, segment.rle_json and
    evaluate.bootstrap trains nothing (no epoch logged, one artifact per training stage, the same training keys)
    and predicts again; a training setting (segment.lr) trains both again (the bound follows the recipe)."""
    pytest.importorskip("pydensecrf")
    common = ["stage=segment", "segment.epochs=2", "segment.batch_size=8", "segment.compare_gt=true"]
    first = run_cli(tmp_path, [*common, f"hydra.run.dir={tmp_path / 'a'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert log.count("segment: epoch ") == 4, log[-3000:]  # 2 epochs of the segmenter, 2 of the bound
    cache = tmp_path / "cache"
    keys = {
        s: sorted(p.parent.name for p in cache.glob(f"{s}/*/manifest.json"))
        for s in ("segment_train", "segment_gt_train")
    }
    assert [len(k) for k in keys.values()] == [1, 1]
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    inference = ["segment.crf=true", "segment.scales=[1]", "segment.rle_json=true", "evaluate.bootstrap=50"]
    second = run_cli(tmp_path, [*common, *inference, f"hydra.run.dir={tmp_path / 'b'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "segment: epoch " not in log, log[-3000:]
    assert "segment_train: reusing" in log
    assert "segment_gt_train: reusing" in log
    assert {s: sorted(p.parent.name for p in cache.glob(f"{s}/*/manifest.json")) for s in keys} == keys
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["training"]["key"] == a["training"]["key"] == keys["segment_train"][0]
    assert len(list(cache.glob("segment/*/manifest.json"))) == 2  # predicted again
    assert len(list(cache.glob("segment_gt/*/manifest.json"))) == 2
    third = run_cli(tmp_path, [*common, "segment.lr=1e-3", f"hydra.run.dir={tmp_path / 'c'}"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert (third.stdout + third.stderr).count("segment: epoch ") == 4  # the same recipe: both train again
    assert len(list(cache.glob("segment_train/*/manifest.json"))) == 2


def _digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    """kill -9 once an epoch's segment state is on disk: the rerun resumes after that epoch and ends with the
    weights, masks and metrics of an uninterrupted run."""
    args = ["stage=segment", "segment.epochs=4", "segment.batch_size=8", "dataset.synthetic.num_train=48"]
    env1 = {"OMP_NUM_THREADS": "1"}  # one thread in every run: reductions add up alike
    clean = run_cli(tmp_path / "clean", [*args, f"hydra.run.dir={tmp_path / 'clean_run'}"], env=env1)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = tmp_path / "killed"

    def saved() -> bool:
        return any(killed.glob("cache/segment_train/*/segment_state.pt"))

    kill_when(killed, [*args, f"hydra.run.dir={killed / 'run0'}"], saved, env=env1)
    assert any(killed.glob("cache/segment_train/*/segment_state.pt"))
    assert not any(killed.glob("cache/segment_train/*/manifest.json"))
    again = run_cli(killed, [*args, f"hydra.run.dir={killed / 'run'}"], env=env1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "segment: resuming after epoch" in again.stdout + again.stderr
    a = next((tmp_path / "clean" / "cache").glob("segment_train/*/segment.pt"))
    b = next((killed / "cache").glob("segment_train/*/segment.pt"))
    assert _digest(a) == _digest(b)
    ma = json.loads((tmp_path / "clean_run" / "metrics.json").read_text())
    mb = json.loads((killed / "run" / "metrics.json").read_text())
    assert ma["per_image_miou"] == mb["per_image_miou"]
    assert ma["table"] == mb["table"]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_masks_and_metrics(tmp_path):
    """From one trained network (segment.checkpoint), 2 ranks on gloo write the PNGs of one process, byte for
    byte, and the same metrics (confusion matrix reduced across ranks, records gathered)."""
    root = colour_folder(tmp_path / "colours")
    base = ["dataset=folder", f"dataset.root={root}", "stage=segment", "segment.labels=gt"]
    base += ["segment.eval_split=train", "segment.epochs=1", *FAST]
    trained = _cli(tmp_path, [*base, f"hydra.run.dir={tmp_path / 'trained'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "cache").glob("segment_gt_train/*/segment.pt"))
    given = [*base, f"segment.checkpoint={ckpt}", "segment.batch_size_eval=3"]
    one = _cli(tmp_path, [*given, f"hydra.run.dir={tmp_path / 'one'}"], cache="c1")
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "c2")}
    # torchrun's two ranks, forked (tests/forkrun.py; test_scale_out runs torchrun itself)
    two = FORK_SERVER.run_ranks(["dataset.num_workers=0", *given, f"hydra.run.dir={tmp_path / 'two'}"], env, 2, 600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = sorted((tmp_path / "one" / "artifacts" / "segment" / "masks").glob("*.png"))
    b = sorted((tmp_path / "two" / "artifacts" / "segment" / "masks").glob("*.png"))
    assert [p.name for p in a] == [p.name for p in b]
    assert len(a) == 12
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b, strict=True))
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for k in ("miou", "iou", "scores", "per_image_miou", "intervals"):
        if k == "intervals":
            ma[k].pop("seconds"), mb[k].pop("seconds")
        assert ma[k] == mb[k], k


@pytest.mark.slow
def test_crf_predictions_equal_pydensecrf_on_the_softmax_and_rle_decodes_to_the_pngs(tmp_path):
    """segment.crf=true: each PNG is the argmax of pydensecrf's own DenseCRF2D (PSA's kernels, refine.crf_*)
    on the network's softmax, built here from the checkpoint; segment.rle_json=true: pycocotools decodes each
    result to its class's pixels of the PNG."""
    pytest.importorskip("pydensecrf")
    mask_util = pytest.importorskip("pycocotools.mask")
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from wsss.data.transforms import normalize
    from wsss.models.io import load_network

    root = colour_folder(tmp_path / "colours")
    base = ["dataset=folder", f"dataset.root={root}", "stage=segment", "segment.labels=gt"]
    base += ["segment.eval_split=train", "segment.epochs=6", *FAST]  # soft enough at boundaries for the CRF
    trained = _cli(tmp_path, [*base, f"hydra.run.dir={tmp_path / 'trained'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "cache").glob("segment_gt_train/*/segment.pt"))
    given = [*base, f"segment.checkpoint={ckpt}", "segment.scales=[1]", "segment.flip=false"]
    given += ["segment.crf=true", "segment.rle_json=true", "segment.batch_size_eval=1"]
    proc = _cli(tmp_path, [*given, f"hydra.run.dir={tmp_path / 'crf'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "crf" / "artifacts" / "segment"
    model = load_network(ckpt, Segmenter, torch.device("cpu"))
    agree, total, changed = 0, 0, 0
    for path in sorted((root / "images").glob("*.png")):
        rgb = np.array(Image.open(path).convert("RGB"))
        with torch.no_grad():
            probs = model(normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None]))[0].softmax(0).numpy()
        n, (h, w) = probs.shape[0], rgb.shape[:2]
        d = dcrf.DenseCRF2D(w, h, n)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-8, 1.0))))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80 * max(h, w) / 500, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
        ref = np.array(d.inference(10)).reshape(n, h, w).argmax(0)
        got = np.array(Image.open(out / "masks" / path.name))
        agree += int((got == ref).sum())
        total += got.size
        changed += int((ref != probs.argmax(0)).sum())
    assert agree >= 0.999 * total, (agree, total)  # float rounding of the softmax may move a boundary pixel
    assert changed > 0.002 * total, changed  # the CRF moved pixels here: a run without it would not match
    rows = json.loads((out / "masks.rle.json").read_text())
    assert rows
    for r in rows:
        png = np.array(Image.open(out / "masks" / f"{r['image_id']}.png"))
        rle = {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_util.decode(rle), (png == r["category_id"]).astype(np.uint8))


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["segment.output_stride=32"], "segment.network=deeplabv2: output_stride=32"),
        (["segment.backbone=vit_b_16"], "segment.network=deeplabv2: backbone='vit_b_16'"),
        (["segment.weights=IMAGENET1K_V9", "segment.backbone=resnet50"], "segment.weights=IMAGENET1K_V9"),
        (["segment.scales=[]"], "segment.scales=[]"),
        (["segment.eval_split=nosuch"], "segment.eval_split=nosuch"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(tmp_path, overrides, message):
    cfg = tiny_cfg(tmp_path, ["stage=segment", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


def test_unknown_network_fails_at_composition(tmp_path):
    with pytest.raises(Exception, match="deeplabv9"):
        tiny_cfg(tmp_path, ["segment.network=deeplabv9"])


def test_eval_split_and_gt_labels_without_ground_truth_are_one_error_line(tmp_path):
    """A folder without masks: scoring it, or training on its ground truth, is refused before training."""
    root = colour_folder(tmp_path / "nomasks", masks=False)
    for extra, what in [([], "segment.eval_split=train"), (["segment.labels=gt"], "dataset.train_split=train")]:
        args = ["dataset=folder", f"dataset.root={root}", "stage=segment", "segment.eval_split=train", *extra]
        proc = _cli(tmp_path, [*args, f"hydra.run.dir={tmp_path / 'r'}"])
        assert proc.returncode != 0
        line = error_line(proc.stderr)
        assert what in line
        assert "no image of this split has a ground-truth mask" in line
        assert "train: running" not in proc.stderr


def test_pseudo_masks_outside_the_class_list_are_refused_naming_the_file(tmp_path):
    from wsss.data import build_source
    from wsss.data.base import SampleError
    from wsss.data.transforms import TrainTransform
    from wsss.stages.segment_train import SegmentationDataset, check_label_maps

    root = colour_folder(tmp_path / "colours", n=3)
    masks = tmp_path / "pseudo"
    masks.mkdir()
    for p in (root / "masks").glob("*.png"):
        (masks / p.name).write_bytes(p.read_bytes())
    bad = np.array(Image.open(masks / "im01.png"))
    bad[0, 0] = 7  # class index 6 of a 2-class list
    Image.fromarray(bad).save(masks / "im01.png")
    cfg = tiny_cfg(tmp_path, ["dataset=folder", f"dataset.root={root}"])
    source = build_source(cfg.dataset, "train")
    dataset = SegmentationDataset(source, masks, TrainTransform(48))
    with pytest.raises(SampleError, match=r"im01\.png: class index 6 \(mask value 7\) outside the class list"):
        check_label_maps(dataset)
