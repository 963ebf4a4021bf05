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

from math import prod

import torch
from torch import Tensor

from geoseg.crf import PROB_FLOOR, CRFParams
from geoseg.errors import ConfigError

_Window = tuple[slice, slice]
Core = tuple[slice, slice]  # rows, columns


def half_offsets(radius: int) -> list[tuple[int, int]]:
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


def core_bounds(core: Core | None, height: int, width: int) -> tuple[int, int, int, int]:
    """``core`` as ``(row0, row1, col0, col1)``, checked to be a non-empty part of the array."""
    if core is None:
        return 0, height, 0, width
    rows, cols = core
    bounds = (rows.start, rows.stop, cols.start, cols.stop)
    if any(b is None for b in bounds) or rows.step not in (None, 1) or cols.step not in (None, 1):
        raise ValueError(f"core needs explicit bounds and step 1, got {core}")
    row0, row1, col0, col1 = bounds
    if not (0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width):
        raise ValueError(f"core {core} is not a non-empty part of a {height} x {width} array")
    return row0, row1, col0, col1


def crf_refine(
    probs: Tensor, features: Tensor, valid: Tensor, params: CRFParams, *, core: Core | None = None
) -> Tensor:
    """Refine class probabilities by mean-field inference (formulas in :mod:`geoseg.crf`).

    Args:
        probs: ``(C, H, W)`` or ``(B, C, H, W)`` probabilities (the network's blended softmax).
        features: ``(F, H, W)`` or ``(B, F, H, W)`` image features for the appearance kernel,
            already normalised (``bilateral_sigma_feat`` is in their units).
        valid: ``(H, W)`` or ``(B, H, W)`` bool; invalid pixels may hold anything (NaN too).
        params: the CRF parameters.
        core: the rows and columns wanted (slices with explicit bounds); the whole array if None.
            Iteration ``t`` of ``T`` then updates only the pixels within ``(T - t) r`` of the
            core, all that the core's result depends on: the whole array's sums in the same
            order (to the last bit the vectorised loops may round differently, ~3e-8), for less
            work: the context a tile carries shrinks by ``r`` each iteration.

    Returns:
        Refined probabilities of the core, float32 on the device of ``probs``: each valid pixel's
        distribution sums to 1, invalid pixels are 0.
    """
    unbatched = probs.dim() == 3
    probs, features, valid = _batched(probs, features, valid)
    height, width = probs.shape[-2:]
    row0, row1, col0, col1 = core_bounds(core, height, width)
    valid = valid.to(device=probs.device, dtype=torch.bool)
    mask = valid[:, None]
    # Invalid pixels carry no information and may be NaN (nodata): neutral values keep NaN out of
    # the arithmetic, the zero kernel keeps them out of the messages, and the output is zeroed.
    log_p = torch.where(mask, probs.to(torch.float32), 1.0).clamp_min(PROB_FLOOR).log()
    feats = torch.where(mask, features.to(device=probs.device, dtype=torch.float32), 0.0)
    q = torch.softmax(log_p, dim=1)
    q_origin = (0, 0)  # array position of q's first pixel: q covers the last region updated

    if params.iterations > 0:
        all_valid = bool(valid.all())
        pairs: list[tuple[_Window, _Window, Tensor]] = []
        for dy, dx in half_offsets(params.radius):
            windows = _pair_windows(dy, dx, height, width)
            if windows is None:
                continue
            first, second = windows
            spatial, bilateral = params.position_terms(dy, dx)
            kernel = _pair_kernel(
                feats[(..., *first)],
                feats[(..., *second)],
                spatial=spatial,
                bilateral=bilateral,
                feat_scale=params.feature_scale,
            )
            if not all_valid:
                kernel.mul_(mask[(..., *first)] & mask[(..., *second)])
            pairs.append((first, second, kernel))

        buffer = None  # of the first (largest) region, reused: see _pair_kernel on fresh memory
        for step in range(1, params.iterations + 1):
            reach = (params.iterations - step) * params.radius
            region = (
                max(row0 - reach, 0),
                min(row1 + reach, height),
                max(col0 - reach, 0),
                min(col1 + reach, width),
            )
            shape = (*q.shape[:2], region[1] - region[0], region[3] - region[2])
            if buffer is None:
                buffer = q.new_empty(shape)
            message = buffer.view(-1)[: prod(shape)].view(shape).zero_()
            for first, second, kernel in pairs:
                # Each kernel plane serves both directions: i receives from i + d, and back.
                _accumulate(message, region, first, second, kernel, q, q_origin)
                _accumulate(message, region, second, first, kernel, q, q_origin)
            unary = log_p[..., region[0] : region[1], region[2] : region[3]]
            q = torch.softmax(message.add_(unary), dim=1)
            q_origin = (region[0], region[2])

    r, c = row0 - q_origin[0], col0 - q_origin[1]
    q = q[..., r : r + row1 - row0, c : c + col1 - col0] * mask[..., row0:row1, col0:col1]
    return q[0] if unbatched else q


