"""Capture one layer's output during a forward pass, with no lasting effect on the model.

:func:`capture` registers a forward hook on one named sub-module, puts the model in eval mode under
``torch.no_grad()``, and in ``finally`` removes the hook and restores **each** sub-module's own
``training`` flag (a model with a frozen, eval-mode backbone stays that way). A transformer block's ``(B, T, D)``
tokens are turned into a ``(B, D, h, w)`` map on the way (:mod:`tsm_lightning.tokens`: the grid read from the
model's patch embedding in the same forward pass), and on request the class token's attention of one attention
module is read in the same pass. :func:`forward_target` is the package's one forward rule.

Choosing a layer automatically (``find_layer``, ``choose_layer``, ...) lives in :mod:`tsm_lightning.discovery`.
"""

from __future__ import annotations

import difflib
import sys
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
    to_feature_map,
    watch_patch_grid,
)

__all__ = [
    "Capture",
    "ForwardFn",
    "capture",
    "check_feature_map",
    "forward_target",
    "full_tensor",
    "get_layer",
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
