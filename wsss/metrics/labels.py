"""Label maps and CAM batches, checked and mapped for histogramming (255 = ignore, anything else invalid)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from wsss.artifacts import IGNORE_INDEX

ArrayLike = Tensor | np.ndarray


def check_num_labels(num_labels: int) -> int:
    """L as an int, within 2..255 (255 itself is the ignore value, so at most labels 0..254)."""
    if not 2 <= int(num_labels) <= IGNORE_INDEX:
        raise ValueError(f"num_labels must be in 2..{IGNORE_INDEX} (background + classes), got {num_labels}")
    return int(num_labels)


@functools.lru_cache(maxsize=64)
def _label_lut(num_labels: int, device: torch.device, scale: int) -> Tensor:
    """(256,) int32 table, times scale: v -> v for v < L, 255 (ignore) -> L, any other v -> L + 1."""
    lut = torch.full((256,), num_labels + 1, dtype=torch.int32)
    lut[:num_labels] = torch.arange(num_labels, dtype=torch.int32)
    lut[IGNORE_INDEX] = num_labels
    return (lut * scale).to(device)


def raise_invalid(x: Tensor, num_labels: int, what: str) -> None:
    """Raise the ValueError naming the label values of `x` outside 0..L-1 and 255."""
    bad = x[((x < 0) | (x >= num_labels)) & (x != IGNORE_INDEX)]
    values = torch.unique(bad).tolist()
    raise ValueError(
        f"{what} has label value(s) {values[:8]} outside 0..{num_labels - 1} (and 255 = ignore); "
        f"num_labels = {num_labels}"
    )


def mapped_labels(x: Tensor, num_labels: int, what: str, scale: int = 1) -> Tensor:
    """Flattened int32 labels, ignore -> L, every invalid value -> L + 1 (checked by the caller); times scale.

    Scaling in the lookup table folds the row stride of a joint histogram index into the lookup.
    """
    if x.dtype != torch.uint8:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer label tensor, got dtype {x.dtype}")
        if x.numel():
            lo, hi = torch.aminmax(x)
            if int(lo) < 0 or int(hi) > 255:
                raise_invalid(x, num_labels, what)
    return torch.index_select(_label_lut(num_labels, x.device, scale), 0, x.reshape(-1).to(torch.int32))


def as_tensor(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    """A tensor view of an array (no copy on CPU), moved to `device` when given."""
    t = torch.as_tensor(x)
    return t if device is None else t.to(device)


def _float_maps(maps: Tensor) -> Tensor:
    """Maps as float32 (half precision is widened exactly) or float64."""
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor, got dtype {maps.dtype}")
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def cam_batch(
    maps: ArrayLike, keys: ArrayLike, key_mask: ArrayLike | None, num_fg: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check and normalise one image (K, H, W) or a batch (B, K, H, W) of CAMs and their keys."""
    maps = _float_maps(as_tensor(maps))
    device = maps.device
    keys = as_tensor(keys, device).long()
    if maps.dim() == 3:
        maps, keys = maps[None], keys[None]
        if key_mask is not None:
            key_mask = as_tensor(key_mask, device)[None]
    if maps.dim() != 4 or keys.shape != maps.shape[:2]:
        raise ValueError(
            f"maps {tuple(maps.shape)} and keys {tuple(keys.shape)}: expected (K, H, W) with (K,), "
            "or (B, K, H, W) with (B, K)"
        )
    if key_mask is not None:
        key_mask = as_tensor(key_mask, device).bool()
        if key_mask.shape != keys.shape:
            raise ValueError(f"key_mask {tuple(key_mask.shape)} does not match keys {tuple(keys.shape)}")
        if bool(key_mask.all()):
            key_mask = None
    valid_keys = keys if key_mask is None else keys[key_mask]
    if valid_keys.numel():
        lo, hi = int(valid_keys.min()), int(valid_keys.max())
        if lo < 0 or hi >= num_fg:
            raise ValueError(f"keys hold class index {lo if lo < 0 else hi}, outside 0..{num_fg - 1}")
    return maps, keys, key_mask
