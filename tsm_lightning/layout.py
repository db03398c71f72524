"""Where the channel axis of a 4-D feature map is, as the model tells it: ``(B, C, h, w)`` or ``(B, h, w, C)``.

Most layers output channels-first maps, but Swin stages (timm and torchvision), ConvNeXt's inner MLP and any layer
after a ``Permute`` output channels-last ``(B, h, w, C)`` tensors. Read as ``(B, C, h, w)`` such a tensor gives a
"7x768 grid" and a map of nothing, so the layout is never guessed from the sizes: it is read from **what the model
computes** during the forward pass (:class:`LayoutTracker`), by these rules, in order, for each module's 4-D output:

1. **the module's own type**: convolutions, batch/group/instance norms and 2-d pooling output channels-first
   maps; ``nn.Linear`` acts on the last axis, so its 4-D output is channels-last; an ``nn.LayerNorm`` normalises the
   axis its size matches (the last one: channels-last, as in Swin; the second one: channels-first, as timm's
   ``LayerNorm2d``); a ``Permute`` module (torchvision's ``ops.misc.Permute``) moves the axes of its input;
2. **the tensor it returns**: when a sub-module returned that same tensor (a ``Sequential``), its layout;
3. **its sub-modules**: the layout of the last sub-module to finish with an output of the same shape (a residual
   block: the last convolution or norm inside it; a Swin block: its LayerNorm and MLP), else of the same batch and
   grid (branches concatenated along the channels: GoogLeNet's and Inception's blocks);
4. **its input**, for a module with no sub-modules and an output of the input's shape (``ReLU``, ``Dropout``);
   the images are ``(B, C, H, W)``.

A 4-D output none of these rules place has an **unknown** layout: the automatic layer choice skips it, and capturing
it is an error that says what to pass: ``token_grid=TokenGrid(channels="last")`` (or ``"first"``), which also
overrides the rules for a model whose layout they get wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CHANNELS",
    "Channels",
    "LayoutTracker",
    "check_channels",
    "to_channels_first",
]

Channels = Literal["first", "last"]
"""Where the channel axis of a 4-D map is: ``"first"`` ``(B, C, h, w)`` or ``"last"`` ``(B, h, w, C)``."""

CHANNELS: tuple[Channels, ...] = ("first", "last")

_CHANNELS_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
    nn.Dropout2d,
)


def check_channels(channels: object) -> Channels | None:
    """Return ``channels`` if it is ``"first"``, ``"last"`` or ``None``, else raise a ``ValueError``."""
    if channels is None or channels in CHANNELS:
        return channels
    raise ValueError(
        f"channels must be 'first' ((B, C, h, w) maps), 'last' ((B, h, w, C) maps) or None (as the model tells), "
        f"got {channels!r}."
    )


def to_channels_first(output: Tensor, channels: Channels) -> Tensor:
    """A 4-D map as ``(B, C, h, w)``: ``(B, h, w, C)`` permuted (a view) when ``channels == "last"``."""
    return output.permute(0, 3, 1, 2) if channels == "last" else output


def _key(tensor: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    # Identifies a live tensor without holding it: the same storage, shape and strides are the same data (the
    # tensor-parallel DTensor outputs of tests/callbacks/test_fsdp.py have a data_ptr too).
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


def _first_4d(args: object) -> Tensor | None:
    items = args if isinstance(args, (tuple, list)) else (args,)
    for item in items:
        if isinstance(item, Tensor) and item.ndim == 4 and item.is_floating_point():
            return item
    return None


def _permute_dims(module: nn.Module) -> tuple[int, ...] | None:
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and len(dims) == 4:
        return tuple(int(d) for d in dims)
    return None


def _own_layout(module: nn.Module, output: Tensor, input_layout: Channels | None) -> Channels | None:
    """Rule 1: what the module's type says about its 4-D ``output``."""
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return "first"
    if isinstance(module, nn.Linear):
        return "last"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        size = module.normalized_shape[0]
        last, second = output.shape[-1] == size, output.shape[1] == size
        if last and not second:
            return "last"
        if second and not last:
            return "first"
        return "last" if type(module).forward is nn.LayerNorm.forward else None
    dims = _permute_dims(module)
    if dims is not None:
        source = input_layout or ("first" if dims == (0, 2, 3, 1) else "last" if dims == (0, 3, 1, 2) else None)
        if dims == (0, 2, 3, 1) and source == "first":
            return "last"
        if dims == (0, 3, 1, 2) and source == "last":
            return "first"
        if dims == (0, 1, 2, 3):
            return source
    return None


