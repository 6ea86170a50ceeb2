"""Your own images: a folder of images with a labels file (`dataset=folder dataset.root=DIR`).

Layout under `root`::

    images/<id>.<jpg|jpeg|png|webp>     anywhere below images/, nested folders allowed; the id is the path
                                        relative to images/ without its extension (`ward3/scan_017`)
    labels.csv or labels.json           image-level labels (optional: without one, only a trained model's
                                        predictions can label the images, `cam.labels=predicted`)
    masks/<id>.png                      optional ground truth, for some images or all (0 background, c + 1
                                        class c, 255 ignore; palette or greyscale PNG)
    splits/<name>.txt                   optional split lists, one id per line

`labels.csv` has a header that decides its form: `image,labels` (the image's path relative to images/, with or
without its extension, then its class names separated by `;`; an empty list is a background-only image), or
`image,<class>,<class>,...` (one 0/1 column per class); the fields are separated by commas (a header that
parses with `;` or tab instead is refused, naming that delimiter). `labels.json` maps each id to a list of class
names.
Class names come from `dataset.class_names`, or, when unset, are the sorted names the labels file uses (the
run writes them into its config). Without `splits/`, every image is in `train` (WSSS makes pseudo labels for
the images the classifier trained on) except a seeded `dataset.val_fraction` of them, held out as `val`; the
held-out ids are recorded in every artifact's manifest and nothing is written into the folder.

Bad input (a labels row naming an image that does not exist, an image without a row, an unknown class name when
`dataset.class_names` is set, duplicate ids, a malformed CSV row, an undecodable image) follows
`dataset.on_error`: `raise` stops with the file and line named; `skip` drops the image, counts it by reason
(the manifest's `skipped`) and logs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsss.data.base import (
    DEFAULT_MAX_PIXELS,
    MissingFileError,
    SampleError,
    SegmentationSource,
    check_class_names,
    read_label_mask,
)
from wsss.data.labels_file import (
    IMAGE_SUFFIXES,
    LABEL_FILES,
    LabelsFile,
    Problem,
    find_labels_file,
    image_id,
    read_labels_file,
)
from wsss.fingerprint import FileGroup, hash_files, scan_dir

log = logging.getLogger(__name__)

NO_LABELS_HINT = (
    "give image-level labels in labels.csv or labels.json, or label new images with a trained model: "
    "model.checkpoint=PATH cam.labels=predicted"
)


def scan_images(images_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Every image below `images_dir` by id, and the ids that more than one file claims (a.jpg and a.png)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no images folder (dataset=folder reads DIR/images/)")
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(images_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            found.setdefault(image_id(path.relative_to(images_dir).as_posix()), []).append(path)
    images = {k: v[0] for k, v in found.items() if len(v) == 1}
    return images, {k: v for k, v in found.items() if len(v) > 1}


def checkpoint_class_names(path: str | Path) -> list[str]:
    """The class names a wsss checkpoint was trained with (for images that have no labels file)."""
    from wsss.models import load_checkpoint

    return load_checkpoint(path)[1]


def resolve_class_names(cfg: Any) -> list[str] | None:
    """`dataset.class_names` of a folder dataset when unset: the labels file's sorted names, else the
    checkpoint's (`model.checkpoint`, for new images labelled by the model); None when neither exists."""
    root = Path(cfg.dataset.root)
    labels = find_labels_file(root) if root.is_dir() else None
    if labels is not None:
        names = read_labels_file(labels).names()
        if not names:
            raise ValueError(f"{labels}: no class names in the file; every image is background only")
        return names
    if cfg.model.checkpoint:
        return checkpoint_class_names(cfg.model.checkpoint)
    return None


