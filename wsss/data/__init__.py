"""Data sources. Every dataset difference lives in this package; stages only see `SegmentationSource`.

`DATASETS` maps `dataset.name` to its module's `from_config(cfg, split)` (the source) and
`fingerprint_from_config(cfg, split)` (the files that split reads, for cache keys). A new dataset is one module
with those two functions and one entry here (and a `conf/dataset/*.yaml`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf.errors import InterpolationKeyError

from wsss.data.base import (
    ClassificationDataset,
    ImageBoxes,
    InferenceDataset,
    SegmentationSource,
    by_size,
    collate_list,
)
from wsss.fingerprint import FileGroup

__all__ = [
    "DATASETS",
    "ClassificationDataset",
    "ImageBoxes",
    "InferenceDataset",
    "SegmentationSource",
    "build_source",
    "by_size",
    "collate_list",
    "dataset_fingerprint",
    "dataset_identity",
    "resolve_class_names",
]


@dataclass(frozen=True)
class DatasetEntry:
    """Where a dataset's reader lives: a module with `from_config` and `fingerprint_from_config`."""

    module: str
    identity_keys: tuple[str, ...]  # DatasetConfig fields, besides name/root/class_names, that change content

    def load(self) -> Any:
        return importlib.import_module(self.module)


DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry("wsss.data.synthetic", ("synthetic", "mask_dir", "aug_mask_dir", "labels_from")),
    "voc12": DatasetEntry("wsss.data.voc", ("mask_dir", "aug_mask_dir", "labels_from")),
    "coco": DatasetEntry("wsss.data.coco", ("year",)),
    "folder": DatasetEntry("wsss.data.folder", ("val_fraction", "split_seed")),
}


def _entry(cfg: Any) -> DatasetEntry:
    name = str(cfg.name)
    if name not in DATASETS:
        raise ValueError(f"dataset.name={name!r}: unknown dataset; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_class_names(cfg: Any) -> list[str] | None:
    """The class names a composed config's dataset will use when `dataset.class_names` is unset and the reader
    derives them from the data (a folder's labels file); None when the dataset has its own fixed list."""
    resolve = getattr(_entry(cfg.dataset).load(), "resolve_class_names", None)
    return resolve(cfg) if resolve is not None and cfg.dataset.class_names is None else None


def void_classes(cfg: Any) -> list[str]:
    """`dataset.void_classes` of a dataset config; [] for a dataset node composed without a model section."""
    if "void_classes" not in cfg:
        return []
    try:
        return list(cfg.void_classes or [])
    except InterpolationKeyError:  # the default reads model.class_map, which a bare dataset node lacks
        return []


def build_source(cfg: Any, split: str) -> SegmentationSource:
    """The split `split` of the dataset described by a `DatasetConfig` (generating the synthetic one if needed)."""
    source = _entry(cfg).load().from_config(cfg, split)
    void = void_classes(cfg)
    if void:
        source.set_void_classes(void)
    return source


def dataset_fingerprint(cfg: Any, split: str) -> dict[str, FileGroup]:
    """The files the split reads, stamped (see `wsss.fingerprint`); cheap, nothing is decoded."""
    return _entry(cfg).load().fingerprint_from_config(cfg, split)


def dataset_identity(cfg: Any, split: str) -> dict[str, Any]:
    """The config values that determine a split's content (for cache keys; the files are fingerprinted apart)."""
    entry = _entry(cfg)
    ident: dict[str, Any] = {
        "name": str(cfg.name),
        "root": str(Path(cfg.root).resolve()),
        "split": split,
        "class_names": None if cfg.class_names is None else list(cfg.class_names),
        "on_error": str(cfg.on_error),
        "max_pixels": cfg.max_pixels,
    }
    if void_classes(cfg):  # only when set, so the keys of every other run stay what they were
        ident["void_classes"] = void_classes(cfg)
    for k in entry.identity_keys:
        v = cfg[k]
        ident[k] = dict(v) if hasattr(v, "keys") else v
    return ident
