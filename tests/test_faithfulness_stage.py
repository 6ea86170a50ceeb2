"""The faithfulness stage: per-pair values equal wsss.cam.metrics called on the stored maps and the classifier,
the summary equals a mean over the per-image records, a seeded subset, evaluate's merge, 2 ranks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import artifact_dir, fixed_checkpoint, run_cli, tiny_cfg, torchrun
from wsss.artifacts import read_cams
from wsss.cam import metrics as M
from wsss.config import validate
from wsss.data import build_source
from wsss.data.transforms import normalize
from wsss.errors import ConfigError
from wsss.models import load_checkpoint
from wsss.stages.faithfulness import image_ids, pair_seed, score_pairs, summarise

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


def _tiny_model():
    from wsss.models import Classifier

    torch.manual_seed(5)
    return Classifier(6).eval()


def _settings(**kw):
    from omegaconf import OmegaConf

    f = {"metrics": ["average_drop", "deletion_insertion", "road"], "batch_size": 7, "steps": 4}
    f.update(baseline="blur", percentiles=[30.0, 70.0], road_noise=0.0, subset_seed=0)
    f.update(kw)
    return OmegaConf.create(f)


def test_a_group_without_pairs_gives_every_column_empty():
    """An image group with no (image, class) pair (a background-only image alone in its size) still has every
    configured column, so the summary keeps all five metrics whichever image comes first."""
    got = score_pairs(
        _tiny_model(),
        torch.randn(1, 3, 24, 24),
        torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0, 24, 24),
        _settings(road_noise=0.1),
        [],
    )
    columns = ("drop", "increase", "deletion_auc", "insertion_auc", "road")
    assert {k: v.shape for k, v in got.items()} == dict.fromkeys(columns, (0,))
    empty = {"classes": [], **{k: v.tolist() for k, v in got.items()}}
    records = {
        "c": empty,
        "a": {
            "classes": ["x"],
            "drop": [0.5],
            "increase": [True],
            "deletion_auc": [0.25],
            "insertion_auc": [0.75],
            "road": [0.1],
        },
    }
    s = summarise(records, ["c", "a"], 0, 0)
    assert {
        k: s[k]["mean"] for k in ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "road")
    } == {
        "average_drop": 50.0,
        "increase_in_confidence": 100.0,
        "deletion_auc": 0.25,
        "insertion_auc": 0.75,
        "road": 0.1,
    }


def test_road_noise_is_seeded_per_pair_not_per_group():
    """With road_noise > 0 a pair's value is the same whether its image is scored alone or beside another
    (grouping, batching and the rank count change which images share a call)."""
    model, f = _tiny_model(), _settings(metrics=["road"], road_noise=0.3)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 20, 20)
    maps = torch.rand(3, 20, 20)
    targets = torch.tensor([[0, 1], [1, 2], [1, 4]])
    seeds = [pair_seed(0, "a", 1), pair_seed(0, "b", 2), pair_seed(0, "b", 4)]
    together = score_pairs(model, images, targets, maps, f, seeds)["road"]
    alone_a = score_pairs(model, images[:1], targets[:1], maps[:1], f, seeds[:1])["road"]
    alone_b = score_pairs(model, images[1:], targets[1:] - torch.tensor([1, 0]), maps[1:], f, seeds[1:])["road"]
    torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), rtol=0, atol=1e-6)
    quiet = score_pairs(model, images, targets, maps, _settings(metrics=["road"]), seeds)["road"]
    assert (together - quiet).abs().max() > 1e-4  # the noise is drawn at all


def test_summary_is_the_mean_over_pairs_and_its_interval_a_bootstrap_over_images():
    empty = score_pairs(
        _tiny_model(),
        torch.randn(1, 3, 8, 8),
        torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0, 8, 8),
        _settings(metrics=["average_drop", "road"]),
        [],
    )
    records = {
        "a": {"classes": ["x", "y"], "drop": [0.5, 0.1], "increase": [False, False], "road": [0.2, -0.1]},
        "b": {"classes": ["x"], "drop": [0.0], "increase": [True], "road": [0.4]},
        "c": {"classes": [], **{k: v.tolist() for k, v in empty.items()}},  # what the stage writes for no pair
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
    ckpt = fixed_checkpoint(tmp_path / "given.pt")
    run = tmp_path / "run"
    args = [f"model.checkpoint={ckpt}", "faithfulness.enabled=true", *FAST, f"hydra.run.dir={run}"]
    proc = run_cli(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    art = artifact_dir(tmp_path / "cache", "faithfulness")
    per_image = json.loads((art / "per_image.json").read_text())
    summary = json.loads((art / "metrics.json").read_text())
    assert json.loads((run / "metrics.json").read_text())["faithfulness"] == summary
    assert json.loads((run / "faithfulness_per_image.json").read_text()) == per_image  # for the leaderboard
    maps_dir = artifact_dir(tmp_path / "cache", "cams") / "maps"
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
    ckpt = fixed_checkpoint(tmp_path / "given.pt")
    common = [f"model.checkpoint={ckpt}", "stage=faithfulness", *FAST]
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = {}
    for name, extra in (("c1", []), ("c3", ["faithfulness.batch_size=1"])):
        env = {"WSSS_CACHE": str(tmp_path / name), **one_thread}
        proc = run_cli(tmp_path, [*common, *extra, f"hydra.run.dir={tmp_path / name}_run"], env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = artifact_dir(tmp_path / name, "faithfulness")
    two = torchrun(tmp_path, 2, [*common, f"hydra.run.dir={tmp_path / 'two'}"], "c2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = runs["c1"], artifact_dir(tmp_path / "c2", "faithfulness")
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


@pytest.mark.slow
def test_a_background_only_image_of_its_own_size_keeps_all_five_metrics(tmp_path):
    """dataset=folder: one image with no label and a size no other image has is a group without pairs; the run
    ends with all five metrics, that image's record holding every column, empty."""
    from PIL import Image

    from tests.data_fixtures import build_folder, read_csv_rows, write_csv_rows
    from wsss.data.folder import FolderSource
    from wsss.models import Classifier, save_checkpoint

    root = build_folder(tmp_path, masks="none", n=6)
    rows = read_csv_rows(root / "labels.csv")
    rows[1][1] = ""  # background only
    write_csv_rows(root / "labels.csv", rows)
    odd = next((root / "images").rglob(f"{Path(rows[1][0]).stem}.jpg"))
    Image.open(odd).resize((40, 48)).save(odd)
    torch.manual_seed(3)
    ckpt = tmp_path / "given.pt"
    names = FolderSource(root, "train").class_names  # the classes the edited labels file still names
    save_checkpoint(ckpt, Classifier(len(names)), names)
    args = ["dataset=folder", f"dataset.root={root}", f"model.checkpoint={ckpt}", "stage=faithfulness", *FAST[:3]]
    proc = run_cli(tmp_path, [*args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    art = artifact_dir(tmp_path / "cache", "faithfulness")
    summary = json.loads((art / "metrics.json").read_text())
    per_image = json.loads((art / "per_image.json").read_text())
    metrics = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "road")
    assert all(summary[n]["mean"] is not None for n in metrics), summary
    odd_id = odd.relative_to(root / "images").with_suffix("").as_posix()
    assert per_image[odd_id] == {
        c: [] for c in ("classes", "drop", "increase", "deletion_auc", "insertion_auc", "road")
    }
    assert summary["pairs"] == sum(len(r["classes"]) for r in per_image.values()) > 0
