"""CLIP-ES (cam=clip_es, model=clip_vit_b16): its prompts as linyq2117/CLIP-ES defines them (clip_text.py,
generate_cams_voc12.py at 3893f81), Grad-CAM on CLIP against a float64 autograd reference, CAA against a
per-pixel loop and its boxes against OpenCV run as CLIP-ES's utils.py runs it, what composition refuses, the
error without weights, and an end-to-end run on the shared VOC sample with random weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import error_line, run_cli, tiny_cfg
from wsss.artifacts import read_cams
from wsss.cam.clip_es import ClipES, box_mask, caa_refine, caa_transition, scale_maps
from wsss.config import validate
from wsss.errors import ConfigError
from wsss.models.clip import BACKGROUND, BACKGROUND_COCO, NO_WEIGHTS, TEMPLATE, load_clip, prompt_names

open_clip = pytest.importorskip("open_clip")

VOC = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
CLIP = ["model=clip_vit_b16", "cam=clip_es"]


def test_prompts_and_background_are_clip_es():
    """clip_text.py:2-4 (background), 12-16 (new_class_names); generate_cams_voc12.py:236-237 (template)."""
    assert prompt_names(VOC) == [
        "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
        "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
        "sofa", "train", "tvmonitor screen",
    ]  # fmt: skip
    assert list(BACKGROUND) == [
        "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
        "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
        "valley", "bridge", "sign",
    ]  # fmt: skip
    assert TEMPLATE.format("cat") == "a clean origami cat."
    cfg = tiny_cfg_clip()
    assert list(cfg.cam.clip_es.background) == list(BACKGROUND)
    assert (cfg.cam.clip_es.attention_layers, cfg.cam.clip_es.box_threshold) == (8, 0.4)
    assert (list(cfg.cam.scales), cfg.cam.flip) == ([1.0], False)


def test_coco_prompts_and_background_are_clip_es(shared_data):
    """clip_text.py:37-53 (new_class_names_coco), 56-58 (its COCO background), from COCO's own category names."""
    names = json.loads((shared_data / "coco2017_sample" / "annotations" / "instances_val2017.json").read_text())
    names = [c["name"] for c in sorted(names["categories"], key=lambda c: c["id"])]
    assert prompt_names(names) == [
        "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
        "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
        "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
        "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite",
        "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
        "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
        "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
        "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven",
        "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
        "toothbrush",
    ]  # fmt: skip
    assert list(BACKGROUND_COCO) == [w for w in BACKGROUND if w not in ("keyboard", "sign")]
    cfg = tiny_cfg(Path("/nonexistent"), ["experiment=clip_es_coco"])
    assert list(cfg.cam.clip_es.background) == list(BACKGROUND_COCO)
    assert (cfg.dataset.name, cfg.model.backbone, cfg.cam.method) == ("coco", "clip_vit_b16", "clip_es")
    validate(cfg)


def tiny_cfg_clip(overrides: list[str] = ()):
    """The tiny config with CLIP-ES's pair (composed and validated only: no data is read)."""
    return tiny_cfg(Path("/nonexistent"), [*CLIP, *overrides])


def _tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A three-block open_clip CLIP ViT (patch 16, width 64): the layout of ViT-B/16, seconds to run."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=3, width=64, head_width=32, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return OpenCLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


