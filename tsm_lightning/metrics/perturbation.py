"""The one perturbation engine behind every model-based metric, and the perturbations it is built from.

A model-based metric perturbs the probe images with a map and compares the model's response with its response to
the clean images. :func:`perturb` evaluates, for any number of maps at once (every method and the random reference):

* ``"drop"``: the masked image ``x ⊙ m`` (``m`` upsampled bilinearly to the image size, clipped to ``[0, 1]``);
* ``"deletion"``: ``x`` with its first ``n_k = round(k * N / steps)`` pixels in saliency order (:func:`saliency_rank`)
  replaced by a baseline image, ``k = 1 .. steps - 1``;
* ``"insertion"``: the baseline with the first ``n_k`` pixels of ``x`` inserted.

The clean images are evaluated once, in a first pass (their outputs are what every perturbed output is compared
with); then the baseline images (evaluated once per image and shared by every curve) and every perturbed image of
every map run in one stream, cut into forward passes of at most ``max_batch`` images that may span several maps and
kinds. Perturbed images are built only when their pass runs, so memory is bounded by ``max_batch`` images whatever
the number of maps, steps and images.

What a response *is* is the caller's (:class:`Response`): the cosine similarity to the clean embedding
(:class:`~tsm_lightning.metrics.faithfulness.EmbeddingResponse`) or a score of the perturbed image, e.g. a class
probability (:class:`~tsm_lightning.metrics.scores.ScoreResponse`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tsm_lightning.checks import check_images, check_maps, check_positive_int
from tsm_lightning.core import normalize_maps
from tsm_lightning.metrics._common import acc_dtype, flat

__all__ = [
    "BASELINES",
    "KINDS",
    "Baseline",
    "EmbedFn",
    "Perturbations",
    "Response",
    "ScoreFn",
    "blur_baseline",
    "perturb",
    "random_maps",
    "saliency_rank",
]

EmbedFn = Callable[[Tensor], Tensor]
"""``embed_fn(images) -> embeddings``: ``(n, 3, H, W)`` images to ``(n, D)`` embeddings (other shapes are flattened
to ``(n, -1)``)."""

ScoreFn = Callable[..., Tensor]
"""``score_fn(images) -> (n,)`` confidence scores, ideally in ``[0, 1]``. If the callable has a parameter named
``index``, it is called as ``score_fn(images, index=index)`` where ``index`` is the ``(n,)`` long tensor of the
probe-batch row each image was made from (to look up per-image targets, see
:func:`~tsm_lightning.metrics.predicted_class_score`)."""

Baseline = str | Tensor
BASELINES = ("blur", "zeros")
"""Named baselines of the curves; a tensor broadcastable to the images is accepted too."""

KINDS = ("drop", "deletion", "insertion")
"""Perturbations :func:`perturb` evaluates."""


# ---------------------------------------------------------------------------------------------------------------
# Perturbations: random maps, saliency order, baselines
# ---------------------------------------------------------------------------------------------------------------


def random_maps(like: Tensor, seed: int = 0, *, cells: int = 7) -> Tensor:
    """Deterministic random maps: the chance-level explanation every faithfulness number is compared with.

    Uniform noise on a ``cells x cells`` grid (the size of a ResNet's last feature map at 224 px; capped at the
    map size), upsampled bilinearly to the maps' size and min-max normalised to ``[0, 1]`` per image. The noise
    comes from a private CPU ``torch.Generator`` seeded with ``seed``, so the global RNG is untouched and the maps
    are the same on every device and do not depend on the batch size (image ``b`` always gets the same map).

    Args:
        like: ``(B, H, W)`` tensor giving the batch size, size and device.
        seed: generator seed.
        cells: side of the low-resolution noise grid.

    Returns:
        ``(B, H, W)`` float32 maps in ``[0, 1]`` on ``like``'s device.
    """
    if not isinstance(like, Tensor) or like.ndim != 3:
        shape = tuple(like.shape) if isinstance(like, Tensor) else type(like).__name__
        raise ValueError(f"like must be a (B, H, W) tensor, got {shape}.")
    check_positive_int(cells, "cells")
    b, h, w = like.shape
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.rand(b, min(cells, h), min(cells, w), generator=generator, dtype=torch.float32)
    up = F.interpolate(noise[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(up).to(like.device)


def saliency_rank(maps: Tensor) -> Tensor:
    """Rank of every pixel in saliency order: 0 for the most salient pixel.

    Ties are broken deterministically by the row-major pixel index (the earlier pixel comes first), via a stable
    descending sort. Non-finite values count as 0.

    Args:
        maps: ``(B, H, W)`` maps.

    Returns:
        ``(B, H * W)`` int64 ranks, a permutation of ``0 .. H * W - 1`` per image.
    """
    m = flat(maps)
    order = torch.sort(m, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def blur_baseline(images: Tensor, sigma: float | None = None) -> Tensor:
    """Strongly blurred images: the "information removed" baseline of the deletion and insertion curves.

    A separable Gaussian blur (two depthwise ``conv2d`` passes, kernel radius ``ceil(3 * sigma)``, replicate
    padding so that constant images stay constant). The default ``sigma = max(1, min(H, W) / 16)`` pixels (14 px
    at 224 px) removes object detail but keeps the image's colours and coarse layout, so perturbed images stay
    closer to the data than black boxes do.

    Args:
        images: ``(B, C, H, W)`` images.
        sigma: standard deviation in pixels; ``None`` for the default.

    Returns:
        ``(B, C, H, W)`` blurred images in the input dtype (float32 for half precision).
    """
    check_images(images, channels=None)
    _, c, h, w = images.shape
    sigma = max(1.0, min(h, w) / 16) if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}.")
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(images.to(dtype), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _resolve_baseline(baseline: Baseline, images: Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=images.device, dtype=images.dtype), images.shape)
        except RuntimeError as err:
            raise ValueError(
                f"A baseline tensor must broadcast to the images' shape {tuple(images.shape)}, got "
                f"{tuple(baseline.shape)}."
            ) from err
    if baseline == "blur":
        return blur_baseline(images).to(images.dtype)
    if baseline == "zeros":
        return torch.zeros_like(images)
    raise ValueError(f"Unknown baseline {baseline!r}; valid baselines are {BASELINES} or a tensor.")


def _image_maps(maps: Tensor, images: Tensor, name: str) -> Tensor:
    """Check maps against images, upsample bilinearly to the image size, clip to ``[0, 1]``."""
    check_maps(maps, name)
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"{name} hold {maps.shape[0]} images but images hold {images.shape[0]}.")
    m = torch.nan_to_num(maps.to(device=images.device, dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if m.shape[-2:] != images.shape[-2:]:
        m = F.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return m.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Responses: what is measured on each (perturbed) image
# ---------------------------------------------------------------------------------------------------------------


class Response(Protocol):
    """What :func:`perturb` measures on each image.

    See :class:`~tsm_lightning.metrics.faithfulness.EmbeddingResponse` and
    :class:`~tsm_lightning.metrics.scores.ScoreResponse`.
    """

    def clean(self, images: Tensor, max_batch: int) -> Tensor:
        """The ``(B,)`` response to the clean images, evaluated in chunks of at most ``max_batch``.

        Also keeps what the perturbed images are compared with.
        """

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(n,)`` responses to perturbed ``images`` made from the probe rows ``rows``."""


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------