def _accumulate(
    message: Tensor,
    region: tuple[int, int, int, int],
    receivers: _Window,
    senders: _Window,
    kernel: Tensor,
    q: Tensor,
    q_origin: tuple[int, int],
) -> None:
    """``message += kernel * q(sender)`` for the receivers inside ``region`` (``message`` covers
    ``region``, ``q`` starts at ``q_origin``). The kernel plane and both windows share one shape;
    the senders of receivers in ``region`` lie within ``r`` of it, where ``q`` was updated."""
    spans = []
    for axis, (low, high) in enumerate(((region[0], region[1]), (region[2], region[3]))):
        start = receivers[axis].start
        first = max(low - start, 0)
        stop = min(high - start, receivers[axis].stop - start)
        if first >= stop:
            return
        spans.append((first, stop))
    (u0, u1), (v0, v1) = spans
    # Window-relative rows u and columns v: receiver at receivers' start + u, sender at senders'.
    mr, mc = receivers[0].start - region[0], receivers[1].start - region[2]
    qr, qc = senders[0].start - q_origin[0], senders[1].start - q_origin[1]
    message[..., mr + u0 : mr + u1, mc + v0 : mc + v1].addcmul_(
        kernel[..., u0:u1, v0:v1], q[..., qr + u0 : qr + u1, qc + v0 : qc + v1]
    )


def crf_refine_tiled(
    probs: Tensor,
    features: Tensor,
    valid: Tensor,
    params: CRFParams,
    tile: int,
    *,
    halo: int | None = None,
    core: Core | None = None,
) -> Tensor:
    """Same result as :func:`crf_refine` (of ``core``, the whole array if None), tile by tile.

    Each ``tile x tile`` tile of the core is refined with ``halo`` (default ``params.halo``)
    pixels of context on every side, clipped at the array border, and only the tile itself is
    kept. A smaller ``halo`` is not exact; it exists to show that.
    """
    if tile < 1:
        raise ConfigError(f"CRF tile must be >= 1, got {tile}")
    halo = params.halo if halo is None else halo
    if halo < 0:
        raise ConfigError(f"CRF halo must be >= 0, got {halo}")
    height, width = probs.shape[-2:]
    row0, row1, col0, col1 = core_bounds(core, height, width)
    out = torch.empty(
        (*probs.shape[:-2], row1 - row0, col1 - col0), dtype=torch.float32, device=probs.device
    )
    for row in range(row0, row1, tile):
        for col in range(col0, col1, tile):
            r0, c0 = max(row - halo, 0), max(col - halo, 0)
            r1, c1 = min(row + tile + halo, height), min(col + tile + halo, width)
            rows, cols = min(tile, row1 - row), min(tile, col1 - col)
            out[..., row - row0 : row - row0 + rows, col - col0 : col - col0 + cols] = crf_refine(
                probs[..., r0:r1, c0:c1],
                features[..., r0:r1, c0:c1],
                valid[..., r0:r1, c0:c1],
                params,
                core=(slice(row - r0, row - r0 + rows), slice(col - c0, col - c0 + cols)),
            )
    return out
