"""Refinements against independent references, and IRN's padded-canvas CAMs against a float64 transcription."""

from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb, slic

try:
    import tests.cam_models as cm
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import cam_models as cm

from wsss.cam import CAM
from wsss.models.affinity import affinity_loss, half_disk
from wsss.pseudo import pseudo_mask
from wsss.refine import dense_crf, par_refine, random_walk, superpixel_vote
from wsss.refine.superpixel import segments


def _irn_make_cam(model, image: torch.Tensor, classes: list[int], scales) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's step/make_cam.py in float64, one image: per scale, ReLU(conv(features, classifier weights)) of the
    image plus that of its flip (flipped back); strided maps summed at get_strided_size(size, 4); high-res maps
    upsampled to get_strided_up_size(size, 16), summed, cropped to (H, W); each divided by its max + 1e-5."""
    m = copy.deepcopy(model).double().eval()
    h, w = image.shape[-2:]
    strided_size = ((h - 1) // 4 + 1, (w - 1) // 4 + 1)
    up = (((h - 1) // 16 + 1) * 16, ((w - 1) // 16 + 1) * 16)
    weight = m.fc.weight.detach()[classes]  # (K, C)
    strided, high = 0, 0
    for s in scales:
        x = F.interpolate(image.double(), size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)])  # (2, 3, h_s, w_s): the image and its flip
        with torch.no_grad():
            cams = torch.einsum("kc,bchw->bkhw", weight, m.features(x)).relu()
        o = cams[0] + cams[1].flip(-1)  # (K, h, w)
        strided = strided + F.interpolate(o[None], strided_size, mode="bilinear", align_corners=False)[0]
        high = high + F.interpolate(o[:, None], up, mode="bilinear", align_corners=False)[:, 0]
    high = high[:, :h, :w]
    norm = lambda t: t / (t.amax((-2, -1), keepdim=True) + 1e-5)  # noqa: E731
    return norm(high), norm(strided)


def test_padded_canvas_matches_irn_make_cam():
    model = cm.TwoConvGAP(num_classes=5, seed=2)
    image = torch.randn(1, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    scales = (1.0, 0.5, 1.5, 2.0)
    expected_high, expected_low = _irn_make_cam(model, image, [3, 1], scales)
    with CAM(model, "features", norm_eps=1e-5) as cam:
        high, low = cam.multiscale(image, torch.tensor([[3, 1]]), scales, True, canvas_stride=16)
        straight, _ = cam.multiscale(image, torch.tensor([[3, 1]]), scales, True)
    torch.testing.assert_close(high[0].double(), expected_high, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(low[0].double(), expected_low, rtol=1e-4, atol=1e-5)
    # The canvas matters: resizing straight to (H, W) gives other maps (so the test can tell them apart).
    assert (straight[0].double() - expected_high).abs().max() > 0.01


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="needs pip install -e '.[crf]'")
def test_crf_equals_a_direct_pydensecrf_call():
    import pydensecrf.densecrf as dcrf

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    maps = rng.random((2, 12, 15)).astype(np.float32)
    fg, bg = dense_crf(image, maps, 0.4)
    # Direct: probabilities of [0.4, maps] normalised per pixel, unary -log p, PSA's kernels, 10 iterations.
    scores = np.concatenate([np.full((1, 12, 15), 0.4), maps]).astype(np.float64)
    probs = scores / scores.sum(0)
    d = dcrf.DenseCRF2D(15, 12, 3)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(3, -1).astype(np.float32)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    q = np.array(d.inference(10)).reshape(3, 12, 15)
    np.testing.assert_allclose(bg, q[0], atol=1e-5)
    np.testing.assert_allclose(fg, q[1:], atol=1e-5)
    np.testing.assert_allclose(fg.sum(0) + bg, 1.0, atol=1e-4)


def _par_reference(image: np.ndarray, maps: np.ndarray, dilations, iterations, w1=0.3, w2=0.01) -> np.ndarray:
    """PAR by its definition, float64 loops over pixels and neighbours (replicate borders, unbiased stds)."""
    _, h, w = image.shape
    offsets = [
        (dy * d, dx * d)
        for d in dilations
        for dy, dx in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    ]
    dist = np.array([math.hypot(dy, dx) for dy, dx in offsets])
    pos = -((dist / dist.std(ddof=1) / w1) ** 2)
    pos = np.exp(pos - pos.max()) / np.exp(pos - pos.max()).sum()
    weights = np.zeros((h, w, len(offsets)))
    for y in range(h):
        for x in range(w):
            nb = np.array(
                [image[:, min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)] for dy, dx in offsets]
            )  # (N, 3)
            sd = nb.std(0, ddof=1)
            a = -(((np.abs(nb - image[:, y, x]) / (sd + 1e-8) / w1) ** 2).mean(1))
            weights[y, x] = np.exp(a - a.max()) / np.exp(a - a.max()).sum() + w2 * pos
    out = maps.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(out)
        for y in range(h):
            for x in range(w):
                for n, (dy, dx) in enumerate(offsets):
                    new[:, y, x] += weights[y, x, n] * out[:, min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
        out = new
    return out / (1 + w2) ** iterations


def test_par_equals_a_float64_loop_over_neighbours():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (3, 7, 9))
    maps = rng.random((2, 7, 9))
    got = par_refine(
        torch.tensor(image)[None].float(), torch.tensor(maps)[None].float(), dilations=(1, 2), iterations=3
    )
    np.testing.assert_allclose(got[0].numpy(), _par_reference(image, maps, (1, 2), 3), rtol=1e-4, atol=1e-5)
    flat = par_refine(torch.tensor(image)[None].float(), torch.full((1, 1, 7, 9), 0.3), dilations=(1, 2), iterations=3)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.3))  # a constant map stays itself (AFA's background)


def test_random_walk_equals_a_dense_matrix_power():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(4, 5, 6))
    maps = rng.random((3, 5, 6))
    got = random_walk(torch.tensor(maps).float(), torch.tensor(feats).float(), radius=3, beta=4.0, steps=7)
    n = 30
    coords = [(y, x) for y in range(5) for x in range(6)]
    a = np.zeros((n, n))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            d2 = (yi - yj) ** 2 + (xi - xj) ** 2
            if i == j:
                a[i, j] = 1.0
            elif d2 < 9:
                a[i, j] = np.exp(-np.abs(feats[:, yi, xi] - feats[:, yj, xj]).mean()) ** 4.0
    t = a / a.sum(0, keepdims=True)  # columns sum to 1
    expected = maps.reshape(3, n) @ np.linalg.matrix_power(t, 7)
    np.testing.assert_allclose(got.numpy().reshape(3, n), expected, rtol=1e-4, atol=1e-6)


def test_random_walk_batches_images_without_mixing_them():
    """A batch walks as its images do one by one: the transition is block-diagonal, no pair crosses images."""
    gen = torch.Generator().manual_seed(4)
    feats, maps = torch.randn(3, 8, 6, 7, generator=gen), torch.rand(3, 4, 6, 7, generator=gen)
    batched = random_walk(maps, feats, radius=3, beta=2.0, steps=5)
    for i in range(3):
        torch.testing.assert_close(batched[i], random_walk(maps[i], feats[i], radius=3, beta=2.0, steps=5))
    with pytest.raises(ValueError, match="batch size"):
        random_walk(maps[:2], feats, radius=3)


@pytest.mark.parametrize("threshold", [0.5, 0.16, 0.3, 0.8])
def test_background_alpha_makes_unwalked_maps_the_seeds(threshold):
    """argmax over [(1 - max)^alpha, maps] (PSA's background) equals the threshold rule when alpha comes from the
    threshold: (1 - t)^alpha = t."""
    from wsss.pseudo import threshold_mask
    from wsss.refine.random_walk import background_alpha, background_map

    alpha = background_alpha(threshold)
    assert (1 - threshold) ** alpha == pytest.approx(threshold, rel=1e-12)
    maps = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    keys = torch.tensor([0, 4, 7])
    got = threshold_mask(maps, keys, 0.0, background=background_map(maps, alpha))
    np.testing.assert_array_equal(got.numpy(), threshold_mask(maps, keys, threshold).numpy())
    assert background_alpha(0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"got 1\.0"):
        background_alpha(1.0)


def test_superpixel_vote_equals_a_loop_over_segments():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (8, 9))
    maps = rng.random((2, 8, 9)).astype(np.float32)
    got = superpixel_vote(maps, labels)
    for s in np.unique(labels):
        where = labels == s
        for k in range(2):
            np.testing.assert_allclose(got[k][where], maps[k][where].mean(), rtol=1e-6)


def _blocky_image(seed: int) -> np.ndarray:
    """(48, 56, 3) uint8: flat colour blocks plus noise, so both algorithms find several segments."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3)).repeat(12, 0).repeat(14, 1)
    return np.clip(blocks + rng.normal(0, 12, blocks.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("method", "direct"),
    [
        ("felzenszwalb", lambda image: felzenszwalb(image, scale=37.0)),
        ("slic", lambda image: slic(image, n_segments=23, compactness=4.0, start_label=0)),
    ],
    ids=["felzenszwalb", "slic"],
)
def test_segments_equal_a_direct_scikit_image_call(method, direct):
    """`segments` is scikit-image's algorithm with the settings the config documents (Felzenszwalb's scale;
    SLIC's n_segments and compactness, labels from 0) and scikit-image's defaults for everything else."""
    image = _blocky_image(7)
    got = segments(image, method, n_segments=23, compactness=4.0, scale=37.0)
    expected = direct(image)
    assert got.shape == image.shape[:2]
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0
    assert len(np.unique(got)) > 4
    # The settings reach the algorithm: other values give other segments (so the test can tell them apart).
    assert not np.array_equal(got, segments(image, method, n_segments=60, compactness=30.0, scale=300.0))
    with pytest.raises(ValueError, match="'watershed'"):
        segments(image, "watershed")


def test_superpixel_run_maps_are_the_vote_over_felzenszwalb_segments(tmp_path):
    """pseudo.refine=superpixel end to end (default settings: Felzenszwalb, 2 workers): each refined npz is the
    seeds' mean over the segments of felzenszwalb(image, scale=superpixel_scale), recomputed here with a loop
    over segments in float64; the masks are the threshold rule applied to the refined maps."""
    from PIL import Image

    from tests.tiny import irn_mask, tiny_cfg
    from wsss.artifacts import read_cams
    from wsss.data import build_source
    from wsss.pipeline import Pipeline

    pipe = Pipeline(tiny_cfg(tmp_path, ["pseudo.refine=superpixel", "refine.superpixel_scale=50"]))
    pipe.run("pseudo_masks")
    assert pipe.report["refine"] == "ran"
    source = build_source(pipe.cfg.dataset, "train")
    changed = 0
    for path in sorted((pipe.artifact_dir("cams") / "maps").glob("*.npz")):
        seeds = read_cams(path)
        refined = read_cams(pipe.artifact_dir("refine") / "maps" / path.name)
        np.testing.assert_array_equal(refined["keys"], seeds["keys"])
        labels = felzenszwalb(source.load_image(path.stem).permute(1, 2, 0).numpy(), scale=50.0)
        expected = np.zeros(seeds["maps"].shape)
        for s in np.unique(labels):
            where = labels == s
            expected[:, where] = seeds["maps"][:, where].astype(np.float64).mean(1, keepdims=True)
        np.testing.assert_allclose(refined["maps"], expected, rtol=0, atol=2**-11, err_msg=path.stem)  # float16
        mask = np.array(Image.open(pipe.artifact_dir("pseudo_masks") / "masks" / f"{path.stem}.png"))
        np.testing.assert_array_equal(mask, irn_mask(refined["maps"], refined["keys"], 0.5), err_msg=path.stem)
        changed += bool(len(seeds["keys"])) and np.abs(refined["maps"] - seeds["maps"]).max() > 0.01
    assert changed > 0  # the vote moved some maps (a trained tiny model leaves some images all zero)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(
            "crf",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("pydensecrf") is None, reason="needs pip install -e '.[crf]'"
            ),
        ),
        "superpixel",
    ],
)
def test_two_refine_workers_write_the_bytes_of_one(tmp_path, monkeypatch, method):
    """refine.workers=2 goes through the process pool (counted here) and writes every refined npz byte for byte
    as refine.workers=1 does in this process."""
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from tests.tiny import tiny_cfg
    from wsss import parallel
    from wsss.pipeline import Pipeline

    pools: list[int] = []

    class CountedPool(ProcessPoolExecutor):
        def __init__(self, max_workers, *args, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers, *args, **kwargs)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", CountedPool)
    written = {}
    for workers in (1, 2):
        pipe = Pipeline(tiny_cfg(tmp_path, [f"pseudo.refine={method}", "stage=refine", f"refine.workers={workers}"]))
        pipe.run("refine")
        assert pipe.report["refine"] == "ran"
        written[workers] = {p.name: p.read_bytes() for p in (pipe.artifact_dir("refine") / "maps").glob("*.npz")}
        shutil.rmtree(pipe.artifact_dir("refine"))  # workers is not in the key: the second run builds anew
    assert pools == [2]  # one pool, for the two-worker run only
    assert len(written[1]) == 24
    assert sorted(written[2]) == sorted(written[1])
    assert [name for name in written[1] if written[2][name] != written[1][name]] == []


