import os
import sys
from pathlib import Path

import pytest
import torch

# Test helpers live next to the tests; the one reference implementation of the methods (reference_paths) and the
# study's baselines live in benchmarks/, which the benchmarks use too.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def blob_features(batch: int = 4, channels: int = 32, size: int = 7, seed: int = 0) -> torch.Tensor:
    """Non-negative features with one bright blob per image, at a known place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(batch, channels, size, size, generator=g) * 0.1
    pattern = torch.rand(channels, generator=g) + 0.5
    for b in range(batch):
        i, j = (b * 2) % (size - 1), (b * 3) % (size - 1)
        feats[b, :, i : i + 2, j : j + 2] += pattern[:, None, None] * 3
    return feats
