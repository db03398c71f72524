"""Independent per-image reference implementations, written the straightforward way (loops, numpy, tensorly).

They follow the papers' and pytorch-grad-cam's code paths and share nothing with ``tsm_lightning.core``.
"""

from __future__ import annotations

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tucker


def _minmax(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def gradcam_eigencam(features: torch.Tensor) -> list[np.ndarray]:
    """pytorch-grad-cam's EigenCAM per image: centred SVD projection, ReLU, min-max (sign NOT fixed)."""
    out = []
    for act in features.double().numpy():
        c, h, w = act.shape
        reshaped = act.reshape(c, -1).transpose()
        reshaped = reshaped - reshaped.mean(axis=0)
        _, _, vt = np.linalg.svd(reshaped, full_matrices=True)
        projection = (reshaped @ vt[0, :]).reshape(h, w)
        out.append(projection)
    return out


def multivec_eigencam_reference(features: torch.Tensor) -> np.ndarray:
    """sum_k s_k |Xc^T v_k| / sum_k s_k per image, numpy SVD, min-max normalised."""
    out = []
    for act in features.double().numpy():
        c, h, w = act.shape
        m = act.reshape(c, -1).transpose()
        m = m - m.mean(axis=0)
        _, s, vt = np.linalg.svd(m, full_matrices=False)
        proj = np.abs(m @ vt.T)  # (N, r)
        out.append(_minmax((proj * s).sum(axis=1) / s.sum()).reshape(h, w))
    return np.stack(out)


def tensorly_tsm_mtsm(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The paper's path: full-rank tensorly Tucker per image (numpy backend), min-max normalised maps."""
    tsm_maps, mtsm_maps = [], []
    with tl.backend_context("numpy"):
        for act in features.double().numpy():
            core, factors = tucker(act, rank=list(act.shape), init="svd", n_iter_max=100, tol=1e-10)
            a1 = factors[0]
            proj = np.abs(np.einsum("chw,ck->khw", act, a1))
            norms = np.sqrt((core.reshape(core.shape[0], -1) ** 2).sum(axis=1))
            tsm_maps.append(_minmax(proj[0]))
            mtsm_maps.append(_minmax((norms[:, None, None] * proj).sum(axis=0) / norms.sum()))
    return np.stack(tsm_maps), np.stack(mtsm_maps)


def eigencam_up_to_sign_error(fast: torch.Tensor, features: torch.Tensor) -> float:
    """Max abs difference between normalised fast EigenCAM maps and the grad-cam reference, best sign."""
    worst = 0.0
    for got, proj in zip(fast.double().numpy(), gradcam_eigencam(features), strict=True):
        err = min(np.abs(got - _minmax(np.maximum(sign * proj, 0))).max() for sign in (1.0, -1.0))
        worst = max(worst, float(err))
    return worst


def signed_eigencam(features: torch.Tensor) -> np.ndarray:
    """EigenCAM with the documented sign rule, per image: the pre-ReLU projection correlates positively with the
    channel-sum map (numpy SVD; the sign is chosen here from the covariance, independently of the fast path)."""
    out = []
    for act, proj in zip(features.double().numpy(), gradcam_eigencam(features), strict=True):
        channel_sum = act.sum(axis=0)
        sign = 1.0 if ((proj - proj.mean()) * (channel_sum - channel_sum.mean())).sum() >= 0 else -1.0
        out.append(_minmax(np.maximum(sign * proj, 0)))
    return np.stack(out)


def svd_tsm_mtsm(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """TSM ``|u_1^T X|`` and MTSM ``sum_k s_k |u_k^T X| / sum_k s_k`` from numpy's SVD of the channel unfolding."""
    tsm_maps, mtsm_maps = [], []
    for act in features.double().numpy():
        c, h, w = act.shape
        u, s, _ = np.linalg.svd(act.reshape(c, -1), full_matrices=False)
        proj = np.abs(u.T @ act.reshape(c, -1))  # (r, N)
        tsm_maps.append(_minmax(proj[0]).reshape(h, w))
        mtsm_maps.append(_minmax((s[:, None] * proj).sum(axis=0) / s.sum()).reshape(h, w))
    return np.stack(tsm_maps), np.stack(mtsm_maps)


def hooi_tsm(features: torch.Tensor, rank: tuple[int, int, int], iterations: int = 200) -> np.ndarray:
    """TSM of a truncated Tucker decomposition by a hand-written HOOI (numpy; HOSVD start, alternating SVDs).

    Returns raw ``|sum_c F[c] U_0[c, 0]|`` maps, shape ``(B, h, w)``.
    """

    def unfold(t: np.ndarray, mode: int) -> np.ndarray:
        return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)

    def leading(m: np.ndarray, r: int) -> np.ndarray:
        return np.linalg.svd(m, full_matrices=False)[0][:, :r]

    out = []
    for act in features.double().numpy():
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