_Builder = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``build(job_ids) -> (images (n, C, H, W), source_rows (n,))`` for a contiguous range of job ids."""


@dataclass(frozen=True)
class Perturbations:
    """What :func:`perturb` measured, per image.

    Attributes:
        fractions: ``(steps + 1,)`` perturbed pixel fractions ``n_k / N`` of the curves, from 0 to 1.
        clean: ``(B,)`` response to the clean images.
        base: ``(B,)`` response to the baseline images, or ``None`` without curves.
        kept: ``{map name: (B,)}`` response to ``x ⊙ m`` (with ``"drop"``).
        inner: ``{(map name, kind): (B, steps - 1)}`` responses at the inner curve steps.
    """

    fractions: Tensor
    clean: Tensor
    base: Tensor | None
    kept: dict[str, Tensor]
    inner: dict[tuple[str, str], Tensor]

    def curve(self, name: str, kind: str) -> Tensor:
        """``(B, steps + 1)`` curve of map ``name``: deletion from ``clean`` to ``base``, insertion the reverse."""
        assert self.base is not None
        ends = (self.clean, self.base) if kind == "deletion" else (self.base, self.clean)
        inner = self.inner[(name, kind)].to(ends[0].dtype)
        return torch.cat([ends[0][:, None], inner, ends[1][:, None]], dim=1)

    def auc(self, name: str, kind: str) -> Tensor:
        """``(B,)`` area under :meth:`curve` by the trapezoid rule over the fractions 0 .. 1."""
        curves = self.curve(name, kind)
        return torch.trapezoid(curves, x=self.fractions.to(curves.dtype), dim=1)


def perturb(
    response: Response,
    images: Tensor,
    maps: Mapping[str, Tensor],
    kinds: Collection[str],
    *,
    steps: int = 1,
    baseline: Baseline = "blur",
    max_batch: int = 256,
) -> Perturbations:
    """Evaluate ``response`` on every perturbation of ``kinds`` for every map, in as few forward passes as allowed.

    Args:
        response: what to measure (:class:`EmbeddingResponse`, :class:`ScoreResponse`).
        images: ``(B, C, H, W)`` normalised images.
        maps: ``{name: (B, h, w) maps}``; the names appear in error messages and key the results.
        kinds: a subset of :data:`KINDS`.
        steps: curve steps (``>= 1``); only the curves use it.
        baseline: ``"blur"`` (:func:`blur_baseline`), ``"zeros"`` or a tensor broadcastable to the images.
        max_batch: largest batch passed to the model.

    Returns:
        The responses, see :class:`Perturbations`.
    """
    check_images(images, channels=None)
    check_positive_int(steps, "steps")
    check_positive_int(max_batch, "max_batch")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown perturbation(s) {sorted(unknown)}; valid ones are {KINDS}.")
    b, _, h, w = images.shape
    prepared = {name: _image_maps(m, images, name) for name, m in maps.items()}
    curve_kinds = [kind for kind in ("deletion", "insertion") if kind in kinds]
    base_images = _resolve_baseline(baseline, images) if curve_kinds else None
    counts, fractions = _fractions(steps, h * w, images.device)

    segments: list[tuple[int, _Builder]] = []
    keys: list[tuple[str, str]] = []
    if base_images is not None:
        segments.append((b, _rows_of(base_images)))
        keys.append(("", "base"))
    for name, m in prepared.items():
        if "drop" in kinds:
            segments.append((b, _masked_builder(images, m)))
            keys.append((name, "drop"))
        if curve_kinds:
            assert base_images is not None  # resolved above whenever a curve is asked for
            rank = saliency_rank(m).to(torch.int32)  # half the memory of int64; N < 2**31
            for kind in curve_kinds:
                segments.append((b * (steps - 1), _curve_builder(images, base_images, rank, counts, kind)))
                keys.append((name, kind))

    clean = response.clean(images, max_batch)
    values = _run_jobs(segments, response, max_batch, images.device)
    results = dict(zip(keys, values, strict=True))
    return Perturbations(
        fractions=fractions,
        clean=clean,
        base=results.get(("", "base")),
        kept={name: results[(name, "drop")] for name in prepared if (name, "drop") in results},
        inner={key: v.reshape(b, steps - 1) for key, v in results.items() if key[1] in curve_kinds},
    )


def _run_jobs(
    segments: Sequence[tuple[int, _Builder]],
    value_fn: Callable[[Tensor, Tensor], Tensor],
    max_batch: int,
    device: torch.device,
) -> list[Tensor]:
    """Evaluate ``value_fn`` on every virtual image of every segment, in forward passes of ``<= max_batch`` images.

    Perturbed images are only materialised chunk by chunk; a chunk may span several segments.

    Returns:
        One tensor per segment: ``value_fn``'s outputs for job ids ``0 .. count - 1``, concatenated.
    """
    results: list[list[Tensor]] = [[] for _ in segments]
    pending: list[tuple[int, int, int]] = []

    def flush() -> None:
        if not pending:
            return
        built = [segments[s][1](torch.arange(lo, hi, device=device)) for s, lo, hi in pending]
        values = value_fn(torch.cat([img for img, _ in built]), torch.cat([src for _, src in built]))
        for (s, _, _), part in zip(pending, values.split([hi - lo for _, lo, hi in pending]), strict=True):
            results[s].append(part)
        pending.clear()

    size = 0
    for s, (count, _) in enumerate(segments):
        start = 0
        while start < count:
            take = min(count - start, max_batch - size)
            pending.append((s, start, start + take))
            size += take
            start += take
            if size >= max_batch:
                flush()
                size = 0
    flush()
    dtype = acc_dtype(device)
    return [torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device) for parts in results]


def _fractions(steps: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel counts ``n_k = round(k * N / steps)`` and fractions ``n_k / N`` for ``k = 0 .. steps``."""
    k = torch.arange(steps + 1, device=device)
    counts = torch.div(2 * k * n + steps, 2 * steps, rounding_mode="floor")
    return counts, counts.to(acc_dtype(device)) / n


def _rows_of(images: Tensor) -> _Builder:
    return lambda jobs: (images.index_select(0, jobs), jobs)


def _masked_builder(images: Tensor, maps: Tensor) -> _Builder:
    """Job ``j``: ``x[j] ⊙ m[j]``."""
    return lambda jobs: (images.index_select(0, jobs) * maps.index_select(0, jobs)[:, None].to(images.dtype), jobs)


def _curve_builder(images: Tensor, base: Tensor, rank: Tensor, counts: Tensor, kind: str) -> _Builder:
    """Builder of the intermediate steps ``k = 1 .. steps - 1`` of one curve, job ``j = b * (steps - 1) + k - 1``."""
    inner = counts.shape[0] - 2
    h, w = images.shape[-2:]

    def build(jobs: Tensor) -> tuple[Tensor, Tensor]:
        src = torch.div(jobs, inner, rounding_mode="floor")
        k = jobs % inner + 1
        chosen = rank.index_select(0, src) < counts[k][:, None]  # the first n_k pixels in saliency order
        use_base = ~chosen if kind == "insertion" else chosen
        return torch.where(use_base.view(-1, 1, h, w), base.index_select(0, src), images.index_select(0, src)), src

    return build
