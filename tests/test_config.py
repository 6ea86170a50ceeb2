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
from wsss.errors import ConfigError

register_configs()

GROUPS = {
    name: sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))
    for name in ("dataset", "model", "cam", "stage", "experiment")
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_groups_match_the_registries():
    """Every stage, dataset, backbone and CAM method of the code has its conf file, and nothing else does."""
    from wsss.cam import METHODS
    from wsss.data import DATASETS
    from wsss.models import BACKBONES
    from wsss.stages import STAGES

    assert GROUPS["stage"] == sorted(STAGES)
    assert GROUPS["dataset"] == sorted(DATASETS)
    from wsss.cam.clip_es import CLIP_METHODS
    from wsss.models.clip import CLIP_BACKBONES

    assert GROUPS["cam"] == sorted([*METHODS, *CLIP_METHODS])
    assert GROUPS["model"] == sorted([*BACKBONES, *CLIP_BACKBONES])


@pytest.mark.parametrize("group", ["dataset", "model", "cam", "stage", "experiment"])
def test_every_option_of_every_group_composes_and_validates(group):
    from wsss.config import validate

    for option in GROUPS[group]:
        needs = REQUIRED.get(f"{group}={option}", [])
        if needs:  # without its required value the option is refused, by name
            with pytest.raises(ConfigError, match=f"{needs[0].split('=')[0]}: required, not set"):
                validate(_compose([f"{group}={option}"]))
        partner = PARTNERS.get(f"{group}={option}", [])
        if partner:  # refused without its partner group option, which the message names
            with pytest.raises(ConfigError, match=partner[0].split("=")[0]):
                validate(_compose([f"{group}={option}"]))
        cfg = _compose([f"{group}={option}", *needs, *partner])
        OmegaConf.to_container(cfg, resolve=True)
        validate(cfg)  # an experiment's weights name too (checked against torchvision's list, nothing loaded)


REQUIRED = {"dataset=folder": ["dataset.root=/data/mine"]}  # options with a value the user must give
# options that work only together (CLIP-ES's model and maps; the weights tag is checked, nothing loaded)
PARTNERS = {
    "model=clip_vit_b16": ["cam=clip_es", "model.weights=openai"],
    "cam=clip_es": ["model=clip_vit_b16", "model.weights=openai"],
}


# Every option of every group appears at least once; datasets and stages (the pairs that interact) in full.
COMBINATIONS = [
    (d, GROUPS["model"][i % len(GROUPS["model"])], GROUPS["cam"][i % len(GROUPS["cam"])], s)
    for i, (d, s) in enumerate(itertools.product(GROUPS["dataset"], GROUPS["stage"]))
] + [("synthetic", m, c, "evaluate") for m, c in itertools.product(GROUPS["model"], GROUPS["cam"])]


@pytest.mark.parametrize(("dataset", "model", "cam", "stage"), COMBINATIONS)
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
    assert cfg.dataset.name == "voc12"
    assert cfg.model.backbone == "resnet50"
    assert cfg.dataset.train_split == "train_aug"
    assert cfg.dataset.eval_split == "train"
    seg = cfg.segment  # DeepLab v2 on ResNet-50 at output stride 8, its SGD recipe, scored on val
    assert (seg.network, seg.backbone, seg.output_stride, seg.eval_split) == ("deeplabv2", "resnet50", 8, "val")
    assert (seg.optimizer, seg.lr, seg.momentum, seg.weight_decay, seg.head_lr_mult) == ("sgd", 2.5e-4, 0.9, 5e-4, 10)
    assert (seg.batch_size, seg.crop_size, list(seg.scale_range), seg.frozen_bn) == (10, 321, [0.5, 1.5], True)


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


@pytest.mark.parametrize(
    "override",
    [
        "cam.method=nope",
        "train.optimizer=adamx",
        "model.backbone=resnet9",
        "cam.amp_dtype=fp8",
        "dataset.on_error=ignore",
        "cam.output_stride=eight",
    ],
)
def test_bad_choice_fails_at_composition(override):
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as e:
        _compose([override])
    message = str(e.value) + str(e.value.__cause__)
    assert value in message
    assert key.split(".")[-1] in message


def test_choices_read_as_their_strings():
    cfg = _compose(["cam=gradcampp", "dataset.on_error=skip"])
    assert cfg.cam.method == "gradcampp"
    assert f"{cfg.cam.method}" == "gradcampp"
    assert str(cfg.dataset.on_error) == "skip"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["pseudo.threshold=1.5"], "pseudo.threshold=1.5: must be in [0, 1]"),
        (["pseudo.threshold=-0.1"], "pseudo.threshold=-0.1: must be in [0, 1]"),
        (["pseudo.conf_fg=0.3"], "set both or neither"),
        (["pseudo.conf_fg=0.1", "pseudo.conf_bg=0.3"], "pseudo.conf_bg=0.3: must be <= pseudo.conf_fg=0.1"),
        (["cam.scales=[1.0,0]"], "cam.scales=[1.0, 0.0]: must be a non-empty list of values > 0"),
        (["cam.scales=[]"], "cam.scales=[]"),
        (["train.epochs=0"], "train.epochs=0: must be >= 1"),
        (["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
        (["train.epochs=4", "train.warmup_epochs=5"], "train.warmup_epochs=5.0: must be in [0, train.epochs=4]"),
        (["train.ema_decay=1.0"], "train.ema_decay=1.0: must be in (0, 1) or null"),
        (["cam.batch_size=0"], "cam.batch_size=0: must be >= 1"),
        (["model.output_stride=12"], "model.output_stride=12: must be 8, 16 or 32"),
        (["cam.output_stride=32"], "cam.output_stride=32: must be <= model.output_stride=16"),
        (["evaluate.thresholds=0.5:0.1:0.1"], "evaluate.thresholds=0.5:0.1:0.1"),
        (["evaluate.select_on=val", "evaluate.masks_dir=x"], "cannot be used with evaluate.masks_dir"),
        (["device=gpu"], "device=gpu: must be auto, cpu, cuda or cuda:N"),
        (["model=resnet18", "model.weights=IMAGENET9"], "model.weights=IMAGENET9: must be one of ['IMAGENET1K_V1']"),
        (["model.weights=IMAGENET1K_V1"], "resnet_tiny has no weights"),
        (["train.scale_range=[1.3,0.7]"], "train.scale_range=[1.3, 0.7]"),
        (["dataset.max_pixels=0"], "dataset.max_pixels=0: must be >= 1"),
        (["model=vit_b_16", "model.stride_mode=irn", "cam.output_stride=null"], "model.stride_mode=irn: ResNet"),
        (["model=swin_t", "model.frozen_bn=true"], "model.frozen_bn=True: ResNet backbones only"),
        (["model=convnext_tiny", "train.freeze=layer2"], "train.freeze=layer2: must be null or one of"),
    ],
)
def test_out_of_range_values_name_key_value_and_what_is_allowed(overrides, needle):
    from wsss.config import validate
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(_compose(overrides))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


