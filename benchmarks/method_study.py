"""Method study: which saliency map finds the object, on the trained demo model, over several training seeds?

For each seed this trains the demo (``examples/simclr.py``: SimCLR with background swap on ``TexturedObjects``) or
reuses a checkpoint already under ``--output``, then scores, on 256 held-out images of that seed's held-out set:

* the library's four maps (EigenCAM with the sign fix, TSM, Multivec-EigenCAM, MTSM);
* reference variants kept in ``reference_paths.py`` (not the library API): EigenCAM as pytorch-grad-cam computes
  it (sign not fixed), TSM as the authors' code literally computes it (first row of the stacked channel factors),
  MTSM with the absolute value after the weighted sum;
* map-free baselines (``baselines.py``): a fixed random map, a centre prior, a colour-contrast map;

on pointing game, energy-in-mask and IoU (map >= 0.5 max), plus the embedding-faithfulness metrics (embedding drop,
deletion and insertion AUC of the backbone embedding) on the first ``--faithfulness-images`` images. It prints the
mean and the spread (min to max) over seeds as markdown tables.

    .venv/bin/python benchmarks/method_study.py --seeds 0 1 2 --output runs/study

Paired differences with bootstrap 95 % confidence intervals (:data:`PAIRS`): TSM - EigenCAM (sign fixed), TSM -
pytorch-grad-cam's unsigned EigenCAM, MTSM - Multivec-EigenCAM, and each library map minus its paper-literal
variant. Each difference is taken per image (the same image, the same model), and the interval comes from a
two-level bootstrap (:func:`paired_bootstrap`): seeds resampled with replacement, then images within each drawn
seed, so that both the model-to-model and the image-to-image variation widen it. A difference is called significant
when its interval excludes 0. ``--sweep`` takes the models of ``benchmarks/seed_sweep.py`` instead of training
(``<sweep>/simclr_swap_seed<k>``), and ``--learned-only`` keeps the seeds whose run met the criterion of issue 21
(``learned`` in the sweep's ``summary.csv``); ``--results`` writes the means and the intervals as CSV:

    .venv/bin/python benchmarks/method_study.py --seeds 0 1 2 3 4 --sweep runs/sweep --learned-only \\
        --summary benchmarks/results/seed_sweep/summary.csv --results benchmarks/results/method_study
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch
from baselines import centre_prior, colour_contrast
from reference_paths import authors_code_tsm, gradcam_eigencam, mtsm_abs_after_sum, tucker_factors

from tsm_lightning import METHODS, saliency_maps, upsample_maps
from tsm_lightning.capture import capture
from tsm_lightning.cli.loading import load_lightning
from tsm_lightning.data import TexturedObjects
from tsm_lightning.metrics import faithfulness_metrics, localization_metrics, random_maps
from tsm_lightning.render import denormalize

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))

LAYER = "backbone.7"
VARIANTS = ("eigencam_unsigned (grad-cam)", "tsm_first_row (authors' code)", "mtsm_abs_after_sum")
BASELINES = ("random map", "centre prior", "colour contrast")
LOCALIZATION = ("pointing_game", "energy_in_mask", "mask_iou")
FAITHFULNESS = ("embedding_drop", "deletion_auc", "insertion_auc")
PAIRS = (
    ("tsm", "eigencam"),
    ("tsm", VARIANTS[0]),
    ("mtsm", "multivec_eigencam"),
    ("tsm", VARIANTS[1]),
    ("mtsm", VARIANTS[2]),
)
"""The paired differences ``a - b`` the study gives intervals for: TSM against EigenCAM with the sign fixed and
against pytorch-grad-cam's unsigned EigenCAM, MTSM against Multivec-EigenCAM, and the library's TSM and MTSM against
their paper-literal variants (the authors' code's first row, the absolute value after the sum)."""


def checkpoint_for(seed: int, output: Path, extra: list[str]) -> Path:
    """The demo's ``last.ckpt`` for ``seed`` under ``output``, training it first if it is not there."""
    folder = output / f"seed{seed}"
    found = sorted(folder.glob("simclr/version_*/checkpoints/last.ckpt"))
    if not found:
        command = [sys.executable, str(ROOT / "examples" / "simclr.py"), "--seed", str(seed), "--output", str(folder)]
        subprocess.run([*command, *extra], check=True)
        found = sorted(folder.glob("simclr/version_*/checkpoints/last.ckpt"))
    return found[-1]


