"""What the built-in synthetic datasets share: the :class:`MaskedImages` base class and its helpers.

* :class:`MaskedImages` -- indexing, the ``(x, mask)`` sample, the PIL view, the probe batch, the held-out set;
  :class:`~tsm_lightning.data.SyntheticShapes` and :class:`~tsm_lightning.data.TexturedObjects` derive from it and
  only validate their arguments and draw.
* :func:`sample_seed` -- the SplitMix64 mix of ``(seed, index)`` that seeds each sample's private generator.
* :data:`HELDOUT_SEED_OFFSET` -- the held-out convention: a training set with seed ``s`` is evaluated on seed
  ``s + HELDOUT_SEED_OFFSET``.
* :func:`check_int`, :func:`check_transform` -- the constructor checks of every built-in dataset (this class's and
  :class:`~tsm_lightning.data.ImageFolder`'s), written once.
* Pixel helpers the datasets and views share: :func:`hsv_to_rgb`, :func:`to_pil`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HELDOUT_SEED_OFFSET", "MaskedImages", "check_int", "check_transform", "hsv_to_rgb", "sample_seed", "to_pil"]

HELDOUT_SEED_OFFSET: int = 1_000_000
"""The held-out set of a training set with seed ``s`` uses seed ``s + HELDOUT_SEED_OFFSET``."""


def check_int(value: object, name: str, minimum: int | None = None, why: str = "") -> int:
    """Return ``value`` if it is an ``int`` (a ``bool`` is not a count) of at least ``minimum``, else raise.

    Args:
        value: the argument as passed.
        name: its name, for the message.
        minimum: the smallest value accepted; ``None`` accepts any int.
        why: the reason for ``minimum``, shown in the message.

    Raises:
        ValueError: naming the argument, what it must be and what was passed.
    """
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        want = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {want}{f' ({why})' if why else ''}, got {value!r}.")
    return value


def check_transform(transform: object) -> Callable[[Image.Image], Any] | None:
    """Return ``transform`` if it is ``None`` or callable, else raise a ``ValueError`` naming its type."""
    if transform is not None and not callable(transform):
        raise ValueError(f"`transform` must be callable or None, got {type(transform).__name__}.")
    return transform


class MaskedImages(Dataset):
    """What the built-in datasets share: indexing, the ``(x, mask)`` sample, the probe and the held-out set.

    Every built-in dataset is constructed by this ``__init__`` (``num_samples``, ``image_size``, ``seed``,
    ``transform``, ``normalize``, documented by each subclass), which checks the arguments (``image_size`` against the
    subclass's :attr:`min_image_size`). A subclass defines ``render(index) -> (image (3, S, S) in [0, 1], mask
    (S, S) bool)``, drawing on :attr:`pixel_centres`.
    One that draws many samples faster at once overrides ``_render_range(start, stop)``, what :meth:`probe` draws.
    """

    min_image_size: ClassVar[int] = 1
    """Smallest image side the subclass draws faithfully; :attr:`min_image_size_reason` says why."""
    min_image_size_reason: ClassVar[str] = ""

    num_samples: int
    image_size: int
    pixel_centres: Tensor
    """``(S,)`` float32 coordinates of the pixel centres in ``(0, 1)``, the same along both axes."""
    seed: int
    transform: Callable[[Image.Image], Any] | None
    normalize: bool

    def __init__(
        self,
        num_samples: int = 1024,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        normalize: bool = True,
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples", 1)
        self.image_size = check_int(image_size, "image_size", self.min_image_size, self.min_image_size_reason)
        self.seed = check_int(seed, "seed")
        self.transform = check_transform(transform)
        self.normalize = normalize
        # Pixel centres in (0, 1), what the subclasses draw on.
        self.pixel_centres = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size

    def render(self, index: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - every subclass defines it
        """Draw sample ``index``: ``(image, mask)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
            f"transform={self.transform!r}, normalize={self.normalize})"
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        """Sample ``index``: ``(x, mask)``, see the class docstring.

        Raises:
            IndexError: If ``index`` is out of range (negative indices count from the end).
        """
        image, mask = self.render(index)
        if self.transform is not None:
            return self.transform(to_pil(image)), mask
        if self.normalize:
            image = _normalize(image)
        return image, mask

    def pil(self, index: int) -> Image.Image:
        """Sample ``index`` as an ``S x S`` RGB ``PIL.Image`` (what a transform receives).

        Raises:
            IndexError: If ``index`` is out of range.
        """
        return to_pil(self.render(index)[0])

    def probe(self, num_images: int, offset: int = 0, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """Return a fixed probe batch: samples ``offset, ..., offset + num_images - 1``, without the transform.

        Args:
            num_images: Number of images, at least 1.
            offset: First index.
            normalize: ImageNet-normalise the images (what a model trained with lightly's transforms expects);
                if False they stay in ``[0, 1]``.

        Returns:
            ``(images, masks)``: float ``(n, 3, S, S)`` and bool ``(n, S, S)``, equal to ``dataset[i]`` (without
            a transform) for each index.

        Raises:
            ValueError: If the requested range does not lie inside ``[0, len(self))``.
        """
        self._check_probe_range(num_images, offset)
        images, masks = self._render_range(offset, offset + num_images)
        return (_normalize(images) if normalize else images), masks

    def without_augmentation(self) -> MaskedImages:
        """The same samples without the transform, ImageNet-normalised, so that each mask describes its image.

        :func:`tsm_lightning.probe.build_probe` draws a probe from this when the transform is random: a mask next
        to an augmented view (cropped, flipped) does not describe that view.
        """
        return type(self)(self.num_samples, self.image_size, self.seed, None, True)

    def held_out(self, num_samples: int = 256) -> MaskedImages:
        """Return the held-out evaluation set: same image size, seed ``seed + HELDOUT_SEED_OFFSET``.

        It has no transform and the same ``normalize`` setting.
        """
        return type(self)(num_samples, self.image_size, self.seed + HELDOUT_SEED_OFFSET, None, self.normalize)

    def _render_range(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Samples ``start, ..., stop - 1`` as :meth:`render` draws them, for :meth:`probe`.

        Returns:
            ``(images, masks)``: float ``(n, 3, S, S)`` in ``[0, 1]`` and bool ``(n, S, S)``. The default stacks
            ``render(i)``; a dataset that draws in batches overrides this, with the same result.
        """
        pairs = [self.render(i) for i in range(start, stop)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _check_probe_range(self, num_images: int, offset: int) -> None:
        if num_images < 1 or offset < 0 or offset + num_images > self.num_samples:
            raise ValueError(
                f"probe range [{offset}, {offset + num_images}) must be non-empty and inside [0, {self.num_samples}) "
                f"(the dataset has {self.num_samples} samples)."
            )

    def _check_index(self, index: int) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}.") from None
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {self.num_samples}.")
        return i


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """Seed of the private generator that draws sample ``index`` of the dataset with seed ``seed``.

    A SplitMix64 mix of both numbers (stable across Python processes, unlike ``hash``), so neighbouring indices
    and neighbouring seeds give unrelated streams.

    Args:
        seed: Dataset seed (any int; taken modulo 2**64).
        index: Sample index (any int; taken modulo 2**64).

    Returns:
        An int in ``[0, 2**64)``, suitable for ``torch.Generator().manual_seed``.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """``(..., 3)`` HSV in ``[0, 1]`` to ``(..., 3)`` RGB in ``[0, 1]``."""
    h, s, v = hsv.unbind(-1)
    n = torch.tensor([5.0, 3.0, 1.0])
    k = (n + h[..., None] * 6) % 6
    ramp = torch.minimum(torch.minimum(k, 4 - k), torch.ones_like(k)).clamp(min=0)
    return v[..., None] - v[..., None] * s[..., None] * ramp


def _normalize(images: Tensor) -> Tensor:
    """ImageNet-normalise ``(..., 3, H, W)`` images in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype)[:, None, None]
    return (images - mean) / std


def to_pil(image: Tensor) -> Image.Image:
    """Float ``(3, H, W)`` in ``[0, 1]`` to an RGB ``PIL.Image`` (rounded to 8 bits)."""
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)
