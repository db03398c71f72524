"""The class token's self-attention over the patch tokens: the map DINO users look at.

Pure torch; the queries and keys come from :mod:`tsm_lightning.tokens`, which reads them off a transformer block's
own attention weights during the forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["class_token_attention"]


def class_token_attention(queries: Tensor, keys: Tensor, *, scale: float | None = None) -> Tensor:
    """Attention weights of the first token (the class token) over every token, per head.

    ``A[b, h] = softmax(q[b, h, 0] . k[b, h, :]^T * scale)``: row 0 of the block's attention matrix, as the
    block computes it (the softmax runs over every token, prefix tokens included).

    Args:
        queries: ``(B, heads, T, d)`` queries of one attention layer (after any query normalisation).
        keys: ``(B, heads, T, d)`` keys of the same layer.
        scale: factor applied to the dot products; default ``1 / sqrt(d)``.

    Returns:
        ``(B, heads, T)`` float32 weights, each row summing to 1.

    Raises:
        ValueError: if the shapes are not ``(B, heads, T, d)`` alike.
    """
    if queries.ndim != 4 or queries.shape != keys.shape:
        raise ValueError(
            "queries and keys must both have shape (B, heads, T, d), got "
            f"{tuple(queries.shape)} and {tuple(keys.shape)}."
        )
    d = queries.shape[-1]
    factor = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = queries[:, :, :1].float()  # (B, heads, 1, d): the class token's query only
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * factor  # (B, heads, 1, T)
    return scores.softmax(dim=-1)[:, :, 0]
