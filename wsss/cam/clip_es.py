"""CLIP-ES (Lin et al., CVPR 2023): text-prompted Grad-CAM on a frozen CLIP ViT, refined by attention.

Its class-aware attention affinity (CAA) refinement included; nothing is trained.

```python
import open_clip, torch
from wsss.cam.clip_es import ClipES
model = open_clip.create_model("ViT-B-16", force_quick_gelu=True)   # load real CLIP weights into it
es = ClipES(model, fg_text, bg_text)      # (C, E) class and (G, E) background text embeddings
out = es(image, torch.tensor([2, 7]))     # image (1, 3, 16 h, 16 w), CLIP-normalised; two of the C classes
out.cam, out.refined                      # (2, h, w) each, in [0, 1]
```

What follows CLIP-ES's code (linyq2117/CLIP-ES at 3893f81; files named as in that repository):

- The image tower runs its first blocks without gradients and its last block with them
  (clip/model.py:222-235, 400-422); the positional embedding is resized bilinearly to the image's patch grid
  and rounded to float16 (clip/model.py:9-25, 259).
- The image embedding is the mean of the patch tokens after `ln_post`, not the class token
  (clip/model.py:405); the score is the softmax over the image's own classes' texts and every background text
  of the cosine similarities times `exp(logit_scale)` (clip/model.py:412-420, generate_cams_voc12.py:141-144).
- Grad-CAM at the last block's `ln_1` (generate_cams_voc12.py:239): channel weights the mean gradient over the
  patch tokens, the class token dropped by the reshape (generate_cams_voc12.py:28-35,
  pytorch_grad_cam/grad_cam.py:19, base_cam.py:55-59), ReLU, then min-max normalised twice as
  `scale_cam_image` does (pytorch_grad_cam/base_cam.py:144-154, utils/image.py:50-54).
- CAA: the attention of the last 8 blocks (the head mean, patch tokens only) averaged
  (generate_cams_voc12.py:160-165), Sinkhorn-normalised three times, symmetrised and squared
  (generate_cams_voc12.py:177-186), restricted to the boxes of the map's 8-connected regions above
  0.4 of its peak (utils.py:173-200, generate_cams_voc12.py:168-174, 188), applied to the map
  (generate_cams_voc12.py:190-194) and min-max normalised (generate_cams_voc12.py:196).

The model is used as open_clip builds it (`visual.conv1`, `visual.transformer.resblocks[i].{ln_1, attn, ls_1,
ln_2, mlp, ls_2}`, `visual.ln_post`, `visual.proj`, `logit_scale`); nothing is imported from open_clip here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE_EPS = 1e-7  # pytorch_grad_cam/utils/image.py:51: img / (1e-7 + max)
CLIP_METHODS = ("clip_es",)  # the config's cam.method for this module (cam=clip_es)


@dataclass
class ClipESMaps:
    """One image's CLIP-ES maps at the patch grid.

    Attributes:
        cam: (K, h, w) Grad-CAM maps in [0, 1].
        refined: (K, h, w) CAA-refined maps in [0, 1], or None when refinement is off.
        attention: (h w, h w) the averaged patch-to-patch attention CAA starts from.
    """

    cam: Tensor
    refined: Tensor | None
    attention: Tensor


def scale_maps(maps: Tensor) -> Tensor:
    """pytorch_grad_cam's `scale_cam_image` on (K, h, w): each map minus its min, over (1e-7 + the new max)."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (SCALE_EPS + shifted.amax(dim=(-2, -1), keepdim=True))


def resized_pos_embed(pos: Tensor, grid: tuple[int, int], fp16: bool = True) -> Tensor:
    """(1 + g g, D) positional embedding -> (1 + h w, D) for a (h, w) patch grid.

    The patch part resized bilinearly (align_corners=False), the class token's kept; rounded to float16 as
    CLIP-ES's `upsample_pos_emb` does (clip/model.py:24), then back to `pos`'s dtype.
    """
    first, patches = pos[:1], pos[1:]
    g = round(patches.shape[0] ** 0.5)
    if g * g != patches.shape[0]:
        raise ValueError(f"positional embedding of {patches.shape[0]} patch tokens is not a square grid")
    square = patches.T.reshape(1, -1, g, g)  # (1, D, g, g)
    resized = F.interpolate(square, size=grid, mode="bilinear", align_corners=False).reshape(pos.shape[1], -1).T
    out = torch.cat([first, resized])  # (1 + h w, D)
    return out.half().to(pos.dtype) if fp16 else out


