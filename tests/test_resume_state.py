"""Resume states damaged on disk or written by another run: one warning, then the last sound state or a fresh start."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from tests.conftest import REPO
from tests.tiny import TINY, run_cli, tiny_cfg
from wsss import training
from wsss.models import AffinityNet
from wsss.pipeline import Pipeline
from wsss.stages import affinity
from wsss.stages.train import STATE, build_scheduler
from wsss.state import SEAL, previous_state, seal, unseal
from wsss.training import Loop, distributed_loader

CPU = torch.device("cpu")


def _loop(width: int = 4, epochs: int = 3) -> tuple[Loop, nn.Module]:
    """A fresh loop over a small BatchNorm MLP (seeded: every call builds the same initial weights)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    scheduler = build_scheduler(optimizer, epochs * 4, 2)
    return Loop("t", model, model, optimizer, scheduler, None, CPU, 0, epochs, 0.8), model


def _fit(out_dir: Path, fail_at: int | None = None, epochs: int = 3) -> tuple[Loop, int]:
    """Fit `_loop` on a fixed regression set (4 batches an epoch); KeyboardInterrupt at batch `fail_at`."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3), torch.randn(24, 2))
    loader = distributed_loader(data, 6, seed=0, num_workers=0, device=CPU)
    loop, model = _loop(epochs=epochs)
    calls = [0]

    def batch_loss(b):
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt("killed")
        x, y = b
        return nn.functional.mse_loss(model(x), y), x.shape[0], torch.zeros(0)

    done = loop.fit(loader, batch_loss, lambda s: {"loss": s[0].item() / s[1].item()}, out_dir, "state.pt")
    return loop, done


def _epoch_of(path: Path) -> int:
    """The epoch a sealed state file holds."""
    payload, _ = unseal(path, path.read_bytes())
    return torch.load(io.BytesIO(payload), weights_only=True)["epoch"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _unsealed(path: Path) -> None:
    """The payload alone: a torch.save file that passes torch.load but carries no checksum."""
    path.write_bytes(unseal(path, path.read_bytes())[0])


DAMAGE = {  # how a file is damaged, and what the warning says after its path
    "truncated": (_truncate, "is incomplete ("),
    "a byte flipped": (_flip_a_byte, "is damaged ("),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "no checksum": (_unsealed, "is incomplete ("),
}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_state_is_sealed_and_the_one_it_replaces_kept_until_the_loop_ends(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=11)  # 4 batches an epoch: killed in the third epoch
    path = tmp_path / "state.pt"
    assert path.read_bytes()[-32 - len(SEAL) : -32] == SEAL
    assert (_epoch_of(path), _epoch_of(previous_state(path))) == (2, 1)
    _, done = _fit(tmp_path)
    assert done == 2
    assert _epoch_of(path) == 3
    assert not previous_state(path).exists()  # the stage unlinks the state itself once its model is final


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_resumes_from_the_previous_one(tmp_path, caplog, damage):
    whole, _ = _fit(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", fail_at=11)
    path = tmp_path / "killed" / "state.pt"
    break_it, problem = DAMAGE[damage]
    break_it(path)
    with caplog.at_level(logging.INFO, logger="wsss.training"):
        resumed, done = _fit(tmp_path / "killed")
    assert done == 1  # epoch 2's state was damaged: epoch 1's, kept as .prev, is the last sound one
    (line,) = _warnings(caplog)
    assert f"{path} {problem}" in line
    assert line.endswith(f"resuming after epoch 1 of 3 from {previous_state(path)}")
    assert "\n" not in line
    # On the CPU the resumed run ends with exactly the weights of an uninterrupted one.
    _assert_same(_weights(whole.final_model()), _weights(resumed.final_model()))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_without_a_previous_one_starts_afresh(tmp_path, caplog, damage):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=6)  # in the second epoch: epoch 1's state, no previous one yet
    path = tmp_path / "state.pt"
    assert not previous_state(path).exists()
    DAMAGE[damage][0](path)
    loop, model = _loop()
    initial = _weights(model)
    with caplog.at_level(logging.INFO, logger="wsss.training"):
        assert loop.resume(path) == 0
    (line,) = _warnings(caplog)
    assert line.startswith(f"t: {path} {DAMAGE[damage][1]}")
    assert line.endswith("; starting afresh")
    _assert_same(initial, _weights(model))
    assert loop.history == []


def test_both_states_damaged_is_one_line_naming_both(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=11)
    path = tmp_path / "state.pt"
    _truncate(path)
    _flip_a_byte(previous_state(path))
    loop, _ = _loop()
    with caplog.at_level(logging.WARNING, logger="wsss.training"):
        assert loop.resume(path) == 0
    (line,) = _warnings(caplog)
    assert f"{path} is incomplete" in line
    assert f"{previous_state(path)} is damaged" in line
    assert line.endswith("; starting afresh")


def test_after_a_damaged_state_the_next_saves_keep_a_sound_previous_one(tmp_path):
    """The damaged file is replaced, never kept as the fallback."""
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=11)
    path = tmp_path / "state.pt"
    _truncate(path)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=5)  # resumed after epoch 1, saved epoch 2, killed in epoch 3
    assert (_epoch_of(path), _epoch_of(previous_state(path))) == (2, 1)


@pytest.mark.parametrize(
    ("other", "problem"),
    [
        ({"width": 5}, "its weights differ: 7 of another shape (e.g. 0.weight)"),
        ({"epochs": 6}, "its schedule differs: 1.total_iters 22 (here 10)"),  # the same weights, another length of run
    ],
)
def test_a_state_of_another_run_is_refused_whole(tmp_path, caplog, other, problem):
    path = tmp_path / "state.pt"
    foreign, _ = _loop(**other)
    foreign.history = [{"epoch": 1, "loss": 1.0}]
    foreign.save(path, 1)
    loop, model = _loop()
    initial = _weights(model)
    with caplog.at_level(logging.WARNING, logger="wsss.training"):
        assert loop.resume(path) == 0
    (line,) = _warnings(caplog)
    assert line.startswith(f"t: {path} is not a state of this run: {problem}")
    assert line.endswith("; starting afresh")
    _assert_same(initial, _weights(model))  # nothing loaded in part
    assert loop.optimizer.state_dict()["state"] == {}


def test_the_affinity_loop_survives_a_damaged_state(tmp_path, caplog):
    """(c) The affinity stage's loop, built as `affinity.run` builds it, on its own state file."""

    def build(dim: int = 8) -> tuple[Loop, AffinityNet]:
        torch.manual_seed(0)
        model = AffinityNet("resnet_tiny", dim)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=6, power=0.9)
        return Loop("affinity", model, model, optimizer, scheduler, None, CPU, 0, 3), model

    def step(loop: Loop, model: AffinityNet) -> None:
        loss = model(torch.rand(2, 3, 32, 32)).square().mean()
        loop.optimizer.zero_grad()
        loss.backward()
        loop.optimizer.step()
        loop.scheduler.step()

    path = tmp_path / affinity.STATE
    loop, model = build()
    for epoch in (1, 2):
        step(loop, model)
        loop.history.append({"epoch": epoch, "loss": 0.0})
        loop.save(path, epoch)
        if epoch == 1:
            after_one = _weights(model)
    _truncate(path)
    again, model2 = build()
    with caplog.at_level(logging.INFO, logger="wsss.training"):
        assert again.resume(path) == 1
    (line,) = _warnings(caplog)
    assert line.startswith(f"affinity: {path} is incomplete")
    _assert_same(after_one, _weights(model2))
    assert again.optimizer.state_dict()["state"]  # AdamW's moments came back too

    caplog.clear()
    other, model3 = build(dim=16)  # another affinity.dim: its projections have other shapes
    initial = _weights(model3)
    with caplog.at_level(logging.WARNING, logger="wsss.training"):
        assert other.resume(path) == 0
    (line,) = _warnings(caplog)
    assert f"{previous_state(path)} is not a state of this run: its weights differ" in line
    _assert_same(initial, _weights(model3))


