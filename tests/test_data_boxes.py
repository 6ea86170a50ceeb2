"""Ground-truth boxes: `ImageBoxes`, VOC XML boxes, COCO bbox conversion, and the synthetic set's annotations."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    COCO_SIZE,
    REPO,
    edit_coco_json,
    expected_coco_boxes,
    make_coco_tree,
    make_voc_tree,
    real_data_root,
)

from wsss.artifacts import write_json
from wsss.data import ImageBoxes, SegmentationSource
from wsss.data.base import MissingFileError, SampleError
from wsss.data.coco import COCOSource
from wsss.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec, ensure_synthetic, render, render_annotated
from wsss.data.voc import VOCSource, fingerprint

A = "2007_000001"  # (H, W) = (24, 32), in the train list
XML_ONLY = "2009_000006"  # (22, 30), no mask: labels from its XML


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc_tree(tmp_path)


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco_tree(tmp_path)


def xml_object(name: str, box: tuple, difficult: str | None = "0") -> str:
    """One `<object>`; `box` holds the four texts of xmin, ymin, xmax, ymax (1-based, as VOC writes them)."""
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return f"<object><name>{name}</name><pose>Left</pose>{flag}<bndbox>{coords}</bndbox></object>"


def write_xml(root: Path, image_id: str, objects: list[str]) -> Path:
    path = root / "Annotations" / f"{image_id}.xml"
    path.write_text(f"<annotation><filename>{image_id}.jpg</filename>{''.join(objects)}</annotation>")
    return path


def stem(image_id: int) -> str:
    return f"{image_id:012d}"


def as_rows(b: ImageBoxes) -> list[tuple[tuple[int, ...], int, bool]]:
    return [
        (tuple(int(v) for v in box), int(c), bool(k)) for box, c, k in zip(b.boxes, b.classes, b.crowd, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ ImageBoxes


def test_image_boxes_coerce_and_select_by_class() -> None:
    b = ImageBoxes([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], [2, 0, 2], [0, 1, 0], [False, False, True])
    assert b.boxes.dtype == np.int64
    assert b.boxes.shape == (3, 4)
    assert b.classes.dtype == np.int64
    assert b.difficult.dtype == bool
    assert b.difficult.tolist() == [False, True, False]
    assert len(b) == 3
    assert b.of_class(2).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert b.of_class(1).shape == (0, 4)
    empty = ImageBoxes([], [], [], [])
    assert empty.boxes.shape == (0, 4)
    assert empty.of_class(0).shape == (0, 4)
    with pytest.raises(ValueError, match="2 boxes but 1 classes"):
        ImageBoxes([[0, 0, 1, 1], [0, 0, 1, 1]], [0], [0, 0], [0, 0])


def test_a_source_without_boxes_says_so(voc: Path) -> None:
    class NoBoxes(VOCSource):
        has_boxes = SegmentationSource.has_boxes
        load_boxes = SegmentationSource.load_boxes

    src = NoBoxes(voc, "train")
    assert not src.has_boxes()
    with pytest.raises(ValueError, match=r"voc12/train: NoBoxes has no ground-truth boxes"):
        src.load_boxes(A)


# ------------------------------------------------------------------------------------------------------- VOC


def test_voc_boxes_from_a_hand_written_xml(voc: Path) -> None:
    """1-based inclusive XML -> 0-based inclusive; "48.0"-style floats rounded; missing <difficult> is 0."""
    write_xml(
        voc,
        A,
        [
            xml_object("dog", ("1", "1", "32", "24"), "1"),  # the whole 32 x 24 image
            xml_object("person", ("3.0", " 4.6 ", "10", "9.4"), None),
            xml_object("dog", ("7", "8", "7", "8")),  # a single pixel
        ],
    )
    src = VOCSource(voc, "train")
    assert src.has_boxes()
    b = src.load_boxes(A)
    assert b.boxes.tolist() == [[0, 0, 31, 23], [2, 4, 9, 8], [6, 7, 6, 7]]
    assert b.classes.tolist() == [11, 14, 11]  # dog, person
    assert b.difficult.tolist() == [True, False, False]
    assert b.crowd.tolist() == [False, False, False]
    assert b.of_class(11).tolist() == [[0, 0, 31, 23], [6, 7, 6, 7]]
    # The fixture's own XML of the XML-only image: three objects at xmin..ymax 1..5.
    b = VOCSource(voc, "with_xml").load_boxes(XML_ONLY)
    assert b.boxes.tolist() == [[0, 0, 4, 4]] * 3
    assert b.classes.tolist() == [11, 14, 11]


@pytest.mark.parametrize(
    ("box", "problem"),
    [
        (("2", "3", "33", "10"), "lies outside the image"),  # xmax 33 > W = 32
        (("0", "3", "5", "10"), "lies outside the image"),  # xmin 0: VOC pixels start at 1
        (("2", "3", "5", "25"), "lies outside the image"),  # ymax 25 > H = 24
        (("9", "3", "5", "10"), r"is empty \(xmax < xmin"),
        (("2", "11", "5", "10"), r"is empty \(xmax < xmin or ymax < ymin\)"),
    ],
)
def test_voc_bad_box_names_the_xml_object_box_and_image_size(voc: Path, box: tuple, problem: str) -> None:
    path = write_xml(voc, A, [xml_object("cat", ("1", "1", "4", "4")), xml_object("person", box)])
    with pytest.raises(SampleError, match=r"object 1 \('person'\)") as e:
        VOCSource(voc, "train").load_boxes(A)
    message = str(e.value)
    assert str(path) in message
    assert e.value.reason == "bad_box"
    zero_based = tuple(int(v) - 1 for v in box)
    assert f"x0, y0, x1, y1 = {zero_based}" in message
    assert "the image is 32x24 (W x H" in message
    assert re.search(problem, message)


def test_voc_unparseable_box_values(voc: Path) -> None:
    path = write_xml(voc, A, [xml_object("cat", ("1", "abc", "4", "4"))])
    with pytest.raises(SampleError, match=r"object 0 \('cat'\): <ymin> is 'abc', not a number") as e:
        VOCSource(voc, "train").load_boxes(A)
    assert str(path) in str(e.value)
    write_xml(voc, A, ["<object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object>"])
    with pytest.raises(SampleError, match=r"object 0 \('cat'\) has no <ymin>"):
        VOCSource(voc, "train").load_boxes(A)
    write_xml(voc, A, ["<object><name>cat</name></object>"])
    with pytest.raises(SampleError, match=r"object 0 \('cat'\) has no <bndbox>"):
        VOCSource(voc, "train").load_boxes(A)
    path = write_xml(voc, A, [xml_object("kitten", ("1", "1", "4", "4"))])
    with pytest.raises(SampleError, match=r"object name 'kitten' is not in class_names") as e:
        VOCSource(voc, "train").load_boxes(A)
    assert str(path) in str(e.value)


def test_voc_missing_xml_and_missing_folder(voc: Path) -> None:
    path = voc / "Annotations" / "2007_000002.xml"
    with pytest.raises(MissingFileError, match=f"annotation not found: {path}") as e:
        VOCSource(voc, "train").load_boxes("2007_000002")
    assert e.value.reason == "missing_annotation"
    for p in (voc / "Annotations").iterdir():
        p.unlink()
    (voc / "Annotations").rmdir()
    assert not VOCSource(voc, "train").has_boxes()


def test_voc_fingerprint_changes_when_an_xml_is_edited(voc: Path) -> None:
    """Boxes enter cache keys: the split's fingerprint covers Annotations/, so an edited XML changes it."""
    path = voc / "Annotations" / f"{XML_ONLY}.xml"
    before = fingerprint(voc, "with_xml", ["SegmentationClass"])
    text = path.read_text()
    stamp = path.stat()
    path.write_text(text.replace("<xmax>5</xmax>", "<xmax>6</xmax>", 1))  # same size: only the mtime tells
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    after = fingerprint(voc, "with_xml", ["SegmentationClass"])
    assert after["annotations"].digest != before["annotations"].digest
    assert {k: g.digest for k, g in after.items() if k != "annotations"} == {
        k: g.digest for k, g in before.items() if k != "annotations"
    }


