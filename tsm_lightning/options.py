"""Grouped settings of :class:`~tsm_lightning.callbacks.SaliencyMonitor` and :class:`~tsm_lightning.tracking.Tracker`.

Three small frozen dataclasses, each validated when it is built, so a wrong value fails where it is written, not at
the first monitor run. LightningCLI reads them as nested ``init_args``::

    init_args:
      display: {images: 16, tile_size: 128, colormap: inferno}
      maps: {num_components: 4}
      metrics: {faithfulness_every_n_runs: 5}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from tsm_lightning.checks import check_num_components, check_positive_int
from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD, WEIGHTINGS
from tsm_lightning.render import COLORMAPS
from tsm_lightning.tokens import TokenGridSpec, check_token_grid

__all__ = ["DisplayOptions", "MapOptions", "MetricOptions"]


def _at_least(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    # A positive integer (never a bool) of at least ``minimum``; None too when ``optional``.
    if optional and value is None:
        return
    check_positive_int(value, name)
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}.")


@dataclass(frozen=True)
class DisplayOptions:
    """How the overlays look.

    Attributes:
        images: how many probe images the pictures show (the first ones); metrics always use the whole probe.
        tile_size: side of each picture tile in pixels; ``None``: the probe's own size.
        mean: per-channel mean of the inputs' normalisation, undone for display (ImageNet's by default, as lightly
            uses); ``None`` if the inputs are not normalised.
        std: per-channel standard deviation of that normalisation, or ``None``.
        colormap: one of :data:`~tsm_lightning.render.COLORMAPS`.
        alpha: overlay opacity in ``[0, 1]``.
    """

    images: int = 8
    tile_size: int | None = None
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    colormap: str = "jet"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int(self.images, "DisplayOptions.images")
        _at_least("DisplayOptions.tile_size", self.tile_size, 8, optional=True)
        if self.colormap not in COLORMAPS:
            raise ValueError(f"Unknown colormap {self.colormap!r}; valid colormaps are {tuple(COLORMAPS)}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DisplayOptions.alpha must be a number in [0, 1], got {self.alpha!r}.")
        for name in ("mean", "std"):
            stats = getattr(self, name)
            if stats is None:
                continue
            if isinstance(stats, (str, bytes)) or len(stats) != 3:
                raise ValueError(
                    f"DisplayOptions.{name} must have 3 values (one per RGB channel) or be None, got {stats!r}."
                )
            object.__setattr__(self, name, tuple(float(v) for v in stats))


@dataclass(frozen=True)
class MapOptions:
    """How the monitored layer becomes maps.

    Attributes:
        num_components: components of the multivector methods (``None``: all of them).
        weighting: multivector weighting, one of :data:`~tsm_lightning.core.WEIGHTINGS`.
        token_grid: how a transformer block's ``(B, T, D)`` tokens become a ``(B, D, h, w)`` map: a
            :class:`~tsm_lightning.tokens.TokenGrid` or a callable; default: the model's patch grid, the leading
            class and register tokens dropped (:mod:`tsm_lightning.tokens`).
        attention: the last transformer block's class-token attention, averaged over heads, as one more map beside
            the methods (``saliency/attention``): ``None`` when the monitored layer is a transformer block with a
            class token and its attention module can be read; ``True`` always (an error otherwise); ``False`` never.
        attention_heads: also log ``saliency/attention_heads``, one overlay per head for the displayed images.
    """

    num_components: int | None = None
    weighting: str = "singular"
    token_grid: TokenGridSpec = None
    attention: bool | None = None
    attention_heads: bool = False

    def __post_init__(self) -> None:
        check_num_components(self.num_components)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {self.weighting!r}; valid weightings are {WEIGHTINGS}.")
        if self.attention not in (None, True, False):
            raise ValueError(f"MapOptions.attention must be None (automatic), True or False, got {self.attention!r}.")
        if not isinstance(self.attention_heads, bool):
            raise ValueError(f"MapOptions.attention_heads must be True or False, got {self.attention_heads!r}.")
        check_token_grid(self.token_grid)


@dataclass(frozen=True)
class MetricOptions:
    """Which metrics a run logs.

    Attributes:
        enabled: log the cheap label-free metrics of :func:`tsm_lightning.metrics.map_metrics` (entropy, Gini,
            stability against the previous and first logged maps, agreement between methods, spectral concentration
            of the features; pointing game, energy-in-mask and IoU when masks are known) with their reference
            series. ``SaliencyMonitor(metrics=False)`` is short for ``MetricOptions(enabled=False)``.
        faithfulness_every_n_runs: also log the embedding-faithfulness metrics (embedding drop, deletion and
            insertion AUC, each beside a random map) every this many runs; they cost about
            ``2 * faithfulness_steps * (methods + 1)`` extra probe forward passes. ``None``: never. Not supported
            with sharded parameters (FSDP, DeepSpeed ZeRO-3).
        faithfulness_steps: steps of the deletion/insertion curves.
        embed_fn: ``embed_fn(images) -> (B, D)`` embedding for the faithfulness metrics; default: the monitored
            forward's output (the pooled backbone output for ``"backbone.*"`` layers), flattened.
        stability_reference: once, at the first run, compute the maps of an independently initialised copy of the
            monitored network and log, as reference lines, their correlation with the first maps as
            ``saliency/fresh_init_<method>/stability_first`` (the value ``stability_first`` takes when the maps
            have nothing in common with the first ones but the architecture) and their own ``entropy``, ``gini``
            and ``mass_spread`` as ``saliency/fresh_init_<method>/<metric>``. Needs the default forward rule (no
            ``forward_fn``).
        spread_warning: when training ends, warn if the maps ended more spread out than the fresh-init copy's
            (``saliency/<method>/mass_spread`` above ``saliency/fresh_init_<method>/mass_spread``, judged on the first
            method, TSM by default): in the controlled runs of the README's "What to watch without masks" that
            happened to the models that learned the background and to none that learned the objects. Needs
            ``stability_reference``.
    """

    enabled: bool = True
    faithfulness_every_n_runs: int | None = None
    faithfulness_steps: int = 8
    embed_fn: Callable[[Tensor], Tensor] | None = None
    stability_reference: bool = True
    spread_warning: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "stability_reference", "spread_warning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MetricOptions.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.faithfulness_every_n_runs is not None:
            check_positive_int(self.faithfulness_every_n_runs, "MetricOptions.faithfulness_every_n_runs")
        _at_least("MetricOptions.faithfulness_steps", self.faithfulness_steps, 2)
        if self.embed_fn is not None and not callable(self.embed_fn):
            raise ValueError(f"MetricOptions.embed_fn must be callable or None, got {self.embed_fn!r}.")
