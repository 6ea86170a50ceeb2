"""Per-image statistics and the bootstrap against slow references that re-run the real accumulators.

The reference for a resample feeds the drawn images (repeats included) one by one to a fresh
`ConfusionMatrix`, `ThresholdSweep` and `BoxAccuracy`, and scores them with `scores` / `best_threshold` /
`compute_pxap` / `compute`: nothing of the bootstrap's sums or its sparse sweep layout is shared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.metrics import ConfusionMatrix, ThresholdSweep, best_threshold, scores
from wsss.metrics.bootstrap import (
    ImageStats,
    ImageStatsBuilder,
    bootstrap_intervals,
    interval,
    resample_weights,
    resampled_metrics,
)
from wsss.metrics.boxes import BoxAccuracy
from wsss.pseudo import threshold_mask

C = 4  # foreground classes
THRESHOLDS = [i / 10 for i in range(10)]


def _images(n: int, seed: int = 0) -> list[dict]:
    """Random images: gt with a void band, 1-2 keys with blob-shaped maps, gt boxes of each key's class."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(12, 20, 2)
        gt = np.zeros((h, w), np.uint8)
        keys = np.sort(rng.choice(C, rng.integers(1, 3), replace=False))
        maps, boxes = [], {}
        for c in keys:
            y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
            y1, x1 = y0 + rng.integers(3, 6), x0 + rng.integers(3, 6)
            gt[y0:y1, x0:x1] = c + 1
            gt[y1 - 1, x0:x1] = 255
            m = rng.random((h, w)).astype(np.float32) * 0.6
            m[max(0, y0 - 1) : y1, x0:x1] += 0.4
            maps.append(np.clip(m, 0, 1))
            boxes[int(c)] = np.array([[x0, y0, x1 - 1, y1 - 1]])
        if i % 5 == 0:  # a class in the ground truth but not in the keys
            gt[:2, :2] = (keys[0] + 1) % C + 1
        out.append({"id": f"im{i}", "gt": gt, "keys": keys, "maps": np.stack(maps), "boxes": boxes})
    return out


def _collect(images: list[dict]) -> ImageStats:
    sweep = ThresholdSweep(C + 1, THRESHOLDS, pxap_bins=50, keep_last=True)
    box = BoxAccuracy(THRESHOLDS)
    b = ImageStatsBuilder(C + 1, THRESHOLDS)
    for im in images:
        gt, maps, keys = torch.from_numpy(im["gt"]), torch.from_numpy(im["maps"]), torch.from_numpy(im["keys"])
        cm = ConfusionMatrix(C + 1)
        cm.update(gt, threshold_mask(maps, keys, 0.5))
        sweep.update(maps, keys, gt)
        hits, pairs, _ = box.score_image(im["maps"], im["keys"], im["boxes"])
        b.add(im["id"], cm.compute(), sweep.last_hist, sweep.last_pxap_hist, hits, pairs)
    return b.build()


def _reference(images: list[dict]) -> dict[str, float]:
    """Every metric of the images listed (repeats counted), from the real accumulators."""
    cm = ConfusionMatrix(C + 1)
    sweep = ThresholdSweep(C + 1, THRESHOLDS, pxap_bins=50)
    box = BoxAccuracy(THRESHOLDS)
    for im in images:
        gt, maps, keys = torch.from_numpy(im["gt"]), torch.from_numpy(im["maps"]), torch.from_numpy(im["keys"])
        cm.update(gt, threshold_mask(maps, keys, 0.5))
        sweep.update(maps, keys, gt)
        box.image_hits(im["maps"], im["keys"], im["boxes"])
    boxes = box.compute()
    return {
        "miou": scores(cm.compute())["miou"],
        "sweep_best_miou": best_threshold(sweep.compute(), THRESHOLDS)[1]["miou"],
        "pxap": sweep.compute_pxap()["pxap"],
        "maxboxacc": boxes["maxboxacc"],
        "maxboxacc_v2": boxes["maxboxacc_v2"],
    }


