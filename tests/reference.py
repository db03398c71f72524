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
