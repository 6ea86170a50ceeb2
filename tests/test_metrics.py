"""wsss.metrics against independent float64 numpy references and hand-computed values.

The references build every pseudo mask with `np.argmax` over the padded stack [t, maps_0, ...] (IRN's rule,
ties to the first entry) in float64, one threshold at a time, and count with `np.add.at`; PxAP follows the
WSOL reference code's `precision[1:] * diff(recall)` over descending thresholds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.metrics import (
    MAXIMISABLE,
    PER_LABEL_KEYS,
    SCALAR_KEYS,
    ConfusionMatrix,
    ThresholdSweep,
    best_threshold,
    confusion_matrix,
    parse_thresholds,
    pixel_ap,
    scores,
    threshold_curves,
)
from wsss.pseudo import pseudo_mask

L = 6  # background + 5 classes
THRESHOLDS = parse_thresholds("0.00:1.00:0.05")  # 0, 0.05, ..., 1 (21 values, some dyadic, most not)


# ---------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------


def ref_pseudo(maps: np.ndarray, keys: np.ndarray, t: float) -> np.ndarray:
    """IRN: argmax over [t, maps...] in float64, ties to the first entry (background)."""
    h, w = maps.shape[1:]
    padded = np.concatenate([np.full((1, h, w), t, np.float64), maps.astype(np.float64)])
    lut = np.concatenate([[0], np.asarray(keys, np.int64) + 1])
    return lut[padded.argmax(0)]


def ref_band(maps: np.ndarray, keys: np.ndarray, conf_fg: float, conf_bg: float) -> np.ndarray:
    """IRN's cam_to_ir_label without CRF: fg at conf_fg, bg at conf_bg, 255 between."""
    fg_conf = ref_pseudo(maps, keys, conf_fg)
    bg_conf = ref_pseudo(maps, keys, conf_bg)
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf


def ref_cm(gt: np.ndarray, pred: np.ndarray, num_labels: int) -> np.ndarray:
    cm = np.zeros((num_labels, num_labels), np.int64)
    valid = (gt != 255) & (pred != 255)
    np.add.at(cm, (gt[valid].astype(np.int64), pred[valid].astype(np.int64)), 1)
    return cm


def ref_scores(cm: np.ndarray) -> dict:
    """Per-label loop in float64; NaN for undefined ratios, means over the defined ones."""
    cm = cm.astype(np.float64)
    out = {k: [] for k in PER_LABEL_KEYS}
    for label in range(len(cm)):
        tp = cm[label, label]
        fp = cm[:, label].sum() - tp
        fn = cm[label, :].sum() - tp
        union = tp + fp + fn
        out["iou"].append(100 * tp / union if union else math.nan)
        out["fp_ratio"].append(100 * fp / union if union else math.nan)
        out["fn_ratio"].append(100 * fn / union if union else math.nan)
        out["precision"].append(100 * tp / (tp + fp) if tp + fp else math.nan)
        out["recall"].append(100 * tp / (tp + fn) if tp + fn else math.nan)

    def mean(values: list[float]) -> float:
        defined = [v for v in values if not math.isnan(v)]
        return sum(defined) / len(defined) if defined else math.nan

    def ratio(a: float, b: float) -> float:
        return 100 * a / b if b else math.nan

    out.update(
        miou=mean(out["iou"]),
        fg_miou=mean(out["iou"][1:]),
        mprecision=mean(out["precision"]),
        mrecall=mean(out["recall"]),
        mfp_ratio=mean(out["fp_ratio"]),
        mfn_ratio=mean(out["fn_ratio"]),
        pixel_accuracy=ratio(np.trace(cm), cm.sum()),
        fg_precision=ratio(cm[1:, 1:].sum(), cm[:, 1:].sum()),
        fg_recall=ratio(cm[1:, 1:].sum(), cm[1:, :].sum()),
        pred_fg_on_gt_bg=ratio(cm[0, 1:].sum(), cm[:, 1:].sum()),
    )
    out["absent"] = [i for i in range(len(cm)) if cm[i, :].sum() + cm[:, i].sum() == 0]
    return out