def test_real_voc_sample_has_no_boxes() -> None:
    root = real_data_root() / "voc2012_sample" / "VOCdevkit" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"real VOC sample not found at {root}")
    assert not (root / "Annotations").exists()
    assert not VOCSource(root, "train").has_boxes()


# ------------------------------------------------------------------------------------------------------ COCO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coco_boxes_floor_ceil_clip_and_crowd_in_both_mask_modes(coco: Path) -> None:
    expected = expected_coco_boxes()
    src = COCOSource(coco, "val", empty_images="keep")
    assert not src.use_export
    assert src.has_boxes()
    for i in (10, 20, 30, 40):
        b = src.load_boxes(stem(i))
        assert as_rows(b) == expected[i], i
        assert not b.difficult.any()
    assert src.load_boxes(stem(30)).boxes.shape == (0, 4)

    prepare = load_script("prepare_coco")
    assert prepare.main(["--root", str(coco), "--year", "2017", "--splits", "val", "--workers", "1"]) == 0
    exported = COCOSource(coco, "val", empty_images="keep")
    assert exported.use_export
    assert exported._coco is None  # the index is freed; the boxes must not need it
    for i in (10, 20, 30, 40):
        assert as_rows(exported.load_boxes(stem(i))) == expected[i], i


def test_coco_degenerate_and_malformed_bboxes(coco: Path) -> None:
    h, w = COCO_SIZE

    def edit(data: dict) -> None:
        anns = {a["id"]: a for a in data["annotations"]}
        anns[2]["bbox"] = [12.0, 11.0, 0.0, 0.0]  # zero size: ceil - 1 falls before floor; kept as one pixel
        anns[1]["bbox"] = [45.0, 31.0, 3.0, 2.0]  # right of and below the 40 x 30 image
        anns[5]["bbox"] = [3.0, 4.0, -1.0, 2.0]  # negative width

    edit_coco_json(coco / "annotations" / "instances_val2017.json", edit)
    src = COCOSource(coco, "val")
    b = src.load_boxes(stem(10))
    assert b.boxes.tolist() == [[w - 1, h - 1, w - 1, h - 1], [12, 11, 12, 11], [20, 0, 39, 9]]
    with pytest.raises(SampleError, match=r"instances_val2017\.json: annotation 5 \(image 20\) has bbox") as e:
        src.load_boxes(stem(20))
    assert e.value.reason == "bad_box"


