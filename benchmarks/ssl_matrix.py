"""SSL method matrix: does saliency evolve towards the object for every method, not only SimCLR?

Each method of :data:`MATRIX` (SimCLR, MoCo v2, BYOL, SwAV, Barlow Twins, VICReg, DINO with a ResNet, DINO with a
ViT) is trained by its example on ``TexturedObjects`` with background swap for ``--seeds`` (three by default), plus
one run without background swap (the control, ``--noswap-seeds``), every run recorded by :mod:`recorder` into
``<runs>/<method>_<swap|noswap>_seed<k>/record.pt`` and scored on the same held-out probe of 128 images per seed.
The ResNet methods share the demo's settings (``--arch small-resnet --stem cifar``, 64 px, batch 64, 150 steps,
monitor every 15 steps; each example keeps its own optimizer and learning rate); DINO-ViT keeps its example's
(batch 32, 300 steps, monitor every 30 steps). SimCLR's runs are the seed sweep's (same folder names, same
arguments): a run whose ``record.pt`` exists is never trained again, so the matrix resumes method by method.

After every run ``--results`` gets ``summary.csv`` (one row per run: each map's pointing game and energy-in-mask at
init and at the end, the random map and chance, loss, spread and effective rank, seconds) and ``scalars.csv``
(every per-step scalar, long format); ``--report`` (also run at the end) writes ``table.md`` (per method: mean and
spread over seeds) and ``pointing_game.png`` (TSM's pointing game per method against the random-map and chance
lines) from the CSVs, ``pointing_game_variants.png`` when recipe variants have run (see below) and
``attention_vit.png`` (the class-token attention's pointing game) when ViTs have.

    .venv/bin/python benchmarks/ssl_matrix.py --runs runs/sweep \\
        --results benchmarks/results/ssl_matrix          # hours of CPU; resumable: run it again to go on
    .venv/bin/python benchmarks/ssl_matrix.py --report     # table and figure from what has finished

A recipe variant of a method (``--variant NAME -- <the example's arguments>``) is recorded as ``<method>+NAME``
beside the matrix's runs, e.g. the ViT recipes tried for DINO:

    .venv/bin/python benchmarks/ssl_matrix.py --methods dino_vit --seeds 0 --noswap-seeds \\
        --variant convstem -- --conv-stem

or the demo's optimizer for every method (``--schedule onecycle``, :func:`common.onecycle_adamw`), which tells a
method that does not learn from a recipe that does not suit it:

    .venv/bin/python benchmarks/ssl_matrix.py --methods moco_v2 byol swav barlow_twins vicreg dino_resnet \\
        --seeds 0 --noswap-seeds --variant onecycle -- --schedule onecycle --lr 2e-3
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from recorder import curve_figure, load_record, train_and_record, write_csvs

ROOT = Path(__file__).parents[1]

RESNET = ["--data", "textured", "--arch", "small-resnet", "--stem", "cifar", "--image-size", "64"]
RESNET += ["--batch-size", "64", "--max-steps", "150", "--every-n-steps", "15", "--probe-size", "128"]

MATRIX: dict[str, tuple[str, list[str]]] = {
    "simclr": ("simclr", []),  # its defaults are RESNET's (the demo); the same runs as the seed sweep
    "moco_v2": ("moco_v2", RESNET),
    "byol": ("byol", RESNET),
    "swav": ("swav", RESNET),
    "barlow_twins": ("barlow_twins", RESNET),
    "vicreg": ("vicreg", RESNET),
    "dino_resnet": ("dino_vit", ["--backbone", "resnet", *RESNET]),
    "dino_vit": ("dino_vit", []),  # its defaults: textured data, 300 steps, batch 32, every 30 steps, 128 probe
}
"""Method name -> (example module under ``examples/``, arguments)."""

QUICK = ["--max-steps", "2", "--image-size", "32", "--batch-size", "4", "--num-samples", "8", "--probe-size", "4"]
QUICK += ["--every-n-steps", "1", "--accelerator", "cpu"]
"""``--quick``: appended to every method's arguments (the smoke test)."""


def cadence(argv: list[str], example: str) -> int:
    """The monitor cadence a run will use: the last ``--every-n-steps`` in ``argv``, else the example's default."""
    if "--every-n-steps" in argv:
        return int(argv[len(argv) - 1 - argv[::-1].index("--every-n-steps") + 1])
    return 30 if example == "dino_vit" else 15


def train(args: argparse.Namespace) -> None:
    """Every run of the matrix not recorded yet, method by method; the CSVs updated after each run."""
    for base in args.methods:
        example, argv = MATRIX[base]
        argv = [*argv, *args.extra]
        method = f"{base}+{args.variant}" if args.variant else base
        plan = [(True, seed) for seed in args.seeds] + [(False, seed) for seed in args.noswap_seeds]
        for swap, seed in plan:
            name = f"{method}_{'swap' if swap else 'noswap'}_seed{seed}"
            run_dir = args.runs / name
            path = run_dir / "record.pt"
            if path.exists():
                record = load_record(path)
                print(f"{name}: record exists, not trained again", flush=True)
            else:
                if run_dir.exists():  # an interrupted run: start it again from scratch
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                full = [*argv, "--seed", str(seed), *([] if swap else ["--no-background-swap"])]
                full += QUICK if args.quick else []
                meta = {"method": method, "seed": seed, "swap": swap, "recipe": "quick" if args.quick else "matrix"}
                record = train_and_record(example, full, run_dir, meta, cadence(full, example))
                print(f"{name}: done in {record['meta']['seconds']} s", flush=True)
            write_csvs(args.results, {name: record})


