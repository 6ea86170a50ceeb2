"""The box metrics of `evaluate` (MaxBoxAcc, MaxBoxAccV2; `wsss.metrics.boxes`): each image's maps against its
ground-truth boxes in a worker thread, beside the main scoring pass, and metrics.json's `boxes` entry."""

from __future__ import annotations

import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from wsss.data import SegmentationSource
from wsss.metrics import BoxAccuracy, ImageStats, box_scores, image_record

log = logging.getLogger(__name__)


class ImageBoxes:
    """The box metrics' pass: each image's maps against its ground-truth boxes, in a worker thread.

    OpenCV's contour tracing releases the GIL, so the boxes of one image are scored while the main loop reads
    and sweeps the next ones. The boxes are read (and checked) in the caller's thread, so a bad XML stops the
    run where it is met; at most `PENDING` images wait, so the queued maps stay few.
    """

    PENDING = 8

    def __init__(self, source: SegmentationSource, thresholds: list[float]) -> None:
        self.source = source
        self.acc = BoxAccuracy(thresholds)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boxes")
        self.pending: collections.deque = collections.deque()  # (record, future)

    def submit(self, image_id: str, maps: np.ndarray, keys: np.ndarray, record: dict[str, Any]) -> None:
        """Score one image's maps; its hits land in `record` (an `image_record`) when `drain` collects them."""
        boxes = self.source.load_boxes(image_id)
        by_class = {int(c): boxes.of_class(int(c)) for c in keys}
        self.pending.append((record, self.pool.submit(self.acc.score_image, maps, keys, by_class)))
        if len(self.pending) > self.PENDING:
            self._collect()

    def _collect(self) -> None:
        record, future = self.pending.popleft()
        hits, pairs, without_box = future.result()
        self.acc.add(hits, pairs, without_box)
        record.update(image_record(box_hits=hits, box_pairs=pairs))

    def drain(self) -> None:
        """Wait for every submitted image and stop the worker."""
        try:
            while self.pending:
                self._collect()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def box_pass(source: SegmentationSource, ev: DictConfig, maps_dir: Path | None, thresholds) -> ImageBoxes | None:
    """The box pass when it applies; one logged line saying why when it does not."""
    if maps_dir is None or not ev.boxes:
        return None
    if not source.has_boxes():
        log.info("evaluate: %s/%s has no ground-truth boxes: box metrics skipped", source.name, source.split)
        return None
    return ImageBoxes(source, thresholds)


def box_report(stats: ImageStats, pairs_without_box: int) -> dict[str, Any]:
    """metrics.json's "boxes" entry from the summed per-image hits."""
    out = box_scores(stats.box_hits.sum(0), int(stats.box_pairs.sum()), list(stats.thresholds))
    out["pairs_without_box"] = pairs_without_box
    out["curves"] = {k: [round(v, 4) for v in c] for k, c in out["curves"].items()}
    for k in ("maxboxacc", "maxboxacc_v2"):
        out[k] = round(out[k], 4)
    return out
