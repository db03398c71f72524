"""Localization against known object masks: pointing game, energy-in-mask, IoU of the thresholded map.

Masks are ``(B, H, W)`` (or ``(B, 1, H, W)``) bool, integer or float tensors, inside where ``> 0.5``; masks of another
size than the maps are resized to the maps' size by nearest neighbour, never the maps to the masks. Every metric is
NaN for an empty mask (undefined, excluded from means by :func:`~tsm_lightning.metrics.summarize`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsm_lightning.checks import prepare_masks
from tsm_lightning.metrics._common import flat, out

__all__ = ["energy_in_mask", "localization_metrics", "mask_iou", "pointing_game"]


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game: is the map's maximum inside the mask?

    ``hit = |argmax(m) ∩ mask| / |argmax(m)|`` where ``argmax(m)`` is the set of pixels holding the map's maximum.
    With a unique maximum this is 1.0 (inside) or 0.0 (outside); tied maxima share the credit, so a constant map
    scores the mask's area fraction (chance level) instead of an arbitrary 0 or 1.

    Range ``[0, 1]``, higher is better. NaN for an empty mask (undefined, excluded from means).

    Args:
        maps: ``(B, H, W)`` maps.
        masks: ``(B, H', W')`` masks (``> 0.5`` inside), resized to ``(H, W)`` by nearest neighbour if needed.

    Returns:
        ``(B,)`` float32 hits.
    """
    return out(_pointing(flat(maps), prepare_masks(masks, maps)), maps)


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-in-mask: share of the saliency mass inside the mask.

    ``energy = sum_{i in mask} m_i / sum_i m_i``. An all-zero map is treated as uniform and gives the mask's area
    fraction ``|mask| / N`` (chance level), never NaN.

    Range ``[0, 1]``, higher is better. NaN for an empty mask.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).
        masks: ``(B, H', W')`` masks (``> 0.5`` inside), resized to ``(H, W)`` by nearest neighbour if needed.

    Returns:
        ``(B,)`` float32 energy shares.
    """
    return out(_energy(flat(maps), prepare_masks(masks, maps)), maps)


def mask_iou(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Intersection over union of the thresholded map with the mask.

    The map is binarised as ``m >= threshold * max(m)`` (relative to each map's maximum, so for min-max normalised
    maps this is the absolute threshold ``m >= threshold``). ``iou = |S ∩ mask| / |S ∪ mask|``. A constant or
    all-zero map selects every pixel and scores the mask's area fraction, never NaN.

    Range ``[0, 1]``, higher is better. NaN for an empty mask.

    Args:
        maps: ``(B, H, W)`` maps.
        masks: ``(B, H', W')`` masks (``> 0.5`` inside), resized to ``(H, W)`` by nearest neighbour if needed.
        threshold: relative level in ``[0, 1]``.

    Returns:
        ``(B,)`` float32 IoUs.
    """
    _check_threshold(threshold)
    return out(_iou(flat(maps), prepare_masks(masks, maps), threshold), maps)


def localization_metrics(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """``pointing_game``, ``energy_in_mask`` and ``mask_iou`` of ``maps`` against ``masks``, per image.

    Args:
        maps: ``(B, H, W)`` maps.
        masks: ``(B, H', W')`` masks, resized to ``(H, W)`` by nearest neighbour if needed.
        threshold: IoU threshold, see :func:`mask_iou`.

    Returns:
        ``{metric: (B,) float32}``, NaN for empty masks.
    """
    _check_threshold(threshold)
    m, inside = flat(maps), prepare_masks(masks, maps)
    return {
        "pointing_game": out(_pointing(m, inside), maps),
        "energy_in_mask": out(_energy(m, inside), maps),
        "mask_iou": out(_iou(m, inside, threshold), maps),
    }


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}.")


def _undefined_if_empty(values: Tensor, inside: Tensor) -> Tensor:
    return torch.where(inside.any(dim=1), values, torch.full_like(values, math.nan))


def _pointing(m: Tensor, inside: Tensor) -> Tensor:
    at_max = m == m.amax(dim=1, keepdim=True)
    hits = (at_max & inside).sum(dim=1).to(m.dtype) / at_max.sum(dim=1).to(m.dtype)
    return _undefined_if_empty(hits, inside)


def _energy(m: Tensor, inside: Tensor) -> Tensor:
    mass = m.clamp_min(0)
    total = mass.sum(dim=1)
    share = (mass * inside).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    area = inside.sum(dim=1).to(mass.dtype) / inside.shape[1]
    return _undefined_if_empty(torch.where(total > 0, share, area), inside)


def _iou(m: Tensor, inside: Tensor, threshold: float) -> Tensor:
    selected = m >= threshold * m.amax(dim=1, keepdim=True)
    inter = (selected & inside).sum(dim=1).to(m.dtype)
    union = (selected | inside).sum(dim=1).to(m.dtype)
    return _undefined_if_empty(inter / union.clamp_min(1), inside)
