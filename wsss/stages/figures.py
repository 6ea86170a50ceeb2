"""What `evaluate` writes beside metrics.json: the plots, summary.md, overlays.png and overlays/<id>.jpg.

`evaluate.overlays=N` draws the N best and worst images by mIoU in `overlays.png` (the first N of the split when
there is no ground truth) and writes each of them as `overlays/<id>.jpg`: the image, the CAM heat map of each of
its classes, the mask (the seed and the refined mask when refined) and the ground truth where there is one.
`evaluate.overlays=all` writes every image to `overlays/` and keeps the grid at `GRID_ALL` images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.artifacts import atomic_open, read_cams, read_mask
from wsss.dist import progress
from wsss.pseudo import threshold_mask

GRID_ALL = 6  # images in overlays.png with evaluate.overlays=all
JPEG_QUALITY = 90


def overlay_picks(
    overlays: Any, ids: list[str], per_image_miou: dict[str, float] | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """(id, row title) of the grid's images, and the ids written to overlays/: the best and worst by mIoU when
    there are scores, else the split's first images."""
    every = overlays == "all"
    n = GRID_ALL if every else int(overlays)
    if per_image_miou:
        ranked = sorted(per_image_miou.items(), key=lambda kv: kv[1])
        chosen = ranked[-((n + 1) // 2) :][::-1] + ranked[: n // 2] if n > 0 else []
        grid = [(i, f"{i} mIoU {m:.1f}") for i, m in chosen]
    else:
        grid = [(i, i) for i in ids[:n]]
    return grid, list(ids) if every else [i for i, _ in grid]


def write_overlays(
    out_dir: Path,
    overlays: Any,
    source,
    masks_dir: Path,
    maps_dir: Path | None,
    seeds: tuple[Path, float, str] | None = None,
    per_image_miou: dict[str, float] | None = None,
) -> int:
    """overlays.png and overlays/<id>.jpg (see the module docstring); returns how many images overlays/ got.

    Args:
        seeds: (the seeds' CAM folder, their threshold, the refinement's name) when the masks are refined.
        per_image_miou: Each scored image's mIoU; None without ground truth (no ground-truth panel then).
    """
    from wsss import viz

    grid, folder = overlay_picks(overlays, source.ids, per_image_miou)
    titles, in_folder = dict(grid), set(folder)
    rows = {}
    with_gt = per_image_miou is not None
    for image_id in progress(list(dict.fromkeys([*(i for i, _ in grid), *folder])), desc="overlays", unit="img"):
        image = source.load_image(image_id).permute(1, 2, 0).numpy()
        pred = read_mask(masks_dir / f"{image_id}.png")
        heats = []
        if maps_dir is not None:
            stored = read_cams(maps_dir / f"{image_id}.npz")
            heats = [
                (source.class_names[int(c)], m.astype(np.float32))
                for c, m in zip(stored["keys"], stored["maps"], strict=True)
            ]
        panels = [("pseudo mask", pred)]
        if seeds is not None:  # the seed and the refined mask of the same image
            seed = read_cams(seeds[0] / f"{image_id}.npz")
            seed_mask = threshold_mask(torch.from_numpy(seed["maps"]), torch.from_numpy(seed["keys"]), seeds[1])
            panels = [("seed", seed_mask.numpy()), (f"refined ({seeds[2]})", pred)]
        if with_gt:
            panels.append(("ground truth", source.load_mask(image_id)))
        if image_id in titles:
            heat = np.max([h for _, h in heats], 0) if heats else np.zeros(pred.shape, np.float32)
            rows[image_id] = (titles[image_id], image, heat, panels)
        if image_id in in_folder:
            strip = viz.overlay_strip(image, heats, panels)
            with atomic_open(out_dir / "overlays" / f"{image_id}.jpg") as f:
                f.write(viz.encode_jpeg(strip, JPEG_QUALITY))
    if rows:
        viz.overlay_grid([rows[i] for i, _ in grid], out_dir / "overlays.png")
    return len(folder)


def write_figures(
    cfg, out_dir: Path, result: dict, source, maps_dir: Path | None, masks_dir: Path, seeds_dir: Path | None = None
) -> None:
    """Plots (unless `evaluate.figures=false`), overlays (`evaluate.overlays`) and the Markdown summary beside a
    scored metrics.json."""
    from wsss import viz

    names = ["background", *source.class_names]
    if cfg.evaluate.figures:
        iou = [result["iou"][n] if result["iou"][n] is not None else float("nan") for n in names]
        viz.plot_class_iou(names, iou, out_dir / "class_iou.png")
        if "sweep" in result:
            sw = result["sweep"]
            curves = {"mIoU": sw["miou"], "precision": sw["mprecision"], "recall": sw["mrecall"]}
            viz.plot_threshold_curve(sw["thresholds"], curves, sw["best_threshold"], out_dir / "threshold_curve.png")
    seeds = (seeds_dir, result["masks_rule"]["threshold"], result["refine"]) if seeds_dir is not None else None
    write_overlays(out_dir, cfg.evaluate.overlays, source, masks_dir, maps_dir, seeds, result["per_image_miou"])
    with atomic_open(out_dir / "summary.md", "w") as f:
        f.write(headline_table(result) + "\n\n")
        if "seeds" in result:
            f.write(side_by_side_table(result) + "\n\n")
        f.write(viz.markdown_table(names, result["scores"]) + "\n")


def headline_values(result: dict) -> dict[str, tuple[float | None, str]]:
    """The headline metrics of a metrics.json with where each was taken: name -> (value, at)."""
    out: dict[str, tuple[float | None, str]] = {}
    at = f"t = {result['reported_threshold']}" if result.get("reported_threshold") is not None else "masks"
    if result.get("threshold_chosen_on"):
        at += f", chosen on {result['threshold_chosen_on']}"
    out["miou"] = (result["miou"], at)
    if "sweep" in result:
        sw = result["sweep"]
        out["sweep_best_miou"] = (sw["best"]["miou"], f"best t = {sw['best_threshold']} (oracle)")
        out["pxap"] = (result["pxap"]["pxap"], "")
    if result.get("boxes"):
        b = result["boxes"]
        out["maxboxacc"] = (b["maxboxacc"], f"best t = {b['maxboxacc_threshold']} (oracle)")
        ts = ", ".join(str(v[1]) for v in b["v2_per_delta"].values())
        out["maxboxacc_v2"] = (b["maxboxacc_v2"], f"best t per IoU 0.3/0.5/0.7 = {ts}")
    return out


METRIC_NAMES = {
    "miou": "mIoU",
    "sweep_best_miou": "best mIoU",
    "pxap": "PxAP",
    "maxboxacc": "MaxBoxAcc",
    "maxboxacc_v2": "MaxBoxAccV2",
}


def headline_table(result: dict) -> str:
    """The headline metrics with their 95 % bootstrap intervals over images."""
    iv = result.get("intervals") or {}
    head = f"95 % CI ({iv['resamples']} resamples of the images)" if iv else "95 % CI (bootstrap off)"
    lines = [f"| {result['split']} | value | {head} | at |", "|---|---|---|---|"]
    for k, (v, at) in headline_values(result).items():
        ci = f"[{iv[k][0]:.2f}, {iv[k][1]:.2f}]" if k in iv else "-"
        lines.append(f"| {METRIC_NAMES[k]} | {v:.2f} | {ci} | {at} |")
    if result.get("boxes"):
        b = result["boxes"]
        lines.append(f"\nBox metrics over {b['pairs']} (image, class) pairs ({b['pairs_without_box']} without a box).")
    return "\n".join(lines)


def side_by_side_table(result: dict) -> str:
    """Seeds and refined masks on one split: mIoU at the rule, the sweep's best, PxAP."""
    lines = [
        f"| {result['split']} | mIoU | sweep best (t) | PxAP |",
        "|---|---|---|---|",
    ]
    for block in (result["seeds"], result["masks"]):
        best = f"{block['sweep_best_miou']:.2f} ({block['sweep_best_threshold']})"
        lines.append(f"| {block['name']} | {block['miou']:.2f} | {best} | {block['pxap']:.2f} |")
    return "\n".join(lines)
