"""Writing a leaderboard (`wsss.report.build`'s dict): leaderboard.md, .csv, .json and .png, each atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from wsss.artifacts import atomic_open
from wsss.metrics.bootstrap import BOOTSTRAP_METRICS

NAMES = {
    "miou": "mIoU",
    "sweep_best_miou": "best mIoU",
    "pxap": "PxAP",
    "maxboxacc": "MaxBoxAcc",
    "maxboxacc_v2": "MaxBoxAccV2",
}
FAITHFULNESS = {  # the faithfulness stage's summary (evaluate's `faithfulness` block): name, better, decimals shown
    "average_drop": ("AD", "lower", 2),
    "increase_in_confidence": ("IC", "higher", 2),
    "deletion_auc": ("Deletion AUC", "lower", 3),
    "insertion_auc": ("Insertion AUC", "higher", 3),
    "road": ("ROAD", "higher", 3),
}
OUTPUTS = ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "leaderboard.png")


def _columns(board: dict) -> list[str]:
    return [k for k in BOOTSTRAP_METRICS if any(k in r["metrics"] for r in board["rows"])]


def _faith_columns(board: dict) -> list[str]:
    return [k for k in FAITHFULNESS if any(k in r.get("faithfulness", {}) for r in board["rows"])]


def _faith_cell(e: dict | None, digits: int = 2) -> str:
    if e is None:
        return "-"
    ci = f" [{e['ci'][0]:.{digits}f}, {e['ci'][1]:.{digits}f}]" if e.get("ci") else ""
    return f"{e['value']:.{digits}f}{ci}"


def _diff_cell(e: dict, digits: int = 2) -> str:
    if "diff" not in e:
        return "-"
    star = " *" if e["diff_excludes_0"] else ""
    return f"{e['diff']:+.{digits}f} [{e['diff_ci'][0]:+.{digits}f}, {e['diff_ci'][1]:+.{digits}f}]{star}"


def _cost(row: dict) -> str:
    c = row["cam_cost"]
    return "-" if not c else f"{c['cam_seconds_per_image'] * 1000:.1f} ms ({c['ratio_to_forward']:.1f}x)"


def _left_out_lines(board: dict) -> list[str]:
    """Runs that scored images another run lacks: those images are out of every row, named here."""
    out = []
    for name, ids in (board.get("left_out") or {}).items():
        shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        out += [f"Left out of every row (another run has no result for them): {len(ids)} images of {name}: {shown}."]
        out.append("")
    return out


def to_markdown(board: dict) -> str:
    """leaderboard.md: the table, the paired differences and the seed folds."""
    cols, faith = _columns(board), _faith_columns(board)
    pct = round(100 * board["level"])
    lines = [
        f"# Leaderboard: {board['dataset']} / {board['split']}, {board['num_images']} images",
        "",
        f"Each value with its {pct} % bootstrap interval over images ({board['resamples']} resamples, seed "
        f"{board['seed']}); the interval covers the sampling of images, not training randomness.",
        "",
        *_left_out_lines(board),
        "| run | " + " | ".join(NAMES[k] for k in cols) + " | best t | CAM cost (per image, x forward) |",
        "|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in board["rows"]:
        cells = []
        for k in cols:
            e = r["metrics"].get(k)
            cells.append("-" if e is None else f"{e['value']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['best_threshold']} | {_cost(r)} |")
    lines += _faith_lines(board, faith, pct) + _diff_lines(board, cols, pct) + _fold_lines(board, cols, faith)
    return "\n".join(lines) + "\n"


def _faith_lines(board: dict, faith: list[str], pct: int) -> list[str]:
    """The faithfulness table and its paired differences."""
    if not faith:
        return []
    lines = [
        "",
        f"## Faithfulness (the faithfulness stage; mean over (image, class) pairs, {pct} % interval over images)",
        "",
        "| run | " + " | ".join(f"{FAITHFULNESS[k][0]} ({FAITHFULNESS[k][1]} is better)" for k in faith) + " |",
        "|---|" + "---|" * len(faith),
    ]
    for r in board["rows"]:
        cells = [_faith_cell(r.get("faithfulness", {}).get(k), FAITHFULNESS[k][2]) for k in faith]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    paired = [r for r in board["rows"] if any("diff" in e for e in r.get("faithfulness", {}).values())]
    if paired:
        lines += [
            "",
            f"Faithfulness, paired differences from the reference (same pairs, same resamples; * = the {pct} % "
            "interval excludes 0):",
            "",
            "| run | reference | " + " | ".join(f"{FAITHFULNESS[k][0]} diff" for k in faith) + " |",
            "|---|---|" + "---|" * len(faith),
        ]
        for r in paired:
            cells = [_diff_cell(r["faithfulness"].get(k, {}), FAITHFULNESS[k][2]) for k in faith]
            lines.append(f"| {r['name']} | {r['reference']} | " + " | ".join(cells) + " |")
    return lines


def _diff_lines(board: dict, cols: list[str], pct: int) -> list[str]:
    """The paired differences of each row from its reference, and the rows without one."""
    lines: list[str] = []
    diffs = [r for r in board["rows"] if r["reference"] is not None and r["reference"] != r["name"]]
    if diffs:
        lines += [
            "",
            f"## Paired differences (same images, same resamples: rows of one model, and imported maps against "
            f"the reference; * = the {pct} % interval excludes 0)",
            "",
            "| run | reference | " + " | ".join(f"{NAMES[k]} diff" for k in cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        for r in diffs:
            cells = [_diff_cell(r["metrics"].get(k, {})) for k in cols]
            lines.append(f"| {r['name']} | {r['reference']} | " + " | ".join(cells) + " |")
    unpaired = [r["name"] for r in board["rows"] if r["reference"] is None]
    if unpaired:
        lines += ["", "No reference row of the same trained model, so no paired difference: " + ", ".join(unpaired)]
    return lines


def _fold_lines(board: dict, cols: list[str], faith: list[str]) -> list[str]:
    """Rows that differ only by seed, folded into mean +- std, and their paired differences over seeds."""
    if not board["seed_folds"]:
        return []
    heads = [NAMES[k] for k in cols] + [FAITHFULNESS[k][0] for k in faith]
    lines = [
        "",
        "## Over seeds (mean +- sample std of the point values; covers training randomness)",
        "",
        "| runs | seeds | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for f in board["seed_folds"]:
        cells = [_fold_cell(f["metrics"].get(k), "mean", "std", 2) for k in cols]
        cells += [_fold_cell(f.get("faithfulness", {}).get(k), "mean", "std", FAITHFULNESS[k][2]) for k in faith]
        lines.append(f"| {f['name']} | {', '.join(map(str, f['seeds']))} | " + " | ".join(cells) + " |")
    paired = [f for f in board["seed_folds"] if _fold_has_diff(f)]
    if paired:
        lines += [
            "",
            "Paired differences over seeds (each seed's difference on its own model, mean +- sample std; "
            "n/N: the seeds whose paired interval excludes 0):",
            "",
            "| runs | seeds | " + " | ".join(f"{h} diff" for h in heads) + " |",
            "|---|---|" + "---|" * len(heads),
        ]
        for f in paired:
            n = len(f["seeds"])
            cells = [_fold_diff_cell(f["metrics"].get(k), n, 2) for k in cols]
            cells += [_fold_diff_cell(f.get("faithfulness", {}).get(k), n, FAITHFULNESS[k][2]) for k in faith]
            lines.append(f"| {f['name']} | {', '.join(map(str, f['seeds']))} | " + " | ".join(cells) + " |")
    return lines


def _fold_has_diff(fold: dict) -> bool:
    return any("diff_mean" in e for e in [*fold["metrics"].values(), *fold.get("faithfulness", {}).values()])


def _fold_cell(e: dict | None, mean: str, std: str, digits: int) -> str:
    return "-" if e is None or mean not in e else f"{e[mean]:.{digits}f} +- {e[std]:.{digits}f}"


def _fold_diff_cell(e: dict | None, seeds: int, digits: int) -> str:
    if e is None or "diff_mean" not in e:
        return "-"
    return f"{e['diff_mean']:+.{digits}f} +- {e['diff_std']:.{digits}f} ({e['diff_seeds_excluding_0']}/{seeds})"


def to_csv(board: dict) -> str:
    """leaderboard.csv: one row per run, value / interval / paired difference per metric, CAM cost."""
    cols = _columns(board)
    header = ["run", "dir", "model_key", "reference", "best_threshold"]
    for k in cols:
        header += [k, f"{k}_lo", f"{k}_hi", f"{k}_diff", f"{k}_diff_lo", f"{k}_diff_hi"]
    faith = _faith_columns(board)
    for k in faith:
        header += [k, f"{k}_lo", f"{k}_hi", f"{k}_diff", f"{k}_diff_lo", f"{k}_diff_hi"]
    header += ["cam_seconds_per_image", "cam_ratio_to_forward"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in board["rows"]:
        line = [r["name"], r["dir"], r["model_key"], r["reference"], r["best_threshold"]]
        for k in cols:
            e = r["metrics"].get(k, {})
            line += [e.get("value"), *(e.get("ci") or [None, None]), e.get("diff"), *(e.get("diff_ci") or [None, None])]
        for k in faith:
            e = r.get("faithfulness", {}).get(k, {})
            line += [e.get("value"), *(e.get("ci") or [None, None]), e.get("diff"), *(e.get("diff_ci") or [None, None])]
        c = r["cam_cost"] or {}
        line += [c.get("cam_seconds_per_image"), c.get("ratio_to_forward")]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def plot(board: dict, path: Path) -> None:
    """leaderboard.png: each metric's value per run with its interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = _columns(board)
    rows = board["rows"]
    fig = Figure(figsize=(3.2 * len(cols), 0.45 * len(rows) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    y = np.arange(len(rows))[::-1]
    for i, k in enumerate(cols):
        ax = fig.add_subplot(1, len(cols), i + 1)
        for yy, r in zip(y, rows, strict=True):
            e = r["metrics"].get(k)
            if e is None:
                continue
            ax.errorbar(e["value"], yy, xerr=[[e["value"] - e["ci"][0]], [e["ci"][1] - e["value"]]], fmt="o", capsize=3)
        ax.set_yticks(y, [r["name"] for r in rows] if i == 0 else [""] * len(rows), fontsize=8)
        ax.set_title(NAMES[k], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})


def write(board: dict, out_dir: Path) -> list[Path]:
    """Write the four outputs into `out_dir`, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "leaderboard.md": to_markdown(board),
        "leaderboard.csv": to_csv(board),
        "leaderboard.json": json.dumps(board, indent=1, sort_keys=True) + "\n",
    }
    for name, text in texts.items():
        with atomic_open(out_dir / name, "w") as f:
            f.write(text)
    plot(board, out_dir / "leaderboard.png")
    return [out_dir / n for n in OUTPUTS]
