"""Overhead of ``SaliencyMonitor`` on a short CPU training run, measured with and without it in one process.

Run ``python benchmarks/bench_callback.py`` (``--quick`` for a smoke run). A SimSiam-style model with lightly's
layout (torchvision ResNet18 backbone without its classifier, projection and prediction heads, lightly's
``NegativeCosineSimilarity``) trains on random two-view images for a fixed number of steps, with a
TensorBoard logger, three ways, alternating in rotated order over several rounds:

* without the monitor;
* with ``SaliencyMonitor()`` at the default cadence (every 200 steps: in a short run only the fit-start and
  fit-end runs happen, which is what a user sees);
* with an aggressive cadence, ``every_n_steps=5``.

The ratio of fit wall times (with / without, paired within each round) is reported as the median over rounds,
together with the cost of one monitor run, from which the overhead of the default cadence on a long run
follows: ``cost / (200 x step time)``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from bench_utils import fmt_ms, markdown_table, run_script
from lightly.loss import NegativeCosineSimilarity
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tsm_lightning.callbacks import SaliencyMonitor
from tsm_lightning.callbacks.monitor import DEFAULT_EVERY_N_STEPS

GOAL_OVERHEAD = 1.0  # percent, default cadence
AGGRESSIVE_EVERY = 5


@dataclass(frozen=True)
class Config:
    """Size of the training run."""

    steps: int
    batch_size: int
    image_size: int
    layer: str
    rounds: int
    warmup_steps: int


FULL = Config(steps=48, batch_size=16, image_size=64, layer="backbone.5", rounds=3, warmup_steps=6)
QUICK = Config(steps=6, batch_size=4, image_size=32, layer="backbone.5", rounds=1, warmup_steps=2)


class TwoViewNoise(Dataset):
    """Random images; each sample is ``([view0, view1], index)`` like lightly's multi-view datasets."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[Tensor], int]:
        x = self.images[i]
        return [x + 0.1 * torch.randn_like(x), x.flip(-1) + 0.1 * torch.randn_like(x)], i


class SimSiam(LightningModule):
    """lightly's layout: ``backbone`` (ResNet18 children but the classifier), projection and prediction heads."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128), nn.BatchNorm1d(128)
        )
        self.prediction_head = nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 128))
        self.criterion = NegativeCosineSimilarity()
        self.lr = lr

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projection_head(self.backbone(x).flatten(1))
        return z, self.prediction_head(z)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        z0, p0 = self(x0)
        z1, p1 = self(x1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TimedMonitor(SaliencyMonitor):
    """``SaliencyMonitor`` recording the wall time of each of its runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_times: list[float] = []
        self.compute_times: list[float] = []
        self.hook_time = 0.0  # every monitor hook, runs included

    def _timed(self, hook: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        self.hook_time += time.perf_counter() - start

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().setup, *args, **kwargs)

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_train_start, *args, **kwargs)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_train_batch_end, *args, **kwargs)

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_train_end, *args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = super().run(*args, **kwargs)
        self.run_times.append(time.perf_counter() - start)  # the training thread's time; writing is in the background
        self.compute_times.append(result.seconds["forward"] + result.seconds["maps"])  # probe forward and maps
        return result


class StepClock(Callback):
    """Timestamps at the end of each training batch (present in every run, monitor or not)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())


@dataclass
class Samples:
    """What one cadence accumulated over the rounds."""

    fit_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    hooks_s: list[float] = field(default_factory=list)  # per fit: time inside the monitor's hooks
    runs_per_fit: int = 0


def fit_once(config: Config, every_n_steps: int | None, root: str, steps: int) -> tuple[float, StepClock, Any]:
    """One training run; returns the fit wall time, its step clock and the monitor (or ``None``)."""
    torch.manual_seed(0)
    model = SimSiam()
    dataset = TwoViewNoise(config.batch_size * steps, config.image_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True)
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    monitor = None
    if every_n_steps is not None:
        probe = torch.randn(8, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
        # strict: a failing run must fail the benchmark, not become a warning and a fast, empty "run".
        monitor = TimedMonitor(probe, layer=config.layer, every_n_steps=every_n_steps, strict=True)
        callbacks.append(monitor)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=TensorBoardLogger(root, name="bench"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start, clock, monitor


def quiet() -> None:
    """Silence Lightning's start-up banners and the single-process dataloader hint."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def measure(config: Config) -> dict[str, Samples]:
    """Alternate the three cadences over ``config.rounds`` rounds (order rotated each round)."""
    cadences: dict[str, int | None] = {
        "without monitor": None,
        f"default (every {DEFAULT_EVERY_N_STEPS} steps)": DEFAULT_EVERY_N_STEPS,
        f"aggressive (every {AGGRESSIVE_EVERY} steps)": AGGRESSIVE_EVERY,
    }
    names = list(cadences)
    samples = {name: Samples() for name in names}
    with tempfile.TemporaryDirectory() as root:
        fit_once(config, AGGRESSIVE_EVERY, root, config.warmup_steps)  # warm-up, discarded
        for r in range(config.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wall, clock, monitor = fit_once(config, cadences[name], root, config.steps)
                s = samples[name]
                s.fit_s.append(wall)
                s.step_s.extend(b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False))
                if monitor is not None:
                    s.run_s.extend(monitor.run_times)
                    s.compute_s.extend(monitor.compute_times)
                    s.runs_per_fit = len(monitor.run_times)
                    s.hooks_s.append(monitor.hook_time)
                else:
                    s.hooks_s.append(0.0)
    return samples


