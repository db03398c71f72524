"""Run records for the studies: every map of the probe at the monitor's steps, kept as data (``record.pt``).

:class:`Recorder` is a Lightning callback that runs beside :class:`~tsm_lightning.SaliencyMonitor`, at the same
steps (when training starts, every ``every_n_steps`` optimizer steps, and when it ends), and keeps what the monitor
only draws: the maps themselves. It uses the library's public API only (:func:`tsm_lightning.pipeline.explain_batch`),
never the monitor's internals, so the records do not depend on how the monitor is written.

:func:`train_and_record` trains one example (``examples/<name>.py``, through its ``main(argv, extra_callbacks=...)``)
with a :class:`Recorder`, reads the scalars the monitor logged back from the TensorBoard event file, and writes
``record.pt`` (load it with ``torch.load(path, weights_only=True)``; plain dicts, lists, tensors and numbers):

.. code-block:: text

    meta        {"method", "seed", "swap", "steps", "layer", "probe_size", "command", "seconds", "recipe", ...}
    masks       (N, H, W) bool: the probe's exact object masks
    steps       [0, 15, 30, ...]: the steps at which the maps were taken (the monitor's steps)
    maps        {step: {name: (N, h, w) float16 in [0, 1]}}: eigencam, tsm, multivec_eigencam, mtsm (+ attention)
    maps_flip   {step: {name: (N, h, w) float16}}: the same maps of the horizontally flipped probe, flipped back
    fresh_maps  {name: (N, h, w) float16}: the maps of an independently initialised copy of the network
    scalars     {step: {tag: float}}: every scalar the run logged (monitor and training loss), from TensorBoard
    loss        {step: float}: the training loss of the batch seen at that step (step 0 = the initial weights)

:func:`summary_row` and :func:`long_rows` turn a record into the committed CSVs (a per-run summary, and every
per-step scalar in long format ``run,method,seed,swap,step,tag,value``).
"""

from __future__ import annotations

import csv
import datetime
import importlib
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

from tsm_lightning import METHODS, upsample_maps
from tsm_lightning.metrics import localization_metrics, random_maps
from tsm_lightning.pipeline import explain_batch

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"

MAP_NAMES = (*METHODS, "attention")
"""Maps a record may hold, in the order the CSVs list them."""

CRITERION_RISE = 0.25
"""The issue's criterion: TSM's pointing game rises by at least this much from step 0 to the end ..."""
CRITERION_ABOVE_RANDOM = 0.30
"""... and ends at least this much above the random map's."""

LONG_FIELDS = ("run", "method", "seed", "swap", "step", "tag", "value")


