"""The leaderboard: paired differences, seed folds, refusals, and the `-m` sweep's callback against the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.tiny import error_line, run_cli, tiny_cfg
from wsss.leaderboard import OUTPUTS, to_markdown
from wsss.metrics.bootstrap import ImageStats, interval, resample_weights, resampled_metrics
from wsss.pipeline import Pipeline
from wsss.report import ReportError, build, main
from wsss.stages.evaluate_report import _copy_reports
from wsss.stages.faithfulness import summarise


def _run(tmp_path: Path, name: str, overrides: list[str], cli: list[str] | None = None) -> Path:
    """An evaluate run directory as `python -m wsss.run` leaves it (its overrides in .hydra/overrides.yaml)."""
    run_dir = tmp_path / "runs" / name
    (run_dir / ".hydra").mkdir(parents=True)
    Pipeline(tiny_cfg(tmp_path, ["stage=evaluate", *overrides]), run_dir=run_dir).run("evaluate")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(cli if cli is not None else overrides))
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    return _run(tmp, "cam", ["cam=cam"]), _run(tmp, "gradcampp", ["cam=gradcampp"])


def test_rows_intervals_and_paired_difference(two_runs, tmp_path):
    a, b = two_runs
    board = build([a, b], reference="cam=cam", resamples=200, seed=0, base=tmp_path)
    rows = {r["name"]: r for r in board["rows"]}
    assert list(rows) == ["cam=cam", "cam=gradcampp"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    sa, sb = ImageStats.load(a / "per_image.npz"), ImageStats.load(b / "per_image.npz")
    w = resample_weights(sa.num_images, 200, 0)
    ra, rb = resampled_metrics(sa, w), resampled_metrics(sb, w)
    for k in ("miou", "sweep_best_miou", "pxap", "maxboxacc", "maxboxacc_v2"):
        assert rows["cam=cam"]["metrics"][k]["ci"] == pytest.approx(interval(ra[k]), abs=1e-4), k
        e = rows["cam=gradcampp"]["metrics"][k]
        assert e["diff_ci"] == pytest.approx(interval(rb[k] - ra[k]), abs=1e-4), k
        assert e["diff_excludes_0"] == (e["diff_ci"][0] > 0 or e["diff_ci"][1] < 0)
    assert rows["cam=gradcampp"]["metrics"]["miou"]["diff"] == pytest.approx(mb["miou"] - ma["miou"], abs=1e-4)
    assert rows["cam=cam"]["metrics"]["maxboxacc"]["value"] == ma["boxes"]["maxboxacc"]
    cams = b.parents[1] / "cache" / "cams" / mb["cam"]["key"] / "manifest.json"  # the artifact that timed it
    assert rows["cam=gradcampp"]["cam_cost"] == json.loads(cams.read_text())["cost"]  # carried over as it is
    assert rows["cam=cam"]["model_key"] == rows["cam=gradcampp"]["model_key"]


def test_a_run_against_itself_differs_by_exactly_zero(two_runs, tmp_path):
    a, _ = two_runs
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    (twin / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["cam=cam", "evaluate.overlays=3"]))
    other_model = tmp_path / "other_model"
    shutil.copytree(a, other_model)
    m = json.loads((other_model / "metrics.json").read_text())
    m["model"]["key"] = "another-trained-model"
    (other_model / "metrics.json").write_text(json.dumps(m))
    (other_model / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["cam=cam", "seed=5"]))
    board = build([a, twin, other_model], resamples=300, base=tmp_path)
    # Another model is never paired with this one: it is the reference of its own model (the first row's
    # settings but seed), so it gets no row in the differences table.
    assert board["rows"][2]["reference"] == board["rows"][2]["name"] == "seed=5"
    row = board["rows"][1]
    assert row["reference"] == board["rows"][0]["name"]
    for k, e in row["metrics"].items():
        assert e["diff"] == 0.0, k
        assert e["diff_ci"] == [0.0, 0.0], k
        assert not e["diff_excludes_0"]


def test_seed_fold_is_mean_and_sample_std(two_runs, tmp_path):
    a, _ = two_runs
    base = json.loads((a / "metrics.json").read_text())["miou"]
    dirs = []
    for seed, shift in ((0, 0.0), (1, 2.0), (2, 5.0)):  # the same images, point values moved per "seed"
        d = tmp_path / f"s{seed}"
        shutil.copytree(a, d)
        m = json.loads((d / "metrics.json").read_text())
        m["miou"] += shift
        (d / "metrics.json").write_text(json.dumps(m))
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["cam=cam", f"seed={seed}"]))
        dirs.append(d)
    board = build(dirs, resamples=50, base=tmp_path)
    (fold,) = board["seed_folds"]
    assert fold["seeds"] == ["0", "1", "2"]
    # the injected values: base + 0, 2, 5 -> mean base + 7 / 3, sample std sqrt(((7/3)^2 + (1/3)^2 + (8/3)^2) / 2)
    assert fold["metrics"]["miou"]["mean"] == pytest.approx(base + 7 / 3, abs=1e-4)
    assert fold["metrics"]["miou"]["std"] == pytest.approx(np.sqrt((49 + 1 + 64) / 9 / 2), abs=1e-4)


def test_bad_input_is_one_error_line(two_runs, tmp_path, capsys):
    a, b = two_runs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert f"{empty}: no metrics.json" in capsys.readouterr().err
    assert main([str(a), str(b), "--reference", "cam=layercam"]) == 2
    assert "--reference cam=layercam: no run has that override" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(b, other)
    m = json.loads((other / "metrics.json").read_text())
    m["dataset"]["split"] = "val"
    (other / "metrics.json").write_text(json.dumps(m))
    assert main([str(a), str(other), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsss: error: runs of different datasets or splits")
    assert str(other) in err
    no_stats = tmp_path / "no_stats"
    shutil.copytree(a, no_stats)
    (no_stats / "per_image.npz").unlink()
    assert main([str(no_stats)]) == 2
    assert "per_image.npz: not found" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in OUTPUTS)  # nothing written on a refusal


def test_negative_bootstrap_is_refused(tmp_path):
    proc = run_cli(tmp_path, ["evaluate.bootstrap=-1"], timeout=120)
    assert proc.returncode == 2
    assert "evaluate.bootstrap=-1: must be >= 0" in error_line(proc.stderr)
    assert "Callback" not in proc.stderr  # the leaderboard callback has every hook Hydra calls on a single run


@pytest.mark.slow
def test_sweep_writes_the_leaderboard_and_the_cli_rewrites_it_byte_for_byte(tmp_path):
    sweep = tmp_path / "multirun"
    proc = run_cli(tmp_path, ["-m", "cam=cam,gradcampp", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    text = (sweep / "leaderboard.md").read_text()
    assert "| cam=cam |" in text
    assert "| cam=gradcampp |" in text
    assert "## Paired differences" in text
    assert text in proc.stdout  # the sweep ends by printing the table
    assert "Callback" not in proc.stderr  # no hook of the leaderboard callback is missing or raised
    first = {n: (sweep / n).read_bytes() for n in OUTPUTS}
    for n in OUTPUTS:
        (sweep / n).unlink()
    cli = subprocess.run(
        [sys.executable, "-m", "wsss.report", str(sweep)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    for n in OUTPUTS:
        assert (sweep / n).read_bytes() == first[n], n


def test_boxes_skipped_without_annotations_and_a_bad_box_names_its_xml(tmp_path, caplog):
    """A dataset without boxes scores everything else and says so in one line; a box outside its image stops
    the run with one `wsss: error:` line naming the XML."""
    cfg = tiny_cfg(tmp_path, ["stage=pseudo_masks"])
    Pipeline(cfg).run("pseudo_masks")  # generates the tiny set and its CAMs
    root = tmp_path / "data" / "synthetic"
    shutil.move(root / "Annotations", tmp_path / "Annotations")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level("INFO"):
        Pipeline(tiny_cfg(tmp_path, ["stage=evaluate"]), run_dir=run_dir).run("evaluate")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["boxes"] is None
    assert "maxboxacc" not in metrics["intervals"]
    assert "miou" in metrics["intervals"]
    assert sum("has no ground-truth boxes: box metrics skipped" in r.getMessage() for r in caplog.records) == 1
    shutil.move(tmp_path / "Annotations", root / "Annotations")
    xml = root / "Annotations" / "train_00003.xml"
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:start] + "999" + text[text.index("</xmax>") :])  # beyond the 64-px image
    proc = run_cli(tmp_path, ["stage=evaluate"], timeout=300)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert str(xml) in line
    assert "999" in line


def test_evaluates_resamples_are_stored_and_reused_only_when_they_match(two_runs):
    a, _ = two_runs
    stats = ImageStats.load(a / "per_image.npz")
    cached = stats.cached_resampled(1000, 0, None)  # evaluate.bootstrap=1000, bootstrap_seed=0 by default
    fresh = resampled_metrics(stats, resample_weights(stats.num_images, 1000, 0))
    assert set(cached) == set(fresh)
    for k, v in fresh.items():
        np.testing.assert_array_equal(cached[k], v)
    assert stats.cached_resampled(1000, 1, None) is None  # another seed
    assert stats.cached_resampled(999, 0, None) is None  # another number of resamples
    assert stats.cached_resampled(1000, 0, 3) is None  # mIoU at a chosen threshold, not at the masks


def test_runs_of_two_checkpoints_are_not_paired(two_runs, tmp_path):
    """Given checkpoints are told apart by the train key (which covers their bytes), so never paired."""
    a, _ = two_runs
    cache = a.parents[1] / "cache" / "train"
    (model,) = cache.glob("*/model.pt")
    other = tmp_path / "other.pt"
    state = torch.load(model, weights_only=True)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other)
    tmp = a.parents[1]
    runs = [_run(tmp, f"ckpt{i}", ["cam=cam", f"model.checkpoint={p}"]) for i, p in enumerate((model, other))]
    m0, m1 = (json.loads((r / "metrics.json").read_text())["model"] for r in runs)
    assert m0["checkpoint"] == str(model.resolve())
    assert m0["key"] != m1["key"]
    board = build(runs, resamples=50, base=tmp_path)
    assert board["rows"][1]["reference"] is None  # no reference row of its own model, and never row 0
    assert "diff" not in board["rows"][1]["metrics"]["miou"]


def test_faithfulness_block_becomes_columns_with_its_intervals(two_runs, tmp_path):
    """A run whose metrics.json has evaluate's `faithfulness` block shows its means and intervals as columns
    (markdown and CSV); a run without one shows '-'."""
    a, b = two_runs
    with_block = tmp_path / "faith"
    shutil.copytree(a, with_block)
    m = json.loads((with_block / "metrics.json").read_text())
    m["faithfulness"] = {
        "images": 8,
        "pairs": 11,
        "average_drop": {"mean": 12.5, "better": "lower", "interval": [10.25, 14.75]},
        "insertion_auc": {"mean": 0.61, "better": "higher", "interval": [0.55, 0.66]},
    }
    (with_block / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "out"
    assert main([str(with_block), str(b), "--out", str(out), "--resamples", "50"]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "| run | AD (lower is better) | Insertion AUC (higher is better) |" in md
    assert "| 12.50 [10.25, 14.75] | 0.610 [0.550, 0.660] |" in md  # percent to 2 decimals, areas to 3
    assert "| - | - |" in md  # the run without the block
    header, first = (out / "leaderboard.csv").read_text().splitlines()[:2]
    cols = header.split(",")
    row = dict(zip(cols, first.split(","), strict=True))
    assert (row["average_drop"], row["average_drop_lo"], row["average_drop_hi"]) == ("12.5", "10.25", "14.75")
    assert "road" not in cols


def _with_faithfulness(src: Path, dest: Path, shift: float, rng: np.random.Generator) -> dict:
    """A copy of run `src` as evaluate leaves it with `faithfulness.enabled=true`: per-pair values drawn from
    `rng` (+ `shift` on the deletion AUC), the stage's summary of them in metrics.json."""
    shutil.copytree(src, dest)
    ids = ImageStats.load(dest / "per_image.npz").ids
    records = {}
    for n, image_id in enumerate(ids):
        k = 1 + n % 3
        records[image_id] = {
            "classes": [f"c{j}" for j in range(k)],
            "drop": rng.uniform(0, 1, k).tolist(),
            "increase": rng.integers(0, 2, k).astype(float).tolist(),
            "deletion_auc": (rng.uniform(0, 0.5, k) + shift).tolist(),
        }
    m = json.loads((dest / "metrics.json").read_text())
    m["faithfulness"] = summarise(records, ids, 100, 0)
    (dest / "metrics.json").write_text(json.dumps(m))
    (dest / "faithfulness_per_image.json").write_text(json.dumps(records))
    return records


