"""Mean-field CRF: exact under tiling, cleans noise along image edges, respects nodata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoseg.crf import CRFParams
from geoseg.crf_local import crf_refine, crf_refine_tiled
from geoseg.errors import ConfigError

# Weak pairwise weights keep the distributions soft, so that a change at the edge of a tile's
# context still shows after all iterations (with the defaults the field saturates and the change
# made by a halo one pixel short is ~1e-6, below any tolerance).
SOFT = CRFParams(iterations=3, window=5, spatial_weight=0.3, bilateral_weight=0.5)


def _smooth(generator: torch.Generator, channels: int, height: int, width: int) -> torch.Tensor:
    """Random fields varying over ~8 pixels: like a network's output or an image."""
    coarse = torch.randn(1, channels, height // 8 + 2, width // 8 + 2, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def _scene(
    height: int = 97, width: int = 131, classes: int = 4, with_nodata: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = 3 * _smooth(g, classes, height, width)
    logits += 0.5 * torch.randn(classes, height, width, generator=g)
    probs = torch.softmax(logits, 0)
    features = _smooth(g, 3, height, width)
    valid = torch.ones(height, width, dtype=torch.bool)
    if with_nodata:
        valid[40:60, :25] = False  # a block touching the border
        valid &= _smooth(g, 1, height, width)[0] < 1.0  # scattered holes
        probs[:, ~valid] = float("nan")  # nodata may hold anything
        features[:, ~valid] = float("nan")
    return probs, features, valid


def _checkerboard_noise(
    height: int = 64, width: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left half class 0, right half class 1, predicted with p = 0.65, 15% of pixels flipped."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(height, width, dtype=torch.long)
    truth[:, width // 2 :] = 1
    noisy = torch.where(torch.rand(height, width, generator=g) < 0.15, 1 - truth, truth)
    probs = torch.stack([noisy == 0, noisy == 1]).float() * 0.3 + 0.35
    return truth, noisy, probs


def _edge_image(height: int, width: int, column: int) -> torch.Tensor:
    """Normalised features with a clean vertical edge: two flat colours meeting at ``column``."""
    features = torch.empty(3, height, width)
    features[:, :, :column] = torch.tensor([0.20, 0.27, 0.24])[:, None, None]
    features[:, :, column:] = torch.tensor([0.78, 0.71, 0.59])[:, None, None]
    return features


def _direct_mean_field(
    probs: np.ndarray, features: np.ndarray, valid: np.ndarray, p: CRFParams
) -> np.ndarray:
    """The mean-field update written out pixel by pixel, in float64 (the definition)."""
    classes, height, width = probs.shape
    unary = -np.log(np.maximum(probs, 1e-8))
    q = np.exp(-unary) / np.exp(-unary).sum(0)
    r = p.radius
    for _ in range(p.iterations):
        new = np.zeros_like(q)
        for y in range(height):
            for x in range(width):
                if not valid[y, x]:
                    continue
                message = np.zeros(classes)
                for v in range(max(0, y - r), min(height, y + r + 1)):
                    for u in range(max(0, x - r), min(width, x + r + 1)):
                        if (v, u) == (y, x) or not valid[v, u]:
                            continue
                        d2 = (v - y) ** 2 + (u - x) ** 2
                        f2 = ((features[:, v, u] - features[:, y, x]) ** 2).sum()
                        k = p.spatial_weight * np.exp(-d2 / (2 * p.spatial_sigma**2))
                        k += p.bilateral_weight * np.exp(
                            -d2 / (2 * p.bilateral_sigma_xy**2)
                            - f2 / (2 * p.bilateral_sigma_feat**2)
                        )
                        message += k * q[:, v, u]
                pairwise = message.sum() - message  # Potts: sum over the other labels
                energy = unary[:, y, x] + pairwise
                e = np.exp(-(energy - energy.min()))
                new[:, y, x] = e / e.sum()
        q = new
    result: np.ndarray = q * valid
    return result


def test_matches_a_direct_implementation_of_the_formulas() -> None:
    probs, features, valid = _scene(height=11, width=13, classes=3)
    valid[4:6, 5:9] = False
    params = CRFParams(
        iterations=2,
        window=5,
        spatial_sigma=1.5,
        spatial_weight=0.4,
        bilateral_sigma_xy=2.5,
        bilateral_sigma_feat=0.7,
        bilateral_weight=0.6,
    )
    expected = _direct_mean_field(
        probs.double().numpy(), features.double().numpy(), valid.numpy(), params
    )
    out = crf_refine(probs, features, valid, params)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("params", [CRFParams(), SOFT], ids=["defaults", "soft"])
@pytest.mark.parametrize("with_nodata", [False, True], ids=["all-valid", "nodata"])
def test_tiled_equals_whole(params: CRFParams, with_nodata: bool) -> None:
    probs, features, valid = _scene(with_nodata=with_nodata)
    whole = crf_refine(probs, features, valid, params)
    tiled = crf_refine_tiled(probs, features, valid, params, tile=32)
    assert torch.equal(tiled.argmax(0), whole.argmax(0))
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # The CRF did real work here, or equality would prove little.
    changed = (whole.argmax(0) != torch.nan_to_num(probs).argmax(0)) & valid
    assert changed.float().mean() > 0.05


@pytest.mark.parametrize(
    "core",
    [
        (slice(30, 61), slice(40, 90)),  # interior: every region shrinks on every side
        (slice(0, 20), slice(100, 131)),  # a corner: regions clipped at the array's border
        (slice(50, 51), slice(0, 131)),  # one row
        (slice(0, 97), slice(0, 131)),  # the whole array
    ],
    ids=["interior", "corner", "row", "whole"],
)
@pytest.mark.parametrize("with_nodata", [False, True], ids=["all-valid", "nodata"])
def test_a_core_gets_the_numbers_of_the_whole_array(
    core: tuple[slice, slice], with_nodata: bool
) -> None:
    """Updating only what the core depends on (the context shrinks by r each iteration) gives the
    core the whole array's numbers: the same sums in the same order (the vectorised loops may
    round a last bit differently where they split a row elsewhere: 3e-8 measured)."""
    probs, features, valid = _scene(with_nodata=with_nodata)
    whole = crf_refine(probs, features, valid, SOFT)
    part = crf_refine(probs, features, valid, SOFT, core=core)
    assert part.shape == (4, core[0].stop - core[0].start, core[1].stop - core[1].start)
    torch.testing.assert_close(part, whole[:, core[0], core[1]], rtol=0, atol=1e-6)
    assert torch.equal(part.argmax(0), whole[:, core[0], core[1]].argmax(0))
    batched = crf_refine(probs[None], features[None], valid[None], CRFParams(), core=core)
    reference = crf_refine(probs, features, valid, CRFParams())[:, core[0], core[1]]
    torch.testing.assert_close(batched[0], reference, rtol=0, atol=1e-6)
    tiled = crf_refine_tiled(probs, features, valid, SOFT, tile=16, core=core)
    torch.testing.assert_close(tiled, whole[:, core[0], core[1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "core",
    [
        (slice(0, 0), slice(0, 5)),
        (slice(90, 98), slice(0, 5)),
        (slice(None, 5), slice(0, 5)),
        (slice(0, 5, 2), slice(0, 5)),
    ],
)
def test_a_core_outside_the_array_is_refused(core: tuple[slice, slice]) -> None:
    probs, features, valid = _scene()
    with pytest.raises(ValueError, match="core"):
        crf_refine(probs, features, valid, SOFT, core=core)


def test_a_halo_one_pixel_short_is_not_exact() -> None:
    probs, features, valid = _scene()
    whole = crf_refine(probs, features, valid, SOFT)
    short = crf_refine_tiled(probs, features, valid, SOFT, tile=32, halo=SOFT.halo - 1)
    assert (short - whole).abs().max() > 1e-3


def test_noise_is_cleaned_and_the_boundary_stays_on_the_image_edge() -> None:
    truth, noisy, probs = _checkerboard_noise()
    height, width = truth.shape
    features = _edge_image(height, width, width // 2)
    valid = torch.ones(height, width, dtype=torch.bool)
    before = (noisy == truth).float().mean()
    assert 0.80 < before < 0.90
    labels = crf_refine(probs, features, valid, CRFParams()).argmax(0)
    assert (labels == truth).float().mean() >= 0.98
    # Every row is one step from class 0 to class 1, within a pixel of the image edge.
    assert torch.equal(labels, labels.sort(dim=1).values)
    boundary = (labels == 0).sum(1)
    assert (boundary - width // 2).abs().max() <= 1


def test_a_uniform_prediction_on_a_uniform_image_keeps_its_labels() -> None:
    height, width = 40, 50
    dist = torch.tensor([0.5, 0.3, 0.2])
    probs = dist[:, None, None].expand(3, height, width).clone()
    features = torch.full((3, height, width), 0.4)
    valid = torch.ones(height, width, dtype=torch.bool)
    params = CRFParams()
    out = crf_refine(probs, features, valid, params)
    assert torch.equal(out.argmax(0), probs.argmax(0))
    torch.testing.assert_close(out.sum(0), torch.ones(height, width))
    # Translation invariance: far enough from the border every pixel sees the same thing.
    h = params.halo
    interior = out[:, h:-h, h:-h]
    torch.testing.assert_close(interior, interior[:, :1, :1].expand_as(interior))


# Bilateral only, s_f = 0.1: across the colour difference 0.7 the kernel is exp(-73), nothing.
BILATERAL_ONLY = CRFParams(spatial_weight=0.0, bilateral_sigma_feat=0.1)


@pytest.mark.parametrize(
    ("params", "strip_colour", "survives"),
    [
        (BILATERAL_ONLY, 0.9, True),
        # Same colour as the background: the bilateral kernel is a plain spatial Gaussian.
        (BILATERAL_ONLY, 0.2, False),
        # The spatial kernel ignores colour.
        (CRFParams(bilateral_weight=0.0), 0.9, False),
    ],
    ids=["bilateral-own-colour", "bilateral-background-colour", "spatial-own-colour"],
)
def test_bilateral_messages_do_not_cross_an_image_edge(
    params: CRFParams, strip_colour: float, survives: bool
) -> None:
    height, width = 32, 32
    strip = torch.zeros(height, width, dtype=torch.bool)
    strip[:, 15:17] = True  # 2 pixels wide
    probs = torch.stack([~strip, strip]).float() * 0.6 + 0.2  # p = 0.8 for the predicted class
    features = torch.full((3, height, width), 0.2)
    features[:, strip] = strip_colour
    valid = torch.ones(height, width, dtype=torch.bool)
    labels = crf_refine(probs, features, valid, params).argmax(0)
    assert torch.equal(labels[~strip], torch.zeros_like(labels[~strip]))
    if survives:
        assert torch.equal(labels[strip], torch.ones_like(labels[strip]))
    else:
        assert not labels.any()


def test_invalid_pixels_are_zero_and_pass_no_messages() -> None:
    probs, features, valid = _scene(with_nodata=True)
    out = crf_refine(probs, features, valid, CRFParams())
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, ~valid], torch.zeros_like(out[:, ~valid]))
    torch.testing.assert_close(out.sum(0)[valid], torch.ones(int(valid.sum())))

    # A lone valid pixel disagreeing with confident neighbours that it cannot hear from.
    size, c = 21, 10
    probs = torch.stack([torch.full((size, size), 0.9), torch.full((size, size), 0.1)])
    probs[:, c, c] = torch.tensor([0.4, 0.6])
    features = torch.zeros(3, size, size)
    valid = torch.ones(size, size, dtype=torch.bool)
    out = crf_refine(probs, features, valid, CRFParams())
    assert out[:, c, c].argmax() == 0  # control: with its neighbours it is outvoted
    r = CRFParams().radius
    valid[c - r : c + r + 1, c - r : c + r + 1] = False
    valid[c, c] = True
    out = crf_refine(probs, features, valid, CRFParams())
    torch.testing.assert_close(out[:, c, c], torch.tensor([0.4, 0.6]))


def test_zero_iterations_return_the_input_normalised() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(5, 20, 30, generator=g) + 0.01  # not normalised, as after blending
    features = torch.rand(3, 20, 30, generator=g)
    valid = torch.ones(20, 30, dtype=torch.bool)
    out = crf_refine(probs.double(), features, valid, CRFParams(iterations=0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, probs / probs.sum(0))


def test_a_batch_is_refined_image_by_image() -> None:
    probs, features, valid = _scene(height=40, width=45)
    batch = torch.stack([probs, probs.flip(2)]), torch.stack([features, features.flip(2)])
    valids = torch.stack([valid, valid])
    out = crf_refine(*batch, valids, SOFT)
    torch.testing.assert_close(out[0], crf_refine(probs, features, valid, SOFT))
    torch.testing.assert_close(out[1], crf_refine(probs.flip(2), features.flip(2), valid, SOFT))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_agrees_with_cpu() -> None:
    probs, features, valid = _scene(with_nodata=True)
    cpu = crf_refine(probs, features, valid, CRFParams())
    gpu = crf_refine(probs.cuda(), features.cuda(), valid.cuda(), CRFParams())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 4},
        {"window": 0},
        {"iterations": -1},
        {"spatial_sigma": 0.0},
        {"bilateral_weight": -1.0},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CRFParams(**kwargs)  # type: ignore[arg-type]


def test_the_dense_crf_cleans_up_too() -> None:
    pytest.importorskip(
        "pydensecrf.densecrf", reason="pydensecrf2 is not installed (extra 'crf-dense')"
    )
    from geoseg.crf_dense import dense_crf_refine

    truth, _, probs = _checkerboard_noise()
    height, width = truth.shape
    features = _edge_image(height, width, width // 2)
    image = (features * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    valid = np.ones((height, width), dtype=bool)
    dense = dense_crf_refine(probs.numpy(), image, valid, CRFParams())
    local = crf_refine(probs, features, torch.from_numpy(valid), CRFParams()).numpy()
    for out in (dense, local):
        assert (out.argmax(0) == truth.numpy()).mean() >= 0.95
    np.testing.assert_allclose(dense.sum(0), 1, atol=1e-5)
