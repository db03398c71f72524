"""A tiny self-supervised LightningModule and data for callback tests."""

from __future__ import annotations

import torch
from helpers import tiny_cnn
from lightly.loss import NegativeCosineSimilarity
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TwoViewNoise(Dataset):
    """Random images; each sample is ([view0, view1], index) like lightly's multi-view datasets."""

    def __init__(self, n: int = 32, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        # Random augmentation drawn from the global RNG, as real transforms do.
        return [x + 0.1 * torch.randn_like(x), x.flip(-1) + 0.1 * torch.randn_like(x)], i


class TinySimSiam(LightningModule):
    """backbone (lightly layout: convs then pool) + projection head; SimSiam-style loss from lightly."""

    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = tiny_cnn(width)
        self.projection_head = nn.Sequential(nn.Linear(2 * width, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
        self.prediction_head = nn.Linear(8, 8)
        self.criterion = NegativeCosineSimilarity()
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        (x0, x1), _ = batch
        z0, z1 = self(x0), self(x1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader(n: int = 32, size: int = 16, batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> DataLoader:
    return DataLoader(
        TwoViewNoise(n, size, seed),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


class TinyViTSimSiam(TinySimSiam):
    """:class:`TinySimSiam` with a small torchvision ViT backbone (16 px images, 4 px patches: a 4x4 token grid)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(width=8, lr=lr)
        from helpers import tiny_vit

        self.backbone = tiny_vit(image_size=16, patch_size=4, num_layers=2, num_heads=2, dim=16)
