"""Zero-shot heads: a dataset's classes read from an ImageNet classifier, through a table of ImageNet classes.

    pooled (B, 1280, 1, 1) -> ImageNet fc (with its bias) -> (B, 1000) -> per dataset class k, combine the
      logits of its ImageNet classes S_k (max | logsumexp | mean) -> (B, K)

The tables (`class_maps/imagenet_to_voc.json`, `imagenet_to_coco.json`) list, per dataset class, every ImageNet
index that is a kind of it in WordNet 3.0 (`scripts/build_class_maps.py` builds them and says how); a class with
no ImageNet counterpart is under `unmapped`: its logit is a constant (no map, never predicted) and its pixels are
left out of the score (`dataset.void_classes`). A table may also be a JSON file of the same form.

The head is not linear, so the CAM engine takes its autograd path: the map of class k is the CAM of the
ImageNet class with the largest logit in S_k (max), of the softmax-weighted mix of S_k's head rows (logsumexp),
or of their mean (mean) - each exactly sum_ij dS_k / dA(i, j) . A, Zhou et al.'s map for that score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TABLES = Path(__file__).parent / "class_maps"
COMBINES = ("max", "logsumexp", "mean")
ABSENT = -1.0e4  # the logit of a class without ImageNet classes: sigmoid 0, and no gradient, so a zero map


def table_path(name: str) -> Path:
    """A built-in table's file (`imagenet_to_voc`, `imagenet_to_coco`) or a JSON path."""
    builtin = TABLES / f"{name}.json"
    path = builtin if builtin.is_file() else Path(name)
    if not path.is_file():
        names = sorted(p.stem for p in TABLES.glob("*.json"))
        raise FileNotFoundError(f"model.class_map={name!r}: neither a built-in table {names} nor a JSON file")
    return path


def read_table(name: str) -> dict[str, Any]:
    """The table's `classes` ({class: {"imagenet": [indices], ...}}) and `unmapped` ({class: reason})."""
    path = table_path(name)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a class-map JSON ({e})") from e
    if not isinstance(table, dict) or not isinstance(table.get("classes"), dict):
        raise ValueError(f"{path}: a class map is a JSON object with 'classes' (and optional 'unmapped')")
    for cls, entry in table["classes"].items():
        idx = entry.get("imagenet") if isinstance(entry, dict) else None
        if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and 0 <= i < 1000 for i in idx):
            raise ValueError(f"{path}: class {cls!r} needs a non-empty 'imagenet' list of indices in 0..999")
    table.setdefault("unmapped", {})
    return table


def class_groups(name: str, class_names: list[str]) -> list[list[int]]:
    """Each dataset class's ImageNet indices ([] for an unmapped class); every dataset class must be listed."""
    table = read_table(name)
    known = set(table["classes"]) | set(table["unmapped"])
    missing = [c for c in class_names if c not in known]
    if missing:
        raise ValueError(f"model.class_map={name!r} does not list the dataset's classes {missing}")
    return [list(table["classes"][c]["imagenet"]) if c in table["classes"] else [] for c in class_names]


def unmapped_classes(name: str | None) -> list[str]:
    """The classes a table leaves out of the score (none without a table)."""
    return [] if name is None else sorted(read_table(str(name))["unmapped"])


class ClassMapHead(nn.Module):
    """The ImageNet linear layer, then each dataset class's logit from its group of ImageNet logits.

    Args:
        in_channels: pooled feature channels (1280 for EfficientNet-Lite).
        groups: per dataset class, its ImageNet indices ([] for a class without any).
        combine: "max", "logsumexp" or "mean" over a group's logits.
        num_imagenet: the ImageNet layer's outputs.
    """

    def __init__(self, in_channels: int, groups: list[list[int]], combine: str = "max", num_imagenet: int = 1000):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"class_combine must be one of {COMBINES}, got {combine!r}")
        self.combine = combine
        self.imagenet = nn.Linear(in_channels, num_imagenet)
        width = max(1, max(len(g) for g in groups))
        index = torch.zeros(len(groups), width, dtype=torch.long)
        member = torch.zeros(len(groups), width, dtype=torch.bool)
        for k, g in enumerate(groups):
            index[k, : len(g)] = torch.tensor(g, dtype=torch.long)
            member[k, : len(g)] = True
        self.register_buffer("index", index, persistent=False)  # (K, G) padded ImageNet indices
        self.register_buffer("member", member, persistent=False)  # (K, G) which entries are real

    def forward(self, pooled: Tensor) -> Tensor:
        logits = self.imagenet(pooled.flatten(1))  # (B, 1000)
        grouped = logits[:, self.index]  # (B, K, G)
        present = self.member.any(-1)  # (K,)
        # An empty group reads its padding (index 0, finite) and is replaced by ABSENT below: no -inf reaches
        # logsumexp's backward, where an all -inf row would give NaN gradients.
        keep = self.member | ~present[:, None]  # (K, G)
        if self.combine == "mean":
            out = (grouped * keep).sum(-1) / keep.sum(-1)
        else:
            masked = grouped.masked_fill(~keep, float("-inf"))
            out = masked.amax(-1) if self.combine == "max" else masked.logsumexp(-1)
        return torch.where(present, out, torch.full_like(out, ABSENT))  # (B, K)
