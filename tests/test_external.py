"""Other methods' maps and masks (`cam.source`, `pseudo.source`; wsss.external): each format written as its
project's code writes it (IRN step/make_cam.py:55-56, PSA infer_cls.py:77-83, CLIP-ES
generate_cams_voc12.py:209-214), imported, and scored equal to a per-pixel loop with that project's own
background rule; the restricted unpickler; bad input; pairing in the leaderboard."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from tests.tiny import error_line, ground_truth, irn_mask, loop_iou, run_cli, tiny_cfg
from wsss.artifacts import write_cams, write_mask
from wsss.data import build_source
from wsss.errors import ConfigError
from wsss.external import ExternalFileError, read_external, safe_load_npy
from wsss.pipeline import Pipeline


def _source(tmp_path):
    return build_source(tiny_cfg(tmp_path).dataset, "train")  # generates the tiny set under tmp_path/data


def _random_maps(rng, labels, size):
    """Maps of an image's classes as its method leaves them: each divided by its max (IRN: + 1e-5)."""
    raw = rng.random((len(labels), *size)).astype(np.float32) ** 2
    return raw / (raw.max((1, 2), keepdims=True) + 1e-5)


def write_irn(folder: Path, source, seed: int = 0) -> dict[str, tuple]:
    """IRN step/make_cam.py:55-56: {"keys": valid_cat (torch), "cam": strided (torch), "high_res": numpy}."""
    rng, out = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in source.ids:
        labels = source.labels(image_id)
        high = _random_maps(rng, labels, source.image_size(image_id))
        keys = torch.nonzero(torch.as_tensor(source.multi_hot(image_id)))[:, 0]
        strided = torch.from_numpy(high[:, ::4, ::4].copy())
        np.save(folder / f"{image_id}.npy", {"keys": keys, "cam": strided, "high_res": high})
        out[image_id] = (labels, high)
    return out


def _score(tmp_path, gt_of, preds) -> tuple[list, float]:
    return loop_iou([(gt_of(i), p) for i, p in preds.items()], 7)


def _evaluate(tmp_path, overrides, name="run"):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    Pipeline(tiny_cfg(tmp_path, ["evaluate.overlays=0", *overrides]), run_dir=run_dir).run("evaluate")
    return json.loads((run_dir / "metrics.json").read_text())


def _gt(tmp_path):
    return lambda i: ground_truth(tmp_path, i)


def test_irn_folder_scores_as_irn_eval_cam(tmp_path):
    """IRN's eval_cam.py:15-18: pad cam_eval_thres in front of high_res, argmax, keys + 1."""
    source = _source(tmp_path)
    maps = write_irn(tmp_path / "irn", source)
    t = 0.25
    preds = {i: irn_mask(m, k, t) for i, (k, m) in maps.items()}
    _, miou = _score(tmp_path, _gt(tmp_path), preds)
    metrics = _evaluate(tmp_path, [f"cam.source={tmp_path / 'irn'}", "cam.source_format=irn", f"pseudo.threshold={t}"])
    assert metrics["miou"] == pytest.approx(miou, abs=1e-4)
    assert metrics["num_images"] == 24
    assert metrics["cam"]["imported"]["format"] == "irn"
    assert metrics["model"]["key"] is None


def test_psa_folder_scores_as_psa_cam_pred(tmp_path):
    """PSA infer_cls.py:77-88: {class index: norm_cam}; its out_cam_pred is the argmax over [0.2, maps]."""
    source, rng, preds = _source(tmp_path), np.random.default_rng(1), {}
    (tmp_path / "psa").mkdir()
    for image_id in source.ids:
        labels = source.labels(image_id)
        norm = _random_maps(rng, labels, source.image_size(image_id))
        np.save(tmp_path / "psa" / f"{image_id}.npy", {int(c): norm[n] for n, c in enumerate(labels)})
        full = np.zeros((6, *norm.shape[1:]), np.float32)
        full[labels] = norm
        preds[image_id] = np.argmax(np.concatenate([np.full_like(full[:1], 0.2), full]), 0).astype(np.uint8)
    _, miou = _score(tmp_path, _gt(tmp_path), preds)
    metrics = _evaluate(tmp_path, [f"cam.source={tmp_path / 'psa'}", "cam.source_format=psa", "pseudo.threshold=0.2"])
    assert metrics["miou"] == pytest.approx(miou, abs=1e-4)


