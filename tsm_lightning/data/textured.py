"""One textured object over clutter of matching contrast, with exact masks and background-swap views.

:class:`TexturedObjects` draws, on each ``S x S`` image, **one object** defined by its *shape* (disc, square,
triangle, ring; see :data:`OBJECT_SHAPES`) and its *texture* (checkerboard, stripes, concentric rings; see
:data:`TEXTURES`), over **clutter**: smooth colour noise, a patch of a broad colour grating, four small distractor
shapes of the same kinds and textures, and pixel noise. What tells the object apart is its shape, its size and the
scale of its texture (period 10-18 % of the image side; the distractors' textures are finer, 3.5-6 %, the
grating broader, 30-60 %), never its colour, contrast or position:

* **No colour shortcut.** The object's two texture colours are drawn from the same distribution as every clutter
  colour (grating colours, distractor colours, the cells of the colour noise), and never chosen to contrast with
  what they cover.
* **Matching contrast.** Grating and distractors are painted with the same two-colour profile (colours,
  amplitude, edge sharpness) as the object, and the pixel noise has the same level inside and outside the object.
  Edges are densest on the finely textured distractors, not on the object.
* **No position shortcut.** The object's centre is uniform over ``[0.05, 0.95]^2`` (the border may cut it).

Measured on 256 held-out images at 64 px (``tests/data/test_textured.py`` pins these with margins), with chance
(the mean mask area, what a random map scores) about 0.155: the pointing game of a filter-free colour-contrast map
(per-pixel colour distance from the image's median colour, blurred) is about 0.1, of an edge-density map about 0.03,
of a centre prior about 0.2 -- against 1.0 and 0.77 for the colour and edge maps on
:class:`~tsm_lightning.data.SyntheticShapes`. A model has to *learn* what the object is.

Every sample is a pure function of ``(seed, index)``, drawn with private ``torch.Generator`` s (the global random
state is never touched): one stream for the object, one for its canonical clutter. The drawing itself is batched
torch: all objects, distractors and gratings of a batch of images are rendered in a few tensor operations.

**Background swap** (:class:`BackgroundSwapViews`). For self-supervised training, the views of sample ``i`` share
the object's exact pixels and position, but each view gets freshly drawn clutter; each composite is then
augmented on its own (random-resized crop, flip, colour jitter, grayscale). This is the standard copy-paste /
background augmentation trick (e.g. Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method",
CVPR 2021; Zhao et al., "Distilling Localization for Self-Supervised Representation Learning", AAAI 2021;
Ryali et al., "Characterizing and Improving the Robustness of Self-Supervised Learning through Background
Augmentations", 2021): what the views have in common is the object, so a contrastive model learns the object
rather than the clutter. Without it (``swap=False``, every view of a sample cut from the same image), a model
trained on this data learns the clutter instead.

Held-out convention: a training set uses ``seed=s`` (default 0); its held-out evaluation set is
``TexturedObjects(num_samples=256, seed=s + HELDOUT_SEED_OFFSET)``, also returned by
:meth:`TexturedObjects.held_out`. Train with seeds below ``HELDOUT_SEED_OFFSET``.

Example:
    >>> train = BackgroundSwapViews(TexturedObjects(num_samples=2048, image_size=64))
    >>> views, index = train[0]                        # two augmented (3, 64, 64) views sharing the object
    >>> images, masks = train.dataset.held_out(256).probe(256)   # (256, 3, 64, 64) normalised, (256, 64, 64) bool
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tsm_lightning.data.base import (
    MaskedImages,
    _hsv_to_rgb,
    sample_seed,
)
from tsm_lightning.data.views import BackgroundSwapViews, view_augmentation

__all__ = [
    "OBJECT_SHAPES",
    "TEXTURES",
    "BackgroundSwapViews",
    "TexturedObject",
    "TexturedObjects",
    "view_augmentation",
]

OBJECT_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring")
"""Shapes of the object and of the distractors, each chosen with equal probability."""

TEXTURES: tuple[str, ...] = ("checkerboard", "stripes", "rings")
"""Two-colour textures of the object and of the distractors, each chosen with equal probability."""

NUM_DISTRACTORS: int = 4
"""Small, finely textured distractor shapes in the clutter of every image."""

NUM_GRATINGS: int = 1
"""Patches of broad colour gratings in the clutter of every image."""

# Sizes in units of the image side (the image spans [0, 1] x [0, 1]); areas as fractions of the image.
_OBJECT_AREA = (0.12, 0.25)
_DISTRACTOR_AREA = (0.012, 0.03)
_OBJECT_CENTER = (0.05, 0.95)  # the object's centre is uniform in this square (it may be cut by the border)
_OBJECT_PERIOD = (0.1, 0.18)  # texture periods: the object's scale lies between the distractors' and the grating's
_DISTRACTOR_PERIOD = (0.035, 0.06)
_GRATING_PERIOD = (0.3, 0.6)
_SHARPNESS = (1.0, 4.0)  # edge sharpness k of the texture profile clamp(0.5 + 0.5 k s, 0, 1)
_RING_INNER = (0.4, 0.6)  # inner / outer radius of a ring shape
_NOISE_SIGMA = (0.02, 0.05)  # pixel noise, the same level inside and outside the object
_NOISE_CELLS = 4  # the smooth colour noise is a bicubic upsampling of a 4 x 4 grid of colours
_BLEND_CELLS = 3  # each grating covers the regions where a 3 x 3 random field exceeds a threshold
_GRATING_THRESHOLD = (0.45, 0.65)  # a grating shows where its blend field exceeds this
_BLEND_SLOPE = 8.0  # softness of a grating patch's edge: weight = clamp(0.5 + slope (field - threshold), 0, 1)
_CHUNK = 64  # images rendered per batched call (bounds the memory of the per-shape grids)
_CLUTTER_STREAM = 0x636C7574746572  # mixes the canonical clutter's seed out of the object's

# Layout of the uniform numbers drawn per shape (object or distractor): see _draw_shapes.
_SHAPE_PARAMS = 18
# Layout of the uniform numbers drawn per grating: see _gratings.
_GRATING_PARAMS = 11 + _BLEND_CELLS**2


@dataclass(frozen=True)
class TexturedObject:
    """Parameters of the object of one sample, in units of the image side (the image spans ``[0, 1]^2``).

    Attributes:
        kind: One of :data:`OBJECT_SHAPES`.
        texture: One of :data:`TEXTURES`.
        center: ``(y, x)`` of the object's centre; the object may be cut by the image border.
        area: Area of the full shape as a fraction of the image (the mask is smaller when the border cuts it).
        angle: Rotation of the shape, radians.
        texture_angle: Orientation of the texture, radians.
        period: Texture period.
        sharpness: Edge sharpness ``k`` of the texture profile ``clamp(0.5 + 0.5 k s, 0, 1)``, ``s`` a triangle wave.
        colors: The texture's two RGB colours in ``[0, 1]``.
        noise_sigma: Standard deviation of the pixel noise of the whole image.
    """

    kind: str
    texture: str
    center: tuple[float, float]
    area: float
    angle: float
    texture_angle: float
    period: float
    sharpness: float
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    noise_sigma: float


class TexturedObjects(MaskedImages):
    """Images of one textured object over clutter of matching contrast, with the object's exact mask.

    See the module docstring for what is drawn and why no colour, contrast or position shortcut finds the object.

    Args:
        num_samples: Number of samples (the dataset's length), at least 1.
        image_size: Side ``S`` of the square images, at least 32 (textures need a few pixels per period).
        seed: Dataset seed; sample ``i`` depends only on ``(seed, i)`` and ``image_size``. See the module
            docstring for the held-out convention.
        transform: Optional callable applied to the sample's ``PIL.Image`` (RGB, ``S x S``). For self-supervised
            training use :class:`BackgroundSwapViews` instead, which gives each view fresh clutter.
        normalize: Without a transform, whether images are ImageNet-normalised (mean ``IMAGENET_MEAN``, std
            ``IMAGENET_STD``) or left in ``[0, 1]``. Ignored when a transform is given (the transform decides).

    Raises:
        ValueError: If ``num_samples < 1``, ``image_size < 32``, ``seed`` is not an int or ``transform`` is not
            callable.

    ``dataset[i]`` returns ``(x, mask)``: ``x`` is the float ``(3, S, S)`` image without a transform, else
    ``transform(pil_image)``; ``mask`` is the bool ``(S, S)`` mask of the object's pixels in the un-transformed
    image. Both collate with the default ``DataLoader`` collate function.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        normalize: bool = True,
    ) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an int >= 1, got {num_samples!r}.")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
            raise ValueError(f"`image_size` must be an int >= 32 (textures need room to be drawn), got {image_size!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        if transform is not None and not callable(transform):
            raise ValueError(f"`transform` must be callable or None, got {type(transform).__name__}.")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.normalize = normalize
        self._coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size  # pixel centres in (0, 1)

    # ------------------------------------------------------------------------------------------------ public helpers

    def render(self, index: int, clutter: bool = True) -> tuple[Tensor, Tensor]:
        """Draw sample ``index`` with its canonical clutter.

        Args:
            index: Sample index; negative indices count from the end.
            clutter: If False, draw the same object (same colours, no pixel noise) on black, so that the mask
                equals the non-zero pixels.

        Returns:
            ``(image, mask)``: float ``(3, S, S)`` in ``[0, 1]`` and bool ``(S, S)``.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        i = self._check_index(index)
        if not clutter:
            pixels, mask, _ = self._objects([i], noise=False)
            return torch.where(mask[:, None], pixels, torch.zeros_like(pixels))[0], mask[0]
        images, masks = self._render([i], [self._canonical_clutter_seed(i)])
        return images[0], masks[0]

    def render_views(self, index: int, clutter_seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Draw sample ``index``'s object over freshly drawn clutter, once per clutter seed (batched).

        The object's pixels (texture, colours and pixel noise) and position are identical in every view; only
        the clutter outside the mask changes.

        Args:
            index: Sample index; negative indices count from the end.
            clutter_seeds: ``K >= 1`` ints, each seeding the private generator of one view's clutter.

        Returns:
            ``(images, mask)``: float ``(K, 3, S, S)`` in ``[0, 1]`` and the bool ``(S, S)`` mask shared by all.

        Raises:
            IndexError: If ``index`` is out of range.
            ValueError: If ``clutter_seeds`` is empty or holds non-ints.
        """
        i = self._check_index(index)
        seeds = list(clutter_seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"`clutter_seeds` must be a non-empty sequence of ints, got {clutter_seeds!r}.")
        images, masks = self._render([i] * len(seeds), seeds)
        return images, masks[0]

    def object(self, index: int) -> TexturedObject:
        """Parameters of sample ``index``'s object.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        u = self._object_uniforms(self._check_index(index))
        r = u.tolist()
        _, colours = _shape_table(u[None, :_SHAPE_PARAMS], _OBJECT_AREA, _OBJECT_CENTER, _OBJECT_PERIOD)
        c = colours[0].tolist()
        return TexturedObject(
            kind=OBJECT_SHAPES[min(int(r[0] * len(OBJECT_SHAPES)), len(OBJECT_SHAPES) - 1)],
            texture=TEXTURES[min(int(r[1] * len(TEXTURES)), len(TEXTURES) - 1)],
            center=(_flerp(r[3], _OBJECT_CENTER), _flerp(r[4], _OBJECT_CENTER)),
            area=_flerp(r[2], _OBJECT_AREA),
            angle=2 * math.pi * r[5],
            texture_angle=math.pi * r[8],
            period=_flerp(r[7], _OBJECT_PERIOD),
            sharpness=_flerp(r[11], _SHARPNESS),
            colors=(tuple(c[0]), tuple(c[1])),  # type: ignore[arg-type]
            noise_sigma=_flerp(r[_SHAPE_PARAMS], _NOISE_SIGMA),
        )

    # ------------------------------------------------------------------------------------------------------ drawing

    def _render_range(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Samples ``start, ..., stop - 1`` with their canonical clutter, drawn in batches of ``_CHUNK``."""
        indices = list(range(start, stop))
        return self._render_chunked(indices, [self._canonical_clutter_seed(i) for i in indices])

    def _canonical_clutter_seed(self, index: int) -> int:
        return sample_seed(sample_seed(self.seed, index), _CLUTTER_STREAM)

    def _object_uniforms(self, index: int) -> Tensor:
        """The object stream's uniforms: shape parameters, then the noise level. ``(_SHAPE_PARAMS + 1,)``."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, index))
        return torch.rand(_SHAPE_PARAMS + 1, generator=g)

    def _objects(self, indices: list[int], noise: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Objects of the samples: pixels ``(B, 3, S, S)`` (noise added, clamped), masks ``(B, S, S)``, sigmas ``(B,)``.

        The object stream draws its uniforms first, then its pixel noise, so the noise never changes the shape.
        """
        s = self.image_size
        uniforms, noises = [], []
        for i in indices:
            g = torch.Generator().manual_seed(sample_seed(self.seed, i))
            uniforms.append(torch.rand(_SHAPE_PARAMS + 1, generator=g))
            noises.append(torch.randn(3, s, s, generator=g) if noise else torch.zeros(3, s, s))
        u = torch.stack(uniforms)
        sigma = _lerp(u[:, _SHAPE_PARAMS], _NOISE_SIGMA)
        table = _shape_table(u[:, :_SHAPE_PARAMS], _OBJECT_AREA, _OBJECT_CENTER, _OBJECT_PERIOD)
        pixels, masks = _draw_shapes(table, self._coords)
        pixels = (pixels + sigma[:, None, None, None] * torch.stack(noises)).clamp(0.0, 1.0)
        return pixels, masks, sigma

    def _clutter(self, seeds: list[int], sigma: Tensor) -> Tensor:
        """Clutter images ``(B, 3, S, S)`` in ``[0, 1]``, one per seed, with pixel noise of level ``sigma (B,)``."""
        s, b = self.image_size, len(seeds)
        n_cells = 3 * _NOISE_CELLS**2
        n_gratings = NUM_GRATINGS * _GRATING_PARAMS
        uniforms, noises = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            uniforms.append(torch.rand(n_cells + n_gratings + NUM_DISTRACTORS * _SHAPE_PARAMS, generator=g))
            noises.append(torch.randn(3, s, s, generator=g))
        u = torch.stack(uniforms)  # (B, uniforms per image)

        # Smooth colour noise: a grid of random colours, upsampled bicubically.
        cells = _random_colours(u[:, :n_cells].reshape(b, _NOISE_CELLS**2, 3))  # (B, cells^2, 3)
        grid = cells.transpose(1, 2).reshape(b, 3, _NOISE_CELLS, _NOISE_CELLS)
        image = F.interpolate(grid, size=(s, s), mode="bicubic", align_corners=True).clamp(0.0, 1.0)

        # Patches of colour gratings: stripes with the textures' colours, periods and profile, blended in where a
        # smooth random field exceeds a threshold.
        gu = u[:, n_cells : n_cells + n_gratings].reshape(b * NUM_GRATINGS, _GRATING_PARAMS)
        grating = _gratings(gu, self._coords)  # (BG, 3, S, S)
        field = gu[:, _GRATING_PARAMS - _BLEND_CELLS**2 :].reshape(-1, 1, _BLEND_CELLS, _BLEND_CELLS)
        field = F.interpolate(field, size=(s, s), mode="bicubic", align_corners=True)
        threshold = _lerp(gu[:, 9], _GRATING_THRESHOLD)[:, None, None, None]
        weight = (0.5 + _BLEND_SLOPE * (field - threshold)).clamp(0.0, 1.0)  # (BG, 1, S, S)
        grating = grating.reshape(b, NUM_GRATINGS, 3, s, s)
        weight = weight.reshape(b, NUM_GRATINGS, 1, s, s)
        for k in range(NUM_GRATINGS):
            image = image + weight[:, k] * (grating[:, k] - image)

        # Distractors: smaller textured shapes of the object's kinds and textures, painted in order.
        du = u[:, n_cells + n_gratings :].reshape(b * NUM_DISTRACTORS, _SHAPE_PARAMS)
        pixels, masks = _draw_shapes(_shape_table(du, _DISTRACTOR_AREA, (0.0, 1.0), _DISTRACTOR_PERIOD), self._coords)
        pixels = pixels.reshape(b, NUM_DISTRACTORS, 3, s, s)
        masks = masks.reshape(b, NUM_DISTRACTORS, 1, s, s)
        for k in range(NUM_DISTRACTORS):
            image = torch.where(masks[:, k], pixels[:, k], image)

        return (image + sigma[:, None, None, None] * torch.stack(noises)).clamp(0.0, 1.0)

    def _render_chunked(self, indices: list[int], clutter_seeds: list[int]) -> tuple[Tensor, Tensor]:
        """:meth:`_render` in calls of at most ``_CHUNK`` images: bounded memory, the same result as one call."""
        chunks = [
            self._render(indices[start : start + _CHUNK], clutter_seeds[start : start + _CHUNK])
            for start in range(0, len(indices), _CHUNK)
        ]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _render(self, indices: list[int], clutter_seeds: list[int]) -> tuple[Tensor, Tensor]:
        """Composite ``(B, 3, S, S)`` images and ``(B, S, S)`` masks: object ``indices[b]`` over clutter ``b``."""
        unique = sorted(set(indices))
        pixels, masks, sigma = self._objects(unique)
        rows = torch.tensor([unique.index(i) for i in indices])
        pixels, masks, sigma = pixels[rows], masks[rows], sigma[rows]
        clutter = self._clutter(clutter_seeds, sigma)
        return torch.where(masks[:, None], pixels, clutter), masks


# ---------------------------------------------------------------------------------------------------- batched maths
#
# Determinism across batch composition: a sample must come out bit-identical whether it is drawn alone or in a
# batch. Elementwise transcendental kernels (sin, tanh, ...) may round differently in their vectorised body and
# their scalar tail, whose split depends on the tensor's size, so the per-pixel maths below uses only +, -, *, /,
# sqrt, floor, abs, comparisons and clamps (exact in IEEE arithmetic, whatever the code path); trigonometry is done
# once per shape, in Python floats. Textures are triangle waves, not sines.


def _lerp(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _flerp(u: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _random_colours(u: Tensor) -> Tensor:
    """The one colour distribution of the dataset: ``(..., 3)`` uniforms to ``(..., 3)`` RGB in ``[0, 1]``.

    Hue uniform, saturation in ``[0.2, 1]``, value in ``[0.25, 1]``. Objects, distractors, gratings and the colour
    noise all draw from it, so colour alone never tells the object apart.
    """
    hsv = torch.stack([u[..., 0], _lerp(u[..., 1], (0.2, 1.0)), _lerp(u[..., 2], (0.25, 1.0))], dim=-1)
    return _hsv_to_rgb(hsv)


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


# Columns of the table _shape_table builds, one row per shape.
_COLUMNS = (
    "kind", "texture", "cy", "cx", "cos", "sin", "r2_out", "r2_in", "half", "tri_d",
    "tri_c0", "tri_s0", "tri_c1", "tri_s1", "tri_c2", "tri_s2",
    "tex_c", "tex_s", "inv_period", "phase", "phase2", "sharpness",
)  # fmt: skip
_COL = {name: k for k, name in enumerate(_COLUMNS)}


def _shape_table(
    u: Tensor, area: tuple[float, float], center: tuple[float, float], periods: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """Per-shape geometry from ``(N, _SHAPE_PARAMS)`` uniforms, computed in Python floats.

    Layout of ``u``: kind, texture, area, cy, cx, angle, ring inner ratio, period, texture angle, phase, second
    phase, sharpness, then two colours (6 numbers).

    Returns:
        ``(table, colours)``: float32 ``(N, len(_COLUMNS))`` (see ``_COLUMNS``) and RGB ``(N, 2, 3)``.
    """
    rows = []
    for r in u.tolist():
        kind = min(int(r[0] * len(OBJECT_SHAPES)), len(OBJECT_SHAPES) - 1)
        texture = min(int(r[1] * len(TEXTURES)), len(TEXTURES) - 1)
        a = _flerp(r[2], area)
        angle, inner, period = 2 * math.pi * r[5], _flerp(r[6], _RING_INNER), _flerp(r[7], periods)
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
                kind, texture, _flerp(r[3], center), _flerp(r[4], center), math.cos(angle), math.sin(angle),
                r2_out, r2_in, math.sqrt(a) / 2, circumradius / 2,
                math.cos(thirds[0]), math.sin(thirds[0]), math.cos(thirds[1]), math.sin(thirds[1]),
                math.cos(thirds[2]), math.sin(thirds[2]),
                math.cos(tex_angle) / period, math.sin(tex_angle) / period, 1 / period, r[9], r[10],
                _flerp(r[11], _SHARPNESS),
            ]
        )  # fmt: skip
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, len(_COLUMNS))
    return table, _random_colours(u[:, 12:18].reshape(-1, 2, 3))


def _draw_shapes(shapes: tuple[Tensor, Tensor], coords: Tensor) -> tuple[Tensor, Tensor]:
    """Textured shapes, batched: pixels ``(N, 3, S, S)`` in ``[0, 1]`` and exact bool masks ``(N, S, S)``.

    Every shape kind and texture is evaluated for all ``N`` shapes and the drawn one selected, so a batch of mixed
    kinds costs a few dozen elementwise operations.

    Args:
        shapes: ``(table, colours)`` from :func:`_shape_table`.
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


def _gratings(u: Tensor, coords: Tensor) -> Tensor:
    """Full-image colour gratings ``(N, 3, S, S)`` from ``(N, _GRATING_PARAMS)`` uniforms.

    Layout of ``u``: two colours (6 numbers), period, direction, phase, blend threshold, sharpness, then the blend
    field's cells (the caller uses the threshold and the cells). Period, profile and colours follow the textures'
    distributions.
    """
    rows = []
    for r in u[:, :11].tolist():
        period, angle = _flerp(r[6], _GRATING_PERIOD), math.pi * r[7]
        rows.append([math.cos(angle) / period, math.sin(angle) / period, r[8], _flerp(r[10], _SHARPNESS)])
    p = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)[:, :, None, None]  # (N, 4, 1, 1)
    x, y = coords[None, None, :], coords[None, :, None]
    signal = _wave(p[:, 0] * x + p[:, 1] * y + p[:, 2])  # (N, S, S)
    return _paint(_profile(signal, p[:, 3])[:, None], _random_colours(u[:, :6].reshape(-1, 2, 3)))
