"""Where the time of one ``SaliencyMonitor`` run goes: forward, decomposition and maps, metrics, rendering, writing.

Run ``python benchmarks/bench_monitor_run.py`` (``--quick`` for a smoke run). The model is lightly's layout of a
random-init ResNet18 (``backbone = resnet18 children but the classifier``) at 64 px, monitored at ``backbone.5``
(layer2, an 8x8 grid of 128 channels, the automatic choice at 64 px), with a probe of 128 ``SyntheticShapes``
images and their masks (so the localization metrics run), every method, ``metrics=True``, and a TensorBoard logger.
``monitor.run`` is called directly, after one warm-up run (the first run also computes the fresh-initialisation
reference, a one-off). The current package reports its own split (:attr:`tsm_lightning.tracking.RunResult.seconds`):

* **forward**: the probe through the backbone, with the hook;
* **decomposition + maps**;
* **metrics** (with their reference series);
* **rendering and the rest**: upsampling for display, overlays, grids, and handing the run to the writer;
* **writing on the training thread**: zero since the writing moved to the monitor's background writer;
* **whole run**: the training thread's time in ``monitor.run``;
* **background writing**: the time ``monitor.flush()`` then waits for the writer (TensorBoard images, scalars).

The ratio **whole run / (forward + maps)** is the training thread's cost relative to the probe's forward and maps.
A revision from before the run object (``--before``) is split by wrapping its private seams (``_capture_probe``,
``_maps``, ``_scalars``, ``_log``), as this benchmark did then; its writing happens on the training thread.

``--before REV`` also measures the package as it was at git revision ``REV`` (extracted with ``git archive`` into a
temporary folder and imported under another name), alternating with the current one in the same process, so both
see the same machine load.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torchvision
from bench_utils import fmt_ms, machine_header, markdown_table, set_threads
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = (
    "forward",
    "decomposition + maps",
    "metrics",
    "rendering and the rest",
    "writing on the training thread",
    "whole run",
    "whole run / (forward + maps)",
    "background writing",
)


class Backbone(LightningModule):
    """lightly's layout: ``backbone`` is a ResNet18 without its classifier (no training step needed here)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(1)


def probe(count: int, size: int) -> tuple[Tensor, Tensor]:
    from tsm_lightning.data import SyntheticShapes

    images, masks = zip(*(SyntheticShapes(count, image_size=size, seed=1)[i] for i in range(count)), strict=True)
    return torch.stack(images), torch.stack(masks)


