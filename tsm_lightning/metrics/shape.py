"""Label-free shape statistics of saliency maps: blobs, position of the mass, flip consistency, randomisation check.

What a user without masks can still measure of a map: whether its mass sits in one compact blob or in many small
ones, how far it sits from the image border and how spread out it is, whether the map of a horizontally flipped
image is the flipped map, and how close the maps stay to those of a freshly initialised network (the
randomisation check of Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018). Whether any of these
tells a model that learns the object from one that learns the clutter is an empirical question: the measured
answer is in ``benchmarks/label_free_study.py`` and the README's "What to watch without masks".

All functions are batched torch, need no model call, and follow the conventions of :mod:`tsm_lightning.metrics`:
``maps`` are ``(B, H, W)`` floating tensors in ``[0, 1]``; non-finite values count as 0 and negative values are
clipped to 0 where a function reads the map as a mass; results are ``(B,)`` float32 on the maps' device.
Statistics of the map's *shape* are computed on the map as given; call them on the grid-size maps (``(B, h, w)``,
what the decomposition gives) to keep them cheap, or on upsampled maps for a finer grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tsm_lightning.checks import check_maps
from tsm_lightning.metrics._common import flat, out
from tsm_lightning.metrics.agreement import pearson

__all__ = [
    "blob_count",
    "border_distance",
    "connected_components",
    "flip_consistency",
    "fresh_init_similarity",
    "largest_blob_mass",
    "mass_spread",
]


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] (a level relative to each map's maximum), got {threshold!r}.")
    return float(threshold)


def _check_connectivity(connectivity: int) -> int:
    if connectivity not in (4, 8):
        raise ValueError(
            f"connectivity must be 4 (edge neighbours) or 8 (edge and corner neighbours), got {connectivity!r}."
        )
    return connectivity


def _mass(maps: Tensor) -> Tensor:
    """``(B, H, W)`` accumulation-dtype mass: non-finite values 0, negative values clipped to 0."""
    return flat(maps).clamp_min(0).reshape(maps.shape)


def _selected(mass: Tensor, threshold: float) -> Tensor:
    """Pixels at or above ``threshold`` times each map's maximum (every pixel of an all-zero map)."""
    peak = mass.flatten(1).amax(dim=1)[:, None, None]
    return mass >= threshold * peak


def connected_components(selected: Tensor, connectivity: int = 4) -> Tensor:
    """Label the connected components of a batch of binary masks.

    A component is a maximal set of selected pixels linked through edge neighbours (``connectivity=4``) or edge
    and corner neighbours (``connectivity=8``). Labels propagate by repeated maximum over the neighbourhood until
    nothing changes (at most ``H * W`` rounds, usually a few), all images at once.

    Args:
        selected: ``(B, H, W)`` bool masks.
        connectivity: 4 or 8.

    Returns:
        ``(B, H, W)`` int64 labels: 0 outside the selection; inside, ``1 +`` the largest flat pixel index
        (row-major) of the pixel's component, so labels are unique per image but not consecutive.

    Raises:
        ValueError: for a mask that is not ``(B, H, W)`` bool, or another connectivity.
    """
    _check_connectivity(connectivity)
    if not isinstance(selected, Tensor) or selected.dtype != torch.bool or selected.ndim != 3:
        shape = tuple(selected.shape) if isinstance(selected, Tensor) else type(selected).__name__
        raise ValueError(f"selected must be a (B, H, W) bool tensor, got {shape}; threshold a map with m >= t first.")
    h, w = selected.shape[1:]
    index = torch.arange(1, h * w + 1, device=selected.device, dtype=torch.int64).reshape(1, h, w)
    labels = torch.where(selected, index, torch.zeros_like(index))
    for _ in range(h * w):
        p = F.pad(labels, (1, 1, 1, 1))
        neighbours = [p[:, 1:-1, :-2], p[:, 1:-1, 2:], p[:, :-2, 1:-1], p[:, 2:, 1:-1]]
        if connectivity == 8:
            neighbours += [p[:, :-2, :-2], p[:, :-2, 2:], p[:, 2:, :-2], p[:, 2:, 2:]]
        grown = torch.maximum(labels, torch.stack(neighbours).amax(dim=0)) * selected
        # Pointer jumping: a label names a pixel of the same component, whose own label is at least as large.
        flat_labels = grown.flatten(1)
        jumped = flat_labels.gather(1, (flat_labels - 1).clamp_min(0))
        grown = torch.maximum(flat_labels, jumped).reshape(grown.shape) * selected
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels


