"""The one interface every data source implements, the helpers every reader shares, and the torch Datasets.

Label conventions (shared by every source, every stage and every artifact):
- `class_names` lists the foreground classes only. Foreground class c (0-based) is mask value c + 1.
- Mask value 0 is background, 255 is ignore (void borders, crowd regions); nothing else is valid.
- Image-level labels are sorted unique foreground indices 0..C-1.
- Ground-truth boxes (`ImageBoxes`, where `has_boxes()`): one row per annotated object, x0, y0, x1, y1 as
  inclusive 0-based pixel coordinates of the original image (a box covers columns x0..x1 and rows y0..y1, so its
  area is (x1 - x0 + 1) * (y1 - y0 + 1)), with the object's foreground class index 0..C-1 and its VOC
  `difficult` / COCO `iscrowd` flags. Every box lies inside the image. Each reader converts its own
  convention (VOC's 1-based pixels, COCO's continuous [x, y, w, h]) once, in `load_boxes`.

Errors name the file and the problem. A reader's errors carry a short `reason` that a skip policy counts.
"""

from __future__ import annotations

import copy
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from wsss.artifacts import IGNORE_INDEX, read_mask
from wsss.dist import progress

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
# Above any real VOC (500 x 500) or COCO (640 x 640) image by two orders of magnitude; below Pillow's own
# decompression-bomb error (2 x 89.5 MP), so this cap is the one that trips.
DEFAULT_MAX_PIXELS = 50_000_000
# How far from the end of a file its end marker may sit (some writers pad after it).
_TAIL_BYTES = 4096


class SampleError(ValueError):
    """A sample that cannot be used: the message names the file and the problem, `reason` is a short key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Pickled whole (a DataLoader or process-pool worker sends it back): message and reason, notes kept.
        return type(self), (self.args[0], self.reason), self.__dict__


class MissingFileError(FileNotFoundError):
    """A file the sample needs does not exist; `reason` is a short key for skip counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:
        return type(self), (self.args[0], self.reason), self.__dict__


def error_reason(e: Exception) -> str:
    """The skip-count key of an error raised by a reader."""
    return getattr(e, "reason", "missing_file" if isinstance(e, FileNotFoundError) else "invalid")


def check_on_error(on_error: str) -> str:
    """Validate an `on_error` policy value."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return str(on_error)


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


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare the fields with numpy
class ImageBoxes:
    """The ground-truth boxes of one image (the convention is in the module docstring).

    Args:
        boxes: (N, 4) int64 x0, y0, x1, y1, inclusive 0-based pixel coordinates.
        classes: (N,) int64 foreground class index 0..C-1 of each box.
        difficult: (N,) bool, VOC's `<difficult>` (False where the source has no such flag).
        crowd: (N,) bool, COCO's `iscrowd` (False where the source has no such flag).
    """

    boxes: np.ndarray
    classes: np.ndarray
    difficult: np.ndarray
    crowd: np.ndarray

    def __post_init__(self) -> None:
        # Coerce once here so every reader (and an empty image's lists) yields the same dtypes and shapes.
        boxes = np.asarray(self.boxes, dtype=np.int64).reshape(-1, 4)
        n = len(boxes)
        fields = {"boxes": boxes}
        for name, dtype in (("classes", np.int64), ("difficult", bool), ("crowd", bool)):
            fields[name] = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            if len(fields[name]) != n:
                raise ValueError(f"ImageBoxes: {n} boxes but {len(fields[name])} {name}")
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.boxes)

    def of_class(self, c: int) -> np.ndarray:
        """The (M, 4) boxes of foreground class `c` (crowd and difficult ones included)."""
        return self.boxes[self.classes == c]


def _open(path: Path, kind: str, max_pixels: int | None) -> Image.Image:
    """Open an image file (header only) and refuse it above `max_pixels`; errors name the file."""
    if not path.is_file():
        raise MissingFileError(f"{kind} not found: {path}", f"missing_{kind}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below decides
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise SampleError(f"{path}: {kind} too large ({e})", "too_many_pixels") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleError(f"{path}: unreadable {kind} ({e})", f"unreadable_{kind}") from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise SampleError(
            f"{path}: {kind} has {w}x{h} = {w * h:,} pixels, above the cap of {max_pixels:,} (dataset.max_pixels)",
            "too_many_pixels",
        )
    return img


def _check_complete(path: Path, fmt: str | None, kind: str) -> None:
    """A cheap test for a cut-off file: JPEG must end with its EOI marker, PNG with its IEND chunk."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _TAIL_BYTES))
        tail = f.read()
    if marker not in tail:
        raise SampleError(f"{path}: truncated {kind} (no {fmt} end marker)", f"truncated_{kind}")


