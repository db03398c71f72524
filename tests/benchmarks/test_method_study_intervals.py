"""The method study's paired bootstrap intervals against what they must give on data with a known answer."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from method_study import PAIRS, VARIANTS, interval_table, intervals, paired_bootstrap


def test_constant_differences_give_a_point_interval():
    assert paired_bootstrap([torch.full((10,), 0.25), torch.full((7,), 0.25)]) == pytest.approx((0.25, 0.25, 0.25))


def test_one_seed_matches_the_normal_interval_of_a_mean():
    g = torch.Generator().manual_seed(1)
    d = 0.1 + torch.randn(4000, generator=g, dtype=torch.float64)
    mean, low, high = paired_bootstrap([d])
    half = 1.96 * float(d.std()) / 4000**0.5
    assert mean == pytest.approx(float(d.mean()))
    assert low == pytest.approx(mean - half, abs=0.006) and high == pytest.approx(mean + half, abs=0.006)


def test_seeds_are_resampled_so_disagreeing_models_widen_the_interval():
    g = torch.Generator().manual_seed(2)
    a = 0.0 + 0.01 * torch.randn(500, generator=g)  # model 1: no difference
    b = 1.0 + 0.01 * torch.randn(500, generator=g)  # model 2: a large one
    mean, low, high = paired_bootstrap([a, b])
    # images alone would give about +-0.001; the draws of two seeds give 0, 0.5 or 1
    assert mean == pytest.approx(0.5, abs=0.01) and low < 0.05 and high > 0.95
    with_nan = torch.cat([a, torch.tensor([float("nan")])])
    assert paired_bootstrap([with_nan, b]) == pytest.approx((mean, low, high), abs=0.02)
    with pytest.raises(ValueError, match="no finite paired difference"):
        paired_bootstrap([torch.tensor([float("nan")])])


def test_intervals_take_a_minus_b_per_image_and_call_significance():
    names = {name for pair in PAIRS for name in pair}
    assert {("tsm", "eigencam"), ("mtsm", "multivec_eigencam"), ("tsm", VARIANTS[0]), ("tsm", VARIANTS[1])} <= set(
        PAIRS
    )
    seeds = []
    for _ in range(3):
        values = {n: {"pointing_game": torch.zeros(20), "energy_in_mask": torch.zeros(20)} for n in names}
        values["tsm"]["pointing_game"] = torch.ones(20)  # TSM always hits, every other map misses
        values["mtsm"]["energy_in_mask"] = torch.linspace(-1, 1, 20)  # symmetric around 0: no difference
        seeds.append(values)
    rows = {(r["a"], r["b"], r["metric"]): r for r in intervals(seeds)}
    hit = rows[("tsm", "eigencam", "pointing_game")]
    assert (hit["mean_difference"], hit["ci_low"], hit["significant"]) == (1.0, 1.0, True)
    same = rows[("mtsm", "multivec_eigencam", "energy_in_mask")]
    assert same["ci_low"] < 0 < same["ci_high"] and same["significant"] is False
    assert "| tsm − eigencam | pointing_game | +1.000 | [+1.000, +1.000] | yes |" in interval_table(list(rows.values()))
