"""End to end: the stage graph on a tiny synthetic set, cache reuse, errors, and a `-m` sweep in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from tests.tiny import FIGURES, FORK_SERVER, TINY, assert_reported_iou, ground_truth, irn_mask, loop_iou, tiny_cfg
from wsss.config import register_configs
from wsss.pipeline import Pipeline

register_configs()


def _np_miou(pairs: list[tuple[np.ndarray, np.ndarray]], num_labels: int) -> float:
    """mIoU in percent over present labels from (gt, pred) pairs, 255 in either ignored: numpy bincounts (fast
    enough for a sweep of thresholds; `loop_iou` counts pixel by pixel)."""
    cm = np.zeros((num_labels, num_labels), np.int64)
    for gt, pred in pairs:
        ok = (gt != 255) & (pred != 255)
        cm += np.bincount(gt[ok].astype(np.int64) * num_labels + pred[ok], minlength=num_labels**2).reshape(
            num_labels, num_labels
        )
    iou = []
    for c in range(num_labels):
        union = cm[c].sum() + cm[:, c].sum() - cm[c, c]
        if union:
            iou.append(100.0 * cm[c, c] / union)
    return float(np.mean(iou))


def _assert_metrics_recomputed(tmp_path: Path, metrics: dict, masks_dir: Path, num_images: int = 24) -> None:
    """metrics.json's mIoU and per-class IoU (headline and `pseudo_masks`) equal a pixel-by-pixel count over the
    written PNG masks and the ground truth, both read with PIL."""
    names = ["background", *metrics["class_names"]]
    ids = list(metrics["per_image_miou"])
    assert len(ids) == metrics["num_images"] == num_images
    pairs = [(ground_truth(tmp_path, i), np.array(Image.open(masks_dir / f"{i}.png"))) for i in ids]
    iou, miou = loop_iou(pairs, len(names))
    assert_reported_iou(metrics, iou, miou, names)
    assert_reported_iou(metrics["pseudo_masks"], iou, miou, names)


def _cfg(tmp_path: Path, overrides: list[str]):
    return tiny_cfg(tmp_path, overrides)


def test_pipeline_runs_and_reuses(tmp_path):
    cfg = _cfg(tmp_path, ["stage=evaluate", *FIGURES])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pipe = Pipeline(cfg, run_dir=run_dir)
    manifest = pipe.run("evaluate")
    assert pipe.report == {"train": "ran", "cams": "ran", "pseudo_masks": "ran", "evaluate": "ran"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _assert_metrics_recomputed(tmp_path, metrics, pipe.artifact_dir("pseudo_masks") / "masks")
    assert manifest["miou"] == metrics["miou"]
    assert metrics["model"] == {"seed": 0, "key": pipe.key("train")}  # which trained model, told apart by seed
    assert metrics["environment"]["torch"] == torch.__version__
    assert metrics["environment"]["device"] == "cpu"
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


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return torch.load(pipe.artifact_dir("train") / "model.pt", weights_only=True)["state_dict"]


def test_same_seed_same_weights_maps_masks_and_metrics(tmp_path):
    """Two runs with one seed in separate caches: equal trained tensors, byte-equal CAM files and masks, and the
    same metrics; another seed trains other weights (so the comparison can tell runs apart)."""
    pipes = []
    for i in range(2):
        pipe = Pipeline(_cfg(tmp_path / str(i), ["stage=evaluate"]))
        pipe.run("evaluate")
        pipes.append(pipe)
    a, b = (_weights(p) for p in pipes)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for stage, folder in (("cams", "maps"), ("pseudo_masks", "masks")):
        first, second = (sorted((p.artifact_dir(stage) / folder).iterdir()) for p in pipes)
        assert len(first) == 24
        assert [f.name for f in first] == [f.name for f in second]
        assert [f.name for f, g in zip(first, second, strict=True) if f.read_bytes() != g.read_bytes()] == []
    ma, mb = (json.loads((p.artifact_dir("evaluate") / "metrics.json").read_text()) for p in pipes)
    for k in ("miou", "iou", "scores", "pseudo_masks", "sweep", "pxap", "per_image_miou"):
        assert ma[k] == mb[k], k
    other = Pipeline(_cfg(tmp_path / "2", ["stage=train", "seed=1"]))
    other.run("train")
    c = _weights(other)
    assert any(not torch.equal(a[k], c[k]) for k in a)


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
    with pytest.raises(FileNotFoundError, match=r"train_00000\.png"):
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
    assert log.count("train: running") == 1, log[-3000:]
    assert log.count("train: reusing") == 0
    assert log.count("cams: running") == 1
    assert log.count("cams: reusing") == 1
    assert log.count("pseudo_masks: running") == 2
    assert len(list((tmp_path / "cache" / "pseudo_masks").glob("*/manifest.json"))) == 2


@pytest.mark.slow
def test_cli_default_stage_prints_table(tmp_path):
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "wsss.run", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "mIoU" in log
    assert "disc" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (masks,) = (tmp_path / "cache" / "pseudo_masks").glob("*/masks")
    _assert_metrics_recomputed(tmp_path, metrics, masks)
    assert f"{'mIoU':<16} {metrics['miou']:7.2f}" in log  # the table prints the same number


@pytest.mark.parametrize(
    ("override", "needle"),
    [("stage=nope", "stage/nope"), ("cam=nope", "cam/nope"), ("pseudo.threshold=abc", "abc")],
)
def test_cli_bad_overrides_fail_at_composition(override, needle):
    proc = FORK_SERVER.run([override], dict(os.environ), timeout=120)
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
    """The reported train mIoU sits at the best threshold of the val split, both recomputed here from the
    stored maps and the ground truth with numpy (IRN's argmax rule, a confusion matrix per threshold)."""
    thresholds = [round(0.02 * i, 2) for i in range(50)]
    for seed in range(4):  # the first tiny model whose two splits disagree on the best threshold
        cfg = _cfg(
            tmp_path, ["stage=evaluate", "evaluate.select_on=val", "evaluate.thresholds=0.0:0.98:0.02", f"seed={seed}"]
        )
        pipe = Pipeline(cfg)
        pipe.run("evaluate")

        def curve(split: str, pipe=pipe) -> list[float]:
            maps_dir = pipe.artifact_dir("cams", split) / "maps"
            stored = {p.stem: np.load(p) for p in sorted(maps_dir.glob("*.npz"))}
            return [
                _np_miou([(ground_truth(tmp_path, i), irn_mask(z["maps"], z["keys"], t)) for i, z in stored.items()], 7)
                for t in thresholds
            ]

        val, train = curve("val"), curve("train")
        chosen = thresholds[int(np.argmax(val))]  # first maximum
        if thresholds[int(np.argmax(train))] != chosen:  # the splits disagree, so the choice is tested
            break
    else:
        pytest.fail("no seed made the splits disagree: the test would not tell the two choices apart")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert metrics["threshold_chosen_on"] == "val"
    assert metrics["split"] == "train"
    assert metrics["reported_threshold"] == chosen
    assert metrics["miou"] == pytest.approx(train[thresholds.index(chosen)], abs=1e-3)


def test_stored_maps_are_the_engines_multiscale_maps_of_the_trained_model(tmp_path):
    """Every npz equals `cam.multiscale` on the trained checkpoint, read at cam.output_stride (float16 store)."""
    from wsss.cam import build_cam
    from wsss.data import build_source
    from wsss.data.transforms import normalize
    from wsss.models import load_checkpoint

    cfg = _cfg(tmp_path, ["stage=cams", "cam.scales=[1.0,0.5]"])
    pipe = Pipeline(cfg)
    pipe.run("cams")
    model, _ = load_checkpoint(pipe.artifact_dir("train") / "model.pt")
    model.set_output_stride(8).eval()
    source = build_source(pipe.cfg.dataset, "train")
    with build_cam("cam", model, target_layer="backbone.layer4") as cam:
        for image_id in source.ids:
            labels = torch.as_tensor(source.labels(image_id))
            images = normalize(source.load_image(image_id)[None])
            high, low = cam.multiscale(images, labels[None], scales=(1.0, 0.5), flip=True)
            stored = np.load(pipe.artifact_dir("cams") / "maps" / f"{image_id}.npz")
            assert stored["keys"].tolist() == labels.tolist()
            np.testing.assert_allclose(stored["maps"], high[0].numpy(), atol=1e-3)  # float16: 2^-11 near 1
            np.testing.assert_allclose(stored["strided"], low[0].numpy(), atol=1e-3)


@pytest.mark.parametrize("rule", [["pseudo.threshold=0.35"], ["pseudo.conf_fg=0.6", "pseudo.conf_bg=0.2"]])
def test_written_masks_are_the_rule_applied_to_the_stored_maps(tmp_path, rule):
    pipe = Pipeline(_cfg(tmp_path, ["stage=pseudo_masks", *rule]))
    pipe.run("pseudo_masks")
    for path in sorted((pipe.artifact_dir("cams") / "maps").glob("*.npz")):
        z = np.load(path)
        if len(rule) == 1:
            expected = irn_mask(z["maps"], z["keys"], 0.35)
        else:  # IRN's confident band: fg above 0.6, bg at or below 0.2, 255 between
            fg = irn_mask(z["maps"], z["keys"], 0.6)
            best = z["maps"].astype(np.float64).max(0) if len(z["keys"]) else np.zeros(fg.shape)
            expected = np.where(fg > 0, fg, np.where(best > 0.2, 255, 0)).astype(np.uint8)
        got = np.array(Image.open(pipe.artifact_dir("pseudo_masks") / "masks" / f"{path.stem}.png"))
        np.testing.assert_array_equal(got, expected, err_msg=path.stem)


def _bilinear_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (K, h, w) -> (K, H, W), half-pixel centres (align_corners=False), float64 loops."""
    k, h, w = x.shape
    out = np.zeros((k, *size))
    for i in range(size[0]):
        y = max((i + 0.5) * h / size[0] - 0.5, 0.0)
        y0 = min(int(y), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(size[1]):
            xx = max((j + 0.5) * w / size[1] - 0.5, 0.0)
            x0 = min(int(xx), w - 1)
            x1, fx = min(x0 + 1, w - 1), xx - x0
            top = x[:, y0, x0] * (1 - fx) + x[:, y0, x1] * fx
            bottom = x[:, y1, x0] * (1 - fx) + x[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("store", ["float16", "uint8", "quarter"])
def test_cam_stores_round_trip(tmp_path, store):
    from wsss.artifacts import read_cams, write_cams

    rng = np.random.default_rng(0)
    maps = rng.random((3, 13, 18)).astype(np.float32)
    strided = rng.random((3, 4, 5)).astype(np.float32)
    write_cams(tmp_path / "x.npz", np.array([4, 0, 2]), maps, strided, store)
    got = read_cams(tmp_path / "x.npz")
    assert got["keys"].tolist() == [4, 0, 2]
    assert got["maps"].shape == (3, 13, 18)
    assert got["maps"].dtype == np.float32
    np.testing.assert_array_equal(got["strided"], strided.astype(np.float16).astype(np.float32))
    if store == "float16":
        np.testing.assert_array_equal(got["maps"], maps.astype(np.float16).astype(np.float32))
    elif store == "uint8":
        np.testing.assert_allclose(got["maps"], maps, atol=0.5 / 255 + 1e-7)
        assert set(np.unique(np.rint(got["maps"] * 255) - got["maps"] * 255).round(4)) == {0.0}
    else:
        expected = _bilinear_reference(strided.astype(np.float16).astype(np.float64), (13, 18))
        np.testing.assert_allclose(got["maps"], expected, atol=1e-6)
    sizes = {}
    for other in ("float16", "uint8", "quarter"):
        write_cams(tmp_path / f"{other}.npz", np.array([4, 0, 2]), maps, strided, other)
        sizes[other] = (tmp_path / f"{other}.npz").stat().st_size
    assert abs(sizes["float16"] - sizes["uint8"] - 3 * 13 * 18) <= 64  # one byte less per value (headers ~ alike)
    assert sizes["quarter"] < sizes["uint8"] - 3 * 13 * 18  # no full-resolution member at all


def test_cams_in_chunks_equal_one_call():
    """A tiny memory budget splits a batch into single images and single classes; the maps do not change."""
    from types import SimpleNamespace

    from wsss.cam import CAM
    from wsss.models import Classifier
    from wsss.stages.cams import _multiscale

    torch.manual_seed(0)
    model = Classifier(6).eval()
    images = torch.randn(3, 3, 40, 36)
    classes = torch.tensor([[0, 4, 2], [1, -1, -1], [5, 3, -1]])
    with CAM(model, "backbone.layer4") as cam:
        whole = _multiscale(cam, images, classes, SimpleNamespace(memory_mb=1024, scales=[1.0, 0.5], flip=True))
        calls = []
        original = cam.multiscale
        cam.multiscale = lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
        parts = _multiscale(cam, images, classes, SimpleNamespace(memory_mb=0, scales=[1.0, 0.5], flip=True))
    assert calls == [(1, 1)] * 9  # 3 images x 3 classes, one at a time
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("store", ["uint8", "quarter"])
def test_other_stores_run_end_to_end(tmp_path, store):
    """The CAM stores that quantise or drop the full-resolution maps: the masks are the rule applied to the maps
    as read back, and the reported IoUs are those of the masks, recomputed pixel by pixel."""
    from wsss.artifacts import read_cams

    pipe = Pipeline(_cfg(tmp_path, [f"cam.store={store}"]))
    manifest = pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert manifest["miou"] == metrics["miou"]
    assert len(metrics["sweep"]["miou"]) == 96
    masks = pipe.artifact_dir("pseudo_masks") / "masks"
    _assert_metrics_recomputed(tmp_path, metrics, masks)
    for path in sorted((pipe.artifact_dir("cams") / "maps").glob("*.npz")):
        z = read_cams(path)
        got = np.array(Image.open(masks / f"{path.stem}.png"))
        np.testing.assert_array_equal(got, irn_mask(z["maps"], z["keys"], 0.5), err_msg=path.stem)
    z = np.load(next((pipe.artifact_dir("cams") / "maps").glob("*.npz")))
    assert str(z["store"]) == store
    assert ("maps" in z.files) == (store == "uint8")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit_b_16", "swin_t", "convnext_tiny"])
def test_transformer_and_convnext_backbones_run_end_to_end(tmp_path, backbone):
    """torchvision's ViT, Swin and ConvNeXt under the GAP head, at 64 px on 8 training images (running is the
    point, not quality; the reported IoUs are still those of the written masks, recomputed pixel by pixel)."""
    pipe = Pipeline(_cfg(tmp_path, [f"model={backbone}", "cam.scales=[1.0,0.5]", "dataset.synthetic.num_train=8"]))
    manifest = pipe.run("evaluate")
    metrics = json.loads((pipe.artifact_dir("evaluate") / "metrics.json").read_text())
    assert manifest["miou"] == metrics["miou"]
    _assert_metrics_recomputed(tmp_path, metrics, pipe.artifact_dir("pseudo_masks") / "masks", num_images=8)
    z = np.load(next((pipe.artifact_dir("cams") / "maps").glob("*.npz")))
    assert z["maps"].shape[1:] == (64, 64)
    assert np.isfinite(z["maps"].astype(np.float32)).all()
