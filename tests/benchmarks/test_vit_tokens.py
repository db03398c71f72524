"""benchmarks/vit_tokens.py: the token statistics against numpy, and a run on a real checkpoint."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from vit_tokens import main, token_statistics  # noqa: E402


def test_statistics_match_numpy_on_tokens_dominated_by_their_mean():
    gen = torch.Generator().manual_seed(0)
    batch, side, width = 5, 4, 12
    direction = torch.randn(width, generator=gen)
    inside = torch.zeros(batch, side * side, dtype=torch.bool)
    inside[:, 5:7] = True
    inside[4] = False  # no object token: left out
    scale = torch.where(inside, 0.9, 1.0)[..., None]  # the object's tokens hold less of the common direction
    tokens = 10 * scale * direction + torch.randn(batch, side * side, width, generator=gen)
    stats = token_statistics(tokens, inside)

    cosines, norms, ratios = [], [], []
    for b in range(4):
        x = tokens[b].double().numpy().T
        u1 = np.linalg.svd(x)[0][:, 0]
        mean = x.mean(axis=1)
        cosines.append(abs(u1 @ mean) / np.linalg.norm(mean))
        norm, projection = np.linalg.norm(x, axis=0), np.abs(u1 @ x)
        mask = inside[b].numpy()
        norms.append(norm[mask].mean() / norm[~mask].mean())
        ratios.append(projection[mask].mean() / projection[~mask].mean())
    assert stats["images"] == 4
    assert stats["cos_u1_mean_median"] == pytest.approx(np.median(cosines), abs=1e-9)
    assert stats["cos_u1_mean_min"] == pytest.approx(min(cosines), abs=1e-9)
    assert stats["norm_ratio"] == pytest.approx(np.mean(norms), abs=1e-9)
    assert stats["tsm_ratio"] == pytest.approx(np.mean(ratios), rel=1e-5)  # the library's float32 map
    assert stats["tsm_ratio"] < 0.95 and stats["tsm_favours_clutter"] == 1.0


def test_statistics_refuse_tokens_they_cannot_read():
    with pytest.raises(ValueError, match="square grid"):
        token_statistics(torch.randn(2, 65, 8), torch.ones(2, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="no image has both"):
        token_statistics(torch.randn(2, 16, 8), torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, N\) mask"):
        token_statistics(torch.randn(2, 16, 8), torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore")
def test_runs_on_a_simclr_vit_checkpoint(tmp_path, capsys):
    import simclr

    tiny = ["--max-steps", "1", "--image-size", "32", "--batch-size", "4", "--num-samples", "8", "--probe-size", "2"]
    tiny += ["--every-n-steps", "1", "--accelerator", "cpu", "--output", str(tmp_path)]
    log_dir = simclr.main([*tiny, "--backbone", "vit"])
    checkpoint = str(log_dir / "checkpoints" / "last.ckpt")
    argv = ["--example", "simclr", "--checkpoint", checkpoint, "--probe-size", "8", "--csv", str(tmp_path / "t.csv")]
    stats = main(argv)
    assert 1 <= stats["images"] <= 8 and 0 <= stats["cos_u1_mean_min"] <= stats["cos_u1_mean_median"] <= 1
    assert f"tsm_ratio: {stats['tsm_ratio']:.6g}" in capsys.readouterr().out
    main([*argv, "--name", "again"])
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [r["run"] for r in rows] == [checkpoint, "again"] and float(rows[1]["tsm_ratio"]) == stats["tsm_ratio"]
    resnet = simclr.main([*tiny, "--output", str(tmp_path / "resnet")])
    with pytest.raises(SystemExit, match="holds a ResNet"):
        main(["--example", "simclr", "--checkpoint", str(resnet / "checkpoints" / "last.ckpt")])
