"""The installed ``tsm-lightning`` console script: the environment's entry point, run the way a user runs it.

``tests/test_cli.py`` calls ``cli.main`` (or ``python -m tsm_lightning.cli``); these tests run the executable that
``pip install`` generated from ``[project.scripts]``, so that a broken entry point or import path shows here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tsm_lightning
from tsm_lightning.render import labelled_grid

SCRIPT = Path(sys.executable).parent / ("tsm-lightning.exe" if os.name == "nt" else "tsm-lightning")
pytestmark = pytest.mark.skipif(
    not SCRIPT.is_file(),
    reason=f"no console script at {SCRIPT}: install the package into this environment (pip install -e .)",
)
SIZE = 32
SHOWN = 128  # 32 px inputs are shown 4x enlarged, so that the column labels fit
PAD = 2


def run_script(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the console script; the package these tests import comes first on its path (an editable install of
    another checkout would otherwise answer)."""
    root = Path(tsm_lightning.__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {k: v for k, v in os.environ.items() if k != "TSM_LIGHTNING_DEBUG"} | {"PYTHONPATH": path}
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help(tmp_path: Path) -> None:
    res = run_script("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: tsm-lightning ")
    assert all(command in res.stdout for command in ("explain", "compare", "layers"))


def test_explain(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        pixels = (g.random((40, 48, 3)) * 120).astype(np.uint8)
        pixels[8:24, 10:26] = 255
        Image.fromarray(pixels).save(tmp_path / name)
    res = run_script("explain", "--arch", "resnet18", "--image-size", SIZE, "--images", "a.png", "b.png",
                     "--out", "out", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "warning: no weights given" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"a.png", "b.png", "metrics.csv", "metrics.json", ".tsm-lightning.json"}
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["random_weights"] is True and len(meta["rows"]) == 2 * 4
    # The picture: input and four overlays under a header row naming them (compared pixel for pixel with the header
    # that labelled_grid draws over blank tiles: it depends only on the texts and the layout).
    labels = ["input", "EigenCAM", "TSM", "MV-EigenCAM", "MTSM"]
    expected = labelled_grid([torch.zeros(len(labels), 3, SHOWN, SHOWN, dtype=torch.uint8)], labels)
    with Image.open(out / "a.png") as img:
        picture = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert picture.shape == expected.shape
    header = picture.shape[1] - (SHOWN + 2 * PAD)
    assert header > 0 and (picture[:, :header] < 128).any()
    assert torch.equal(picture[:, :header], expected[:, :header])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "the following arguments are required: COMMAND"),  # a parser error
        (("explain", "--arch", "resnet18", "--images", "x.png", "--out", "o"), "no such file or folder: 'x.png'"),
    ],
)
def test_usage_error_is_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    res = run_script(*args, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