def held_out(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The seeded `fraction` of `ids` held out as `val` (rounded; at least one when fraction > 0)."""
    if fraction <= 0 or not ids:
        return set()
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    ordered = sorted(ids)
    return {ordered[i] for i in order[:n]}


def split_ids(root: Path, split: str, images: list[str], val_fraction: float, seed: int) -> list[str]:
    """The ids of `split`: `splits/<split>.txt` when `splits/` exists, else all images less the held-out
    ones (`train`) or the held-out ones (`val`)."""
    splits = root / "splits"
    if splits.is_dir():
        path = splits / f"{split}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in splits.glob("*.txt"))
            raise FileNotFoundError(f"{path}: no split list {split!r} (splits/ has {have})")
        ids = [image_id(line) for line in path.read_text().splitlines() if line.strip()]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if dup:
            raise ValueError(f"{path}: duplicate ids {dup[:5]}")
        return ids
    val = held_out(images, val_fraction, seed)
    if split == "train":
        return [i for i in sorted(images) if i not in val]
    if split == "val":
        if not val:
            raise ValueError(
                f"{root}: no val split: set dataset.val_fraction (e.g. 0.1) to hold images out, "
                f"or list them in {splits / 'val.txt'}"
            )
        return sorted(val)
    raise ValueError(f"{root}: split {split!r} needs {splits / (split + '.txt')} (without splits/: train, val)")


class FolderSource(SegmentationSource):
    """A split of a folder dataset (the layout is in the module docstring).

    Args:
        root: The folder with images/ and the labels file.
        split: `train`, `val` (held out by `val_fraction`) or the name of a `splits/<name>.txt` list.
        class_names: Foreground classes; None: the sorted names of the labels file.
        val_fraction: Share of the images held out as `val` when there is no `splits/` folder.
        split_seed: Seed of the held-out draw.
        on_error: `raise` or `skip` (see the module docstring).
        max_pixels: Larger images are refused.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: list[str] | None = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        on_error: str = "raise",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(root, "folder", split, on_error, max_pixels)
        self.images_dir = self.root / "images"
        self.masks_dir = self.root / "masks"
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        images, clashes = scan_images(self.images_dir)
        problems = [
            Problem(k, "duplicate_id", f"{self.images_dir}: id {k!r} names {len(v)} files: {[p.name for p in v]}")
            for k, v in sorted(clashes.items())
        ]
        every = sorted([*images, *clashes])
        ids = split_ids(self.root, split, every, self.val_fraction, self.split_seed)
        wanted = set(ids)
        labels_path = find_labels_file(self.root)
        self.labels_file = labels_path.name if labels_path else None
        self._labels: dict[str, np.ndarray] = {}
        if labels_path is not None:
            parsed = read_labels_file(labels_path)
            self.class_names = check_class_names(class_names if class_names is not None else parsed.names())
            problems += parsed.problems + self._index_labels(parsed)
            problems += [
                Problem(
                    k, "missing_image", f"{labels_path} ({parsed.where[k]}): image {k!r} not under {self.images_dir}"
                )
                for k in parsed.rows
                if k not in images and k not in clashes
            ]
        elif class_names is None:
            raise ValueError(f"{self.root}: no labels.csv or labels.json and no dataset.class_names; {NO_LABELS_HINT}")
        else:
            self.class_names = check_class_names(class_names)
        named = {p.image_id for p in problems}
        problems += [
            Problem(
                k, "missing_image", f"{self.root / 'splits' / f'{split}.txt'}: image {k!r} not under {self.images_dir}"
            )
            for k in ids
            if k not in images and k not in named
        ]
        if labels_path is not None:
            problems += [
                Problem(k, "no_labels_row", f"{images[k]}: no row in {labels_path.name}")
                for k in ids
                if k in images and k not in self._labels and k not in named
            ]
        self._images = images
        self.held_out = (
            [] if (self.root / "splits").is_dir() else sorted(held_out(every, self.val_fraction, self.split_seed))
        )
        # A problem is this split's when it names one of its images, the whole file, or an image that is not there.
        mine = [p for p in problems if p.image_id is None or p.image_id in wanted or p.image_id not in images]
        self.ids = self._apply(mine, [k for k in ids if k in images])
        empty = sum(1 for k in self.ids if self.has_labels and len(self._labels[k]) == 0)
        if empty:
            log.info("folder/%s: %d of %d images have no labels (background only)", split, empty, len(self.ids))

    def _index_labels(self, parsed: LabelsFile) -> list[Problem]:
        """Class indices of every row; a row naming a class outside `class_names` becomes a problem."""
        index = {n: i for i, n in enumerate(self.class_names)}
        problems = []
        for key, names in parsed.rows.items():
            unknown = [n for n in names if n not in index]
            if unknown:
                problems.append(
                    Problem(
                        key,
                        "unknown_class",
                        f"{parsed.path} ({parsed.where[key]}): class {unknown[0]!r} is not in dataset.class_names "
                        f"{self.class_names}",
                    )
                )
                continue
            self._labels[key] = np.array(sorted(index[n] for n in names), dtype=np.int64)
        return problems

    def _apply(self, problems: list[Problem], ids: list[str]) -> list[str]:
        """Raise on the first problem (on_error=raise), or drop, count and log the ids concerned (skip)."""
        if problems and self.on_error == "raise":
            raise SampleError(problems[0].message + " (dataset.on_error=skip drops such images)", problems[0].reason)
        dropped: set[str] = set()
        for p in problems:
            if p.image_id is None or p.image_id not in dropped:
                dropped.add(p.image_id)
                self._skip(p.reason, p.image_id or "-", p.message)
        kept = [k for k in ids if k not in dropped]
        if not kept:
            raise ValueError(
                f"{self.root}: split {self.split!r} has no images ({len(ids)} listed, skipped {self.skipped})"
            )
        return self._validate(kept) if self.on_error == "skip" else kept

    @property
    def has_labels(self) -> bool:
        """Whether the folder has a labels file (without one, only predicted labels can be used)."""
        return self.labels_file is not None

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._images:
            raise MissingFileError(f"image {image_id!r} not under {self.images_dir}", "missing_image")
        return self._images[image_id]

    def mask_path(self, image_id: str) -> Path:
        return self.masks_dir / f"{image_id}.png"

    def has_mask(self, image_id: str) -> bool:
        return self.mask_path(image_id).is_file()

    def labels(self, image_id: str) -> np.ndarray:
        if not self.has_labels:
            raise ValueError(
                f"{self.root}: no labels.csv or labels.json, so image {image_id!r} has no labels; {NO_LABELS_HINT}"
            )
        return self._labels[image_id]

    def label_table(self) -> dict[str, np.ndarray]:
        return {k: self.labels(k) for k in self.ids}

    def _mask(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        path = self.mask_path(image_id)
        if not path.is_file():
            raise MissingFileError(f"no ground-truth mask for {image_id!r}: {path}", "no_ground_truth")
        return read_label_mask(path, self.num_classes, size)

    def _check(self, image_id: str) -> None:
        size = self.image_size(image_id)
        if self.has_mask(image_id):
            self._mask(image_id, size)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out.update(labels_file=self.labels_file, val_fraction=self.val_fraction, split_seed=self.split_seed)
        out["held_out"] = self.held_out
        return out


def fingerprint_from_config(cfg: Any, split: str) -> dict[str, FileGroup]:
    """What a folder split reads: the labels file's and split list's bytes; name, size, mtime of images, masks."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    return {
        "labels": hash_files([root / n for n in LABEL_FILES], "labels file"),
        "split_list": hash_files([root / "splits" / f"{split}.txt"], f"splits/{split}.txt"),
        "images": scan_dir(root / "images", None, "images", suffixes=IMAGE_SUFFIXES, recursive=True),
        "masks": scan_dir(root / "masks", None, "masks", suffixes=(".png",), recursive=True),
    }


def from_config(cfg: Any, split: str) -> FolderSource:
    """The split of a folder dataset described by a `DatasetConfig`."""
    return FolderSource(
        cfg.root,
        split,
        class_names=None if cfg.class_names is None else list(cfg.class_names),
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        on_error=str(cfg.on_error),
        max_pixels=cfg.max_pixels,
    )


__all__ = ["FolderSource", "fingerprint_from_config", "from_config", "resolve_class_names", "scan_images"]