def ref_pxap(scores_: np.ndarray, positive: np.ndarray, n: int) -> float:
    """As the WSOL reference code: counts at descending thresholds, then sum(precision[1:] * diff(recall))."""
    s = np.clip(scores_.astype(np.float64), 0, 1)
    # Descending thresholds, starting from a point above every score (the reference's ">= 2.0" bin).
    tp, fp = [0.0], [0.0]
    for i in range(n, -1, -1):
        above = s * n >= i  # s >= i/n, exactly: s * n is exact in float64 for float32 s
        tp.append(float((above & positive).sum()))
        fp.append(float((above & ~positive).sum()))
    tp, fp = np.array(tp), np.array(fp)
    if tp[-1] == 0:
        return math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
    recall = tp / tp[-1]
    keep = (tp + fp)[1:] != 0
    return 100 * float((precision[1:] * np.diff(recall))[keep].sum())


def assert_close(actual, expected, what: str) -> None:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaN pattern {a} vs {e}"
    ok = ~np.isnan(e)
    assert np.allclose(a[ok], e[ok], rtol=0, atol=1e-9), f"{what}: {a} vs {e}"


# ---------------------------------------------------------------------------------------------------------
# Random data with every awkward case: 255 in gt, ties with thresholds, ties between classes, no keys
# ---------------------------------------------------------------------------------------------------------


def random_image(rng: np.random.Generator, h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = np.sort(rng.choice(L - 1, size=k, replace=False)).astype(np.int64)
    maps = rng.random((k, h, w)).astype(np.float32)
    if k:
        spots = rng.random((k, h, w)) < 0.25
        # Values exactly at thresholds: dyadic ones (a tie, so background) and float32 roundings of
        # non-dyadic ones, which lie just above (0.3, 0.05) or just below (0.7, 0.15) the threshold.
        edge = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.3, 0.05, 0.7, 0.15], np.float32)
        maps[spots] = rng.choice(edge, size=int(spots.sum()))
    if k >= 2:
        tie = rng.random((h, w)) < 0.2
        maps[1][tie] = maps[0][tie]  # equal maps: the first class must win
    present = np.concatenate([[0], keys + 1, rng.integers(0, L, 1)])
    gt = rng.choice(present, size=(h, w)).astype(np.uint8)
    gt[rng.random((h, w)) < 0.1] = 255
    return maps, keys, gt


@pytest.fixture(scope="module")
def images() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = [
        random_image(rng, int(rng.integers(3, 9)), int(rng.integers(3, 9)), int(rng.integers(1, 4))) for _ in range(12)
    ]
    out.append(random_image(rng, 4, 5, 0))  # an image without image-level labels
    return out


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix and scores
# ---------------------------------------------------------------------------------------------------------


