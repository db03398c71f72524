"""Exact batched spectral decomposition of feature maps.

Every saliency method in this package is a function of the singular value decomposition of the channel
unfolding of one image's feature map. For a feature map ``F`` of shape ``(C, h, w)`` with ``N = h * w``, the
unfolding is ``X = F.reshape(C, N)`` and its centred twin is ``Xc = X - X.mean(dim=1, keepdim=True)`` (each
channel centred over space, as pytorch-grad-cam's EigenCAM does).

Writing ``X = sum_k s_k u_k v_k^T``, the *projection* of the feature map on the k-th channel factor is
``P_k = u_k^T X = s_k v_k^T``, a map of ``N`` pixels. A full-rank Tucker decomposition of ``F`` has the left
singular vectors ``u_k`` as its mode-0 factor and the singular values ``s_k`` as the Frobenius norms of its
core's mode-0 slices (see :mod:`tsm_lightning.core.tucker`), so the projections of both the Tucker and the
SVD view come from the same eigenproblem.

The fast path forms one batched Gram matrix of size ``m x m`` with ``m = min(C, N)`` -- ``X^T X`` when
``N <= C``, ``X X^T`` otherwise -- derives the centred Gram from it in ``O(m^2)``, and solves both with a single
batched float64 ``torch.linalg.eigh``. No Python loop runs over images.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tsm_lightning.checks import check_features, check_num_components

__all__ = [
    "EXACT_GRAM_FROM",
    "EXACT_GRAM_REDUCTION",
    "Decomposition",
    "Spectrum",
    "autocast_off",
    "decompose",
    "gram_dtype_for",
]

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device``'s type inside the block (a no-op for device types autocast does not know).

    Under autocast a ``bmm`` runs in bf16/fp16 whatever its inputs, which would silently degrade the Gram matrix;
    features computed under autocast are half precision too.
    """
    if device.type in _AUTOCAST_DEVICES:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


@dataclass(frozen=True)
class Spectrum:
    """Leading singular values and projections of one unfolding (uncentred or centred).

    Attributes:
        singular_values: ``(B, K)`` float64, descending, non-negative; ``s_k`` in feature units.
        projections: ``(B, K, h, w)`` signed projections ``P_k = u_k^T X`` (``= s_k v_k``) in feature units, float64
            when ``h * w <= C`` (from the eigenvectors), else in the Gram's dtype (float32 for float32 features on the
            CPU: a product of float64-exact eigenvectors with the features). The sign of each component is
            arbitrary, as for any SVD.
    """

    singular_values: Tensor
    projections: Tensor


@dataclass(frozen=True)
class Decomposition:
    """Result of :func:`decompose` for a batch of feature maps.

    Attributes:
        uncentred: spectrum of ``X`` (Tucker / TSM view), or ``None`` if not requested.
        centred: spectrum of ``Xc`` (EigenCAM view), or ``None`` if not requested.
        channel_sum: ``(B, h, w)`` float64 map ``sum_c F[c]``, used to fix EigenCAM's sign.
        valid: ``(B,)`` bool, ``False`` for images whose features held NaN or Inf (their spectra are zero).
    """

    uncentred: Spectrum | None
    centred: Spectrum | None
    channel_sum: Tensor
    valid: Tensor


EXACT_GRAM_FROM = 128
"""Gram size ``m = min(C, h * w)`` from which the CPU forms the Gram of float32 features in float64 too.

Measured (``benchmarks/bench_grids.py``, ``tests/core/test_maps.py``): with a float32 Gram the normalised multivector
maps of noise-like features at ``(256, 28, 28)`` differ from the float64 ones by up to 1e-4 (the limit), with a
float64 Gram by ~1e-6; the float64 Gram costs ~5% more there (the two float64 ``eigh`` dominate), but ~2x the
Gram's time at ``(2048, 7, 7)``. Below this size the Gram stays float32 unless :data:`EXACT_GRAM_REDUCTION` applies.
"""

EXACT_GRAM_REDUCTION = 1024
"""Reduction length ``max(C, h * w)`` (the sum each Gram entry takes) from which the CPU forms the Gram of float32
features in float64 too, whatever its size: at ``(2048, 7, 7)`` (ResNet50's ``layer4``, the paper's layer) the sums
over 2048 channels in float32 left the normalised MTSM 7e-5 from float64 on one CPU and 1.0e-4, the parity limit, on
another (``tests/core/test_maps.py``); the float64 Gram there is a 49 x 49 one, about twice the float32 one's time.
"""


