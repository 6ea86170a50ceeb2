"""Other methods' maps and masks, read into wsss's artifacts: `cam.source=DIR` (maps) and `pseudo.source=DIR`
(masks); docs/external-maps.md.

Each format is read as its project's public code writes it (the file and line of the writer are cited):

- `irn`: IRN `step/make_cam.py:55-56` saves `<id>.npy`, a pickled dict `{"keys": valid_cat, "cam": strided,
  "high_res": (K, H, W)}`; `keys` (a torch tensor) are 0-based foreground classes, the maps divided by their
  max. Its `step/eval_cam.py:15-18` pads a constant background `cam_eval_thres` in front and takes the argmax:
  wsss's `pseudo.threshold`.
- `psa`: PSA / AffinityNet `infer_cls.py:77-83` saves `<id>.npy`, a pickled dict `{class index: (H, W) map}`,
  0-based foreground classes, each map divided by its max; its `out_cam_pred` (lines 86-88) uses a constant
  background 0.2.
- `clip_es`: CLIP-ES `generate_cams_voc12.py:209-214` saves `<id>.npy`, `{"keys": (K,) int64, "attn_highres":
  (K, H, W) float16}`, 0-based foreground classes in the order the image's XML names them (sorted here). Its
  `eval_cam.py:57-62` pads a constant background when `cam_eval_thres` < 1, else the background
  `(1 - max) ** cam_eval_thres` (its default 2): `cam.source_bg_power`.
- `npz`: a generic `<id>.npz`, or `<id>.npy` holding a dict, one (H, W) array per class; the names are class
  names, or class indices read with `cam.source_index` (0: 0-based foreground; 1: 1-based, 0 the background).
- `wsss`: wsss's own `maps/<id>.npz` (`wsss.artifacts.write_cams`).

A pickled `.npy` is read by `safe_load_npy`, which builds dicts, lists, numbers, strings, numpy arrays and
torch tensors and refuses every other global: loading a folder never runs its code.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.artifacts import read_cams
from wsss.data.base import SampleError, read_label_mask
from wsss.errors import WsssError

FORMATS = ("irn", "psa", "clip_es", "npz", "wsss")
SUFFIXES = {"irn": (".npy",), "psa": (".npy",), "clip_es": (".npy",), "npz": (".npz", ".npy"), "wsss": (".npz",)}
DEFAULT_KEYS = {"irn": "high_res", "clip_es": "attn_highres"}  # the map array each format's own eval reads


class ExternalFileError(WsssError, ValueError):
    """A file of another method's output that cannot be used: the message names it and the problem.

    Not a `DamagedFileError`: the file is the user's, never removed or rebuilt.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.problem), self.__dict__


def _tensor_from_bytes(data: bytes) -> Any:
    """What `torch.storage._load_from_bytes` rebuilds, through torch's weights-only loader."""
    return torch.load(io.BytesIO(data), weights_only=True)


try:  # numpy >= 2 names its core numpy._core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray

