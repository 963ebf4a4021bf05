"""The CRF that refines class probabilities: a local dense CRF (ConvCRF), and its parameters.

The model is the fully connected CRF of Krähenbühl & Koltun (2011) with its pairwise term
restricted to a ``window x window`` neighbourhood, as in ConvCRF (Teichmann & Cipolla 2018). For
pixels ``i != j`` at most ``r = window // 2`` apart along each axis, both valid, the kernel is::

    k(i, j) = w_s exp(-|p_i - p_j|^2 / 2 s_s^2)
            + w_b exp(-|p_i - p_j|^2 / 2 s_xy^2 - |f_i - f_j|^2 / 2 s_f^2)

with ``p`` pixel positions and ``f`` the (already normalised) image features. With the unary
``U = -log(max(probs, 1e-8))`` and Potts compatibility, the mean-field update is::

    Q_0 = softmax(-U)
    m_i(l) = sum_j k(i, j) Q_j(l)
    Q_{t+1}(i, l) = softmax_l(-U_i(l) - sum_{l' != l} m_i(l'))

Since ``sum_{l' != l} m_i(l') = sum_l' m_i(l') - m_i(l)`` and the first term does not depend on
``l``, it cancels in the softmax: the update computed is ``softmax_l(-U_i(l) + m_i(l))``.

Two implementations: :mod:`geoseg.crf_local` (this window, in torch, exact under tiling: the
pipeline's) and :mod:`geoseg.crf_dense` (the unrestricted model, a reference). This module
imports neither torch nor the reference's library: the driver resolves the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import exp

from geoseg.errors import ConfigError

PROB_FLOOR = 1e-8  # the unary's floor: U = -log(max(probs, PROB_FLOOR))


@dataclass(frozen=True)
class CRFParams:
    """Parameters of the CRF (see the module docstring for the formulas).

    Args:
        iterations: mean-field iterations ``T``; 0 returns the input, normalised.
        window: odd edge of the neighbourhood messages are passed in; radius ``window // 2``.
        spatial_sigma: ``s_s`` of the smoothness kernel, in pixels.
        spatial_weight: ``w_s``, the Potts weight of the smoothness kernel.
        bilateral_sigma_xy: ``s_xy`` of the appearance kernel, in pixels.
        bilateral_sigma_feat: ``s_f`` of the appearance kernel, in units of the features.
        bilateral_weight: ``w_b``, the Potts weight of the appearance kernel.
    """

    iterations: int = 5
    window: int = 7
    spatial_sigma: float = 3.0
    spatial_weight: float = 3.0
    bilateral_sigma_xy: float = 5.0
    bilateral_sigma_feat: float = 0.3
    bilateral_weight: float = 5.0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ConfigError(f"CRF iterations must be >= 0, got {self.iterations}")
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"CRF window must be a positive odd number, got {self.window}")
        for name in ("spatial_sigma", "bilateral_sigma_xy", "bilateral_sigma_feat"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CRF {name} must be > 0, got {getattr(self, name)}")
        for name in ("spatial_weight", "bilateral_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"CRF {name} must be >= 0, got {getattr(self, name)}")

    @property
    def radius(self) -> int:
        """Largest offset along each axis a message travels in one iteration."""
        return self.window // 2

    def position_terms(self, dy: int, dx: int) -> tuple[float, float]:
        """The kernels' position terms at offset ``d = (dy, dx)``: ``w_s exp(-|d|^2 / 2 s_s^2)``
        and ``w_b exp(-|d|^2 / 2 s_xy^2)``."""
        d2 = dy * dy + dx * dx
        return (
            self.spatial_weight * exp(-d2 / (2 * self.spatial_sigma**2)),
            self.bilateral_weight * exp(-d2 / (2 * self.bilateral_sigma_xy**2)),
        )

    @property
    def feature_scale(self) -> float:
        """``-1 / 2 s_f^2``: the appearance kernel is ``exp(feature_scale |f_i - f_j|^2)``."""
        return -0.5 / self.bilateral_sigma_feat**2

    @property
    def halo(self) -> int:
        """Pixels of context a tile needs on every side so that tiled == whole: ``T r``."""
        return self.iterations * self.radius
