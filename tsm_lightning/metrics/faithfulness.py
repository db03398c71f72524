"""Embedding faithfulness: does the model's own embedding depend on the pixels a map calls salient?

Users of self-supervised models have no labels, so the class score of the classic metrics is replaced by the cosine
similarity ``cos(e(x), e(x'))`` of the model's embedding ``e`` of a perturbed image ``x'`` to that of the clean image:
"how much of the original embedding survives". Every function runs :func:`~tsm_lightning.metrics.perturbation.perturb`
with an :class:`EmbeddingResponse`, and :func:`faithfulness_metrics` evaluates every method and a random map in one
run of it. A bare ``embed_fn`` is run under ``torch.no_grad()``; :func:`default_embed_fn` also puts the model in eval
mode and restores every sub-module's mode afterwards. (About 400 lines: nine public functions, each documenting its
formula, range and direction; the code of each is a line or two.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, _default_forward, capture, get_layer, preserved_modes
from tsm_lightning.checks import check_images
from tsm_lightning.metrics._common import acc_dtype, out
from tsm_lightning.metrics.collapse import unit_rows
from tsm_lightning.metrics.perturbation import (
    KINDS,
    Baseline,
    EmbedFn,
    Perturbations,
    perturb,
    random_maps,
)

__all__ = [
    "RANDOM",
    "EmbeddingResponse",
    "as_embedding",
    "check_map_dict",
    "default_embed_fn",
    "deletion_auc",
    "deletion_curve",
    "embedding_drop",
    "embedding_gain",
    "embedding_increase",
    "faithfulness_metrics",
    "insertion_auc",
    "insertion_curve",
    "methods_and_random",
    "relative_to_reference",
]


def as_embedding(output: object, pool: bool) -> Tensor:
    """``(n, D)`` embedding from a model output: a tuple's first tensor, 4-D maps pooled over space if ``pool``."""
    if isinstance(output, (tuple, list)):
        tensors = [item for item in output if isinstance(item, Tensor)]
        if not tensors:
            raise ValueError("The model returned a tuple/list without a tensor; pass forward_fn= or layer=.")
        output = tensors[0]
    if not isinstance(output, Tensor):
        raise ValueError(
            f"The embedding must be a tensor, got {type(output).__name__}; pass forward_fn= returning a tensor."
        )
    if pool and output.ndim == 4:
        output = output.mean(dim=(2, 3))
    return output.reshape(output.shape[0], -1)


