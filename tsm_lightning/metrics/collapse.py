"""Collapse indicators of an embedding: is the model learning anything at all?"""

from __future__ import annotations

import torch
from torch import Tensor

from tsm_lightning.checks import check_embeddings
from tsm_lightning.metrics._common import acc_dtype, out

__all__ = ["effective_rank", "embedding_spread", "unit_rows"]


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero), and whether each row was non-zero."""
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm)), norm[:, 0] > 0


def _embeddings(embeddings: object) -> Tensor:
    z = check_embeddings(embeddings)
    return z.to(acc_dtype(z.device))


def embedding_spread(embeddings: Tensor) -> Tensor:
    """Mean per-dimension standard deviation of the l2-normalised embeddings (the SimSiam collapse indicator).

    ``mean_d std_n(z_nd / ||z_n||)``. A collapsed embedding (every input mapped to one direction) gives ``0``;
    embeddings spread evenly over the unit sphere give about ``1 / sqrt(D)``.

    Args:
        embeddings: ``(n, D)`` embeddings, ``n >= 2``.

    Returns:
        A 0-d float32 tensor, ``>= 0``.
    """
    z = _embeddings(embeddings)
    unit, _ = unit_rows(z)
    return out(unit.std(dim=0).mean(), embeddings)


def effective_rank(embeddings: Tensor) -> Tensor:
    """Effective rank (Roy and Vetterli, 2007) of the centred embeddings: ``exp(H(p))``, ``p_k = s_k / sum_j s_j``.

    ``s_k`` are the singular values of the ``(n, D)`` embeddings centred over the batch. It counts the directions
    the embeddings really use: ``1`` for embeddings on a line (dimensional collapse), up to ``min(n - 1, D)``
    for isotropic ones. ``0`` if all embeddings are equal.

    Args:
        embeddings: ``(n, D)`` embeddings, ``n >= 2``.

    Returns:
        A 0-d float32 tensor in ``[0, min(n, D)]``.
    """
    z = _embeddings(embeddings)
    s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    total = s.sum()
    if not bool(total > 0):
        return out(torch.zeros((), dtype=z.dtype), embeddings)
    p = s / total
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return out(entropy.exp(), embeddings)
