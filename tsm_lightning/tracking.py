"""The run object: a fixed probe's saliency followed across the runs of one training, with no Lightning in it.

A :class:`Tracker` owns everything one monitor run does and the state that links the runs: the probe and the layer
(resolved once), the probe forward with its capture, the maps, the metrics with their reference series, and the
pictures. :class:`~tsm_lightning.callbacks.SaliencyMonitor` is Lightning wiring over one tracker (when a run happens,
on which rank, where the result goes); a plain training loop, a benchmark or a test can use it directly::

    tracker = Tracker(layer="backbone.7")
    tracker.prepare(model, Probe(images, masks))
    result = tracker.run(model, step=0)        # RunResult: pictures, scalars, maps
    result.scalars["saliency/tsm/pointing_game"]

A run is the package's one pipeline (:func:`~tsm_lightning.pipeline.capture_features`,
:func:`~tsm_lightning.pipeline.maps_of`) followed by :mod:`tsm_lightning.monitoring`'s pictures and metrics. Every
scalar is the mean over **every** probe image; the pictures show the first ``display.images``. The reference series
(a fixed random map, chance, isotropic embeddings, a freshly initialised network) are computed once, at the first
run, from the whole probe, and logged unchanged at every run.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, call_network, forward_target, get_layer
from tsm_lightning.constants import METHODS
from tsm_lightning.core import Decomposition, upsample_maps, validate_methods
from tsm_lightning.core.spectral import autocast_off
from tsm_lightning.discovery import choose_monitored, search_root
from tsm_lightning.metrics import default_embed_fn
from tsm_lightning.monitoring import (
    attention_head_pictures,
    collapse_scalars,
    display_tiles,
    fresh_copy,
    fresh_init_scalars,
    localization_references,
    per_image_metrics,
    pictures,
    scalars,
)
from tsm_lightning.options import DisplayOptions, MapOptions, MetricOptions
from tsm_lightning.pipeline import Captured, attention_module, capture_features, maps_of
from tsm_lightning.probe import Probe, ProbeFn, build_probe
from tsm_lightning.rng import preserved_rng

__all__ = ["PHASES", "RunResult", "Tracker"]

PHASES = ("forward", "maps", "metrics", "pictures")
"""The parts of a run that :attr:`RunResult.seconds` times: the probe forward with its capture, the decomposition
and maps, the metrics with their references, the pictures (upsampling, overlays, grids)."""

GatherFn = Callable[[nn.Module], contextlib.AbstractContextManager[None]]
"""``gather(module)``: a context in which ``module``'s full parameters are available (sharded training)."""


@dataclass
class RunResult:
    """What one run made.

    Attributes:
        step: the training step it describes.
        pictures: ``{tag: (3, H, W) uint8}`` on the CPU (``saliency/<method>``, ``saliency/all``, ...).
        scalars: ``{tag: value}``: ``saliency/<method>/<metric>`` means over the whole probe, then the references.
        maps: ``{name: (B, h, w)}`` maps of every probe image at the features' grid, in ``[0, 1]``.
        seconds: ``{phase: seconds}`` for each of :data:`PHASES`.
    """

    step: int
    pictures: dict[str, Tensor]
    scalars: dict[str, float]
    maps: dict[str, Tensor]
    seconds: dict[str, float] = field(default_factory=dict)