def _attend(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """One open_clip residual block on (B, L, D) tokens: its output and its head-mean attention (B, L, L)."""
    a = block.ln_1(x)
    out, weights = block.attn(a, a, a, need_weights=True, average_attn_weights=True)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), weights


def box_mask(cams: Tensor, threshold: float) -> Tensor:
    """CLIP-ES's CAA mask (utils.py:173-200, generate_cams_voc12.py:168-172) of (K, h, w) maps.

    Per map, the union of the bounding boxes of the 8-connected regions where the map as uint8 (x 255,
    truncated) exceeds floor(threshold x its uint8 peak), each box's far edges clipped to w - 1 and h - 1 as
    exclusive ends.

    Returns:
        (K, h, w) float mask, 1 inside a box.
    """
    k, h, w = cams.shape
    u8 = (cams * 255).to(torch.uint8).to(torch.float64)  # numpy's astype(np.uint8) truncates too
    thresh = torch.floor(threshold * u8.flatten(1).amax(1))  # int(threshold * np.max(...)), in float64
    fg = u8 > thresh[:, None, None]  # cv2.THRESH_BINARY: strictly above
    # Connected components: every foreground pixel takes the largest index in its 3 x 3 neighbourhood until
    # nothing changes (each region ends with one label; cv2.findContours traces 8-connected borders).
    labels = torch.arange(1, h * w + 1, dtype=torch.float64, device=cams.device).view(1, h, w) * fg
    while True:
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fg
        if torch.equal(grown, labels):
            break
        labels = grown
    rows = torch.arange(h, device=cams.device).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=cams.device).view(1, w).expand(h, w)
    mask = torch.zeros(k, h, w, device=cams.device)
    for i in range(k):
        for label in labels[i].unique():
            if label == 0:
                continue
            inside = labels[i] == label
            r, c = rows[inside], cols[inside]
            y1, x1 = min(int(r.max()) + 1, h - 1), min(int(c.max()) + 1, w - 1)
            mask[i, int(r.min()) : y1, int(c.min()) : x1] = 1
    return mask


def caa_transition(attention: Tensor) -> Tensor:
    """CAA's affinity from (n, n) patch attention (generate_cams_voc12.py:177-186).

    Columns then rows normalised to sum 1, three times; symmetrised; squared.
    """
    t = attention
    for _ in range(3):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def caa_refine(cams: Tensor, transition: Tensor, masks: Tensor) -> Tensor:
    """(K, h, w) maps refined by CAA, then min-max normalised (generate_cams_voc12.py:188-196).

    refined[i] = sum_j T[i, j] mask[j] cam[j].
    """
    k, h, w = cams.shape
    source = (cams * masks).reshape(k, h * w)  # (K, n)
    return scale_maps((source @ transition.T).reshape(k, h, w))


