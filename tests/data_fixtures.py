"""Builders of tiny generated dataset trees for the reader tests: VOC 2012 (+ SBD), COCO and folder layouts.

Everything is drawn from rectangles so the expected masks and labels are known exactly. The real samples live
in `../shared/data` (see `real_data_root`); these trees stand in for what the samples lack (XML, SBD .mat
files, images without annotations, broken files).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.artifacts import read_mask, write_mask
from wsss.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec, ensure_synthetic

REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """The shared real samples, reached relative to the repository root (may not exist)."""
    return REPO / ".." / "shared" / "data"


def voc_sample_subset(shared: Path, dest: Path, split: str, count: int) -> Path:
    """A VOC 2012 root under `dest` whose `split` list is the first `count` ids of the shared sample's `split`
    list: the image and mask folders are symlinks to the sample's, so only the list is new. Returns the root."""
    sample = shared / "voc2012_sample" / "VOCdevkit" / "VOC2012"
    ids = (sample / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:count]
    assert len(ids) == count, f"{split}.txt of {sample} has fewer than {count} ids"
    root = dest / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / folder).symlink_to(sample / folder, target_is_directory=True)
    return root


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    """A random RGB JPEG of size (h, w)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def rect_mask(h: int, w: int, classes: list[int], void: bool = True) -> np.ndarray:
    """(h, w) uint8: one horizontal band per class index c (value c + 1), a 255 line above each if `void`."""
    m = np.zeros((h, w), np.uint8)
    for k, c in enumerate(classes):
        top = 2 + 5 * k
        m[top : top + 3, 2 : w - 2] = c + 1
        if void:
            m[top - 1, 2 : w - 2] = 255
    return m


def voc_xml(names: list[str]) -> str:
    """A VOC annotation XML listing `names` as objects."""
    objects = "".join(
        f"<object><name>\n\t{n} </name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for n in names
    )
    return f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>{objects}</annotation>"


# id -> (H, W). train: a, b; val: c; SBD-only: d, e; no mask (XML only): f.
VOC_SIZES = {
    "2007_000001": (24, 32),
    "2007_000002": (26, 30),
    "2007_000003": (28, 24),
    "2008_000004": (24, 28),
    "2008_000005": (30, 26),
    "2009_000006": (22, 30),
}
# Classes (0-based) drawn in SegmentationClass / SegmentationClassAug.
VOC_SEG = {"2007_000001": [0, 14], "2007_000002": [11], "2007_000003": [4, 6]}
VOC_AUG = {"2007_000001": [2], "2008_000004": [7], "2008_000005": [14, 19]}  # a's Aug mask differs on purpose
VOC_XML = {"2007_000001": ["cat"], "2009_000006": ["dog", "person", "dog"]}
VOC_LISTS = {
    "train": ["2007_000001", "2007_000002"],
    "val": ["2007_000003"],
    "trainval": ["2007_000001", "2007_000002", "2007_000003"],
    "train_aug": ["2007_000001", "2007_000002", "2008_000004", "2008_000005"],
    "with_xml": ["2007_000002", "2009_000006"],
}
# SBD: train lists d and the VOC val id c (to be removed), val lists e.
SBD_LISTS = {"train": ["2008_000004", "2007_000003"], "val": ["2008_000005"]}
SBD_MASKS = {"2008_000004": [7], "2007_000003": [4], "2008_000005": [14, 19]}


def make_voc_tree(base: Path, with_aug: bool = True) -> Path:
    """A VOCdevkit/VOC2012 tree under `base`; returns the VOC2012 folder."""
    root = base / "VOCdevkit" / "VOC2012"
    for k, (image_id, (h, w)) in enumerate(VOC_SIZES.items()):
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", h, w, seed=k)
    for image_id, classes in VOC_SEG.items():
        write_mask(root / "SegmentationClass" / f"{image_id}.png", rect_mask(*VOC_SIZES[image_id], classes))
    if with_aug:
        for image_id, classes in VOC_AUG.items():
            mask = rect_mask(*VOC_SIZES[image_id], classes, void=False)
            write_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
    (root / "Annotations").mkdir(parents=True)
    for image_id, names in VOC_XML.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(names))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in VOC_LISTS.items():
        if split != "train_aug" or with_aug:
            (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_sbd_tree(base: Path) -> Path:
    """An SBD `benchmark_RELEASE/dataset` folder with cls/*.mat (GTcls.Segmentation) and train/val lists."""
    import scipy.io

    root = base / "benchmark_RELEASE" / "dataset"
    (root / "cls").mkdir(parents=True)
    for image_id, classes in SBD_MASKS.items():
        seg = rect_mask(*VOC_SIZES[image_id], classes, void=False)
        gt = {"Segmentation": seg, "Boundaries": np.zeros((1, 20), object), "CategoriesPresent": classes}
        scipy.io.savemat(root / "cls" / f"{image_id}.mat", {"GTcls": gt})
    for split, ids in SBD_LISTS.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


# ------------------------------------------------------------------------------------------------------- COCO

# Category ids with gaps, listed out of order in the json: sorted ids 1, 3, 7, 90 -> indices 0..3.
COCO_CATEGORIES = [
    {"id": 7, "name": "train", "supercategory": "vehicle"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
COCO_CLASSES = ["person", "car", "train", "toothbrush"]
COCO_SIZE = (30, 40)  # (H, W) of every fixture image


def rect_poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A rectangle polygon; pycocotools fills rows y0..y1-1 and columns x0..x1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The (H, W) bool mask `rect_poly` rasterises to."""
    m = np.zeros(COCO_SIZE, bool)
    m[y0:y1, x0:x1] = True
    return m


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = m.astype(np.uint8).ravel(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


def compressed_rle(m: np.ndarray) -> dict:
    """COCO compressed RLE with string counts, as in the json files."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(m.shape), "counts": rle["counts"].decode("ascii")}


def coco_annotations() -> tuple[list[dict], list[dict]]:
    """(images, annotations) of the fixture, with the exact expected masks in `expected_coco_masks`.

    The `bbox`es carry fractional and out-of-image values on purpose; `expected_coco_boxes` converts them by hand.
    """
    images = [
        {"id": 30, "file_name": "{}30.jpg"},  # no annotation at all
        {"id": 10, "file_name": "{}10.jpg"},  # overlap + crowd
        {"id": 40, "file_name": "{}40.jpg"},  # crowd only -> no labels
        {"id": 20, "file_name": "{}20.jpg"},  # two-part polygon, compressed RLE, equal-area tie
    ]
    anns = [
        # image 10: a big car, a small person on top of it, a crowd region over car and background.
        {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 400.0,
         "segmentation": [rect_poly(5, 5, 25, 25)], "bbox": [4.7, 5.25, 20.3, 19.75]},
        {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 0, "area": 36.0,
         "segmentation": [rect_poly(10, 10, 16, 16)], "bbox": [10.0, 10.0, 6.0, 6.0]},
        {"id": 3, "image_id": 10, "category_id": 7, "iscrowd": 1, "area": 200.0,
         "segmentation": uncompressed_rle(box(20, 0, 40, 10)), "bbox": [20.0, 0.0, 20.5, 10.0]},
        # image 20: toothbrush in two parts; a train as compressed RLE; equal areas of person (id 5) and train
        # (id 6) overlapping: the later id (train) ends on top.
        {"id": 4, "image_id": 20, "category_id": 90, "iscrowd": 0, "area": 8.0,
         "segmentation": [rect_poly(0, 0, 2, 2), rect_poly(36, 26, 38, 28)], "bbox": [-0.5, 0.0, 38.0, 28.0]},
        {"id": 5, "image_id": 20, "category_id": 1, "iscrowd": 0, "area": 100.0,
         "segmentation": [rect_poly(5, 5, 15, 15)], "bbox": [5.0, 5.0, 10.0, 10.0]},
        {"id": 6, "image_id": 20, "category_id": 7, "iscrowd": 0, "area": 100.0,
         "segmentation": compressed_rle(box(10, 10, 20, 20)), "bbox": [10.2, 9.9, 9.6, 10.1]},
        # image 40: only a crowd.
        {"id": 7, "image_id": 40, "category_id": 3, "iscrowd": 1, "area": 50.0,
         "segmentation": uncompressed_rle(box(0, 0, 10, 5)), "bbox": [0.0, 0.0, 10.0, 5.0]},
    ]  # fmt: skip
    return images, anns


def expected_coco_masks() -> dict[int, np.ndarray]:
    """Hand-written expected masks per image id, under the documented rule (values = index + 1)."""
    m10 = np.zeros(COCO_SIZE, np.uint8)
    m10[5:25, 5:25] = 2  # car
    m10[10:16, 10:16] = 1  # person on top (smaller)
    crowd = box(20, 0, 40, 10)
    m10[crowd & (m10 == 0)] = 255  # crowd over background only
    m20 = np.zeros(COCO_SIZE, np.uint8)
    m20[5:15, 5:15] = 1  # person
    m20[10:20, 10:20] = 3  # train, same area, later id: on top
    m20[0:2, 0:2] = 4  # toothbrush (smallest) last
    m20[26:28, 36:38] = 4
    m30 = np.zeros(COCO_SIZE, np.uint8)
    m40 = np.zeros(COCO_SIZE, np.uint8)
    m40[0:5, 0:10] = 255
    return {10: m10, 20: m20, 30: m30, 40: m40}


def expected_coco_boxes() -> dict[int, list[tuple[tuple[int, int, int, int], int, bool]]]:
    """Per image id, (x0, y0, x1, y1 0-based inclusive, class index, crowd) of each annotation in json order."""
    return {
        # car [4.7, 5.25, 20.3, 19.75]: floor 4, 5 (not rounded: 5, 5); ceil(25.0) - 1 = 24 twice.
        # crowd train [20, 0, 20.5, 10]: ceil(40.5) - 1 = 40 is clipped to the last column, 39.
        10: [((4, 5, 24, 24), 1, False), ((10, 10, 15, 15), 0, False), ((20, 0, 39, 9), 2, True)],
        # toothbrush [-0.5, 0, 38, 28]: floor(-0.5) = -1 clipped to 0; ceil(37.5) - 1 = 37.
        # train [10.2, 9.9, 9.6, 10.1]: floor 10, 9; ceil(19.8) - 1 = 19, ceil(20.0) - 1 = 19.
        20: [((0, 0, 37, 27), 3, False), ((5, 5, 14, 14), 0, False), ((10, 9, 19, 19), 2, False)],
        30: [],
        40: [((0, 0, 9, 4), 1, True)],
    }


def coco_prefix(split: str, year: int) -> str:
    """File name prefix: COCO 2014 names files COCO_<split>2014_<id>, 2017 only by the zero-padded id."""
    return f"COCO_{split}{year}_0000000000" if year == 2014 else "0000000000"


def make_coco_tree(base: Path, split: str = "val", year: int = 2017) -> Path:
    """A COCO root with annotations/instances_<split><year>.json and <split><year>/*.jpg; returns the root."""
    root = base / "coco"
    images, anns = coco_annotations()
    prefix = coco_prefix(split, year)
    h, w = COCO_SIZE
    for img in images:
        img["file_name"] = img["file_name"].format(prefix)
        img["height"], img["width"] = h, w
        write_jpeg(root / f"{split}{year}" / img["file_name"], h, w, seed=img["id"])
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": COCO_CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
    return root


def edit_coco_json(path: Path, edit) -> None:
    """Rewrite a fixture json through `edit(data)`."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- a folder dataset (dataset=folder) ---------------------------------------------------------------------

FOLDER_CLASSES = sorted(SYNTHETIC_CLASSES)  # the class order a labels file gives when dataset.class_names is unset


def read_csv_rows(path: Path) -> list[list[str]]:
    """The rows of a CSV file."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_csv_rows(path: Path, rows: list[list[str]]) -> None:
    """Write `rows` as a CSV file."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def build_folder(tmp_path: Path, masks: str = "half", labels: bool = True, n: int = 24) -> Path:
    """A folder dataset from the synthetic generator's files: images in two nested folders, labels.csv in the
    names form (the classes of each ground-truth mask), masks for every other image ("half"), all, or none."""
    src = ensure_synthetic(tmp_path / "syn", SyntheticSpec(num_train=n, num_val=0, image_size=64))
    root = tmp_path / "mine"
    rows = [["image", "labels"]]
    for k, i in enumerate((src / "ImageSets" / "Segmentation" / "train.txt").read_text().split()):
        sub = "ward_a" if k % 2 else "ward_b/day2"
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", root / "images" / sub / f"{i}.jpg")
        mask = read_mask(src / "SegmentationClass" / f"{i}.png")
        names = [SYNTHETIC_CLASSES[v - 1] for v in np.unique(mask) if 0 < v < 255]
        rows.append([f"{sub}/{i}.jpg" if k % 3 else f"{sub}/{i}", ";".join(names)])  # with and without suffix
        if masks == "all" or (masks == "half" and k % 2 == 0):
            # the folder's masks use the sorted class order: remap the generator's values
            remap = np.full(256, 255, np.uint8)
            remap[0] = 0
            for c, name in enumerate(SYNTHETIC_CLASSES):
                remap[c + 1] = FOLDER_CLASSES.index(name) + 1
            (root / "masks" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(remap[mask]).save(root / "masks" / sub / f"{i}.png")
    if labels:
        write_csv_rows(root / "labels.csv", rows)
    return root
