"""Building the fixed probe batch from tensors, datasets, dataloaders and image folders.

Self-supervised batches are nested: lightly yields ``([view0, view1, ...], target, filename)``, MoCo and SwAV
have several views and crops. :func:`unwrap_batch` turns any of these into one image tensor per sample with a
fixed, documented rule:

1. a tensor ``(B, 3, H, W)`` is the images;
2. a tuple or list: its **first** element is the images; if that element is itself a list or tuple of view
   tensors, the **first view** is used (lightly's first global view; SwAV's first high-resolution crop);
3. a dict: the value under ``"image"``, ``"images"``, ``"input"`` or ``"x"``;
4. masks are taken from the **second** element of a tuple/list (or a dict's ``"mask"``/``"masks"``) only when it
   is a tensor of shape ``(B, H, W)`` or ``(B, 1, H, W)`` with the images' ``H, W`` (so integer class targets and
   filenames are ignored).

Anything else needs a ``probe_fn(batch) -> images`` or ``-> (images, masks)``. Sampling is deterministic: the
first ``num_images`` samples in dataset order (a sequential sampler, never the training shuffle), drawn under
a fixed seed with every global random stream restored afterwards, so augmenting transforms give the same probe
every time and training randomness is untouched.

Probe size. An explicit tensor is used whole. From data (a ``Dataset``, ``DataLoader`` or folder), the first
``num_images`` samples are drawn, :data:`DEFAULT_NUM_IMAGES` when ``num_images`` is ``None``, or all of them if
the data holds fewer. Only an explicit ``num_images`` larger than what the source holds is an error.

Masks must describe the probe images exactly. When masks come from data, the probe is drawn a second time under
another seed: if the images differ, the dataset's transform is random (crops, flips, colour jitter), so a mask
cannot describe the view it came with. The probe is then drawn from ``dataset.without_augmentation()`` when the
dataset offers it (the built-in datasets do: the probe is for watching, not for training), and otherwise the masks
are dropped with a warning that says why, so no localization number is ever computed against another image's mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tsm_lightning.rng import preserved_rng

__all__ = ["DEFAULT_NUM_IMAGES", "Probe", "ProbeFn", "build_probe", "check_probe_source", "unwrap_batch"]

DEFAULT_NUM_IMAGES = 8
"""Probe images drawn from data when ``num_images`` is not given."""

ProbeFn = Callable[[object], "Tensor | tuple[Tensor, Tensor | None]"]

_IMAGE_KEYS = ("image", "images", "input", "x")
_MASK_KEYS = ("mask", "masks")


@dataclass
class Probe:
    """A fixed probe batch.

    Attributes:
        images: ``(B, 3, H, W)`` float images, normalised as the model expects.
        masks: ``(B, H, W)`` bool object masks, or ``None``.
    """

    images: Tensor
    masks: Tensor | None = None

    def to(self, device: torch.device | str) -> Probe:
        """Return the probe on ``device``."""
        masks = self.masks.to(device) if self.masks is not None else None
        return Probe(self.images.to(device), masks)


def _as_mask(candidate: object, images: Tensor) -> Tensor | None:
    if not isinstance(candidate, Tensor):
        return None
    if candidate.ndim == 4 and candidate.shape[1] == 1:
        candidate = candidate[:, 0]
    if candidate.ndim == 3 and candidate.shape[0] == images.shape[0] and candidate.shape[-2:] == images.shape[-2:]:
        return candidate > 0.5 if candidate.is_floating_point() else candidate.bool()
    return None


def unwrap_batch(batch: object) -> tuple[Tensor, Tensor | None]:
    """Extract ``(images, masks)`` from a collated batch following the module's documented rule.

    Args:
        batch: a collated batch.

    Returns:
        ``images`` ``(B, C, H, W)`` and ``masks`` ``(B, H, W)`` bool or ``None``.

    Raises:
        ValueError: if no image tensor can be found; the message suggests ``probe_fn``.
    """
    images: object = None
    mask_candidate: object = None
    if isinstance(batch, Tensor):
        images = batch
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        if isinstance(images, (tuple, list)) and images:
            images = images[0]
        mask_candidate = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, dict):
        images = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        mask_candidate = next((batch[k] for k in _MASK_KEYS if k in batch), None)
    if not isinstance(images, Tensor) or images.ndim != 4:
        seen = type(images).__name__ if not isinstance(images, Tensor) else f"a tensor of shape {tuple(images.shape)}"
        raise ValueError(
            f"Could not find a (B, C, H, W) image tensor in the probe batch (found {seen} where the images were "
            "expected). Pass probe_fn=lambda batch: images  (or (images, masks)) to extract them."
        )
    return images, _as_mask(mask_candidate, images)


def _apply_probe_fn(probe_fn: ProbeFn, batch: object) -> tuple[Tensor, Tensor | None]:
    out = probe_fn(batch)
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
        masks = out[1]
        return out[0], (_as_mask(masks, out[0]) if masks is not None else None)
    raise ValueError(f"probe_fn must return an image tensor or (images, masks), got {type(out).__name__}.")


def _from_loader(loader: DataLoader, num_images: int | None, probe_fn: ProbeFn | None) -> tuple[Tensor, Tensor | None]:
    """The first ``num_images`` (default :data:`DEFAULT_NUM_IMAGES`, or all if fewer) images of ``loader``."""
    wanted = num_images or DEFAULT_NUM_IMAGES
    images: list[Tensor] = []
    masks: list[Tensor | None] = []
    count = 0
    for batch in loader:
        imgs, msk = _apply_probe_fn(probe_fn, batch) if probe_fn is not None else unwrap_batch(batch)
        images.append(imgs)
        masks.append(msk)
        count += imgs.shape[0]
        if count >= wanted:
            break
    if count == 0:
        raise ValueError("The probe dataloader is empty: it yielded no batch. Pass a probe with images in it.")
    if num_images is not None and count < num_images:
        raise ValueError(
            f"The probe source holds only {count} images but num_images={num_images}. Lower num_images (or leave "
            "it unset to use every image) or pass a larger probe."
        )
    out_masks = torch.cat(masks)[:wanted] if all(m is not None for m in masks) else None  # type: ignore[arg-type]
    return torch.cat(images)[:wanted], out_masks


def _sequential(loader: DataLoader, num_images: int | None) -> DataLoader:
    """A loader over the same data in dataset order, without workers or shuffling, with the user's collate."""
    if isinstance(loader.dataset, IterableDataset):
        return loader
    return _loader(loader.dataset, num_images, loader.collate_fn)


