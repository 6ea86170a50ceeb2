"""Shared fixtures: paths, the config directory, and a small synthetic dataset generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one thread each (and in the runs they start), or they oversubscribe
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real dataset samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (VOC layout) shared by the tests that read one."""
    from wsss.data.synthetic import SyntheticSpec, ensure_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    return ensure_synthetic(root, SyntheticSpec(num_train=24, num_val=8, image_size=64, seed=0))
