"""Tucker saliency through tensorly: truncated-rank HOOI and the reference for the fast path.

At full rank the Tucker channel factor and the core's mode-0 slice norms are the left singular vectors and
singular values of the channel unfolding, and :func:`~tsm_lightning.core.saliency_maps` computes TSM and
MTSM exactly and much faster. With spatial ranks below ``(h, w)`` HOOI couples the modes and has no closed
form: this module runs tensorly's ``tucker`` on each image (HOOI is defined per tensor), under a scoped
``tensorly.backend_context("pytorch")`` so that the global tensorly backend is never changed.

tensorly is imported when :func:`tucker_saliency` first runs, never by ``import tsm_lightning``: it is the optional
``tucker`` extra (``pip install 'tsm-lightning[tucker]'``), needed only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tsm_lightning.checks import check_features
from tsm_lightning.core.methods import METHOD_TABLE
from tsm_lightning.core.postprocess import normalize_maps
from tsm_lightning.core.spectral import Spectrum

__all__ = ["TUCKER_METHODS", "tucker_saliency"]

TUCKER_METHODS: tuple[str, ...] = tuple(name for name, method in METHOD_TABLE.items() if method.spectrum == "uncentred")
"""Methods :func:`tucker_saliency` computes: those of :data:`~tsm_lightning.core.METHOD_TABLE` that read the
uncentred spectrum, the Tucker view (TSM and MTSM)."""


def _tensorly() -> tuple[Any, Any]:
    """``(tensorly, tensorly.decomposition.tucker)``, or an ``ImportError`` that names the extra to install."""
    try:
        import tensorly
        from tensorly.decomposition import tucker
    except ImportError as err:
        raise ImportError(
            "tucker_saliency needs tensorly, an optional dependency: pip install 'tsm-lightning[tucker]' (or "
            f"pip install tensorly). ({err})"
        ) from err
    return tensorly, tucker


def _resolve_rank(rank: int | Sequence[int] | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if rank is None:
        return shape
    ranks = (rank,) * 3 if isinstance(rank, int) else tuple(int(r) for r in rank)
    if len(ranks) != 3 or any(r < 1 for r in ranks):
        raise ValueError(f"rank must be None, a positive int or (r_c, r_h, r_w), got {rank!r}.")
    return tuple(min(r, s) for r, s in zip(ranks, shape, strict=True))  # type: ignore[return-value]


def tucker_saliency(
    features: Tensor,
    rank: int | Sequence[int] | None = None,
    methods: str | Sequence[str] = TUCKER_METHODS,
    *,
    normalize: bool = False,
    n_iter_max: int = 100,
    tol: float = 1e-8,
) -> dict[str, Tensor]:
    """TSM and MTSM from tensorly's Tucker decomposition (HOOI), one image at a time.

    For each image ``F`` (``C x h x w``) with Tucker decomposition ``core x_0 A1 x_1 A2 x_2 A3``:

    * ``TSM = |sum_c F[c] * A1[c, 0]|``
    * ``MTSM = sum_k ||core[k]||_F * |sum_c F[c] * A1[c, k]| / sum_k ||core[k]||_F``, ``k < r_c``

    This is the paper's computation. It is the slow reference for the fast path and the engine for
    truncated ranks; prefer :func:`~tsm_lightning.core.saliency_maps` for full-rank maps.

    Args:
        features: ``(B, C, h, w)`` feature maps, any floating dtype, any device (computed in float64 there).
        rank: Tucker ranks ``(r_c, r_h, r_w)``; an int is used for every mode; ``None`` is full rank
            ``(C, h, w)``. Ranks are clipped to the feature shape.
        methods: ``"tsm"`` and/or ``"mtsm"``.
        normalize: min-max normalise each map to ``[0, 1]``.
        n_iter_max: maximum HOOI iterations.
        tol: HOOI convergence tolerance on the reconstruction error.

    Returns:
        ``{method: (B, h, w) float32}`` on the features' device.
    """
    check_features(features)
    tl, tucker = _tensorly()
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [name for name in names if name not in TUCKER_METHODS]
    if unknown or not names:
        raise ValueError(f"tucker_saliency computes {TUCKER_METHODS}; got {names}.")
    names = tuple(dict.fromkeys(names))
    _bsz, c, h, w = features.shape
    ranks = _resolve_rank(rank, (c, h, w))
    x = features.detach().to(torch.float64)
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    with tl.backend_context("pytorch"):
        for image in x:  # HOOI is defined per tensor: this loop is the reference path by design.
            core, factors = tucker(image, rank=list(ranks), n_iter_max=n_iter_max, tol=tol, init="svd")
            # The Tucker view as a spectrum: projections P_k = sum_c F[c] A1[c, k] weighted by the core's mode-0
            # slice norms ||core[k]||_F (at full rank, the singular values); each method's own map function reads it.
            spectrum = Spectrum(
                singular_values=torch.linalg.vector_norm(core.reshape(core.shape[0], -1), dim=1)[None],
                projections=torch.einsum("chw,ck->khw", image, factors[0])[None],  # (1, r_c, h, w)
            )
            channel_sum = image.sum(dim=0)[None]
            for name in names:
                out[name].append(METHOD_TABLE[name].fn(spectrum, channel_sum, "singular")[0])
    maps = {name: torch.stack(v).to(torch.float32) for name, v in out.items()}
    if normalize:
        maps = {name: normalize_maps(m) for name, m in maps.items()}
    return maps
