"""Why TSM misses the object on a ViT whose attention finds it: what the tokens' top singular vector is.

Loads a checkpoint of an example with a ViT backbone (``simclr.py --backbone vit``, ``dino_vit.py``), captures its
last encoder block's patch tokens on the example's probe (``--seed`` picks it, as in training) and reports, over the
probe images that have both object and clutter tokens:

* ``cos_u1_mean``: ``|cos|`` between the top left singular vector ``u1`` of each image's ``(D, N)`` token matrix
  (the vector TSM projects on) and that image's mean token (median and minimum over images);
* ``norm_ratio``: the object tokens' mean norm over the clutter tokens' (mean over images);
* ``tsm_ratio``: the object tokens' mean TSM value over the clutter tokens' (``tsm_lightning.core.tsm`` on the
  token grid; mean over images), and ``tsm_favours_clutter``: the fraction of images where it is below 1.

A token is the object's when at least half of its patch is inside the mask.

    .venv/bin/python benchmarks/vit_tokens.py --example simclr --checkpoint <run>/checkpoints/last.ckpt --seed 0 \\
        --csv benchmarks/results/ssl_matrix/vit_tokens.csv --name <run>
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

from tsm_lightning.core import tsm

ROOT = Path(__file__).parents[1]


def token_statistics(tokens: Tensor, object_tokens: Tensor) -> dict[str, float]:
    """The statistics of the module doc.

    Args:
        tokens: ``(B, N, D)`` patch tokens (class and register tokens dropped), ``N`` a square grid, row-major.
        object_tokens: ``(B, N)`` bool, the tokens on the object.

    Returns:
        ``images`` (how many had both kinds of token), ``cos_u1_mean_median``, ``cos_u1_mean_min``,
        ``norm_ratio``, ``tsm_ratio`` and ``tsm_favours_clutter``.
    """
    if tokens.ndim != 3 or object_tokens.shape != tokens.shape[:2]:
        raise ValueError(
            f"expected tokens (B, N, D) and a (B, N) mask, got {tuple(tokens.shape)} and {tuple(object_tokens.shape)}."
        )
    batch, count, width = tokens.shape
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{count} tokens do not form a square grid: drop the class and register tokens first.")
    tokens = tokens.double()
    grid = tokens.transpose(1, 2).reshape(batch, width, side, side)
    maps = tsm(grid).double().flatten(1)  # (B, N)
    cosines, norms, tsms = [], [], []
    for b in range(batch):
        inside = object_tokens[b]
        if not inside.any() or inside.all():
            continue
        x = tokens[b].T  # (D, N)
        u1 = torch.linalg.svd(x, full_matrices=False)[0][:, 0]
        mean = x.mean(dim=1)
        cosines.append(abs(float(u1 @ mean / mean.norm())))
        norm = x.norm(dim=0)
        norms.append(float(norm[inside].mean() / norm[~inside].mean()))
        tsms.append(float(maps[b][inside].mean() / maps[b][~inside].mean()))
    if not cosines:
        raise ValueError("no image has both object and clutter tokens: check the masks.")
    return {
        "images": len(cosines),
        "cos_u1_mean_median": statistics.median(cosines),
        "cos_u1_mean_min": min(cosines),
        "norm_ratio": statistics.fmean(norms),
        "tsm_ratio": statistics.fmean(tsms),
        "tsm_favours_clutter": sum(r < 1 for r in tsms) / len(tsms),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", choices=("simclr", "dino_vit"), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: it draws the probe")
    parser.add_argument("--probe-size", type=int, default=128)
    parser.add_argument("--csv", type=Path, help="append a row (--name and the statistics) to this CSV")
    parser.add_argument("--name", default="", help="the row's name in --csv (default: the checkpoint's path)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    from common import parse_args, probe

    module = __import__(args.example)
    cls = module.SimCLR if args.example == "simclr" else module.DINO
    model = cls.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    if model.hparams.get("backbone", "vit") != "vit":
        raise SystemExit(f"{args.checkpoint} holds a ResNet, not a ViT: pass a run of --backbone vit.")
    size = model.hparams.image_size
    example = parse_args("", ["--data", "textured", "--image-size", str(size), "--probe-size", str(args.probe_size)])
    example.seed = args.seed
    images, masks = probe(example)
    captured: list[Tensor] = []
    block = model.get_submodule(model.monitored_layer)
    handle = block.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    with torch.no_grad():
        model.backbone(images)
    handle.remove()
    tokens = captured[0][:, 1:, :]  # the class token dropped
    side = round(tokens.shape[1] ** 0.5)
    inside = torch.nn.functional.adaptive_avg_pool2d(masks[:, None].double(), side).flatten(1) >= 0.5
    stats = token_statistics(tokens, inside)
    for key, value in stats.items():
        print(f"{key}: {value:.6g}")
    if args.csv is not None:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["run", "seed", *stats])
            if new:
                writer.writeheader()
            writer.writerow({"run": args.name or str(args.checkpoint), "seed": args.seed, **stats})
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