def all_maps(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every method, variant and baseline on ``images``: ``{name: (B, H, W)}`` in ``[0, 1]`` at image size."""
    with capture(model, LAYER) as cap:
        model.backbone(images)
    features = cap.features.float()
    size = (images.shape[-2], images.shape[-1])
    maps = {name: upsample_maps(m, size) for name, m in saliency_maps(features).items()}
    acts = features.double().numpy()
    factors = tucker_factors(acts)
    variants = {
        VARIANTS[0]: gradcam_eigencam(acts)[0],
        VARIANTS[1]: authors_code_tsm(acts, factors),
        VARIANTS[2]: mtsm_abs_after_sum(acts, factors),
    }
    for name, m in variants.items():
        maps[name] = upsample_maps(torch.from_numpy(m).float(), size)
    like = maps[METHODS[0]]
    maps[BASELINES[0]] = random_maps(like, seed=0)
    maps[BASELINES[1]] = centre_prior(like)
    maps[BASELINES[2]] = colour_contrast(denormalize(images))
    return maps


def study_one(
    checkpoint: Path, seed: int, num_images: int, faithfulness_images: int, per_image: dict | None = None
) -> dict[str, dict[str, float]]:
    """``{name: {metric: mean over images}}`` for one trained model; ``per_image``, when given, receives the
    localization values image by image, ``{name: {metric: (num_images,) tensor}}`` (NaN where undefined)."""
    from simclr import SimCLR

    model = load_lightning(checkpoint, SimCLR, "cpu").model  # read as data, like the command line
    held_out = TexturedObjects(seed=seed).held_out(num_images)
    images, masks = held_out.probe(num_images)
    with torch.no_grad():
        maps = all_maps(model, images)
        values = {name: localization_metrics(m, masks) for name, m in maps.items()}
        if per_image is not None:
            per_image.update(values)
        out = {name: {k: float(v.nanmean()) for k, v in metrics.items()} for name, metrics in values.items()}
        n = faithfulness_images
        embed = lambda x: model.backbone(x).flatten(1)  # noqa: E731
        faithful = faithfulness_metrics(embed, images[:n], {k: m[:n] for k, m in maps.items() if k != BASELINES[0]})
    for name, values in faithful.items():
        key = BASELINES[0] if name == "random" else name
        out[key].update({k: float(values[k].nanmean()) for k in FAITHFULNESS if k in values})
    return out


def paired_bootstrap(
    differences: list[torch.Tensor], num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference and its two-level bootstrap 95 % interval (2.5 and 97.5 percentiles).

    Args:
        differences: one ``(n_s,)`` tensor of per-image differences per seed (NaN entries, e.g. undefined metrics,
            are dropped).
        num_resamples: bootstrap resamples.
        seed: seed of the resampling generator (the interval is reproducible).

    Returns:
        ``(mean, low, high)``: the mean over seeds of each seed's mean difference, and the interval of that statistic
        when seeds are resampled with replacement and, within each drawn seed, its images.
    """
    groups = [d[~d.isnan()].double() for d in differences]
    groups = [g for g in groups if len(g)]
    if not groups:
        raise ValueError("no finite paired difference: every seed's values were NaN or empty.")
    generator = torch.Generator().manual_seed(seed)
    point = float(torch.stack([g.mean() for g in groups]).mean())
    stats = torch.empty(num_resamples, dtype=torch.float64)
    for r in range(num_resamples):
        drawn = torch.randint(len(groups), (len(groups),), generator=generator)
        means = [groups[i][torch.randint(len(groups[i]), (len(groups[i]),), generator=generator)].mean() for i in drawn]
        stats[r] = torch.stack(means).mean()
    low, high = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, low, high


def intervals(
    per_image: list[dict[str, dict[str, torch.Tensor]]], metrics: tuple[str, ...] = LOCALIZATION[:2]
) -> list[dict[str, object]]:
    """For each pair of :data:`PAIRS` and metric: the mean difference, its 95 % interval, and significance."""
    rows = []
    for a, b in PAIRS:
        for metric in metrics:
            diffs = [seed_values[a][metric] - seed_values[b][metric] for seed_values in per_image]
            mean, low, high = paired_bootstrap(diffs)
            significant = low > 0 or high < 0
            rows.append({"a": a, "b": b, "metric": metric, "mean_difference": round(mean, 4)})
            rows[-1].update({"ci_low": round(low, 4), "ci_high": round(high, 4), "significant": significant})
    return rows


def interval_table(rows: list[dict[str, object]]) -> str:
    """Markdown: one line per pair and metric."""
    lines = ["| difference | metric | mean | 95 % CI | significant |", "|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(
            f"| {r['a']} − {r['b']} | {r['metric']} | {r['mean_difference']:+.3f} | {ci} | "
            f"{'yes' if r['significant'] else 'no'} |"
        )
    return "\n".join(lines)


def sweep_checkpoint(sweep: Path, seed: int) -> Path:
    """The seed sweep's checkpoint of the demo with background swap for ``seed``."""
    found = sorted((sweep / f"simclr_swap_seed{seed}").glob("simclr/version_*/checkpoints/last.ckpt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint of seed {seed} under {sweep}: run benchmarks/seed_sweep.py first.")
    return found[-1]


def learned_seeds(summary: Path) -> set[int]:
    """Seeds whose background-swap SimCLR run met the criterion (``learned`` in the seed sweep's summary)."""
    with summary.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["seed"]) for r in rows if r["method"] == "simclr" and r["swap"] == "True" and r["learned"] == "True"}


