"""wsss's `cam=clip_es` beside CLIP-ES's own code on the same random ViT-B/16 weights and the shared VOC sample.

    git -C <CLIP-ES git dir> archive 3893f81 | tar -x -C /tmp/clipes     # linyq2117/CLIP-ES, outside this repo
    python scripts/compare_clip_es.py --clip-es /tmp/clipes [--split val] [--work /tmp/clip_es_compare]

The script patches the export in place, for the CPU and for measuring only (idempotent, each patch printed):
`generate_cams_voc12.py`'s `cuda:{n}` device becomes `cpu`, its saved dict also keeps float32 copies of the maps
and the per-class intermediates (the patch-grid Grad-CAM map, the CAA box mask, the averaged attention, the
refined patch-grid map); `clip/clip.py` imports `packaging` directly (setuptools no longer ships
`pkg_resources`). Nothing else of CLIP-ES changes. The weights are open_clip's random ViT-B/16 (seed 0) saved
as a float16 state_dict, as OpenAI's release stores them (CLIP-ES's `build_model` rounds every conv / linear
weight to float16 before loading: clip/model.py:445-466, 515), loaded by CLIP-ES's `clip.load` and by wsss's
`model.weights=`. CLIP-ES reads labels and sizes from VOC's XML, which the sample lacks: the script writes one
XML per image from the labels wsss reads (the classes in its mask), in a scratch VOC root beside the images.

Both sides' mIoU: CLIP-ES's `eval_cam.py` (unpatched) on its `attn_highres`, and wsss's evaluate at
`cam.clip_es.bg_power` 1 and 2 (eval_cam.py's two `attn` settings); after the CRF, CLIP-ES's
`eval_cam_with_crf.py` (unpatched) and wsss's `pseudo.refine=clip_es_crf`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsss.artifacts import read_cams, read_mask  # noqa: E402
from wsss.cam.clip_es import caa_refine, caa_transition  # noqa: E402

VOC = REPO.parent / "shared" / "data" / "voc2012_sample" / "VOCdevkit" / "VOC2012"
SAVE = '"attn_highres": refined_cam_all_scales.cpu().numpy().astype(np.float16),'
PATCHES = {
    "generate_cams_voc12.py": [
        ('device_id = "cuda:{}".format(process_id % n_gpus)', 'device_id = "cpu"  # patched: CPU'),
        (
            "            refined_cam_to_save = []\n",
            "            refined_cam_to_save = []\n            kept = []  # patched\n",
        ),
        (
            "                cam_refined = cam_refined.cpu().numpy().astype(np.float32)\n",
            "                cam_refined = cam_refined.cpu().numpy().astype(np.float32)\n"
            "                kept.append((grayscale_cam, aff_mask.numpy().reshape(grayscale_cam.shape), cam_refined))"
            "  # patched\n",
        ),
        (
            SAVE,
            SAVE + ' "attn_highres_f32": refined_cam_all_scales.cpu().numpy(), "highres_f32": '
            "highres_cam_all_scales.cpu().numpy(), **{n: np.stack([k[i] for k in kept]) for i, n in "
            'enumerate(("gray", "box", "refined_grid"))}, "attn": attn_weight.numpy(),  # patched: measuring',
        ),
    ],
    "clip/clip.py": [("from pkg_resources import packaging", "import packaging.version  # patched: no pkg_resources")],
}


def patch(clip_es: Path) -> None:
    """Apply PATCHES once (a file already patched is left as it is)."""
    for name, edits in PATCHES.items():
        path = clip_es / name
        text = path.read_text()
        if "# patched" in text:
            continue
        for old, new in edits:
            if old not in text:
                raise SystemExit(f"{path}: {old!r} not found: not CLIP-ES at 3893f81?")
            text = text.replace(old, new, 1)
            print(f"patched {name}: {old.strip()[:70]}")
        path.write_text(text)


def prepare(work: Path, voc: Path, split: str) -> tuple[Path, list[str]]:
    """Random float16 ViT-B/16 weights, and a scratch VOC root: the images linked, an XML per image."""
    import open_clip

    from wsss.config.schema import DatasetConfig
    from wsss.data import build_source

    work.mkdir(parents=True, exist_ok=True)
    weights = work / "random_vit_b16.pt"
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, weights)
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "voc12", "root": str(voc)})
    source = build_source(cfg, split)
    root = work / "VOC2012"
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    if not (root / "JPEGImages").exists():
        os.symlink(voc / "JPEGImages", root / "JPEGImages")
    for image_id in source.ids:
        h, w = source.image_size(image_id)
        objects = "".join(f"<object><name>{source.class_names[c]}</name></object>" for c in source.labels(image_id))
        xml = f"<annotation><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (work / f"{split}.txt").write_text("\n".join(source.ids) + "\n")
    return weights, list(source.ids)


def run_clip_es(clip_es: Path, work: Path, weights: Path, split: str, voc: Path) -> tuple[Path, float, dict]:
    """CLIP-ES's generate_cams_voc12.py, then its eval_cam.py; the maps' folder, seconds, mIoU by setting."""
    out = work / "voc_clip_es_cams"  # eval_cam.py reads the list only when "voc" is in the folder's name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "generate_cams_voc12.py", "--img_root", str(work / "VOC2012" / "JPEGImages"),
         "--split_file", str(work / f"{split}.txt"), "--model", str(weights), "--num_workers", "1",
         "--cam_out_dir", str(out)],
        cwd=clip_es, env=env, check=True, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    proc = subprocess.run(
        [sys.executable, "eval_cam.py", "--cam_out_dir", str(out), "--cam_type", "attn_highres",
         "--split_file", str(work / f"{split}.txt"), "--gt_root", str(voc / "SegmentationClass")],
        cwd=clip_es, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    miou = {int(float(t)): 100 * float(v) for t, v in re.findall(r"^(\d+(?:\.\d+)?) (\d\.\d+)$", proc.stdout, re.M)}
    return out, seconds, miou


def run_clip_es_crf(clip_es: Path, work: Path, cams: Path, split: str, voc: Path) -> tuple[float, Path]:
    """CLIP-ES's eval_cam_with_crf.py (unpatched): its mIoU (--eval_only) and its pseudo-mask folder (255 band)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "eval_cam_with_crf.py", "--cam_out_dir", str(cams), "--image_root",
            str(work / "VOC2012" / "JPEGImages"), "--split_file", str(work / f"{split}.txt"),
            "--gt_root", str(voc / "SegmentationClass")]  # fmt: skip
    proc = subprocess.run([*args, "--eval_only"], cwd=clip_es, env=env, check=True, capture_output=True, text=True)
    miou = 100 * float(re.search(r"'Mean IoU': (?:np\.float64\()?([0-9.]+)", proc.stdout).group(1))
    masks = work / "clip_es_crf_masks"
    save = [*args, "--pseudo_mask_save_path", str(masks)]
    subprocess.run(save, cwd=clip_es, env=env, check=True, capture_output=True)
    return miou, masks