# module -> name -> what the unpickler hands back: numpy's array and scalar rebuilders (both module names numpy
# has used), torch's tensor rebuilders (storage bytes through the weights-only loader), OrderedDict (a tensor's
# hooks). Nothing else resolves.
_ALLOWED: dict[str, dict[str, Any]] = {
    "numpy": {"ndarray": np.ndarray, "dtype": np.dtype},
    "numpy.core.multiarray": {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar},
    "numpy._core.multiarray": {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar},
    "torch._utils": {"_rebuild_tensor_v2": torch._utils._rebuild_tensor_v2},
    "torch.storage": {"_load_from_bytes": _tensor_from_bytes},
    "collections": {"OrderedDict": OrderedDict},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get(module, {}).get(name)
        if found is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found


def safe_load_npy(path: str | Path) -> Any:
    """A `.npy` file's content: an array, or the object a pickled 0-d object array holds (a dict of maps).

    Raises:
        ExternalFileError: unreadable, or its pickle names anything but the allowed numpy / torch rebuilders.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            array = _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ExternalFileError(path, f"not loaded: the pickle inside is not plain data ({e})") from e
    except (OSError, ValueError, EOFError, TypeError, AttributeError, RuntimeError) as e:
        raise ExternalFileError(path, f"unreadable .npy ({type(e).__name__}: {e})") from e
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ExternalFileError(path, f"not a numpy array of shape {shape} inside")
    return array.item() if array.shape == () else array


def _array(value: Any, path: Path, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise ExternalFileError(path, f"{what} is {type(value).__name__}, not a numeric array")
    return value


def _dict(content: Any, path: Path, fmt: str) -> dict:
    if not isinstance(content, dict):
        article = "an" if fmt[0] in "aeiou" else "a"
        raise ExternalFileError(path, f"{article} {fmt} file holds a dict; this one holds {type(content).__name__}")
    return content


def _keyed(content: Any, path: Path, fmt: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """IRN / CLIP-ES: 0-based foreground `keys` and the (K, H, W) array under `key`."""
    d = _dict(content, path, fmt)
    missing = [k for k in ("keys", key) if k not in d]
    if missing:
        raise ExternalFileError(path, f"no {missing} in this {fmt} file (it has {sorted(map(str, d))}; cam.source_key)")
    keys, maps = _array(d["keys"], path, "keys").reshape(-1), _array(d[key], path, key)
    if keys.dtype.kind == "f" and not np.all(keys == np.round(keys)):
        raise ExternalFileError(path, f"keys {keys.tolist()} are not class indices")
    return keys.astype(np.int64), maps


def _named(content: Any, path: Path, fmt: str, class_names: Sequence[str], index_base: int) -> tuple:
    """PSA and the generic npz: one map per class, named by index (0-based, or 1-based with `index_base` 1)
    or, for npz, by class name."""
    d = _dict(content, path, fmt)
    keys, maps = [], []
    for name, value in d.items():
        if fmt == "npz" and isinstance(name, str) and name in class_names:
            k = list(class_names).index(name)
        elif (isinstance(name, (int, np.integer)) and not isinstance(name, bool)) or str(name).isdigit():
            k = int(name) - index_base
        else:
            raise ExternalFileError(path, f"key {name!r} is neither a class name nor a class index")
        keys.append(k)
        maps.append(_array(value, path, f"map {name!r}"))
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise ExternalFileError(path, f"maps of different shapes {sorted(shapes)}")
    if len(set(keys)) < len(keys):
        raise ExternalFileError(path, f"one class named twice among {list(d)}")
    if not maps:
        return np.zeros(0, np.int64), np.zeros((0, 1, 1), np.float32)
    return np.asarray(keys, np.int64), np.stack(maps)


def read_external(
    path: str | Path,
    fmt: str,
    class_names: Sequence[str],
    key: str | None = None,
    index_base: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One file of another method's maps as (keys (K,) int64 0-based foreground classes, in the file's order;
    maps (K, H, W) in the file's float precision), checked: keys in range and unique, values finite and in
    [0, 1].

    Args:
        path: The file.
        fmt: One of `FORMATS`.
        class_names: The dataset's foreground classes (what the keys index).
        key: The array to read (IRN: `high_res` or `cam`; CLIP-ES: `attn_highres`); None: the format's default.
        index_base: `npz` / `psa` with integer names: 0 for 0-based foreground, 1 for 1-based with background 0.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"cam.source_format={fmt}: must be one of {', '.join(FORMATS)}")
    if fmt == "wsss":
        try:
            stored = read_cams(path)
        except WsssError as e:
            raise ExternalFileError(path, str(e).removeprefix(f"{path}: ")) from e
        keys, maps = stored["keys"].astype(np.int64), stored["maps"]
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                content = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise ExternalFileError(path, f"unreadable .npz ({type(e).__name__}: {e})") from e
        keys, maps = _named(content, path, fmt, class_names, index_base)
    else:
        content = safe_load_npy(path)
        if fmt in DEFAULT_KEYS:
            keys, maps = _keyed(content, path, fmt, key or DEFAULT_KEYS[fmt])
        else:
            keys, maps = _named(content, path, fmt, class_names, index_base)
    return _checked(path, keys, maps, len(class_names))


def _checked(path: Path, keys: np.ndarray, maps: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if maps.ndim != 3 or len(maps) != len(keys):
        raise ExternalFileError(path, f"maps of shape {maps.shape} for {len(keys)} classes; expected (K, H, W)")
    bad = keys[(keys < 0) | (keys >= num_classes)]
    if len(bad):
        raise ExternalFileError(path, f"class indices {bad.tolist()} outside the dataset's 0..{num_classes - 1}")
    if len(np.unique(keys)) < len(keys):
        raise ExternalFileError(path, f"class indices {keys.tolist()} repeat")
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float32)
    if not np.isfinite(maps).all():
        raise ExternalFileError(path, f"{int((~np.isfinite(maps)).sum())} values are NaN or infinite")
    if maps.size and (maps.min() < 0 or maps.max() > 1 + 1e-3):
        raise ExternalFileError(
            path, f"values span [{maps.min():.4g}, {maps.max():.4g}]; maps must be in [0, 1] (divide by the max)"
        )
    # The file's order and precision are kept: its classes' ties break as its own argmax breaks them (first
    # slot; CLIP-ES lists classes in the XML's order), and a float16 file's background is computed in float16.
    return keys, np.clip(maps, 0.0, 1.0)


def fit_size(path: Path, maps: np.ndarray, size: tuple[int, int], resize: bool) -> np.ndarray:
    """`maps` at the image's (H, W): as they are, bilinearly resized with `resize`, else an error naming the file."""
    if maps.shape[1:] == tuple(size):
        return maps
    if not resize:
        raise ExternalFileError(
            path, f"maps are {maps.shape[1]}x{maps.shape[2]}, the image {size[0]}x{size[1]} (cam.source_resize=true)"
        )
    if not len(maps):
        return np.zeros((0, *size), np.float32)
    t = torch.from_numpy(maps.astype(np.float32))[None]
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return t[0].clamp_(0, 1).numpy()


def power_background(maps: np.ndarray, power: float) -> np.ndarray:
    """PSA's / CLIP-ES's background score (1 - max over classes) ** power, in the maps' precision as numpy
    computes it there (CLIP-ES eval_cam.py:61 on its float16 maps); 1 where there is no class."""
    if not len(maps):
        return np.ones(maps.shape[1:], np.float32)
    return np.power(1 - np.max(maps, axis=0), maps.dtype.type(power))


def list_files(folder: str | Path, fmt: str) -> dict[str, Path]:
    """id -> file of a folder of `fmt` outputs (its files with the format's suffixes, not recursive).

    Raises:
        ExternalFileError: the folder is missing, holds no such file, or holds two files of one id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExternalFileError(folder, "not a folder (cam.source / pseudo.source)")
    suffixes = SUFFIXES.get(fmt, (".png",))
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in suffixes or not p.is_file():
            continue
        if p.stem in found:
            raise ExternalFileError(p, f"a second file for id {p.stem!r} (also {found[p.stem].name})")
        found[p.stem] = p
    if not found:
        raise ExternalFileError(folder, f"no {' or '.join(suffixes)} file: not a folder of {fmt} outputs")
    return found


def read_label_png(path: Path, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """A pseudo-label PNG (palette, greyscale, or RGB in VOC's colours: 0 background, c + 1 class c, 255
    ignore) of an image of (H, W) `size`, read and checked as ground-truth masks are (`read_label_mask`)."""
    try:
        return read_label_mask(path, num_classes, size)
    except (SampleError, OSError, ValueError) as e:
        raise ExternalFileError(path, str(e).removeprefix(f"{path}: ")) from e
