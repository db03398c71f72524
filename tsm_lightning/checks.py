"""Input checks shared by every public function: images, features, maps, masks, embeddings, counts.

One place for the rules and the wording of the errors. Every check raises :class:`InputTypeError` for something
that is not a tensor or not of a floating dtype, and ``ValueError`` for a wrong shape, naming the argument and the
shape expected, with a hint for the usual mistakes (a missing batch dimension, a stray channel dimension).
Only torch is imported here, so every layer of the package can use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "InputTypeError",
    "check_embeddings",
    "check_feature_map",
    "check_features",
    "check_images",
    "check_maps",
    "check_num_components",
    "check_positive_int",
    "prepare_masks",
]


class InputTypeError(TypeError, ValueError):
    """Not a tensor, or a tensor of a non-floating dtype.

    Both a ``TypeError`` and a ``ValueError``: earlier versions raised one or the other depending on the function,
    and code catching either keeps working.
    """


def _shape_of(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_images(images: object, *, channels: int | None = 3) -> Tensor:
    """Raise a clear error unless ``images`` is a floating ``(B, channels, H, W)`` tensor with ``B >= 1``.

    Args:
        images: candidate image batch.
        channels: required channel count, or ``None`` to accept any.

    Returns:
        ``images`` unchanged.
    """
    if not isinstance(images, Tensor):
        raise InputTypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}.")
    if images.ndim != 4 or (channels is not None and images.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        hint = " Add a batch dimension with images[None]." if images.ndim == 3 else ""
        raise ValueError(f"images must have shape {want}, got {tuple(images.shape)}.{hint}")
    if not images.is_floating_point():
        raise InputTypeError(f"images must be floating point (normalised as the model expects), got {images.dtype}.")
    if images.shape[0] < 1:
        raise ValueError("images must hold at least one image.")
    return images


def check_features(features: object) -> Tensor:
    """Raise a clear error unless ``features`` is a floating ``(B, C, h, w)`` tensor with ``B, C, h, w >= 1``.

    Args:
        features: candidate feature maps.

    Returns:
        ``features`` unchanged.

    Raises:
        InputTypeError: if ``features`` is not a floating-point tensor (a ``TypeError``).
        ValueError: if it is not 4-D or has an empty dimension.
    """
    if not isinstance(features, Tensor):
        raise InputTypeError(f"features must be a torch.Tensor of shape (B, C, h, w), got {type(features).__name__}.")
    if not features.is_floating_point():
        raise InputTypeError(f"features must be a floating-point tensor, got dtype {features.dtype}.")
    if features.ndim != 4:
        hint = ""
        if features.ndim == 3:
            hint = (
                " A 3-D tensor may be a single image's map (add a batch dimension with features[None]) or ViT "
                "tokens (B, T, D): turn those into a map with tsm_lightning.tokens_to_grid(tokens) first."
            )
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}.{hint}")
    if min(features.shape) < 1:
        raise ValueError(f"features must not have an empty dimension, got shape {tuple(features.shape)}.")
    return features


def check_feature_map(output: object, name: str) -> Tensor:
    """Return a layer's ``output`` if it is a ``(B, C, h, w)`` float tensor with ``h * w > 1``, else raise.

    Args:
        output: what the layer returned.
        name: the layer's name, for the message.

    Raises:
        ValueError: for tuples, other ranks, maps of spatial size 1x1, integer maps (token sequences are turned into
            maps before this check, by :func:`tsm_lightning.tokens.to_feature_map`).
    """
    if not isinstance(output, Tensor):
        raise ValueError(
            f"Layer {name!r} returned {type(output).__name__}, not a tensor; choose a layer that returns a "
            "(B, C, h, w) feature map."
        )
    if output.ndim != 4:
        raise ValueError(
            f"Layer {name!r} returned shape {tuple(output.shape)}; saliency needs a 4-D (B, C, h, w) feature map or "
            "3-D (B, T, D) transformer tokens. Choose a convolutional layer or a transformer block."
        )
    if output.shape[-2] * output.shape[-1] <= 1:
        raise ValueError(
            f"Layer {name!r} returned {tuple(output.shape)}: a 1x1 map has no spatial extent at this input size. "
            "Use a larger input image or an earlier layer."
        )
    if not output.is_floating_point():
        raise ValueError(f"Layer {name!r} returned dtype {output.dtype}; a floating-point feature map is needed.")
    return output


def check_maps(maps: object, name: str = "maps", *, spec: str = "(B, H, W)") -> Tensor:
    """Raise a clear error unless ``maps`` is a floating 3-D tensor without an empty dimension.

    Args:
        maps: candidate maps.
        name: the argument's name, for the message.
        spec: the shape as the caller documents it (``"(B, H, W)"`` at image size, ``"(B, h, w)"`` at grid size).

    Returns:
        ``maps`` unchanged.
    """
    if not isinstance(maps, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of shape {spec}, got {type(maps).__name__}.")
    if maps.ndim != 3:
        hint = " Drop the channel dimension with maps[:, 0]." if maps.ndim == 4 and maps.shape[1] == 1 else ""
        hint += " Add a batch dimension with maps[None]." if maps.ndim == 2 else ""
        raise ValueError(f"{name} must have shape {spec}, got {tuple(maps.shape)}.{hint}")
    if not maps.is_floating_point():
        raise InputTypeError(f"{name} must be a floating-point tensor of shape {spec}, got dtype {maps.dtype}.")
    if min(maps.shape) < 1:
        raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(maps.shape)}.")
    return maps


def prepare_masks(masks: object, maps: Tensor) -> Tensor:
    """Check ``masks`` against ``maps`` and return ``(B, N)`` bool masks at the maps' resolution.

    Masks may be ``(B, H, W)`` or ``(B, 1, H, W)``, of any dtype; a pixel is inside where the value is ``> 0.5``.
    Masks of another size than the maps are resized to the maps' size by nearest neighbour (``"nearest-exact"``).
    """
    if not isinstance(masks, Tensor):
        raise InputTypeError(f"masks must be a torch.Tensor of shape (B, H, W), got {type(masks).__name__}.")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}.")
    if masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks hold {masks.shape[0]} images but maps hold {maps.shape[0]}.")
    if masks.dtype == torch.bool and masks.shape[-2:] == maps.shape[-2:]:
        return masks.to(maps.device).reshape(maps.shape[0], -1)
    inside = masks.to(device=maps.device, dtype=torch.float32)
    if inside.shape[-2:] != maps.shape[-2:]:
        inside = F.interpolate(inside[:, None], size=maps.shape[-2:], mode="nearest-exact")[:, 0]
    return (inside > 0.5).reshape(maps.shape[0], -1)


def check_embeddings(embeddings: object, *, minimum: int = 2) -> Tensor:
    """Raise a clear error unless ``embeddings`` is a floating ``(n, D)`` tensor with ``n >= minimum``.

    Returns:
        ``embeddings`` unchanged.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a floating (n, D) tensor, got {_shape_of(embeddings)}.")
    if embeddings.shape[0] < minimum:
        raise ValueError(f"collapse indicators need at least {minimum} embeddings, got {embeddings.shape[0]}.")
    return embeddings


def check_num_components(value: object) -> int | None:
    """Return ``value`` if it is ``None`` or an ``int >= 1`` (the components the multivector methods sum), else raise.

    A ``bool`` is not a count and a float is not a number of components: both raise, as ``0`` does.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"num_components must be a positive integer (the components the multivector maps sum) or None (all of "
            f"them), got {value!r}."
        )
    return value


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an ``int >= 1`` (not a bool), else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value
