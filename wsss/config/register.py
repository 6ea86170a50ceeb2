"""Registration: the schemas in Hydra's ConfigStore, the resolvers the YAML files use, the help page."""

from __future__ import annotations

import os
import time

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from wsss.config.schema import CamConfig, Config, DatasetConfig, ModelConfig, StageConfig
from wsss.help import register_help


def run_stamp() -> str:
    """The run directory's name: the start time, or under torchrun the run id that every rank shares."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"{time.strftime('%Y-%m-%d')}_torchrun-{run_id[:12]}"
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def _unmapped(class_map: str | None) -> list[str]:
    """`dataset.void_classes`' default: the classes `model.class_map` has no ImageNet counterpart for."""
    from wsss.models.class_map import unmapped_classes

    return unmapped_classes(class_map)


def register_configs() -> None:
    """Register the schemas; conf/config.yaml extends `base_config`, group files extend their `base_*`."""
    OmegaConf.register_new_resolver("wsss_run_stamp", run_stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("wsss_unmapped", _unmapped, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="cam", name="base_cam", node=CamConfig)
    cs.store(group="stage", name="base_stage", node=StageConfig)
    register_help()  # hydra/help: wsss, `python -m wsss.run --help` (wsss/help.py)
