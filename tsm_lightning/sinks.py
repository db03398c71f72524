"""Where pictures and scalars go: TensorBoard, MLflow, loggers with ``log_image``, PNG and CSV files.

Shared by :class:`~tsm_lightning.callbacks.SaliencyMonitor` (one or two sinks per Lightning logger,
:func:`sinks_for_loggers`) and ``tsm-lightning`` (an event file, PNG files, CSV tables). A sink takes named pictures
(``(3, H, W)`` uint8, see :mod:`tsm_lightning.render`) and named scalars at one step; it knows nothing of models.
"""

from __future__ import annotations

import csv
import inspect
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from tsm_lightning.render import save_png

__all__ = [
    "BackgroundWriter",
    "ImageLoggerSink",
    "MetricsSink",
    "MlflowSink",
    "PngSink",
    "Sink",
    "TensorBoardSink",
    "custom_scalars_layout",
    "is_mlflow",
    "is_tensorboard",
    "mlflow_artifact_path",
    "mlflow_image_key",
    "sinks_for_loggers",
    "step_file_name",
    "write_csv",
]


class Sink(Protocol):
    """Anything that takes pictures and scalars at a step."""

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Record ``pictures`` (``{tag: (3, H, W) uint8}``) and ``scalars`` (``{tag: value}``) at ``step``."""


def custom_scalars_layout(tags: Iterable[str], section: str = "saliency") -> dict[str, dict[str, list]]:
    """A TensorBoard "Custom Scalars" layout: one chart per metric, with a line per method and per reference.

    Tags are ``<section>/<name>/<metric>`` (``saliency/tsm/entropy``, ``saliency/random/entropy``): the curves of
    one metric are read against their references (random map, chance, fresh initialisation) at a glance.
    """
    by_metric: dict[str, list[str]] = {}
    for tag in tags:
        by_metric.setdefault(tag.split("/", 2)[-1], []).append(tag)
    return {section: {metric: ["Multiline", names] for metric, names in sorted(by_metric.items())}}


class TensorBoardSink:
    """``add_image`` / ``add_scalar`` on a ``SummaryWriter`` (a ``TensorBoardLogger``'s ``experiment``).

    With ``layout=True`` the first write that has scalars also adds :func:`custom_scalars_layout`.
    """

    def __init__(self, writer: Any, *, layout: bool = True) -> None:
        self.writer = writer
        self._layout_pending = layout

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Add every picture and scalar at ``step`` and flush."""
        if self._layout_pending and scalars:
            self.writer.add_custom_scalars(custom_scalars_layout(scalars))
            self._layout_pending = False
        for tag, picture in pictures.items():
            self.writer.add_image(tag, picture, global_step=step, dataformats="CHW")
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()


class ImageLoggerSink:
    """A logger with ``log_image`` (W&B, ...): pictures through it, scalars through ``log_metrics``."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Log every picture as an ``(H, W, 3)`` array, then the scalars."""
        for tag, picture in pictures.items():
            self.logger.log_image(key=tag, images=[picture.permute(1, 2, 0).cpu().numpy()], step=step)
        if scalars:
            self.logger.log_metrics(dict(scalars), step=step)


class MetricsSink:
    """Scalars through a Lightning logger's ``log_metrics`` (CSV, Comet, Neptune); pictures are not its business."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Log the scalars, if any."""
        if scalars:
            self.logger.log_metrics(dict(scalars), step=step)


_MLFLOW_KEY_FORBIDDEN = re.compile(r"[^a-zA-Z0-9_\-./ ]")  # what MLflow's ``log_image(key=...)`` rejects


def mlflow_image_key(tag: str) -> str:
    """``tag`` with every character MLflow refuses in an image key replaced by ``_`` (``saliency/tsm`` is kept)."""
    return _MLFLOW_KEY_FORBIDDEN.sub("_", tag) or "_"


def mlflow_artifact_path(tag: str, step: int) -> str:
    """The run-relative artifact of a picture when the client has no stepped ``log_image``.

    ``saliency/tsm`` at step 25 -> ``saliency/tsm/step_000025.png``.
    """
    return f"{tag}/step_{step:06d}.png"


class MlflowSink:
    """An ``MLFlowLogger``: pictures as MLflow images with their step, scalars through the logger's ``log_metrics``.

    Pictures go through the logger's ``MlflowClient.log_image(run_id, image, key=tag, step=step)`` (MLflow >= 2.12:
    the run's "Images" view with a step slider; the files are the run's ``images/`` artifacts). With an older
    client they are plain artifacts at :func:`mlflow_artifact_path` (``saliency/tsm/step_000025.png``). Nothing of
    ``mlflow`` is imported here: the logger's client does the work.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._stepped: bool | None = None

    def _stepped_images(self, client: Any) -> bool:
        """Whether ``client.log_image`` takes ``key`` and ``step`` (MLflow >= 2.12)."""
        if self._stepped is None:
            log_image = getattr(client, "log_image", None)
            try:
                parameters = inspect.signature(log_image).parameters if log_image is not None else {}
            except (TypeError, ValueError):
                parameters = {}
            self._stepped = "key" in parameters and "step" in parameters
        return self._stepped

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Log every picture (an ``(H, W, 3)`` uint8 array) at ``step``, then the scalars."""
        if pictures:
            client, run_id = self.logger.experiment, self.logger.run_id
            if self._stepped_images(client):
                for tag, picture in pictures.items():
                    image = picture.permute(1, 2, 0).cpu().numpy()
                    client.log_image(run_id, image, key=mlflow_image_key(tag), step=step)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    for tag, picture in pictures.items():
                        relative = Path(mlflow_artifact_path(tag, step))
                        save_png(picture, Path(tmp) / relative.name)
                        client.log_artifact(run_id, str(Path(tmp) / relative.name), str(relative.parent))
        if scalars:
            self.logger.log_metrics(dict(scalars), step=step)


def step_file_name(tag: str, step: int) -> str:
    """``saliency/tsm`` at step 25 -> ``saliency_tsm_step0000025.png``."""
    return f"{tag.replace('/', '_')}_step{step:07d}.png"


class PngSink:
    """Pictures as PNG files (parent folders created); scalars are not its business.

    Args:
        root: the folder.
        path_for: ``path_for(tag, step) -> Path`` of each file; default ``root / step_file_name(tag, step)``.
    """

    def __init__(self, root: str | Path, path_for: Callable[[str, int], Path] | None = None) -> None:
        self.root = Path(root)
        self.path_for = path_for or (lambda tag, step: self.root / step_file_name(tag, step))

    def write(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Save every picture."""
        for tag, picture in pictures.items():
            save_png(picture, self.path_for(tag, step))


def is_tensorboard(logger: Any) -> bool:
    """Whether ``logger`` is a TensorBoard logger whose ``experiment`` can ``add_image``."""
    experiment = getattr(logger, "experiment", None) if type(logger).__name__.startswith("TensorBoard") else None
    return experiment is not None and hasattr(experiment, "add_image")


def is_mlflow(logger: Any) -> bool:
    """Whether ``logger`` is an ``MLFlowLogger`` (``lightning`` or ``pytorch_lightning``) with a run to log to."""
    return type(logger).__name__.startswith("MLFlow") and hasattr(logger, "run_id") and hasattr(logger, "experiment")


def sinks_for_loggers(loggers: Sequence[Any], default_root: str | Path) -> list[Sink]:
    """The sinks of a Lightning ``Trainer``'s loggers.

    TensorBoard loggers get :class:`TensorBoardSink`; MLflow loggers :class:`MlflowSink`; loggers with
    ``log_image`` (W&B) :class:`ImageLoggerSink`; others (CSV, Comet, Neptune, ...) get PNG files under their
    ``log_dir/saliency`` (else ``save_dir/saliency``, else ``default_root``) and scalars through ``log_metrics``; no
    logger at all: PNG files under ``default_root``.
    """
    if not loggers:
        return [PngSink(default_root)]
    sinks: list[Sink] = []
    for logger in loggers:
        if is_tensorboard(logger):
            sinks.append(TensorBoardSink(logger.experiment))
        elif is_mlflow(logger):
            sinks.append(MlflowSink(logger))
        elif hasattr(logger, "log_image"):
            sinks.append(ImageLoggerSink(logger))
        else:
            folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            root = Path(folder) / "saliency" if folder else Path(default_root)  # never the working directory
            sinks.extend([PngSink(root), MetricsSink(logger)])
    return sinks


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as CSV: the columns in order of first appearance, ``None`` as an empty cell."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


class BackgroundWriter:
    """Writes to sinks on one background thread, in submission order, through a bounded queue.

    The training thread hands a run's pictures and scalars over with :meth:`submit` and goes on; PNG encoding and
    event-file writing happen on the writer's thread. When ``max_pending`` runs are already waiting, :meth:`submit`
    blocks until one is written, so memory never grows. A sink's error is kept and raised by the next
    :meth:`submit`, :meth:`flush` or :meth:`close` (the run that failed to be written is named); writes after it go
    on. The thread starts at the first submission and ends at :meth:`close`.

    Args:
        sinks: where every run goes, each in turn.
        max_pending: runs that may wait to be written.
    """

    def __init__(self, sinks: Sequence[Sink], max_pending: int = 2) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}.")
        self.sinks = list(sinks)
        self.max_pending = max_pending
        self._queue: queue.Queue[tuple[Mapping[str, Tensor], Mapping[str, float], int] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._thread: threading.Thread | None = None
        self._errors: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()

    def submit(self, pictures: Mapping[str, Tensor], scalars: Mapping[str, float], step: int) -> None:
        """Queue one run for writing (blocks while ``max_pending`` runs wait); first raise an earlier write's error.

        The tensors must not be modified afterwards (the writer reads them later).
        """
        self.raise_errors()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="tsm-lightning-writer", daemon=True)
            self._thread.start()
        self._queue.put((pictures, scalars, step))

    def flush(self) -> None:
        """Wait until every submitted run is written, then raise the first error of a write, if any."""
        if self._thread is not None:
            self._queue.join()
        self.raise_errors()

    def close(self) -> None:
        """Write what is queued, stop the thread, then raise the first error of a write, if any."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()
        for sink in self.sinks:
            closer = getattr(sink, "close", None)
            if callable(closer):
                closer()
        self.raise_errors()

    def raise_errors(self) -> None:
        """Raise (once) the first error a sink raised since the last call, naming the step that was not written."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            step, error = errors[0]
            more = f" ({len(errors) - 1} later writes failed too)" if len(errors) > 1 else ""
            raise RuntimeError(
                f"writing the run of step {step} failed: {type(error).__name__}: {error}{more}"
            ) from error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                pictures, scalars, step = item
                for sink in self.sinks:
                    try:
                        sink.write(pictures, scalars, step)
                    except Exception as error:  # kept for the training thread, which reports it
                        with self._lock:
                            self._errors.append((step, error))
            finally:
                self._queue.task_done()
