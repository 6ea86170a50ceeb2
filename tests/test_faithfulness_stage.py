"""The faithfulness stage: per-pair values equal wsss.cam.metrics called on the stored maps and the classifier,
the summary equals a mean over the per-image records, a seeded subset, evaluate's merge, 2 ranks, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_scale_out import _artifact, _checkpoint, torchrun
from tests.tiny import run_cli, tiny_cfg
from wsss.artifacts import read_cams
from wsss.cam import metrics as M
from wsss.config import validate
from wsss.data import build_source
from wsss.data.transforms import normalize
from wsss.errors import ConfigError
from wsss.models import load_checkpoint
from wsss.stages.faithfulness import image_ids, summarise

ALL = "faithfulness.metrics=[average_drop,deletion_insertion,road]"
FAST = [ALL, "faithfulness.steps=4", "faithfulness.percentiles=[30,70]", "dataset.synthetic.num_val=6"]
FAST += ["dataset.eval_split=val"]


def test_subset_is_seeded_in_split_order_and_capped():
    ids = [f"im{i}" for i in range(50)]
    a, b = image_ids(ids, 7, 3), image_ids(ids, 7, 3)
    assert a == b
    assert len(a) == 7
    assert a == sorted(a, key=ids.index)
    assert image_ids(ids, 7, 4) != a
    assert image_ids(ids, None, 0) == ids
    assert image_ids(ids, 80, 0) == ids


def test_summary_is_the_mean_over_pairs_and_its_interval_a_bootstrap_over_images():
    records = {
        "a": {"classes": ["x", "y"], "drop": [0.5, 0.1], "road": [0.2, -0.1]},
        "b": {"classes": ["x"], "drop": [0.0], "road": [0.4]},
        "c": {"classes": [], "drop": [], "road": []},
    }
    s = summarise(records, ["a", "b", "c"], 500, 0)
    assert s["pairs"] == 3
    assert s["images"] == 3
    assert s["average_drop"]["mean"] == pytest.approx(100 * 0.6 / 3, abs=1e-4)
    assert s["road"]["mean"] == pytest.approx(0.5 / 3, abs=1e-4)
    assert "deletion_auc" not in s
    # a resample of images only "b" (weight 3) has road 0.4; of "a" alone 0.05: the interval lies within
    lo, hi = s["road"]["interval"]
    assert 0.05 - 1e-9 <= lo <= s["road"]["mean"] <= hi <= 0.4 + 1e-9
    assert s["average_drop"]["better"] == "lower"
    assert s["road"]["better"] == "higher"


@pytest.mark.slow
def test_stage_values_equal_the_library_on_the_stored_maps_and_evaluate_merges_them(tmp_path):
    ckpt = _checkpoint(tmp_path / "given.pt")
    run = tmp_path / "run"
    args = [f"model.checkpoint={ckpt}", "faithfulness.enabled=true", *FAST, f"hydra.run.dir={run}"]
    proc = run_cli(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    art = _artifact(tmp_path / "cache", "faithfulness")
    per_image = json.loads((art / "per_image.json").read_text())
    summary = json.loads((art / "metrics.json").read_text())
    assert json.loads((run / "metrics.json").read_text())["faithfulness"] == summary
    assert json.loads((run / "faithfulness_per_image.json").read_text()) == per_image  # for the leaderboard
    maps_dir = _artifact(tmp_path / "cache", "cams") / "maps"
    model, names = load_checkpoint(ckpt)
    model.set_output_stride(8)  # cam.output_stride's default: the model the CAMs came from
    model.eval()
    cfg = tiny_cfg(tmp_path, ["dataset.synthetic.num_val=6"])
    source = build_source(cfg.dataset, "val")
    assert sorted(per_image) == sorted(source.ids)
    pairs = 0
    for image_id in source.ids:
        stored = read_cams(maps_dir / f"{image_id}.npz")
        image = normalize(source.load_image(image_id)[None])
        t = torch.stack([torch.zeros(len(stored["keys"]), dtype=torch.long), torch.from_numpy(stored["keys"])], 1)
        maps = torch.from_numpy(stored["maps"]).float().clamp(0, 1)
        rec = per_image[image_id]
        assert rec["classes"] == [names[int(k)] for k in stored["keys"]]
        pairs += len(t)
        if not len(t):
            continue
        ad = M.average_drop_increase(model, image, t, maps, batch_size=5)
        di = M.deletion_insertion(model, image, t, maps, 4, "blur", batch_size=5)
        road = M.road(model, image, t, maps, (30.0, 70.0), batch_size=5)
        np.testing.assert_allclose(rec["drop"], ad["drop"].numpy(), atol=2e-6)
        np.testing.assert_allclose(rec["deletion_auc"], di["deletion_auc"].numpy(), atol=2e-6)
        np.testing.assert_allclose(rec["insertion_auc"], di["insertion_auc"].numpy(), atol=2e-6)
        np.testing.assert_allclose(rec["road"], road["combined"].numpy(), atol=2e-6)
        assert rec["increase"] == ad["increase"].double().tolist()
    assert summary["pairs"] == pairs > 0
    mean = np.mean([x for r in per_image.values() for x in r["insertion_auc"]])
    assert summary["insertion_auc"]["mean"] == pytest.approx(mean, abs=1e-4)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_results_and_batch_size_one_agrees(tmp_path):
    """2 ranks on gloo write the per-image values and summary of 1 process (one thread each, batches of 64);
    batches of 1 agree to float32 convolution rounding (batch_size is not in the key: each run has its cache)."""
    ckpt = _checkpoint(tmp_path / "given.pt")
    common = [f"model.checkpoint={ckpt}", "stage=faithfulness", *FAST]
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = {}
    for name, extra in (("c1", []), ("c3", ["faithfulness.batch_size=1"])):
        env = {"WSSS_CACHE": str(tmp_path / name), **one_thread}
        proc = run_cli(tmp_path, [*common, *extra, f"hydra.run.dir={tmp_path / name}_run"], env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = _artifact(tmp_path / name, "faithfulness")
    two = torchrun(tmp_path, 2, [*common, f"hydra.run.dir={tmp_path / 'two'}"], "c2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = runs["c1"], _artifact(tmp_path / "c2", "faithfulness")
    assert json.loads((a / "per_image.json").read_text()) == json.loads((b / "per_image.json").read_text())
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    pa = json.loads((a / "per_image.json").read_text())
    pc = json.loads((runs["c3"] / "per_image.json").read_text())
    assert pa.keys() == pc.keys()
    for image_id, rec in pa.items():
        assert rec["classes"] == pc[image_id]["classes"]
        for k in ("drop", "deletion_auc", "insertion_auc", "road"):
            np.testing.assert_allclose(rec[k], pc[image_id][k], atol=1e-5, err_msg=f"{image_id} {k}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("faithfulness.steps=0", "faithfulness.steps=0: must be >= 1"),
        ("faithfulness.percentiles=[0,50]", "faithfulness.percentiles=[0.0, 50.0]: must be a non-empty list"),
        ("faithfulness.percentiles=[50,100]", "faithfulness.percentiles=[50.0, 100.0]: must be a non-empty list"),
        ("faithfulness.metrics=[]", "faithfulness.metrics=[]: must name at least one metric"),
        ("faithfulness.max_images=0", "faithfulness.max_images=0: must be >= 1 or null"),
        ("faithfulness.road_noise=-1", "faithfulness.road_noise=-1.0: must be >= 0"),
    ],
)
def test_bad_settings_are_refused_at_validation(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(tiny_cfg(tmp_path, [override]))


@pytest.mark.parametrize(
    ("override", "value"), [("faithfulness.baseline=gray", "gray"), ("faithfulness.metrics=[average_drop,auc]", "auc")]
)
def test_unknown_baseline_or_metric_fails_at_composition_naming_it(tmp_path, override, value):
    with pytest.raises(Exception, match="Error merging override faithfulness") as e:
        tiny_cfg(tmp_path, [override])
    assert f"Invalid value '{value}'" in str(e.value.__cause__)
