"""One leaderboard over runs: `python -m wsss.report DIR [DIR ...] [--reference cam=cam] [--out DIR]`.

Each DIR is a run directory (it holds the `metrics.json` and `per_image.npz` that `evaluate` copies there) or a
folder of them, such as a Hydra multirun directory. One row per run, named by the overrides that differ
between the runs (Hydra's `.hydra/overrides.yaml`); columns mIoU at the reported threshold, the sweep's best
mIoU and its threshold, PxAP, MaxBoxAcc, MaxBoxAccV2 and the CAM cost, each metric with its 95 % bootstrap
interval over images.

Runs made with `faithfulness.enabled=true` add the faithfulness metrics (Average Drop / Increase, Deletion /
Insertion, ROAD: the mean over (image, class) pairs, resampled over images as a ratio of sums), read from the
`faithfulness_per_image.json` evaluate copies beside metrics.json.

Rows of the same trained model (same train key) scored on the same images are compared paired: the same
resamples of the images give each row's difference from its reference row (`--reference KEY=VALUE`: the
rows with that override; by default the first row's values of every varying key but `seed`), and a
difference whose interval excludes 0 is marked. A run of imported maps (`cam.source`, no wsss model) pairs
with the first reference row. Images that some run lacks (skipped at import) leave every row, named in the
outputs (`left_out`). Rows that differ only by `seed` fold into mean +- std over
seeds, of the values and of each seed's paired difference on its own model. Runs of different datasets or
splits are refused.

The same report is written at the end of every `-m` sweep by `LeaderboardCallback` (conf/config.yaml
registers it under `hydra.callbacks`). Outputs (`leaderboard.md`, `.csv`, `.json`, `.png`) are written
atomically and depend only on the runs read, so rerunning the command rewrites them byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from wsss.leaderboard import FAITHFULNESS, write
from wsss.metrics.bootstrap import (
    BOOTSTRAP_METRICS,
    interval,
    resample_weights,
    resampled_metrics,
)
from wsss.rundir import sweep_summary
from wsss.runs import ReportError, Run, load_run, run_dirs

log = logging.getLogger(__name__)


def _name_runs(runs: list[Run]) -> list[str]:
    """Name each run by the overrides that vary across runs (all of them for a single run); returns those keys."""
    keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    shown = varying if len(runs) > 1 else keys
    for r in runs:
        parts = [f"{k}={r.overrides[k]}" for k in shown if k in r.overrides]
        r.name = " ".join(parts) or r.dir.name
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same overrides (e.g. two folders of one run) keep their folder apart
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.dir.name})"
    return varying


def _check_comparable(runs: list[Run]) -> None:
    """Refuse runs of different datasets or splits, naming them."""
    first = runs[0]
    for r in runs[1:]:
        if r.data != first.data:
            a, b = first.metrics["dataset"], r.metrics["dataset"]
            raise ReportError(
                f"runs of different datasets or splits: {first.dir} ({a.get('dataset')}/{a.get('split')}) and "
                f"{r.dir} ({b.get('dataset')}/{b.get('split')}); report them separately"
            )


def _reference_rows(runs: list[Run], reference: str | None, varying: list[str]) -> list[Run]:
    """The rows that serve as reference (one per model), from `--reference KEY=VALUE` or the first row."""
    if reference is None:
        first = runs[0]
        keys = [k for k in varying if k != "seed"]
        return [r for r in runs if all(r.overrides.get(k) == first.overrides.get(k) for k in keys)]
    key, sep, value = reference.partition("=")
    if not sep:
        raise ReportError(f"--reference {reference!r}: expected KEY=VALUE, e.g. cam=cam")
    rows = [r for r in runs if r.overrides.get(key) == value]
    if not rows:
        have = sorted({f"{k}={v}" for r in runs for k, v in r.overrides.items() if k in varying})
        raise ReportError(f"--reference {reference}: no run has that override (the runs vary in: {have})")
    return rows


def _point(r: Run) -> dict[str, float | None]:
    """The run's reported values of each leaderboard metric (None where it has none)."""
    m = r.metrics
    boxes = m.get("boxes") or {}
    return {
        "miou": m.get("miou"),
        "sweep_best_miou": (m.get("sweep") or {}).get("best", {}).get("miou"),
        "pxap": (m.get("pxap") or {}).get("pxap"),
        "maxboxacc": boxes.get("maxboxacc"),
        "maxboxacc_v2": boxes.get("maxboxacc_v2"),
    }


