"""The benchmark and study scripts run (at tiny sizes) and report numbers that agree with an independent
computation: the runs' own metrics, the files' sizes on disk, the counts they were asked for. No assertion is
on a duration itself, only on how the reported numbers relate to each other."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.tiny import FORK_SERVER, TINY, ground_truth, loop_iou

pytestmark = pytest.mark.slow


def _script(name: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python scripts/NAME *args` in the repository: in a child of the fork server (`tests/forkrun.py`), or a
    new interpreter where `env` changes what only an interpreter's start reads."""
    env = {**os.environ, **(env or {})}
    if FORK_SERVER.forkable(env):
        return FORK_SERVER.run_script(REPO / "scripts" / name, list(args), env, timeout)
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _module(name: str):
    """scripts/<name>.py imported as a module (its `main` is not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_smoke_counts_the_images_and_divides_them_by_its_seconds(tmp_path):
    proc = _script("bench_gpu.py", "--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert (result["device"], result["ranks"]) == ("cpu", 1)
    assert json.loads(proc.stdout) == result
    # --smoke: 4 CAM images; 2 training steps of 2 images
    for key, images in {"cams": 4, "train_fp32": 2 * 2, "train_bf16": 2 * 2}.items():
        r = result[key]
        assert r["images"] == images, key
        assert r["peak_mb"] is None  # no CUDA memory counter on the CPU
        # images_per_s is images / seconds to 2 places, `seconds` itself is rounded to 3: the bounds of that
        s = r["seconds"]
        low = images / (s + 5e-4) - 5e-3
        high = images / (s - 5e-4) + 5e-3 if s > 5e-4 else math.inf
        assert low <= r["images_per_s"] <= high, (key, r)


def test_bench_storage_bytes_are_the_npz_sizes_on_disk(shared_data, tmp_path):
    """Every image of the COCO sample's json, at its size and with its non-crowd classes, written in each store:
    the mean file size is the reported bytes per image."""
    from wsss.artifacts import write_cams

    root = shared_data / "coco2017_sample"
    proc = _script("bench_storage.py", "--coco", str(root), "--split", "val")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)["coco_bytes"]

    coco = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    classes = defaultdict(set)
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            classes[a["image_id"]].add(a["category_id"])
    images = [im for im in coco["images"] if classes[im["id"]]]  # no non-crowd object: no label, skipped
    counts = [len(classes[im["id"]]) for im in images]
    assert out["images"] == len(images)
    assert out["mean_classes"] == round(sum(counts) / len(counts), 2)
    for store in ("float32", "float16", "uint8", "quarter"):
        sizes = []
        for im, k in zip(images, counts, strict=True):
            h, w = im["height"], im["width"]
            path = tmp_path / f"{store}.npz"
            maps, strided = np.zeros((k, h, w), np.float32), np.zeros((k, -(-h // 4), -(-w // 4)), np.float32)
            write_cams(path, np.arange(k), maps, strided, store)
            sizes.append(path.stat().st_size)
        mean = sum(sizes) / len(sizes)
        assert out[store]["bytes_per_image"] == round(mean), store
        assert out[store]["coco_train2014_gb"] == round(mean * 82081 / 1e9, 1), store


def _train_seeds(artifact: Path) -> set[int]:
    """The seeds of the train artifacts upstream of `artifact`, followed through the manifests' inputs."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    if manifest["stage"] == "train":
        return {manifest["config"]["seed"]}
    return set().union(*(_train_seeds(Path(i["dir"])) for i in manifest["inputs"].values()))


