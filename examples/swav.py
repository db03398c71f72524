"""SwAV with multi-crop and a ResNet18 backbone, trained with SaliencyMonitor.

    python examples/swav.py --data synthetic --max-steps 200 --image-size 64 --output runs

Two global crops at ``--image-size`` and four local crops at half that size. The monitor captures the online
``backbone`` on the probe images only: the projection head and the prototypes never run for saliency, and the
prototypes' normalisation and freezing schedule are not affected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.transforms import SwaVTransform
from lightning.pytorch import LightningModule, seed_everything

from common import ExtraCallbacks, make_backbone, onecycle_adamw, parse_args, run


class SwaV(LightningModule):
    """SwAV: swapped prediction of Sinkhorn cluster assignments between crops."""

    def __init__(
        self,
        stem: str = "imagenet",
        lr: float = 0.001,
        n_prototypes: int = 64,
        arch: str = "resnet18",
        schedule: str = "own",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, width = make_backbone(arch, stem)
        self.projection_head = SwaVProjectionHead(width, 512, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=n_prototypes, n_steps_frozen_prototypes=1)
        self.criterion = SwaVLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x).flatten(start_dim=1)
        return torch.nn.functional.normalize(self.projection_head(features), dim=1, p=2)

    def training_step(self, batch, batch_idx):
        self.prototypes.normalize()
        views, _ = batch
        crops = [self.prototypes(self(view), step=self.current_epoch) for view in views]
        loss = self.criterion(high_resolution_outputs=crops[:2], low_resolution_outputs=crops[2:])
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
    model = SwaV(arch=args.arch, stem=args.stem, lr=args.lr, schedule=args.schedule)
    size = args.image_size
    transform = SwaVTransform(
        crop_sizes=(size, size // 2), crop_counts=(2, 4), crop_min_scales=(0.3, 0.1), gaussian_blur=0.0
    )
    return run(model, transform, args, name="swav", extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
