"""Localization benchmark: do an example model's saliency maps find the objects of held-out built-in images?

For a trained checkpoint of an example and for the same architecture at its initialisation (same seed as
training), this computes every method's maps on held-out images of the built-in data (never seen in training) and
reports the pointing game and energy-in-mask next to a random-map baseline and the chance level (the mean mask
area: what a uniform map scores on energy-in-mask, and about what a random map scores on the pointing game).

    # the demo: SimCLR on TexturedObjects (the data defaults to 'textured' for simclr and dino_vit, else 'synthetic')
    .venv/bin/python benchmarks/localization.py --example simclr \
        --checkpoint runs/simclr/version_0/checkpoints/last.ckpt
    # the ViT example: its last block's tokens, and the class-token attention as one more row
    .venv/bin/python benchmarks/localization.py --example dino_vit \
        --checkpoint runs/dino_vit/version_0/checkpoints/last.ckpt
    .venv/bin/python benchmarks/localization.py --checkpoint runs/moco_v2/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from tsm_lightning import METHODS, explain, find_layer
from tsm_lightning.cli import CLIError
from tsm_lightning.cli.loading import load_lightning
from tsm_lightning.data import SyntheticShapes, TexturedObjects
from tsm_lightning.metrics import energy_in_mask, pointing_game, random_maps

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

CLASSES = {
    "simclr": "SimCLR",
    "moco_v2": "MoCoV2",
    "swav": "SwaV",
    "barlow_twins": "BarlowTwins",
    "vicreg": "VICReg",
    "dino_vit": "DINO",
}
TEXTURED_BY_DEFAULT = ("simclr", "dino_vit")
DATASETS = {"synthetic": SyntheticShapes, "textured": TexturedObjects}


def _model_class(example: str) -> type:
    import importlib

    module = importlib.import_module(example)
    return getattr(module, CLASSES[example])


def _backbone(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.backbone(images)


def evaluate(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, layer: str, batch: int = 64):
    """Mean pointing game and energy-in-mask of each method (and of a ViT's class-token attention) over the images."""
    per_method: dict[str, dict[str, list[torch.Tensor]]] = {}
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], masks[start : start + batch]
        maps = explain(model, x, layer=layer, forward_fn=_backbone)
        for name, m in maps.items():
            per_method.setdefault(name, {"pointing": [], "energy": []})
            per_method[name]["pointing"].append(pointing_game(m, y))
            per_method[name]["energy"].append(energy_in_mask(m, y))
    return {
        name: {k: float(torch.cat(v).nanmean()) for k, v in metrics.items()} for name, metrics in per_method.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the trained example's Lightning checkpoint")
    parser.add_argument("--example", default="moco_v2", choices=tuple(CLASSES))
    parser.add_argument(
        "--data",
        default=None,
        choices=tuple(DATASETS),
        help="built-in data (default: textured for simclr, else synthetic)",
    )
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--layer", default=None, help="default: the automatic choice (a ViT's last block, else deepest map >= 7x7)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the training seed (for the initial weights)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read --checkpoint with a full unpickle (runs any code it carries): only for files you trust",
    )
    args = parser.parse_args(argv)

    cls = _model_class(args.example)
    try:  # the command line's loader: the file is read as data, the class is the example's
        trained = load_lightning(args.checkpoint, cls, "cpu", trust=args.trust_checkpoint).model
    except CLIError as err:
        parser.error(str(err))
    seed_everything(args.seed, verbose=False)
    untrained = cls(**trained.hparams).eval()
    data = args.data or ("textured" if args.example in TEXTURED_BY_DEFAULT else "synthetic")

    held_out = DATASETS[data](image_size=args.image_size, seed=args.seed).held_out(args.num_images)
    images, masks = held_out.probe(args.num_images)
    layer = args.layer or find_layer(trained, images[:2], _backbone, warn=False)
    results = {
        "initialisation": evaluate(untrained, images, masks, layer),
        "trained": evaluate(trained, images, masks, layer),
    }
    rand = random_maps(masks.float(), seed=0)
    random_row = {
        "pointing": float(pointing_game(rand, masks).nanmean()),
        "energy": float(energy_in_mask(rand, masks).nanmean()),
    }
    chance = float(masks.float().mean())

    print(
        f"Localization on {args.num_images} held-out {DATASETS[data].__name__} images ({args.image_size} px), "
        f"{args.example} ({_describe(trained.hparams)}) "
        f"layer {layer!r}; {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    print(f"checkpoint: {args.checkpoint}\n")
    print(
        "| method | pointing game (init) | pointing game (trained) | energy-in-mask (init) | energy-in-mask (trained) |"
    )
    print("|---|---|---|---|---|")
    for name in [*METHODS, *(n for n in results["trained"] if n not in METHODS)]:
        a, b = results["initialisation"][name], results["trained"][name]
        print(f"| {name} | {a['pointing']:.3f} | **{b['pointing']:.3f}** | {a['energy']:.3f} | **{b['energy']:.3f}** |")
    print(
        f"| random map | {random_row['pointing']:.3f} | {random_row['pointing']:.3f} | "
        f"{random_row['energy']:.3f} | {random_row['energy']:.3f} |"
    )
    print(f"\nChance level (mean mask area, the energy-in-mask of a uniform map): {chance:.3f}")


def _describe(hparams: dict) -> str:
    if "num_heads" in hparams:  # the ViT example
        return f"ViT, {hparams['num_layers']} blocks of width {hparams['hidden_dim']}"
    return f"{hparams.get('arch', 'resnet18')}, {hparams.get('stem', 'imagenet')} stem"


if __name__ == "__main__":
    main()
