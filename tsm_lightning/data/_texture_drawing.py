"""Batched drawing of textured shapes and colour gratings: the pixels of :class:`~tsm_lightning.data.TexturedObjects`.

What can be drawn (:data:`OBJECT_SHAPES`, :data:`TEXTURES`) and how: :func:`shape_table` turns uniforms into a
table of per-shape geometry, :func:`draw_shapes` renders every shape of a batch with its texture and exact mask,
:func:`gratings` renders full-image colour gratings, and :func:`random_colours` is the one colour distribution
all of them draw from. Where the shapes go, how large they are and how an image is composed is the dataset's
business, in :mod:`tsm_lightning.data.textured`.

Determinism across batch composition: a sample must come out bit-identical whether it is drawn alone or in a
batch. Elementwise transcendental kernels (sin, tanh, ...) may round differently in their vectorised body and
their scalar tail, whose split depends on the tensor's size, so the per-pixel maths here uses only +, -, *, /,
sqrt, floor, abs, comparisons and clamps (exact in IEEE arithmetic, whatever the code path); trigonometry is done
once per shape, in Python floats. Textures are triangle waves, not sines.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsm_lightning.data.base import hsv_to_rgb

# A private module of the data package: these are the names textured.py draws with.
__all__ = [
    "OBJECT_SHAPES",
    "SHAPE_PARAMS",
    "SHARPNESS",
    "TEXTURES",
    "draw_shapes",
    "flerp",
    "gratings",
    "lerp",
    "random_colours",
    "shape_table",
]

OBJECT_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring")
"""Shapes of the object and of the distractors, each chosen with equal probability."""

TEXTURES: tuple[str, ...] = ("checkerboard", "stripes", "rings")
"""Two-colour textures of the object and of the distractors, each chosen with equal probability."""

SHARPNESS = (1.0, 4.0)  # edge sharpness k of the texture profile clamp(0.5 + 0.5 k s, 0, 1)
_RING_INNER = (0.4, 0.6)  # inner / outer radius of a ring shape

# Layout of the uniform numbers drawn per shape (object or distractor): see shape_table.
SHAPE_PARAMS = 18


def lerp(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Map uniforms ``u`` in ``[0, 1]`` linearly onto ``bounds``."""
    return bounds[0] + (bounds[1] - bounds[0]) * u


def flerp(u: float, bounds: tuple[float, float]) -> float:
    """:func:`lerp` for one Python float."""
    return bounds[0] + (bounds[1] - bounds[0]) * u


def random_colours(u: Tensor) -> Tensor:
    """The one colour distribution of the dataset: ``(..., 3)`` uniforms to ``(..., 3)`` RGB in ``[0, 1]``.

    Hue uniform, saturation in ``[0.2, 1]``, value in ``[0.25, 1]``. Objects, distractors, gratings and the colour
    noise all draw from it, so colour alone never tells the object apart.
    """
    hsv = torch.stack([u[..., 0], lerp(u[..., 1], (0.2, 1.0)), lerp(u[..., 2], (0.25, 1.0))], dim=-1)
    return hsv_to_rgb(hsv)


def _wave(x: Tensor) -> Tensor:
    """Triangle wave of period 1 in ``[-1, 1]``: 1 at integers, -1 at half-integers."""
    return 1.0 - 4.0 * (x - torch.floor(x) - 0.5).abs()


def _profile(signal: Tensor, sharpness: Tensor) -> Tensor:
    """Two-colour texture profile ``clamp(0.5 + 0.5 k s, 0, 1)`` from a signal ``s`` in ``[-1, 1]``.

    ``k = 1`` leaves the triangle wave's soft ramps, larger ``k`` gives nearly square waves with short ramps.
    """
    return (0.5 + 0.5 * sharpness * signal).clamp(0.0, 1.0)


def _paint(profile: Tensor, colours: Tensor) -> Tensor:
    """``(N, 1, S, S)`` profile and ``(N, 2, 3)`` colours to ``(N, 3, S, S)`` pixels."""
    c0, c1 = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
    return c0 + (c1 - c0) * profile


# Columns of the table shape_table builds, one row per shape.
_COLUMNS = (
    "kind", "texture", "cy", "cx", "cos", "sin", "r2_out", "r2_in", "half", "tri_d",
    "tri_c0", "tri_s0", "tri_c1", "tri_s1", "tri_c2", "tri_s2",
    "tex_c", "tex_s", "inv_period", "phase", "phase2", "sharpness",
)  # fmt: skip
_COL = {name: k for k, name in enumerate(_COLUMNS)}


