"""Name -> architecture registry, the one place that turns a model card's ``arch`` into a module.

Every architecture is a plain ``torch.nn.Module`` constructed as
``cls(in_channels=..., num_classes=..., **arch_args)`` whose ``forward`` maps
``[B, in_channels, H, W]`` to logits ``[B, num_classes, H, W]`` for H, W multiples of
:func:`total_stride`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from geoseg.errors import ModelCardError
from geoseg.models.deeplab import DeepLabV3
from geoseg.models.dynamicworld import DynamicWorld
from geoseg.models.fcn import FCN8s
from geoseg.models.unet import UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "fcn": FCN8s,
    "unet": UNet,
    "deeplabv3": DeepLabV3,
    "dynamicworld": DynamicWorld,
}

# Constructor parameters supplied by build_model itself, not by ``arch_args``.
_COMMON_PARAMS = ("in_channels", "num_classes")


def _lookup(arch: object) -> type[nn.Module]:
    """Return the class registered as ``arch`` or raise :class:`ModelCardError`."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelCardError(
            f"unknown architecture arch={arch!r}; accepted: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch]


def accepted_args(arch: str) -> list[str]:
    """Names of the architecture-specific constructor arguments of ``arch``.

    Args:
        arch: A key of :data:`ARCHITECTURES`.

    Returns:
        Sorted argument names (without ``in_channels`` and ``num_classes``).

    Raises:
        ModelCardError: If ``arch`` is unknown.
    """
    params = inspect.signature(_lookup(arch).__init__).parameters
    return sorted(
        name
        for name, p in params.items()
        if name != "self"
        and name not in _COMMON_PARAMS
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def _check_arch_args(arch: str, arch_args: dict[str, Any]) -> list[str]:
    """Reject argument names ``arch`` does not take; return the accepted names."""
    accepted = accepted_args(arch)
    # Only reachable via total_stride(): for build_model() Python rejects the duplicate keyword.
    common = [name for name in _COMMON_PARAMS if name in arch_args]
    if common:
        raise ModelCardError(
            f"{arch}: {common} must not be given in arch_args (they come from the model card's "
            f"bands and classes); accepted arch_args: {accepted}"
        )
    unknown = sorted(set(arch_args) - set(accepted))
    if unknown:
        given = {name: arch_args[name] for name in unknown}
        raise ModelCardError(f"{arch}: unknown argument(s) {given}; accepted: {accepted}")
    return accepted


def build_model(arch: str, in_channels: int, num_classes: int, **arch_args: Any) -> nn.Module:
    """Construct a freshly initialised segmentation model (in training mode).

    Args:
        arch: ``"fcn"``, ``"unet"``, ``"deeplabv3"`` or ``"dynamicworld"``.
        in_channels: Number of input bands.
        num_classes: Number of output classes.
        **arch_args: Architecture-specific arguments (e.g. ``base_channels``, ``depth``,
            ``output_stride``); see the model classes.

    Returns:
        The model.

    Raises:
        ModelCardError: If ``arch`` is unknown, an argument is unknown or a value is invalid.
    """
    cls = _lookup(arch)
    accepted = _check_arch_args(arch, arch_args)
    try:
        return cls(in_channels=in_channels, num_classes=num_classes, **arch_args)
    except ModelCardError:
        raise
    except (TypeError, ValueError) as exc:
        # A value the constructor's own checks did not anticipate (e.g. a wrong type deep in
        # torch): still report it as a model-card problem, naming what was passed.
        raise ModelCardError(
            f"{arch}: invalid arguments in_channels={in_channels!r}, num_classes={num_classes!r}, "
            f"arch_args={arch_args!r}: {exc}; accepted arch_args: {accepted}"
        ) from exc


def total_stride(arch: str, **arch_args: Any) -> int:
    """Factor that input height and width must be multiples of for exact alignment.

    It is the product of all strides applied to the input: 32 for ``"fcn"``, ``2**depth`` for
    ``"unet"``, ``output_stride`` for ``"deeplabv3"`` (dilation replaces the later strides) and 2
    for ``"dynamicworld"`` (one resize to half size).

    Args:
        arch: ``"fcn"``, ``"unet"``, ``"deeplabv3"`` or ``"dynamicworld"``.
        **arch_args: The same architecture arguments that :func:`build_model` takes.

    Returns:
        The total stride in pixels.

    Raises:
        ModelCardError: If ``arch`` is unknown, an argument is unknown or a value is invalid.
    """
    # Build on the meta device (no memory, no real init): the model computes its own stride,
    # so this cannot drift from the architecture, and all arguments get validated.
    _lookup(arch)
    _check_arch_args(arch, arch_args)
    with torch.device("meta"):
        model = build_model(arch, in_channels=1, num_classes=1, **arch_args)
    stride = getattr(model, "total_stride", None)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ModelCardError(f"{arch}: model class does not define a valid total_stride")
    return stride


__all__ = ["ARCHITECTURES", "accepted_args", "build_model", "total_stride"]