class EmbeddingResponse:
    """``cos(e(x), e(x'))``: how much of the clean image's embedding survives a perturbation.

    ``cos(0, 0) = 1`` (identical), ``cos(0, v) = 0`` for ``v != 0``.
    """

    def __init__(self, embed_fn: EmbedFn) -> None:
        self.embed_fn = embed_fn
        self._clean: tuple[Tensor, Tensor] | None = None

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            output = as_embedding(self.embed_fn(images), pool=False)
        if output.shape[0] != images.shape[0]:
            raise ValueError(f"embed_fn returned {output.shape[0]} embeddings for {images.shape[0]} images.")
        return unit_rows(output.detach().to(acc_dtype(images.device)))

    def clean(self, images: Tensor, max_batch: int) -> Tensor:
        """Embed the clean images (kept as the reference); return their value, ``cos(e(x), e(x))``."""
        parts = [self._embed(chunk) for chunk in images.split(max_batch)]
        self._clean = torch.cat([u for u, _ in parts]), torch.cat([nz for _, nz in parts])
        return self._cosine(self._clean, self._clean)

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        """``cos(e(x[rows]), e(images))``."""
        assert self._clean is not None, "clean() must run first"
        unit, nonzero = self._clean
        return self._cosine((unit[rows], nonzero[rows]), self._embed(images))

    @staticmethod
    def _cosine(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        (ua, nza), (ub, nzb) = a, b
        cos = (ua * ub).sum(dim=1).clamp(-1.0, 1.0)
        return torch.where(nza & nzb, cos, (~nza & ~nzb).to(cos.dtype))


RANDOM = "random"
"""Name of the random-map entry in the results of :func:`faithfulness_metrics` and ``score_metrics``."""


def check_map_dict(maps: object, reserved: str) -> dict[str, Tensor]:
    """Check ``{method: maps}`` and that no method is named ``reserved`` (a key the results use for another entry)."""
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {method name: (B, H, W) maps}.")
    if reserved in maps:
        raise ValueError(f"{reserved!r} is reserved for the {reserved} entry of the results; rename that method.")
    return dict(maps)


def methods_and_random(maps: object, images: Tensor, seed: int) -> dict[str, tuple[str, Tensor]]:
    """``{result name: (name in error messages, maps)}`` for every method, then :data:`RANDOM` (:func:`random_maps`)."""
    maps = check_map_dict(maps, RANDOM)
    check_images(images, channels=None)
    named = {name: (f"maps[{name!r}]", m) for name, m in maps.items()}
    named[RANDOM] = (RANDOM, random_maps(images[:, 0], seed))
    return named


def relative_to_reference(score: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Percent increase indicator and normalised gain of ``score`` over ``reference`` (both ``<= 1``)."""
    increase = (score > reference).to(score.dtype) * 100
    headroom = 1 - reference
    gain = (score - reference) / torch.where(headroom > 0, headroom, torch.ones_like(headroom))
    gain = torch.where(score > reference, gain, torch.zeros_like(gain))
    gain = torch.where((score > reference) & (headroom <= 0), torch.full_like(gain, math.nan), gain)
    return increase, gain * 100


def default_embed_fn(
    model: nn.Module,
    layer: str | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    pool: bool = True,
) -> EmbedFn:
    """Build the embedding function ``e(x)`` of the faithfulness metrics from a model.

    The returned function runs ``model`` in eval mode under ``torch.no_grad()`` and restores every sub-module's
    own ``training`` flag afterwards, so calling it during training changes nothing (no BatchNorm statistics are
    updated). Its output:

    * ``layer=None``: the model's forward output (``forward_fn(model, images)``, default ``model(images)``). For a
      lightly SSL module this is the module's ``forward`` output, usually the projection-head output ``z``; a tuple
      output (e.g. BYOL's ``(z, p)``) contributes its first tensor.
    * ``layer="backbone"`` (any dotted module name): that sub-module's output, captured with a scoped hook. For
      lightly's ``backbone = nn.Sequential(*list(resnet.children())[:-1])`` this is the pooled backbone
      embedding, the usual choice; it is equivalent to ``lambda x: model.backbone(x).flatten(1)`` but with the
      modes handled.

    A 4-D ``(n, C, h, w)`` output is global-average pooled to ``(n, C)`` when ``pool`` is true; everything is then
    flattened to ``(n, D)``.

    Args:
        model: the network.
        layer: dotted name of the sub-module whose output is the embedding, or ``None`` for the forward output.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.
        pool: average 4-D outputs over space before flattening.

    Returns:
        ``embed(images) -> (n, D)`` embeddings.
    """
    forward = forward_fn or _default_forward
    if layer is not None:
        get_layer(model, layer)  # fail early on a bad name

    def embed(images: Tensor) -> Tensor:
        if layer is None:
            with preserved_modes(model), torch.no_grad():
                return as_embedding(forward(model, images), pool)
        with capture(model, layer, feature_map=False) as cap:
            forward(model, images)
        return as_embedding(cap.value, pool)

    return embed


def embedding_drop(embed_fn: EmbedFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Embedding drop: how much of the embedding is lost when only the salient part of the image is kept.

    ``drop = 1 - cos(e(x), e(x ⊙ m))`` with ``m`` the map upsampled bilinearly to the image size (clipped to
    ``[0, 1]``) and ``⊙`` broadcast over channels. As the inputs are normalised, ``x ⊙ m`` fades the unsalient
    pixels to 0, the dataset's mean colour. The label-free analogue of Average Drop (the class score is replaced
    by the similarity to the original embedding).

    Range ``[0, 2]`` (in practice ``[0, 1]``), lower is better. 0 when ``m`` is all ones.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 drops.
    """
    res = perturb(EmbeddingResponse(embed_fn), images, {"maps": maps}, ["drop"], max_batch=max_batch)
    return out(1 - res.kept["maps"], images)


def embedding_increase(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    *,
    reference_maps: Tensor | None = None,
    seed: int = 0,
    max_batch: int = 256,
) -> Tensor:
    """Embedding increase: does keeping the salient part preserve the embedding better than a random map does?

    Average Increase counts images whose class score *rises* under the mask, but the similarity to the original
    embedding cannot exceed ``cos(e(x), e(x)) = 1``, so the comparison is made against the random baseline map
    ``r`` (:func:`random_maps` with ``seed``, or ``reference_maps``) instead: with ``s_m = cos(e(x), e(x ⊙ m))``
    and ``s_r = cos(e(x), e(x ⊙ r))``, ``increase = 100 * [s_m > s_r]``. The mean over images is the percentage
    of images where the map beats chance.

    Range ``{0, 100}`` per image (mean in ``[0, 100]``), higher is better; about 50 for a random map.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        reference_maps: ``(B, h', w')`` maps to compare with; ``None`` uses :func:`random_maps`.
        seed: seed of the random reference maps.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(B,)`` float32 indicators times 100.
    """
    return _relative_to_random(embed_fn, images, maps, reference_maps, seed, max_batch)[0]


def embedding_gain(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Tensor,
    *,
    reference_maps: Tensor | None = None,
    seed: int = 0,
    max_batch: int = 256,
) -> Tensor:
    """Embedding gain: normalised gain in kept similarity of the map over a random map.

    With ``s_m`` and ``s_r`` as in :func:`embedding_increase`,
    ``gain = 100 * max(0, s_m - s_r) / (1 - s_r)``: the share of the similarity the random map lost that the
    saliency map recovers (Average Gain's ``max(0, o - y) / (1 - y)`` with the random map's similarity as ``y``).
    When ``s_r = 1`` no gain is possible and the term is 0. Arguments as for :func:`embedding_increase`.

    Range ``[0, 100]``, higher is better.

    Returns:
        ``(B,)`` float32 gains in percent.
    """
    return _relative_to_random(embed_fn, images, maps, reference_maps, seed, max_batch)[1]


def _relative_to_random(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, reference_maps: Tensor | None, seed: int, max_batch: int
) -> tuple[Tensor, Tensor]:
    """:func:`relative_to_reference` of ``cos(e(x), e(x ⊙ m))`` over the reference's (default :func:`random_maps`)."""
    check_images(images, channels=None)
    reference = reference_maps if reference_maps is not None else random_maps(images[:, 0], seed)
    both = {"maps": maps, "reference_maps": reference}
    res = perturb(EmbeddingResponse(embed_fn), images, both, ["drop"], max_batch=max_batch)
    increase, gain = relative_to_reference(res.kept["maps"], res.kept["reference_maps"])
    return out(increase, images), out(gain, images)


def deletion_curve(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> tuple[Tensor, Tensor]:
    """Similarity to the original embedding as the most salient pixels are replaced by the baseline.

    At step ``k = 0 .. steps`` the first ``n_k = round(k * N / steps)`` pixels in saliency order
    (:func:`saliency_rank`: descending map value, ties broken by row-major pixel index) of ``x`` are replaced by
    the baseline's pixels, giving ``x_k``; the curve is ``cos(e(x), e(x_k))``. The maps are upsampled bilinearly to
    the image size first. All ``B * (steps - 1)`` intermediate images are evaluated in chunks of at most
    ``max_batch`` images, built only when their chunk runs; the ends (``x_0 = x``, ``x_steps`` = baseline) are
    evaluated once per image.

    Baselines: ``"blur"`` (default, :func:`blur_baseline`: removed pixels lose their detail but keep their colour,
    which keeps perturbed images closer to the data than black boxes), ``"zeros"`` (0 in normalised space: the
    dataset's mean colour), or a tensor broadcastable to the images.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps.
        steps: number of deletion steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor.
        max_batch: largest batch passed to ``embed_fn``.

    Returns:
        ``(fractions, curves)``: ``(steps + 1,)`` deleted pixel fractions ``n_k / N`` (from 0 to 1) and
        ``(B, steps + 1)`` similarities, in the accumulation dtype (float64 except on MPS).
    """
    res = _curves(embed_fn, images, maps, steps, baseline, max_batch, "deletion")
    return res.fractions, res.curve("maps", "deletion")


def insertion_curve(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> tuple[Tensor, Tensor]:
    """Similarity to the original embedding as the most salient pixels of ``x`` are inserted into the baseline.

    Step ``k`` shows the first ``n_k`` pixels in saliency order from ``x`` and the rest from the baseline (same
    order, steps, baselines, batching and arguments as :func:`deletion_curve`); the curve is ``cos(e(x), e(x_k))``.

    Returns:
        ``(fractions, curves)``: ``(steps + 1,)`` inserted pixel fractions and ``(B, steps + 1)`` similarities.
    """
    res = _curves(embed_fn, images, maps, steps, baseline, max_batch, "insertion")
    return res.fractions, res.curve("maps", "insertion")


def deletion_auc(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> Tensor:
    """Area under the embedding deletion curve (:func:`deletion_curve`), trapezoid rule over fractions 0..1.

    ``AUC = ∫_0^1 cos(e(x), e(x_f)) df`` where ``x_f`` has its most salient fraction ``f`` of pixels replaced by the
    baseline. Range ``[-1, 1]`` (in practice ``[0, 1]``), lower is better (removing the salient pixels first should
    destroy the embedding fast). A model that ignores its input gives exactly its constant similarity, 1. Arguments
    as for :func:`deletion_curve`.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    return out(_curves(embed_fn, images, maps, steps, baseline, max_batch, "deletion").auc("maps", "deletion"), images)


def insertion_auc(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> Tensor:
    """Area under the embedding insertion curve (:func:`insertion_curve`), trapezoid rule over fractions 0..1.

    Range ``[-1, 1]`` (in practice ``[0, 1]``), higher is better (inserting the salient pixels first should recover
    the embedding fast). Arguments as for :func:`deletion_curve`.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    res = _curves(embed_fn, images, maps, steps, baseline, max_batch, "insertion")
    return out(res.auc("maps", "insertion"), images)


def _curves(
    embed_fn: EmbedFn, images: Tensor, maps: Tensor, steps: int, baseline: Baseline, max_batch: int, kind: str
) -> Perturbations:
    response = EmbeddingResponse(embed_fn)
    return perturb(response, images, {"maps": maps}, [kind], steps=steps, baseline=baseline, max_batch=max_batch)


def faithfulness_metrics(
    embed_fn: EmbedFn,
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    steps: int = 16,
    seed: int = 0,
    max_batch: int = 256,
    baseline: Baseline = "blur",
) -> dict[str, dict[str, Tensor]]:
    """Embedding faithfulness of every method, beside the same numbers for a random map, per image.

    Per method: ``embedding_drop`` (:func:`embedding_drop`), ``deletion_auc`` (:func:`deletion_auc`),
    ``insertion_auc`` (:func:`insertion_auc`), ``embedding_increase`` and ``embedding_gain``
    (:func:`embedding_increase`, :func:`embedding_gain`: the method against the random map). Under the pseudo-method
    ``"random"``: ``embedding_drop``, ``deletion_auc``, ``insertion_auc`` of :func:`random_maps` (``seed``),
    computed once.

    Everything runs in ``ceil(n / max_batch)`` calls of ``embed_fn`` for
    ``n = B * (2 + (M + 1) * (2 * steps - 1))`` images (``M`` methods): the originals, the baselines (shared by all
    curves), and per map the masked image and the ``steps - 1`` inner points of each curve.

    Args:
        embed_fn: ``(n, 3, H, W) -> (n, D)`` embedding, e.g. :func:`default_embed_fn`.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``{method: (B, h, w) maps}`` in ``[0, 1]``.
        steps: curve steps.
        seed: seed of the random maps.
        max_batch: largest batch passed to ``embed_fn``.
        baseline: curve baseline, see :func:`deletion_curve`.

    Returns:
        ``{method: {metric: (B,) float32}, "random": {metric: (B,) float32}}``.
    """
    named = methods_and_random(maps, images, seed)
    res = perturb(
        EmbeddingResponse(embed_fn),
        images,
        dict(named.values()),
        KINDS,
        steps=steps,
        baseline=baseline,
        max_batch=max_batch,
    )
    random_kept = res.kept[RANDOM]
    results: dict[str, dict[str, Tensor]] = {}
    for name, (key, _) in named.items():
        metrics = {
            "embedding_drop": out(1 - res.kept[key], images),
            "deletion_auc": out(res.auc(key, "deletion"), images),
            "insertion_auc": out(res.auc(key, "insertion"), images),
        }
        if name != RANDOM:
            increase, gain = relative_to_reference(res.kept[key], random_kept)
            metrics["embedding_increase"] = out(increase, images)
            metrics["embedding_gain"] = out(gain, images)
        results[name] = metrics
    return results