def shape_table(
    u: Tensor, area: tuple[float, float], center: tuple[float, float], periods: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """Per-shape geometry from ``(N, SHAPE_PARAMS)`` uniforms, computed in Python floats.

    Layout of ``u``: kind, texture, area, cy, cx, angle, ring inner ratio, period, texture angle, phase, second
    phase, sharpness, then two colours (6 numbers).

    Returns:
        ``(table, colours)``: float32 ``(N, len(_COLUMNS))`` (see ``_COLUMNS``) and RGB ``(N, 2, 3)``.
    """
    rows = []
    for r in u.tolist():
        kind = min(int(r[0] * len(OBJECT_SHAPES)), len(OBJECT_SHAPES) - 1)
        texture = min(int(r[1] * len(TEXTURES)), len(TEXTURES) - 1)
        a = flerp(r[2], area)
        angle, inner, period = 2 * math.pi * r[5], flerp(r[6], _RING_INNER), flerp(r[7], periods)
        if OBJECT_SHAPES[kind] == "ring":  # pi R^2 (1 - rho^2) = area
            r2_out = a / (math.pi * (1 - inner**2))
            r2_in = inner**2 * r2_out
        else:
            r2_out, r2_in = a / math.pi, -1.0
        circumradius = math.sqrt(4 * a / (3 * math.sqrt(3)))  # equilateral triangle: area = 3 sqrt(3) / 4 R^2
        thirds = [angle + 2 * math.pi * j / 3 for j in range(3)]  # normals of the sides, 120 degrees apart
        tex_angle = math.pi * r[8]
        rows.append(
            [
                kind, texture, flerp(r[3], center), flerp(r[4], center), math.cos(angle), math.sin(angle),
                r2_out, r2_in, math.sqrt(a) / 2, circumradius / 2,
                math.cos(thirds[0]), math.sin(thirds[0]), math.cos(thirds[1]), math.sin(thirds[1]),
                math.cos(thirds[2]), math.sin(thirds[2]),
                math.cos(tex_angle) / period, math.sin(tex_angle) / period, 1 / period, r[9], r[10],
                flerp(r[11], SHARPNESS),
            ]
        )  # fmt: skip
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, len(_COLUMNS))
    return table, random_colours(u[:, 12:18].reshape(-1, 2, 3))


def draw_shapes(shapes: tuple[Tensor, Tensor], coords: Tensor) -> tuple[Tensor, Tensor]:
    """Textured shapes, batched: pixels ``(N, 3, S, S)`` in ``[0, 1]`` and exact bool masks ``(N, S, S)``.

    Every shape kind and texture is evaluated for all ``N`` shapes and the drawn one selected, so a batch of mixed
    kinds costs a few dozen elementwise operations.

    Args:
        shapes: ``(table, colours)`` from :func:`shape_table`.
        coords: ``(S,)`` pixel centres in ``(0, 1)``.
    """
    table, colours = shapes
    col = {name: table[:, k, None, None] for name, k in _COL.items()}  # each (N, 1, 1)
    dx = coords[None, None, :] - col["cx"]  # (N, 1, S)
    dy = coords[None, :, None] - col["cy"]  # (N, S, 1)
    r2 = dx * dx + dy * dy  # (N, S, S)
    u = col["cos"] * dx + col["sin"] * dy
    v = col["cos"] * dy - col["sin"] * dx

    round_ = (r2 <= col["r2_out"]) & (r2 >= col["r2_in"])  # disc (r2_in = -1) and ring
    square = (u.abs() <= col["half"]) & (v.abs() <= col["half"])
    triangle = (col["tri_c0"] * dx + col["tri_s0"] * dy <= col["tri_d"]) & (
        col["tri_c1"] * dx + col["tri_s1"] * dy <= col["tri_d"]
    )
    triangle = triangle & (col["tri_c2"] * dx + col["tri_s2"] * dy <= col["tri_d"])
    kind = col["kind"]
    masks = torch.where(
        kind == OBJECT_SHAPES.index("square"),
        square,
        torch.where(kind == OBJECT_SHAPES.index("triangle"), triangle, round_),
    )

    along = _wave(col["tex_c"] * dx + col["tex_s"] * dy + col["phase"])
    across = _wave(col["tex_c"] * dy - col["tex_s"] * dx + col["phase2"])
    rings = _wave(torch.sqrt(r2) * col["inv_period"] + col["phase"])
    texture = col["texture"]
    signal = torch.where(
        texture == TEXTURES.index("checkerboard"),
        along * across,
        torch.where(texture == TEXTURES.index("stripes"), along, rings),
    )
    return _paint(_profile(signal, col["sharpness"])[:, None], colours), masks


def gratings(u: Tensor, coords: Tensor, periods: tuple[float, float]) -> Tensor:
    """Full-image colour gratings ``(N, 3, S, S)`` from ``(N, P)`` uniforms, ``P >= 11``.

    Layout of ``u``: two colours (6 numbers), period, direction, phase, blend threshold, sharpness, then the blend
    field's cells (the caller uses the threshold and the cells). The period is drawn from ``periods``; profile and
    colours follow the textures' distributions.
    """
    rows = []
    for r in u[:, :11].tolist():
        period, angle = flerp(r[6], periods), math.pi * r[7]
        rows.append([math.cos(angle) / period, math.sin(angle) / period, r[8], flerp(r[10], SHARPNESS)])
    p = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)[:, :, None, None]  # (N, 4, 1, 1)
    x, y = coords[None, None, :], coords[None, :, None]
    signal = _wave(p[:, 0] * x + p[:, 1] * y + p[:, 2])  # (N, S, S)
    return _paint(_profile(signal, p[:, 3])[:, None], random_colours(u[:, :6].reshape(-1, 2, 3)))