class ClipES:
    """CLIP-ES's maps of one image's classes from a frozen open_clip CLIP ViT.

    Args:
        model: An open_clip `CLIP` with a ViT image tower (its weights are not changed; its mode is kept).
        fg_text: (C, E) one text embedding per class (CLIP-ES: one prompt per class, normalised).
        bg_text: (G, E) the background texts' embeddings.
        attention_layers: How many of the last blocks' attention CAA averages (CLIP-ES: 8).
        box_threshold: The share of a map's peak its CAA boxes are drawn at (CLIP-ES: 0.4).
        refine: Whether to compute the CAA-refined maps.
        fp16_pos_embed: Round the resized positional embedding to float16 (CLIP-ES's `upsample_pos_emb`).
    """

    def __init__(
        self,
        model: nn.Module,
        fg_text: Tensor,
        bg_text: Tensor,
        attention_layers: int = 8,
        box_threshold: float = 0.4,
        refine: bool = True,
        fp16_pos_embed: bool = True,
    ) -> None:
        self.model, self.visual = model, model.visual
        blocks = len(self.visual.transformer.resblocks)
        if not 1 <= attention_layers <= blocks:
            raise ValueError(f"attention_layers={attention_layers} must be in [1, {blocks}]")
        self.fg_text, self.bg_text = fg_text, bg_text
        self.attention_layers, self.box_threshold = attention_layers, box_threshold
        self.refine, self.fp16_pos_embed = refine, fp16_pos_embed
        self.patch = self.visual.conv1.kernel_size[0]

    def _tokens(self, image: Tensor) -> tuple[Tensor, list[Tensor], tuple[int, int]]:
        """The image's tokens before the last block (1, 1 + h w, D), the earlier blocks' attention, the grid."""
        v = self.visual
        grid = (image.shape[-2] // self.patch, image.shape[-1] // self.patch)
        x = v.conv1(image).flatten(2).transpose(1, 2)  # (1, h w, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + resized_pos_embed(v.positional_embedding, grid, self.fp16_pos_embed)
        x = v.ln_pre(x)
        attention = []
        for block in v.transformer.resblocks[:-1]:
            x, weights = _attend(block, x)
            attention.append(weights)
        return x, attention, grid

    def _gradcam(self, x: Tensor, classes: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Grad-CAM (K, h, w) at the last block's ln_1, one copy of the tokens per class; its attention (1, L, L)."""
        v, k = self.visual, len(classes)
        block = v.transformer.resblocks[-1]
        with torch.no_grad():
            acts = block.ln_1(x)  # (1, L, D): the hooked activation
        leaf = acts.expand(k, -1, -1).clone().requires_grad_(True)  # (K, L, D)
        out, weights = block.attn(leaf, leaf, leaf, need_weights=True, average_attn_weights=True)
        y = x + block.ls_1(out)
        y = y + block.ls_2(block.mlp(block.ln_2(y)))
        feats = v.ln_post(y)[:, 1:].mean(dim=1) @ v.proj  # (K, E): mean of the patch tokens
        feats = feats / feats.norm(dim=1, keepdim=True)
        text = torch.cat([self.fg_text[classes], self.bg_text])  # (K + G, E): the image's classes, background
        text = text / text.norm(dim=1, keepdim=True)
        probs = (self.model.logit_scale.exp() * feats @ text.T).softmax(dim=-1)  # (K, K + G)
        score = probs[torch.arange(k), torch.arange(k)].sum()  # copy i scores class i
        (grads,) = torch.autograd.grad(score, leaf)  # (K, L, D)
        channel = grads[:, 1:].mean(dim=1)  # (K, D): Grad-CAM's weights over the patch tokens
        cams = F.relu((channel[:, None, :] * acts[:, 1:]).sum(-1)).reshape(k, *grid)
        return scale_maps(scale_maps(cams)), weights[:1].detach()

    def __call__(self, image: Tensor, classes: Tensor) -> ClipESMaps:
        """Maps of `classes` (K,) (indices into `fg_text`) for one image (1, 3, H, W).

        H and W must be multiples of the patch size.
        """
        if image.shape[0] != 1 or image.shape[-1] % self.patch or image.shape[-2] % self.patch:
            raise ValueError(f"image {tuple(image.shape)}: one image whose sides are multiples of {self.patch}")
        with torch.no_grad():
            x, attention, grid = self._tokens(image)
        if not len(classes):
            empty = image.new_zeros(0, *grid)
            return ClipESMaps(empty, empty if self.refine else None, image.new_zeros(0, 0))
        with torch.enable_grad():
            cams, last = self._gradcam(x, classes, grid)
        with torch.no_grad():
            patch_attn = torch.stack([a[0, 1:, 1:] for a in [*attention, last]])[-self.attention_layers :]
            mean_attn = patch_attn.mean(dim=0).float()  # (n, n)
            refined = None
            if self.refine:
                refined = caa_refine(cams, caa_transition(mean_attn), box_mask(cams, self.box_threshold))
        return ClipESMaps(cams.detach(), refined, mean_attn)
