import numpy as np
import pytest
import tensorly as tl
import torch
from reference_paths import hooi_tsm, svd_tsm_mtsm

from tsm_lightning import saliency_maps, tucker_saliency

pytestmark = pytest.mark.filterwarnings("ignore:Trying to compute SVD")


@pytest.mark.parametrize("shape", [(2, 24, 4, 4), (2, 6, 4, 5)])
def test_full_rank_equals_fast_path(shape):
    feats = torch.randn(*shape).relu() + 0.01
    slow = tucker_saliency(feats, normalize=True)
    fast = saliency_maps(feats, ["tsm", "mtsm"])
    for name in ("tsm", "mtsm"):
        assert (slow[name] - fast[name]).abs().max() <= 1e-4


def test_truncated_rank_matches_a_hand_written_hooi():
    feats = torch.randn(2, 16, 6, 6).relu()
    got = tucker_saliency(feats, rank=(4, 3, 3), methods="tsm", n_iter_max=200, tol=1e-12)["tsm"]
    want = hooi_tsm(feats.double().numpy(), (4, 3, 3))
    assert np.abs(got.numpy() - want).max() <= 1e-4 * want.max()


def test_truncated_rank_differs_from_full_rank():
    torch.manual_seed(3)
    feats = torch.randn(1, 16, 8, 8)
    full = tucker_saliency(feats, normalize=True)["mtsm"]
    low = tucker_saliency(feats, rank=(2, 2, 2), normalize=True)["mtsm"]
    assert (full - low).abs().max() > 1e-2
    assert low.shape == (1, 8, 8) and low.dtype == torch.float32


def test_backend_is_scoped():
    before = tl.get_backend()
    tucker_saliency(torch.randn(1, 4, 3, 3))
    assert tl.get_backend() == before


@pytest.mark.parametrize("shape", [(2, 10, 3, 3), (1, 4, 3, 5)])
def test_full_rank_tucker_path_matches_numpy_svd(shape):
    feats = torch.randn(*shape)
    got = tucker_saliency(feats, normalize=True)
    ref_tsm, ref_mtsm = svd_tsm_mtsm(feats.double().numpy())
    assert np.abs(got["tsm"].numpy() - ref_tsm).max() <= 1e-4
    assert np.abs(got["mtsm"].numpy() - ref_mtsm).max() <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"rank": (1, 2)}, "rank"), ({"methods": "eigencam"}, "tucker_saliency")]
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tucker_saliency(torch.randn(1, 4, 3, 3), **kwargs)
