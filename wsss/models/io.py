"""Networks saved with the constructor arguments that rebuild them (AffinityNet, the IRN boundary branch, the
segmenter): one file, loaded with torch's weights-only loader."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch

from wsss.artifacts import atomic_open

T = TypeVar("T", bound=torch.nn.Module)


def save_network(path: Path, model: torch.nn.Module) -> None:
    """What rebuilds a network whose constructor kwargs it keeps in `.kwargs`: state_dict and kwargs (atomic)."""
    with atomic_open(path, "wb") as f:
        torch.save({"state_dict": model.state_dict(), "model_kwargs": dict(model.kwargs)}, f)


def load_network(path: Path, cls: type[T], device: torch.device) -> T:
    """The network `save_network` wrote, rebuilt as `cls`, in eval mode on `device`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = cls(**payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()
