"""VOCSource and scripts/prepare_voc12.py: generated trees for each rule and error, and the real sample."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    REPO,
    SBD_MASKS,
    VOC_AUG,
    VOC_SEG,
    VOC_SIZES,
    make_sbd_tree,
    make_voc_tree,
    real_data_root,
    rect_mask,
    voc_xml,
)
from PIL import Image

from wsss.artifacts import read_mask, voc_colormap, write_mask
from wsss.data.voc import VOC_CLASSES, VOCSource

A, B, C, D, E, F = VOC_SIZES  # train, train, val, SBD-only, SBD-only, XML-only


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc_tree(tmp_path)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_list(root: Path, split: str, lines: list[str]) -> None:
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{x}\n" for x in lines))


# ------------------------------------------------------------------------------------------------- reading


def test_reads_images_masks_and_labels(voc: Path) -> None:
    src = VOCSource(voc, "train")
    assert src.ids == [A, B]
    assert src.class_names == VOC_CLASSES
    assert src.skipped == {}
    image = src.load_image(A)
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, *VOC_SIZES[A])
    pil = torch.from_numpy(np.array(Image.open(voc / "JPEGImages" / f"{A}.jpg"))).permute(2, 0, 1)
    assert (image.int() - pil.int()).abs().max() <= 2  # same JPEG, two decoders
    np.testing.assert_array_equal(src.load_mask(A), rect_mask(*VOC_SIZES[A], VOC_SEG[A]))
    assert src.labels(A).tolist() == VOC_SEG[A]
    assert src.labels(A).dtype == np.int64
    image, mask = src.load_sample(B)
    assert mask.shape == tuple(image.shape[1:])
    assert src.identity()["split"] == "train"
    assert src.identity()["num_images"] == 2


def test_mask_lookup_order_and_aug_fallback(voc: Path) -> None:
    aug = VOCSource(voc, "train_aug")
    assert [aug.labels(i).tolist() for i in aug.ids] == [VOC_SEG[A], VOC_SEG[B], VOC_AUG[D], VOC_AUG[E]]
    assert aug.mask_path(A).parent.name == "SegmentationClass"
    assert aug.mask_path(D).parent.name == "SegmentationClassAug"
    reverse = VOCSource(voc, "train_aug", mask_dir="SegmentationClassAug", aug_mask_dir="SegmentationClass")
    assert reverse.labels(A).tolist() == VOC_AUG[A]
    as_list = VOCSource(voc, "train_aug", mask_dir=["SegmentationClassAug", "SegmentationClass"])
    assert as_list.labels(A).tolist() == VOC_AUG[A]
    assert len(as_list.mask_dirs) == 2
    only_voc = VOCSource(voc, "train_aug", aug_mask_dir=None)
    with pytest.raises(FileNotFoundError, match=f"{D}.png"):
        only_voc.load_mask(D)
    with pytest.raises(FileNotFoundError, match=f"{D}.xml"):
        only_voc.labels(D)


def test_split_list_with_paths(voc: Path) -> None:
    write_list(voc, "paths", [f"/JPEGImages/{A}.jpg /SegmentationClassAug/{A}.png", f"/JPEGImages/{D}.jpg"])
    assert VOCSource(voc, "paths").ids == [A, D]


def test_labels_cached_in_one_pass(voc: Path) -> None:
    src = VOCSource(voc, "train_aug")
    table = src.label_table()
    assert list(table) == src.ids
    for d in src.mask_dirs:
        for p in d.glob("*.png"):
            p.unlink()
    assert src.labels(D).tolist() == VOC_AUG[D]  # served from memory, no file read


def test_xml_fallback_for_images_without_mask(voc: Path) -> None:
    src = VOCSource(voc, "with_xml")
    assert src.labels(F).tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert src.labels(B).tolist() == VOC_SEG[B]
    assert VOCSource(voc, "train").labels(A).tolist() == VOC_SEG[A]  # the mask wins over the XML ("cat")
    with pytest.raises(FileNotFoundError, match=f"{F}"):
        src.load_mask(F)


def test_unknown_xml_name_names_file_and_name(voc: Path) -> None:
    (voc / "Annotations" / f"{F}.xml").write_text(voc_xml(["dog", "unicorn"]))
    with pytest.raises(ValueError, match=rf"{F}\.xml.*'unicorn'"):
        VOCSource(voc, "with_xml").labels(F)


def test_own_class_list(voc: Path) -> None:
    names = [f"c{i}" for i in range(15)] + ["dog"]
    src = VOCSource(voc, "trainval", class_names=names, name="custom")
    assert src.num_classes == 16
    assert src.labels(A).tolist() == [0, 14]
    xml = VOCSource(voc, "with_xml", class_names=names)
    with pytest.raises(ValueError, match=rf"{F}\.xml.*'person'"):
        xml.labels(F)
    small = VOCSource(voc, "train", class_names=[f"c{i}" for i in range(12)])
    assert small.labels(B).tolist() == [11]
    with pytest.raises(ValueError, match=rf"{A}\.png.*mask value 15"):
        small.load_mask(A)
    with pytest.raises(ValueError, match="duplicates"):
        VOCSource(voc, "train", class_names=["x", "x"])


# ------------------------------------------------------------------------------------------------- errors


def test_missing_image(voc: Path) -> None:
    (voc / "JPEGImages" / f"{B}.jpg").unlink()
    src = VOCSource(voc, "train")
    for load in (src.load_image, src.load_mask, src.load_sample):
        with pytest.raises(FileNotFoundError, match=f"{B}.jpg"):
            load(B)


def test_unreadable_image_and_mask(voc: Path) -> None:
    (voc / "JPEGImages" / f"{A}.jpg").write_bytes(b"not a jpeg")
    (voc / "SegmentationClass" / f"{B}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    src = VOCSource(voc, "train")
    with pytest.raises(ValueError, match=f"{A}.jpg: unreadable image"):
        src.load_image(A)
    with pytest.raises(ValueError, match=f"{B}.png: unreadable mask"):
        src.load_mask(B)
    with pytest.raises(ValueError, match=f"{B}.png"):
        src.labels(B)


def test_mask_size_differs_from_image(voc: Path) -> None:
    h, w = VOC_SIZES[B]
    write_mask(voc / "SegmentationClass" / f"{B}.png", np.zeros((h, w + 1), np.uint8))
    src = VOCSource(voc, "train")
    for load in (src.load_mask, src.load_sample):
        with pytest.raises(ValueError, match=rf"{B}\.png: mask size {w + 1}x{h} differs .* {w}x{h}"):
            load(B)


def test_rgb_masks(voc: Path) -> None:
    expected = rect_mask(*VOC_SIZES[A], VOC_SEG[A])
    Image.fromarray(voc_colormap()[expected]).save(voc / "SegmentationClass" / f"{A}.png")
    rgb = np.zeros((*VOC_SIZES[B], 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(voc / "SegmentationClass" / f"{B}.png")
    src = VOCSource(voc, "train")
    np.testing.assert_array_equal(src.load_mask(A), expected)  # colours map exactly onto the palette
    with pytest.raises(ValueError, match=rf"{B}\.png: RGB mask has colour \(1, 2, 3\)"):
        src.load_mask(B)


def test_split_list_errors(voc: Path) -> None:
    write_list(voc, "empty", [])
    with pytest.raises(ValueError, match=r"empty\.txt"):
        VOCSource(voc, "empty")
    with pytest.raises(FileNotFoundError, match=r"nosuch\.txt"):
        VOCSource(voc, "nosuch")
    write_list(voc, "dup", [A, B, A])
    with pytest.raises(ValueError, match=rf"dup\.txt: id '{A}' is listed more than once"):
        VOCSource(voc, "dup")
    with pytest.raises(FileNotFoundError, match="dataset root"):
        VOCSource(voc / "missing", "train")
    with pytest.raises(ValueError, match="on_error"):
        VOCSource(voc, "train", on_error="ignore")


def test_skip_policy_counts(voc: Path) -> None:
    # One fault per id: no image, unreadable mask, size mismatch, class out of range, duplicate, no label.
    extra = {"2010_000007": (20, 20), "2010_000008": (20, 20), "2010_000009": (20, 20)}
    for i, (h, w) in extra.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    (voc / "JPEGImages" / f"{B}.jpg").unlink()
    (voc / "SegmentationClass" / f"{C}.png").write_bytes(b"garbage")
    write_mask(voc / "SegmentationClass" / "2010_000007.png", np.zeros((20, 21), np.uint8))
    write_mask(voc / "SegmentationClass" / "2010_000008.png", np.full((20, 20), 30, np.uint8))
    write_list(voc, "all", [A, B, C, D, E, F, A, *extra])
    src = VOCSource(voc, "all", on_error="skip")
    assert src.ids == [A, D, E, F]
    assert src.skipped == {
        "duplicate_id": 1,
        "missing_image": 1,
        "unreadable_mask": 1,
        "size_mismatch": 1,
        "class_out_of_range": 1,
        "missing_labels": 1,
    }
    scored = VOCSource(voc, "all", on_error="skip", require_masks=True)
    assert scored.ids == [A, D, E]
    assert scored.skipped["missing_mask"] == 2
    write_list(voc, "bad", [B])
    with pytest.raises(ValueError, match="every id was skipped"):
        VOCSource(voc, "bad", on_error="skip")


# ------------------------------------------------------------------------------------------ prepare_voc12


def test_prepare_voc12_converts_sbd_and_builds_train_aug(tmp_path: Path) -> None:
    voc = make_voc_tree(tmp_path, with_aug=False)
    sbd = make_sbd_tree(tmp_path)
    prepare = load_script("prepare_voc12")
    assert prepare.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 0
    aug = voc / "SegmentationClassAug"
    for image_id, classes in SBD_MASKS.items():
        np.testing.assert_array_equal(
            read_mask(aug / f"{image_id}.png"), rect_mask(*VOC_SIZES[image_id], classes, void=False)
        )
    # (SBD train + SBD val + VOC train) - VOC val
    listed = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert listed == sorted({D, C, E, A, B} - {C})
    src = VOCSource(voc, "train_aug", on_error="skip", require_masks=True)
    assert src.skipped == {}
    assert src.labels(D).tolist() == SBD_MASKS[D]

    stamps = {p: p.stat().st_mtime_ns for p in aug.glob("*.png")}
    assert prepare.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 0  # resumable
    assert {p: p.stat().st_mtime_ns for p in aug.glob("*.png")} == stamps

    write_list(voc, "train_aug", [A])
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.main(["--voc", str(voc), "--sbd", str(sbd), "--no-convert"])
    (sbd / "cls" / f"{D}.mat").unlink()
    (aug / f"{D}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{D}\.mat"):
        prepare.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"])


# ------------------------------------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def real_voc() -> Path:
    root = real_data_root() / "voc2012_sample" / "VOCdevkit" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"real VOC sample not found at {root}")
    return root


def test_real_voc_labels_equal_mask_classes(real_voc: Path) -> None:
    src = VOCSource(real_voc, "all_staged", on_error="skip", require_masks=True)
    assert len(src) == 35
    assert src.skipped == {}
    for image_id in src.ids:
        path = real_voc / "SegmentationClass" / f"{image_id}.png"
        if not path.is_file():
            path = real_voc / "SegmentationClassAug" / f"{image_id}.png"
        with Image.open(path) as img:
            assert img.mode == "P"
            values = set(np.unique(np.asarray(img)).tolist()) - {0, 255}
            size = img.size
        assert src.labels(image_id).tolist() == sorted(v - 1 for v in values), image_id
        image, mask = src.load_sample(image_id)
        assert tuple(image.shape) == (3, size[1], size[0])
        assert mask.shape == (size[1], size[0])


def test_real_voc_splits(real_voc: Path) -> None:
    sizes = {split: len(VOCSource(real_voc, split)) for split in ("train", "val", "train_aug")}
    assert sizes == {"train": 1, "val": 27, "train_aug": 8}
    aug = VOCSource(real_voc, "train_aug")
    assert {aug.mask_path(i).parent.name for i in aug.ids} == {"SegmentationClass", "SegmentationClassAug"}
