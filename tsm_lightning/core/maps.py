"""The four label-free saliency methods, computed from one shared decomposition.

All functions take ``(B, C, h, w)`` features of any floating dtype on any device and return raw,
non-negative ``(B, h, w)`` float32 maps on the same device (use :func:`~tsm_lightning.core.normalize_maps`
for ``[0, 1]`` maps). Notation as in :mod:`tsm_lightning.core.spectral`: ``X`` is the ``(C, N)`` channel
unfolding, ``Xc`` its per-channel spatially centred twin, ``P_k = u_k^T X`` the projection on the k-th
left singular vector, ``s_k`` the k-th singular value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tsm_lightning.constants import METHODS
from tsm_lightning.core.methods import METHOD_TABLE, validate_methods, validate_weighting
from tsm_lightning.core.postprocess import normalize_maps
from tsm_lightning.core.spectral import Decomposition, Spectrum, decompose

__all__ = [
    "compute_maps",
    "decomposition_request",
    "eigencam",
    "mtsm",
    "multivec_eigencam",
    "saliency_maps",
    "tsm",
]

_FLOAT32_MAX = torch.finfo(torch.float32).max


def _to_float32(maps: Tensor) -> Tensor:
    return maps.clamp(max=_FLOAT32_MAX).to(torch.float32)


def decomposition_request(methods: Sequence[str], num_components: int | None = None) -> dict[str, Any]:
    """What :func:`~tsm_lightning.core.decompose` must compute for ``methods``: its keyword arguments.

    The uncentred spectrum for TSM/MTSM, the centred one for the EigenCAM variants, and every component only when
    a multivector method is asked for (``num_components`` of them), else the leading one.
    """
    table = [METHOD_TABLE[name] for name in validate_methods(methods)]
    return {
        "uncentred": any(method.spectrum == "uncentred" for method in table),
        "centred": any(method.spectrum == "centred" for method in table),
        "num_components": num_components if any(method.multivector for method in table) else 1,
    }


def _leading(spectrum: Spectrum, num_components: int | None) -> Spectrum:
    if num_components is None or num_components >= spectrum.singular_values.shape[1]:
        return spectrum
    return Spectrum(spectrum.singular_values[:, :num_components], spectrum.projections[:, :num_components])


def compute_maps(
    decomposition: Decomposition,
    methods: Sequence[str] = METHODS,
    *,
    weighting: str = "singular",
    num_components: int | None = None,
) -> dict[str, Tensor]:
    """Raw maps of several methods from one :class:`Decomposition`.

    Args:
        decomposition: output of :func:`~tsm_lightning.core.decompose` holding the spectra the methods need
            (the uncentred one for ``tsm``/``mtsm``, the centred one for ``eigencam``/``multivec_eigencam``).
        methods: names from :data:`METHODS`.
        weighting: multivector weighting, one of :data:`WEIGHTINGS`.
        num_components: components ``K`` summed by the multivector methods; ``None`` uses every component the
            decomposition holds (a decomposition with more, e.g. for the spectral metrics, is cut to ``K``).

    Returns:
        ``{method: (B, h, w) float32}`` raw non-negative maps; zero for invalid (non-finite) images.
    """
    methods = validate_methods(methods)
    validate_weighting(weighting)
    out: dict[str, Tensor] = {}
    for name in methods:
        method = METHOD_TABLE[name]
        spectrum = decomposition.centred if method.spectrum == "centred" else decomposition.uncentred
        if spectrum is None:
            raise ValueError(f"Method {name!r} needs the {method.spectrum} spectrum, which this decomposition lacks.")
        if method.multivector:
            spectrum = _leading(spectrum, num_components)
        out[name] = _to_float32(method.fn(spectrum, decomposition.channel_sum, weighting))
    return out


def saliency_maps(
    features: Tensor,
    methods: str | Sequence[str] = METHODS,
    *,
    normalize: bool = True,
    num_components: int | None = None,
    weighting: str = "singular",
) -> dict[str, Tensor]:
    """Compute several saliency methods from one batched decomposition.

    The Gram matrix and the eigendecomposition are computed once for all requested methods (once per view:
    uncentred for TSM/MTSM, centred for the EigenCAM variants, both in the same ``eigh`` call).

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device.
        methods: a name or names from :data:`METHODS`.
        normalize: min-max normalise each map to ``[0, 1]`` (see :func:`normalize_maps`).
        num_components: components ``K`` summed by the multivector methods; ``None`` uses all ``min(C, h*w)``.
        weighting: multivector weighting, one of :data:`WEIGHTINGS`.

    Returns:
        ``{method: (B, h, w) float32}`` on the features' device, in the order of ``methods``.

    Example:
        >>> import torch
        >>> from tsm_lightning import METHODS, saliency_maps
        >>> maps = saliency_maps(torch.randn(8, 512, 7, 7))
        >>> tuple(maps) == METHODS, tuple(maps["tsm"].shape)
        (True, (8, 7, 7))
    """
    methods = validate_methods(methods)
    validate_weighting(weighting)
    decomposition = decompose(features, **decomposition_request(methods, num_components))
    maps = compute_maps(decomposition, methods, weighting=weighting)
    if normalize:
        maps = {name: normalize_maps(m) for name, m in maps.items()}
    return maps


def eigencam(features: Tensor) -> Tensor:
    """EigenCAM: the centred features projected on their first principal component, ReLU-ed.

    ``EigenCAM = ReLU(sigma * Xc^T u^c_1) = ReLU(sigma * P^c_1)``, where ``u^c_1`` is the leading left
    singular vector of the centred unfolding ``Xc`` (pytorch-grad-cam's ``get_2d_projection``). Unlike
    pytorch-grad-cam, the sign ``sigma`` is fixed deterministically: the map before ReLU has a non-negative
    dot product (equivalently, correlation) with the channel-sum map ``sum_c F[c]``.

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device.

    Returns:
        ``(B, h, w)`` float32 raw non-negative maps.
    """
    return saliency_maps(features, "eigencam", normalize=False)["eigencam"]


def tsm(features: Tensor) -> Tensor:
    """Tucker Saliency Map: ``|sum_c F[c] A1[c, 0]| = |u_1^T X| = s_1 |v_1|``.

    ``A1`` is the mode-0 (channel) factor of the full-rank Tucker decomposition of ``F``, whose first column
    is the leading left singular vector ``u_1`` of the uncentred unfolding ``X``.

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device.

    Returns:
        ``(B, h, w)`` float32 raw non-negative maps.
    """
    return saliency_maps(features, "tsm", normalize=False)["tsm"]


def multivec_eigencam(features: Tensor, *, num_components: int | None = None, weighting: str = "singular") -> Tensor:
    """Multivec-EigenCAM: ``sum_k w_k |P^c_k| / sum_k w_k`` over the centred components ``k = 1..K``.

    With the default ``weighting="singular"``, ``w_k = s^c_k``, the k-th singular value of ``Xc``.

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device.
        num_components: ``K``; ``None`` uses all ``min(C, h*w)`` components.
        weighting: ``"singular"`` (``s_k``), ``"variance"`` (``s_k**2``) or ``"uniform"`` (1 for each
            numerically non-zero component).

    Returns:
        ``(B, h, w)`` float32 raw non-negative maps.
    """
    return saliency_maps(
        features, "multivec_eigencam", normalize=False, num_components=num_components, weighting=weighting
    )["multivec_eigencam"]


def mtsm(features: Tensor, *, num_components: int | None = None, weighting: str = "singular") -> Tensor:
    """Multivector Tucker Saliency Map: ``sum_k w_k |u_k^T X| / sum_k w_k`` over ``k = 1..K``.

    ``u_k`` are the columns of the Tucker channel factor and, with the default ``weighting="singular"``,
    ``w_k = s_k`` are the Frobenius norms of the Tucker core's mode-0 slices (the singular values of ``X``).

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device.
        num_components: ``K``; ``None`` uses all ``min(C, h*w)`` components.
        weighting: ``"singular"``, ``"variance"`` or ``"uniform"`` (see :func:`multivec_eigencam`).

    Returns:
        ``(B, h, w)`` float32 raw non-negative maps.
    """
    return saliency_maps(features, "mtsm", normalize=False, num_components=num_components, weighting=weighting)["mtsm"]
