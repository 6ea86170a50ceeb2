"""The stage graph: declared stages, keys that cover every input file, and a log that says what changed."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import tiny_cfg
from wsss.artifacts import read_mask, write_mask
from wsss.pipeline import Pipeline
from wsss.stages import STAGES
from wsss.stages.base import Need, Stage

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, overrides: list[str] = (), stage: str = "evaluate") -> tuple[Pipeline, dict]:
    pipe = Pipeline(tiny_cfg(tmp_path, [f"stage={stage}", *overrides]))
    return pipe, pipe.run(stage)


def _metrics(pipe: Pipeline) -> dict:
    return json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())


def _data(tmp_path: Path) -> Path:
    return tmp_path / "data" / "synthetic"


def test_second_run_with_nothing_changed_only_reuses(tmp_path, caplog):
    _run(tmp_path)
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        pipe, _ = _run(tmp_path)
    assert pipe.report == {"evaluate": "reused"}
    assert "key matched" in caplog.text
    assert "running" not in caplog.text


def test_split_list_change_recomputes_and_the_score_follows(tmp_path, caplog):
    _run(tmp_path)
    split = _data(tmp_path) / "ImageSets" / "Segmentation" / "train.txt"
    ids = split.read_text().split()
    split.write_text("\n".join(ids[:12]) + "\n")
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        pipe, _ = _run(tmp_path)
    assert pipe.report == {"train": "ran", "cams": "ran", "pseudo_masks": "ran", "evaluate": "ran"}
    assert "train.txt changed" in caplog.text
    metrics = _metrics(pipe)
    assert metrics["num_images"] == 12
    assert sorted(metrics["per_image_miou"]) == sorted(ids[:12])


def test_ground_truth_change_is_scored(tmp_path, caplog):
    """A copy of the ground truth scores 100; after one GT PNG is overwritten, the same command scores less."""
    data = _data(tmp_path)
    _run(tmp_path, stage="train")  # generates the dataset
    copy = tmp_path / "copy"
    shutil.copytree(data / "SegmentationClass", copy)
    masks_dir = [f"evaluate.masks_dir={copy}"]
    _, manifest = _run(tmp_path, masks_dir)
    assert manifest["miou"] == 100.0
    gt = data / "SegmentationClass" / "train_00003.png"
    mask = read_mask(gt)
    write_mask(gt, np.where(mask == 255, 255, 0).astype(np.uint8))  # every object becomes background
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        pipe, manifest = _run(tmp_path, masks_dir)
    assert pipe.report == {"evaluate": "ran"}
    assert "1 SegmentationClass mask file changed" in caplog.text
    assert manifest["miou"] < 100.0


def test_masks_dir_change_is_scored(tmp_path, caplog):
    data = _data(tmp_path)
    _run(tmp_path, stage="train")
    copy = tmp_path / "copy"
    shutil.copytree(data / "SegmentationClass", copy)
    _, manifest = _run(tmp_path, [f"evaluate.masks_dir={copy}"])
    assert manifest["miou"] == 100.0
    for i in range(3):
        path = copy / f"train_0000{i}.png"
        write_mask(path, np.zeros_like(read_mask(path)))
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        _, manifest = _run(tmp_path, [f"evaluate.masks_dir={copy}"])
    assert "3 masks_dir files changed" in caplog.text
    assert manifest["miou"] < 100.0


def test_image_change_recomputes_train_and_cams(tmp_path, caplog):
    pipe, _ = _run(tmp_path)
    before = np.load(pipe.artifact_dir("cams") / "maps" / "train_00005.npz")["maps"]
    image = _data(tmp_path) / "JPEGImages" / "train_00005.jpg"
    shutil.copy(_data(tmp_path) / "JPEGImages" / "train_00006.jpg", image)
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        pipe, _ = _run(tmp_path)
    assert pipe.report == {"train": "ran", "cams": "ran", "pseudo_masks": "ran", "evaluate": "ran"}
    assert "1 image file changed" in caplog.text
    after = np.load(pipe.artifact_dir("cams") / "maps" / "train_00005.npz")["maps"]
    assert not np.array_equal(before, after)


def test_checkpoint_file_change_recomputes(tmp_path, caplog):
    import torch

    from wsss.models import Classifier, save_checkpoint

    names = ["disc", "triangle", "square", "star", "ring", "cross"]
    ckpt = tmp_path / "given.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, Classifier(6), names)
    pipe, _ = _run(tmp_path, [f"model.checkpoint={ckpt}"])
    before = np.load(pipe.artifact_dir("cams") / "maps" / "train_00001.npz")["maps"]
    torch.manual_seed(1)
    save_checkpoint(ckpt, Classifier(6), names)  # same path, other weights
    with caplog.at_level(logging.INFO, logger="wsss.pipeline"):
        pipe, _ = _run(tmp_path, [f"model.checkpoint={ckpt}"])
    assert pipe.report == {"train": "ran", "cams": "ran", "pseudo_masks": "ran", "evaluate": "ran"}
    assert "given.pt changed" in caplog.text
    after = np.load(pipe.artifact_dir("cams") / "maps" / "train_00001.npz")["maps"]
    assert not np.array_equal(before, after)


def test_code_change_is_in_the_key(tmp_path, monkeypatch):
    from wsss import pipeline

    pipe, _ = _run(tmp_path, stage="train")
    key = pipe.key("train")
    monkeypatch.setattr(pipeline, "code_digest", lambda module="wsss": "edited")
    assert Pipeline(tiny_cfg(tmp_path, ["stage=train"])).key("train") != key


def test_code_digest_covers_what_a_stage_imports(tmp_path, monkeypatch):
    """A stage's code digest follows its imports: editing refinement code leaves the classifier's key alone."""
    import shutil

    from wsss import provenance

    graph = provenance.import_graph()

    def closure(module: str) -> set[str]:
        seen, stack = set(), [module]
        while stack:
            m = stack.pop()
            if m not in seen and m in graph:
                seen.add(m)
                stack.extend(graph[m][1])
        return seen

    train = closure("wsss.stages.train")
    assert {"wsss.training", "wsss.models.classifier", "wsss.data.voc", "wsss.data.synthetic"} <= train
    assert not {"wsss.refine.crf", "wsss.stages.evaluate", "wsss.metrics.sweep"} & train
    assert "wsss.refine.crf" in closure("wsss.stages.refine")
    before = {m: provenance.code_digest(m) for m in ("wsss.stages.train", "wsss.stages.refine")}
    edited = tmp_path / "crf.py"
    shutil.copy(graph["wsss.refine.crf"][0], edited)
    edited.write_text(edited.read_text() + "\n# an edit\n")
    monkeypatch.setattr(
        provenance, "import_graph", lambda: {**graph, "wsss.refine.crf": (edited, graph["wsss.refine.crf"][1])}
    )
    provenance.code_digest.cache_clear()
    try:
        assert provenance.code_digest("wsss.stages.train") == before["wsss.stages.train"]
        assert provenance.code_digest("wsss.stages.refine") != before["wsss.stages.refine"]
    finally:
        provenance.code_digest.cache_clear()


def test_pipeline_names_no_stage():
    """The graph comes from the declarations: pipeline.py never names a stage."""
    source = (REPO / "wsss" / "pipeline.py").read_text()
    for name in STAGES:
        assert not re.search(rf"\b{name}\b", source), name


def test_select_on_is_a_declared_input_of_another_split(tmp_path):
    pipe = Pipeline(tiny_cfg(tmp_path, ["evaluate.select_on=val"]))
    node = pipe.node("evaluate")
    assert node.inputs["select_maps"].split == "val"
    assert node.inputs["maps"].split == "train"
    assert node.inputs["select_maps"].inputs["train"] is node.inputs["maps"].inputs["train"]  # one model
    pipe.run("evaluate")
    assert pipe.report["cams[val]"] == "ran"
    assert pipe.report["train"] == "ran"


def test_a_new_stage_is_one_declaration(tmp_path):
    """A stage added to a registry runs from its declaration alone, consuming a declared input."""

    def run(ctx):
        masks = ctx.inputs["masks"]
        n = len(list(masks.path("masks_dir").glob("*.png")))
        (ctx.out_dir / "count.txt").write_text(str(n))
        return {"count": n}

    count = Stage(
        name="count_masks",
        run=run,
        config=("pseudo",),
        params=lambda cfg, split: {},
        needs=lambda cfg, split: {"masks": Need("pseudo_masks")},
    )
    pipe = Pipeline(tiny_cfg(tmp_path), stages={**STAGES, "count_masks": count})
    manifest = pipe.run("count_masks")
    assert manifest["count"] == 24
    assert manifest["outputs"]["count.txt"] == 2
    assert list(pipe.report) == ["train", "cams", "pseudo_masks", "count_masks"]


def test_a_stage_sees_only_its_declared_config(tmp_path):
    seen = {}

    def run(ctx):
        seen["keys"] = sorted(ctx.cfg.keys())
        return {}

    probe = Stage(name="probe", run=run, config=("pseudo", "seed"), params=lambda cfg, split: {})
    Pipeline(tiny_cfg(tmp_path), stages={**STAGES, "probe": probe}).run("probe")
    assert seen["keys"] == ["pseudo", "seed"]


def test_unknown_stage_and_cycles_are_refused(tmp_path):
    loop = Stage(
        name="loop", run=lambda ctx: {}, config=(), params=lambda c, s: {}, needs=lambda c, s: {"x": Need("loop")}
    )
    pipe = Pipeline(tiny_cfg(tmp_path), stages={"loop": loop})
    with pytest.raises(ValueError, match="cycle: loop -> loop"):
        pipe.node("loop")
    with pytest.raises(ValueError, match="unknown stage"):
        pipe.node("nope")


def test_manifest_lists_every_output_with_its_size(tmp_path):
    pipe, _ = _run(tmp_path, stage="cams")
    out = pipe.artifact_dir("cams")
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    assert manifest["outputs"] == on_disk
    assert len(on_disk) == 24 + 1
