"""Ranges and relations between values, checked by `validate` before any stage starts; each problem as
`key=value: what is allowed`."""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from wsss.cam.clip_es import CLIP_METHODS
from wsss.errors import ConfigError
from wsss.models import BACKBONES
from wsss.models.clip import CLIP_BACKBONES

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
    elif m.weights is not None and str(m.backbone) not in CLIP_BACKBONES:  # CLIP's (a file or "openai"): _clip
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
    # the model can be built: its module names are what target_layer may name
    if m.output_stride in (8, 16, 32) and str(m.backbone) in BACKBONES:
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

    if p.refine in ("crf", "clip_es_crf") and importlib.util.find_spec("pydensecrf") is None:
        out.append(f"pseudo.refine={p.refine}: needs pydensecrf2: pip install -e '.[crf]' (builds with Cython and g++)")
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
    _clip(cfg, out)
    return list(out)


def _clip(cfg: DictConfig, out: _Problems) -> None:
    """cam=clip_es with model=clip_vit_b16: CLIP-ES's maps from a frozen CLIP; what cannot work is refused."""
    import importlib.util

    from wsss.models.clip import NO_WEIGHTS

    c, m = cfg.cam, cfg.model
    clip, es = str(m.backbone) in CLIP_BACKBONES, str(c.method) in CLIP_METHODS
    if c.source is not None:
        return
    if clip != es:
        need = "needs cam=clip_es (CLIP has no classifier head)" if clip else "needs model=clip_vit_b16 (a CLIP ViT)"
        out.append(f"{'model.backbone' if clip else 'cam.method'}={m.backbone if clip else c.method}: {need}")
        return
    if not es:
        return
    if m.weights is None:
        out.append(NO_WEIGHTS)
    elif m.weights != "openai" and not os.path.isfile(m.weights):
        out.append(f"model.weights={m.weights}: no such file (a CLIP state_dict, or openai)")
    if importlib.util.find_spec("open_clip") is None:
        out.append("cam.method=clip_es: needs open_clip: pip install -e '.[clip]'")
    why = "CLIP-ES trains nothing and has no classifier"
    out.need(cfg.stage.name not in ("train", "faithfulness"), "stage.name", cfg.stage.name, f"{why} to run it on")
    out.need(not cfg.faithfulness.enabled, "faithfulness.enabled", True, f"must be false with cam=clip_es: {why}")
    out.need(c.labels == "given", "cam.labels", c.labels, "must be given with cam=clip_es (its prompts are the labels)")
    out.need(m.output_stride == 16, "model.output_stride", m.output_stride, "clip_vit_b16 has stride 16")
    for key in ("checkpoint", "class_map", "head_init"):
        out.need(m[key] is None, f"model.{key}", m[key], "must be null with model=clip_vit_b16")
    one = "CLIP-ES computes one scale without flip (generate_cams_voc12.py:125-126)"
    out.need(list(c.scales) == [1.0], "cam.scales", list(c.scales), f"must be [1.0]: {one}")
    out.need(not c.flip, "cam.flip", c.flip, f"must be false: {one}")
    ce = c.clip_es
    out.need(1 <= ce.attention_layers <= 12, "cam.clip_es.attention_layers", ce.attention_layers, "must be in [1, 12]")
    out.unit("cam.clip_es.box_threshold", ce.box_threshold)
    if ce.bg_power is not None:
        out.need(ce.bg_power > 0, "cam.clip_es.bg_power", ce.bg_power, "must be > 0 or null")
    out.need("{}" in ce.template, "cam.clip_es.template", ce.template, "must contain {} (the class name)")
    out.need(len(ce.background) > 0, "cam.clip_es.background", list(ce.background), "must name a background word")


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
