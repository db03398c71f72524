"""The study's reference variants and baselines against direct per-image computations."""

import numpy as np
import pytest
import torch
from baselines import centre_prior, colour_contrast
from reference_paths import authors_code_tsm, gradcam_eigencam, minmax, mtsm_abs_after_sum

from tsm_lightning import saliency_maps

pytestmark = pytest.mark.filterwarnings("ignore:Trying to compute SVD")


def _acts(seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.maximum(g.standard_normal((3, 6, 4, 5)), 0) + 0.01  # C = 6 <= h * w = 20


def test_authors_code_tsm_uses_the_first_row_of_the_channel_factor():
    acts = _acts()
    got = authors_code_tsm(acts)
    for act, m in zip(acts, got, strict=True):
        u = np.linalg.svd(act.reshape(6, -1), full_matrices=False)[0]
        u = u * np.sign(u[np.abs(u).argmax(axis=0), np.arange(6)])  # tensorly's sign: largest entry positive
        row = u[0, :]  # first ROW: the literal variant
        assert np.abs(m - minmax(np.abs(np.einsum("chw,c->hw", act, row)))).max() < 1e-6
        column = minmax(np.abs(np.einsum("chw,c->hw", act, u[:, 0])))  # the paper's text: first column
        assert np.abs(m - column).max() > 1e-2


def test_mtsm_abs_after_sum_is_the_other_reading():
    acts = _acts(1)
    got = mtsm_abs_after_sum(acts)
    ours = saliency_maps(torch.from_numpy(acts), "mtsm")["mtsm"].double().numpy()
    for act, m, mine in zip(acts, got, ours, strict=True):
        u, s, _ = np.linalg.svd(act.reshape(6, -1), full_matrices=False)
        u = u * np.sign(u[np.abs(u).argmax(axis=0), np.arange(6)])
        signed = (s[:, None] * (u.T @ act.reshape(6, -1))).sum(axis=0)
        assert np.abs(m - minmax(np.abs(signed) / s.sum()).reshape(4, 5)).max() < 1e-6
        assert np.abs(m - mine).max() > 1e-2  # not the library's sum of absolute values


def test_gradcam_eigencam_is_unsigned():
    acts = _acts(2)
    maps, projections = gradcam_eigencam(acts)
    for m, p in zip(maps, projections, strict=True):
        assert np.abs(m - minmax(np.maximum(p, 0))).max() < 1e-6


def test_baselines():
    prior = centre_prior(torch.zeros(2, 9, 9))
    assert prior.shape == (2, 9, 9) and prior[0, 4, 4] == 1 and prior[0, 0, 0] == 0
    images = torch.full((1, 3, 16, 16), 0.2)
    images[0, :, 4:8, 10:14] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    contrast = colour_contrast(images, blur=3)
    peak = np.unravel_index(int(contrast[0].argmax()), (16, 16))
    assert 4 <= peak[0] < 8 and 10 <= peak[1] < 14
