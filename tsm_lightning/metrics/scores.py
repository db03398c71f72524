"""Classic confidence metrics from a user score: Average Drop / Increase / Gain, score deletion and insertion.

They need a ``score_fn(images) -> (n,)`` (see :data:`~tsm_lightning.metrics.perturbation.ScoreFn`), e.g. the softmax
probability of the class predicted on the clean image (:func:`predicted_class_score`). Every function runs
:func:`~tsm_lightning.metrics.perturbation.perturb` with a :class:`ScoreResponse`;
:func:`score_metrics` evaluates every method and a random map in one run of it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tsm_lightning.capture import ForwardFn, _default_forward, preserved_modes
from tsm_lightning.metrics._common import acc_dtype, out
from tsm_lightning.metrics.faithfulness import methods_and_random, relative_to_reference
from tsm_lightning.metrics.perturbation import KINDS, Baseline, ScoreFn, perturb

__all__ = [
    "ScoreResponse",
    "average_drop",
    "average_gain",
    "average_increase",
    "predicted_class_score",
    "score_deletion_auc",
    "score_insertion_auc",
    "score_metrics",
]


def predicted_class_score(model: nn.Module, images: Tensor, *, forward_fn: ForwardFn | None = None) -> ScoreFn:
    """Score function for the classic metrics: softmax probability of the class predicted on the clean image.

    The target class of each probe image is fixed once, ``argmax model(images)``; the returned
    ``score_fn(perturbed, index)`` gives ``softmax(model(perturbed))[target[index]]``, as Average Drop is defined.
    The model runs in eval mode under ``torch.no_grad()`` with every sub-module's mode restored.

    Args:
        model: a classifier returning ``(B, num_classes)`` logits (or ``forward_fn`` returning them).
        images: ``(B, 3, H, W)`` clean probe images.
        forward_fn: ``forward_fn(model, images)``; defaults to ``model(images)``.

    Returns:
        ``score_fn(images, index) -> (n,)`` probabilities.
    """
    forward = forward_fn or _default_forward

    def logits(x: Tensor) -> Tensor:
        with preserved_modes(model), torch.no_grad():
            out = forward(model, x)
        if not isinstance(out, Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"predicted_class_score needs (B, num_classes) logits, got {shape}.")
        return out.float()

    target = logits(images).argmax(dim=1)

    def score_fn(x: Tensor, index: Tensor) -> Tensor:
        return logits(x).softmax(dim=1).gather(1, target[index.to(target.device), None])[:, 0]

    return score_fn


class ScoreResponse:
    """``score_fn(x')``: a confidence score of each perturbed image (see :data:`ScoreFn`)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        try:
            self._with_index = "index" in inspect.signature(score_fn).parameters
        except (TypeError, ValueError):
            self._with_index = False

    def clean(self, images: Tensor, max_batch: int) -> Tensor:
        """Scores of the clean images."""
        rows = torch.arange(images.shape[0], device=images.device)
        return torch.cat([self(x, r) for x, r in zip(images.split(max_batch), rows.split(max_batch), strict=True)])

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        """``score_fn(images)`` (with ``index=rows`` when it takes one), as ``(n,)`` accumulation-dtype values."""
        with torch.no_grad():
            scores = self.score_fn(images, index=rows) if self._with_index else self.score_fn(images)
        if not isinstance(scores, Tensor) or scores.numel() != images.shape[0]:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"score_fn must return one score per image, shape ({images.shape[0]},), got {shape}.")
        return scores.detach().reshape(-1).to(device=images.device, dtype=acc_dtype(images.device))


def _drop_terms(y: Tensor, o: Tensor) -> dict[str, Tensor]:
    """Per-image Average Drop / Increase / Gain terms in percent from clean scores ``y`` and masked scores ``o``."""
    drop = (y - o) / torch.where(y > 0, y, torch.ones_like(y))
    drop = torch.where(o < y, drop, torch.zeros_like(drop))
    drop = torch.where((o < y) & (y <= 0), torch.full_like(drop, math.nan), drop)
    increase, gain = relative_to_reference(o, y)
    return {"average_drop": drop * 100, "average_increase": increase, "average_gain": gain}


def _drop(score_fn: ScoreFn, images: Tensor, maps: Tensor, max_batch: int, metric: str) -> Tensor:
    res = perturb(ScoreResponse(score_fn), images, {"maps": maps}, ["drop"], max_batch=max_batch)
    return out(_drop_terms(res.clean, res.kept["maps"])[metric], images)


