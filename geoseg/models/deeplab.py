"""DeepLabV3: dilated ResNet encoder with Atrous Spatial Pyramid Pooling (ASPP).

Reference:
    Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image
    Segmentation", arXiv:1706.05587, 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geoseg.errors import ModelCardError
from geoseg.models.common import check_int, init_weights

ARCH_NAME = "deeplabv3"
OUTPUT_STRIDES = (8, 16)
# ASPP rates of the paper at output stride 16; they are doubled at output stride 8 so that the
# atrous branches keep covering the same image extent.
BASE_ATROUS_RATES = (6, 12, 18)


def _check_int_list(name: str, value: object, length: int | None) -> list[int]:
    """Return ``value`` as a list of positive ints (of ``length`` items, if given)."""
    what = f"a list of {length} positive integers" if length else "a list of positive integers"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelCardError(f"{ARCH_NAME}: invalid {name}={value!r}; accepted: {what}")
    items = list(value)
    ok = (length is None or len(items) == length) and len(items) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)
    if not ok:
        raise ModelCardError(f"{ARCH_NAME}: invalid {name}={value!r}; accepted: {what}")
    return items


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + identity/projection shortcut), optionally dilated.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (1 or 2).
        dilation: Dilation (and padding) of both convs.
        downsample: Projection for the shortcut when shape or channels change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(
            out_channels,
            out_channels,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(out_channels)
        # In-place ReLU is safe on BN outputs and on the fresh sum below.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: ``identity`` may be the block input, which autograd still needs.
        out = self.relu(out + identity)
        return out


class DilatedResNet(nn.Module):
    """ResNet-style encoder whose last stage(s) trade stride for dilation.

    Stem: 7x7 stride-2 conv-BN-ReLU and 3x3 stride-2 max-pool (stride 4). Four stages of
    BasicBlocks with ``base_channels * (1, 2, 4, 8)`` channels; stages 2-4 would each halve the
    resolution (stride 32). To reach ``output_stride`` 16 (8), the stride of stage 4 (stages 3
    and 4) is replaced by dilation 2 (2 and 4), as in DeepLabV3, so the receptive field keeps
    growing while the feature map stays at 1/16 (1/8) of the input.

    Args:
        in_channels: Number of input bands.
        base_channels: Channels of stage 1.
        layers: Number of BasicBlocks in each of the four stages.
        output_stride: 8 or 16.
    """

    def __init__(
        self, in_channels: int, base_channels: int, layers: Sequence[int], output_stride: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_channels, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        # Stages whose stride is replaced by dilation: stage 4 at OS16, stages 3 and 4 at OS8.
        dilate = {16: (False, False, True), 8: (False, True, True)}[output_stride]
        self._in = base_channels
        self._dilation = 1
        self.layer1 = self._make_stage(base_channels, layers[0], stride=1, dilate=False)
        self.layer2 = self._make_stage(2 * base_channels, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_stage(4 * base_channels, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_stage(8 * base_channels, layers[3], stride=2, dilate=dilate[2])
        self.out_channels = 8 * base_channels

    def _make_stage(self, channels: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        """Build one stage; with ``dilate`` its stride becomes a dilation multiplier."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample: nn.Module | None = None
        if stride != 1 or self._in != channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        # The first block keeps the previous dilation (as torchvision's ResNet does) so that the
        # transition into the dilated stage does not leave gaps in the sampling grid.
        modules: list[nn.Module] = [
            BasicBlock(self._in, channels, stride, previous_dilation, downsample)
        ]
        self._in = channels
        modules.extend(
            BasicBlock(channels, channels, dilation=self._dilation) for _ in range(1, blocks)
        )
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """Return the deepest feature map, at ``1/output_stride`` of the input size."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        out: Tensor = self.layer4(x)
        return out


class ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average pool, 1x1 conv, broadcast back.

    No BatchNorm here (unlike the paper): on a 1x1 map, BN in training mode fails for a batch of
    one and is very noisy for small batches, which are common for large tiles.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Return the pooled descriptor broadcast to ``x``'s spatial size."""
        pooled: Tensor = self.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        # ``expand`` equals bilinear upsampling of a 1x1 map and allocates nothing.
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3 variant).

    Five parallel branches: a 1x1 conv, three 3x3 atrous convs with ``rates``, and image-level
    pooling; concatenated and projected by a 1x1 conv-BN-ReLU with dropout.

    Args:
        in_channels: Channels of the encoder output.
        out_channels: Channels of every branch and of the projection.
        rates: Dilation rates of the three 3x3 branches.
        dropout: Dropout probability after the projection.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
        ]
        for rate in rates:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(
                        in_channels,
                        out_channels,
                        kernel_size=3,
                        padding=rate,
                        dilation=rate,
                        bias=False,
                    ),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
        branches.append(ASPPPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply all branches to ``x``, concatenate and project."""
        out: Tensor = self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
        return out


class DeepLabV3(nn.Module):
    """DeepLabV3 (Chen et al. 2017): dilated ResNet encoder + ASPP head + bilinear upsampling.

    Architecture:
        * Encoder: :class:`DilatedResNet` of BasicBlocks (``layers`` per stage, default
          ``[2, 2, 2, 2]`` = ResNet-18 layout, with ``base_channels`` default 32 instead of 64).
          The stride of the last stage(s) is replaced by dilation, so features are at
          ``1/output_stride`` of the input.
        * Head: :class:`ASPP` with rates ``(6, 12, 18)`` at output stride 16 and ``(12, 24, 36)``
          at output stride 8 (unless ``atrous_rates`` is given), a 3x3 conv-BN-ReLU, and a 1x1
          classifier.
        * The logits are bilinearly upsampled to the input size.

    The total stride is ``output_stride`` (the product of all strides still applied): inputs
    whose height and width are multiples of it give exactly aligned feature grids.

    Note:
        The ASPP image-pooling branch averages over the *whole* input, so every output pixel
        depends on the entire tile. Tiled inference of DeepLabV3 is therefore not exactly
        independent of the tiling grid (the same pixel can get slightly different logits in
        different tiles, even far from tile borders); this is a property of the architecture,
        not of the tiler. Large overlaps and blending reduce, but cannot remove, the effect.

    Args:
        in_channels: Number of input bands.
        num_classes: Number of output classes (logit channels).
        base_channels: Channels of the first encoder stage (later stages 2x, 4x, 8x).
        layers: BasicBlocks per encoder stage (four positive integers).
        output_stride: 8 or 16.
        aspp_channels: Channels of the ASPP branches and the head.
        atrous_rates: Three ASPP dilation rates; default scales ``(6, 12, 18)`` by
            ``16 / output_stride``.
        dropout: Dropout probability in the ASPP projection, in [0, 1).
    """

    total_stride: int

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        layers: Sequence[int] = (2, 2, 2, 2),
        output_stride: int = 16,
        aspp_channels: int = 128,
        atrous_rates: Sequence[int] | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_int(ARCH_NAME, "in_channels", in_channels, 1)
        check_int(ARCH_NAME, "num_classes", num_classes, 1)
        check_int(ARCH_NAME, "base_channels", base_channels, 1)
        check_int(ARCH_NAME, "aspp_channels", aspp_channels, 1)
        layer_list = _check_int_list("layers", layers, 4)
        if (
            isinstance(output_stride, bool)
            or not isinstance(output_stride, int)
            or output_stride not in OUTPUT_STRIDES
        ):
            raise ModelCardError(
                f"{ARCH_NAME}: invalid output_stride={output_stride!r}; "
                f"accepted: {list(OUTPUT_STRIDES)}"
            )
        if atrous_rates is None:
            rates = [r * 16 // output_stride for r in BASE_ATROUS_RATES]
        else:
            rates = _check_int_list("atrous_rates", atrous_rates, 3)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not (0.0 <= dropout < 1.0)
        ):
            raise ModelCardError(
                f"{ARCH_NAME}: invalid dropout={dropout!r}; accepted: a number in [0, 1)"
            )
        self.total_stride = output_stride
        self.atrous_rates = tuple(rates)

        self.backbone = DilatedResNet(in_channels, base_channels, layer_list, output_stride)
        self.aspp = ASPP(self.backbone.out_channels, aspp_channels, rates, float(dropout))
        self.head = nn.Sequential(
            nn.Conv2d(aspp_channels, aspp_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_classes, kernel_size=1)
        init_weights(self, self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """Compute per-pixel class logits.

        Args:
            x: Input of shape ``[B, in_channels, H, W]``; H and W should be multiples of
                ``output_stride``.

        Returns:
            Logits of shape ``[B, num_classes, H, W]``.
        """
        features = self.backbone(x)
        logits = self.classifier(self.head(self.aspp(features)))
        out: Tensor = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


__all__ = [
    "ARCH_NAME",
    "ASPP",
    "BASE_ATROUS_RATES",
    "OUTPUT_STRIDES",
    "ASPPPooling",
    "BasicBlock",
    "DeepLabV3",
    "DilatedResNet",
]
