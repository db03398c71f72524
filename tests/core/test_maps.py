import warnings

import numpy as np
import pytest
import torch
from conftest import blob_features
from reference_paths import eigencam_sign_free_error, numpy_multivec_eigencam, paper_tsm_mtsm, signed_eigencam

from tsm_lightning import METHODS, eigencam, mtsm, multivec_eigencam, saliency_maps, tsm
from tsm_lightning.core import normalize_maps

SHAPES = [
    (3, 64, 5, 5),  # C > h*w: spatial Gram
    (3, 8, 5, 5),  # C < h*w: channel Gram
    (1, 20, 3, 7),  # batch of one, non-square
    (2, 49, 7, 7),  # C == h*w
]


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")
@pytest.mark.parametrize("shape", SHAPES)
def test_tsm_and_mtsm_match_tensorly_tucker(shape):
    feats = torch.randn(*shape).relu() + 0.01 * torch.rand(*shape)
    maps = saliency_maps(feats, ["tsm", "mtsm"])
    ref_tsm, ref_mtsm = paper_tsm_mtsm(feats.double().numpy())
    assert np.abs(maps["tsm"].numpy() - ref_tsm).max() <= 1e-4
    assert np.abs(maps["mtsm"].numpy() - ref_mtsm).max() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_eigencam_matches_gradcam_up_to_sign(shape):
    feats = torch.randn(*shape)
    maps = saliency_maps(feats, "eigencam")
    assert eigencam_sign_free_error(maps["eigencam"].double().numpy(), feats.double().numpy()) <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_multivec_eigencam_matches_numpy_svd(shape):
    feats = torch.randn(*shape)
    maps = saliency_maps(feats, "multivec_eigencam")
    assert np.abs(maps["multivec_eigencam"].numpy() - numpy_multivec_eigencam(feats.double().numpy())).max() <= 1e-4


