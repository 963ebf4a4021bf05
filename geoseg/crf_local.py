"""Mean-field inference of the CRF of :mod:`geoseg.crf` over a local window, in torch.

Borders. Pixels outside the array do not exist: a pixel near the border has fewer neighbours,
nothing is padded. Pixels that are not valid neither send nor receive messages and come back as 0.
Each iteration moves information ``r`` pixels, so ``Q_T`` at a pixel depends only on inputs within
``halo = T r`` pixels (Chebyshev distance): a tile refined with ``halo`` pixels of context on every
side (clipped at the array border) equals the whole-array result on the tile, exactly.

Window. The messages are a loop over the window offsets ``d`` with shifted slices of the arrays,
not ConvCRF's unfold: unfold materialises ``(C, window^2, H, W)``, 49 times the probabilities for a
7 x 7 window, and was 28 times slower on CPU (9 classes, 512 x 512, one thread: 12 s/MP against
0.43 s/MP). Since ``k(i, i + d) = k(i + d, i)``, each kernel plane serves both directions, so only
half of the offsets are stored, computed once before the iterations: ``(window^2 - 1) / 2`` planes
of ``H x W`` (24 for 7 x 7, 2.7 times the probabilities of 9 classes). Recomputing them in every
iteration instead would save that memory at 10-40% more time (measured).
"""

from __future__ import annotations

from math import exp

import torch
from torch import Tensor

from geoseg.crf import CRFParams
from geoseg.errors import ConfigError

_PROB_FLOOR = 1e-8

_Window = tuple[slice, slice]


def _half_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset of each pair ``{d, -d}`` in the window: ``dy > 0``, or ``dy == 0 < dx``."""
    return [
        (dy, dx)
        for dy in range(radius + 1)
        for dx in range(-radius, radius + 1)
        if dy > 0 or dx > 0
    ]


def _pair_windows(dy: int, dx: int, height: int, width: int) -> tuple[_Window, _Window] | None:
    """The pixels ``i`` whose partner ``i + (dy, dx)`` is inside the array, and those partners.

    ``None`` when no pixel has a partner (the offset is as large as the array).
    """
    if abs(dy) >= height or abs(dx) >= width:
        return None
    first = (
        slice(max(0, -dy), height - max(0, dy)),
        slice(max(0, -dx), width - max(0, dx)),
    )
    second = (
        slice(max(0, dy), height - max(0, -dy)),
        slice(max(0, dx), width - max(0, -dx)),
    )
    return first, second


def _batched(probs: Tensor, features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs as ``(B, C, H, W)``, ``(B, F, H, W)`` and ``(B, H, W)``, shapes checked."""
    if probs.dim() == 3:
        probs, features, valid = probs[None], features[None], valid[None]
    if probs.dim() != 4 or features.dim() != 4 or valid.dim() != 3:
        raise ValueError(
            f"expected probs (C,H,W)/(B,C,H,W), features (F,H,W)/(B,F,H,W) and valid (H,W)/(B,H,W);"
            f" got {tuple(probs.shape)}, {tuple(features.shape)} and {tuple(valid.shape)}"
        )
    batch, _, height, width = probs.shape
    if features.shape[1] < 1:
        raise ValueError("features need at least one channel")
    if features.shape[0] != batch or features.shape[2:] != (height, width):
        raise ValueError(f"features {tuple(features.shape)} do not match probs {probs.shape}")
    if valid.shape != (batch, height, width):
        raise ValueError(f"valid {tuple(valid.shape)} does not match probs {tuple(probs.shape)}")
    return probs, features, valid


def _pair_kernel(
    feats_i: Tensor, feats_j: Tensor, spatial: float, bilateral: float, feat_scale: float
) -> Tensor:
    """``k = spatial + bilateral exp(feat_scale |f_i - f_j|^2)`` for one offset: ``(B, 1, h, w)``.

    ``spatial`` and ``bilateral`` hold the position terms, constant for an offset. In place, one
    channel at a time: every temporary is a fresh allocation, and on CPU the page faults of fresh
    memory cost more than the arithmetic (the naive expression took 3-10x longer on 1024 x 1024).
    """
    kernel = (feats_i[:, :1] - feats_j[:, :1]).square_()
    for channel in range(1, feats_i.shape[1]):
        diff = feats_i[:, channel : channel + 1] - feats_j[:, channel : channel + 1]
        kernel.addcmul_(diff, diff)
    return kernel.mul_(feat_scale).exp_().mul_(bilateral).add_(spatial)


