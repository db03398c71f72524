"""Normalisation and resizing of saliency maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tsm_lightning.checks import check_maps

__all__ = ["normalize_maps", "upsample_maps"]


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map to ``[0, 1]``.

    A constant map (``max - min`` below float32 resolution of its magnitude) becomes all zeros rather than
    NaN; non-finite values are treated as zero.

    Args:
        maps: ``(B, h, w)`` floating maps.

    Returns:
        ``(B, h, w)`` float32 maps in ``[0, 1]``.
    """
    check_maps(maps, spec="(B, h, w)")
    x = torch.nan_to_num(maps.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    flat = span <= torch.finfo(torch.float32).eps * torch.maximum(hi.abs(), lo.abs())
    out = (x - lo) / torch.where(flat | (span == 0), torch.ones_like(span), span)
    return torch.where(flat, torch.zeros_like(out), out).clamp_(0.0, 1.0)


def upsample_maps(maps: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinearly resize maps to an image size (``align_corners=False``, as torchvision and torchcam).

    Bilinear interpolation is a convex combination of neighbours, so maps in ``[0, 1]`` stay in ``[0, 1]``.

    Args:
        maps: ``(B, h, w)`` floating maps.
        size: target ``(H, W)`` (a tuple, or ``images.shape[-2:]``) or a single int for square output.

    Returns:
        ``(B, H, W)`` maps in the input dtype (float32 for half-precision inputs).
    """
    check_maps(maps, spec="(B, h, w)")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}.")
    dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    out = F.interpolate(maps.to(dtype)[:, None], size=hw, mode="bilinear", align_corners=False)
    return out[:, 0]