def crf_masks(ids: list[str], theirs: Path, run_dir: Path) -> tuple[int, int, int]:
    """wsss's clip_es_crf masks against CLIP-ES's: differing pixels where CLIP-ES is confident, confident pixels,
    and CLIP-ES's 255 (below 0.95) pixels, which wsss's masks leave labelled."""
    import json

    from PIL import Image

    masks_dir = Path(json.loads((run_dir / "metrics.json").read_text())["masks_dir"])
    diff = confident = band = 0
    for image_id in ids:
        ref = np.asarray(Image.open(theirs / f"{image_id}.png"))  # cv2.imwrite of the labels: one channel
        mine = read_mask(masks_dir / f"{image_id}.png")
        keep = ref != 255
        diff += int((mine[keep] != ref[keep]).sum())
        confident += int(keep.sum())
        band += int((~keep).sum())
    return diff, confident, band


def run_wsss(work: Path, weights: Path, split: str, voc: Path, power: int, extra: tuple[str, ...] = ()) -> Path:
    """`python -m wsss.run model=clip_vit_b16 cam=clip_es ...` through evaluate; its run directory."""
    run_dir = work / (f"wsss_bg{power}" + "".join(f"_{a.split('=')[1]}" for a in extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSSS_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "wsss.run", "model=clip_vit_b16", "cam=clip_es", f"model.weights={weights}",
         "dataset=voc12", f"dataset.root={voc}", f"dataset.train_split={split}", f"dataset.eval_split={split}",
         "dataset.num_workers=0", f"cam.clip_es.bg_power={power}", "evaluate.bootstrap=0",
         "evaluate.overlays=0", f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return run_dir


def _clip_es_mask(cams: np.ndarray, keys: np.ndarray, power: int) -> np.ndarray:
    """eval_cam.py:57-65's labels from CLIP-ES's float16 attn_highres (its own rule, as it runs)."""
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), power)
    labels = np.argmax(np.concatenate((bg, cams), axis=0), axis=0)
    return np.pad(keys + 1, (1, 0), mode="constant")[labels].astype(np.uint8)


