"""wsss's MaxBoxAcc / MaxBoxAccV2 beside clovaai/wsolevaluation's box protocol, one difference at a time.

    python scripts/wsol_differences.py --maps CAMS_ARTIFACT/maps -- dataset.eval_split=val [overrides...]

The box protocol is re-implemented here (no code shared with `wsss.metrics.boxes` but `box_iou` and
`box_scores`) with each of the five documented differences on wsolevaluation's side (`evaluation.py`,
`compute_bboxes_from_scoremaps`, at commit 96f4b88) switchable:

- N: min-max normalise each map (a constant map becomes zeros, as `normalize_scoremap` does).
- Q: threshold a uint8 copy, `uint8(255 m) > int(tau * max(uint8(255 m)))` (`int(255 tau)` for a map whose
  maximum is 1) instead of `m >= tau`.
- E: an estimated box ends at x + w, y + h (clipped to the map) instead of the component's last pixel.
- T: trace `RETR_TREE`, so the contours of holes give boxes too, instead of `RETR_EXTERNAL`.
- Z: an empty binary map gives the box (0, 0, 0, 0) instead of no box.

The table adds them one after the other (N, then N + Q, ...); the first row (all off) is checked equal to
`wsss.metrics.BoxAccuracy` on the same pairs, the last (all on) is the reference's protocol. The dataset is
the wsss config composed with the Hydra overrides after `--`; its `dataset.eval_split` names the split (the
cams artifact's split, e.g. `dataset.eval_split=val`). Pairs whose class has no box in the image are left out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import cv2
import numpy as np
from hydra import compose, initialize_config_dir
from tqdm import tqdm

from wsss.artifacts import read_cams
from wsss.config import register_configs
from wsss.data import build_source
from wsss.metrics import BOX_DELTAS, BoxAccuracy, box_iou, box_scores

REPO = Path(__file__).resolve().parents[1]
DIFFERENCES = ("N", "Q", "E", "T", "Z")
THRESHOLDS = np.arange(0, 1, 0.01).tolist()


def binary_map(scores: np.ndarray, tau: float, on: Collection[str]) -> np.ndarray:
    """(H, W) uint8 foreground 255 at threshold `tau`, after N (normalise) and with Q (uint8) if `on`."""
    m = np.asarray(scores, np.float64)  # float64 throughout, as the reference's maps are (exact for float32 ones)
    if "N" in on:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if "Q" in on:
        q = (m * 255).astype(np.uint8)
        fg = q > int(tau * int(q.max()))
    else:
        fg = m >= tau  # the exact comparison wsss makes
    return fg.astype(np.uint8) * 255


def estimated_boxes(binary: np.ndarray, on: Collection[str]) -> tuple[np.ndarray, int]:
    """(n, 4) inclusive boxes of a binary map's contours and the index of the largest (-1 if none)."""
    mode = cv2.RETR_TREE if "T" in on else cv2.RETR_EXTERNAL
    contours, _ = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return (np.zeros((1, 4), np.int64), 0) if "Z" in on else (np.zeros((0, 4), np.int64), -1)
    h, w = binary.shape
    end = 0 if "E" in on else 1  # E: the box's end one pixel past the component
    boxes = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        boxes.append((x, y, min(x + bw - end, w - 1), min(y + bh - end, h - 1)))
    areas = [cv2.contourArea(c) for c in contours]
    return np.asarray(boxes, np.int64), areas.index(max(areas))  # first of the largest, as max() picks


def pair_curve(scores: np.ndarray, gt: np.ndarray, thresholds: Sequence[float], on: Collection[str]) -> np.ndarray:
    """(T, 2) best IoU per threshold of the largest box and of any box (0 where there is no box)."""
    out = np.zeros((len(thresholds), 2))
    for j, tau in enumerate(thresholds):
        boxes, largest = estimated_boxes(binary_map(scores, tau, on), on)
        if largest >= 0:
            best = box_iou(boxes, gt).max(1)  # (n,)
            out[j] = best[largest], best.max()
    return out


