"""Several processes on the CPU (torchrun + gloo), resumable training, and Hydra's parallel launchers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.tiny import TINY, artifact_dir, fixed_checkpoint, kill_when, run_cli, torchrun, torchrun_env
from wsss.artifacts import read_mask

pytestmark = pytest.mark.slow


def test_two_ranks_give_the_single_process_maps_masks_and_metrics(tmp_path):
    """(a) with a fixed checkpoint, and (d) 2 ranks when the artifacts are missing, then when they exist."""
    ckpt = fixed_checkpoint(tmp_path / "given.pt")
    common = [f"model.checkpoint={ckpt}", "cam.batch_size=1", "pseudo.rle_json=true"]
    one = run_cli(tmp_path, [*common, f"hydra.run.dir={tmp_path / 'one'}"], env={"WSSS_CACHE": str(tmp_path / "c1")})
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(tmp_path, 2, [*common, f"hydra.run.dir={tmp_path / 'two'}"], cache="c2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "run.rank1.log").is_file()
    a, b = tmp_path / "c1", tmp_path / "c2"
    maps_a, maps_b = artifact_dir(a, "cams") / "maps", artifact_dir(b, "cams") / "maps"
    assert sorted(p.name for p in maps_a.iterdir()) == sorted(p.name for p in maps_b.iterdir())
    for p in maps_a.iterdir():
        za, zb = np.load(p), np.load(maps_b / p.name)
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{p.name}:{k}")
    masks_a, masks_b = artifact_dir(a, "pseudo_masks"), artifact_dir(b, "pseudo_masks")
    for p in (masks_a / "masks").iterdir():
        np.testing.assert_array_equal(read_mask(p), read_mask(masks_b / "masks" / p.name))
    rle_a = json.loads((masks_a / "masks.rle.json").read_text())
    assert rle_a == json.loads((masks_b / "masks.rle.json").read_text())
    assert rle_a
    assert not list(masks_b.glob("masks.rle.rank*.json"))
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for k in ("miou", "iou", "scores", "pseudo_masks", "sweep", "pxap", "per_image_miou", "num_images"):
        assert ma[k] == mb[k], k
    pa = json.loads((masks_a / "manifest.json").read_text())["counts"]
    pb = json.loads((masks_b / "manifest.json").read_text())["counts"]
    assert pa == pb  # the ignored share comes from totals summed over ranks
    # torchrun itself reuses what the forked ranks wrote: the same keys, the same run-directory layout
    again = torchrun(tmp_path, 2, [*common, f"hydra.run.dir={tmp_path / 'again'}"], cache="c2", timeout=300, real=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluate: reusing" in again.stdout + again.stderr
    assert (tmp_path / "again" / "run.rank1.log").is_file()  # every rank logs to its own file


# Runs `wsss.run` with `Loop.fit` wrapped to save each rank's final weights, as that rank holds them, to
# $WSSS_TEST_WEIGHTS/rank<k>.pt: the ranks' tensors are compared directly, not through wsss's own log lines.
WEIGHTS_PER_RANK = """
import os
import runpy

import torch

import wsss.training

fit = wsss.training.Loop.fit


def fit_and_keep(self, *args, **kwargs):
    done = fit(self, *args, **kwargs)
    weights = {k: v.detach().cpu().clone() for k, v in self.final_model().state_dict().items()}
    torch.save(weights, os.path.join(os.environ["WSSS_TEST_WEIGHTS"], f"rank{os.environ['RANK']}.pt"))
    return done


