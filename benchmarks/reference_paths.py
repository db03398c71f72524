"""The slow per-image paths the fast batched maps are compared with, written as the original codes do them.

The one reference implementation of the methods: the benchmarks time it and the tests (``tests/core``,
``tests/hardening``; ``tests/conftest.py`` puts this folder on the path) compare the library with it. It shares
nothing with ``tsm_lightning``: loops over images, numpy, tensorly.

* :func:`paper_tsm_mtsm`: the paper's path. For each image, a numpy array and a full-rank
  ``tensorly.decomposition.tucker(act, rank=act.shape)`` with the numpy backend (scoped), then
  ``TSM = |sum_c F[c] * A1[c, 0]|`` and ``MTSM = sum_k ||core[k]||_F |sum_c F[c] * A1[c, k]| / sum_k ||core[k]||_F``.
* :func:`gradcam_eigencam`: pytorch-grad-cam's ``get_2d_projection`` (full-matrices numpy SVD of the centred
  ``(N, C)`` matrix per image) followed by its ReLU and min-max scaling; the sign is not fixed.
* :func:`numpy_multivec_eigencam`: Multivec-EigenCAM with a numpy SVD per image (accuracy reference only).
* :func:`signed_eigencam`: grad-cam's projection with the library's documented sign rule, chosen here from the
  covariance with the channel-sum map; :func:`eigencam_sign_free_error` compares maps with grad-cam's up to sign.
* :func:`svd_tsm_mtsm`: TSM and MTSM from a numpy SVD of the channel unfolding (no tensorly).
* :func:`hooi_tsm`: TSM of a truncated Tucker decomposition by a hand-written HOOI (no tensorly).

Variants for the method study (``localization.py``), kept here and out of the library API:

* :func:`authors_code_tsm`: TSM as the authors' published code computes it, as we read that code (see
  ``../shared/DESIGN.md``): the per-image full-rank Tucker channel factors ``A1`` are stacked into ``(B, C, C)``
  and ``[:, 0]`` is taken, i.e. the first **row** of each ``A1`` (``A1[0, :]``) instead of its first column
  (``A1[:, 0] = u_1``, the paper's text). The map is ``|sum_k F[k] A1[0, k]|``. Its value depends on the SVD's sign
  convention (tensorly flips signs so that each column's largest entry is positive), because the sign of every
  component enters the sum.
* :func:`mtsm_abs_after_sum`: the other reading of MTSM, ``|sum_k s_k P_k| / sum_k s_k`` (absolute value after
  the weighted sum), with tensorly's factors and signs; the library computes ``sum_k s_k |P_k| / sum_k s_k``.

Nothing here imports :mod:`tsm_lightning`; the maps are returned as numpy arrays, min-max normalised.
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorly as tl
from tensorly.decomposition import tucker

__all__ = [
    "authors_code_tsm",
    "eigencam_sign_free_error",
    "gradcam_eigencam",
    "hooi_tsm",
    "minmax",
    "mtsm_abs_after_sum",
    "numpy_multivec_eigencam",
    "paper_tsm_mtsm",
    "signed_eigencam",
    "svd_tsm_mtsm",
    "tucker_factors",
]


def minmax(a: np.ndarray) -> np.ndarray:
    """Min-max normalise one map to ``[0, 1]`` (all zeros for a constant map)."""
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def paper_tsm_mtsm(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TSM and MTSM of each ``(C, h, w)`` image of ``acts`` through a full-rank tensorly Tucker (numpy backend).

    Args:
        acts: ``(B, C, h, w)`` activations (float32 as captured, or float64).

    Returns:
        ``(tsm, mtsm)``, each ``(B, h, w)`` min-max normalised.
    """
    tsm_maps, mtsm_maps = [], []
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # tensorly notes that rank C exceeds min(C, h*w) for the mode-0 SVD; that is what rank=act.shape does.
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        for act in acts:
            core, factors = tucker(act, rank=list(act.shape))
            a1 = factors[0]
            proj = np.abs(np.einsum("chw,ck->khw", act, a1))
            norms = np.sqrt((core.reshape(core.shape[0], -1) ** 2).sum(axis=1))
            tsm_maps.append(minmax(proj[0]))
            mtsm_maps.append(minmax((norms[:, None, None] * proj).sum(axis=0) / norms.sum()))
    return np.stack(tsm_maps), np.stack(mtsm_maps)


