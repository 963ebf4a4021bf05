"""Reference backend: the fully connected CRF of Krähenbühl & Koltun (2011) via ``pydensecrf2``.

Optional (``pip install geoseg[crf-dense]``); the distribution ``pydensecrf2`` installs the module
``pydensecrf``, imported only when :func:`dense_crf_refine` is called. It serves to compare
:func:`geoseg.crf_local.crf_refine` (a local window, exact under tiling) with the unrestricted
model.

Mapping of :class:`geoseg.crf.CRFParams` onto the library's API::

    U = -log(max(probs, 1e-8))                        setUnaryEnergy
    addPairwiseGaussian(sxy=spatial_sigma, compat=spatial_weight)
    addPairwiseBilateral(sxy=bilateral_sigma_xy, srgb=255 * bilateral_sigma_feat,
                         rgbim=image_uint8, compat=bilateral_weight)
    inference(iterations)

``srgb`` is in the units of the 8-bit image, and ``bilateral_sigma_feat`` in units of the
normalised features: the mapping assumes the features are the image divided by 255.

Not the same numbers as :mod:`geoseg.crf_local`, by design of the library: its kernels are fully
connected (no window), evaluated approximately on a permutohedral lattice, and normalised
(``NORMALIZE_SYMMETRIC``: the kernel sum at each pixel is about 1), where ours are not normalised
(a pixel's kernel sum over a 7 x 7 window is tens): the same weights give a weaker pairwise term
here. The library has no notion of invalid pixels: they get a uniform unary (no evidence of their
own), still pass messages, and are returned as 0.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from geoseg.crf import PROB_FLOOR, CRFParams


def dense_crf_refine(
    probs: NDArray[np.floating],
    image_uint8: NDArray[np.uint8],
    valid: NDArray[np.bool_],
    params: CRFParams,
) -> NDArray[np.float32]:
    """Refine ``(C, H, W)`` probabilities with the dense CRF (mapping in the module docstring).

    Args:
        probs: ``(C, H, W)`` class probabilities.
        image_uint8: ``(H, W, 3)`` 8-bit image for the appearance kernel.
        valid: ``(H, W)`` bool.
        params: the CRF parameters; ``window`` does not apply (the model is fully connected).

    Returns:
        ``(C, H, W)`` float32 probabilities, each valid pixel's summing to 1, invalid pixels 0.
    """
    try:
        from pydensecrf import densecrf
    except ImportError as error:
        raise ImportError(
            "the dense CRF backend needs pydensecrf2: pip install 'geoseg[crf-dense]'"
        ) from error

    classes, height, width = probs.shape
    if image_uint8.shape != (height, width, 3) or image_uint8.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 of shape {(height, width, 3)}, got {image_uint8.dtype} "
            f"{image_uint8.shape}"
        )
    if valid.shape != (height, width):
        raise ValueError(f"valid {valid.shape} does not match probs {probs.shape}")

    # A uniform unary where invalid: those pixels bring no evidence of their own (NaN-safe too).
    clean = np.where(valid, probs, 1.0)
    unary = -np.log(np.maximum(clean, PROB_FLOOR)).astype(np.float32)
    crf = densecrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(classes, -1)))
    crf.addPairwiseGaussian(sxy=params.spatial_sigma, compat=params.spatial_weight)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sigma_xy,
        srgb=255.0 * params.bilateral_sigma_feat,
        rgbim=np.ascontiguousarray(image_uint8),
        compat=params.bilateral_weight,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return (q.reshape(classes, height, width) * valid).astype(np.float32)
