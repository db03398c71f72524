"""Self-supervised views of :class:`~tsm_lightning.data.TexturedObjects`: background swap and the view augmentation.

* :class:`BackgroundSwapViews` -- sample ``i`` gives ``K`` views that share the object's exact pixels, each over
  freshly drawn clutter, then augmented on its own; returns ``(views, index)``. Why this makes a contrastive model
  learn the object rather than the clutter: see the module docstring of :mod:`tsm_lightning.data.textured`.
* :func:`view_augmentation` -- the SimCLR-style per-view augmentation used by default (no blur).

Example:
    >>> from tsm_lightning.data import BackgroundSwapViews, TexturedObjects
    >>> train = BackgroundSwapViews(TexturedObjects(num_samples=2048, image_size=64))
    >>> views, index = train[0]                        # two augmented (3, 64, 64) views sharing the object
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from tsm_lightning.data.base import check_int, to_pil

if TYPE_CHECKING:
    from tsm_lightning.data.textured import TexturedObjects

__all__ = ["BackgroundSwapViews", "view_augmentation"]


class BackgroundSwapViews(Dataset):
    """Multi-view wrapper for self-supervised training: the views share the object, each over fresh clutter.

    Sample ``i`` gives ``K`` views. With ``swap=True`` (the default) each view is the object of
    ``dataset[i]`` -- its exact pixels, at its exact position -- pasted over clutter drawn afresh for that view
    (a copy-paste / background augmentation, see :mod:`tsm_lightning.data.textured`); with ``swap=False`` every
    view starts from the same image ``dataset.render(i)``, as in ordinary self-supervised pipelines. Each composite
    is then converted to a ``PIL.Image`` and passed through its view transform (random-resized crop, flip, colour
    jitter, grayscale, normalisation: :func:`view_augmentation` by default, or lightly's per-view transforms).

    Like any augmentation, the fresh clutter is random: its seeds are drawn from torch's global RNG (one
    ``torch.randint`` per sample), which Lightning's ``seed_everything(workers=True)`` and the ``DataLoader``
    seed per worker, so a seeded run is reproducible and workers draw different clutter. The wrapped dataset itself
    never touches the global RNG.

    Args:
        dataset: The :class:`~tsm_lightning.data.TexturedObjects` providing objects and clutter (its own
            ``transform`` is not used).
        transform: One view transform for every view, or a sequence of per-view transforms (for example
            ``lightly.transforms.SimCLRTransform(input_size=64).transforms``; SwAV's multi-crop works the same way).
            Each receives an RGB ``PIL.Image`` and returns a ``(3, h, w)`` tensor. Default:
            ``view_augmentation(dataset.image_size)``.
        num_views: Number of views ``K`` when ``transform`` is a single callable (default 2). With a sequence of
            transforms, ``K`` is its length and ``num_views`` must be None or equal to it.
        swap: Draw fresh clutter for every view (True) or reuse the sample's canonical clutter (False).

    Raises:
        ValueError: If ``dataset`` cannot render swapped views, a transform is not callable, or ``num_views`` is
            not a positive int or disagrees with the number of transforms.

    ``views, index = wrapper[i]``: ``views`` is a list of ``K`` tensors, ``index`` the int ``i``. No mask is
    returned: the views are cropped and flipped, so the dataset's mask would not describe them; use
    ``dataset.probe(n)`` or ``dataset.held_out().probe(n)`` for images with masks. Collates with the default
    ``DataLoader`` collate function into ``([(B, 3, h, w)] * K, (B,) indices)``, the batch layout lightly's
    examples unpack as ``(x0, x1), _ = batch``.
    """

    def __init__(
        self,
        dataset: TexturedObjects,
        transform: Callable[[Image.Image], Tensor] | Sequence[Callable[[Image.Image], Tensor]] | None = None,
        num_views: int | None = None,
        swap: bool = True,
    ) -> None:
        if not callable(getattr(dataset, "render_views", None)) or not callable(getattr(dataset, "render", None)):
            raise ValueError(
                f"`dataset` must provide render() and render_views() (a TexturedObjects), got {type(dataset).__name__}."
            )
        if num_views is not None:
            check_int(num_views, "num_views", 1)
        if transform is None:
            transform = view_augmentation(dataset.image_size)
        if callable(transform):
            transforms = [transform] * (2 if num_views is None else num_views)
        elif isinstance(transform, Sequence) and not isinstance(transform, str) and len(transform) > 0:
            transforms = list(transform)
            if not all(callable(t) for t in transforms):
                bad = next(type(t).__name__ for t in transforms if not callable(t))
                raise ValueError(f"every per-view transform must be callable, got a {bad}.")
            if num_views is not None and num_views != len(transforms):
                raise ValueError(f"`num_views`={num_views} disagrees with the {len(transforms)} per-view transforms.")
        else:
            raise ValueError(
                "`transform` must be a callable, a non-empty sequence of callables or None, "
                f"got {type(transform).__name__}."
            )
        self.dataset = dataset
        self.transforms = transforms
        self.swap = bool(swap)

    @property
    def num_views(self) -> int:
        """Number of views ``K`` per sample."""
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, num_views={self.num_views}, swap={self.swap})"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[Tensor], int]:
        """Views of sample ``index`` and the index: ``([K tensors (3, h, w)], index)``, see the class docstring.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[list[Tensor], int]]:
        """``[self[i] for i in indices]``, with the objects and clutter of the whole batch drawn in batched calls.

        ``DataLoader``'s default fetcher calls this with a batch's indices. The random draws differ from calling
        ``__getitem__`` in a loop (all clutter seeds first, then the transforms), but are just as reproducible.

        Raises:
            IndexError: If an index is out of range.
        """
        rows = [self.dataset._check_index(i) for i in indices]
        if not rows:
            return []
        k = self.num_views
        if self.swap:
            seeds = torch.randint(0, 2**63 - 1, (len(rows), k), dtype=torch.int64).tolist()
            flat_rows = [i for i in rows for _ in range(k)]
            flat_seeds = [seed for row in seeds for seed in row]
            composites = self.dataset._render_chunked(flat_rows, flat_seeds)[0]
            composites = composites.reshape(len(rows), k, *composites.shape[1:])
        else:
            canonical = [self.dataset._canonical_clutter_seed(i) for i in rows]
            images = self.dataset._render_chunked(rows, canonical)[0]
            composites = images[:, None].expand(-1, k, -1, -1, -1)
        return [
            ([t(to_pil(c)) for t, c in zip(self.transforms, views, strict=True)], i)
            for views, i in zip(composites, rows, strict=True)
        ]