def _work_dtype(features: Tensor) -> torch.dtype:
    """Dtype of the unfolding and the projections: float64 for float64 features and off the CPU, else float32."""
    if features.dtype == torch.float64 or features.device.type != "cpu":
        return torch.float64
    return torch.float32


def gram_dtype_for(features: Tensor) -> torch.dtype:
    """Dtype of the Gram matrix for these ``(B, C, h, w)`` features.

    float64 features stay float64. On the CPU float32 (and half-precision) features give a float32 Gram below
    :data:`EXACT_GRAM_FROM` (exact enough: the float64 ``eigh`` that follows is what matters) and a float64 one from
    there on, where float32 rounding would take the multivector maps to the edge of 1e-4 parity; likewise when each
    entry sums at least :data:`EXACT_GRAM_REDUCTION` terms. On any other device
    the Gram is taken in float64, so that TF32 matmuls (``torch.set_float32_matmul_precision("high")``, or cuBLAS
    defaults) can never degrade it: the guard holds by construction, without touching global matmul flags.
    """
    if _work_dtype(features) == torch.float64:
        return torch.float64
    channels, positions = features.shape[1], features.shape[2:].numel()
    m, reduction = min(channels, positions), max(channels, positions)
    return torch.float64 if m >= EXACT_GRAM_FROM or reduction >= EXACT_GRAM_REDUCTION else torch.float32


