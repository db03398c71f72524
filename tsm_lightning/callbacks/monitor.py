"""SaliencyMonitor: log how a fixed probe batch's saliency evolves while a model trains.

The callback holds Lightning wiring only -- when a run happens, on which rank, and the state a checkpoint keeps.
A run is the package's one pipeline: the probe (:mod:`tsm_lightning.probe`) through
:func:`~tsm_lightning.pipeline.capture_features` and :func:`~tsm_lightning.pipeline.maps_of`, pictures and metrics
by :mod:`tsm_lightning.monitoring`, written by :mod:`tsm_lightning.sinks`; sharded training by
:mod:`tsm_lightning.callbacks.sharding`. Most of this file's length is the documented, validated arguments.
The implementation is one mixin, :class:`SaliencyMonitorMixin`, combined with ``lightning.pytorch.Callback``
here and with ``pytorch_lightning.Callback`` in :mod:`tsm_lightning.callbacks.pl`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from torch import Tensor

from tsm_lightning.callbacks.sharding import Sharding, detect_sharding
from tsm_lightning.capture import forward_target, get_layer
from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD, METHODS, WEIGHTINGS
from tsm_lightning.core import Decomposition, upsample_maps, validate_methods
from tsm_lightning.core.spectral import autocast_off
from tsm_lightning.discovery import candidate_layers, choose_layer, search_root
from tsm_lightning.metrics import default_embed_fn
from tsm_lightning.monitoring import (
    attention_head_pictures,
    collapse_scalars,
    display_tiles,
    fresh_copy,
    localization_references,
    per_image_metrics,
    pictures,
    scalars,
    stability_references,
)
from tsm_lightning.pipeline import Captured, attention_module, capture_features, maps_of
from tsm_lightning.probe import Probe, ProbeFn, build_probe, check_probe_source
from tsm_lightning.render import COLORMAPS
from tsm_lightning.rng import preserved_rng
from tsm_lightning.sinks import Sink, is_tensorboard, sinks_for_loggers
from tsm_lightning.tokens import TokenGridSpec, check_token_grid

__all__ = ["DEFAULT_EVERY_N_STEPS", "REFERENCE_NAMES", "SaliencyMonitor", "SaliencyMonitorMixin"]

DEFAULT_EVERY_N_STEPS = 200
"""Cadence when neither ``every_n_steps`` nor ``every_n_epochs`` is given."""

ForwardFn = Callable[[Any, Tensor], object]

REFERENCE_NAMES = ("random", "chance", "isotropic")
"""Names of the reference series logged beside the methods' metrics (``saliency/<reference>/<metric>``), plus one
``fresh_init_<method>`` per method for ``stability_first``: lines a curve is read against."""


class SaliencyMonitorMixin:
    """Implementation of :class:`SaliencyMonitor`, shared by the ``lightning`` and ``pytorch_lightning`` flavours."""

    def __init__(
        self,
        probe: Any = None,
        *,
        layer: str | None = None,
        methods: str | Sequence[str] = METHODS,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        num_images: int | None = None,
        display_images: int = 8,
        image_size: int | None = None,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        colormap: str = "jet",
        alpha: float = 0.5,
        forward_fn: ForwardFn | None = None,
        probe_fn: ProbeFn | None = None,
        masks: Tensor | None = None,
        num_components: int | None = None,
        weighting: str = "singular",
        log_on_fit_start: bool = True,
        log_on_fit_end: bool = True,
        metrics: bool = True,
        faithfulness_every_n_runs: int | None = None,
        faithfulness_steps: int = 8,
        embed_fn: Callable[[Tensor], Tensor] | None = None,
        stability_reference: bool = True,
        token_grid: TokenGridSpec = None,
        attention: bool | None = None,
        attention_heads: bool = False,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        """Create the monitor; every argument is validated here or, where it needs the model, at ``setup``.

        Args:
            probe: the fixed probe: a ``(B, 3, H, W)`` tensor (normalised as the model expects), a ``Dataset``, a
                ``DataLoader``, a path to an image folder, or ``None`` to take the first ``num_images`` samples of
                the datamodule's validation data, else of the training data. Nested SSL batches are unwrapped
                as documented in :mod:`tsm_lightning.probe`; masks that come with augmented views are never used
                (the probe is drawn without augmentation where the dataset allows, else localization is skipped).
            layer: dotted module name relative to the LightningModule, e.g. ``"backbone.7"`` or, for a vision
                transformer, ``"backbone.encoder.layers.encoder_layer_11"``; ``None`` picks a ViT's last block, else
                the deepest layer with a spatial map of a useful size (searched in ``pl_module.backbone`` when it
                exists) and warns once, naming the layer and its grid.
            methods: any of :data:`~tsm_lightning.METHODS`.
            every_n_steps: run every this many optimizer steps.
            every_n_epochs: run at the end of every this many epochs. Give at most one of the two; with neither,
                ``every_n_steps=200``.
            num_images: probe images analysed. ``None``: a tensor probe is used whole, and from data the first 8
                samples are drawn (all of them if there are fewer). Metrics are averaged over every probe image, so
                a larger probe (128 images, say) gives smoother curves at little cost.
            display_images: how many of the probe images the overlays show (the first ones).
            image_size: side of each overlay tile; default the probe's own size.
            mean: per-channel mean of the input normalisation, undone for display (ImageNet's by default, as
                lightly uses); ``None`` if the inputs are not normalised.
            std: per-channel std of the input normalisation, or ``None``.
            colormap: one of :data:`~tsm_lightning.render.COLORMAPS`.
            alpha: overlay opacity in ``[0, 1]``.
            forward_fn: ``forward_fn(pl_module, images)``, running the part of the model that contains ``layer``.
                By default the top-level child named by the first part of ``layer`` is called
                (``pl_module.backbone(images)`` for ``"backbone.7"``), or ``pl_module(images)`` for a layer
                directly under the module. So only the online backbone runs: MoCo's momentum backbone, projection
                heads and SwAV's prototypes are never called.
            probe_fn: extracts ``images`` or ``(images, masks)`` from one collated batch of an unusual structure.
            masks: ``(B, H, W)`` object masks for a tensor probe (for localisation metrics).
            num_components: components of the multivector methods (``None``: all).
            weighting: multivector weighting, one of :data:`~tsm_lightning.core.WEIGHTINGS`.
            log_on_fit_start: log a step-0 baseline when training starts.
            log_on_fit_end: log once more when training ends.
            metrics: log the cheap label-free metrics of :func:`tsm_lightning.metrics.map_metrics` (entropy, Gini,
                stability against the previous and first logged maps, agreement between methods, spectral
                concentration of the features; pointing game, energy-in-mask and IoU when masks are known).
            faithfulness_every_n_runs: also log the embedding-faithfulness metrics (embedding drop, deletion and
                insertion AUC, each beside a random map) every this many monitor runs; they cost about
                ``2 * faithfulness_steps * (methods + 1)`` extra probe forward passes. ``None`` (default): never.
                Not supported with sharded parameters (FSDP, DeepSpeed ZeRO-3).
            faithfulness_steps: steps of the deletion/insertion curves.
            embed_fn: ``embed_fn(images) -> (B, D)`` embedding for the faithfulness metrics; default: the monitored
                forward's output (the pooled backbone output for ``"backbone.*"`` layers), flattened.
            stability_reference: once, at the first run, compute the maps of an independently initialised copy of
                the monitored network and log their correlation with the first maps as
                ``saliency/fresh_init_<method>/stability_first``: the value ``stability_first`` takes when the maps
                have nothing in common with the first ones but the architecture. Needs the default forward rule
                (no ``forward_fn``).
            token_grid: how a transformer block's ``(B, T, D)`` tokens become a ``(B, D, h, w)`` map: a
                :class:`~tsm_lightning.tokens.TokenGrid` or a callable; default: the model's patch grid, the leading
                class and register tokens dropped (:mod:`tsm_lightning.tokens`).
            attention: log the last transformer block's class-token attention, averaged over heads, beside the
                methods as ``saliency/attention`` (overlays, and every per-map metric, agreement and localization
                included): ``None`` (default) when the monitored layer is a transformer block with a class token and
                the model's attention module can be read; ``True`` always (an error otherwise); ``False`` never.
            attention_heads: also log ``saliency/attention_heads``, one overlay per head for the displayed images.
            seed: seed for augmentations applied while the probe is drawn from a dataset, and for the random-map
                and fresh-initialisation references.
            strict: raise errors that happen inside the monitor during training instead of warning and going on.
        """
        super().__init__()
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                f"Give either every_n_steps ({every_n_steps}) or every_n_epochs ({every_n_epochs}), not both."
            )
        if every_n_steps is None and every_n_epochs is None:
            every_n_steps = DEFAULT_EVERY_N_STEPS
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
            raise ValueError(f"num_images must be a positive integer or None, got {num_images!r}.")
        if not isinstance(display_images, int) or display_images < 1:
            raise ValueError(f"display_images must be a positive integer, got {display_images!r}.")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"image_size must be an integer >= 8 or None, got {image_size!r}.")
        if colormap not in COLORMAPS:
            raise ValueError(f"Unknown colormap {colormap!r}; valid colormaps are {tuple(COLORMAPS)}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if faithfulness_every_n_runs is not None and (
            not isinstance(faithfulness_every_n_runs, int) or faithfulness_every_n_runs < 1
        ):
            raise ValueError(
                f"faithfulness_every_n_runs must be a positive integer or None, got {faithfulness_every_n_runs!r}."
            )
        if not isinstance(faithfulness_steps, int) or faithfulness_steps < 2:
            raise ValueError(f"faithfulness_steps must be an integer >= 2, got {faithfulness_steps!r}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {weighting!r}; valid weightings are {WEIGHTINGS}.")
        for name, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != 3:
                raise ValueError(f"{name} must have 3 values (one per RGB channel) or be None, got {stats!r}.")
        if attention not in (None, True, False):
            raise ValueError(f"attention must be None (automatic), True or False, got {attention!r}.")
        check_token_grid(token_grid)
        check_probe_source(probe)
        self.probe_source = probe
        self.layer = layer
        self.methods = validate_methods(methods)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.display_images = display_images
        self.image_size = image_size
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.colormap = colormap
        self.alpha = alpha
        self.forward_fn = forward_fn
        self.probe_fn = probe_fn
        self.masks = masks
        self.num_components = num_components
        self.weighting = weighting
        self.log_on_fit_start = log_on_fit_start
        self.log_on_fit_end = log_on_fit_end
        self.metrics = metrics
        self.faithfulness_every_n_runs = faithfulness_every_n_runs
        self.faithfulness_steps = faithfulness_steps
        self.embed_fn = embed_fn
        self.stability_reference = stability_reference
        self.token_grid = token_grid
        self.attention = attention
        self.attention_heads = bool(attention_heads)
        self.seed = seed
        self.strict = strict

        self.probe: Probe | None = None
        self.last_logged_step: int | None = None
        self.logged_steps: list[int] = []
        self.first_maps: dict[str, Tensor] | None = None
        self.previous_maps: dict[str, Tensor] | None = None
        self.references: dict[str, float] = {}
        self._resolved_layer: str | None = layer
        self._attention_module: str | None = None
        self._display: tuple[Tensor, Tensor] | None = None
        self._last_attempted_step: int | None = None
        self._told_samples_per_plugin = False
        self._sinks: tuple[object, list[Sink]] | None = None
        self._sharding: Sharding | None = None

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """Unique per layer and methods, so that several monitors can share a checkpoint."""
        return self._generate_state_key(layer=self.layer, methods=self.methods)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the layer and a tensor probe before training starts."""
        if stage != "fit":
            return
        if self.layer is not None:
            get_layer(pl_module, self.layer)
        if isinstance(self.probe_source, Tensor) and self.probe is None:
            self.probe = build_probe(self.probe_source, self.num_images, masks=self.masks)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Resolve the probe and the layer (errors surface here, before the first step), log the baseline.

        Global rank zero only, unless the parameters are sharded (FSDP, DeepSpeed ZeRO-3): then every rank builds
        the same probe (deterministically) and discovers the layer with a probe forward, and an error on any rank
        is raised on all of them.
        """
        self._sharding = detect_sharding(trainer, pl_module)
        if not self._runs_here(trainer):
            return
        if self._sharding is None:
            self._prepare(trainer, pl_module)
        else:
            if self.faithfulness_every_n_runs is not None:
                raise ValueError(
                    "SaliencyMonitor(faithfulness_every_n_runs=...) is not supported with sharded parameters "
                    f"({self._sharding.kind}): its extra forward passes would run on rank zero only. Set "
                    "faithfulness_every_n_runs=None."
                )
            error = None
            try:
                self._prepare(trainer, pl_module)
            except Exception as err:
                error = err
            failures = self._sharding.agree(error)
            if error is not None:
                raise error
            if failures:
                raise RuntimeError(f"SaliencyMonitor could not start on {_ranks(failures)} ({_reasons(failures)}).")
        if trainer.is_global_zero:
            self._tell_samples_per_plugin(trainer)
        if self.log_on_fit_start and self.last_logged_step != trainer.global_step:
            self._run_guarded(trainer, pl_module)

    def _runs_here(self, trainer: Any) -> bool:
        # Rank zero alone, unless the parameters are sharded: then gathering them needs every rank.
        return bool(trainer.is_global_zero) or self._sharding is not None

    def _prepare(self, trainer: Any, pl_module: Any) -> None:
        if self.probe is None:
            self.probe = self._resolve_probe(trainer)
        self._check_probe_device(pl_module)
        if self._resolved_layer is None:
            target = search_root(pl_module)[1] if self.forward_fn is None else pl_module
            with self._gathered(target):
                self._resolved_layer = self._discover_layer(pl_module)
        self._attention_module = attention_module(pl_module, self._resolved_layer, self.attention)

    def _resolve_probe(self, trainer: Any) -> Probe:
        source = self.probe_source
        if source is None:
            source = self._default_probe_source(trainer)
        return build_probe(
            source,
            self.num_images,
            probe_fn=self.probe_fn,
            masks=self.masks,
            image_size=self.image_size,
            seed=self.seed,
        )

    @staticmethod
    def _default_probe_source(trainer: Any) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            with contextlib.suppress(NotImplementedError, AttributeError, TypeError):
                loader = datamodule.val_dataloader()
                if loader is not None and not isinstance(loader, (list, tuple, dict)):
                    return loader
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if isinstance(loader, dict) and loader:
            loader = next(iter(loader.values()))
        if loader is None:
            raise ValueError(
                "SaliencyMonitor(probe=None) found no validation or training dataloader to draw the probe from; "
                "pass probe= (a tensor, Dataset, DataLoader or image folder)."
            )
        return loader

    def _check_probe_device(self, pl_module: Any) -> None:
        assert self.probe is not None
        source = self.probe_source
        if isinstance(source, Tensor) and source.device.type != "cpu" and source.device != pl_module.device:
            raise ValueError(
                f"The probe is on {source.device} but the model is on {pl_module.device}. Pass the probe on the "
                "CPU (it is moved to the model's device once) or on the model's device."
            )
        self.probe = self.probe.to(pl_module.device)

    def _forward(self, pl_module: Any, images: Tensor) -> object:
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, images)
        assert self._resolved_layer is not None
        return forward_target(pl_module, self._resolved_layer)(images)

    def _discover_layer(self, pl_module: Any) -> str:
        assert self.probe is not None
        images = self._model_input(pl_module)
        try:
            infos = candidate_layers(pl_module, images, self.forward_fn, token_grid=self.token_grid)
        except (TypeError, RuntimeError) as err:
            raise ValueError(
                f"SaliencyMonitor could not run the model on the probe to discover a layer ({err}). Pass layer= "
                "(for lightly models usually 'backbone.7') and, if needed, forward_fn=."
            ) from err
        try:
            chosen, text = choose_layer(infos)
        except ValueError as err:
            raise ValueError(
                f"SaliencyMonitor found no layer to monitor for probe images {tuple(images.shape)}: {err}"
            ) from None
        warnings.warn(
            f"SaliencyMonitor: no layer given, monitoring {text}. Pass layer= to choose another.",
            UserWarning,
            stacklevel=2,
        )
        return chosen.name

    def _tell_samples_per_plugin(self, trainer: Any) -> None:
        if self._told_samples_per_plugin or not any(is_tensorboard(lg) for lg in trainer.loggers):
            return
        self._told_samples_per_plugin = True
        _info(
            "SaliencyMonitor logs images under 'saliency/<method>'. TensorBoard keeps only 10 images per tag by "
            "default: start it with `tensorboard --logdir <dir> --samples_per_plugin images=1000` to see every step."
        )

    # ------------------------------------------------------------------------------------------------ cadence
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Run every ``every_n_steps`` optimizer steps."""
        if self.every_n_steps is None or not self._runs_here(trainer):
            return
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_logged_step:
            self._run_guarded(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Run at the end of every ``every_n_epochs`` epochs."""
        if self.every_n_epochs is None or not self._runs_here(trainer):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and trainer.global_step != self.last_logged_step:
            self._run_guarded(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Log the final state once, unless this step was just logged (or just failed to be)."""
        if self.log_on_fit_end and self._runs_here(trainer) and trainer.global_step != self._last_attempted_step:
            self._run_guarded(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ one run
    def _run_guarded(self, trainer: Any, pl_module: Any) -> None:
        self._last_attempted_step = trainer.global_step
        if self._sharding is not None:
            self._run_sharded(trainer, pl_module, self._sharding)
            return
        try:
            self.run(trainer, pl_module)
        except Exception as err:
            if self.strict:
                raise
            warnings.warn(
                f"SaliencyMonitor skipped step {trainer.global_step}: {type(err).__name__}: {err}. Training "
                "continues; pass strict=True to stop on such errors.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _run_sharded(self, trainer: Any, pl_module: Any, sharding: Sharding) -> None:
        """One run with sharded parameters, on every rank: the probe forward everywhere, maps and logs on rank zero.

        The ranks agree on the forward's outcome before anyone goes on (with ``strict=True`` also on rank zero's
        logging), so a failure on any rank makes all of them skip (warning) or raise (``strict=True``).
        """
        step = trainer.global_step
        captured, error = None, None
        try:
            captured = self._capture_probe(pl_module)
        except Exception as err:
            error = err
        failures = sharding.agree(error)
        if failures:
            self._skip_or_raise(step, failures, error)
            return
        self.last_logged_step = step  # on every rank, so that all of them run at the same steps
        error = None
        if trainer.is_global_zero:
            try:
                self.run(trainer, pl_module, captured)
            except Exception as err:
                error = err
        if self.strict:
            failures = sharding.agree(error)
            if failures:
                self._skip_or_raise(step, failures, error)
        elif error is not None:
            self._skip_or_raise(step, {0: f"{type(error).__name__}: {error}"}, error)

    def _skip_or_raise(self, step: int, failures: dict[int, str], error: Exception | None) -> None:
        reasons = _reasons(failures)
        if self.strict:
            if error is not None:
                raise error
            raise RuntimeError(
                f"SaliencyMonitor failed at step {step} on {_ranks(failures)} ({reasons}); stopping every rank "
                "because strict=True."
            )
        warnings.warn(
            f"SaliencyMonitor skipped step {step} on every rank ({reasons}). Training continues; pass strict=True "
            "to stop on such errors.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _gathered(self, target: Any) -> contextlib.AbstractContextManager[None]:
        # Full parameters for a forward that calls `target`; a no-op unless they are sharded.
        if self._sharding is None or target is None:
            return contextlib.nullcontext()
        return self._sharding.gathered(target)

    def _model_input(self, pl_module: Any) -> Tensor:
        assert self.probe is not None
        images = self.probe.images
        param = next(pl_module.parameters(), None)
        if param is not None and param.is_floating_point() and param.dtype != images.dtype:
            images = images.to(param.dtype)  # e.g. precision="bf16-true"
        return images

    def _capture(
        self,
        module: Any,
        layer: str,
        forward: Callable[[Tensor], object],
        gathered: Any = None,
        attention: str | None = None,
    ) -> Captured:
        """Run ``forward`` on the probe with ``layer`` of ``module`` captured (and the attention module, if named).

        ``gathered`` is the module the forward calls, whose parameters are gathered first when they are sharded.
        """
        return capture_features(
            module,
            self._model_input(module),
            layer,
            forward_fn=lambda _module, images: forward(images),
            gathered=self._gathered(gathered),
            finite=True,
            token_grid=self.token_grid,
            attention=attention,
            attention_required=self.attention is True,
        )

    def _maps(self, features: Tensor, attention: Tensor | None = None) -> tuple[Decomposition, dict[str, Tensor]]:
        # One decomposition for the maps and, with metrics=True, the spectral metrics; the attention map beside them.
        return maps_of(
            features,
            self.methods,
            num_components=self.num_components,
            weighting=self.weighting,
            spectra=self.metrics,
            attention=attention,
        )

    def compute(self, pl_module: Any, features: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Capture the layer on the probe and return ``(features, maps)`` without side effects on the model.

        Args:
            pl_module: the LightningModule.
            features: features already captured by the probe forward (under sharding, every rank runs it before
                rank zero computes the maps); ``None`` runs the forward here, which during a sharded fit must happen
                on every rank.

        Returns:
            ``features`` ``(B, C, h, w)`` float32 and ``{method: (B, h, w)}`` maps in ``[0, 1]``, for every probe
            image (plus ``"attention"`` when the class-token attention is monitored and ``features`` is ``None``).
        """
        attention = None
        if features is None:
            features, _, attention = self._capture_probe(pl_module)
        return features, self._maps(features, attention)[1]

    def _capture_probe(self, pl_module: Any) -> Captured:
        # The probe forward (on every rank when the parameters are sharded): features, forward output, attention.
        assert self._resolved_layer is not None
        layer = self._resolved_layer
        return self._capture(
            pl_module,
            layer,
            lambda images: self._forward(pl_module, images),
            forward_target(pl_module, layer),
            self._attention_module,
        )

    def run(self, trainer: Any, pl_module: Any, captured: Captured | None = None) -> None:
        """Compute and log the maps and metrics for the current step (rank zero only).

        Args:
            trainer: the ``Trainer``.
            pl_module: the LightningModule.
            captured: the probe forward's result when every rank already ran it (sharded training); ``None`` runs
                it here.
        """
        assert self.probe is not None
        step = trainer.global_step
        features, output, attention = captured if captured is not None else self._capture_probe(pl_module)
        decomposition, maps = self._maps(features, attention)
        runs = len(self.logged_steps) + 1
        faithful = self.faithfulness_every_n_runs is not None and runs % self.faithfulness_every_n_runs == 0
        # Upsampled once, to the probe's size, and only when a metric needs them (the masks are the probe's size).
        full = None
        if self.metrics and (self.probe.masks is not None or faithful):
            full = {name: upsample_maps(m, self.probe.images.shape[-2:]) for name, m in maps.items()}
        if self._display is None:
            shown = self.probe.images[: self.display_images]
            self._display = display_tiles(shown, self.mean, self.std, self.image_size)
        images = pictures(maps, full, *self._display, colormap=self.colormap, alpha=self.alpha)
        if self.attention_heads and attention is not None:
            images.update(attention_head_pictures(attention, *self._display, colormap=self.colormap, alpha=self.alpha))
        values = self._scalars(pl_module, decomposition, maps, full, output, faithful) if self.metrics else {}
        self._log(trainer, images, values, step)
        self.previous_maps = {name: m.detach().cpu() for name, m in maps.items()}
        if self.first_maps is None:
            self.first_maps = self.previous_maps
        self.last_logged_step = step
        self.logged_steps.append(step)

    def _scalars(
        self,
        pl_module: Any,
        decomposition: Decomposition,
        maps: dict[str, Tensor],
        full: dict[str, Tensor] | None,
        output: object,
        faithful: bool,
    ) -> dict[str, float]:
        """Label-free metrics averaged over the probe as ``saliency/<name>/<metric>``, with their references."""
        assert self.probe is not None
        masks = self.probe.masks
        faithfulness = None
        if faithful:
            embed = self.embed_fn or default_embed_fn(pl_module, forward_fn=self._forward)
            faithfulness = (embed, self._model_input(pl_module), self.faithfulness_steps)
        with preserved_rng(), autocast_off(self.probe.images.device):
            per_image = per_image_metrics(
                maps,
                decomposition,
                full=full,
                masks=masks,
                previous=self.previous_maps,
                first=self.first_maps,
                faithfulness=faithfulness,
            )
        collapse = collapse_scalars(output, self.references)
        if self.first_maps is None and self.stability_reference:
            self.references.update(self._fresh_init_references(pl_module, maps))
        if masks is not None and not any(key.startswith("saliency/random/") for key in self.references):
            self.references.update(localization_references(masks, self.seed))
        return scalars(per_image, {**collapse, **self.references})

    def _fresh_init_references(self, pl_module: Any, first: dict[str, Tensor]) -> dict[str, float]:
        """``stability_first`` of an independently initialised copy of the monitored network (see ``__init__``)."""
        assert self._resolved_layer is not None
        layer = self._resolved_layer
        target = forward_target(pl_module, layer)
        if self.forward_fn is not None or target is pl_module or self._sharding is not None:
            return {}  # no copy of a user-defined forward, of the whole module, or of sharded parameters
        fresh = fresh_copy(target, self.seed + 1)
        attention = self._attention_module
        inner = attention.split(".", 1)[1] if attention is not None else None  # both are under the same child
        features, _, heads = self._capture(fresh, layer.split(".", 1)[1], fresh, fresh, inner)
        del fresh
        return stability_references(self._maps(features, heads)[1], first)

    # ------------------------------------------------------------------------------------------------ logging
    def _log(self, trainer: Any, pictures: dict[str, Tensor], scalars: dict[str, float], step: int) -> None:
        root = Path(trainer.default_root_dir) / "saliency"
        if not trainer.loggers and not self.logged_steps:
            _info(f"SaliencyMonitor: no logger configured, writing PNG overlays under {root}.")
        key = (tuple(id(logger) for logger in trainer.loggers), str(root))
        if self._sinks is None or self._sinks[0] != key:  # one set per Trainer: the layout is written once
            self._sinks = key, sinks_for_loggers(trainer.loggers, root)
        for sink in self._sinks[1]:
            sink.write(pictures, scalars, step)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the probe itself, the layer, the logged steps and the drift baselines."""
        probe = self.probe
        return {
            "probe_images": probe.images.detach().cpu() if probe is not None else None,
            "probe_masks": probe.masks.detach().cpu() if probe is not None and probe.masks is not None else None,
            "layer": self._resolved_layer,
            "last_logged_step": self.last_logged_step,
            "logged_steps": list(self.logged_steps),
            "first_maps": self.first_maps,
            "previous_maps": self.previous_maps,
            "references": dict(self.references),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the probe, layer, step bookkeeping and drift baselines saved by :meth:`state_dict`."""
        if state_dict.get("probe_images") is not None:
            self.probe = Probe(state_dict["probe_images"], state_dict.get("probe_masks"))
            self._display = None
        self._resolved_layer = state_dict.get("layer") or self._resolved_layer
        self.last_logged_step = state_dict.get("last_logged_step")
        self._last_attempted_step = self.last_logged_step
        self.logged_steps = list(state_dict.get("logged_steps", []))
        self.first_maps = state_dict.get("first_maps")
        self.previous_maps = state_dict.get("previous_maps")
        self.references = dict(state_dict.get("references", {}))


class SaliencyMonitor(SaliencyMonitorMixin, Callback):
    """Lightning callback that logs label-free saliency maps of a fixed probe batch while a model trains.

    Every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs), plus once when training starts and
    once when it ends, the monitor runs the probe through the model in eval mode under ``torch.no_grad()`` and
    outside autocast, captures ``layer``, computes the requested maps (EigenCAM, TSM, Multivec-EigenCAM, MTSM)
    and logs, with ``global_step = trainer.global_step``:

    * images ``saliency/<method>`` (top row: probe images, bottom row: overlays) and ``saliency/all`` (one row
      per probe image: input, then one overlay per method);
    * scalars ``saliency/<method>/<metric>``.

    Vision transformers are monitored like CNNs: a block's tokens become a map on the model's patch grid, and the
    last block's class-token attention is logged beside the methods as ``saliency/attention`` (see ``attention``).

    TensorBoard loggers get ``add_image``/``add_scalar``; loggers with a ``log_image`` method (W&B, ...) get that;
    others get PNG files under their ``log_dir``; with ``logger=False`` PNGs go under
    ``trainer.default_root_dir/saliency``.

    It has no side effects on training: it runs on global rank zero only and calls the unwrapped LightningModule
    (no DDP collective; SyncBatchNorm in eval mode does not communicate), except with sharded parameters (FSDP,
    DeepSpeed ZeRO-3), where every rank runs the probe forward with the parameters gathered (see
    :mod:`tsm_lightning.callbacks.sharding`) and rank zero alone computes and logs; every sub-module's train/eval
    flag is restored, the hook removed in ``finally``, parameters, gradients, optimizer state, BatchNorm statistics and
    the global RNG streams are left as they were. Errors inside the monitor become a warning (or are raised with
    ``strict=True``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tsm_lightning import SaliencyMonitor
        >>> monitor = SaliencyMonitor(layer="backbone.7", every_n_steps=100)
        >>> trainer = Trainer(callbacks=[monitor], max_steps=10, logger=False)  # doctest: +SKIP
    """


# ---------------------------------------------------------------------------------------------------- helpers
def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)


def _ranks(failures: dict[int, str]) -> str:
    ranks = sorted(failures)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _reasons(failures: dict[int, str]) -> str:
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))
