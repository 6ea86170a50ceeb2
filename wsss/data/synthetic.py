"""The embedded dataset: textured shapes on cluttered backgrounds, written once in PASCAL VOC layout.

Each image holds 1-3 objects (a class may repeat) drawn with random colours, so only shape and texture tell the
classes apart. Object sizes run from about 15 % to 70 % of the image side. Backgrounds are smooth colour noise
with distractors that belong to no class (irregular blobs, line segments, speckle). Masks follow VOC: 0
background, c + 1 for class c, a 255 void band along every object's outline. Generation is deterministic in
(seed, index) and writes files atomically; `generator.json` records the parameters and is written last.

Each image also gets a VOC annotation `Annotations/<id>.xml`, so the folder is a complete VOC-layout dataset
with ground-truth boxes. An object's box is the bounding box of its visible pixels in the final image (later
objects occlude earlier ones; the pixels are the instance's own, before the 255 void band is drawn, so the box
sits one pixel inside the outer edge of the band), written 1-based inclusive as VOC does; `truncated` is 1 when
part of the shape falls outside the image. An object left without any visible pixel gets no entry.

Generator versions: 1 wrote images, masks and split lists; 2 adds the XMLs (images and masks are byte-identical).
`ensure_synthetic` upgrades a finished version-1 dataset in place by writing the missing XMLs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsss.artifacts import IGNORE_INDEX, atomic_open, read_json, write_json, write_mask
from wsss.data import voc
from wsss.data.voc import VOCSource
from wsss.dist import progress
from wsss.fingerprint import FileGroup, hash_files

log = logging.getLogger(__name__)

# Class = (shape, texture). Each texture is shared by two classes, so neither cue alone names a class.
SYNTHETIC_CLASSES = ["disc", "triangle", "square", "star", "ring", "cross"]
_TEXTURES = {
    "disc": "stripes",
    "triangle": "dots",
    "square": "checker",
    "star": "stripes",
    "ring": "checker",
    "cross": "dots",
}
GENERATOR_VERSION = 2
# Older versions whose images and masks are still current: their datasets are upgraded in place, not refused.
_UPGRADABLE_VERSIONS = (1,)


@dataclass(frozen=True)
class SyntheticSpec:
    """What determines the generated files."""

    num_train: int = 2000
    num_val: int = 300
    image_size: int = 128
    seed: int = 0
    version: int = GENERATOR_VERSION


@dataclass(frozen=True)
class DrawnObject:
    """One object `render_annotated` drew that is visible in the final image.

    Args:
        class_index: Foreground class index into `SYNTHETIC_CLASSES`.
        box: x0, y0, x1, y1 of its visible pixels, 0-based inclusive (the convention of `wsss.data.base`).
        truncated: Part of its shape falls outside the image.
    """

    class_index: int
    box: tuple[int, int, int, int]
    truncated: bool


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A binary (size, size) mask of `shape`, randomly rotated and slightly stretched."""
    m = np.zeros((size, size), np.uint8)
    c = (size - 1) / 2.0
    r = size / 2.0 - 1
    angle = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.8, 1.0)

    def poly(radii: np.ndarray, n: int) -> np.ndarray:
        t = angle + np.arange(n) * 2 * np.pi / n
        pts = np.stack([c + radii * np.cos(t), c + stretch * radii * np.sin(t)], 1)
        return np.round(pts).astype(np.int32)

    if shape == "disc":
        cv2.ellipse(m, (round(c), round(c)), (round(r), round(r * stretch)), np.degrees(angle), 0, 360, 1, -1)
    elif shape == "ring":
        cv2.ellipse(m, (round(c), round(c)), (round(r), round(r * stretch)), np.degrees(angle), 0, 360, 1, -1)
        inner = max(1, round(r * rng.uniform(0.45, 0.6)))
        cv2.ellipse(m, (round(c), round(c)), (inner, round(inner * stretch)), np.degrees(angle), 0, 360, 0, -1)
    elif shape == "triangle":
        cv2.fillPoly(m, [poly(np.full(3, r), 3)], 1)
    elif shape == "square":
        cv2.fillPoly(m, [poly(np.full(4, r), 4)], 1)
    elif shape == "star":
        radii = np.tile([r, r * 0.42], 5)
        cv2.fillPoly(m, [poly(radii, 10)], 1)
    elif shape == "cross":
        w = max(1, round(r * 0.36))
        rot = cv2.getRotationMatrix2D((c, c), np.degrees(angle), 1.0)
        bar = np.zeros_like(m)
        cv2.rectangle(bar, (round(c - r), round(c - w)), (round(c + r), round(c + w)), 1, -1)
        cv2.rectangle(bar, (round(c - w), round(c - r)), (round(c + w), round(c + r)), 1, -1)
        m = cv2.warpAffine(bar, rot, (size, size), flags=cv2.INTER_NEAREST)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) weight in [0, 1] blending the object's two colours."""
    if kind == "plain":
        return np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 10)
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        return (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    if kind == "dots":
        d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
        return (d < period * 0.33).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise plus distractors: blobs, line segments and speckle that belong to no class."""
    low = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(1, 4)):  # irregular blobs: random star-convex polygons
        n = rng.integers(5, 9)
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(0.05, 0.2) * size * rng.uniform(0.5, 1.0, n)
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1).round().astype(np.int32)
        cv2.fillPoly(img, [pts], _colour(rng).tolist())
    for _ in range(rng.integers(1, 5)):  # line segments
        p, q = rng.uniform(0, size, (2, 2)).round().astype(int)
        cv2.line(img, tuple(map(int, p)), tuple(map(int, q)), _colour(rng).tolist(), int(rng.integers(1, 4)))
    img += rng.normal(0, rng.uniform(2, 12), img.shape).astype(np.float32)  # speckle
    return img


def render(index: int, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 RGB and mask (H, W) uint8 of sample `index`; deterministic in (seed, index)."""
    img, mask, _ = render_annotated(index, spec)
    return img, mask


def render_annotated(index: int, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, list[DrawnObject]]:
    """`render`'s image and mask, and the visible objects in drawing order (see the module docstring).

    Returns:
        Image (H, W, 3) uint8 RGB, mask (H, W) uint8, and one `DrawnObject` per object with a visible pixel.
    """
    # Every rng call below is part of the dataset's definition: adding or reordering one changes every image.
    rng = np.random.default_rng([spec.seed, index])
    size = spec.image_size
    img = _background(size, rng)
    mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)  # k + 1 where object k is on top, 0 where no object is
    truncated = []
    border = np.zeros((size, size), bool)
    kernel = np.ones((3, 3), np.uint8)
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    classes = rng.integers(0, len(SYNTHETIC_CLASSES), n_objects)
    if n_objects > 1 and rng.random() < 0.3:  # repeated instances of one class
        classes[1] = classes[0]
    for k, c in enumerate(classes):
        name = SYNTHETIC_CLASSES[c]
        side = int(np.clip(round(size * np.exp(rng.uniform(np.log(0.15), np.log(0.7)))), 8, size))
        shape = _shape_mask(name, side, rng)
        tex = _texture(_TEXTURES[name], side, rng)
        c1, c2 = _colour(rng), _colour(rng)
        while np.abs(c1 - c2).sum() < 120 and _TEXTURES[name] != "plain":
            c2 = _colour(rng)
        patch = c1 * (1 - tex[..., None]) + c2 * tex[..., None]
        patch += rng.normal(0, 4, patch.shape).astype(np.float32)
        # Objects may be cut by the image edge, as in real photos.
        x0, y0 = rng.integers(-side // 4, size - side + side // 4 + 1, 2)
        xs, ys = slice(max(x0, 0), min(x0 + side, size)), slice(max(y0, 0), min(y0 + side, size))
        sub = shape[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0].astype(bool)
        region = img[ys, xs]
        region[sub] = patch[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0][sub]
        mask[ys, xs][sub] = c + 1
        instances[ys, xs][sub] = k + 1
        truncated.append(np.count_nonzero(sub) < np.count_nonzero(shape))
        full = np.zeros((size, size), np.uint8)
        full[ys, xs] = sub
        edge = cv2.dilate(full, kernel) != cv2.erode(full, kernel)
        border |= edge
    mask[border] = IGNORE_INDEX
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    objects = []
    for k, c in enumerate(classes):
        ys_k, xs_k = np.nonzero(instances == k + 1)
        if len(xs_k):  # an object hidden by later ones (or cut off entirely) is not in the image
            box = (int(xs_k.min()), int(ys_k.min()), int(xs_k.max()), int(ys_k.max()))
            objects.append(DrawnObject(int(c), box, bool(truncated[k])))
    return np.clip(img, 0, 255).astype(np.uint8), mask, objects


def annotation_xml(image_id: str, size: tuple[int, int], objects: list[DrawnObject]) -> str:
    """The PASCAL VOC annotation of one image: `size` is (H, W); boxes are written 1-based inclusive, as VOC's."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = SYNTHETIC_CLASSES[obj.class_index]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = str(int(obj.truncated))
        ET.SubElement(el, "difficult").text = "0"
        bndbox = ET.SubElement(el, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box, strict=True):
            ET.SubElement(bndbox, tag).text = str(value + 1)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with atomic_open(path, "wb") as f:
        f.write(buf.tobytes())


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """flock on `.<root name>.lock` beside `root`: parallel jobs (or ranks) generate the dataset once."""
    root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.parent / f".{root.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_synthetic(root: str | Path, spec: SyntheticSpec) -> Path:
    """Generate the dataset into `root` unless a complete one with the same spec is there; return `root`.

    A generation that was killed resumes (its `.generating.json` records the spec); files are written
    atomically, so the ones that exist are complete. A dataset of an older generator version whose spec is
    otherwise equal is upgraded in place under the generation lock: the files it lacks (the XMLs of version 1)
    are written, the others kept, and `generator.json` is rewritten last.

    Raises:
        ValueError: `root` holds a synthetic dataset generated with a different spec, or other files.
    """
    root = Path(root)
    marker = root / "generator.json"
    if marker.is_file():  # the common case: no lock needed to read a finished dataset
        found = read_json(marker)
        if not _upgradable(found, spec):
            return _check_spec(root, found, spec)
    with _generation_lock(root):
        if marker.is_file():  # finished, maybe by another job while we waited; maybe at an older version
            found = read_json(marker)
            if _upgradable(found, spec):
                log.info(
                    "%s: upgrading the synthetic dataset from generator version %s to %s: writing its "
                    "Annotations/*.xml (images and masks are kept)",
                    root,
                    found.get("version"),
                    spec.version,
                )
                _write_files(root, spec)
                write_json(marker, asdict(spec))
                return root
            return _check_spec(root, found, spec)
        started = root / ".generating.json"
        if started.is_file():
            found = read_json(started)
            if _upgradable(found, spec):  # a killed older generation: its files stay valid, finish at this version
                write_json(started, asdict(spec))
            else:
                _check_spec(root, found, spec)
            log.info("resuming the interrupted generation of %s", root)
        elif root.is_dir() and any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and holds no wsss synthetic dataset (no generator.json); refusing to write "
                "into it. To read a dataset in VOC layout there, use dataset=voc12 dataset.root=... "
                "dataset.class_names=[...]"
            )
        else:
            write_json(started, asdict(spec))
        _generate(root, spec)
        write_json(marker, asdict(spec))
        started.unlink()
    return root


def _upgradable(found: dict, spec: SyntheticSpec) -> bool:
    """Whether `found` is the spec of an older generator version whose files `spec` only adds to."""
    return (
        spec.version == GENERATOR_VERSION
        and found.get("version") in _UPGRADABLE_VERSIONS
        and {**found, "version": spec.version} == asdict(spec)
    )


def _check_spec(root: Path, found: dict, spec: SyntheticSpec) -> Path:
    if found != asdict(spec):
        raise ValueError(
            f"{root} holds a synthetic dataset generated with {found}, not {asdict(spec)}; "
            "point dataset.root at another folder or delete this one"
        )
    return root


def _generate(root: Path, spec: SyntheticSpec) -> None:
    """Write every image, mask, annotation and split list that is not there yet."""
    log.info("generating the synthetic dataset into %s (%s)", root, asdict(spec))
    _write_files(root, spec)


def _write_files(root: Path, spec: SyntheticSpec) -> None:
    """Write the files that are missing (atomic writes: an existing file is complete) and the split lists."""
    splits = {"train": range(spec.num_train), "val": range(spec.num_train, spec.num_train + spec.num_val)}
    for split, indices in splits.items():
        ids = [f"{split}_{i:05d}" for i in indices]
        for image_id, i in zip(progress(ids, desc=f"synthetic {split}", unit="img"), indices, strict=True):
            img_path = root / "JPEGImages" / f"{image_id}.jpg"
            mask_path = root / "SegmentationClass" / f"{image_id}.png"
            xml_path = root / "Annotations" / f"{image_id}.xml"
            missing = [p for p in (img_path, mask_path, xml_path) if not p.is_file()]
            if not missing:
                continue
            img, mask, objects = render_annotated(i, spec)
            if img_path in missing:
                _write_jpeg(img_path, img)
            if mask_path in missing:
                write_mask(mask_path, mask)
            if xml_path in missing:
                with atomic_open(xml_path, "w") as f:
                    f.write(annotation_xml(image_id, mask.shape, objects))
        listing = "\n".join(ids) + "\n"
        list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_path.is_file() or list_path.read_text() != listing:  # an upgrade leaves the lists untouched
            with atomic_open(list_path, "w") as f:
                f.write(listing)


def _prepare(cfg: Any) -> list[str] | None:
    """Generate the dataset described by `cfg` if needed; the class names to read it with (None: a foreign
    VOC-layout folder given as dataset.root, read with dataset.class_names, never generated into)."""
    root = Path(cfg.root)
    ours = (root / "generator.json").is_file() or (root / ".generating.json").is_file()
    if not ours and (root / "ImageSets" / "Segmentation").is_dir():
        if cfg.class_names is None:
            raise ValueError(f"{root}: a VOC-layout dataset needs dataset.class_names=[...] (foreground classes)")
        return None
    s = cfg.synthetic
    ensure_synthetic(
        root, SyntheticSpec(num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed)
    )
    return list(cfg.class_names) if cfg.class_names is not None else list(SYNTHETIC_CLASSES)


def from_config(cfg: Any, split: str) -> VOCSource:
    """The split of the embedded dataset described by a `DatasetConfig` (generated on first use)."""
    names = _prepare(cfg)
    if names is None:
        log.info("dataset.root %s is a VOC-layout dataset, not a generated one: reading it as such", cfg.root)
    return voc.from_config(cfg, split, name="synthetic", class_names=names)


def fingerprint_from_config(cfg: Any, split: str) -> dict[str, FileGroup]:
    """`wsss.data.voc.fingerprint` of the split, after generating the dataset if needed."""
    _prepare(cfg)
    return {
        **voc.fingerprint_from_config(cfg, split),
        "generator": hash_files([Path(cfg.root) / "generator.json"], "generator.json"),
    }