def _faithfulness(r: Run, ref: Run | None, resamples: int, seed: int, level: float) -> dict[str, dict[str, Any]]:
    """The run's faithfulness means with intervals over images, and its paired differences from `ref` (same
    resamples of the same images; only where both scored the same (image, class) pairs). Without the per-image
    file (runs from before it), the block's means and the stage's own intervals, unpaired."""
    block = r.metrics.get("faithfulness") or {}
    present = [k for k in FAITHFULNESS if isinstance(block.get(k), dict) and block[k].get("mean") is not None]
    f = r.faith
    if f is None or not f.pairs.sum():
        return {k: {"value": block[k]["mean"], "ci": block[k].get("interval")} for k in present}
    weights = resample_weights(len(f.ids), resamples, seed)
    paired = ref is not None and ref is not r and ref.faith is not None and f.pairs_like(ref.faith)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in present:
            res = (weights @ f.sums[k]) / (weights @ f.pairs)
            entry: dict[str, Any] = {"value": block[k]["mean"], "ci": [round(x, 4) for x in interval(res, level)]}
            if paired and k in ref.faith.sums:
                ref_res = (weights @ ref.faith.sums[k]) / (weights @ f.pairs)
                lo, hi = interval(res - ref_res, level)
                entry["diff"] = round((f.sums[k].sum() - ref.faith.sums[k].sum()) / f.pairs.sum(), 4)
                entry["diff_ci"] = [round(lo, 4), round(hi, 4)]
                entry["diff_excludes_0"] = bool(lo > 0 or hi < 0)
            out[k] = entry
    return out


def _common_ids(runs: list[Run]) -> tuple[list[str], dict[str, list[str]]]:
    """The images every run scored (in the first run's order), and per run the images it alone scored: a run
    of imported maps may lack some (skipped at import), and those images leave every row, named."""
    shared = set.intersection(*(set(r.stats.ids) for r in runs))
    ids = [i for i in runs[0].stats.ids if i in shared]
    if not ids:
        raise ReportError(f"{runs[0].dir} and the other runs share no scored image; report them separately")
    left_out = {r.name: [i for i in r.stats.ids if i not in shared] for r in runs if len(r.stats.ids) > len(ids)}
    for name, missing in left_out.items():
        log.warning("report: %s: %d images not scored by every run, left out: %s", name, len(missing), missing[:10])
    return ids, left_out


def _reference_of(r: Run, refs: list[Run]) -> Run | None:
    """The row `r` is paired with: the reference of its own model; a run of imported maps (no wsss model)
    pairs with the first reference row, on the same images."""
    same = next((x for x in refs if x.model_key == r.model_key), None)
    if same is not None or not _imported(r):
        return same
    return refs[0] if refs else None


def _imported(r: Run) -> bool:
    """Maps no wsss-trained model made: imported ones, or CLIP-ES's from a frozen CLIP."""
    model = r.metrics.get("model") or {}
    return "imported" in (r.metrics.get("cam") or {}) or "imported" in model or "clip_es" in model


def _miou_at(r: Run) -> int | None:
    """The sweep index of a threshold chosen on another split, as evaluate bootstraps it."""
    m = r.metrics
    if m.get("threshold_chosen_on"):
        return list(r.stats.thresholds).index(m["reported_threshold"])
    return None


