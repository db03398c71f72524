"""Capture one layer's output during a forward pass, with no lasting effect on the model.

:func:`capture` registers a forward hook on one named sub-module, puts the model in eval mode under
``torch.no_grad()``, and in ``finally`` removes the hook and restores **each** sub-module's own
``training`` flag (a model with a frozen, eval-mode backbone stays that way). :func:`find_layer` picks a
layer automatically (:func:`choose_layer`): the deepest module whose output is a ``(B, C, h, w)`` map of at least
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
    """Holder for the captured output, filled by the hook during the forward pass.

    Attributes:
        name: the layer's name.
        output: the layer's first output during the forward pass (detached when it is a feature map), or ``None``
            before it runs.
        calls: how many times the layer ran inside the context.
        feature_map: whether the output must be a ``(B, C, h, w)`` map (checked when the hook runs, so that a wrong
            layer fails at once with a clear message); ``False`` keeps any output.
    """

    name: str
    output: object = None
    calls: int = 0
    feature_map: bool = True

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        self.calls += 1
        if self.calls == 1:
            self.output = check_feature_map(output, self.name).detach() if self.feature_map else output

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
def capture(model: nn.Module, layer: str, *, feature_map: bool = True) -> Iterator[Capture]:
    """Capture the output of ``model``'s sub-module ``layer`` during forward passes inside the block.

    Inside the block the model is in eval mode and autograd is off; on exit (also after an exception) the hook
    is removed and each sub-module's ``training`` flag is restored. Parameters and gradients are not touched.
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
        layer: dotted name of the sub-module, e.g. ``"layer4"``, ``"backbone.7"``.
        feature_map: require a ``(B, C, h, w)`` feature map (``False``: keep any output, e.g. an embedding).

    Yields:
        A :class:`Capture` whose ``features`` hold the layer output after the forward pass.
    """
    module = get_layer(model, layer)
    holder = Capture(layer, feature_map=feature_map)
    handle = module.register_forward_hook(holder._hook)
    try:
        with preserved_modes(model), torch.no_grad():
            yield holder
    finally:
        handle.remove()


@dataclass(frozen=True)
class LayerInfo:
    """A candidate layer seen during a forward pass.

    Attributes:
        name: dotted module name.
        shape: output shape, or ``None`` if the output was not a tensor.
        is_map: whether the output is a usable ``(B, C, h, w)`` map with ``h * w > 1``.
    """

    name: str
    shape: tuple[int, ...] | None
    is_map: bool = field(default=False)


def layer_shapes(model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None) -> list[LayerInfo]:
    """Run one forward pass and list every named sub-module's output shape, in the order modules finished.

    The model is left exactly as it was (modes restored, hooks removed).

    Args:
        model: the network.
        images: ``(B, 3, H, W)`` input batch.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.

    Returns:
        One :class:`LayerInfo` per module call, in completion order (the root module is excluded).
    """
    forward = forward_fn or _default_forward
    seen: list[LayerInfo] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, Tensor):
                shape = tuple(output.shape)
                is_map = output.ndim == 4 and output.shape[-2] * output.shape[-1] > 1 and output.is_floating_point()
                seen.append(LayerInfo(name, shape, is_map))
            else:
                seen.append(LayerInfo(name, None, False))

        return hook

    try:
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

    The deepest (last to finish) map with both sides at least :data:`MIN_GRID`; failing that, at least
    :data:`FALLBACK_GRID`; failing that, the deepest map larger than 1x1. The sentence names the layer and its grid,
    and for a grid below :data:`MIN_GRID` says how to get a larger one.

    Raises:
        ValueError: if no layer outputs a ``(B, C, h, w)`` map larger than 1x1.
    """
    maps = [info for info in infos if info.is_map and info.shape is not None]
    if not maps:
        tiny = [info for info in infos if info.shape is not None and len(info.shape) == 4]
        detail = f" The last 4-D output was {tiny[-1].name!r} with shape {tiny[-1].shape}." if tiny else ""
        raise ValueError(f"No layer outputs a (B, C, h, w) map larger than 1x1.{detail} {LARGER_GRID_HINT}")
    for minimum in (MIN_GRID, FALLBACK_GRID, 1):
        large = [info for info in maps if min(info.shape[-2:]) >= minimum]  # type: ignore[index]
        if large:
            chosen = large[-1]
            break
    h, w = chosen.shape[-2:]  # type: ignore[index]
    text = f"{chosen.name!r}, a {h}x{w} grid (output shape {chosen.shape})"
    if min(h, w) < MIN_GRID:
        text += (
            f". No layer gives a grid of at least {MIN_GRID}x{MIN_GRID} at this input size, and a {h}x{w} map can "
            f"only show coarse blobs. {LARGER_GRID_HINT}"
        )
    return chosen, text


def find_layer(model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None, *, warn: bool = True) -> str:
    """Pick a layer automatically: the deepest spatial map large enough to show something (:func:`discover_layer`).

    Args:
        model: the network.
        images: ``(B, 3, H, W)`` input batch of the size that will be explained.
        forward_fn: ``forward_fn(model, images)``; default: search ``model.backbone`` when there is one, running
            only it, else ``model`` (:func:`candidate_layers`).
        warn: emit a ``UserWarning`` naming the chosen layer and its grid size.

    Returns:
        The dotted module name.

    Raises:
        ValueError: if no module produces a spatial map at this input size.
    """
    try:
        name, text = discover_layer(model, images, forward_fn)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}, inputs of shape {tuple(images.shape)}: {err}") from None
    if warn:
        warnings.warn(f"No layer given: using {text}. Pass layer= to choose another.", UserWarning, stacklevel=2)
    return name


def candidate_layers(model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None) -> list[LayerInfo]:
    """The module outputs one forward shows, named relative to ``model``, where the automatic choice looks.

    With the forward rule (no ``forward_fn``): inside ``model.backbone`` when there is one (:func:`search_root`),
    running only it; with ``forward_fn``: every module of ``model``, as ``forward_fn`` runs it.
    """
    if forward_fn is None:
        prefix, root = search_root(model)
        if root is not model:
            return [dataclasses.replace(info, name=prefix + info.name) for info in layer_shapes(root, images)]
    return layer_shapes(model, images, forward_fn)


def discover_layer(model: nn.Module, images: Tensor, forward_fn: ForwardFn | None = None) -> tuple[str, str]:
    """The automatic layer among :func:`candidate_layers`: ``(name, a sentence naming it with its grid)``.

    The one layer search of the package (:func:`find_layer`, ``SaliencyMonitor`` and ``tsm-lightning`` use it); the
    choice is :func:`choose_layer`'s, the warning the caller's.

    Raises:
        ValueError: if no module produces a spatial map at this input size.
    """
    chosen, text = choose_layer(candidate_layers(model, images, forward_fn))
    return chosen.name, text
