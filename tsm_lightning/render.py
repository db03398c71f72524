"""Colormaps, overlays and grids as uint8 tensors: no GUI, no matplotlib.

Everything here works on batches: images ``(B, 3, H, W)``, maps ``(B, H, W)`` in ``[0, 1]``, and returns
``uint8`` tensors ``(B, 3, H, W)`` (or ``(3, H, W)`` for a grid), ready for TensorBoard's ``add_image`` or
:func:`save_png`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tsm_lightning.constants import ATTENTION, ATTENTION_LABEL, IMAGENET_MEAN, IMAGENET_STD
from tsm_lightning.core.methods import METHOD_TABLE

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont, ImageFont

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "comparison_grid",
    "denormalize",
    "grid",
    "label",
    "labelled_grid",
    "method_strip",
    "overlay",
    "save_png",
    "to_uint8",
]

# Control points (value 0 .. 1, evenly spaced) of each colormap, RGB in [0, 1], linearly interpolated.
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "jet": ((0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)),
    "viridis": (
        (0.267, 0.005, 0.329),
        (0.283, 0.141, 0.458),
        (0.254, 0.265, 0.530),
        (0.207, 0.372, 0.553),
        (0.164, 0.471, 0.558),
        (0.128, 0.567, 0.551),
        (0.135, 0.659, 0.518),
        (0.267, 0.749, 0.441),
        (0.478, 0.821, 0.318),
        (0.741, 0.873, 0.150),
        (0.993, 0.906, 0.144),
    ),
    "inferno": (
        (0.001, 0.000, 0.014),
        (0.087, 0.045, 0.225),
        (0.258, 0.039, 0.406),
        (0.416, 0.090, 0.433),
        (0.578, 0.148, 0.404),
        (0.735, 0.216, 0.330),
        (0.865, 0.317, 0.226),
        (0.955, 0.469, 0.099),
        (0.988, 0.645, 0.040),
        (0.964, 0.843, 0.273),
        (0.988, 0.998, 0.645),
    ),
    "gray": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _check_colormap(name: str) -> None:
    if name not in COLORMAPS:
        raise ValueError(f"Unknown colormap {name!r}; valid colormaps are {tuple(COLORMAPS)}.")


def apply_colormap(maps: Tensor, colormap: str = "jet") -> Tensor:
    """Colour ``(B, H, W)`` maps in ``[0, 1]`` (values outside are clipped).

    Returns:
        ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``.
    """
    _check_colormap(colormap)
    table = torch.tensor(COLORMAPS[colormap], dtype=torch.float32, device=maps.device)  # (K, 3)
    pos = maps.to(torch.float32).nan_to_num(0.0).clamp(0, 1) * (table.shape[0] - 1)
    lo = pos.floor().long().clamp(max=table.shape[0] - 2)
    frac = (pos - lo)[..., None]
    rgb = table[lo] * (1 - frac) + table[lo + 1] * frac  # (B, H, W, 3)
    return rgb.permute(0, 3, 1, 2)


def denormalize(
    images: Tensor,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Tensor:
    """Undo ``(x - mean) / std`` input normalisation and clip to ``[0, 1]``.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        mean: per-channel mean used for normalisation, or ``None`` if the images are not normalised.
        std: per-channel std, or ``None``.

    Returns:
        ``(B, 3, H, W)`` float32 in ``[0, 1]``.
    """
    x = images.detach().to(torch.float32)
    if std is not None:
        x = x * torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    if mean is not None:
        x = x + torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    return x.clamp(0, 1)


def to_uint8(x: Tensor) -> Tensor:
    """Float images in ``[0, 1]`` (clipped) to uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def overlay(images: Tensor, maps: Tensor, colormap: str = "jet", alpha: float = 0.5) -> Tensor:
    """Blend coloured maps over images: ``(1 - alpha) * image + alpha * colormap(map)``.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]`` (see :func:`denormalize`).
        maps: ``(B, H, W)`` in ``[0, 1]``, same ``H, W`` as ``images``.
        colormap: a key of :data:`COLORMAPS`.
        alpha: weight of the map, in ``[0, 1]``.

    Returns:
        ``(B, 3, H, W)`` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if images.shape[-2:] != maps.shape[-2:] or images.shape[0] != maps.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and maps {tuple(maps.shape)} must match in B, H and W.")
    blended = (1 - alpha) * images.to(torch.float32) + alpha * apply_colormap(maps, colormap)
    return to_uint8(blended)


def grid(rows: Sequence[Tensor], padding: int = 2, pad_value: int = 255) -> Tensor:
    """Tile images into one picture: ``rows[i][j]`` is the image at row ``i``, column ``j``.

    Args:
        rows: a sequence of ``(n, 3, H, W)`` uint8 (or float in ``[0, 1]``) batches, all the same shape.
        padding: pixels between tiles and around the border.
        pad_value: value of the padding (uint8).

    Returns:
        ``(3, rows * (H + p) + p, n * (W + p) + p)`` uint8.
    """
    if not rows:
        raise ValueError("grid needs at least one row.")
    tiles = [r if r.dtype == torch.uint8 else to_uint8(r) for r in rows]
    shape = tiles[0].shape
    if any(t.shape != shape for t in tiles) or len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"every row must be (n, 3, H, W) of one shape, got {[tuple(t.shape) for t in tiles]}.")
    n, _, h, w = shape
    out = torch.full(
        (3, len(tiles) * (h + padding) + padding, n * (w + padding) + padding),
        pad_value,
        dtype=torch.uint8,
        device=tiles[0].device,
    )
    for i, row in enumerate(tiles):
        top = padding + i * (h + padding)
        for j in range(n):
            left = padding + j * (w + padding)
            out[:, top : top + h, left : left + w] = row[j]
    return out


_FONT_SIZE = 11
_LABEL_BAND = 15  # pixels of the header row: the font's ascent and descent plus a margin


def label(name: str) -> str:
    """Display name: a method's label from its table entry, the attention map's, or ``name`` itself otherwise."""
    if name in METHOD_TABLE:
        return METHOD_TABLE[name].label
    return ATTENTION_LABEL if name == ATTENTION else name


def _font() -> FreeTypeFont | ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=_FONT_SIZE)


def _fit(text: str, width: int, font: FreeTypeFont | ImageFont) -> str:
    """``text`` shortened with a trailing ellipsis until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def labelled_grid(
    rows: Sequence[Tensor],
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    padding: int = 2,
) -> Tensor:
    """:func:`grid` with a header row naming each column and a left band naming each row, drawn on the picture.

    Labels wider than their tile are shortened with an ellipsis; tiles narrower than a few characters get none.

    Args:
        rows: as for :func:`grid`: ``rows[i]`` is an ``(n, 3, H, W)`` batch, one tile per column.
        column_labels: ``n`` texts written above the columns, or ``None`` for no header.
        row_labels: one text per row written left of it, or ``None`` for no band.
        padding: pixels between tiles.

    Returns:
        ``(3, H', W')`` uint8: the grid, ``15`` pixels taller with column labels and wider by the longest row label.
    """
    from PIL import Image, ImageDraw

    picture = grid(rows, padding=padding)
    n, h, w = rows[0].shape[0], rows[0].shape[-2], rows[0].shape[-1]
    if column_labels is not None and len(column_labels) != n:
        raise ValueError(f"column_labels needs {n} texts (one per column), got {len(column_labels)}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels needs {len(rows)} texts (one per row), got {len(row_labels)}.")
    font = _font()
    top = _LABEL_BAND if column_labels is not None else 0
    left = 0
    if row_labels is not None:
        left = int(max(font.getlength(text) for text in row_labels)) + 2 * padding + 2
    canvas = Image.new("RGB", (picture.shape[2] + left, picture.shape[1] + top), (255, 255, 255))
    canvas.paste(Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()), (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels or ()):
        text = _fit(text, w, font)
        x = left + padding + j * (w + padding) + (w - font.getlength(text)) / 2
        draw.text((x, 1), text, fill=(0, 0, 0), font=font)
    for i, text in enumerate(row_labels or ()):
        y = top + padding + i * (h + padding) + h / 2
        draw.text((padding, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    out = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return out.reshape(canvas.height, canvas.width, 3).permute(2, 0, 1).contiguous().to(picture.device)


def method_strip(tiles: Tensor, overlays: Tensor, name: str) -> Tensor:
    """One method's picture: the input tiles above its overlays, the rows named on the left.

    Args:
        tiles: ``(n, 3, H, W)`` uint8 inputs.
        overlays: ``(n, 3, H, W)`` uint8 overlays of method ``name``.
        name: the method (shown as :func:`label`).
    """
    return labelled_grid([tiles, overlays], row_labels=["input", label(name)])


def comparison_grid(tiles: Tensor, overlays: Mapping[str, Tensor]) -> Tensor:
    """One row per image: the input, then one overlay per method, under a header row naming the columns.

    Args:
        tiles: ``(n, 3, H, W)`` uint8 inputs.
        overlays: ``{method: (n, 3, H, W) uint8}``.
    """
    columns = [tiles, *overlays.values()]
    rows = [torch.stack([col[i] for col in columns]) for i in range(tiles.shape[0])]
    return labelled_grid(rows, column_labels=["input", *(label(name) for name in overlays)])


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` uint8 (or float in ``[0, 1]``) image as PNG; parent folders are created."""
    from PIL import Image

    if image.dtype != torch.uint8:
        image = to_uint8(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"save_png needs a (3, H, W) image, got {tuple(image.shape)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
    return path