def _write_clip_es(folder: Path, source, rng) -> dict:
    """CLIP-ES generate_cams_voc12.py:209-214: {"keys": int64 in the XML's order, "attn_highres": float16}."""
    folder.mkdir()
    out = {}
    for image_id in source.ids:
        labels = source.labels(image_id)[::-1].copy()  # not sorted: the order the XML names them
        maps = torch.from_numpy(_random_maps(rng, labels, source.image_size(image_id)))
        keys = torch.tensor(labels.tolist())
        np.save(folder / f"{image_id}.npy", {"keys": keys.numpy(), "attn_highres": maps.numpy().astype(np.float16)})
        out[image_id] = (keys.numpy(), maps.numpy().astype(np.float16))
    return out


def test_clip_es_folder_scores_as_clip_es_eval_cam(tmp_path):
    """CLIP-ES eval_cam.py:57-65 at its default cam_eval_thres 2: background (1 - max) ** 2, argmax, keys + 1;
    wsss: cam.source_bg_power=2, the background computed in float16 as numpy does there, and the classes kept in
    the file's order, so even float16's exact ties break as CLIP-ES's argmax breaks them."""
    source = _source(tmp_path)
    maps = _write_clip_es(tmp_path / "clip_es", source, np.random.default_rng(2))
    preds = {}
    for image_id, (keys, cams) in maps.items():
        bg = np.power(1 - np.max(cams, axis=0, keepdims=True), 2)
        stack = np.concatenate((bg, cams), axis=0)
        padded = np.pad(keys + 1, (1, 0), mode="constant")
        preds[image_id] = padded[np.argmax(stack, axis=0)].astype(np.uint8)
    _, miou = _score(tmp_path, _gt(tmp_path), preds)
    metrics = _evaluate(
        tmp_path, [f"cam.source={tmp_path / 'clip_es'}", "cam.source_format=clip_es", "cam.source_bg_power=2"]
    )
    assert metrics["miou"] == pytest.approx(miou, abs=1e-4)


def test_generic_npz_by_name_and_by_index_and_wsss_maps(tmp_path):
    """`npz` with class names, with 1-based indices (`cam.source_index=1`), and wsss's own maps: one mIoU, the
    IRN rule's."""
    source, rng = _source(tmp_path), np.random.default_rng(3)
    names = source.class_names
    for d in ("by_name", "by_index", "wsss"):
        (tmp_path / d).mkdir()
    preds = {}
    for image_id in source.ids:
        labels = source.labels(image_id)
        maps = _random_maps(rng, labels, source.image_size(image_id))
        np.savez(tmp_path / "by_name" / f"{image_id}.npz", **{names[c]: maps[n] for n, c in enumerate(labels)})
        np.savez(tmp_path / "by_index" / f"{image_id}.npz", **{str(c + 1): maps[n] for n, c in enumerate(labels)})
        write_cams(tmp_path / "wsss" / f"{image_id}.npz", labels, maps, maps[:, ::4, ::4], store="float32")
        preds[image_id] = irn_mask(maps, labels, 0.3)
    _, miou = _score(tmp_path, _gt(tmp_path), preds)
    for d, extra in (("by_name", []), ("by_index", ["cam.source_index=1"]), ("wsss", ["cam.source_format=wsss"])):
        fmt = [] if extra and "wsss" in extra[0] else ["cam.source_format=npz"]
        metrics = _evaluate(tmp_path, [f"cam.source={tmp_path / d}", *fmt, *extra, "pseudo.threshold=0.3"], d)
        assert metrics["miou"] == pytest.approx(miou, abs=1e-4), d


