"""Pseudo masks: IRN's argmax over [t, maps] against a float64 numpy reference, and the ignore band."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.pseudo import threshold_mask


def _reference(maps: np.ndarray, keys: np.ndarray, t: float) -> np.ndarray:
    padded = np.concatenate([np.full((1, *maps.shape[1:]), t), maps.astype(np.float64)])
    labels = np.concatenate([[0], keys + 1])
    return labels[np.argmax(padded, axis=0)].astype(np.uint8)  # np.argmax: ties to the first (background)


@pytest.mark.parametrize("t", [0.0, 0.15, 0.5, 0.99])
def test_threshold_matches_numpy_argmax(t):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 17, 11, generator=g)
    maps[:, 0, 0] = torch.tensor([t, 0.0, 0.0])  # float32(t) vs t: 0.99f > 0.99 is foreground, 0.5 ties
    maps[:, 0, 1] = torch.tensor([0.7, 0.7, 0.0])  # a tie between maps goes to the first
    keys = torch.tensor([4, 0, 7])
    out = threshold_mask(maps, keys, t)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), _reference(maps.numpy(), keys.numpy(), t))
    if t == 0.5:
        assert out[0, 0] == 0  # an exact tie with the threshold goes to background


def test_hand_example():
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.0]], [[0.5, 0.6], [0.1, 0.0]]])
    keys = torch.tensor([2, 5])
    assert threshold_mask(maps, keys, 0.15).tolist() == [[3, 6], [3, 0]]


def test_ignore_band():
    maps = torch.tensor([[[0.9, 0.2, 0.03125, 0.0625]]])  # exact binary fractions: 0.0625 ties conf_bg
    out = threshold_mask(maps, torch.tensor([1]), 0.15, conf_fg=0.3, conf_bg=0.0625)
    assert out.tolist() == [[2, 255, 0, 0]]


def test_no_classes_gives_background():
    assert threshold_mask(torch.zeros(0, 4, 5), torch.zeros(0, dtype=torch.long), 0.1).sum() == 0


@pytest.mark.parametrize("kw", [{"conf_fg": 0.3}, {"conf_fg": 0.1, "conf_bg": 0.2}])
def test_bad_band_is_an_error(kw):
    with pytest.raises(ValueError, match="conf_"):
        threshold_mask(torch.rand(1, 2, 2), torch.tensor([0]), 0.1, **kw)


def test_rle_results_roundtrip_through_pycocotools():
    from pycocotools import mask as mask_utils

    from wsss.artifacts import rle_results

    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 1, 3, 255], dtype=np.uint8), size=(13, 9))
    entries = rle_results("img", mask, ["a", "b", "c"])
    assert [(e["category_id"], e["category"]) for e in entries] == [(1, "a"), (3, "c")]
    for e in entries:
        rle = {**e["segmentation"], "counts": e["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle), (mask == e["category_id"]).astype(np.uint8))
