"""Tiny models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(width: int = 8) -> nn.Sequential:
    """A small CNN shaped like lightly's backbones: conv stages then a global pool (index 6)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class SiameseNet(nn.Module):
    """backbone + projection head, the layout of lightly's SSL models."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.backbone = tiny_cnn(width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def tiny_vit(image_size: int = 16, patch_size: int = 4, num_layers: int = 2, num_heads: int = 2, dim: int = 16):
    """A small torchvision ``VisionTransformer`` returning its class-token embedding (no classifier head)."""
    import torchvision

    vit = torchvision.models.VisionTransformer(
        image_size, patch_size, num_layers=num_layers, num_heads=num_heads, hidden_dim=dim, mlp_dim=2 * dim
    )
    vit.heads = nn.Identity()
    return vit


class QKVAttention(nn.Module):
    """timm/DINO-style self-attention: one ``qkv`` linear layer, ``num_heads``, ``scale``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm transformer block in the timm/DINO layout (``norm1``, ``attn``, ``norm2``, ``mlp``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QKVAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlocksViT(nn.Module):
    """A ``blocks.N`` vision transformer (timm, DINO, DINOv2 layout) for a fixed, possibly non-square, patch grid.

    Tokens: the class token, ``registers`` register tokens, then the patches in raster order.
    """

    def __init__(
        self,
        grid: tuple[int, int] = (4, 6),
        patch_size: int = 4,
        dim: int = 16,
        depth: int = 2,
        num_heads: int = 2,
        registers: int = 0,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        prefix = int(class_token) + registers
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid[0] * grid[1], dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), patches], dim=1)
        return self.norm(self.blocks(tokens))[:, 0]


def import_source(folder, name: str, source: str):
    """Write ``source`` as ``folder/name.py`` and import it, with ``folder`` on ``sys.path`` only while importing
    (so that code the tests write, like a user's model module, can be named as ``name:Class``)."""
    import importlib
    import sys

    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def aim_vit() -> nn.Module:
    """lightly's AIM ViT (``MaskedCausalVisionTransformer``), tiny: 32 px, 8 px patches, no class token.

    With the installed timm its ``forward`` fails (it passes an argument timm's no longer takes); ``forward_features``
    runs.
    """
    from lightly.models.modules import MaskedCausalVisionTransformer

    return MaskedCausalVisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        class_token=False,
        no_embed_class=True,
        global_pool="avg",
    )
