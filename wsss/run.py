"""The command line: `python -m wsss.run stage=... [overrides]` (Hydra; `-m` for sweeps)."""

from __future__ import annotations

import logging
import random

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsss.config import register_configs
from wsss.pipeline import Pipeline

log = logging.getLogger(__name__)
register_configs()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the requested stage and what it needs; return the headline metric (mIoU) when there is one."""
    seed_everything(cfg.seed)
    run_dir = HydraConfig.get().runtime.output_dir
    manifest = Pipeline(cfg, run_dir=run_dir).run(cfg.stage.name)
    miou = manifest.get("miou")
    return float(miou) if miou is not None else None


if __name__ == "__main__":
    main()