def image_size(path: Path, kind: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(H, W) of an image (or, with kind="mask", a mask PNG) from its header, checked for a cut-off end.

    Reads no pixel data; refuses an image above `max_pixels` and a JPEG / PNG without its end marker.
    """
    with _open(path, kind, max_pixels) as img:
        w, h = img.size
        fmt = img.format
    _check_complete(path, fmt, kind)
    return h, w


def decode_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode an image file into a (3, H, W) uint8 RGB tensor (greyscale, palette, CMYK -> RGB).

    Pillow refuses truncated or corrupt files (never fills in grey); EXIF orientation is ignored, as the
    VOC / COCO masks are aligned with the stored pixels. (Measured equal, pixel for pixel, to OpenCV's decode
    on the shared VOC / COCO samples.)
    """
    with _open(path, "image", max_pixels) as img:
        try:
            rgb = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise SampleError(f"{path}: undecodable image ({e})", "unreadable_image") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


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
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {size[1]}x{size[0]} (W x H)",
            "size_mismatch",
        )
    return mask


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """Sorted unique foreground indices present in a mask (0 and 255 excluded), int64."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    return present.astype(np.int64) - 1


class SegmentationSource(ABC):
    """A split of a segmentation dataset: image ids, RGB images, image-level labels and ground-truth masks.

    Subclasses call `super().__init__(root, name, split, on_error, max_pixels)`, set `class_names` and `ids`,
    and implement `image_path`, `labels`, `label_table` and `_mask`. `skipped` counts ids dropped under a skip
    policy, by reason, for the manifest. A source with ground-truth boxes overrides `has_boxes` and
    `load_boxes`.
    """

    name: str
    root: Path
    split: str
    class_names: list[str]
    ids: list[str]
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    void_labels: tuple[int, ...] = ()  # mask values read as 255 (`set_void_classes`)

    def __init__(
        self, root: str | Path, name: str, split: str, on_error: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        self.name = name
        self.split = split
        self.on_error = check_on_error(on_error)
        self.max_pixels = max_pixels
        self.skipped: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def image_path(self, image_id: str) -> Path:
        """Path of the image file."""

    @abstractmethod
    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels: sorted unique foreground class indices (int64, values in 0..C-1)."""

    @abstractmethod
    def label_table(self) -> dict[str, np.ndarray]:
        """Labels of every id in the split."""

    @abstractmethod
    def _mask(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        """The checked ground-truth mask of an image whose (H, W) is `size`."""

    @property
    def has_labels(self) -> bool:
        """Whether `labels` can answer (a folder of new images without a labels file cannot)."""
        return True

    def has_mask(self, image_id: str) -> bool:
        """Whether the image has a ground-truth mask (every image of a scored split does, but in a folder)."""
        return True

    def subset(self, ids: list[str]) -> SegmentationSource:
        """The same source restricted to `ids` (in that order), e.g. the images that have ground truth."""
        out = copy.copy(self)
        out.ids = list(ids)
        return out

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image, from its header (checked against the pixel cap and for a cut-off end)."""
        return image_size(self.image_path(image_id), max_pixels=self.max_pixels)

    def load_image(self, image_id: str) -> Tensor:
        """The image as a (3, H, W) uint8 RGB tensor."""
        return decode_rgb(self.image_path(image_id), self.max_pixels)

    def load_mask(self, image_id: str) -> np.ndarray:
        """The ground-truth mask as (H, W) uint8: 0 background, c + 1 class c, 255 ignore (and `void_classes`)."""
        mask = self._mask(image_id, self.image_size(image_id))
        if self.void_labels:
            mask = np.where(np.isin(mask, self.void_labels), np.uint8(255), mask)
        return mask

    def image_labels(self, image_id: str) -> np.ndarray:
        """`labels` without the `void_classes`: what training and the CAMs see (a void class is never a target)."""
        labels = self.labels(image_id)
        if not self.void_labels:
            return labels
        return labels[~np.isin(labels + 1, self.void_labels)]

    def drop_void(self, labels: Tensor) -> Tensor:
        """Class indices (a predicted label set) without the `void_classes`."""
        if not self.void_labels:
            return labels
        return labels[~torch.isin(labels + 1, torch.as_tensor(self.void_labels, dtype=labels.dtype))]

    def set_void_classes(self, names: Sequence[str]) -> None:
        """Score none of these classes: their ground-truth pixels read as 255 (ignore) everywhere masks are read,
        and they leave the image labels (`image_labels`) that training and the CAMs use."""
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise ValueError(f"dataset.void_classes: {unknown} are not classes of {self.name} ({self.class_names})")
        self.void_labels = tuple(self.class_names.index(n) + 1 for n in names)

    def has_boxes(self) -> bool:
        """Whether `load_boxes` can work: the source carries ground-truth boxes."""
        return False

    def load_boxes(self, image_id: str) -> ImageBoxes:
        """The ground-truth boxes of an image, in the convention of the module docstring.

        Raises:
            ValueError: the source has no boxes (see `has_boxes`); sources with boxes override this.
        """
        raise ValueError(
            f"{self.name}/{self.split}: {type(self).__name__} has no ground-truth boxes (has_boxes() is False); "
            f"cannot load boxes for {image_id!r}"
        )

    def load_sample(self, image_id: str) -> tuple[Tensor, np.ndarray]:
        """Image (3, H, W) uint8 and its checked mask (H, W) uint8, decoded once each."""
        image = self.load_image(image_id)
        return image, self._mask(image_id, tuple(image.shape[1:]))

    def identity(self) -> dict[str, Any]:
        """What identifies this split's content, for manifests and for refusing mismatched artifacts."""
        return {
            "dataset": self.name,
            "root": str(Path(self.root).resolve()),
            "split": self.split,
            "class_names": list(self.class_names),
            "num_images": len(self.ids),
        }

    def multi_hot(self, image_id: str) -> Tensor:
        """Image-level labels (without the void classes) as a (C,) float multi-hot vector."""
        y = torch.zeros(self.num_classes)
        y[torch.as_tensor(self.image_labels(image_id), dtype=torch.long)] = 1.0
        return y

    def _skip(self, reason: str, image_id: str, message: str) -> None:
        """Count and log one id dropped under the skip policy."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("%s/%s: skipping %s (%s): %s", self.name, self.split, image_id, reason, message)

    def _validate(self, ids: list[str]) -> list[str]:
        """Under on_error="skip": keep the ids that pass `_check`; count and log the others."""
        kept = []
        for image_id in progress(ids, desc=f"{self.name}/{self.split} validate", disable=len(ids) < 100):
            try:
                self._check(image_id)
            except (OSError, ValueError) as e:
                self._skip(error_reason(e), image_id, str(e))
                continue
            kept.append(image_id)
        if self.skipped:
            log.warning(
                "%s/%s: skipped %s; %d of %d ids kept", self.name, self.split, self.skipped, len(kept), len(ids)
            )
        if not kept:
            raise ValueError(f"{self.name}/{self.split}: no images left, every id was skipped ({self.skipped})")
        return kept

    def _check(self, image_id: str) -> None:
        """What the skip policy validates for one id (headers, end markers, masks); raises the reader's error."""
        self._mask(image_id, self.image_size(image_id))


class ClassificationDataset(Dataset):
    """(image, multi-hot label) pairs for training the classifier; `transform` maps uint8 (3,H,W) -> float."""

    def __init__(self, source: SegmentationSource, transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_id = self.source.ids[i]
        return self.transform(self.source.load_image(image_id)), self.source.multi_hot(image_id)


class InferenceDataset(Dataset):
    """Images at original resolution with their labels, one per item (sizes differ, so batch_size=1 or a list)."""

    def __init__(self, source: SegmentationSource, ids: list[str] | None = None, with_labels: bool = True) -> None:
        self.source = source
        self.ids = list(source.ids if ids is None else ids)
        self.with_labels = with_labels  # False: images only (their labels come from the model's predictions)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]
        return {
            "id": image_id,
            "image": self.source.load_image(image_id),
            "labels": torch.as_tensor(self.source.image_labels(image_id) if self.with_labels else [], dtype=torch.long),
        }


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep variable-size samples as a list."""
    return batch


def by_size(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a list of samples into groups of equal image size (order kept within a group), each one batch."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape[-2:]), []).append(item)
    return list(groups.values())
