"""Plumbing shared by the SSL examples: arguments, backbone, data, Trainer with SaliencyMonitor.

Each example (``moco_v2.py``, ``swav.py``, ``barlow_twins.py``, ``vicreg.py``) only defines its LightningModule
and its lightly transform, then calls :func:`run`.

Backbone and layer. The backbone is lightly's layout, ``nn.Sequential(*list(resnet18.children())[:-1])``, so
``backbone.4`` .. ``backbone.7`` are ResNet's ``layer1`` .. ``layer4`` and ``backbone.8`` the global pool. A
saliency map needs spatial extent: at 224 px ``layer4`` is 7x7, but CPU-sized inputs are smaller. With
``--stem imagenet`` (the default; a 7x7 stride-2 convolution and a max-pool, total stride 32 at ``layer4``) a
64 px image gives 2x2 at ``layer4``, 4x4 at ``layer3`` and 8x8 at ``layer2``, so the default monitored layer is
``layer2`` (``backbone.5``). With ``--stem cifar`` (3x3 stride-1 convolution, no max-pool, total stride 8) a
64 px image gives 8x8 at ``layer4`` (``backbone.7``), the paper's layer, at about 3.5x the compute.
:func:`default_layer` picks the deepest stage whose map is at least 7x7 for the chosen stem and size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tsm_lightning import SaliencyMonitor
from tsm_lightning.data import ImageFolder, SyntheticShapes

STAGE_STRIDES = {"imagenet": (4, 8, 16, 32), "cifar": (1, 2, 4, 8)}
"""Total stride at the output of layer1..layer4 for each stem."""


def parse_args(description: str, argv: list[str] | None = None, **defaults: object) -> argparse.Namespace:
    """Command-line arguments shared by the examples; ``defaults`` override per example."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="'synthetic' (built-in shapes) or a folder of images")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--image-size", type=int, default=64, help="training and probe image side, pixels")
    parser.add_argument("--output", default="runs", help="folder for TensorBoard logs and checkpoints")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--num-samples", type=int, default=2048, help="size of the synthetic training set")
    parser.add_argument("--num-workers", type=int, default=0, help="dataloader worker processes")
    parser.add_argument(
        "--stem", choices=tuple(STAGE_STRIDES), default="imagenet", help="ResNet18 stem, see module doc"
    )
    parser.add_argument("--layer", default=None, help="monitored layer (default: deepest stage with >= 7x7 maps)")
    parser.add_argument("--every-n-steps", type=int, default=25, help="SaliencyMonitor cadence")
    parser.add_argument("--probe-size", type=int, default=8, help="probe images shown in TensorBoard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def resnet18_backbone(stem: str = "imagenet") -> nn.Sequential:
    """A randomly initialised torchvision ResNet18 without its classifier: ``(B, 3, H, W) -> (B, 512, 1, 1)``."""
    resnet = torchvision.models.resnet18()
    if stem == "cifar":
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return nn.Sequential(*list(resnet.children())[:-1])


def default_layer(stem: str, image_size: int) -> str:
    """The deepest ResNet stage (``backbone.4`` .. ``backbone.7``) whose output map is at least 7x7."""
    for index in (3, 2, 1, 0):
        if image_size // STAGE_STRIDES[stem][index] >= 7:
            return f"backbone.{4 + index}"
    raise ValueError(f"--image-size {image_size} is too small for a 7x7 map with the {stem} stem.")


def train_dataset(args: argparse.Namespace, transform: Callable) -> Dataset:
    """The training set: the built-in shapes or an image folder, seen through lightly's multi-view transform."""
    if args.data == "synthetic":
        return SyntheticShapes(args.num_samples, image_size=args.image_size, seed=args.seed, transform=transform)
    return ImageFolder(args.data, transform=transform)


def probe(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fixed probe images (and object masks for the synthetic data), never seen in training."""
    if args.data == "synthetic":
        held_out = SyntheticShapes(args.num_samples, image_size=args.image_size, seed=args.seed).held_out()
        return held_out.probe(args.probe_size)
    folder = ImageFolder(args.data, image_size=args.image_size)
    return torch.stack([folder[i][0] for i in range(min(args.probe_size, len(folder)))]), None


def run(model: LightningModule, transform: Callable, args: argparse.Namespace, name: str) -> Path:
    """Train ``model`` with SaliencyMonitor attached; write TensorBoard logs and a checkpoint; say where."""
    seed_everything(args.seed, workers=True)
    loader = DataLoader(
        train_dataset(args, transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
    )
    images, masks = probe(args)
    layer = args.layer or default_layer(args.stem, args.image_size)
    monitor = SaliencyMonitor(
        images, masks=masks, layer=layer, every_n_steps=args.every_n_steps, num_images=len(images), image_size=96
    )
    logger = TensorBoardLogger(args.output, name=name)
    checkpoint = ModelCheckpoint(dirpath=Path(logger.log_dir) / "checkpoints", save_last=True)
    trainer = Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=logger,
        callbacks=[monitor, checkpoint],
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    log_dir = Path(logger.log_dir)
    print(f"\nTrained {name} for {trainer.global_step} steps in {elapsed:.0f} s; monitored layer {layer!r}.")
    print(f"Checkpoint: {checkpoint.last_model_path}")
    print(f"TensorBoard logs: {log_dir}")
    print("Open them with:")
    print(f"  .venv/bin/tensorboard --logdir {Path(args.output)} --samples_per_plugin images=1000")
    return log_dir
