"""Tests for the segmentation architectures and their registry (CPU, small inputs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ModelCardError
from geoseg.models.deeplab import DeepLabV3
from geoseg.models.registry import ARCHITECTURES, build_model, total_stride

ARCHS = ["fcn", "unet", "deeplabv3"]
IN_CHANNELS = 4
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_inference_state(model: nn.Module) -> None:
    """Make eval-mode BN non-trivial and un-zero FCN's zero-initialised skip scores.

    Fresh BN layers are identities in eval mode and FCN's skip score layers start at zero; a
    translation test on such a model would not exercise those paths.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, nn.Conv2d) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.1)


def test_registry_keys() -> None:
    # The seed's three generic architectures plus the Dynamic World port (tests/test_dynamicworld).
    assert sorted(ARCHITECTURES) == sorted([*ARCHS, "dynamicworld"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_output_shape(arch: str, size: tuple[int, int]) -> None:
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(2, IN_CHANNELS, *size))
    assert out.shape == (2, NUM_CLASSES, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("arch", "args"),
    [
        ("fcn", {}),
        ("unet", {}),
        ("unet", {"depth": 3, "upsampling": "transpose"}),
        ("deeplabv3", {}),
        ("deeplabv3", {"output_stride": 8}),
    ],
)
def test_unaligned_input_still_full_size(arch: str, args: dict[str, Any]) -> None:
    # Callers align inputs, but odd sizes must not crash (U-Net resizes mismatching skips).
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES, base_channels=8, **args).eval()
    with torch.no_grad():
        out = model(torch.randn(1, IN_CHANNELS, 70, 99))
    assert out.shape == (1, NUM_CLASSES, 70, 99)


@pytest.mark.parametrize(
    ("arch", "args", "expected"),
    [
        ("fcn", {}, 32),
        ("fcn", {"base_channels": 8}, 32),
        ("unet", {}, 16),
        ("unet", {"depth": 3}, 8),
        ("unet", {"depth": 5, "upsampling": "transpose"}, 32),
        ("deeplabv3", {}, 16),
        ("deeplabv3", {"output_stride": 8}, 8),
    ],
)
def test_total_stride(arch: str, args: dict[str, Any], expected: int) -> None:
    assert total_stride(arch, **args) == expected
    assert build_model(arch, 1, 2, **{"base_channels": 4, **args}).total_stride == expected


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_backbone_resolution_and_rates(output_stride: int) -> None:
    model = build_model("deeplabv3", IN_CHANNELS, NUM_CLASSES, output_stride=output_stride)
    assert isinstance(model, DeepLabV3)
    with torch.no_grad():
        feats = model.eval().backbone(torch.randn(1, IN_CHANNELS, 64, 96))
    assert feats.shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert model.atrous_rates == {16: (6, 12, 18), 8: (12, 24, 36)}[output_stride]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_parameter_count_small(arch: str) -> None:
    assert _n_params(build_model(arch, IN_CHANNELS, NUM_CLASSES)) < 5_000_000


