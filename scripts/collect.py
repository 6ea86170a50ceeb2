"""Gather the `metrics.json` files of a Hydra multirun into one CSV and one Markdown table.

Every directory under DIR holding a `metrics.json` is a job; its configuration is read from
`.hydra/overrides.yaml` beside it (a list of `key=value` strings). When some of them have a `.hydra` folder,
only those count (other `metrics.json` files, e.g. in an artifact cache under DIR, are skipped).

One row per job, in job order (DIR/0, DIR/1, ..., DIR/10, sorted numerically). Columns: the override keys
whose values differ between jobs, then `threshold` (when any job reports one: `threshold`, else
`reported_threshold`), then `miou`, then the IoU of each class (the `iou` mapping, class name -> percent, in
first-seen order).

    python scripts/collect.py multirun/2024-01-01/12-00-00 [--out PREFIX]

writes PREFIX.csv and PREFIX.md (default PREFIX: DIR/summary) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from wsss.artifacts import atomic_open


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders '2' before '10' in every path component."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's Hydra overrides as key -> value strings ({} without `.hydra/overrides.yaml`)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of key=value overrides, got {type(items).__name__}")
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"{path}: override {item!r} is not key=value")
        out[key.lstrip("+~")] = value
    return out


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows (column -> value) of every job under `root`.

    Raises:
        FileNotFoundError: If `root` does not exist or holds no `metrics.json`.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    paths = sorted(root.rglob("metrics.json"), key=lambda p: _natural_key(p.relative_to(root)))
    if not paths:
        raise FileNotFoundError(f"no metrics.json under {root}")
    hydra_jobs = [p for p in paths if (p.parent / ".hydra").is_dir()]
    if hydra_jobs:  # skip copies elsewhere in the tree, e.g. in an artifact cache kept under DIR
        paths = hydra_jobs
    jobs = []
    for path in paths:
        metrics = json.loads(path.read_text())
        if "miou" not in metrics:
            raise ValueError(f"{path}: no 'miou' entry")
        jobs.append((path.parent, read_overrides(path.parent), metrics))

    keys: list[str] = []
    for _, overrides, _ in jobs:
        keys += [k for k in overrides if k not in keys]
    varying = [k for k in keys if len({overrides.get(k) for _, overrides, _ in jobs}) > 1]
    seen: dict[tuple, Path] = {}
    for job_dir, overrides, _ in jobs:
        config = tuple(overrides.get(k) for k in varying)
        if config in seen:
            print(f"warning: {job_dir} has the same overrides as {seen[config]}", file=sys.stderr)
        seen.setdefault(config, job_dir)

    def threshold(metrics: dict) -> Any:
        return metrics.get("threshold", metrics.get("reported_threshold"))

    with_threshold = any(threshold(m) is not None for _, _, m in jobs)
    classes: list[str] = []
    for _, _, metrics in jobs:
        classes += [c for c in metrics.get("iou") or {} if c not in classes]
    columns = [*varying, *(["threshold"] if with_threshold else []), "miou", *classes]
    rows = []
    for _, overrides, metrics in jobs:
        row: dict[str, Any] = {k: overrides.get(k) for k in varying}
        if with_threshold:
            row["threshold"] = threshold(metrics)
        row["miou"] = metrics["miou"]
        iou = metrics.get("iou") or {}
        row.update({c: iou.get(c) for c in classes})
        rows.append(row)
    return columns, rows


def _text(value: Any, digits: int) -> str:
    """A table cell: floats rounded, None / NaN empty in CSV and '–' in Markdown (digits < 0 means CSV)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if digits < 0 else "–"
    if isinstance(value, float):
        return repr(round(value, 4)) if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (floats with 2 decimals, thresholds as given)."""
    numeric = {c for c in columns if any(isinstance(r[c], int | float) for r in rows)}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|",
    ]
    for row in rows:
        cells = [_text(row[c], 2) if c != "threshold" else _text(row[c], 3) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(columns: list[str], rows: list[dict[str, Any]], prefix: Path) -> tuple[Path, Path]:
    """Write PREFIX.csv and PREFIX.md, atomically."""
    csv_path, md_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".md")
    with atomic_open(csv_path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_text(row[c], -1) for c in columns] for row in rows])
    with atomic_open(md_path, "w") as f:
        f.write(to_markdown(columns, rows) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default: DIR/summary)")
    args = parser.parse_args(argv)
    try:
        columns, rows = collect(args.dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"collect: {e}") from e
    csv_path, md_path = write(columns, rows, args.out or args.dir / "summary")
    print(to_markdown(columns, rows))
    print(f"\n{len(rows)} jobs -> {csv_path}, {md_path}")


if __name__ == "__main__":
    main()
