"""A training loop's record: history.csv (rewritten whole each epoch) and TensorBoard scalars, on rank 0."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

from wsss import dist
from wsss.artifacts import atomic_open


def fmt(row: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds"))


def write_history(out_dir: Path, history: list[dict[str, float]], writer: Any, name: str) -> None:
    """history.csv (rewritten whole, atomically) and the epoch's TensorBoard scalars (rank 0)."""
    if not dist.is_main():
        return
    with atomic_open(out_dir / "history.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(history[-1]))
        w.writeheader()
        w.writerows(history)
    if writer is not None:
        row = history[-1]
        for k, v in row.items():
            if k not in ("epoch", "seconds"):
                writer.add_scalar(f"{name}/{k}", v, row["epoch"])
        writer.flush()


def tensorboard(out_dir: Path) -> Any:
    """A SummaryWriter into `tensorboard/` on rank 0 when tensorboard is installed, else None."""
    if not dist.is_main() or importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))