class LayoutTracker:
    """Follow the layout of every 4-D output during one forward pass (the module's rules).

    Use :meth:`attach` before the forward and remove the handles after it; :meth:`layout_of` then says what a
    module's last 4-D output was. Nothing is kept alive: tensors are identified by storage, shape and strides.

    Args:
        model: the network whose modules are followed.
        images: the forward's input, known to be ``(B, C, H, W)``.
    """

    def __init__(self, model: nn.Module, images: Tensor | None = None) -> None:
        self.model = model
        self._tensors: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Channels] = {}
        self._finished: list[tuple[str, tuple[int, ...], Channels]] = []
        self._layouts: dict[int, Channels | None] = {}
        self._inputs: dict[str, Channels | None] = {}
        self._started = False
        if images is not None and images.ndim == 4:
            self._tensors[_key(images)] = "first"

    def attach(self) -> list[RemovableHandle]:
        """Hook every module of the model; the caller removes the returned handles."""
        handles: list[RemovableHandle] = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            handles.append(module.register_forward_hook(self._hook(name, module)))
        return handles

    def _pre_hook(self, name: str) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, args: object) -> None:
            first, self._started = not self._started, True
            tensor = _first_4d(args)
            if tensor is None:
                self._inputs[name] = None
                return
            if first:  # the first module to start is called on the images, (B, C, H, W)
                self._tensors.setdefault(_key(tensor), "first")
            self._inputs[name] = self._tensors.get(_key(tensor))

        return hook

    def _hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, object, object], None]:
        leaf = next(module.children(), None) is None
        prefix = f"{name}." if name else ""

        def hook(_module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.ndim != 4 or not output.is_floating_point():
                return
            key = _key(output)
            shape = tuple(output.shape)
            input_layout = self._inputs.get(name)
            layout = _own_layout(module, output, input_layout)
            if layout is None:
                layout = self._tensors.get(key)  # rule 2 (a sub-module returned it)
            if layout is None and not leaf:  # rule 3
                layout = self._from_inside(prefix, shape)
            if layout is None and leaf:  # rule 4
                source = _first_4d(args)
                if source is not None and tuple(source.shape) == shape:
                    layout = input_layout
            self._layouts[id(module)] = layout
            if layout is not None:
                self._tensors[key] = layout
                self._finished.append((name, shape, layout))

        return hook

    def _from_inside(self, prefix: str, shape: tuple[int, ...]) -> Channels | None:
        # The last sub-module output of the same shape; failing that, of the same batch and grid (a concatenation
        # of branches along the channels, as GoogLeNet's and Inception's blocks).
        inside = [entry for entry in reversed(self._finished) if entry[0].startswith(prefix)]
        for _, child_shape, child_layout in inside:
            if child_shape == shape:
                return child_layout
        for _, child_shape, child_layout in inside:
            same_grid = child_shape[2:] == shape[2:] if child_layout == "first" else child_shape[1:3] == shape[1:3]
            if child_shape[0] == shape[0] and same_grid:
                return child_layout
        return None

    def layout_of(self, module: nn.Module) -> Channels | None:
        """The layout of ``module``'s last 4-D output so far (``None``: unknown, or no 4-D output)."""
        return self._layouts.get(id(module))
