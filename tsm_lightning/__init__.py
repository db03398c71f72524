"""tsm-lightning: watch what a self-supervised CNN looks at while it trains.

Label-free saliency maps -- EigenCAM, Tucker Saliency Maps (TSM), Multivec-EigenCAM and Multivector TSM (MTSM),
from Bouayed et al., "CNN Explainability with Multivector Tucker Saliency Maps for Self-Supervised Models"
(TMLR 2025) -- computed exactly and batched in pure torch.
"""

from tsm_lightning.capture import capture, find_layer
from tsm_lightning.core import (
    METHODS,
    eigencam,
    mtsm,
    multivec_eigencam,
    normalize_maps,
    saliency_maps,
    tsm,
    tucker_saliency,
    upsample_maps,
)
from tsm_lightning.explain import explain

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The callback imports Lightning; load it on first use so that the maths stays a light import.
    if name == "SaliencyMonitor":
        from tsm_lightning.callbacks import SaliencyMonitor

        return SaliencyMonitor
    raise AttributeError(f"module 'tsm_lightning' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "SaliencyMonitor",
    "__version__",
    "capture",
    "eigencam",
    "explain",
    "find_layer",
    "mtsm",
    "multivec_eigencam",
    "normalize_maps",
    "saliency_maps",
    "tsm",
    "tucker_saliency",
    "upsample_maps",
]
