"""PASCAL VOC layout reader, for VOC 2012 (+ SBD augmentation) and any dataset laid out the same way.

Layout under `root` (e.g. `.../VOCdevkit/VOC2012`)::

    JPEGImages/<id>.jpg                     images
    SegmentationClass/<id>.png              palette masks (0 background, c + 1 class c, 255 void)
    SegmentationClassAug/<id>.png           SBD-derived masks (scripts/prepare_voc12.py writes them)
    Annotations/<id>.xml                    object names, used for labels only where no mask exists
    ImageSets/Segmentation/<split>.txt      one id per line (train, val, train_aug, ...)

Masks are looked up in `mask_dir` (default SegmentationClass), then in `aug_mask_dir` (default
SegmentationClassAug). Image-level labels are the classes present in the mask (0 and 255 excluded); an image
without any mask gets them from its XML annotation (every `<object>`, difficult ones included).

Errors name the file and the problem. With `on_error="skip"` the constructor runs a validation pass over the
split (reads every image header and every mask once, or the XML where no mask exists; measured 0.7 ms
per VOC image on one core, warm file cache) and drops the ids that fail, counting them in `skipped[reason]`;
the labels read on the way are kept, so the pass also fills the label cache.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from wsss.artifacts import IGNORE_INDEX, read_mask
from wsss.data.base import SegmentationSource

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

ON_ERROR = ("raise", "skip")


class SampleError(ValueError):
    """A sample that cannot be used: the message names the file and the problem, `reason` is a short key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MissingFileError(FileNotFoundError):
    """A file the sample needs does not exist; `reason` is a short key for skip counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def error_reason(e: Exception) -> str:
    """The skip-count key of an error raised by a reader."""
    return getattr(e, "reason", "missing_file" if isinstance(e, FileNotFoundError) else "invalid")


def check_on_error(on_error: str) -> str:
    """Validate an `on_error` policy value."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Foreground class names: non-empty, unique, at most 254 (mask values 1..254; 255 is ignore)."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names has duplicates: {dup}")
    if len(names) > IGNORE_INDEX - 1:
        raise ValueError(f"at most {IGNORE_INDEX - 1} classes fit a uint8 mask, got {len(names)}")
    return names


def image_size(path: Path, kind: str = "image") -> tuple[int, int]:
    """(H, W) of an image (or, with kind="mask", a mask PNG) from its header only: PIL reads no pixel data."""
    if not path.is_file():
        raise MissingFileError(f"{kind} not found: {path}", f"missing_{kind}")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError) as e:
        raise SampleError(f"{path}: unreadable {kind} ({e})", f"unreadable_{kind}") from e
    return h, w


