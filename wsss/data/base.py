"""The one interface every data source implements, and the torch Datasets the stages build on it.

Label conventions (shared by every source, every stage and every artifact):
- `class_names` lists the foreground classes only. Foreground class c (0-based) is mask value c + 1.
- Mask value 0 is background, 255 is ignore (void borders, crowd regions); nothing else is valid.
- Image-level labels are sorted unique foreground indices 0..C-1.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class SegmentationSource(ABC):
    """A split of a segmentation dataset: image ids, RGB images, image-level labels and ground-truth masks.

    Subclasses set `name`, `root`, `split`, `class_names` and `ids` in their constructor and implement the
    three loaders. `skipped` counts ids dropped under a skip policy, by reason, for the manifest.
    """

    name: str
    root: Path
    split: str
    class_names: list[str]
    ids: list[str]

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load_image(self, image_id: str) -> Tensor:
        """The image as a (3, H, W) uint8 RGB tensor."""

    @abstractmethod
    def load_mask(self, image_id: str) -> np.ndarray:
        """The ground-truth mask as (H, W) uint8: 0 background, c + 1 class c, 255 ignore."""

    @abstractmethod
    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels: sorted unique foreground class indices (int64, values in 0..C-1)."""

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
        """Image-level labels as a (C,) float multi-hot vector."""
        y = torch.zeros(self.num_classes)
        y[torch.as_tensor(self.labels(image_id), dtype=torch.long)] = 1.0
        return y


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

    def __init__(self, source: SegmentationSource, ids: list[str] | None = None) -> None:
        self.source = source
        self.ids = list(source.ids if ids is None else ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]
        return {
            "id": image_id,
            "image": self.source.load_image(image_id),
            "labels": torch.as_tensor(self.source.labels(image_id), dtype=torch.long),
        }


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep variable-size samples as a list."""
    return batch
