"""Built-in datasets: procedurally generated shapes with exact object masks, and plain image folders.

* :class:`SyntheticShapes` -- one to three objects on textured backgrounds, deterministic per ``(seed, index)``,
  returning ``(image_or_views, mask)``; plugs into lightly's multi-view transforms.
* :class:`TexturedObjects` -- one textured object over clutter of matching contrast (no colour, contrast or
  position shortcut), deterministic per ``(seed, index)``, returning ``(image_or_views, mask)``;
  :class:`BackgroundSwapViews` gives self-supervised views that share the object over fresh clutter, returning
  ``(views, index)``.
* :class:`ImageFolder` -- a flat or nested folder of real photos, returning ``(image_or_views, index)``.
* :func:`find_image_files`, :func:`load_images` -- file, folder and glob handling shared with the CLI.

Modules: ``base`` (what the two synthetic datasets share: the constructor and its checks, indexing, the sample, the
probe, the held-out set, :func:`sample_seed`; the checks serve ``folder`` and ``views`` too), ``synthetic``,
``textured`` (with its private batched drawing, ``_texture_drawing``), ``views`` (:class:`BackgroundSwapViews`,
:func:`view_augmentation`) and ``folder``.
"""

from tsm_lightning.data._texture_drawing import OBJECT_SHAPES, TEXTURES
from tsm_lightning.data.base import HELDOUT_SEED_OFFSET, sample_seed
from tsm_lightning.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    find_image_files,
    load_image,
    load_images,
    open_rgb,
    resize_center_crop,
)
from tsm_lightning.data.synthetic import SHAPES, SyntheticObject, SyntheticShapes
from tsm_lightning.data.textured import TexturedObject, TexturedObjects
from tsm_lightning.data.views import BackgroundSwapViews, view_augmentation

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "IMAGE_EXTENSIONS",
    "OBJECT_SHAPES",
    "SHAPES",
    "TEXTURES",
    "BackgroundSwapViews",
    "ImageFolder",
    "SyntheticObject",
    "SyntheticShapes",
    "TexturedObject",
    "TexturedObjects",
    "find_image_files",
    "load_image",
    "load_images",
    "open_rgb",
    "resize_center_crop",
    "sample_seed",
    "view_augmentation",
]
