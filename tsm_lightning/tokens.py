"""Vision-transformer tokens as feature maps, and the modules of a ViT the package needs to find.

A transformer block returns a token sequence ``(B, T, D)``: ``P`` leading *prefix* tokens (the class token, then any
register tokens) followed by ``N = h * w`` patch tokens in raster order (torchvision's ``VisionTransformer``, timm,
DINO, DINOv2 and lightly's ViT wrappers all use this layout). Without its prefix the sequence is a ``(B, D, h, w)``
feature map, to which every saliency method applies unchanged.

**The grid rule** (:func:`resolve_grid`), in order:

1. ``TokenGrid(grid=(h, w))``: the last ``h * w`` tokens are the patches;
2. the model's own patch grid: the output size of its patch embedding (:func:`find_patch_embeddings`: a
   ``Conv2d`` whose kernel equals its stride, e.g. torchvision's ``conv_proj``, timm's ``patch_embed.proj``; the
   first of them to run), read during the same forward pass; so non-square images give non-square grids;
3. a square: the largest ``s`` with ``s * s <= T`` and at most :data:`MAX_PREFIX_TOKENS` tokens left over.

The ``P = T - h * w`` leading tokens are dropped; ``TokenGrid(prefix_tokens=P)`` states ``P`` instead (checked
against the grid when both are known). A token count that fits no grid is an error that says so. Anything else
(tokens not in that layout) is a callable ``token_grid(tokens) -> (B, D, h, w)`` of the user's.

**Layer discovery** takes, for a ViT, the last transformer block (:func:`repeated_blocks`), never the patch
embedding; **the class-token attention** is read from the last attention module (:func:`find_attention`):
``torch.nn.MultiheadAttention`` (torchvision), a timm-style module with a ``qkv`` linear layer and ``num_heads``
(timm, DINO, DINOv2), or a Hugging Face module with separate query / key projections (``ViTModel``,
``Dinov2Model``), using the block's own weights and the input the block gives it. Only class-token attention counts:
window attention (Swin) is never chosen, and tokens without a class token give no attention map. (About 480 lines:
the grid rule, the block and attention-module search and three attention readers, each documented, belong
together.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tsm_lightning.core.attention import class_token_attention
from tsm_lightning.layout import Channels, check_channels

__all__ = [
    "MAX_PREFIX_TOKENS",
    "TokenGrid",
    "TokenGridSpec",
    "TokenLayout",
    "attention_rows",
    "check_token_grid",
    "find_attention",
    "find_patch_embeddings",
    "patch_attention",
    "repeated_blocks",
    "resolve_grid",
    "to_feature_map",
    "tokens_to_grid",
    "watch_patch_grid",
]

MAX_PREFIX_TOKENS = 8
"""Most leading (class and register) tokens the square-grid fallback drops: one class token and up to seven
registers (DINOv2 uses four). A larger prefix needs ``TokenGrid(prefix_tokens=...)`` or a known grid."""


@dataclass(frozen=True)
class TokenGrid:
    """How a ``(B, T, D)`` token sequence becomes a ``(B, D, h, w)`` feature map (see the module's grid rule).

    It also says where the channels of a layer's 4-D output are (:mod:`tsm_lightning.layout`), so that the one
    ``token_grid=`` argument describes every layout a layer can have.

    Attributes:
        grid: ``(h, w)`` patch grid; ``None``: the model's patch grid, else a square.
        prefix_tokens: number of leading tokens to drop (class + registers); ``None``: ``T - h * w``.
        channels: for 4-D outputs, ``"first"`` (read as ``(B, C, h, w)``) or ``"last"`` (``(B, h, w, C)``, as Swin
            stages), applied to every 4-D output; ``None``: as the model tells (:mod:`tsm_lightning.layout`).
    """

    grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None
    channels: Channels | None = None

    def __post_init__(self) -> None:
        if self.grid is not None and (
            not isinstance(self.grid, tuple)
            or len(self.grid) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.grid)
        ):
            raise ValueError(f"TokenGrid.grid must be a tuple (h, w) of positive integers, got {self.grid!r}.")
        prefix = self.prefix_tokens
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
            raise ValueError(f"TokenGrid.prefix_tokens must be an integer >= 0 or None, got {prefix!r}.")
        try:
            check_channels(self.channels)
        except ValueError as err:
            raise ValueError(f"TokenGrid.{err}") from None

    def layout(self, num_tokens: int, patch_grid: tuple[int, int] | None = None) -> TokenLayout:
        """Where the patches are among ``num_tokens`` tokens by this rule (:func:`resolve_grid`).

        Args:
            num_tokens: ``T``, the sequence length.
            patch_grid: the model's patch grid read from its patch embedding, or ``None``.

        Raises:
            ValueError: if the tokens fit no grid.
        """
        return resolve_grid(num_tokens, grid=self.grid, prefix_tokens=self.prefix_tokens, patch_grid=patch_grid)


TokenGridSpec = TokenGrid | Callable[[Tensor], Tensor] | None
"""What the ``token_grid=`` arguments accept: a :class:`TokenGrid`, a callable ``(B, T, D) -> (B, D, h, w)``, or
``None`` (the default rule)."""


class TokenLayout(NamedTuple):
    """Where the patches are in a token sequence: ``prefix`` leading tokens, then an ``h x w`` grid."""

    prefix: int
    h: int
    w: int


def check_token_grid(token_grid: object) -> TokenGridSpec:
    """Return ``token_grid`` if it is a :class:`TokenGrid`, a callable or ``None``, else raise a ``ValueError``."""
    if token_grid is None or isinstance(token_grid, TokenGrid) or callable(token_grid):
        return token_grid
    raise ValueError(
        "token_grid must be a TokenGrid(grid=(h, w), prefix_tokens=P, channels='first'|'last'), a callable "
        f"(B, T, D) -> (B, D, h, w), or None, got {type(token_grid).__name__}."
    )


def resolve_grid(
    num_tokens: int,
    *,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> TokenLayout:
    """Where the ``h x w`` patches are among ``num_tokens`` tokens (the module's grid rule).

    Args:
        num_tokens: ``T``, the sequence length.
        grid: the user's ``(h, w)``, or ``None``.
        prefix_tokens: the user's number of leading tokens to drop, or ``None``.
        patch_grid: the model's patch grid read from its patch embedding, or ``None``.

    Returns:
        The :class:`TokenLayout`.

    Raises:
        ValueError: if the tokens fit no grid by the rule, saying why and what to pass.
    """
    fix = "pass token_grid=TokenGrid(grid=(h, w), prefix_tokens=P) to say where the patches are"
    known = grid or patch_grid
    if known is not None:
        h, w = known
        source = "token_grid.grid" if grid is not None else "the model's patch embedding"
        prefix = num_tokens - h * w if prefix_tokens is None else prefix_tokens
        if prefix < 0 or prefix + h * w != num_tokens:
            given = f"{prefix_tokens} prefix tokens + " if prefix_tokens is not None else ""
            raise ValueError(
                f"{num_tokens} tokens do not fit {given}a {h}x{w} patch grid ({source}) = {h * w} patches. Masked or "
                f"pooled token sequences cannot be put back on a grid; otherwise {fix}."
            )
        return TokenLayout(prefix, h, w)
    if prefix_tokens is not None:
        n = num_tokens - prefix_tokens
        side = math.isqrt(max(n, 0))
        if n < 1 or side * side != n:
            raise ValueError(
                f"{num_tokens} tokens minus {prefix_tokens} prefix tokens = {n} patches, which is not a square grid; "
                "pass token_grid=TokenGrid(grid=(h, w)) for a non-square one."
            )
        return TokenLayout(prefix_tokens, side, side)
    side = math.isqrt(num_tokens)
    prefix = num_tokens - side * side
    if side < 1 or prefix > MAX_PREFIX_TOKENS:
        raise ValueError(
            f"{num_tokens} tokens fit no square grid with at most {MAX_PREFIX_TOKENS} leading class/register tokens "
            f"(the nearest square, {side}x{side}, leaves {prefix}) and the model's patch grid could not be read; "
            f"{fix}."
        )
    return TokenLayout(prefix, side, side)


def _check_tokens(tokens: object, name: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or not tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a floating (B, T, D) token sequence, got {shape}.")
    if min(tokens.shape) < 1:
        raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(tokens.shape)}.")
    return tokens


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int] | None = None, prefix_tokens: int | None = None) -> Tensor:
    """Turn ``(B, T, D)`` tokens into a ``(B, D, h, w)`` feature map by the module's grid rule.

    Example:
        >>> import torch
        >>> tokens = torch.randn(2, 1 + 4 + 6 * 8, 16)  # class token, 4 registers, a 6x8 grid
        >>> tuple(tokens_to_grid(tokens, grid=(6, 8)).shape)
        (2, 16, 6, 8)
        >>> tuple(tokens_to_grid(torch.randn(2, 197, 16)).shape)  # ViT-B/16 at 224 px: class token + 14x14
        (2, 16, 14, 14)

    Args:
        tokens: ``(B, T, D)`` block output.
        grid: ``(h, w)`` of the patches; ``None``: a square.
        prefix_tokens: leading tokens to drop; ``None``: ``T - h * w``.

    Returns:
        ``(B, D, h, w)`` view of the patch tokens (no copy).

    Raises:
        ValueError: if ``tokens`` is not ``(B, T, D)`` or fits no grid.
    """
    rule = TokenGrid(grid, prefix_tokens)  # validates both
    _check_tokens(tokens, "tokens")
    return _patches_as_map(tokens, rule.layout(tokens.shape[1]))


def _patches_as_map(tokens: Tensor, layout: TokenLayout) -> Tensor:
    b, _, d = tokens.shape
    return tokens[:, layout.prefix :].transpose(1, 2).reshape(b, d, layout.h, layout.w)


def to_feature_map(
    tokens: Tensor, token_grid: TokenGridSpec, patch_grid: tuple[int, int] | None, name: str
) -> tuple[Tensor, TokenLayout | None]:
    """A layer's ``(B, T, D)`` output as ``(B, D, h, w)`` features, and where its patches were.

    Args:
        tokens: the output.
        token_grid: the user's rule (:data:`TokenGridSpec`).
        patch_grid: the model's patch grid seen in this forward pass, or ``None``.
        name: the layer's name, for messages.

    Returns:
        ``(features, layout)``; ``layout`` is ``None`` when a user callable did the conversion.
    """
    _check_tokens(tokens, f"the output of layer {name!r}")
    if callable(token_grid) and not isinstance(token_grid, TokenGrid):
        features = token_grid(tokens)
        if not isinstance(features, Tensor) or features.ndim != 4 or features.shape[0] != tokens.shape[0]:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"token_grid(tokens) must return a (B, D, h, w) map for layer {name!r}, got {shape}.")
        return features, None
    try:
        layout = (token_grid or TokenGrid()).layout(tokens.shape[1], patch_grid)
    except ValueError as err:
        raise ValueError(f"Layer {name!r} returned tokens {tuple(tokens.shape)}: {err}") from None
    return _patches_as_map(tokens, layout), layout


# ------------------------------------------------------------------------------------------------ model structure
def _is_patch_embedding(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == module.stride
        and min(module.stride) > 1
        and module.padding in ((0, 0), "valid")
    )


def find_patch_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every ``Conv2d`` of ``model`` whose kernel equals its stride (> 1, no padding): a ViT's patch embedding.

    A model may hold several (a student and a teacher network); the grid is read from the first one that runs.
    """
    return [m for m in model.modules() if _is_patch_embedding(m)]


def watch_patch_grid(model: nn.Module, store: list[tuple[int, int]]) -> list[RemovableHandle]:
    """Hook every patch embedding of ``model`` so that the first one to run appends its ``(h, w)`` to ``store``.

    Returns:
        The hook handles; the caller removes them.
    """

    def hook(module: nn.Module, args: object, output: object) -> None:
        if not store and isinstance(output, Tensor) and output.ndim == 4:
            store.append((int(output.shape[-2]), int(output.shape[-1])))

    return [patch.register_forward_hook(hook) for patch in find_patch_embeddings(model)]


_BLOCK_CLASSES_IN_TORCH = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def repeated_blocks(model: nn.Module) -> set[str]:
    """Names of the members of repeated-block containers: the candidates for "the last block".

    A member is a child of an ``nn.Sequential`` or ``nn.ModuleList`` whose children all share one class that is a
    model's own block (not a ``torch.nn`` layer such as ``Linear``; ``nn.TransformerEncoderLayer`` counts):
    torchvision's ``encoder.layers.encoder_layer_N``, timm's and DINO's ``blocks.N``, a ResNet's ``layer4.1``.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) == 0:
            continue
        classes = {type(child) for child in module.children()}
        if len(classes) != 1:
            continue
        cls = classes.pop()
        if cls.__module__.startswith("torch.nn") and not issubclass(cls, _BLOCK_CLASSES_IN_TORCH):
            continue
        prefix = f"{name}." if name else ""
        names.update(prefix + child for child, _ in module.named_children())
    return names


def _is_qkv_attention(module: nn.Module) -> bool:
    qkv = getattr(module, "qkv", None)
    heads = getattr(module, "num_heads", None)
    return (
        isinstance(qkv, nn.Linear)
        and isinstance(heads, int)
        and heads >= 1
        and qkv.out_features == 3 * qkv.in_features
        and qkv.in_features % heads == 0
    )


_PROJECTION_NAMES = (("q_proj", "k_proj"), ("query", "key"))
"""Names of the separate query / key projections of Hugging Face attention modules (``q_proj`` / ``k_proj`` since
transformers 5, ``query`` / ``key`` before)."""


def _separate_projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear, int] | None:
    """``(query, key, heads)`` of a module with separate query / key ``nn.Linear`` projections, else ``None``."""
    for q_name, k_name in _PROJECTION_NAMES:
        query, key = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(query, nn.Linear) and isinstance(key, nn.Linear):
            break
    else:
        return None
    heads = getattr(module, "num_attention_heads", getattr(module, "num_heads", None))
    if (
        not isinstance(heads, int)
        or heads < 1
        or query.out_features != key.out_features
        or query.in_features != key.in_features
        or query.out_features % heads != 0
    ):
        return None
    return query, key, heads


def _is_window_attention(module: nn.Module) -> bool:
    # Swin's window attention (timm's WindowAttention, torchvision's ShiftedWindowAttention) attends within windows
    # of patches: no token attends to the whole image, so there is no class-token attention to read.
    return getattr(module, "window_size", None) is not None


def _is_supported_attention(module: nn.Module) -> bool:
    if _is_window_attention(module):
        return False
    return (
        isinstance(module, nn.MultiheadAttention)
        or _is_qkv_attention(module)
        or _separate_projections(module) is not None
    )


def find_attention(model: nn.Module) -> str | None:
    """Name of the last self-attention module of ``model`` this package can read, or ``None``.

    Supported: ``torch.nn.MultiheadAttention`` (torchvision's ViT, ``nn.TransformerEncoderLayer``); timm-style
    modules with a ``qkv`` linear layer of ``3 * D`` outputs and an integer ``num_heads`` (timm, DINO, DINOv2); and
    modules with separate ``q_proj`` / ``k_proj`` (or ``query`` / ``key``) linear layers and ``num_attention_heads``
    or ``num_heads`` (Hugging Face's ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``). Window attention
    (Swin: a module with a ``window_size``) is skipped: it has no class-token attention.
    """
    found = None
    for name, module in model.named_modules():
        if _is_supported_attention(module):
            found = name
    return found


def attention_rows(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> Tensor:
    """The class token's attention over every token, per head, as ``module`` computes it on these inputs.

    Called from a forward pre-hook (``with_kwargs=True``) on the attention module, so the weights are the block's
    own, read as they are during the forward pass (gathered when sharded), and nothing in the model changes.

    Returns:
        ``(B, heads, T)`` float32 weights.

    Raises:
        ValueError: for an attention module this package cannot read.
    """
    if _is_window_attention(module):
        raise ValueError(f"{type(module).__name__} is window attention (Swin), which has no class token.")
    if isinstance(module, nn.MultiheadAttention):
        return _mha_rows(module, args, kwargs)
    if _is_qkv_attention(module):
        return _qkv_rows(module, args, kwargs)
    projections = _separate_projections(module)
    if projections is not None:
        return _projection_rows(module, *projections, args, kwargs)
    raise ValueError(
        f"cannot read the attention of {type(module).__name__}: supported are torch.nn.MultiheadAttention, "
        "timm-style modules with a qkv nn.Linear and num_heads, and modules with q_proj/k_proj (or query/key) "
        "nn.Linear projections and num_attention_heads (Hugging Face)."
    )


def _mha_rows(module: nn.MultiheadAttention, args: tuple[object, ...], kwargs: dict[str, object]) -> Tensor:
    query = args[0] if args else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.ndim != 3:
        raise ValueError("nn.MultiheadAttention was not called with (B, T, D) query and key tensors.")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "the class-token attention of nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported."
        )
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    d = module.embed_dim
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:d], module.in_proj_weight[d : 2 * d]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:d], module.in_proj_bias[d : 2 * d]
    heads = module.num_heads
    q = _split_heads(F.linear(query, w_q, b_q), heads)
    k = _split_heads(F.linear(key, w_k, b_k), heads)
    return class_token_attention(q, k)


def _qkv_rows(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> Tensor:
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"{type(module).__name__} was not called with a (B, T, D) token tensor.")
    heads: int = module.num_heads  # type: ignore[assignment]
    qkv_layer: nn.Module = module.qkv  # type: ignore[assignment]
    qkv = qkv_layer(x)
    q_bias, k_bias, v_bias = (getattr(module, name, None) for name in ("q_bias", "k_bias", "v_bias"))
    if isinstance(q_bias, Tensor) and isinstance(k_bias, Tensor) and isinstance(v_bias, Tensor):
        qkv = qkv + torch.cat((q_bias, k_bias, v_bias))  # EVA: biases kept apart from a bias-free qkv layer
    q, k, _ = (_split_heads(part, heads) for part in qkv.chunk(3, dim=-1))
    return _rows(module, q, k, kwargs, getattr(module, "scale", None))


def _projection_rows(
    module: nn.Module,
    query: nn.Linear,
    key: nn.Linear,
    heads: int,
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> Tensor:
    # Hugging Face (and timm's EVA without a fused qkv): the module's own separate projections and its `scaling`
    # (or `scale`) factor, as its eager attention computes it.
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"{type(module).__name__} was not called with (B, T, D) hidden states.")
    q, k = _split_heads(query(x), heads), _split_heads(key(x), heads)
    return _rows(module, q, k, kwargs, getattr(module, "scaling", getattr(module, "scale", None)))


def _rows(module: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, object], scale: object) -> Tensor:
    """``softmax(q_cls . k^T * scale)`` after the module's query / key norms and its rotary embedding, if any."""
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if isinstance(q_norm, nn.Module):
        q = q_norm(q)
    if isinstance(k_norm, nn.Module):
        k = k_norm(k)
    rope = kwargs.get("rope")
    if isinstance(rope, Tensor):  # timm's EVA: the patch tokens' queries and keys are rotated, the prefix kept
        q, k = _rotated(module, q, rope), _rotated(module, k, rope)
    return class_token_attention(q, k, scale=scale if isinstance(scale, (int, float)) else None)


def _rotated(module: nn.Module, x: Tensor, rope: Tensor) -> Tensor:
    # The rotation of the module's own library (timm's apply_rot_embed_cat, found where the module is defined), so
    # that this package imports no timm and follows its version.
    rotate = getattr(sys.modules.get(type(module).__module__), "apply_rot_embed_cat", None)
    prefix = getattr(module, "num_prefix_tokens", None)
    if not callable(rotate) or not isinstance(prefix, int):
        raise ValueError(
            f"{type(module).__name__} applies a rotary position embedding this package cannot reproduce (no "
            "apply_rot_embed_cat beside it, or no num_prefix_tokens)."
        )
    half = bool(getattr(module, "rotate_half", False))
    return torch.cat([x[:, :, :prefix], rotate(x[:, :, prefix:], rope, half=half)], dim=2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


def patch_attention(rows: Tensor, layout: TokenLayout) -> Tensor:
    """The class token's attention on the patches, as ``(B, heads, h, w)`` maps.

    Args:
        rows: ``(B, heads, T)`` from :func:`attention_rows`.
        layout: where the patches are (that of the monitored layer's tokens).

    Raises:
        ValueError: if there is no class token (``layout.prefix == 0``) or the lengths differ.
    """
    b, heads, t = rows.shape
    if layout.prefix < 1:
        raise ValueError("the tokens have no class token (no prefix token), so there is no class-token attention.")
    if t != layout.prefix + layout.h * layout.w:
        raise ValueError(
            f"the attention layer sees {t} tokens but the monitored layer's grid has {layout.prefix} prefix tokens + "
            f"{layout.h}x{layout.w} patches."
        )
    return rows[:, :, layout.prefix :].reshape(b, heads, layout.h, layout.w)