def _values(runs: list[Run], ids: list[str], weights: np.ndarray, resamples: int, seed: int) -> tuple[dict, dict]:
    """Each run's resampled metric values and its point values, on the images `ids` every run shares (a run
    that scored more gets weight 0 on the others, and its point values recomputed on the shared ones)."""
    values, points = {}, {}
    for r in runs:
        miou_at = _miou_at(r)
        if r.stats.ids == ids:
            cached = r.stats.cached_resampled(resamples, seed, miou_at)  # evaluate's, with these resamples
            values[r.dir] = cached if cached is not None else resampled_metrics(r.stats, weights, miou_at)
            points[r.dir] = _point(r)
            continue
        pos = {i: n for n, i in enumerate(r.stats.ids)}
        cols = np.array([pos[i] for i in ids])
        wide = np.zeros((len(weights), r.stats.num_images))
        wide[:, cols] = weights
        values[r.dir] = resampled_metrics(r.stats, wide, miou_at)
        ones = np.zeros((1, r.stats.num_images))
        ones[0, cols] = 1.0
        full = resampled_metrics(r.stats, ones, miou_at)
        points[r.dir] = {k: (float(full[k][0]) if k in full else None) for k in _point(r)}
    return values, points


def build(
    paths: list[Path],
    reference: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    base: Path | None = None,
) -> dict[str, Any]:
    """The leaderboard of the runs under `paths` as a JSON-ready dict (see the module docstring); run
    directories are recorded relative to `base` (the output folder), so the same runs give the same bytes
    however the folders were named on the command line."""
    if resamples < 1:
        raise ReportError(f"--resamples {resamples}: must be >= 1")
    runs = [load_run(d) for d in run_dirs(paths)]
    _check_comparable(runs)
    varying = _name_runs(runs)
    refs = _reference_rows(runs, reference, varying)
    ids, left_out = _common_ids(runs)
    weights = resample_weights(len(ids), resamples, seed)
    values, points = _values(runs, ids, weights, resamples, seed)
    rows = []
    for r in runs:
        point, res = points[r.dir], values[r.dir]
        ref = _reference_of(r, refs)
        row: dict[str, Any] = {
            "name": r.name,
            "dir": os.path.relpath(r.dir.resolve(), (base or Path.cwd()).resolve()),
            "overrides": r.overrides,
            "model_key": r.model_key,
            "best_threshold": (r.metrics.get("sweep") or {}).get("best_threshold"),
            "cam_cost": (r.metrics.get("cam") or {}).get("cost"),
            "metrics": {},
            "faithfulness": _faithfulness(r, ref, resamples, seed, level),
            "reference": None if ref is None else ref.name,
        }
        for k in BOOTSTRAP_METRICS:
            if point[k] is None or k not in res:
                continue
            entry: dict[str, Any] = {"value": round(point[k], 4), "ci": [round(x, 4) for x in interval(res[k], level)]}
            if ref is not None and k in values[ref.dir] and points[ref.dir][k] is not None:
                diff = res[k] - values[ref.dir][k]
                lo, hi = interval(diff, level)
                entry["diff"] = round(point[k] - points[ref.dir][k], 4)
                entry["diff_ci"] = [round(lo, 4), round(hi, 4)]
                entry["diff_excludes_0"] = bool(lo > 0 or hi < 0)
            row["metrics"][k] = entry
        rows.append(row)
    return {
        "dataset": runs[0].metrics["dataset"].get("dataset"),
        "split": runs[0].metrics["dataset"].get("split"),
        "num_images": len(ids),
        "left_out": left_out,
        "resamples": resamples,
        "seed": seed,
        "level": level,
        "varying": varying,
        "rows": rows,
        "seed_folds": _seed_folds(runs, rows, varying),
    }


