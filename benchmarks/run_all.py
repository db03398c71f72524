"""Run every benchmark and print all tables as markdown: ``python benchmarks/run_all.py [--quick]``.

1. ``bench_maps``: ``saliency_maps`` vs the paper's tensorly Tucker path and pytorch-grad-cam's EigenCAM, and
   (``bench_grids``) the larger grids against one batched float32 Gram + eigh.
2. ``bench_forward``: the maps as a share of the probe forward pass; method x architecture latency table.
3. ``bench_callback``: ``SaliencyMonitor`` overhead on a short CPU training run.
4. ``bench_monitor_run``: where the time of one monitor run goes (forward, decomposition, metrics, rendering, writing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import bench_callback
import bench_forward
import bench_maps
import bench_monitor_run
from bench_utils import base_parser, machine_header, set_threads

SUITES = {"maps": bench_maps, "forward": bench_forward, "callback": bench_callback, "monitor_run": bench_monitor_run}


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=tuple(SUITES), action="append", help="run only this suite (repeatable; default: all)"
    )
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print("# tsm-lightning benchmarks" + (" (--quick smoke run: numbers not meaningful)" if args.quick else ""))
    print()
    print(machine_header(), end="\n\n", flush=True)
    total = time.perf_counter()
    for name in args.only or tuple(SUITES):
        start = time.perf_counter()
        text = SUITES[name].run(quick=args.quick)
        print(text)
        print(f"\n_{name}: {time.perf_counter() - start:.0f} s_\n", flush=True)
    print(f"_total: {time.perf_counter() - total:.0f} s_")


if __name__ == "__main__":
    main()