def _loader(dataset: Dataset, num_images: int | None, collate_fn: Callable | None = None) -> DataLoader:
    return DataLoader(
        dataset, batch_size=num_images or DEFAULT_NUM_IMAGES, shuffle=False, num_workers=0, collate_fn=collate_fn
    )


def _draw(
    source: Dataset | DataLoader, num_images: int | None, probe_fn: ProbeFn | None
) -> tuple[Tensor, Tensor | None]:
    loader = _sequential(source, num_images) if isinstance(source, DataLoader) else _loader(source, num_images)
    return _from_loader(loader, num_images, probe_fn)


def _draw_with_aligned_masks(
    source: Dataset | DataLoader, num_images: int | None, probe_fn: ProbeFn | None, seed: int
) -> tuple[Tensor, Tensor | None]:
    """Draw the probe; keep masks only if they describe the drawn images (see the module docstring)."""
    with preserved_rng(seed):
        images, masks = _draw(source, num_images, probe_fn)
    if masks is None:
        return images, None
    with preserved_rng(seed + 1):
        again, _ = _draw(source, num_images, probe_fn)
    if torch.equal(images, again):
        return images, masks
    dataset = source.dataset if isinstance(source, DataLoader) else source
    plain = getattr(dataset, "without_augmentation", None)
    if callable(plain):
        with preserved_rng(seed):
            return _draw(plain(), num_images, probe_fn)
    warnings.warn(
        f"The probe's {type(dataset).__name__} applies a random transform (two draws of the same samples differ), "
        "so the masks it returns cannot describe the augmented images: localization metrics are skipped. Pass the "
        "probe as a tensor with masks=, or a dataset without augmentation (or give the dataset a "
        "without_augmentation() method returning one).",
        UserWarning,
        stacklevel=3,
    )
    return images, None