def test_label_pngs_as_pseudo_masks_palette_and_plain(tmp_path):
    """IRN's sem_seg PNGs (plain index) and palette PNGs (ToCo and others): scored as they are."""
    source, rng = _source(tmp_path), np.random.default_rng(4)
    (tmp_path / "png").mkdir()
    preds = {}
    for n, image_id in enumerate(source.ids):
        h, w = source.image_size(image_id)
        mask = rng.choice([0, 1, 2, 3, 255], size=(h, w)).astype(np.uint8)
        if n % 2:
            write_mask(tmp_path / "png" / f"{image_id}.png", mask)  # palette
        else:
            Image.fromarray(mask, mode="L").save(tmp_path / "png" / f"{image_id}.png")  # plain index (imageio)
        preds[image_id] = mask
    _, miou = _score(tmp_path, _gt(tmp_path), preds)
    metrics = _evaluate(tmp_path, [f"pseudo.source={tmp_path / 'png'}"])
    assert metrics["miou"] == pytest.approx(miou, abs=1e-4)
    assert metrics["masks_rule"]["imported"]["format"] == "png"


# -- safety ----------------------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the payload would write, were it run
    np.save(tmp_path / "a.npy", {"keys": _RunsCode(), "high_res": np.zeros((1, 2, 2))}, allow_pickle=True)
    with pytest.raises(ExternalFileError, match=r"a\.npy: not loaded: the pickle inside is not plain data"):
        safe_load_npy(tmp_path / "a.npy")
    assert not (tmp_path / "PWNED").exists()
    # A tensor whose storage bytes carry code: torch's weights-only loader refuses it too.
    evil = pickle.dumps(_RunsCode())
    payload = {"keys": torch.tensor([1]), "x": evil}
    np.save(tmp_path / "b.npy", payload, allow_pickle=True)
    assert safe_load_npy(tmp_path / "b.npy")["x"] == evil  # bytes stay bytes: never unpickled


def test_plain_data_loads_as_np_load_would(tmp_path):
    d = {"keys": torch.tensor([3, 7]), "cam": torch.rand(2, 3, 3), "high_res": np.random.rand(2, 4, 4), 5: 1.5}
    np.save(tmp_path / "a.npy", d)
    got, ref = safe_load_npy(tmp_path / "a.npy"), np.load(tmp_path / "a.npy", allow_pickle=True).item()
    assert set(got) == set(ref)
    assert torch.equal(got["keys"], ref["keys"])
    assert torch.equal(got["cam"], ref["cam"])
    np.testing.assert_array_equal(got["high_res"], ref["high_res"])


# -- bad input -------------------------------------------------------------------------------------------------


def _one(tmp_path, content, fmt="irn"):
    np.save(tmp_path / "x.npy", content)
    return read_external(tmp_path / "x.npy", fmt, ["a", "b", "c"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"keys": np.array([0]), "high_res": np.full((1, 2, 2), np.nan)}, "4 values are NaN or infinite"),
        ({"keys": np.array([0]), "high_res": np.full((1, 2, 2), -0.5)}, r"values span \[-0\.5, -0\.5\]"),
        ({"keys": np.array([3]), "high_res": np.ones((1, 2, 2))}, r"class indices \[3\] outside the dataset's 0\.\.2"),
        ({"keys": np.array([1, 1]), "high_res": np.ones((2, 2, 2))}, r"class indices \[1, 1\] repeat"),
        ({"keys": np.array([1])}, r"no \['high_res'\] in this irn file \(it has \['keys'\]"),
        ([1, 2], "an irn file holds a dict; this one holds ndarray"),
    ],
)
def test_bad_maps_name_the_file_and_the_problem(tmp_path, content, message):
    with pytest.raises(ExternalFileError, match=r"x\.npy: " + message):
        _one(tmp_path, content)


