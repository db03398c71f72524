"""Leave every global random stream exactly as it was."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["preserved_rng"]


@contextmanager
def preserved_rng(seed: int | None = None) -> Iterator[None]:
    """Save the python, numpy, torch CPU and (initialised) CUDA RNG states, restore them on exit.

    Args:
        seed: if given, seed all of them inside the block, so that random work done there (a dataloader's
            augmentations, say) is reproducible.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                if devices:  # never queue a seed for a CUDA context that does not exist yet
                    torch.cuda.manual_seed_all(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
