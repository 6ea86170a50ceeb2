"""COCO's annotation boxes as a compact table (`BoxTable`), built once from the json and read per image.

A few arrays instead of the annotation dicts (41 bytes per annotation and a small tuple per image: some 40 MB
for train2014 by count, against GBs for the dicts), and they survive freeing the pycocotools index. A
malformed `bbox` is recorded per image and raised by `image_boxes`, so it stops only a caller that reads that
image's boxes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss.data.base import ImageBoxes, SampleError


class BoxTable:
    """The boxes of the kept images as flat arrays, rows of one image contiguous in json order.

    Args:
        rows: (COCO image id, annotation, class index, crowd) for every annotation with a known category.
        by_image: COCO image id -> wsss image id of the kept images.
        annotation_file: The json, named in the error of a malformed `bbox`.
    """

    def __init__(
        self, rows: list[tuple[int, dict[str, Any], int, bool]], by_image: dict[int, str], annotation_file
    ) -> None:
        rows = sorted((r for r in rows if r[0] in by_image), key=lambda r: r[0])  # stable: json order kept
        xywh = np.full((len(rows), 4), np.nan)
        self.bad_bbox: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        for k, (coco_id, ann, _, _) in enumerate(rows):
            image_id = by_image[coco_id]
            start, _ = spans.get(image_id, (k, k))
            spans[image_id] = (start, k + 1)
            bbox = ann.get("bbox")
            try:
                xywh[k] = np.asarray(bbox, dtype=np.float64).reshape(4)
                ok = bool(np.isfinite(xywh[k]).all() and (xywh[k, 2:] >= 0).all())
            except (TypeError, ValueError):
                ok = False
            if not ok:
                self.bad_bbox.setdefault(
                    image_id,
                    f"{annotation_file}: annotation {ann.get('id')} (image {coco_id}) has bbox {bbox!r}, "
                    "not [x, y, w, h] with w, h >= 0",
                )
        self.xywh = xywh  # (A, 4) float64
        self.classes = np.array([r[2] for r in rows], dtype=np.int64)  # (A,)
        self.crowd = np.array([r[3] for r in rows], dtype=bool)  # (A,)
        self.rows = spans

    def image_boxes(self, image_id: str, size: tuple[int, int]) -> ImageBoxes:
        """The image's boxes as 0-based inclusive pixels, clipped into an image of (H, W) `size`.

        Raises:
            SampleError: an annotation of the image has no valid `bbox` (reason "bad_box").
        """
        h, w = size
        if image_id in self.bad_bbox:
            raise SampleError(self.bad_bbox[image_id], "bad_box")
        start, stop = self.rows.get(image_id, (0, 0))
        x, y, bw, bh = self.xywh[start:stop].T  # (A,) each
        # Continuous coordinates: pixel k covers [k, k + 1), so the box touches pixels floor(x)..ceil(x + w) - 1.
        x0 = np.clip(np.floor(x), 0, w - 1)
        y0 = np.clip(np.floor(y), 0, h - 1)
        x1 = np.maximum(np.clip(np.ceil(x + bw) - 1, 0, w - 1), x0)  # a zero-width box keeps its one column
        y1 = np.maximum(np.clip(np.ceil(y + bh) - 1, 0, h - 1), y0)
        return ImageBoxes(
            np.stack([x0, y0, x1, y1], 1),
            self.classes[start:stop],
            np.zeros(stop - start, bool),
            self.crowd[start:stop],
        )
