"""Stage `refine`: CAMs -> refined maps by `pseudo.refine` (crf, par, superpixel, rw, irn); see `wsss.refine`.

Writes `maps/<id>.npz` in the CAM format (the CRF and the random walk add a `background` map), so
`pseudo_masks` and the threshold sweep of `evaluate` read refined maps as they read CAMs. CRF and superpixels run
on the CPU in a process pool (`refine.workers`); PAR runs batched on the device; the random walk runs batched
on the device with the `affinity` stage's network, at the 1/4 resolution of the stored strided maps, with
PSA's background map beside the classes, then upsamples bilinearly; IRN's walk (`irn`) runs batched with the
`irn` stage's boundary network and writes IRN's constant background. Per image, resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from wsss import dist
from wsss.artifacts import read_cams, strided_maps, write_cams
from wsss.data import SegmentationSource, dataset_identity
from wsss.data.transforms import normalize
from wsss.dist import progress
from wsss.parallel import WORKER, pool_map
from wsss.refine import clip_es_crf, dense_crf, par_refine, random_walk, superpixel_vote
from wsss.refine.random_walk import background_alpha, background_map
from wsss.refine.superpixel import segments
from wsss.stages.base import Need, Stage, StageContext, check_classes, plain

log = logging.getLogger(__name__)


def _cpu_one(image_id: str) -> str:
    """Refine one image on the CPU (crf, clip_es_crf or superpixel) and write its npz; runs in a pool worker."""
    w = WORKER
    cams = read_cams(w["maps_dir"] / f"{image_id}.npz")
    image = w["source"].load_image(image_id).permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    rc, background = w["rc"], None
    if len(cams["keys"]) == 0:
        maps = cams["maps"]
    elif w["method"] == "crf":
        maps, background = dense_crf(
            image,
            cams["maps"],
            w["threshold"],
            iterations=rc.crf_iterations,
            bilateral_sxy=crf_sxy(rc.crf_bilateral_sxy, image.shape[:2]),
            bilateral_srgb=rc.crf_bilateral_srgb,
        )
    elif w["method"] == "clip_es_crf":
        maps, background = clip_es_crf(image, cams["maps"])
    else:
        labels = segments(
            image, rc.superpixel_method, rc.superpixel_segments, rc.superpixel_compactness, rc.superpixel_scale
        )
        maps = superpixel_vote(cams["maps"], labels)
    strided = strided_maps(maps)
    store = "float32" if w["method"] == "clip_es_crf" else "float16"  # its labels: the argmax of these marginals
    write_cams(w["out"] / f"{image_id}.npz", cams["keys"], maps, strided, store, background=background)
    return image_id


def crf_sxy(sxy_at_500: float, size: tuple[int, int]) -> float:
    """The bilateral kernel's spatial width for an image: PSA's value holds for VOC's 500-px images and
    scales with the longer side (80 px at 500 px is the whole of a 128-px image; measured in BENCHMARKS.md)."""
    return float(sxy_at_500) * max(size) / 500.0


def _run_cpu(ctx: StageContext, source: SegmentationSource, maps_dir: Path, todo: list[str]) -> None:
    """crf / superpixel over `todo` in a pool of `refine.workers` processes.

    The pool starts from a fork server, not from this process: a child forked from a process whose OpenMP
    threads ran (training, CAMs) can hang in its first parallel torch op.
    """
    state = {
        "source": source,
        "maps_dir": maps_dir,
        "out": ctx.out_dir / "maps",
        "method": str(ctx.cfg.pseudo.refine),
        "threshold": ctx.cfg.pseudo.threshold,
        "rc": SimpleNamespace(**plain(ctx.cfg.refine)),
    }
    pool_map(_cpu_one, todo, state, ctx.cfg.refine.workers, f"refine {ctx.cfg.pseudo.refine}")


def _run_par(ctx: StageContext, source: SegmentationSource, maps_dir: Path, todo: list[str]) -> None:
    """PAR over `todo`, images of one size batched on the device."""
    rc = ctx.cfg.refine
    bar = progress(total=len(todo), desc="refine par", unit="img")
    for chunk in _size_batches(source, todo, rc.batch_size):
        cams = [read_cams(maps_dir / f"{j}.npz") for j in chunk]
        maps = _stack_maps([c["maps"] for c in cams], 1)
        images = torch.stack([source.load_image(j) for j in chunk]).float()  # (B, 3, H, W) RGB
        refined = par_refine(
            images.to(ctx.device),
            maps.to(ctx.device),
            dilations=tuple(rc.par_dilations),
            iterations=rc.par_iterations,
        ).cpu()
        for row, (image_id, c) in enumerate(zip(chunk, cams, strict=True)):
            out = refined[row, : len(c["keys"])]
            write_cams(ctx.out_dir / "maps" / f"{image_id}.npz", c["keys"], out, strided_maps(out))
        bar.update(len(chunk))
    bar.close()


def _size_batches(source: SegmentationSource, todo: list[str], batch_size: int) -> Iterator[list[str]]:
    """`todo` in batches of at most `batch_size` images of one size (so they stack)."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for image_id in todo:
        by_size.setdefault(source.image_size(image_id), []).append(image_id)
    for ids in by_size.values():
        for i in range(0, len(ids), batch_size):
            yield ids[i : i + batch_size]


