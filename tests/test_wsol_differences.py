"""scripts/wsol_differences.py: all differences off is wsss.metrics.boxes; each one moves a hand-made case.

Every expected box and IoU below is counted by hand on maps a few pixels wide (boxes are inclusive
x0, y0, x1, y1; IoU counts pixels).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from wsss.metrics.boxes import BoxAccuracy, pair_ious

spec = importlib.util.spec_from_file_location("wsol_differences", REPO / "scripts" / "wsol_differences.py")
wd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wd)

OFF: frozenset[str] = frozenset()


def _box_map(shape, boxes_values, base=0.0) -> np.ndarray:
    m = np.full(shape, base, np.float32)
    for (x0, y0, x1, y1), v in boxes_values:
        m[y0 : y1 + 1, x0 : x1 + 1] = v
    return m


def _random_pairs(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blobby maps (several components, holes, values on the thresholds' grid) with 1-2 boxes each."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = rng.integers(12, 30, 2)
        m = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.integers(0, w - 3), rng.integers(0, h - 3)
            x1, y1 = rng.integers(x0, w), rng.integers(y0, h)
            m[y0 : y1 + 1, x0 : x1 + 1] = rng.integers(1, 100) / 100  # float32 k/100: ties with the thresholds
        if i % 3 == 0:
            m[h // 2, :] = 0  # cut the blobs (holes and splits)
        m += rng.random(m.shape).astype(np.float32) * (i % 2) * 0.05
        m /= m.max() if m.max() > 0 else 1
        m = m.astype(np.float16).astype(np.float32)  # as read_cams gives a float16 store
        k = rng.integers(1, 3)
        x0, y0 = rng.integers(0, w - 2, k), rng.integers(0, h - 2, k)
        gt = np.stack([x0, y0, np.minimum(x0 + rng.integers(1, 10, k), w - 1), np.minimum(y0 + 8, h - 1)], 1)
        pairs.append((m, gt))
    return pairs


def test_all_off_is_wsss_boxes() -> None:
    pairs = _random_pairs(40)
    thresholds = wd.THRESHOLDS
    for m, gt in pairs:
        np.testing.assert_array_equal(wd.pair_curve(m, gt, thresholds, OFF), pair_ious(m, thresholds, gt))
    acc = BoxAccuracy(thresholds)
    for m, gt in pairs:
        acc.image_hits(m[None], [3], {3: gt})
    own = acc.compute()
    first = wd.score(pairs, thresholds)[0]
    assert first["step"] == "none (wsss)"
    assert (first["maxboxacc"], first["maxboxacc_v2"]) == (own["maxboxacc"], own["maxboxacc_v2"])
    assert 0 < own["maxboxacc"] < 100  # the pairs are neither all hits nor all misses
    assert 0 < own["maxboxacc_v2"] < 100


def test_steps_add_the_differences_in_order() -> None:
    sets = [on for _, on in wd.steps()]
    assert sets == [frozenset("NQETZ"[:i]) for i in range(6)]


def test_e_ends_the_box_one_pixel_past_the_component_clipped() -> None:
    m = _box_map((10, 10), [((2, 3, 4, 6), 1.0), ((8, 0, 9, 1), 0.7)])
    binary = wd.binary_map(m, 0.5, OFF)
    boxes, _ = wd.estimated_boxes(binary, OFF)
    assert sorted(map(tuple, boxes)) == [(2, 3, 4, 6), (8, 0, 9, 1)]
    boxes, _ = wd.estimated_boxes(binary, {"E"})
    assert sorted(map(tuple, boxes)) == [(2, 3, 5, 7), (8, 0, 9, 2)]  # x1 = 10 clipped to 9
    # Against the component's own box: 3 x 4 = 12 pixels inside a 4 x 5 = 20 pixel estimate.
    gt = np.array([[2, 3, 4, 6]])
    assert wd.pair_curve(m, gt, [0.5], OFF)[0].tolist() == [1.0, 1.0]
    assert wd.pair_curve(m, gt, [0.5], {"E"})[0].tolist() == [0.6, 0.6]


def test_q_drops_a_value_on_the_threshold_that_the_uint8_copy_floors() -> None:
    # 0.5 >= 0.5, but uint8(127.5) = 127 is not > int(0.5 * 255) = 127; the peak (255) stays.
    m = _box_map((12, 12), [((1, 1, 5, 5), 0.5), ((9, 9, 9, 9), 1.0)])
    assert wd.binary_map(m, 0.5, OFF).sum() // 255 == 26
    assert wd.binary_map(m, 0.5, {"Q"}).sum() // 255 == 1
    gt = np.array([[1, 1, 5, 5]])
    assert wd.pair_curve(m, gt, [0.5], OFF)[0].tolist() == [1.0, 1.0]
    assert wd.pair_curve(m, gt, [0.5], {"Q"})[0].tolist() == [0.0, 0.0]
    # 0.51 sits between levels 130 (0.5098) and 131: uint8 130 > 127, kept with and without Q.
    m[1:6, 1:6] = 0.51
    assert wd.pair_curve(m, gt, [0.5], {"Q"})[0].tolist() == [1.0, 1.0]


def test_t_adds_the_box_of_a_hole() -> None:
    # A ring: outer square 1..7, hole 3..5. The hole's contour runs through the ring pixels 4-adjacent to it,
    # x and y 2..6 (the corner pixels (2, 2) ... touch it only diagonally).
    m = _box_map((9, 9), [((1, 1, 7, 7), 1.0), ((3, 3, 5, 5), 0.0)])
    boxes, largest = wd.estimated_boxes(wd.binary_map(m, 0.5, OFF), OFF)
    assert boxes.tolist() == [[1, 1, 7, 7]]
    assert largest == 0
    boxes, largest = wd.estimated_boxes(wd.binary_map(m, 0.5, OFF), {"T"})
    assert sorted(map(tuple, boxes)) == [(1, 1, 7, 7), (2, 2, 6, 6)]
    assert tuple(boxes[largest]) == (1, 1, 7, 7)
    gt = np.array([[2, 2, 6, 6]])  # 25 of the outer box's 49 pixels
    assert wd.pair_curve(m, gt, [0.5], OFF)[0].tolist() == [25 / 49, 25 / 49]
    assert wd.pair_curve(m, gt, [0.5], {"T"})[0].tolist() == [25 / 49, 1.0]


def test_z_gives_an_empty_map_the_box_0_0_0_0() -> None:
    m = np.zeros((6, 8), np.float32)
    boxes, largest = wd.estimated_boxes(wd.binary_map(m, 0.5, OFF), OFF)
    assert boxes.shape == (0, 4)
    assert largest == -1
    boxes, largest = wd.estimated_boxes(wd.binary_map(m, 0.5, OFF), {"Z"})
    assert boxes.tolist() == [[0, 0, 0, 0]]
    assert largest == 0
    gt = np.array([[0, 0, 1, 1]])  # the one pixel of (0, 0, 0, 0) in a 2 x 2 box
    assert wd.pair_curve(m, gt, [0.5], OFF)[0].tolist() == [0.0, 0.0]
    assert wd.pair_curve(m, gt, [0.5], {"Z"})[0].tolist() == [0.25, 0.25]


def test_n_rescales_a_map_with_a_nonzero_minimum() -> None:
    m = _box_map((8, 8), [((2, 2, 4, 4), 1.0)], base=0.5)
    gt = np.array([[2, 2, 4, 4]])
    # As stored, the 0.5 background passes 0.25: one box over the whole map, 9 of 64 pixels.
    assert wd.pair_curve(m, gt, [0.25], OFF)[0].tolist() == [9 / 64, 9 / 64]
    # Min-max: the background becomes 0, the blob 1.
    assert wd.pair_curve(m, gt, [0.25], {"N"})[0].tolist() == [1.0, 1.0]
    # 0.75 -> (0.75 - 0.5) / 0.5 = 0.5: below 0.6 after N, above it before.
    m[2:5, 5] = 0.75
    assert wd.binary_map(m, 0.6, OFF).sum() // 255 == 12
    assert wd.binary_map(m, 0.6, {"N"}).sum() // 255 == 9
    # A constant map becomes zeros (no box), as the reference's normalize_scoremap does.
    assert wd.binary_map(np.full((4, 4), 0.7, np.float32), 0.5, {"N"}).sum() == 0


def test_cli_on_hand_made_maps(synthetic_root, tmp_path, monkeypatch, capsys) -> None:
    from wsss.artifacts import write_cams
    from wsss.data.synthetic import SYNTHETIC_CLASSES
    from wsss.data.voc import VOCSource

    source = VOCSource(synthetic_root, "val", SYNTHETIC_CLASSES, name="synthetic")
    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    for image_id in source.ids[:4]:
        boxes = source.load_boxes(image_id)
        keys = np.unique(boxes.classes)
        h, w = source.load_image(image_id).shape[1:]
        maps = np.stack([_box_map((h, w), [(b, 1.0) for b in boxes.of_class(int(c))], 0.1) for c in keys])
        write_cams(maps_dir / f"{image_id}.npz", keys, maps, maps[:, ::4, ::4])
    overrides = ["dataset=synthetic", f"dataset.root={synthetic_root}", "dataset.eval_split=val"]
    overrides += ["dataset.synthetic.num_train=24", "dataset.synthetic.num_val=8", "dataset.synthetic.image_size=64"]
    monkeypatch.setattr(sys, "argv", ["wsol_differences.py", "--maps", str(maps_dir), "--", *overrides])
    wd.main()
    out = capsys.readouterr().out
    assert "all off - wsss.metrics.BoxAccuracy: +0.0000 / +0.0000" in out
    assert "| none (wsss) | 100.0000 | 100.0000 |" in out  # each map is its class's boxes
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| +")] == [
        f"| + {d}" for d in "NQETZ"
    ]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
