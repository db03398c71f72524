"""Map-free baselines for the localization study: what a map scores without looking at any network.

* :func:`centre_prior`: a Gaussian bump at the image centre (sigma a quarter of the side): objects near the centre
  are found by it, and a dataset that places objects there rewards any blurry map.
* :func:`colour_contrast`: each pixel's RGB distance from the image's median colour, blurred: the filter-free
  shortcut of a dataset whose objects differ in colour from their background.
* the random map is :func:`tsm_lightning.metrics.random_maps` (smooth noise, fixed seed).

All return ``(B, H, W)`` maps in ``[0, 1]``; they take images in ``[0, 1]`` (undo the input normalisation first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tsm_lightning.core import normalize_maps

__all__ = ["centre_prior", "colour_contrast"]


def centre_prior(like: Tensor, sigma: float = 0.25) -> Tensor:
    """``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance to the centre in units of the side; ``like`` is (B, H, W)."""
    b, h, w = like.shape
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    bump = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return normalize_maps(bump.expand(b, h, w).contiguous()).to(like.device)


def colour_contrast(images: Tensor, blur: int = 5) -> Tensor:
    """Per-pixel L2 distance of the colour from the image's median colour, box-blurred over ``blur`` pixels.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        blur: side of the box filter (odd).

    Returns:
        ``(B, H, W)`` maps in ``[0, 1]``.
    """
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    distance = (images - median).pow(2).sum(dim=1, keepdim=True).sqrt()
    smooth = F.avg_pool2d(distance, blur, stride=1, padding=blur // 2, count_include_pad=False)
    return normalize_maps(smooth[:, 0])