def load_revision(rev: str, folder: Path) -> ModuleType:
    """``tsm_lightning`` as it was at ``rev``, importable as ``tsm_lightning_before``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tsm_lightning"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    package = folder / "tsm_lightning_before"
    (folder / "tsm_lightning").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\btsm_lightning\b", "tsm_lightning_before", path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("tsm_lightning_before")


class Split:
    """Wraps an old revision's private seams (before the run object) and accumulates their times for one run."""

    def __init__(self, monitor: Any, package: ModuleType) -> None:
        self.times: dict[str, float] = dict.fromkeys(("forward", "maps", "spectra", "scalars", "log"), 0.0)
        for attr, key in (("_capture_probe", "forward"), ("_maps", "maps"), ("_scalars", "scalars"), ("_log", "log")):
            setattr(monitor, attr, self._timed(getattr(monitor, attr), key))
        metrics = importlib.import_module(f"{package.__name__}.metrics")
        second = getattr(metrics, "_spectral_concentrations", None)  # versions that decomposed twice
        if second is not None:
            metrics._spectral_concentrations = self._timed(second, "spectra")

    def _timed(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[key] += time.perf_counter() - start

        return wrapper

    def measure(self, monitor: Any, trainer: Trainer, model: Any) -> dict[str, float]:
        for key in self.times:
            self.times[key] = 0.0
        start = time.perf_counter()
        monitor.run(trainer, model)
        total = time.perf_counter() - start
        t = self.times
        return _split(t["forward"], t["maps"] + t["spectra"], t["scalars"] - t["spectra"], t["log"], total, 0.0)


def measure_current(monitor: Any, trainer: Trainer, model: Any) -> dict[str, float]:
    """One run of the current package: its own split, the training thread's time, then the writer's."""
    start = time.perf_counter()
    result = monitor.run(trainer, model)
    total = time.perf_counter() - start
    start = time.perf_counter()
    monitor.flush()
    background = time.perf_counter() - start
    seconds = result.seconds
    return _split(seconds["forward"], seconds["maps"], seconds["metrics"], 0.0, total, background)


def _split(
    forward: float, maps: float, metrics: float, log: float, total: float, background: float
) -> dict[str, float]:
    return {
        "forward": forward,
        "decomposition + maps": maps,
        "metrics": metrics,
        "rendering and the rest": total - forward - maps - metrics - log,
        "writing on the training thread": log,
        "whole run": total,
        "whole run / (forward + maps)": total / (forward + maps),
        "background writing": background,
    }


def make_monitor(package: ModuleType, images: Tensor, masks: Tensor, root: Path) -> tuple[Any, Trainer, Any]:
    callbacks = importlib.import_module(f"{package.__name__}.callbacks")
    if hasattr(package, "Probe"):
        probe = package.Probe(images, masks)
        monitor = callbacks.SaliencyMonitor(probe, layer="backbone.5", num_images=len(images), strict=True)
    else:  # before the run object: masks were an argument
        kwargs = {"masks": masks, "layer": "backbone.5", "num_images": len(images), "strict": True}
        monitor = callbacks.SaliencyMonitor(images, **kwargs)
    trainer = Trainer(
        logger=TensorBoardLogger(str(root), name=package.__name__),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Backbone().eval()
    monitor.setup(trainer, model, "fit")
    if hasattr(monitor, "tracker"):
        monitor.tracker.prepare(model, monitor.probe)
    else:
        monitor._prepare(trainer, model)
    return monitor, trainer, model


def quiet() -> None:
    """Silence Lightning's start-up banners."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def measure(packages: dict[str, ModuleType], count: int, size: int, runs: int) -> dict[str, list[dict[str, float]]]:
    images, masks = probe(count, size)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in packages}
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setups = {}
        for name, package in packages.items():
            monitor, trainer, model = make_monitor(package, images, masks, Path(root))
            if hasattr(monitor, "tracker"):
                measure_one: Callable[..., dict[str, float]] = measure_current
            else:
                measure_one = Split(monitor, package).measure
            measure_one(monitor, trainer, model)  # warm-up: also the one-off fresh-initialisation reference
            setups[name] = monitor, trainer, model, measure_one
        for _ in range(runs):
            for name, (monitor, trainer, model, measure_one) in setups.items():
                samples[name].append(measure_one(monitor, trainer, model))
    return samples


def table(samples: dict[str, list[dict[str, float]]]) -> str:
    names = list(samples)
    rows = []
    for category in CATEGORIES:
        medians = [statistics.median(s[category] for s in samples[name]) for name in names]
        if category.startswith("whole run /"):
            rows.append([category, *(f"{m:.2f}x" for m in medians)])
            continue
        whole = [statistics.median(s["whole run"] for s in samples[name]) for name in names]
        rows.append(
            [category, *(f"{fmt_ms(m * 1e3)} ({100 * m / w:.0f}%)" for m, w in zip(medians, whole, strict=True))]
        )
    return markdown_table(["part of one run", *(f"{name} (ms, share of the whole run)" for name in names)], rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke version")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every core)")
    parser.add_argument("--before", metavar="REV", help="also measure the package at this git revision")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per version (default 7)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(machine_header(), end="\n\n")
    print(run(quick=args.quick, before=args.before, runs=args.runs))


def run(quick: bool = False, before: str | None = None, runs: int = 7) -> str:
    quiet()
    count, size, runs = (8, 32, 1) if quick else (128, 64, runs)
    packages = {"current": importlib.import_module("tsm_lightning")}
    with tempfile.TemporaryDirectory() as folder:
        if before:
            packages = {f"at {before}": load_revision(before, Path(folder)), **packages}
        samples = measure(packages, count, size, runs)
    return "\n\n".join(
        [
            "## One SaliencyMonitor run, split",
            f"ResNet18 (lightly layout, random init) at {size} px, layer `backbone.5`, probe of {count} images with "
            f"masks, all four methods, metrics on, TensorBoard logger; median of {runs} runs after a warm-up.",
            table(samples),
        ]
    )


if __name__ == "__main__":
    main()