def test_confusion_matrix_matches_reference_with_255_on_both_sides():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, L, (9, 11)).astype(np.uint8)
    pred = rng.integers(0, L, (9, 11)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = 255
    pred[rng.random(pred.shape) < 0.15] = 255
    cm = confusion_matrix(torch.from_numpy(gt), torch.from_numpy(pred), L)
    assert cm.dtype == torch.int64
    assert cm.shape == (L, L)
    np.testing.assert_array_equal(cm.numpy(), ref_cm(gt, pred, L))
    # Other integer dtypes give the same counts.
    cm64 = confusion_matrix(torch.from_numpy(gt).long(), torch.from_numpy(pred).int(), L)
    assert torch.equal(cm64, cm)


def test_scores_match_reference_including_absent_and_unpredicted_labels():
    rng = np.random.default_rng(2)
    cm = rng.integers(0, 50, (L, L))
    cm[4, :] = 0  # label 4 never in ground truth, but predicted: IoU 0, recall undefined
    cm[:, 5] = 0  # label 5 never predicted, but in ground truth: precision undefined
    cm[3, :] = 0
    cm[:, 3] = 0  # label 3 absent from both: IoU undefined, excluded
    got = scores(torch.from_numpy(cm))
    ref = ref_scores(cm)
    for key in (*SCALAR_KEYS, *PER_LABEL_KEYS):
        assert_close(got[key], ref[key], key)
    assert got["absent"] == ref["absent"] == [3]
    assert got["num_pixels"] == int(cm.sum())
    assert got["iou"][4] == 0.0
    assert math.isnan(got["recall"][4])
    assert math.isnan(got["precision"][5])
    # IoU + FP/union + FN/union = 100, per label and for the means over the same labels.
    assert math.isclose(got["miou"] + got["mfp_ratio"] + got["mfn_ratio"], 100.0, abs_tol=1e-9)


def test_hand_computed_4x4():
    # L = 3: 0 background, 1 = class 0, 2 = class 1. gt has one 255 at (3, 3), pred one 255 at (3, 2).
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 255]], np.uint8)
    pred = np.array([[0, 0, 1, 0], [0, 1, 1, 1], [2, 0, 0, 0], [2, 2, 255, 0]], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(gt), torch.from_numpy(pred))
    # 14 scored pixels. Rows gt, columns pred:
    #   gt 0: (0,0) (0,1) (1,0) (2,2) (2,3) -> 0, (1,1) -> 1          = [5, 1, 0]
    #   gt 1: (0,3) -> 0, (0,2) (1,2) (1,3) -> 1                      = [1, 3, 0]
    #   gt 2: (2,1) -> 0, (2,0) (3,0) (3,1) -> 2                      = [1, 0, 3]
    assert cm.compute().tolist() == [[5, 1, 0], [1, 3, 0], [1, 0, 3]]
    s = cm.scores()
    # IoU: bg 5 / (6 + 7 - 5) = 62.5; class 0: 3 / (4 + 4 - 3) = 60; class 1: 3 / (4 + 3 - 3) = 75.
    assert s["iou"] == pytest.approx([62.5, 60.0, 75.0], abs=1e-12)
    assert s["miou"] == pytest.approx((62.5 + 60 + 75) / 3, abs=1e-12)  # 65.8333...
    assert s["fg_miou"] == pytest.approx(67.5, abs=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(100 * 11 / 14, abs=1e-12)
    assert s["precision"] == pytest.approx([100 * 5 / 7, 75.0, 100.0], abs=1e-12)
    assert s["recall"] == pytest.approx([100 * 5 / 6, 75.0, 75.0], abs=1e-12)
    # bg: FP = 2 (pred 0 where gt 1 or 2), FN = 1, union 8.
    assert s["fp_ratio"][0] == pytest.approx(25.0)
    assert s["fn_ratio"][0] == pytest.approx(12.5)
    # Predicted foreground 7 pixels, 6 of them on ground-truth foreground, 1 on background; 8 gt fg pixels.
    assert s["fg_precision"] == pytest.approx(100 * 6 / 7, abs=1e-12)
    assert s["fg_recall"] == pytest.approx(75.0, abs=1e-12)
    assert s["pred_fg_on_gt_bg"] == pytest.approx(100 / 7, abs=1e-12)
    # 15 pixels have a ground truth; 1 of them is predicted 255 (the ignore band).
    assert s["pred_ignored"] == pytest.approx(100 / 15, abs=1e-12)
    assert s["num_pixels"] == 14
    assert s["absent"] == []


def test_oracle_ground_truth_as_prediction_scores_100(images):
    cm = ConfusionMatrix(L)
    for _, _, gt in images:
        cm.update(torch.from_numpy(gt), torch.from_numpy(gt))
    s = cm.scores()
    assert s["miou"] == 100.0
    assert s["pixel_accuracy"] == 100.0
    assert s["pred_ignored"] == 0.0


def test_oracle_sweep_of_one_hot_maps_scores_100_below_one():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, L, (6, 7)).astype(np.uint8)
    gt[0, :3] = 255
    keys = np.unique(gt[(gt > 0) & (gt < 255)]) - 1
    maps = np.stack([(gt == k + 1).astype(np.float32) for k in keys])  # 1 on the class, 0 elsewhere
    sweep = ThresholdSweep(L, THRESHOLDS)
    sweep.update(torch.from_numpy(maps), torch.from_numpy(keys), torch.from_numpy(gt))
    miou = threshold_curves(sweep.compute())["miou"]
    assert torch.all(miou[:-1] == 100.0)  # every t < 1
    assert miou[-1] < 100.0  # at t = 1 the value 1 ties with the threshold: background


