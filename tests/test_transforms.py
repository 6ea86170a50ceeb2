"""Training augmentation (transforms.v2, image and mask together)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, normalize


def _scene(h: int = 40, w: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey image with a red rectangle, and its mask (1 on the rectangle)."""
    image = torch.full((3, h, w), 128, dtype=torch.uint8)
    mask = torch.zeros((h, w), dtype=torch.uint8)
    image[:, 8:20, 5:15] = torch.tensor([250, 10, 10], dtype=torch.uint8)[:, None, None]
    mask[8:20, 5:15] = 1
    return image, mask


def test_unit_scale_places_the_normalised_image_in_a_padded_crop():
    """scale 1: the crop holds the normalised image (flipped or not) at a random offset, 0 / 255 around it."""
    image, mask = _scene()
    torch.manual_seed(3)
    flips = set()
    for _ in range(12):
        out, out_mask = TrainTransform(64, (1.0, 1.0))(image, mask)
        assert out.shape == (3, 64, 64)
        assert out.dtype == torch.float32
        assert out_mask.dtype == torch.uint8
        inside = (out_mask != 255).nonzero()
        top, left = inside.min(0).values.tolist()
        assert (out_mask != 255).sum() == 40 * 30
        window = out[:, top : top + 40, left : left + 30]
        expected = normalize(image)
        flipped = not torch.allclose(window, expected, atol=1e-6)
        flips.add(flipped)
        torch.testing.assert_close(window, expected.flip(-1) if flipped else expected, atol=1e-6, rtol=0)
        wmask = out_mask[top : top + 40, left : left + 30]
        assert torch.equal(wmask, mask.flip(-1) if flipped else mask)
        assert out[:, out_mask == 255].abs().max() == 0  # padding is the mean colour
    assert flips == {True, False}


def test_scaled_image_and_mask_stay_aligned():
    image, mask = _scene(60, 60)
    red = (torch.tensor([250, 10, 10]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.manual_seed(0)
    checked = 0
    for _ in range(20):
        out, out_mask = TrainTransform(48, (0.5, 1.5))(image, mask)
        core = out_mask == 1
        if not core.any():  # the crop missed the object
            continue
        # Nearest-neighbour mask vs bilinear image: inside the object the image is the object's colour.
        eroded = core.clone()
        eroded[1:-1, 1:-1] &= core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
        eroded[[0, -1], :] = False
        eroded[:, [0, -1]] = False
        if eroded.any():
            torch.testing.assert_close(out[:, eroded].mean(1), red, atol=1e-3, rtol=0)
            checked += 1
    assert checked >= 5


def test_scale_factors_are_log_uniform_over_the_range():
    image = torch.zeros((3, 100, 100), dtype=torch.uint8)
    mask = torch.zeros((100, 100), dtype=torch.uint8)
    torch.manual_seed(1)
    sides = []
    for _ in range(400):
        _, m = TrainTransform(200, (0.5, 2.0))(image, mask)
        sides.append(int((m != 255).any(0).sum()))  # the scaled image's width inside the 200 px canvas
    logs = np.log(np.array(sides) / 100)
    assert min(sides) >= 49
    assert max(sides) <= 200
    assert abs(logs.mean()) < 0.08  # log-uniform on [log 0.5, log 2] has mean 0
    assert abs(logs.std() - (2 * math.log(2)) / math.sqrt(12)) < 0.05


def test_bad_scale_range_is_refused():
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(32, (1.3, 0.7))
