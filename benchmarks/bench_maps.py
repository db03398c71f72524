"""Batched ``saliency_maps`` against the per-image paths: the paper's tensorly Tucker and pytorch-grad-cam's SVD.

Run ``python benchmarks/bench_maps.py`` (``--quick`` for a smoke run). Prints markdown tables: latency of the
fast path (all four methods together, and TSM alone) next to the per-image references, the speed-ups, and the
max abs difference of the min-max-normalised maps to the references. The slow references are timed on the
first few images only and extrapolated linearly to the batch (marked in the table). With CUDA, the fast path
is also timed on the GPU and checked under TF32 and bfloat16 autocast.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from bench_grids import grid_tables
from bench_utils import (
    fmt_err,
    fmt_ms,
    fmt_x,
    markdown_table,
    run_script,
    synthetic_features,
    time_fast,
)
from reference_paths import gradcam_eigencam, minmax, numpy_multivec_eigencam, paper_tsm_mtsm
from torch import Tensor, nn

from tsm_lightning import METHODS, saliency_maps

Shape = tuple[int, int, int]

SHAPES: tuple[Shape, ...] = ((2048, 7, 7), (512, 7, 7), (768, 7, 7), (768, 14, 14), (512, 14, 14), (256, 28, 28))
"""ResNet50 / ResNet18 ``layer4`` at 224 px, ViT-B/16 tokens at 112 and 224 px ``(768, 7, 7)``, ``(768, 14, 14)``,
and the larger grids of smaller networks."""
BATCHES: tuple[int, ...] = (1, 16, 64)
QUICK_SHAPES: tuple[Shape, ...] = ((512, 7, 7), (128, 14, 14))
QUICK_BATCHES: tuple[int, ...] = (1, 16)

GOAL_MS = 30.0
GOAL_SPEEDUP = 1000.0
GPU_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Settings:
    """How long to measure: fast-path timer budget and the reference budgets."""

    min_run_time: float  # seconds per torch.utils.benchmark measurement
    paper_budget: float  # seconds of paper-path time per shape (at least one image)
    paper_max_images: int
    gradcam_budget: float
    gradcam_max_images: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(0.02, 0.0, 1, 0.0, 1)
        return cls(0.5, 10.0, 8, 5.0, 16)


@dataclass(frozen=True)
class References:
    """Per-image reference maps of the first images of a batch, and their mean time per image (seconds)."""

    paper_s: float  # tensorly Tucker -> TSM + MTSM, per image
    paper_images: int
    gradcam_s: float  # grad-cam EigenCAM, per image
    gradcam_images: int
    tsm: np.ndarray  # (k_paper, h, w), normalised
    mtsm: np.ndarray
    multivec: np.ndarray
    projection: np.ndarray  # (k_gradcam, h, w) signed grad-cam projection


def _timed_per_image(fn, acts: np.ndarray, budget: float, max_images: int) -> tuple[list[object], float]:
    """Run ``fn`` on one image at a time until ``budget`` seconds or ``max_images``; return outputs and s/image."""
    outputs, elapsed = [], 0.0
    for i in range(min(max_images, len(acts))):
        start = time.perf_counter()
        outputs.append(fn(acts[i : i + 1]))
        elapsed += time.perf_counter() - start
        if elapsed >= budget:
            break
    return outputs, elapsed / len(outputs)


def run_references(features: Tensor, settings: Settings) -> References:
    """Time the paper path and grad-cam's EigenCAM on the first images of ``features`` (float64 numpy)."""
    acts = features.double().numpy()
    paper, paper_s = _timed_per_image(paper_tsm_mtsm, acts, settings.paper_budget, settings.paper_max_images)
    cams, gradcam_s = _timed_per_image(gradcam_eigencam, acts, settings.gradcam_budget, settings.gradcam_max_images)
    k = len(paper)
    return References(
        paper_s=paper_s,
        paper_images=k,
        gradcam_s=gradcam_s,
        gradcam_images=len(cams),
        tsm=np.concatenate([t for t, _ in paper]),
        mtsm=np.concatenate([m for _, m in paper]),
        multivec=numpy_multivec_eigencam(acts[:k]),
        projection=np.concatenate([p for _, p in cams]),
    )


def eigencam_error_up_to_sign(fast: np.ndarray, projection: np.ndarray) -> float:
    """Max abs difference of normalised EigenCAM maps to grad-cam's, taking the better sign per image."""
    worst = 0.0
    for got, proj in zip(fast, projection, strict=True):
        err = min(float(np.abs(got - minmax(np.maximum(sign * proj, 0))).max()) for sign in (1.0, -1.0))
        worst = max(worst, err)
    return worst