def _stack_maps(maps: list[np.ndarray], at_least: int = 0) -> torch.Tensor:
    """(K_i, h, w) maps of one size -> (B, max(K_i, at_least), h, w) float32, zero-padded past each K_i."""
    k = max(at_least, *(len(m) for m in maps))
    out = torch.zeros(len(maps), k, *maps[0].shape[1:])
    for row, m in enumerate(maps):
        out[row, : len(m)] = torch.from_numpy(m)
    return out


def _run_rw(ctx: StageContext, source: SegmentationSource, maps_dir: Path, todo: list[str]) -> None:
    """The random walk over `todo` with the affinity network: images of one size batched on the device, the
    background walking beside the classes (PSA); the maps and the background are written divided by the
    image's largest class score (IRN's one normalisation for all classes, so their argmax is unchanged)."""
    from wsss.models.affinity import load_affinity

    rc = ctx.cfg.refine
    alpha = rw_alpha(ctx.cfg)
    net = load_affinity(ctx.inputs["affinity"].path("checkpoint"), ctx.device)
    bar = progress(total=len(todo), desc="refine rw", unit="img")
    for chunk in _size_batches(source, todo, rc.batch_size):
        cams = [read_cams(maps_dir / f"{j}.npz") for j in chunk]
        low = _stack_maps([c["strided"] for c in cams]).to(ctx.device)  # (B, K, h/4, w/4); padding 0
        low = torch.cat([background_map(low, alpha)[:, None], low], 1)  # zero padding leaves the max as it is
        images = torch.stack([normalize(source.load_image(j)) for j in chunk]).to(ctx.device)
        with torch.no_grad():
            features = net(images)  # (B, D, h/4, w/4)
        walked = random_walk(low, features, radius=rc.rw_radius, beta=rc.rw_beta, steps=rc.rw_steps)
        up = F.interpolate(walked, size=cams[0]["maps"].shape[1:], mode="bilinear", align_corners=False)
        for row, (image_id, c) in enumerate(zip(chunk, cams, strict=True)):
            n = len(c["keys"])
            if n == 0:  # no class: the CAMs as they are (all background)
                write_cams(ctx.out_dir / "maps" / f"{image_id}.npz", c["keys"], c["maps"], c["strided"])
                continue
            full, small = up[row, : 1 + n], walked[row, : 1 + n]
            full, small = (full / _peak(full[1:])).cpu(), (small / _peak(small[1:])).cpu()
            write_cams(ctx.out_dir / "maps" / f"{image_id}.npz", c["keys"], full[1:], small[1:], background=full[0])
        bar.update(len(chunk))
    bar.close()


def _run_irn(ctx: StageContext, source: SegmentationSource, maps_dir: Path, todo: list[str]) -> None:
    """IRN's random walk over `todo` (`make_sem_seg_labels.py`): boundaries of each image and its flip
    from the irn stage's network (zero-padded to `refine.irn_pad`, as IRN's `EdgeDisplacement`), the strided
    maps times (1 - boundary) walked on path affinities, upsampled x4 (by factor, cropped), divided by the
    image's largest value; the background is the constant `refine.irn_bg_threshold`. Images of one size are
    batched on the device."""
    from wsss.models.irn import load_irn
    from wsss.refine.irn import boundary_walk

    rc = ctx.cfg.refine
    store = "float32" if ctx.cfg.cam.store == "float32" else "float16"
    net = load_irn(ctx.inputs["irn"].path("checkpoint"), ctx.device)
    bar = progress(total=len(todo), desc="refine irn", unit="img")
    for chunk in _size_batches(source, todo, rc.batch_size):
        cams = [read_cams(maps_dir / f"{j}.npz") for j in chunk]
        low = _stack_maps([c["strided"] for c in cams], 1).to(ctx.device)  # (B, K, h/4, w/4); padding 0
        images = torch.stack([normalize(source.load_image(j)) for j in chunk]).to(ctx.device)
        with torch.no_grad():
            boundary = net.boundary(images, rc.irn_pad)  # (B, h/4, w/4)
        walked = boundary_walk(low, boundary, radius=rc.irn_radius, beta=rc.irn_beta, steps=rc.irn_steps)
        h, w = images.shape[-2:]
        up = F.interpolate(walked, scale_factor=4.0, mode="bilinear", align_corners=False)[..., :h, :w]
        for row, (image_id, c) in enumerate(zip(chunk, cams, strict=True)):
            n = len(c["keys"])
            out = ctx.out_dir / "maps" / f"{image_id}.npz"
            if n == 0:  # no class: the CAMs as they are (all background)
                write_cams(out, c["keys"], c["maps"], c["strided"], store)
                continue
            peak = up[row, :n].amax().clamp(min=1e-12)  # IRN: rw_up / torch.max(rw_up)
            full, small = (up[row, :n] / peak).cpu(), (walked[row, :n] / peak).cpu()
            background = torch.full(full.shape[1:], float(rc.irn_bg_threshold))
            write_cams(out, c["keys"], full, small, store, background=background)
        bar.update(len(chunk))
    bar.close()


