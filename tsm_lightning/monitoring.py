"""What one monitor run makes of an explained probe batch: pictures, metrics and their reference series.

No Lightning here: :class:`~tsm_lightning.callbacks.SaliencyMonitor` decides when and where a run happens, calls
:func:`~tsm_lightning.pipeline.capture_features` and :func:`~tsm_lightning.pipeline.maps_of`, then these functions,
then hands the result to :mod:`tsm_lightning.sinks`. Tags are ``saliency/<method or reference>/<metric>`` and
``saliency/<method>`` / ``saliency/all`` for the pictures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsm_lightning.core import Decomposition, normalize_maps, upsample_maps
from tsm_lightning.metrics import (
    effective_rank,
    embedding_spread,
    faithfulness_metrics,
    localization_metrics,
    map_metrics,
    pearson,
    random_maps,
    summarize,
)
from tsm_lightning.render import comparison_grid, denormalize, method_strip, overlay, to_uint8
from tsm_lightning.rng import preserved_rng

__all__ = [
    "attention_head_pictures",
    "collapse_scalars",
    "display_tiles",
    "fresh_copy",
    "fresh_init_scalars",
    "localization_references",
    "per_image_metrics",
    "pictures",
    "scalars",
    "spread_warning",
]

FRESH_INIT_METRICS = ("entropy", "gini", "mass_spread")
"""Label-free metrics also computed on a freshly initialised network's maps, as their reference lines."""


def display_tiles(
    images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The probe images shown: ``(inputs in [0, 1], uint8 tiles)``, normalisation undone, resized to ``size``."""
    inputs = denormalize(images, mean, std)
    if size is not None and inputs.shape[-1] != size:
        inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return inputs, to_uint8(inputs)


def pictures(
    maps: Mapping[str, Tensor],
    full: Mapping[str, Tensor] | None,
    inputs: Tensor,
    tiles: Tensor,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> dict[str, Tensor]:
    """``saliency/<method>`` strips and the ``saliency/all`` grid of the first ``len(inputs)`` probe images.

    Args:
        maps: ``{method: (B, h, w)}`` maps at the features' grid.
        full: the same maps at the probe's size if they were upsampled already (used when the tiles have that size).
        inputs: ``(n, 3, H, W)`` shown images in ``[0, 1]`` (:func:`display_tiles`).
        tiles: the same as uint8.
        colormap: see :data:`~tsm_lightning.render.COLORMAPS`.
        alpha: overlay opacity.
    """
    count, size = inputs.shape[0], (inputs.shape[-2], inputs.shape[-1])
    if full is not None and next(iter(full.values())).shape[-2:] == size:
        shown = {name: m[:count] for name, m in full.items()}
    else:
        shown = {name: upsample_maps(m[:count], size) for name, m in maps.items()}
    overlays = {name: overlay(inputs, m, colormap, alpha) for name, m in shown.items()}
    out = {f"saliency/{name}": method_strip(tiles, row, name) for name, row in overlays.items()}
    out["saliency/all"] = comparison_grid(tiles, overlays)
    return out


def attention_head_pictures(
    attention: Tensor, inputs: Tensor, tiles: Tensor, *, colormap: str = "jet", alpha: float = 0.5
) -> dict[str, Tensor]:
    """``saliency/attention_heads``: one row per shown image, the input then one overlay per attention head.

    Args:
        attention: ``(B, heads, h, w)`` class-token attention (each head normalised here).
        inputs: ``(n, 3, H, W)`` shown images in ``[0, 1]`` (:func:`display_tiles`).
        tiles: the same as uint8.
        colormap: see :data:`~tsm_lightning.render.COLORMAPS`.
        alpha: overlay opacity.
    """
    count, size = inputs.shape[0], (inputs.shape[-2], inputs.shape[-1])
    heads = attention[:count]
    overlays = {
        f"head {index}": overlay(inputs, upsample_maps(normalize_maps(heads[:, index]), size), colormap, alpha)
        for index in range(heads.shape[1])
    }
    return {"saliency/attention_heads": comparison_grid(tiles, overlays)}


def per_image_metrics(
    maps: Mapping[str, Tensor],
    decomposition: Decomposition,
    *,
    full: Mapping[str, Tensor] | None = None,
    masks: Tensor | None = None,
    previous: Mapping[str, Tensor] | None = None,
    first: Mapping[str, Tensor] | None = None,
    faithfulness: tuple[Callable[[Tensor], Tensor], Tensor, int] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Every metric of a run, per image.

    :func:`~tsm_lightning.metrics.map_metrics` on the grid-size maps (the spectral ones read from
    ``decomposition``), localization on ``full`` against ``masks``, and with ``faithfulness = (embed_fn, images,
    steps)`` :func:`~tsm_lightning.metrics.faithfulness_metrics` on ``full``.
    """
    per_image = map_metrics(maps, previous=previous, first=first, decomposition=decomposition)
    if masks is not None and full is not None:
        for name, m in full.items():
            per_image[name].update(localization_metrics(m, masks))
    if faithfulness is not None and full is not None:
        embed_fn, images, steps = faithfulness
        for name, values in faithfulness_metrics(embed_fn, images, dict(full), steps=steps).items():
            per_image.setdefault(name, {}).update(values)
    return per_image


def scalars(per_image: Mapping[str, Mapping[str, Tensor]], references: Mapping[str, float]) -> dict[str, float]:
    """The scalars of a run: ``saliency/<name>/<metric>`` means over the probe, then the reference series.

    Means are :func:`~tsm_lightning.metrics.summarize`'s; undefined (NaN) values are left out.
    """
    out = {
        f"saliency/{name}/{metric}": value
        for name, values in summarize(per_image).items()
        for metric, value in values.items()
    }
    out.update(references)
    return {tag: value for tag, value in out.items() if math.isfinite(value)}


def localization_references(masks: Tensor, seed: int) -> dict[str, float]:
    """Localization of a fixed random map, and chance (a uniformly random pixel / a uniform map): the mask area."""
    random = summarize({"random": localization_metrics(random_maps(masks.float(), seed=seed), masks)})
    out = {f"saliency/random/{metric}": value for metric, value in random["random"].items()}
    areas = masks.flatten(1).float().mean(dim=1)
    chance = float(areas[areas > 0].mean()) if bool((areas > 0).any()) else math.nan
    out["saliency/chance/pointing_game"] = chance
    out["saliency/chance/energy_in_mask"] = chance
    return out


def collapse_scalars(output: object, references: dict[str, float]) -> dict[str, float]:
    """Collapse indicators of the monitored forward's output (``saliency/embedding/*``).

    Those of isotropic Gaussian embeddings of the same shape go into ``references`` once (``saliency/isotropic/*``):
    a constant, what a non-collapsed embedding scores. Nothing for an output that is not a batch of embeddings.
    """
    if not isinstance(output, Tensor) or output.ndim < 2 or output.shape[0] < 2 or not output.is_floating_point():
        return {}
    embeddings = output.detach().flatten(1).float()
    if "saliency/isotropic/spread" not in references:
        isotropic = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0))
        references["saliency/isotropic/spread"] = float(embedding_spread(isotropic))
        references["saliency/isotropic/effective_rank"] = float(effective_rank(isotropic))
    return {
        "saliency/embedding/spread": float(embedding_spread(embeddings)),
        "saliency/embedding/effective_rank": float(effective_rank(embeddings)),
    }


