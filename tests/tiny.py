"""The tiny pipeline config the end-to-end tests share: seconds on two cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR, REPO
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
    "evaluate.overlays=2",
]


def tiny_cfg(tmp_path: Path, overrides: list[str] = ()):
    """The composed tiny config with data and cache under `tmp_path`."""
    paths = [f"paths.data_root={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *paths, *overrides])


def run_cli(tmp_path: Path, args: list[str], timeout: float = 600, env: dict | None = None, **kw):
    """`python -m wsss.run *TINY *args` with data and cache under `tmp_path`; returns the CompletedProcess."""
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache"), **(env or {})}
    flags = [a for a in args if a == "-m"]  # Hydra's flags go before the overrides
    cmd = [sys.executable, "-m", "wsss.run", *flags, *TINY, *[a for a in args if a != "-m"]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def error_line(stderr: str) -> str:
    """The `wsss: error: ...` line of a failed run's stderr (progress bars may come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("wsss: error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]