def _peak(maps: torch.Tensor) -> torch.Tensor:
    """The largest class score of an image, at least 1e-4: one factor for background and classes keeps their
    argmax, and the background (at most 1 before) stays within float16 where the classes barely respond."""
    return maps.amax().clamp(min=1e-4)


def rw_alpha(cfg: DictConfig) -> float:
    """`refine.rw_alpha`, or when null the one for which the unwalked maps give the seeds at `pseudo.threshold`."""
    alpha = cfg.refine.rw_alpha
    return background_alpha(cfg.pseudo.threshold) if alpha is None else float(alpha)


def run(ctx: StageContext) -> dict[str, Any]:
    """Refine every image's CAMs; images already written (a killed run) are kept."""
    cams = ctx.inputs["cams"]
    source = ctx.source()
    check_classes(cams, source.class_names)
    maps_dir = cams.path("maps_dir")
    method = str(ctx.cfg.pseudo.refine)
    todo = [i for i in dist.shard(cams.manifest["ids"]) if not (ctx.out_dir / "maps" / f"{i}.npz").is_file()]
    log.info("refine: %s, %d of %d images to do", method, len(todo), len(cams.manifest["ids"]))
    cpu = dict.fromkeys(("crf", "clip_es_crf", "superpixel"), _run_cpu)
    runners = {**cpu, "par": _run_par, "rw": _run_rw, "irn": _run_irn}
    runners[method](ctx, source, maps_dir, todo)
    return {
        "class_names": cams.manifest["class_names"],
        "dataset": cams.manifest["dataset"],
        "maps_dir": "maps",
        "ids": list(cams.manifest["ids"]),
        "model": cams.manifest.get("model"),
        "method": method,
        "counts": {"images": len(cams.manifest["ids"]), "computed": dist.sum_int(len(todo))},
    }


_METHOD_KEYS = {
    "crf": ("crf_iterations", "crf_bilateral_sxy", "crf_bilateral_srgb"),
    "clip_es_crf": (),  # CLIP-ES's fixed settings
    "par": ("par_dilations", "par_iterations"),
    "superpixel": ("superpixel_method", "superpixel_segments", "superpixel_compactness", "superpixel_scale"),
    "rw": ("rw_radius", "rw_beta", "rw_steps"),
    "irn": ("irn_radius", "irn_beta", "irn_steps", "irn_bg_threshold", "irn_pad"),
}


def _params(cfg: DictConfig, split: str) -> dict[str, Any]:
    method = str(cfg.pseudo.refine)
    rc = plain(cfg.refine)
    params = {"dataset": dataset_identity(cfg.dataset, split), "method": method}
    params.update({k: rc[k] for k in _METHOD_KEYS[method]})
    if method == "crf":
        params["threshold"] = cfg.pseudo.threshold  # the CRF's background unary
    if method == "rw":
        params["rw_alpha"] = rw_alpha(cfg)  # the background map's exponent (from the threshold when null)
    if method == "irn":
        params["store"] = "float32" if cfg.cam.store == "float32" else "float16"
    return params


def _needs(cfg: DictConfig, split: str) -> dict[str, Need]:
    needs = {"cams": Need("cams")}
    if str(cfg.pseudo.refine) == "rw":
        needs["affinity"] = Need("affinity", str(cfg.dataset.train_split))
    if str(cfg.pseudo.refine) == "irn":
        needs["irn"] = Need("irn", str(cfg.dataset.train_split))
    return needs


STAGE = Stage(
    name="refine",
    run=run,
    config=("dataset", "pseudo", "refine", "cam"),
    params=_params,
    needs=_needs,
    files=lambda cfg, split, fp: fp.dataset(split),  # reads the images (crf, par, superpixel, rw)
)