def map_errors(maps: dict[str, Tensor], refs: References) -> dict[str, float]:
    """Max abs differences of the fast normalised maps to the references, on the images the references ran."""
    fast = {name: m.double().cpu().numpy() for name, m in maps.items()}
    b = len(fast["tsm"])
    k, kg = min(refs.paper_images, b), min(refs.gradcam_images, b)

    def max_abs(name: str, reference: np.ndarray) -> float:
        return float(np.abs(fast[name][:k] - reference[:k]).max())

    return {
        "eigencam": eigencam_error_up_to_sign(fast["eigencam"][:kg], refs.projection[:kg]),
        "tsm": max_abs("tsm", refs.tsm),
        "multivec_eigencam": max_abs("multivec_eigencam", refs.multivec),
        "mtsm": max_abs("mtsm", refs.mtsm),
    }


def breakdown(features: Tensor, total: float, min_run_time: float) -> list[object]:
    """Where the time of the fast path goes: the batched Gram (``bmm``) and the float64 ``eigh`` of both views."""
    b, c, h, w = features.shape
    n = h * w
    x = features.reshape(b, c, n)
    gram = (lambda: torch.bmm(x.transpose(1, 2), x)) if n <= c else (lambda: torch.bmm(x, x.transpose(1, 2)))
    both = torch.cat([gram(), gram()]).double()  # uncentred and centred Grams, solved in one call
    t_gram = time_fast(gram, min_run_time=min_run_time).ms
    t_eigh = time_fast(lambda: torch.linalg.eigh(both), min_run_time=min_run_time).ms
    rest = total - t_gram - t_eigh
    return [
        shape_label((c, h, w)),
        b,
        f"{min(c, n)} ({'N x N' if n <= c else 'C x C'})",
        fmt_ms(t_gram),
        fmt_ms(t_eigh),
        fmt_ms(rest) if rest > 0 else "~0",
        fmt_ms(total),
    ]


