"""What `evaluate` says when it was the requested stage: the per-class table and one line per metrics block
in the log, and metrics.json, summary.md and the figures copied into the run directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from wsss.artifacts import read_json
from wsss.stages.base import Artifact
from wsss.stages.figures import METRIC_NAMES

log = logging.getLogger(__name__)

REPORT_FILES = (
    "metrics.json",
    "per_image.npz",
    "summary.md",
    "threshold_curve.png",
    "class_iou.png",
    "overlays.png",
    "faithfulness_per_image.json",
)


def report(artifact: Artifact, run_dir: Path | None) -> None:
    """Log the per-class table and copy metrics.json and the figures into the run directory."""
    out_dir = artifact.dir
    result = read_json(out_dir / "metrics.json")
    if result["miou"] is None:
        _copy_reports(out_dir, run_dir)
        overlays = f"; overlays in {out_dir / 'overlays'}" if result.get("overlays") else ""
        log.info(
            "evaluate: nothing to score: none of the %d images of split %r has a ground-truth mask; the pseudo "
            "masks are in %s%s",
            result["no_ground_truth"],
            result["split"],
            result["masks_dir"],
            overlays,
        )
        return
    lines = _class_table(result)
    if result["threshold_chosen_on"]:
        how = f"threshold {result['reported_threshold']} chosen on {result['threshold_chosen_on']}"
    elif result["masks_rule"]:
        how = ", ".join(f"{k} {v}" for k, v in result["masks_rule"].items() if v is not None)
    else:
        how = f"masks from {result['masks_dir']}"
    log.info(
        "evaluate: %s split %r, %d images, %s\n%s",
        result["dataset"]["dataset"],
        result["split"],
        result["num_images"],
        how,
        "\n".join(lines),
    )
    _log_blocks(result)
    if (out_dir / "overlays").is_dir():
        log.info(
            "evaluate: overlays of %d images in %s",
            len(list((out_dir / "overlays").rglob("*.jpg"))),
            out_dir / "overlays",
        )
    _copy_reports(out_dir, run_dir)
    if run_dir is not None:
        log.info("evaluate: wrote %s", Path(run_dir) / "metrics.json")


def _copy_reports(out_dir: Path, run_dir: Path | None) -> None:
    """metrics.json, summary.md and the figures into the run directory; a report file this evaluate did not
    write (an earlier run's in the same directory) is removed, so that nothing stale sits beside metrics.json."""
    if run_dir is not None:
        for name in REPORT_FILES:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, Path(run_dir) / name)
            else:
                (Path(run_dir) / name).unlink(missing_ok=True)


def _class_table(result: dict[str, Any]) -> list[str]:
    """The per-class IoU / precision / recall / FP / FN table of the log."""
    names = ["background", *result["class_names"]]
    s = result["scores"]
    lines = [f"{'class':<16} {'IoU':>7} {'prec':>7} {'recall':>7} {'FP':>7} {'FN':>7}"]
    for n in names:
        vals = [s[k][n] for k in ("iou", "precision", "recall", "fp_ratio", "fn_ratio")]
        lines.append(f"{n:<16} " + " ".join(f"{v:7.2f}" if v is not None else f"{'-':>7}" for v in vals))
    lines.append(f"{'mIoU':<16} {result['miou']:7.2f}")
    return lines


def _log_blocks(result: dict[str, Any]) -> None:
    """One log line per block of metrics.json beyond the masks' scores: sweep, boxes, intervals, faithfulness."""
    if "sweep" in result:
        sw = result["sweep"]
        log.info(
            "evaluate: sweep best mIoU %.2f at threshold %.2f (chosen on %s's own labels); PxAP %.2f",
            sw["best"]["miou"],
            sw["best_threshold"],
            sw["best_chosen_on"],
            result["pxap"]["pxap"],
        )
    if result.get("boxes"):
        b = result["boxes"]
        log.info(
            "evaluate: MaxBoxAcc %.2f at threshold %s, MaxBoxAccV2 %.2f, over %d (image, class) pairs",
            b["maxboxacc"],
            b["maxboxacc_threshold"],
            b["maxboxacc_v2"],
            b["pairs"],
        )
    if result.get("intervals"):
        iv = result["intervals"]
        log.info(
            "evaluate: 95 %% intervals over images (%d resamples): %s",
            iv["resamples"],
            ", ".join(f"{METRIC_NAMES[k]} [{iv[k][0]:.2f}, {iv[k][1]:.2f}]" for k in METRIC_NAMES if k in iv),
        )
    if result.get("no_ground_truth"):
        log.info("evaluate: %d images without a ground-truth mask were not scored", result["no_ground_truth"])
    if result.get("faithfulness"):
        fa = result["faithfulness"]
        shown = [(k, v) for k, v in fa.items() if isinstance(v, dict) and "mean" in v]
        log.info(
            "evaluate: faithfulness over %d (image, class) pairs: %s",
            fa["pairs"],
            ", ".join(f"{k} {v['mean']} ({v['better']} is better)" for k, v in shown),
        )
