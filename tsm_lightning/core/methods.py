"""The method table: every saliency method's facts and its map function, one entry per method.

Each :class:`Method` says which spectrum the method reads (``"uncentred"``: ``X``, the Tucker view; ``"centred"``:
``Xc``, the EigenCAM view), whether it sums every component (a multivector method) or reads the leading one only,
its display label and the function that turns the spectrum into a raw map. Everything else is derived from
:data:`METHOD_TABLE`: name validation (:func:`validate_methods`), what :func:`~tsm_lightning.core.decompose` must
compute (:func:`~tsm_lightning.core.decomposition_request`), the dispatch in :func:`~tsm_lightning.core.compute_maps`,
the methods :func:`~tsm_lightning.core.tucker_saliency` can compute (the uncentred ones) and the labels of the pictures
(:func:`~tsm_lightning.render.method_label`).

Adding a method is one entry here, its independent reference (``benchmarks/reference_paths.py``) and its tests; its
name also goes into :data:`tsm_lightning.constants.METHODS`, the torch-free copy of the names that the command line's
parser reads (``tests/core/test_methods.py`` fails, naming the fix, if the two disagree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tsm_lightning.constants import WEIGHTINGS
from tsm_lightning.core.spectral import Spectrum

__all__ = ["METHOD_TABLE", "MapFn", "Method", "validate_methods", "validate_weighting"]

MapFn = Callable[[Spectrum, Tensor, str], Tensor]
"""``fn(spectrum, channel_sum, weighting) -> (B, h, w)`` raw non-negative map.

``spectrum`` is the method's own spectrum (cut to the requested ``K`` components for a multivector method),
``channel_sum`` the ``(B, h, w)`` map ``sum_c F[c]`` (for a sign rule), ``weighting`` one of :data:`WEIGHTINGS`.
"""


@dataclass(frozen=True)
class Method:
    """One saliency method.

    Attributes:
        name: what users pass (``methods=("tsm", ...)``), the tag and the key of every result.
        label: short display name, used in picture headers.
        spectrum: ``"uncentred"`` (``X``: TSM, MTSM) or ``"centred"`` (``Xc``: the EigenCAM variants).
        multivector: whether the map sums every component ``k = 1..K`` (then ``num_components`` and ``weighting``
            apply), or reads the leading component only.
        fn: the map of a spectrum, see :data:`MapFn`.
    """

    name: str
    label: str
    spectrum: Literal["uncentred", "centred"]
    multivector: bool
    fn: MapFn


def _leading_projection(spectrum: Spectrum) -> Tensor:
    """``(B, h, w)`` signed projection ``P_1`` on the leading component."""
    return spectrum.projections[:, 0]


def _abs_leading(spectrum: Spectrum, channel_sum: Tensor, weighting: str) -> Tensor:
    """``|P_1|``: TSM on the uncentred spectrum."""
    return _leading_projection(spectrum).abs()


def _signed_relu_leading(spectrum: Spectrum, channel_sum: Tensor, weighting: str) -> Tensor:
    """``ReLU(sign * P_1)`` with the sign making the map correlate positively with the channel sum: EigenCAM."""
    p1 = _leading_projection(spectrum)
    # P^c_1 sums to zero over space, so its dot product with the channel-sum map equals their covariance.
    dot = (p1 * channel_sum).sum(dim=(1, 2))
    sign = torch.where(dot < 0, -1.0, 1.0).to(p1.dtype)
    return (p1 * sign[:, None, None]).clamp_min(0)


def _weighted_abs_sum(spectrum: Spectrum, channel_sum: Tensor, weighting: str) -> Tensor:
    """``sum_k w_k |P_k| / sum_k w_k`` over the components held in ``spectrum``: the multivector maps."""
    s = spectrum.singular_values
    if weighting == "singular":
        weights = s
    elif weighting == "variance":
        weights = s * s
    else:  # uniform over the numerically non-zero components
        tol = s[:, :1] * (s.shape[1] * torch.finfo(torch.float32).eps)
        weights = (s > tol).to(s.dtype)
    total = weights.sum(dim=1)
    p = spectrum.projections
    # One (1 x K) @ (K x N) product per image: no (B, K, N) temporary beyond |P|.
    summed = torch.bmm(weights.to(p.dtype)[:, None, :], p.abs().flatten(2)).reshape(p.shape[0], *p.shape[2:])
    return summed / torch.where(total > 0, total, torch.ones_like(total)).to(p.dtype)[:, None, None]


METHOD_TABLE: Mapping[str, Method] = {
    method.name: method
    for method in (
        Method("eigencam", "EigenCAM", "centred", False, _signed_relu_leading),
        Method("tsm", "TSM", "uncentred", False, _abs_leading),
        Method("multivec_eigencam", "MV-EigenCAM", "centred", True, _weighted_abs_sum),
        Method("mtsm", "MTSM", "uncentred", True, _weighted_abs_sum),
    )
}
"""Every saliency method by name, in display order (the order of :data:`~tsm_lightning.constants.METHODS`)."""


def validate_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Check a method name or a sequence of names against :data:`METHOD_TABLE`.

    Args:
        methods: one name or a non-empty sequence of names.

    Returns:
        The names as a tuple, duplicates removed, order kept.

    Raises:
        ValueError: for an unknown name or an empty sequence, listing the valid names.
    """
    valid = tuple(METHOD_TABLE)
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if not names:
        raise ValueError(f"methods must name at least one of {valid}.")
    unknown = [name for name in names if name not in METHOD_TABLE]
    if unknown:
        raise ValueError(f"Unknown saliency method(s) {unknown}; valid methods are {valid}.")
    return tuple(dict.fromkeys(names))


def validate_weighting(weighting: str) -> str:
    """Return ``weighting`` if it is one of :data:`WEIGHTINGS`, else raise a ``ValueError`` listing them."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; valid weightings are {WEIGHTINGS}.")
    return weighting
