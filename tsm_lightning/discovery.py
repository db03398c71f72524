"""Choosing the layer to explain: one forward pass lists every module's output, a rule picks one.

:func:`find_layer` (with a warning) and :func:`discover_layer` (with a sentence) apply :func:`choose_layer` to what
:func:`candidate_layers` sees: for a vision transformer the last transformer block (never the patch embedding);
otherwise the deepest module whose output is a ``(B, C, h, w)`` map of at least :data:`MIN_GRID` x :data:`MIN_GRID`,
else of at least :data:`FALLBACK_GRID` x :data:`FALLBACK_GRID`, else any map larger than 1x1, always saying which
grid it got and, when it is small, how to get a larger one. ``explain()``, ``SaliencyMonitor`` and ``tsm-lightning``
all use this one search.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, _default_forward, _strip_compile_prefix, preserved_modes
from tsm_lightning.tokens import TokenGrid, TokenGridSpec, repeated_blocks, watch_patch_grid

__all__ = [
    "FALLBACK_GRID",
    "MIN_GRID",
    "LayerInfo",
    "candidate_layers",
    "choose_layer",
    "discover_layer",
    "find_layer",
    "layer_shapes",
    "search_root",
]

MIN_GRID = 7
"""Automatic layer choice prefers the deepest map at least this many cells on each side (ResNet layer4 at 224 px)."""

FALLBACK_GRID = 4
"""Below :data:`MIN_GRID`, the deepest map at least this large is taken, with a warning."""

LARGER_GRID_HINT = (
    "For a larger grid feed larger images (a ResNet's layer4 is 7x7 at 224 px) or give the network a CIFAR-style "
    "stem (3x3 stride-1 first convolution, no max-pool), or pass layer= to choose an earlier layer."
)
VIT_GRID_HINT = "For a larger grid feed larger images or use a smaller patch size (grid = image size / patch size)."


def search_root(model: nn.Module) -> tuple[str, nn.Module]:
    """Where automatic layer discovery looks, as ``(prefix, root)``.

    ``("backbone.", model.backbone)`` when that is a module, else ``("", model)``; a name found in ``root`` is
    relative to ``model`` once prefixed.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return "backbone.", backbone
    return "", model


@dataclass(frozen=True)
class LayerInfo:
    """A candidate layer seen during a forward pass.

    Attributes:
        name: dotted module name.
        shape: output shape, or ``None`` if the output was not a tensor.
        is_map: whether the output is a usable ``(B, C, h, w)`` map with ``h * w > 1``.
        grid: ``(h, w)`` of the map, or of the patch grid of ``(B, T, D)`` tokens (by the default grid rule of
            :mod:`tsm_lightning.tokens`); ``None`` if the output is neither.
        tokens: whether the output is a floating ``(B, T, D)`` token sequence (``grid`` is ``None`` when it fits
            no grid by the rule).
        block: whether the module is a member of a repeated-block container
            (:func:`tsm_lightning.tokens.repeated_blocks`).
    """

    name: str
    shape: tuple[int, ...] | None
    is_map: bool = field(default=False)
    grid: tuple[int, int] | None = None
    tokens: bool = False
    block: bool = False