def compare(ids: list[str], theirs: Path, runs: dict[int, Path], work: Path) -> dict[str, float]:
    """Largest differences of the maps and their intermediates, and the masks' differing pixels."""
    import json

    out = {"maps_vs_f16": 0.0, "grid_cam": 0.0, "attention": 0.0, "caa_on_theirs": 0.0}
    out |= {"box_cells": 0, "cells": 0, "pixels": 0} | {f"mask_diff_bg{p}": 0 for p in runs}
    metrics = {p: json.loads((d / "metrics.json").read_text()) for p, d in runs.items()}
    maps_dir = work / "cache" / "cams" / metrics[1]["cam"]["key"] / "maps"
    for image_id in ids:
        ref = np.load(theirs / f"{image_id}.npy", allow_pickle=True).item()
        mine = read_cams(maps_dir / f"{image_id}.npz")
        order = [list(mine["keys"]).index(k) for k in ref["keys"]]  # CLIP-ES: classes in the XML's order
        f16 = np.abs(mine["maps"][order] - ref["attn_highres"].astype(np.float32)).max()
        out["maps_vs_f16"] = max(out["maps_vs_f16"], float(f16))
        grid = _grid_maps(image_id, ref["keys"], work)
        out["grid_cam"] = max(out["grid_cam"], float(np.abs(grid["cam"] - ref["gray"]).max()))
        out["attention"] = max(out["attention"], float(np.abs(grid["attention"] - ref["attn"]).max()))
        out["box_cells"] += int((grid["box"] != ref["box"]).sum())
        out["cells"] += ref["box"].size
        # wsss's CAA on CLIP-ES's own Grad-CAM map, box and attention, against CLIP-ES's refined map
        trans = caa_transition(torch.from_numpy(ref["attn"]))
        refined = caa_refine(torch.from_numpy(ref["gray"]), trans, torch.from_numpy(ref["box"])).numpy()
        rg = ref["refined_grid"] - ref["refined_grid"].min(axis=(1, 2), keepdims=True)
        rg = rg / (1e-7 + rg.max(axis=(1, 2), keepdims=True))
        out["caa_on_theirs"] = max(out["caa_on_theirs"], float(np.abs(refined - rg).max()))
        # the same formula in float64 on CLIP-ES's inputs: how far float32 is from exact on these maps
        exact = caa_refine(torch.from_numpy(ref["gray"]).double(), trans_64(ref), box64(ref))
        out["their_f32_vs_f64"] = max(out.get("their_f32_vs_f64", 0.0), float(np.abs(exact.numpy() - rg).max()))
        raw = ref["refined_grid"]
        spread = (raw.max(axis=(1, 2)) - raw.min(axis=(1, 2))) / raw.max(axis=(1, 2))
        out["spread"] = min(out.get("spread", 1.0), float(spread.min()))
        size = ref["highres_f32"].shape[-2:]  # CLIP-ES's cv2.resize of its Grad-CAM map (generate_cams_voc12.py:157)
        high = F.interpolate(torch.from_numpy(grid["cam"])[None], size=size, mode="bilinear", align_corners=False)
        out["gradcam_f32"] = max(out.get("gradcam_f32", 0.0), float(np.abs(high[0].numpy() - ref["highres_f32"]).max()))
        out["maps_f32"] = max(out.get("maps_f32", 0.0), float(np.abs(grid["maps"] - ref["attn_highres_f32"]).max()))
        out["pixels"] += ref["attn_highres"][0].size
        for p, m in metrics.items():
            mask = read_mask(Path(m["masks_dir"]) / f"{image_id}.png")
            out[f"mask_diff_bg{p}"] += int((mask != _clip_es_mask(ref["attn_highres"], ref["keys"], p)).sum())
    return out | {f"miou_bg{p}": m["miou"] for p, m in metrics.items()}


def trans_64(ref: dict) -> torch.Tensor:
    return caa_transition(torch.from_numpy(ref["attn"]).double())


def box64(ref: dict) -> torch.Tensor:
    return torch.from_numpy(ref["box"]).double()


_ENGINE: dict = {}


