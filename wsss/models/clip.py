"""CLIP for CLIP-ES: open_clip's ViT-B/16 with OpenAI's weights, the class and background prompts, CLIP's input.

    weights file (OpenAI state_dict or TorchScript .pt) or "openai" -> open_clip CLIP (float32, eval)
    prompts "a clean origami {name}." -> text embeddings (C, 512) and (G, 512), each normalised

The class names with their synonyms, the background words and the template are CLIP-ES's (linyq2117/CLIP-ES at
3893f81, the files cited beside each); open_clip (`pip install -e '.[clip]'`) is imported only when a model is
built, so `import wsss` needs it not.
"""

from __future__ import annotations

import logging
import math
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ARCHITECTURE = "ViT-B-16"  # open_clip's name; CLIP-ES's README: OpenAI's ViT-B/16
CLIP_BACKBONES = ("clip_vit_b16",)  # model.backbone of the CLIP model (model=clip_vit_b16)
PATCH = 16
# OpenAI CLIP's input normalisation (generate_cams_voc12.py:79)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# generate_cams_voc12.py:236-237: one template for the classes and the background
TEMPLATE = "a clean origami {}."
# clip_text.py:2-4
BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)  # fmt: skip
# clip_text.py:56-58: COCO's background words (experiment=clip_es_coco)
BACKGROUND_COCO = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley", "bridge",
)  # fmt: skip
# Class names as CLIP-ES prompts them; any other class is prompted with its own name. VOC: clip_text.py:6-16
# (new_class_names against class_names). COCO: clip_text.py:19-53 (new_class_names_coco), keyed by COCO's own
# category names, which CLIP-ES's class_names_coco writes VOC's way (motorbike, aeroplane, sofa, ...).
PROMPT_NAMES = {
    "bird": "bird avian",
    "chair": "chair seat",
    "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
    "tv": "tvmonitor screen",
    "motorcycle": "motorbike",
    "airplane": "aeroplane",
    "couch": "sofa",
    "potted plant": "pottedplant",
    "dining table": "diningtable",
    "backpack": "backpack,bag",
    "umbrella": "umbrella,parasol",
    "handbag": "handbag,purse",
    "tie": "necktie",
    "snowboard": "sknowboard",  # sic, clip_text.py:43
    "baseball glove": "glove",
    "spoon": "dessertspoon",
    "remote": "remote control",
    "hair drier": "hairdrier,blowdrier",
}
NO_WEIGHTS = (
    "model.weights: CLIP-ES needs CLIP's weights: model.weights=PATH (OpenAI's ViT-B-16.pt or a CLIP state_dict "
    "file) or model.weights=openai (open_clip downloads them)"
)


def prompt_names(class_names: list[str]) -> list[str]:
    """Each class's name as CLIP-ES prompts it (its synonyms and spellings for VOC's and COCO's classes)."""
    return [PROMPT_NAMES.get(name, name) for name in class_names]


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("CLIP-ES needs open_clip: pip install -e '.[clip]'") from e
    return open_clip


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding `constants.pkl` (a saved state_dict's zip has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A CLIP state_dict from a file: a saved state_dict (optionally under "state_dict", keys optionally
    prefixed "module.") or OpenAI's TorchScript archive (its released ViT-B-16.pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights={path}: no such file")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated, and OpenAI's release is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # OpenAI's archive keeps the first three; a scripted open_clip model its causal mask (rebuilt, not a weight)
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    return state


def load_clip(weights: str | None, device: torch.device) -> nn.Module:
    """open_clip's ViT-B/16 with QuickGELU (OpenAI's), float32, in eval mode on `device`.

    Args:
        weights: a file (see `read_state_dict`) or "openai" (open_clip's own download).

    Raises:
        ValueError: no weights (the message names both ways to give them).
    """
    if weights is None:
        raise ValueError(NO_WEIGHTS)
    open_clip = _open_clip()
    if weights == "openai":
        model = open_clip.create_model(ARCHITECTURE, pretrained="openai", force_quick_gelu=True)
    else:
        state = read_state_dict(weights)
        model = open_clip.create_model(ARCHITECTURE, pretrained=None, force_quick_gelu=True)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.float().to(device).eval().requires_grad_(False)


@torch.no_grad()
def text_embeddings(model: nn.Module, names: list[str], template: str = TEMPLATE) -> Tensor:
    """(N, E) one embedding per name: its prompt encoded, normalised (generate_cams_voc12.py:48-60 with one
    template: the mean of one normalised embedding, normalised again)."""
    tokenizer = _open_clip().get_tokenizer(ARCHITECTURE)
    device = next(model.parameters()).device
    emb = model.encode_text(tokenizer([template.format(n) for n in names]).to(device)).float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb / emb.norm(dim=-1, keepdim=True)


def clip_size(height: int, width: int) -> tuple[int, int]:
    """The input size CLIP-ES resizes an image to: each side rounded up to a multiple of 16
    (generate_cams_voc12.py:85, at scale 1)."""
    return math.ceil(height / PATCH) * PATCH, math.ceil(width / PATCH) * PATCH


def clip_normalize(image: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32, /255 then CLIP's mean and std (ToTensor, Normalize)."""
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device).view(3, 1, 1)
    return (image.float() / 255 - mean) / std
