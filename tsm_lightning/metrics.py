"""Label-free metrics for saliency maps, feature spectra and embeddings, batched in pure torch.

Users of self-supervised models have no labels, so every metric here needs at most the model itself. All metrics
are computed for a whole probe batch at once (no Python loop over images; only a loop over chunks of at most
``max_batch`` perturbed images bounds the memory of the model-based metrics).

Conventions:

* ``maps`` are ``(B, H, W)`` floating tensors in ``[0, 1]`` (see :func:`~tsm_lightning.core.normalize_maps`).
  Non-finite map values are treated as 0, as :func:`~tsm_lightning.core.normalize_maps` does, and the
  mass-based metrics (entropy, Gini, energy-in-mask) clip negative values to 0.
* ``masks`` are ``(B, H, W)`` (or ``(B, 1, H, W)``) bool, integer or float tensors; a pixel is inside where the
  value is ``> 0.5``. Masks of another size than the maps are resized to the maps' size with nearest-neighbour
  interpolation (``mode="nearest-exact"``), never the maps to the masks.
* ``images`` are ``(B, 3, H, W)`` normalised model inputs. Maps of another size than the images are upsampled
  bilinearly to the image size before they perturb an image.
* Every per-image result is a ``(B,)`` float32 tensor on the input's device. It is NaN exactly where the metric is
  undefined for that image (an empty mask, a relative score drop from a zero score, non-finite features); reduce
  with ``torch.nanmean`` or :func:`summarize`, which also counts the excluded images.
* Functions that call a model run it under ``torch.no_grad()``. :func:`default_embed_fn` and
  :func:`predicted_class_score` also put the model in eval mode and restore every sub-module's own ``training``
  flag afterwards; a bare ``lambda`` you pass as ``embed_fn`` or ``score_fn`` is responsible for that itself.

Model-based metrics perturb ``x`` with a map and compare the model's response with its response to ``x``:

* embedding metrics use the cosine similarity ``cos(e(x), e(x'))`` of the model's embedding ``e`` (the class
  score of the classic metrics is replaced by "how much of the original embedding survives");
* score metrics (Average Drop / Increase / Gain, score deletion / insertion) use a user-given
  ``score_fn(images) -> (n,)``, e.g. the softmax probability of the class predicted on the clean image
  (:func:`predicted_class_score`).

Both kinds are reported beside the same number for :func:`random_maps` (fixed seed), so the gap between a real
explanation and chance is visible.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, _default_forward, get_layer, preserved_modes
from tsm_lightning.core import decompose, normalize_maps
from tsm_lightning.explain import check_images

__all__ = [
    "EmbedFn",
    "ScoreFn",
    "average_drop",
    "average_gain",
    "average_increase",
    "blur_baseline",
    "default_embed_fn",
    "deletion_auc",
    "deletion_curve",
    "effective_rank",
    "embedding_drop",
    "embedding_gain",
    "embedding_increase",
    "embedding_spread",
    "energy_in_mask",
    "faithfulness_metrics",
    "gini",
    "insertion_auc",
    "insertion_curve",
    "localization_metrics",
    "map_entropy",
    "map_metrics",
    "mask_iou",
    "pearson",
    "pointing_game",
    "predicted_class_score",
    "random_maps",
    "saliency_rank",
    "score_deletion_auc",
    "score_insertion_auc",
    "score_metrics",
    "spectral_concentration",
    "summarize",
]

EmbedFn = Callable[[Tensor], Tensor]
"""``embed_fn(images) -> embeddings``: ``(n, 3, H, W)`` images to ``(n, D)`` embeddings (other shapes are flattened
to ``(n, -1)``)."""

ScoreFn = Callable[..., Tensor]
"""``score_fn(images) -> (n,)`` confidence scores, ideally in ``[0, 1]``. If the callable has a parameter named
``index``, it is called as ``score_fn(images, index=index)`` where ``index`` is the ``(n,)`` long tensor of the
probe-batch row each image was made from (to look up per-image targets, see :func:`predicted_class_score`)."""

Baseline = str | Tensor
_BASELINES = ("blur", "zeros")
_RANDOM = "random"
_FEATURES = "features"


# ---------------------------------------------------------------------------------------------------------------
# Validation and small helpers
# ---------------------------------------------------------------------------------------------------------------


def _acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype: float64, except on MPS which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_maps(maps: object, name: str = "maps") -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, W), got {type(maps).__name__}.")
    if maps.ndim != 3:
        hint = " Drop the channel dimension with maps[:, 0]." if maps.ndim == 4 and maps.shape[1] == 1 else ""
        hint += " Add a batch dimension with maps[None]." if maps.ndim == 2 else ""
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(maps.shape)}.{hint}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {maps.dtype}.")
    if min(maps.shape) < 1:
        raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(maps.shape)}.")
    return maps


def _flat(maps: Tensor, name: str = "maps") -> Tensor:
    """``(B, N)`` accumulation-dtype copy of validated maps with non-finite values set to 0."""
    _check_maps(maps, name)
    x = maps.reshape(maps.shape[0], -1).to(_acc_dtype(maps.device))
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _out(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=torch.float32)


def _prepare_masks(masks: object, maps: Tensor) -> Tensor:
    """Validate ``masks`` against ``maps`` and return ``(B, N)`` bool masks at the maps' resolution."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a torch.Tensor of shape (B, H, W), got {type(masks).__name__}.")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}.")
    if masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks hold {masks.shape[0]} images but maps hold {maps.shape[0]}.")
    inside = masks.to(device=maps.device, dtype=torch.float32)
    if inside.shape[-2:] != maps.shape[-2:]:
        inside = F.interpolate(inside[:, None], size=maps.shape[-2:], mode="nearest-exact")[:, 0]
    return (inside > 0.5).reshape(maps.shape[0], -1)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------------------------
# 1. Spectral concentration
# ---------------------------------------------------------------------------------------------------------------


def _concentration(singular_values: Tensor, valid: Tensor) -> Tensor:
    total = singular_values.sum(dim=1)
    ratio = singular_values[:, 0] / torch.where(total > 0, total, torch.ones_like(total))
    ratio = torch.where(total > 0, ratio, torch.zeros_like(ratio))
    return torch.where(valid, ratio, torch.full_like(ratio, math.nan))


def _spectral_input(features: Tensor) -> Tensor:
    """Upcast features to float64 (float32 on MPS) before the decomposition.

    In float32 the Gram's rounding noise gives every zero singular value a spurious ``~sqrt(eps) * s_1``
    (``3e-4 * s_1``), which biases ``sum_k s_k`` by up to ``min(C, N)`` times that.
    """
    if not isinstance(features, Tensor) or not features.is_floating_point():
        return features  # decompose raises the clear error
    return features.to(_acc_dtype(features.device))


