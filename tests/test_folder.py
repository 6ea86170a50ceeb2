"""dataset=folder: a folder of images with a labels file, ground truth for some images or none, new images labelled
by a trained model's predictions; and the bad input each of those can hold."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.data_fixtures import FOLDER_CLASSES, build_folder, read_csv_rows, write_csv_rows
from tests.tiny import FIGURES, assert_reported_iou, error_line, loop_iou, run_cli
from wsss.artifacts import read_cams, read_json, read_mask
from wsss.data.base import SampleError
from wsss.data.folder import FolderSource, fingerprint_from_config, held_out, image_id

FOLDER_RUN = ["dataset=folder"]  # with TINY's settings (its dataset.synthetic keys are inert here)


# -- the reader ------------------------------------------------------------------------------------------------


def test_ids_labels_and_class_order_from_the_csv(tmp_path):
    root = build_folder(tmp_path)
    src = FolderSource(root, "train")
    assert src.class_names == FOLDER_CLASSES
    assert len(src) == 24
    assert {"ward_b/day2/train_00000", "ward_a/train_00001"} <= set(src.ids)
    rows = read_csv_rows(root / "labels.csv")[1:]
    for name, labels in rows:  # every row's names, as indices into the sorted list
        want = sorted(FOLDER_CLASSES.index(n) for n in labels.split(";") if n)
        assert src.labels(image_id(name)).tolist() == want
    assert src.has_mask("ward_b/day2/train_00000")
    assert not src.has_mask("ward_a/train_00001")
    with pytest.raises(FileNotFoundError, match="no ground-truth mask"):
        src.load_mask("ward_a/train_00001")


def test_column_form_and_json_give_the_same_labels(tmp_path):
    root = build_folder(tmp_path, masks="none")
    names_form = FolderSource(root, "train").label_table()
    rows = read_csv_rows(root / "labels.csv")[1:]
    cols = ["image", *reversed(FOLDER_CLASSES)]  # the header's order is not the class order: names are sorted
    write_csv_rows(
        root / "labels.csv", [cols, *[[r[0], *("1" if c in r[1].split(";") else "0" for c in cols[1:])] for r in rows]]
    )
    columns = FolderSource(root, "train")
    assert columns.class_names == FOLDER_CLASSES
    assert {k: v.tolist() for k, v in columns.label_table().items()} == {k: v.tolist() for k, v in names_form.items()}
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text(json.dumps({r[0]: [n for n in r[1].split(";") if n] for r in rows}))
    from_json = FolderSource(root, "train")
    assert {k: v.tolist() for k, v in from_json.label_table().items()} == {k: v.tolist() for k, v in names_form.items()}


@pytest.mark.parametrize("value", ["2", "yes", "", "1.0"])
def test_a_0_1_column_holding_another_value_is_a_malformed_row(tmp_path, value):
    """docs/own-data.md: "a 0/1 column holding something else" is the bad row `malformed_row`: raised naming
    the line, the column and the value, or skipped and counted (the row's image dropped)."""
    root = build_folder(tmp_path, masks="none")
    rows = read_csv_rows(root / "labels.csv")[1:]
    cols = ["image", *FOLDER_CLASSES]
    table = [[r[0], *("1" if c in r[1].split(";") else "0" for c in FOLDER_CLASSES)] for r in rows]
    table[4][1 + FOLDER_CLASSES.index("ring")] = value
    write_csv_rows(root / "labels.csv", [cols, *table])
    with pytest.raises(SampleError, match=rf"labels.csv line 6: column 'ring' is {value!r}, not 0 or 1"):
        FolderSource(root, "train")
    src = FolderSource(root, "train", on_error="skip")
    assert src.skipped == {"malformed_row": 1}
    assert len(src) == 23
    assert image_id(table[4][0]) not in src.ids


@pytest.mark.parametrize(("delimiter", "named"), [(";", "';'"), ("\t", "tab")])
@pytest.mark.parametrize("form", ["names", "columns"])
def test_a_labels_file_delimited_otherwise_is_refused_naming_the_delimiter(tmp_path, delimiter, named, form):
    """As a spreadsheet in a comma-decimal locale saves it (`;`), or a tab-separated export: refused, with a hint."""
    root = build_folder(tmp_path, masks="none")
    rows = read_csv_rows(root / "labels.csv")
    if form == "columns":
        table = [[r[0], *("1" if c in r[1].split(";") else "0" for c in FOLDER_CLASSES)] for r in rows[1:]]
        rows = [["image", *FOLDER_CLASSES], *table]
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    header = rows[0]
    for policy in ("raise", "skip"):  # a header stops the run whatever the policy
        with pytest.raises(ValueError, match=r"labels\.csv line 1: header .* must be `image,labels`") as e:
            FolderSource(root, "train", on_error=policy)
        assert f"it parses as {header} with {named} between the fields: save it comma-separated" in str(e.value)
    rows[0][0] = "picture"  # wrong whatever the delimiter: no hint
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    with pytest.raises(ValueError, match=r"labels\.csv line 1: header") as e:
        FolderSource(root, "train")
    assert "parses as" not in str(e.value)


def test_val_fraction_holds_out_a_seeded_disjoint_share(tmp_path):
    root = build_folder(tmp_path, masks="none")
    train = FolderSource(root, "train", val_fraction=0.25, split_seed=3)
    val = FolderSource(root, "val", val_fraction=0.25, split_seed=3)
    assert (len(val), len(train)) == (6, 18)
    assert not set(train.ids) & set(val.ids)
    assert val.ids == FolderSource(root, "val", val_fraction=0.25, split_seed=3).ids  # seeded
    assert val.ids != FolderSource(root, "val", val_fraction=0.25, split_seed=4).ids
    assert train.identity()["held_out"] == val.ids  # recorded in every manifest that holds the identity
    assert not list(root.glob("splits*"))  # nothing written into the user's folder
    assert held_out([f"x{i}" for i in range(10)], 0.0, 0) == set()
    with pytest.raises(ValueError, match=r"dataset\.val_fraction"):
        FolderSource(root, "val")


def test_split_lists_override_the_draw(tmp_path):
    root = build_folder(tmp_path, masks="none")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("ward_a/train_00001\nward_a/train_00003.jpg\n")
    assert FolderSource(root, "train").ids == ["ward_a/train_00001", "ward_a/train_00003"]
    with pytest.raises(FileNotFoundError, match=r"val\.txt.*splits/ has \['train'\]"):
        FolderSource(root, "val")


def test_empty_label_list_is_a_background_only_image(tmp_path, caplog):
    root = build_folder(tmp_path, masks="none")
    rows = read_csv_rows(root / "labels.csv")
    rows[1][1] = ""
    write_csv_rows(root / "labels.csv", rows)
    with caplog.at_level(logging.INFO):
        src = FolderSource(root, "train")
    assert src.labels(image_id(rows[1][0])).tolist() == []
    assert "1 of 24 images have no labels (background only)" in caplog.text


# -- bad input: raise names the file and line; skip drops and counts ---------------------------------------------


def _break(root: Path, how: str) -> str:
    """Damage the folder one way; return a fragment the error message must hold."""
    rows = read_csv_rows(root / "labels.csv")
    if how == "missing_image":
        rows.append(["ward_a/ghost.jpg", "disc"])
        frag = r"labels.csv line 26\): image 'ward_a/ghost' not under"
    elif how == "no_labels_row":
        del rows[5]
        frag = "no row in labels.csv"
    elif how == "unknown_class":
        rows[3][1] = "disc;dragon"
        frag = r"labels.csv line 4\): class 'dragon' is not in dataset.class_names"
    elif how == "duplicate_id":
        rows.append([rows[2][0], "disc"])
        frag = "labels.csv line 26: image .* is already on labels.csv line 3"
    elif how == "malformed_row":
        rows[7] = [rows[7][0], "disc", "extra"]
        frag = "labels.csv line 8: 3 fields, the header has 2"
    elif how == "unreadable_image":
        path = root / "images" / "ward_a" / "train_00001.jpg"
        path.write_bytes(path.read_bytes()[:300])
        return "train_00001.jpg: (unreadable|truncated) image"
    write_csv_rows(root / "labels.csv", rows)
    return frag


@pytest.mark.parametrize(
    "how", ["missing_image", "no_labels_row", "unknown_class", "duplicate_id", "malformed_row", "unreadable_image"]
)
def test_bad_input_raises_naming_the_file_or_is_skipped_and_counted(tmp_path, how):
    root = build_folder(tmp_path, masks="none")
    frag = _break(root, how)
    names = FOLDER_CLASSES if how == "unknown_class" else None
    if how == "unreadable_image":  # found when the image is read (the skip policy reads every header up front)
        with pytest.raises(SampleError, match=frag):
            FolderSource(root, "train").load_image("ward_a/train_00001")
    else:
        with pytest.raises(SampleError, match=frag):
            FolderSource(root, "train", class_names=names)
    src = FolderSource(root, "train", class_names=names, on_error="skip")
    reasons = ("truncated_image", "unreadable_image") if how == "unreadable_image" else (how,)
    assert len(src.skipped) == 1, src.skipped
    assert src.skipped.get(next(iter(src.skipped))) == 1
    assert next(iter(src.skipped)) in reasons, src.skipped
    assert len(src) == (24 if how == "missing_image" else 23)  # a row without its image drops no image


def test_duplicate_image_files_are_one_id_too_many(tmp_path):
    root = build_folder(tmp_path, masks="none")
    Image.open(root / "images" / "ward_a" / "train_00001.jpg").save(root / "images" / "ward_a" / "train_00001.png")
    with pytest.raises(SampleError, match=r"id 'ward_a/train_00001' names 2 files"):
        FolderSource(root, "train")
    assert FolderSource(root, "train", on_error="skip").skipped == {"duplicate_id": 1}


# -- the pipeline ------------------------------------------------------------------------------------------------


def test_the_fingerprint_stamps_every_image_and_mask_below_the_folder_and_nothing_else(tmp_path):
    """Nested files by relative path with [size, mtime_ns] (one os.walk per tree as the reference); hidden
    files and folders and other suffixes left out; a touched image changes the images digest only."""
    root = build_folder(tmp_path)
    (root / "images" / ".thumbs").mkdir()
    (root / "images" / ".thumbs" / "a.jpg").write_bytes(b"x")
    (root / "images" / "ward_a" / "notes.txt").write_text("not an image")
    (root / "masks" / "ward_b" / "day2" / ".hidden.png").write_bytes(b"x")

    def walked(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                    st = (Path(dirpath) / name).stat()
                    out[(Path(dirpath) / name).relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
        return out

    fp = fingerprint_from_config(OmegaConf.create({"root": str(root)}), "train")
    assert fp["images"].entries == walked(root / "images", (".jpg",))
    assert fp["masks"].entries == walked(root / "masks", (".png",))
    assert len(fp["images"].entries) == 24
    assert len(fp["masks"].entries) == 12
    image = root / "images" / "ward_a" / "train_00001.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1))
    again = fingerprint_from_config(OmegaConf.create({"root": str(root)}), "train")
    assert again["images"].digest != fp["images"].digest
    assert [k for k in fp if k != "images" and again[k].digest != fp[k].digest] == []


def test_half_the_images_with_ground_truth_score_that_half(tmp_path):
    root = build_folder(tmp_path, masks="half")
    r = run_cli(tmp_path, [*FOLDER_RUN, *FIGURES, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_json(tmp_path / "run" / "metrics.json")
    assert (m["num_images"], m["no_ground_truth"]) == (12, 12)
    assert "12 of 24 images of folder/train have no ground-truth mask: scoring the other 12" in r.stdout
    assert m["class_names"] == FOLDER_CLASSES
    # the score is the pixel loop's over the 12 masked images, nothing else
    masks_dir = Path(m["masks_dir"])
    pairs = []
    for path in sorted((root / "masks").rglob("*.png")):
        rel = path.relative_to(root / "masks").with_suffix("").as_posix()
        pairs.append((np.array(Image.open(path)), read_mask(masks_dir / f"{rel}.png")))
    assert len(pairs) == 12
    iou, miou = loop_iou(pairs, 7)
    assert_reported_iou(m["pseudo_masks"], iou, miou, ["background", *FOLDER_CLASSES])
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "- cross\n  - disc" in saved  # the class names the labels file gave, written into the run's config
    overlays = Path(m["masks_dir"]).parents[2] / "evaluate"
    assert len(list(overlays.rglob("overlays/**/*.jpg"))) == 2  # evaluate.overlays=2 of FIGURES


def test_without_ground_truth_masks_are_made_and_evaluate_says_so(tmp_path):
    root = build_folder(tmp_path, masks="none")
    common = [*FOLDER_RUN, f"dataset.root={root}"]
    r = run_cli(tmp_path, [*common, "stage=pseudo_masks", f"hydra.run.dir={tmp_path / 'r1'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if "pseudo_masks: 24 masks of split 'train' in" in ln)
    masks = Path(line.split(" in ", 1)[1].split(" (palette")[0])
    assert len(list(masks.rglob("*.png"))) == 24
    r = run_cli(tmp_path, [*common, *FIGURES, f"hydra.run.dir={tmp_path / 'r2'}"])  # the default stage: evaluate
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stdout.splitlines() if "nothing to score" in ln]
    assert len(said) == 1
    assert "none of the 24 images of split 'train' has a ground-truth mask" in said[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert (tmp_path / "r2" / "overlays.png").is_file()
    assert read_json(tmp_path / "r2" / "metrics.json")["miou"] is None


def test_predicted_labels_for_new_images_follow_the_classifier_scores(tmp_path):
    labelled = build_folder(tmp_path, masks="none")
    r = run_cli(tmp_path, [*FOLDER_RUN, f"dataset.root={labelled}", "stage=train", f"hydra.run.dir={tmp_path / 't'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = next((tmp_path / "cache" / "train").glob("*/model.pt"))
    new = tmp_path / "new"
    shutil.copytree(labelled / "images", new / "images")  # no labels file, no masks
    args = [*FOLDER_RUN, f"dataset.root={new}", f"model.checkpoint={checkpoint}", "stage=pseudo_masks"]
    r = run_cli(tmp_path, [*args, f"hydra.run.dir={tmp_path / 'p0'}"])
    assert r.returncode == 2
    assert "cam.labels=predicted" in error_line(r.stderr)
    r = run_cli(tmp_path, [*args, "cam.labels=predicted", "cam.score_threshold=0.5", f"hydra.run.dir={tmp_path / 'p'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cams = next(d for d in (tmp_path / "cache" / "cams").iterdir() if (d / "predicted_labels.json").is_file())
    predicted = read_json(cams / "predicted_labels.json")
    assert len(predicted) == 24
    # the classifier's own scores, computed here: sigmoid of its logits on the whole normalised image
    from wsss.data.transforms import normalize
    from wsss.models import load_checkpoint

    model, names = load_checkpoint(checkpoint)
    assert names == FOLDER_CLASSES
    model.set_output_stride(8).eval()  # cam.output_stride's default, as the cams stage reads it
    checked = 0
    for key, got in predicted.items():
        path = next((new / "images").glob(f"{key}.jpg"))
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            scores = torch.sigmoid(model(normalize(image[None]))).squeeze(0)
        clear = (scores - 0.5).abs() > 1e-3  # no class within rounding of the threshold
        want = {names[c] for c in range(len(names)) if scores[c] > 0.5}
        assert {c for c in got if clear[names.index(c)]} == {c for c in want if clear[names.index(c)]}, key
        keys = read_cams(cams / "maps" / f"{key}.npz")["keys"].tolist()
        assert [names[c] for c in keys] == sorted(got, key=names.index)
        for c, s in got.items():
            assert s == pytest.approx(float(scores[names.index(c)]), abs=2e-3)
        checked += 1
    assert checked == 24


def test_a_checkpoint_with_other_classes_is_refused_with_both_lists(tmp_path):
    labelled = build_folder(tmp_path, masks="none")
    r = run_cli(tmp_path, [*FOLDER_RUN, f"dataset.root={labelled}", "stage=train", f"hydra.run.dir={tmp_path / 't'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = next((tmp_path / "cache" / "train").glob("*/model.pt"))
    rows = read_csv_rows(labelled / "labels.csv")
    write_csv_rows(labelled / "labels.csv", [rows[0], *[[r[0], r[1].replace("cross", "plus")] for r in rows[1:]]])
    r = run_cli(tmp_path, [*FOLDER_RUN, f"dataset.root={labelled}", f"model.checkpoint={checkpoint}", "stage=cams"])
    line = error_line(r.stderr)
    assert r.returncode == 2
    assert str(FOLDER_CLASSES) in line
    assert "'plus'" in line
    assert "differ" in line