# ---------------------------------------------------------------------------------------------------- report
def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _stat(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def table(summary: list[dict[str, str]]) -> str:
    """Markdown: per method, the means over seeds (min–max) of the background-swap runs, and the control."""
    by_method: dict[str, list[dict[str, str]]] = defaultdict(list)
    control: dict[str, dict[str, str]] = {}
    for row in summary:
        if row["swap"] == "True":
            by_method[row["method"]].append(row)
        else:
            control.setdefault(row["method"], row)
    head = "| method | seeds (learned) | TSM PG init → end | EigenCAM PG end | MTSM PG end | Multivec PG end "
    head += "| attention PG end | TSM energy end | random PG | chance | no-swap TSM PG end | loss first → last "
    head += "| eff. rank end |\n|---" + "|---" * 12 + "|\n"
    lines = []
    for method in [m for m in MATRIX if m in by_method] + sorted(set(by_method) - set(MATRIX)):
        rows = by_method[method]

        def col(key: str, rows: list[dict[str, str]] = rows) -> list[float]:
            return [_float(r.get(key, "")) for r in rows]

        learned = sum(r.get("learned") == "True" for r in rows)
        noswap = control.get(method, {}).get("tsm_pg_end", "")
        cells = [
            method,
            f"{len(rows)} ({learned})",
            f"{_stat(col('tsm_pg_init'))} → {_stat(col('tsm_pg_end'))}",
            _stat(col("eigencam_pg_end")),
            _stat(col("mtsm_pg_end")),
            _stat(col("multivec_eigencam_pg_end")),
            _stat(col("attention_pg_end")),
            _stat(col("tsm_eim_end")),
            _stat(col("random_pg")),
            _stat(col("chance")),
            f"{_float(noswap):.2f}" if noswap else "–",
            f"{_stat(col('loss_first'))} → {_stat(col('loss_last'))}",
            _stat(col("erank_end")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def figure_groups(summary: list[dict[str, str]], seeds: int = 3) -> tuple[list[str], list[str], list[str]]:
    """Which methods each figure draws: the matrix's (every method under its own recipe, and a variant run on at
    least ``seeds`` background-swap seeds, as a matrix row is), the recipe variants (every ``<method>+NAME``, with
    SimCLR, the demo, for reference) and the ViTs (every method whose runs have a class-token attention)."""
    order = {method: index for index, method in enumerate(MATRIX)}
    counts: dict[str, int] = defaultdict(int)
    for row in summary:
        counts[row["method"]] += row["swap"] == "True"
    methods = sorted((m for m in counts if counts[m]), key=lambda m: (order.get(m.split("+")[0], len(order)), m))
    main = [m for m in methods if "+" not in m or counts[m] >= seeds]
    variants = [m for m in methods if "+" in m or m == "simclr"]
    vits = {row["method"] for row in summary if row.get("attention_pg_end")}
    return main, variants, [m for m in methods if m in vits]


def figure(
    scalars: list[dict[str, str]], path: Path, methods: list[str], title: str, map_name: str = "tsm"
) -> dict[str, int]:
    """A map's pointing game (TSM's by default) against the step for ``methods`` in that order (background-swap
    runs: each seed, their mean and range), with the random-map and chance lines."""
    order = {method: index for index, method in enumerate(methods)}
    rows = sorted((r for r in scalars if r["method"] in order), key=lambda r: order[r["method"]])
    label = {"tsm": "TSM", "attention": "Attention"}.get(map_name, map_name)
    return curve_figure(
        rows,
        path,
        lambda row: row["method"] if row["swap"] == "True" else None,
        title,
        tag=f"record/{map_name}/pointing_game",
        ylabel=f"{label} pointing game (128 held-out images)",
    )


def report(results: Path) -> None:
    """``table.md`` and ``pointing_game.png`` under ``results`` from its CSVs."""
    with (results / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    with (results / "scalars.csv").open(newline="") as handle:
        scalars = list(csv.DictReader(handle))
    text = table(summary)
    (results / "table.md").write_text(text)
    main, variants, vits = figure_groups(summary)
    figure(scalars, results / "pointing_game.png", main, "Background swap on TexturedObjects: TSM pointing game")
    print(text)
    print(f"Figure: {results / 'pointing_game.png'}")
    if len(variants) > 1:
        title = "Recipe variants, SimCLR (the demo) for reference: TSM pointing game"
        figure(scalars, results / "pointing_game_variants.png", variants, title)
        print(f"Figure: {results / 'pointing_game_variants.png'}")
    if vits:
        title = "Vision transformers: the class-token attention's pointing game"
        figure(scalars, results / "attention_vit.png", vits, title, map_name="attention")
        print(f"Figure: {results / 'attention_vit.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=tuple(MATRIX), default=list(MATRIX))
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0, 1, 2], help="background-swap seeds (none: only the control)"
    )
    parser.add_argument("--noswap-seeds", type=int, nargs="*", default=[0], help="seeds of the no-swap control")
    parser.add_argument("--runs", type=Path, default=Path("runs/sweep"), help="records and TensorBoard logs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "ssl_matrix")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's, as in make demo)"
    )
    parser.add_argument("--quick", action="store_true", help="two steps at tiny sizes (the smoke test)")
    parser.add_argument("--report", action="store_true", help="only write the table and figure from the CSVs")
    parser.add_argument(
        "--variant", default="", help="a recipe variant: runs named <method>+<variant>, the arguments after -- added"
    )
    parser.add_argument("extra", nargs="*", help="after --: more arguments for every method's example")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.extra and not args.variant:
        parser.error("arguments after -- change the recipe: name the variant with --variant NAME")
    if not args.report:
        train(args)
    report(args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