def average_drop(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Drop (Grad-CAM++) per image, in percent.

    With ``y = score_fn(x)`` and ``o = score_fn(x ⊙ m)`` (``m`` the map upsampled to the image size):
    ``term = 100 * max(0, y - o) / y``; Average Drop is the mean of the terms over images. Scores are expected in
    ``[0, 1]`` (probabilities). NaN where ``y <= 0`` and ``o < y`` (relative drop undefined).

    Range ``[0, 100]``, lower is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 terms in percent.
    """
    return _drop(score_fn, images, maps, max_batch, "average_drop")


def average_increase(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Increase (Increase in Confidence, Grad-CAM++) per image, in percent.

    ``term = 100 * [o > y]`` with ``y``, ``o`` as in :func:`average_drop`; the mean is the percentage of images
    whose score rises when only the salient part is shown. Range ``{0, 100}`` per image, higher is better.
    Arguments as for :func:`average_drop`.

    Returns:
        ``(B,)`` float32 terms (0 or 100).
    """
    return _drop(score_fn, images, maps, max_batch, "average_increase")


def average_gain(score_fn: ScoreFn, images: Tensor, maps: Tensor, *, max_batch: int = 256) -> Tensor:
    """Average Gain (Opti-CAM) per image, in percent.

    ``term = 100 * max(0, o - y) / (1 - y)`` with ``y``, ``o`` as in :func:`average_drop`: the share of the
    available headroom gained. 0 when ``o <= y`` (also when ``y = 1``); NaN where ``y >= 1`` and ``o > y``
    (scores outside ``[0, 1]``). Range ``[0, 100]``, higher is better. Arguments as for :func:`average_drop`.

    Returns:
        ``(B,)`` float32 terms in percent.
    """
    return _drop(score_fn, images, maps, max_batch, "average_gain")


def _score_auc(
    score_fn: ScoreFn, images: Tensor, maps: Tensor, steps: int, baseline: Baseline, max_batch: int, kind: str
) -> Tensor:
    response = ScoreResponse(score_fn)
    res = perturb(response, images, {"maps": maps}, [kind], steps=steps, baseline=baseline, max_batch=max_batch)
    return out(res.auc("maps", kind), images)


def score_deletion_auc(
    score_fn: ScoreFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> Tensor:
    """Deletion AUC of the score: ``∫_0^1 score_fn(x_f) df`` with the salient fraction ``f`` replaced by the baseline.

    Same perturbations, ordering, baselines and batching as :func:`deletion_curve`, with the raw score in place of
    the embedding similarity. Range: the score's range (``[0, 1]`` for probabilities), lower is better.

    Args:
        score_fn: ``(n, 3, H, W) -> (n,)`` scores (see :data:`ScoreFn`, :func:`predicted_class_score`).
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` maps in ``[0, 1]``.
        steps: number of steps (``>= 1``).
        baseline: ``"blur"``, ``"zeros"`` or a tensor, see :func:`deletion_curve`.
        max_batch: largest batch passed to ``score_fn``.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    return _score_auc(score_fn, images, maps, steps, baseline, max_batch, "deletion")


def score_insertion_auc(
    score_fn: ScoreFn, images: Tensor, maps: Tensor, steps: int = 16, baseline: Baseline = "blur", max_batch: int = 256
) -> Tensor:
    """Insertion AUC of the score: ``∫_0^1 score_fn(x_f) df``, the salient fraction ``f`` of ``x`` on the baseline.

    Same perturbations as :func:`insertion_curve`. Range: the score's range, higher is better. Arguments as for
    :func:`score_deletion_auc`.

    Returns:
        ``(B,)`` float32 AUCs.
    """
    return _score_auc(score_fn, images, maps, steps, baseline, max_batch, "insertion")


def score_metrics(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    steps: int = 16,
    seed: int = 0,
    max_batch: int = 256,
    baseline: Baseline = "blur",
) -> dict[str, dict[str, Tensor]]:
    """Classic confidence metrics of every method and of a random map, per image, in few ``score_fn`` calls.

    Per method and for the pseudo-method ``"random"`` (:func:`random_maps` with ``seed``): ``average_drop``,
    ``average_increase``, ``average_gain`` (percent terms, see :func:`average_drop`), ``score_deletion_auc`` and
    ``score_insertion_auc`` (see :func:`score_deletion_auc`).

    Arguments as for :func:`~tsm_lightning.metrics.faithfulness_metrics`, with ``score_fn`` (``(n, 3, H, W) ->
    (n,)`` scores, see :data:`ScoreFn` and :func:`predicted_class_score`) in place of ``embed_fn``.

    Returns:
        ``{method: {metric: (B,) float32}, "random": {...}}``.
    """
    named = methods_and_random(maps, images, seed)
    response = ScoreResponse(score_fn)
    res = perturb(response, images, dict(named.values()), KINDS, steps=steps, baseline=baseline, max_batch=max_batch)
    results: dict[str, dict[str, Tensor]] = {}
    for name, (key, _) in named.items():
        metrics = {metric: out(value, images) for metric, value in _drop_terms(res.clean, res.kept[key]).items()}
        metrics["score_deletion_auc"] = out(res.auc(key, "deletion"), images)
        metrics["score_insertion_auc"] = out(res.auc(key, "insertion"), images)
        results[name] = metrics
    return results