def test_real_coco_boxes_are_the_labels_plus_crowd_classes() -> None:
    root = real_data_root() / "coco2017_sample"
    if not root.is_dir():
        pytest.skip(f"real COCO sample not found at {root}")
    import math

    for split in ("train", "val"):
        src = COCOSource(root, split, 2017)
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        cat_index = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
        anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        crowd_seen = 0
        for image in data["images"]:
            image_id = Path(image["file_name"]).stem
            if image_id not in src.ids:
                continue
            b = src.load_boxes(image_id)
            labels = set(src.labels(image_id).tolist())
            crowd_classes = {cat_index[a["category_id"]] for a in anns[image["id"]] if a["iscrowd"]}
            assert set(b.classes[~b.crowd].tolist()) == labels, image_id
            assert set(b.classes.tolist()) == labels | crowd_classes, image_id
            crowd_seen += int(b.crowd.sum())
            # Each box re-derived here from the json, in plain Python: floor / ceil - 1, clipped.
            w, h = image["width"], image["height"]
            expected = []
            for a in anns[image["id"]]:
                x, y, bw, bh = a["bbox"]
                x0, y0 = min(max(math.floor(x), 0), w - 1), min(max(math.floor(y), 0), h - 1)
                x1 = max(min(max(math.ceil(x + bw) - 1, 0), w - 1), x0)
                y1 = max(min(max(math.ceil(y + bh) - 1, 0), h - 1), y0)
                expected.append(((x0, y0, x1, y1), cat_index[a["category_id"]], bool(a["iscrowd"])))
            assert as_rows(b) == expected, image_id
            assert (b.boxes[:, 2] < w).all()
            assert (b.boxes[:, 3] < h).all()
        assert crowd_seen > 0  # the sample has crowd regions: the flag was exercised


# ------------------------------------------------------------------------------------------------- synthetic


