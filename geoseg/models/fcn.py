"""FCN-8s fully convolutional network.

Reference:
    Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from geoseg.errors import ModelCardError
from geoseg.models.common import check_int, init_weights

ARCH_NAME = "fcn"

# Channel multipliers and conv count of the five encoder stages. VGG-16 uses (2, 2, 3, 3, 3) convs;
# two per stage keeps the default model under 5M parameters while preserving the stride layout.
_STAGE_MULTIPLIERS = (1, 2, 4, 8, 8)
_CONVS_PER_STAGE = 2


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias, BN follows) + BatchNorm + ReLU with 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        # In-place is safe: the BN output is not needed by BN's backward pass.
        nn.ReLU(inplace=True),
    )


def _upsample_to(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinearly resize ``x`` to the spatial size of ``ref``.

    Using the reference size (not a fixed scale factor) keeps the skip additions shape-safe for
    inputs that are not multiples of 32; for aligned inputs it is an exact 2x/8x upsampling.
    """
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class FCN8s(nn.Module):
    """FCN-8s (Long et al. 2015) on a small VGG-like encoder with BatchNorm.

    Architecture:
        * Encoder: five stages of two 3x3 conv-BN-ReLU blocks followed by a 2x2 max-pool, with
          ``base_channels * (1, 2, 4, 8, 8)`` channels. Outputs of stages 3, 4 and 5 have strides
          8, 16 and 32 ("pool3", "pool4", "pool5").
        * "fc6"/"fc7" as convolutions (3x3 then 1x1, ``8 * base_channels`` channels, dropout),
          then a 1x1 score layer at stride 32.
        * FCN-8s fusion: score32 is bilinearly upsampled to stride 16 and added to a 1x1 score of
          pool4; the sum is upsampled to stride 8 and added to a 1x1 score of pool3; the result is
          bilinearly upsampled to the input size.

    Differences from the paper: BatchNorm instead of pre-trained VGG weights, bilinear
    interpolation instead of learned transposed convolutions, and "same" padding instead of the
    paper's 100-pixel input padding and crop layers (callers pass inputs aligned to 32).

    The total stride is 32: for exact, translation-equivariant (tiling-safe) outputs the input
    height and width must be multiples of 32. Other sizes >= 32 still produce a full-size output.

    Args:
        in_channels: Number of input bands.
        num_classes: Number of output classes (logit channels).
        base_channels: Channels of the first stage; later stages use 2x, 4x, 8x, 8x.
        dropout: Channel dropout probability after fc6 and fc7, in [0, 1).
    """

    total_stride: int

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_int(ARCH_NAME, "in_channels", in_channels, 1)
        check_int(ARCH_NAME, "num_classes", num_classes, 1)
        check_int(ARCH_NAME, "base_channels", base_channels, 1)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not (0.0 <= dropout < 1.0)
        ):
            raise ModelCardError(
                f"{ARCH_NAME}: invalid dropout={dropout!r}; accepted: a number in [0, 1)"
            )
        self.total_stride = 2 ** len(_STAGE_MULTIPLIERS)

        widths = [base_channels * m for m in _STAGE_MULTIPLIERS]
        stages: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            blocks: list[nn.Module] = []
            for _ in range(_CONVS_PER_STAGE):
                blocks.append(_conv_bn_relu(prev, width))
                prev = width
            blocks.append(nn.MaxPool2d(kernel_size=2, stride=2))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

        fc_width = widths[-1]
        self.fc = nn.Sequential(
            _conv_bn_relu(widths[-1], fc_width, kernel_size=3),  # fc6
            nn.Dropout2d(dropout),
            _conv_bn_relu(fc_width, fc_width, kernel_size=1),  # fc7
            nn.Dropout2d(dropout),
        )
        self.score_pool5 = nn.Conv2d(fc_width, num_classes, kernel_size=1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, kernel_size=1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Common init; zero skip scores so training starts as FCN-32s (as in the paper)."""
        init_weights(self, self.score_pool5)
        for skip in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(skip.weight)  # biases are already zero

    def forward(self, x: Tensor) -> Tensor:
        """Compute per-pixel class logits.

        Args:
            x: Input of shape ``[B, in_channels, H, W]``; H and W should be multiples of 32.

        Returns:
            Logits of shape ``[B, num_classes, H, W]``.
        """
        feats: list[Tensor] = []
        f = x
        for stage in self.stages:
            f = stage(f)
            feats.append(f)
        pool3, pool4, pool5 = feats[2], feats[3], feats[4]

        score = self.score_pool5(self.fc(pool5))
        score = _upsample_to(score, pool4) + self.score_pool4(pool4)
        score = _upsample_to(score, pool3) + self.score_pool3(pool3)
        out: Tensor = _upsample_to(score, x)
        return out


__all__ = ["ARCH_NAME", "FCN8s"]