def _reference_gradcam(model, image, text, classes) -> torch.Tensor:
    """CLIP-ES's Grad-CAM written out in float64: explicit attention, LayerNorm and QuickGELU, the gradient of
    each class's softmax score at the last block's ln_1 output by autograd, one class at a time."""
    m = copy.deepcopy(model).double()
    v = m.visual
    x = image.double()
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    tokens = F.conv2d(x, v.conv1.weight, stride=16).flatten(2).transpose(1, 2)[0]  # (n, D)
    pos = v.positional_embedding
    g = round((pos.shape[0] - 1) ** 0.5)
    grid = F.interpolate(pos[1:].T.reshape(1, -1, g, g), size=(h, w), mode="bilinear", align_corners=False)
    tokens = torch.cat([v.class_embedding[None], tokens]) + torch.cat([pos[:1], grid.reshape(pos.shape[1], -1).T])

    def ln(mod, t):
        return F.layer_norm(t, t.shape[-1:], mod.weight, mod.bias, mod.eps)

    def attention(blk, a):
        d = a.shape[-1]
        heads = blk.attn.num_heads
        q, k, val = (a @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).split(d, dim=-1)
        q, k, val = (t.reshape(-1, heads, d // heads).transpose(0, 1) for t in (q, k, val))  # (H, L, d/H)
        p = torch.softmax(q @ k.transpose(1, 2) / (d // heads) ** 0.5, dim=-1)
        out = (p @ val).transpose(0, 1).reshape(-1, d)
        return out @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias

    def mlp(blk, t):
        u = t @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
        return (u * torch.sigmoid(1.702 * u)) @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias

    t = ln(v.ln_pre, tokens)
    blocks = list(v.transformer.resblocks)
    with torch.no_grad():
        for blk in blocks[:-1]:
            t = t + attention(blk, ln(blk.ln_1, t))
            t = t + mlp(blk, ln(blk.ln_2, t))
    last = blocks[-1]
    maps = []
    for i, c in enumerate(classes.tolist()):
        act = ln(last.ln_1, t).detach().requires_grad_(True)
        y = t + attention(last, act)
        y = y + mlp(last, ln(last.ln_2, y))
        f = ln(v.ln_post, y)[1:].mean(0) @ v.proj
        texts = torch.cat([text[0][[*classes.tolist()]], text[1]]).double()
        logits = m.logit_scale.exp() * (f / f.norm()) @ (texts / texts.norm(dim=1, keepdim=True)).T
        score = torch.softmax(logits, dim=-1)[i]
        (grad,) = torch.autograd.grad(score, act)
        cam = torch.relu((grad[1:].mean(0) * act[1:]).sum(-1)).reshape(h, w)
        for _ in range(2):  # scale_cam_image twice (base_cam.py:145, 154)
            cam = cam - cam.min()
            cam = cam / (1e-7 + cam.max())
        maps.append(cam.detach())
        assert c == classes[i]
    return torch.stack(maps)


def test_gradcam_matches_a_float64_autograd_reference():
    """Grad-CAM on the softmax over the image's classes and the background texts, at the last ln_1."""
    model = _tiny_clip()
    torch.manual_seed(1)
    fg, bg = torch.randn(6, 32), torch.randn(4, 32)
    image = torch.randn(1, 3, 80, 112)  # a 5 x 7 grid: the positional embedding is resized from 4 x 4
    classes = torch.tensor([1, 4, 5])
    out = ClipES(model, fg, bg, attention_layers=2, fp16_pos_embed=False)(image, classes)
    ref = _reference_gradcam(model, image, (fg, bg), classes)
    assert out.cam.shape == (3, 5, 7)
    assert float(ref.std()) > 0.1  # the reference maps are not flat: the comparison means something
    torch.testing.assert_close(out.cam.double(), ref, atol=2e-5, rtol=0)


def _loop_caa(attn: np.ndarray, cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """CAA per pixel in float64 (generate_cams_voc12.py:177-196 written as sums)."""
    n = attn.shape[0]
    t = attn.astype(np.float64).copy()
    for _ in range(3):
        cols = [sum(t[i, j] for i in range(n)) for j in range(n)]
        t = np.array([[t[i, j] / cols[j] for j in range(n)] for i in range(n)])
        rows = [sum(t[i, j] for j in range(n)) for i in range(n)]
        t = np.array([[t[i, j] / rows[i] for j in range(n)] for i in range(n)])
    sym = np.array([[(t[i, j] + t[j, i]) / 2 for j in range(n)] for i in range(n)])
    sq = np.array([[sum(sym[i, k] * sym[k, j] for k in range(n)) for j in range(n)] for i in range(n)])
    c, m = cam.ravel(), mask.ravel()
    out = np.array([sum(sq[i, j] * m[j] * c[j] for j in range(n)) for i in range(n)])
    out = out - out.min()
    return (out / (1e-7 + out.max())).reshape(cam.shape)


def test_caa_matches_a_per_pixel_loop():
    rng = np.random.default_rng(0)
    h, w = 4, 5
    attn = rng.random((h * w, h * w)) ** 3
    cams = rng.random((2, h, w))
    masks = (rng.random((2, h, w)) > 0.4).astype(np.float64)
    got = caa_refine(torch.from_numpy(cams), caa_transition(torch.from_numpy(attn)), torch.from_numpy(masks))
    for k in range(2):
        np.testing.assert_allclose(got[k].numpy(), _loop_caa(attn, cams[k], masks[k]), atol=1e-10)


def _cv2_boxes(cam: np.ndarray, threshold: float) -> np.ndarray:
    """CLIP-ES's utils.py scoremap2bbox + generate_cams_voc12.py:169-172, run with OpenCV as it runs there."""
    u8 = np.expand_dims((cam * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(u8, int(threshold * np.max(u8)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = np.zeros(cam.shape, np.float32)
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        mask[y : min(y + bh, cam.shape[0] - 1), x : min(x + bw, cam.shape[1] - 1)] = 1
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_box_mask_matches_opencv_contours(seed):
    """Blobs (some touching diagonally, some at the border, some with holes): the boxes of each 8-connected
    region above 0.4 of the uint8 peak, far edges clipped to the last row / column."""
    rng = np.random.default_rng(seed)
    cams = np.zeros((3, 14, 17), np.float32)
    for k in range(3):
        for _ in range(4):
            y, x = rng.integers(0, 14), rng.integers(0, 17)
            cams[k, max(0, y - 2) : y + 2, max(0, x - 2) : x + 3] += rng.random()
        cams[k] += rng.random((14, 17)).astype(np.float32) * 0.3
    cams[2, 5, 5], cams[2, 6, 6] = 5.0, 5.0  # two pixels touching at a corner: one region
    cams = scale_maps(torch.from_numpy(cams)).numpy()
    got = box_mask(torch.from_numpy(cams), 0.4).numpy()
    for k in range(3):
        np.testing.assert_array_equal(got[k], _cv2_boxes(cams[k], 0.4))


def test_clip_es_crf_is_eval_cam_with_crf(tmp_path):
    """pseudo.refine=clip_es_crf against eval_cam_with_crf.py's steps (lines 23-41, 97-118) run here as written
    there: OpenCV's BGR read minus the mean, cast to uint8; [(1 - max) ** 1, maps] in float16 as the unary."""
    pytest.importorskip("pydensecrf")
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as crf_utils

    from wsss.refine import clip_es_crf

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 31, 3), dtype=np.uint8)
    rgb[:, :12] //= 3  # a dark region: the mean subtraction goes negative there
    cv2.imwrite(str(tmp_path / "im.png"), rgb[..., ::-1])
    maps = (rng.random((2, 24, 31)) ** 2).astype(np.float16)
    image = cv2.imread(str(tmp_path / "im.png"), cv2.IMREAD_COLOR).astype(np.float32)
    image -= (104.008, 116.669, 122.675)
    image = image.transpose(2, 0, 1).astype(np.uint8).transpose(1, 2, 0)
    prob = np.concatenate((np.power(1 - np.max(maps, axis=0, keepdims=True), 1), maps), axis=0)
    d = dcrf.DenseCRF2D(31, 24, 3)
    d.setUnaryEnergy(np.ascontiguousarray(crf_utils.unary_from_softmax(prob)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    ref = np.array(d.inference(10)).reshape(3, 24, 31)
    fg, bg = clip_es_crf(rgb, maps)
    np.testing.assert_array_equal(np.concatenate([bg[None], fg]), ref.astype(np.float32))


def test_composition_refuses_what_cannot_work():
    def problems(overrides):
        with pytest.raises(ConfigError) as e:
            validate(tiny_cfg_clip(["model.weights=openai", *overrides]))
        return str(e.value)

    assert "cam.method=clip_es: needs model=clip_vit_b16" in problems(["model=resnet50"])
    assert "model.backbone=clip_vit_b16: needs cam=clip_es" in problems(["cam=gradcam"])
    assert "stage.name=train" in problems(["stage=train"])
    assert "faithfulness.enabled" in problems(["faithfulness.enabled=true"])
    assert "cam.scales" in problems(["cam.scales=[1.0,0.5]"])
    assert "cam.flip" in problems(["cam.flip=true"])
    assert "pseudo.refine=rw" in problems(["pseudo.refine=rw"])  # AffinityNet needs a classifier's trunk
    assert "cam.labels" in problems(["cam.labels=predicted"])
    validate(tiny_cfg_clip(["model.weights=openai"]))  # the pair itself is fine


def test_no_train_stage_is_declared():
    from wsss.stages import STAGES

    cfg = tiny_cfg_clip(["model.weights=openai"])
    assert STAGES["cams"].needs(cfg, "train") == {}
    assert "train" in STAGES["cams"].needs(tiny_cfg_clip(["model=resnet_tiny", "cam=cam"]), "train")


def test_its_settings_are_in_its_key_only():
    """cam.clip_es joins the cams key with cam=clip_es (with the weights), and no other method's key changes."""
    from wsss.stages import STAGES

    clip = STAGES["cams"].params(tiny_cfg_clip(["model.weights=openai"]), "train")
    assert clip["cam"]["clip_es"]["box_threshold"] == 0.4
    assert clip["model"] == {"backbone": "clip_vit_b16", "weights": "openai"}
    other = STAGES["cams"].params(tiny_cfg_clip(["model=resnet_tiny", "cam=gradcam"]), "train")
    assert "clip_es" not in other["cam"]
    assert "model" not in other


def test_leaderboard_pairs_a_clip_es_run_with_the_reference():
    """A CLIP-ES run has no wsss model key: the report pairs it with the first reference row, as imported maps."""
    from wsss.report import _reference_of
    from wsss.runs import Run

    ref = Run(Path("a"), {}, {"model": {"key": "k1"}}, None, name="cam")
    clip = Run(Path("b"), {}, {"model": {"key": None, "clip_es": {"weights": "openai"}}}, None, name="clip")
    assert _reference_of(clip, [ref]) is ref
    assert _reference_of(Run(Path("c"), {}, {"model": {"key": "k2"}}, None), [ref]) is None


def test_without_weights_one_line_names_both_ways(tmp_path):
    with pytest.raises(ValueError, match=r"model\.weights=PATH") as e:
        load_clip(None, torch.device("cpu"))
    assert "model.weights=openai" in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.weights=openai"):
        validate(tiny_cfg_clip())
    proc = run_cli(tmp_path, [*CLIP, f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode != 0
    assert NO_WEIGHTS in error_line(proc.stderr)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """Random ViT-B/16 weights in OpenAI's state_dict format (float16, as its release), saved to a file."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "random_vit_b16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


def test_weights_file_loads_into_open_clip(random_weights):
    model = load_clip(str(random_weights), torch.device("cpu"))
    saved = torch.load(random_weights, weights_only=True)
    torch.testing.assert_close(model.visual.proj, saved["visual.proj"].float(), atol=0, rtol=0)
    assert not model.training


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_archive_reads_as_its_state_dict(tmp_path):
    """OpenAI releases ViT-B-16.pt as a TorchScript archive: its weights are read without its code."""
    from wsss.models.clip import read_state_dict

    model = _tiny_clip()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    state = read_state_dict(tmp_path / "scripted.pt")
    assert sorted(state) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


@pytest.mark.slow
def test_end_to_end_on_the_shared_voc_sample(shared_data, random_weights, tmp_path):
    """`python -m wsss.run model=clip_vit_b16 cam=clip_es model.weights=PATH dataset=voc12` through evaluate:
    no classifier trained, every listed image's maps made and scored (the first 4 of the val list)."""
    from tests.data_fixtures import voc_sample_subset

    root = voc_sample_subset(shared_data, tmp_path / "voc", "val", 4)
    proc = run_cli(
        tmp_path,
        [
            *CLIP,
            f"model.weights={random_weights}",
            "dataset=voc12",
            f"dataset.root={root}",
            "dataset.train_split=val",
            "dataset.eval_split=val",
            "evaluate.bootstrap=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        timeout=900,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    assert metrics["model"]["clip_es"]["weights"] == str(random_weights.resolve())
    assert 0 <= metrics["miou"] <= 100
    assert not (tmp_path / "cache" / "train").exists()  # nothing was trained
    maps = sorted((tmp_path / "cache" / "cams").rglob("*.npz"))
    assert len(maps) == 4
    stored = read_cams(maps[0])  # float16 maps, and CLIP-ES's background (1 - max) ** 1 computed in float16
    f16 = stored["maps"].astype(np.float16)
    np.testing.assert_array_equal(stored["background"], (1 - f16.max(axis=0)).astype(np.float32))
    assert stored["maps"].max() <= 1


@pytest.mark.slow
def test_refinement_and_segment_read_clip_es_maps(shared_data, random_weights, tmp_path):
    """pseudo.refine=par and clip_es_crf, and stage=segment, on CLIP-ES's maps (the one-image train list; a run,
    not a score)."""
    root = shared_data / "voc2012_sample" / "VOCdevkit" / "VOC2012"
    common = [
        *CLIP,
        f"model.weights={random_weights}",
        "dataset=voc12",
        f"dataset.root={root}",
        "dataset.train_split=train",
        "dataset.eval_split=train",
        "evaluate.bootstrap=0",
    ]
    env = {"OMP_NUM_THREADS": "1"}
    import importlib.util

    for method in ("par", "clip_es_crf") if importlib.util.find_spec("pydensecrf") else ("par",):
        refined = run_cli(tmp_path, [*common, f"pseudo.refine={method}", f"hydra.run.dir={tmp_path / method}"], env=env)
        assert refined.returncode == 0, refined.stderr[-2000:]
        assert json.loads((tmp_path / method / "metrics.json").read_text())["refine"] == method
    seg = ["stage=segment", "segment.epochs=1", "segment.crop_size=128", "segment.scales=[1.0]", "segment.flip=false"]
    proc = run_cli(tmp_path, [*common, *seg, f"hydra.run.dir={tmp_path / 'seg'}"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "miou" in json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert not (tmp_path / "cache" / "train").exists()