def crf_refine(probs: Tensor, features: Tensor, valid: Tensor, params: CRFParams) -> Tensor:
    """Refine class probabilities by mean-field inference (formulas in the module docstring).

    Args:
        probs: ``(C, H, W)`` or ``(B, C, H, W)`` probabilities (the network's blended softmax).
        features: ``(F, H, W)`` or ``(B, F, H, W)`` image features for the appearance kernel,
            already normalised (``bilateral_sigma_feat`` is in their units).
        valid: ``(H, W)`` or ``(B, H, W)`` bool; invalid pixels may hold anything (NaN too).
        params: the CRF parameters.

    Returns:
        Refined probabilities, the shape of ``probs``, float32 on its device: each valid pixel's
        distribution sums to 1, invalid pixels are 0.
    """
    unbatched = probs.dim() == 3
    probs, features, valid = _batched(probs, features, valid)
    valid = valid.to(device=probs.device, dtype=torch.bool)
    mask = valid[:, None]
    # Invalid pixels carry no information and may be NaN (nodata): neutral values keep NaN out of
    # the arithmetic, the zero kernel keeps them out of the messages, and the output is zeroed.
    log_p = torch.where(mask, probs.to(torch.float32), 1.0).clamp_min(_PROB_FLOOR).log()
    feats = torch.where(mask, features.to(device=probs.device, dtype=torch.float32), 0.0)
    q = torch.softmax(log_p, dim=1)

    if params.iterations > 0:
        height, width = probs.shape[-2:]
        all_valid = bool(valid.all())
        pairs: list[tuple[_Window, _Window, Tensor]] = []
        for dy, dx in _half_offsets(params.radius):
            windows = _pair_windows(dy, dx, height, width)
            if windows is None:
                continue
            first, second = windows
            d2 = dy * dy + dx * dx
            kernel = _pair_kernel(
                feats[(..., *first)],
                feats[(..., *second)],
                spatial=params.spatial_weight * exp(-d2 / (2 * params.spatial_sigma**2)),
                bilateral=params.bilateral_weight * exp(-d2 / (2 * params.bilateral_sigma_xy**2)),
                feat_scale=-0.5 / params.bilateral_sigma_feat**2,
            )
            if not all_valid:
                kernel.mul_(mask[(..., *first)] & mask[(..., *second)])
            pairs.append((first, second, kernel))

        message = torch.empty_like(q)  # reused, for the same reason as in _pair_kernel
        for _ in range(params.iterations):
            message.zero_()
            for first, second, kernel in pairs:
                message[(..., *first)].addcmul_(kernel, q[(..., *second)])
                message[(..., *second)].addcmul_(kernel, q[(..., *first)])
            q = torch.softmax(message.add_(log_p), dim=1)

    q = q * mask
    return q[0] if unbatched else q


def crf_refine_tiled(
    probs: Tensor,
    features: Tensor,
    valid: Tensor,
    params: CRFParams,
    tile: int,
    *,
    halo: int | None = None,
) -> Tensor:
    """Same result as :func:`crf_refine` on the whole array, computed tile by tile.

    Each ``tile x tile`` tile is refined with ``halo`` (default ``params.halo``) pixels of context
    on every side, clipped at the array border, and only the tile itself is kept. A smaller
    ``halo`` is not exact; it exists to show that.
    """
    if tile < 1:
        raise ConfigError(f"CRF tile must be >= 1, got {tile}")
    halo = params.halo if halo is None else halo
    if halo < 0:
        raise ConfigError(f"CRF halo must be >= 0, got {halo}")
    height, width = probs.shape[-2:]
    out = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    for row in range(0, height, tile):
        for col in range(0, width, tile):
            r0, c0 = max(row - halo, 0), max(col - halo, 0)
            r1, c1 = min(row + tile + halo, height), min(col + tile + halo, width)
            part = crf_refine(
                probs[..., r0:r1, c0:c1],
                features[..., r0:r1, c0:c1],
                valid[..., r0:r1, c0:c1],
                params,
            )
            rows, cols = min(tile, height - row), min(tile, width - col)
            out[..., row : row + rows, col : col + cols] = part[
                ..., row - r0 : row - r0 + rows, col - c0 : col - c0 + cols
            ]
    return out
