"""tsm-lightning: watch what a self-supervised CNN (or vision transformer) looks at while it trains.

Label-free saliency maps -- EigenCAM, Tucker Saliency Maps (TSM), Multivec-EigenCAM and Multivector TSM (MTSM),
from Bouayed et al., "CNN Explainability with Multivector Tucker Saliency Maps for Self-Supervised Models"
(TMLR 2025) -- computed exactly and batched in pure torch.

The public names below are loaded on first use (PEP 562), so that ``import tsm_lightning`` costs nothing and the
command line answers a usage error without importing torch; ``from tsm_lightning import explain`` works as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "METHODS": "tsm_lightning.constants",
    "SaliencyMonitor": "tsm_lightning.callbacks",
    "DisplayOptions": "tsm_lightning.options",
    "MapOptions": "tsm_lightning.options",
    "MetricOptions": "tsm_lightning.options",
    "Probe": "tsm_lightning.probe",
    "Tracker": "tsm_lightning.tracking",
    "capture": "tsm_lightning.capture",
    "find_layer": "tsm_lightning.discovery",
    "eigencam": "tsm_lightning.core",
    "mtsm": "tsm_lightning.core",
    "multivec_eigencam": "tsm_lightning.core",
    "normalize_maps": "tsm_lightning.core",
    "saliency_maps": "tsm_lightning.core",
    "tsm": "tsm_lightning.core",
    "tucker_saliency": "tsm_lightning.core",
    "upsample_maps": "tsm_lightning.core",
    "explain": "tsm_lightning.explain",
    "attention_maps": "tsm_lightning.explain",
    "TokenGrid": "tsm_lightning.tokens",
    "tokens_to_grid": "tsm_lightning.tokens",
}

if TYPE_CHECKING:  # what static tools see ("import x as x" marks a re-export); at run time __getattr__ loads them
    from tsm_lightning.callbacks import SaliencyMonitor as SaliencyMonitor
    from tsm_lightning.capture import capture as capture
    from tsm_lightning.constants import METHODS as METHODS
    from tsm_lightning.core import eigencam as eigencam
    from tsm_lightning.core import mtsm as mtsm
    from tsm_lightning.core import multivec_eigencam as multivec_eigencam
    from tsm_lightning.core import normalize_maps as normalize_maps
    from tsm_lightning.core import saliency_maps as saliency_maps
    from tsm_lightning.core import tsm as tsm
    from tsm_lightning.core import tucker_saliency as tucker_saliency
    from tsm_lightning.core import upsample_maps as upsample_maps
    from tsm_lightning.discovery import find_layer as find_layer
    from tsm_lightning.explain import attention_maps as attention_maps
    from tsm_lightning.explain import explain as explain
    from tsm_lightning.options import DisplayOptions as DisplayOptions
    from tsm_lightning.options import MapOptions as MapOptions
    from tsm_lightning.options import MetricOptions as MetricOptions
    from tsm_lightning.probe import Probe as Probe
    from tsm_lightning.tokens import TokenGrid as TokenGrid
    from tsm_lightning.tokens import tokens_to_grid as tokens_to_grid
    from tsm_lightning.tracking import Tracker as Tracker


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tsm_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """This package's module type: importing a submodule named like the function it defines never hides it.

    Importing ``tsm_lightning.capture`` (or ``.explain``) sets the package attribute ``capture`` to the submodule;
    here the function of that name takes its place, so ``tsm_lightning.capture`` is the function however the
    submodule got imported, as it was when this file imported both eagerly.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["__version__", *_LAZY]