def test_saliency_maps_decomposes_once(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def counting(a, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    feats = torch.randn(5, 16, 6, 6)
    maps = saliency_maps(feats)
    assert list(maps) == list(METHODS)
    # One batched float64 eigh for the uncentred and the centred Gram of all 5 images together.
    assert calls == [(10, 16, 16)]


def test_single_method_functions_equal_saliency_maps():
    feats = torch.randn(4, 40, 6, 6)
    together = saliency_maps(feats, normalize=False)
    for fn in (eigencam, tsm, multivec_eigencam, mtsm):
        alone = fn(feats)
        assert alone.dtype == torch.float32 and alone.shape == (4, 6, 6)
        assert (alone >= 0).all()
        torch.testing.assert_close(alone, together[fn.__name__], rtol=1e-5, atol=1e-6)


def test_raw_maps_are_in_feature_units():
    feats = torch.randn(2, 30, 5, 5)
    assert torch.allclose(tsm(feats * 10.0), tsm(feats) * 10.0, rtol=1e-4)
    # TSM is the norm of the first projection: its energy equals the top singular value squared.
    s1 = torch.linalg.svdvals(feats.reshape(2, 30, 25).double())[:, 0]
    assert torch.allclose(tsm(feats).double().pow(2).sum(dim=(1, 2)), s1**2, rtol=1e-4)


def test_eigencam_sign_rule_on_many_random_maps():
    # The raw SVD sign is arbitrary: without the rule about half of these maps would come out inverted.
    feats = torch.randn(64, 12, 5, 5) + torch.rand(64, 12, 1, 1)
    got = saliency_maps(feats, "eigencam")["eigencam"].double().numpy()
    assert np.abs(got - signed_eigencam(feats.double().numpy())).max() <= 1e-4


def test_maps_are_computed_in_full_precision_inside_autocast():
    feats = torch.randn(4, 64, 7, 7)
    plain = saliency_maps(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = saliency_maps(feats)
    assert all(torch.equal(plain[name], mixed[name]) for name in plain)


def test_eigencam_sign_follows_channel_sum():
    feats = blob_features(batch=4, channels=32, size=7)
    maps = eigencam(feats)
    channel_sum = feats.sum(dim=1)
    for b in range(4):
        peak = np.unravel_index(int(maps[b].argmax()), (7, 7))
        assert channel_sum[b][peak] > channel_sum[b].mean()
    # The rule is deterministic and independent of the eigensolver's sign: the pre-ReLU map of -F is -P(F),
    # so eigencam(-F) lights up where eigencam(F) is zero.
    flipped = eigencam(-feats)
    assert ((flipped > 0) & (maps > 0)).sum() == 0


def test_mtsm_with_one_component_is_tsm():
    feats = torch.randn(3, 50, 6, 6)
    assert torch.allclose(mtsm(feats, num_components=1), tsm(feats), rtol=1e-5, atol=1e-6)
    # Multivec-EigenCAM with K=1 is |P^c_1|: the TSM of the centred features.
    centred = feats - feats.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(multivec_eigencam(feats, num_components=1), tsm(centred), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["singular", "variance", "uniform"])
def test_weightings_match_explicit_formula(weighting):
    feats = torch.randn(2, 12, 4, 4)
    got = mtsm(feats, weighting=weighting)
    x = feats.reshape(2, 12, 16).double()
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    proj = (u.transpose(1, 2) @ x).abs()
    w = {"singular": s, "variance": s**2, "uniform": torch.ones_like(s)}[weighting]
    want = (w[:, :, None] * proj).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(got, want.reshape(2, 4, 4).float(), rtol=1e-4, atol=1e-5)


def test_num_components_truncates_the_sum():
    feats = torch.randn(2, 30, 5, 5)
    x = feats.reshape(2, 30, 25).double()
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    proj = (u.transpose(1, 2) @ x).abs()[:, :3]
    want = (s[:, :3, None] * proj).sum(1) / s[:, :3].sum(1, keepdim=True)
    torch.testing.assert_close(mtsm(feats, num_components=3), want.reshape(2, 5, 5).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    feats = torch.randn(3, 64, 7, 7).relu()
    ref = saliency_maps(feats)
    got = saliency_maps(feats.to(dtype))
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-5}[dtype]
    for name in METHODS:
        assert got[name].dtype == torch.float32
        assert torch.isfinite(got[name]).all()
        if dtype != torch.bfloat16 or name in ("tsm", "mtsm"):
            assert (got[name] - ref[name]).abs().max() <= tol, name


def test_nonfinite_images_get_zero_maps_and_others_are_unchanged():
    feats = torch.randn(4, 16, 5, 5)
    clean = saliency_maps(feats)
    feats[1, 3, 2, 2] = float("nan")
    feats[3, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"image\(s\) \[1, 3\]"):
        maps = saliency_maps(feats)
    for name in METHODS:
        assert torch.isfinite(maps[name]).all()
        assert (maps[name][[1, 3]] == 0).all()
        torch.testing.assert_close(maps[name][[0, 2]], clean[name][[0, 2]])


def test_zero_and_constant_features_give_zero_maps_without_nan():
    for feats in (torch.zeros(2, 8, 4, 4), torch.ones(2, 8, 4, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            raw = saliency_maps(feats, normalize=False)
            norm = saliency_maps(feats)
        for name in METHODS:
            assert torch.isfinite(raw[name]).all() and torch.isfinite(norm[name]).all()
        # Centred methods see nothing in constant-over-space channels.
        assert (raw["eigencam"].abs() < 1e-5).all() and (norm["eigencam"] == 0).all()
    assert (saliency_maps(torch.zeros(2, 8, 4, 4))["tsm"] == 0).all()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_are_scale_invariant(scale):
    feats = torch.randn(2, 40, 6, 6)
    ref = saliency_maps(feats)
    got = saliency_maps(feats * scale)
    for name in METHODS:
        assert (got[name] - ref[name]).abs().max() < 1e-4


def test_float16_extremes_do_not_overflow():
    feats = (torch.rand(2, 256, 7, 7) * 60000).half()
    maps = saliency_maps(feats, normalize=False)
    assert all(torch.isfinite(m).all() for m in maps.values())


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid methods are \('eigencam', 'tsm', 'multivec_eigencam', 'mtsm'\)"):
        saliency_maps(torch.randn(1, 4, 3, 3), ["tsm", "gradcam"])
    with pytest.raises(ValueError, match="at least one"):
        saliency_maps(torch.randn(1, 4, 3, 3), [])


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        (torch.randn(4, 3, 3), ValueError, "add a batch dimension"),
        (torch.randn(2, 4, 3, 3, 1), ValueError, r"\(B, C, h, w\)"),
        (torch.ones(1, 4, 3, 3, dtype=torch.int64), TypeError, "floating-point"),
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.randn(0, 4, 3, 3), ValueError, "empty"),
    ],
)
def test_bad_features_raise_clearly(features, error, match):
    with pytest.raises(error, match=match):
        saliency_maps(features)


def test_bad_options_raise_clearly():
    feats = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="weighting"):
        saliency_maps(feats, weighting="log")
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match=rf"num_components must be a positive integer .* or None .*got {bad!r}"):
            saliency_maps(feats, num_components=bad)


