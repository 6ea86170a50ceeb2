"""Errors people can read: damaged inputs are named (or skipped and counted), the CLI prints one line, exit 2."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import error_line, run_cli
from wsss.data.base import SampleError, decode_rgb, image_size
from wsss.data.voc import VOCSource

NAMES = ["a", "b"]


def _voc(root: Path, n: int = 4, size: int = 24) -> Path:
    """A tiny VOC-layout tree: n images with one class-1 square each."""
    from wsss.artifacts import write_mask

    rng = np.random.default_rng(0)
    ids = [f"im{i}" for i in range(n)]
    for i in ids:
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((size, size), np.uint8)
        mask[4:12, 4:12] = 1
        write_mask(root / "SegmentationClass" / f"{i}.png", mask)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels: a header and no pixel data (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_truncated_jpeg_is_a_named_error(tmp_path):
    root = _voc(tmp_path / "voc")
    path = root / "JPEGImages" / "im1.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(SampleError, match=r"im1\.jpg: truncated image"):
        image_size(path)
    with pytest.raises(SampleError, match=r"im1\.jpg: undecodable image \(image file is truncated"):
        decode_rgb(path)
    src = VOCSource(root, "train", NAMES)
    with pytest.raises(SampleError, match=r"im1\.jpg"):
        src.load_image("im1")


def test_truncated_jpeg_is_skipped_and_counted(tmp_path, caplog):
    root = _voc(tmp_path / "voc")
    path = root / "JPEGImages" / "im2.jpg"
    path.write_bytes(path.read_bytes()[:-200])  # the header survives, the scan data is cut
    src = VOCSource(root, "train", NAMES, on_error="skip")
    assert src.ids == ["im0", "im1", "im3"]
    assert src.skipped == {"truncated_image": 1}
    assert "im2" in caplog.text


def test_image_above_the_pixel_cap_is_refused_or_skipped(tmp_path):
    root = _voc(tmp_path / "voc", size=24)  # 576 pixels each
    with pytest.raises(SampleError, match=r"im0\.jpg: image has 24x24 = 576 pixels, above the cap of 500"):
        VOCSource(root, "train", NAMES, max_pixels=500).load_image("im0")
    src = VOCSource(root, "train", NAMES, on_error="skip", max_pixels=1000)
    assert len(src.ids) == 4
    _png_header(root / "JPEGImages" / "im3.jpg", 30_000, 30_000)  # 900 MP: Pillow's own bomb error
    src = VOCSource(root, "train", NAMES, on_error="skip")
    assert src.ids == ["im0", "im1", "im2"]
    assert src.skipped == {"too_many_pixels": 1}
    with pytest.raises(SampleError, match=r"im3\.jpg: image too large"):
        VOCSource(root, "train", NAMES).load_image("im3")


def test_checkpoint_of_random_bytes_says_it_is_not_a_wsss_checkpoint(tmp_path):
    from wsss.models import load_checkpoint

    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"model\.pt: not a wsss checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pseudo.threshold=1.5", "pseudo.threshold=1.5: must be in [0, 1]"),
        ("pseudo.threshold=-0.1", "pseudo.threshold=-0.1: must be in [0, 1]"),
        ("model.checkpoint=/nonexistent/model.pt", "model.checkpoint not found: /nonexistent/model.pt"),
    ],
)
def test_cli_user_error_is_one_line_with_exit_status_2(tmp_path, override, needle):
    proc = run_cli(tmp_path, [override, f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2
    assert needle in error_line(proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"wsss: full log: {tmp_path / 'run' / 'run.log'}" in proc.stderr
    assert "Traceback" in (tmp_path / "run" / "run.log").read_text()


def test_cli_full_error_shows_the_traceback(tmp_path):
    proc = run_cli(tmp_path, ["pseudo.threshold=1.5"], timeout=120, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr
