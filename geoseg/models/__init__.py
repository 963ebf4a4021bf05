"""Segmentation architectures (FCN-8s, U-Net, DeepLabV3) on plain ``torch.nn``."""

from geoseg.models.registry import (
    ARCHITECTURES,
    accepted_args,
    build_model,
    total_stride,
)

__all__ = ["ARCHITECTURES", "accepted_args", "build_model", "total_stride"]