def _learnable_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny fixed batch whose labels are visible in the input (16x16 class blocks + noise)."""
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, NUM_CLASSES, (2, 4, 4), generator=gen)
    target = blocks.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # [2, 64, 64]
    signal = F.one_hot(target, IN_CHANNELS).permute(0, 3, 1, 2).float()
    x = 2.0 * signal + 0.5 * torch.randn(signal.shape, generator=gen)
    return x, target


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_flow_and_loss_decreases(arch: str) -> None:
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES).train()
    x, target = _learnable_batch()
    # lr 3e-3: with 1e-3 the U-Net (32-channel classifier input) reaches only ~0.67x the
    # initial loss in 20 steps; at 3e-3 all three reach < 0.35x, a robust margin.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    for step in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        if step == 0:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            # Every layer gets signal (FCN's zero-initialised skip scores included).
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_deterministic(arch: str) -> None:
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES).eval()
    x = torch.randn(2, IN_CHANNELS, 64, 96)
    with torch.no_grad():
        first = model(x)
        second = model(x.clone())
    assert torch.equal(first, second)


# Receptive-field bounds (pixels from an output pixel to the farthest input pixel it depends
# on), counting 3x3 convs, 2x2 pools (+ their half-cell asymmetry) and bilinear upsampling:
#   fcn:  5 stages x (2 convs + pool) -> 156 px, fc6 3x3 @32 -> 220, upsampling 32->16->8->1
#         -> 276 px span, +16 px pool asymmetry -> < 160 px either side (measured: 123).
#   unet: 4 levels -> 76, bottleneck @16 -> 140, 4 x (upsample + 2 convs) -> 230 px span,
#         +8 px asymmetry -> < 128 px either side (measured: 108).
@pytest.mark.parametrize(("arch", "margin"), [("fcn", 160), ("unet", 128)])
def test_translation_equivariance_away_from_borders(arch: str, margin: int) -> None:
    """Cropping the input by a multiple of the total stride only crops the logits.

    Central logits whose receptive field lies inside the crop must be identical to the logits
    of the same pixels computed on the full input; this is what makes tiled inference seam-free.
    float64 and small widths keep the check exact and quick (the property is architectural).
    """
    stride = total_stride(arch)
    region = 32
    crop = region + 2 * margin
    assert crop % stride == 0
    model = build_model(arch, 3, NUM_CLASSES, base_channels=8).double().eval()
    _randomize_inference_state(model)
    offset = stride
    size = crop + 2 * offset
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        cropped = model(x[..., offset : offset + crop, offset : offset + crop])
        # Negative control: a shift that is not a multiple of the stride breaks equality.
        half = stride // 2
        misaligned = model(x[..., half : half + crop, half : half + crop])

    lo, hi = margin, margin + region
    expected = full[..., offset + lo : offset + hi, offset + lo : offset + hi]
    torch.testing.assert_close(cropped[..., lo:hi, lo:hi], expected, atol=1e-4, rtol=0.0)
    shifted_expected = full[..., half + lo : half + hi, half + lo : half + hi]
    assert (misaligned[..., lo:hi, lo:hi] - shifted_expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bfloat16_cpu(arch: str) -> None:
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES, base_channels=8)
    x, target = _learnable_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out.float(), target)
    loss.backward()
    assert out.shape == (2, NUM_CLASSES, 64, 64)
    assert torch.isfinite(out.float()).all()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_transpose_autocast() -> None:
    model = build_model("unet", IN_CHANNELS, NUM_CLASSES, base_channels=8, upsampling="transpose")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, IN_CHANNELS, 64, 96))
    assert out.shape == (1, NUM_CLASSES, 64, 96)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_compile_traces_without_graph_breaks(arch: str) -> None:
    # The "eager" backend runs Dynamo tracing without Inductor's C++ codegen: it proves the
    # models compile as single graphs while keeping the test fast and compiler-free.
    torch._dynamo.reset()
    model = build_model(arch, IN_CHANNELS, NUM_CLASSES, base_channels=8).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(1, IN_CHANNELS, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("arch", ["resnet", "FCN", "", None])
def test_unknown_arch(arch: Any) -> None:
    accepted = r"\['deeplabv3', 'dynamicworld', 'fcn', 'unet'\]"
    with pytest.raises(ModelCardError, match=accepted) as info:
        build_model(arch, 3, 2)
    assert repr(arch) in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelCardError):
        total_stride(arch)


@pytest.mark.parametrize(
    ("arch", "args", "needles"),
    [
        ("fcn", {"depth": 4}, ["depth", "base_channels"]),
        ("unet", {"output_stride": 16}, ["output_stride", "upsampling"]),
        ("deeplabv3", {"bogus": 1}, ["bogus", "layers"]),
        ("fcn", {"base_channels": 0}, ["base_channels=0", "integer >= 1"]),
        ("fcn", {"dropout": 1.5}, ["dropout=1.5", "[0, 1)"]),
        ("unet", {"depth": 0}, ["depth=0", ">= 1"]),
        ("unet", {"depth": True}, ["depth=True"]),
        ("unet", {"base_channels": "32"}, ["base_channels='32'"]),
        ("unet", {"upsampling": "nearest"}, ["'nearest'", "bilinear", "transpose"]),
        ("deeplabv3", {"output_stride": 32}, ["output_stride=32", "[8, 16]"]),
        ("deeplabv3", {"output_stride": 16.0}, ["output_stride=16.0", "[8, 16]"]),
        ("deeplabv3", {"layers": [2, 2]}, ["layers=[2, 2]", "4 positive integers"]),
        ("deeplabv3", {"layers": [2, 0, 2, 2]}, ["layers=[2, 0, 2, 2]"]),
        ("deeplabv3", {"atrous_rates": [6, 12]}, ["atrous_rates=[6, 12]"]),
    ],
)
def test_bad_arch_args(arch: str, args: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ModelCardError) as info:
        build_model(arch, 3, 2, **args)
    message = str(info.value)
    assert arch in message
    for needle in needles:
        assert needle in message, message
    with pytest.raises(ModelCardError):
        total_stride(arch, **args)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("in_channels", "num_classes"), [(0, 2), (3, 0), (True, 2)])
def test_bad_channels_or_classes(arch: str, in_channels: Any, num_classes: Any) -> None:
    with pytest.raises(ModelCardError, match=arch):
        build_model(arch, in_channels, num_classes)


def test_total_stride_rejects_common_args() -> None:
    with pytest.raises(ModelCardError, match="in_channels"):
        total_stride("unet", in_channels=3)


def test_deeplab_trains_with_batch_of_one() -> None:
    # The image-pooling branch has no BatchNorm, so single-tile batches work in training mode.
    model = build_model("deeplabv3", IN_CHANNELS, NUM_CLASSES, base_channels=8).train()
    model(torch.randn(1, IN_CHANNELS, 64, 64)).sum().backward()
