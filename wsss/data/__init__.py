"""Data sources. Every dataset difference lives in this package; stages only see `SegmentationSource`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsss.data.base import ClassificationDataset, InferenceDataset, SegmentationSource, collate_list

__all__ = [
    "ClassificationDataset",
    "InferenceDataset",
    "SegmentationSource",
    "build_source",
    "collate_list",
    "dataset_identity",
]

log = logging.getLogger(__name__)

DATASETS = ("synthetic", "voc12", "coco")


def _check_name(cfg: Any) -> None:
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset.name {cfg.name!r}; choose one of {list(DATASETS)}")
    if cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"dataset.on_error must be 'raise' or 'skip', got {cfg.on_error!r}")


def build_source(cfg: Any, split: str) -> SegmentationSource:
    """The split `split` of the dataset described by a `DatasetConfig` (generating the synthetic one if needed)."""
    _check_name(cfg)
    class_names = None if cfg.class_names is None else list(cfg.class_names)
    if cfg.name == "coco":
        from wsss.data.coco import COCOSource

        return COCOSource(cfg.root, split, year=cfg.year, class_names=class_names, on_error=cfg.on_error)

    from wsss.data.voc import VOCSource

    if cfg.name == "synthetic":
        from wsss.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec, ensure_synthetic

        root = Path(cfg.root)
        if not (root / "generator.json").is_file() and (root / "ImageSets" / "Segmentation").is_dir():
            # A VOC-layout folder someone else made: read it, never generate into it.
            log.info("dataset.root %s is a VOC-layout dataset, not a generated one: reading it as such", root)
            if class_names is None:
                raise ValueError(
                    f"{root}: a VOC-layout dataset needs dataset.class_names=[...] (foreground classes)"
                )
        else:
            s = cfg.synthetic
            spec = SyntheticSpec(
                num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed
            )
            ensure_synthetic(root, spec)
            class_names = class_names or list(SYNTHETIC_CLASSES)
    elif not Path(cfg.root).is_dir():
        raise FileNotFoundError(
            f"dataset root not found: {cfg.root} (set dataset.root=... or the WSSS_DATA environment variable; "
            "see data/README.md)"
        )
    return VOCSource(
        cfg.root,
        split,
        class_names=class_names,
        mask_dir=cfg.mask_dir,
        aug_mask_dir=cfg.aug_mask_dir,
        name=cfg.name,
        on_error=cfg.on_error,
        require_masks=split == cfg.eval_split,  # a scored split needs every mask; training can use XML labels
    )


def dataset_identity(cfg: Any, split: str) -> dict[str, Any]:
    """What determines a split's content, from the config alone (for cache keys; no files are read)."""
    _check_name(cfg)
    ident: dict[str, Any] = {
        "name": cfg.name,
        "root": str(Path(cfg.root).resolve()),
        "split": split,
        "class_names": None if cfg.class_names is None else list(cfg.class_names),
        "on_error": cfg.on_error,
    }
    if cfg.name == "synthetic":
        ident["synthetic"] = dict(cfg.synthetic)
    elif cfg.name == "coco":
        ident["year"] = cfg.year
    else:
        ident["mask_dir"] = cfg.mask_dir
        ident["aug_mask_dir"] = cfg.aug_mask_dir
    return ident
