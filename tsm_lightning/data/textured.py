"""One textured object over clutter of matching contrast, with exact masks and background-swap views.

:class:`TexturedObjects` draws, on each ``S x S`` image, **one object** defined by its *shape* (disc, square,
triangle, ring; see :data:`~tsm_lightning.data.OBJECT_SHAPES`) and its *texture* (checkerboard, stripes, concentric
rings; see :data:`~tsm_lightning.data.TEXTURES`), over **clutter**: smooth colour noise, a patch of a broad colour
grating, four small distractor shapes of the same kinds and textures, and pixel noise. What tells the object apart
is its shape, its size and the scale of its texture (period 10-18 % of the image side; the distractors' textures are
finer, 3.5-6 %, the grating broader, 30-60 %), never its colour, contrast or position:

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
torch: all objects, distractors and gratings of a batch of images are rendered in a few tensor operations
(:mod:`tsm_lightning.data._texture_drawing`, which also defines :data:`OBJECT_SHAPES` and :data:`TEXTURES`).

**Background swap** (:class:`~tsm_lightning.data.BackgroundSwapViews`). For self-supervised training, the views of
sample ``i`` share the object's exact pixels and position, but each view gets freshly drawn clutter; each composite is
then augmented on its own (random-resized crop, flip, colour jitter, grayscale). This is the standard copy-paste /
background augmentation trick (e.g. Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method",
CVPR 2021; Zhao et al., "Distilling Localization for Self-Supervised Representation Learning", AAAI 2021;
Ryali et al., "Characterizing and Improving the Robustness of Self-Supervised Learning through Background
Augmentations", 2021): what the views have in common is the object, so a contrastive model learns the object
rather than the clutter. Without it (``swap=False``, every view of a sample cut from the same image), a model
trained on this data learns the clutter instead. :class:`~tsm_lightning.data.BackgroundSwapViews` and its default
per-view transform :func:`~tsm_lightning.data.view_augmentation` are defined in :mod:`tsm_lightning.data.views`.

Held-out convention: a training set uses ``seed=s`` (default 0); its held-out evaluation set is
``TexturedObjects(num_samples=256, seed=s + HELDOUT_SEED_OFFSET)``, also returned by
:meth:`TexturedObjects.held_out`. Train with seeds below ``HELDOUT_SEED_OFFSET``.

Example:
    >>> from tsm_lightning.data import BackgroundSwapViews, TexturedObjects
    >>> train = BackgroundSwapViews(TexturedObjects(num_samples=2048, image_size=64))
    >>> views, index = train[0]                        # two augmented (3, 64, 64) views sharing the object
    >>> images, masks = train.dataset.held_out(256).probe(256)   # (256, 3, 64, 64) normalised, (256, 64, 64) bool
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tsm_lightning.data._texture_drawing import (
    OBJECT_SHAPES,
    SHAPE_PARAMS,
    SHARPNESS,
    TEXTURES,
    draw_shapes,
    flerp,
    gratings,
    lerp,
    random_colours,
    shape_table,
)
from tsm_lightning.data.base import MaskedImages, sample_seed

__all__ = ["TexturedObject", "TexturedObjects"]

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
_NOISE_SIGMA = (0.02, 0.05)  # pixel noise, the same level inside and outside the object
_NOISE_CELLS = 4  # the smooth colour noise is a bicubic upsampling of a 4 x 4 grid of colours
_BLEND_CELLS = 3  # each grating covers the regions where a 3 x 3 random field exceeds a threshold
_GRATING_THRESHOLD = (0.45, 0.65)  # a grating shows where its blend field exceeds this
_BLEND_SLOPE = 8.0  # softness of a grating patch's edge: weight = clamp(0.5 + slope (field - threshold), 0, 1)
_CHUNK = 64  # images rendered per batched call (bounds the memory of the per-shape grids)
_CLUTTER_STREAM = 0x636C7574746572  # mixes the canonical clutter's seed out of the object's

# Layout of the uniform numbers drawn per grating: see _texture_drawing.gratings.
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
            training use :class:`~tsm_lightning.data.BackgroundSwapViews` instead, which gives each view fresh clutter.
        normalize: Without a transform, whether images are ImageNet-normalised (mean ``IMAGENET_MEAN``, std
            ``IMAGENET_STD``) or left in ``[0, 1]``. Ignored when a transform is given (the transform decides).

    Raises:
        ValueError: If ``num_samples < 1``, ``image_size < 32``, ``seed`` is not an int or ``transform`` is not
            callable.

    ``dataset[i]`` returns ``(x, mask)``: ``x`` is the float ``(3, S, S)`` image without a transform, else
    ``transform(pil_image)``; ``mask`` is the bool ``(S, S)`` mask of the object's pixels in the un-transformed
    image. Both collate with the default ``DataLoader`` collate function.
    """

    # The object's texture period is 10-18 % of the side: at 32 px that is 3.2-5.8 pixels, above the 2-pixel limit
    # (Nyquist) under which a texture aliases into another scale; at 16 px a third of the objects' textures would
    # alias. (The distractors' finer textures need 57 px; the default is 64.)
    min_image_size = 32
    min_image_size_reason = "textures need a few pixels per period"

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
        _, colours = shape_table(u[None, :SHAPE_PARAMS], _OBJECT_AREA, _OBJECT_CENTER, _OBJECT_PERIOD)
        c = colours[0].tolist()
        return TexturedObject(
            kind=OBJECT_SHAPES[min(int(r[0] * len(OBJECT_SHAPES)), len(OBJECT_SHAPES) - 1)],
            texture=TEXTURES[min(int(r[1] * len(TEXTURES)), len(TEXTURES) - 1)],
            center=(flerp(r[3], _OBJECT_CENTER), flerp(r[4], _OBJECT_CENTER)),
            area=flerp(r[2], _OBJECT_AREA),
            angle=2 * math.pi * r[5],
            texture_angle=math.pi * r[8],
            period=flerp(r[7], _OBJECT_PERIOD),
            sharpness=flerp(r[11], SHARPNESS),
            colors=(tuple(c[0]), tuple(c[1])),
            noise_sigma=flerp(r[SHAPE_PARAMS], _NOISE_SIGMA),
        )

    # ------------------------------------------------------------------------------------------------------ drawing

    def _render_range(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Samples ``start, ..., stop - 1`` with their canonical clutter, drawn in batches of ``_CHUNK``."""
        indices = list(range(start, stop))
        return self._render_chunked(indices, [self._canonical_clutter_seed(i) for i in indices])

    def _canonical_clutter_seed(self, index: int) -> int:
        return sample_seed(sample_seed(self.seed, index), _CLUTTER_STREAM)

    def _object_uniforms(self, index: int) -> Tensor:
        """The object stream's uniforms: shape parameters, then the noise level. ``(SHAPE_PARAMS + 1,)``."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, index))
        return torch.rand(SHAPE_PARAMS + 1, generator=g)

    def _objects(self, indices: list[int], noise: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Objects of the samples: pixels ``(B, 3, S, S)`` (noise added, clamped), masks ``(B, S, S)``, sigmas ``(B,)``.

        The object stream draws its uniforms first, then its pixel noise, so the noise never changes the shape.
        """
        s = self.image_size
        uniforms, noises = [], []
        for i in indices:
            g = torch.Generator().manual_seed(sample_seed(self.seed, i))
            uniforms.append(torch.rand(SHAPE_PARAMS + 1, generator=g))
            noises.append(torch.randn(3, s, s, generator=g) if noise else torch.zeros(3, s, s))
        u = torch.stack(uniforms)
        sigma = lerp(u[:, SHAPE_PARAMS], _NOISE_SIGMA)
        table = shape_table(u[:, :SHAPE_PARAMS], _OBJECT_AREA, _OBJECT_CENTER, _OBJECT_PERIOD)
        pixels, masks = draw_shapes(table, self.pixel_centres)
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
            uniforms.append(torch.rand(n_cells + n_gratings + NUM_DISTRACTORS * SHAPE_PARAMS, generator=g))
            noises.append(torch.randn(3, s, s, generator=g))
        u = torch.stack(uniforms)  # (B, uniforms per image)

        # Smooth colour noise: a grid of random colours, upsampled bicubically.
        cells = random_colours(u[:, :n_cells].reshape(b, _NOISE_CELLS**2, 3))  # (B, cells^2, 3)
        grid = cells.transpose(1, 2).reshape(b, 3, _NOISE_CELLS, _NOISE_CELLS)
        image = F.interpolate(grid, size=(s, s), mode="bicubic", align_corners=True).clamp(0.0, 1.0)

        # Patches of colour gratings: stripes with the textures' colours, periods and profile, blended in where a
        # smooth random field exceeds a threshold.
        gu = u[:, n_cells : n_cells + n_gratings].reshape(b * NUM_GRATINGS, _GRATING_PARAMS)
        grating = gratings(gu, self.pixel_centres, _GRATING_PERIOD)  # (BG, 3, S, S)
        field = gu[:, _GRATING_PARAMS - _BLEND_CELLS**2 :].reshape(-1, 1, _BLEND_CELLS, _BLEND_CELLS)
        field = F.interpolate(field, size=(s, s), mode="bicubic", align_corners=True)
        threshold = lerp(gu[:, 9], _GRATING_THRESHOLD)[:, None, None, None]
        weight = (0.5 + _BLEND_SLOPE * (field - threshold)).clamp(0.0, 1.0)  # (BG, 1, S, S)
        grating = grating.reshape(b, NUM_GRATINGS, 3, s, s)
        weight = weight.reshape(b, NUM_GRATINGS, 1, s, s)
        for k in range(NUM_GRATINGS):
            image = image + weight[:, k] * (grating[:, k] - image)

        # Distractors: smaller textured shapes of the object's kinds and textures, painted in order.
        du = u[:, n_cells + n_gratings :].reshape(b * NUM_DISTRACTORS, SHAPE_PARAMS)
        table = shape_table(du, _DISTRACTOR_AREA, (0.0, 1.0), _DISTRACTOR_PERIOD)
        pixels, masks = draw_shapes(table, self.pixel_centres)
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