def test_bad_folders_are_errors_or_counted_skips(tmp_path):
    source = _source(tmp_path)
    folder = tmp_path / "irn"
    write_irn(folder, source)
    ids = source.ids
    (folder / f"{ids[0]}.npy").unlink()  # a split image without a file
    np.save(folder / "not_an_image.npy", {"keys": np.array([0]), "high_res": np.ones((1, 64, 64))})
    np.save(folder / f"{ids[1]}.npy", {"keys": np.array([0]), "high_res": np.full((1, 64, 64), np.nan)})
    base = [f"cam.source={folder}", "cam.source_format=irn"]
    out = run_cli(tmp_path, [*base, "stage=evaluate", f"hydra.run.dir={tmp_path / 'r1'}"])
    assert out.returncode == 2
    assert "not_an_image.npy: id 'not_an_image' is not in split 'train'" in error_line(out.stderr)
    (folder / "not_an_image.npy").unlink()
    out = run_cli(tmp_path, [*base, "stage=evaluate", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert f"no .npy file for image {ids[0]!r}" in error_line(out.stderr)
    out = run_cli(tmp_path, [*base, "dataset.on_error=skip", "stage=evaluate", f"hydra.run.dir={tmp_path / 'r3'}"])
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "r3" / "metrics.json").read_text())
    assert metrics["num_images"] == 22
    assert sorted(metrics["not_imported"]) == sorted(ids[:2])
    log = out.stdout + out.stderr
    assert f"{ids[1]}.npy: 4096 values are NaN or infinite (bad_file)" in log
    assert "import: 22 of 24 images of train" in log
    assert "'no_file': 1" in log
    # A folder with no readable file, and a second file of one id.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    out = run_cli(tmp_path, [f"cam.source={empty}", "stage=evaluate", f"hydra.run.dir={tmp_path / 'r4'}"])
    assert "empty: no .npy file: not a folder of irn outputs" in error_line(out.stderr)
    np.savez(folder / f"{ids[2]}.npz", a=np.zeros((2, 2)))
    out = run_cli(tmp_path, [f"cam.source={folder}", "cam.source_format=npz", "stage=evaluate"])
    assert "a second file for id" in error_line(out.stderr)


def test_a_map_of_another_size_is_an_error_or_resized(tmp_path):
    np.save(tmp_path / "x.npy", {"keys": np.array([0]), "high_res": np.ones((1, 8, 8), np.float32)})
    from wsss.external import fit_size

    _, maps = read_external(tmp_path / "x.npy", "irn", ["a"])
    with pytest.raises(ExternalFileError, match=r"x\.npy: maps are 8x8, the image 16x16 \(cam.source_resize=true\)"):
        fit_size(tmp_path / "x.npy", maps, (16, 16), False)
    assert fit_size(tmp_path / "x.npy", maps, (16, 16), True).shape == (1, 16, 16)


def test_imported_maps_refuse_what_needs_a_classifier(tmp_path):
    from wsss.config import validate

    with pytest.raises(ConfigError, match=r"faithfulness\.enabled=True: must be false with cam\.source"):
        validate(tiny_cfg(tmp_path, [f"cam.source={tmp_path}", "faithfulness.enabled=true"]))
    with pytest.raises(ConfigError, match=r"pseudo\.refine=rw: must be none, crf, par or superpixel"):
        validate(tiny_cfg(tmp_path, [f"cam.source={tmp_path}", "pseudo.refine=rw"]))
    with pytest.raises(ConfigError, match=r"cam\.source_format=xyz: must be one of irn, psa, clip_es, npz, wsss"):
        validate(tiny_cfg(tmp_path, ["cam.source_format=xyz"]))


