"""IRN's relation labels, IRNet's boundary branch and loss, and its random walk against float64 references
written from the paper's definitions and IRN's code (read, not imported)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import assert_miou_counted
from wsss.data.transforms import PilRescale, TrainTransform, pil_resize
from wsss.models.irn import BoundaryNet
from wsss.refine.irn import boundary_loss, boundary_walk, ir_label, path_affinities, path_offsets, path_points

needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 not installed")


def _ref_path(dy: int, dx: int) -> set[tuple[int, int]]:
    """Grid points of the box within perpendicular distance 1 of the line (float64 geometry)."""
    norm = math.hypot(dy, dx)
    return {
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if abs(dy * x - dx * y) / norm < 1.0 - 1e-12
    }


def test_paths_are_the_points_near_the_segment_and_offsets_a_half_disk():
    r = 10
    offsets = path_offsets(r)
    full = {(dy, dx) for dy in range(-r + 1, r) for dx in range(-r + 1, r) if 0 < dy * dy + dx * dx < r * r}
    assert len(offsets) == len(set(offsets)) == len(full) // 2
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == full
    for dy, dx in offsets:
        pts = set(path_points(dy, dx))
        assert pts == _ref_path(dy, dx)
        assert (0, 0) in pts
        assert (dy, dx) in pts
    assert set(path_points(0, 3)) == {(0, 0), (0, 1), (0, 2), (0, 3)}


def _ref_affinity(b: np.ndarray, y: int, x: int, dy: int, dx: int) -> float:
    return 1.0 - max(b[y + py, x + px] for py, px in _ref_path(dy, dx))


def test_path_affinities_match_a_per_pair_loop():
    g = torch.Generator().manual_seed(0)
    boundary = torch.rand(2, 14, 15, generator=g, dtype=torch.float64)
    r = 4
    got = path_affinities(boundary, r)  # (B, P, h', w')
    f = r - 1
    for b in range(2):
        for p, (dy, dx) in enumerate(path_offsets(r)):
            for y in range(0, 14 - f):
                for x in range(f, 15 - f):
                    ref = _ref_affinity(boundary[b].numpy(), y, x, dy, dx)
                    assert got[b, p, y, x - f].item() == pytest.approx(ref, abs=1e-12)


def test_boundary_loss_matches_masked_means_in_float64():
    g = torch.Generator().manual_seed(1)
    boundary = torch.rand(2, 12, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 12, 12), generator=g)
    labels[0, :3] = 255
    r = 3
    loss, counts = boundary_loss(boundary, labels, r)
    sums = {"bg": [0.0, 0], "fg": [0.0, 0], "neg": [0.0, 0]}
    f = r - 1
    for b in range(2):
        lab, bd = labels[b].numpy(), boundary[b].numpy()
        for dy, dx in path_offsets(r):
            for y in range(0, 12 - f):
                for x in range(f, 12 - f):
                    a, c = lab[y, x], lab[y + dy, x + dx]
                    if a == 255 or c == 255:
                        continue
                    aff = _ref_affinity(bd, y, x, dy, dx)
                    key = "neg" if a != c else ("bg" if a == 0 else "fg")
                    term = -math.log(1 + 1e-5 - aff) if key == "neg" else -math.log(aff + 1e-5)
                    sums[key][0] += term
                    sums[key][1] += 1
    mean = {k: s / (n + 1e-5) for k, (s, n) in sums.items()}
    assert loss.item() == pytest.approx((mean["bg"] / 2 + mean["fg"] / 2 + mean["neg"]) / 2, rel=1e-10)
    assert counts.tolist() == [sums["bg"][1], sums["fg"][1], sums["neg"][1]]


def test_boundary_walk_is_irns_dense_transition_power():
    """IRN's propagate_to_edge in float64: a dense affinity over pairs within the radius (both directions, 1 on
    the diagonal), ^beta, columns normalised, the 2^k-th power, applied to maps * (1 - boundary)."""
    g = torch.Generator().manual_seed(2)
    b, k, h, w, r, beta = 2, 3, 7, 9, 3, 10.0
    boundary = torch.rand(b, h, w, generator=g) * 0.6
    maps = torch.rand(b, k, h, w, generator=g)
    got = boundary_walk(maps, boundary, radius=r, beta=beta, steps=16)
    for i in range(b):
        bd = boundary[i].double().numpy()
        n = h * w
        a = np.eye(n)
        for y in range(h):
            for x in range(w):
                for dy, dx in path_offsets(r):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        v = _ref_affinity(bd, y, x, dy, dx)
                        a[y * w + x, yy * w + xx] = a[yy * w + xx, y * w + x] = v
        t = a**beta
        t = t / t.sum(0, keepdims=True)
        t = np.linalg.matrix_power(t, 16)
        x0 = (maps[i].double().numpy() * (1 - bd)).reshape(k, n)
        ref = (x0 @ t).reshape(k, h, w)
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-5, rtol=1e-4)


def test_ir_label_without_crf_is_irns_band_rule():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 20, 30, generator=g).numpy()
    keys = np.array([4, 11])
    image = np.zeros((20, 30, 3), np.uint8)
    got = ir_label(image, maps, keys, 0.6, 0.2, crf=False)
    best, arg = maps.max(0), maps.argmax(0)
    ref = np.where(best > 0.6, keys[arg] + 1, np.where(best <= 0.2, 0, 255))
    np.testing.assert_array_equal(got, ref)


@needs_crf
def test_ir_label_with_crf_runs_pydensecrf_with_irns_settings():
    from pydensecrf import densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    maps = rng.random((2, 24, 32)).astype(np.float32)
    keys = np.array([0, 7])

    def irn_crf(labels):  # imutils.crf_inference_label, as IRN's code reads
        d = dcrf.DenseCRF2D(32, 24, 3)
        d.setUnaryEnergy(unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
        return np.argmax(np.array(d.inference(10)).reshape(3, 24, 32), 0)

    lut = np.array([0, 1, 8])
    fg = lut[irn_crf(np.concatenate([np.full((1, 24, 32), 0.5, np.float32), maps]).argmax(0))]
    bg = lut[irn_crf(np.concatenate([np.full((1, 24, 32), 0.1, np.float32), maps]).argmax(0))]
    ref = np.where(fg > 0, fg, np.where(bg == 0, 0, 255))
    np.testing.assert_array_equal(ir_label(image, maps, keys, 0.5, 0.1), ref)


def test_boundary_net_trains_only_its_branch_and_keeps_the_trunk():
    torch.manual_seed(0)
    net = BoundaryNet("resnet_tiny", 16).train()
    trunk = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    branch = {k: v.clone() for k, v in net.fuse.state_dict().items()}
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.5)
    x = torch.randn(2, 3, 70, 90)
    out = net(x)
    assert out.shape == (2, 1, math.ceil(70 / 4), math.ceil(90 / 4))
    labels = torch.randint(0, 2, (2, *out.shape[-2:]))
    loss, _ = boundary_loss(torch.sigmoid(out[:, 0]), labels, 3)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, trunk[k], rtol=0, atol=0, msg=k)  # BN statistics too (eval mode)
    assert not torch.equal(net.fuse.state_dict()["weight"], branch["weight"])


def test_boundary_averages_the_flip_and_pads_like_irn():
    torch.manual_seed(1)
    net = BoundaryNet("resnet_tiny", 16).eval()
    x = torch.randn(1, 3, 37, 50)
    got = net.boundary(x, pad_to=64)
    with torch.no_grad():
        a = net(torch.nn.functional.pad(x, (0, 14, 0, 27)))[0, 0, :10, :13]
        b = net(torch.nn.functional.pad(x.flip(-1), (0, 14, 0, 27)))[0, 0, :10, :13].flip(-1)
    torch.testing.assert_close(got[0], torch.sigmoid(a / 2 + b / 2))


def test_pil_rescale_is_pillow_bicubic_and_nearest_at_the_drawn_size():
    rng = np.random.default_rng(5)
    image = torch.from_numpy(rng.integers(0, 255, (3, 41, 63), dtype=np.uint8))
    mask = torch.from_numpy(rng.integers(0, 4, (41, 63), dtype=np.uint8))
    arr = image.permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(arr).resize((40, 26), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pil_resize(image, (26, 40)).permute(1, 2, 0).numpy(), ref)
    ref_mask = np.asarray(Image.fromarray(mask.numpy()).resize((40, 26), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(pil_resize(mask, (26, 40), nearest=True).numpy(), ref_mask)
    t = PilRescale(long_side=(30, 33))
    sides = set()
    for _ in range(200):
        out = t(image)
        long = max(out.shape[-2:])
        sides.add(long)
        s = long / 63
        assert tuple(out.shape[-2:]) == (round(41 * s), long)
    assert sides == {30, 31, 32, 33}  # randint's inclusive range, every value drawn
    crop, crop_mask = TrainTransform(48, resize="long_side", long_side=(40, 40))(image, mask)
    assert crop.shape == (3, 48, 48)
    assert crop_mask.shape == (48, 48)
    assert set(crop_mask.unique().tolist()) <= {0, 1, 2, 3, 255}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["pseudo.refine=irn", "irn.trunk=weights"], "irn.trunk=weights: needs model.weights"),
        (["pseudo.refine=irn", "irn.crop_size=64"], "irn.crop_size=64: must be >= 76 at irn.radius=10"),
        (["pseudo.refine=irn", "model=vit_b_16"], "model.backbone=vit_b_16: pseudo.refine=irn needs one of"),
        (["pseudo.refine=rw", "model=swin_t"], "model.backbone=swin_t: pseudo.refine=rw needs one of"),
        (["stage=affinity", "model=convnext_tiny"], "model.backbone=convnext_tiny: stage=affinity needs one of"),
        (["irn.conf_bg=0.9"], "irn.conf_bg=0.9: must be <= irn.conf_fg=0.7"),
        (["train.resize=bilinear"], "train.resize=bilinear: must be scale or long_side"),
        (["cam.resize=area"], "cam.resize=area: must be bilinear or pil_bicubic"),
    ],
)
def test_irn_settings_are_checked_before_any_stage(tmp_path, overrides, needle):
    from tests.tiny import tiny_cfg
    from wsss.config.checks import _problems

    problems = _problems(tiny_cfg(tmp_path, overrides))
    assert any(needle in p for p in problems), problems


def test_refine_irn_end_to_end_labels_walk_and_masks(tmp_path):
    from tests.tiny import tiny_cfg
    from wsss.artifacts import read_cams, read_mask
    from wsss.models import load_checkpoint
    from wsss.models.irn import load_irn
    from wsss.pipeline import Pipeline

    overrides = [
        "pseudo.refine=irn",
        "irn.crf=false",
        "irn.radius=5",
        "irn.epochs=1",
        "irn.batch_size=8",
        "refine.irn_steps=8",
        "refine.irn_pad=null",
    ]
    pipe = Pipeline(tiny_cfg(tmp_path, overrides))
    pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert_miou_counted(metrics, tmp_path / "data" / "synthetic" / "SegmentationClass")
    cams_dir = pipe.artifact_dir("cams", "train") / "maps"
    irn_dir = pipe.artifact_dir("irn", "train")
    ids = sorted(p.stem for p in cams_dir.glob("*.npz"))
    for image_id in ids[:6]:  # the relation labels: the band rule on the stored maps (no CRF)
        c = read_cams(cams_dir / f"{image_id}.npz")
        ref = np.zeros(c["maps"].shape[1:], np.uint8)
        if len(c["keys"]):
            best, arg = c["maps"].max(0), c["maps"].argmax(0)
            ref = np.where(best > 0.7, c["keys"][arg] + 1, np.where(best <= 0.3, 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(read_mask(irn_dir / "ir_labels" / f"{image_id}.png"), ref)
    net = load_irn(irn_dir / "irn.pt", torch.device("cpu"))
    classifier, _ = load_checkpoint(pipe.artifact_dir("train", "train") / "model.pt")
    for k, v in classifier.backbone.state_dict().items():  # trunk=classifier, frozen through training
        torch.testing.assert_close(net.backbone.state_dict()[k], v, rtol=0, atol=0, msg=k)
    refined = pipe.artifact_dir("refine", "train") / "maps"
    masks = pipe.artifact_dir("pseudo_masks", "train") / "masks"
    for image_id in ids[:6]:
        r = read_cams(refined / f"{image_id}.npz")
        mask = read_mask(masks / f"{image_id}.png")
        if len(r["keys"]) == 0:
            assert (mask == 0).all()
            continue
        assert np.all(r["background"] == 0.25)
        assert r["maps"].max() == pytest.approx(1.0, abs=1e-3)  # divided by the image's largest value
        scores = np.concatenate([r["background"][None], r["maps"]])
        ref = np.concatenate([[0], r["keys"] + 1])[scores.argmax(0)]
        np.testing.assert_array_equal(mask, ref)


def test_ir_label_combines_the_two_labellings_as_irn(monkeypatch):
    """conf = fg; 255 where fg is background; 0 where both are: a CRF that contradicts itself shows the order."""
    import wsss.refine.irn as irn

    calls = []

    def fake_crf(image, index, n):  # first call: the fg labelling, second: the bg labelling
        calls.append(n)
        out = np.zeros_like(index)
        if len(calls) == 1:
            out[:, :5] = 1  # fg: class slot 1 on the left half
        else:
            out[:, 3:] = 2  # bg: class slot 2 from column 3
        return out

    monkeypatch.setattr(irn, "crf_label", fake_crf)
    got = irn.ir_label(np.zeros((2, 10, 3), np.uint8), np.zeros((2, 2, 10), np.float32), np.array([3, 8]), 0.3, 0.05)
    assert calls == [3, 3]
    assert got[0, :5].tolist() == [4] * 5  # fg wins wherever it has a class, whatever bg says
    assert got[0, 5:].tolist() == [255] * 5  # fg background, bg class: no relation
    calls.clear()
    monkeypatch.setattr(irn, "crf_label", lambda image, index, n: np.zeros_like(index))
    got = irn.ir_label(np.zeros((2, 10, 3), np.uint8), np.zeros((2, 2, 10), np.float32), np.array([3, 8]), 0.3, 0.05)
    assert (got == 0).all()  # both background: background


def test_refine_irn_runs_on_the_shared_voc_sample(shared_data, tmp_path):
    """The irn stage and walk on real VOC images (the first 6 of the val list, resnet_tiny from scratch: a run, not
    a score)."""
    from tests.data_fixtures import voc_sample_subset
    from tests.tiny import run_cli

    root = voc_sample_subset(shared_data, tmp_path / "voc", "val", 6)
    proc = run_cli(
        tmp_path,
        [
            "dataset=voc12",
            f"dataset.root={root}",
            "dataset.train_split=val",
            "dataset.eval_split=val",
            "train.crop_size=128",
            "pseudo.refine=irn",
            "pseudo.threshold=0.3",
            "irn.crop_size=128",
            "irn.radius=5",
            "irn.epochs=1",
            "irn.batch_size=8",
            "refine.irn_steps=16",
            "evaluate.bootstrap=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["refine"] == "irn"
    assert metrics["num_images"] == 6
    assert_miou_counted(metrics, root / "SegmentationClass")  # the headline: IRN's masks
    assert "seeds" in metrics