def spectral_concentration(features: Tensor, centred: bool = False) -> Tensor:
    """Share of the feature map's spectrum carried by its leading component.

    ``concentration = s_1 / sum_k s_k`` where ``s_k`` are the singular values of the channel unfolding
    ``X = F.reshape(C, h * w)`` (``centred=False``: the Tucker / TSM spectrum) or of its per-channel spatially
    centred twin ``Xc`` (``centred=True``: the EigenCAM spectrum), computed by
    :func:`~tsm_lightning.core.decompose`. This is the quantity of the paper's Figure 2.

    Range ``[1 / min(C, h * w), 1]``; higher means one component dominates, so the single-component maps
    (TSM, EigenCAM) already tell most of the story; lower means the multivector maps add information. Neither
    direction is "better" in itself. All-zero features give 0 (never NaN); features holding NaN or Inf give NaN
    (undefined; :func:`~tsm_lightning.core.decompose` warns). The decomposition runs in float64 (float32 on MPS)
    so that rounding noise does not give zero singular values a spurious share.

    Args:
        features: ``(B, C, h, w)`` feature maps.
        centred: use the centred (EigenCAM) spectrum instead of the uncentred (Tucker / TSM) one.

    Returns:
        ``(B,)`` float32 concentrations on the features' device.
    """
    dec = decompose(_spectral_input(features), uncentred=not centred, centred=centred)
    spectrum = dec.centred if centred else dec.uncentred
    assert spectrum is not None
    return _out(_concentration(spectrum.singular_values, dec.valid), features)


def _spectral_concentrations(features: Tensor) -> tuple[Tensor, Tensor]:
    """Both concentrations from one decomposition: ``(uncentred, centred)``."""
    dec = decompose(_spectral_input(features), uncentred=True, centred=True)
    assert dec.uncentred is not None and dec.centred is not None
    return (
        _out(_concentration(dec.uncentred.singular_values, dec.valid), features),
        _out(_concentration(dec.centred.singular_values, dec.valid), features),
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Map complexity
# ---------------------------------------------------------------------------------------------------------------


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
    mass = _flat(maps).clamp_min(0)
    n = mass.shape[1]
    if n == 1:
        return _out(torch.ones(mass.shape[0]), maps)
    total = mass.sum(dim=1, keepdim=True)
    p = mass / torch.where(total > 0, total, torch.ones_like(total))
    h = -torch.special.xlogy(p, p).sum(dim=1) / math.log(n)
    h = torch.where(total[:, 0] > 0, h, torch.ones_like(h))
    return _out(h.clamp(0.0, 1.0), maps)


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
    mass = _flat(maps).clamp_min(0)
    n = mass.shape[1]
    if n == 1:
        return _out(torch.zeros(mass.shape[0]), maps)
    c = mass.sort(dim=1).values
    total = c.sum(dim=1)
    k = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    weights = (n - k + 0.5) / n
    g = 1 - 2 * (c * weights).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    g = torch.where(total > 0, g * n / (n - 1), torch.zeros_like(g))
    return _out(g.clamp(0.0, 1.0), maps)


# ---------------------------------------------------------------------------------------------------------------
# 4-5. Stability and agreement
# ---------------------------------------------------------------------------------------------------------------


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
    x, y = _flat(a, "a"), _flat(b, "b")
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
    return _out(r, a)


# ---------------------------------------------------------------------------------------------------------------
# 6. Localization
# ---------------------------------------------------------------------------------------------------------------


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
    m = _flat(maps)
    inside = _prepare_masks(masks, maps)
    at_max = m == m.amax(dim=1, keepdim=True)
    hits = (at_max & inside).sum(dim=1).to(m.dtype) / at_max.sum(dim=1).to(m.dtype)
    empty = ~inside.any(dim=1)
    return _out(torch.where(empty, torch.full_like(hits, math.nan), hits), maps)


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
    mass = _flat(maps).clamp_min(0)
    inside = _prepare_masks(masks, maps)
    total = mass.sum(dim=1)
    share = (mass * inside).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    area = inside.sum(dim=1).to(mass.dtype) / inside.shape[1]
    share = torch.where(total > 0, share, area)
    empty = ~inside.any(dim=1)
    return _out(torch.where(empty, torch.full_like(share, math.nan), share), maps)


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
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}.")
    m = _flat(maps)
    inside = _prepare_masks(masks, maps)
    selected = m >= threshold * m.amax(dim=1, keepdim=True)
    inter = (selected & inside).sum(dim=1).to(m.dtype)
    union = (selected | inside).sum(dim=1).to(m.dtype)
    empty = ~inside.any(dim=1)
    iou = inter / union.clamp_min(1)
    return _out(torch.where(empty, torch.full_like(iou, math.nan), iou), maps)


# ---------------------------------------------------------------------------------------------------------------
# Random baseline maps, saliency order, blurred baseline
# ---------------------------------------------------------------------------------------------------------------


