"""MS-COCO 2014 / 2017 reader: image-level labels and semantic ground truth from the instance annotations.

Layout under `root`::

    annotations/instances_<split><year>.json     e.g. instances_train2014.json
    <split><year>/<file_name>                    e.g. train2014/COCO_train2014_000000000009.jpg
    SegmentationClass<split><year>/<stem>.png    optional: masks exported by scripts/prepare_coco.py

Classes: the json's categories sorted by category id map to contiguous foreground indices 0..79 (mask value
index + 1, background 0); `class_names` are the category names in that order.

Image-level labels: the categories of the image's non-crowd annotations.

Semantic masks (`build_mask`), the documented composition rule:
1. Every non-crowd instance is rasterised with pycocotools `annToMask` and painted with its class value, in
   order of decreasing annotation `area` (ties: increasing annotation id), so where instances overlap the
   smaller one stays on top.
2. The union of the crowd regions is then set to 255 (ignore) where no instance was painted: crowd covers
   background only, never a labelled instance.
3. Everything else is background (0).

Images without any non-crowd annotation have no image-level label. `empty_images="skip"` (default; published
WSSS COCO lists likewise drop unlabelled images) drops them, counted in `skipped["no_labels"]` and logged;
`"keep"` keeps them as all-background images (crowd regions still 255).

Ids are the image file stems, in increasing COCO image id order.

Boxes (`load_boxes`): every annotation of the image with a known category, crowd ones included (flagged
`crowd`), in json order. COCO's `bbox` [x, y, w, h] is in continuous coordinates (pixel k spans [k, k + 1)), so
the pixels a box touches are x0 = floor(x), y0 = floor(y), x1 = ceil(x + w) - 1, y1 = ceil(y + h) - 1 (0-based
inclusive, the convention of `wsss.data.base`), clipped into the image of the json's size and kept non-empty.
A compact table of the boxes is built at construction, so boxes also work after the index is freed for exported
masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from torch import Tensor

from wsss.artifacts import IGNORE_INDEX, read_json
from wsss.data.base import (
    DEFAULT_MAX_PIXELS,
    ImageBoxes,
    SampleError,
    SegmentationSource,
    check_class_names,
    decode_rgb,
    image_size,
    read_label_mask,
)
from wsss.data.coco_boxes import BoxTable
from wsss.fingerprint import FileGroup, scan_dir, stat_files

log = logging.getLogger(__name__)

EXPORT_MARKER = "export.json"
EMPTY_IMAGES = ("skip", "keep")
MASK_SOURCES = ("auto", "export", "rasterise")
# Bumped whenever build_mask's rule changes, so an export made under an older rule is not trusted.
COMPOSITION_RULE = "area-desc-smaller-on-top/crowd-255-over-background/v1"


class COCOSource(SegmentationSource):
    """A split of MS-COCO (2014 or 2017) as semantic segmentation with image-level labels.

    Args:
        root: Folder holding `annotations/` and the `<split><year>/` image folders.
        split: "train" or "val" (any `<split>` with `annotations/instances_<split><year>.json`).
        year: 2014 or 2017.
        class_names: None to take the category names from the json; if given, must equal them.
        name: Dataset name recorded in `identity()`.
        on_error: "raise" stops at the first bad sample when it is read (an unknown category id stops the
            constructor); "skip" drops ids with an unknown category, a missing or unreadable image, an image
            whose size differs from the json, or a missing/mis-sized exported mask, counting them in
            `skipped[reason]`. The skip pass reads every image header (and exported mask header), no
            rasterising: measured about 0.05 ms per image with a warm file cache.
        empty_images: "skip" (default) or "keep" images without any non-crowd annotation (see module doc).
        masks: "auto" reads exported PNGs when `export_dir` holds a finished export (its `export.json`), else
            rasterises; "export" requires the export; "rasterise" always rasterises from the json.
        export_dir: Where exported masks live; default `<root>/SegmentationClass<split><year>`.
        annotation_file: Override of the annotation json path.
        image_dir: Override of the image folder (default `<root>/<split><year>`).
        max_pixels: Images above this many pixels are refused (a decompression-bomb guard).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        year: int | str = 2017,
        class_names: Sequence[str] | None = None,
        name: str = "coco",
        *,
        on_error: str = "raise",
        empty_images: str = "skip",
        masks: str = "auto",
        export_dir: str | Path | None = None,
        annotation_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(root, name, split, on_error, max_pixels)
        self.year = int(year)
        if empty_images not in EMPTY_IMAGES:
            raise ValueError(f"empty_images must be one of {EMPTY_IMAGES}, got {empty_images!r}")
        if masks not in MASK_SOURCES:
            raise ValueError(f"masks must be one of {MASK_SOURCES}, got {masks!r}")
        self.empty_images = empty_images
        tag = f"{split}{self.year}"
        self.annotation_file = (
            Path(annotation_file) if annotation_file else self.root / "annotations" / f"instances_{tag}.json"
        )
        self.image_dir = self.root / (image_dir if image_dir is not None else tag)
        self.export_dir = self.root / (export_dir if export_dir is not None else f"SegmentationClass{tag}")

        self._coco = self._load_index()
        self._set_categories(class_names)
        self._images: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, np.ndarray] = {}
        self.ids = self._index_images()
        self.use_export = self._resolve_masks(masks)
        if self.use_export:
            self._coco = None  # the exported PNGs replace the polygons: free the index (GBs for train2014)
        if self.on_error == "skip":
            self.ids = self._validate(self.ids)
        if not self.ids:
            raise ValueError(f"{self.annotation_file}: no images left in {self.name}/{tag} (skipped: {self.skipped})")

    # -- public ----------------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "year": self.year}

    def image_path(self, image_id: str) -> Path:
        """Path of the image file."""
        return self.image_dir / self._record(image_id)["file_name"]

    def export_path(self, image_id: str) -> Path:
        """Path of the exported mask PNG."""
        return self.export_dir / f"{image_id}.png"

    def json_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) recorded in the annotation json."""
        rec = self._record(image_id)
        return int(rec["height"]), int(rec["width"])

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the image header, checked against the json."""
        size = image_size(self.image_path(image_id), max_pixels=self.max_pixels)
        self._check_size(image_id, size)
        return size

    def load_image(self, image_id: str) -> Tensor:
        """The image as a (3, H, W) uint8 RGB tensor, its size checked against the json."""
        image = decode_rgb(self.image_path(image_id), self.max_pixels)
        self._check_size(image_id, tuple(image.shape[1:]))
        return image

    def labels(self, image_id: str) -> np.ndarray:
        """Categories of the image's non-crowd annotations, as sorted foreground indices."""
        self._record(image_id)
        return self._labels[image_id]

    def label_table(self) -> dict[str, np.ndarray]:
        """Labels of every id in the split (computed at construction from the json)."""
        return {i: self._labels[i] for i in self.ids}

    def has_boxes(self) -> bool:
        """True: every COCO annotation carries a `bbox`."""
        return True

    def load_boxes(self, image_id: str) -> ImageBoxes:
        """The image's annotation boxes, crowd ones included, as 0-based inclusive pixels (see module doc).

        Raises:
            SampleError: an annotation of the image has no valid `bbox` (4 finite numbers, w and h >= 0);
                the message names the json and the annotation (reason "bad_box").
        """
        return self._boxes.image_boxes(image_id, self.json_size(image_id))

    def build_mask(self, image_id: str) -> np.ndarray:
        """Rasterise the semantic mask from the json under the rule in the module docstring: (H, W) uint8."""
        if self._coco is None:
            raise RuntimeError(f"{self.name}: the annotation index was freed (masks='export'); cannot rasterise")
        rec = self._record(image_id)
        h, w = int(rec["height"]), int(rec["width"])
        anns = self._coco.imgToAnns.get(rec["id"], [])
        things = [a for a in anns if not a.get("iscrowd", 0)]
        for ann in things:
            if not isinstance(ann.get("area"), (int, float)):
                raise SampleError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has no numeric 'area' to order "
                    "overlapping instances by",
                    "bad_segmentation",
                )
        things.sort(key=lambda a: (-float(a["area"]), a["id"]))
        mask = np.zeros((h, w), dtype=np.uint8)
        for ann in things:
            mask[self._ann_mask(ann, h, w)] = self._cat_index[ann["category_id"]] + 1
        crowd = np.zeros((h, w), dtype=bool)
        for ann in anns:
            if ann.get("iscrowd", 0):
                crowd |= self._ann_mask(ann, h, w)
        mask[crowd & (mask == 0)] = IGNORE_INDEX
        return mask

    def export_record(self) -> dict[str, Any]:
        """What `scripts/prepare_coco.py` writes to `export.json` once every mask of the json is exported."""
        return {
            "annotation_file": self.annotation_file.name,
            "split": self.split,
            "year": self.year,
            "class_names": self.class_names,
            "num_images": len(self._images),
            "rule": COMPOSITION_RULE,
        }

    # -- construction ----------------------------------------------------------------------------------------

    def _load_index(self) -> COCO:
        """Parse the annotation json and build pycocotools' index (its prints are silenced, timing logged)."""
        path = self.annotation_file
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        t0 = time.perf_counter()
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable annotation json ({e})") from e
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{path}: not a COCO instances file (no {key!r} list)")
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        log.info(
            "%s: %d images, %d annotations, %d categories (%.1f s)",
            path,
            len(data["images"]),
            len(data["annotations"]),
            len(data["categories"]),
            time.perf_counter() - t0,
        )
        return coco

    def _set_categories(self, class_names: Sequence[str] | None) -> None:
        """Contiguous class indices from the json's categories sorted by id; `class_names`, if given, must agree."""
        cats = sorted(self._coco.dataset.get("categories", []), key=lambda c: c["id"])
        json_names = [str(c["name"]) for c in cats]
        if class_names is not None and list(class_names) != json_names:
            raise ValueError(
                f"{self.annotation_file}: class_names {list(class_names)} differ from the json's categories "
                f"(sorted by id) {json_names}; leave class_names unset for COCO"
            )
        self.class_names = check_class_names(json_names)
        self.category_ids = [int(c["id"]) for c in cats]
        self._cat_index = {cid: i for i, cid in enumerate(self.category_ids)}

    def _index_images(self) -> list[str]:
        """Ids in image-id order with their labels; unknown categories and empty images handled by policy."""
        coco = self._coco
        bad_category: dict[int, str] = {}
        labels: dict[int, set[int]] = defaultdict(set)
        boxes: list[tuple[int, dict[str, Any], int, bool]] = []  # (image id, annotation, class index, crowd)
        orphans = 0
        for ann in coco.dataset["annotations"]:
            cid = ann.get("category_id")
            if cid not in self._cat_index:
                msg = (
                    f"{self.annotation_file}: annotation {ann.get('id')} (image {ann.get('image_id')}) has "
                    f"unknown category id {cid} (known: {self.category_ids[0]}..{self.category_ids[-1]})"
                )
                if self.on_error == "raise":
                    raise ValueError(msg)
                bad_category.setdefault(ann.get("image_id"), msg)
                continue
            if ann.get("image_id") not in coco.imgs:
                orphans += 1
                continue
            boxes.append((ann["image_id"], ann, self._cat_index[cid], bool(ann.get("iscrowd", 0))))
            if not ann.get("iscrowd", 0):
                labels[ann["image_id"]].add(self._cat_index[cid])
        if orphans:
            log.warning("%s: %d annotations refer to no listed image; ignored", self.annotation_file, orphans)

        ids = []
        empty = []
        for img in sorted(coco.dataset["images"], key=lambda r: r["id"]):
            image_id = Path(img["file_name"]).stem
            if image_id in self._images:
                raise ValueError(f"{self.annotation_file}: file name stem {image_id!r} appears twice")
            if img["id"] in bad_category:
                self._skip("unknown_category", image_id, bad_category[img["id"]])
                continue
            if not labels.get(img["id"]):
                empty.append(image_id)
                if self.empty_images == "skip":
                    continue
            self._images[image_id] = img
            self._labels[image_id] = np.array(sorted(labels.get(img["id"], ())), dtype=np.int64)
            ids.append(image_id)
        if empty:
            if self.empty_images == "skip":
                self.skipped["no_labels"] = len(empty)
            log.info(
                "%s: %d images without non-crowd annotations %s (e.g. %s)",
                self.annotation_file,
                len(empty),
                "skipped" if self.empty_images == "skip" else "kept as all-background",
                empty[:3],
            )
        by_image = {rec["id"]: image_id for image_id, rec in self._images.items()}
        self._boxes = BoxTable(boxes, by_image, self.annotation_file)
        return ids

    def _resolve_masks(self, masks: str) -> bool:
        """Whether exported PNG masks are used; checks the export's marker against this json."""
        if masks == "rasterise":
            return False
        marker = self.export_dir / EXPORT_MARKER
        if not marker.is_file():
            if masks == "export":
                raise FileNotFoundError(
                    f"no finished mask export: {marker} missing; run scripts/prepare_coco.py "
                    f"--root {self.root} --year {self.year} --splits {self.split}"
                )
            if self.export_dir.is_dir():
                log.warning("%s: export not finished (no %s); rasterising masks", self.export_dir, EXPORT_MARKER)
            return False
        record = read_json(marker)
        expected = self.export_record()
        diff = [k for k in ("split", "year", "class_names", "rule") if record.get(k) != expected[k]]
        if diff:
            raise ValueError(
                f"{marker}: export does not match {self.annotation_file} in {diff}; re-run "
                "scripts/prepare_coco.py with --overwrite"
            )
        log.info("%s/%s%d: reading exported masks from %s", self.name, self.split, self.year, self.export_dir)
        return True

    # -- helpers ---------------------------------------------------------------------------------------------

    def _record(self, image_id: str) -> dict[str, Any]:
        rec = self._images.get(image_id)
        if rec is None:
            raise KeyError(f"{image_id!r} is not an image of {self.annotation_file} kept in this source")
        return rec

    def _check_size(self, image_id: str, size: tuple[int, int]) -> None:
        """The image's actual (H, W) must match the json, which sizes the rasterised mask."""
        if tuple(size) != self.json_size(image_id):
            h, w = self.json_size(image_id)
            raise SampleError(
                f"{self.image_path(image_id)}: image size {size[1]}x{size[0]} differs from {w}x{h} in "
                f"{self.annotation_file} (W x H)",
                "size_mismatch",
            )

    def _mask(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        """The semantic mask: the exported PNG if in use, else `build_mask`; checked against the image."""
        if self.use_export:
            return read_label_mask(self.export_path(image_id), self.num_classes, size)
        self._check_size(image_id, size)
        return self.build_mask(image_id)

    def _ann_mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        """One annotation as an (h, w) bool mask via pycocotools `annToMask`."""
        try:
            m = self._coco.annToMask(ann)
        except Exception as e:  # pycocotools raises bare Exception on malformed input; re-raised with context
            raise SampleError(
                f"{self.annotation_file}: annotation {ann.get('id')} has a malformed segmentation ({e})",
                "bad_segmentation",
            ) from e
        if m.shape != (h, w):
            raise SampleError(
                f"{self.annotation_file}: annotation {ann.get('id')} rasterises to "
                f"{m.shape[1]}x{m.shape[0]}, not the image's {w}x{h}",
                "bad_segmentation",
            )
        return m.astype(bool)

    def _check(self, image_id: str) -> None:
        """Under on_error="skip": the image exists with the json's size (and so does its exported mask)."""
        size = self.image_size(image_id)
        if self.use_export:
            path = self.export_path(image_id)
            mask_size = image_size(path, kind="mask", max_pixels=self.max_pixels)
            if mask_size != size:
                raise SampleError(
                    f"{path}: mask size {mask_size[1]}x{mask_size[0]} differs from its image's "
                    f"{size[1]}x{size[0]} (W x H)",
                    "size_mismatch",
                )


def from_config(cfg: Any, split: str) -> COCOSource:
    """The split of MS-COCO described by a `DatasetConfig`."""
    names = None if cfg.class_names is None else list(cfg.class_names)
    return COCOSource(
        cfg.root, split, year=cfg.year, class_names=names, on_error=str(cfg.on_error), max_pixels=cfg.max_pixels
    )


def fingerprint_from_config(cfg: Any, split: str) -> dict[str, FileGroup]:
    """What a COCO split reads: its annotation json, image folder and exported masks (name, size, mtime)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    tag = f"{split}{cfg.year}"
    annotation_file = root / "annotations" / f"instances_{tag}.json"
    if not annotation_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    return {
        "annotations": stat_files([annotation_file], "annotation json"),
        "images": scan_dir(root / tag, None, "image"),
        "export": scan_dir(root / f"SegmentationClass{tag}", None, "exported mask"),
    }


__all__ = ["COMPOSITION_RULE", "EXPORT_MARKER", "COCOSource", "fingerprint_from_config", "from_config"]
