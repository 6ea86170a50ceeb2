"""What importing another method's maps costs per image, against reading wsss's own maps of the same values.

    python scripts/bench_import.py --voc ../shared/data/voc2012_sample/VOCdevkit/VOC2012 --repeats 3

For every image of the VOC split: its real size and image-level classes, random maps divided by their max,
written once in each format as its project writes it (IRN `{"keys", "cam", "high_res"}` float32, PSA
`{class: map}` float32, CLIP-ES `{"keys", "attn_highres"}` float16, a generic npz) and once as wsss's own
`maps/<id>.npz` (float32, as imports are kept). Timed per image, best of `--repeats` passes over the split:

- `read_cams`: what every downstream stage pays to read wsss's maps (the baseline);
- `read_external`: a format's file read and checked (the restricted unpickler, classes, values);
- import: `read_external` + `write_cams`, the `cams` stage's work per image with `cam.source`.

Prints one JSON object: seconds per image and each one's ratio to `read_cams`, the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsss.artifacts import read_cams, strided_maps, write_cams
from wsss.data.voc import VOCSource
from wsss.external import read_external


def _write_all(source: VOCSource, root: Path, rng: np.random.Generator) -> None:
    for d in ("irn", "psa", "clip_es", "npz", "wsss"):
        (root / d).mkdir()
    names = source.class_names
    for image_id in source.ids:
        labels = source.labels(image_id)
        raw = rng.random((len(labels), *source.image_size(image_id))).astype(np.float32)
        maps = raw / (raw.max((1, 2), keepdims=True) + 1e-5)
        keys = torch.as_tensor(labels)
        np.save(
            root / "irn" / f"{image_id}.npy",
            {"keys": keys, "cam": torch.from_numpy(maps[:, ::4, ::4].copy()), "high_res": maps},
        )
        np.save(root / "psa" / f"{image_id}.npy", {int(c): maps[n] for n, c in enumerate(labels)})
        np.save(root / "clip_es" / f"{image_id}.npy", {"keys": labels, "attn_highres": maps.astype(np.float16)})
        np.savez(root / "npz" / f"{image_id}.npz", **{names[c]: maps[n] for n, c in enumerate(labels)})
        write_cams(root / "wsss" / f"{image_id}.npz", labels, maps, strided_maps(maps), store="float32")


def _per_image(fn, ids: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for image_id in ids:
            fn(image_id)
        best = min(best, time.perf_counter() - t0)
    return best / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voc", type=Path, required=True, help="a VOC2012 root (JPEGImages, SegmentationClass, ...)")
    ap.add_argument("--split", default="all_staged")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    source = VOCSource(args.voc, args.split)
    ids = [i for i in source.ids if len(source.labels(i))]
    out: dict = {"images": len(ids), "split": args.split}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_all(source, root, np.random.default_rng(0))
        base = _per_image(lambda i: read_cams(root / "wsss" / f"{i}.npz"), ids, args.repeats)
        out["read_cams_s"] = round(base, 5)
        suffix = {"npz": ".npz"}
        for fmt in ("irn", "psa", "clip_es", "npz"):
            path = lambda i, f=fmt: root / f / f"{i}{suffix.get(f, '.npy')}"  # noqa: E731
            read = _per_image(lambda i, f=fmt, p=path: read_external(p(i), f, source.class_names), ids, args.repeats)

            def full(i, f=fmt, p=path):
                keys, maps = read_external(p(i), f, source.class_names)
                maps = maps.astype(np.float32)
                write_cams(root / "out" / f"{i}.npz", keys, maps, strided_maps(maps), store="float32")

            imp = _per_image(full, ids, args.repeats)
            out[fmt] = {
                "read_s": round(read, 5),
                "read_x": round(read / base, 2),
                "import_s": round(imp, 5),
                "import_x": round(imp / base, 2),
            }
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out["commit"] = commit
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
