"""Typed config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ fill them in.

Types are checked at composition: `pseudo.threshold=abc` or a misspelled key fails with Hydra's own message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SyntheticConfig:
    """Parameters of the embedded dataset's generator (used when dataset.name == synthetic)."""

    num_train: int = 2000
    num_val: int = 300
    image_size: int = 128
    seed: int = 0


@dataclass
class DatasetConfig:
    """Which data, where, and which splits. Background is implicit: class_names lists foreground classes."""

    name: str = MISSING  # synthetic | voc12 | coco
    root: str = MISSING
    class_names: list[str] | None = None  # null: the dataset's own list
    train_split: str = "train"  # the classifier trains on this split
    eval_split: str = "train"  # CAMs, pseudo masks and scores are made on this split
    mask_dir: str = "SegmentationClass"  # VOC layout: where ground-truth PNGs live
    aug_mask_dir: str = "SegmentationClassAug"  # VOC layout: fallback masks (SBD) for train_aug ids
    year: int = 2017  # coco: 2014 or 2017
    on_error: str = "raise"  # raise | skip: what a bad sample does (skips are counted in the manifest)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The classifier: torchvision ResNet trunk, GAP, bias-free 1x1 conv head."""

    backbone: str = "resnet_tiny"  # resnet_tiny | resnet18 | resnet34 | resnet50
    output_stride: int = 16  # 32, 16 or 8 (stride replaced by dilation)
    weights: str | None = None  # torchvision weights name, e.g. IMAGENET1K_V1 (needs them in TORCH_HOME)
    checkpoint: str | None = None  # a wsss checkpoint file: skips training


@dataclass
class TrainConfig:
    """Classifier training: multilabel soft margin loss, poly learning-rate decay (as IRN)."""

    epochs: int = 28
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw (from scratch) | sgd (IRN, with a pretrained trunk)
    lr: float = 2e-3
    head_lr_mult: float = 1.0  # 10 is IRN's choice with a pretrained trunk
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-2
    crop_size: int | None = None  # null: the first image's longer side, rounded up to 32, at most 512
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])
    num_workers: int = 2


@dataclass
class CamConfig:
    """How class activation maps are computed (wsss.cam)."""

    method: str = "cam"  # cam | gradcam | gradcampp | xgradcam | layercam | scorecam
    target_layer: str = "backbone.layer4"
    output_stride: int | None = 8  # read the trained model at this stride (exact a-trous); null: as trained
    batch_size: int = 16  # images of equal size per forward
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    amp_dtype: str | None = None  # bfloat16 | float16: autocast, maps accumulated in float32


@dataclass
class PseudoConfig:
    """Maps -> masks: argmax over [threshold, maps]; optional IRN confident fg/bg ignore band."""

    threshold: float = 0.5  # from-scratch CAMs are broad; IRN's 0.15-0.16 suits ImageNet-pretrained ResNet-50
    conf_fg: float | None = None  # with conf_bg: pixels between the two thresholds become 255 (ignore)
    conf_bg: float | None = None
    crf: bool = False
    rle_json: bool = False  # also write masks.rle.json: COCO-style results with pycocotools RLE


@dataclass
class EvaluateConfig:
    """Scoring of pseudo masks (and, when maps exist, a one-pass threshold sweep)."""

    masks_dir: str | None = None  # score this folder of PNGs (named by image id) instead of the pipeline's
    thresholds: Any = "0.00:0.95:0.01"  # a list [0.1, 0.2] or a range "start:stop:step" (stop included)
    select_on: str | None = None  # pick the threshold on this split and report eval_split at it
    overlays: int = 6  # best and worst images drawn in the overlay grid


@dataclass
class StageConfig:
    """Which stage to run; its upstream stages run first when their artifacts are missing."""

    name: str = MISSING  # train | cams | pseudo_masks | evaluate


@dataclass
class PathsConfig:
    """Where data and artifacts live (relative paths are taken from the current directory)."""

    data_root: str = "${oc.env:WSSS_DATA,data}"
    cache_dir: str = "${oc.env:WSSS_CACHE,outputs/cache}"


@dataclass
class Config:
    """The whole composed config of `python -m wsss.run`."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def register_configs() -> None:
    """Register the schemas; conf/config.yaml extends `base_config`, group files extend their `base_*`."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="cam", name="base_cam", node=CamConfig)
    cs.store(group="stage", name="base_stage", node=StageConfig)


register_configs()
