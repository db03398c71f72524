"""The SSL method matrix end to end at a tiny size: records, CSVs, table and figure."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ssl_matrix import MATRIX, cadence, figure_groups, table  # noqa: E402


def test_matrix_covers_the_issues_methods_and_reads_each_cadence():
    assert list(MATRIX) == ["simclr", "moco_v2", "byol", "swav", "barlow_twins", "vicreg", "dino_resnet", "dino_vit"]
    assert cadence(MATRIX["byol"][1], "byol") == 15 and cadence([], "dino_vit") == 30
    assert cadence([*MATRIX["byol"][1], "--every-n-steps", "1"], "byol") == 1


@pytest.mark.filterwarnings("ignore")
def test_quick_matrix_records_every_run_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "ssl_matrix.py"), "--quick", "--methods", "byol", "dino_vit"]
    command += ["--seeds", "0", "--noswap-seeds", "0", "--runs", str(runs), "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.parent.name for p in runs.glob("*/record.pt"))
    assert names == ["byol_noswap_seed0", "byol_swap_seed0", "dino_vit_noswap_seed0", "dino_vit_swap_seed0"]
    vit = torch.load(runs / "dino_vit_swap_seed0" / "record.pt", weights_only=True)
    assert vit["steps"] == [0, 1, 2] and "attention" in vit["maps"][2] and "attention" in vit["fresh_maps"]
    assert vit["meta"]["layer"] == "backbone.encoder.layers.encoder_layer_3"
    rows = {row["run"]: row for row in csv.DictReader((results / "summary.csv").open())}
    assert set(rows) == set(names) and rows["byol_swap_seed0"]["method"] == "byol"
    assert rows["dino_vit_swap_seed0"]["attention_pg_end"] != "" and rows["byol_swap_seed0"]["attention_pg_end"] == ""
    text = (results / "table.md").read_text()
    assert text.splitlines()[2].startswith("| byol | 1 (") and text.splitlines()[3].startswith("| dino_vit | 1 (")
    assert (results / "pointing_game.png").read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run([*command, "--report"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "| byol |" in again.stdout

    # A recipe variant runs beside the matrix's runs, under its own name, with its arguments.
    variant = [*command[:2], "--quick", "--methods", "dino_vit", "--seeds", "0", "--noswap-seeds", "--runs", str(runs)]
    variant += ["--results", str(results), "--variant", "convstem", "--", "--conv-stem"]
    done = subprocess.run(variant, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = torch.load(runs / "dino_vit+convstem_swap_seed0" / "record.pt", weights_only=True)
    assert record["meta"]["method"] == "dino_vit+convstem" and "--conv-stem" in record["meta"]["command"]
    assert "| dino_vit+convstem | 1 (" in (results / "table.md").read_text()
    unnamed = subprocess.run([*command, "--", "--lr", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert unnamed.returncode != 0 and "--variant" in unnamed.stderr


def test_table_gives_means_and_spread_over_seeds_and_the_control():
    rows = [
        {"method": "byol", "swap": "True", "tsm_pg_init": "0.2", "tsm_pg_end": "0.6", "learned": "True"},
        {"method": "byol", "swap": "True", "tsm_pg_init": "0.3", "tsm_pg_end": "0.8", "learned": "False"},
        {"method": "byol", "swap": "False", "tsm_pg_init": "0.3", "tsm_pg_end": "0.1"},
    ]
    line = table(rows).splitlines()[2]
    assert line.startswith("| byol | 2 (1) | 0.25 (0.20–0.30) → 0.70 (0.60–0.80) |")
    assert "| 0.10 |" in line


def test_figures_split_the_matrix_from_the_recipe_variants():
    def runs(method: str, seeds: int, control: bool = True) -> list[dict[str, str]]:
        return [{"method": method, "swap": "True"}] * seeds + [{"method": method, "swap": "False"}] * control

    summary = runs("vicreg", 3) + runs("byol+onecycle", 1) + runs("simclr", 3) + runs("dino_vit+convstem", 3)
    summary += runs("byol", 2) + runs("swav+only_control", 0)
    summary += [{"method": "dino_vit", "swap": "True", "attention_pg_end": "0.2"}]
    summary += [{"method": "simclr+vit", "swap": "False", "attention_pg_end": "0.3"}]
    summary = [{"attention_pg_end": "", **row} for row in summary]
    main, variants, vits = figure_groups(summary)
    assert main == ["simclr", "byol", "vicreg", "dino_vit", "dino_vit+convstem"]  # the matrix's order; 3-seed variant
    assert variants == ["simclr", "byol+onecycle", "dino_vit+convstem"]
    assert vits == ["dino_vit"]  # a method drawn needs a background-swap run
