"""Property-based checks of the core over shapes, dtypes and pathological values."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_paths import eigencam_sign_free_error, numpy_multivec_eigencam

from tsm_lightning import METHODS, saliency_maps

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def feature_batches(draw):
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 12))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(2 if h == 1 else 1, 6))  # 1xN and Nx1 included, never 1x1
    kind = draw(st.sampled_from(["normal", "relu", "constant", "zero", "huge", "tiny"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
    elif kind == "constant":
        x = torch.full_like(x, 3.0)
    elif kind == "zero":
        x = torch.zeros_like(x)
    elif kind == "huge":
        x = x * 1e30
    elif kind == "tiny":
        x = x * 1e-30
    return x, kind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=feature_batches(), dtype=st.sampled_from(DTYPES))
def test_maps_are_finite_in_range_and_shaped(batch, dtype):
    x, kind = batch
    if dtype in (torch.float16, torch.bfloat16) and kind in ("huge", "tiny"):
        x = x / x.abs().amax().clamp_min(1e-300) * 1e3  # in range of the half types
    feats = x.to(dtype)
    maps = saliency_maps(feats)
    raw = saliency_maps(feats, normalize=False)
    b, _, h, w = feats.shape
    for name in METHODS:
        for m in (maps[name], raw[name]):
            assert m.shape == (b, h, w) and m.dtype == torch.float32
            assert torch.isfinite(m).all()
            assert (m >= 0).all()
        assert maps[name].max() <= 1
    if kind in ("normal", "relu") and dtype == torch.float64:
        # Where the leading component is well separated, the maps equal the per-image reference.
        xs = x.reshape(b, x.shape[1], -1)
        s = torch.linalg.svdvals(xs - xs.mean(dim=2, keepdim=True))
        gap_ok = bool(((s[:, 0] - s[:, 1]) > 1e-3 * s[:, 0]).all()) if s.shape[1] > 1 else True
        if gap_ok:
            assert eigencam_sign_free_error(maps["eigencam"].double().numpy(), feats.double().numpy()) <= 1e-4
        mv = raw["multivec_eigencam"].reshape(b, -1)
        spans = mv.amax(dim=1) - mv.amin(dim=1)
        if bool((spans > 1e-4 * mv.amax(dim=1)).all()):  # a flat map's min-max scaling only amplifies rounding
            ref = numpy_multivec_eigencam(feats.double().numpy())
            assert np.abs(maps["multivec_eigencam"].numpy() - ref).max() <= 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_values_in_every_dtype(bad, dtype):
    x = torch.randn(3, 5, 4, 4).to(dtype)
    x[1, 2, 1, 1] = bad
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        maps = saliency_maps(x)
    for m in maps.values():
        assert torch.isfinite(m).all() and (m[1] == 0).all()