def box_of(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_synthetic_xml_boxes_agree_with_the_masks(synthetic_root: Path) -> None:
    """Single-object images: the mask's object-plus-void pixels span exactly the XML box grown by one pixel.

    The void band is the 3 x 3 dilation minus the erosion of the object's pixels, so object + band is the
    dilation, whose bounding box is the object's box grown by one on every side and clipped to the image.
    Several objects: every class pixel lies in a box of its class, and every label has a box.
    """
    single = truncated_seen = 0
    for split in ("train", "val"):
        src = VOCSource(synthetic_root, split, SYNTHETIC_CLASSES, name="synthetic")
        assert src.has_boxes()
        for image_id in src.ids:
            mask = src.load_mask(image_id)
            h, w = mask.shape
            b = src.load_boxes(image_id)  # raises on any box outside the image
            assert ((b.boxes[:, :2] >= 0) & (b.boxes[:, 2:] < [w, h]) & (b.boxes[:, 2:] >= b.boxes[:, :2])).all()
            assert not b.difficult.any()
            assert not b.crowd.any()
            for c in src.labels(image_id):
                assert len(b.of_class(c)), (image_id, c)
                inside = np.zeros_like(mask, bool)
                for x0, y0, x1, y1 in b.of_class(c):
                    inside[y0 : y1 + 1, x0 : x1 + 1] = True
                assert inside[mask == c + 1].all(), (image_id, c)
            for (x0, y0, x1, y1), c in zip(b.boxes, b.classes, strict=True):
                # A box is spanned by visible pixels of its object, which are c + 1 or void: each side holds one.
                own = (mask == c + 1) | (mask == 255)
                sides = own[y0 : y1 + 1, x0], own[y0 : y1 + 1, x1], own[y0, x0 : x1 + 1], own[y1, x0 : x1 + 1]
                assert all(side.any() for side in sides), (image_id, c)
            xml = ET.parse(synthetic_root / "Annotations" / f"{image_id}.xml").getroot()
            assert xml.findtext("size/width") == str(w)
            assert xml.findtext("size/height") == str(h)
            assert xml.findtext("filename") == f"{image_id}.jpg"
            if len(b) != 1:
                continue
            single += 1
            x0, y0, x1, y1 = b.boxes[0]
            grown = (max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w - 1), min(y1 + 1, h - 1))
            assert box_of(mask != 0) == grown, image_id
            if xml.findtext("object/truncated") == "1":  # a connected shape cut by the edge reaches it
                truncated_seen += 1
                assert x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1, image_id
    assert single >= 5
    assert truncated_seen >= 1


def test_render_is_unchanged_by_the_boxes() -> None:
    """The boxes come without a new rng draw: the masks hash as generator version 1 drew them (digest taken
    from the code before the boxes were added), and `render` is `render_annotated` without its objects."""
    spec = SyntheticSpec(image_size=64, seed=0)
    digest = hashlib.sha256()
    for i in range(10):
        img, mask, _ = render_annotated(i, spec)
        ref_img, ref_mask = render(i, spec)
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(mask, ref_mask)
        digest.update(mask.tobytes())
    assert digest.hexdigest() == "206e30e64a522896f80676e99561a345498e8a241fb730ed1df38d11e2646e0c"