def tables(samples: dict[str, Samples], config: Config) -> str:
    """Markdown tables: paired fit-time ratios, and the cost of one monitor run."""
    names = list(samples)
    base = samples[names[0]]
    step = statistics.median(base.step_s)
    rows = []
    ratios: dict[str, float] = {}
    directs: dict[str, float] = {}
    for name in names:
        s = samples[name]
        paired = [w / b for w, b in zip(s.fit_s, base.fit_s, strict=True)]
        ratios[name] = statistics.median(paired)
        outside = [w - h for w, h in zip(s.fit_s, s.hooks_s, strict=True)]
        direct = [h / o for h, o in zip(s.hooks_s, outside, strict=True)]
        directs[name] = 100 * statistics.median(direct)
        rows.append(
            [
                name,
                s.runs_per_fit,
                f"{statistics.median(s.fit_s):.2f}",
                f"{statistics.median(s.hooks_s):.2f}",
                f"{statistics.median(outside):.2f}",
                fmt_ms(statistics.median(s.step_s) * 1e3),
                "1 (reference)" if s is base else f"{ratios[name]:.4f}",
                "-" if s is base else ", ".join(f"{r:.3f}" for r in paired),
                "-" if s is base else f"{100 * (ratios[name] - 1):+.2f}",
                "-" if s is base else f"{directs[name]:.2f}",
            ]
        )
    fit_table = markdown_table(
        [
            "cadence",
            "monitor runs per fit",
            "fit wall time (s)",
            "in monitor hooks (s)",
            "fit minus hooks (s)",
            "training step (ms)",
            "ratio with / without",
            "per-round ratios",
            "overhead (%)",
            "hooks / (fit minus hooks) (%)",
        ],
        rows,
    )
    all_runs = [t for name in names[1:] for t in samples[name].run_s]
    cost = statistics.median(all_runs)
    compute = statistics.median([t for name in names[1:] for t in samples[name].compute_s])
    long_default = 100 * cost / (DEFAULT_EVERY_N_STEPS * step)
    long_aggressive = 100 * cost / (AGGRESSIVE_EVERY * step)
    cost_table = markdown_table(
        [
            "one monitor run, median (ms)",
            "min - max (ms)",
            "of which probe forward + maps (ms)",
            "runs measured",
            "training step, median (ms)",
            f"long run, every {DEFAULT_EVERY_N_STEPS} steps (%)",
            f"long run, every {AGGRESSIVE_EVERY} steps (%)",
        ],
        [
            [
                fmt_ms(cost * 1e3),
                f"{fmt_ms(min(all_runs) * 1e3)} - {fmt_ms(max(all_runs) * 1e3)}",
                fmt_ms(compute * 1e3),
                len(all_runs),
                fmt_ms(step * 1e3),
                f"{long_default:.3f}",
                f"{long_aggressive:.2f}",
            ]
        ],
        align="r" * 7,
    )
    short = 100 * (ratios[names[1]] - 1)
    short_direct = directs[names[1]]
    verdict_short = "met" if max(short, short_direct) <= GOAL_OVERHEAD else "**not met**"
    verdict_long = "met" if long_default <= GOAL_OVERHEAD else "**not met**"
    return "\n\n".join(
        [
            "## SaliencyMonitor overhead on a short CPU training run",
            f"SimSiam-style ResNet18 (lightly layout), {config.image_size} px, batch {config.batch_size} x 2 views, "
            f"{config.steps} steps, SGD, TensorBoard logger; monitor: 8 probe images, layer `{config.layer}`, all "
            f"four methods. {config.rounds} rounds, the three cadences alternating in rotated order in one process; "
            "ratios paired within a round, median over rounds.",
            fit_table,
            "Times are medians over rounds. 'In monitor hooks' is the wall time spent inside the monitor's "
            "callback hooks (setup, train start, batch end, train end) in one fit; 'training step' is the median "
            "time between consecutive batch ends. The wall-time ratio compares separate fits and carries their noise "
            "(on a shared machine, several percent); the last column is the monitor's own time relative to the "
            "rest of the same fit, free of that noise but blind to indirect effects on the training steps.",
            "### Cost of one monitor run (probe forward + maps + overlays + TensorBoard images and scalars)",
            cost_table,
            "Long-run overhead = cost of one run / (cadence x training step time). 'Probe forward + maps' is "
            "`SaliencyMonitor.compute` (capture and `saliency_maps`); the rest of a run is upsampling, overlays, "
            "grids and logging.",
            f"Goal: <= {GOAL_OVERHEAD:g}% at the default cadence: on this {config.steps}-step run (fit start and end "
            f"only) {short:+.2f}% by wall-time ratio, {short_direct:.2f}% by the monitor's own time "
            f"({verdict_short}); on a long run (one run per {DEFAULT_EVERY_N_STEPS} steps) "
            f"{long_default:.3f}% ({verdict_long}).",
        ]
    )


def run(quick: bool = False) -> str:
    """All tables of this script as markdown text."""
    quiet()
    config = QUICK if quick else FULL
    return tables(measure(config), config)


def main(argv: Sequence[str] | None = None) -> None:
    run_script(run, __doc__, argv)


if __name__ == "__main__":
    main()
