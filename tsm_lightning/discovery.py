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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tsm_lightning.capture import (
    ForwardFn,
    _default_forward,
    _is_lightning_module,
    _strip_compile_prefix,
    is_copy_network,
    monitored_network,
    network_calls,
    preserved_modes,
)
from tsm_lightning.layout import Channels, LayoutTracker
from tsm_lightning.tokens import TokenGrid, TokenGridSpec, repeated_blocks, watch_patch_grid

__all__ = [
    "FALLBACK_GRID",
    "MIN_GRID",
    "LayerInfo",
    "Monitored",
    "NetworkCall",
    "candidate_layers",
    "choose_layer",
    "choose_monitored",
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
    """Where automatic layer discovery looks first, as ``(prefix, root)``.

    ``("backbone.", model.backbone)`` when that is a module, else the student / online network
    (:func:`~tsm_lightning.capture.monitored_network`: ``("student_backbone.", model.student_backbone)``), else
    ``("", model)``; a name found in ``root`` is relative to ``model`` once prefixed.
    """
    name = monitored_network(model)
    if name is not None:
        return f"{name}.", getattr(model, name)
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
        channels: for a 4-D output, where its channels are (``"first"``, ``"last"``, by
            :mod:`tsm_lightning.layout` or ``TokenGrid(channels=...)``); ``None`` when the model does not tell (the
            output is then no map: ``is_map`` is false and ``grid`` ``None``) or the output is not 4-D.
    """

    name: str
    shape: tuple[int, ...] | None
    is_map: bool = field(default=False)
    grid: tuple[int, int] | None = None
    tokens: bool = False
    block: bool = False
    channels: Channels | None = None


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
    tracker = LayoutTracker(model, images)

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
            channels = None
            if output.ndim == 4 and floating:
                channels = rule.channels or tracker.layout_of(module)
                if channels is not None:
                    grid = (shape[-2], shape[-1]) if channels == "first" else (shape[1], shape[2])
            elif output.ndim == 3 and floating:
                grid = token_grid_of(shape)
            large = grid is not None and grid[0] * grid[1] > 1
            tokens = output.ndim == 3 and floating
            seen.append(LayerInfo(name, shape, output.ndim == 4 and large, grid, tokens, name in blocks, channels))

        return hook

    try:
        handles.extend(tracker.attach())  # before the shape hooks, which read the layouts it finds
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


def choose_layer(infos: list[LayerInfo], *, where: str = "") -> tuple[LayerInfo, str]:
    """The automatic choice among the layers :func:`layer_shapes` saw, and a sentence describing it.

    ``where`` (e.g. ``"in 'student_backbone', not the copies 'teacher_backbone'"``) goes into the sentence after
    the grid.

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
        return chosen, text + (f" ({where})" if where else "") + _small_grid_advice(h, w, VIT_GRID_HINT)
    maps = [info for info in infos if info.is_map and info.grid is not None]
    if not maps:
        four = [info for info in infos if info.shape is not None and len(info.shape) == 4]
        untold = [info for info in four if info.channels is None]
        if untold:
            raise ValueError(
                f"No layer outputs a (B, C, h, w) map larger than 1x1 whose layout the model tells; "
                f"{untold[-1].name!r} outputs {untold[-1].shape} with its channels first or last, which the model "
                "does not tell: pass token_grid=TokenGrid(channels='first') or TokenGrid(channels='last'), or layer=."
            )
        detail = f" The last 4-D output was {four[-1].name!r} with shape {four[-1].shape}." if four else ""
        raise ValueError(
            f"No layer outputs a (B, C, h, w) map larger than 1x1 or transformer tokens.{detail} {LARGER_GRID_HINT}"
        )
    for minimum in (MIN_GRID, FALLBACK_GRID, 1):
        large = [info for info in maps if min(info.grid) >= minimum]  # type: ignore[arg-type]
        if large:
            chosen = large[-1]
            break
    h, w = chosen.grid  # type: ignore[misc]
    last = ", channels last, read as (B, C, h, w)" if chosen.channels == "last" else ""
    text = f"{chosen.name!r}, a {h}x{w} grid (output shape {chosen.shape}{last})"
    return chosen, text + (f" ({where})" if where else "") + _small_grid_advice(h, w, LARGER_GRID_HINT)


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


@dataclass(frozen=True)
class NetworkCall:
    """A ``forward_fn(model, images)`` that calls one method of one sub-network: ``model.<path>.<method>(images)``.

    Attributes:
        path: dotted name of the network in the model (``""``: the model itself).
        method: ``"forward"`` (the network is called) or a fallback such as ``"forward_features"``.
    """

    path: str
    method: str = "forward"

    def __call__(self, model: nn.Module, images: Tensor) -> object:
        """Call the network's method on ``images``; returns what it returns."""
        network = model.get_submodule(self.path) if self.path else model
        return network(images) if self.method == "forward" else getattr(network, self.method)(images)

    @property
    def code(self) -> str:
        """The same call as Python source, e.g. ``lambda module, images: module.vit.forward_features(images)``."""
        target = "module" + (f".{self.path}" if self.path else "")
        call = target if self.method == "forward" else f"{target}.{self.method}"
        return f"lambda module, images: {call}(images)"


class Monitored(NamedTuple):
    """What the automatic choice monitors (:func:`choose_monitored`).

    Attributes:
        layer: dotted name of the layer, relative to the model.
        forward_fn: ``forward_fn(model, images)`` that runs it (a :class:`NetworkCall`, or the user's).
        text: one sentence naming the layer, its grid, and the network and call chosen.
    """

    layer: str
    forward_fn: ForwardFn
    text: str


MAX_NETWORKS = 3
"""Most networks the automatic choice runs before giving up (the monitored network, the model, another child)."""


def _networks(model: nn.Module) -> list[str]:
    # Where to look, in order: the student / online network, the model itself, then the other top-level children
    # that are no copy and no head, largest first. Teacher / momentum / target copies never.
    first = monitored_network(model)
    order = ([first] if first is not None else []) + [""]
    others = [
        (sum(p.numel() for p in child.parameters()), name)
        for name, child in model.named_children()
        if name != first and not is_copy_network(name) and next(child.parameters(), None) is not None
    ]
    if _is_lightning_module(model):  # a plain network whose forward fails is not searched piecewise
        order += [name for _, name in sorted(others, key=lambda pair: -pair[0])]
    return order[:MAX_NETWORKS]


def _listing(infos: list[LayerInfo], limit: int = 6) -> str:
    usable = [info for info in infos if info.shape is not None and len(info.shape) in (3, 4)]
    if not usable:
        return "none"
    return ", ".join(f"{info.name!r} {info.shape}" for info in usable[-limit:])


def _static_candidates(model: nn.Module, network: str) -> list[str]:
    # Without a forward that runs: the repeated blocks and 2-d convolutions / norms of the network, in module order.
    root = model.get_submodule(network) if network else model
    prefix = f"{network}." if network else ""
    blocks = repeated_blocks(root)
    spatial = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)
    return [prefix + name for name, module in root.named_modules() if name in blocks or isinstance(module, spatial)]


