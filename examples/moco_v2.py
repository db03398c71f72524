"""MoCo v2 with a ResNet18 backbone, trained with SaliencyMonitor watching the online backbone.

    python examples/moco_v2.py --data synthetic --max-steps 200 --image-size 64 --output runs

MoCo keeps a momentum copy of the backbone and a memory bank of negative keys, so it learns with the small batches
a CPU affords. The monitor captures ``backbone.<stage>`` and calls ``pl_module.backbone`` only: the momentum
encoder (``backbone_momentum``) never runs for saliency and its BatchNorm statistics are untouched.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import MoCoV2Transform
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch import LightningModule, seed_everything

from common import ExtraCallbacks, make_backbone, onecycle_adamw, parse_args, run


class MoCoV2(LightningModule):
    """MoCo v2: query encoder, momentum key encoder, InfoNCE against a memory bank."""

    def __init__(
        self,
        stem: str = "imagenet",
        lr: float = 0.06,
        memory_bank_size: int = 4096,
        arch: str = "resnet18",
        schedule: str = "own",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, width = make_backbone(arch, stem)
        self.projection_head = MoCoProjectionHead(width, 512, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(memory_bank_size, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(self.global_step, self.trainer.estimated_stepping_batches, 0.996, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        (x_query, x_key), _ = batch
        loss = self.criterion(self(x_query), self.forward_momentum(x_key))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.schedule == "onecycle":
            return onecycle_adamw(self, self.hparams.lr)
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def main(argv: list[str] | None = None, *, extra_callbacks: ExtraCallbacks | None = None) -> Path:
    """Train; ``extra_callbacks`` as in :func:`common.run`. Returns the TensorBoard log folder."""
    args = parse_args(__doc__, argv)
    seed_everything(args.seed, workers=True)  # the initial weights are part of the run
    model = MoCoV2(arch=args.arch, stem=args.stem, lr=args.lr, schedule=args.schedule)
    transform = MoCoV2Transform(input_size=args.image_size, gaussian_blur=0.0)
    return run(model, transform, args, name="moco_v2", extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