wsss.training.Loop.fit = fit_and_keep
runpy.run_module("wsss.run", run_name="__main__", alter_sys=True)  # as `-m wsss.run`: Hydra finds conf/ by file
"""


def test_two_rank_training_ends_with_the_same_weights_on_every_rank(tmp_path):
    """(b) DDP on gloo: each rank's final state_dict, saved by that rank, equals the other's tensor for tensor,
    and both equal the model.pt that rank 0 writes."""
    script = tmp_path / "weights_per_rank.py"
    script.write_text(WEIGHTS_PER_RANK)
    weights = tmp_path / "weights"
    weights.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    cmd += [*TINY, "stage=train", "train.epochs=2", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**torchrun_env(tmp_path), "WSSS_TEST_WEIGHTS": str(weights)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in weights.iterdir()) == ["rank0.pt", "rank1.pt"]
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    saved = _final_weights(tmp_path / "cache")
    assert rank0.keys() == rank1.keys() == saved.keys()
    assert any("running_mean" in k for k in rank0)  # buffers are compared too, not only parameters
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], saved[k]), k
    manifest = json.loads((artifact_dir(tmp_path / "cache", "train") / "manifest.json").read_text())
    assert manifest["counts"]["ranks"] == 2
    assert manifest["config"]["ranks"] == 2
    assert "(rank 1)" in (tmp_path / "run" / "run.rank1.log").read_text()  # rank 1 logs to its own file only
    assert "(rank 1)" not in proc.stdout + proc.stderr


# One float16 step at a map's maximum (1.0): the largest rounding a stored map can show (values are in [0, 1]).
F16_STEP = 2.0**-11


def test_two_ranks_at_the_default_cam_batch_keep_maps_within_one_float16_step(tmp_path):
    """With cam.batch_size > 1 a rank's batches hold other images than one process's and the convolution rounds
    differently: every stored map stays within one float16 step of the single process's, at most 0.1 % of the
    mask pixels change class (a score on the threshold), and mIoU moves by at most 0.05 (docs/scaling.md)."""
    ckpt = fixed_checkpoint(tmp_path / "given.pt")
    common = [f"model.checkpoint={ckpt}", "cam.batch_size=16"]
    one = run_cli(tmp_path, [*common, f"hydra.run.dir={tmp_path / 'one'}"], env={"WSSS_CACHE": str(tmp_path / "c1")})
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(tmp_path, 2, [*common, f"hydra.run.dir={tmp_path / 'two'}"], cache="c2")
    assert two.returncode == 0, two.stderr[-3000:]
    maps_a, maps_b = artifact_dir(tmp_path / "c1", "cams") / "maps", artifact_dir(tmp_path / "c2", "cams") / "maps"
    names = sorted(p.name for p in maps_a.iterdir())
    assert names == sorted(p.name for p in maps_b.iterdir())
    for name in names:
        za, zb = np.load(maps_a / name), np.load(maps_b / name)
        np.testing.assert_array_equal(za["keys"], zb["keys"])
        for k in ("maps", "strided"):
            diff = np.abs(za[k].astype(np.float64) - zb[k].astype(np.float64))
            assert diff.max() <= F16_STEP, f"{name}:{k} differs by {diff.max()}"
    masks_a = artifact_dir(tmp_path / "c1", "pseudo_masks") / "masks"
    masks_b = artifact_dir(tmp_path / "c2", "pseudo_masks") / "masks"
    changed = total = 0
    for p in masks_a.iterdir():
        a, b = read_mask(p), read_mask(masks_b / p.name)
        changed, total = changed + int((a != b).sum()), total + a.size
    assert changed <= 0.001 * total, f"{changed} of {total} mask pixels differ"
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(ma["miou"] - mb["miou"]) <= 0.05


def _final_weights(cache: Path) -> dict[str, torch.Tensor]:
    return torch.load(artifact_dir(cache, "train") / "model.pt", weights_only=True)["state_dict"]


def test_kill_in_an_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """(c) kill -9 during epoch k > 1: the rerun resumes after epoch k - 1 and ends with the same weights."""
    args = ["stage=train", "train.epochs=4", "dataset.synthetic.num_train=64", "dataset.num_workers=2"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: reductions add up alike
    clean = run_cli(
        tmp_path, [*args, f"hydra.run.dir={tmp_path / 'clean'}"], env={**one_thread, "WSSS_CACHE": str(tmp_path / "c1")}
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    cache = tmp_path / "c2"
    history = []

    def two_epochs_saved() -> bool:
        found = list(cache.glob("train/*/history.csv"))
        if found and len(list(csv.DictReader(found[0].open()))) >= 2:
            history.append(found[0])
        return bool(history)

    kill_when(
        tmp_path,
        [*args, f"hydra.run.dir={tmp_path / 'killed'}"],
        two_epochs_saved,
        {**one_thread, "WSSS_CACHE": str(cache)},
    )
    history = history[0] if history else None
    assert history is not None
    assert not list(cache.glob("train/*/manifest.json"))
    done = len(list(csv.DictReader(history.open())))
    rerun = run_cli(
        tmp_path, [*args, f"hydra.run.dir={tmp_path / 'rerun'}"], env={**one_thread, "WSSS_CACHE": str(cache)}
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"train: resuming after epoch {done} of 4" in rerun.stdout + rerun.stderr
    a, b = _final_weights(tmp_path / "c1"), _final_weights(cache)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    artifact = artifact_dir(cache, "train")
    assert not (artifact / "train_state.pt").exists()  # done with once the model is final
    rows = list(csv.DictReader((artifact / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert (artifact / "curves.png").stat().st_size > 0
    if __import__("importlib").util.find_spec("tensorboard") is not None:
        assert list((artifact / "tensorboard").glob("events.out.tfevents.*"))


def test_amp_bfloat16_trains_on_the_cpu(tmp_path):
    proc = run_cli(tmp_path, ["stage=train", "train.amp_dtype=bfloat16", f"hydra.run.dir={tmp_path / 'r'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((artifact_dir(tmp_path / "cache", "train") / "manifest.json").read_text())
    assert manifest["config"]["train"]["amp_dtype"] == "bfloat16"
    assert np.isfinite(manifest["losses"]).all()


def _job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob("*/run.log")))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
    reason="needs pip install -e '.[launchers]'",
)
def test_joblib_sweep_builds_train_and_cams_once(tmp_path):
    """(e) two jobs in parallel share the cache: one builds, the other waits on the lock and reuses."""
    sweep = tmp_path / "multirun"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "pseudo.threshold=0.2,0.3"]
    proc = run_cli(tmp_path, [*args, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = _job_logs(sweep)
    assert logs.count("train: running") == 1, logs[-3000:]
    assert logs.count("cams: running") == 1
    assert logs.count("pseudo_masks: running") == 2
    assert len(list((tmp_path / "cache" / "train").glob("*/manifest.json"))) == 1


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="needs pip install -e '.[launchers]'",
)
def test_submitit_local_sweep_finishes(tmp_path):
    """(f) Hydra's submitit launcher, local executor: the same code path a Slurm sweep takes."""
    sweep = tmp_path / "multirun"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "pseudo.threshold=0.2,0.3"]
    proc = run_cli(tmp_path, [*args, f"hydra.sweep.dir={sweep}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["masks_rule"]["threshold"] in (0.2, 0.3)


def test_frozen_bn_under_two_ranks_keeps_the_initial_statistics(tmp_path):
    """model.frozen_bn under DDP (gloo): the BatchNorms stay in eval mode on every rank, so the saved running
    statistics are the initial ones (DDP's buffer broadcast carries nothing new), while the affine weights learn."""
    from wsss.models import Classifier

    run_dir = tmp_path / "run"
    args = ["stage=train", "train.epochs=1", "model.frozen_bn=true", "train.ema_decay=null", f"hydra.run.dir={run_dir}"]
    proc = torchrun(tmp_path, 2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _final_weights(tmp_path / "cache")
    torch.manual_seed(0)  # the train stage seeds its initial weights with cfg.seed
    start = Classifier(6, "resnet_tiny", 16, None, "dilate", True).state_dict()
    stats = [k for k in start if "running_" in k]
    assert stats
    for k in stats:
        torch.testing.assert_close(got[k], start[k], rtol=0, atol=0, msg=k)
    affine = [k for k in start if k.endswith("bn1.weight")]
    assert any(not torch.equal(got[k], start[k]) for k in affine)