def test_constant_map_hand_computed():
    # One class (key 0 -> label 1) with a constant map 0.5; gt: 4 background pixels, 12 of class 0.
    gt = np.ones((4, 4), np.uint8)
    gt[0] = 0
    maps = np.full((1, 4, 4), 0.5, np.float32)
    sweep = ThresholdSweep(2, [0.3, 0.5, 0.7])
    sweep.update(torch.from_numpy(maps), torch.tensor([0]), torch.from_numpy(gt))
    miou = threshold_curves(sweep.compute())["miou"].tolist()
    # t = 0.3: everything class 0: IoU bg 0 / 4 = 0, IoU class 0 = 12 / 16 = 75 -> 37.5.
    # t = 0.5 (a tie: background) and 0.7: everything background: IoU bg 4 / 16 = 25, class 0 = 0 -> 12.5.
    assert miou == [37.5, 12.5, 12.5]


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = torch.tensor([[0, 0, 1, 1]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 1]], dtype=torch.uint8)
    s = scores(confusion_matrix(gt, pred, 4))  # labels 2 and 3 appear nowhere
    assert s["absent"] == [2, 3]
    assert math.isnan(s["iou"][2])
    assert math.isnan(s["iou"][3])
    # bg: 1 / 2 = 50; class 0: 2 / 3 -> mean over the two present labels only.
    assert s["miou"] == pytest.approx((50 + 200 / 3) / 2, abs=1e-12)


@pytest.mark.parametrize(
    ("gt_value", "pred_value", "dtype", "named"),
    [
        (7, 0, torch.uint8, "ground truth has label value(s) [7]"),
        (0, 6, torch.uint8, "prediction has label value(s) [6]"),
        (0, -1, torch.int64, "prediction has label value(s) [-1]"),
        (300, 0, torch.int64, "ground truth has label value(s) [300]"),
    ],
)
def test_out_of_range_labels_raise_naming_the_side_and_the_value(gt_value, pred_value, dtype, named):
    """The message names the tensor that holds the bad value and the value itself (not the other side)."""
    gt = torch.zeros((3, 3), dtype=dtype)
    pred = torch.zeros((3, 3), dtype=dtype)
    gt[1, 1] = gt_value
    pred[2, 2] = pred_value
    for call in (lambda: confusion_matrix(gt, pred, L), lambda: ConfusionMatrix(L).update(gt, pred)):
        with pytest.raises(ValueError, match="has label value") as e:
            call()
        assert str(e.value).startswith(named), str(e.value)


