"""Barlow Twins with a ResNet18 backbone, trained with SaliencyMonitor.

    python examples/barlow_twins.py --data synthetic --max-steps 200 --image-size 64 --output runs

Barlow Twins drives the cross-correlation of two views' embeddings to the identity: no negatives, no momentum
encoder. lightly's ``BYOLTransform`` gives the two asymmetric views the paper uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightning.pytorch import LightningModule, seed_everything

from common import ExtraCallbacks, make_backbone, onecycle_adamw, parse_args, run


class BarlowTwins(LightningModule):
    """Barlow Twins: redundancy reduction between the embeddings of two views."""

    def __init__(
        self, stem: str = "imagenet", lr: float = 0.001, arch: str = "resnet18", schedule: str = "own"
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, width = make_backbone(arch, stem)
        self.projection_head = BarlowTwinsProjectionHead(width, 1024, 1024)
        self.criterion = BarlowTwinsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        (x0, x1), _ = batch
        loss = self.criterion(self(x0), self(x1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.schedule == "onecycle":
            return onecycle_adamw(self, self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None, *, extra_callbacks: ExtraCallbacks | None = None) -> Path:
    """Train; ``extra_callbacks`` as in :func:`common.run`. Returns the TensorBoard log folder."""
    args = parse_args(__doc__, argv, lr=0.001)
    seed_everything(args.seed, workers=True)  # the initial weights are part of the run
    model = BarlowTwins(arch=args.arch, stem=args.stem, lr=args.lr, schedule=args.schedule)
    size = args.image_size
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0),
    )
    return run(model, transform, args, name="barlow_twins", extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
