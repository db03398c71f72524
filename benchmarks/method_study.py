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
"""

from __future__ import annotations

import argparse
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


def study_one(checkpoint: Path, seed: int, num_images: int, faithfulness_images: int) -> dict[str, dict[str, float]]:
    """``{name: {metric: mean over images}}`` for one trained model."""
    from simclr import SimCLR

    model = load_lightning(checkpoint, SimCLR, "cpu").model  # read as data, like the command line
    held_out = TexturedObjects(seed=seed).held_out(num_images)
    images, masks = held_out.probe(num_images)
    with torch.no_grad():
        maps = all_maps(model, images)
        out = {
            name: {k: float(v.nanmean()) for k, v in localization_metrics(m, masks).items()} for name, m in maps.items()
        }
        n = faithfulness_images
        embed = lambda x: model.backbone(x).flatten(1)  # noqa: E731
        faithful = faithfulness_metrics(embed, images[:n], {k: m[:n] for k, m in maps.items() if k != BASELINES[0]})
    for name, values in faithful.items():
        key = BASELINES[0] if name == "random" else name
        out[key].update({k: float(values[k].nanmean()) for k in FAITHFULNESS if k in values})
    return out


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
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra arguments for simclr.py")
    args = parser.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    torch.set_grad_enabled(False)
    results = []
    for seed in args.seeds:
        checkpoint = checkpoint_for(seed, Path(args.output), extra)
        print(f"seed {seed}: {checkpoint}", flush=True)
        results.append(study_one(checkpoint, seed, args.num_images, args.faithfulness_images))
    names = [*METHODS, *VARIANTS, *BASELINES]
    print(
        f"\nMethod study: demo (simclr.py, background swap) trained with seeds {args.seeds}; {args.num_images} "
        f"held-out TexturedObjects images per seed, layer {LAYER!r}; mean (min-max over seeds); "
        f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}\n"
    )
    print(table(results, LOCALIZATION, names))
    print(
        f"\nEmbedding faithfulness on the first {args.faithfulness_images} images (drop: lower is better; deletion "
        "AUC: lower is better; insertion AUC: higher is better):\n"
    )
    print(table(results, FAITHFULNESS, [n for n in names if n not in BASELINES[1:]]))


if __name__ == "__main__":
    main()
