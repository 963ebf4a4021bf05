"""Pieces shared by the built-in architectures: argument checks and weight initialisation."""

from __future__ import annotations

from torch import nn

from geoseg.errors import ModelCardError


def check_int(arch: str, name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise :class:`ModelCardError`."""
    # bool is an int subclass; ``depth=True`` is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelCardError(f"{arch}: invalid {name}={value!r}; accepted: an integer >= {minimum}")
    return value


def init_weights(model: nn.Module, classifier: nn.Conv2d) -> None:
    """He init for (transposed) convs, identity BatchNorm, and a small final classifier.

    The small classifier starts training near the uniform prediction (loss ~ log C).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(classifier.weight, std=0.01)