def _ratio_loop(records: dict, column: str, draws: np.ndarray, scale: float) -> np.ndarray:
    """Per resample (a row of image indices drawn with replacement): sum of the drawn images' pair values over
    the drawn images' pair counts, image by image in float64."""
    ids = list(records)
    out = []
    for row in draws:
        total, pairs = 0.0, 0
        for i in row:
            total += float(sum(records[ids[i]][column]))
            pairs += len(records[ids[i]]["classes"])
        out.append(scale * total / pairs)
    return np.array(out)


def test_faithfulness_pairs_give_intervals_and_paired_differences_over_the_same_resamples(two_runs, tmp_path):
    """With each run's per-pair values beside metrics.json, the leaderboard resamples the images as it does for
    mIoU: the values are the summary's means, the intervals and the paired differences equal a loop over the
    drawn image indices, and a shift of 0.2 in every deletion AUC is a difference whose interval excludes 0."""
    a, b = two_runs
    rng = np.random.default_rng(3)
    ra = _with_faithfulness(a, tmp_path / "cam", 0.0, rng)
    rb = _with_faithfulness(b, tmp_path / "gradcampp", 0.2, rng)
    board = build([tmp_path / "cam", tmp_path / "gradcampp"], reference="cam=cam", resamples=300, seed=4)
    rows = {r["name"]: r for r in board["rows"]}
    draws = np.random.default_rng(4).integers(0, len(ra), (300, len(ra)))
    for name, column, scale in (("average_drop", "drop", 100.0), ("deletion_auc", "deletion_auc", 1.0)):
        la, lb = _ratio_loop(ra, column, draws, scale), _ratio_loop(rb, column, draws, scale)
        ea, eb = rows["cam=cam"]["faithfulness"][name], rows["cam=gradcampp"]["faithfulness"][name]
        ma = json.loads((tmp_path / "cam" / "metrics.json").read_text())["faithfulness"][name]["mean"]
        assert ea["value"] == ma
        assert ea["ci"] == pytest.approx(interval(la), abs=1e-4), name
        assert eb["ci"] == pytest.approx(interval(lb), abs=1e-4), name
        assert eb["diff_ci"] == pytest.approx(interval(lb - la), abs=1e-4), name
        assert "diff" not in ea  # the reference row itself
    d = rows["cam=gradcampp"]["faithfulness"]["deletion_auc"]
    pair_mean = [np.mean([x for rec in r.values() for x in rec["deletion_auc"]]) for r in (ra, rb)]
    assert d["diff"] == pytest.approx(pair_mean[1] - pair_mean[0], abs=1e-4)
    assert d["diff_excludes_0"]
    assert d["diff_ci"][0] > 0.1
    assert not rows["cam=gradcampp"]["faithfulness"]["average_drop"]["diff_excludes_0"]  # same distribution
    out = tmp_path / "out"
    assert main([str(tmp_path / "cam"), str(tmp_path / "gradcampp"), "--out", str(out), "--resamples", "300"]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "| run | reference | AD diff | IC diff | Deletion AUC diff |" in md
    assert "| cam=gradcampp | cam=cam |" in md.split("Faithfulness, paired")[1]
    header, _, second = (out / "leaderboard.csv").read_text().splitlines()[:3]
    row = dict(zip(header.split(","), second.split(","), strict=True))
    assert float(row["deletion_auc_diff_lo"]) > 0.1


def test_faithfulness_pairs_that_do_not_give_the_summary_are_refused_naming_the_file(two_runs, tmp_path):
    a, _ = two_runs
    records = _with_faithfulness(a, tmp_path / "stale", 0.0, np.random.default_rng(0))
    first = next(iter(records))
    records[first]["drop"] = [x + 0.9 for x in records[first]["drop"]]  # an older run's values, say
    (tmp_path / "stale" / "faithfulness_per_image.json").write_text(json.dumps(records))
    with pytest.raises(ReportError, match=r"stale/faithfulness_per_image.json: its average_drop .* a stale copy"):
        build([tmp_path / "stale"], resamples=20)


def test_evaluate_removes_a_report_file_it_did_not_write_from_the_run_directory(tmp_path):
    out_dir, run_dir = tmp_path / "artifact", tmp_path / "run"
    out_dir.mkdir()
    run_dir.mkdir()
    (out_dir / "metrics.json").write_text("{}")
    (run_dir / "faithfulness_per_image.json").write_text('{"old": {}}')  # a faithfulness run's, earlier
    _copy_reports(out_dir, run_dir)
    assert (run_dir / "metrics.json").read_text() == "{}"
    assert not (run_dir / "faithfulness_per_image.json").exists()


def test_seed_folds_carry_faithfulness_and_each_seeds_paired_difference(two_runs, tmp_path):
    """Three "seeds" (three model keys), each with a cam and a gradcampp run: the fold of each method is the
    mean +- std of its rows' values, faithfulness included, and of each seed's paired difference on its own
    model; leaderboard.md shows both."""
    a, b = two_runs
    rng = np.random.default_rng(7)
    dirs = []
    for seed in (0, 1, 2):
        for src, cam, shift in ((a, "cam", 0.0), (b, "gradcampp", 0.1 * (seed + 1))):
            d = tmp_path / f"s{seed}_{cam}"
            _with_faithfulness(src, d, shift, rng)
            m = json.loads((d / "metrics.json").read_text())
            m["model"]["key"] = f"model-of-seed-{seed}"
            (d / "metrics.json").write_text(json.dumps(m))
            (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"cam={cam}", f"seed={seed}"]))
            dirs.append(d)
    board = build(dirs, reference="cam=cam", resamples=100, base=tmp_path)
    folds = {f["name"]: f for f in board["seed_folds"]}
    assert sorted(folds) == ["cam=cam", "cam=gradcampp"]
    rows = [r for r in board["rows"] if r["name"].startswith("cam=gradcampp")]
    assert [r["reference"] for r in rows] == [f"cam=cam seed={s}" for s in (0, 1, 2)]  # each on its own model
    f = folds["cam=gradcampp"]
    for k in ("deletion_auc", "average_drop"):
        vals = [r["faithfulness"][k]["value"] for r in rows]
        diffs = [r["faithfulness"][k]["diff"] for r in rows]
        assert f["faithfulness"][k]["mean"] == pytest.approx(np.mean(vals), abs=1e-4)
        assert f["faithfulness"][k]["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-4)
        assert f["faithfulness"][k]["diff_mean"] == pytest.approx(np.mean(diffs), abs=1e-4)
        assert f["faithfulness"][k]["diff_std"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-4)
    assert f["faithfulness"]["deletion_auc"]["diff_seeds_excluding_0"] == 3  # shifts of 0.1, 0.2, 0.3
    miou_diffs = [r["metrics"]["miou"]["diff"] for r in rows]
    assert f["metrics"]["miou"]["diff_mean"] == pytest.approx(np.mean(miou_diffs), abs=1e-4)
    for e in (folds["cam=cam"]["faithfulness"]["deletion_auc"], folds["cam=cam"]["metrics"]["miou"]):
        assert "diff_mean" not in e  # the references: no difference (not one of 0 from themselves)
    md = to_markdown(board)
    over = md.split("## Over seeds")[1]
    assert "| runs | seeds | mIoU |" in over
    assert "Deletion AUC |" in over.splitlines()[2]  # the header, faithfulness columns after the others
    line = next(ln for ln in over.split("Paired differences over seeds")[1].splitlines() if "gradcampp" in ln)
    dm, ds = f["faithfulness"]["deletion_auc"]["diff_mean"], f["faithfulness"]["deletion_auc"]["diff_std"]
    assert f"{dm:+.3f} +- {ds:.3f} (3/3)" in line