def test_normalized_maps_are_in_unit_range_and_hit_both_ends():
    maps = saliency_maps(torch.randn(6, 32, 7, 7))
    for m in maps.values():
        assert m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m.amax(dim=(1, 2)), torch.ones(6))
        assert torch.allclose(normalize_maps(m), m)


def test_gram_dtype_guards_against_tf32_off_the_cpu():
    from tsm_lightning.core.spectral import gram_dtype_for

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert gram_dtype_for(torch.empty(1, 2, 2, 2, dtype=dtype)) == torch.float32
        # Any accelerator (shown with the meta device, which has no kernels) takes the Gram in float64.
        assert gram_dtype_for(torch.empty(1, 2, 2, 2, dtype=dtype, device="meta")) == torch.float64
    assert gram_dtype_for(torch.empty(1, 2, 2, 2, dtype=torch.float64)) == torch.float64
    assert gram_dtype_for(torch.empty(1, 2048, 7, 7)) == torch.float64  # sums over 2048 channels: float64 Gram
    assert gram_dtype_for(torch.empty(1, 512, 7, 7)) == torch.float32


def test_matmul_precision_setting_does_not_change_cpu_maps():
    feats = torch.randn(4, 64, 7, 7)
    ref = saliency_maps(feats)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = saliency_maps(feats)
    finally:
        torch.set_float32_matmul_precision(previous)
    for name in METHODS:
        assert (got[name] - ref[name]).abs().max() <= 1e-4


def test_maps_leave_no_thread_behind():
    # A persistent thread pool for the eigh made every later LAPACK call of the process ~5x slower while it lived:
    # computing maps must not change the process the user trains in.
    import threading

    before = threading.active_count()
    saliency_maps(torch.randn(40, 64, 5, 5))
    saliency_maps(torch.randn(20, 8, 6, 6))
    assert threading.active_count() == before


@pytest.mark.parametrize("shape", [(512, 14, 14), (256, 28, 28), (2048, 7, 7)])
def test_precision_chosen_per_size_keeps_parity_with_float64(shape):
    # float32 features: float32 Gram, float64 eigh, float32 projections where N > C (the (256, 28, 28) path).
    # float64 features: float64 everywhere. The normalised maps must agree to 1e-4 at every grid size.
    g = torch.Generator().manual_seed(sum(shape))
    feats = torch.relu(torch.randn(2, *shape, generator=g) + 2 * torch.rand(2, shape[0], 1, 1, generator=g))
    fast, exact = saliency_maps(feats), saliency_maps(feats.double())
    for name in METHODS:
        assert (fast[name].double() - exact[name].double()).abs().max() <= 1e-4, name
