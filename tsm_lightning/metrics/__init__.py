"""Label-free metrics for saliency maps, feature spectra and embeddings, batched in pure torch.

Users of self-supervised models have no labels, so every metric here needs at most the model itself. All metrics
are computed for a whole probe batch at once (no Python loop over images; only a loop over chunks of at most
``max_batch`` perturbed images bounds the memory of the model-based metrics).

One module per concern; every name is importable from ``tsm_lightning.metrics``:

* :mod:`~tsm_lightning.metrics.spectra` -- spectral concentration of the features (from a decomposition);
* :mod:`~tsm_lightning.metrics.complexity` -- map entropy and Gini sparseness;
* :mod:`~tsm_lightning.metrics.agreement` -- Pearson correlation: stability across steps, agreement of methods;
* :mod:`~tsm_lightning.metrics.localization` -- pointing game, energy-in-mask, IoU against known masks;
* :mod:`~tsm_lightning.metrics.perturbation` -- the one perturbation engine of the model-based metrics, random
  maps, saliency order, baselines;
* :mod:`~tsm_lightning.metrics.faithfulness` -- embedding faithfulness (drop, increase, gain, deletion, insertion);
* :mod:`~tsm_lightning.metrics.scores` -- the classic score metrics (Average Drop / Increase / Gain, score AUCs);
* :mod:`~tsm_lightning.metrics.collapse` -- collapse indicators of an embedding;
* :mod:`~tsm_lightning.metrics.shape` -- label-free shape statistics of a map: mass in the largest blob, blob
  count, distance from the border, spread, consistency under flip, similarity to a fresh initialisation's maps;
* :mod:`~tsm_lightning.metrics.summary` -- :func:`map_metrics` (the cheap ones for every method) and
  :func:`summarize`.

Input checks are :mod:`tsm_lightning.checks`, shared with the rest of the package.

Conventions:

* ``maps`` are ``(B, H, W)`` floating tensors in ``[0, 1]`` (see :func:`~tsm_lightning.core.normalize_maps`).
  Non-finite map values are treated as 0, as :func:`~tsm_lightning.core.normalize_maps` does, and the
  mass-based metrics (entropy, Gini, energy-in-mask) clip negative values to 0.
* ``masks`` are ``(B, H, W)`` (or ``(B, 1, H, W)``) bool, integer or float tensors; a pixel is inside where the
  value is ``> 0.5``. Masks of another size than the maps are resized to the maps' size with nearest-neighbour
  interpolation (``mode="nearest-exact"``), never the maps to the masks.
* ``images`` are ``(B, 3, H, W)`` normalised model inputs. Maps of another size than the images are upsampled
  bilinearly to the image size before they perturb an image.
* Every per-image result is a ``(B,)`` float32 tensor on the input's device. It is NaN exactly where the metric is
  undefined for that image (an empty mask, a relative score drop from a zero score, non-finite features); reduce
  with ``torch.nanmean`` or :func:`summarize`, which also counts the excluded images.
* Functions that call a model run it under ``torch.no_grad()``. :func:`default_embed_fn` and
  :func:`predicted_class_score` also put the model in eval mode and restore every sub-module's own ``training``
  flag afterwards; a bare ``lambda`` you pass as ``embed_fn`` or ``score_fn`` is responsible for that itself.

Model-based metrics perturb ``x`` with a map and compare the model's response with its response to ``x``:

* embedding metrics use the cosine similarity ``cos(e(x), e(x'))`` of the model's embedding ``e`` (the class
  score of the classic metrics is replaced by "how much of the original embedding survives");
* score metrics (Average Drop / Increase / Gain, score deletion / insertion) use a user-given
  ``score_fn(images) -> (n,)``, e.g. the softmax probability of the class predicted on the clean image
  (:func:`predicted_class_score`).

Both kinds are reported beside the same number for :func:`random_maps` (fixed seed), so the gap between a real
explanation and chance is visible.
"""

from tsm_lightning.metrics.agreement import pearson
from tsm_lightning.metrics.collapse import effective_rank, embedding_spread
from tsm_lightning.metrics.complexity import gini, map_entropy
from tsm_lightning.metrics.faithfulness import (
    default_embed_fn,
    deletion_auc,
    deletion_curve,
    embedding_drop,
    embedding_gain,
    embedding_increase,
    faithfulness_metrics,
    insertion_auc,
    insertion_curve,
)
from tsm_lightning.metrics.localization import energy_in_mask, localization_metrics, mask_iou, pointing_game
from tsm_lightning.metrics.perturbation import EmbedFn, ScoreFn, blur_baseline, random_maps, saliency_rank
from tsm_lightning.metrics.scores import (
    average_drop,
    average_gain,
    average_increase,
    predicted_class_score,
    score_deletion_auc,
    score_insertion_auc,
    score_metrics,
)
from tsm_lightning.metrics.shape import (
    blob_count,
    border_distance,
    connected_components,
    flip_consistency,
    fresh_init_similarity,
    largest_blob_mass,
    mass_spread,
)
from tsm_lightning.metrics.spectra import spectral_concentration, spectral_metrics
from tsm_lightning.metrics.summary import map_metrics, summarize

__all__ = [
    "EmbedFn",
    "ScoreFn",
    "average_drop",
    "average_gain",
    "average_increase",
    "blob_count",
    "blur_baseline",
    "border_distance",
    "connected_components",
    "default_embed_fn",
    "deletion_auc",
    "deletion_curve",
    "effective_rank",
    "embedding_drop",
    "embedding_gain",
    "embedding_increase",
    "embedding_spread",
    "energy_in_mask",
    "faithfulness_metrics",
    "flip_consistency",
    "fresh_init_similarity",
    "gini",
    "insertion_auc",
    "insertion_curve",
    "largest_blob_mass",
    "localization_metrics",
    "map_entropy",
    "map_metrics",
    "mask_iou",
    "mass_spread",
    "pearson",
    "pointing_game",
    "predicted_class_score",
    "random_maps",
    "saliency_rank",
    "score_deletion_auc",
    "score_insertion_auc",
    "score_metrics",
    "spectral_concentration",
    "spectral_metrics",
    "summarize",
]
