"""Shape statistics of maps (tsm_lightning.metrics.shape), each recomputed by an independent numpy / scipy loop."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from tsm_lightning.metrics import (
    blob_count,
    border_distance,
    connected_components,
    flip_consistency,
    fresh_init_similarity,
    largest_blob_mass,
    mass_spread,
    pearson,
)

STRUCTURE = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def _maps(seed: int, b: int = 6, h: int = 7, w: int = 9) -> torch.Tensor:
    """Random maps with some exact zeros, so thresholds cut them into several blobs."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, w, generator=g, dtype=torch.float64)
    return torch.where(m < 0.3, torch.zeros_like(m), m)


def _reference_blobs(m: np.ndarray, threshold: float, connectivity: int) -> tuple[float, int]:
    """Largest-blob mass share and blob count of one map, with scipy.ndimage.label."""
    mass = np.clip(np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    selected = mass >= threshold * mass.max()
    labels, count = ndimage.label(selected, structure=STRUCTURE[connectivity])
    total = mass.sum()
    if total == 0:
        return 1.0, count
    best = max(mass[labels == k].sum() for k in range(1, count + 1))
    return best / total, count


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.8])
def test_blobs_match_scipy(connectivity, threshold):
    maps = _maps(seed=int(threshold * 10) + connectivity)
    share = largest_blob_mass(maps, threshold, connectivity)
    count = blob_count(maps, threshold, connectivity)
    for i, m in enumerate(maps.numpy()):
        ref_share, ref_count = _reference_blobs(m, threshold, connectivity)
        assert share[i].item() == pytest.approx(ref_share, abs=1e-6)
        assert count[i].item() == ref_count
    assert share.dtype == torch.float32 and share.shape == (maps.shape[0],)


def test_connected_components_partition_matches_scipy():
    selected = _maps(seed=3, b=4, h=11, w=6) > 0.5
    for connectivity in (4, 8):
        labels = connected_components(selected, connectivity)
        for i in range(selected.shape[0]):
            ref, _ = ndimage.label(selected[i].numpy(), structure=STRUCTURE[connectivity])
            ours = labels[i].numpy()
            assert ((ours == 0) == (ref == 0)).all()
            # The same partition: a one-to-one map between our labels and scipy's.
            pairs = {(a, r) for a, r in zip(ours.ravel(), ref.ravel(), strict=True) if r}
            assert len(pairs) == len({a for a, _ in pairs}) == len({r for _, r in pairs})


def test_blobs_hand_made():
    m = torch.zeros(1, 5, 5)
    m[0, 0, 0] = 1.0  # a blob of mass 1
    m[0, 3:5, 3:5] = 0.8  # a blob of mass 3.2, corner-touching nothing
    m[0, 2, 2] = 0.1  # below the threshold: counts in the total only
    assert largest_blob_mass(m).item() == pytest.approx(3.2 / 4.3)
    assert blob_count(m).item() == 2
    snake = torch.zeros(1, 4, 4)
    snake[0, [0, 1, 2, 3, 3, 3], [0, 1, 2, 2, 1, 0]] = 1.0  # diagonal steps: one blob only with 8-connectivity
    assert blob_count(snake, connectivity=4).item() == 3  # (0,0), (1,1), and the L from (2,2) to (3,0)
    assert blob_count(snake, connectivity=8).item() == 1
    assert largest_blob_mass(snake, connectivity=8).item() == pytest.approx(1.0)
    assert largest_blob_mass(torch.zeros(2, 3, 3)).tolist() == [1.0, 1.0]  # all-zero: one blob covering the image
    assert largest_blob_mass(torch.ones(1, 3, 3)).item() == 1.0


def test_blobs_ignore_non_finite_and_negative():
    m = torch.tensor([[[1.0, float("nan"), 0.9], [-5.0, 0.0, float("inf")]]])
    ref, count = _reference_blobs(m[0].numpy(), 0.5, 4)
    assert largest_blob_mass(m).item() == pytest.approx(ref) and blob_count(m).item() == count == 2


