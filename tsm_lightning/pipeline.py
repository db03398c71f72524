"""The one "explain a batch" path: images -> forward with a scoped hook -> features -> one decomposition -> maps.

:func:`~tsm_lightning.explain` (the library), :class:`~tsm_lightning.callbacks.SaliencyMonitor` (training) and
``tsm-lightning`` (checkpoints) all go through here; they differ only in what they do with the result (return the
maps, log them, write them). One forward rule decides what runs (:func:`~tsm_lightning.capture.forward_target`),
one layer search picks the layer when none is given (:func:`~tsm_lightning.discovery.discover_layer`), and one
decomposition per batch gives the maps and the spectral metrics alike.

* :func:`capture_features`: the forward, under ``torch.no_grad()``, outside autocast, in eval mode with every
  sub-module's mode restored, the hook removed in ``finally`` and the global RNG streams left as they were; a
  transformer block's tokens become a ``(B, D, h, w)`` map there (:mod:`tsm_lightning.tokens`), and the last
  block's class-token attention is read in the same pass when asked for (:func:`attention_module`);
* :func:`maps_of`: one :class:`~tsm_lightning.core.Decomposition` and the normalised maps read from it, with the
  attention map beside them when the forward read one (:func:`attention_map`);
* :func:`explain_batch`: all of it, as an :class:`Explanation`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, call_network, capture, forward_target, full_tensor
from tsm_lightning.checks import check_feature_map, check_images, check_num_components
from tsm_lightning.constants import ATTENTION, METHODS
from tsm_lightning.core import (
    Decomposition,
    compute_maps,
    decompose,
    decomposition_request,
    normalize_maps,
    upsample_maps,
    validate_methods,
)
from tsm_lightning.core.spectral import autocast_off
from tsm_lightning.rng import preserved_rng
from tsm_lightning.tokens import TokenGridSpec, find_attention, patch_attention

__all__ = [
    "Captured",
    "Explanation",
    "attention_map",
    "attention_module",
    "capture_features",
    "explain_batch",
    "forward_rule",
    "maps_of",
]


def forward_rule(layer: str) -> ForwardFn:
    """The default ``forward_fn(model, images)``: call :func:`~tsm_lightning.capture.forward_target` on the images.

    With :func:`~tsm_lightning.capture.call_network`: its ``forward``, or ``forward_features`` when that fails.
    """
    return lambda model, images: call_network(forward_target(model, layer), images)


class Captured(NamedTuple):
    """What one probe forward gives.

    Attributes:
        features: ``(B, C, h, w)`` float32 features of the layer (a transformer's tokens as a map).
        output: the forward's return value, detached (and gathered) when it is a tensor.
        attention: ``(B, heads, h, w)`` float32 class-token attention over the patches, or ``None``.
    """

    features: Tensor
    output: object
    attention: Tensor | None = None


def attention_module(model: nn.Module, layer: str, attention: bool | None = None) -> str | None:
    """The attention module whose class-token attention goes beside the maps of ``layer``, named relative to ``model``.

    The last supported attention module (:func:`~tsm_lightning.tokens.find_attention`) of the network that holds
    ``layer``: the top-level child of ``model`` named by the layer's first part (``model.backbone`` for
    ``"backbone.encoder.layers.encoder_layer_11"``, so a DINO teacher registered next to it is never chosen), or
    ``model`` for a name directly under it.

    Args:
        model: the network.
        layer: the monitored layer.
        attention: ``False``: none; ``None``: the module if there is one; ``True``: the module, or an error.

    Returns:
        The dotted name, or ``None``.

    Raises:
        ValueError: with ``attention=True`` when the network has no attention module this package can read.
    """
    if attention is False:
        return None
    head = layer.split(".", 1)[0]
    child = getattr(model, head, None)
    root, prefix = (child, head + ".") if "." in layer and isinstance(child, nn.Module) else (model, "")
    name = find_attention(root)
    if name is None:
        if attention:
            raise ValueError(
                f"attention=True, but {type(root).__name__} has no class-token attention module this package can "
                "read (torch.nn.MultiheadAttention, a timm-style qkv module, Hugging Face q_proj/k_proj; window "
                "attention such as Swin's has no class token); pass attention=False."
            )
        return None
    return prefix + name


def capture_features(
    model: nn.Module,
    images: Tensor,
    layer: str,
    *,
    forward_fn: ForwardFn | None = None,
    gathered: contextlib.AbstractContextManager[object] | None = None,
    finite: bool = False,
    token_grid: TokenGridSpec = None,
    attention: str | None = None,
    attention_required: bool = False,
) -> Captured:
    """Run the forward on ``images`` with ``layer`` captured.

    Args:
        model: the network (``layer`` is relative to it).
        images: ``(B, C, H, W)`` input batch.
        layer: dotted module name.
        forward_fn: ``forward_fn(model, images)``; default :func:`forward_rule`.
        gathered: a context entered around the forward (sharded training gathers the parameters there).
        finite: raise a ``FloatingPointError`` if the features hold NaN or Inf (otherwise those images get zero
            maps and a warning from the decomposition).
        token_grid: how a transformer block's tokens become a map (:mod:`tsm_lightning.tokens`).
        attention: name of an attention module (:func:`attention_module`) whose class-token attention to read.
        attention_required: raise when that attention cannot be placed on the layer's grid (the layer is not a
            transformer block, or its tokens have no class token); otherwise it is ``None`` then.

    Returns:
        A :class:`Captured`: the layer's output as float32 ``(B, C, h, w)`` features (a ``DTensor`` gathered whole
        first), the forward's output, and the attention.
    """
    forward = forward_fn or forward_rule(layer)
    with (
        preserved_rng(),
        autocast_off(images.device),
        gathered or contextlib.nullcontext(),
        capture(model, layer, token_grid=token_grid, attention=attention) as cap,
    ):
        output = forward(model, images)
    features = check_feature_map(full_tensor(cap.features), layer).float()
    if finite and not bool(torch.isfinite(features).all()):
        raise FloatingPointError(f"the features of layer {layer!r} contain NaN or Inf")
    if isinstance(output, Tensor):
        output = full_tensor(output.detach())
    if attention is not None and cap.attention is None and cap.attention_error is not None:
        if attention_required:  # not class-token attention; skipped without a word when not asked for
            raise ValueError(
                f"attention=True, but the attention module {attention!r} gives no class-token attention: "
                f"{cap.attention_error.rstrip('.')}; pass attention=False."
            )
    elif attention is not None and cap.attention is None:
        message = f"the attention module {attention!r} did not run in the forward pass that computes {layer!r}"
        if attention_required:
            raise ValueError(message + ".")
        warnings.warn(message + "; no attention map.", UserWarning, stacklevel=2)
    return Captured(features, output, _attention_on_grid(cap.attention, cap.layout, layer, attention_required))


def _attention_on_grid(rows: Tensor | None, layout: object, layer: str, required: bool) -> Tensor | None:
    if rows is None:
        return None
    try:
        if layout is None:
            raise ValueError(f"layer {layer!r} does not output transformer tokens on a known grid")
        return patch_attention(full_tensor(rows).float(), layout)  # type: ignore[arg-type]
    except ValueError as err:
        if required:
            raise ValueError(
                f"cannot place the class-token attention on the grid of {layer!r}: {str(err).rstrip('.')}; pass "
                "attention=False."
            ) from None
        return None


def attention_map(attention: Tensor) -> Tensor:
    """The class-token attention averaged over heads, normalised to ``[0, 1]``: ``(B, heads, h, w) -> (B, h, w)``."""
    return normalize_maps(attention.mean(dim=1))


def maps_of(
    features: Tensor,
    methods: Sequence[str] = METHODS,
    *,
    num_components: int | None = None,
    weighting: str = "singular",
    spectra: bool = False,
    attention: Tensor | None = None,
) -> tuple[Decomposition, dict[str, Tensor]]:
    """One decomposition of ``features`` and the normalised maps read from it (and the attention map beside them).

    Args:
        features: ``(B, C, h, w)`` features.
        methods: names from :data:`~tsm_lightning.METHODS`.
        num_components: components of the multivector methods (``None``: all).
        weighting: multivector weighting, one of :data:`~tsm_lightning.core.WEIGHTINGS`.
        spectra: make the decomposition the one :func:`~tsm_lightning.metrics.spectral_metrics` reads too: both
            spectra, every component, from float64 features (float32 on MPS), so that rounding noise gives no zero
            singular value a share. The maps then come from that more exact decomposition.
        attention: ``(B, heads, h, w)`` class-token attention of the same forward (:class:`Captured`), added as
            ``"attention"`` (:func:`attention_map`); ``None``: none.

    Returns:
        ``(decomposition, {method: (B, h, w) float32 maps in [0, 1]})``, plus ``"attention"`` when given.
    """
    methods = validate_methods(methods)
    check_num_components(num_components)
    request = decomposition_request(methods, num_components)
    if spectra:
        request = {"uncentred": True, "centred": True, "num_components": None}
        features = features.to(torch.float32 if features.device.type == "mps" else torch.float64)
    decomposition = decompose(features, **request)
    maps = compute_maps(decomposition, methods, weighting=weighting, num_components=num_components)
    out = {name: normalize_maps(m) for name, m in maps.items()}
    if attention is not None:
        out[ATTENTION] = attention_map(attention)
    return decomposition, out


@dataclass(frozen=True)
class Explanation:
    """One batch explained.

    Attributes:
        layer: the layer the features come from.
        features: ``(B, C, h, w)`` float32 features.
        output: the forward's return value (e.g. the backbone embedding).
        decomposition: the decomposition of ``features`` the maps were read from.
        maps: ``{method: (B, h, w)}`` float32 maps in ``[0, 1]`` at the features' grid, plus ``"attention"`` for a
            vision transformer when the class-token attention was read.
        image_size: ``(H, W)`` of the images.
        attention: ``(B, heads, h, w)`` class-token attention per head, or ``None``.
    """

    layer: str
    features: Tensor
    output: object
    decomposition: Decomposition
    maps: dict[str, Tensor]
    image_size: tuple[int, int]
    attention: Tensor | None = None

    def upsampled(self, size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The maps resized bilinearly to ``size`` (default: the image size), still in ``[0, 1]``."""
        return {name: upsample_maps(m, size or self.image_size) for name, m in self.maps.items()}


