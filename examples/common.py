"""Plumbing shared by the SSL examples: arguments, backbone, data, Trainer with SaliencyMonitor.

Each example (``simclr.py``, ``moco_v2.py``, ``swav.py``, ``barlow_twins.py``, ``vicreg.py``, ``dino_vit.py``) only
defines its LightningModule and its lightly transform, then calls :func:`run`. ``dino_vit.py`` builds its own
backbone (a small Vision Transformer) and passes its monitored layer to :func:`run`; the rest of this page is about
the ResNet backbones of the others.

Backbone and layer. The backbone is lightly's layout, ``nn.Sequential(*list(resnet18.children())[:-1])``, so
``backbone.4`` .. ``backbone.7`` are ResNet's ``layer1`` .. ``layer4`` and ``backbone.8`` the global pool. A
saliency map needs spatial extent: at 224 px ``layer4`` is 7x7, but CPU-sized inputs are smaller. With
``--stem imagenet`` (the default; a 7x7 stride-2 convolution and a max-pool, total stride 32 at ``layer4``) a
64 px image gives 2x2 at ``layer4``, 4x4 at ``layer3`` and 8x8 at ``layer2``, so the default monitored layer is
``layer2`` (``backbone.5``). With ``--stem cifar`` (3x3 stride-1 convolution, no max-pool, total stride 8) a
64 px image gives 8x8 at ``layer4`` (``backbone.7``), the paper's layer, at about 3.5x the compute.
:func:`default_layer` picks the deepest stage whose map is at least 7x7 for the chosen stem and size.

``--arch small-resnet`` is the same layout (stem, four stages of two basic blocks, global pool; ``backbone.7`` is
``layer4``) at a quarter of ResNet18's widths (16/32/64/128 channels, 0.7 M parameters): with ``--stem cifar`` its
``layer4`` is 8x8 at 64 px and a training step costs about 1/16 of ResNet18's, which is what lets the demo learn
on a CPU in minutes.

Data. ``--data synthetic`` is :class:`~tsm_lightning.data.SyntheticShapes` seen through the example's lightly
transform; ``--data textured`` is :class:`~tsm_lightning.data.TexturedObjects` (one textured object over clutter
of matching contrast) wrapped in :class:`~tsm_lightning.data.BackgroundSwapViews`: each of the transform's views
gets the sample's object over freshly drawn clutter, then that view's augmentation. ``--no-background-swap`` cuts
every view from the same image instead (the ordinary pipeline; on this data the model then learns the clutter).
Either way the probe is held-out images (never trained on) with their exact object masks.

Optimizer. Each example keeps its method's own optimizer and schedule (``--schedule own``, the default);
``--schedule onecycle`` gives any of them the demo's instead (:func:`onecycle_adamw`: AdamW under a OneCycle
schedule peaking at ``--lr``), so that the SSL method matrix can tell a method from its recipe.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tsm_lightning import DisplayOptions, Probe, SaliencyMonitor
from tsm_lightning.data import BackgroundSwapViews, ImageFolder, SyntheticShapes, TexturedObjects

STAGE_STRIDES = {"imagenet": (4, 8, 16, 32), "cifar": (1, 2, 4, 8)}
"""Total stride at the output of layer1..layer4 for each stem."""

ARCHS = ("resnet18", "small-resnet")
"""Backbones the examples build: torchvision's ResNet18, or the same layout at a quarter of its widths."""

SMALL_RESNET_WIDTHS = (16, 32, 64, 128)
"""Channels of layer1..layer4 of ``--arch small-resnet`` (ResNet18's divided by 4)."""

BUILT_IN_DATA = ("synthetic", "textured")

SCHEDULES = ("own", "onecycle")
"""``--schedule``: the example's own optimizer and schedule, or the demo's (:func:`onecycle_adamw`)."""