def _grid_maps(image_id: str, keys: np.ndarray, work: Path) -> dict[str, np.ndarray]:
    """wsss's patch-grid Grad-CAM, CAA box and attention of one image (its library, the stage's input)."""
    from wsss.cam.clip_es import ClipES, box_mask
    from wsss.data.base import decode_rgb
    from wsss.data.transforms import pil_resize
    from wsss.models.clip import BACKGROUND, clip_normalize, clip_size, load_clip, prompt_names, text_embeddings
    from wsss.stages.cams_clip import image_maps

    if not _ENGINE:
        from wsss.data.voc import VOC_CLASSES

        model = load_clip(str(work / "random_vit_b16.pt"), torch.device("cpu"))
        fg = text_embeddings(model, prompt_names(list(VOC_CLASSES)))
        _ENGINE["es"] = ClipES(model, fg, text_embeddings(model, list(BACKGROUND)))
    raw = decode_rgb(work / "VOC2012" / "JPEGImages" / f"{image_id}.jpg")
    image = clip_normalize(pil_resize(raw, clip_size(*raw.shape[-2:])))[None]
    out = _ENGINE["es"](image, torch.as_tensor(keys, dtype=torch.long))
    box = box_mask(out.cam, 0.4)
    sorted_keys = torch.as_tensor(sorted(keys.tolist()), dtype=torch.long)
    maps = image_maps(_ENGINE["es"], raw, sorted_keys, torch.device("cpu"))  # the stage's own function, float32
    maps = maps[[sorted(keys.tolist()).index(k) for k in keys.tolist()]]  # back to CLIP-ES's class order
    return {"cam": out.cam.numpy(), "attention": out.attention.numpy(), "box": box.numpy(), "maps": maps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-es", type=Path, required=True, help="an export of linyq2117/CLIP-ES at 3893f81")
    parser.add_argument("--voc", type=Path, default=VOC)
    parser.add_argument("--split", default="val")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clip_es_compare"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    patch(args.clip_es)
    weights, ids = prepare(args.work, args.voc, args.split)
    theirs, seconds, their_miou = run_clip_es(args.clip_es, args.work, weights, args.split, args.voc)
    t0 = time.perf_counter()
    runs = {p: run_wsss(args.work, weights, args.split, args.voc, p) for p in (1, 2)}
    ours = (time.perf_counter() - t0) / 2
    r = compare(ids, theirs, runs, args.work)
    crf_run = run_wsss(args.work, weights, args.split, args.voc, 1, ("pseudo.refine=clip_es_crf",))
    their_crf, their_crf_masks = run_clip_es_crf(args.clip_es, args.work, theirs, args.split, args.voc)
    diff, confident, band = crf_masks(ids, their_crf_masks, crf_run)
    crf_miou = json_miou(crf_run)
    print(f"{len(ids)} images, {r['pixels']} pixels; CLIP-ES {seconds:.1f} s, wsss {ours:.1f} s per run (1 thread)")
    print("| compared | result |\n|---|---|")
    print(f"| patch-grid Grad-CAM maps | max abs difference {r['grid_cam']:.2e} |")
    print(f"| Grad-CAM maps at image size (CLIP-ES's highres, unrefined) | max abs difference {r['gradcam_f32']:.2e} |")
    print(f"| averaged attention of the last 8 blocks | max abs difference {r['attention']:.2e} |")
    print(f"| CAA box masks (patch cells) | {r['box_cells']} of {r['cells']} cells differ |")
    print(f"| wsss's CAA on CLIP-ES's own map, box and attention | max abs difference {r['caa_on_theirs']:.2e} |")
    print(
        "| CLIP-ES's own float32 CAA against the same formula in float64 | max abs difference "
        f"{r['their_f32_vs_f64']:.2e} |"
    )
    print(f"| smallest (max - min) / max of CLIP-ES's refined patch-grid maps | {r['spread']:.2e} |")
    print(f"| final maps, float32 (`image_maps`, the stage's function) | max abs difference {r['maps_f32']:.2e} |")
    print(
        "| final maps as stored (float16) against CLIP-ES's float16 attn_highres | max abs difference "
        f"{r['maps_vs_f16']:.2e} |"
    )
    for p in (1, 2):
        diff = r[f"mask_diff_bg{p}"]
        print(f"| masks at bg power {p} (eval_cam.py's rule) | {r['pixels'] - diff} of {r['pixels']} pixels equal |")
        print(f"| mIoU at bg power {p} | wsss {r[f'miou_bg{p}']:.4f}, CLIP-ES eval_cam.py {their_miou.get(p)} |")
    print(f"| CRF masks (eval_cam_with_crf.py) where CLIP-ES is confident | {confident - diff} of {confident} equal |")
    print(f"| CRF pixels CLIP-ES sets to 255 (largest marginal < 0.95) | {band} (wsss labels them) |")
    print(f"| mIoU after the CRF | wsss {crf_miou:.4f}, CLIP-ES eval_cam_with_crf.py --eval_only {their_crf:.4f} |")


def json_miou(run_dir: Path) -> float:
    import json

    return json.loads((run_dir / "metrics.json").read_text())["miou"]


if __name__ == "__main__":
    main()
