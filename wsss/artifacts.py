"""Atomic writes and the on-disk formats of wsss artifacts: npz CAMs, palette PNG masks, JSON manifests."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.errors import DamagedFileError, WriteError

IGNORE_INDEX = 255
_UMASK = os.umask(0)
os.umask(_UMASK)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), shape (n, 3) uint8; index 255 is (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_PALETTE: list[int] = voc_colormap().reshape(-1).tolist()


class _WriteRecorder:
    """A file wrapper that remembers an OSError from `write` (writers such as torch.save replace it with their own)."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`, on error delete it.

    A killed run therefore leaves either the old file or no file, never a half-written one (a leftover
    `.<name>.*.tmp` of a killed run is removed by the pipeline before the artifact is built again).

    Raises:
        WriteError: the write failed (no space left, file too large, permission denied, read-only filesystem),
            also where a writer such as `torch.save` reports it in its own words; the message names `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from e
    recorder = None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, mode) as f:
            recorder = _WriteRecorder(f)
            yield recorder
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else (recorder.error if recorder is not None else None)
        if cause is not None and not isinstance(e, WriteError):
            raise WriteError(f"{path}: cannot write ({cause.strerror or cause})") from e
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a file that is not valid JSON is a `DamagedFileError` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedFileError(path, f"not valid JSON ({e})") from e


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a (H, W) uint8 label map as a palette PNG with the VOC colour map, atomically."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"{path}: mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    img = Image.fromarray(mask, mode="P")
    img.putpalette(VOC_PALETTE)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 indices.

    Palette ("P") and greyscale ("L") PNGs are read as indices. An RGB PNG is accepted only when every colour
    is a VOC palette colour (then mapped back to its index); otherwise it is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable mask ({e})") from e
    if mode in ("P", "L"):
        return np.array(arr, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    if mode in ("RGB", "RGBA"):
        return _rgb_to_index(arr[..., :3], path)
    raise ValueError(f"{path}: mask has PIL mode {mode!r}; expected a palette (P) or greyscale (L) PNG")


def _rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map an RGB rendering of a VOC palette mask back to indices, or fail naming the first foreign colour."""
    cmap = voc_colormap().astype(np.int64)
    code = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    lut = {int(c): i for i, c in enumerate(code)}
    # Only indices 0..254 (classes) and 255 (void) are meaningful; later duplicates cannot occur in this map.
    pix = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(pix, return_inverse=True)
    out = np.empty(len(uniq), dtype=np.uint8)
    for j, u in enumerate(uniq):
        if int(u) not in lut:
            r, g, b = (int(u) >> 16) & 255, (int(u) >> 8) & 255, int(u) & 255
            raise ValueError(
                f"{path}: RGB mask has colour ({r}, {g}, {b}) that is not in the VOC palette; "
                "save masks as palette PNGs"
            )
        out[j] = lut[int(u)]
    return out[inverse].reshape(pix.shape)


CAM_STORES = ("float32", "float16", "uint8", "quarter")


def strided_maps(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """The 1/4-resolution (ceil) maps of full-resolution ones, bilinear as the CAM stage makes them: the
    `strided` array `write_cams` keeps beside refined or imported maps."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    size = (-(-t.shape[1] // 4), -(-t.shape[2] // 4))
    if t.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


def write_cams(
    path: str | Path,
    keys: np.ndarray,
    maps: np.ndarray,
    strided: np.ndarray,
    store: str = "float16",
    background: np.ndarray | None = None,
) -> None:
    """Write one image's CAMs as npz (no pickles): `keys` (K,) int16 class indices, `size` (H, W), `store`.

    `store` picks how the maps in [0, 1] are kept (bytes per image for K maps of H x W):
    - "float32": `maps`, `strided` (and `background`) float32, as computed (4 K H W bytes and 1/16 of it: for
      comparisons with other code at full precision, e.g. IRN's `make_cam.py`);
    - "float16": `maps` (K, H, W) float16 and `strided` (K, H/4, W/4) float16 (2 K H W bytes and 1/16 of it);
    - "uint8": `maps` quantised to round(255 x) (half of that; `read_cams` gives q / 255), `strided` float16;
    - "quarter": `strided` only (1/16 of float16); `read_cams` upsamples it bilinearly to (H, W).

    `background` (H, W), for refinements that score the background (the CRF), is kept as float16: masks then
    compare each pixel's best map with it instead of with the constant threshold.
    """
    keys = np.asarray(keys, dtype=np.int16)
    small = np.float32 if store == "float32" else np.float16
    maps, strided = np.asarray(maps, dtype=np.float32), np.asarray(strided, dtype=small)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0] or strided.shape[0] != keys.shape[0]:
        raise ValueError(f"{path}: maps {maps.shape} / strided {strided.shape} do not match keys {keys.shape}")
    if store not in CAM_STORES:
        raise ValueError(f"{path}: store must be one of {CAM_STORES}, got {store!r}")
    arrays = {"keys": keys, "size": np.array(maps.shape[1:], np.int32), "store": np.array(store), "strided": strided}
    if background is not None:
        arrays["background"] = np.asarray(background, dtype=small)
    if store == "float32":
        arrays["maps"] = maps
    elif store == "float16":
        arrays["maps"] = maps.astype(np.float16)
    elif store == "uint8":
        arrays["maps"] = np.rint(np.clip(maps, 0, 1) * 255).astype(np.uint8)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def read_cams(path: str | Path) -> dict[str, np.ndarray]:
    """One image's CAMs: `keys` (K,) int64, `maps` (K, H, W), `strided` (and `background`) float32.

    A damaged file is a `DamagedFileError` naming it. Files without `store` are float16 (older artifacts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CAM file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DamagedFileError(path, f"unreadable CAM file ({type(e).__name__}: {e})") from e
    store = str(raw.get("store", "float16"))
    need = {"keys", "strided"} | ({"maps"} if store != "quarter" else {"size"})
    if store not in CAM_STORES or not need <= set(raw) or len(raw["keys"]) != len(raw["strided"]):
        raise DamagedFileError(path, f"not a wsss CAM file (store {store!r}, arrays {sorted(raw)})")
    strided = raw["strided"].astype(np.float32)
    if store == "quarter":
        size = tuple(int(v) for v in raw["size"])
        t = torch.from_numpy(strided)[None]
        maps = (
            F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
            if len(strided)
            else (np.zeros((0, *size), np.float32))
        )
    elif store == "uint8":
        maps = raw["maps"].astype(np.float32) / 255.0
    else:
        maps = raw["maps"].astype(np.float32)
    if maps.ndim != 3 or len(maps) != len(raw["keys"]):
        raise DamagedFileError(path, f"maps {maps.shape} do not match keys {raw['keys'].shape}")
    out = {"keys": raw["keys"].astype(np.int64), "maps": maps, "strided": strided}
    if "background" in raw:
        out["background"] = raw["background"].astype(np.float32)
    return out


def mask_to_rle(mask: np.ndarray, label: int) -> dict[str, Any]:
    """COCO RLE (pycocotools) of `mask == label`, with `counts` as str so that it can go into JSON."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask == label, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_results(image_id: str, mask: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """COCO-style segmentation results of one label mask: one entry per foreground class present.

    `category_id` is the foreground index + 1 (the mask value); `category` names it. 0 and 255 are skipped.
    """
    labels = [int(v) for v in np.unique(mask) if 0 < v <= len(class_names)]
    return [
        {
            "image_id": image_id,
            "category_id": v,
            "category": class_names[v - 1],
            "segmentation": mask_to_rle(mask, v),
        }
        for v in labels
    ]
