"""The command line: `python -m wsss.run stage=... [overrides]` (Hydra; `-m` for sweeps).

`torchrun --nproc_per_node=N -m wsss.run ...` (or a Slurm step with N tasks) runs the same command on N
processes: one process group (NCCL on CUDA, gloo on the CPU), each rank on `cuda:LOCAL_RANK`, one shared run
directory; rank 0 logs to the console and to `run.log`, rank k to `run.rank<k>.log`.

A user error (a value out of range, a missing or damaged input file, no space left, permission denied) ends the
run with one line, `wsss: error: <what>: <problem>`, the path of the log that holds the traceback, and exit
status 2. `HYDRA_FULL_ERROR=1` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wsss import dist, progress
from wsss.config import register_configs
from wsss.errors import WsssError
from wsss.pipeline import Pipeline

log = logging.getLogger(__name__)
register_configs()

# What counts as the user's to fix: wsss's own errors, and the readers' ValueError / OSError, which name the
# file or key. Anything else (a bug) keeps Hydra's traceback.
USER_ERRORS = (WsssError, ValueError, OSError)
EXIT_USER_ERROR = 2


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log_files() -> list[str]:
    """The files the root logger writes to (Hydra's `<run dir>/<job name>.log`)."""
    return [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _message(e: BaseException) -> str:
    """One line for the user: OSError as `<file>: <problem>`, everything else as its own message."""
    if isinstance(e, OSError) and not isinstance(e, WsssError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def per_rank_logging(rank: int) -> None:
    """Rank k > 0: no console output, and its own log file `<name>.rank<k>.log` beside rank 0's."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
            path = Path(h.baseFilename)
            mine = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
            mine.setFormatter(h.formatter)
            mine.setLevel(h.level)
            root.addHandler(mine)
        elif isinstance(h, logging.StreamHandler):
            root.removeHandler(h)


def report_user_error(e: BaseException) -> None:
    """Write the traceback to the log file(s) only, and one line to stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (_message(e),), (type(e), e, e.__traceback__))
    files = _log_files()
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
    where = f"full log: {files[0]}" if files else "rerun with HYDRA_FULL_ERROR=1 for the traceback"
    sys.stderr.write(f"wsss: error: {_message(e)}\nwsss: {where}\n")


def record_class_names(run_dir: Path, names: list[str]) -> None:
    """Write class names the data named (a folder's labels file) into the run's saved config, so the run
    directory's `.hydra/config.yaml` says which classes mask value c + 1 means."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.is_file():
        saved = OmegaConf.load(path)
        saved.dataset.class_names = names
        OmegaConf.save(saved, path)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the requested stage and what it needs; return the headline metric (mIoU) when there is one."""
    started = False
    try:
        if cfg.progress in progress.MODES:  # a bad value is refused by validation, with the others
            progress.set_mode(cfg.progress)
        started = dist.setup(dist.local_device(str(cfg.device)))
        per_rank_logging(dist.rank())
        seed_everything(cfg.seed)
        run_dir = HydraConfig.get().runtime.output_dir
        pipeline = Pipeline(cfg, run_dir=run_dir)
        if cfg.dataset.class_names is None and pipeline.cfg.dataset.class_names is not None and dist.is_main():
            record_class_names(Path(run_dir), list(pipeline.cfg.dataset.class_names))
        manifest = pipeline.run(cfg.stage.name)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_user_error(e)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if started:
            dist.teardown()
    miou = manifest.get("miou")
    return float(miou) if miou is not None else None


if __name__ == "__main__":
    main()
