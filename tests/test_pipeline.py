"""End to end: the stage graph on a tiny synthetic set, cache reuse, errors, and a `-m` sweep in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.tiny import TINY, tiny_cfg
from wsss.config import register_configs
from wsss.pipeline import Pipeline

register_configs()


def _cfg(tmp_path: Path, overrides: list[str]):
    return tiny_cfg(tmp_path, overrides)


def test_pipeline_runs_and_reuses(tmp_path):
    cfg = _cfg(tmp_path, ["stage=evaluate"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pipe = Pipeline(cfg, run_dir=run_dir)
    manifest = pipe.run("evaluate")
    assert pipe.report == {"train": "ran", "cams": "ran", "pseudo_masks": "ran", "evaluate": "ran"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 100.0 and manifest["miou"] == metrics["miou"]
    assert set(metrics["iou"]) == {"background", "disc", "triangle", "square", "star", "ring", "cross"}
    assert len(metrics["sweep"]["thresholds"]) == 96
    for name in ("summary.md", "class_iou.png", "threshold_curve.png", "overlays.png"):
        assert (run_dir / name).stat().st_size > 0, name
    # Every stage wrote a manifest whose inputs point at its upstream's digest.
    cams_manifest = json.loads((pipe.artifact_dir("cams") / "manifest.json").read_text())
    assert cams_manifest["inputs"]["train"]["key"] == pipe.key("train")
    assert cams_manifest["counts"]["images"] == 24
    # A second pipeline with another threshold reuses the CAMs (so never looks at train), runs the rest.
    cfg2 = _cfg(tmp_path, ["stage=evaluate", "pseudo.threshold=0.3"])
    pipe2 = Pipeline(cfg2, run_dir=run_dir)
    pipe2.run("evaluate")
    assert pipe2.report == {"cams": "reused", "pseudo_masks": "ran", "evaluate": "ran"}


def test_same_seed_same_metrics(tmp_path):
    results = []
    for i in range(2):
        cfg = _cfg(tmp_path / str(i), ["stage=evaluate"])
        results.append(Pipeline(cfg).run("evaluate")["miou"])
    assert results[0] == results[1]


def test_oracle_masks_dir_scores_100(tmp_path, synthetic_root):
    cfg = _cfg(
        tmp_path,
        [
            "stage=evaluate",
            f"dataset.root={synthetic_root}",
            f"evaluate.masks_dir={synthetic_root / 'SegmentationClass'}",
            "dataset.synthetic.num_train=24",
            "dataset.synthetic.num_val=8",
        ],
    )
    pipe = Pipeline(cfg)
    assert pipe.run("evaluate")["miou"] == 100.0
    assert pipe.report == {"evaluate": "ran"}  # nothing upstream is trained for a folder of masks


def test_missing_mask_in_masks_dir_names_the_file(tmp_path, synthetic_root):
    masks = tmp_path / "masks"
    masks.mkdir()
    cfg = _cfg(tmp_path, ["stage=evaluate", f"dataset.root={synthetic_root}", f"evaluate.masks_dir={masks}"])
    with pytest.raises(FileNotFoundError, match="train_00000.png"):
        Pipeline(cfg).run("evaluate")


def test_missing_data_root_names_the_path(tmp_path):
    root = tmp_path / "nowhere"
    cfg = _cfg(tmp_path, ["dataset=voc12", f"dataset.root={root}", "stage=train"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Pipeline(cfg).run("train")


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    from wsss.models import Classifier, save_checkpoint

    ckpt = tmp_path / "other.pt"
    save_checkpoint(ckpt, Classifier(3), ["cat", "dog", "cow"])
    cfg = _cfg(tmp_path, ["stage=cams", f"model.checkpoint={ckpt}"])
    with pytest.raises(ValueError, match=r"\['cat', 'dog', 'cow'\].*disc"):
        Pipeline(cfg).run("cams")


@pytest.mark.slow
def test_multirun_sweep_trains_once(tmp_path):
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "wsss.run",
        "-m",
        "stage=pseudo_masks",
        "pseudo.threshold=0.2,0.3",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # The second job finds the CAMs complete, so it never needs the model.
    assert log.count("train: running") == 1 and log.count("train: reusing") == 0, log[-3000:]
    assert log.count("cams: running") == 1 and log.count("cams: reusing") == 1
    assert log.count("pseudo_masks: running") == 2
    assert len(list((tmp_path / "cache" / "pseudo_masks").glob("*/manifest.json"))) == 2


@pytest.mark.slow
def test_cli_default_stage_prints_table(tmp_path):
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "wsss.run", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "mIoU" in log and "disc" in log
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["miou"] >= 0


@pytest.mark.parametrize(
    "override,needle",
    [("stage=nope", "stage/nope"), ("cam=nope", "cam/nope"), ("pseudo.threshold=abc", "abc")],
)
def test_cli_bad_overrides_fail_at_composition(override, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "wsss.run", override], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert needle in proc.stderr


def test_foreign_voc_root_is_read_not_overwritten(tmp_path, synthetic_root):
    """dataset.root=DIR with the default dataset reads a VOC-layout folder; it never generates into it."""
    import shutil

    root = tmp_path / "theirs"
    shutil.copytree(synthetic_root, root)
    (root / "generator.json").unlink()
    before = sorted(p.name for p in (root / "JPEGImages").iterdir())
    names = "[disc,triangle,square,star,ring,cross]"
    cfg = _cfg(
        tmp_path,
        [
            "stage=evaluate",
            f"dataset.root={root}",
            f"dataset.class_names={names}",
            f"evaluate.masks_dir={root / 'SegmentationClass'}",
        ],
    )
    assert Pipeline(cfg).run("evaluate")["miou"] == 100.0
    assert sorted(p.name for p in (root / "JPEGImages").iterdir()) == before
    cfg = _cfg(tmp_path, ["stage=evaluate", f"dataset.root={root}", f"evaluate.masks_dir={root}"])
    with pytest.raises(ValueError, match="class_names"):
        Pipeline(cfg).run("evaluate")


def test_synthetic_refuses_a_non_empty_foreign_folder(tmp_path):
    from wsss.data.synthetic import SyntheticSpec, ensure_synthetic

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to write"):
        ensure_synthetic(tmp_path, SyntheticSpec(num_train=2, num_val=1, image_size=32))


def test_select_on_val_chooses_the_threshold_without_train_labels(tmp_path):
    """The reported train mIoU sits at the best threshold of the val sweep, computed here independently."""
    import numpy as np

    from wsss.artifacts import read_cams, read_mask
    from wsss.metrics import ThresholdSweep, best_threshold

    cfg = _cfg(tmp_path, ["stage=evaluate", "evaluate.select_on=val", "evaluate.thresholds=0.0:0.9:0.1"])
    pipe = Pipeline(cfg)
    pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert metrics["threshold_chosen_on"] == "val" and metrics["split"] == "train"
    val_cams = sorted((tmp_path / "cache" / "cams").glob("*/manifest.json"))
    val_dir = next(p.parent for p in val_cams if json.loads(p.read_text())["dataset"]["split"] == "val")
    thresholds = [round(0.1 * i, 1) for i in range(10)]
    sweep = ThresholdSweep(7, thresholds)
    root = tmp_path / "data" / "synthetic"
    for path in sorted((val_dir / "maps").glob("*.npz")):
        cams = read_cams(path)
        gt = read_mask(root / "SegmentationClass" / f"{path.stem}.png")
        sweep.update(np.asarray(cams["maps"], np.float32), cams["keys"].astype(np.int64), gt)
    expected, _ = best_threshold(sweep.compute(), thresholds)
    assert metrics["reported_threshold"] == expected
    idx = metrics["sweep"]["thresholds"].index(expected)
    assert metrics["miou"] == pytest.approx(metrics["sweep"]["miou"][idx], abs=1e-3)
