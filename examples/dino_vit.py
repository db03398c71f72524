"""DINO with a small Vision Transformer on textured objects with background swap.

    python examples/dino_vit.py --output runs

Defaults: ``--data textured`` with background swap (see :mod:`tsm_lightning.data.textured`), a randomly initialised
torchvision ``VisionTransformer`` (4 blocks, width 128, 4 heads, MLP 256; 0.56 M parameters) with patches of
``--image-size / 8`` pixels, so the token grid is 8x8 at any size (8 px patches at the default 64 px), batch 32,
and a SaliencyMonitor explaining 128 held-out probe images with their masks. The monitored layer is the last
encoder block, ``backbone.encoder.layers.encoder_layer_3``; ``--arch`` and ``--stem`` do not apply to this example
and are ignored.

DINO trains a student to match a teacher that is an exponential moving average of the student (no negatives, no
labels): the teacher sees the two global crops, the student sees those and the local crops, and the student's
softmax over ``out_dim`` prototypes is trained to match the teacher's centred, sharpened softmax of the *other*
views. Views come from lightly's ``DINOTransform`` at ``--image-size``: two global crops (scale 0.4-1) and two local
crops (scale 0.1-0.4). torchvision's ``VisionTransformer`` only accepts images of its own ``image_size``, so the
local crops are not smaller images as in the paper: they are small regions resized to the full ``--image-size``
(each costs as much as a global crop). No Gaussian blur (at 64 px it erases the textures).

Settings for a few CPU minutes: 300 steps, AdamW at lr 1e-4 (10 % linear warm-up, cosine decay), teacher momentum
0.99 -> 1 (cosine), ``out_dim`` 256, teacher temperature 0.02, student temperature 0.1, last layer frozen for the
first 30 steps, gradient norm clipped at 3. Unlike the paper's ViT recipe the projection head has BatchNorm. With
the more usual lr 1e-3, teacher temperature 0.04, ``out_dim`` 1024 and no BatchNorm the run collapsed: the loss rose
to ln(out_dim) and stayed there (a uniform output; in a short diagnostic run all images had the same embedding,
cosine 0.999, after 10 steps).

Measured on this machine with one thread (``OMP_NUM_THREADS=1``): the default run takes 4 min (236 s in
``Trainer.fit``); the logged loss falls from 5.9 (mean of the first five logged values) to 5.3 (last five; ln 256 =
5.55), most of it in the first 100 steps. The ViT does *not* learn to look at the object in this time: on 128
held-out images the last block's class-token attention peaks inside the object in 16 % of them at step 0 and 10 %
after training, against a chance level of 15 % (the mean mask area).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torchvision
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from lightning.pytorch import LightningModule, seed_everything
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig

from common import ExtraCallbacks, default_layer, make_backbone, onecycle_adamw, parse_args, run

GRID = 8
"""Tokens per side: the patch size is ``image_size // GRID``."""


def vit_backbone(
    image_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 128,
    mlp_dim: int = 256,
    conv_stem: bool = False,
) -> torchvision.models.VisionTransformer:
    """A randomly initialised torchvision ViT on a ``GRID x GRID`` token grid, classifier removed.

    ``backbone(images)`` returns the class token after the final LayerNorm, ``(B, hidden_dim)``; block ``i`` is
    ``backbone.encoder.layers.encoder_layer_<i>`` and returns ``(B, 1 + GRID**2, hidden_dim)`` (class token first).
    With ``conv_stem`` the patchify convolution is replaced by stride-2 3x3 convolutions with BatchNorm and ReLU
    (one per halving of the side, widths doubling up to ``hidden_dim``) and a 1x1 projection: the convolutional
    stem of Xiao et al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021), torchvision's
    ``conv_stem_configs``; it needs a power-of-two patch size.
    """
    if image_size % GRID:
        raise ValueError(f"--image-size must be a multiple of {GRID} (the token grid), got {image_size}.")
    patch = image_size // GRID
    stem = None
    if conv_stem:
        if patch < 2 or patch & (patch - 1):
            raise ValueError(
                f"the convolutional stem halves the side per layer, so the patch size (--image-size / {GRID}) must "
                f"be a power of two >= 2; got {patch} (--image-size {image_size}); try --image-size 64 or 128."
            )
        halvings = patch.bit_length() - 1
        widths = [max(hidden_dim >> (halvings - i), 8) for i in range(halvings)]
        stem = [ConvStemConfig(out_channels=width, kernel_size=3, stride=2) for width in widths]
    vit = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        conv_stem_configs=stem,
    )
    vit.heads = nn.Identity()
    return vit


