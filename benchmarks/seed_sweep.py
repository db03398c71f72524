"""Seed sweep of the demo: ``examples/simclr.py`` trained for several seeds, with and without background swap.

One run at a time, each recorded by :mod:`recorder` into ``<runs>/simclr_<swap|noswap>_seed<k>/record.pt`` (with
its TensorBoard logs and checkpoint beside it). Resumable: a run whose ``record.pt`` exists is not trained again,
only re-read. After every run the committed CSVs under ``--results`` are updated:

* ``summary.csv``: one row per run (TSM, EigenCAM, MTSM, Multivec-EigenCAM pointing game and energy-in-mask at
  step 0 and at the end, the random map and chance, loss, spread, effective rank, seconds, and ``learned``: TSM's
  pointing game rose by >= 0.25 and ends >= 0.30 above the random map);
* ``scalars.csv``: every per-step scalar of every run, long format ``run,method,seed,swap,step,tag,value``.

    .venv/bin/python benchmarks/seed_sweep.py --seeds 0 1 2 3 4 --conditions swap noswap \\
        --runs runs/sweep --results benchmarks/results/seed_sweep

Each run uses torch's default thread count (2 on the 2-core machine), as ``make demo`` does, so that a seed's row is
the curve ``make demo`` (``--seed k``) draws: the same training with another thread count sums in another order and
drifts apart (seed 0 of the old recipe ended at 0.664 with one thread, 0.727 with two).

Arguments after ``--`` go to ``examples/simclr.py`` (a recipe change; name it with ``--recipe``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import torch
from recorder import curve_figure, load_record, replace_rows, summary_row, train_and_record, write_csvs

ROOT = Path(__file__).parents[1]
EVERY_N_STEPS = 15
"""The demo's monitor cadence (``examples/simclr.py``); the recorder takes its maps at the same steps."""


def run_name(method: str, swap: bool, seed: int) -> str:
    """``<method>_<swap|noswap>_seed<k>``: the run's folder name under ``--runs``."""
    return f"{method}_{'swap' if swap else 'noswap'}_seed{seed}"


def every_n_steps(extra: list[str]) -> int:
    """The monitor cadence the example will use: ``--every-n-steps`` among ``extra``, else the demo's."""
    if "--every-n-steps" in extra:
        return int(extra[extra.index("--every-n-steps") + 1])
    return EVERY_N_STEPS


RECIPE_FIELDS = ("run", "recipe", "args", "seed", "swap", "steps", "tsm_pg_init", "tsm_pg_end", "random_pg", "rise")
RECIPE_FIELDS += ("above_random", "learned", "loss_first", "loss_last", "seconds", "threads", "date")


def write_recipe_row(path: Path, recipe: str, extra: list[str], name: str, record: dict) -> None:
    """Add (or replace) the run's line in the log of every recipe tried (``demo_recipes.csv``)."""
    row = summary_row(name, record)
    rise, above = row["tsm_pg_end"] - row["tsm_pg_init"], row["tsm_pg_end"] - row["random_pg"]
    line = {key: row.get(key, "") for key in RECIPE_FIELDS}
    line.update({"run": f"{recipe}/{name}", "recipe": recipe, "args": " ".join(extra) or "(defaults)"})
    line.update({"rise": round(rise, 4), "above_random": round(above, 4), "threads": record["meta"].get("threads")})
    line["date"] = record["meta"].get("date", "")
    replace_rows(path, [line], {line["run"]}, RECIPE_FIELDS)


def seed_table(summary: Path) -> str:
    """Markdown: one line per run of ``summary.csv`` (the README's per-seed table)."""
    with summary.open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: (r["swap"] != "True", int(r["seed"])))
    lines = [
        "| seed | background swap | TSM pointing game step 0 → end | EigenCAM · Multivec · MTSM end | TSM energy "
        "0 → end | random map · chance | loss first → last | criterion met | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        others = " · ".join(
            f"{float(r[k]):.3f}" for k in ("eigencam_pg_end", "multivec_eigencam_pg_end", "mtsm_pg_end")
        )
        lines.append(
            f"| {r['seed']} | {'yes' if r['swap'] == 'True' else 'no'} | {float(r['tsm_pg_init']):.3f} → "
            f"**{float(r['tsm_pg_end']):.3f}** | {others} | {float(r['tsm_eim_init']):.3f} → "
            f"{float(r['tsm_eim_end']):.3f}"
            f" | {float(r['random_pg']):.3f} · {float(r['chance']):.3f} | {float(r['loss_first']):.2f} → "
            f"{float(r['loss_last']):.2f} | {'yes' if r['learned'] == 'True' else 'no'} | {float(r['seconds']):.0f} |"
        )
    return "\n".join(lines)


def seed_figure(results: Path) -> Path:
    """``pointing_game.png`` under ``results``: TSM's pointing game of every seed, with and without background
    swap (each run, the mean and the range per condition), against the random-map and chance lines."""
    with (results / "scalars.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    path = results / "pointing_game.png"
    curve_figure(
        sorted(rows, key=lambda r: r["swap"] != "True"),
        path,
        lambda row: "background swap" if row["swap"] == "True" else "no background swap",
        "The demo (examples/simclr.py) for every seed: TSM pointing game on the 128-image probe",
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--conditions", nargs="+", choices=("swap", "noswap"), default=["swap", "noswap"])
    parser.add_argument("--runs", type=Path, default=Path("runs/sweep"), help="records and TensorBoard logs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "seed_sweep")
    parser.add_argument("--recipe", default="default", help="label of the recipe (the arguments after --)")
    parser.add_argument(
        "--recipes", type=Path, default=ROOT / "benchmarks" / "results" / "demo_recipes.csv", help="recipe log CSV"
    )
    parser.add_argument("--collect-only", action="store_true", help="train nothing: update the CSVs from the records")
    parser.add_argument("--table", action="store_true", help="only print the per-seed table of --results")
    parser.add_argument("--figure", action="store_true", help="only draw pointing_game.png from the CSVs of --results")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's, as in make demo)"
    )
    parser.add_argument(
        "--seed-major", action="store_true", help="order seed by seed (both conditions of a seed, then the next)"
    )
    parser.add_argument("extra", nargs="*", help="after --: more arguments for examples/simclr.py")
    args = parser.parse_args(argv)
    if args.table:
        print(seed_table(args.results / "summary.csv"))
        return
    if args.figure:
        print(f"Figure: {seed_figure(args.results)}")
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    order = [(condition, seed) for condition in args.conditions for seed in args.seeds]
    if args.seed_major:
        order = [(condition, seed) for seed in args.seeds for condition in args.conditions]
    for condition, seed in order:
        swap = condition == "swap"
        name = run_name("simclr", swap, seed)
        run_dir = args.runs / name
        path = run_dir / "record.pt"
        if path.exists():
            print(f"{name}: record exists, not trained again ({path})", flush=True)
            record = load_record(path)
        elif args.collect_only:
            continue
        else:
            if run_dir.exists():  # an interrupted run: start it again from scratch
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            example_argv = ["--seed", str(seed), *([] if swap else ["--no-background-swap"]), *args.extra]
            meta = {"method": "simclr", "seed": seed, "swap": swap, "recipe": args.recipe}
            record = train_and_record("simclr", example_argv, run_dir, meta, every_n_steps(args.extra))
        write_csvs(args.results, {name: record})
        write_recipe_row(args.recipes, args.recipe, args.extra, name, record)
        print(f"{name}: done in {record['meta']['seconds']} s; CSVs under {args.results}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