def tucker_factors(acts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, the full-rank tensorly Tucker (numpy backend, as the paper runs it): ``(A1, core slice norms)``.

    Args:
        acts: ``(B, C, h, w)`` activations. With ``C > h * w`` the last ``C - h * w`` columns of ``A1`` span the
            null space of the unfolding (an arbitrary basis, as LAPACK returns it) and their core slices are zero.

    Returns:
        One ``(A1 (C, C), norms (C,))`` pair per image.
    """
    out = []
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        for act in acts.astype(np.float64):
            core, factors = tucker(act, rank=list(act.shape))
            out.append((factors[0], np.sqrt((core.reshape(core.shape[0], -1) ** 2).sum(axis=1))))
    return out


def authors_code_tsm(acts: np.ndarray, factors: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """TSM with the first *row* of each stacked channel factor (the authors' code as we read it; module doc).

    Args:
        acts: ``(B, C, h, w)`` activations.
        factors: :func:`tucker_factors` of ``acts`` if already computed.

    Returns:
        ``(B, h, w)`` maps, min-max normalised.
    """
    stacked = np.stack([a1 for a1, _ in factors or tucker_factors(acts)])  # (B, C, C)
    rows = stacked[:, 0]  # (B, C): A1[0, :] of each image
    return np.stack([minmax(np.abs(np.einsum("chw,c->hw", act, row))) for act, row in zip(acts, rows, strict=True)])


def mtsm_abs_after_sum(acts: np.ndarray, factors: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """``|sum_k s_k P_k| / sum_k s_k`` with ``P_k = sum_c F[c] A1[c, k]`` (tensorly's factors and signs).

    Args:
        acts: ``(B, C, h, w)`` activations.
        factors: :func:`tucker_factors` of ``acts`` if already computed.

    Returns:
        ``(B, h, w)`` maps, min-max normalised.
    """
    out = []
    for act, (a1, norms) in zip(acts.astype(np.float64), factors or tucker_factors(acts), strict=True):
        proj = np.einsum("chw,ck->khw", act, a1)
        out.append(minmax(np.abs((norms[:, None, None] * proj).sum(axis=0)) / norms.sum()))
    return np.stack(out)


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``get_2d_projection``: first principal component of each image's centred pixels."""
    activation_batch = activation_batch.copy()  # grad-cam zeroes NaNs in place in its own batch
    activation_batch[np.isnan(activation_batch)] = 0
    projections = []
    for activations in activation_batch:
        reshaped = activations.reshape(activations.shape[0], -1).transpose()
        reshaped = reshaped - reshaped.mean(axis=0)
        _u, _s, vt = np.linalg.svd(reshaped, full_matrices=True)
        projection = reshaped @ vt[0, :]
        projections.append(projection.reshape(activations.shape[1:]))
    return np.asarray(projections, dtype=activation_batch.dtype)


def gradcam_eigencam(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's EigenCAM maps: projection, ReLU, min-max per image (sign arbitrary).

    Args:
        acts: ``(B, C, h, w)`` activations.

    Returns:
        ``(maps, projections)``: ``(B, h, w)`` maps in ``[0, 1]`` and the signed projections before the ReLU
        (for comparisons up to sign).
    """
    projections = get_2d_projection(acts)
    cams = np.maximum(projections, 0)
    return np.stack([minmax(cam) for cam in cams]), projections


def numpy_multivec_eigencam(acts: np.ndarray) -> np.ndarray:
    """``sum_k s_k |Xc^T v_k| / sum_k s_k`` per image with a numpy SVD, min-max normalised."""
    out = []
    for act in acts:
        c, h, w = act.shape
        m = act.reshape(c, -1).transpose()
        m = m - m.mean(axis=0)
        _u, s, vt = np.linalg.svd(m, full_matrices=False)
        proj = np.abs(m @ vt.T)
        out.append(minmax((proj * s).sum(axis=1) / s.sum()).reshape(h, w))
    return np.stack(out)


def signed_eigencam(acts: np.ndarray) -> np.ndarray:
    """EigenCAM with the documented sign rule: the pre-ReLU projection correlates positively with the channel sum.

    Args:
        acts: ``(B, C, h, w)`` activations.

    Returns:
        ``(B, h, w)`` maps, min-max normalised.
    """
    out = []
    for act, proj in zip(acts, get_2d_projection(acts), strict=True):
        channel_sum = act.sum(axis=0)
        sign = 1.0 if ((proj - proj.mean()) * (channel_sum - channel_sum.mean())).sum() >= 0 else -1.0
        out.append(minmax(np.maximum(sign * proj, 0)))
    return np.stack(out)


def eigencam_sign_free_error(maps: np.ndarray, acts: np.ndarray) -> float:
    """Largest ``|maps - grad-cam's EigenCAM|`` over images, each image compared under its better sign.

    Args:
        maps: ``(B, h, w)`` min-max normalised EigenCAM maps to check.
        acts: ``(B, C, h, w)`` the activations they were computed from.
    """
    worst = 0.0
    for got, proj in zip(maps, get_2d_projection(acts), strict=True):
        err = min(np.abs(got - minmax(np.maximum(sign * proj, 0))).max() for sign in (1.0, -1.0))
        worst = max(worst, float(err))
    return worst


def svd_tsm_mtsm(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TSM ``|u_1^T X|`` and MTSM ``sum_k s_k |u_k^T X| / sum_k s_k`` from numpy's SVD of the channel unfolding.

    Args:
        acts: ``(B, C, h, w)`` activations.

    Returns:
        ``(tsm, mtsm)``, each ``(B, h, w)`` min-max normalised.
    """
    tsm_maps, mtsm_maps = [], []
    for act in acts:
        c, h, w = act.shape
        u, s, _ = np.linalg.svd(act.reshape(c, -1), full_matrices=False)
        proj = np.abs(u.T @ act.reshape(c, -1))  # (r, N)
        tsm_maps.append(minmax(proj[0]).reshape(h, w))
        mtsm_maps.append(minmax((s[:, None] * proj).sum(axis=0) / s.sum()).reshape(h, w))
    return np.stack(tsm_maps), np.stack(mtsm_maps)


def hooi_tsm(acts: np.ndarray, rank: tuple[int, int, int], iterations: int = 200) -> np.ndarray:
    """TSM of a truncated Tucker decomposition by a hand-written HOOI (HOSVD start, alternating SVDs).

    Args:
        acts: ``(B, C, h, w)`` activations.
        rank: Tucker ranks ``(r_c, r_h, r_w)``.
        iterations: HOOI sweeps.

    Returns:
        ``(B, h, w)`` raw maps ``|sum_c F[c] U_0[c, 0]|``.
    """

    def unfold(t: np.ndarray, mode: int) -> np.ndarray:
        return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)

    def leading(m: np.ndarray, r: int) -> np.ndarray:
        return np.linalg.svd(m, full_matrices=False)[0][:, :r]

    out = []
    for act in acts:
        factors = [leading(unfold(act, mode), rank[mode]) for mode in range(3)]
        for _ in range(iterations):
            for mode in range(3):
                y = act
                for other in range(3):
                    if other != mode:
                        y = np.moveaxis(np.tensordot(factors[other].T, np.moveaxis(y, other, 0), axes=1), 0, other)
                factors[mode] = leading(unfold(y, mode), rank[mode])
        out.append(np.abs(np.einsum("chw,c->hw", act, factors[0][:, 0])))
    return np.stack(out)