def _reference_position(m: np.ndarray) -> tuple[float, float]:
    """Border distance and relative spread of one map, by explicit loops over pixels."""
    h, w = m.shape
    mass = np.clip(np.nan_to_num(m), 0, None)
    p = mass / mass.sum() if mass.sum() > 0 else np.full_like(mass, 1.0 / (h * w))
    border = 0.0
    my = mx = 0.0
    for i in range(h):
        for j in range(w):
            y, x = (i + 0.5) / h, (j + 0.5) / w
            border += p[i, j] * 2 * min(y, 1 - y, x, 1 - x)
            my += p[i, j] * y
            mx += p[i, j] * x
    var = sum(p[i, j] * (((i + 0.5) / h - my) ** 2 + ((j + 0.5) / w - mx) ** 2) for i in range(h) for j in range(w))
    ys = [(i + 0.5) / h for i in range(h)]
    xs = [(j + 0.5) / w for j in range(w)]
    uniform = np.var(ys) + np.var(xs)
    return border, math.sqrt(var / uniform)


def test_border_distance_and_spread_match_loops():
    maps = _maps(seed=7, b=5, h=6, w=10)
    maps[1] = 0.0  # all-zero: treated as uniform
    border, spread = border_distance(maps), mass_spread(maps)
    for i, m in enumerate(maps.numpy()):
        ref_border, ref_spread = _reference_position(m)
        assert border[i].item() == pytest.approx(ref_border, abs=1e-6)
        assert spread[i].item() == pytest.approx(ref_spread, abs=1e-5)
    assert spread[1].item() == pytest.approx(1.0, abs=1e-6)


def test_border_distance_and_spread_hand_made():
    centre = torch.zeros(1, 5, 5)
    centre[0, 2, 2] = 1.0
    assert border_distance(centre).item() == pytest.approx(1.0)
    assert mass_spread(centre).item() == pytest.approx(0.0, abs=1e-6)
    ring = torch.ones(1, 4, 4)
    ring[0, 1:3, 1:3] = 0.0  # only the border pixels: distance (1/8) * 2 = 1/4
    assert border_distance(ring).item() == pytest.approx(0.25)
    corners = torch.zeros(1, 64, 64)
    corners[0, 0, 0] = corners[0, -1, -1] = 1.0  # the most spread a map can be: about sqrt(3)
    assert mass_spread(corners).item() == pytest.approx(math.sqrt(3), rel=0.05)


def test_flip_consistency_and_fresh_similarity():
    maps = _maps(seed=11)
    mirrored = maps.flip(-1)
    assert torch.allclose(flip_consistency(maps, mirrored), torch.ones(maps.shape[0]))  # a perfectly equivariant map
    assert torch.allclose(flip_consistency(maps, maps, flipped_back=True), torch.ones(maps.shape[0]))
    other = _maps(seed=12)
    expected = [
        np.corrcoef(a.ravel(), b[:, ::-1].ravel())[0, 1] for a, b in zip(maps.numpy(), other.numpy(), strict=True)
    ]
    assert flip_consistency(maps, other).tolist() == pytest.approx(expected, abs=1e-6)
    expected = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps.numpy(), other.numpy(), strict=True)]
    assert fresh_init_similarity(maps, other).tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(fresh_init_similarity(maps, other), pearson(maps, other))


def test_shape_errors_say_what_to_pass():
    maps = _maps(seed=1)
    with pytest.raises(ValueError, match="threshold must lie in"):
        largest_blob_mass(maps, threshold=1.5)
    with pytest.raises(ValueError, match="connectivity must be 4"):
        blob_count(maps, connectivity=6)
    with pytest.raises(ValueError, match=r"\(B, H, W\) bool"):
        connected_components((maps > 0.5)[0])
    with pytest.raises(ValueError, match="same shape"):
        fresh_init_similarity(maps, maps[:, :, :4])
    with pytest.raises(ValueError, match="maps"):
        border_distance(maps[0])
