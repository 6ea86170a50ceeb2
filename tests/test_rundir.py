"""A run directory holds its results: artifact links, the result line, a sweep's summary, pruned links named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import run_cli
from wsss.artifacts import read_json, read_mask
from wsss.cache import list_runs, prune
from wsss.rundir import INDEX, link_artifacts, missing_artifacts, read_index, sweep_summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep users run most: `-m stage=pseudo_masks pseudo.threshold=0.3,0.5`, once for the module."""
    tmp = tmp_path_factory.mktemp("sweep")
    r = run_cli(tmp, ["-m", "stage=pseudo_masks", "pseudo.threshold=0.3,0.5", f"hydra.sweep.dir={tmp / 'multi'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def _masks_through_link(job: Path) -> dict[str, Path]:
    link = job / "artifacts" / "pseudo_masks"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))  # relative: the run and the cache move together
    return {p.stem: p for p in (link / "masks").glob("*.png")}


def test_each_job_finds_its_masks_through_its_run_directory(sweep):
    tmp, _ = sweep
    jobs = [tmp / "multi" / "0", tmp / "multi" / "1"]
    masks = [_masks_through_link(j) for j in jobs]
    assert [len(m) for m in masks] == [24, 24]  # TINY's 24 train images, the eval split
    index = [read_index(j) for j in jobs]
    assert {"train", "cams", "pseudo_masks"} <= set(index[1])  # the reused upstream is linked too
    assert index[0]["cams"]["key"] == index[1]["cams"]["key"]  # one CAM artifact serves both thresholds
    assert index[0]["pseudo_masks"]["key"] != index[1]["pseudo_masks"]["key"]
    # the links lead to each threshold's own masks: a lower threshold marks at least as much foreground
    fg = [sum(int((read_mask(p) > 0).sum()) for p in m.values()) for m in masks]
    assert fg[0] > fg[1]
    assert Path(index[0]["pseudo_masks"]["path"]).resolve() == (jobs[0] / "artifacts" / "pseudo_masks").resolve()


def test_the_sweep_ends_with_one_line_per_job(sweep):
    tmp, r = sweep
    out = r.stdout[r.stdout.index(f"sweep {tmp / 'multi'}:") :]
    rows = [ln for ln in out.splitlines() if ln.startswith("| 0 ") or ln.startswith("| 1 ")]
    assert rows == [
        f"| 0 | pseudo.threshold=0.3 | 24 masks in {tmp / 'multi' / '0' / 'artifacts' / 'pseudo_masks' / 'masks'} |",
        f"| 1 | pseudo.threshold=0.5 | 24 masks in {tmp / 'multi' / '1' / 'artifacts' / 'pseudo_masks' / 'masks'} |",
    ]
    assert "Every job also: " in out


def test_each_run_ends_with_its_result_line(sweep):
    tmp, r = sweep
    results = [ln for ln in r.stdout.splitlines() if "[wsss.pipeline][INFO] - result: " in ln]
    assert len(results) == 2
    assert results[0].endswith(f"result: 24 masks in {tmp / 'multi' / '0' / 'artifacts' / 'pseudo_masks' / 'masks'}")


def test_a_default_run_names_its_miou_and_metrics_last(tmp_path):
    r = run_cli(tmp_path, [f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("[")][-1]
    miou = read_json(tmp_path / "run" / "metrics.json")["miou"]
    assert last.endswith(f"result: mIoU {miou:.2f}, {tmp_path / 'run' / 'metrics.json'}")
    assert (tmp_path / "run" / "artifacts" / "evaluate" / "metrics.json").is_file()


def test_prune_names_the_runs_it_breaks_and_list_marks_them(sweep, capsys):
    tmp, _ = sweep
    cache, runs = tmp / "cache", tmp / "multi"
    assert all(not missing_artifacts(j) for j in (runs / "0", runs / "1"))
    prune(cache, unused_days=-1, dry_run=True, runs_dir=runs)
    said = capsys.readouterr().out
    assert "2 run directories below" in said
    assert "would lose an artifact" in said
    assert not missing_artifacts(runs / "0")  # a dry run removes nothing
    victim = Path(read_index(runs / "1")["pseudo_masks"]["path"])
    import shutil

    backup = tmp / "kept"
    shutil.copytree(victim, backup)
    try:
        shutil.rmtree(victim)  # as prune removes it
        assert missing_artifacts(runs / "1") == ["pseudo_masks"]
        assert missing_artifacts(runs / "0") == []
        list_runs(runs)
        listed = capsys.readouterr().out
        assert f"{runs / '1'}  (PRUNED: pseudo_masks)" in listed
        assert "2 runs below" in listed
        assert "1 with a pruned artifact" in listed
    finally:
        shutil.copytree(backup, victim)


def test_without_symlinks_the_index_still_finds_the_masks(tmp_path, monkeypatch):
    artifact = tmp_path / "cache" / "pseudo_masks" / "k1"
    (artifact / "masks").mkdir(parents=True)
    for i in range(3):
        (artifact / "masks" / f"m{i}.png").write_bytes(b"")
    job = tmp_path / "multi" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- pseudo.threshold=0.3\n")

    def no_symlinks(self, *a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "symlink_to", no_symlinks)
    link_artifacts(job, {"pseudo_masks": ("pseudo_masks", "k1", artifact)})
    assert (job / INDEX).is_file()
    assert not list((job / "artifacts").iterdir())
    assert sweep_summary(tmp_path / "multi").splitlines()[2] == (
        f"| 0 | pseudo.threshold=0.3 | 3 masks in {artifact / 'masks'} |"
    )