def curve_hits(curve: np.ndarray) -> np.ndarray:
    """(T, 4) hits of one pair in `wsss.metrics.HIT_COLUMNS` order."""
    return np.stack([curve[:, 0] >= 0.5, *(curve[:, 1] >= d for d in BOX_DELTAS)], 1).astype(np.int64)


def steps() -> list[tuple[str, frozenset[str]]]:
    """The cumulative settings: all off, then each difference added to the previous ones."""
    return [("none (wsss)", frozenset())] + [
        (f"+ {d}", frozenset(DIFFERENCES[: i + 1])) for i, d in enumerate(DIFFERENCES)
    ]


def score(pairs: Sequence[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float]) -> list[dict]:
    """Per cumulative step: `box_scores` of the pairs and `changed`, how many pairs' curves moved from the step before.

    Args:
        pairs: (scores (H, W), ground-truth boxes (M, 4) with M >= 1) per (image, class) pair.
        thresholds: T increasing CAM thresholds.
    """
    rows = []
    for name, on in steps():
        hits = np.zeros((len(thresholds), 4), np.int64)
        curves = []
        for m, gt in tqdm(pairs, desc=name, leave=False):
            curves.append(pair_curve(m, gt, thresholds, on))
            hits += curve_hits(curves[-1])
        changed = (
            sum(not np.array_equal(a, b) for a, b in zip(curves, rows[-1]["pair_curves"], strict=True)) if rows else 0
        )
        rows.append(
            box_scores(hits, len(pairs), thresholds) | {"step": name, "changed": changed, "pair_curves": curves}
        )
    return rows


def load_pairs(maps_dir: Path, overrides: list[str]) -> tuple[list, list]:
    """(scores, boxes) of every pair with a box, and per image (maps, keys, boxes by class) for BoxAccuracy."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    source = build_source(cfg.dataset, str(cfg.dataset.eval_split))
    files = sorted(maps_dir.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no maps/<id>.npz in {maps_dir}")
    pairs, images = [], []
    for path in tqdm(files, desc="maps"):
        cams = read_cams(path)
        boxes = source.load_boxes(path.stem)
        by_class = {int(c): boxes.of_class(int(c)) for c in cams["keys"]}
        images.append((cams["maps"], cams["keys"], by_class))
        pairs += [
            (m, by_class[int(c)]) for m, c in zip(cams["maps"], cams["keys"], strict=True) if len(by_class[int(c)])
        ]
    return pairs, images


def table(rows: list[dict]) -> str:
    """The cumulative table in markdown, points and the change from the step before."""
    lines = ["| step | MaxBoxAcc | MaxBoxAccV2 | change | pairs' curves changed |", "|---|---|---|---|---|"]
    for prev, row in zip([None, *rows[:-1]], rows, strict=True):
        a, v2 = row["maxboxacc"], row["maxboxacc_v2"]
        change = f"{a - prev['maxboxacc']:+.2f} / {v2 - prev['maxboxacc_v2']:+.2f}" if prev else ""
        lines.append(f"| {row['step']} | {a:.4f} | {v2:.4f} | {change} | {row['changed'] if prev else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=Path, required=True, help="a cams artifact's maps/ folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the dataset (after --)")
    args = parser.parse_intermixed_args()
    pairs, images = load_pairs(args.maps, args.overrides)
    rows = score(pairs, THRESHOLDS)
    acc = BoxAccuracy(THRESHOLDS)
    for maps, keys, by_class in images:
        acc.image_hits(maps, keys, by_class)
    own = acc.compute()
    print(f"{len(pairs)} (image, class) pairs with a box, {acc.pairs_without_box} without")
    print(table(rows))
    diff = (rows[0]["maxboxacc"] - own["maxboxacc"], rows[0]["maxboxacc_v2"] - own["maxboxacc_v2"])
    print(f"all off - wsss.metrics.BoxAccuracy: {diff[0]:+.4f} / {diff[1]:+.4f}")
    if diff != (0.0, 0.0):
        sys.exit("the re-implementation with every difference off does not give wsss.metrics' figures")


if __name__ == "__main__":
    main()
