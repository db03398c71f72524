"""Capture one layer's output during a forward pass, with no lasting effect on the model.

:func:`capture` registers a forward hook on one named sub-module, puts the model in eval mode under
``torch.no_grad()``, and in ``finally`` removes the hook and restores **each** sub-module's own
``training`` flag (a model with a frozen, eval-mode backbone stays that way). A transformer block's ``(B, T, D)``
tokens are turned into a ``(B, D, h, w)`` map on the way (:mod:`tsm_lightning.tokens`: the grid read from the
model's patch embedding in the same forward pass), and on request the class token's attention of one attention
module is read in the same pass. :func:`find_layer` picks a layer automatically (:func:`choose_layer`): for a
vision transformer the last block, else the deepest module whose output is a ``(B, C, h, w)`` map of at least
:data:`MIN_GRID` x :data:`MIN_GRID`, else of at least :data:`FALLBACK_GRID` x :data:`FALLBACK_GRID`, else any map
larger than 1x1, always saying which grid it got and, when it is small, how to get a larger one.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tsm_lightning.checks import check_feature_map
from tsm_lightning.tokens import (
    TokenGridSpec,
    TokenLayout,
    attention_rows,
    find_patch_embedding,
    patch_grid_hook,
    repeated_blocks,
    resolve_grid,
    to_feature_map,
)

__all__ = [
    "FALLBACK_GRID",
    "MIN_GRID",
    "Capture",
    "LayerInfo",
    "candidate_layers",
    "capture",
    "check_feature_map",
    "choose_layer",
    "discover_layer",
    "find_layer",
    "forward_target",
    "full_tensor",
    "get_layer",
    "layer_shapes",
    "preserved_modes",
    "search_root",
]

ForwardFn = Callable[[nn.Module, Tensor], object]

MIN_GRID = 7
"""Automatic layer choice prefers the deepest map at least this many cells on each side (ResNet layer4 at 224 px)."""

FALLBACK_GRID = 4
"""Below :data:`MIN_GRID`, the deepest map at least this large is taken, with a warning."""

LARGER_GRID_HINT = (
    "For a larger grid feed larger images (a ResNet's layer4 is 7x7 at 224 px) or give the network a CIFAR-style "
    "stem (3x3 stride-1 first convolution, no max-pool), or pass layer= to choose an earlier layer."
)
VIT_GRID_HINT = "For a larger grid feed larger images or use a smaller patch size (grid = image size / patch size)."


def _default_forward(model: nn.Module, images: Tensor) -> object:
    return model(images)


def _strip_compile_prefix(name: str) -> str:
    return name.replace("_orig_mod.", "")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (dotted path; ``Sequential`` indices such as ``"backbone.7"``).

    Models wrapped by ``torch.compile`` are looked through: ``"layer4"`` finds ``"_orig_mod.layer4"``.

    Raises:
        ValueError: if no sub-module has that name; the message lists close matches.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"layer must be a non-empty dotted module name such as 'layer4' or 'backbone.7', got {name!r}."
        )
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    aliases = {_strip_compile_prefix(n): m for n, m in modules.items()}
    if name in aliases:
        return aliases[name]
    names = [n for n in aliases if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"No layer named {name!r} in {type(model).__name__}.{hint} List all names with "
        "[name for name, _ in model.named_modules()] or `tsm-lightning layers`."
    )


def _is_lightning_module(model: nn.Module) -> bool:
    # Without importing Lightning: both lightning.pytorch's and pytorch_lightning's class are named so.
    return any(
        cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        for cls in type(model).__mro__
    )


def forward_target(model: nn.Module, layer: str) -> nn.Module:
    """The module to call on the images so that ``layer`` runs: the one forward rule of the package.

    For a dotted name in a LightningModule, or under ``model.backbone`` in any model, the top-level child named by
    its first part (``model.backbone`` for ``"backbone.7"``), so that only the online backbone of an SSL model runs
    (not MoCo's momentum encoder, not SwAV's prototypes, not a ``forward`` that expects several crops). Otherwise
    ``model`` itself: a name directly under ``model``, or a plain network such as a torchvision ResNet, whose
    ``layer4`` cannot be called on images.
    """
    head = layer.split(".", 1)[0]
    child = getattr(model, head, None)
    if "." not in layer or not isinstance(child, nn.Module):
        return model
    return child if head == "backbone" or _is_lightning_module(model) else model


def full_tensor(output: Tensor) -> Tensor:
    """``output`` whole on every rank: a ``DTensor`` (a tensor-parallel layer's output) is gathered, else unchanged.

    Collective for a ``DTensor``: call it on every rank.
    """
    for path in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5, torch 2.4
        dtensor = getattr(sys.modules.get(path), "DTensor", None)
        if dtensor is not None:
            return output.full_tensor() if isinstance(output, dtensor) else output
    return output  # DTensor was never imported, so no tensor can be one


def search_root(model: nn.Module) -> tuple[str, nn.Module]:
    """Where automatic layer discovery looks, as ``(prefix, root)``.

    ``("backbone.", model.backbone)`` when that is a module, else ``("", model)``; a name found in ``root`` is
    relative to ``model`` once prefixed.
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return "backbone.", backbone
    return "", model


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, and restore every sub-module's own ``training`` flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@dataclass
class Capture:
    """Holder for the captured output, filled by the hooks during the forward pass.

    Attributes:
        name: the layer's name.
        output: the layer's first output during the forward pass (detached when it is a feature map; ``(B, T, D)``
            tokens already turned into a ``(B, D, h, w)`` map), or ``None`` before it runs.
        calls: how many times the layer ran inside the context.
        feature_map: whether the output must be a ``(B, C, h, w)`` map or transformer tokens (checked when the hook
            runs, so that a wrong layer fails at once with a clear message); ``False`` keeps any output.
        token_grid: how tokens become a map (:data:`~tsm_lightning.tokens.TokenGridSpec`).
        layout: where the patches were among the tokens (``None`` for a convolutional map or a user callable).
        attention: ``(B, heads, T)`` class-token attention of the attention module asked for, or ``None``.
    """

    name: str
    output: object = None
    calls: int = 0
    feature_map: bool = True
    token_grid: TokenGridSpec = None
    layout: TokenLayout | None = None
    attention: Tensor | None = None
    _patch_grid: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        self.calls += 1
        if self.calls > 1:
            return
        if not self.feature_map:
            self.output = output
            return
        if isinstance(output, Tensor) and output.ndim == 3 and output.is_floating_point():
            patch_grid = self._patch_grid[0] if self._patch_grid else None
            output, self.layout = to_feature_map(output.detach(), self.token_grid, patch_grid, self.name)
        self.output = check_feature_map(output, self.name).detach()

    def _attention_hook(self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        if self.attention is None:
            self.attention = attention_rows(module, args, kwargs).detach()

    @property
    def value(self) -> object:
        """The layer's first output, whatever it is.

        Raises:
            RuntimeError: if the layer did not run during the forward pass.
        """
        if self.calls == 0:
            raise RuntimeError(
                f"Layer {self.name!r} did not run during the forward pass; check that the forward function "
                "calls the module that contains it."
            )
        return self.output

    @property
    def features(self) -> Tensor:
        """The captured ``(B, C, h, w)`` feature map (with ``feature_map=True``, the default).

        Raises:
            RuntimeError: if the layer did not run during the forward pass.
        """
        value = self.value
        assert isinstance(value, Tensor), "features needs capture(..., feature_map=True)"
        return value


@contextmanager
def capture(
    model: nn.Module,
    layer: str,
    *,
    feature_map: bool = True,
    token_grid: TokenGridSpec = None,
    attention: str | None = None,
) -> Iterator[Capture]:
    """Capture the output of ``model``'s sub-module ``layer`` during forward passes inside the block.

    Inside the block the model is in eval mode and autograd is off; on exit (also after an exception) the hooks
    are removed and each sub-module's ``training`` flag is restored. Parameters and gradients are not touched.
    If the layer runs several times, the first output is kept (``Capture.calls`` counts the runs).

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18()
        >>> with capture(net, "layer4") as cap:
        ...     _ = net(torch.randn(2, 3, 64, 64))
        >>> tuple(cap.features.shape)
        (2, 512, 2, 2)

    Args:
        model: the network.
        layer: dotted name of the sub-module, e.g. ``"layer4"``, ``"backbone.7"``,
            ``"encoder.layers.encoder_layer_11"``.
        feature_map: require a ``(B, C, h, w)`` feature map or ``(B, T, D)`` tokens, which become one
            (``False``: keep any output, e.g. an embedding).
        token_grid: how tokens become a map (:mod:`tsm_lightning.tokens`; default: the model's patch grid).
        attention: dotted name of an attention module whose class-token attention to read in the same pass
            (:func:`tsm_lightning.tokens.find_attention`), or ``None``.

    Yields:
        A :class:`Capture` whose ``features`` hold the layer output after the forward pass.
    """
    module = get_layer(model, layer)
    holder = Capture(layer, feature_map=feature_map, token_grid=token_grid)
    handles = [module.register_forward_hook(holder._hook)]
    try:
        patch = find_patch_embedding(model)
        if patch is not None and feature_map:
            handles.append(patch.register_forward_hook(patch_grid_hook(holder._patch_grid)))
        if attention is not None:
            target = get_layer(model, attention)
            handles.append(target.register_forward_pre_hook(holder._attention_hook, with_kwargs=True))
        with preserved_modes(model), torch.no_grad():
            yield holder
    finally:
        for handle in handles:
            handle.remove()


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
    grid_rule = token_grid if token_grid is not None and not callable(token_grid) else None

    def token_grid_of(shape: tuple[int, ...]) -> tuple[int, int] | None:
        try:
            layout = resolve_grid(
                shape[1],
                grid=grid_rule.grid if grid_rule else None,
                prefix_tokens=grid_rule.prefix_tokens if grid_rule else None,
                patch_grid=patch_grid[0] if patch_grid else None,
            )
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
        patch = find_patch_embedding(model)
        if patch is not None:
            handles.append(patch.register_forward_hook(patch_grid_hook(patch_grid)))
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
