"""The training loop's schedule, weight average and precision, against formulas and dtypes written out here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wsss.stages.train import build_scheduler
from wsss.training import Loop, distributed_loader


def _lrs(steps: int, warmup: int, lr: float = 0.5) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = build_scheduler(optimizer, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup", [0, 1, 7, 40, 55])
def test_schedule_is_linear_warmup_then_poly(warmup):
    steps, lr = 40, 0.5
    expected = []
    for s in range(steps):
        if warmup >= steps:  # the ramp alone, over the whole run
            expected.append(lr * (0.01 + 0.99 * s / steps))
        elif s < warmup:  # linear from lr / 100 at step 0 to lr at step `warmup`
            expected.append(lr * (0.01 + 0.99 * s / warmup))
        else:
            expected.append(lr * (1 - (s - warmup) / (steps - warmup)) ** 0.9)
    assert _lrs(steps, warmup, lr) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _fit(tmp_path, ema_decay, fail_at=None, epochs=3):
    """A linear model on a fixed regression set through `Loop`; records the weights each batch saw."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3), torch.randn(24, 2))
    loader = distributed_loader(data, 6, seed=0, num_workers=0, device=torch.device("cpu"))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    scheduler = build_scheduler(optimizer, epochs * len(loader), 2)
    loop = Loop("t", model, model, optimizer, scheduler, None, torch.device("cpu"), 0, epochs, ema_decay)
    seen, calls = [], [0]

    def batch_loss(b):
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise KeyboardInterrupt("killed")
        seen.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
        x, y = b
        return nn.functional.mse_loss(model(x), y), x.shape[0], torch.zeros(0)

    loop.fit(loader, batch_loss, lambda s: {"loss": s[0].item() / s[1].item()}, tmp_path, "state.pt")
    return loop, seen, model


@pytest.mark.parametrize("decay", [0.3, 0.8])  # 0.3: capped from the 3rd update; 0.8: warm-up throughout
def test_ema_is_the_moving_average_of_every_step(tmp_path, decay):
    loop, seen, model = _fit(tmp_path, decay)
    # The weights after step t are what batch t + 1 saw; after the last step, the model's own.
    after = [*seen[1:], {k: v.detach().double() for k, v in model.state_dict().items()}]
    ema = None
    for n, w in enumerate(after):  # the first update copies, then e = d_n e + (1 - d_n) w, d_n warmed up
        d = min(decay, (1 + n) / (10 + n))
        ema = dict(w) if ema is None else {k: d * ema[k] + (1 - d) * w[k] for k in w}
    final = loop.final_model().state_dict()
    for k, v in ema.items():
        if k.endswith("num_batches_tracked"):
            assert final[k] == model.state_dict()[k]  # a counter: the model's own
            continue
        torch.testing.assert_close(final[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(final["0.weight"], model.state_dict()["0.weight"])  # the average, not the last step


def test_without_ema_the_final_model_is_the_model(tmp_path):
    loop, _, model = _fit(tmp_path, None)
    assert loop.final_model() is model


def test_a_killed_run_resumes_to_the_same_average(tmp_path):
    whole, _, _ = _fit(tmp_path / "whole", 0.8)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", 0.8, fail_at=6)  # 4 batches per epoch: killed in the second epoch
    resumed, seen, _ = _fit(tmp_path / "killed", 0.8)
    assert len(seen) == 8  # epochs 2 and 3 only
    a, b = whole.final_model().state_dict(), resumed.final_model().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Noisy(torch.utils.data.Dataset):
    """Item i: i plus a draw from torch's global RNG (as an augmentation would draw)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(())


def _epoch_items(num_workers, epoch=1):
    loader = distributed_loader(_Noisy(), 4, seed=3, num_workers=num_workers, device=torch.device("cpu"))
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = Loop("t", model, model, optimizer, build_scheduler(optimizer, 8, 0), None, torch.device("cpu"), 3, 2)
    seen = []

    def batch_loss(b):
        seen.append(b.clone())
        return (model.weight * 0).sum(), b.shape[0], torch.zeros(0)

    loop.epoch(loader, epoch, batch_loss)
    return torch.cat(seen)


def test_augmentation_does_not_depend_on_the_number_of_workers():
    main = _epoch_items(0)
    assert torch.equal(main, _epoch_items(2))
    assert sorted(main.floor().tolist()) == list(range(16))  # every item once
    assert not torch.equal(main, _epoch_items(0, epoch=0))  # another epoch, other draws


def test_an_items_draw_is_a_function_of_the_epoch_seed_and_its_index():
    from wsss.training import SeededSamples

    samples = SeededSamples(_Noisy())
    samples.set_seed(11)
    a = [samples[i] for i in (5, 2, 5)]
    torch.manual_seed(0)  # the global stream does not matter, nor is it consumed
    state = torch.get_rng_state()
    b = samples[2]
    assert torch.equal(torch.get_rng_state(), state)
    assert a[0] == a[2]  # the same item twice: the same draw
    assert a[1] == b
    assert a[0] - 5 != a[1] - 2  # two items: two draws


def test_auto_precision_is_bfloat16_only_where_native(monkeypatch):
    from wsss import training

    cpu = torch.device("cpu")
    assert training.resolve_amp_dtype(None, cpu) is None
    assert training.resolve_amp_dtype("float16", cpu) == "float16"
    monkeypatch.setattr(training, "native_bfloat16", lambda device: True)
    assert training.resolve_amp_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(training, "native_bfloat16", lambda device: False)
    assert training.resolve_amp_dtype("auto", cpu) is None


def test_auto_precision_keys_the_model_by_what_it_resolves_to(tmp_path, monkeypatch):
    """`auto` shares its cache key with the precision it resolves to on this device, never with the other."""
    from tests.tiny import tiny_cfg
    from wsss import training
    from wsss.config import register_configs
    from wsss.pipeline import Pipeline

    register_configs()

    def key(amp: str) -> str:
        return Pipeline(tiny_cfg(tmp_path, [f"train.amp_dtype={amp}"])).key("train")

    for native, same, other in ((True, "bfloat16", "null"), (False, "null", "bfloat16")):
        monkeypatch.setattr(training, "native_bfloat16", lambda device, native=native: native)
        assert key("auto") == key(same)
        assert key("auto") != key(other)


@pytest.mark.parametrize(
    ("amp", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("null", torch.float32)]
)
def test_the_train_step_computes_in_the_requested_precision(tmp_path, amp, expected):
    """The train stage's own run: in every training step's forward, the first and the last conv output the
    dtype `train.amp_dtype` names (float32 for null: no autocast where none is asked)."""
    from tests.tiny import tiny_cfg
    from wsss.data import build_source
    from wsss.stages.train import build_run

    cfg = tiny_cfg(tmp_path, [f"train.amp_dtype={amp}"])
    source = build_source(cfg.dataset, str(cfg.dataset.train_split))
    loader, loop, batch_loss = build_run(cfg, source, torch.device("cpu"))
    convs = {"stem": loop.model.backbone.stem[0], "head": loop.model.head}
    assert all(isinstance(m, nn.Conv2d) for m in convs.values())
    seen = {name: [] for name in convs}
    for name, module in convs.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(out.dtype))
    loop.epoch(loader, 0, batch_loss)
    assert seen == {name: [expected] * len(loader) for name in convs}
    assert len(loader) == 3  # 24 images in batches of 8: three steps seen
    assert loop.model.head.weight.dtype == torch.float32  # autocast computes in low precision, keeps float32 weights
