"""Map complexity: entropy and Gini sparseness of each map seen as a distribution over pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsm_lightning.metrics._common import flat, out

__all__ = ["gini", "map_entropy"]


def map_entropy(maps: Tensor) -> Tensor:
    """Normalised Shannon entropy of each map seen as a distribution over pixels.

    ``p = m / sum(m)``, ``entropy = -sum_i p_i log p_i / log N`` with ``N = H * W`` and ``0 log 0 = 0``: the
    entropy relative to the uniform map's ``log N``.

    Range ``[0, 1]``: 1 for a uniform map, 0 for a map with all its mass on one pixel. Lower means a simpler, more
    focused map; neither direction is better in itself (a focused map can be focused on the wrong thing). A
    constant map and an all-zero map (no preference for any pixel) both give 1; a one-pixel map gives 1.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).

    Returns:
        ``(B,)`` float32 entropies.
    """
    mass = flat(maps).clamp_min(0)
    n = mass.shape[1]
    if n == 1:
        return out(torch.ones(mass.shape[0]), maps)
    total = mass.sum(dim=1, keepdim=True)
    p = mass / torch.where(total > 0, total, torch.ones_like(total))
    h = -torch.special.xlogy(p, p).sum(dim=1) / math.log(n)
    h = torch.where(total[:, 0] > 0, h, torch.ones_like(h))
    return out(h.clamp(0.0, 1.0), maps)


def gini(maps: Tensor) -> Tensor:
    """Gini sparseness of each map (Hurley & Rickard's Gini index, rescaled to reach 1).

    With the map's values sorted ascending, ``c_1 <= ... <= c_N``:
    ``G = 1 - 2 * sum_k (c_k / sum(c)) * (N - k + 1/2) / N``, reported as ``G * N / (N - 1)`` so that a map with
    all its mass on one pixel scores exactly 1.

    Range ``[0, 1]``: 0 for a uniform map (and for an all-zero map, by convention), 1 for a one-pixel map. Higher
    means sparser; neither direction is better in itself. A ``1 x 1`` map gives 0.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).

    Returns:
        ``(B,)`` float32 Gini indices.
    """
    mass = flat(maps).clamp_min(0)
    n = mass.shape[1]
    if n == 1:
        return out(torch.zeros(mass.shape[0]), maps)
    c = mass.sort(dim=1).values
    total = c.sum(dim=1)
    k = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    weights = (n - k + 0.5) / n
    g = 1 - 2 * (c * weights).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    g = torch.where(total > 0, g * n / (n - 1), torch.zeros_like(g))
    return out(g.clamp(0.0, 1.0), maps)