class Tracker:
    """Follows a fixed probe batch's saliency maps and metrics across the runs of one training.

    Args:
        layer: dotted module name, relative to the model given to :meth:`prepare`; ``None`` picks a ViT's last
            block, else the deepest layer with a spatial map of a useful size (searched in ``model.backbone`` when
            it exists) and warns once, naming the layer and its grid.
        methods: any of :data:`~tsm_lightning.METHODS`.
        forward_fn: ``forward_fn(model, images)`` running the part of the model that contains ``layer``; by default
            the top-level child named by the first part of ``layer`` (``model.backbone(images)`` for
            ``"backbone.7"``), or ``model(images)`` for a layer directly under the model.
        display: how the pictures look (:class:`~tsm_lightning.options.DisplayOptions`).
        maps: how the layer becomes maps (:class:`~tsm_lightning.options.MapOptions`).
        metrics: which metrics are computed (:class:`~tsm_lightning.options.MetricOptions`).
        seed: seed of the random-map and fresh-initialisation references (and of augmentations applied while a
            probe is drawn from data by :meth:`build_probe`).
        gather: for sharded parameters, ``gather(module)`` makes ``module``'s full parameters available for a
            forward; ``None`` (unsharded) gathers nothing.
    """

    def __init__(
        self,
        layer: str | None = None,
        methods: str | Sequence[str] = METHODS,
        *,
        forward_fn: ForwardFn | None = None,
        display: DisplayOptions | None = None,
        maps: MapOptions | None = None,
        metrics: MetricOptions | None = None,
        seed: int = 0,
        gather: GatherFn | None = None,
    ) -> None:
        self.layer = layer
        self.methods = validate_methods(methods)
        self.forward_fn = forward_fn
        self.display = display if display is not None else DisplayOptions()
        self.map_options = maps if maps is not None else MapOptions()
        self.metric_options = metrics if metrics is not None else MetricOptions()
        self.seed = seed
        self.gather = gather
        self.probe: Probe | None = None
        self.resolved_layer: str | None = layer
        self.attention_module: str | None = None
        self.logged_steps: list[int] = []
        self.first_maps: dict[str, Tensor] | None = None
        self.previous_maps: dict[str, Tensor] | None = None
        self.references: dict[str, float] = {}
        self._tiles: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def build_probe(self, source: object, num_images: int | None = None, *, probe_fn: ProbeFn | None = None) -> Probe:
        """Draw the probe from ``source`` (see :func:`~tsm_lightning.probe.build_probe`) under this tracker's seed."""
        return build_probe(source, num_images, probe_fn=probe_fn, seed=self.seed)

    def prepare(self, model: nn.Module, probe: Probe | None = None) -> None:
        """Move the probe to the model's device, resolve the layer and the attention module.

        Args:
            model: the model (a LightningModule, or any ``nn.Module``).
            probe: the probe; ``None`` keeps the one already set (e.g. restored by :meth:`load_state_dict`).
        """
        probe = probe if probe is not None else self.probe
        if probe is None:
            raise ValueError("Tracker.prepare needs a probe: pass probe=Probe(images, masks) or build_probe(source).")
        device = _device_of(model)
        if probe.images.device.type != "cpu" and probe.images.device != device:
            raise ValueError(
                f"The probe is on {probe.images.device} but the model is on {device}. Pass the probe on the CPU (it "
                "is moved to the model's device once) or on the model's device."
            )
        self.probe = probe.to(device)
        self._tiles = None
        if self.resolved_layer is None:
            target = search_root(model)[1] if self.forward_fn is None else model
            with self._gathered(target):
                self.resolved_layer = self._discover_layer(model)
        else:
            get_layer(model, self.resolved_layer)
        self.attention_module = attention_module(model, self.resolved_layer, self.map_options.attention)

    def _discover_layer(self, model: nn.Module) -> str:
        images = self.model_input(model)
        try:
            chosen = choose_monitored(model, images, self.forward_fn, token_grid=self.map_options.token_grid)
        except ValueError as err:
            raise ValueError(f"SaliencyMonitor {err}") from None
        warnings.warn(
            f"SaliencyMonitor: no layer given, monitoring {chosen.text}. Pass layer= to choose another.",
            UserWarning,
            stacklevel=3,
        )
        return chosen.layer

    # ------------------------------------------------------------------------------------------------ one run
    def model_input(self, model: nn.Module) -> Tensor:
        """The probe images in the model's floating dtype (e.g. bfloat16 under ``precision="bf16-true"``)."""
        probe = self._probe()
        images = probe.images
        param = next(model.parameters(), None)
        if param is not None and param.is_floating_point() and param.dtype != images.dtype:
            images = images.to(param.dtype)
        return images

    def forward(self, model: nn.Module, images: Tensor) -> object:
        """Run the part of ``model`` that holds the layer (``forward_fn`` if given, else the forward rule)."""
        if self.forward_fn is not None:
            return self.forward_fn(model, images)
        return call_network(forward_target(model, self._layer()), images)

    def capture(self, model: nn.Module) -> Captured:
        """The probe forward with the layer captured: ``(features (B, C, h, w) float32, output, attention)``.

        With sharded parameters every rank must call it (the parameters are gathered inside).
        """
        layer = self._layer()
        return self._capture(
            model,
            layer,
            lambda images: self.forward(model, images),
            forward_target(model, layer),
            self.attention_module,
        )

    def _capture(
        self,
        module: nn.Module,
        layer: str,
        forward: Callable[[Tensor], object],
        gathered: nn.Module | None,
        attention: str | None,
    ) -> Captured:
        return capture_features(
            module,
            self.model_input(module),
            layer,
            forward_fn=lambda _module, images: forward(images),
            gathered=self._gathered(gathered),
            finite=True,
            token_grid=self.map_options.token_grid,
            attention=attention,
            attention_required=self.map_options.attention is True,
        )

    def maps(self, features: Tensor, attention: Tensor | None = None) -> tuple[Decomposition, dict[str, Tensor]]:
        """One decomposition of ``features`` and the maps read from it (the attention map beside them)."""
        return maps_of(
            features,
            self.methods,
            num_components=self.map_options.num_components,
            weighting=self.map_options.weighting,
            spectra=self.metric_options.enabled,
            attention=attention,
        )

    def compute(self, model: nn.Module, features: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The probe's ``(features, maps)`` without logging anything or changing the model.

        Args:
            model: the prepared model.
            features: features already captured (e.g. by :meth:`capture` on every rank); ``None`` captures here.

        Returns:
            ``features`` ``(B, C, h, w)`` float32 and ``{name: (B, h, w)}`` maps in ``[0, 1]`` for every probe image
            (plus ``"attention"`` when the class-token attention is monitored and ``features`` is ``None``).
        """
        attention = None
        if features is None:
            features, _, attention = self.capture(model)
        return features, self.maps(features, attention)[1]

    def run(self, model: nn.Module, step: int, captured: Captured | None = None) -> RunResult:
        """Compute the maps, metrics and pictures of this step, and remember the maps for the next runs.

        Args:
            model: the prepared model.
            step: the training step the run describes.
            captured: the probe forward's result when it already ran (on every rank under sharding); ``None`` runs
                it here.
        """
        probe = self._probe()
        seconds = dict.fromkeys(PHASES, 0.0)
        with _timed(seconds, "forward"):
            features, output, attention = captured if captured is not None else self.capture(model)
        with _timed(seconds, "maps"):
            decomposition, maps = self.maps(features, attention)
        options = self.metric_options
        every = options.faithfulness_every_n_runs
        faithful = options.enabled and every is not None and (len(self.logged_steps) + 1) % every == 0
        with _timed(seconds, "pictures"):
            # Upsampled once, to the probe's size, and only when a metric needs them (the masks are that size).
            full = None
            if options.enabled and (probe.masks is not None or faithful):
                full = {name: upsample_maps(m, probe.images.shape[-2:]) for name, m in maps.items()}
            images = self.pictures(maps, full, attention)
        with _timed(seconds, "metrics"):
            values = self.scalars(model, decomposition, maps, full, output, faithful) if options.enabled else {}
        self.previous_maps = {name: m.detach().cpu() for name, m in maps.items()}
        if self.first_maps is None:
            self.first_maps = self.previous_maps
        self.logged_steps.append(step)
        return RunResult(step, images, values, maps, seconds)

    def pictures(
        self, maps: Mapping[str, Tensor], full: Mapping[str, Tensor] | None = None, attention: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The pictures of a run for the first ``display.images`` probe images, as CPU uint8 tensors."""
        display = self.display
        if self._tiles is None:
            shown = self._probe().images[: display.images]
            self._tiles = display_tiles(shown, display.mean, display.std, display.tile_size)
        out = pictures(maps, full, *self._tiles, colormap=display.colormap, alpha=display.alpha)
        if self.map_options.attention_heads and attention is not None:
            out.update(attention_head_pictures(attention, *self._tiles, colormap=display.colormap, alpha=display.alpha))
        return {tag: picture.cpu() for tag, picture in out.items()}

    def scalars(
        self,
        model: nn.Module,
        decomposition: Decomposition,
        maps: dict[str, Tensor],
        full: dict[str, Tensor] | None,
        output: object,
        faithful: bool = False,
    ) -> dict[str, float]:
        """Label-free metrics averaged over the whole probe as ``saliency/<name>/<metric>``, with the references.

        The references are computed at the first run and kept: a fixed random map and chance from every probe
        mask, isotropic embeddings of the output's shape, a freshly initialised network's ``stability_first``.
        """
        probe = self._probe()
        faithfulness = None
        if faithful:
            embed = self.metric_options.embed_fn or default_embed_fn(model, forward_fn=self.forward)
            faithfulness = (embed, self.model_input(model), self.metric_options.faithfulness_steps)
        with preserved_rng(), autocast_off(probe.images.device):
            per_image = per_image_metrics(
                maps,
                decomposition,
                full=full,
                masks=probe.masks,
                previous=self.previous_maps,
                first=self.first_maps,
                faithfulness=faithfulness,
            )
        collapse = collapse_scalars(output, self.references)
        if self.first_maps is None and self.metric_options.stability_reference:
            self.references.update(self.fresh_init_references(model, maps))
        if probe.masks is not None and not any(key.startswith("saliency/random/") for key in self.references):
            self.references.update(localization_references(probe.masks, self.seed))
        return scalars(per_image, {**collapse, **self.references})

    def fresh_init_references(self, model: nn.Module, first: Mapping[str, Tensor]) -> dict[str, float]:
        """Reference lines from an independently initialised copy of the monitored network.

        ``saliency/fresh_init_<method>/stability_first`` (the first maps against the copy's) and the copy's own
        ``entropy``, ``gini`` and ``mass_spread`` (:func:`~tsm_lightning.monitoring.fresh_init_scalars`).

        ``{}`` when the forward is user-defined, the layer sits directly under the model, or the parameters are
        sharded: there is no copy to make of those.
        """
        layer = self._layer()
        target = forward_target(model, layer)
        if self.forward_fn is not None or target is model or self.gather is not None:
            return {}
        fresh = fresh_copy(target, self.seed + 1)
        attention = self.attention_module
        inner = attention.split(".", 1)[1] if attention is not None else None  # both are under the same child
        forward = functools.partial(call_network, fresh)  # called as the monitored network is
        features, _, heads = self._capture(fresh, layer.split(".", 1)[1], forward, fresh, inner)
        del fresh
        return fresh_init_scalars(self.maps(features, heads)[1], first)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the probe itself, the layer, the logged steps and the drift baselines."""
        probe = self.probe
        return {
            "probe_images": probe.images.detach().cpu() if probe is not None else None,
            "probe_masks": probe.masks.detach().cpu() if probe is not None and probe.masks is not None else None,
            "layer": self.resolved_layer,
            "logged_steps": list(self.logged_steps),
            "first_maps": self.first_maps,
            "previous_maps": self.previous_maps,
            "references": dict(self.references),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state.get("probe_images") is not None:
            self.probe = Probe(state["probe_images"], state.get("probe_masks"))
            self._tiles = None
        self.resolved_layer = state.get("layer") or self.resolved_layer
        self.logged_steps = list(state.get("logged_steps", []))
        self.first_maps = state.get("first_maps")
        self.previous_maps = state.get("previous_maps")
        self.references = dict(state.get("references", {}))

    # ------------------------------------------------------------------------------------------------ helpers
    def _probe(self) -> Probe:
        if self.probe is None:
            raise RuntimeError("The tracker has no probe yet: call prepare(model, probe) first.")
        return self.probe

    def _layer(self) -> str:
        if self.resolved_layer is None:
            raise RuntimeError("The tracker has no layer yet: call prepare(model, probe) first.")
        return self.resolved_layer

    def _gathered(self, target: nn.Module | None) -> contextlib.AbstractContextManager[None]:
        if self.gather is None or target is None:
            return contextlib.nullcontext()
        return self.gather(target)


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)  # a LightningModule's
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start