class Recorder(Callback):
    """Keeps every map of a fixed probe at the monitor's steps, and the training loss of every step.

    Args:
        images: ``(N, 3, S, S)`` probe images, normalised as the model expects (the monitor's probe).
        masks: ``(N, S, S)`` bool object masks, or ``None``.
        layer: the monitored layer (dotted module name).
        every_n_steps: the monitor's cadence; maps are taken at step 0, every ``every_n_steps`` steps, and at the
            end (the monitor's steps).
        fresh_seed: seed of the independently initialised copy whose maps become ``fresh_maps`` (the LightningModule
            is rebuilt from its saved hyperparameters under this seed).
    """

    def __init__(
        self, images: Tensor, masks: Tensor | None, layer: str, every_n_steps: int, fresh_seed: int = 10_000
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.images = images
        self.masks = masks
        self.layer = layer
        self.every_n_steps = every_n_steps
        self.fresh_seed = fresh_seed
        self.steps: list[int] = []
        self.maps: dict[int, dict[str, Tensor]] = {}
        self.maps_flip: dict[int, dict[str, Tensor]] = {}
        self.fresh_maps: dict[str, Tensor] = {}
        self.loss: dict[int, float] = {}
        self.seconds = 0.0  # time spent computing maps (not training)

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Maps at the initial weights, and those of a freshly initialised copy."""
        start = time.perf_counter()
        self.fresh_maps = self._fresh_maps(pl_module)
        self.seconds += time.perf_counter() - start
        self._take(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The batch's loss (at the step whose weights computed it), and the maps at the monitor's cadence."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self.loss[trainer.global_step - 1] = float(loss.detach())
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._take(step, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final maps, unless this step was just taken."""
        self._take(trainer.global_step, pl_module)

    # ------------------------------------------------------------------------------------------------ maps
    def explain(self, model: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """Every map of ``images`` at the layer: ``{name: (N, h, w) float32 in [0, 1]}`` (attention for ViTs)."""
        return dict(explain_batch(model, images.to(_device(model)), self.layer, METHODS).maps)

    def _take(self, step: int, pl_module: nn.Module) -> None:
        if step in self.maps:
            return
        start = time.perf_counter()
        self.maps[step] = _half(self.explain(pl_module, self.images))
        flipped = self.explain(pl_module, self.images.flip(-1))
        self.maps_flip[step] = _half({name: m.flip(-1) for name, m in flipped.items()})
        self.steps.append(step)
        self.seconds += time.perf_counter() - start

    def _fresh_maps(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """Maps of the same architecture rebuilt from its hyperparameters under ``fresh_seed`` (training RNG kept)."""
        hparams = getattr(pl_module, "hparams", None)
        if hparams is None:
            raise TypeError(
                f"{type(pl_module).__name__} has no saved hyperparameters; call self.save_hyperparameters() in its "
                "__init__ so that the recorder can build an independently initialised copy."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.fresh_seed)
            fresh = type(pl_module)(**dict(hparams)).to(_device(pl_module))
        return _half(self.explain(fresh, self.images))

    def record(self, meta: dict[str, Any], scalars: dict[int, dict[str, float]]) -> dict[str, Any]:
        """The run record (see the module doc): this recorder's maps and loss, plus ``meta`` and ``scalars``."""
        if not self.steps:
            raise RuntimeError("the recorder took no maps: was it passed to the Trainer, and did training start?")
        masks = self.masks.bool().cpu() if self.masks is not None else None
        return {
            "meta": {**meta, "layer": self.layer, "probe_size": int(self.images.shape[0]), "steps": max(self.steps)},
            "masks": masks,
            "steps": list(self.steps),
            "maps": self.maps,
            "maps_flip": self.maps_flip,
            "fresh_maps": self.fresh_maps,
            "scalars": scalars,
            "loss": dict(sorted(self.loss.items())),
        }


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _half(maps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: m.detach().to("cpu", torch.float16) for name, m in maps.items()}


# ---------------------------------------------------------------------------------------------------- runs
def event_scalars(log_dir: Path) -> dict[int, dict[str, float]]:
    """Every scalar of the TensorBoard event files under ``log_dir``: ``{step: {tag: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 1})
    accumulator.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            out.setdefault(int(event.step), {})[tag] = float(event.value)
    return dict(sorted(out.items()))


def train_and_record(
    example: str, argv: Sequence[str], run_dir: Path, meta: dict[str, Any], every_n_steps: int
) -> dict[str, Any]:
    """Train ``examples/<example>.py`` with ``argv`` (plus ``--output run_dir``), record it, write ``record.pt``.

    Args:
        example: module name under ``examples/`` whose ``main(argv, extra_callbacks=...)`` trains and returns the
            TensorBoard log folder.
        argv: the example's arguments (without ``--output``).
        run_dir: the run's folder: TensorBoard logs and checkpoint, and ``record.pt``.
        meta: what the record's ``meta`` says about the run (method, seed, swap, recipe, ...); ``command`` and
            ``seconds`` are added here.
        every_n_steps: the example's monitor cadence (the recorder's steps must be the monitor's).

    Returns:
        The record (also saved as ``run_dir / "record.pt"``).
    """
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    module = importlib.import_module(example)
    argv = [*argv, "--output", str(run_dir)]
    recorders: list[Recorder] = []

    def extra_callbacks(images: Tensor, masks: Tensor | None, layer: str) -> list[Callback]:
        recorders.append(Recorder(images, masks, layer, every_n_steps))
        return recorders[-1:]

    start = time.perf_counter()
    log_dir = module.main(argv, extra_callbacks=extra_callbacks)
    seconds = time.perf_counter() - start
    (recorder,) = recorders
    command = shlex.join(["python", f"examples/{example}.py", *argv])
    meta = {**meta, "command": command, "seconds": round(seconds, 1), "map_seconds": round(recorder.seconds, 1)}
    meta["threads"] = torch.get_num_threads()
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = recorder.record(meta, event_scalars(Path(log_dir)))
    torch.save(record, run_dir / "record.pt")
    return record


# ---------------------------------------------------------------------------------------------------- CSVs
def localization_at(record: dict[str, Any], step: int, name: str) -> dict[str, float]:
    """Pointing game and energy-in-mask of one recorded map at ``step``, averaged over the probe."""
    maps = record["maps"][step][name].float()
    return _localization(maps, record["masks"])


def _localization(maps: Tensor, masks: Tensor) -> dict[str, float]:
    full = upsample_maps(maps, tuple(masks.shape[-2:]))
    values = localization_metrics(full, masks)
    return {metric: float(values[metric].nanmean()) for metric in ("pointing_game", "energy_in_mask")}


def random_reference(masks: Tensor, seed: int = 0) -> dict[str, float]:
    """The monitor's reference lines: a fixed random map's localization, and chance (the mask's area)."""
    values = _localization(random_maps(masks.float(), seed=seed), masks)
    area = masks.flatten(1).float().mean(dim=1)
    return {**values, "chance": float(area[area > 0].mean())}


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def summary_row(run: str, record: dict[str, Any]) -> dict[str, Any]:
    """One row of the per-run summary CSV: each map's localization at step 0 and at the end, references, loss,
    collapse indicators, time, and whether the run meets the issue's criterion (see :data:`CRITERION_RISE`)."""
    meta = record["meta"]
    first, last = record["steps"][0], record["steps"][-1]
    row: dict[str, Any] = {"run": run, "method": meta["method"], "seed": meta["seed"], "swap": meta["swap"]}
    row.update({"recipe": meta.get("recipe", ""), "steps": last, "seconds": meta["seconds"]})
    reference = random_reference(record["masks"])
    names = [name for name in MAP_NAMES if name in record["maps"][last]]
    for name in names:
        init, end = localization_at(record, first, name), localization_at(record, last, name)
        fresh_map = record["fresh_maps"].get(name)
        fresh = _localization(fresh_map.float(), record["masks"]) if fresh_map is not None else {}
        row[f"{name}_pg_init"], row[f"{name}_pg_end"] = init["pointing_game"], end["pointing_game"]
        row[f"{name}_eim_init"], row[f"{name}_eim_end"] = init["energy_in_mask"], end["energy_in_mask"]
        row[f"{name}_pg_fresh"] = fresh.get("pointing_game", math.nan)
    row["random_pg"], row["random_eim"], row["chance"] = (
        reference["pointing_game"],
        reference["energy_in_mask"],
        reference["chance"],
    )
    losses = record["loss"]
    ordered = [losses[k] for k in sorted(losses)]
    row["loss_first"], row["loss_last"] = _mean(ordered[:5]), _mean(ordered[-5:])
    scalars = record["scalars"]
    for key, tag in (("spread", "saliency/embedding/spread"), ("erank", "saliency/embedding/effective_rank")):
        row[f"{key}_init"] = scalars.get(first, {}).get(tag, math.nan)
        row[f"{key}_end"] = scalars.get(last, {}).get(tag, math.nan)
    if "tsm" in names:
        rise = row["tsm_pg_end"] - row["tsm_pg_init"]
        above = row["tsm_pg_end"] - row["random_pg"]
        row["learned"] = bool(rise >= CRITERION_RISE and above >= CRITERION_ABOVE_RANDOM)
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}


def long_rows(run: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every per-step scalar of a run in long format (``LONG_FIELDS``): the logged scalars, the loss as ``loss``,
    and each recorded map's pointing game and energy-in-mask as ``record/<name>/<metric>``."""
    meta = record["meta"]
    base = {"run": run, "method": meta["method"], "seed": meta["seed"], "swap": meta["swap"]}
    rows = [
        {**base, "step": step, "tag": tag, "value": value}
        for step, tags in record["scalars"].items()
        for tag, value in sorted(tags.items())
    ]
    rows += [{**base, "step": step, "tag": "loss", "value": value} for step, value in record["loss"].items()]
    for step in record["steps"]:
        for name in record["maps"][step]:
            for metric, value in localization_at(record, step, name).items():
                rows.append({**base, "step": step, "tag": f"record/{name}/{metric}", "value": value})
    return rows


def replace_rows(path: Path, rows: list[dict[str, Any]], runs: set[str], fields: Sequence[str] | None = None) -> None:
    """Rewrite the CSV at ``path``: its rows of other runs kept, those of ``runs`` replaced by ``rows``."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        with path.open(newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if row["run"] not in runs]
    every = kept + rows
    if fields is None:
        fields = list(dict.fromkeys(key for row in every for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), restval="")
        writer.writeheader()
        writer.writerows(sorted(every, key=lambda row: str(row["run"])) if fields != LONG_FIELDS else every)


def load_record(path: Path) -> dict[str, Any]:
    """A ``record.pt`` as written by :func:`train_and_record` (plain data only: ``weights_only=True``)."""
    return torch.load(path, weights_only=True)


def write_csvs(results: Path, runs: dict[str, dict[str, Any]], prefix: str = "") -> None:
    """Write (or update) ``<prefix>summary.csv`` and ``<prefix>scalars.csv`` under ``results`` for ``runs``."""
    names = set(runs)
    replace_rows(results / f"{prefix}summary.csv", [summary_row(run, rec) for run, rec in runs.items()], names)
    long = [row for run, rec in runs.items() for row in long_rows(run, rec)]
    replace_rows(results / f"{prefix}scalars.csv", long, names, LONG_FIELDS)


# ---------------------------------------------------------------------------------------------------- figure
def curve_figure(
    scalars: Iterable[dict[str, str]],
    path: Path,
    group: Callable[[dict[str, str]], str | None],
    title: str,
    tag: str = "record/tsm/pointing_game",
    ylabel: str = "TSM pointing game (128 held-out images)",
) -> dict[str, int]:
    """Curves of ``tag`` against the step from long-format rows, one group of runs per colour, with references.

    Every run is a thin line; each group's mean is a thick line over a band from its lowest to its highest run;
    the random map's and chance's values (``saliency/random/pointing_game``, ``saliency/chance/pointing_game`` at
    step 0, averaged over the runs drawn) are horizontal lines. ``group(row)`` names a row's group (its legend
    entry), or ``None`` to leave the run out.

    Returns:
        ``{group: number of runs}``, in the order drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib comes with the dev extra (through mlflow)
        raise ImportError("the figures need matplotlib: pip install matplotlib (or the dev extra)") from err
    curves: dict[str, dict[str, dict[int, float]]] = {}
    references: dict[str, dict[str, float]] = {"random": {}, "chance": {}}
    for row in scalars:
        name = group(row)
        if name is None:
            continue
        if row["tag"] == tag:
            curves.setdefault(name, {}).setdefault(row["run"], {})[int(row["step"])] = float(row["value"])
        elif row["step"] == "0" and row["tag"] in ("saliency/random/pointing_game", "saliency/chance/pointing_game"):
            references[row["tag"].split("/")[1]][row["run"]] = float(row["value"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    counts: dict[str, int] = {}
    for index, (name, runs) in enumerate(curves.items()):
        colour = f"C{index}" if len(curves) <= 10 else plt.get_cmap("tab20")(index % 20)
        steps = sorted({step for run in runs.values() for step in run})
        table = [[run[s] for run in runs.values() if s in run] for s in steps]
        for run in runs.values():
            ax.plot(sorted(run), [run[s] for s in sorted(run)], color=colour, linewidth=0.6, alpha=0.5)
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in table], [max(v) for v in table], color=colour, alpha=0.12)
        label = f"{name} ({len(runs)} run{'s' * (len(runs) > 1)}{', mean and range' if len(runs) > 1 else ''})"
        means = [sum(v) / len(v) for v in table]
        ax.plot(steps, means, color=colour, linewidth=2, marker="o", markersize=3, label=label)
        counts[name] = len(runs)
    for name, style, text in (("random", "--", "random map"), ("chance", ":", "chance (mean object area)")):
        if references[name]:
            value = sum(references[name].values()) / len(references[name])
            ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{text} {value:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return counts
