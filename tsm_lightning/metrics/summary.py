"""The cheap metrics of every method in one call (:func:`map_metrics`), and their reduction (:func:`summarize`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from tsm_lightning.checks import check_maps
from tsm_lightning.core import Decomposition, decompose
from tsm_lightning.metrics._common import spectral_input
from tsm_lightning.metrics.agreement import pearson, stability
from tsm_lightning.metrics.complexity import gini, map_entropy
from tsm_lightning.metrics.faithfulness import check_map_dict
from tsm_lightning.metrics.localization import localization_metrics
from tsm_lightning.metrics.shape import mass_spread
from tsm_lightning.metrics.spectra import spectral_metrics

__all__ = ["FEATURES", "map_metrics", "summarize"]

FEATURES = "features"
"""Name of the entry of :func:`map_metrics` holding the metrics of the features, which do not depend on the method."""


def map_metrics(
    maps: Mapping[str, Tensor],
    *,
    masks: Tensor | None = None,
    previous: Mapping[str, Tensor] | None = None,
    first: Mapping[str, Tensor] | None = None,
    features: Tensor | None = None,
    decomposition: Decomposition | None = None,
    threshold: float = 0.5,
) -> dict[str, dict[str, Tensor]]:
    """The cheap metrics (no model call) for every method, per image.

    Per method: ``entropy`` (:func:`map_entropy`), ``gini`` (:func:`gini`), ``mass_spread``
    (:func:`~tsm_lightning.metrics.mass_spread`: how far the map's mass spreads around its centre, 1 for a uniform
    map); with ``masks``: ``pointing_game``,
    ``energy_in_mask``, ``mask_iou`` (at ``threshold``); with ``previous`` / ``first`` (maps logged at the previous
    / first logging step): ``stability_prev`` / ``stability_first`` (:func:`pearson`; a method missing from those
    dicts is skipped, and so, with a ``RuntimeWarning``, is one whose stored maps have another shape); with several
    methods: ``agreement_<other>`` (:func:`pearson` with each other method's maps). With ``features`` (or the
    ``decomposition`` the maps were computed from, which saves decomposing them again), the extra entry
    ``"features"`` holds ``spectral_concentration`` and ``spectral_concentration_centred``
    (:func:`~tsm_lightning.metrics.spectral_metrics`), which do not depend on the method.

    Args:
        maps: ``{method: (B, H, W) maps}`` in ``[0, 1]``, all of the same shape.
        masks: ``(B, H', W')`` object masks, or ``None``.
        previous: maps of the previous logging step, or ``None``.
        first: maps of the first logging step, or ``None``.
        features: ``(B, C, h, w)`` features the maps were computed from, or ``None``.
        decomposition: their decomposition with every component (:func:`~tsm_lightning.core.decompose`), used
            instead of decomposing ``features``.
        threshold: IoU threshold, see :func:`mask_iou`.

    Returns:
        ``{method: {metric: (B,) float32}}``, plus ``{"features": {...}}`` when ``features`` or ``decomposition`` is
        given.
    """
    maps = check_map_dict(maps, FEATURES)
    for name, m in maps.items():
        check_maps(m, f"maps[{name!r}]")
    names = list(maps)
    results: dict[str, dict[str, Tensor]] = {}
    for name, m in maps.items():
        values: dict[str, Tensor] = {"entropy": map_entropy(m), "gini": gini(m), "mass_spread": mass_spread(m)}
        if masks is not None:
            values.update(localization_metrics(m, masks, threshold))
        for key, stored in (("stability_prev", previous), ("stability_first", first)):
            r = stability(m, stored, name, key)
            if r is not None:
                values[key] = r
        results[name] = values
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            r = pearson(maps[a], maps[b])
            results[a][f"agreement_{b}"] = r
            results[b][f"agreement_{a}"] = r.clone()
    if decomposition is None and features is not None:
        decomposition = decompose(spectral_input(features))
    if decomposition is not None:
        results[FEATURES] = spectral_metrics(decomposition)
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