def _unfold(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unfold to ``(B, C, N)`` (float32 on the CPU, else float64), zero non-finite images, rescale extreme ones.

    Returns:
        ``(x, unit, valid)``: ``x`` is ``(B, C, N)``, ``unit`` is ``(B,)`` float64 with
        ``features[b] == x[b] * unit[b]`` (1 unless the image's magnitude would overflow or underflow the Gram),
        ``valid`` is ``(B,)`` bool.
    """
    b, c = features.shape[:2]
    x = features.reshape(b, c, -1).to(_work_dtype(features))
    # Max-abs without allocating |x| (a fresh buffer the size of the features costs more than the Gram here);
    # NaN and Inf propagate, which makes this the finiteness test too.
    amax = torch.maximum(x.amax(dim=(1, 2)), -x.amin(dim=(1, 2)))
    valid = torch.isfinite(amax)
    if not bool(valid.all()):
        bad = (~valid).nonzero().flatten().tolist()
        warnings.warn(
            f"Features of image(s) {bad} contain NaN or Inf; their saliency maps are set to zero.",
            RuntimeWarning,
            stacklevel=4,
        )
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        x = torch.where(valid[:, None, None], x, zero)
        amax = torch.where(valid, amax, zero)
    # Sums of squares of C * N entries must neither overflow nor fall into subnormals (in x's dtype: conservative
    # when the Gram is taken in float64).
    info = torch.finfo(x.dtype)
    high = (info.max / max(x.shape[1], x.shape[2])) ** 0.5 / 4
    low = info.tiny**0.5 * 1e4
    extreme = (amax > high) | ((amax > 0) & (amax < low))
    unit = torch.ones(b, dtype=torch.float64, device=x.device)
    if bool(extreme.any()):
        unit = torch.where(extreme, amax.to(torch.float64), unit)
        x = x / unit.to(x.dtype)[:, None, None]
    return x, unit, valid


def _top_eigh(gram: Tensor, k: int, *, negated: bool = False) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of a batch of symmetric PSD matrices, descending, in float64.

    Args:
        gram: ``(B, m, m)`` symmetric matrices ``G``, or ``-G`` with ``negated=True``: ``eigh`` returns ascending
            eigenvalues, which for ``-G`` is ``G``'s descending order, so no reversed copy of the eigenvectors is made.
        k: number of leading pairs to keep (``1 <= k <= m``).
        negated: ``gram`` holds ``-G``.

    Returns:
        ``(sigma, vectors)``: ``(B, k)`` singular values ``sqrt(max(lambda, 0))`` and ``(B, m, k)`` eigenvectors.
    """
    # One LAPACK call for the whole batch, in the calling thread. Splitting the batch over a pool of Python threads
    # was slower on 2 cores (each thread's MKL starts its own OpenMP team: 4 threads on 2 cores), and the pool's idle
    # threads made every later LAPACK call of the process about 5x slower while they lived.
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    if negated:
        evals, evecs = -evals[..., :k], evecs[..., :k]
    else:
        evals, evecs = evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
    return evals.clamp_min(0).sqrt(), evecs


def decompose(
    features: Tensor,
    *,
    uncentred: bool = True,
    centred: bool = True,
    num_components: int | None = None,
) -> Decomposition:
    """Exact leading SVD components of the channel unfolding of each feature map, batched.

    Args:
        features: ``(B, C, h, w)`` feature maps of any floating dtype on any device.
        uncentred: compute the spectrum of ``X`` (needed by TSM and MTSM).
        centred: compute the spectrum of ``Xc`` (needed by EigenCAM and Multivec-EigenCAM).
        num_components: number ``K`` of leading components to return; ``None`` returns all ``min(C, N)``.

    Returns:
        A :class:`Decomposition` on the features' device. Images whose features are not finite get zero
        spectra and a ``RuntimeWarning``.

    Raises:
        ValueError: if ``features`` is not ``(B, C, h, w)`` or ``num_components < 1``.
    """
    check_features(features)
    check_num_components(num_components)
    with autocast_off(features.device):
        return _decompose(features, uncentred, centred, num_components)


def _decompose(features: Tensor, uncentred: bool, centred: bool, num_components: int | None) -> Decomposition:
    bsz, c, h, w = features.shape
    n = h * w
    m = min(c, n)
    k = m if num_components is None else min(num_components, m)
    views = [view for view, wanted in (("uncentred", uncentred), ("centred", centred)) if wanted]
    if not views:
        raise ValueError("decompose needs at least one of uncentred=True or centred=True.")

    x, unit, valid = _unfold(features)
    col_sum = x.sum(dim=1)  # (B, N): channel-sum map, 1^T X
    # The eigenproblems of every view, stacked: (-G; -Gc), negated for _top_eigh, written in place (no concatenation).
    stack = torch.empty((len(views) * bsz, m, m), dtype=torch.float64, device=x.device)
    blocks = dict(zip(views, stack.split(bsz), strict=True))
    if n <= c:
        # Spatial Gram G = X^T X (N x N); centred Gram Gc = J G J with J = I - 11^T / N.
        xg = x.to(gram_dtype_for(features))
        gram = torch.bmm(xg.transpose(1, 2), xg).to(torch.float64)
        if uncentred:
            torch.neg(gram, out=blocks["uncentred"])
        if centred:
            row_mean = gram.mean(dim=2, keepdim=True)
            col_mean = gram.mean(dim=1, keepdim=True)
            torch.sub(row_mean + col_mean - gram.mean(dim=(1, 2), keepdim=True), gram, out=blocks["centred"])
        sigma, vecs = _top_eigh(stack, k, negated=True)
        # P_k = u_k^T X = s_k v_k^T: the projections come straight from the right singular vectors.
        projections = (vecs * sigma[:, None, :]).transpose(1, 2).split(bsz)  # (B, K, N) per view
    else:
        # Channel Gram G = X X^T (C x C); centred Gram Gc = G - r r^T / N with r = X 1.
        xg = x.to(gram_dtype_for(features))
        gram = torch.bmm(xg, xg.transpose(1, 2)).to(torch.float64)
        if uncentred:
            torch.neg(gram, out=blocks["uncentred"])
        if centred:
            r = xg.sum(dim=2).to(torch.float64)
            torch.baddbmm(gram, r[:, :, None], r[:, None, :], beta=-1.0, alpha=1.0 / n, out=blocks["centred"])
        sigma, vecs = _top_eigh(stack, k, negated=True)
        # P_k = u_k^T X in the unfolding's dtype: one (K x C) @ (C x N) product per view and image. The eigenvectors
        # are exact to float64; rounding them and the product to float32 costs ~1e-7 relative, far below what the
        # maps need, and halves the largest tensors of the whole computation.
        bases = vecs.to(x.dtype).transpose(1, 2).split(bsz)
        unfoldings = {"uncentred": x}
        if centred:
            unfoldings["centred"] = x - x.mean(dim=2, keepdim=True)
        projections = tuple(torch.bmm(basis, unfoldings[view]) for basis, view in zip(bases, views, strict=True))

    rescaled = bool((unit != 1).any())
    spectra = {}
    for view, s, p in zip(views, sigma.split(bsz), projections, strict=True):
        if rescaled:
            s = s * unit[:, None]
            p = p * unit.to(p.dtype)[:, None, None]
        spectra[view] = Spectrum(s, p.reshape(bsz, k, h, w))
    return Decomposition(
        uncentred=spectra.get("uncentred"),
        centred=spectra.get("centred"),
        channel_sum=(col_sum.to(torch.float64) * unit[:, None]).reshape(bsz, h, w),
        valid=valid,
    )