def fresh_copy(module: nn.Module, seed: int) -> nn.Module:
    """An independently initialised copy of ``module``, drawn under ``seed``, at the scale of ``module``'s tensors.

    Every floating-point parameter with more than one value is redrawn from a normal distribution with that
    tensor's own mean and standard deviation, so the copy keeps the scale of each tensor but shares no values with
    ``module``; a constant tensor (BatchNorm's initial weight and bias, a zero-initialised class token) stays as it
    is, and normalisation layers forget their running statistics. Called on the network at its first logged step,
    this draws from the network's own initialisation, whatever scheme its constructor used (a layer's
    ``reset_parameters`` would draw PyTorch's default instead: for a Kaiming-normal ResNet that is a different
    network, whose maps are measurably flatter). The global RNG streams are left as they were.
    """
    fresh = copy.deepcopy(module)
    with preserved_rng(seed), torch.no_grad():
        for sub in fresh.modules():
            reset = getattr(sub, "reset_running_stats", None)
            if callable(reset):
                reset()
        for param in fresh.parameters():
            if param.numel() > 1 and param.is_floating_point():
                mean, std = param.mean(), param.std()
                param.normal_().mul_(std).add_(mean)
    return fresh


def fresh_init_scalars(fresh: Mapping[str, Tensor], first: Mapping[str, Tensor]) -> dict[str, float]:
    """The fresh-initialisation reference lines, ``saliency/fresh_init_<method>/<metric>``.

    ``stability_first``: the first maps against a freshly initialised network's (what the series reads once the
    maps have nothing in common with the first ones but the architecture); ``entropy``, ``gini``, ``mass_spread``
    (:data:`FRESH_INIT_METRICS`): those of the fresh network's maps, means over the probe (where a model's maps
    start before training has shaped them).

    Args:
        fresh: ``{method: (B, h, w)}`` maps of the freshly initialised copy.
        first: ``{method: (B, h, w)}`` maps of the first run.
    """
    out = {}
    for name, values in summarize(map_metrics(dict(fresh))).items():
        if name in fresh:
            out.update({f"saliency/fresh_init_{name}/{metric}": values[metric] for metric in FRESH_INIT_METRICS})
    for name, m in fresh.items():
        out[f"saliency/fresh_init_{name}/stability_first"] = float(pearson(m, first[name].to(m.device)).nanmean())
    return out


def spread_warning(scalars: Mapping[str, float], methods: Sequence[str]) -> str | None:
    """The end-of-training warning: the maps ended more spread out than a freshly initialised network's.

    Judged on TSM if it is among ``methods``, else on the first of them, with both ``saliency/<method>/mass_spread``
    and its fresh-init reference in ``scalars``. In the controlled runs of ``benchmarks/label_free_study.py`` (the
    README's "What to watch without masks") this happened at the last step of the runs that learned the background
    and of none that learned the object; the rule fits no threshold (the reference is the architecture's own), but
    it was measured on one synthetic dataset and small models only.

    Returns:
        The message, or ``None`` when the maps ended more compact than the reference or nothing can be judged.
    """
    for name in sorted(methods, key=lambda name: name != "tsm"):
        value = scalars.get(f"saliency/{name}/mass_spread")
        reference = scalars.get(f"saliency/fresh_init_{name}/mass_spread")
        if value is None or reference is None:
            continue
        if value <= reference:
            return None
        return (
            f"SaliencyMonitor: at the end of training the {name} maps are more spread out than a freshly "
            f"initialised network's (saliency/{name}/mass_spread {value:.3f} > reference {reference:.3f}). In "
            "controlled runs this happened when the model had learned the background rather than the objects: look "
            f"at the saliency/{name} pictures. (Pass metrics=MetricOptions(spread_warning=False) to silence this.)"
        )
    return None