def test_affinity_labels_and_loss_by_hand():
    """Band labels (IRN's rule) and the three pair losses on a 1 x 4 strip, computed by hand."""
    maps = torch.tensor([[[0.9, 0.8, 0.2, 0.02]]])  # one class: fg above 0.5, bg at or below 0.1, else 255
    labels = pseudo_mask(maps, torch.tensor([2]), conf_fg=0.5, conf_bg=0.1)
    assert labels.tolist() == [[3, 3, 255, 0]]
    labels = torch.tensor([[[3, 3, 0, 0]]])  # (1, 1, 4)
    features = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]])  # (1, D=1, 1, 4)
    assert half_disk(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    loss, counts = affinity_loss(features, labels, radius=2)
    # Pairs (0,1) fg-fg same class: a = 1; (1,2) fg-bg: a = e^-1; (2,3) bg-bg: a = 1.
    assert counts.tolist() == [1.0, 1.0, 1.0]  # bg-pos, fg-pos, neg
    expected = -math.log(1 + 1e-5) / 4 + -math.log(1 + 1e-5) / 4 + -math.log(1 + 1e-5 - math.exp(-1)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    ignored = torch.tensor([[[3, 255, 0, 0]]])
    _, counts = affinity_loss(features, ignored, radius=2)
    assert counts.tolist() == [1.0, 0.0, 0.0]  # only (2,3) is a labelled pair


def test_refined_run_reports_seeds_and_masks_side_by_side(tmp_path):
    """pseudo.refine=par: the `seeds` block of metrics.json scores the threshold rule on the stored CAMs, the
    `masks` block the rule on the refined maps, both recomputed here pixel by pixel against the ground truth;
    summary.md names both, the overlay grid has a seed panel, the masks are the rule applied to the refined maps."""
    import json

    from PIL import Image

    from tests.tiny import FIGURES, assert_reported_iou, ground_truth, irn_mask, loop_iou, tiny_cfg
    from wsss.artifacts import read_cams
    from wsss.pipeline import Pipeline

    pipe = Pipeline(tiny_cfg(tmp_path, ["pseudo.refine=par", "refine.par_dilations=[1,2]", *FIGURES]))
    pipe.run("evaluate")
    out = pipe.artifact_dir("evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"]["split"] == metrics["masks"]["split"] == "train"
    assert metrics["seeds"]["name"] == "seeds"
    assert metrics["masks"]["name"] == "masks (par)"
    assert metrics["refine"] == "par"
    assert metrics["masks_rule"] == {"threshold": 0.5}
    names = ["background", *metrics["class_names"]]
    ids = list(metrics["per_image_miou"])
    assert len(ids) == 24
    for block, stage in (("seeds", "cams"), ("masks", "refine")):
        pairs = []
        for image_id in ids:
            z = read_cams(pipe.artifact_dir(stage) / "maps" / f"{image_id}.npz")
            pairs.append((ground_truth(tmp_path, image_id), irn_mask(z["maps"], z["keys"], 0.5)))
        iou, miou = loop_iou(pairs, len(names))
        assert_reported_iou(metrics[block], iou, miou, names)
        if block == "masks":
            assert_reported_iou(metrics, iou, miou, names)  # the headline is the refined masks'
    assert metrics["seeds"]["miou"] != metrics["masks"]["miou"]  # PAR moved pixels: the blocks can be told apart
    summary = (out / "summary.md").read_text()
    assert f"| seeds | {metrics['seeds']['miou']:.2f} |" in summary
    assert f"| masks (par) | {metrics['masks']['miou']:.2f} |" in summary
    assert Image.open(out / "overlays.png").size[0] == 5 * 240  # image, CAM, seed, refined, ground truth
    for path in sorted((pipe.artifact_dir("refine") / "maps").glob("*.npz"))[:5]:
        z = read_cams(path)
        got = np.array(Image.open(pipe.artifact_dir("pseudo_masks") / "masks" / f"{path.stem}.png"))
        np.testing.assert_array_equal(got, irn_mask(z["maps"], z["keys"], 0.5))


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="needs pip install -e '.[crf]'")
def test_crf_masks_compare_with_the_background_marginal(tmp_path):
    from tests.tiny import tiny_cfg
    from wsss.artifacts import read_cams, read_mask
    from wsss.pipeline import Pipeline

    pipe = Pipeline(tiny_cfg(tmp_path, ["pseudo.refine=crf", "stage=pseudo_masks", "refine.workers=1"]))
    pipe.run("pseudo_masks")
    for path in sorted((pipe.artifact_dir("refine") / "maps").glob("*.npz"))[:5]:
        z = read_cams(path)
        stack = np.concatenate([z["background"][None], z["maps"]]).astype(np.float64)  # argmax, ties to background
        labels = np.concatenate([[0], z["keys"] + 1])
        expected = labels[np.argmax(stack, 0)].astype(np.uint8)
        np.testing.assert_array_equal(
            read_mask(pipe.artifact_dir("pseudo_masks") / "masks" / f"{path.stem}.png"), expected
        )


def test_crf_spatial_width_scales_with_the_longer_side():
    from wsss.stages.refine import crf_sxy

    assert crf_sxy(80, (375, 500)) == 80.0  # a VOC image: PSA's value
    assert crf_sxy(80, (128, 128)) == pytest.approx(20.48)
    assert crf_sxy(80, (1000, 640)) == 160.0


def test_random_walk_run_masks_take_the_walked_background(tmp_path):
    """pseudo.refine=rw end to end: the affinity stage trains and is reused by a second run; the refined npz
    carry a walked background, and the masks are the argmax over [background, maps], ties to background."""
    from tests.tiny import tiny_cfg
    from wsss.artifacts import read_cams, read_mask
    from wsss.pipeline import Pipeline

    overrides = ["pseudo.refine=rw", "affinity.epochs=1", "affinity.batch_size=8", "refine.rw_steps=8"]
    pipe = Pipeline(tiny_cfg(tmp_path, overrides))
    pipe.run("pseudo_masks")
    assert pipe.report["affinity"] == "ran"
    checked = 0
    for path in sorted((pipe.artifact_dir("refine") / "maps").glob("*.npz")):
        z = read_cams(path)
        if len(z["keys"]) == 0:
            continue
        peak = float(z["maps"].max())  # divided by the image's largest class score (all-zero CAMs stay 0)
        assert peak == pytest.approx(1.0, abs=1e-3) or peak == 0.0
        assert np.isfinite(z["background"]).all()
        stack = np.concatenate([z["background"][None], z["maps"]]).astype(np.float64)
        labels = np.concatenate([[0], z["keys"] + 1])
        expected = labels[np.argmax(stack, 0)].astype(np.uint8)
        got = read_mask(pipe.artifact_dir("pseudo_masks") / "masks" / f"{path.stem}.png")
        np.testing.assert_array_equal(got, expected)
        checked += 1
    assert checked > 0
    again = Pipeline(tiny_cfg(tmp_path, [*overrides, "refine.rw_steps=4"]))
    again.run("pseudo_masks")
    assert again.report["affinity"] == "reused"
    assert again.report["refine"] == "ran"