def choose_monitored(
    model: nn.Module,
    images: Tensor,
    forward_fn: ForwardFn | None = None,
    *,
    token_grid: TokenGridSpec = None,
) -> Monitored:
    """The layer the automatic choice monitors, the call that runs it, and a sentence saying what was chosen.

    With ``forward_fn``: the layer :func:`choose_layer` picks among every module ``forward_fn`` runs. Without: the
    networks of :func:`_networks` in order, the student / online one first (:func:`search_root`; a teacher,
    momentum or target copy never), each called with ``forward`` and, when that fails, ``forward_features``
    (:func:`~tsm_lightning.capture.network_calls`); the first call that runs layers one of which
    :func:`choose_layer` accepts wins. A stub ``forward`` (one that runs no layer) counts as failing.

    Args:
        model: the network or LightningModule.
        images: ``(B, C, H, W)`` probe images of the size that will be explained.
        forward_fn: the user's ``forward_fn(model, images)``, or ``None``.
        token_grid: the grid rule for token and channels-last outputs.

    Returns:
        A :class:`Monitored`.

    Raises:
        ValueError: one line naming what was tried and why it failed, the candidate layers seen, and the exact
            ``layer=`` and ``forward_fn=`` to pass.
    """
    if forward_fn is not None:
        infos = layer_shapes(model, images, forward_fn, token_grid=token_grid)
        try:
            chosen, text = choose_layer(infos)
        except ValueError as err:
            raise ValueError(f"{str(err).rstrip('.')}. Candidate layers: {_listing(infos)}.") from None
        return Monitored(chosen.name, forward_fn, text)
    tried: list[str] = []
    seen: list[LayerInfo] = []
    for network in _networks(model):
        root = model.get_submodule(network) if network else model
        prefix = f"{network}." if network else ""
        for method in network_calls(root):
            call = NetworkCall(network, method)
            where = f"{call.code.split(': ', 1)[1]}"
            try:
                infos = layer_shapes(root, images, NetworkCall("", method), token_grid=token_grid)
            except Exception as err:  # any failure of a user's forward: try the next call
                tried.append(f"{where} failed ({type(err).__name__}: {_first_line(err)})")
                continue
            infos = [dataclasses.replace(info, name=prefix + info.name) for info in infos]
            if not infos:
                tried.append(f"{where} runs no layer (a stub forward)")
                continue
            copies = [info for info in infos if is_copy_network(info.name.split(".", 1)[0])]
            infos = [info for info in infos if info not in copies]  # a forward that runs a teacher: never it
            if not infos:
                tried.append(f"{where} runs only {copies[0].name.split('.', 1)[0]!r}, a copy that is never monitored")
                continue
            try:
                chosen, text = choose_layer(infos, where=_where(model, network, call))
            except ValueError as err:
                tried.append(f"{where}: {_first_line(err)}")
                seen = seen or infos
                continue
            return Monitored(chosen.name, call, text)
    network = monitored_network(model) or ""
    static = _static_candidates(model, network)
    listing = _listing(seen) if seen else ", ".join(repr(name) for name in static[-6:]) or "none"
    suggestion = static[-1] if static else (f"{network}.<layer>" if network else "<layer>")
    if seen:
        usable = [info.name for info in seen if info.shape is not None and len(info.shape) in (3, 4)]
        suggestion = usable[-1] if usable else suggestion
    calls = network_calls(model.get_submodule(network) if network else model)
    call = NetworkCall(network, calls[-1])
    raise ValueError(
        f"found no layer to monitor in {type(model).__name__} for images {tuple(images.shape)}: "
        f"{'; '.join(tried)}. Candidate layers: {listing}. Pass layer={suggestion!r} and forward_fn={call.code} "
        "(with the arguments your training step passes, if it needs more than the images)."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _where(model: nn.Module, network: str, call: NetworkCall) -> str:
    # "in 'student_backbone', not the copies 'teacher_backbone', 'teacher_head'; called as ...forward_features(...)"
    parts = []
    if network:
        copies = [repr(name) for name, _ in model.named_children() if is_copy_network(name)]
        parts.append(f"in {network!r}" + (f", not the copies {', '.join(copies)}" if copies else ""))
    if call.method != "forward":
        parts.append(f"called as {call.code.split(': ', 1)[1]} because forward fails on images alone")
    return "; ".join(parts)


def candidate_layers(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, token_grid: TokenGridSpec = None
) -> list[LayerInfo]:
    """The module outputs one forward shows, named relative to ``model``, where the automatic choice looks.

    With the forward rule (no ``forward_fn``): inside the network :func:`choose_monitored` would run (the backbone
    or student network when there is one: :func:`search_root`), called as it would call it; with ``forward_fn``:
    every module of ``model``, as ``forward_fn`` runs it.
    """
    if forward_fn is None:
        for network in _networks(model):
            root = model.get_submodule(network) if network else model
            prefix = f"{network}." if network else ""
            for method in network_calls(root):
                try:
                    infos = layer_shapes(root, images, NetworkCall("", method), token_grid=token_grid)
                except Exception:  # as choose_monitored: try the next call
                    continue
                if infos:
                    return [dataclasses.replace(info, name=prefix + info.name) for info in infos]
    return layer_shapes(model, images, forward_fn, token_grid=token_grid)


def discover_layer(
    model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, token_grid: TokenGridSpec = None
) -> tuple[str, str]:
    """The automatic layer: ``(name, a sentence naming it with its grid)``; :func:`choose_monitored`'s choice.

    The one layer search of the package (:func:`find_layer`, ``SaliencyMonitor`` and ``tsm-lightning`` use it); the
    warning is the caller's. The forward that runs the layer is :func:`tsm_lightning.pipeline.forward_rule`'s.

    Raises:
        ValueError: if no module produces a spatial map (or tokens on a grid) at this input size.
    """
    monitored = choose_monitored(model, images, forward_fn, token_grid=token_grid)
    return monitored.layer, monitored.text
