"""Resume states on disk: sealed with their sha256, checked whole against the loop before anything is loaded.

A state file is the `torch.save` payload, then `SEAL` and the payload's sha256 digest; a truncated or damaged
file fails `unseal` with a `StateError` that names it. `Loop` (wsss.training) keeps the state it replaces as
`<name>.prev` (`previous_state`) and falls back to it; the `*_misfit` checks tell a state of another run
(other weights, optimizer groups or schedule) before it is loaded in part.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class StateError(ValueError):
    """A resume state that cannot be trusted; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path} {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.problem), self.__dict__


# A state file: the torch.save payload, then this marker and the payload's sha256 digest (32 bytes).
SEAL = b"\nwsss-state-sha256:"


def seal(payload: bytes | memoryview) -> bytes:
    """What follows `payload` in a state file: `SEAL` and the payload's sha256 digest."""
    return SEAL + hashlib.sha256(payload).digest()


def unseal(path: Path, data: bytes) -> tuple[bytes, str]:
    """The payload of a sealed file's bytes and its sha256 (hex).

    Raises:
        StateError: The seal is missing (a truncated file) or the digest differs (a damaged one).
    """
    end = len(data) - hashlib.sha256().digest_size
    if end < len(SEAL) or data[end - len(SEAL) : end] != SEAL:
        raise StateError(path, f"is incomplete ({len(data)} bytes, no checksum at its end)" if data else "is empty")
    payload = memoryview(data)[: end - len(SEAL)]
    digest = hashlib.sha256(payload)
    if digest.digest() != data[end:]:
        raise StateError(path, f"is damaged ({len(data)} bytes whose sha256 does not match the one at its end)")
    return payload.tobytes(), digest.hexdigest()


def previous_state(path: Path) -> Path:
    """Where the state before `path`'s is kept: `<name>.prev` beside it."""
    return path.with_name(f"{path.name}.prev")


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most `limit` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tensors_misfit(mine: dict[str, Tensor], theirs: Any, what: str) -> str | None:
    """How a saved state_dict differs from `mine` in names or shapes (None: it fits)."""
    if not isinstance(theirs, dict):
        return f"its {what} are not a state_dict"
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    reshaped = [
        k for k in mine if k in theirs and (not isinstance(theirs[k], Tensor) or theirs[k].shape != mine[k].shape)
    ]
    kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
    parts = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in kinds if keys]
    return f"its {what} differ: " + ", ".join(parts) if parts else None


# A scheduler's settings, as opposed to its progress (last_epoch, _step_count, _last_lr).
SCHEDULE_SETTINGS = ("total_iters", "power", "start_factor", "end_factor", "_milestones", "base_lrs")


def schedule(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The settings of a scheduler's state_dict, SequentialLR's inner schedulers included."""
    out = {prefix + k: state[k] for k in SCHEDULE_SETTINGS if k in state}
    for i, inner in enumerate(state.get("_schedulers", [])):
        out.update(schedule(inner, f"{prefix}{i}."))
    return out


def optimizer_misfit(optimizer: torch.optim.Optimizer, theirs: Any) -> str | None:
    """How a saved optimizer state differs from `optimizer`'s groups and parameter shapes (None: it fits)."""
    if not isinstance(theirs, dict) or not {"state", "param_groups"} <= set(theirs):
        return "its optimizer state is incomplete"
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g.get("params", ())) for g in theirs["param_groups"]] != sizes:
        return f"its optimizer has other parameter groups (of {sizes} parameters here)"
    # The saved ids, in group order, stand for the parameters in that order (as Optimizer.load_state_dict maps them).
    ids = [i for g in theirs["param_groups"] for i in g["params"]]
    params = dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"]), strict=True))
    for i, entry in theirs["state"].items():
        p = params.get(i)
        if p is None or not isinstance(entry, dict):
            return f"its optimizer has state for an unknown parameter {i!r}"
        for name, v in entry.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                return f"its optimizer's {name} of parameter {i} has shape {tuple(v.shape)}, not {tuple(p.shape)}"
    return None


def misfit(
    state: Any,
    epochs: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> str | None:
    """What in a read state does not fit a loop of these parts (None: it fits), so that nothing is loaded in part."""
    want = {"epoch", "model", "optimizer", "scheduler", "scaler", "history", "rng"}
    if ema is not None:
        want.add("ema")
    if not isinstance(state, dict) or set(state) != want:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        return f"it holds {found}, expected {sorted(want)}"
    epoch, history = state["epoch"], state["history"]
    if not isinstance(epoch, int) or not 0 <= epoch <= epochs:
        return f"epoch {epoch!r} of a run of {epochs} epochs"
    if not isinstance(history, list) or len(history) != epoch:
        return f"{len(history) if isinstance(history, list) else 'no'} history rows after epoch {epoch}"
    problem = tensors_misfit(model.state_dict(), state["model"], "weights")
    if problem is None and ema is not None:
        problem = tensors_misfit(ema.state_dict(), state["ema"], "weight average")
    if problem is not None:
        return problem
    problem = optimizer_misfit(optimizer, state["optimizer"])
    if problem is not None:
        return problem
    for part, mine in (("scheduler", scheduler.state_dict()), ("scaler", scaler.state_dict())):
        if not isinstance(state[part], dict) or set(state[part]) != set(mine):
            return f"its {part} is of another kind"
    saved, here = schedule(state["scheduler"]), schedule(scheduler.state_dict())
    if saved != here:  # the same kind of scheduler over another run's length
        keys = [k for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]
        return "its schedule differs: " + ", ".join(f"{k} {saved.get(k)} (here {here.get(k)})" for k in keys)
    if not isinstance(state["rng"], dict) or set(state["rng"]) != {"torch", "cuda", "numpy", "python"}:
        return "its RNG states are incomplete"
    return None
