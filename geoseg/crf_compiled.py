"""The CRF of :mod:`geoseg.crf` in pieces of one fixed shape, as two static graphs to compile.

The eager mean-field (:mod:`geoseg.crf_local`) passes an iteration's messages as one tensor
operation per window offset and direction: 48 passes over the array for a 7 x 7 window, each
reading and writing every class's message plane. Compiled by inductor, an iteration is one loop
over the pixels that keeps a pixel's messages in registers. Inductor compiles a graph for one
input shape, so every piece has the same one: ``piece`` core pixels with the CRF's
``halo = T r`` of context on every side, zero-padded where the context runs off the array.
Pixels there are invalid, and invalid pixels neither send nor receive messages, so a piece's
core gets the numbers :func:`geoseg.crf_local.crf_refine` gives it on the whole array, its sums
in the same order (the softmax written out, and compiled kernels round some products and sums
differently: ~1e-7 an operation, which near-ties carry to ~1e-3 of a probability after 5
iterations).

The graphs, on a piece of ``H x W`` pixels:

* :func:`prepare` ``(features, valid, probs) -> (planes, unary, q_0)``: the ``(window^2 - 1) / 2``
  kernel planes (:func:`kernel_planes`; each serves both directions of its offset) on the piece
  padded by ``r``, so that an iteration reads its neighbours without bounds checks, and the
  unary and first ``Q`` (run eager, piece by piece, these two took 5% of a band's CRF);
* :func:`step` ``(q_t, planes, unary) -> q_{t+1}``: one mean-field iteration.

Inputs are padded by the caller: a graph that pads its own inputs loads every value through a
bounds check (kernel planes of a 286 x 1054 piece: 33-36 ms against 12.8 ms from padded
inputs). Small pieces keep a piece's planes in the caches: an iteration took 12.3 ns a pixel on
158 x 542 pieces against 23.2 ns on 286 x 1054, which outweighs their larger share of halo. Of
the core sizes timed on a 286 x 10,000 band (one core, 4 classes, 7 x 7 window), 128 x 256 was
the fastest: 158 x 286 pixels a piece with the default halo (``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from geoseg.crf import PROB_FLOOR, CRFParams
from geoseg.crf_local import Core, core_bounds, half_offsets

# (features, valid padded by 2r; probs) -> (planes, unary, q_0 padded by r)
Prepare = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
Step = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, planes, unary) -> next q, padded by r

PIECE = (128, 256)  # core rows and columns of a piece (see the module docstring)


def kernel_planes(features: Tensor, valid: Tensor, params: CRFParams) -> Tensor:
    """The kernel planes of a piece of ``H x W`` pixels, padded by ``r`` for :func:`step`.

    Args:
        features: ``(1, F, H + 4r, W + 4r)`` float32: the piece's features padded by ``2r``,
            0 where not valid.
        valid: ``(1, H + 4r, W + 4r)`` float32: 1 on the piece's valid pixels, else 0.
        params: the CRF's parameters.

    Returns:
        ``(1, K, H + 2r, W + 2r)``: plane ``k`` at ``i + (r, r)`` holds ``k(i, i + d_k)`` for the
        ``k``-th offset of :func:`geoseg.crf_local.half_offsets`, 0 where either pixel is not a
        valid one of the piece.
    """
    r = params.radius
    rows, cols = features.shape[-2] - 2 * r, features.shape[-1] - 2 * r
    here = (slice(r, r + rows), slice(r, r + cols))
    planes = []
    for dy, dx in half_offsets(r):
        spatial, bilateral = params.position_terms(dy, dx)
        there = (slice(r + dy, r + dy + rows), slice(r + dx, r + dx + cols))
        distance: Tensor | None = None  # summed channel by channel, as the eager kernel does
        for channel in range(features.shape[1]):
            difference = features[0, channel][here] - features[0, channel][there]
            square = difference * difference
            distance = square if distance is None else distance + square
        assert distance is not None
        kernel = (distance * params.feature_scale).exp() * bilateral + spatial
        planes.append(kernel * (valid[0][here] * valid[0][there]))
    return torch.stack(planes)[None]


def prepare(
    features: Tensor, valid: Tensor, probs: Tensor, params: CRFParams
) -> tuple[Tensor, Tensor, Tensor]:
    """What the iterations of a piece of ``H x W`` pixels start from.

    Args:
        features: ``(1, F, H + 4r, W + 4r)`` as for :func:`kernel_planes`.
        valid: ``(1, H + 4r, W + 4r)`` as for :func:`kernel_planes`.
        probs: ``(1, C, H, W)`` the piece's probabilities; anything where not valid.
        params: the CRF's parameters.

    Returns:
        The kernel planes (:func:`kernel_planes`); the unary ``(1, C, H, W)``,
        ``log max(p, 1e-8)``, 0 where not valid; ``Q_0`` ``(1, C, H + 2r, W + 2r)``, its softmax
        over the classes, padded by ``r`` with zeros.
    """
    r = params.radius
    rows, cols = probs.shape[-2:]
    inside = valid[:, None, 2 * r : 2 * r + rows, 2 * r : 2 * r + cols] > 0
    unary = torch.where(inside, probs.clamp_min(PROB_FLOOR).log(), 0.0)
    q = F.pad(torch.softmax(unary, dim=1), (r, r, r, r))
    return kernel_planes(features, valid, params), unary, q


def step(q: Tensor, planes: Tensor, unary: Tensor, radius: int) -> Tensor:
    """One mean-field iteration on a piece: ``Q_{t+1}`` ``(1, C, H + 2r, W + 2r)``, padded by ``r``
    with zeros like ``Q_t``.

    Args:
        q: ``(1, C, H + 2r, W + 2r)``: ``Q_t``, padded by ``r`` (with anything finite).
        planes: ``(1, K, H + 2r, W + 2r)`` from :func:`kernel_planes`.
        unary: ``(1, C, H, W)`` from :func:`prepare`.
        radius: ``r``.

    Written class by class so that inductor makes one loop over the pixels for all the classes
    (as one ``(C, H, W)`` expression it looped over the classes outside and read every kernel
    plane once per class: 7.4 ms an iteration against 4.6 on a 286 x 1054 piece).
    """
    r = radius
    height, width = unary.shape[-2:]
    classes = unary.shape[1]
    messages: list[Tensor] = []
    for k, (dy, dx) in enumerate(half_offsets(r)):
        # Plane k at i is k(i, i + d); at i - d it is k(i - d, i) = k(i, i - d).
        forward = planes[0, k, r : r + height, r : r + width]
        backward = planes[0, k, r - dy : r - dy + height, r - dx : r - dx + width]
        for c in range(classes):
            ahead = forward * q[0, c, r + dy : r + dy + height, r + dx : r + dx + width]
            behind = backward * q[0, c, r - dy : r - dy + height, r - dx : r - dx + width]
            if k == 0:
                messages.append(ahead + behind)
            else:
                messages[c] = messages[c] + ahead + behind
    logits = [m + unary[0, c] for c, m in enumerate(messages)]
    peak = logits[0]
    for logit in logits[1:]:
        peak = torch.maximum(peak, logit)
    weights = [(logit - peak).exp() for logit in logits]
    total = weights[0]
    for weight in weights[1:]:
        total = total + weight
    # Padded here, not by the caller: the next step reads it as is (padding in the graph cost
    # nothing measurable; a copy into a padded buffer was a tenth of a piece's time).
    return F.pad(torch.stack([w / total for w in weights])[None], (r, r, r, r))


@dataclass(frozen=True)
class PieceGraphs:
    """The graphs a piece runs through: :meth:`eager`, or the same compiled."""

    prepare: Prepare
    step: Step

    @classmethod
    def eager(cls, params: CRFParams) -> PieceGraphs:
        return cls(partial(prepare, params=params), partial(step, radius=params.radius))


def crf_refine_pieces(
    probs: Tensor,
    features: Tensor,
    valid: Tensor,
    params: CRFParams,
    graphs: PieceGraphs,
    *,
    piece: tuple[int, int] = PIECE,
    core: Core | None = None,
) -> Tensor:
    """:func:`geoseg.crf_local.crf_refine` of ``core`` (the whole array if None), piece by piece.

    Args:
        probs: ``(C, H, W)`` probabilities; anything (NaN too) where not valid.
        features: ``(F, H, W)`` features; anything where not valid.
        valid: ``(H, W)`` bool.
        params: the CRF's parameters (those ``graphs`` were made for).
        graphs: the graphs to run each piece through.
        piece: ``(rows, columns)`` of a piece's core; the graphs see ``params.halo`` more on
            every side, plus their padding.
        core: the rows and columns wanted.

    Returns:
        The refined probabilities of ``core``, float32: each valid pixel's sum to 1, invalid
        pixels are 0.
    """
    if piece[0] < 1 or piece[1] < 1:
        raise ValueError(f"a piece needs at least one row and column, got {piece}")
    height, width = probs.shape[-2:]
    row0, row1, col0, col1 = core_bounds(core, height, width)
    halo, r = params.halo, params.radius
    rows, cols = piece[0] + 2 * halo, piece[1] + 2 * halo
    classes, channels = probs.shape[0], features.shape[0]
    # One set of buffers for all pieces: a piece inside the array overwrites all but the
    # padding (never written: zero), one at its border clears them first.
    piece_valid = torch.zeros((rows, cols), dtype=torch.bool)
    feats = torch.zeros((1, channels, rows + 4 * r, cols + 4 * r))
    present = torch.zeros((1, rows + 4 * r, cols + 4 * r))
    piece_probs = torch.zeros((1, classes, rows, cols))
    out = torch.empty((classes, row1 - row0, col1 - col0), dtype=torch.float32)
    for row in range(row0, row1, piece[0]):
        for col in range(col0, col1, piece[1]):
            core_rows, core_cols = min(piece[0], row1 - row), min(piece[1], col1 - col)
            r0, c0 = max(row - halo, 0), max(col - halo, 0)
            r1, c1 = min(row + core_rows + halo, height), min(col + core_cols + halo, width)
            # The core sits at (halo, halo) in the piece; context off the array stays invalid.
            at = (slice(halo - row + r0, halo + r1 - row), slice(halo - col + c0, halo + c1 - col))
            padded = (slice(at[0].start + 2 * r, at[0].stop + 2 * r),
                      slice(at[1].start + 2 * r, at[1].stop + 2 * r))  # fmt: skip
            if (r1 - r0, c1 - c0) != (rows, cols):  # context runs off the array: invalid there
                piece_valid.zero_()
                feats.zero_()
                piece_probs.zero_()
            piece_valid[at] = valid[r0:r1, c0:c1]
            feats[(0, slice(None), *padded)] = features[:, r0:r1, c0:c1]
            piece_probs[(0, slice(None), *at)] = probs[:, r0:r1, c0:c1]
            present[0, 2 * r : 2 * r + rows, 2 * r : 2 * r + cols] = piece_valid
            if not bool(piece_valid.all()):  # features there may be NaN: the kernels' 0 x NaN
                feats[0, :, 2 * r : 2 * r + rows, 2 * r : 2 * r + cols].masked_fill_(
                    ~piece_valid, 0.0
                )
            planes, unary, q = graphs.prepare(feats, present, piece_probs)
            for _ in range(params.iterations):
                q = graphs.step(q, planes, unary)
            kept = q[0, :, r + halo : r + halo + core_rows, r + halo : r + halo + core_cols]
            out[:, row - row0 : row - row0 + core_rows, col - col0 : col - col0 + core_cols] = (
                kept * valid[row : row + core_rows, col : col + core_cols]
            )
    return out
