"""SaliencyMonitor: log how a fixed probe batch's saliency evolves while a model trains.

Lightning wiring over one :class:`~tsm_lightning.tracking.Tracker` (the run object: probe, layer, maps, metrics,
references, pictures): when a run happens and on which rank, the probe drawn from the trainer's data when none is
given, the checkpoint state, and a :class:`~tsm_lightning.sinks.BackgroundWriter` that takes PNG encoding and event
writing off the training thread. :class:`SaliencyMonitorMixin` is combined with ``lightning.pytorch.Callback`` here
and with ``pytorch_lightning.Callback`` in :mod:`tsm_lightning.callbacks.pl`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from torch import Tensor

from tsm_lightning.callbacks.sharding import Sharding, describe_failures, detect_sharding, skip_or_raise
from tsm_lightning.capture import ForwardFn, get_layer
from tsm_lightning.checks import check_positive_int
from tsm_lightning.constants import METHODS
from tsm_lightning.monitoring import spread_warning
from tsm_lightning.options import DisplayOptions, MapOptions, MetricOptions
from tsm_lightning.pipeline import Captured
from tsm_lightning.probe import Probe, ProbeFn, check_probe_source
from tsm_lightning.sinks import BackgroundWriter, Sink, is_tensorboard, sinks_for_loggers
from tsm_lightning.tracking import RunResult, Tracker

__all__ = ["DEFAULT_EVERY_N_STEPS", "LOG_ON_FIT", "SaliencyMonitor", "SaliencyMonitorMixin"]

DEFAULT_EVERY_N_STEPS = 200
"""Cadence when neither ``every_n_steps`` nor ``every_n_epochs`` is given."""

LOG_ON_FIT = ("start", "end")
"""Moments of ``fit`` at which the monitor also runs: a step-0 baseline at the start, the final state at the end."""


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
        log_on_fit: Sequence[str] = LOG_ON_FIT,
        num_images: int | None = None,
        forward_fn: ForwardFn | None = None,
        probe_fn: ProbeFn | None = None,
        display: DisplayOptions | None = None,
        maps: MapOptions | None = None,
        metrics: bool | MetricOptions = True,
        sinks: Sequence[Sink] | None = None,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        """Create the monitor; every argument is validated here, the layer (which needs the model) at ``setup``.

        Args:
            probe: the fixed probe: a ``(B, 3, H, W)`` tensor (normalised as the model expects), a
                :class:`~tsm_lightning.probe.Probe` (images with their ``(B, H, W)`` object masks, for the
                localization metrics), a ``Dataset``, a ``DataLoader``, a path to an image folder (resized to 224 px;
                pass ``tsm_lightning.data.ImageFolder(path, image_size=...)`` for another size), or ``None`` to take
                the first ``num_images`` samples of the datamodule's validation data, else of the training data.
                Nested SSL batches are unwrapped as documented in :mod:`tsm_lightning.probe`; masks that come with
                augmented views are never used.
            layer: dotted module name relative to the LightningModule, e.g. ``"backbone.7"`` or, for a vision
                transformer, ``"backbone.encoder.layers.encoder_layer_11"``; ``None`` picks a ViT's last block, else
                the deepest layer with a spatial map of a useful size (searched in ``pl_module.backbone`` when it
                exists) and warns once, naming the layer and its grid.
            methods: any of :data:`~tsm_lightning.METHODS`.
            every_n_steps: run every this many optimizer steps.
            every_n_epochs: run at the end of every this many epochs. Give at most one of the two; with neither,
                ``every_n_steps=200``.
            log_on_fit: also run when training starts (``"start"``: a step-0 baseline) and when it ends (``"end"``);
                any subset of :data:`LOG_ON_FIT`.
            num_images: probe images analysed. ``None``: a tensor probe is used whole, and from data the first 8
                samples are drawn (all of them if there are fewer). Metrics are averaged over every probe image, so
                a larger probe (128 images, say) gives smoother curves at little cost.
            forward_fn: ``forward_fn(pl_module, images)``, running the part of the model that contains ``layer``.
                By default the top-level child named by the first part of ``layer`` is called
                (``pl_module.backbone(images)`` for ``"backbone.7"``), or ``pl_module(images)`` for a layer
                directly under the module. So only the online backbone runs: MoCo's momentum backbone, projection
                heads and SwAV's prototypes are never called.
            probe_fn: extracts ``images`` or ``(images, masks)`` from one collated batch of an unusual structure.
            display: how the pictures look: images shown, tile size, normalisation undone, colormap, opacity
                (:class:`~tsm_lightning.options.DisplayOptions`).
            maps: how the layer becomes maps: multivector components and weighting, token grid, class-token
                attention (:class:`~tsm_lightning.options.MapOptions`).
            metrics: ``True`` (the cheap label-free metrics and their reference series), ``False`` (none), or
                :class:`~tsm_lightning.options.MetricOptions` for the faithfulness metrics and the fresh-init
                reference.
            sinks: extra destinations for every run's pictures and scalars, beside the trainer's loggers (objects
                with ``write(pictures, scalars, step)``, see :class:`~tsm_lightning.sinks.Sink`). Without loggers and
                without sinks, PNG files go under ``trainer.default_root_dir/saliency``.
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
        for name, count in (
            ("every_n_steps", every_n_steps),
            ("every_n_epochs", every_n_epochs),
            ("num_images", num_images),
        ):
            if count is not None:
                check_positive_int(count, name)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if isinstance(log_on_fit, str) or not set(log_on_fit) <= set(LOG_ON_FIT):
            raise ValueError(f"log_on_fit must be a subset of {LOG_ON_FIT}, e.g. ['start'], got {log_on_fit!r}.")
        for name, options, kind in (("display", display, DisplayOptions), ("maps", maps, MapOptions)):
            if options is not None and not isinstance(options, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {type(options).__name__}.")
        if isinstance(metrics, bool):
            metrics = MetricOptions(enabled=metrics)
        elif not isinstance(metrics, MetricOptions):
            raise TypeError(f"metrics must be True, False or a MetricOptions, got {type(metrics).__name__}.")
        if sinks is not None and not all(callable(getattr(sink, "write", None)) for sink in sinks):
            raise TypeError("sinks must be objects with a write(pictures, scalars, step) method.")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable or None, got {type(forward_fn).__name__}.")
        check_probe_source(probe)
        self.probe_source = probe
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log_on_fit = tuple(log_on_fit)
        self.num_images = num_images
        self.probe_fn = probe_fn
        self.sinks = list(sinks) if sinks is not None else None
        self.strict = strict
        self.tracker = Tracker(
            layer, methods, forward_fn=forward_fn, display=display, maps=maps, metrics=metrics, seed=seed
        )
        self.last_logged_step: int | None = None
        self._last_scalars: dict[str, float] | None = None  # of the last run, for the end-of-training warning
        self._last_attempted_step: int | None = None
        self._told_samples_per_plugin = False
        self._writer: tuple[object, BackgroundWriter] | None = None
        self._sharding: Sharding | None = None

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """Unique per layer and methods, so that several monitors can share a checkpoint."""
        return self._generate_state_key(layer=self.tracker.layer, methods=self.tracker.methods)  # type: ignore[attr-defined]

    @property
    def probe(self) -> Probe | None:
        """The fixed probe batch, once drawn."""
        return self.tracker.probe

    @property
    def logged_steps(self) -> list[int]:
        """The steps logged so far."""
        return self.tracker.logged_steps

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods computed at every run."""
        return self.tracker.methods

    @property
    def layer(self) -> str | None:
        """The monitored layer: the one given, or the one discovered when training started."""
        return self.tracker.resolved_layer

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the layer and build a tensor probe before training starts."""
        if stage != "fit":
            return
        if self.tracker.layer is not None:
            get_layer(pl_module, self.tracker.layer)
        source = self.probe_source
        if isinstance(source, (Tensor, Probe)) and self.tracker.probe is None:
            self.tracker.probe = self.tracker.build_probe(source, self.num_images)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Resolve the probe and the layer (errors surface here, before the first step), log the baseline.

        Global rank zero only, unless the parameters are sharded (FSDP, DeepSpeed ZeRO-3): then every rank builds
        the same probe (deterministically) and discovers the layer with a probe forward, and an error on any rank
        is raised on all of them.
        """
        self._sharding = detect_sharding(trainer, pl_module)
        if not self._runs_here(trainer):
            return
        sharding = self._sharding
        self.tracker.gather = sharding.gathered if sharding is not None else None
        if sharding is None:
            self._prepare(trainer, pl_module)
        else:
            if self.tracker.metric_options.faithfulness_every_n_runs is not None:
                raise ValueError(
                    "SaliencyMonitor(metrics=MetricOptions(faithfulness_every_n_runs=...)) is not supported with "
                    f"sharded parameters ({sharding.kind}): its extra forward passes would run on rank zero only. "
                    "Set faithfulness_every_n_runs=None."
                )
            error = None
            try:
                self._prepare(trainer, pl_module)
            except Exception as err:
                error = err
            failures = sharding.agree(error)
            if error is not None:
                raise error
            if failures:
                raise RuntimeError(f"SaliencyMonitor could not start on {describe_failures(failures)}.")
        if trainer.is_global_zero:
            self._tell_samples_per_plugin(trainer)
        if "start" in self.log_on_fit and self.last_logged_step != trainer.global_step:
            self._run_guarded(trainer, pl_module)

    def _runs_here(self, trainer: Any) -> bool:
        # Rank zero alone, unless the parameters are sharded: then gathering them needs every rank.
        return bool(trainer.is_global_zero) or self._sharding is not None

    def _prepare(self, trainer: Any, pl_module: Any) -> None:
        probe = self.tracker.probe
        if probe is None:
            source = self.probe_source if self.probe_source is not None else _default_probe_source(trainer)
            probe = self.tracker.build_probe(source, self.num_images, probe_fn=self.probe_fn)
        self.tracker.prepare(pl_module, probe)

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
        """Log the final state once, unless this step was just logged (or just failed to be).

        Then warn if the last maps are more spread out than a fresh initialisation's
        (``MetricOptions.spread_warning``).
        """
        if "end" in self.log_on_fit and self._runs_here(trainer) and trainer.global_step != self._last_attempted_step:
            self._run_guarded(trainer, pl_module)
        if self.tracker.metric_options.spread_warning and self._last_scalars is not None:
            message = spread_warning(self._last_scalars, self.tracker.methods)
            if message is not None:
                warnings.warn(message, UserWarning, stacklevel=2)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Write what was computed before training failed, without hiding the training's own error."""
        with contextlib.suppress(Exception):
            self._close_writer(report=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Write what is still queued (when ``fit`` ends, or any other stage) and stop the writer's thread."""
        self._close_writer()

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
            captured = self.tracker.capture(pl_module)
        except Exception as err:
            error = err
        failures = sharding.agree(error)
        if failures:
            skip_or_raise(step, failures, error, strict=self.strict)
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
                skip_or_raise(step, failures, error, strict=self.strict)
        elif error is not None:
            skip_or_raise(step, {0: f"{type(error).__name__}: {error}"}, error, strict=self.strict)

    def run(self, trainer: Any, pl_module: Any, captured: Captured | None = None) -> RunResult:
        """Compute this step's maps, metrics and pictures and queue them for writing (rank zero only).

        An earlier run that could not be written is reported here first: a warning, or raised with ``strict=True``.

        Args:
            trainer: the ``Trainer``.
            pl_module: the LightningModule.
            captured: the probe forward's result when every rank already ran it (sharded training); ``None`` runs
                it here.
        """
        writer = self._writer_for(trainer)
        try:
            writer.raise_errors()  # an earlier run that could not be written
        except RuntimeError as err:
            if self.strict:
                raise
            warnings.warn(f"SaliencyMonitor: {err}", RuntimeWarning, stacklevel=3)
        result = self.tracker.run(pl_module, trainer.global_step, captured)
        self.last_logged_step = result.step
        self._last_scalars = result.scalars
        writer.submit(result.pictures, result.scalars, result.step)
        return result

    def compute(self, pl_module: Any, features: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The probe's ``(features, maps)`` without logging; see :meth:`~tsm_lightning.tracking.Tracker.compute`."""
        return self.tracker.compute(pl_module, features)

    # ------------------------------------------------------------------------------------------------ writing
    def _writer_for(self, trainer: Any) -> BackgroundWriter:
        root = Path(trainer.default_root_dir) / "saliency"
        key = (tuple(id(logger) for logger in trainer.loggers), str(root))
        if self._writer is None or self._writer[0] != key:  # one set of sinks per Trainer: the layout is written once
            self._close_writer()
            sinks = sinks_for_loggers(trainer.loggers, root) if trainer.loggers or not self.sinks else []
            if not trainer.loggers and not self.sinks:
                _info(f"SaliencyMonitor: no logger configured, writing PNG overlays under {root}.")
            self._writer = key, BackgroundWriter([*sinks, *(self.sinks or [])])
        return self._writer[1]

    def flush(self) -> None:
        """Wait until every run so far is written (raising a write's error, if any)."""
        if self._writer is not None:
            self._writer[1].flush()

    def _close_writer(self, report: bool = True) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer[1].close()
        except Exception as err:
            if self.strict and report:
                raise
            if report:
                warnings.warn(f"SaliencyMonitor could not write every run: {err}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the probe itself, the layer, the logged steps and the drift baselines."""
        return {**self.tracker.state_dict(), "last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the probe, layer, step bookkeeping and drift baselines saved by :meth:`state_dict`."""
        self.tracker.load_state_dict(state_dict)
        self.last_logged_step = state_dict.get("last_logged_step")
        self._last_attempted_step = self.last_logged_step


class SaliencyMonitor(SaliencyMonitorMixin, Callback):
    """Lightning callback that logs label-free saliency maps of a fixed probe batch while a model trains.

    Every ``every_n_steps`` optimizer steps (or ``every_n_epochs`` epochs), plus once when training starts and once
    when it ends, the probe runs through the model in eval mode, under ``no_grad`` and outside autocast; ``layer`` is
    captured and the maps (EigenCAM, TSM, Multivec-EigenCAM, MTSM; a vision transformer's class-token attention
    beside them) are logged at ``global_step`` as pictures (``saliency/<method>``, ``saliency/all``) and scalars
    (``saliency/<method>/<metric>``: means over every probe image, beside their reference series). TensorBoard
    loggers get ``add_image``/``add_scalar``, loggers with ``log_image`` (W&B, ...) get that, others PNG files;
    the writing happens on a background thread. What one run does is :class:`~tsm_lightning.tracking.Tracker`'s.

    No side effects on training: rank zero alone runs the unwrapped LightningModule (every rank under sharded
    parameters, see :mod:`tsm_lightning.callbacks.sharding`); train/eval flags, hooks, parameters, gradients,
    optimizer state, BatchNorm statistics and the global RNG streams are left as they were. Errors inside the
    monitor become a warning (or are raised with ``strict=True``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tsm_lightning import SaliencyMonitor
        >>> monitor = SaliencyMonitor(layer="backbone.7", every_n_steps=100)
        >>> trainer = Trainer(callbacks=[monitor], max_steps=10, logger=False)  # doctest: +SKIP
    """


# ---------------------------------------------------------------------------------------------------- helpers
def _default_probe_source(trainer: Any) -> Any:
    # The datamodule's validation loader, else the first training loader.
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
            "pass probe= (a tensor, Probe, Dataset, DataLoader or image folder)."
        )
    return loader


def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)
