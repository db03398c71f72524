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


@pytest.fixture
def inproc(env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``tsm-lightning`` (``cli.main``) in this process, much faster than a subprocess, with the test module's
    ``env`` folder (where its model modules are written) on ``sys.path``: returns ``(code, stdout, stderr)``."""
    from tsm_lightning import cli

    monkeypatch.syspath_prepend(str(env["root"]))
    monkeypatch.delenv("TSM_LIGHTNING_DEBUG", raising=False)

    def call(*args: object) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return call
