"""One-call explanation of a model on a batch of images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, find_layer
from tsm_lightning.checks import check_images
from tsm_lightning.constants import METHODS
from tsm_lightning.core import validate_methods
from tsm_lightning.pipeline import explain_batch

__all__ = ["check_images", "explain"]


def explain(
    model: nn.Module,
    images: Tensor,
    layer: str | None = None,
    methods: str | Sequence[str] = METHODS,
    *,
    forward_fn: ForwardFn | None = None,
    num_components: int | None = None,
    weighting: str = "singular",
) -> dict[str, Tensor]:
    """Explain ``model`` on ``images``: capture ``layer``, compute saliency maps, upsample to the input size.

    The model runs in eval mode under ``torch.no_grad()``; every sub-module's train/eval flag is restored and the
    hook removed afterwards. This is :func:`tsm_lightning.pipeline.explain_batch`, the path ``SaliencyMonitor`` and
    ``tsm-lightning`` take too, with the same forward rule.

    Args:
        model: the network (any ``nn.Module``, a ``LightningModule`` included).
        images: ``(B, 3, H, W)`` batch, normalised as the model expects, on the model's device.
        layer: dotted module name (``"layer4"``, ``"backbone.7"``); ``None`` picks the deepest spatial layer of a
            useful size (:func:`~tsm_lightning.capture.find_layer`) and warns which.
        methods: names from :data:`~tsm_lightning.METHODS`.
        forward_fn: ``forward_fn(model, images)``; default :func:`~tsm_lightning.capture.forward_target`'s rule:
            ``model.backbone(images)`` for a layer under ``backbone`` (or any dotted layer of a LightningModule: its
            top-level child), else ``model(images)``.
        num_components: components summed by the multivector methods (``None``: all).
        weighting: multivector weighting, ``"singular"``, ``"variance"`` or ``"uniform"``.

    Returns:
        ``{method: (B, H, W) float32}`` maps in ``[0, 1]`` on the images' device.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18()
        >>> maps = explain(net, torch.randn(2, 3, 128, 128), layer="layer4", methods=["tsm"])
        >>> tuple(maps["tsm"].shape)
        (2, 128, 128)
    """
    check_images(images, channels=None)
    methods = validate_methods(methods)
    if layer is None:
        layer = find_layer(model, images, forward_fn)
    result = explain_batch(
        model, images, layer, methods, forward_fn=forward_fn, num_components=num_components, weighting=weighting
    )
    return result.upsampled()