# -- under two ranks ---------------------------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, store: str, root: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for case in ("shared", "prev", "disagree"):
            # "disagree": each rank reads its own copy (a node-local cache); rank 1's is damaged
            path = Path(root) / case / (f"rank{rank}" if case == "disagree" else "") / "state.pt"
            loop, model = _loop()
            done = loop.resume(path)
            results[case] = {"done": done, "weight": model[0].weight.sum().item()}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch_dist.destroy_process_group()


def test_every_rank_makes_the_same_decision(tmp_path):
    for case in ("shared", "prev", "disagree/rank0"):
        with pytest.raises(KeyboardInterrupt):
            _fit(tmp_path / case, fail_at=11)  # a state after epoch 2, the previous one after epoch 1
    _truncate(tmp_path / "prev" / "state.pt")
    (tmp_path / "disagree" / "rank1").mkdir()
    for name in ("state.pt", "state.pt.prev"):  # rank 1 reads damaged copies of rank 0's sound files
        copy = tmp_path / "disagree" / "rank1" / name
        copy.write_bytes((tmp_path / "disagree" / "rank0" / name).read_bytes())
        _flip_a_byte(copy)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # the same epoch and the same weights on both ranks
    assert [got[0][c]["done"] for c in ("shared", "prev", "disagree")] == [2, 1, 0]