def view_augmentation(
    image_size: int,
    min_scale: float = 0.25,
    jitter: float = 0.4,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    normalize: bool = True,
) -> Callable[[Image.Image | Tensor], Tensor]:
    """SimCLR-style per-view augmentation built from torchvision's v2 transforms.

    Random-resized crop to ``image_size`` (scale ``[min_scale, 1]``), horizontal flip, colour jitter (brightness,
    contrast and saturation ``jitter``, hue ``jitter / 4``) with probability ``jitter_prob``, grayscale with
    probability ``grayscale_prob``, then float conversion and ImageNet normalisation. No blur: at 64 px it would
    erase the textures.

    Args:
        image_size: Output side, pixels (at least 1).
        min_scale: Smallest crop area as a fraction of the image, in ``(0, 1]``.
        jitter: Colour jitter strength, at least 0.
        jitter_prob: Probability of colour jitter, in ``[0, 1]``.
        grayscale_prob: Probability of grayscale conversion, in ``[0, 1]``.
        normalize: ImageNet-normalise (True) or leave values in ``[0, 1]``.

    Returns:
        A callable mapping an RGB ``PIL.Image`` (or a ``(3, H, W)`` uint8/float tensor) to a float
        ``(3, image_size, image_size)`` tensor. It draws from torch's global RNG, like every torchvision transform.

    Raises:
        ValueError: If an argument is out of range.
    """
    from torchvision.transforms import v2

    check_int(image_size, "image_size", 1)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"`min_scale` must lie in (0, 1], got {min_scale!r}.")
    if jitter < 0:
        raise ValueError(f"`jitter` must be >= 0, got {jitter!r}.")
    for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1], got {p!r}.")
    steps: list[Callable] = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 4))], p=jitter_prob),
        v2.RandomGrayscale(p=grayscale_prob),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if normalize:
        steps.append(v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
