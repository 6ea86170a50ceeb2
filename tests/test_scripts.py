"""The benchmark and study scripts run (at tiny sizes) and report what they say they report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tiny import TINY

pytestmark = pytest.mark.slow


def _script(name: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_bench_gpu_smoke_on_the_cpu(tmp_path):
    proc = _script("bench_gpu.py", "--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"] == "cpu"
    for key in ("cams", "train_fp32", "train_bf16"):
        assert result[key]["images"] > 0
        assert result[key]["images_per_s"] > 0


def test_bench_storage_bytes_on_the_coco_sample(shared_data):
    proc = _script("bench_storage.py", "--coco", str(shared_data / "coco2017_sample"), "--split", "val")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)["coco_bytes"]
    assert out["float16"]["bytes_per_image"] > out["uint8"]["bytes_per_image"] > out["quarter"]["bytes_per_image"]
    # float16 full resolution: 2 bytes per value per class, plus the 1/16-size strided maps
    assert out["float16"]["bytes_per_image"] > 2 * 480 * 300 * out["mean_classes"]


def test_seed_spread_reports_mean_and_std(tmp_path):
    env = {"WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "spread.json"
    proc = _script("seed_spread.py", "--seeds", "2", "--out", str(out), *TINY, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    mious = [r["miou"] for r in result["rows"]]
    assert [r["seed"] for r in result["rows"]] == [0, 1]
    assert result["summary"]["miou"]["mean"] == pytest.approx(sum(mious) / 2, abs=1e-9)
    assert result["summary"]["miou"]["std"] == pytest.approx(abs(mious[0] - mious[1]) / 2**0.5, abs=1e-9)
    # cached like any run: the same seed again reuses everything
    again = _script("seed_spread.py", "--seeds", "1", *TINY, env=env)
    assert again.returncode == 0
    assert "evaluate: reusing" in again.stdout + again.stderr


def test_bench_train_projects_both_recipes(tmp_path):
    """Two tiny recipes, epochs interleaved: each projection is its median epoch x its epochs; ratio B / A."""
    tiny = " ".join(TINY)
    a, b = f"{tiny} train.amp_dtype=null train.epochs=3", f"{tiny} train.amp_dtype=bfloat16 train.epochs=5"
    out = tmp_path / "train.json"
    args = ["--a", a, "--b", b, "--epochs", "2", "--out", str(out)]
    proc = _script("bench_train.py", *args, env={"WSSS_DATA": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ra, rb = result["recipes"]["A"], result["recipes"]["B"]
    assert (ra["precision"], rb["precision"]) == ("float32", "bfloat16")
    assert (ra["epochs"], rb["epochs"]) == (3, 5)
    for r in (ra, rb):
        times = sorted(r["seconds_per_epoch"])
        assert len(times) == 2
        assert r["projected_seconds"] == pytest.approx((times[0] + times[1]) / 2 * r["epochs"], rel=1e-12)
    assert result["ratio"] == pytest.approx(rb["projected_seconds"] / ra["projected_seconds"], rel=1e-12)
    assert proc.stdout.strip().splitlines()[-1].endswith(f"{result['ratio']:.3f}")


def test_bench_keys_small_tree():
    proc = _script("bench_keys.py", "--ids", "300", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate with masks_dir (900 files)" in proc.stdout