# -- the pipeline and the command line ---------------------------------------------------------------------------


def _interrupt_after(monkeypatch, name: str, epochs: int) -> None:
    """Stop the loop `name` like a kill once `epochs` epochs are saved (history is written after the state)."""
    write = training.write_history

    def stop(out_dir, history, writer, loop_name):
        write(out_dir, history, writer, loop_name)
        if loop_name == name and len(history) == epochs:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training, "write_history", stop)


@pytest.mark.parametrize(
    ("stage", "state", "overrides"),
    [
        ("train", STATE, ["train.epochs=3"]),
        ("affinity", affinity.STATE, ["affinity.epochs=3", "affinity.batch_size=8"]),
    ],
)
def test_a_stage_rerun_over_a_damaged_state_finishes(tmp_path, caplog, monkeypatch, stage, state, overrides):
    """In process: the build stops after two epochs, its state is truncated, the rerun resumes from epoch 1."""
    args = [f"stage={stage}", *overrides]
    with monkeypatch.context() as m:
        _interrupt_after(m, stage, 2)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(tiny_cfg(tmp_path, args)).run(stage)
    pipe = Pipeline(tiny_cfg(tmp_path, args))
    out = pipe.artifact_dir(stage)
    assert not (out / "manifest.json").exists()
    _truncate(out / state)
    with caplog.at_level(logging.INFO):
        manifest = pipe.run(stage)
    named = [r for r in caplog.records if state in r.getMessage()]
    assert len(named) == 1, [r.getMessage() for r in named]
    assert named[0].levelno == logging.WARNING
    assert f"{out / state} is incomplete" in named[0].getMessage()
    assert manifest["resumed_after_epoch"] == 1
    assert len(manifest["losses"]) == 3
    assert not (out / state).exists()
    assert not previous_state(out / state).exists()
    assert not any(state in rel for rel in manifest["outputs"])


@pytest.mark.slow
def test_the_command_line_reruns_over_a_truncated_state(tmp_path):
    """(b) kill -9 after the first saved epoch, truncate `train_state.pt`, rerun: exit 0, one line, a model."""
    args = ["stage=train", "train.epochs=4"]
    cache = tmp_path / "cache"
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsss.run", *TINY, *args, f"hydra.run.dir={tmp_path / 'killed'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list(cache.glob(f"train/*/{STATE}")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (artifact,) = {p.parent for p in cache.glob(f"train/*/{STATE}*")}
    assert not (artifact / "manifest.json").exists()  # killed before the stage finished
    path = artifact / STATE
    if not path.exists():  # killed between renaming the state to .prev and writing the next one
        path.write_bytes(previous_state(path).read_bytes())
    previous_state(path).unlink(missing_ok=True)  # no sound state to fall back on: a fresh start
    _truncate(path)
    rerun = run_cli(tmp_path, [*args, f"hydra.run.dir={tmp_path / 'rerun'}"])
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in output
    (line,) = [ln for ln in output.splitlines() if STATE in ln]
    assert f"{path} is incomplete" in line
    assert line.endswith("; starting afresh")
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["resumed_after_epoch"] == 0
    assert len(manifest["losses"]) == 4
    assert (path.parent / "model.pt").stat().st_size > 0
    assert not path.exists()
    assert not previous_state(path).exists()


def test_seal_round_trip(tmp_path):
    payload = b"payload" * 100
    path = tmp_path / "s.pt"
    assert unseal(path, payload + seal(payload)) == (payload, hashlib.sha256(payload).hexdigest())
    with pytest.raises(training.StateError, match=r"s\.pt is incomplete \(700 bytes"):
        unseal(path, payload)
