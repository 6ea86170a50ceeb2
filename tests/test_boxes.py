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
    # At 0.5 two blobs: the big one is the largest and also the better match (its gt box: 15 x 13 of 16 x 14
    # shared, IoU 195 / 253; the small one's: 6 x 7 of 7 x 7 and 7 x 8, IoU 42 / 63), so V1 and V2 agree.
    j = THRESHOLDS.index(0.5)
    assert got[j].tolist() == pytest.approx([195 / 253, 195 / 253])
    # At 0.25 the third blob joins, far from every gt box: one more candidate, no better match.
    assert got[THRESHOLDS.index(0.25)].tolist() == pytest.approx([195 / 253, 195 / 253])
    # Above 0.6 only the big blob is left; above 0.9 nothing.
    assert got[THRESHOLDS.index(0.65)].tolist() == pytest.approx([195 / 253, 195 / 253])
    assert got[THRESHOLDS.index(0.95)].tolist() == [0.0, 0.0]


def _cv2_largest_box(binary: np.ndarray) -> tuple[int, int, int, int] | None:
    """wsolevaluation's estimate (`compute_bboxes_from_scoremaps`): the outer contour of the largest
    `cv2.contourArea`, its bounding rectangle (here ending on the last pixel, inclusive)."""
    import cv2

    contours = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]
    if not contours:
        return None
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return x, y, x + w - 1, y + h - 1


def test_largest_component_is_the_largest_contour_area_not_box_or_pixel_count():
    """A one-pixel-wide diagonal (120 px, box 120 x 120, contour area 0) beside a 10 x 10 square (100 px,
    contour area 81): wsolevaluation's `max(contours, key=cv2.contourArea)` picks the square, which a box-area or
    a pixel-count rule would not."""
    m = np.zeros((130, 150), np.float32)
    m[np.arange(120), np.arange(120)] = 0.9
    m[5:15, 135:145] = 0.8
    square = (135, 5, 144, 14)
    gt = np.array([square])
    got = pair_ious(m, THRESHOLDS, gt)
    for j, t in enumerate(THRESHOLDS):
        if t == 0.0:
            continue  # the whole image
        want = _cv2_largest_box(m >= t)
        expected = 0.0 if want is None else _ref_iou(want, square, m.shape)
        assert got[j, 0] == pytest.approx(expected), t
    assert got[THRESHOLDS.index(0.8), 0] == 1.0  # the square, by contour area
    assert got[THRESHOLDS.index(0.85), 0] == 0.0  # the square is gone: the diagonal is all there is
    acc = BoxAccuracy(THRESHOLDS)
    acc.image_hits(m[None], [0], {0: gt})
    assert acc.compute()["maxboxacc"] == 100.0


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
