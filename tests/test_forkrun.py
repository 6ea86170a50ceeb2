"""The fork server the CLI tests run through gives what a new `python -m wsss.run` gives."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tiny import FORK_SERVER, TINY


@pytest.mark.parametrize(
    "args",
    [
        ["pseudo.threshold=1.5"],  # a user error: one line, exit 2
        ["stage=nope"],  # Hydra refuses the override: exit 1
        ["--cfg", "job", "pseudo.threshold=0.25"],  # stdout: the composed config
    ],
)
def test_a_forked_run_exits_and_prints_as_a_new_interpreter(tmp_path, args):
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    flags, overrides = (args[:2], args[2:]) if args[0] == "--cfg" else ([], args)
    argv = [*flags, *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    real = subprocess.run(
        [sys.executable, "-m", "wsss.run", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    forked = FORK_SERVER.run(argv, env, timeout=300)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


def test_a_forked_run_past_its_timeout_is_killed_and_raises(tmp_path):
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    with pytest.raises(subprocess.TimeoutExpired):
        FORK_SERVER.run([*TINY, "train.epochs=50", f"hydra.run.dir={tmp_path / 'run'}"], env, timeout=2)
    assert FORK_SERVER.run([*TINY, "stage=nope"], env, timeout=300).returncode == 1  # the server goes on


def test_what_only_an_interpreters_start_reads_makes_a_real_subprocess():
    assert FORK_SERVER.forkable({**os.environ, "WSSS_CACHE": "/elsewhere", "OMP_NUM_THREADS": "1"})
    for key in ("PYTHONHASHSEED", "LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "WSSS_DIST_TIMEOUT_MIN"):
        assert not FORK_SERVER.forkable({**os.environ, key: "7"}), key


def test_forked_ranks_fail_as_torchrun_does(tmp_path):
    """Two forked ranks of a run refuse a bad override: the status is 1, as torchrun's, and the error line is
    printed (once or twice: the first rank to fail has the other killed, which may not have printed yet)."""
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    argv = [*TINY, "pseudo.threshold=1.5", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = FORK_SERVER.run_ranks(argv, env, 2, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("wsss: error: pseudo.threshold=1.5") in (1, 2), proc.stderr[-2000:]
