"""The maps' cost as a share of the probe forward pass, and a method x architecture latency table.

Run ``python benchmarks/bench_forward.py`` (``--quick`` for a smoke run). For each model and input size, a probe
batch runs through a randomly initialised torchvision ResNet in eval mode under ``torch.no_grad()`` while the
monitored layer is captured; ``saliency_maps`` then runs on the captured features. Both are timed with
``torch.utils.benchmark``. With CUDA, the same is timed on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from bench_utils import (
    Timing,
    fmt_ms,
    markdown_table,
    run_script,
    time_blocks,
    time_fast,
)
from torch import Tensor, nn

from tsm_lightning import METHODS, capture, saliency_maps

PROBE_BATCH = 16
GOAL_SHARE = 2.0  # percent of the probe forward pass


@dataclass(frozen=True)
class Case:
    """One model, input size and monitored layer."""

    arch: str
    stem: str  # "imagenet" (torchvision's) or "cifar" (3x3 stride-1 conv, no max-pool, as examples/common.py)
    size: int
    layer: str
    note: str = ""

    @property
    def label(self) -> str:
        stem = "" if self.stem == "imagenet" else f", {self.stem} stem"
        return f"{self.arch}{stem}"


CASES: tuple[Case, ...] = (
    Case("ResNet18", "imagenet", 64, "layer2", "examples' default at 64 px"),
    Case("ResNet18", "cifar", 64, "layer4", "examples with --stem cifar"),
    Case("ResNet18", "imagenet", 224, "layer4"),
    Case("ResNet50", "imagenet", 224, "layer4"),
)
QUICK_CASES: tuple[Case, ...] = (Case("ResNet18", "imagenet", 64, "layer2", "examples' default at 64 px"),)

# The torchcam-style table: architecture columns at 224 px, layer4 (the paper's layer).
LATENCY_CASES: tuple[Case, ...] = (CASES[2], CASES[3])
LATENCY_BATCHES: tuple[int, ...] = (1, 16)
METHOD_NAMES = {"eigencam": "EigenCAM", "tsm": "TSM", "multivec_eigencam": "Multivec-EigenCAM", "mtsm": "MTSM"}


def build_model(case: Case) -> nn.Module:
    """A randomly initialised torchvision ResNet (no download)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, case.arch.lower())()
    if case.stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model.eval()


def probe_forward(model: nn.Module, images: Tensor) -> None:
    """The monitor's forward: eval mode, no autograd (the model is already in eval mode here)."""
    with torch.no_grad():
        model(images)


def captured_features(model: nn.Module, images: Tensor, layer: str) -> Tensor:
    """Features of ``layer`` on ``images``, float32, as the monitor passes them to the maths."""
    with capture(model, layer) as cap:
        model(images)
    return cap.features.float()


@dataclass(frozen=True)
class ForwardResult:
    """Timings of one case on one device."""

    case: Case
    feature_shape: tuple[int, ...]
    forward: Timing
    all_four: Timing
    tsm: Timing


def measure_case(case: Case, batch: int, device: torch.device, min_run_time: float) -> ForwardResult:
    """Time the probe forward and the maps on its captured features."""
    model = build_model(case).to(device)
    images = torch.randn(batch, 3, case.size, case.size, generator=torch.Generator().manual_seed(1)).to(device)
    features = captured_features(model, images, case.layer)
    forward = time_fast(lambda: probe_forward(model, images), min_run_time=min_run_time)
    all_four = time_fast(lambda: saliency_maps(features), min_run_time=min_run_time / 2)
    tsm = time_fast(lambda: saliency_maps(features, "tsm"), min_run_time=min_run_time / 2)
    return ForwardResult(case, tuple(features.shape[1:]), forward, all_four, tsm)


def share_table(results: Sequence[ForwardResult], batch: int) -> str:
    """Markdown table: forward time, maps time and the maps' share of the forward."""
    rows = []
    for r in results:
        rows.append(
            [
                r.case.label,
                f"{r.case.size} px",
                f"{r.case.layer}" + (f" ({r.case.note})" if r.case.note else ""),
                "x".join(str(s) for s in r.feature_shape),
                fmt_ms(r.forward.ms),
                fmt_ms(r.all_four.ms),
                f"{100 * r.all_four.median / r.forward.median:.2f}",
                fmt_ms(r.tsm.ms),
                f"{100 * r.tsm.median / r.forward.median:.2f}",
            ]
        )
    return markdown_table(
        [
            "model",
            "input",
            "layer",
            "features",
            f"forward, B={batch} (ms)",
            "all four maps (ms)",
            "all four / forward (%)",
            "TSM only (ms)",
            "TSM / forward (%)",
        ],
        rows,
        align="lllrrrrrr",
    )


def latency_table(cases: Sequence[Case], batches: Sequence[int], device: torch.device, min_run_time: float) -> str:
    """torchcam-style table: method rows x architecture columns, median (IQR) latency of the maps alone."""
    columns: list[str] = []
    cells: dict[str, list[str]] = {name: [] for name in (*METHODS, "all four")}
    for case in cases:
        model = build_model(case).to(device)
        images_all = torch.randn(max(batches), 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
        features_all = captured_features(model, images_all.to(device), case.layer)
        for b in batches:
            features = features_all[:b].contiguous()
            shape = "x".join(str(s) for s in features.shape[1:])
            columns.append(f"{case.arch} {case.layer} ({shape}), B={b}")
            for name in METHODS:
                t = time_blocks(lambda x=features, n=name: saliency_maps(x, n), min_run_time=min_run_time)
                cells[name].append(f"{fmt_ms(t.ms)} ({fmt_ms(t.iqr * 1e3)})")
            t = time_blocks(lambda x=features: saliency_maps(x), min_run_time=min_run_time)
            cells["all four"].append(f"{fmt_ms(t.ms)} ({fmt_ms(t.iqr * 1e3)})")
    rows = [[METHOD_NAMES.get(name, name), *values] for name, values in cells.items()]
    return markdown_table(["method", *columns], rows)


def run(quick: bool = False) -> str:
    """All tables of this script as markdown text."""
    cases = QUICK_CASES if quick else CASES
    batch = 4 if quick else PROBE_BATCH
    min_run_time = 0.05 if quick else 1.0
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    parts = ["## Saliency maps as a share of the probe forward pass"]
    for device in devices:
        results = [measure_case(case, batch, device, min_run_time) for case in cases]
        name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
        parts.append(f"### {name}, probe batch B={batch}, float32, eval mode, no_grad")
        parts.append(share_table(results, batch))
        if device.type == "cpu":
            worst = max(100 * r.all_four.median / r.forward.median for r in results)
            verdict = "met" if worst <= GOAL_SHARE else "**not met**"
            parts.append(f"Goal: all four maps <= {GOAL_SHARE:g}% of the forward pass: worst {worst:.2f}% ({verdict}).")
    lat_cases = QUICK_CASES if quick else LATENCY_CASES
    lat_batches = (1, batch) if quick else LATENCY_BATCHES
    for device in devices:
        name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
        parts.append(f"### Latency of the maps alone, {name}: median (IQR) in ms, {lat_cases[0].size} px inputs")
        parts.append(latency_table(lat_cases, lat_batches, device, min_run_time=0.05 if quick else 0.4))
    parts.append(
        "Features captured from randomly initialised torchvision models on random inputs; a single method is "
        "`saliency_maps(features, method)` (normalised maps), 'all four' is one `saliency_maps(features)` call."
    )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    run_script(run, __doc__, argv)


if __name__ == "__main__":
    main()
