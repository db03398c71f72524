"""Stability and agreement: per-image Pearson correlation between two batches of maps."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from tsm_lightning.metrics._common import flat, out

__all__ = ["pearson", "stability"]


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Pearson correlation between two batches of maps (stability across steps, agreement of methods).

    ``r = sum_i (a_i - mean(a)) (b_i - mean(b)) / sqrt(sum_i (a_i - mean(a))^2 * sum_i (b_i - mean(b))^2)`` over
    the ``N = H * W`` pixels of each image.

    Range ``[-1, 1]``; higher means more similar maps (1: identical up to a positive affine change). A constant map
    has no variance, so the formula is undefined; instead: two constant maps with the same value give 1 (identical
    maps), any other pair involving a constant map gives 0 (no linear relation). Never NaN.

    Args:
        a: ``(B, H, W)`` maps.
        b: ``(B, H, W)`` maps of the same shape.

    Returns:
        ``(B,)`` float32 correlations.

    Raises:
        ValueError: if the shapes differ (resize with :func:`~tsm_lightning.core.upsample_maps` first).
    """
    x, y = flat(a, "a"), flat(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"pearson needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; resize one with "
            "tsm_lightning.core.upsample_maps first."
        )
    y = y.to(x.device)
    const_x = x.amax(dim=1) == x.amin(dim=1)
    const_y = y.amax(dim=1) == y.amin(dim=1)
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    nx = xc.norm(dim=1, keepdim=True)
    ny = yc.norm(dim=1, keepdim=True)
    r = (xc / torch.where(nx > 0, nx, torch.ones_like(nx))) * (yc / torch.where(ny > 0, ny, torch.ones_like(ny)))
    r = r.sum(dim=1).clamp(-1.0, 1.0)
    same = torch.isclose(x[:, 0], y[:, 0]).to(r.dtype)
    r = torch.where(const_x & const_y, same, torch.where(const_x | const_y, torch.zeros_like(r), r))
    return out(r, a)


def stability(current: Tensor, stored: Mapping[str, Tensor] | None, name: str, key: str) -> Tensor | None:
    """:func:`pearson` of ``current`` with ``stored[name]`` (maps of an earlier step), or ``None`` if there are none.

    A stored batch of another shape (the layer's grid changed) is skipped with a ``RuntimeWarning`` naming ``key``.
    """
    if stored is None or name not in stored:
        return None
    if stored[name].shape != current.shape:
        warnings.warn(
            f"{key} of {name!r} skipped: the stored maps have shape {tuple(stored[name].shape)}, the current ones "
            f"{tuple(current.shape)}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return pearson(current, stored[name].to(current.device))
