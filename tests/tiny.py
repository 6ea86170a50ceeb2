"""The tiny pipeline config the end-to-end tests share: seconds on two cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import CONF_DIR, REPO
from tests.forkrun import ForkServer
from wsss.config import register_configs

register_configs()

TINY = [
    "dataset.synthetic.num_train=24",
    "dataset.synthetic.num_val=8",
    "dataset.synthetic.image_size=64",
    "train.epochs=1",
    "train.batch_size=8",
    "dataset.num_workers=0",
    "cam.scales=[1.0]",
    "evaluate.overlays=0",  # the plots and overlays take a second a run: FIGURES turns them on where a test reads them
    "evaluate.figures=false",
]

FIGURES = ["evaluate.overlays=2", "evaluate.figures=true"]


def tiny_cfg(tmp_path: Path, overrides: list[str] = ()):
    """The composed tiny config with data and cache under `tmp_path`."""
    paths = [f"paths.data_root={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *paths, *overrides])


FORK_SERVER = ForkServer(REPO)


def run_cli(tmp_path: Path, args: list[str], timeout: float = 600, env: dict | None = None, **kw):
    """`python -m wsss.run *TINY *args` with data and cache under `tmp_path`; returns the CompletedProcess.

    It runs in a child of the session's fork server (`tests/forkrun.py`: the same entry point without the
    interpreter's 4 s start), or as a new subprocess where `kw` asks for one (e.g. `preexec_fn`) or `env` changes
    what only an interpreter's start reads.
    """
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache"), **(env or {})}
    flags = [a for a in args if a == "-m"]  # Hydra's flags go before the overrides
    argv = [*flags, *TINY, *[a for a in args if a != "-m"]]
    if not kw and FORK_SERVER.forkable(env):
        return FORK_SERVER.run(argv, env, timeout)
    cmd = [sys.executable, "-m", "wsss.run", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)


SYNTHETIC_NAMES = ["disc", "triangle", "square", "star", "ring", "cross"]


def torchrun_env(root: Path, cache: str = "cache") -> dict[str, str]:
    """The environment of a run with data and cache under `root`, one thread per process."""
    return {
        **os.environ,
        "WSSS_DATA": str(root / "data"),
        "WSSS_CACHE": str(root / cache),
        "OMP_NUM_THREADS": "1",  # two ranks on two cores
    }


def torchrun(root: Path, nproc: int, args: list[str], cache: str = "cache", timeout: float = 600, real: bool = False):
    """`torchrun --standalone --nproc_per_node=N -m wsss.run *TINY *args`: N ranks forked from the fork server
    with the environment torchrun gives them (`ForkServer.run_ranks`, 8 s less a run on two cores), or torchrun
    itself with `real=True` (or when the environment changes what only an interpreter's start reads)."""
    env = torchrun_env(root, cache)
    if not real and FORK_SERVER.forkable(env):
        return FORK_SERVER.run_ranks([*TINY, *args], env, nproc, timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "wsss.run", *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def fixed_checkpoint(path: Path) -> Path:
    """A seeded untrained 6-class Classifier saved as a checkpoint at `path` (the synthetic classes)."""
    from wsss.models import Classifier, save_checkpoint

    torch.manual_seed(3)
    save_checkpoint(path, Classifier(6), SYNTHETIC_NAMES)
    return path


def artifact_dir(cache: Path, stage: str) -> Path:
    """The one artifact folder of `stage` in `cache`."""
    (found,) = [p.parent for p in (cache / stage).glob("*/manifest.json")]
    return found


def kill_when(tmp_path: Path, args: list[str], ready, env: dict | None = None, timeout: float = 300) -> None:
    """Start `python -m wsss.run *TINY *args` (data and cache under `tmp_path`) and SIGKILL its process group as
    soon as `ready()` holds (or it exits, or `timeout` seconds pass): in a child of the fork server, or as a new
    subprocess where `env` changes what only an interpreter's start reads."""
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache"), **(env or {})}
    if FORK_SERVER.forkable(env):
        FORK_SERVER.kill_when([*TINY, *args], env, ready, timeout)
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsss.run", *TINY, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def error_line(stderr: str) -> str:
    """The `wsss: error: ...` line of a failed run's stderr (progress bars may come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("wsss: error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def ground_truth(tmp_path: Path, image_id: str) -> np.ndarray:
    """The tiny set's ground-truth mask of `image_id`, read with PIL alone (palette indices, 255 void)."""
    return np.array(Image.open(tmp_path / "data" / "synthetic" / "SegmentationClass" / f"{image_id}.png"))


def irn_mask(maps: np.ndarray, keys: np.ndarray, t: float) -> np.ndarray:
    """IRN's rule in float64: argmax over [t, maps_0, ...], first entry on ties, label keys[k] + 1."""
    stack = np.concatenate([np.full((1, *maps.shape[1:]), t), maps.astype(np.float64)])
    labels = np.concatenate([[0], keys.astype(np.int64) + 1])
    return labels[np.argmax(stack, 0)].astype(np.uint8)


def loop_iou(pairs: list[tuple[np.ndarray, np.ndarray]], num_labels: int) -> tuple[list[float | None], float]:
    """Per-label IoU in percent and their mean, from (ground truth, prediction) pairs, counted pixel by pixel.

    A pixel with 255 on either side is skipped; IoU = TP / (TP + FP + FN); a label in neither ground truth nor
    prediction has None and stays out of the mean (background counts as a label).
    """
    cm = [[0] * num_labels for _ in range(num_labels)]  # rows ground truth, columns prediction
    for gt, pred in pairs:
        assert gt.shape == pred.shape
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True):
            if g != 255 and p != 255:
                cm[g][p] += 1
    iou: list[float | None] = []
    for c in range(num_labels):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(num_labels)) - tp
        fn = sum(cm[c]) - tp
        iou.append(100.0 * tp / (tp + fp + fn) if tp + fp + fn else None)
    present = [v for v in iou if v is not None]
    return iou, sum(present) / len(present)


def assert_reported_iou(block: dict, iou: list[float | None], miou: float, names: list[str]) -> None:
    """A metrics.json block's `miou` and per-label `iou` (rounded to 4 places) equal the recomputed ones."""
    # Messages spelled out: pytest rewrites the asserts of test modules only.
    assert block["miou"] == pytest.approx(miou, abs=1e-4), f"mIoU reported {block['miou']}, counted {miou}"
    assert list(block["iou"]) == names, f"labels reported {list(block['iou'])}, expected {names}"
    for name, value in zip(names, iou, strict=True):
        got = block["iou"][name]
        same = got is None if value is None else got is not None and got == pytest.approx(value, abs=1e-4)
        assert same, f"IoU of {name} reported {got}, counted {value}"


def assert_miou_counted(metrics: dict, gt_dir: Path) -> None:
    """A metrics.json's mIoU and per-label IoU equal a pixel count (`loop_iou`) over the masks it names and the
    ground-truth PNGs in `gt_dir`, both read with PIL: a value that can be wrong, unlike `0 <= miou <= 100`."""
    names = ["background", *metrics["class_names"]]
    ids = list(metrics["per_image_miou"])
    assert ids, "no image was scored"
    masks = Path(metrics["masks_dir"])
    pairs = [(np.array(Image.open(gt_dir / f"{i}.png")), np.array(Image.open(masks / f"{i}.png"))) for i in ids]
    iou, miou = loop_iou(pairs, len(names))
    assert_reported_iou(metrics, iou, miou, names)
