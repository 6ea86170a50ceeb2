"""A run directory that holds its results: links to the artifacts a run used or built, and its result line.

Artifacts live in the cache (`<cache>/<stage>/<key>/`), shared by every run that needs them; each run directory
gets `artifacts/<stage>` links to the ones it used (`artifacts/cams[val]` for another split's), relative where
the file system allows symlinks, and always `artifacts.json`, the same map with absolute paths, which
`python -m wsss.cache list --runs` reads to say which runs lost an artifact to `prune`. The run's last log line
names what a user came for (`result_line`), and a `-m` sweep ends with one such line per job (`sweep_summary`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from wsss.artifacts import read_json, write_json

log = logging.getLogger(__name__)

LINKS = "artifacts"
INDEX = "artifacts.json"


def link_artifacts(run_dir: Path, artifacts: dict[str, tuple[str, str, Path]]) -> dict[str, Any]:
    """Write `artifacts.json` and the `artifacts/<label>` links of a run; returns the index.

    Args:
        artifacts: label (`cams`, `cams[val]`) -> (stage, key, artifact directory).
    """
    index = {label: {"stage": s, "key": k, "path": str(Path(d).resolve())} for label, (s, k, d) in artifacts.items()}
    write_json(run_dir / INDEX, index)
    links = run_dir / LINKS
    try:
        links.mkdir(exist_ok=True)
        for label, entry in index.items():
            link = links / label
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(entry["path"], links), target_is_directory=True)
    except OSError as e:  # a file system without symlinks: artifacts.json says it all
        log.info("run: no artifact links in %s (%s); %s lists the artifacts", links, e.strerror or e, INDEX)
    return index


def read_index(run_dir: Path) -> dict[str, Any]:
    """A run's `artifacts.json` ({} for a run without one)."""
    path = Path(run_dir) / INDEX
    return read_json(path) if path.is_file() else {}


def find_runs(root: Path) -> list[Path]:
    """Every run directory below `root` (those with an `artifacts.json`), sorted."""
    return sorted(p.parent for p in Path(root).rglob(INDEX))


def missing_artifacts(run_dir: Path) -> list[str]:
    """Labels of a run's artifacts that are gone from the cache (pruned)."""
    return [label for label, e in read_index(run_dir).items() if not Path(e["path"]).is_dir()]


def _where(run_dir: Path | None, label: str, artifact_dir: Path, *parts: str) -> Path:
    """A file of an artifact, through the run's link when it has one."""
    if run_dir is not None and (run_dir / LINKS / label).is_dir():
        return run_dir / LINKS / label / Path(*parts)
    return artifact_dir / Path(*parts)


def result_line(stage: str, label: str, artifact_dir: Path, manifest: dict[str, Any], run_dir: Path | None) -> str:
    """What a user came for, in one line: the mIoU and metrics.json, the masks and how many, the model."""
    if stage == "evaluate":
        if manifest.get("miou") is None:
            return f"nothing scored (no ground truth); see {_where(run_dir, label, artifact_dir, 'metrics.json')}"
        where = run_dir / "metrics.json" if run_dir is not None else artifact_dir / "metrics.json"
        return f"mIoU {manifest['miou']:.2f}, {where}"
    if stage == "pseudo_masks":
        return f"{len(manifest.get('ids', []))} masks in {_where(run_dir, label, artifact_dir, manifest['masks_dir'])}"
    if stage == "train":
        if "checkpoint" in manifest:
            return f"model {manifest['checkpoint']} (given)"
        return f"model {_where(run_dir, label, artifact_dir, 'model.pt')}"
    if stage in ("cams", "refine") and "maps_dir" in manifest:
        return f"{len(manifest.get('ids', []))} maps in {_where(run_dir, label, artifact_dir, manifest['maps_dir'])}"
    return f"{stage} artifact {_where(run_dir, label, artifact_dir)}"


def _job_result(job: Path) -> str:
    """A sweep job's result: its mIoU, or its masks and how many, from its run directory."""
    metrics = job / "metrics.json"
    if metrics.is_file():
        m = read_json(metrics)
        return "nothing scored" if m.get("miou") is None else f"mIoU {m['miou']:.2f}"
    index = read_index(job)
    if "pseudo_masks" in index:
        masks = job / LINKS / "pseudo_masks" / "masks"
        masks = masks if masks.is_dir() else Path(index["pseudo_masks"]["path"]) / "masks"
        return f"{sum(1 for _ in masks.rglob('*.png'))} masks in {masks}"
    last = [label for label in index if not label.startswith("cams[")]
    return f"{last[-1]} {job / LINKS / last[-1]}" if last else "no result (see its run.log)"


def sweep_summary(sweep_dir: Path) -> str:
    """One line per job of a `-m` sweep: its overrides and its result, as a Markdown table."""
    jobs = sorted((d for d in Path(sweep_dir).iterdir() if (d / ".hydra").is_dir()), key=_job_order)
    overrides = {job: _overrides(job) for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    lines = ["| job | overrides | result |", "|---|---|---|"]
    for job in jobs:
        own = [o for o in overrides[job] if o not in shared]  # what this job varies; the shared ones once below
        lines.append(f"| {job.name} | {' '.join(own) or '(defaults)'} | {_job_result(job)} |")
    if shared:
        lines.append(f"\nEvery job also: {' '.join(o for o in overrides[jobs[0]] if o in shared)}")
    return "\n".join(lines) + "\n"


def _overrides(job: Path) -> list[str]:
    """The overrides a job ran with (Hydra's `.hydra/overrides.yaml`)."""
    with contextlib.suppress(OSError, yaml.YAMLError):
        return [str(o) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []]
    return []


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


__all__ = ["find_runs", "link_artifacts", "missing_artifacts", "read_index", "result_line", "sweep_summary"]