def parse_args(description: str, argv: list[str] | None = None, **defaults: object) -> argparse.Namespace:
    """Command-line arguments shared by the examples; ``defaults`` override per example."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (built-in shapes), 'textured' (textured objects over clutter) or a folder of images",
    )
    parser.add_argument(
        "--no-background-swap",
        dest="background_swap",
        action="store_false",
        help="with --data textured: cut every view from the same image instead of pasting the object on fresh clutter",
    )
    parser.add_argument("--arch", choices=ARCHS, default="resnet18", help="backbone, see module doc")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--image-size", type=int, default=64, help="training and probe image side, pixels")
    parser.add_argument("--output", default="runs", help="folder for TensorBoard logs and checkpoints")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="own",
        help="'own': the example's optimizer and schedule; 'onecycle': the demo's (AdamW, OneCycle peaking at --lr)",
    )
    parser.add_argument("--num-samples", type=int, default=2048, help="size of the synthetic training set")
    parser.add_argument("--num-workers", type=int, default=0, help="dataloader worker processes")
    parser.add_argument("--stem", choices=tuple(STAGE_STRIDES), default="imagenet", help="ResNet stem, see module doc")
    parser.add_argument("--layer", default=None, help="monitored layer (default: deepest stage with >= 7x7 maps)")
    parser.add_argument("--every-n-steps", type=int, default=25, help="SaliencyMonitor cadence")
    parser.add_argument("--probe-size", type=int, default=8, help="held-out probe images the monitor explains")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def onecycle_adamw(module: LightningModule, lr: float, weight_decay: float = 1e-5) -> tuple[list, list[dict]]:
    """The demo's optimizer, for ``configure_optimizers``: AdamW over ``module``'s trainable parameters (a frozen
    momentum or teacher copy is left out) under a OneCycle schedule that warms up over the first 10% of the
    Trainer's steps to ``lr``, then anneals; stepped every optimizer step."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = module.trainer.estimated_stepping_batches
    # OneCycleLR divides by zero when its warm-up ends on step 0, as 10% of 10 steps does: warm up for 1.5 then.
    warmup = 0.1 if 0.1 * total != 1 else 0.15
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=warmup)
    return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def resnet18_backbone(stem: str = "imagenet") -> nn.Sequential:
    """A randomly initialised torchvision ResNet18 without its classifier: ``(B, 3, H, W) -> (B, 512, 1, 1)``."""
    resnet = torchvision.models.resnet18()
    if stem == "cifar":
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return nn.Sequential(*list(resnet.children())[:-1])


def small_resnet_backbone(stem: str = "cifar", widths: tuple[int, ...] = SMALL_RESNET_WIDTHS) -> nn.Sequential:
    """ResNet18's layout at other widths, randomly initialised: ``(B, 3, H, W) -> (B, widths[-1], 1, 1)``.

    Children as in lightly's ``nn.Sequential(*list(resnet.children())[:-1])``: ``0`` conv1, ``1`` bn1, ``2`` relu,
    ``3`` max-pool (``nn.Identity`` with the CIFAR stem), ``4`` .. ``7`` layer1 .. layer4 (two torchvision
    ``BasicBlock`` each; stride 2 from layer2 on), ``8`` the global average pool. Initialised like torchvision's
    ResNet (Kaiming-normal convolutions, BatchNorm weight 1 and bias 0).
    """
    from torchvision.models.resnet import BasicBlock

    if len(widths) != 4 or any(w < 1 for w in widths):
        raise ValueError(f"widths must be four positive channel counts, got {widths!r}.")
    if stem == "cifar":
        stem_layers = [nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(widths[0])]
        stem_layers += [nn.ReLU(inplace=True), nn.Identity()]
    else:
        stem_layers = [nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(widths[0])]
        stem_layers += [nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    stages, channels = [], widths[0]
    for index, width in enumerate(widths):
        stride = 1 if index == 0 else 2
        downsample = None
        if stride != 1 or channels != width:
            downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
        stages.append(nn.Sequential(BasicBlock(channels, width, stride, downsample), BasicBlock(width, width)))
        channels = width
    backbone = nn.Sequential(*stem_layers, *stages, nn.AdaptiveAvgPool2d(1))
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return backbone


def make_backbone(arch: str = "resnet18", stem: str = "imagenet") -> tuple[nn.Sequential, int]:
    """The backbone of ``--arch`` and ``--stem``, and the width of its pooled output."""
    if arch == "resnet18":
        return resnet18_backbone(stem), 512
    if arch == "small-resnet":
        return small_resnet_backbone(stem), SMALL_RESNET_WIDTHS[-1]
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}.")


