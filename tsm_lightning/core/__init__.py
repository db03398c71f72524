"""Pure-torch saliency maths: batched, exact, no Lightning, no hooks, no I/O."""

from tsm_lightning.core.maps import (
    METHODS,
    WEIGHTINGS,
    compute_maps,
    decomposition_request,
    eigencam,
    mtsm,
    multivec_eigencam,
    saliency_maps,
    tsm,
    validate_methods,
)
from tsm_lightning.core.postprocess import normalize_maps, upsample_maps
from tsm_lightning.core.spectral import Decomposition, Spectrum, decompose, validate_features
from tsm_lightning.core.tucker import TUCKER_METHODS, tucker_saliency

__all__ = [
    "METHODS",
    "TUCKER_METHODS",
    "WEIGHTINGS",
    "Decomposition",
    "Spectrum",
    "compute_maps",
    "decompose",
    "decomposition_request",
    "eigencam",
    "mtsm",
    "multivec_eigencam",
    "normalize_maps",
    "saliency_maps",
    "tsm",
    "tucker_saliency",
    "upsample_maps",
    "validate_features",
    "validate_methods",
]