def explain_batch(
    model: nn.Module,
    images: Tensor,
    layer: str,
    methods: Sequence[str] = METHODS,
    *,
    forward_fn: ForwardFn | None = None,
    num_components: int | None = None,
    weighting: str = "singular",
    spectra: bool = False,
    token_grid: TokenGridSpec = None,
    attention: bool | None = None,
) -> Explanation:
    """Explain one batch: :func:`capture_features`, then :func:`maps_of`.

    Args:
        model: the network.
        images: ``(B, C, H, W)`` batch, normalised as the model expects, on the model's device.
        layer: dotted module name (see :func:`~tsm_lightning.discovery.discover_layer` to choose one).
        methods: names from :data:`~tsm_lightning.METHODS`.
        forward_fn: ``forward_fn(model, images)``; default :func:`forward_rule`.
        num_components: components of the multivector methods (``None``: all).
        weighting: multivector weighting.
        spectra: decompose for the spectral metrics too (see :func:`maps_of`).
        token_grid: how a transformer block's tokens become a map (:mod:`tsm_lightning.tokens`).
        attention: add the last block's class-token attention as ``maps["attention"]``: ``None`` when the layer is
            a transformer block with a class token and the attention can be read, ``True`` always (or an error),
            ``False`` never.

    Returns:
        An :class:`Explanation`.
    """
    check_images(images, channels=None)
    methods = validate_methods(methods)
    name = attention_module(model, layer, attention)
    captured = capture_features(
        model,
        images,
        layer,
        forward_fn=forward_fn,
        token_grid=token_grid,
        attention=name,
        attention_required=bool(attention),
    )
    decomposition, maps = maps_of(
        captured.features,
        methods,
        num_components=num_components,
        weighting=weighting,
        spectra=spectra,
        attention=captured.attention,
    )
    image_size = (images.shape[-2], images.shape[-1])
    return Explanation(layer, captured.features, captured.output, decomposition, maps, image_size, captured.attention)