def test_invalid_inputs_raise():
    gt = torch.zeros((3, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(gt.float(), gt, L)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(gt, gt[:2], L)
    bad_gt = gt.clone()
    bad_gt[0, 0] = 9
    with pytest.raises(ValueError, match="9"):
        ThresholdSweep(L, THRESHOLDS).update(torch.rand(1, 3, 3), torch.tensor([0]), bad_gt)
    with pytest.raises(ValueError, match="class index 5"):
        ThresholdSweep(L, THRESHOLDS).update(torch.rand(1, 3, 3), torch.tensor([5]), gt)
    with pytest.raises(ValueError, match="increase"):
        ThresholdSweep(L, [0.2, 0.1])
    with pytest.raises(ValueError, match="outside"):
        ThresholdSweep(L, [0.5, 1.5])
    with pytest.raises(ValueError, match="either threshold"):
        pseudo_mask(torch.rand(1, 3, 3), torch.tensor([0]), 0.3, conf_fg=0.5, conf_bg=0.1)


# ---------------------------------------------------------------------------------------------------------
# Pseudo masks at one threshold, with and without the ignore band
# ---------------------------------------------------------------------------------------------------------


def test_pseudo_mask_and_band_match_reference(images):
    for t in (0.0, 0.05, 0.3, 0.5, 0.7, 1.0):
        for maps, keys, _ in images:
            got = pseudo_mask(torch.from_numpy(maps), torch.from_numpy(keys), t)
            assert got.dtype == torch.uint8
            np.testing.assert_array_equal(got.numpy(), ref_pseudo(maps, keys, t), err_msg=f"t={t}")
    cm = ConfusionMatrix(L)
    ref = np.zeros((L, L), np.int64)
    ignored = scorable = 0
    for maps, keys, gt in images:
        band = pseudo_mask(torch.from_numpy(maps), torch.from_numpy(keys), conf_fg=0.7, conf_bg=0.3)
        expected = ref_band(maps, keys, 0.7, 0.3)
        np.testing.assert_array_equal(band.numpy(), expected)
        cm.update(torch.from_numpy(gt), band)
        ref += ref_cm(gt, expected, L)
        ignored += int(((gt != 255) & (expected == 255)).sum())
        scorable += int((gt != 255).sum())
    assert ignored > 0
    np.testing.assert_array_equal(cm.compute().numpy(), ref)
    s = cm.scores()
    assert s["pred_ignored"] == pytest.approx(100 * ignored / scorable, abs=1e-9)
    for key in SCALAR_KEYS:
        assert_close(s[key], ref_scores(ref)[key], key)


def test_ties_at_the_threshold_go_to_background():
    maps = torch.tensor([[[0.25, 0.5, 0.75]]])  # exact in binary
    keys = torch.tensor([2])
    assert pseudo_mask(maps, keys, 0.5).tolist() == [[0, 0, 3]]
    assert pseudo_mask(maps, keys, 0.25).tolist() == [[0, 3, 3]]
    # float32(0.3) is 0.30000001192..., above the real 0.3: foreground at t = 0.3 (float32 rounding of t would
    # have made it a tie); float32(0.7) = 0.69999998... is below 0.7: background at t = 0.7.
    maps = torch.tensor([[[0.3, 0.7]]], dtype=torch.float32)
    assert pseudo_mask(maps, keys, 0.3).tolist() == [[3, 3]]
    assert pseudo_mask(maps, keys, 0.7).tolist() == [[0, 0]]
    gt = torch.tensor([[3, 3]], dtype=torch.uint8)
    sweep = ThresholdSweep(4, [0.3, 0.7])
    sweep.update(maps, keys, gt)
    assert sweep.compute()[:, 3].tolist() == [[0, 0, 0, 2], [2, 0, 0, 0]]


def test_ties_between_classes_go_to_the_first_key():
    maps = torch.full((3, 2, 2), 0.6)
    keys = torch.tensor([4, 1, 2])
    assert pseudo_mask(maps, keys, 0.3).unique().tolist() == [5]


# ---------------------------------------------------------------------------------------------------------
# Threshold sweep
# ---------------------------------------------------------------------------------------------------------


def reference_sweep(images, thresholds) -> np.ndarray:
    out = np.zeros((len(thresholds), L, L), np.int64)
    for j, t in enumerate(thresholds):
        for maps, keys, gt in images:
            out[j] += ref_cm(gt, ref_pseudo(maps, keys, t), L)
    return out


def test_sweep_matches_per_threshold_reference(images):
    sweep = ThresholdSweep(L, THRESHOLDS)
    for maps, keys, gt in images:
        sweep.update(torch.from_numpy(maps), torch.from_numpy(keys), torch.from_numpy(gt))
    cms = sweep.compute()
    assert cms.shape == (len(THRESHOLDS), L, L)
    assert cms.dtype == torch.int64
    ref = reference_sweep(images, THRESHOLDS)
    np.testing.assert_array_equal(cms.numpy(), ref)
    curves = threshold_curves(cms)
    for j in range(len(THRESHOLDS)):
        expected = ref_scores(ref[j])
        for key in (*SCALAR_KEYS, *PER_LABEL_KEYS):
            assert_close(curves[key][j], expected[key], f"{key} at t={THRESHOLDS[j]}")
    t_best, s_best = best_threshold(cms, sweep.thresholds)
    ref_miou = [ref_scores(c)["miou"] for c in ref]
    assert t_best == THRESHOLDS[int(np.argmax(ref_miou))]
    assert s_best["miou"] == pytest.approx(max(ref_miou), abs=1e-9)


def test_sweep_list_batch_and_dtypes_agree(images):
    ref = reference_sweep(images, THRESHOLDS)
    as_list = ThresholdSweep(L, "0.00:1.00:0.05")
    as_list.update(
        [torch.from_numpy(m) for m, _, _ in images],
        [torch.from_numpy(k) for _, k, _ in images],
        [torch.from_numpy(g) for _, _, g in images],
    )
    np.testing.assert_array_equal(as_list.compute().numpy(), ref)
    # A padded batch of same-size images; padding slots come first, hold garbage and must not count.
    rng = np.random.default_rng(4)
    batch = [random_image(rng, 5, 6, k) for k in (1, 3, 0, 2)]
    kmax = 4
    maps = np.full((len(batch), kmax, 5, 6), 2.0, np.float32)
    keys = np.full((len(batch), kmax), 99, np.int64)
    mask = np.zeros((len(batch), kmax), bool)
    for b, (m, k, _) in enumerate(batch):
        maps[b, kmax - len(k) :], keys[b, kmax - len(k) :], mask[b, kmax - len(k) :] = m, k, True
    padded = ThresholdSweep(L, THRESHOLDS, pxap_bins=20)
    padded.update(
        torch.from_numpy(maps),
        torch.from_numpy(keys),
        torch.from_numpy(np.stack([g for *_, g in batch])),
        mask,
    )
    one_by_one = ThresholdSweep(L, THRESHOLDS, pxap_bins=20)
    for m, k, g in batch:
        one_by_one.update(m, k, g)  # numpy arrays are accepted too
    np.testing.assert_array_equal(padded.compute().numpy(), reference_sweep(batch, THRESHOLDS))
    assert torch.equal(padded.compute(), one_by_one.compute())
    for key, value in padded.compute_pxap().items():
        assert_close(value, one_by_one.compute_pxap()[key], key)
    # Half and double precision maps: compared exactly as the values they hold.
    for dtype in (np.float16, np.float64):
        cast = [(m.astype(dtype), k, g) for m, k, g in images]
        sweep = ThresholdSweep(L, THRESHOLDS)
        for m, k, g in cast:
            sweep.update(torch.from_numpy(m), torch.from_numpy(k), torch.from_numpy(g))
        np.testing.assert_array_equal(sweep.compute().numpy(), reference_sweep(cast, THRESHOLDS), err_msg=str(dtype))


def test_sweep_with_close_thresholds_falls_back_and_stays_exact(images):
    thresholds = [0.3, float(np.nextafter(np.float32(0.3), np.float32(1))), 0.5]  # closer than 2^-16
    sweep = ThresholdSweep(L, thresholds)
    for maps, keys, gt in images:
        sweep.update(torch.from_numpy(maps), torch.from_numpy(keys), torch.from_numpy(gt))
    np.testing.assert_array_equal(sweep.compute().numpy(), reference_sweep(images, thresholds))


def test_sweep_at_one_threshold_equals_single_threshold_path(images):
    sweep = ThresholdSweep(L, THRESHOLDS)
    cm = ConfusionMatrix(L)
    for maps, keys, gt in images:
        sweep.update(torch.from_numpy(maps), torch.from_numpy(keys), torch.from_numpy(gt))
        cm.update(torch.from_numpy(gt), pseudo_mask(torch.from_numpy(maps), torch.from_numpy(keys), 0.35))
    assert torch.equal(sweep.compute()[THRESHOLDS.index(0.35)], cm.compute())


def test_best_threshold_ties_go_low_and_metric_is_checked():
    cms = torch.zeros((3, 2, 2), dtype=torch.int64)
    cms[:, 0, 0] = 5
    cms[:, 1, 1] = 5  # identical perfect matrices
    t, s = best_threshold(cms, [0.1, 0.2, 0.3])
    assert t == 0.1
    assert s["miou"] == 100.0
    assert set(MAXIMISABLE) <= set(SCALAR_KEYS)
    with pytest.raises(ValueError, match="mfp_ratio"):
        best_threshold(cms, [0.1, 0.2, 0.3], metric="mfp_ratio")


def test_parse_thresholds():
    values = parse_thresholds("0.00:0.95:0.01")
    assert len(values) == 96
    assert values[0] == 0.0
    assert values[-1] == 0.95
    assert values[7] == 0.07
    assert values[29] == 0.29
    assert parse_thresholds("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_thresholds("0.1, 0.25") == [0.1, 0.25]
    assert parse_thresholds(0.3) == [0.3]
    assert parse_thresholds([0.1, 0.2]) == [0.1, 0.2]
    for bad in ("0:1", "a:b:c", "0:1:0", "1:0:0.1"):
        with pytest.raises(ValueError, match=r"threshold range|cannot parse thresholds"):
            parse_thresholds(bad)


# ---------------------------------------------------------------------------------------------------------
# PxAP
# ---------------------------------------------------------------------------------------------------------


def test_pxap_hand_computed():
    # n = 4: thresholds 0, 0.25, 0.5, 0.75, 1. Class 0 (label 1); scores on the bin edges:
    #   positives 1.0, 0.75, 0.5   negatives 0.75, 0.25, 0.0   plus an ignored pixel (gt 255) at 1.0.
    # score >= t:  t = 1    TP 1 FP 0  P 1    R 1/3
    #              t = 0.75 TP 2 FP 1  P 2/3  R 2/3   (the tie at 0.75 counts on both sides)
    #              t = 0.5  TP 3 FP 1  P 3/4  R 1
    #              t = 0.25 TP 3 FP 2  P 3/5  R 1
    #              t = 0    TP 3 FP 3  P 1/2  R 1
    # PxAP = (1/3 - 0) * 1 + (2/3 - 1/3) * 2/3 + (1 - 2/3) * 3/4 = 1/3 + 2/9 + 1/4 = 29/36 = 80.555...%
    maps = torch.tensor([[[1.0, 0.75, 0.5, 0.75, 0.25, 0.0, 1.0]]])
    gt = torch.tensor([[1, 1, 1, 0, 0, 0, 255]], dtype=torch.uint8)
    sweep = ThresholdSweep(3, [0.5], pxap_bins=4)
    sweep.update(maps, torch.tensor([0]), gt)
    px = sweep.compute_pxap()
    assert px["pxap_per_class"][0] == pytest.approx(100 * 29 / 36, abs=1e-12)
    assert math.isnan(px["pxap_per_class"][1])  # class 1 has no positive pixel
    assert px["mpxap"] == pytest.approx(100 * 29 / 36, abs=1e-12)
    # One map, so the class-agnostic score (max over maps) and positives (gt in 1..C) are the same.
    assert px["pxap"] == pytest.approx(100 * 29 / 36, abs=1e-12)
    assert px["pxap_thresholds"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert px["pxap_precision"] == pytest.approx([1 / 2, 3 / 5, 3 / 4, 2 / 3, 1.0], abs=1e-12)
    assert px["pxap_recall"] == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 1 / 3], abs=1e-12)


def test_pixel_ap_of_histograms():
    # Same case as above as histograms over bins [0, .25), [.25, .5), [.5, .75), [.75, 1), [1]:
    ap, _precision, _recall = pixel_ap(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 1, 0, 1, 0]))
    assert float(ap) == pytest.approx(100 * 29 / 36, abs=1e-12)
    ap, _, _ = pixel_ap(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    assert torch.isnan(ap).all()  # no positives: undefined


def test_pxap_matches_reference(images):
    n = 20
    rng = np.random.default_rng(5)
    # Put some scores exactly on the PxAP grid i / n (exactly representable only for dyadic ones).
    data = []
    for maps, keys, gt in images:
        maps = maps.copy()
        spots = rng.random(maps.shape) < 0.2
        maps[spots] = (rng.integers(0, n + 1, int(spots.sum())) / n).astype(np.float32)
        data.append((maps, keys, gt))
    sweep = ThresholdSweep(L, THRESHOLDS, pxap_bins=n)
    for maps, keys, gt in data:
        sweep.update(torch.from_numpy(maps), torch.from_numpy(keys), torch.from_numpy(gt))
    px = sweep.compute_pxap()
    for c in range(L - 1):
        s, p = [], []
        for maps, keys, gt in data:
            if c in keys:
                valid = gt != 255
                s.append(maps[list(keys).index(c)][valid])
                p.append(gt[valid] == c + 1)
        expected = ref_pxap(np.concatenate(s), np.concatenate(p), n) if s else math.nan
        assert_close(px["pxap_per_class"][c], expected, f"PxAP class {c}")
    s, p = [], []
    for maps, _, gt in data:
        valid = gt != 255
        top = maps.max(0) if len(maps) else np.zeros(gt.shape, np.float32)
        s.append(top[valid])
        p.append((gt[valid] > 0) & (gt[valid] < 255))
    assert_close(px["pxap"], ref_pxap(np.concatenate(s), np.concatenate(p), n), "class-agnostic PxAP")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_on_cuda_equals_cpu(images):
    cpu = ThresholdSweep(L, THRESHOLDS, pxap_bins=20)
    gpu = ThresholdSweep(L, THRESHOLDS, pxap_bins=20)
    for maps, keys, gt in images:
        cpu.update(maps, keys, gt)
        gpu.update(*(torch.from_numpy(a).cuda() for a in (maps, keys, gt)))
    assert gpu.compute().device.type == "cuda"
    assert torch.equal(gpu.compute().cpu(), cpu.compute())
    for key, value in gpu.compute_pxap().items():
        assert_close(value, cpu.compute_pxap()[key], key)