def check_probe_source(source: object, *, allow_none: bool = True) -> None:
    """Raise a ``TypeError`` unless ``source`` is a kind of probe :func:`build_probe` accepts.

    Args:
        source: candidate probe.
        allow_none: accept ``None`` (the monitor then draws the probe from the trainer's data).
    """
    if (source is None and allow_none) or isinstance(source, (Probe, Tensor, str, Path, Dataset, DataLoader)):
        return
    raise TypeError(
        "probe must be a (B, 3, H, W) tensor, a Probe(images, masks), a Dataset, a DataLoader, a path to an image "
        "folder or None, "
        f"got {type(source).__name__}."
    )


def build_probe(
    source: object,
    num_images: int | None = None,
    *,
    probe_fn: ProbeFn | None = None,
    masks: Tensor | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> Probe:
    """Build the fixed probe batch from a tensor, a :class:`Probe`, a ``Dataset``, a ``DataLoader`` or a folder path.

    Datasets and dataloaders are read in dataset order with ``num_workers=0``, under ``seed`` with all global RNG
    states restored afterwards. Multi-view samples keep their first view. Masks found in the data are kept only if
    they describe the drawn images (see the module docstring).

    Args:
        source: ``(B, 3, H, W)`` tensor, :class:`Probe` (images with their masks), ``Dataset``, ``DataLoader`` or
            path to a folder of images.
        num_images: probe size. ``None``: a tensor is used whole; from data, the first
            :data:`DEFAULT_NUM_IMAGES` samples (all of them if there are fewer). An explicit number must not exceed
            what the source holds.
        probe_fn: extracts ``images`` or ``(images, masks)`` from one collated batch, for unusual structures.
        masks: optional ``(B, H, W)`` masks for a tensor source (ignored otherwise; a :class:`Probe` brings its own).
        image_size: resize for image folders (shorter side, then centre crop); default 224.
        seed: seed for the augmentations a dataset may apply while the probe is drawn.

    Returns:
        A :class:`Probe` on the CPU (or on the source tensor's device).

    Raises:
        ValueError: for an empty source, a source smaller than an explicit ``num_images``, wrong shapes or channel
            counts.
        TypeError: for an unsupported source type.
    """
    if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images must be a positive integer or None, got {num_images!r}.")
    check_probe_source(source, allow_none=False)
    if isinstance(source, Probe):
        images, found_masks = source.images, source.masks
    elif isinstance(source, Tensor):
        images, found_masks = source, masks
    elif isinstance(source, (str, Path)):
        from tsm_lightning.data import ImageFolder

        folder = ImageFolder(source, image_size=image_size or 224)
        with preserved_rng(seed):
            images, found_masks = _draw(folder, num_images, probe_fn)
    else:
        images, found_masks = _draw_with_aligned_masks(source, num_images, probe_fn, seed)  # type: ignore[arg-type]
    return _validated(images, found_masks, num_images)


def _validated(images: object, masks: Tensor | None, num_images: int | None) -> Probe:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"The probe must be RGB images of shape (B, 3, H, W), got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"Probe images must be floating point (normalised as the model expects), got {images.dtype}.")
    if num_images is not None and images.shape[0] < num_images:
        raise ValueError(
            f"The probe holds {images.shape[0]} images but num_images={num_images}. Lower num_images (or leave it "
            "unset to use the whole tensor) or pass more."
        )
    images = images[:num_images].detach().clone()
    if masks is not None:
        mask = _as_mask(masks[:num_images], images)
        if mask is None:
            raise ValueError(
                f"masks must have shape (B, H, W) matching the probe images {tuple(images.shape)}, "
                f"got {tuple(masks.shape)}."
            )
        masks = mask.clone()
    return Probe(images, masks)
