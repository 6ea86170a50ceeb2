"""Fully connected CRF (Kraehenbuehl and Koltun, NIPS 2011) over [background, classes], via pydensecrf2.

Settings are PSA's `crf_inference` (Ahn and Kwak 2018; also used by AffinityNet's successors): a softmax
unary from the maps with the background score set to the threshold (IRN's padding), a Gaussian kernel
sxy = 3, compat = 3, a bilateral kernel sxy = 80, srgb = 13, compat = 10, and 10 mean-field iterations (the
refine stage scales the bilateral sxy with the image: 80 at a 500-px image).
"""

from __future__ import annotations

import numpy as np

INSTALL = "pseudo.refine=crf needs pydensecrf2: pip install -e '.[crf]' (it builds with Cython and a C++ compiler)"


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError(INSTALL) from e
    return dcrf, unary_from_softmax


def dense_crf(
    image: np.ndarray,
    maps: np.ndarray,
    background: float,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CRF marginals of one image.

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) scores in [0, 1] of the image's classes.
        background: The background score the unary gives every pixel (the threshold).

    Returns:
        (K, H, W) float32 class marginals and (H, W) float32 background marginal; their argmax (background
        first, ties to it) is the CRF's labelling.
    """
    h, w = maps.shape[1:]
    scores = np.concatenate([np.full((1, h, w), background, np.float32), maps.astype(np.float32)])
    probs = scores / np.maximum(scores.sum(0, keepdims=True), 1e-12)  # (K+1, H, W), sums to 1
    q = dense_crf_probs(
        image,
        probs,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    return q[1:], q[0]


def dense_crf_probs(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """CRF marginals of one image from a network's class probabilities (DeepLab's post-processing).

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (L, H, W) probabilities of every label (background first), summing to 1 over L.

    Returns:
        (L, H, W) float32 marginals; their argmax is the CRF's labelling.
    """
    _, unary_from_softmax = _densecrf()
    unary = np.ascontiguousarray(unary_from_softmax(np.clip(probs.astype(np.float32), 1e-8, 1.0)))
    kernels = (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat)
    return _mean_field(image, unary, probs.shape[0], iterations, *kernels)


def _mean_field(
    image: np.ndarray,
    unary: np.ndarray,
    n_labels: int,
    iterations: int,
    g_sxy: float,
    g_compat: float,
    b_sxy: float,
    b_srgb: float,
    b_compat: float,
) -> np.ndarray:
    """(n_labels, H, W) float32 marginals of a DenseCRF2D with one Gaussian and one bilateral kernel."""
    dcrf, _ = _densecrf()
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=g_sxy, compat=g_compat)
    d.addPairwiseBilateral(sxy=b_sxy, srgb=b_srgb, rgbim=np.ascontiguousarray(image), compat=b_compat)
    return np.array(d.inference(iterations), dtype=np.float32).reshape(n_labels, h, w)


def crf_label(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    iterations: int = 10,
    gt_prob: float = 0.7,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 50.0,
    bilateral_srgb: float = 5.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """A dense CRF over a hard labelling, as IRN's `imutils.crf_inference_label` (its defaults): the unary
    trusts each pixel's label with probability `gt_prob` (pydensecrf's `unary_from_labels`, every label a
    real one), a Gaussian kernel sxy 3 compat 3 and a bilateral kernel sxy 50 srgb 5 compat 10.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) ints in [0, n_labels).

    Returns:
        (H, W) int64: the argmax of the marginals after `iterations` mean-field steps.
    """
    _densecrf()  # the install hint when pydensecrf2 is missing
    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    kernels = (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat)
    return _mean_field(image, unary, n_labels, iterations, *kernels).argmax(0)


CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)  # eval_cam_with_crf.py:163


def clip_es_crf(image: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-ES's CRF (eval_cam_with_crf.py at 3893f81) of one image's float16 maps, its arithmetic kept.

    Its image is the BGR photo minus VOC's mean, cast back to uint8 (lines 100-115); its unary is
    [(1 - max) ** 1, maps] in float16 as given, not normalised (108-113), through pydensecrf's
    `unary_from_softmax`; 10 mean-field steps with a Gaussian kernel sxy 1 compat 3 and a bilateral kernel
    sxy 67 srgb 3 compat 4 (87-94). Its low-confidence 255 band (122-123) is not applied here.

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) the maps as CLIP-ES stores them (float16 values).

    Returns:
        (K, H, W) float32 class marginals and (H, W) float32 background marginal.
    """
    _, unary_from_softmax = _densecrf()
    bgr = image[..., ::-1].astype(np.float32)
    bgr -= CLIP_ES_MEAN_BGR
    rgbim = bgr.astype(np.uint8)
    m16 = maps.astype(np.float16)
    prob = np.concatenate((np.power(1 - np.max(m16, axis=0, keepdims=True), 1), m16), axis=0)
    unary = np.ascontiguousarray(unary_from_softmax(prob))
    q = _mean_field(rgbim, unary, prob.shape[0], 10, 1.0, 3.0, 67.0, 3.0, 4.0)
    return q[1:], q[0]
