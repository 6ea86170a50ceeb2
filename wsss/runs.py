"""Reading run directories for the leaderboard: each one's metrics.json, per_image.npz, overrides and
faithfulness pairs (`load_run`), and the runs under a folder such as a Hydra multirun directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wsss.artifacts import read_json
from wsss.errors import WsssError
from wsss.metrics.bootstrap import ImageStats
from wsss.stages.faithfulness import image_sums

log = logging.getLogger(__name__)


class ReportError(WsssError, ValueError):
    """A report that cannot be made: the message names the directory, run or option."""


@dataclass
class Run:
    """One run directory's results."""

    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, Any]
    stats: ImageStats
    faith: FaithPairs | None = None
    name: str = ""

    @property
    def model_key(self) -> str | None:
        return (self.metrics.get("model") or {}).get("key")

    @property
    def data(self) -> tuple:
        """What must agree between runs of one report: dataset, root, split, class list."""
        d = self.metrics["dataset"]
        return (d.get("dataset"), d.get("root"), d.get("split"), tuple(d.get("class_names", [])))


@dataclass
class FaithPairs:
    """A run's faithfulness values per image: the scored images in order, each one's classes, and per metric
    of the summary the per-image sum of its pairs' values (scaled as the summary is: percent for AD / IC)."""

    ids: list[str]
    classes: list[list[str]]
    pairs: np.ndarray
    sums: dict[str, np.ndarray]

    def pairs_like(self, other: FaithPairs) -> bool:
        return self.ids == other.ids and self.classes == other.classes


def load_faith_pairs(run_dir: Path, block: dict[str, Any]) -> FaithPairs | None:
    """`faithfulness_per_image.json` of a run whose metrics.json has a faithfulness block (None without one);
    refused, naming the file, when unreadable or when its values do not give the block's means (a stale copy)."""
    path = run_dir / "faithfulness_per_image.json"
    if not block or not path.is_file():
        return None
    try:
        records = read_json(path)
        ids = list(records)
        classes = [list(records[i]["classes"]) for i in ids]
        pairs, sums = image_sums(records, ids)
        sums = {k: v for k, v in sums.items() if k in block}
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{path}: unreadable ({e!r})") from e
    total = pairs.sum()
    for name, s in sums.items():
        mean = block[name].get("mean")
        if len(ids) != block.get("images") or (mean is not None and total and abs(s.sum() / total - mean) > 1e-3):
            raise ReportError(
                f"{path}: its {name} ({len(ids)} images, mean {s.sum() / max(total, 1):.4f}) is not metrics.json's "
                f"({block.get('images')} images, mean {mean}); a stale copy: rerun the run's evaluate"
            )
    return FaithPairs(ids, classes, pairs, sums)


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories: each path that holds metrics.json, else its subfolders that do (numeric names in order)."""
    out = []
    for p in paths:
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory")
        if (p / "metrics.json").is_file():
            out.append(p)
            continue
        subs = [d for d in p.iterdir() if d.is_dir() and (d / "metrics.json").is_file()]
        if not subs:
            raise ReportError(f"{p}: no metrics.json (not a run directory, and no run directory under it)")
        out += sorted(subs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return out


def _overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (Hydra's `.hydra/overrides.yaml`), key -> value; {} without it."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def load_run(run_dir: Path) -> Run:
    """Read one run directory; errors name the missing or unreadable file."""
    metrics_path, stats_path = run_dir / "metrics.json", run_dir / "per_image.npz"
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: not found (the run has no evaluate results)")
    try:
        metrics = read_json(metrics_path)
    except ValueError as e:
        raise ReportError(f"{metrics_path}: unreadable ({e})") from e
    if not stats_path.is_file():
        raise ReportError(f"{stats_path}: not found (written by evaluate since the leaderboard exists; rerun it)")
    try:
        stats = ImageStats.load(stats_path)
    except (OSError, ValueError, KeyError) as e:
        raise ReportError(f"{stats_path}: unreadable ({e})") from e
    return Run(run_dir, _overrides(run_dir), metrics, stats, load_faith_pairs(run_dir, metrics.get("faithfulness")))