def random_maps(like: Tensor, seed: int = 0, *, cells: int = 7) -> Tensor:
    """Deterministic random maps: the chance-level explanation every faithfulness number is compared with.

    Uniform noise on a ``cells x cells`` grid (the size of a ResNet's last feature map at 224 px; capped at the
    map size), upsampled bilinearly to the maps' size and min-max normalised to ``[0, 1]`` per image. The noise
    comes from a private CPU ``torch.Generator`` seeded with ``seed``, so the global RNG is untouched and the maps
    are the same on every device and do not depend on the batch size (image ``b`` always gets the same map).

    Args:
        like: ``(B, H, W)`` tensor giving the batch size, size and device.
        seed: generator seed.
        cells: side of the low-resolution noise grid.

    Returns:
        ``(B, H, W)`` float32 maps in ``[0, 1]`` on ``like``'s device.
    """
    if not isinstance(like, Tensor) or like.ndim != 3:
        shape = tuple(like.shape) if isinstance(like, Tensor) else type(like).__name__
        raise ValueError(f"like must be a (B, H, W) tensor, got {shape}.")
    _check_positive_int(cells, "cells")
    b, h, w = like.shape
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.rand(b, min(cells, h), min(cells, w), generator=generator, dtype=torch.float32)
    up = F.interpolate(noise[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(up).to(like.device)


def saliency_rank(maps: Tensor) -> Tensor:
    """Rank of every pixel in saliency order: 0 for the most salient pixel.

    Ties are broken deterministically by the row-major pixel index (the earlier pixel comes first), via a stable
    descending sort. Non-finite values count as 0.

    Args:
        maps: ``(B, H, W)`` maps.

    Returns:
        ``(B, H * W)`` int64 ranks, a permutation of ``0 .. H * W - 1`` per image.
    """
    m = _flat(maps)
    order = torch.sort(m, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def blur_baseline(images: Tensor, sigma: float | None = None) -> Tensor:
    """Strongly blurred images: the "information removed" baseline of the deletion and insertion curves.

    A separable Gaussian blur (two depthwise ``conv2d`` passes, kernel radius ``ceil(3 * sigma)``, replicate
    padding so that constant images stay constant). The default ``sigma = max(1, min(H, W) / 16)`` pixels (14 px
    at 224 px) removes object detail but keeps the image's colours and coarse layout, so perturbed images stay
    closer to the data than black boxes do.

    Args:
        images: ``(B, C, H, W)`` images.
        sigma: standard deviation in pixels; ``None`` for the default.

    Returns:
        ``(B, C, H, W)`` blurred images in the input dtype (float32 for half precision).
    """
    check_images(images, channels=None)
    _, c, h, w = images.shape
    sigma = max(1.0, min(h, w) / 16) if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}.")
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(images.to(dtype), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _resolve_baseline(baseline: Baseline, images: Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=images.device, dtype=images.dtype), images.shape)
        except RuntimeError as err:
            raise ValueError(
                f"A baseline tensor must broadcast to the images' shape {tuple(images.shape)}, got "
                f"{tuple(baseline.shape)}."
            ) from err
    if baseline == "blur":
        return blur_baseline(images).to(images.dtype)
    if baseline == "zeros":
        return torch.zeros_like(images)
    raise ValueError(f"Unknown baseline {baseline!r}; valid baselines are {_BASELINES} or a tensor.")


def _image_maps(maps: Tensor, images: Tensor, name: str = "maps") -> Tensor:
    """Validate maps against images, upsample bilinearly to the image size, clip to ``[0, 1]``."""
    _check_maps(maps, name)
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"{name} hold {maps.shape[0]} images but images hold {images.shape[0]}.")
    m = torch.nan_to_num(maps.to(device=images.device, dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if m.shape[-2:] != images.shape[-2:]:
        m = F.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return m.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The batched perturbation engine
# ---------------------------------------------------------------------------------------------------------------

_Builder = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``build(job_ids) -> (images (n, C, H, W), source_rows (n,))`` for a contiguous range of job ids."""


def _run_jobs(
    segments: Sequence[tuple[int, _Builder]],
    value_fn: Callable[[Tensor, Tensor], Tensor],
    max_batch: int,
    device: torch.device,
) -> list[Tensor]:
    """Evaluate ``value_fn`` on every virtual image of every segment, in forward passes of ``<= max_batch`` images.

    Perturbed images are only materialised chunk by chunk, so peak memory is bounded by ``max_batch`` images
    whatever the number of steps, methods and images. A chunk may span several segments.

    Returns:
        One tensor per segment: ``value_fn``'s outputs for job ids ``0 .. count - 1``, concatenated.
    """
    results: list[list[Tensor]] = [[] for _ in segments]
    pending: list[tuple[int, int, int]] = []

    def flush() -> None:
        if not pending:
            return
        built = [segments[s][1](torch.arange(lo, hi, device=device)) for s, lo, hi in pending]
        images = torch.cat([img for img, _ in built])
        source = torch.cat([src for _, src in built])
        values = value_fn(images, source)
        sizes = [hi - lo for _, lo, hi in pending]
        for (s, _, _), part in zip(pending, values.split(sizes), strict=True):
            results[s].append(part)
        pending.clear()

    size = 0
    for s, (count, _) in enumerate(segments):
        start = 0
        while start < count:
            take = min(count - start, max_batch - size)
            pending.append((s, start, start + take))
            size += take
            start += take
            if size >= max_batch:
                flush()
                size = 0
    flush()
    dtype = _acc_dtype(device)
    return [torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device) for parts in results]


def _fractions(steps: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel counts ``n_k = round(k * N / steps)`` and fractions ``n_k / N`` for ``k = 0 .. steps``."""
    k = torch.arange(steps + 1, device=device)
    counts = torch.div(2 * k * n + steps, 2 * steps, rounding_mode="floor")
    return counts, counts.to(_acc_dtype(device)) / n


def _curve_builder(images: Tensor, base: Tensor, rank: Tensor, counts: Tensor, insertion: bool) -> _Builder:
    """Builder of the intermediate steps ``k = 1 .. steps - 1`` of one curve, job ``j = b * (steps - 1) + k - 1``."""
    inner = counts.shape[0] - 2
    h, w = images.shape[-2:]

    def build(jobs: Tensor) -> tuple[Tensor, Tensor]:
        src = torch.div(jobs, inner, rounding_mode="floor")
        k = jobs % inner + 1
        chosen = rank.index_select(0, src) < counts[k][:, None]  # the first n_k pixels in saliency order
        use_base = ~chosen if insertion else chosen
        return torch.where(use_base.view(-1, 1, h, w), base.index_select(0, src), images.index_select(0, src)), src

    return build


@dataclass
class _Perturbed:
    """Values of one engine run.

    ``original`` and ``base`` are ``(B,)`` (``None`` when not requested); ``maps[i]`` maps ``"drop"`` to ``(B,)``
    and ``"deletion"`` / ``"insertion"`` to ``(B, steps - 1)``; ``fractions`` is ``(steps + 1,)``.
    """

    fractions: Tensor
    original: Tensor | None = None
    base: Tensor | None = None
    maps: list[dict[str, Tensor]] = field(default_factory=list)


def _perturbation_values(
    value_fn: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    map_list: Sequence[Tensor],
    *,
    steps: int,
    baseline: Baseline,
    max_batch: int,
    drop: bool,
    deletion: bool,
    insertion: bool,
    original: bool,
) -> _Perturbed:
    """Evaluate ``value_fn`` on every perturbation needed by the drop and curve metrics, in few forward passes.

    The two curve ends shared by all maps (the original image and the baseline image) are evaluated once per
    image, not once per map and curve.
    """
    b, _, h, w = images.shape
    device = images.device
    counts, fractions = _fractions(steps, h * w, device)
    curves = deletion or insertion
    segments: list[tuple[int, _Builder]] = []
    keys: list[tuple[int, str]] = []
    if original:
        segments.append((b, lambda j: (images.index_select(0, j), j)))
        keys.append((-1, "original"))
    base = None
    if curves:
        base = _resolve_baseline(baseline, images)
        segments.append((b, lambda j: (base.index_select(0, j), j)))
        keys.append((-1, "base"))
    for i, maps in enumerate(map_list):
        if drop:
            segments.append(
                (b, lambda j, m=maps: (images.index_select(0, j) * m.index_select(0, j)[:, None].to(images.dtype), j))
            )
            keys.append((i, "drop"))
        if curves:
            rank = saliency_rank(maps).to(torch.int32)  # half the memory of int64; N < 2**31
            for name, wanted, ins in (("deletion", deletion, False), ("insertion", insertion, True)):
                if wanted:
                    segments.append((b * (steps - 1), _curve_builder(images, base, rank, counts, ins)))
                    keys.append((i, name))
    values = _run_jobs(segments, value_fn, max_batch, device)
    out = _Perturbed(fractions=fractions, maps=[{} for _ in map_list])
    for (i, name), vals in zip(keys, values, strict=True):
        if name == "original":
            out.original = vals
        elif name == "base":
            out.base = vals
        else:
            out.maps[i][name] = vals.reshape(b, steps - 1) if name != "drop" else vals
    return out


def _present(values: Tensor | None) -> Tensor:
    if values is None:  # pragma: no cover - guarded by the flags passed to _perturbation_values
        raise RuntimeError("internal error: a perturbation result that was not requested was used.")
    return values


def _assemble_curve(start: Tensor, inner: Tensor, end: Tensor) -> Tensor:
    return torch.cat([start[:, None], inner.to(start.dtype), end[:, None]], dim=1)


def _auc(curves: Tensor, fractions: Tensor) -> Tensor:
    return torch.trapezoid(curves, x=fractions.to(curves.dtype), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------


def _as_embedding(output: object, pool: bool) -> Tensor:
    if isinstance(output, (tuple, list)):
        tensors = [item for item in output if isinstance(item, Tensor)]
        if not tensors:
            raise ValueError("The model returned a tuple/list without a tensor; pass forward_fn= or layer=.")
        output = tensors[0]
    if not isinstance(output, Tensor):
        raise ValueError(
            f"The embedding must be a tensor, got {type(output).__name__}; pass forward_fn= returning a tensor."
        )
    if pool and output.ndim == 4:
        output = output.mean(dim=(2, 3))
    return output.reshape(output.shape[0], -1)


def default_embed_fn(
    model: nn.Module,
    layer: str | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    pool: bool = True,
) -> EmbedFn:
    """Build the embedding function ``e(x)`` of the faithfulness metrics from a model.

    The returned function runs ``model`` in eval mode under ``torch.no_grad()`` and restores every sub-module's
    own ``training`` flag afterwards, so calling it during training changes nothing (no BatchNorm statistics are
    updated). Its output:

    * ``layer=None``: the model's forward output (``forward_fn(model, images)``, default ``model(images)``). For a
      lightly SSL module this is the module's ``forward`` output, usually the projection-head output ``z``; a tuple
      output (e.g. BYOL's ``(z, p)``) contributes its first tensor.
    * ``layer="backbone"`` (any dotted module name): that sub-module's output, captured with a scoped hook. For
      lightly's ``backbone = nn.Sequential(*list(resnet.children())[:-1])`` this is the pooled backbone
      embedding, the usual choice; it is equivalent to ``lambda x: model.backbone(x).flatten(1)`` but with the
      modes handled.

    A 4-D ``(n, C, h, w)`` output is global-average pooled to ``(n, C)`` when ``pool`` is true; everything is then
    flattened to ``(n, D)``.

    Args:
        model: the network.
        layer: dotted name of the sub-module whose output is the embedding, or ``None`` for the forward output.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.
        pool: average 4-D outputs over space before flattening.

    Returns:
        ``embed(images) -> (n, D)`` embeddings.
    """
    forward = forward_fn or _default_forward
    if layer is not None:
        get_layer(model, layer)  # fail early on a bad name

    def embed(images: Tensor) -> Tensor:
        with preserved_modes(model), torch.no_grad():
            if layer is None:
                return _as_embedding(forward(model, images), pool)
            captured: list[object] = []

            def hook(module: nn.Module, args: object, output: object) -> None:
                if not captured:
                    captured.append(output)

            handle = get_layer(model, layer).register_forward_hook(hook)
            try:
                forward(model, images)
            finally:
                handle.remove()
            if not captured:
                raise RuntimeError(f"Layer {layer!r} did not run during the forward pass.")
            return _as_embedding(captured[0], pool)

    return embed


def _embed(embed_fn: EmbedFn, images: Tensor) -> Tensor:
    with torch.no_grad():
        out = embed_fn(images)
    out = _as_embedding(out, pool=False)
    if out.shape[0] != images.shape[0]:
        raise ValueError(f"embed_fn returned {out.shape[0]} embeddings for {images.shape[0]} images.")
    return out.detach().to(_acc_dtype(images.device))


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm)), norm[:, 0] > 0


def _cosine_units(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """Cosine of unit vectors; ``cos(0, 0) = 1`` (identical), ``cos(0, v) = 0`` for ``v != 0``."""
    (ua, nza), (ub, nzb) = a, b
    cos = (ua * ub).sum(dim=1).clamp(-1.0, 1.0)
    both_zero = ~nza & ~nzb
    return torch.where(nza & nzb, cos, both_zero.to(cos.dtype))


def _embedding_similarity(
    embed_fn: EmbedFn, images: Tensor, max_batch: int
) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Return ``value_fn(perturbed, rows) = cos(e(x[rows]), e(perturbed))`` and ``cos(e(x), e(x))``."""
    b = images.shape[0]
    ref = _run_jobs(
        [(b, lambda j: (images.index_select(0, j), j))], lambda x, _: _embed(embed_fn, x), max_batch, images.device
    )[0]
    ref_unit = _unit(ref)

    def value_fn(perturbed: Tensor, rows: Tensor) -> Tensor:
        return _cosine_units((ref_unit[0][rows], ref_unit[1][rows]), _unit(_embed(embed_fn, perturbed)))

    return value_fn, _cosine_units(ref_unit, ref_unit)


def _check_common(images: Tensor, steps: int, max_batch: int) -> None:
    check_images(images, channels=None)
    _check_positive_int(steps, "steps")
    _check_positive_int(max_batch, "max_batch")


def embedding_drop(embed_fn: EmbedFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Embedding drop: how much of the embedding is lost when only the salient part of the image is kept.

    ``drop = 1 - cos(e(x), e(x ⊙ m))`` with ``m`` the map upsampled bilinearly to the image size (clipped to
    ``[0, 1]``) and ``⊙`` broadcast over channels. As the inputs are normalised, ``x ⊙ m`` fades the unsalient
    pixels to 0, the dataset's mean colour. The label-free analogue of Average Drop (the class score is replaced
    by the similarity to the original embedding).

    Range ``[0, 2]`` (in practice ``[0, 1]``), lower is better. 0 when ``m`` is all ones.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 drops.
    """
    _check_common(images, 1, max_batch)
    m = _image_maps(maps, images)
    value_fn, _ = _embedding_similarity(embed_fn, images, max_batch)
    res = _perturbation_values(
        value_fn,
        images,
        [m],
        steps=1,
        baseline="zeros",
        max_batch=max_batch,
        drop=True,
        deletion=False,
        insertion=False,
        original=False,
    )
    return _out(1 - res.maps[0]["drop"], images)


def _relative_to_reference(score: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Percent increase indicator and normalised gain of ``score`` over ``reference`` (both ``<= 1``)."""
    increase = (score > reference).to(score.dtype) * 100
    headroom = 1 - reference
    gain = (score - reference) / torch.where(headroom > 0, headroom, torch.ones_like(headroom))
    gain = torch.where(score > reference, gain, torch.zeros_like(gain))
    gain = torch.where((score > reference) & (headroom <= 0), torch.full_like(gain, math.nan), gain)
    return increase, gain * 100


def _kept_similarities(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, reference_maps: Tensor | None, seed: int, max_batch: int
) -> tuple[Tensor, Tensor]:
    m = _image_maps(maps, images)
    r = _image_maps(reference_maps, images, "reference_maps") if reference_maps is not None else random_maps(m, seed)
    value_fn, _ = _embedding_similarity(embed_fn, images, max_batch)
    res = _perturbation_values(
        value_fn,
        images,
        [m, r],
        steps=1,
        baseline="zeros",
        max_batch=max_batch,
        drop=True,
        deletion=False,
        insertion=False,
        original=False,
    )
    return res.maps[0]["drop"], res.maps[1]["drop"]


def embedding_increase(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    *,
    reference_maps: Tensor | None = None,
    seed: int = 0,
    max_batch: int = 256,
) -> Tensor:
    """Embedding increase: does keeping the salient part preserve the embedding better than a random map does?

    Average Increase counts images whose class score *rises* under the mask, but the similarity to the original
    embedding cannot exceed ``cos(e(x), e(x)) = 1``, so the comparison is made against the random baseline map
    ``r`` (:func:`random_maps` with ``seed``, or ``reference_maps``) instead: with ``s_m = cos(e(x), e(x ⊙ m))``
    and ``s_r = cos(e(x), e(x ⊙ r))``, ``increase = 100 * [s_m > s_r]``. The mean over images is the percentage
    of images where the map beats chance.

    Range ``{0, 100}`` per image (mean in ``[0, 100]``), higher is better; about 50 for a random map.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        reference_maps: ``(B, h', w')`` maps to compare with; ``None`` uses :func:`random_maps`.
        seed: seed of the random reference maps.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 indicators times 100.
    """
    _check_common(images, 1, max_batch)
    s_m, s_r = _kept_similarities(embed_fn, images, maps, reference_maps, seed, max_batch)
    return _out(_relative_to_reference(s_m, s_r)[0], images)


def embedding_gain(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    *,
    reference_maps: Tensor | None = None,
    seed: int = 0,
    max_batch: int = 256,
) -> Tensor:
    """Embedding gain: normalised gain in kept similarity of the map over a random map.

    With ``s_m`` and ``s_r`` as in :func:`embedding_increase`,
    ``gain = 100 * max(0, s_m - s_r) / (1 - s_r)``: the share of the similarity the random map lost that the
    saliency map recovers (Average Gain's ``max(0, o - y) / (1 - y)`` with the random map's similarity as ``y``).
    When ``s_r = 1`` no gain is possible and the term is 0.

    Range ``[0, 100]``, higher is better.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        reference_maps: ``(B, h', w')`` maps to compare with; ``None`` uses :func:`random_maps`.
        seed: seed of the random reference maps.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 gains in percent.
    """
    _check_common(images, 1, max_batch)
    s_m, s_r = _kept_similarities(embed_fn, images, maps, reference_maps, seed, max_batch)
    return _out(_relative_to_reference(s_m, s_r)[1], images)


def _embedding_curve(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int, baseline: Baseline, max_batch: int, insertion: bool
) -> tuple[Tensor, Tensor]:
    _check_common(images, steps, max_batch)
    m = _image_maps(maps, images)
    value_fn, original = _embedding_similarity(embed_fn, images, max_batch)
    res = _perturbation_values(
        value_fn,
        images,
        [m],
        steps=steps,
        baseline=baseline,
        max_batch=max_batch,
        drop=False,
        deletion=not insertion,
        insertion=insertion,
        original=False,
    )
    base = _present(res.base)
    inner = res.maps[0]["insertion" if insertion else "deletion"]
    curve = _assemble_curve(base, inner, original) if insertion else _assemble_curve(original, inner, base)
    return res.fractions, curve


def deletion_curve(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> tuple[Tensor, Tensor]:
    """Similarity to the original embedding as the most salient pixels are replaced by the baseline.

    At step ``k = 0 .. steps`` the first ``n_k = round(k * N / steps)`` pixels in saliency order
    (:func:`saliency_rank`: descending map value, ties broken by row-major pixel index) of ``x`` are replaced by
    the baseline's pixels, giving ``x_k``; the curve is ``cos(e(x), e(x_k))``. The maps are upsampled bilinearly to
    the image size first. All ``B * (steps - 1)`` intermediate images are evaluated in chunks of at most
    ``max_batch`` images, built only when their chunk runs; the ends (``x_0 = x``, ``x_steps`` = baseline) are
    evaluated once per image.

    Baselines: ``"blur"`` (default, :func:`blur_baseline`: removed pixels lose their detail but keep their colour,
    which keeps perturbed images closer to the data than black boxes), ``"zeros"`` (0 in normalised space: the
    dataset's mean colour), or a tensor broadcastable to the images.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps.
        steps: number of deletion steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(fractions, curves)``: ``(steps + 1,)`` deleted pixel fractions ``n_k / N`` (from 0 to 1) and
        ``(B, steps + 1)`` similarities, in the accumulation dtype (float64 except on MPS).
    """
    return _embedding_curve(embed_fn, images, maps, steps, baseline, max_batch, insertion=False)


def insertion_curve(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> tuple[Tensor, Tensor]:
    """Similarity to the original embedding as the most salient pixels of ``x`` are inserted into the baseline.

    Step ``k`` shows the first ``n_k`` pixels in saliency order from ``x`` and the rest from the baseline (same
    order, steps, baselines and batching as :func:`deletion_curve`); the curve is ``cos(e(x), e(x_k))``.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps (upsampled bilinearly to the image size).
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(fractions, curves)``: ``(steps + 1,)`` inserted pixel fractions and ``(B, steps + 1)`` similarities.
    """
    return _embedding_curve(embed_fn, images, maps, steps, baseline, max_batch, insertion=True)


def deletion_auc(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> Tensor:
    """Area under the embedding deletion curve (:func:`deletion_curve`), trapezoid rule over fractions 0..1.

    ``AUC = ∫_0^1 cos(e(x), e(x_f)) df`` where ``x_f`` has its most salient fraction ``f`` of pixels replaced by the
    baseline. Range ``[-1, 1]`` (in practice ``[0, 1]``), lower is better (removing the salient pixels first should
    destroy the embedding fast). A model that ignores its input gives exactly its constant similarity, 1.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps (upsampled bilinearly to the image size).
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    fractions, curves = deletion_curve(embed_fn, images, maps, steps, baseline, max_batch)
    return _out(_auc(curves, fractions), images)


def insertion_auc(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> Tensor:
    """Area under the embedding insertion curve (:func:`insertion_curve`), trapezoid rule over fractions 0..1.

    Range ``[-1, 1]`` (in practice ``[0, 1]``), higher is better (inserting the salient pixels first should recover
    the embedding fast).

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps (upsampled bilinearly to the image size).
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    fractions, curves = insertion_curve(embed_fn, images, maps, steps, baseline, max_batch)
    return _out(_auc(curves, fractions), images)


# ---------------------------------------------------------------------------------------------------------------
# 7. Classic confidence metrics from a user score
# ---------------------------------------------------------------------------------------------------------------


def _takes_index(score_fn: ScoreFn) -> bool:
    try:
        return "index" in inspect.signature(score_fn).parameters
    except (TypeError, ValueError):
        return False


def _score_value_fn(score_fn: ScoreFn) -> Callable[[Tensor, Tensor], Tensor]:
    with_index = _takes_index(score_fn)

    def value_fn(images: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            out = score_fn(images, index=rows) if with_index else score_fn(images)
        if not isinstance(out, Tensor) or out.numel() != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"score_fn must return one score per image, shape ({images.shape[0]},), got {shape}.")
        return out.detach().reshape(-1).to(device=images.device, dtype=_acc_dtype(images.device))

    return value_fn


def predicted_class_score(model: nn.Module, images: Tensor, *, forward_fn: ForwardFn | None = None) -> ScoreFn:
    """Score function for the classic metrics: softmax probability of the class predicted on the clean image.

    The target class of each probe image is fixed once, ``argmax model(images)``; the returned
    ``score_fn(perturbed, index)`` gives ``softmax(model(perturbed))[target[index]]``, as Average Drop is defined.
    The model runs in eval mode under ``torch.no_grad()`` with every sub-module's mode restored.

    Args:
        model: a classifier returning ``(B, num_classes)`` logits (or ``forward_fn`` returning them).
        images: ``(B, 3, H, W)`` clean probe images.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.

    Returns:
        ``score_fn(images, index) -> (n,)`` probabilities.
    """
    forward = forward_fn or _default_forward

    def logits(x: Tensor) -> Tensor:
        with preserved_modes(model), torch.no_grad():
            out = forward(model, x)
        if not isinstance(out, Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"predicted_class_score needs (B, num_classes) logits, got {shape}.")
        return out.float()

    target = logits(images).argmax(dim=1)

    def score_fn(x: Tensor, index: Tensor) -> Tensor:
        return logits(x).softmax(dim=1).gather(1, target[index.to(target.device), None])[:, 0]

    return score_fn


def _score_pairs(score_fn: ScoreFn, images: Tensor, map_list: Sequence[Tensor], max_batch: int) -> dict[str, object]:
    return _perturbation_values(
        _score_value_fn(score_fn),
        images,
        map_list,
        steps=1,
        baseline="zeros",
        max_batch=max_batch,
        drop=True,
        deletion=False,
        insertion=False,
        original=True,
    )


def _drop_terms(y: Tensor, o: Tensor) -> dict[str, Tensor]:
    """Per-image Average Drop / Increase / Gain terms in percent from clean scores ``y`` and masked scores ``o``."""
    drop = (y - o) / torch.where(y > 0, y, torch.ones_like(y))
    drop = torch.where(o < y, drop, torch.zeros_like(drop))
    drop = torch.where((o < y) & (y <= 0), torch.full_like(drop, math.nan), drop)
    increase, gain = _relative_to_reference(o, y)
    return {"average_drop": drop * 100, "average_increase": increase, "average_gain": gain}


def _score_terms(score_fn: ScoreFn, images: Tensor, maps: Tensor, max_batch: int) -> dict[str, Tensor]:
    _check_common(images, 1, max_batch)
    res = _score_pairs(score_fn, images, [_image_maps(maps, images)], max_batch)
    return _drop_terms(_present(res.original), res.maps[0]["drop"])


def average_drop(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Drop (Grad-CAM++) per image, in percent.

    With ``y = score_fn(x)`` and ``o = score_fn(x ⊙ m)`` (``m`` the map upsampled to the image size):
    ``term = 100 * max(0, y - o) / y``; Average Drop is the mean of the terms over images. Scores are expected in
    ``[0, 1]`` (probabilities). NaN where ``y <= 0`` and ``o < y`` (relative drop undefined).

    Range ``[0, 100]``, lower is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 terms in percent.
    """
    return _out(_score_terms(score_fn, images, maps, max_batch)["average_drop"], images)


def average_increase(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Increase (Increase in Confidence, Grad-CAM++) per image, in percent.

    ``term = 100 * [o > y]`` with ``y``, ``o`` as in :func:`average_drop`; the mean is the percentage of images
    whose score rises when only the salient part is shown. Range ``{0, 100}`` per image, higher is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 terms (0 or 100).
    """
    return _out(_score_terms(score_fn, images, maps, max_batch)["average_increase"], images)


def average_gain(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Gain (Opti-CAM) per image, in percent.

    ``term = 100 * max(0, o - y) / (1 - y)`` with ``y``, ``o`` as in :func:`average_drop`: the share of the
    available headroom gained. 0 when ``o <= y`` (also when ``y = 1``); NaN where ``y >= 1`` and ``o > y``
    (scores outside ``[0, 1]``). Range ``[0, 100]``, higher is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 terms in percent.
    """
    return _out(_score_terms(score_fn, images, maps, max_batch)["average_gain"], images)


def _score_curve_auc(
    score_fn: ScoreFn, images: Tensor, maps: Tensor, steps: int, baseline: Baseline, max_batch: int, insertion: bool
) -> Tensor:
    _check_common(images, steps, max_batch)
    res = _perturbation_values(
        _score_value_fn(score_fn),
        images,
        [_image_maps(maps, images)],
        steps=steps,
        baseline=baseline,
        max_batch=max_batch,
        drop=False,
        deletion=not insertion,
        insertion=insertion,
        original=True,
    )
    y, base = _present(res.original), _present(res.base)
    inner = res.maps[0]["insertion" if insertion else "deletion"]
    curve = _assemble_curve(base, inner, y) if insertion else _assemble_curve(y, inner, base)
    return _out(_auc(curve, res.fractions), images)


def score_deletion_auc(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> Tensor:
    """Deletion AUC of the score: ``∫_0^1 score_fn(x_f) df`` with the salient fraction ``f`` replaced by the baseline.

    Same perturbations, ordering, baselines and batching as :func:`deletion_curve`, with the raw score in place of
    the embedding similarity. Range: the score's range (``[0, 1]`` for probabilities), lower is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    return _score_curve_auc(score_fn, images, maps, steps, baseline, max_batch, insertion=False)


def score_insertion_auc(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> Tensor:
    """Insertion AUC of the score: ``∫_0^1 score_fn(x_f) df``, the salient fraction ``f`` of ``x`` on the baseline.

    Same perturbations as :func:`insertion_curve`. Range: the score's range, higher is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    return _score_curve_auc(score_fn, images, maps, steps, baseline, max_batch, insertion=True)


# ---------------------------------------------------------------------------------------------------------------
# Convenience layer for the monitor and the CLI
# ---------------------------------------------------------------------------------------------------------------


def _check_map_dict(maps: object, reserved: str) -> dict[str, Tensor]:
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {method name: (B, H, W) maps}.")
    if reserved in maps:
        raise ValueError(f"{reserved!r} is reserved for the {reserved} entry of the results; rename that method.")
    for name, m in maps.items():
        _check_maps(m, f"maps[{name!r}]")
    return dict(maps)


def _stability(
    name: str, current: Tensor, other: Mapping[str, Tensor] | None, key: str, out: dict[str, Tensor]
) -> None:
    if other is None or name not in other:
        return
    if other[name].shape != current.shape:
        warnings.warn(
            f"{key} of {name!r} skipped: the stored maps have shape {tuple(other[name].shape)}, the current ones "
            f"{tuple(current.shape)}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    out[key] = pearson(current, other[name].to(current.device))


def localization_metrics(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """``pointing_game``, ``energy_in_mask`` and ``mask_iou`` of ``maps`` against ``masks``, per image.

    Args:
        maps: ``(B, H, W)`` maps.
        masks: ``(B, H', W')`` masks, resized to ``(H, W)`` by nearest neighbour if needed.
        threshold: IoU threshold, see :func:`mask_iou`.

    Returns:
        ``{metric: (B,) float32}``, NaN for empty masks.
    """
    return {
        "pointing_game": pointing_game(maps, masks),
        "energy_in_mask": energy_in_mask(maps, masks),
        "mask_iou": mask_iou(maps, masks, threshold),
    }


# ---------------------------------------------------------------------------------------------------------------
# Collapse indicators of the embedding (is the model learning anything?)
# ---------------------------------------------------------------------------------------------------------------


def _check_embeddings(embeddings: object) -> Tensor:
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a floating (n, D) tensor, got {shape}.")
    if embeddings.shape[0] < 2:
        raise ValueError(f"collapse indicators need at least 2 embeddings, got {embeddings.shape[0]}.")
    return embeddings.to(_acc_dtype(embeddings.device))


def embedding_spread(embeddings: Tensor) -> Tensor:
    """Mean per-dimension standard deviation of the l2-normalised embeddings (the SimSiam collapse indicator).

    ``mean_d std_n(z_nd / ||z_n||)``. A collapsed embedding (every input mapped to one direction) gives ``0``;
    embeddings spread evenly over the unit sphere give about ``1 / sqrt(D)``.

    Args:
        embeddings: ``(n, D)`` embeddings, ``n >= 2``.

    Returns:
        A 0-d float32 tensor, ``>= 0``.
    """
    z = _check_embeddings(embeddings)
    unit, _ = _unit(z)
    return _out(unit.std(dim=0).mean(), embeddings)


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
    z = _check_embeddings(embeddings)
    s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    total = s.sum()
    if not bool(total > 0):
        return _out(torch.zeros((), dtype=z.dtype), embeddings)
    p = s / total
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return _out(entropy.exp(), embeddings)


def map_metrics(
    maps: Mapping[str, Tensor],
    *,
    masks: Tensor | None = None,
    previous: Mapping[str, Tensor] | None = None,
    first: Mapping[str, Tensor] | None = None,
    features: Tensor | None = None,
    threshold: float = 0.5,
) -> dict[str, dict[str, Tensor]]:
    """The cheap metrics (no model call) for every method, per image.

    Per method: ``entropy`` (:func:`map_entropy`), ``gini`` (:func:`gini`); with ``masks``: ``pointing_game``,
    ``energy_in_mask``, ``mask_iou`` (at ``threshold``); with ``previous`` / ``first`` (maps logged at the previous
    / first logging step): ``stability_prev`` / ``stability_first`` (:func:`pearson`; a method missing from those
    dicts is skipped, and so, with a ``RuntimeWarning``, is one whose stored maps have another shape); with several
    methods: ``agreement_<other>`` (:func:`pearson` with each other method's maps). With ``features``, the extra
    entry ``"features"`` holds ``spectral_concentration`` and ``spectral_concentration_centred``
    (:func:`spectral_concentration`), which do not depend on the method.

    Args:
        maps: ``{method: (B, H, W) maps}`` in ``[0, 1]``, all of the same shape.
        masks: ``(B, H', W')`` object masks, or ``None``.
        previous: maps of the previous logging step, or ``None``.
        first: maps of the first logging step, or ``None``.
        features: ``(B, C, h, w)`` features the maps were computed from, or ``None``.
        threshold: IoU threshold, see :func:`mask_iou`.

    Returns:
        ``{method: {metric: (B,) float32}}``, plus ``{"features": {...}}`` when ``features`` is given.
    """
    maps = _check_map_dict(maps, _FEATURES)
    names = list(maps)
    results: dict[str, dict[str, Tensor]] = {}
    for name, m in maps.items():
        out: dict[str, Tensor] = {"entropy": map_entropy(m), "gini": gini(m)}
        if masks is not None:
            out.update(localization_metrics(m, masks, threshold))
        _stability(name, m, previous, "stability_prev", out)
        _stability(name, m, first, "stability_first", out)
        results[name] = out
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            r = pearson(maps[a], maps[b])
            results[a][f"agreement_{b}"] = r
            results[b][f"agreement_{a}"] = r.clone()
    if features is not None:
        uncentred, centred = _spectral_concentrations(features)
        results[_FEATURES] = {"spectral_concentration": uncentred, "spectral_concentration_centred": centred}
    return results


def faithfulness_metrics(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    steps: int = 16,
    seed: int = 0,
    max_batch: int = 256,
    baseline: Baseline = "blur",
) -> dict[str, dict[str, Tensor]]:
    """Embedding faithfulness of every method, beside the same numbers for a random map, per image.

    Per method: ``embedding_drop`` (:func:`embedding_drop`), ``deletion_auc`` (:func:`deletion_auc`),
    ``insertion_auc`` (:func:`insertion_auc`), ``embedding_increase`` and ``embedding_gain``
    (:func:`embedding_increase`, :func:`embedding_gain`: the method against the random map). Under the pseudo-method
    ``"random"``: ``embedding_drop``, ``deletion_auc``, ``insertion_auc`` of :func:`random_maps` (``seed``),
    computed once.

    Everything runs in ``ceil(n / max_batch)`` calls of ``embed_fn`` for
    ``n = B * (2 + (M + 1) * (2 * steps - 1))`` images (``M`` methods): the originals, the baselines (shared by all
    curves), and per map the masked image and the ``steps - 1`` inner points of each curve.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``{method: (B, h, w) maps}`` in ``[0, 1]``.
        steps: curve steps.
        seed: seed of the random maps.
        max_batch: largest batch passed to ``embed_fn``.
        baseline: curve baseline, see :func:`deletion_curve`.

    Returns:
        ``{method: {metric: (B,) float32}, "random": {metric: (B,) float32}}``.
    """
    maps = _check_map_dict(maps, _RANDOM)
    _check_common(images, steps, max_batch)
    names = list(maps)
    image_maps = [_image_maps(maps[name], images, f"maps[{name!r}]") for name in names]
    image_maps.append(random_maps(image_maps[0], seed))
    value_fn, original = _embedding_similarity(embed_fn, images, max_batch)
    res = _perturbation_values(
        value_fn,
        images,
        image_maps,
        steps=steps,
        baseline=baseline,
        max_batch=max_batch,
        drop=True,
        deletion=True,
        insertion=True,
        original=False,
    )
    base, fractions = _present(res.base), res.fractions
    random_kept = res.maps[-1]["drop"]
    results: dict[str, dict[str, Tensor]] = {}
    for name, vals in zip([*names, _RANDOM], res.maps, strict=True):
        out = {
            "embedding_drop": _out(1 - vals["drop"], images),
            "deletion_auc": _out(_auc(_assemble_curve(original, vals["deletion"], base), fractions), images),
            "insertion_auc": _out(_auc(_assemble_curve(base, vals["insertion"], original), fractions), images),
        }
        if name != _RANDOM:
            increase, gain = _relative_to_reference(vals["drop"], random_kept)
            out["embedding_increase"] = _out(increase, images)
            out["embedding_gain"] = _out(gain, images)
        results[name] = out
    return results


def score_metrics(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    steps: int = 16,
    seed: int = 0,
    max_batch: int = 256,
    baseline: Baseline = "blur",
) -> dict[str, dict[str, Tensor]]:
    """Classic confidence metrics of every method and of a random map, per image, in few ``score_fn`` calls.

    Per method and for the pseudo-method ``"random"`` (:func:`random_maps` with ``seed``): ``average_drop``,
    ``average_increase``, ``average_gain`` (percent terms, see :func:`average_drop`), ``score_deletion_auc`` and
    ``score_insertion_auc`` (see :func:`score_deletion_auc`).

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``{method: (B, h, w) maps}`` in ``[0, 1]``.
        steps: curve steps.
        seed: seed of the random maps.
        max_batch: largest batch passed to ``score_fn``.
        baseline: curve baseline, see :func:`deletion_curve`.

    Returns:
        ``{method: {metric: (B,) float32}, "random": {...}}``.
    """
    maps = _check_map_dict(maps, _RANDOM)
    _check_common(images, steps, max_batch)
    names = list(maps)
    image_maps = [_image_maps(maps[name], images, f"maps[{name!r}]") for name in names]
    image_maps.append(random_maps(image_maps[0], seed))
    res = _perturbation_values(
        _score_value_fn(score_fn),
        images,
        image_maps,
        steps=steps,
        baseline=baseline,
        max_batch=max_batch,
        drop=True,
        deletion=True,
        insertion=True,
        original=True,
    )
    y, base, fractions = _present(res.original), _present(res.base), res.fractions
    results: dict[str, dict[str, Tensor]] = {}
    for name, vals in zip([*names, _RANDOM], res.maps, strict=True):
        out = {key: _out(value, images) for key, value in _drop_terms(y, vals["drop"]).items()}
        out["score_deletion_auc"] = _out(_auc(_assemble_curve(y, vals["deletion"], base), fractions), images)
        out["score_insertion_auc"] = _out(_auc(_assemble_curve(base, vals["insertion"], y), fractions), images)
        results[name] = out
    return results


def summarize(per_image: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Reduce per-image metrics to one number per method and metric.

    Each metric becomes its NaN-ignoring mean over images (NaN if no image has a defined value). When images were
    excluded (NaN: an empty mask, an undefined relative drop, non-finite features), their count is reported as
    ``<metric>_excluded`` beside the mean, so the denominator of every number is known.

    Args:
        per_image: ``{method: {metric: (B,) tensor}}`` from :func:`map_metrics`, :func:`faithfulness_metrics` or
            :func:`score_metrics`.

    Returns:
        ``{method: {metric: float, <metric>_excluded: float count (only when > 0)}}``.
    """
    summary: dict[str, dict[str, float]] = {}
    for method, metrics in per_image.items():
        out: dict[str, float] = {}
        for name, values in metrics.items():
            v = values.detach().reshape(-1).cpu().to(torch.float64)
            missing = torch.isnan(v)
            excluded = int(missing.sum())
            out[name] = float(v[~missing].mean()) if excluded < v.numel() else math.nan
            if excluded:
                out[f"{name}_excluded"] = float(excluded)
        summary[method] = out
    return summary
