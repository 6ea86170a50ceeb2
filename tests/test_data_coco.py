"""COCO reader and scripts/prepare_coco.py: a generated json for each rule and error, plus the real sample."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    COCO_CLASSES,
    COCO_SIZE,
    REPO,
    edit_coco_json,
    expected_coco_masks,
    make_coco_tree,
    real_data_root,
    write_jpeg,
)
from PIL import Image

from wsss.artifacts import write_json, write_mask
from wsss.data.coco import EXPORT_MARKER, COCOSource


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco_tree(tmp_path)


def stem(image_id: int) -> str:
    return f"{image_id:012d}"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def annotation_file(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


# ------------------------------------------------------------------------------------------------- reading


def test_classes_ids_and_labels(coco: Path) -> None:
    src = COCOSource(coco, "val", 2017)
    assert src.class_names == COCO_CLASSES
    assert src.category_ids == [1, 3, 7, 90]
    assert src.ids == [stem(10), stem(20)]  # image-id order; 30 (no annotation) and 40 (crowd only) skipped
    assert src.skipped == {"no_labels": 2}
    assert src.labels(stem(10)).tolist() == [0, 1]  # the crowd "train" does not label the image
    assert src.labels(stem(20)).tolist() == [0, 2, 3]
    assert src.identity()["year"] == 2017
    assert src.identity()["num_images"] == 2
    image = src.load_image(stem(10))
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, *COCO_SIZE)


def test_masks_follow_the_documented_rule(coco: Path) -> None:
    src = COCOSource(coco, "val", empty_images="keep")
    assert src.ids == [stem(i) for i in (10, 20, 30, 40)]
    assert src.skipped == {}
    expected = expected_coco_masks()
    for i in (10, 20, 30, 40):
        np.testing.assert_array_equal(src.load_mask(stem(i)), expected[i], err_msg=str(i))
    assert src.labels(stem(30)).tolist() == []
    assert src.labels(stem(40)).tolist() == []
    image, mask = src.load_sample(stem(20))
    assert mask.shape == tuple(image.shape[1:])


def test_year_2014_layout(tmp_path: Path) -> None:
    root = make_coco_tree(tmp_path, split="train", year=2014)
    src = COCOSource(root, "train", year="2014")
    assert src.ids == ["COCO_train2014_000000000010", "COCO_train2014_000000000020"]
    assert src.image_path(src.ids[0]).parent.name == "train2014"
    assert src.identity()["year"] == 2014


def test_class_names_must_match_the_json(coco: Path) -> None:
    assert COCOSource(coco, "val", class_names=COCO_CLASSES).num_classes == 4
    with pytest.raises(ValueError, match=r"instances_val2017\.json: class_names"):
        COCOSource(coco, "val", class_names=["person", "car", "train", "bus"])


# ------------------------------------------------------------------------------------------------- errors


def test_unknown_category_names_file_and_id(coco: Path) -> None:
    edit_coco_json(annotation_file(coco), lambda d: d["annotations"][4].update(category_id=5))  # image 20
    with pytest.raises(ValueError, match=r"instances_val2017\.json: annotation 5 .*unknown category id 5"):
        COCOSource(coco, "val")
    src = COCOSource(coco, "val", on_error="skip")
    assert src.ids == [stem(10)]
    assert src.skipped == {"unknown_category": 1, "no_labels": 2}


def test_missing_or_mis_sized_image(coco: Path) -> None:
    (coco / "val2017" / f"{stem(10)}.jpg").unlink()
    write_jpeg(coco / "val2017" / f"{stem(20)}.jpg", COCO_SIZE[0] + 1, COCO_SIZE[1])
    src = COCOSource(coco, "val")
    for load in (src.load_image, src.load_mask, src.load_sample):
        with pytest.raises(FileNotFoundError, match=f"{stem(10)}.jpg"):
            load(stem(10))
        with pytest.raises(ValueError, match=rf"{stem(20)}\.jpg: image size 40x31 differs from 40x30"):
            load(stem(20))
    with pytest.raises(ValueError, match="no images left"):
        COCOSource(coco, "val", on_error="skip")
    kept = COCOSource(coco, "val", on_error="skip", empty_images="keep")
    assert kept.ids == [stem(30), stem(40)]
    assert kept.skipped == {"missing_image": 1, "size_mismatch": 1}


def test_bad_files(coco: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        COCOSource(coco, "train")
    data = json.loads(annotation_file(coco).read_text())
    data["annotations"][0]["segmentation"] = {"size": [5, 5], "counts": [25]}  # RLE sized for another image
    annotation_file(coco).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017\.json: annotation 1 rasterises to 5x5"):
        COCOSource(coco, "val").load_mask(stem(10))
    annotation_file(coco).write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_val2017\.json: unreadable"):
        COCOSource(coco, "val")
    with pytest.raises(ValueError, match="empty_images"):
        COCOSource(coco, "val", empty_images="drop")


# ------------------------------------------------------------------------------------------- prepare_coco


def test_export_then_read_exported_masks(coco: Path) -> None:
    prepare = load_script("prepare_coco")
    export = coco / "SegmentationClassval2017"
    args = ["--root", str(coco), "--year", "2017", "--splits", "val", "--workers", "1"]
    assert prepare.main(args) == 0
    assert sorted(p.name for p in export.glob("*.png")) == [f"{stem(i)}.png" for i in (10, 20, 30, 40)]
    src = COCOSource(coco, "val", empty_images="keep")
    assert src.use_export
    assert src._coco is None
    expected = expected_coco_masks()
    for i in (10, 20, 30, 40):
        np.testing.assert_array_equal(src.load_mask(stem(i)), expected[i])

    stamps = {p: p.stat().st_mtime_ns for p in export.glob("*.png")}
    (export / f"{stem(20)}.png").unlink()
    assert prepare.main(args) == 0  # resumable: only the missing file is written again
    after = {p: p.stat().st_mtime_ns for p in export.glob("*.png")}
    assert {p: t for p, t in after.items() if p.name != f"{stem(20)}.png"} == {
        p: t for p, t in stamps.items() if p.name != f"{stem(20)}.png"
    }
    np.testing.assert_array_equal(src.load_mask(stem(20)), expected[20])

    write_mask(export / f"{stem(10)}.png", np.zeros((3, 3), np.uint8))
    (export / f"{stem(20)}.png").unlink()
    with pytest.raises(ValueError, match=rf"{stem(10)}\.png: mask size 3x3 differs"):
        src.load_mask(stem(10))
    with pytest.raises(FileNotFoundError, match=rf"{stem(20)}\.png"):
        src.load_mask(stem(20))
    skip = COCOSource(coco, "val", on_error="skip", empty_images="keep")
    assert skip.ids == [stem(30), stem(40)]
    assert skip.skipped == {"size_mismatch": 1, "missing_mask": 1}

    record = json.loads((export / EXPORT_MARKER).read_text())
    write_json(export / EXPORT_MARKER, {**record, "rule": "older"})
    with pytest.raises(ValueError, match=r"export\.json: export does not match .* \['rule'\]"):
        COCOSource(coco, "val")
    (export / EXPORT_MARKER).unlink()
    assert not COCOSource(coco, "val").use_export  # unfinished export: rasterise
    with pytest.raises(FileNotFoundError, match=r"export\.json missing"):
        COCOSource(coco, "val", masks="export")


# ------------------------------------------------------------------------------------------- real sample


def reference_mask(coco_api, image: dict, cat_index: dict[int, int]) -> np.ndarray:
    """Independent composition: instances by decreasing area (ties: id), then crowd over background."""
    anns = coco_api.loadAnns(coco_api.getAnnIds(imgIds=[image["id"]]))
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    for ann in sorted([a for a in anns if a["iscrowd"] == 0], key=lambda a: (-a["area"], a["id"])):
        mask[coco_api.annToMask(ann) == 1] = cat_index[ann["category_id"]] + 1
    for ann in [a for a in anns if a["iscrowd"] == 1]:
        mask[(coco_api.annToMask(ann) == 1) & (mask == 0)] = 255
    return mask


@pytest.mark.parametrize("split", ["train", "val"])
def test_real_coco_exported_masks_match_annToMask(split: str, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    root = real_data_root() / "coco2017_sample"
    if not root.is_dir():
        pytest.skip(f"real COCO sample not found at {root}")
    out = tmp_path / f"SegmentationClass{split}2017"
    prepare = load_script("prepare_coco")
    args = ["--root", str(root), "--splits", split, "--out", str(out), "--workers", "1"]
    assert prepare.main(args) == 0
    src = COCOSource(root, split, 2017, masks="export", export_dir=out, on_error="skip")
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
    cat_ids = sorted(api.getCatIds())
    assert len(cat_ids) == 80
    assert src.class_names == [api.cats[c]["name"] for c in cat_ids]
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    assert len(src) == len(api.imgs)
    assert src.skipped == {}
    for image in api.imgs.values():
        image_id = Path(image["file_name"]).stem
        mask = src.load_mask(image_id)
        np.testing.assert_array_equal(mask, reference_mask(api, image, cat_index), err_msg=image_id)
        labels = {cat_index[a["category_id"]] for a in api.imgToAnns[image["id"]] if not a["iscrowd"]}
        assert src.labels(image_id).tolist() == sorted(labels)
        with Image.open(src.image_path(image_id)) as img:
            assert img.size == (image["width"], image["height"])
