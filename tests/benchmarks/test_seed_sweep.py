"""The seed sweep and its recorder at a tiny size: the record's maps against an independent recomputation."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from recorder import CRITERION_ABOVE_RANDOM, CRITERION_RISE, Recorder, random_reference, summary_row  # noqa: E402

from tsm_lightning import METHODS, saliency_maps, upsample_maps  # noqa: E402
from tsm_lightning.metrics import pointing_game  # noqa: E402

TINY = ["--max-steps", "2", "--image-size", "32", "--batch-size", "4", "--num-samples", "8", "--probe-size", "4"]
TINY += ["--every-n-steps", "1", "--accelerator", "cpu"]


def _sweep(runs: Path, results: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "seed_sweep.py"), "--seeds", "3", "--conditions", "swap"]
    command += ["--runs", str(runs), "--results", str(results), "--recipe", "tiny"]
    command += ["--recipes", str(results / "recipes.csv"), "--", *TINY]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=runs.parent)


def _reference_maps(model: torch.nn.Module, images: torch.Tensor, layer: str) -> dict[str, torch.Tensor]:
    """The maps by a plain forward hook and the core maths (not the pipeline the recorder calls)."""
    grabbed = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: grabbed.append(o.detach()))
    model.eval()
    with torch.no_grad():
        model.backbone(images)
    handle.remove()
    return saliency_maps(grabbed[0].float())


@pytest.mark.filterwarnings("ignore")
def test_seed_sweep_records_every_map_and_resumes(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    done = _sweep(runs, results)
    assert done.returncode == 0, done.stderr[-3000:]
    path = runs / "simclr_swap_seed3" / "record.pt"
    record = torch.load(path, weights_only=True)
    meta = record["meta"]
    assert (meta["method"], meta["seed"], meta["swap"], meta["recipe"], meta["steps"]) == ("simclr", 3, True, "tiny", 2)
    assert meta["layer"] == "backbone.6" and meta["probe_size"] == 4 and meta["seconds"] > 0
    assert meta["command"].startswith("python examples/simclr.py --seed 3 --max-steps 2")
    assert record["steps"] == [0, 1, 2] and sorted(record["loss"]) == [0, 1]
    assert record["masks"].dtype == torch.bool and record["masks"].shape == (4, 32, 32)
    for step in record["steps"]:
        assert sorted(record["maps"][step]) == sorted(METHODS) == sorted(record["maps_flip"][step])
        assert all(m.dtype == torch.float16 and m.shape == (4, 8, 8) for m in record["maps"][step].values())

    # The last maps are those of the checkpoint's weights, recomputed here without the library's pipeline.
    from simclr import SimCLR

    (ckpt,) = runs.glob("simclr_swap_seed3/simclr/version_0/checkpoints/last.ckpt")
    model = SimCLR.load_from_checkpoint(ckpt, map_location="cpu")
    from common import probe

    args = type("Args", (), {"data": "textured", "num_samples": 8, "image_size": 32, "seed": 3, "probe_size": 4})
    images, masks = probe(args)
    assert torch.equal(masks, record["masks"])
    expected = _reference_maps(model, images, "backbone.6")
    flipped = _reference_maps(model, images.flip(-1), "backbone.6")
    for name in METHODS:
        torch.testing.assert_close(record["maps"][2][name].float(), expected[name], atol=2e-3, rtol=0)
        torch.testing.assert_close(record["maps_flip"][2][name].float(), flipped[name].flip(-1), atol=2e-3, rtol=0)
        assert not torch.allclose(record["fresh_maps"][name].float(), record["maps"][0][name].float(), atol=0.05)

    # The summary's numbers are recomputed from the maps; the monitor's own logged values agree with them.
    (row,) = list(csv.DictReader((results / "summary.csv").open()))
    hits = pointing_game(upsample_maps(expected["tsm"], (32, 32)), masks).mean()
    assert float(row["tsm_pg_end"]) == pytest.approx(float(hits), abs=1e-4)
    logged = record["scalars"]
    assert float(row["random_pg"]) == pytest.approx(logged[0]["saliency/random/pointing_game"], abs=1e-4)
    assert float(row["chance"]) == pytest.approx(logged[0]["saliency/chance/pointing_game"], abs=1e-4)
    assert float(row["tsm_eim_end"]) == pytest.approx(logged[2]["saliency/tsm/energy_in_mask"], abs=5e-3)
    long = list(csv.DictReader((results / "scalars.csv").open()))
    assert set(long[0]) == {"run", "method", "seed", "swap", "step", "tag", "value"}
    tsm = {int(r["step"]): float(r["value"]) for r in long if r["tag"] == "saliency/tsm/pointing_game"}
    assert tsm == pytest.approx({step: logged[step]["saliency/tsm/pointing_game"] for step in (0, 1, 2)})

    (recipe,) = list(csv.DictReader((results / "recipes.csv").open()))
    assert (recipe["run"], recipe["args"], recipe["learned"]) == ("tiny/simclr_swap_seed3", " ".join(TINY), "False")
    assert float(recipe["rise"]) == pytest.approx(float(row["tsm_pg_end"]) - float(row["tsm_pg_init"]), abs=1e-4)

    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seed_sweep.py"), "--table", "--results", str(results)],
        capture_output=True,
        text=True,
    )
    line = f"| 3 | yes | {float(row['tsm_pg_init']):.3f} → **{float(row['tsm_pg_end']):.3f}** |"
    assert table.returncode == 0 and line in table.stdout, table.stdout + table.stderr
    pytest.importorskip("matplotlib")
    drawn = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seed_sweep.py"), "--figure", "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert (results / "pointing_game.png").read_bytes()[:4] == b"\x89PNG"

    # The method study reads the sweep's model, gives its intervals as CSV, and refuses seeds that did not learn.
    study = [sys.executable, str(ROOT / "benchmarks" / "method_study.py"), "--seeds", "3", "--sweep", str(runs)]
    study += ["--num-images", "8", "--faithfulness-images", "2", "--results", str(results / "study")]
    done = subprocess.run(study, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tsm − eigencam | pointing_game |" in done.stdout
    rows = list(csv.DictReader((results / "study" / "intervals.csv").open()))
    assert len(rows) == 10 and all(
        float(r["ci_low"]) <= float(r["mean_difference"]) <= float(r["ci_high"]) for r in rows
    )
    refused = subprocess.run(
        [*study, "--learned-only", "--summary", str(results / "summary.csv")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "none of the requested seeds met the criterion" in refused.stderr

    # The monitor's own end-of-training numbers, recomputed from the checkpoint: the step-0 pointing game is the run's.
    check = [sys.executable, str(ROOT / "benchmarks" / "spread_warning_check.py"), "--runs", str(runs)]
    check += ["--probe-size", "4", "--image-size", "32", "--num-samples", "8", "--layer", "backbone.6"]
    check += ["--output", str(results / "warning.csv")]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["map"]: r for r in csv.DictReader((results / "warning.csv").open())}
    assert float(rows["tsm"]["pointing_game_step0"]) == pytest.approx(float(row["tsm_pg_init"]), abs=1e-3)
    warns = float(rows["tsm"]["mass_spread"]) > float(rows["tsm"]["fresh_init_mass_spread"])
    assert rows["tsm"]["warns"] == str(warns) and "| simclr_swap_seed3 |" in done.stdout

    # Resumable: the run is not trained again, and the CSVs keep one copy of its rows.
    stamp = path.stat().st_mtime_ns
    again = _sweep(runs, results)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "record exists" in again.stdout and path.stat().st_mtime_ns == stamp
    assert len(list(csv.DictReader((results / "scalars.csv").open()))) == len(long)


def _record(tsm_end: torch.Tensor, masks: torch.Tensor) -> dict:
    """A hand-made record: at step 0 every map points at the top-left corner, at step 10 ``tsm_end``."""
    corner = torch.zeros(masks.shape[0], 4, 4)
    corner[:, 0, 0] = 1
    return {
        "meta": {"method": "simclr", "seed": 0, "swap": True, "seconds": 1.0},
        "masks": masks,
        "steps": [0, 10],
        "maps": {0: {"tsm": corner.half()}, 10: {"tsm": tsm_end.half()}},
        "fresh_maps": {},
        "scalars": {},
        "loss": {0: 2.0, 9: 1.0},
    }


def test_summary_applies_the_criterion_to_tsm():
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[:, 8:, 8:] = True  # object in the bottom-right quarter; the corner at step 0 misses it
    on_object = torch.zeros(8, 4, 4)
    on_object[:, 3, 3] = 1
    row = summary_row("r", _record(on_object, masks))
    assert row["tsm_pg_init"] == 0.0 and row["tsm_pg_end"] == 1.0
    assert row["random_pg"] == pytest.approx(random_reference(masks)["pointing_game"], abs=1e-4)
    assert row["chance"] == 0.25 and row["loss_first"] == 1.5 and row["learned"] is True
    half = on_object.clone()
    half[4:] = 0
    half[4:, 0, 0] = 1  # half the images still point at the corner: a rise of 0.5, ending at 0.5
    row = summary_row("r", _record(half, masks))
    expected = CRITERION_RISE <= 0.5 and 0.5 - row["random_pg"] >= CRITERION_ABOVE_RANDOM
    assert row["tsm_pg_end"] == 0.5 and row["learned"] is expected
    assert summary_row("r", _record(torch.zeros(8, 4, 4) + torch.eye(4)[0, :, None], masks))["learned"] is False


def test_recorder_rejects_a_bad_cadence_and_an_empty_record():
    with pytest.raises(ValueError, match="every_n_steps"):
        Recorder(torch.zeros(1, 3, 8, 8), None, "backbone.7", 0)
    with pytest.raises(RuntimeError, match="took no maps"):
        Recorder(torch.zeros(1, 3, 8, 8), None, "backbone.7", 5).record({}, {})


def test_curve_figure_groups_runs_and_leaves_out_what_it_is_told(tmp_path):
    pytest.importorskip("matplotlib")
    from recorder import curve_figure

    rows = []
    for run, swap in (("a", "True"), ("b", "True"), ("c", "False"), ("d", "skip")):
        for step, value in ((0, 0.2), (10, 0.5 if swap == "True" else 0.1)):
            tag = "record/tsm/pointing_game"
            rows.append({"run": run, "swap": swap, "step": str(step), "tag": tag, "value": value})
        rows.append({"run": run, "swap": swap, "step": "0", "tag": "saliency/random/pointing_game", "value": 0.1})
    group = {"True": "swap", "False": "no swap"}.get
    counts = curve_figure(rows, tmp_path / "f.png", lambda r: group(r["swap"]), "title")
    assert counts == {"swap": 2, "no swap": 1}
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
