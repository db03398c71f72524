"""Capture one layer's output during a forward pass, with no lasting effect on the model.

:func:`capture` registers a forward hook on one named sub-module, puts the model in eval mode under
``torch.no_grad()``, and in ``finally`` removes the hook and restores **each** sub-module's own
``training`` flag (a model with a frozen, eval-mode backbone stays that way). A transformer block's ``(B, T, D)``
tokens are turned into a ``(B, D, h, w)`` map on the way (:mod:`tsm_lightning.tokens`: the grid read from the
model's patch embedding in the same forward pass), a channels-last ``(B, h, w, C)`` output (a Swin stage) is put
channels-first as the model tells (:mod:`tsm_lightning.layout`), and on request the class token's attention of one
attention module is read in the same pass. :func:`forward_target` is the package's one forward rule.

Choosing a layer automatically (``find_layer``, ``choose_layer``, ...) lives in :mod:`tsm_lightning.discovery`.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tsm_lightning.checks import check_feature_map
from tsm_lightning.layout import Channels, LayoutTracker, to_channels_first
from tsm_lightning.tokens import (
    TokenGrid,
    TokenGridSpec,
    TokenLayout,
    attention_rows,
    to_feature_map,
    watch_patch_grid,
)

__all__ = [
    "FALLBACK_METHODS",
    "Capture",
    "ForwardFn",
    "call_network",
    "capture",
    "check_feature_map",
    "forward_target",
    "full_tensor",
    "get_layer",
    "is_copy_network",
    "monitored_network",
    "network_calls",
    "preserved_modes",
]


ForwardFn = Callable[[nn.Module, Tensor], object]


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


_COPY_WORDS = ("teacher", "momentum", "target", "ema", "shadow")
"""Name parts of the copies an SSL module trains against (DINO's teacher, MoCo's and BYOL's momentum / target
networks): never monitored."""
_HEAD_WORDS = ("head", "projector", "projection", "predictor", "prediction", "prototype", "criterion", "loss")
_STUDENT_WORDS = ("student", "online")
_NETWORK_WORDS = ("backbone", "encoder", "vit", "trunk", "net", "model")


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[^a-z]+", name.lower()) if word]


def is_copy_network(name: str) -> bool:
    """Whether a module name names a teacher, momentum, target or EMA copy (never monitored).

    By its words: one starting with ``teacher``, ``momentum``, ``target``, ``ema`` or ``shadow``
    (``teacher_backbone``, ``backbone_momentum``, ``target_network``), or MoCo's key encoder (``encoder_k``).
    """
    words = _words(name)
    return any(word.startswith(_COPY_WORDS) for word in words) or (len(words) > 1 and words[-1] in ("k", "key"))


def _is_head(name: str) -> bool:
    return any(word.startswith(_HEAD_WORDS) for word in _words(name))


def monitored_network(model: nn.Module) -> str | None:
    """The top-level child of ``model`` that is the network to monitor, by its name, or ``None``.

    In order: ``backbone``; a child named as a student / online network (``student_backbone``, ``online_network``;
    DINO, DINOv2, iBOT, BYOL); in a LightningModule, a child named as a network (``encoder``, ``vit``, ``net``,
    ``model``...). Teacher, momentum, target and EMA copies (``teacher_backbone``, ``backbone_momentum``) and heads,
    projectors, prototypes and losses are never it.
    """
    if isinstance(getattr(model, "backbone", None), nn.Module):
        return "backbone"
    names = [name for name, _ in model.named_children() if not is_copy_network(name) and not _is_head(name)]
    students = [name for name in names if _is_student(name)]
    networks = [name for name in names if any(word in name.lower() for word in _NETWORK_WORDS)]
    ranked = [name for name in students if name in networks] + students
    if ranked:
        return ranked[0]
    if networks and _is_lightning_module(model):
        return networks[0]
    return None


def _is_student(name: str) -> bool:
    # student_backbone, online_network, MoCo's encoder_q / query_encoder
    words = _words(name)
    return any(word.startswith(_STUDENT_WORDS) for word in words) or (
        len(words) > 1 and (words[-1] in ("q", "query") or words[0] == "query")
    )


def forward_target(model: nn.Module, layer: str) -> nn.Module:
    """The module to call on the images so that ``layer`` runs: the one forward rule of the package.

    For a dotted name in a LightningModule, or under the monitored network of any model (``model.backbone``, a
    student / online network: :func:`monitored_network`), the top-level child named by its first part
    (``model.backbone`` for ``"backbone.7"``), so that only the online backbone of an SSL model runs (not MoCo's
    momentum encoder, not SwAV's prototypes, not a ``forward`` that expects several crops or is a stub). Otherwise
    ``model`` itself: a name directly under ``model``, or a plain network such as a torchvision ResNet, whose
    ``layer4`` cannot be called on images. :func:`call_network` calls it.
    """
    head = layer.split(".", 1)[0]
    child = getattr(model, head, None)
    if "." not in layer or not isinstance(child, nn.Module):
        return model
    if head == "backbone" or _is_lightning_module(model) or head == monitored_network(model):
        return child
    return model  # (monitored_network names only backbone or student / online children outside a LightningModule)


FALLBACK_METHODS = ("forward_features",)
"""What :func:`call_network` calls when a network's ``forward`` fails on images alone: timm's ``forward_features``
(a ViT whose ``forward`` needs the arguments its training step passes, as lightly's AIM)."""

_FALLBACK_ERRORS = (TypeError, NotImplementedError, AttributeError, RuntimeError)


def network_calls(module: nn.Module) -> list[str]:
    """The methods :func:`call_network` may call on images: ``"forward"``, then the :data:`FALLBACK_METHODS` it has."""
    return ["forward"] + [name for name in FALLBACK_METHODS if callable(getattr(module, name, None))]


def call_network(module: nn.Module, images: Tensor) -> object:
    """``module(images)``, or ``module.forward_features(images)`` when that ``forward`` fails on images alone.

    The fallback is taken for a ``TypeError``, ``NotImplementedError``, ``AttributeError`` or ``RuntimeError`` (out
    of memory excepted) of ``forward`` and only when the module has ``forward_features``; otherwise, or when the
    fallback fails too, ``forward``'s error is raised.
    """
    try:
        return module(images)
    except _FALLBACK_ERRORS as err:
        if isinstance(err, torch.OutOfMemoryError) or len(network_calls(module)) == 1:
            raise
        for name in network_calls(module)[1:]:
            try:
                return getattr(module, name)(images)
            except _FALLBACK_ERRORS:
                continue
        raise


def full_tensor(output: Tensor) -> Tensor:
    """``output`` whole on every rank: a ``DTensor`` (a tensor-parallel layer's output) is gathered, else unchanged.

    Collective for a ``DTensor``: call it on every rank.
    """
    for path in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5, torch 2.4
        dtensor = getattr(sys.modules.get(path), "DTensor", None)
        if dtensor is not None:
            return output.full_tensor() if isinstance(output, dtensor) else output
    return output  # DTensor was never imported, so no tensor can be one


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
        channels: where the channels of a 4-D output were (``"first"`` or ``"last"``, :mod:`tsm_lightning.layout`;
            ``None`` for tokens).
        attention_error: why the attention module's input could not be read as class-token attention (window
            attention, inputs that are not ``(B, T, D)`` tokens), or ``None``.
    """

    name: str
    output: object = None
    calls: int = 0
    feature_map: bool = True
    token_grid: TokenGridSpec = None
    layout: TokenLayout | None = None
    attention: Tensor | None = None
    channels: Channels | None = None
    attention_error: str | None = None
    _patch_grid: list[tuple[int, int]] = field(default_factory=list, repr=False)
    _tracker: LayoutTracker | None = field(default=None, repr=False)

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
        elif isinstance(output, Tensor) and output.ndim == 4 and output.is_floating_point():
            self.channels = self._channels(module, tuple(output.shape))
            output = to_channels_first(output, self.channels)
        self.output = check_feature_map(output, self.name).detach()

    def _channels(self, module: nn.Module, shape: tuple[int, ...]) -> Channels:
        if isinstance(self.token_grid, TokenGrid) and self.token_grid.channels is not None:
            return self.token_grid.channels
        channels = self._tracker.layout_of(module) if self._tracker is not None else "first"
        if channels is None:
            raise ValueError(
                f"Layer {self.name!r} outputs {shape} and the model does not tell whether its channels come first "
                "(B, C, h, w) or last (B, h, w, C); pass token_grid=TokenGrid(channels='first') or "
                "TokenGrid(channels='last') (tsm-lightning: --channels first|last)."
            )
        return channels

    def _attention_hook(self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        if self.attention is None and self.attention_error is None:
            try:
                self.attention = attention_rows(module, args, kwargs).detach()
            except ValueError as err:  # not class-token attention: the caller decides whether that is an error
                self.attention_error = str(err)

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
    handles = []
    try:
        if feature_map:  # the layout hooks run before the capture's own hook on the same module
            holder._tracker = LayoutTracker(model)
            handles.extend(holder._tracker.attach())
        handles.append(module.register_forward_hook(holder._hook))
        if feature_map:
            handles.extend(watch_patch_grid(model, holder._patch_grid))
        if attention is not None:
            target = get_layer(model, attention)
            handles.append(target.register_forward_pre_hook(holder._attention_hook, with_kwargs=True))
        with preserved_modes(model), torch.no_grad():
            yield holder
    finally:
        for handle in handles:
            handle.remove()
