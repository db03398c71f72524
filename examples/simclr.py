"""SimCLR on textured objects with background swap: the demo in which saliency truly evolves.

    python examples/simclr.py --output runs                       # the demo (defaults below)
    python examples/simclr.py --output runs --no-background-swap  # the control: the model learns the clutter

Defaults: ``--data textured`` (one textured object over clutter of matching contrast, see
:mod:`tsm_lightning.data.textured`), ``--arch small-resnet --stem cifar`` (ResNet18's layout at a quarter of its
widths; ``layer4`` = ``backbone.7`` is 8x8 at 64 px), batch 64, 150 steps of AdamW under a OneCycle schedule
peaking at lr 2e-3, and a SaliencyMonitor explaining 128 held-out probe images with their masks. Each training
sample's two views share the object's pixels and position over freshly drawn clutter (background swap), so what the
views have in common, and what NT-Xent rewards, is the object: the saliency maps move from the clutter to the
object, and the pointing game rises from chance.

SimCLR needs no momentum encoder or memory bank: the other 2 x 63 views of the batch are the negatives.

``--backbone vit`` trains the small Vision Transformer of ``dino_vit.py`` (``--conv-stem`` for its convolutional
stem) with this loss and recipe instead, monitoring its last encoder block: it tells the ViT from DINO's loss when
the DINO example does not learn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from dino_vit import vit_backbone
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightning.pytorch import LightningModule, seed_everything

from common import ExtraCallbacks, make_backbone, onecycle_adamw, parse_args, run


class SimCLR(LightningModule):
    """SimCLR: NT-Xent between the projections of two views, the rest of the batch as negatives."""

    def __init__(
        self,
        arch: str = "small-resnet",
        stem: str = "cifar",
        lr: float = 2e-3,
        temperature: float = 0.5,
        weight_decay: float = 1e-5,
        backbone: str = "resnet",
        image_size: int = 64,
        conv_stem: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backbone == "vit":  # dino_vit.py's ViT: its class token is the representation
            self.backbone, width = vit_backbone(image_size, conv_stem=conv_stem), 128
        elif backbone == "resnet":
            self.backbone, width = make_backbone(arch, stem)
        else:
            raise ValueError(f"backbone must be 'resnet' or 'vit', got {backbone!r}.")
        self.projection_head = SimCLRProjectionHead(width, width, 128)
        self.criterion = NTXentLoss(temperature=temperature)

    @property
    def monitored_layer(self) -> str | None:
        """The ViT's last encoder block; ``None`` for a ResNet (the examples' default layer)."""
        if self.hparams.backbone != "vit":
            return None
        return f"backbone.encoder.layers.encoder_layer_{len(self.backbone.encoder.layers) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        (x0, x1), _ = batch
        loss = self.criterion(self(x0), self(x1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return onecycle_adamw(self, self.hparams.lr, self.hparams.weight_decay)  # its own is the demo's


def main(argv: list[str] | None = None, *, extra_callbacks: ExtraCallbacks | None = None) -> Path:
    """Train the demo; ``extra_callbacks`` as in :func:`common.run`. Returns the TensorBoard log folder.

    Besides the shared arguments (:func:`common.parse_args`), ``--temperature`` (NT-Xent's) and ``--min-scale`` (the
    smallest crop, a fraction of the image area) set the recipe; ``benchmarks/seed_sweep.py`` varies them.
    """
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    recipe.add_argument("--min-scale", type=float, default=0.5, help="smallest random crop, fraction of the area")
    recipe.add_argument("--backbone", choices=("resnet", "vit"), default="resnet", help="vit: dino_vit.py's ViT")
    recipe.add_argument("--conv-stem", action="store_true", help="with --backbone vit: its convolutional stem")
    known, argv = recipe.parse_known_args(argv)
    args = parse_args(
        __doc__,
        argv,
        data="textured",
        arch="small-resnet",
        stem="cifar",
        batch_size=64,
        lr=2e-3,  # 3e-3 left seed 1 behind, 1e-3 rose too little: benchmarks/results/demo_recipes.csv
        max_steps=150,
        every_n_steps=15,
        probe_size=128,
    )
    seed_everything(args.seed, workers=True)  # the initial weights are part of the run
    model = SimCLR(
        arch=args.arch,
        stem=args.stem,
        lr=args.lr,
        temperature=known.temperature,
        backbone=known.backbone,
        image_size=args.image_size,
        conv_stem=known.conv_stem,
    )
    # Milder than SimCLR's ImageNet recipe: crops keep at least half the image (so that both views usually hold
    # the object) and colour jitter at 0.4 strength leaves its colours recognisable; no blur at 64 px.
    transform = SimCLRTransform(
        input_size=args.image_size, cj_strength=0.4, min_scale=known.min_scale, gaussian_blur=0.0
    )
    name = ("simclr" if known.backbone == "resnet" else "simclr_vit") + ("" if args.background_swap else "_no_swap")
    return run(model, transform, args, name=name, layer=model.monitored_layer, extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
