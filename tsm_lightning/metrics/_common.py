"""Tensor plumbing shared by the metric modules: accumulation dtype, flattened maps, float32 results, spectral input."""

from __future__ import annotations

import torch
from torch import Tensor

from tsm_lightning.checks import check_maps

__all__ = ["acc_dtype", "flat", "out", "spectral_input"]


def acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype: float64, except on MPS which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def flat(maps: Tensor, name: str = "maps") -> Tensor:
    """``(B, N)`` accumulation-dtype copy of checked maps with non-finite values set to 0."""
    check_maps(maps, name)
    x = maps.reshape(maps.shape[0], -1).to(acc_dtype(maps.device))
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def out(values: Tensor, like: Tensor) -> Tensor:
    """A result as float32 on ``like``'s device."""
    return values.to(device=like.device, dtype=torch.float32)


def spectral_input(features: Tensor) -> Tensor:
    """Upcast features to the accumulation dtype (float64; float32 on MPS) before a spectral decomposition.

    In float32 the Gram's rounding noise gives every zero singular value a spurious ``~sqrt(eps) * s_1``
    (``3e-4 * s_1``), which biases ``sum_k s_k`` by up to ``min(C, N)`` times that.
    """
    if not isinstance(features, Tensor) or not features.is_floating_point():
        return features  # decompose raises the clear error
    return features.to(acc_dtype(features.device))