def test_seed_spread_reports_each_runs_metrics_and_their_spread(tmp_path):
    env = {"WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "spread.json"
    proc = _script("seed_spread.py", "--seeds", "2", "--out", str(out), *TINY, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    runs = {}  # seed -> the metrics.json of the evaluate artifact built on that seed's model
    for manifest in (tmp_path / "cache" / "evaluate").glob("*/manifest.json"):
        evaluate = manifest.parent
        (seed,) = _train_seeds(evaluate)
        runs[seed] = json.loads((evaluate / "metrics.json").read_text())
    assert sorted(runs) == [0, 1]
    for r in rows:  # each row is what its run's evaluate stage wrote
        metrics = runs[r["seed"]]
        assert r["miou"] == metrics["miou"]
        assert r["sweep_best"] == metrics["sweep"]["best"]["miou"]
        assert r["best_threshold"] == metrics["sweep"]["best_threshold"]
        assert r["pxap"] == metrics["pxap"]["pxap"]
    assert rows[0]["miou"] != rows[1]["miou"]  # two models: a spread that is not trivially 0
    for field in ("miou", "sweep_best", "pxap"):
        a, b = (r[field] for r in rows)
        s = result["summary"][field]
        assert s["mean"] == pytest.approx((a + b) / 2, abs=1e-9)
        assert s["std"] == pytest.approx(abs(a - b) / 2**0.5, abs=1e-9)  # the sample std (ddof 1) of two
        assert (s["min"], s["max"]) == (min(a, b), max(a, b))
    # cached like any run: the same seed again reuses everything, and reports the same numbers
    again = _script("seed_spread.py", "--seeds", "1", "--out", str(tmp_path / "again.json"), *TINY, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "evaluate: reusing" in again.stderr, [ln for ln in again.stderr.splitlines() if "pipeline]" in ln]
    row = json.loads((tmp_path / "again.json").read_text())["rows"][0]
    assert {k: row[k] for k in ("miou", "sweep_best", "pxap")} == {
        k: rows[0][k] for k in ("miou", "sweep_best", "pxap")
    }


def test_bench_train_projects_both_recipes(tmp_path):
    """Two tiny recipes, epochs interleaved: each projection is its median epoch x its epochs; ratio B / A."""
    tiny = " ".join(TINY)
    a, b = f"{tiny} train.amp_dtype=null train.epochs=3", f"{tiny} train.amp_dtype=bfloat16 train.epochs=5"
    out = tmp_path / "train.json"
    args = ["--a", a, "--b", b, "--epochs", "3", "--out", str(out)]
    proc = _script("bench_train.py", *args, env={"WSSS_DATA": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ra, rb = result["recipes"]["A"], result["recipes"]["B"]
    assert (ra["precision"], rb["precision"]) == ("float32", "bfloat16")
    assert (ra["epochs"], rb["epochs"]) == (3, 5)
    lines = proc.stdout.strip().splitlines()
    for name, r in (("A", ra), ("B", rb)):
        times = sorted(r["seconds_per_epoch"])
        assert len(times) == 3  # the warm-up epoch is not counted
        # the median of three is the middle one (their mean would be another number)
        assert r["projected_seconds"] == pytest.approx(times[1] * r["epochs"], rel=1e-12)
        (line,) = [ln for ln in lines if ln.startswith(f"{name} [")]
        assert f"{r['precision']}, 3 batches/epoch" in line  # 24 images in batches of 8
        assert line.endswith(f"x {r['epochs']} epochs = {r['projected_seconds']:.0f} s")
    assert result["ratio"] == pytest.approx(rb["projected_seconds"] / ra["projected_seconds"], rel=1e-12)
    assert lines[-1].endswith(f"{result['ratio']:.3f}")


def test_bench_keys_writes_the_tree_it_counts(tmp_path):
    root = _module("bench_keys").make_tree(tmp_path / "voc", 5)
    ids = [f"{i:07d}" for i in range(5)]
    per_id = [
        f"{folder}/{i}{ext}"
        for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("pred", ".png"))
        for i in ids
    ]
    split = "ImageSets/Segmentation/train.txt"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted([*per_id, split])
    assert {(root / f).stat().st_size for f in per_id} == {64}
    assert (root / split).read_text().split() == ids

    proc = _script("bench_keys.py", "--ids", "300", "--repeats", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, *cases = proc.stdout.strip().splitlines()
    assert first.startswith("tree: 900 files written in ")
    parsed = [re.fullmatch(r"(.+): first ([\d.]+) s, warm median ([\d.]+) s, min ([\d.]+) s", ln) for ln in cases]
    assert all(parsed), cases
    assert [m[1] for m in parsed] == ["evaluate with masks_dir (900 files)", "default graph, 4 nodes (600 files)"]
    for m in parsed:
        assert float(m[4]) <= float(m[3])  # the warm min is at most their median


def test_bench_segment_projects_the_segment_stage_against_train(tmp_path):
    """Tiny train and segment runs, epochs interleaved: train = median epoch x train.epochs, segment = median
    epoch x segment.epochs + one timed prediction of the eval split (every image scored); ratio segment / train."""
    out = tmp_path / "segment.json"
    args = ["--epochs", "3", "--out", str(out), "--predictions", str(tmp_path / "pred"), *TINY, "train.epochs=4"]
    args += ["segment.epochs=6", "segment.batch_size=8"]
    proc = _script("bench_segment.py", *args, env={"WSSS_DATA": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["epochs"] == {"train": 4, "segment": 6}
    assert r["predict_images"] == 8  # num_val
    med = {k: sorted(v)[1] for k, v in r["seconds_per_epoch"].items()}  # three timed epochs each
    assert all(len(v) == 3 for v in r["seconds_per_epoch"].values())
    assert r["projected_seconds"]["train"] == pytest.approx(med["train"] * 4, rel=1e-12)
    assert r["projected_seconds"]["segment"] == pytest.approx(med["segment"] * 6 + r["predict_seconds"], rel=1e-12)
    assert r["ratio"] == pytest.approx(r["projected_seconds"]["segment"] / r["projected_seconds"]["train"], rel=1e-12)
    assert proc.stdout.strip().splitlines()[-1] == f"{r['ratio']:.3f}"
    # the score is the pixel count over the PNGs it predicted and val's ground truth
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert len(masks) == 8
    pairs = [(ground_truth(tmp_path, p.stem), np.array(Image.open(p))) for p in masks]
    assert r["miou_after_timed_epochs"] == pytest.approx(loop_iou(pairs, 7)[1], abs=1e-4)


def test_figures_faithfulness_puts_every_method_and_metric_of_one_model_in_one_leaderboard(tmp_path):
    """`figures.py faithfulness --methods`: every method of the list on seed 0's model, each row's five
    faithfulness means those of its run's metrics.json, mIoU beside them, and the section in figures.md (three
    methods of the default ten: the stage is the same for every method, the methods are tested in test_cam_*)."""
    env = {"WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "figs"
    fast = ["faithfulness.steps=2", "faithfulness.percentiles=[50]"]
    methods = ["cam", "gradcampp", "ablationcam"]
    assert set(methods) < set(_module("figures").METHODS.split(","))
    args = ["faithfulness", "--methods", ",".join(methods), "--out", str(out)]
    proc = _script("figures.py", *args, "--", *TINY, *fast, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = json.loads((out / "faithfulness_leaderboard" / "leaderboard.json").read_text())
    assert [r["name"] for r in board["rows"]] == [f"cam={m}" for m in methods]
    assert len({r["model_key"] for r in board["rows"]}) == 1
    five = ["average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "road"]
    for r in board["rows"]:
        block = json.loads((out / "faithfulness_leaderboard" / r["dir"] / "metrics.json").read_text())["faithfulness"]
        assert sorted(r["faithfulness"]) == sorted(five), r["name"]
        assert {k: r["faithfulness"][k]["value"] for k in five} == {k: block[k]["mean"] for k in five}
        assert "miou" in r["metrics"]
    part = json.loads((out / "faithfulness.json").read_text())
    assert part["stamp"]["command"].startswith("python scripts/figures.py faithfulness")
    assert "## Faithfulness of the CAM methods on seed 0's model (val split)" in (out / "figures.md").read_text()


def test_bench_faithfulness_times_deletion_insertion_against_plain_forwards_in_the_same_batches(tmp_path):
    """On a tiny model: the classifier read at cam.output_stride (8) and the stage's blur baseline, the plain
    forwards batched exactly as Deletion + Insertion (2 (steps + 1) inputs per pair, batch // (steps + 1) pairs
    per forward), every job timed."""
    import torch

    from tests.tiny import tiny_cfg
    from wsss.data import build_source
    from wsss.data.synthetic import SYNTHETIC_CLASSES
    from wsss.models import Classifier, save_checkpoint

    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, Classifier(len(SYNTHETIC_CLASSES)), SYNTHETIC_CLASSES)
    out = tmp_path / "faith.json"
    args = ["--checkpoint", str(ckpt), "--images", "3", "--steps", "4", "--batch", "12", "--repeats", "1"]
    args += ["--out", str(out), *TINY]
    proc = _script("bench_faithfulness.py", *args, env={"WSSS_DATA": str(tmp_path / "data")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    source = build_source(tiny_cfg(tmp_path).dataset, "val")
    pairs = sum(len(source.labels(i)) for i in [i for i in source.ids if len(source.labels(i))][:3])
    assert (r["pairs"], r["steps"], r["baseline"], r["output_stride"]) == (pairs, 4, "blur", 8)
    # 12 // 5 = 2 pairs per group: a deletion and an insertion forward of 10 inputs each (5 for a last lone pair)
    want = [10, 10] * (pairs // 2) + [5, 5] * (pairs % 2)
    assert r["forward_batches"] == want
    assert set(r["seconds"]) == {
        "deletion_insertion",
        "plain_forwards",
        "average_drop_increase",
        "torchcam_average_drop",
        "road",
        "grad_cam_road",
    }
    ratio = r["seconds"]["deletion_insertion"] / r["seconds"]["plain_forwards"]
    assert r["ratios"]["deletion_insertion / plain forwards (same batches)"] == pytest.approx(ratio, rel=1e-2, abs=2e-3)
