import pytest
import torch

from tsm_lightning.core import normalize_maps, upsample_maps


def test_normalize_per_image_min_max():
    maps = torch.stack([torch.arange(9.0).reshape(3, 3), -2 * torch.arange(9.0).reshape(3, 3)])
    out = normalize_maps(maps)
    assert torch.allclose(out[0], torch.arange(9.0).reshape(3, 3) / 8)
    assert torch.allclose(out[1], 1 - torch.arange(9.0).reshape(3, 3) / 8)


def test_normalize_constant_and_nonfinite_maps():
    maps = torch.stack([torch.full((4, 4), 5.0), torch.zeros(4, 4), torch.full((4, 4), 1e30)])
    assert (normalize_maps(maps) == 0).all()
    bad = torch.tensor([[[float("nan"), 1.0], [2.0, float("inf")]]])
    out = normalize_maps(bad)
    assert torch.isfinite(out).all() and out.max() == 1


def test_normalize_returns_float32():
    assert normalize_maps(torch.rand(2, 3, 3, dtype=torch.float64)).dtype == torch.float32
    assert normalize_maps(torch.rand(2, 3, 3).half()).dtype == torch.float32


def test_upsample_shape_range_and_dtype():
    maps = normalize_maps(torch.rand(2, 7, 7))
    up = upsample_maps(maps, (56, 40))
    assert up.shape == (2, 56, 40) and up.dtype == torch.float32
    assert up.min() >= 0 and up.max() <= 1
    assert upsample_maps(maps, 14).shape == (2, 14, 14)
    # A constant map stays constant.
    assert torch.allclose(upsample_maps(torch.ones(1, 3, 3), 9), torch.ones(1, 9, 9))


@pytest.mark.parametrize("bad", [torch.rand(7, 7), torch.rand(1, 1, 7, 7), torch.ones(1, 3, 3, dtype=torch.int32)])
def test_bad_maps_raise(bad):
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        normalize_maps(bad)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        upsample_maps(bad, 8)


def test_bad_size_raises():
    with pytest.raises(ValueError, match="size"):
        upsample_maps(torch.rand(1, 3, 3), (0, 4))