# IRN's values, transcribed from jiwoon-ahn/irn (run_sample.py's argparse defaults unless another file is named).
IRN = {
    "dataset.train_split": "train_aug",  # --train_list voc12/train_aug.txt
    "dataset.eval_split": "train",  # --chainer_eval_set train
    "dataset.labels_from": "xml",  # voc12/make_cls_labels.py: cls_labels.npy from the XMLs
    "model.backbone": "resnet50",  # --cam_network net.resnet50_cam
    "model.output_stride": 16,  # net/resnet50_cam.py: strides=(2, 2, 2, 1)
    "model.stride_mode": "irn",  # net/resnet50.py: the stride is set, no dilation anywhere
    "model.frozen_bn": True,  # net/resnet50.py: FixedBatchNorm
    "model.weights": "IMAGENET1K_V1",  # resnet50(pretrained=True)
    "train.freeze": "layer2",  # net/resnet50_cam.py: self.stage2(x).detach()
    "train.ema_decay": None,  # step/train_cam.py saves the last weights
    "train.epochs": 5,  # --cam_num_epoches
    "train.batch_size": 16,  # --cam_batch_size
    "train.lr": 0.1,  # --cam_learning_rate
    "train.weight_decay": 1e-4,  # --cam_weight_decay
    "train.crop_size": 512,  # --cam_crop_size
    "train.head_lr_mult": 10.0,  # step/train_cam.py: param_groups[1] at 10 * lr
    "train.warmup_epochs": 0.0,  # misc/torchutils.py: PolyOptimizer decays from step 0, no warm-up
    "train.momentum": 1e-4,  # misc/torchutils.py: SGD(params, lr, weight_decay): the 3rd argument is momentum
    "train.nesterov": False,  # plain SGD
    "train.resize": "long_side",  # step/train_cam.py: resize_long=(320, 640)
    "train.long_side": [320, 640],
    "cam.resize": "pil_bicubic",  # voc12/dataloader.py: pil_rescale(img, s, order=3)
    "cam.store": "float32",  # step/make_cam.py saves float32 maps
    "pseudo.refine": "irn",  # step/make_sem_seg_labels.py
    "refine.irn_radius": 5,  # indexing.propagate_to_edge(radius=5)
    "refine.irn_beta": 10.0,  # --beta
    "refine.irn_steps": 256,  # 2 ** --exp_times
    "refine.irn_bg_threshold": 0.25,  # --sem_seg_bg_thres
    "refine.irn_pad": 512,  # EdgeDisplacement(crop_size=512)
    "irn.conf_fg": 0.30,  # --conf_fg_thres
    "irn.conf_bg": 0.05,  # --conf_bg_thres
    "irn.crf": True,  # imutils.crf_inference_label
    "irn.trunk": "weights",  # net/resnet50_irn.py: resnet50(pretrained=True, strides=[2, 2, 2, 1])
    "irn.radius": 10,  # PathIndex(radius=10)
    "irn.epochs": 3,  # --irn_num_epoches
    "irn.batch_size": 32,  # --irn_batch_size
    "irn.lr": 0.1,  # --irn_learning_rate
    "irn.momentum": 1e-4,  # PolyOptimizer's positional momentum
    "irn.weight_decay": 1e-4,  # --irn_weight_decay
    "irn.crop_size": 512,  # --irn_crop_size
    "irn.scale_range": [0.5, 1.5],  # VOC12AffinityDataset rescale=(0.5, 1.5)
    "cam.scales": [1.0, 0.5, 1.5, 2.0],  # --cam_scales
    "cam.flip": True,  # voc12/dataloader.py: VOC12ClassificationDatasetMSF stacks each scale with its flip
    "cam.output_stride": 16,  # step/make_cam.py reads the CAM net as trained
    "cam.norm_eps": 1e-5,  # step/make_cam.py: cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
    "cam.canvas_stride": 16,  # step/make_cam.py: imutils.get_strided_up_size(size, 16), then [:H, :W]
    "pseudo.threshold": 0.15,  # --cam_eval_thres
    "affinity.conf_fg": 0.30,  # --conf_fg_thres
    "affinity.conf_bg": 0.05,  # --conf_bg_thres
}


def test_irn_experiment_matches_irn():
    cfg = _compose(["experiment=irn_voc12"])
    for key, expected in IRN.items():
        assert OmegaConf.select(cfg, key) == expected, key
    assert cfg.train.optimizer == "sgd"