def table(results: list[dict[str, dict[str, float]]], metrics: tuple[str, ...], names: list[str]) -> str:
    """Markdown: one row per name, ``mean (min-max)`` over seeds per metric."""
    lines = ["| map | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name in names:
        cells = []
        for metric in metrics:
            values = torch.tensor([r[name][metric] for r in results if metric in r[name]])
            cells.append(f"{values.mean():.3f} ({values.min():.2f}-{values.max():.2f})" if len(values) else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/study", help="where the seeds' runs are trained or found")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--faithfulness-images", type=int, default=64)
    parser.add_argument("--sweep", type=Path, default=None, help="use the seed sweep's checkpoints under this folder")
    parser.add_argument("--summary", type=Path, default=ROOT / "benchmarks" / "results" / "seed_sweep" / "summary.csv")
    parser.add_argument("--learned-only", action="store_true", help="only the seeds that met the criterion")
    parser.add_argument("--results", type=Path, default=None, help="write means.csv and intervals.csv here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra arguments for simclr.py")
    args = parser.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    torch.set_grad_enabled(False)
    seeds = list(args.seeds)
    if args.learned_only:
        learned = learned_seeds(args.summary)
        seeds = [s for s in seeds if s in learned]
        print(f"seeds that learned (from {args.summary}): {seeds}", flush=True)
        if not seeds:
            raise SystemExit("none of the requested seeds met the criterion; nothing to study.")
    results, per_image = [], []
    for seed in seeds:
        if args.sweep is not None:
            checkpoint = sweep_checkpoint(args.sweep, seed)
        else:
            checkpoint = checkpoint_for(seed, Path(args.output), extra)
        print(f"seed {seed}: {checkpoint}", flush=True)
        per_image.append({})
        results.append(study_one(checkpoint, seed, args.num_images, args.faithfulness_images, per_image[-1]))
    names = [*METHODS, *VARIANTS, *BASELINES]
    print(
        f"\nMethod study: demo (simclr.py, background swap) trained with seeds {seeds}; {args.num_images} "
        f"held-out TexturedObjects images per seed, layer {LAYER!r}; mean (min-max over seeds); "
        f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}\n"
    )
    print(table(results, LOCALIZATION, names))
    print(
        f"\nEmbedding faithfulness on the first {args.faithfulness_images} images (drop: lower is better; deletion "
        "AUC: lower is better; insertion AUC: higher is better):\n"
    )
    print(table(results, FAITHFULNESS, [n for n in names if n not in BASELINES[1:]]))
    rows = intervals(per_image)
    print(f"\nPaired differences over seeds {seeds} (two-level bootstrap, 2000 resamples, 95 % CI):\n")
    print(interval_table(rows))
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        with (args.results / "intervals.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with (args.results / "means.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "map", "metric", "mean"])
            for seed, result in zip(seeds, results, strict=True):
                writer.writerows([seed, n, k, round(v, 4)] for n, values in result.items() for k, v in values.items())
        print(f"\nCSV: {args.results / 'intervals.csv'}, {args.results / 'means.csv'}")


if __name__ == "__main__":
    main(sys.argv[1:])