def _seed_folds(runs: list[Run], rows: list[dict], varying: list[str]) -> list[dict[str, Any]]:
    """Runs that differ only by `seed`: mean +- sample std of each metric over their seeds."""
    if "seed" not in varying:
        return []
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(tuple((k, r.overrides.get(k)) for k in varying if k != "seed"), []).append(i)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        fold: dict[str, Any] = {
            "name": " ".join(f"{k}={v}" for k, v in key if v is not None) or "all runs",
            "seeds": [runs[i].overrides.get("seed") for i in members],
            "metrics": {},
        }
        references = all(rows[i]["reference"] == rows[i]["name"] for i in members)  # no difference to fold
        for k in BOOTSTRAP_METRICS:
            entries = [rows[i]["metrics"].get(k) for i in members]
            if all(entries):
                fold["metrics"][k] = _fold(entries, not references)
        faith = {}
        for k in FAITHFULNESS:
            entries = [rows[i]["faithfulness"].get(k) for i in members]
            if all(entries):
                faith[k] = _fold(entries, not references)
        if faith:
            fold["faithfulness"] = faith
        out.append(fold)
    return out


def _fold(entries: list[dict[str, Any]], diffs: bool = True) -> dict[str, Any]:
    """Mean +- sample std over seeds of the values and, where every seed has one (its own model's paired
    difference from its reference row), of the differences, with how many seeds' intervals excluded 0."""
    vals = [e["value"] for e in entries]
    out: dict[str, Any] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals, ddof=1)), 4)}
    if diffs and all("diff" in e for e in entries):
        d = [e["diff"] for e in entries]
        out["diff_mean"] = round(float(np.mean(d)), 4)
        out["diff_std"] = round(float(np.std(d, ddof=1)), 4)
        out["diff_seeds_excluding_0"] = sum(bool(e["diff_excludes_0"]) for e in entries)
    return out


# -- writers ---------------------------------------------------------------------------------------------------


def report(
    paths: list[Path], out_dir: Path, reference: str | None = None, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Build the leaderboard of the runs under `paths` and write it into `out_dir`; returns it."""
    board = build(paths, reference, resamples, seed, base=out_dir)
    write(board, out_dir)
    log.info("report: %d runs -> %s", len(board["rows"]), out_dir / "leaderboard.md")
    return board


class LeaderboardCallback(Callback):
    """Hydra callback: at the end of a `-m` sweep, the leaderboard of its runs in the sweep directory.

    A sweep whose runs wrote no metrics (e.g. `stage=train`) gets one log line and no leaderboard; a report
    that cannot be made is logged as one error line and never fails the sweep whose runs already finished.
    """

    def __init__(self, reference: str | None = None, resamples: int = 1000, seed: int = 0) -> None:
        self.reference, self.resamples, self.seed = reference, resamples, seed

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():  # what each job gave, on the console (the leaderboard below writes files)
            sys.stdout.write(f"sweep {sweep_dir}:\n{sweep_summary(sweep_dir)}")
        if not sweep_dir.is_dir() or not any((d / "metrics.json").is_file() for d in sweep_dir.iterdir()):
            log.info("report: no run of %s wrote metrics.json; no leaderboard", sweep_dir)
            return
        try:
            report([sweep_dir], sweep_dir, self.reference, self.resamples, self.seed)
        except (ReportError, OSError, ValueError) as e:
            log.error("report: no leaderboard for %s: %s", sweep_dir, e)
            return
        sys.stdout.write((sweep_dir / "leaderboard.md").read_text())


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad directory or option is one `wsss: error:` line and exit status 2."""
    p = argparse.ArgumentParser(prog="python -m wsss.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run directories, or folders of them (a -m sweep)")
    p.add_argument("--reference", help="KEY=VALUE override of the reference rows (default: the first row)")
    p.add_argument("--out", type=Path, help="where to write (default: the one DIR given, else the current dir)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0, as evaluate's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path.cwd())
    try:
        report(args.dirs, out, args.reference, args.resamples, args.seed)
    except (ReportError, OSError) as e:
        sys.stderr.write(f"wsss: error: {e}\n")
        return 2
    sys.stdout.write((out / "leaderboard.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
