"""Shared plumbing of the benchmark scripts: threads, machine header, timers, synthetic features, tables."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements of one callable, in seconds."""

    median: float
    iqr: float
    runs: int

    @property
    def ms(self) -> float:
        """Median in milliseconds."""
        return self.median * 1e3


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark script accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (a few seconds)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: the cores available)"
    )
    return parser


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads explicitly (default: every available core) and return the number."""
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


def run_script(run: Callable[..., str], doc: str, argv: Sequence[str] | None = None) -> None:
    """Every benchmark script's ``main``: parse ``--quick``/``--threads``, print the header and the tables."""
    args = base_parser(doc.splitlines()[0]).parse_args(argv)
    set_threads(args.threads)
    print(machine_header(), end="\n\n")
    print(run(quick=args.quick))


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header() -> str:
    """Markdown lines describing the machine, the library versions, the date and the current load."""
    import lightning
    import tensorly

    lines = [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {cpu_model()}, {available_cores()} cores available ({os.cpu_count()} on the host), "
        f"torch threads: {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"tensorly {tensorly.__version__}, lightning {lightning.__version__}",
    ]
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(f"- load average at start (1, 5, 15 min): {load}")
    if torch.cuda.is_available():
        lines.append(f"- CUDA: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        lines.append("- CUDA: not available (GPU sections skipped)")
    return "\n".join(lines)


def time_fast(fn: Callable[[], object], *, min_run_time: float, label: str = "") -> Timing:
    """Time a fast callable with ``torch.utils.benchmark`` (CUDA is synchronised by the timer).

    The timer runs with the current torch thread count (its own default is one thread).
    """
    timer = benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), label=label or "bench"
    )
    fn()  # warm-up outside the measurement (allocator, lazy initialisation)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median=m.median, iqr=m.iqr, runs=len(m.times) * m.number_per_run)


def time_blocks(fn: Callable[[], object], *, min_run_time: float, blocks: int = 10) -> Timing:
    """Median and IQR over ``blocks`` equal blocks of calls (``torch.utils.benchmark`` ``timeit``).

    ``blocked_autorange`` picks few long blocks, which gives a median but no meaningful spread; this splits
    ``min_run_time`` into ``blocks`` blocks (at least 3 blocks of one call for slow callables).
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    fn()
    estimate = timer.timeit(1).median
    number = max(1, int(min_run_time / blocks / max(estimate, 1e-9)))
    n_blocks = blocks if number > 1 else max(3, min(blocks, int(min_run_time / max(estimate, 1e-9))))
    times = [timer.timeit(number).median for _ in range(n_blocks)]
    q = statistics.quantiles(times, n=4)
    return Timing(median=statistics.median(times), iqr=q[2] - q[0], runs=number * n_blocks)


def time_slow(fn: Callable[[], object], repeats: int = 1) -> Timing:
    """Time a slow callable with ``time.perf_counter``, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(median=statistics.median(times), iqr=q[2] - q[0], runs=len(times))


def synthetic_features(batch: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Post-ReLU-like float32 features: a few spatial blobs with channel loadings, plus noise, rectified.

    Real CNN features have a dominant component (the paper's spectral concentration); pure noise would make
    the leading singular vectors nearly degenerate and their comparison with a reference ill-conditioned.
    """
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    feats = 0.3 * torch.randn(batch, channels, h, w, generator=g)
    for weight in (3.0, 1.5, 0.8):
        cy = torch.rand(batch, generator=g) * (h - 1)
        cx = torch.rand(batch, generator=g) * (w - 1)
        radius = max(h, w) / 5
        blob = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * radius**2))
        loading = torch.rand(batch, channels, generator=g)
        feats += weight * loading[:, :, None, None] * blob[:, None]
    return feats.relu().contiguous()


def fmt_ms(ms: float) -> str:
    """Milliseconds with three significant digits, thousands separated above 1000."""
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 100:
        return f"{ms:.0f}"
    return f"{ms:.3g}"


def fmt_x(ratio: float) -> str:
    """A speed-up factor."""
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def fmt_err(err: float) -> str:
    """A max-abs error."""
    return f"{err:.1e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one letter per column (``l``/``r``), default ``l`` then ``r``."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(wd) if a == "r" else v.ljust(wd) for v, wd, a in zip(values, widths, align, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (wd + 1) + ":") if a == "r" else (":" + "-" * (wd + 1)) for wd, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])
