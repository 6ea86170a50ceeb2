"""`python -m wsss.cache list | prune`: what is there, what differs from the defaults, what may go."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.tiny import TINY, tiny_cfg
from wsss import cache
from wsss.pipeline import Pipeline


def _build(tmp_path: Path, overrides: list[str]) -> Pipeline:
    pipe = Pipeline(tiny_cfg(tmp_path, overrides))
    pipe.run("evaluate")
    return pipe


def _paths(tmp_path: Path) -> list[str]:
    return [*TINY, f"paths.data_root={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]


def test_list_shows_every_artifact_and_what_differs(tmp_path, capsys):
    _build(tmp_path, [])
    _build(tmp_path, ["pseudo.threshold=0.3"])
    assert cache.main(["--cache-dir", str(tmp_path / "cache"), "list"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("train", "cams", "pseudo_masks", "evaluate"))]
    assert [ln.split()[0] for ln in lines].count("pseudo_masks") == 2
    assert len(lines) == 6
    assert any("pseudo.threshold=0.3" in ln for ln in lines if ln.startswith("pseudo_masks"))
    assert any("train.epochs=1" in ln for ln in lines if ln.startswith("train"))
    assert "6 artifacts" in out


def test_prune_keeps_what_a_config_reaches_and_dry_run_removes_nothing(tmp_path, capsys):
    keep = _build(tmp_path, [])
    other = _build(tmp_path, ["pseudo.threshold=0.3"])
    args = ["--cache-dir", str(tmp_path / "cache"), "prune", "--keep", *_paths(tmp_path)]
    assert cache.main([*args, "--dry-run"]) == 0
    assert "would remove pseudo_masks/" in capsys.readouterr().out
    assert other.artifact_dir("pseudo_masks").is_dir()
    assert cache.main(args) == 0
    assert not other.artifact_dir("pseudo_masks").exists()
    assert not other.artifact_dir("evaluate").exists()
    for stage in ("train", "cams", "pseudo_masks", "evaluate"):
        assert (keep.artifact_dir(stage) / "manifest.json").is_file(), stage


def test_prune_unused_days(tmp_path, capsys):
    pipe = _build(tmp_path, [])
    old = time.time() - 40 * 86400
    for stage in ("train", "cams"):
        os.utime(pipe.artifact_dir(stage), (old, old))
    assert cache.main(["--cache-dir", str(tmp_path / "cache"), "prune", "--unused-days", "30"]) == 0
    assert not pipe.artifact_dir("train").exists()
    assert not pipe.artifact_dir("cams").exists()
    assert pipe.artifact_dir("evaluate").exists()
    # Reuse refreshes "last used": a default rerun finds evaluate and touches it.
    assert "freed" in capsys.readouterr().out


def test_reuse_touches_last_used(tmp_path):
    pipe = _build(tmp_path, [])
    old = time.time() - 40 * 86400
    os.utime(pipe.artifact_dir("evaluate"), (old, old))
    _build(tmp_path, [])
    assert pipe.artifact_dir("evaluate").stat().st_mtime > old + 86400


def test_prune_needs_a_criterion(tmp_path, capsys):
    assert cache.main(["--cache-dir", str(tmp_path), "prune"]) == 2
    assert "needs --unused-days" in capsys.readouterr().err