def default_layer(stem: str, image_size: int) -> str:
    """The deepest ResNet stage (``backbone.4`` .. ``backbone.7``) whose output map is at least 7x7."""
    for index in (3, 2, 1, 0):
        if image_size // STAGE_STRIDES[stem][index] >= 7:
            return f"backbone.{4 + index}"
    raise ValueError(f"--image-size {image_size} is too small for a 7x7 map with the {stem} stem.")


def train_dataset(args: argparse.Namespace, transform: Callable) -> Dataset:
    """The training set: built-in data or an image folder, seen through lightly's multi-view transform.

    With ``--data textured`` the transform's per-view transforms (``transform.transforms``, lightly's
    ``MultiViewTransform`` layout) are applied by :class:`~tsm_lightning.data.BackgroundSwapViews`, one per view.
    """
    if args.data == "synthetic":
        return SyntheticShapes(args.num_samples, image_size=args.image_size, seed=args.seed, transform=transform)
    if args.data == "textured":
        objects = TexturedObjects(args.num_samples, image_size=args.image_size, seed=args.seed)
        return BackgroundSwapViews(objects, transform=transform.transforms, swap=args.background_swap)
    return ImageFolder(args.data, transform=transform)


def probe(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fixed probe images (and object masks for the built-in data), never seen in training."""
    if args.data in BUILT_IN_DATA:
        cls = SyntheticShapes if args.data == "synthetic" else TexturedObjects
        held_out = cls(args.num_samples, image_size=args.image_size, seed=args.seed).held_out(max(256, args.probe_size))
        return held_out.probe(args.probe_size)
    folder = ImageFolder(args.data, image_size=args.image_size)
    return torch.stack([folder[i][0] for i in range(min(args.probe_size, len(folder)))]), None


ExtraCallbacks = Callable[[torch.Tensor, torch.Tensor | None, str], Sequence[Callback]]
"""``extra_callbacks(probe_images, probe_masks, layer)``: more callbacks for the Trainer (the benchmarks' recorder)."""


def run(
    model: LightningModule,
    transform: Callable,
    args: argparse.Namespace,
    name: str,
    layer: str | None = None,
    *,
    extra_callbacks: ExtraCallbacks | None = None,
) -> Path:
    """Train ``model`` with SaliencyMonitor attached; write TensorBoard logs and a checkpoint; say where.

    The monitored layer is ``--layer`` if given, else ``layer`` (an example whose backbone is not a ResNet names
    its own, e.g. a ViT's last encoder block), else :func:`default_layer`. ``extra_callbacks``, when given, is
    called with the probe's ``(N, 3, S, S)`` images, its ``(N, S, S)`` masks (or ``None``) and the monitored layer,
    and the callbacks it returns join the Trainer's (``benchmarks/recorder.py`` uses it).

    Returns:
        The run's TensorBoard log folder.
    """
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
    layer = args.layer or layer or default_layer(args.stem, args.image_size)
    monitor = SaliencyMonitor(
        Probe(images, masks),
        layer=layer,
        every_n_steps=args.every_n_steps,
        display=DisplayOptions(images=8, tile_size=96),
    )
    logger = TensorBoardLogger(args.output, name=name)
    checkpoint = ModelCheckpoint(dirpath=Path(logger.log_dir) / "checkpoints", save_last=True)
    extra = list(extra_callbacks(images, masks, layer)) if extra_callbacks is not None else []
    trainer = Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=logger,
        callbacks=[monitor, checkpoint, *extra],
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
