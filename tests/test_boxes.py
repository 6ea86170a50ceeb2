"""MaxBoxAcc / MaxBoxAccV2 against an independent per-threshold reference.

The reference re-derives the protocol without sharing code with `wsss.metrics.boxes`: components come from
scikit-image's 8-connected labelling (not OpenCV's contours), IoU from counting the pixels of rasterised boxes
(not the "+1" formula), and each threshold is scored on its own (no level binning, no reuse of equal maps).
Maps are built so that the largest component by pixel count is also the largest by contour area.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops

from wsss.metrics.boxes import BOX_DELTAS, BoxAccuracy, box_iou, box_scores, pair_ious

THRESHOLDS = [i / 20 for i in range(20)]  # 0.00 .. 0.95


def _pixels(box, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def _ref_iou(a, b, shape) -> float:
    pa, pb = _pixels(a, shape), _pixels(b, shape)
    return (pa & pb).sum() / (pa | pb).sum()


def _ref_pair(scores: np.ndarray, thresholds, gt_boxes) -> np.ndarray:
    """(T, 2) best IoU of the largest / of any component, one threshold at a time."""
    canvas = (max(scores.shape[0], *(b[3] + 1 for b in gt_boxes)), max(scores.shape[1], *(b[2] + 1 for b in gt_boxes)))
    out = np.zeros((len(thresholds), 2))
    for j, t in enumerate(thresholds):
        regions = regionprops(label(scores.astype(np.float64) >= t, connectivity=2))
        if not regions:
            continue
        boxes = [(r.bbox[1], r.bbox[0], r.bbox[3] - 1, r.bbox[2] - 1) for r in regions]
        best = [max(_ref_iou(e, g, canvas) for g in gt_boxes) for e in boxes]
        big = int(np.argmax([r.area for r in regions]))
        out[j] = best[big], max(best)
    return out


def _ref_scores(pairs, thresholds) -> dict:
    """MaxBoxAcc and MaxBoxAccV2 over a list of (scores, gt boxes) pairs, straight from the definition."""
    ious = np.stack([_ref_pair(s, thresholds, g) for s, g in pairs])  # (P, T, 2)
    acc = lambda col, delta: 100.0 * (ious[:, :, col] >= delta).mean(0)  # noqa: E731
    return {
        "maxboxacc": acc(0, 0.5).max(),
        "maxboxacc_v2": np.mean([acc(1, d).max() for d in BOX_DELTAS]),
    }


def _blob(shape, box, value) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


def test_box_iou_counts_pixels_inclusively():
    a, b = [0, 0, 9, 9], [5, 5, 14, 14]  # 100 px each, 25 px shared
    assert box_iou([a], [b])[0, 0] == pytest.approx(25 / 175)
    assert box_iou([a], [a])[0, 0] == 1.0
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0  # a one-pixel box has area 1, not 0
    assert box_iou([a], [[10, 0, 19, 9]])[0, 0] == 0.0  # adjacent, no shared pixel


def test_several_components_and_several_gt_boxes():
    shape = (40, 50)
    # Three blobs of different heights and sizes: the components and the largest change with the threshold.
    m = _blob(shape, (2, 2, 17, 15), 0.9) + _blob(shape, (25, 20, 31, 26), 0.6) + _blob(shape, (40, 30, 47, 37), 0.3)
    gt = np.array([[26, 20, 32, 27], [1, 1, 16, 14]])
    got = pair_ious(m, THRESHOLDS, gt)
    np.testing.assert_allclose(got, _ref_pair(m, THRESHOLDS, gt), rtol=0, atol=1e-12)
    # At 0.5 the big blob is largest, but the small one matches its gt box better: V2 sees it, V1 does not.
    j = THRESHOLDS.index(0.5)
    assert got[j, 0] == pytest.approx(_ref_iou((2, 2, 17, 15), (1, 1, 16, 14), shape))
    assert got[j, 1] == pytest.approx(_ref_iou((2, 2, 17, 15), (1, 1, 16, 14), shape))
    j = THRESHOLDS.index(0.25)
    assert got[j, 1] >= got[j, 0]


def test_random_maps_match_reference():
    rng = np.random.default_rng(3)
    for _ in range(6):
        m = rng.random((24, 30)).astype(np.float32) ** 2  # speckle: many small components, many ties in area
        m[5:15, 4:20] = 1.0  # one solid block: the largest component at every threshold, by any measure
        gt = np.array([[4, 5, 19, 14], [0, 0, 3, 3]])
        ref = _ref_pair(m, THRESHOLDS, gt)
        got = pair_ious(m, THRESHOLDS, gt)
        np.testing.assert_allclose(got[:, 1], ref[:, 1], atol=1e-12)  # any component: no tie can matter
        np.testing.assert_allclose(got[:, 0], ref[:, 0], atol=1e-12)


def test_empty_map_scores_only_at_threshold_zero():
    shape = (20, 30)
    gt = np.array([[0, 0, 29, 19]])  # the whole image
    got = pair_ious(np.zeros(shape, np.float16), THRESHOLDS, gt)
    np.testing.assert_allclose(got, _ref_pair(np.zeros(shape), THRESHOLDS, gt))
    assert got[0].tolist() == [1.0, 1.0]  # map >= 0 everywhere: the whole-image box
    assert not got[1:].any()  # above 0 nothing is foreground: no box, IoU 0 (the reference's (0,0,0,0) box aside)


def test_map_of_ones_gives_the_image_box_at_every_threshold():
    shape = (20, 30)
    gt = np.array([[5, 5, 14, 9]])
    got = pair_ious(np.ones(shape, np.float32), THRESHOLDS, gt)
    np.testing.assert_allclose(got, _ref_pair(np.ones(shape), THRESHOLDS, gt))
    np.testing.assert_allclose(got, 50 / 600)


def test_one_pixel_between_thresholds_changes_the_boxes():
    m = _blob((10, 12), (0, 0, 4, 4), 1.0)
    m[8, 10] = 0.52  # the only score in [0.5, 0.55): its own component at 0.50, gone at 0.55
    gt = np.array([[10, 8, 10, 8]])
    got = pair_ious(m, THRESHOLDS, gt)
    np.testing.assert_allclose(got, _ref_pair(m, THRESHOLDS, gt))
    assert got[THRESHOLDS.index(0.5), 1] == 1.0
    assert got[THRESHOLDS.index(0.55), 1] == 0.0


def test_threshold_compares_exactly_map_ge_tau():
    m = np.full((4, 4), np.float16(0.5))
    got = pair_ious(m, [0.4999, 0.5, 0.5001], np.array([[0, 0, 3, 3]]))
    assert got[:, 0].tolist() == [1.0, 1.0, 0.0]  # 0.5 >= 0.5 is in, 0.5 >= 0.5001 is out
    # float32(0.7) = 0.69999999 lies below the real 0.7, float32(0.3) = 0.30000001 above the real 0.3.
    for value, t, inside in ((0.7, 0.7, False), (0.3, 0.3, True)):
        m = np.full((3, 3), np.float32(value))
        assert pair_ious(m, [t], np.array([[0, 0, 2, 2]]))[0, 0] == float(inside), (value, t)
        assert (np.float64(np.float32(value)) >= t) == inside


def test_accumulated_scores_match_reference():
    rng = np.random.default_rng(0)
    shape = (30, 40)
    acc = BoxAccuracy(THRESHOLDS)
    pairs = []
    for _ in range(5):  # images with two classes each, one with two gt boxes
        a = _blob(shape, (2, 3, 15, 20), rng.uniform(0.4, 1)) + rng.uniform(0, 0.3, shape).astype(np.float32)
        b = _blob(shape, (20, 5, 35, 25), rng.uniform(0.4, 1)) * rng.uniform(0.5, 1, shape).astype(np.float32)
        boxes = {
            0: np.array([[3, 4, 14, 22]]),
            2: np.array([[19, 5, 36, 24], [0, 0, 2, 2]]),
        }
        acc.image_hits(np.stack([a, b]), [0, 2], boxes)
        pairs += [(a, boxes[0]), (b, boxes[2])]
    # Two blobs whose smaller one is the object: every component (V2) finds it, the largest (V1) does not.
    c = _blob(shape, (1, 1, 20, 25), 0.8) + _blob(shape, (30, 2, 36, 8), 0.7)
    acc.image_hits(np.stack([c]), [3], {3: np.array([[30, 2, 36, 8]])})
    pairs.append((c, np.array([[30, 2, 36, 8]])))
    acc.image_hits(np.stack([a]), [1], boxes)  # class 1 has no box: left out, counted
    got, ref = acc.compute(), _ref_scores(pairs, THRESHOLDS)
    assert ref["maxboxacc_v2"] > ref["maxboxacc"]
    assert got["pairs"] == 11
    assert got["pairs_without_box"] == 1
    assert got["maxboxacc"] == pytest.approx(ref["maxboxacc"], abs=1e-9)
    assert got["maxboxacc_v2"] == pytest.approx(ref["maxboxacc_v2"], abs=1e-9)


def test_each_delta_takes_its_own_best_threshold():
    hits = np.zeros((3, 4), np.int64)
    hits[:, 1] = [4, 2, 0]  # delta 0.3 best at t0
    hits[:, 2] = [1, 3, 0]  # delta 0.5 best at t1
    hits[:, 3] = [0, 1, 2]  # delta 0.7 best at t2
    hits[:, 0] = [0, 2, 2]  # ties go to the lowest threshold
    s = box_scores(hits, 4, [0.1, 0.2, 0.3])
    assert s["maxboxacc"] == 50.0
    assert s["maxboxacc_threshold"] == 0.2
    assert s["maxboxacc_v2"] == pytest.approx((100 + 75 + 50) / 3)
    assert s["v2_per_delta"] == {"0.3": [100.0, 0.1], "0.5": [75.0, 0.2], "0.7": [50.0, 0.3]}
    assert np.isnan(box_scores(hits * 0, 0, [0.1, 0.2, 0.3])["maxboxacc"])
