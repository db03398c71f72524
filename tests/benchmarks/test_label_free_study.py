"""benchmarks/label_free_study.py end to end on tiny synthetic run records, every number recomputed independently."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tsm_lightning import upsample_maps
from tsm_lightning.metrics import largest_blob_mass, map_entropy, pointing_game

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import label_free_study as study  # noqa: E402

STEPS = (0, 5, 10, 15)


def _normalise(m: torch.Tensor) -> torch.Tensor:
    low = m.flatten(1).amin(dim=1)[:, None, None]
    high = m.flatten(1).amax(dim=1)[:, None, None]
    return (m - low) / (high - low).clamp_min(1e-8)


def synthetic_record(seed: int, swap: bool, n: int = 6, grid: int = 8, size: int = 32) -> dict:
    """A run in the record format: swap runs' maps move onto the object's disc, no-swap runs' onto clutter blobs.

    Scalars hold the TSM pointing game (computed as the monitor does: maps upsampled to the masks' size), the TSM
    entropy, an ``oracle`` series equal to the pointing game, a ``trap`` series equal to it on seeds 0-2 and to its
    opposite on seeds 3-4, a pure-noise series, and tags the study must leave
    out (a localization metric, a reference line, an exclusion count).
    """
    g = torch.Generator().manual_seed(100 * seed + int(swap))
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centres = torch.rand(n, 2, generator=g) * size * 0.6 + size * 0.2
    masks = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 <= (size * 0.15) ** 2
    pool = size // grid
    obj = torch.nn.functional.avg_pool2d(masks.float()[:, None], pool)[:, 0]
    clutter = torch.rand(n, grid, grid, generator=g) ** 6 * (obj < 0.1)
    start = torch.rand(n, grid, grid, generator=g)
    fresh = _normalise(torch.rand(n, grid, grid, generator=g))
    record = {
        "meta": {"method": "simclr", "seed": seed, "swap": swap, "steps": STEPS[-1], "layer": "backbone.7"},
        "masks": masks,
        "steps": list(STEPS),
        "maps": {},
        "maps_flip": {},
        "fresh_maps": {"tsm": fresh.half()},
        "scalars": {},
        "loss": {s: 5.0 - 0.1 * s + 0.01 * seed for s in range(STEPS[-1] + 1)},
    }
    for k, step in enumerate(STEPS):
        a = 0.95 * k / (len(STEPS) - 1)
        target = obj if swap else clutter
        maps = _normalise((1 - a) * start + a * target).half()
        record["maps"][step] = {"tsm": maps}
        record["maps_flip"][step] = {
            "tsm": _normalise(maps.float() + 0.1 * torch.rand(n, grid, grid, generator=g)).half()
        }
        pg = float(pointing_game(upsample_maps(maps.float(), size), masks).nanmean())
        record["scalars"][step] = {
            "saliency/tsm/pointing_game": pg,
            "saliency/tsm/entropy": float(map_entropy(maps.float()).mean()),
            "saliency/oracle/score": pg,
            "saliency/noise/score": float(torch.rand(1, generator=g)),
            "saliency/trap/score": pg if seed < 3 else -pg,  # perfect on the training seeds, reversed on held-out
            "saliency/blip/score": pg if step == 5 else 0.0,  # apart at step 5 only
            "saliency/trap2/score": pg if seed < 2 else -pg,  # reversed on seed 2 already
            "saliency/tsm/mask_iou": 0.5,
            "saliency/tsm/agreement_eigencam": 0.7,  # symmetric: the same number twice
            "saliency/eigencam/agreement_tsm": 0.7,
            "saliency/random/entropy": 0.9,
            "saliency/tsm/entropy_excluded": 1.0,
            "saliency/fresh_init_tsm/stability_first": 0.3,
            "saliency/tsm/stability_first": 1.0 - 0.02 * step,
        }
    return record


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    for seed in range(5):
        for swap in (True, False):
            run = folder / f"simclr_{'swap' if swap else 'noswap'}_seed{seed}"
            run.mkdir()
            torch.save(synthetic_record(seed, swap), run / "record.pt")
    return folder


@pytest.fixture(scope="module")
def result(records, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    figure = out / "figure.png"
    rows = study.main(["--records", str(records), "--output", str(out), "--figure", str(figure), "--bootstrap", "50"])
    return rows, out, figure


def _row(rows, tag):
    (row,) = [r for r in rows if r["tag"] == tag and r["group"] == "all"]
    return row


def test_outputs_written(result):
    rows, out, figure = result
    assert figure.stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 10 and summary["target"] == study.TARGET
    assert "--records" in summary["command"]
    cost = summary["cost_ms"]
    assert cost["maps"] == [6, 8, 8] and all(cost[k] > 0 for k in (*study.SHAPE, "fresh_init_similarity"))
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len([r for r in rows if r["group"] == "all"])
    readme = (out / "readme_table.md").read_text()
    assert "| `tsm/entropy` |" in readme and "| `oracle/score:delta` |" in readme  # TSM's, and what holds
    assert (
        "| `eigencam/agreement_tsm` |" in readme
        and "| `tsm/entropy:delta` |" not in readme
        and "saliency/" not in readme
    )
    with (out / "signals.csv").open() as f:
        assert {r["tag"] for r in csv.DictReader(f)} == {r["tag"] for r in rows}


def test_only_label_free_series_are_judged(result):
    tags = {r["tag"] for r in result[0]}
    assert "saliency/tsm/entropy" in tags and "shape/tsm/largest_blob_mass" in tags
    assert "shape/tsm/flip_consistency" in tags and "shape/tsm/fresh_init_similarity" in tags
    assert "loss" in tags and "saliency/tsm/stability_first_minus_fresh" in tags
    assert "saliency/tsm/entropy:delta" in tags
    for left_out in ("saliency/tsm/mask_iou", "saliency/random/entropy", "saliency/tsm/entropy_excluded", study.TARGET):
        assert left_out not in tags
    assert not any(t.startswith("saliency/fresh_init_") for t in tags)
    assert "saliency/eigencam/agreement_tsm" in tags and "saliency/tsm/agreement_eigencam" not in tags


def test_series_csv_recomputes(records, result):
    _, out, _ = result
    with (out / "series.csv").open() as f:
        rows = list(csv.DictReader(f))
    record = torch.load(records / "simclr_swap_seed3" / "record.pt", weights_only=True)

    def value(tag, step):
        (v,) = [r["value"] for r in rows if r["run"] == "simclr_swap_seed3" and r["tag"] == tag and r["step"] == step]
        return float(v)

    maps = record["maps"][10]["tsm"].float()
    assert value("shape/tsm/largest_blob_mass", "10") == pytest.approx(float(largest_blob_mass(maps).mean()), rel=1e-5)
    assert value(study.TARGET, "15") == pytest.approx(record["scalars"][15][study.TARGET], rel=1e-5)
    pearson = [
        np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, record["fresh_maps"]["tsm"].float(), strict=True)
    ]
    assert value("shape/tsm/fresh_init_similarity", "10") == pytest.approx(np.mean(pearson), rel=1e-4)
    flipped = record["maps_flip"][10]["tsm"].float()  # already flipped back by the recorder
    pearson = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, flipped, strict=True)]
    assert value("shape/tsm/flip_consistency", "10") == pytest.approx(np.mean(pearson), rel=1e-4)
    first = record["scalars"][0]["saliency/tsm/entropy"]
    run = study.series_of("simclr_swap_seed3", record)
    assert run.values["saliency/tsm/entropy:delta"][10] == pytest.approx(
        record["scalars"][10]["saliency/tsm/entropy"] - first, abs=1e-6
    )
    assert not any(r["tag"].endswith(":delta") for r in rows)  # derivable, not written
    assert value("saliency/tsm/stability_first_minus_fresh", "5") == pytest.approx(0.9 - 0.3, abs=1e-5)
    assert value("loss", "5") == pytest.approx(np.mean([5.0 - 0.1 * s + 0.03 for s in range(1, 6)]), rel=1e-5)
    reference = float(largest_blob_mass(record["fresh_maps"]["tsm"].float()).mean())
    assert value("shape/tsm/largest_blob_mass", "reference") == pytest.approx(reference, rel=1e-5)


def test_oracle_holds_noise_does_not(result):
    rows = result[0]
    oracle = _row(rows, "saliency/oracle/score")
    assert oracle["rho"] == pytest.approx(1.0) and oracle["rho_train"] == pytest.approx(1.0)
    assert oracle["verdict"] == "holds" and oracle["heldout_accuracy"] == 1.0
    assert oracle["rho_lo"] <= oracle["rho"] <= oracle["rho_hi"]
    assert oracle["separated_from_step"] == 5  # step 0: every pointing game is 0 (AUC 0.5); from step 5 on, 1
    trap = _row(rows, "saliency/trap/score")
    assert trap["selected"] and trap["rho_train"] == pytest.approx(1.0) and trap["rho_heldout"] == pytest.approx(-1.0)
    assert trap["verdict"] == "failed on held-out"
    # Threshold (mean swap + mean no-swap) / 2 on seeds 0-2; held-out swap runs end at -pg (wrong side), no-swap
    # runs at -0 = 0, still below it (right side): half the held-out runs are classified correctly.
    assert trap["heldout_accuracy"] == 0.5
    assert math.isnan(trap["separated_from_step"])  # over all runs: 3 of 5 swap runs above the no-swap ones, AUC 0.6
    assert math.isnan(_row(rows, "saliency/blip/score")["separated_from_step"])  # apart at step 5, not after
    noise = _row(rows, "saliency/noise/score")
    assert noise["verdict"] in ("not selected", "failed on held-out")


def test_leave_one_seed_out_when_no_heldout_seed_exists(records, tmp_path):
    subset = tmp_path / "sweep"
    for run in records.iterdir():
        if run.name.endswith(("seed0", "seed1", "seed2")):
            (subset / run.name).mkdir(parents=True)
            (subset / run.name / "record.pt").write_bytes((run / "record.pt").read_bytes())
    out = tmp_path / "out"
    rows = study.main(["--records", str(subset), "--output", str(out), "--figure", str(tmp_path / "f.png")])
    assert json.loads((out / "summary.json").read_text())["split"] == "loso"
    oracle = _row(rows, "saliency/oracle/score")
    assert (oracle["folds"], oracle["folds_selected"], oracle["folds_held"]) == (3, 3, 3)
    assert oracle["verdict"] == "holds" and oracle["heldout_accuracy"] == 1.0
    assert "(chosen in 3/3 folds, held in 3)" in (out / "table.md").read_text()
    # On seeds 0-2 the trap series is the pointing game itself: it holds there, as it should.
    assert _row(rows, "saliency/trap/score")["verdict"] == "holds"
    # Chosen when seed 2 is held out (seeds 0 and 1 agree), and fails on it: a fold never sees its held-out seed.
    trap2 = _row(rows, "saliency/trap2/score")
    assert trap2["folds_selected"] >= 1 and trap2["verdict"] == "failed on held-out"
    with pytest.raises(SystemExit):
        study.main(["--records", str(subset / "simclr_swap_seed0"), "--split", "loso", "--output", str(out)])


def test_heldout_seed_with_one_condition_is_judged_on_its_tracking(records, tmp_path):
    subset = tmp_path / "sweep"
    for name in (
        "simclr_swap_seed0",
        "simclr_noswap_seed0",
        "simclr_swap_seed1",
        "simclr_noswap_seed1",
        "simclr_swap_seed2",
    ):
        (subset / name).mkdir(parents=True)
        (subset / name / "record.pt").write_bytes((records / name / "record.pt").read_bytes())
    rows = study.main(
        ["--records", str(subset), "--output", str(tmp_path / "out"), "--figure", str(tmp_path / "f.png")]
    )
    oracle = _row(rows, "saliency/oracle/score")
    assert (oracle["folds"], oracle["folds_selected"], oracle["folds_held"]) == (3, 3, 3)
    assert oracle["verdict"] == "holds" and oracle["auc_heldout"] == 1.0  # the mean over the two folds that have it


def test_numbers_match_scipy(records, result):
    rows = result[0]
    runs = [study.series_of(name, record) for name, record in study.load_records(records)]
    tag = "shape/tsm/largest_blob_mass"
    xs, ys = study.points(runs, tag)
    row = _row(rows, tag)
    assert row["rho"] == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-9)
    swap = [study.final_value(r, tag, 1) for r in runs if r.swap]
    noswap = [study.final_value(r, tag, 1) for r in runs if not r.swap]
    u = stats.mannwhitneyu(swap, noswap).statistic
    assert row["auc"] == pytest.approx(u / (len(swap) * len(noswap)))
    d = (np.mean(swap) - np.mean(noswap)) / math.sqrt((np.var(swap, ddof=1) + np.var(noswap, ddof=1)) / 2)
    assert row["d"] == pytest.approx(d)
    train_swap = [study.final_value(r, tag, 1) for r in runs if r.swap and r.seed < 3]
    train_noswap = [study.final_value(r, tag, 1) for r in runs if not r.swap and r.seed < 3]
    assert row["threshold"] == pytest.approx((np.mean(train_swap) + np.mean(train_noswap)) / 2)


def test_statistics_hand_made():
    assert study.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic
    )
    assert math.isnan(study.spearman([1, 1, 1], [1, 2, 3]))
    assert study.auc([3, 4], [1, 2]) == 1.0 and study.auc([1, 2], [1, 2]) == 0.5 and study.auc([1], [1, 0]) == 0.75
    assert study.ranks(np.array([5.0, 1.0, 5.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    swap = np.array([True, False, False])
    lo, hi = study.bootstrap(swap, [0, 1, 2], lambda idx: float(len(idx)), 10, 0)
    assert math.isnan(lo) and math.isnan(hi)  # one swap run: nothing to resample
    values = np.array([1.0, 2.0, 3.0, 4.0])
    lo, hi = study.bootstrap(np.array([True, True, False, False]), [0, 1, 2, 3], lambda i: values[i].mean(), 200, 0)
    assert 1.0 <= lo <= 2.5 <= hi <= 4.0


def test_errors_say_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--records", str(tmp_path), "--output", str(tmp_path)])
    assert "no record.pt under" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(
            ["--records", str(tmp_path), "--output", str(tmp_path), "--train-seeds", "0", "--heldout-seeds", "0"]
        )
    assert "must not overlap" in capsys.readouterr().err


def _numpy_spread(m: np.ndarray) -> float:
    # Std of the mass's position (pixel centres in (0, 1)) over a uniform map's, mean over the batch.
    out = []
    for x in m:
        p = x / x.sum()
        h, w = p.shape
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        py, px = p.sum(axis=1), p.sum(axis=0)
        var = (py * ys**2).sum() - (py * ys).sum() ** 2 + (px * xs**2).sum() - (px * xs).sum() ** 2
        out.append(np.sqrt(var / ((1 - 1 / h**2) / 12 + (1 - 1 / w**2) / 12)))
    return float(np.mean(out))


def test_spread_rule_compares_the_last_spread_with_the_fresh_maps(records, result):
    _, out, _ = result
    rows = list(csv.DictReader((out / "spread_rule.csv").open()))
    assert len(rows) == 10 and {r["map"] for r in rows} == {"tsm"}
    for row in rows:
        record = torch.load(records / row["run"] / "record.pt", weights_only=True)
        last = max(record["steps"])
        spread = _numpy_spread(record["maps"][last]["tsm"].float().numpy())
        reference = _numpy_spread(record["fresh_maps"]["tsm"].float().numpy())
        assert float(row["spread"]) == pytest.approx(spread, abs=1e-4)
        assert float(row["fresh_init_spread"]) == pytest.approx(reference, abs=1e-4)
        assert row["flagged"] == str(spread > reference) and row["final_step"] == str(last)
        half = [_numpy_spread(record["maps"][s]["tsm"].float().numpy()) > reference for s in record["steps"]]
        half = [h for s, h in zip(record["steps"], half, strict=True) if s >= last / 2]
        assert float(row["flagged_from_half"]) == pytest.approx(sum(half) / len(half), abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())["spread_rule"]["tsm"]
    noswap = [r for r in rows if r["swap"] == "False"]
    assert summary["flagged_noswap"] == f"{sum(r['flagged'] == 'True' for r in noswap)}/{len(noswap)}"