def test_full_sample_equals_the_accumulators():
    images = _images(12)
    stats = _collect(images)
    got = resampled_metrics(stats, np.ones((1, len(images))))
    ref = _reference(images)
    for k, v in ref.items():
        assert got[k][0] == pytest.approx(v, abs=1e-9), k


def test_resamples_equal_an_explicit_resample_loop():
    images = _images(15, seed=1)
    stats = _collect(images)
    w = resample_weights(len(images), 6, seed=7)
    got = resampled_metrics(stats, w)
    draws = np.random.default_rng(7).integers(0, len(images), (6, len(images)))
    for b in range(6):
        ref = _reference([images[i] for i in draws[b]])
        for k, v in ref.items():
            assert got[k][b] == pytest.approx(v, abs=1e-9), (k, b)


def test_weights_are_counts_of_the_draws():
    w = resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7)
    assert (w.sum(1) == 7).all()
    draws = np.random.default_rng(3).integers(0, 7, (50, 7))
    np.testing.assert_array_equal(w[4], np.bincount(draws[4], minlength=7))


def test_interval_of_a_seeded_bootstrap_is_reproducible_and_covers_the_estimate():
    images = _images(30, seed=2)
    stats = _collect(images)
    a = bootstrap_intervals(stats, 200, seed=0)
    assert a == bootstrap_intervals(stats, 200, seed=0)
    assert a != bootstrap_intervals(stats, 200, seed=1)
    full = resampled_metrics(stats, np.ones((1, len(images))))
    for k, (lo, hi) in a.items():
        assert lo < full[k][0] < hi, k


def test_interval_is_the_percentiles():
    values = np.arange(1001, dtype=np.float64)
    assert interval(values) == pytest.approx([25.0, 975.0])
    assert interval(np.array([1.0, np.nan, 3.0]), level=1.0) == [1.0, 3.0]


def test_save_and_load_round_trip(tmp_path):
    stats = _collect(_images(5))
    stats.save(tmp_path / "per_image.npz")
    back = ImageStats.load(tmp_path / "per_image.npz")
    assert back.ids == stats.ids
    assert back.num_labels == C + 1
    for name in ("masks", "sweep_tp", "sweep_pred", "sweep_gt", "sweep_labels", "sweep_offsets", "pxap", "box_hits"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    w = resample_weights(5, 20, 0)
    for k, v in resampled_metrics(stats, w).items():
        np.testing.assert_array_equal(resampled_metrics(back, w)[k], v)


def test_resampled_maxboxacc_v2_takes_each_delta_at_its_own_best_threshold():
    """MaxBoxAccV2 of a resample is the mean over IoU levels of (max over thresholds), wsolevaluation's
    `BoxEvaluator.compute`; here each level peaks at another threshold, so max-of-the-mean would differ.
    Hand-counted hits (columns largest@0.5, all@0.3, all@0.5, all@0.7) of two images with 2 pairs each."""
    a = np.array([[1, 2, 1, 0], [1, 2, 2, 1], [0, 1, 1, 1]])  # (T, 4)
    b = np.array([[0, 2, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    s = ImageStats(["a", "b"], np.array([0.2, 0.4, 0.6]), box_hits=np.stack([a, b]), box_pairs=np.array([2, 2]))
    got = resampled_metrics(s, np.array([[1.0, 1.0], [0.0, 2.0]]))
    # both: all@0.3 4/4 at t0, all@0.5 3/4 at t1, all@0.7 2/4 at t2; largest@0.5 2/4 at t1
    # b twice: all@0.3 2/2 at t0, all@0.5 1/2 at t1, all@0.7 1/2 at t2; largest@0.5 1/2 at t1
    np.testing.assert_allclose(got["maxboxacc_v2"], [(100 + 75 + 50) / 3, (100 + 50 + 50) / 3])
    np.testing.assert_allclose(got["maxboxacc"], [50.0, 50.0])