def _component_masses(maps: Tensor, threshold: float, connectivity: int) -> tuple[Tensor, Tensor]:
    """Per-label mass ``(B, H*W + 1)`` (entry 0: outside the selection) and the total mass ``(B,)``."""
    mass = _mass(maps)
    labels = connected_components(_selected(mass, threshold), connectivity).flatten(1)
    per_label = torch.zeros(mass.shape[0], labels.shape[1] + 1, dtype=mass.dtype, device=mass.device)
    per_label.scatter_add_(1, labels, mass.flatten(1))
    return per_label, mass.flatten(1).sum(dim=1)


def largest_blob_mass(maps: Tensor, threshold: float = 0.5, connectivity: int = 4) -> Tensor:
    """Compactness: the share of the map's mass inside its heaviest connected blob.

    The map is thresholded as ``m >= threshold * max(m)`` (as :func:`~tsm_lightning.metrics.mask_iou`), the
    selected pixels are split into connected blobs (:func:`connected_components`), and
    ``compactness = max_blob sum_{i in blob} m_i / sum_i m_i`` (the mass below the threshold counts in the
    denominator only).

    Range ``[0, 1]``; higher means the map's mass sits in one blob. Expected to rise when a model learns one
    object per image, and to stay low for maps scattered over clutter. A constant (or all-zero) map is one blob
    covering the image and gives 1, so read it beside :func:`~tsm_lightning.metrics.map_entropy`.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).
        threshold: level relative to each map's maximum, in ``[0, 1]``.
        connectivity: 4 or 8 (see :func:`connected_components`).

    Returns:
        ``(B,)`` float32 shares.
    """
    check_maps(maps)
    per_label, total = _component_masses(maps, _check_threshold(threshold), connectivity)
    best = per_label[:, 1:].amax(dim=1)
    return out(torch.where(total > 0, best / torch.where(total > 0, total, torch.ones_like(total)), 1.0), maps)


def blob_count(maps: Tensor, threshold: float = 0.5, connectivity: int = 4) -> Tensor:
    """Number of connected blobs of the thresholded map ``m >= threshold * max(m)``.

    Range ``1 .. ceil(H * W / 2)``; 1 for a map with one blob (and for a constant or all-zero map); higher means
    a more fragmented map.

    Args:
        maps: ``(B, H, W)`` maps.
        threshold: level relative to each map's maximum, in ``[0, 1]``.
        connectivity: 4 or 8 (see :func:`connected_components`).

    Returns:
        ``(B,)`` float32 counts.
    """
    check_maps(maps)
    labels = connected_components(_selected(_mass(maps), _check_threshold(threshold)), connectivity).flatten(1)
    # A component's label is 1 + its largest flat index: exactly one pixel per component carries its own label.
    own = torch.arange(1, labels.shape[1] + 1, device=labels.device)
    return out((labels == own).sum(dim=1), maps)


