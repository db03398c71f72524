"""Spectral concentration of feature maps: how much of the spectrum the leading component carries.

The metric reads the singular values of a :class:`~tsm_lightning.core.Decomposition`, the object the maps are
computed from, so a caller holding one (the pipeline) gets the maps and the spectra from a single decomposition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsm_lightning.core import Decomposition, decompose
from tsm_lightning.metrics._common import out, spectral_input

__all__ = ["spectral_concentration", "spectral_metrics"]

SPECTRAL_METRICS = {"spectral_concentration": "uncentred", "spectral_concentration_centred": "centred"}
"""The spectral metrics and the spectrum of :class:`~tsm_lightning.core.Decomposition` each reads."""


def _concentration(singular_values: Tensor, valid: Tensor) -> Tensor:
    total = singular_values.sum(dim=1)
    ratio = singular_values[:, 0] / torch.where(total > 0, total, torch.ones_like(total))
    ratio = torch.where(total > 0, ratio, torch.zeros_like(ratio))
    return torch.where(valid, ratio, torch.full_like(ratio, math.nan))


def spectral_concentration(features: Tensor, centred: bool = False) -> Tensor:
    """Share of the feature map's spectrum carried by its leading component.

    ``concentration = s_1 / sum_k s_k`` where ``s_k`` are the singular values of the channel unfolding
    ``X = F.reshape(C, h * w)`` (``centred=False``: the Tucker / TSM spectrum) or of its per-channel spatially
    centred twin ``Xc`` (``centred=True``: the EigenCAM spectrum), computed by
    :func:`~tsm_lightning.core.decompose`. This is the quantity of the paper's Figure 2.

    Range ``[1 / min(C, h * w), 1]``; higher means one component dominates, so the single-component maps
    (TSM, EigenCAM) already tell most of the story; lower means the multivector maps add information. Neither
    direction is "better" in itself. All-zero features give 0 (never NaN); features holding NaN or Inf give NaN
    (undefined; :func:`~tsm_lightning.core.decompose` warns). The decomposition runs in float64 (float32 on MPS)
    so that rounding noise does not give zero singular values a spurious share.

    Args:
        features: ``(B, C, h, w)`` feature maps.
        centred: use the centred (EigenCAM) spectrum instead of the uncentred (Tucker / TSM) one.

    Returns:
        ``(B,)`` float32 concentrations on the features' device.
    """
    dec = decompose(spectral_input(features), uncentred=not centred, centred=centred)
    key = "spectral_concentration_centred" if centred else "spectral_concentration"
    return spectral_metrics(dec)[key]


def spectral_metrics(decomposition: Decomposition) -> dict[str, Tensor]:
    """The spectral metrics of every spectrum a decomposition holds, per image.

    ``spectral_concentration`` (:func:`spectral_concentration`) from the uncentred spectrum and
    ``spectral_concentration_centred`` from the centred one. The decomposition should hold every component
    (``num_components=None``) and come from a float64 Gram matrix (see :func:`spectral_concentration`), as
    :func:`~tsm_lightning.core.decompose` gives for float64 features.

    Args:
        decomposition: output of :func:`~tsm_lightning.core.decompose`.

    Returns:
        ``{metric: (B,) float32}`` on the decomposition's device, NaN for images whose features were not finite.
    """
    results = {}
    for metric, view in SPECTRAL_METRICS.items():
        spectrum = getattr(decomposition, view)
        if spectrum is not None:
            results[metric] = out(_concentration(spectrum.singular_values, decomposition.valid), decomposition.valid)
    return results