class DINO(LightningModule):
    """DINO: a student ViT and head matched to their EMA teacher's centred, sharpened outputs across crops."""

    def __init__(
        self,
        image_size: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        hidden_dim: int = 128,
        mlp_dim: int = 256,
        head_hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        out_dim: int = 256,
        head_batch_norm: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.04,
        teacher_temp: float = 0.02,
        student_temp: float = 0.1,
        momentum: float = 0.99,
        freeze_last_layer_steps: int = 30,
        clip_grad: float = 3.0,
        backbone: str = "vit",
        arch: str = "small-resnet",
        stem: str = "cifar",
        conv_stem: bool = False,
        schedule: str = "own",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backbone == "vit":
            self.backbone = vit_backbone(image_size, num_layers, num_heads, hidden_dim, mlp_dim, conv_stem)
        elif backbone == "resnet":  # DINO with a ResNet (the SSL method matrix): --arch and --stem apply
            self.backbone, hidden_dim = make_backbone(arch, stem)
        else:
            raise ValueError(f"backbone must be 'vit' or 'resnet', got {backbone!r}.")
        # DINOProjectionHead freezes its last layer while its `current_epoch` argument is below freeze_last_layer;
        # on_after_backward passes the global step, so here the count is in steps.
        self.head = DINOProjectionHead(
            hidden_dim,
            head_hidden_dim,
            bottleneck_dim,
            out_dim,
            batch_norm=head_batch_norm,
            freeze_last_layer=freeze_last_layer_steps,
        )
        self.teacher_backbone = copy.deepcopy(self.backbone)
        # The head's weight-normalised last layer cannot be deep-copied: build a twin and copy the weights.
        self.teacher_head = DINOProjectionHead(
            hidden_dim, head_hidden_dim, bottleneck_dim, out_dim, batch_norm=head_batch_norm
        )
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=out_dim, teacher_temp=teacher_temp, student_temp=student_temp)

    @property
    def monitored_layer(self) -> str:
        """The last encoder block of the student backbone (a ResNet's: the deepest stage with a >= 7x7 map)."""
        if self.hparams.backbone == "resnet":
            return default_layer(self.hparams.stem, self.hparams.image_size)
        return f"backbone.encoder.layers.encoder_layer_{self.hparams.num_layers - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        total = self.trainer.estimated_stepping_batches
        momentum = cosine_schedule(self.global_step, total, self.hparams.momentum, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.head, self.teacher_head, m=momentum)
        views, _ = batch
        teacher_out = [self.forward_teacher(view) for view in views[:2]]  # global crops only
        student_out = [self(view) for view in views]
        loss = self.criterion(teacher_out, student_out)
        self.log("train_loss", loss, prog_bar=True)
        self.log("teacher_momentum", momentum)
        return loss

    def on_after_backward(self) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.clip_grad, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        if self.hparams.schedule == "onecycle":
            return onecycle_adamw(self, self.hparams.lr)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=total // 10, max_epochs=total)  # here: steps
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def dino_transform(image_size: int, n_local_views: int = 2, local_crop_size: int | None = None) -> DINOTransform:
    """lightly's DINO views at ``image_size``: two global crops and ``n_local_views`` local ones of
    ``local_crop_size`` (default ``image_size``: torchvision's ViT takes one input size only, see the module doc)."""
    return DINOTransform(
        global_crop_size=image_size,
        global_crop_scale=(0.4, 1.0),
        local_crop_size=local_crop_size or image_size,
        local_crop_scale=(0.1, 0.4),
        n_local_views=n_local_views,
        gaussian_blur=(0.0, 0.0, 0.0),
    )


def main(argv: list[str] | None = None, *, extra_callbacks: ExtraCallbacks | None = None) -> Path:
    """Train; ``extra_callbacks`` as in :func:`common.run`. Returns the TensorBoard log folder.

    ``--backbone resnet`` trains DINO with the ResNet of ``--arch``/``--stem`` instead of the ViT (for the SSL method
    matrix; local crops are then half the image side, as a CNN accepts any size).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backbone", choices=("vit", "resnet"), default="vit")
    pre.add_argument("--conv-stem", action="store_true", help="ViT: convolutional stem instead of patchify")
    known, argv = pre.parse_known_args(argv)
    args = parse_args(
        __doc__,
        argv,
        data="textured",
        batch_size=32,
        lr=1e-4,
        max_steps=300,
        every_n_steps=30,
        probe_size=128,
    )
    seed_everything(args.seed, workers=True)  # the initial weights are part of the run
    resnet = known.backbone == "resnet"
    model = DINO(
        image_size=args.image_size,
        lr=args.lr,
        backbone=known.backbone,
        arch=args.arch,
        stem=args.stem,
        conv_stem=known.conv_stem,
        schedule=args.schedule,
    )
    transform = dino_transform(args.image_size, local_crop_size=args.image_size // 2 if resnet else None)
    name = "dino_resnet" if resnet else "dino_vit"
    return run(model, transform, args, name=name, layer=model.monitored_layer, extra_callbacks=extra_callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