def _coordinates(h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in ``(0, 1)``: ``(h, 1)`` rows and ``(1, w)`` columns."""
    y = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) / h
    x = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) / w
    return y[:, None], x[None, :]


def _distribution(maps: Tensor) -> Tensor:
    """``(B, H, W)`` mass normalised to sum 1; an all-zero map becomes uniform."""
    mass = _mass(maps)
    total = mass.flatten(1).sum(dim=1)[:, None, None]
    uniform = torch.full_like(mass, 1.0 / (mass.shape[1] * mass.shape[2]))
    return torch.where(total > 0, mass / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def border_distance(maps: Tensor) -> Tensor:
    """Mass-weighted distance of the map from the image border.

    With pixel centres ``y_i = (i + 1/2) / H``, ``x_j = (j + 1/2) / W`` and ``d_ij = min(y_i, 1 - y_i, x_j, 1 -
    x_j) / (1/2)`` (0 at the border, 1 at the centre), ``border_distance = sum_ij p_ij d_ij`` with ``p = m /
    sum(m)``.

    Range ``(0, 1]``: a map on the border pixels scores ``1 / min(H, W)``, a one-pixel map at the centre 1, a
    uniform (or all-zero) map about 1/3 on large grids (the exact value depends on the grid). Higher means mass
    away from the border: padding artefacts and edge-of-frame clutter pull it down.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).

    Returns:
        ``(B,)`` float32 distances.
    """
    check_maps(maps)
    p = _distribution(maps)
    y, x = _coordinates(p.shape[1], p.shape[2], p)
    d = torch.minimum(torch.minimum(y, 1 - y), torch.minimum(x, 1 - x)) * 2
    return out((p * d).flatten(1).sum(dim=1), maps)


def mass_spread(maps: Tensor) -> Tensor:
    """Spread of the map's mass around its centre of mass, relative to a uniform map's.

    With ``p = m / sum(m)`` and pixel-centre coordinates in ``(0, 1)`` (see :func:`border_distance`),
    ``spread = sqrt(Var_p(y) + Var_p(x)) / sqrt(Var_u(y) + Var_u(x))`` where ``u`` is the uniform distribution on
    the same grid (``Var_u(y) = (1 - 1/H^2) / 12``).

    Range ``[0, sqrt(3)]`` on large grids: 0 for a one-pixel map, 1 for a uniform (or all-zero) map, the maximum
    for mass split between two opposite corners. Lower means a more compact map; a map on two distant objects is
    spread even if each part is compact. A ``1 x 1`` map gives 0.

    Args:
        maps: ``(B, H, W)`` maps (negative values clipped to 0).

    Returns:
        ``(B,)`` float32 relative spreads.
    """
    check_maps(maps)
    p = _distribution(maps)
    h, w = p.shape[1], p.shape[2]
    y, x = _coordinates(h, w, p)
    py, px = p.sum(dim=2), p.sum(dim=1)  # (B, H), (B, W) marginals
    y, x = y[:, 0], x[0]
    var = (py * y**2).sum(dim=1) - (py * y).sum(dim=1) ** 2 + (px * x**2).sum(dim=1) - (px * x).sum(dim=1) ** 2
    uniform = (1 - 1 / h**2) / 12 + (1 - 1 / w**2) / 12
    if uniform == 0:
        return out(torch.zeros(p.shape[0]), maps)
    return out((var.clamp_min(0) / uniform).sqrt(), maps)


def flip_consistency(maps: Tensor, maps_of_flipped: Tensor, *, flipped_back: bool = False) -> Tensor:
    """Consistency under horizontal flip: Pearson correlation of ``map(x)`` with ``flip(map(flip(x)))``.

    A flip is one of the augmentations SSL views use, so a model that learned it should give the mirrored map for
    the mirrored image; zero-padding and stride effects break this for maps that follow the architecture rather
    than the content. Costs one extra forward pass of the probe (the flipped images).

    Range ``[-1, 1]`` (see :func:`~tsm_lightning.metrics.pearson` for constant maps); higher is more consistent.

    Args:
        maps: ``(B, H, W)`` maps of the probe images.
        maps_of_flipped: ``(B, H, W)`` maps of the horizontally flipped probe images (``images.flip(-1)``), as
            computed, or already flipped back with ``flipped_back=True``.
        flipped_back: whether ``maps_of_flipped`` is already mirrored back to the original orientation.

    Returns:
        ``(B,)`` float32 correlations.
    """
    check_maps(maps_of_flipped, "maps_of_flipped")
    return pearson(maps, maps_of_flipped if flipped_back else maps_of_flipped.flip(-1))


def fresh_init_similarity(maps: Tensor, fresh_maps: Tensor) -> Tensor:
    """Randomisation check: Pearson correlation of the maps with a freshly initialised network's maps.

    Adebayo et al. (2018) ask that a saliency method's maps change when the model's weights are randomised. Read
    the other way round during training: the correlation of the trained model's maps with those of an
    independently initialised copy of the network (:func:`~tsm_lightning.monitoring.fresh_copy`, same probe)
    says how much of the map is still what the architecture alone produces. It starts near the agreement of two
    random initialisations and should fall as the model learns something of the images.

    Range ``[-1, 1]``; lower means further from the architecture's own maps.

    Args:
        maps: ``(B, H, W)`` maps of the trained model.
        fresh_maps: ``(B, H, W)`` maps of a freshly initialised copy on the same images (computed once).

    Returns:
        ``(B,)`` float32 correlations.
    """
    check_maps(fresh_maps, "fresh_maps")
    return pearson(maps, fresh_maps)