def grown(box, h: int, w: int) -> tuple[int, int, int, int]:
    """A box grown by one pixel on every side, clipped to an (h, w) image: where its object's void band ends."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w - 1), min(y1 + 1, h - 1)


def test_rendered_boxes_are_the_visible_extent_of_each_object() -> None:
    """Checked against the mask alone, on 200 renders.

    Every class pixel lies in a box of its class. Where the objects stand apart (their grown boxes are disjoint
    and each connected part of the non-background mask meets one of them), the parts meeting an object's grown
    box are its pixels plus its void band, i.e. its 3 x 3 dilation: their bounding box is exactly that grown box.
    """
    from skimage.measure import label

    spec = SyntheticSpec(image_size=64, seed=0)
    apart = 0
    for i in range(200):
        _, mask, objects = render_annotated(i, spec)
        h, w = mask.shape
        for v in set(np.unique(mask).tolist()) - {0, 255}:
            inside = np.zeros_like(mask, bool)
            for o in objects:
                if o.class_index == v - 1:
                    x0, y0, x1, y1 = o.box
                    inside[y0 : y1 + 1, x0 : x1 + 1] = True
            assert inside[mask == v].all(), (i, v)
        rects = []
        for o in objects:
            x0, y0, x1, y1 = grown(o.box, h, w)
            r = np.zeros_like(mask, bool)
            r[y0 : y1 + 1, x0 : x1 + 1] = True
            rects.append(r)
        parts = label(mask != 0, connectivity=2)  # (H, W) part index, 0 = background
        meets = [[j for j, r in enumerate(rects) if r[parts == k].any()] for k in range(1, parts.max() + 1)]
        disjoint = not any((rects[a] & rects[b]).any() for a in range(len(rects)) for b in range(a))
        if not disjoint or any(len(m) != 1 for m in meets):
            continue
        apart += 1
        for j, o in enumerate(objects):
            own = np.isin(parts, [k + 1 for k, m in enumerate(meets) if m == [j]])
            assert box_of(own) == grown(o.box, h, w), (i, j)
    assert apart >= 100  # the exact check ran on most images (130 of these 200)


def test_render_annotated_drops_a_hidden_object() -> None:
    """Sample 26 (64 px, seed 0) draws three objects and a later one covers all of another: two are listed.

    The two boxes are the mask's two connected parts shrunk by their void band (see the test above).
    """
    _, mask, objects = render_annotated(26, SyntheticSpec(image_size=64, seed=0))
    assert [(o.class_index, o.box, o.truncated) for o in objects] == [
        (3, (13, 42, 40, 63), True),
        (0, (13, 13, 29, 33), False),
    ]
    assert sorted(set(np.unique(mask).tolist()) - {0, 255}) == [1, 4]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every image, mask and split list."""
    out = {}
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        for p in sorted((root / sub).iterdir()):
            out[f"{sub}/{p.name}"] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def test_version_1_dataset_is_upgraded_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = SyntheticSpec(num_train=4, num_val=2, image_size=48, seed=1)
    root = ensure_synthetic(tmp_path / "s", spec)
    xmls = {p.name: p.read_bytes() for p in (root / "Annotations").iterdir()}
    assert len(xmls) == 6
    write_json(root / "generator.json", {**asdict(spec), "version": 1})  # as generator version 1 left it
    for p in (root / "Annotations").iterdir():
        p.unlink()
    (root / "Annotations").rmdir()
    before = snapshot(root)

    with pytest.raises(ValueError, match="generated with"):  # an otherwise different spec is still refused
        ensure_synthetic(root, SyntheticSpec(num_train=4, num_val=2, image_size=48, seed=2))
    assert not (root / "Annotations").exists()

    with caplog.at_level(logging.INFO, logger="wsss.data.synthetic"):
        assert ensure_synthetic(root, spec) == root
    assert [r.getMessage() for r in caplog.records if r.name == "wsss.data.synthetic"] == [
        f"{root}: upgrading the synthetic dataset from generator version 1 to 2: writing its Annotations/*.xml "
        "(images and masks are kept)"
    ]
    assert {p.name: p.read_bytes() for p in (root / "Annotations").iterdir()} == xmls
    assert snapshot(root) == before  # images, masks and lists: same bytes, never rewritten
    assert json.loads((root / "generator.json").read_text()) == asdict(spec)
    assert asdict(spec)["version"] == 2

    # A version-1 generation that was killed finishes as version 2.
    (root / "generator.json").unlink()
    (root / "Annotations" / "val_00005.xml").unlink()
    write_json(root / ".generating.json", {**asdict(spec), "version": 1})
    ensure_synthetic(root, spec)
    assert (root / "Annotations" / "val_00005.xml").read_bytes() == xmls["val_00005.xml"]
    assert json.loads((root / "generator.json").read_text()) == asdict(spec)
    assert not (root / ".generating.json").exists()
    assert snapshot(root) == before


def test_synthetic_source_reads_its_boxes(synthetic_root: Path) -> None:
    """The generated set is read by the VOC reader, XML boxes included, with its sizes."""
    src = VOCSource(synthetic_root, "val", SYNTHETIC_CLASSES, name="synthetic")
    spec = SyntheticSpec(num_train=24, num_val=8, image_size=64, seed=0)
    for k, image_id in enumerate(src.ids):
        _, _, objects = render_annotated(spec.num_train + k, spec)
        b = src.load_boxes(image_id)
        assert b.boxes.tolist() == [list(o.box) for o in objects]
        assert b.classes.tolist() == [o.class_index for o in objects]