def shape_label(shape: Shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def cpu_tables(shapes: Sequence[Shape], batches: Sequence[int], settings: Settings) -> tuple[str, dict[str, float]]:
    """Speed and accuracy tables on the CPU; also returns the numbers the goals are checked against."""
    speed_rows, accuracy_rows, breakdown_rows = [], [], []
    goals: dict[str, float] = {}
    bmax = max(batches)
    for shape in shapes:
        features = synthetic_features(bmax, *shape, seed=sum(shape))
        refs = run_references(features, settings)
        errors = dict.fromkeys(METHODS, 0.0)
        for b in batches:
            batch = features[:b].contiguous()
            all_four = time_fast(lambda x=batch: saliency_maps(x), min_run_time=settings.min_run_time)
            tsm_only = time_fast(lambda x=batch: saliency_maps(x, "tsm"), min_run_time=settings.min_run_time)
            for name, err in map_errors(saliency_maps(batch), refs).items():
                errors[name] = max(errors[name], err)
            paper_ms = refs.paper_s * b * 1e3
            gradcam_ms = refs.gradcam_s * b * 1e3
            star_p = "*" if refs.paper_images < b else ""
            star_g = "*" if refs.gradcam_images < b else ""
            speed_rows.append(
                [
                    shape_label(shape),
                    b,
                    fmt_ms(all_four.ms),
                    fmt_ms(tsm_only.ms),
                    fmt_ms(paper_ms) + star_p,
                    fmt_ms(gradcam_ms) + star_g,
                    f"{min(refs.paper_images, b)} / {min(refs.gradcam_images, b)}",
                    fmt_x(paper_ms / all_four.ms),
                    fmt_x(gradcam_ms / all_four.ms),
                ]
            )
            if b == bmax:
                breakdown_rows.append(breakdown(batch, all_four.ms, settings.min_run_time))
            if shape == (2048, 7, 7) and b == 64:
                goals = {"all_four_ms": all_four.ms, "speedup": paper_ms / all_four.ms}
        accuracy_rows.append(
            [
                shape_label(shape),
                f"{refs.paper_images} / {refs.gradcam_images}",
                *(fmt_err(errors[name]) for name in ("tsm", "mtsm", "eigencam", "multivec_eigencam")),
            ]
        )
    speed = markdown_table(
        [
            "features (C, h, w)",
            "B",
            "all four (ms)",
            "TSM only (ms)",
            "paper path: tensorly Tucker, TSM+MTSM (ms)",
            "grad-cam EigenCAM, numpy SVD (ms)",
            "images timed (paper / grad-cam)",
            "all four vs paper",
            "all four vs grad-cam",
        ],
        speed_rows,
    )
    accuracy = markdown_table(
        [
            "features (C, h, w)",
            "images compared (Tucker / grad-cam)",
            "TSM vs Tucker",
            "MTSM vs Tucker",
            "EigenCAM vs grad-cam (up to sign)",
            "Multivec-EigenCAM vs numpy SVD",
        ],
        accuracy_rows,
    )
    text = "\n\n".join(
        [
            "### Latency of the maps on the CPU (float32 features)",
            speed,
            "Fast path: `saliency_maps(features)` (all four methods, one batched decomposition) and "
            "`saliency_maps(features, 'tsm')`, median of `torch.utils.benchmark` `blocked_autorange`. References: "
            "per image on float64 numpy arrays, timed with `time.perf_counter`; `*` = extrapolated linearly to B "
            "from the number of images timed (mean time per image x B). The speed-ups divide the reference time "
            "for B images by the fast time for all four methods.",
            "### Accuracy: max abs difference of min-max-normalised maps (fast float32 path vs float64 references)",
            accuracy,
            f"Max over B in {tuple(batches)} (the fast maps computed in batches of B) on the first images, "
            "where the references ran.",
            f"### Where the time goes (CPU, B={bmax}, all four maps)",
            markdown_table(
                [
                    "features (C, h, w)",
                    "B",
                    "Gram size m",
                    "Gram bmm, float32 (ms)",
                    "eigh of 2B m x m, float64 (ms)",
                    "rest (ms)",
                    "total (ms)",
                ],
                breakdown_rows,
            ),
            "Gram and eigh timed alone on the same batch; 'rest' = total - Gram - eigh (unfolding, finiteness "
            "check, centring, projections, maps, normalisation).",
        ]
    )
    return text, goals


def accelerator_tables(
    shapes: Sequence[Shape], batches: Sequence[int], settings: Settings, device: torch.device
) -> str:
    """Latency on ``device`` (CUDA), TF32 agreement with the CPU float64 maps and a bfloat16-autocast check."""
    speed_rows, precision_rows, autocast_rows = [], [], []
    bmax = max(batches)
    for shape in shapes:
        features = synthetic_features(bmax, *shape, seed=sum(shape))
        on_device = features.to(device)
        for b in batches:
            batch = on_device[:b].contiguous()
            all_four = time_fast(lambda x=batch: saliency_maps(x), min_run_time=settings.min_run_time)
            tsm_only = time_fast(lambda x=batch: saliency_maps(x, "tsm"), min_run_time=settings.min_run_time)
            speed_rows.append([shape_label(shape), b, fmt_ms(all_four.ms), fmt_ms(tsm_only.ms)])

        reference = saliency_maps(features.double())
        previous = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("high")
            got = saliency_maps(on_device)
        finally:
            torch.set_float32_matmul_precision(previous)
        errors = {name: float((got[name].cpu().double() - reference[name]).abs().max()) for name in METHODS}
        worst = max(errors.values())
        precision_rows.append(
            [
                shape_label(shape),
                bmax,
                *(fmt_err(errors[name]) for name in METHODS),
                "yes" if worst <= GPU_TOLERANCE else "**no**",
            ]
        )

        # Features produced under bfloat16 autocast (a 1x1 convolution stands in for the last layer).
        conv = nn.Conv2d(shape[0], shape[0], 1).to(device)
        with torch.no_grad():
            full = saliency_maps(conv(on_device))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = conv(on_device)
                inside = saliency_maps(low)
            outside = saliency_maps(low)
        finite = all(bool(torch.isfinite(m).all()) for maps in (inside, outside) for m in maps.values())
        drift = max(float((outside[name] - full[name]).abs().max()) for name in METHODS)
        autocast_rows.append(
            [shape_label(shape), str(low.dtype).replace("torch.", ""), "yes" if finite else "**no**", fmt_err(drift)]
        )
    return "\n\n".join(
        [
            f"### Latency of the maps on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}",
            markdown_table(["features (C, h, w)", "B", "all four (ms)", "TSM only (ms)"], speed_rows),
            '### TF32 (`torch.set_float32_matmul_precision("high")`): max abs difference to the CPU float64 maps',
            markdown_table(
                ["features (C, h, w)", "B", *METHODS, f"all <= {GPU_TOLERANCE:g}"],
                precision_rows,
            ),
            "### Features from `torch.autocast(dtype=torch.bfloat16)`",
            markdown_table(
                ["features (C, h, w)", "features dtype", "maps finite", "max abs diff to float32 features' maps"],
                autocast_rows,
            ),
            "Maps computed inside and outside the autocast region; the difference column is bfloat16 rounding of "
            "the features, not an error of the maps.",
        ]
    )


def run(quick: bool = False) -> str:
    """All tables of this script as markdown text (CUDA sections only when CUDA is available)."""
    shapes, batches = (QUICK_SHAPES, QUICK_BATCHES) if quick else (SHAPES, BATCHES)
    settings = Settings.make(quick)
    text, goals = cpu_tables(shapes, batches, settings)
    parts = ["## Saliency maps vs the per-image references", text]
    if goals:
        ms, speedup = goals["all_four_ms"], goals["speedup"]
        parts.append(
            f"Goals at (2048, 7, 7), B=64: all four maps <= {GOAL_MS:g} ms: {ms:.1f} ms "
            f"({'met' if ms <= GOAL_MS else '**not met**'}); >= {GOAL_SPEEDUP:,.0f}x faster than the paper's "
            f"path: {speedup:,.0f}x ({'met' if speedup >= GOAL_SPEEDUP else '**not met**'})."
        )
    parts.append(grid_tables(quick))
    if torch.cuda.is_available():
        parts.append(accelerator_tables(shapes, batches, settings, torch.device("cuda")))
    else:
        parts.append("CUDA not available: GPU latency, TF32 and autocast checks skipped.")
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    run_script(run, __doc__, argv)


if __name__ == "__main__":
    main()
