"""The one "explain a batch" path: images -> forward with a scoped hook -> features -> one decomposition -> maps.

:func:`~tsm_lightning.explain` (the library), :class:`~tsm_lightning.callbacks.SaliencyMonitor` (training) and
``tsm-lightning`` (checkpoints) all go through here; they differ only in what they do with the result (return the
maps, log them, write them). One forward rule decides what runs (:func:`~tsm_lightning.capture.forward_target`),
one layer search picks the layer when none is given (:func:`~tsm_lightning.capture.discover_layer`), and one
decomposition per batch gives the maps and the spectral metrics alike.

* :func:`capture_features`: the forward, under ``torch.no_grad()``, outside autocast, in eval mode with every
  sub-module's mode restored, the hook removed in ``finally`` and the global RNG streams left as they were;
* :func:`maps_of`: one :class:`~tsm_lightning.core.Decomposition` and the normalised maps read from it;
* :func:`explain_batch`: both, as an :class:`Explanation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, capture, forward_target, full_tensor
from tsm_lightning.checks import check_feature_map, check_images, check_num_components
from tsm_lightning.constants import METHODS
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

__all__ = ["Explanation", "capture_features", "explain_batch", "forward_rule", "maps_of"]


def forward_rule(layer: str) -> ForwardFn:
    """The default ``forward_fn(model, images)``: call :func:`~tsm_lightning.capture.forward_target` on the images."""
    return lambda model, images: forward_target(model, layer)(images)


def capture_features(
    model: nn.Module,
    images: Tensor,
    layer: str,
    *,
    forward_fn: ForwardFn | None = None,
    gathered: contextlib.AbstractContextManager[object] | None = None,
    finite: bool = False,
) -> tuple[Tensor, object]:
    """Run the forward on ``images`` with ``layer`` captured.

    Args:
        model: the network (``layer`` is relative to it).
        images: ``(B, C, H, W)`` input batch.
        layer: dotted module name.
        forward_fn: ``forward_fn(model, images)``; default :func:`forward_rule`.
        gathered: a context entered around the forward (sharded training gathers the parameters there).
        finite: raise a ``FloatingPointError`` if the features hold NaN or Inf (otherwise those images get zero
            maps and a warning from the decomposition).

    Returns:
        ``(features, output)``: the layer's ``(B, C, h, w)`` output as float32 (a ``DTensor`` gathered whole first),
        and the forward's return value, detached (and gathered) when it is a tensor.
    """
    forward = forward_fn or forward_rule(layer)
    with (
        preserved_rng(),
        autocast_off(images.device),
        gathered or contextlib.nullcontext(),
        capture(model, layer) as cap,
    ):
        output = forward(model, images)
    features = check_feature_map(full_tensor(cap.features), layer).float()
    if finite and not bool(torch.isfinite(features).all()):
        raise FloatingPointError(f"the features of layer {layer!r} contain NaN or Inf")
    if isinstance(output, Tensor):
        output = full_tensor(output.detach())
    return features, output


def maps_of(
    features: Tensor,
    methods: Sequence[str] = METHODS,
    *,
    num_components: int | None = None,
    weighting: str = "singular",
    spectra: bool = False,
) -> tuple[Decomposition, dict[str, Tensor]]:
    """One decomposition of ``features`` and the normalised maps read from it.

    Args:
        features: ``(B, C, h, w)`` features.
        methods: names from :data:`~tsm_lightning.METHODS`.
        num_components: components of the multivector methods (``None``: all).
        weighting: multivector weighting, one of :data:`~tsm_lightning.core.WEIGHTINGS`.
        spectra: make the decomposition the one :func:`~tsm_lightning.metrics.spectral_metrics` reads too: both
            spectra, every component, from float64 features (float32 on MPS), so that rounding noise gives no zero
            singular value a share. The maps then come from that more exact decomposition.

    Returns:
        ``(decomposition, {method: (B, h, w) float32 maps in [0, 1]})``.
    """
    methods = validate_methods(methods)
    check_num_components(num_components)
    request = decomposition_request(methods, num_components)
    if spectra:
        request = {"uncentred": True, "centred": True, "num_components": None}
        features = features.to(torch.float32 if features.device.type == "mps" else torch.float64)
    decomposition = decompose(features, **request)
    maps = compute_maps(decomposition, methods, weighting=weighting, num_components=num_components)
    return decomposition, {name: normalize_maps(m) for name, m in maps.items()}


@dataclass(frozen=True)
class Explanation:
    """One batch explained.

    Attributes:
        layer: the layer the features come from.
        features: ``(B, C, h, w)`` float32 features.
        output: the forward's return value (e.g. the backbone embedding).
        decomposition: the decomposition of ``features`` the maps were read from.
        maps: ``{method: (B, h, w)}`` float32 maps in ``[0, 1]`` at the features' grid.
        image_size: ``(H, W)`` of the images.
    """

    layer: str
    features: Tensor
    output: object
    decomposition: Decomposition
    maps: dict[str, Tensor]
    image_size: tuple[int, int]

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
) -> Explanation:
    """Explain one batch: :func:`capture_features`, then :func:`maps_of`.

    Args:
        model: the network.
        images: ``(B, C, H, W)`` batch, normalised as the model expects, on the model's device.
        layer: dotted module name (see :func:`~tsm_lightning.capture.discover_layer` to choose one).
        methods: names from :data:`~tsm_lightning.METHODS`.
        forward_fn: ``forward_fn(model, images)``; default :func:`forward_rule`.
        num_components: components of the multivector methods (``None``: all).
        weighting: multivector weighting.
        spectra: decompose for the spectral metrics too (see :func:`maps_of`).

    Returns:
        An :class:`Explanation`.
    """
    check_images(images, channels=None)
    methods = validate_methods(methods)
    features, output = capture_features(model, images, layer, forward_fn=forward_fn)
    decomposition, maps = maps_of(
        features, methods, num_components=num_components, weighting=weighting, spectra=spectra
    )
    return Explanation(layer, features, output, decomposition, maps, (images.shape[-2], images.shape[-1]))
