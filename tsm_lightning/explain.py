"""One-call explanation of a model on a batch of images, and the class-token attention of a vision transformer."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn
from tsm_lightning.checks import check_images
from tsm_lightning.constants import METHODS
from tsm_lightning.core import normalize_maps, upsample_maps, validate_methods
from tsm_lightning.discovery import choose_monitored
from tsm_lightning.pipeline import attention_map, attention_module, capture_features, explain_batch
from tsm_lightning.tokens import TokenGridSpec, check_token_grid

__all__ = ["attention_maps", "check_images", "explain"]


def explain(
    model: nn.Module,
    images: Tensor,
    layer: str | None = None,
    methods: str | Sequence[str] = METHODS,
    *,
    forward_fn: ForwardFn | None = None,
    num_components: int | None = None,
    weighting: str = "singular",
    token_grid: TokenGridSpec = None,
    attention: bool | None = None,
) -> dict[str, Tensor]:
    """Explain ``model`` on ``images``: capture ``layer``, compute saliency maps, upsample to the input size.

    The model runs in eval mode under ``torch.no_grad()``; every sub-module's train/eval flag is restored and the
    hook removed afterwards. This is :func:`tsm_lightning.pipeline.explain_batch`, the path ``SaliencyMonitor`` and
    ``tsm-lightning`` take too, with the same forward rule. Vision transformers work as CNNs do: a block's
    ``(B, T, D)`` tokens become a ``(B, D, h, w)`` map on the model's patch grid (:mod:`tsm_lightning.tokens`).

    Args:
        model: the network (any ``nn.Module``, a ``LightningModule`` included).
        images: ``(B, 3, H, W)`` batch, normalised as the model expects, on the model's device.
        layer: dotted module name (``"layer4"``, ``"backbone.7"``, ``"encoder.layers.encoder_layer_11"``);
            ``None`` picks a ViT's last block, else the deepest spatial layer of a useful size
            (:func:`~tsm_lightning.discovery.choose_monitored`: in the student / online network of an SSL module,
            called with ``forward_features`` when ``forward`` fails), and warns which.
        methods: names from :data:`~tsm_lightning.METHODS`.
        forward_fn: ``forward_fn(model, images)``; default :func:`~tsm_lightning.capture.forward_target`'s rule:
            ``model.backbone(images)`` for a layer under ``backbone`` or a student / online network (or any dotted
            layer of a LightningModule: its top-level child), else ``model(images)``; ``forward_features`` when
            that ``forward`` fails on images alone (:func:`~tsm_lightning.capture.call_network`). With
            ``layer=None``, the call the automatic choice found to run.
        num_components: components summed by the multivector methods (``None``: all).
        weighting: multivector weighting, ``"singular"``, ``"variance"`` or ``"uniform"``.
        token_grid: how tokens become a map: a :class:`~tsm_lightning.tokens.TokenGrid` or a callable
            (default: the model's patch grid, the leading class/register tokens dropped);
            ``TokenGrid(channels="last")`` also states that 4-D outputs are channels-last (default: as the model
            tells, :mod:`tsm_lightning.layout`).
        attention: also return ``"attention"``, the last block's class-token attention averaged over heads:
            ``None`` (default) when ``layer`` is a transformer block with a class token, ``True`` always (or an
            error), ``False`` never. :func:`attention_maps` gives it per head.

    Returns:
        ``{method: (B, H, W) float32}`` maps in ``[0, 1]`` on the images' device (and ``"attention"``, see above).

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18()
        >>> maps = explain(net, torch.randn(2, 3, 128, 128), layer="layer4", methods=["tsm"])
        >>> tuple(maps["tsm"].shape)
        (2, 128, 128)
        >>> vit = torchvision.models.VisionTransformer(64, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
        >>> maps = explain(vit, torch.randn(2, 3, 64, 64), layer="encoder.layers.encoder_layer_1")
        >>> sorted(maps), tuple(maps["attention"].shape)
        (['attention', 'eigencam', 'mtsm', 'multivec_eigencam', 'tsm'], (2, 64, 64))
    """
    check_images(images, channels=None)
    methods = validate_methods(methods)
    check_token_grid(token_grid)
    if layer is None:
        layer, forward_fn = _choose(model, images, forward_fn, token_grid, warn=True)
    result = explain_batch(
        model,
        images,
        layer,
        methods,
        forward_fn=forward_fn,
        num_components=num_components,
        weighting=weighting,
        token_grid=token_grid,
        attention=attention,
    )
    return result.upsampled()


def _choose(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None, token_grid: TokenGridSpec, *, warn: bool
) -> tuple[str, ForwardFn]:
    # The automatic layer and the call that runs it (a student network, forward_features...), with a warning.
    try:
        chosen = choose_monitored(model, images, forward_fn, token_grid=token_grid)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}, inputs of shape {tuple(images.shape)}: {err}") from None
    if warn:
        warnings.warn(f"No layer given: using {chosen.text}. Pass layer= to choose another.", UserWarning, stacklevel=3)
    return chosen.layer, chosen.forward_fn


def attention_maps(
    model: nn.Module,
    images: Tensor,
    layer: str | None = None,
    *,
    per_head: bool = False,
    forward_fn: ForwardFn | None = None,
    token_grid: TokenGridSpec = None,
) -> Tensor:
    """The class token's self-attention over the patches in the last transformer block, at the images' size.

    Read from the block's own weights during one forward pass (:mod:`tsm_lightning.tokens`); the model is left as
    it was. This is the map DINO's authors show; the package logs it beside the four saliency maps as a reference.

    Args:
        model: a vision transformer (torchvision's ``VisionTransformer``, a timm-style ``blocks.N`` model, or a
            module holding one, such as lightly's ViT wrappers).
        images: ``(B, 3, H, W)`` batch, normalised as the model expects.
        layer: the block whose token grid places the attention (default: the last block, as :func:`explain`).
        per_head: one map per head instead of their mean.
        forward_fn: ``forward_fn(model, images)``; default as :func:`explain`.
        token_grid: how tokens become a grid (:mod:`tsm_lightning.tokens`).

    Returns:
        ``(B, H, W)`` float32 maps in ``[0, 1]``, or ``(B, heads, H, W)`` with ``per_head=True`` (each map normalised).

    Raises:
        ValueError: if the model has no readable attention module or its tokens have no class token.
    """
    check_images(images, channels=None)
    check_token_grid(token_grid)
    if layer is None:
        layer, forward_fn = _choose(model, images, forward_fn, token_grid, warn=False)
    name = attention_module(model, layer, True)
    captured = capture_features(
        model, images, layer, forward_fn=forward_fn, token_grid=token_grid, attention=name, attention_required=True
    )
    heads = captured.attention
    assert heads is not None  # attention_required
    size = (images.shape[-2], images.shape[-1])
    if not per_head:
        return upsample_maps(attention_map(heads), size)
    b, n, h, w = heads.shape
    flat = normalize_maps(heads.reshape(b * n, h, w))
    return upsample_maps(flat, size).reshape(b, n, *size)
