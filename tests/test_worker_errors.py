"""Bad input met in a DataLoader worker is reported as it is without workers: the reader's own error (type,
message, attributes), exit 2 and one line naming the file; `dataset.on_error=skip` drops and counts the image.

torch sends a worker's exception back as its type and formatted traceback only and rebuilds it from that text
(`torch._utils.ExceptionWrapper.reraise`), which turned every wsss data error into a RuntimeError traceback.
"""

from __future__ import annotations

import ast
import errno
import gc
import multiprocessing
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tests.conftest import REPO
from tests.data_fixtures import build_folder
from tests.tiny import error_line, run_cli
from wsss.artifacts import read_json
from wsss.data.base import MissingFileError, SampleError
from wsss.data.synthetic import SyntheticSpec, ensure_synthetic
from wsss.errors import CacheError, ConfigError, DamagedFileError, WriteError
from wsss.report import ReportError
from wsss.state import StateError
from wsss.training import distributed_loader

ERRORS = [
    SampleError("/d/a.jpg: truncated image (no JPEG end marker)", "truncated_image"),
    MissingFileError("image not found: /d/b.jpg", "missing_image"),
    DamagedFileError("/cache/cams/k/maps/c.npz", "unreadable CAM file (BadZipFile: bad)"),
    StateError("/cache/train/k/train_state.pt", "is damaged"),
    ConfigError("pseudo.threshold=1.5: must be in [0, 1]"),
    ReportError("/runs: no run directory"),
    CacheError(errno.EACCES, "Permission denied", "/cache"),
    WriteError(errno.ENOSPC, "No space left on device", "/cache/x.npz"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/c.png"),
    ValueError("/d/labels.csv line 3: class 'dragon' is not in dataset.class_names"),
]


def _same(got: BaseException, want: BaseException) -> None:
    assert type(got) is type(want), (type(got), got)
    assert str(got) == str(want)
    assert got.args == want.args
    for name in ("reason", "path", "errno", "strerror", "filename"):
        assert getattr(got, name, None) == getattr(want, name, None), name


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_a_reader_raises_survives_pickling(error):
    _same(pickle.loads(pickle.dumps(error)), error)


class _Raises(Dataset):
    """Items 0..7 are their index; item 5 raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:
            raise self.error
        return torch.tensor(i)


@pytest.mark.parametrize("error", ERRORS[:3] + ERRORS[-2:], ids=lambda e: type(e).__name__)
def test_an_error_raised_in_a_worker_reaches_the_main_process_as_raised(error):
    loader = distributed_loader(_Raises(error), 2, 0, 2, torch.device("cpu"))
    with pytest.raises(type(error)) as caught:
        for _ in loader:
            pass
    _same(caught.value, error)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert re.search(r"raised in DataLoader worker process \d:\n.*in __getitem__\n", notes, re.S), notes


def test_the_workers_are_gone_when_the_error_arrives():
    """The loader shuts its workers down before it raises, not at a later garbage collection (which, on the next
    loader's start, waited 10-20 s for them)."""
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        with pytest.raises(DamagedFileError):
            for _ in distributed_loader(_Raises(ERRORS[2]), 2, 0, 2, torch.device("cpu")):
                pass
        left = [p for p in multiprocessing.active_children() if p not in before]
    finally:
        gc.enable()
    assert not left, left


def test_every_loader_of_the_package_carries_its_workers_errors():
    """A torch DataLoader built anywhere but wsss.data.loader would bring the traceback back."""
    direct = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted((REPO / "wsss").rglob("*.py"))
        if path != REPO / "wsss" / "data" / "loader.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "DataLoader"
    ]
    assert not direct, direct


# -- the command line, with dataset.num_workers=2 -----------------------------------------------------------------

SYNTHETIC = SyntheticSpec(num_train=24, num_val=8, image_size=64)  # tests.tiny.TINY's
DAMAGED = "train_00005"  # not the first id: the train stage reads that one in the main process (its crop size)


def _damage(tmp_path: Path, how: str) -> tuple[list[str], str, str, str]:
    """Damage one image one way; returns (overrides, its id, its skip reason, a pattern of the error line)."""
    if how == "truncated_image":  # the report: one cut-off JPEG in a folder of one's own
        root = build_folder(tmp_path, masks="none", n=12)
        path = root / "images" / "ward_a" / f"{DAMAGED}.jpg"
        path.write_bytes(path.read_bytes()[:-200])  # the header survives, the scan data and end marker are cut
        line = rf"{re.escape(str(path))}: undecodable image \(image file is truncated"
        return ["dataset=folder", f"dataset.root={root}"], f"ward_a/{DAMAGED}", "truncated_image", line
    root = ensure_synthetic(tmp_path / "data" / "synthetic", SYNTHETIC)
    if how == "missing_image":
        path = root / "JPEGImages" / f"{DAMAGED}.jpg"
        path.unlink()
        return [], DAMAGED, "missing_image", rf"image not found: {re.escape(str(path))}$"
    path = root / "SegmentationClass" / f"{DAMAGED}.png"  # the labels come from the masks
    mask = np.array(Image.open(path))
    mask[0, 0] = 200
    Image.fromarray(mask).save(path)
    return [], DAMAGED, "class_out_of_range", rf"{re.escape(str(path))}: class index 199 \(mask value 200\) outside"


HOW = ["truncated_image", "missing_image", "bad_mask"]


@pytest.mark.parametrize("how", HOW)
def test_bad_input_read_in_a_worker_is_one_line_with_exit_status_2(tmp_path, how):
    overrides, _, _, pattern = _damage(tmp_path, how)
    lines = {}
    for workers in (2, 0):
        run = tmp_path / f"run{workers}"
        r = run_cli(tmp_path, [*overrides, "stage=train", f"dataset.num_workers={workers}", f"hydra.run.dir={run}"])
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr + r.stdout
        lines[workers] = error_line(r.stderr)
        assert "DataLoader worker process" in (run / "run.log").read_text() or workers == 0
    assert re.search(pattern, lines[2]), lines[2]
    assert lines[2] == lines[0]  # word for word what the main process says when it reads the file itself


@pytest.mark.parametrize("how", HOW)
def test_bad_input_is_skipped_and_counted_with_workers(tmp_path, how):
    overrides, image_id, reason, _ = _damage(tmp_path, how)
    args = [*overrides, "stage=train", "dataset.on_error=skip", "dataset.num_workers=2"]
    r = run_cli(tmp_path, [*args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_json(next((tmp_path / "cache" / "train").glob("*/manifest.json")))
    total = 12 if how == "truncated_image" else 24
    assert manifest["counts"]["skipped"] == {reason: 1}
    assert manifest["counts"]["images"] == total - 1
    assert re.search(rf"skipping {re.escape(image_id)} \({reason}\): ", r.stdout), r.stdout[-3000:]
