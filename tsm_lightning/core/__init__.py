"""Pure-torch saliency maths: batched, exact, no Lightning, no hooks, no I/O."""

from tsm_lightning.core.maps import (
    compute_maps,
    decomposition_request,
    eigencam,
    mtsm,
    multivec_eigencam,
    saliency_maps,
    tsm,
)
from tsm_lightning.core.methods import METHOD_TABLE, Method, validate_methods, validate_weighting
from tsm_lightning.core.postprocess import normalize_maps, upsample_maps
from tsm_lightning.core.spectral import Decomposition, Spectrum, decompose
from tsm_lightning.core.tucker import TUCKER_METHODS, tucker_saliency

__all__ = [
    "METHOD_TABLE",
    "TUCKER_METHODS",
    "Decomposition",
    "Method",
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
    "validate_methods",
    "validate_weighting",
]
