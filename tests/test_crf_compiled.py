"""The CRF in fixed-size pieces (its compiled form): the whole array's numbers, compiled too."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from test_crf import SOFT, _scene

from geoseg.crf import CRFParams
from geoseg.crf_compiled import PieceGraphs, crf_refine_pieces, prepare, step
from geoseg.crf_local import crf_refine
from geoseg.engine.aot import AheadOfTime

CORES = [
    None,
    (slice(10, 60), slice(7, 131)),  # rows inside, columns to the right border
    (slice(0, 97), slice(100, 131)),  # a corner strip
]


@pytest.mark.parametrize("params", [CRFParams(), SOFT, CRFParams(iterations=0)])
@pytest.mark.parametrize("with_nodata", [False, True])
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("piece", [(16, 32), (97, 131), (200, 300)])
def test_pieces_get_the_numbers_of_the_whole_array(
    params: CRFParams,
    with_nodata: bool,
    core: tuple[slice, slice] | None,
    piece: tuple[int, int],
) -> None:
    """Pieces smaller than, as large as and larger than the array; cores at its borders."""
    probs, features, valid = _scene(with_nodata=with_nodata)
    whole = crf_refine(probs, features, valid, params, core=core)
    pieces = crf_refine_pieces(
        probs, features, valid, params, PieceGraphs.eager(params), piece=piece, core=core
    )
    assert pieces.shape == whole.shape
    # The same sums in the same order; the softmax is written out (the compiler fuses it), so
    # the last bits differ, and 5 strong iterations carry that to ~2e-5 here.
    torch.testing.assert_close(pieces, whole, atol=1e-4, rtol=0)
    assert torch.equal(pieces.argmax(0), whole.argmax(0))
    if core is None:  # invalid pixels come back as 0, valid ones sum to 1
        assert torch.count_nonzero(pieces[:, ~valid]) == 0
        sums = pieces.sum(0)[valid]
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_one_pixel_pieces() -> None:
    probs, features, valid = _scene(with_nodata=True)
    core = (slice(38, 42), slice(20, 27))  # across the edge of the nodata block
    whole = crf_refine(probs, features, valid, SOFT, core=core)
    pieces = crf_refine_pieces(
        probs, features, valid, SOFT, PieceGraphs.eager(SOFT), piece=(1, 1), core=core
    )
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("piece", [(0, 4), (4, 0)])
def test_an_empty_piece_is_refused(piece: tuple[int, int]) -> None:
    probs, features, valid = _scene()
    with pytest.raises(ValueError, match="at least one row and column"):
        crf_refine_pieces(probs, features, valid, SOFT, PieceGraphs.eager(SOFT), piece=piece)


def test_compiled_pieces_agree_with_the_eager_crf(compile_cache: Path) -> None:
    """The graphs compiled ahead of time (as the actors run them with --compile), then loaded."""
    params = CRFParams(iterations=3, window=5)
    probs, features, valid = _scene(with_nodata=True)

    def compiled() -> tuple[PieceGraphs, list[AheadOfTime]]:
        start = AheadOfTime(
            partial(prepare, params=params), torch.nn.Module(), {"graph": "test-prepare"}
        )
        iterate = AheadOfTime(
            partial(step, radius=params.radius), torch.nn.Module(), {"graph": "test-step"}
        )
        return PieceGraphs(start, iterate), [start, iterate]

    before = set(compile_cache.iterdir())
    graphs, runners = compiled()
    got = crf_refine_pieces(probs, features, valid, params, graphs, piece=(24, 40))
    assert [len(r.built) for r in runners] == [1, 1]  # one package each, all pieces one shape
    assert len(set(compile_cache.iterdir()) - before) == 2
    whole = crf_refine(probs, features, valid, params)
    torch.testing.assert_close(got, whole, atol=1e-4, rtol=0)
    assert float((got.argmax(0) == whole.argmax(0))[valid].double().mean()) >= 0.999
    assert torch.count_nonzero(got[:, ~valid]) == 0
    # A new process's graphs load the packages instead of compiling them again.
    graphs, runners = compiled()
    again = crf_refine_pieces(probs, features, valid, params, graphs, piece=(24, 40))
    assert [len(r.built) for r in runners] == [0, 0]
    assert torch.equal(again, got)
