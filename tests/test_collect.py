"""scripts/collect.py on a generated fake Hydra multirun tree."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("collect", REPO / "scripts" / "collect.py")
collect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect)


def fake_multirun(root: Path) -> None:
    """12 jobs (0..11, so '10' must sort after '9'): cam.method and threshold vary, dataset does not."""
    for i in range(12):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        method = ["gradcam", "cam", "scorecam"][i % 3]
        overrides = ["dataset=voc", f"cam.method={method}", f"+pseudo.threshold={0.05 * (i // 3):.2f}"]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        iou = {"background": 70.0 + i, "aeroplane": 40.0 + i, "bicycle": None if i == 4 else 20.5}
        metrics = {"miou": sum(v for v in iou.values() if v is not None) / 3, "iou": iou}
        if i != 0:
            metrics["threshold"] = 0.05 * (i // 3)
        (job / "metrics.json").write_text(json.dumps(metrics))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    cached = root / "cache" / "evaluate" / "3f2a"  # an artifact copy without .hydra: not a job
    cached.mkdir(parents=True)
    (cached / "metrics.json").write_text(json.dumps({"miou": 1.0, "iou": {"background": 1.0}}))


def test_collect_table(tmp_path):
    fake_multirun(tmp_path)
    columns, rows = collect.collect(tmp_path)
    assert columns == [
        "cam.method",
        "pseudo.threshold",
        "threshold",
        "miou",
        "background",
        "aeroplane",
        "bicycle",
    ]
    assert len(rows) == 12
    assert [r["background"] for r in rows] == [70.0 + i for i in range(12)]  # job order 0, 1, ..., 10, 11
    assert rows[10]["cam.method"] == "cam"
    assert rows[10]["pseudo.threshold"] == "0.15"
    assert rows[0]["threshold"] is None
    assert rows[4]["bicycle"] is None
    table = collect.to_markdown(columns, rows)
    assert table.splitlines()[0] == "| " + " | ".join(columns) + " |"
    assert "| scorecam | 0.05 | 0.050 | 46.83 | 75.00 | 45.00 | 20.50 |" in table


def test_collect_cli_writes_csv_and_markdown(tmp_path):
    fake_multirun(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out" / "sweep"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "collect.py"), str(tmp_path / "run"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "12 jobs" in proc.stdout
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["cam.method", "pseudo.threshold", "threshold", "miou"]
    assert len(table) == 13
    assert table[5][-1] == ""
    md = out.with_suffix(".md").read_text()
    assert md.count("\n") == 14
    assert "| – |" in md


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.json"):
        collect.collect(tmp_path)
    with pytest.raises(SystemExit, match="not a directory"):
        collect.main([str(tmp_path / "missing")])
