"""BYOL with a ResNet backbone, trained with SaliencyMonitor watching the online backbone.

    python examples/byol.py --data textured --arch small-resnet --stem cifar --max-steps 150 --output runs

BYOL (Grill et al., 2020) has no negatives: an online network (backbone, projection head, prediction head) predicts
the projection a target network (an exponential moving average of the online backbone and projection head) gives
to the other view, with a negative cosine similarity, symmetrised over the two views. Built from lightly's parts:
``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``, ``update_momentum`` and
``BYOLTransform`` (its two asymmetric views; no Gaussian blur at CPU sizes, it erases small textures).

The monitor captures ``backbone.<stage>`` and calls ``pl_module.backbone`` only: the target copy
(``backbone_momentum``) never runs for saliency and its BatchNorm statistics are untouched.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch import LightningModule, seed_everything

from common import ExtraCallbacks, make_backbone, onecycle_adamw, parse_args, run


class BYOL(LightningModule):
    """BYOL: the online network's prediction of the target network's projection of the other view."""

    def __init__(
        self,
        stem: str = "imagenet",
        lr: float = 1e-3,
        arch: str = "resnet18",
        hidden_dim: int = 512,
        out_dim: int = 128,
        momentum: float = 0.99,
        schedule: str = "own",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, width = make_backbone(arch, stem)
        self.projection_head = BYOLProjectionHead(width, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The online prediction, ``(B, 3, H, W) -> (B, out_dim)``."""
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        """The target projection, ``(B, 3, H, W) -> (B, out_dim)``, without gradients."""
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(
            self.global_step, self.trainer.estimated_stepping_batches, self.hparams.momentum, 1.0
        )
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        (x0, x1), _ = batch
        loss = 0.5 * (
            self.criterion(self(x0), self.forward_momentum(x1)) + self.criterion(self(x1), self.forward_momentum(x0))
        )
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.schedule == "onecycle":
            return onecycle_adamw(self, self.hparams.lr)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=1e-5)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def main(argv: list[str] | None = None, *, extra_callbacks: ExtraCallbacks | None = None) -> Path:
    """Train BYOL; ``extra_callbacks`` as in :func:`common.run`. Returns the TensorBoard log folder."""
    args = parse_args(__doc__, argv, lr=1e-3)
    seed_everything(args.seed, workers=True)  # the initial weights are part of the run
    model = BYOL(arch=args.arch, stem=args.stem, lr=args.lr, schedule=args.schedule)
    size = args.image_size
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0, min_scale=0.5, cj_strength=0.5),
        view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0, min_scale=0.5, cj_strength=0.5),
    )
    return run(model, transform, args, name="byol", extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
