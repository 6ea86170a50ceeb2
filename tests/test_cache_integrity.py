"""Artifacts that are verified before reuse: damaged files, leftovers of killed runs, read-only caches, full disks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import FORK_SERVER, TINY, error_line, kill_when, run_cli, tiny_cfg
from wsss.artifacts import read_cams
from wsss.pipeline import Pipeline


def _pipe(tmp_path: Path, overrides: list[str] = ()) -> Pipeline:
    return Pipeline(tiny_cfg(tmp_path, list(overrides)))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_cam_file_is_rebuilt_alone_before_reuse(tmp_path, caplog):
    pipe = _pipe(tmp_path, ["stage=cams"])
    pipe.run("cams")
    maps = pipe.artifact_dir("cams") / "maps"
    good = np.load(maps / "train_00004.npz")["maps"]
    _truncate(maps / "train_00004.npz")
    with caplog.at_level(logging.INFO):
        again = _pipe(tmp_path, ["stage=cams"])
        manifest = again.run("cams")
    assert again.report == {"train": "reused", "cams": "ran"}  # not reused as it was
    assert "train_00004.npz has" in caplog.text
    assert "damaged" in caplog.text
    assert manifest["counts"]["computed"] == 1  # resumed: only the damaged image
    np.testing.assert_array_equal(np.load(maps / "train_00004.npz")["maps"], good)


def test_unreadable_input_file_is_named_then_rebuilt(tmp_path, caplog):
    """Same size, damaged bytes: the reader names the file, the pipeline rebuilds that input and goes on.

    One image per CAM batch, so the rebuilt image meets the convolution in the batch it met first: a batch of
    other images rounds differently (within one float16 step, docs/scaling.md), and the maps compare exactly."""
    pipe = _pipe(tmp_path, ["stage=pseudo_masks", "cam.batch_size=1"])
    pipe.run("pseudo_masks")
    path = pipe.artifact_dir("cams") / "maps" / "train_00007.npz"
    good, size = read_cams(path), path.stat().st_size
    path.write_bytes(b"\0" * size)  # listing check passes (same size); reading fails
    with caplog.at_level(logging.WARNING):
        again = _pipe(tmp_path, ["stage=pseudo_masks", "cam.batch_size=1", "pseudo.threshold=0.3"])
        again.run("pseudo_masks")
    assert "train_00007.npz: unreadable CAM file" in caplog.text
    again_maps = read_cams(path)  # the same arrays (the bytes differ: a zip entry carries its write time)
    assert sorted(again_maps) == sorted(good)
    for key, want in good.items():
        np.testing.assert_array_equal(again_maps[key], want, err_msg=key)
    cams = json.loads((again.artifact_dir("cams") / "manifest.json").read_text())
    assert cams["counts"]["computed"] == 1


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    pipe = _pipe(tmp_path, ["stage=cams"])
    out = pipe.artifact_dir("cams")
    (out / "maps").mkdir(parents=True)
    leftover = out / "maps" / ".train_00000.npz.abc123.tmp"
    leftover.write_bytes(b"half")
    pipe.run("cams")
    assert not leftover.exists()
    assert not list(out.rglob("*.tmp"))


def test_damaged_manifest_is_not_trusted(tmp_path):
    pipe = _pipe(tmp_path, ["stage=pseudo_masks"])
    pipe.run("pseudo_masks")
    (pipe.artifact_dir("pseudo_masks") / "manifest.json").write_text('{"stage": "pseu')
    again = _pipe(tmp_path, ["stage=pseudo_masks"])
    again.run("pseudo_masks")
    assert again.report == {"cams": "reused", "pseudo_masks": "ran"}


def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm (user and mount namespaces) for a read-only mount")
def test_read_only_cache_is_reused_and_a_missing_artifact_is_a_clear_error(tmp_path):
    assert run_cli(tmp_path, [f"hydra.run.dir={tmp_path / 'run0'}"]).returncode == 0
    cache = tmp_path / "cache"
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(cache)}

    def ro(*args: str) -> subprocess.CompletedProcess:
        # `unshare -rm sh -c "mount --bind -o ro CACHE CACHE && python -m wsss.run ..."`, in a forked child
        return FORK_SERVER.run([*TINY, *args], env, timeout=300, read_only=[cache])

    proc = ro(f"hydra.run.dir={tmp_path / 'run1'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate: reusing" in proc.stderr + proc.stdout
    proc = ro("pseudo.threshold=0.3", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = error_line(proc.stderr)
    assert "pseudo_masks artifact is missing and cannot be built" in first
    assert "Read-only file system" in first
    assert str(cache / "pseudo_masks") in first


@pytest.mark.slow
def test_full_disk_names_the_file_and_leaves_nothing_trusted(tmp_path):
    """A file-size limit stands in for a full disk: writing the training state fails; the rerun is complete."""
    gen = run_cli(tmp_path, ["stage=train", f"hydra.run.dir={tmp_path / 'gen'}"])
    shutil.rmtree(tmp_path / "cache")  # keep the generated data, drop the model

    assert gen.returncode == 0, gen.stderr[-2000:]
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    run1 = [*TINY, "stage=train", f"hydra.run.dir={tmp_path / 'run1'}"]
    proc = FORK_SERVER.run(run1, env, timeout=600, fsize=1 << 20)  # what preexec_fn=setrlimit(RLIMIT_FSIZE) gives
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"/train/\w+/train_state\.pt: cannot write \(File too large\)", error_line(proc.stderr))
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "cache").rglob("manifest.json"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    proc = run_cli(tmp_path, ["stage=train", f"hydra.run.dir={tmp_path / 'run2'}"])
    assert proc.returncode == 0
    assert "train: running" in proc.stderr + proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train", "cams"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, where):
    """kill -9 once an epoch's training state (train) or ten CAM files (cams) are on disk: the rerun resumes
    from them (after epoch k > 0 of training) and ends with the metrics of an uninterrupted run."""
    from wsss.stages.train import STATE

    slow = ["train.epochs=3", "dataset.synthetic.num_train=48", "cam.scales=[1.0,0.5,1.5]"]
    clean = run_cli(tmp_path / "clean", [*slow, f"hydra.run.dir={tmp_path / 'clean_run'}"])
    assert clean.returncode == 0, clean.stderr[-2000:]
    cache = tmp_path / "killed" / "cache"

    def ready() -> bool:
        if where == "cams":
            return len(list(cache.glob("cams/*/maps/*.npz"))) >= 10
        return any(cache.glob(f"train/*/{STATE}"))  # written atomically after each finished epoch

    kill_when(tmp_path / "killed", [*slow, f"hydra.run.dir={tmp_path / 'killed_run0'}"], ready)
    assert ready()
    assert not any(cache.glob(f"{where}/*/manifest.json"))  # killed before the stage finished
    again = run_cli(tmp_path / "killed", [*slow, f"hydra.run.dir={tmp_path / 'killed_run'}"])
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    if where == "cams":
        assert "resuming an unfinished build" in log
    else:
        resumed = re.findall(r"train: [^\n]*?resuming after epoch (\d+) of 3", log)  # or from the .prev state
        assert len(resumed) == 1, log[-3000:]
        assert 0 < int(resumed[0]) <= 3
        manifest = json.loads(next(cache.glob("train/*/manifest.json")).read_text())
        assert manifest["resumed_after_epoch"] == int(resumed[0])
    a = json.loads((tmp_path / "clean_run" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed_run" / "metrics.json").read_text())
    assert a["miou"] == b["miou"]
    assert a["sweep"] == b["sweep"]
    assert a["per_image_miou"] == b["per_image_miou"]
