"""Would the monitor's end-of-training warning fire? The monitor's own computation on the seed sweep's final models.

For each ``<runs>/simclr_<swap|noswap>_seed<k>`` run, this loads the final checkpoint (the demo's ``SimCLR`` from
``examples/simclr.py``, its weights only), draws the demo's probe for that seed (128 held-out ``TexturedObjects``
images with their masks), and runs a :class:`~tsm_lightning.Tracker` at the demo's layer, first on the run's initial
weights (redrawn as the example draws them; the step-0 pointing game is printed beside the sweep's to show it) and
then on the final ones: the same code the monitor runs, so ``saliency/<map>/mass_spread`` and its reference
``saliency/fresh_init_<map>/mass_spread`` (a copy of the network at its first run, redrawn under the monitor's
``seed + 1``) are the numbers the monitor's last run logs. The runs of the sweep
were trained before the monitor logged them, which is why they are recomputed here. Writes ``--output`` (CSV: one
row per run and map, with ``warns``: :func:`tsm_lightning.monitoring.spread_warning` would fire) and prints a table.

    .venv/bin/python benchmarks/spread_warning_check.py --runs runs/sweep \\
        --output benchmarks/results/label_free/monitor_spread_warning.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tsm_lightning import METHODS, Probe, Tracker  # noqa: E402
from tsm_lightning.cli.loading import read_checkpoint  # noqa: E402
from tsm_lightning.monitoring import spread_warning  # noqa: E402

FIELDS = ("run", "seed", "swap", "map", "step", "mass_spread", "fresh_init_mass_spread", "pointing_game_step0")
FIELDS += ("pointing_game", "warns")


def check(
    run_dir: Path, probe_size: int = 128, image_size: int = 64, num_samples: int = 2048, layer: str = "backbone.7"
) -> list[dict[str, object]]:
    """The monitor's final-run numbers for one sweep run (see the module doc); the defaults are the demo's."""
    from simclr import SimCLR

    from common import probe

    (ckpt,) = sorted(run_dir.glob("simclr*/version_*/checkpoints/last.ckpt"))[-1:]
    checkpoint = read_checkpoint(ckpt)
    model = SimCLR(**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    seed, swap = int(run_dir.name.rsplit("seed", 1)[1]), "_swap_" in run_dir.name
    args = argparse.Namespace(
        data="textured", num_samples=num_samples, image_size=image_size, seed=seed, probe_size=probe_size
    )
    images, masks = probe(args)
    seed_everything(seed)  # the demo's initial weights, as examples/simclr.py draws them
    initial = SimCLR(**checkpoint.get("hyper_parameters", {})).eval()
    tracker = Tracker(layer, METHODS)  # the monitor's default seed: its fresh copy is drawn under 1
    tracker.prepare(initial, Probe(images, masks))
    first = tracker.run(initial, 0).scalars  # the monitor's first run: the fresh-init references are made here
    step = int(checkpoint.get("global_step", 0))
    scalars = tracker.run(model, step).scalars
    warns = spread_warning(scalars, METHODS) is not None
    return [
        {
            "run": run_dir.name,
            "seed": seed,
            "swap": swap,
            "map": name,
            "step": step,
            "mass_spread": round(scalars[f"saliency/{name}/mass_spread"], 4),
            "fresh_init_mass_spread": round(scalars[f"saliency/fresh_init_{name}/mass_spread"], 4),
            "pointing_game_step0": round(first[f"saliency/{name}/pointing_game"], 4),
            "pointing_game": round(scalars[f"saliency/{name}/pointing_game"], 4),
            "warns": warns if name == "tsm" else "",
        }
        for name in METHODS
    ]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/sweep"), help="the seed sweep's runs folder")
    parser.add_argument("--output", type=Path, default=None, help="CSV to write")
    parser.add_argument("--probe-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--layer", default="backbone.7")
    args = parser.parse_args(argv)
    run_dirs = sorted(p for p in args.runs.glob("simclr_*_seed*") if p.is_dir())
    if not run_dirs:
        parser.error(f"no simclr_<swap|noswap>_seed<k> run under {args.runs}; pass --runs the seed sweep's folder.")
    torch.set_grad_enabled(False)
    rows = [
        row
        for run_dir in run_dirs
        for row in check(run_dir, args.probe_size, args.image_size, args.num_samples, args.layer)
    ]
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    print("| run | TSM mass_spread, end | fresh-init line | TSM pointing game 0 → end | monitor warns |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row["map"] == "tsm":
            print(
                f"| {row['run']} | {row['mass_spread']:.3f} | {row['fresh_init_mass_spread']:.3f} | "
                f"{row['pointing_game_step0']:.3f} → {row['pointing_game']:.3f} | {'yes' if row['warns'] else 'no'} |"
            )
    return rows


if __name__ == "__main__":
    main()
