"""Names and numbers shared across the package, with no imports: the bottom layer.

``data`` (normalisation), ``render`` (display), ``core`` (the method names) and the command line's parser all read from
here, so that none of them has to import another for a constant, and the parser answers without importing torch.
"""

from __future__ import annotations

__all__ = ["ATTENTION", "ATTENTION_LABEL", "IMAGENET_MEAN", "IMAGENET_STD", "METHODS", "WEIGHTINGS"]

METHODS: tuple[str, ...] = ("eigencam", "tsm", "multivec_eigencam", "mtsm")
"""Every saliency method this package computes, in display order: the names of
:data:`tsm_lightning.core.METHOD_TABLE` (where each method's facts live), kept here without imports for the command
line's parser."""

WEIGHTINGS: tuple[str, ...] = ("singular", "variance", "uniform")
"""Weightings of the multivector methods: ``w_k = s_k``, ``w_k = s_k ** 2`` or ``w_k = 1``."""

ATTENTION = "attention"
"""Name of the reference map of vision transformers beside the methods: the last block's class-token attention,
averaged over heads (tags ``saliency/attention``, ``saliency/attention/<metric>``)."""

ATTENTION_LABEL = "CLS attention"
"""Display name of the attention map in picture headers (the methods' labels are in their table entries)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet normalisation (what torchvision's and lightly's transforms use)."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet normalisation."""
