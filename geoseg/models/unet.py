"""U-Net encoder-decoder with skip connections.

Reference:
    Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geoseg.errors import ModelCardError
from geoseg.models.common import check_int, init_weights

ARCH_NAME = "unet"
UPSAMPLING_MODES = ("bilinear", "transpose")


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU blocks ("same" padding, so spatial size is kept).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        mid_channels: Channels between the two convs; defaults to ``out_channels``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None
    ) -> None:
        mid = out_channels if mid_channels is None else mid_channels
        super().__init__(
            # No conv bias: the following BatchNorm has its own shift.
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            # In-place is safe: BN's backward does not need its own output.
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Decoder step: upsample x2, concatenate the encoder skip, DoubleConv.

    Args:
        in_channels: Channels of the deeper (coarser) input.
        skip_channels: Channels of the encoder skip at the target resolution.
        out_channels: Output channels.
        upsampling: ``"transpose"`` (learned 2x2 transposed conv that also maps ``in_channels``
            to ``skip_channels``) or ``"bilinear"`` (parameter-free interpolation).
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, upsampling: str
    ) -> None:
        super().__init__()
        self.up: nn.Module | None
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
            cat_channels = 2 * skip_channels
        else:
            self.up = None
            cat_channels = in_channels + skip_channels
        self.conv = DoubleConv(cat_channels, out_channels, mid_channels=skip_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Upsample ``x`` to ``skip``'s size, concatenate along channels and convolve."""
        if self.up is not None:
            x = self.up(x)
        # Bilinear mode always resizes here; transpose mode only when an odd encoder size made
        # the upsampled map one pixel smaller than the skip (never for aligned inputs).
        if self.up is None or x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        out: Tensor = self.conv(torch.cat([skip, x], dim=1))
        return out


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm and "same" padding.

    Architecture:
        * Encoder: ``depth`` levels of DoubleConv (two 3x3 conv-BN-ReLU) each followed by a 2x2
          max-pool; level ``i`` has ``base_channels * 2**i`` channels. A DoubleConv bottleneck
          runs at stride ``2**depth``.
        * Decoder: ``depth`` UpBlocks, each upsampling x2 (transposed conv or bilinear),
          concatenating the encoder output of the same level (skip connection) and applying a
          DoubleConv.
        * A 1x1 conv classifier at full resolution.

    With ``upsampling="bilinear"`` (default) the bottleneck and decoder use half the channels of
    the classic layout (the common bilinear U-Net variant): it keeps the default model at ~4.3M
    parameters instead of ~7.8M. ``upsampling="transpose"`` gives the classic layout.

    Unlike the paper ("valid" convolutions, output smaller than input) the convs are zero-padded,
    so the output has the input's size. The total stride is ``2**depth``: input height and width
    must be multiples of it for exact, translation-equivariant (tiling-safe) outputs; other sizes
    still work because skips are resized to match.

    Args:
        in_channels: Number of input bands.
        num_classes: Number of output classes (logit channels).
        base_channels: Channels of the first level; doubled at each deeper level.
        depth: Number of 2x downsamplings (>= 1).
        upsampling: ``"bilinear"`` or ``"transpose"``.
    """

    total_stride: int

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        depth: int = 4,
        upsampling: str = "bilinear",
    ) -> None:
        super().__init__()
        check_int(ARCH_NAME, "in_channels", in_channels, 1)
        check_int(ARCH_NAME, "num_classes", num_classes, 1)
        check_int(ARCH_NAME, "base_channels", base_channels, 1)
        check_int(ARCH_NAME, "depth", depth, 1)
        if upsampling not in UPSAMPLING_MODES:
            raise ModelCardError(
                f"{ARCH_NAME}: invalid upsampling={upsampling!r}; "
                f"accepted: {list(UPSAMPLING_MODES)}"
            )
        self.total_stride = 2**depth

        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        prev = in_channels
        for width in widths[:-1]:
            self.encoders.append(DoubleConv(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

        bilinear = upsampling == "bilinear"
        # Bilinear mode: the bottleneck outputs as many channels as the deepest skip so that the
        # concatenation is symmetric without a learned up-projection.
        bottleneck_out = widths[-2] if bilinear else widths[-1]
        self.bottleneck = DoubleConv(widths[-2], bottleneck_out)

        self.decoders = nn.ModuleList()
        deeper = bottleneck_out
        for level in reversed(range(depth)):
            skip = widths[level]
            out = widths[max(level - 1, 0)] if bilinear else skip
            self.decoders.append(UpBlock(deeper, skip, out, upsampling))
            deeper = out
        self.classifier = nn.Conv2d(deeper, num_classes, kernel_size=1)
        init_weights(self, self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """Compute per-pixel class logits.

        Args:
            x: Input of shape ``[B, in_channels, H, W]``; H and W should be multiples of
                ``total_stride``.

        Returns:
            Logits of shape ``[B, num_classes, H, W]``.
        """
        skips: list[Tensor] = []
        f = x
        for encoder in self.encoders:
            f = encoder(f)
            skips.append(f)
            f = self.pool(f)
        f = self.bottleneck(f)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            f = decoder(f, skip)
        out: Tensor = self.classifier(f)
        return out


__all__ = ["ARCH_NAME", "UPSAMPLING_MODES", "DoubleConv", "UNet", "UpBlock"]