def decode_rgb(path: Path) -> Tensor:
    """Decode an image file into a (3, H, W) uint8 RGB tensor with OpenCV (greyscale -> RGB).

    EXIF orientation is ignored, as the VOC/COCO masks are aligned with the stored pixels. OpenCV decodes BGR;
    this is the one place where it becomes RGB. (torchvision.io's decoders are deprecated since 0.29.)
    """
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}", "missing_image")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise SampleError(f"{path}: unreadable image (OpenCV could not decode it)", "unreadable_image")
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def read_label_mask(path: Path, num_classes: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a (H, W) uint8 label PNG and check it: values in 0..num_classes or 255, and shape == `size`."""
    if not path.is_file():
        raise MissingFileError(f"mask not found: {path}", "missing_mask")
    try:
        mask = read_mask(path)
    except ValueError as e:
        raise SampleError(str(e), "unreadable_mask") from e
    bad = (mask > num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise SampleError(
            f"{path}: class index {int(mask[bad].max()) - 1} (mask value {int(mask[bad].max())}) outside the "
            f"class list of {num_classes} classes (valid mask values: 0..{num_classes} and {IGNORE_INDEX})",
            "class_out_of_range",
        )
    if size is not None and mask.shape != tuple(size):
        raise SampleError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {size[1]}x{size[0]} "
            "(W x H)",
            "size_mismatch",
        )
    return mask


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """Sorted unique foreground indices present in a mask (0 and 255 excluded), int64."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    return present.astype(np.int64) - 1


def read_split(root: Path, split: str) -> list[str]:
    """Image ids listed in ImageSets/Segmentation/<split>.txt.

    Takes the first token of each non-empty line; a token that is a path (the `/JPEGImages/<id>.jpg
    /SegmentationClassAug/<id>.png` lists some repositories ship) is reduced to its stem.
    """
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            token = line.split()[0]
            ids.append(Path(token).stem if "/" in token else token)
    if not ids:
        raise ValueError(f"split list is empty: {path}")
    return ids


class VOCSource(SegmentationSource):
    """A split of a dataset in PASCAL VOC layout; labels are the classes present in each mask.

    Args:
        root: The folder holding JPEGImages/, ImageSets/ and the mask folders (e.g. `VOCdevkit/VOC2012`).
        split: Name of the list `ImageSets/Segmentation/<split>.txt` (train, val, train_aug, ...).
        class_names: Foreground classes, mask value c + 1 = class c; None means the 20 VOC classes.
        mask_dir: Mask folder(s) relative to `root` (or absolute), searched in this order per image.
        aug_mask_dir: Fallback folder searched after `mask_dir` (the SBD masks); None for no fallback.
        name: Dataset name recorded in `identity()`.
        on_error: "raise" stops at the first bad sample when it is read; "skip" validates the whole split at
            construction and drops bad ids, counting them in `skipped[reason]`.
        require_masks: Under "skip", also drop ids that have no mask (set it for splits that are scored);
            without it such ids keep their XML labels and `load_mask` raises if they are scored.
        image_dir: Image folder relative to `root`.
        image_ext: Image file extension.
        annotation_dir: Folder of the VOC XML annotations used for images without a mask.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Sequence[str] | None = None,
        mask_dir: str | Sequence[str] = "SegmentationClass",
        name: str = "voc12",
        *,
        aug_mask_dir: str | None = "SegmentationClassAug",
        on_error: str = "raise",
        require_masks: bool = False,
        image_dir: str = "JPEGImages",
        image_ext: str = ".jpg",
        annotation_dir: str = "Annotations",
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        self.name = name
        self.split = split
        self.class_names = check_class_names(VOC_CLASSES if class_names is None else class_names)
        self._class_index = {n: i for i, n in enumerate(self.class_names)}
        dirs = [mask_dir] if isinstance(mask_dir, (str, Path)) else list(mask_dir)
        if aug_mask_dir is not None and aug_mask_dir not in dirs:
            dirs.append(aug_mask_dir)
        if not dirs:
            raise ValueError("mask_dir names no folder")
        self.mask_dirs = [self.root / d for d in dirs]
        self.mask_dir = self.mask_dirs[0]
        self.image_dir = self.root / image_dir
        self.image_ext = image_ext
        self.annotation_dir = self.root / annotation_dir
        self.on_error = check_on_error(on_error)
        self.require_masks = require_masks
        self._labels: dict[str, np.ndarray] = {}
        self.ids = self._dedupe(read_split(self.root, split))
        if self.on_error == "skip":
            self.ids = self._validate(self.ids)

    # -- paths -----------------------------------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        """Path of the image file."""
        return self.image_dir / f"{image_id}{self.image_ext}"

    def mask_path(self, image_id: str) -> Path | None:
        """The first existing `<mask_dir>/<id>.png` in search order, or None."""
        for d in self.mask_dirs:
            p = d / f"{image_id}.png"
            if p.is_file():
                return p
        return None

    def annotation_path(self, image_id: str) -> Path:
        """Path of the VOC XML annotation."""
        return self.annotation_dir / f"{image_id}.xml"

    # -- loaders ---------------------------------------------------------------------------------------------

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image, from its header."""
        return image_size(self.image_path(image_id))

    def load_image(self, image_id: str) -> Tensor:
        return decode_rgb(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        """The mask, checked: values in 0..C or 255, same size as the image (read from the image header)."""
        return self._read_mask(image_id, self.image_size(image_id))

    def load_sample(self, image_id: str) -> tuple[Tensor, np.ndarray]:
        """Image (3, H, W) uint8 and its checked mask (H, W) uint8, decoded once each."""
        image = self.load_image(image_id)
        return image, self._read_mask(image_id, tuple(image.shape[1:]))

    def labels(self, image_id: str) -> np.ndarray:
        """Classes present in the mask, or in the XML annotation for an image without mask; cached."""
        cached = self._labels.get(image_id)
        if cached is None:
            path = self.mask_path(image_id)
            if path is not None:
                cached = labels_from_mask(read_label_mask(path, self.num_classes))
            else:
                cached = self._labels_from_xml(image_id)
            self._labels[image_id] = cached
        return cached

    def label_table(self) -> dict[str, np.ndarray]:
        """Labels of every id in the split: one pass over the masks on first call, then from the cache."""
        missing = [i for i in self.ids if i not in self._labels]
        for image_id in tqdm(missing, desc=f"{self.name}/{self.split} labels", disable=len(missing) < 100):
            self.labels(image_id)
        return {i: self._labels[i] for i in self.ids}

    # -- helpers ---------------------------------------------------------------------------------------------

    def _read_mask(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        """Read and check the mask of `image_id` against the image size `size` = (H, W)."""
        path = self.mask_path(image_id)
        if path is None:
            looked = ", ".join(str(d / f"{image_id}.png") for d in self.mask_dirs)
            raise MissingFileError(f"mask not found for {image_id!r}: looked for {looked}", "missing_mask")
        mask = read_label_mask(path, self.num_classes, size)
        self._labels.setdefault(image_id, labels_from_mask(mask))
        return mask

    def _labels_from_xml(self, image_id: str) -> np.ndarray:
        """Labels from the `<object><name>` entries of the VOC XML annotation."""
        path = self.annotation_path(image_id)
        if not path.is_file():
            looked = ", ".join(str(d / f"{image_id}.png") for d in self.mask_dirs)
            raise MissingFileError(
                f"no labels for {image_id!r}: no mask ({looked}) and no annotation {path}", "missing_labels"
            )
        try:
            objects = ET.parse(path).getroot().findall("object")
        except ET.ParseError as e:
            raise SampleError(f"{path}: unreadable annotation ({e})", "unreadable_annotation") from e
        found = set()
        for obj in objects:
            name = (obj.findtext("name") or "").strip()
            if name not in self._class_index:
                raise SampleError(
                    f"{path}: object name {name!r} is not in class_names {self.class_names}",
                    "unknown_class_name",
                )
            found.add(self._class_index[name])
        return np.array(sorted(found), dtype=np.int64)

    def _dedupe(self, ids: list[str]) -> list[str]:
        """Refuse (or, under skip, drop and count) ids listed twice: they would be scored twice."""
        seen: set[str] = set()
        out = []
        for image_id in ids:
            if image_id in seen:
                if self.on_error == "raise":
                    raise ValueError(
                        f"{self.root / 'ImageSets' / 'Segmentation' / f'{self.split}.txt'}: id {image_id!r} "
                        "is listed more than once"
                    )
                self.skipped["duplicate_id"] = self.skipped.get("duplicate_id", 0) + 1
                log.warning("%s/%s: skipping duplicate id %s", self.name, self.split, image_id)
                continue
            seen.add(image_id)
            out.append(image_id)
        return out

    def _check(self, image_id: str) -> None:
        """Everything `on_error="skip"` validates for one id; raises the reader's error."""
        size = self.image_size(image_id)
        if self.mask_path(image_id) is not None or self.require_masks:
            self._read_mask(image_id, size)
        else:
            self.labels(image_id)

    def _validate(self, ids: list[str]) -> list[str]:
        """Keep the ids that pass `_check`; count and log the others."""
        kept = []
        for image_id in tqdm(ids, desc=f"{self.name}/{self.split} validate", disable=len(ids) < 100):
            try:
                self._check(image_id)
            except (OSError, ValueError) as e:
                reason = error_reason(e)
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                log.warning("%s/%s: skipping %s (%s): %s", self.name, self.split, image_id, reason, e)
                continue
            kept.append(image_id)
        if self.skipped:
            n = len(ids)
            log.warning(
                "%s/%s: skipped %s; %d of %d ids kept", self.name, self.split, self.skipped, len(kept), n
            )
        if not kept:
            raise ValueError(
                f"{self.name}/{self.split}: every id was skipped ({self.skipped}); nothing to read"
            )
        return kept


__all__ = [
    "MissingFileError",
    "SampleError",
    "VOCSource",
    "VOC_CLASSES",
    "decode_rgb",
    "image_size",
    "labels_from_mask",
    "read_label_mask",
    "read_split",
]
