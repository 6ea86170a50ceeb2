"""Refinement of CAMs into better score maps: dense CRF, PAR, superpixel voting, AffinityNet's and IRN's walks.

Each method takes one image's normalised maps (K, H, W) in [0, 1] and returns refined maps of the same shape
(and, for the CRF and the random walk, which score the background too, a background map), so that IRN's
threshold rule, the one-pass threshold sweep and PxAP apply to the refined maps as they do to CAMs.

| method | paper | where it runs |
|---|---|---|
| `crf` | fully connected CRF, Kraehenbuehl and Koltun 2011; PSA's `crf_inference` settings | CPU, a process pool |
| `clip_es_crf` | the same CRF with CLIP-ES's image, unary and kernels (`eval_cam_with_crf.py`) | CPU, a process pool |
| `par` | pixel-adaptive refinement, Ru et al. 2022 (AFA), also ToCo | torch, batched on the device |
| `superpixel` | Felzenszwalb or SLIC (scikit-image); each superpixel takes its pixels' mean | CPU, a process pool |
| `rw` | AffinityNet random walk, Ahn and Kwak 2018 (PSA), the background walking too | torch, batched |
| `irn` | IRN's random walk on IRNet's class boundaries, Ahn, Cho and Kwak 2019 (`wsss.refine.irn`) | torch, batched |
"""

from wsss.refine.crf import clip_es_crf, dense_crf
from wsss.refine.par import par_refine
from wsss.refine.random_walk import random_walk
from wsss.refine.superpixel import superpixel_vote

REFINERS = ("none", "crf", "clip_es_crf", "par", "superpixel", "rw", "irn")

__all__ = ["REFINERS", "clip_es_crf", "dense_crf", "par_refine", "random_walk", "superpixel_vote"]