def test_imported_maps_train_nothing_and_follow_their_bytes(tmp_path):
    """No `train` node; a file's new bytes (same name, size) give a new key, so no stale number."""
    source = _source(tmp_path)
    folder = tmp_path / "irn"
    write_irn(folder, source)
    cfg = tiny_cfg(tmp_path, [f"cam.source={folder}"])
    pipe = Pipeline(cfg)
    pipe.run("cams")
    assert pipe.report == {"cams": "ran"}
    key = pipe.key("cams")
    path = folder / f"{source.ids[0]}.npy"
    stamp = path.stat()
    d = safe_load_npy(path)
    d["high_res"] = d["high_res"][:, ::-1].copy()
    np.save(path, d)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same name, size and mtime: only the bytes differ
    assert path.stat().st_size == stamp.st_size
    assert Pipeline(tiny_cfg(tmp_path, [f"cam.source={folder}"])).key("cams") != key


# -- comparisons -----------------------------------------------------------------------------------------------


def test_leaderboard_pairs_an_imported_irn_folder_with_wsss_cam(tmp_path):
    """`-m cam.source=null,DIR`: wsss's CAM and an imported IRN folder in one sweep; the report pairs the
    imported row with `cam.source=null` on the same images. With one image missing from the folder (skipped
    at import), that image is named and left out of both rows."""
    source = _source(tmp_path)
    folder = tmp_path / "irn"
    write_irn(folder, source, seed=5)
    (folder / f"{source.ids[3]}.npy").unlink()
    sweep = tmp_path / "sweep"
    args = ["-m", f"cam.source=null,{folder}", "dataset.on_error=skip", "evaluate.overlays=0"]
    out = run_cli(tmp_path, [*args, "stage=evaluate", f"hydra.sweep.dir={sweep}"])
    assert out.returncode == 0, out.stderr[-3000:]
    rep = subprocess.run(
        [sys.executable, "-m", "wsss.report", str(sweep), "--out", str(tmp_path / "board")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    board = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    own, imported = board["rows"]
    assert own["overrides"]["cam.source"] == "null"
    assert board["num_images"] == 23
    assert board["left_out"] == {own["name"]: [source.ids[3]]}
    assert source.ids[3] in (tmp_path / "board" / "leaderboard.md").read_text()
    entry = imported["metrics"]["miou"]
    assert imported["reference"] == own["name"]
    assert entry["diff_ci"][0] <= entry["diff"] <= entry["diff_ci"][1]
    # The values are those of the 23 shared images: the imported run scored only those, the own run's are
    # recomputed on them, and the difference is of the two.
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert entry["value"] == pytest.approx(metrics["miou"], abs=1e-4)
    assert entry["diff"] == pytest.approx(entry["value"] - own["metrics"]["miou"]["value"], abs=1e-3)
    assert own["metrics"]["miou"]["value"] != json.loads((sweep / "0" / "metrics.json").read_text())["miou"]


def test_imported_maps_refine_and_train_the_segmenter(tmp_path):
    """Imported IRN maps through `pseudo.refine=superpixel` and `stage=segment`: no classifier is trained, the
    refined masks' mIoU is the evaluate artifact's, and the segmenter is scored on val."""
    source = _source(tmp_path)
    write_irn(tmp_path / "irn", source, seed=6)
    args = [f"cam.source={tmp_path / 'irn'}", "pseudo.refine=superpixel", "stage=segment", "segment.epochs=1"]
    out = run_cli(tmp_path, [*args, "segment.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["name"] for r in m["table"]][:3] == ["seeds (CAMs)", "pseudo masks (superpixel)", "segmenter (deeplabv2)"]
    ev = json.loads(next((tmp_path / "cache").glob("evaluate/*/metrics.json")).read_text())
    assert m["table"][1]["miou"] == ev["miou"]
    assert ev["refine"] == "superpixel"
    assert not list((tmp_path / "cache").glob("train/*"))  # no classifier trained
