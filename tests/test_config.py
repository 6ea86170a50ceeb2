"""Every config group composes, and bad values fail at composition with Hydra's own message."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from tests.conftest import CONF_DIR
from wsss.config import register_configs

register_configs()

GROUPS = {
    name: sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))
    for name in ("dataset", "model", "cam", "stage")
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_groups_exist():
    assert GROUPS["stage"] == ["cams", "evaluate", "pseudo_masks", "train"]
    assert {"synthetic", "voc12", "coco"} <= set(GROUPS["dataset"])
    assert {"cam", "gradcam", "gradcampp"} <= set(GROUPS["cam"])


# Every option of every group appears at least once; datasets and stages (the pairs that interact) in full.
COMBINATIONS = [
    (d, GROUPS["model"][i % len(GROUPS["model"])], GROUPS["cam"][i % len(GROUPS["cam"])], s)
    for i, (d, s) in enumerate(itertools.product(GROUPS["dataset"], GROUPS["stage"]))
] + [("synthetic", m, c, "evaluate") for m, c in itertools.product(GROUPS["model"], GROUPS["cam"])]


@pytest.mark.parametrize("dataset,model,cam,stage", COMBINATIONS)
def test_group_combinations_compose(dataset, model, cam, stage):
    cfg = _compose([f"dataset={dataset}", f"model={model}", f"cam={cam}", f"stage={stage}"])
    assert cfg.dataset.name == dataset
    assert cfg.cam.method == cam
    assert cfg.stage.name == stage
    assert cfg.model.backbone == model
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_defaults():
    cfg = _compose([])
    assert (cfg.dataset.name, cfg.model.backbone, cfg.cam.method, cfg.stage.name) == (
        "synthetic",
        "resnet_tiny",
        "cam",
        "evaluate",
    )
    assert cfg.model.weights is None


def test_experiment_overlay():
    cfg = _compose(["experiment=irn_voc12"])
    assert cfg.dataset.name == "voc12" and cfg.model.backbone == "resnet50"
    assert cfg.dataset.train_split == "train_aug" and cfg.dataset.eval_split == "train"


def test_bad_threshold_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["pseudo.threshold=abc"])
    assert isinstance(e.value.__cause__, ValidationError) or "abc" in str(e.value.__cause__)


@pytest.mark.parametrize("override", ["stage=nope", "cam=nope", "dataset=nope"])
def test_unknown_group_option_fails(override):
    with pytest.raises(MissingConfigException, match="nope"):
        _compose([override])


def test_misspelled_key_fails():
    with pytest.raises(ConfigCompositionException):
        _compose(["pseudo.treshold=0.2"])