def layer_shapes(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, token_grid: TokenGridSpec = None
) -> list[LayerInfo]:
    """Run one forward pass and list every named sub-module's output shape, in the order modules finished.

    The model is left exactly as it was (modes restored, hooks removed).

    Args:
        model: the network.
        images: ``(B, 3, H, W)`` input batch.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.
        token_grid: a :class:`~tsm_lightning.tokens.TokenGrid` for the grids of token outputs (a callable is not
            run here: token outputs then get the default rule).

    Returns:
        One :class:`LayerInfo` per module call, in completion order (the root module is excluded).
    """
    forward = forward_fn or _default_forward
    seen: list[LayerInfo] = []
    handles = []
    blocks = {_strip_compile_prefix(name) for name in repeated_blocks(model)}
    patch_grid: list[tuple[int, int]] = []
    rule = token_grid if isinstance(token_grid, TokenGrid) else TokenGrid()

    def token_grid_of(shape: tuple[int, ...]) -> tuple[int, int] | None:
        try:
            layout = rule.layout(shape[1], patch_grid[0] if patch_grid else None)
        except ValueError:
            return None
        return layout.h, layout.w

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor):
                seen.append(LayerInfo(name, None, False))
                return
            shape = tuple(output.shape)
            floating = output.is_floating_point()
            grid = None
            if output.ndim == 4 and floating:
                grid = (shape[-2], shape[-1])
            elif output.ndim == 3 and floating:
                grid = token_grid_of(shape)
            large = grid is not None and grid[0] * grid[1] > 1
            tokens = output.ndim == 3 and floating
            seen.append(LayerInfo(name, shape, output.ndim == 4 and large, grid, tokens, name in blocks))

        return hook

    try:
        handles.extend(watch_patch_grid(model, patch_grid))
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(_strip_compile_prefix(name))))
        with preserved_modes(model), torch.no_grad():
            forward(model, images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def choose_layer(infos: list[LayerInfo]) -> tuple[LayerInfo, str]:
    """The automatic choice among the layers :func:`layer_shapes` saw, and a sentence describing it.

    For a vision transformer (a member of a repeated-block container outputs tokens) the last transformer block to
    finish, never the patch embedding. Otherwise the
    deepest (last to finish) map with both sides at least :data:`MIN_GRID`; failing that, at least
    :data:`FALLBACK_GRID`; failing that, the deepest map larger than 1x1. The sentence names the layer and its grid,
    and for a grid below :data:`MIN_GRID` says how to get a larger one.

    Raises:
        ValueError: if no layer outputs a ``(B, C, h, w)`` map larger than 1x1, or the last transformer block's
            tokens fit no grid.
    """
    blocks = [info for info in infos if info.tokens and info.block]
    if blocks:
        chosen = blocks[-1]
        if chosen.grid is None or chosen.grid[0] * chosen.grid[1] <= 1:
            raise ValueError(
                f"The last transformer block {chosen.name!r} returns tokens {chosen.shape}, which fit no patch grid "
                "larger than 1x1 by the token-grid rule; pass token_grid=TokenGrid(grid=(h, w), prefix_tokens=P) to "
                "say where the patches are, or layer= to choose another layer."
            )
        h, w = chosen.grid
        text = f"{chosen.name!r} (the last transformer block), tokens {chosen.shape} as a {h}x{w} grid"
        return chosen, text + _small_grid_advice(h, w, VIT_GRID_HINT)
    maps = [info for info in infos if info.is_map and info.grid is not None]
    if not maps:
        tiny = [info for info in infos if info.shape is not None and len(info.shape) == 4]
        detail = f" The last 4-D output was {tiny[-1].name!r} with shape {tiny[-1].shape}." if tiny else ""
        raise ValueError(
            f"No layer outputs a (B, C, h, w) map larger than 1x1 or transformer tokens.{detail} {LARGER_GRID_HINT}"
        )
    for minimum in (MIN_GRID, FALLBACK_GRID, 1):
        large = [info for info in maps if min(info.grid) >= minimum]  # type: ignore[arg-type]
        if large:
            chosen = large[-1]
            break
    h, w = chosen.grid  # type: ignore[misc]
    text = f"{chosen.name!r}, a {h}x{w} grid (output shape {chosen.shape})"
    return chosen, text + _small_grid_advice(h, w, LARGER_GRID_HINT)


def _small_grid_advice(h: int, w: int, hint: str) -> str:
    if min(h, w) >= MIN_GRID:
        return ""
    return (
        f". No layer gives a grid of at least {MIN_GRID}x{MIN_GRID} at this input size, and a {h}x{w} map can "
        f"only show coarse blobs. {hint.rstrip('.')}"
    )


def find_layer(
    model: nn.Module,
    images: Tensor,
    forward_fn: ForwardFn | None = None,
    *,
    warn: bool = True,
    token_grid: TokenGridSpec = None,
) -> str:
    """Pick a layer automatically: a ViT's last block, else the deepest spatial map large enough to show something.

    :func:`discover_layer` with a warning.

    Args:
        model: the network.
        images: ``(B, 3, H, W)`` input batch of the size that will be explained.
        forward_fn: ``forward_fn(model, images)``; default: search ``model.backbone`` when there is one, running
            only it, else ``model`` (:func:`candidate_layers`).
        warn: emit a ``UserWarning`` naming the chosen layer and its grid size.
        token_grid: the grid rule for token outputs (:mod:`tsm_lightning.tokens`).

    Returns:
        The dotted module name.

    Raises:
        ValueError: if no module produces a spatial map (or tokens on a grid) at this input size.
    """
    try:
        name, text = discover_layer(model, images, forward_fn, token_grid=token_grid)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}, inputs of shape {tuple(images.shape)}: {err}") from None
    if warn:
        warnings.warn(f"No layer given: using {text}. Pass layer= to choose another.", UserWarning, stacklevel=2)
    return name


def candidate_layers(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, token_grid: TokenGridSpec = None
) -> list[LayerInfo]:
    """The module outputs one forward shows, named relative to ``model``, where the automatic choice looks.

    With the forward rule (no ``forward_fn``): inside ``model.backbone`` when there is one (:func:`search_root`),
    running only it; with ``forward_fn``: every module of ``model``, as ``forward_fn`` runs it.
    """
    if forward_fn is None:
        prefix, root = search_root(model)
        if root is not model:
            infos = layer_shapes(root, images, token_grid=token_grid)
            return [dataclasses.replace(info, name=prefix + info.name) for info in infos]
    return layer_shapes(model, images, forward_fn, token_grid=token_grid)


def discover_layer(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, token_grid: TokenGridSpec = None
) -> tuple[str, str]:
    """The automatic layer among :func:`candidate_layers`: ``(name, a sentence naming it with its grid)``.

    The one layer search of the package (:func:`find_layer`, ``SaliencyMonitor`` and ``tsm-lightning`` use it); the
    choice is :func:`choose_layer`'s, the warning the caller's.

    Raises:
        ValueError: if no module produces a spatial map (or tokens on a grid) at this input size.
    """
    chosen, text = choose_layer(candidate_layers(model, images, forward_fn, token_grid=token_grid))
    return chosen.name, text
